"""`python -m pipeline <stage>` — the same commands as `lessons <stage>`."""

from pipeline.cli import main

main(prog_name="lessons", obj={})

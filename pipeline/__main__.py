"""`python -m pipeline <stage>` — the same commands as `lessons <stage>`."""

import os
import signal

if os.environ.get("LESSONS_RANK_ERRORS"):
    # A rank started by pipeline.launch: a Ctrl-C reaches the whole process group, and the
    # launcher answers it (one line) and stops the ranks with SIGTERM; a rank interrupted in the
    # middle of its imports would only add a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

from pipeline.cli import main  # after the signal set-up

main(prog_name="lessons", obj={})

"""`LessonsError`: the base of every deliberate lessons error.

A deliberate error is bad input, a bad setting or an environment the run cannot use, told in one
line that names what is wrong and how to fix it. `lessons` (pipeline/cli.py) shows exactly these
as that one line with exit status 1; any other exception is a bug and shows its traceback. Each
subclass also keeps the built-in type it always had (`ConfigError` is a `ValueError`,
`OutputError` an `OSError`, ...), so existing `except` clauses still catch it.

It lives in storage/ because every layer may import storage (DESIGN §2) and storage may import
neither pipeline/ nor stages/.
"""

from __future__ import annotations


class LessonsError(Exception):
    """A deliberate, one-line error about the input, the settings or the environment."""


class SettingsError(LessonsError, ValueError):
    """A setting valid on its own that this run cannot use (a batch larger than the training split,
    a dask scheduler that cannot be reached)."""

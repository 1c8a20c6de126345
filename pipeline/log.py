"""Logging set-up, done once by the CLI."""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger(__name__)


def configure_logging(verbose: bool = False) -> None:
    """Log INFO (DEBUG with `verbose`) to stderr as `LEVEL name: message`; a torchrun rank other
    than 0 logs warnings and errors only (rank 0 speaks for the job)."""
    import os

    quiet = int(os.environ.get("RANK", "0") or 0) > 0
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("numba", "matplotlib", "PIL", "fsspec", "asyncio", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

"""Logging set-up, done once by the CLI."""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger(__name__)


def configure_logging(verbose: bool = False) -> None:
    """Log INFO (DEBUG with `verbose`) to stderr as `LEVEL name: message`."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("numba", "matplotlib", "PIL", "fsspec", "asyncio", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

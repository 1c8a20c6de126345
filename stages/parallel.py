"""Where dask runs (the local threaded scheduler, or a `dask.distributed` cluster by address), and
how torch behaves inside a dask task."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from storage.errors import SettingsError

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def dask_scheduler(address: str | None, where: str = "--scheduler") -> Iterator[Any]:
    """Yield the `scheduler=` value for dask calls.

    Args:
        address: None for the local threaded scheduler; else a scheduler address such as
            `tcp://10.0.0.5:8786` (needs the `distributed` extra), used for the duration.
        where: what set the address (`--scheduler`, `adjust.scheduler`), named in errors.
    Raises:
        SettingsError: `distributed` is not installed or the scheduler cannot be reached.
    """
    if address is None:
        yield "threads"
        return
    try:
        from distributed import Client
    except ImportError as exc:
        raise SettingsError("--scheduler needs dask.distributed: pip install 'lessons[distributed]'") from exc
    try:
        client = Client(address, timeout="10s", set_as_default=False)
    except OSError as exc:
        raise SettingsError(
            f"{where}: cannot reach the dask scheduler at {address} ({exc}); start it, or run on "
            f"local threads by dropping {where}"
        ) from exc
    logger.info("dask: using the cluster at %s", address)
    try:
        yield client
    finally:
        client.close()


def block_rows(block_info: Any, axis: int = 1) -> str:
    """`samples a..b: ` for the dask block described by `block_info` (map_blocks passes it), so
    an error raised inside a block can say where in the store it is; empty when unknown."""
    try:
        start, stop = block_info[0]["array-location"][axis]
    except (TypeError, KeyError, IndexError):
        return ""
    return f"samples {start}..{stop - 1}: "


@contextlib.contextmanager
def prefixed(prefix: str, *types: type[Exception]) -> Iterator[None]:
    """Re-raise an exception of one of `types` raised inside with `prefix: ` before its message
    (e.g. the store a dask block came from)."""
    try:
        yield
    except types as exc:
        raise type(exc)(f"{prefix}: {exc}") from exc


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch single-threaded in the calling thread (a dask task), restoring it after.

    dask already runs one block per core; torch's intra-op threads on top oversubscribe the
    cores, and OpenMP threads spinning at barriers then make a block several times slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)

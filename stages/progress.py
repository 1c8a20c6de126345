"""Progress for long loops: a tqdm bar on a TTY only, and a periodic INFO line with throughput."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
logger = logging.getLogger(__name__)


def progress(
    items: Iterable[T],
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    log: logging.Logger = logger,
    every_s: float = 30.0,
    unit_scale: int = 1,
) -> Iterator[T]:
    """Iterate with a tqdm bar on a TTY (disable=None) and an INFO line every `every_s` seconds.

    `unit_scale` is how many units one item stands for (e.g. the batch size, for images/s).
    """
    start = last = time.perf_counter()
    for done, item in enumerate(
        tqdm(items, desc=desc, total=total, unit="batch", disable=None, leave=False), 1
    ):
        yield item
        now = time.perf_counter()
        if now - last >= every_s:
            last = now
            rate = done * unit_scale / (now - start)
            log.info("%s: %d/%s, %.0f %s/s", desc, done, total if total is not None else "?", rate, unit)

"""FFCV `.beton` files: images, labels and `sample_index`, written once per dataset split.

Soft labels never go into the beton (DESIGN.md §1): the trainer gathers them from the stores by
`sample_index`, so one beton serves every teacher, KA mode and DTD mode.

FFCV traps handled here (see shared/FFCV-NOTES.md): inputs are validated before ffcv sees them
(an exception inside an ffcv worker hangs instead of failing); numba operations stay before
`ToTensor`; `drop_last` is explicit; importing ffcv or building a `Loader` resets torch's thread
count, so `make_loader` restores it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from storage.atomic import OutputError, describe_os_error, temporary_sibling
from storage.errors import LessonsError

logger = logging.getLogger(__name__)


class BetonError(LessonsError, ValueError):
    """A beton cannot be written or read (bad input arrays, missing file)."""


class _Rows:
    """Indexed view handed to ffcv's writer: row i -> (image, label, sample_index)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        return self.images[i], int(self.labels[i]), int(i)


def write_beton(path: str | Path, images: np.ndarray, labels: np.ndarray, num_workers: int = 2) -> None:
    """Write a beton of (image, label, sample_index) rows; sample_index = row position.

    Args:
        path: destination `.beton`; written to `<path>.partial` and renamed when complete.
        images: (N, H, W, C) uint8, C in {1, 3}. labels: (N,) integer >= 0.
        num_workers: ffcv writer processes.
    Raises:
        BetonError: empty input, wrong dtype or shape, negative labels.
        OutputError: the folder is not writable or the disk is full.
    """
    from ffcv.fields import IntField, NDArrayField
    from ffcv.writer import DatasetWriter

    path = Path(path)
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3):
        raise BetonError(f"{path}: images must be uint8 (N, H, W, 1|3), got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],) or labels.dtype.kind not in "iu":
        raise BetonError(
            f"{path}: labels must be integer (N,) = ({images.shape[0]},), got {labels.dtype} {labels.shape}"
        )
    if images.shape[0] == 0:
        raise BetonError(f"{path}: refusing to write an empty split")
    if labels.min() < 0:
        raise BetonError(f"{path}: negative label {int(labels.min())}")
    fields = {
        "image": NDArrayField(dtype=np.dtype("uint8"), shape=tuple(images.shape[1:])),
        "label": IntField(),
        "sample_index": IntField(),
    }
    tmp = None
    try:
        tmp = temporary_sibling(path)
        writer = DatasetWriter(str(tmp), fields, num_workers=max(1, num_workers))
        writer.from_indexed_dataset(_Rows(np.ascontiguousarray(images), labels), chunksize=1000)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):  # e.g. ENOTDIR: the cause, not a second error
                tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise OutputError(exc.errno, describe_os_error(exc, path)) from exc
        raise
    logger.info("%s: %d rows written", path, images.shape[0])


class GuardedLoader:
    """An ffcv `Loader` whose iteration fails instead of hanging when its pipeline thread dies.

    ffcv runs the pipeline in a thread that feeds a queue; an exception there (printed to stderr
    by the thread) leaves the consumer blocked forever. Here the queue is polled and the thread's
    liveness checked, so such a failure raises `RuntimeError` within a second.
    """

    def __init__(self, loader: Any, torch_threads: int | None = None) -> None:
        self.loader = loader
        self.torch_threads = torch_threads  # re-applied after each `iter`, which resets it

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def next_epoch(self) -> int:
        return self.loader.next_epoch

    @next_epoch.setter
    def next_epoch(self, epoch: int) -> None:
        self.loader.next_epoch = epoch

    def __iter__(self) -> Any:
        import queue

        import torch
        from ffcv.loader import epoch_iterator

        it = iter(self.loader)
        # ffcv sets torch to num_workers threads twice: in Loader.__iter__ and again from the
        # epoch thread as it starts (EpochIterator.run). Re-applying our count only after the
        # first batch arrived (so after the epoch thread's call) avoids a race whose winner
        # decided the thread count, and so the float rounding, of every epoch.
        threads_pending = self.torch_threads
        while True:
            try:
                item = it.output_queue.get(timeout=0.5)
            except queue.Empty:
                if not it.is_alive() and it.output_queue.empty():
                    it.close()
                    raise RuntimeError(
                        "the ffcv loader thread died (its error is printed above); "
                        "check the beton and the pipeline"
                    ) from None
                continue
            if threads_pending is not None:
                torch.set_num_threads(threads_pending)
                threads_pending = None
            if item is None:
                it.close()
                return
            slot, batch = item
            if epoch_iterator.IS_CUDA:
                it.current_stream.wait_stream(it.cuda_streams[slot])
            yield batch


EPOCH_ORDER_STREAM = 4  # the stream id of the epoch order (stages/views.py uses 1-3 for views)


def epoch_order(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """The training order of `indices` in `epoch`: a permutation drawn from the explicit key
    `SeedSequence([seed, EPOCH_ORDER_STREAM, epoch])` (STYLE principle 4).

    ffcv's own random order draws from `seed + epoch`, so seed 1 at epoch e would shuffle like
    seed 0 at epoch e + 1 and runs "over seeds" would share epoch orders; a keyed draw cannot
    collide that way.

    Args:
        seed: the run's seed, >= 0. epoch: >= 0. indices: (N,) int rows of the beton.
    Returns:
        (N,) the same rows, permuted.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, EPOCH_ORDER_STREAM, epoch]))
    return rng.permutation(indices)


def shard_order(order: np.ndarray, batch_size: int, rank: int, world_size: int) -> np.ndarray:
    """Rank `rank`'s share of an epoch `order` under data parallelism (DESIGN §6).

    The order is cut into global batches of `batch_size`·`world_size` consecutive rows (a tail
    short of a whole global batch is dropped, as `drop_last` drops it); rank r takes the r-th
    `batch_size` rows of each. So at every step the ranks' batches together are the one-process
    run's batch of that step, and no row is seen by two ranks.

    Args:
        order: (N,) int rows in epoch order. batch_size: rows per rank per step, >= 1.
        rank: in [0, world_size).
    Returns:
        (S·batch_size,) int, S = N // (batch_size·world_size) steps.
    """
    global_batch = batch_size * world_size
    steps = order.shape[0] // global_batch
    return order[: steps * global_batch].reshape(steps, world_size, batch_size)[:, rank].reshape(-1)


def _keyed_random_order(loader: Any, shard: tuple[int, int] | None = None) -> Any:
    """An ffcv traversal order whose epoch permutations come from `epoch_order`; with `shard`
    (rank, world_size), that rank's `shard_order` of each."""
    from ffcv.traversal_order.base import TraversalOrder

    class KeyedRandom(TraversalOrder):
        def sample_order(self, epoch: int) -> np.ndarray:
            order = epoch_order(int(self.seed), epoch, np.asarray(self.indices))
            return order if shard is None else shard_order(order, self.loader.batch_size, *shard)

    return KeyedRandom(loader)


def make_loader(
    path: str | Path,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 2,
    seed: int = 0,
    drop_last: bool = False,
    torch_threads: int | None = None,
    indices: Any = None,
    shard: tuple[int, int] | None = None,
) -> Any:
    """An ffcv `Loader` yielding (images uint8 (B, C, H, W), labels int64 (B,), sample_index (B,)).

    With `shuffle`, epoch e visits the rows in the order `epoch_order(seed, e, rows)`. Images
    come as stored: the trainer augments them on its side from explicit keys (stages/views.py).
    Batch buffers are reused by ffcv between iterations: clone what you keep.

    `indices` restricts the loader to those rows (in that order when not shuffled). `shard`
    (rank, world_size), shuffled with `drop_last` only: this rank's share of every epoch's order
    (`shard_order`; `batch_size` is then the per-rank batch).
    `torch_threads` (default: every core this process may use) is re-applied after the loader
    is built and each time an epoch starts, since ffcv resets torch's thread count then (to
    `num_workers` threads).

    Raises:
        BetonError: the beton file is missing.
    """
    import torch
    from ffcv.fields.decoders import IntDecoder, NDArrayDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Squeeze, ToTensor, ToTorchImage

    path = Path(path)
    if shard is not None and not (shuffle and drop_last):
        raise ValueError("a sharded loader is a training loader: shuffle and drop_last")
    if not path.is_file():
        raise BetonError(f"{path}: no beton; run `lessons prepare-data` first")
    image_ops: list[Any] = [NDArrayDecoder(), ToTensor(), ToTorchImage(channels_last=False)]
    threads = torch_threads or len(os.sched_getaffinity(0))
    if num_workers > len(os.sched_getaffinity(0)):  # numba refuses more threads than cores
        logger.warning(
            "num_workers %d is more than the %d cores available; using %d",
            num_workers,
            len(os.sched_getaffinity(0)),
            len(os.sched_getaffinity(0)),
        )
        num_workers = len(os.sched_getaffinity(0))
    loader = GuardedLoader(
        Loader(
            str(path),
            batch_size=batch_size,
            num_workers=max(1, num_workers),
            order=OrderOption.RANDOM if shuffle else OrderOption.SEQUENTIAL,
            seed=seed,
            drop_last=drop_last,
            indices=indices,
            pipelines={
                "image": image_ops,
                "label": [IntDecoder(), ToTensor(), Squeeze(1)],
                "sample_index": [IntDecoder(), ToTensor(), Squeeze(1)],
            },
        ),
        torch_threads=threads,
    )
    if shuffle:  # ffcv's RANDOM order draws from seed + epoch: replace it by a keyed one
        loader.loader.traversal_order = _keyed_random_order(loader.loader, shard)
        loader.loader.first_traversal_order = loader.loader.next_traversal_order()
    torch.set_num_threads(threads)  # ffcv reset it
    return loader

"""Ranks of a `torchrun` job (DESIGN §6): who this process is, its device, and the few collectives
the stages need. A process started without torchrun is rank 0 of 1 and none of this costs anything.

torchrun (or `pipeline.launch`, which starts it for `nproc > 1`) sets `RANK`, `WORLD_SIZE`,
`LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT`; `process_group` joins the job
over gloo on CPU and nccl on CUDA.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from storage.errors import LessonsError

T = TypeVar("T")


class RankError(LessonsError, RuntimeError):
    """Another rank of this job failed; the message is that rank's one-line error."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: rank `rank` of `world_size`, `local_rank` on its host."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that publishes outputs and writes metrics."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: `cuda:<local_rank>` for a CUDA job, `device` otherwise."""
        return torch.device("cuda", self.local_rank) if device.type == "cuda" else device

    def threads(self) -> int:
        """The CPU threads this rank may use: its share of the host's cores (at least 1)."""
        return max(1, len(os.sched_getaffinity(0)) // self.local_world_size)


def ranks_from_env(environ: dict[str, str] | None = None) -> Ranks:
    """The ranks torchrun set in the environment; rank 0 of 1 when it did not."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return Ranks()
    world_size = int(env["WORLD_SIZE"])
    return Ranks(
        rank=int(env.get("RANK", "0")),
        world_size=world_size,
        local_rank=int(env.get("LOCAL_RANK", "0")),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world_size))),
    )


@contextlib.contextmanager
def process_group(device: torch.device, ranks: Ranks | None = None) -> Iterator[Ranks]:
    """Join the torchrun job for the duration (nothing to do for rank 0 of 1).

    gloo on CPU, nccl on CUDA (each rank on `cuda:<local_rank>`). A barrier that waits longer
    than an hour for a rank means that rank is stuck: the job fails rather than hang.
    """
    ranks = ranks or ranks_from_env()
    if not ranks.distributed or dist.is_initialized():
        yield ranks
        return
    if device.type == "cuda":
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        rank=ranks.rank,
        world_size=ranks.world_size,
        timeout=datetime.timedelta(hours=1),
    )
    try:
        yield ranks
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op outside a job)."""
    if dist.is_initialized():
        dist.barrier()


def from_main(ranks: Ranks, make: Callable[[], T]) -> T:
    """Run `make` on rank 0 and give every rank its result (a picklable value).

    A `LessonsError` raised by `make` on rank 0 is raised on rank 0 as is, and as a `RankError`
    with the same one-line message on the other ranks, so every rank stops the same way.
    """
    if not ranks.distributed:
        return make()
    box: list[Any] = [None]
    error: LessonsError | None = None
    if ranks.main:
        try:
            box[0] = ("ok", make())
        except LessonsError as exc:
            error = exc
            box[0] = ("error", str(getattr(exc, "strerror", None) or exc))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if error is not None:
        raise error
    if status == "error":
        raise RankError(value)
    return value


def gather(ranks: Ranks, value: T) -> list[T]:
    """Every rank's `value`, in rank order, on every rank."""
    if not ranks.distributed:
        return [value]
    out: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(out, value)
    return out

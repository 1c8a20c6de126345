"""Start a stage as `nproc` torchrun ranks on this host (DESIGN §6; `teacher_dump.nproc`,
`student_train.nproc`).

`lessons teacher-dump` / `lessons student-train` call `launch` when their section's `nproc` is
above 1 and the process is not already a rank: the same command then runs as ranks 0..nproc−1 of
a torchrun job (torch's elastic launcher, the engine behind `torchrun --standalone`). Several
hosts: start the command under `torchrun --nnodes ... --rdzv-endpoint ...` yourself; each rank
sees `WORLD_SIZE` and joins without relaunching.

A rank's deliberate error (`LessonsError`) is written to torchrun's per-rank error file instead of
stderr; when the job fails, this launcher reports the first rank's error as one line, or the rank
that died (a signal) and how to resume.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence

import torch

from storage.errors import LessonsError

RANK_ERRORS = "LESSONS_RANK_ERRORS"  # set for ranks started here: errors go to the error file


class LaunchError(LessonsError, RuntimeError):
    """A torchrun job could not start, or one of its ranks failed (one line)."""


def check_nproc(nproc: int, device: torch.device, *, key: str) -> None:
    """Refuse more ranks than this host can run: CUDA devices on a CUDA job, cores on a CPU one.

    Raises:
        LaunchError: `nproc` above the devices or cores available (names `key`).
    """
    if device.type == "cuda":
        available, what = torch.cuda.device_count(), "CUDA devices"
    else:
        available, what = len(os.sched_getaffinity(0)), "CPU cores"
    if nproc > available:
        raise LaunchError(
            f"{key}: {nproc} processes, but this host has {available} {what}; "
            f"set {key} to at most {available}"
        )


def launch(
    nproc: int,
    argv: Sequence[str],
    *,
    device: torch.device,
    key: str,
    what: str,
    kept: str = "the work of finished chunks is kept: run the same command again (any nproc) to resume",
) -> None:
    """Run `python -m pipeline <argv>` as `nproc` ranks of one torchrun job on this host.

    Args:
        nproc: ranks to start (>= 2). argv: the `lessons` arguments each rank runs.
        device: the stage's resolved device (CUDA: one rank per device). key: the params key that
            set `nproc` (for messages). what: the stage's output, named in messages. kept: what
            a rank's death leaves and how to resume, for that message.
    Raises:
        LaunchError: `nproc` above the devices or cores, or a rank failed: its one-line error, or
            the signal it died of.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check_nproc(nproc, device, key=key)
    # The launcher's own reports (a failed or interrupted job) are ours to give, as one line;
    # torch sets a level on each of its loggers, so each is quietened, not only their parent.
    for name in [*logging.root.manager.loggerDict, "torch.distributed.elastic"]:
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="lessons-ranks-") as logs:
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=str(uuid.uuid4()),
            rdzv_backend="c10d",
            rdzv_endpoint="localhost:0",
            max_restarts=0,
            monitor_interval=0.1,
            start_method="spawn",
            logs_specs=DefaultLogsSpecs(log_dir=logs),
        )
        os.environ[RANK_ERRORS] = "1"
        try:
            elastic_launch(config, sys.executable)("-m", "pipeline", *argv)
        except ChildFailedError as exc:
            rank, failure = exc.get_first_failure()
            message = failure.message if isinstance(failure.message, str) else ""
            if failure.exitcode < 0 or not message or message.startswith("To enable traceback"):
                raise LaunchError(
                    f"rank {rank} of {nproc} died (exit status {failure.exitcode}); {what}: {kept}"
                ) from None
            raise LaunchError(message) from None
        except (SignalException, KeyboardInterrupt) as exc:  # Ctrl-C, or a kill of this launcher
            signal_name = getattr(getattr(exc, "sigval", None), "name", "SIGINT")
            raise LaunchError(f"interrupted ({signal_name}) with {nproc} processes; {what}: {kept}") from None
        finally:
            os.environ.pop(RANK_ERRORS, None)


def report_rank_error(message: str) -> bool:
    """In a rank started by `launch`, write the one-line error to torchrun's error file.

    Returns:
        True if it was written (the caller then exits 1 without printing), else False.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not os.environ.get(RANK_ERRORS) or not path:
        return False
    try:
        with open(path, "w") as handle:
            json.dump({"message": message, "timestamp": int(time.time())}, handle)
    except OSError:
        return False
    return True

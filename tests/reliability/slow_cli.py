"""`lessons` with a pause after each finished store chunk and each saved training state.

Run as `python slow_cli.py --params P COMMAND ...` by the interruption tests: with
LESSONS_TEST_PAUSE_S set, the process sleeps at exactly those points, so a test can SIGKILL it
right after chunk k or epoch e was made durable. Nothing else changes.
"""

from __future__ import annotations

import os
import time


def _install_pauses(pause_s: float) -> None:
    import stages.training as training
    import storage.soft_labels as soft_labels

    write_chunk = soft_labels.StoreWriter.write_chunk

    def write_chunk_then_pause(self, chunk, values):  # type: ignore[no-untyped-def]
        write_chunk(self, chunk, values)
        time.sleep(pause_s)

    soft_labels.StoreWriter.write_chunk = write_chunk_then_pause

    atomic_write_bytes = training.atomic_write_bytes

    def write_then_pause(path, payload):  # type: ignore[no-untyped-def]
        atomic_write_bytes(path, payload)
        if str(path).endswith(".state"):
            time.sleep(pause_s)

    training.atomic_write_bytes = write_then_pause


if __name__ == "__main__":
    # Start like a `lessons` process: ffcv is imported before the stage and storage modules
    # (pipeline.cli's _ready_torch), so the child's timing and thread set-up are the real ones.
    import ffcv  # noqa: F401

    pause = float(os.environ.get("LESSONS_TEST_PAUSE_S") or 0)
    if pause > 0:
        _install_pauses(pause)
    from pipeline.cli import main

    main(prog_name="lessons", obj={})

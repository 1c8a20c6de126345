"""Stage `store_digests`: the content digest of exactly the stores one student experiment reads.

A dvc `matrix` knows a student experiment by its name only, so a `student_train` stage cannot
list its own teacher's stores as deps (and `ce` none). Instead each student depends on
`digests/<experiment>.json`, which this stage writes: the sha256 of every store the experiment
reads (none for a student without a teacher). This stage depends on the whole `stores/` folder
and reruns in seconds when any store changes; the file it writes, and so the student, changes
only when a store that experiment reads changes (dvc compares content, not times). Importing
another teacher's logits therefore reruns no student.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage import StoreError, atomic_write_json
from storage.atomic import ensure_parents

if TYPE_CHECKING:
    from pipeline.config import AdjustMethod, DtdMode, ResolvedExperiment

logger = logging.getLogger(__name__)


def stores_read(
    *, teacher: str | None, kd: bool, adjust: AdjustMethod, dtd: DtdMode, teacher_mode: str = "offline"
) -> list[str]:
    """Names of the stores under `stores/<teacher>/` that `student_train.run` reads.

    Args:
        teacher: the experiment's teacher, or None (plain cross-entropy, nothing read).
        kd: distillation on. adjust: ps | lsr | none. dtd: off | static | flsw | cwsm.
        teacher_mode: offline | online (the teacher checkpoint runs on each batch instead).
    Returns:
        sorted store names: `test-logits.zarr` whenever there is a teacher (the agreement
        metrics; its attributes hold the teacher checkpoint's sha256, which an online student
        checks its checkpoint against, so this digest also follows the checkpoint), plus for
        offline kd `logits.zarr`, `adjusted-<adjust>.zarr` unless adjust is none, and `dtd.zarr`
        for dtd static.
    """
    if teacher is None:
        return []
    names = ["test-logits.zarr"]
    if kd and teacher_mode == "offline":
        names.append("logits.zarr")
        if adjust != "none":
            names.append(f"adjusted-{adjust}.zarr")
        if dtd == "static":
            names.append("dtd.zarr")
    return sorted(names)


def tree_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file, or of a folder's files (relative paths and bytes, in order).

    Raises:
        StoreError: `path` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: missing")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256(b"lessons-tree-v1\n")
    for file in files:
        digest.update(f"{file.relative_to(path).as_posix() if file != path else '.'}\n".encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\n")
    return digest.hexdigest()


def run(experiment: ResolvedExperiment, *, stores_root: str | Path, out: str | Path) -> dict[str, Any]:
    """Write `out`: {teacher, stores: {name: sha256}} for the stores `experiment` reads.

    Args:
        experiment: ResolvedExperiment (teacher, kd, adjust, dtd are read).
        stores_root: the folder holding one store folder per teacher (`stores`).
    Returns:
        the dict written.
    Raises:
        StoreError: a store the experiment reads is missing (names the dvc stage that makes it).
    """
    ensure_parents(out)
    names = stores_read(
        teacher=experiment.teacher,
        kd=experiment.kd,
        adjust=experiment.adjust,
        dtd=experiment.dtd,
        teacher_mode=experiment.teacher_mode,
    )
    digests = {}
    for name in names:
        assert experiment.teacher is not None  # stores_read names no store without a teacher
        path = Path(stores_root) / experiment.teacher / name
        if not path.exists():
            raise StoreError(
                f"{path}: missing, and student experiment {experiment.name} reads it; "
                f"run `dvc repro` (or the lessons command that writes it) first"
            )
        digests[name] = tree_sha256(path)
    summary = {"teacher": experiment.teacher, "stores": digests}
    atomic_write_json(out, summary)
    logger.info(
        "student %s reads %d store(s) of teacher %s", experiment.name, len(digests), experiment.teacher
    )
    return summary

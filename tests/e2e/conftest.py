"""The end-to-end project, built once per session: `dvc repro` in a fresh copy of the project on a
small real subset (Fashion-MNIST from the Debian package, shrunk through params.yaml only), the
command the README's quick start runs (`make demo` = install + `dvc repro`).

The repro takes minutes, a copy of its result well under a second: `built` is the finished
project, read-only; a test that edits params.yaml, reruns a stage or runs an experiment takes
`built_copy`, its own copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
# The child `lessons` imports this checkout's code, not whichever copy `pip install -e` points at.
ENV = {
    **os.environ,
    "DVC_NO_ANALYTICS": "1",
    "NUMBA_THREADING_LAYER": "omp",
    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
}


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a command in `cwd`; fail with its output unless it exits 0."""
    proc = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def sh(args: list[str], cwd: Path) -> str:
    """`run`, returning stdout + stderr."""
    proc = run(args, cwd)
    return proc.stdout + proc.stderr


def copy_project(dst: Path) -> None:
    """Copy the files git tracks (so the real .gitignore, dvc.yaml and params.yaml) to `dst`."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    for rel in tracked.stdout.splitlines():
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


TRAIN_SAMPLES, VAL_FRACTION = 2000, 0.2  # 1600 train rows, 400 val (40 of each class), 500 test


def _shrink(params_path: Path) -> None:
    params = yaml.safe_load(params_path.read_text())
    params["data"].update(
        max_train_samples=TRAIN_SAMPLES, max_test_samples=500, validation_fraction=VAL_FRACTION
    )
    for teacher in params["teacher_train"]["teachers"].values():
        teacher.update(epochs=2, batch_size=64)
    params["teacher_dump"].update(batch_size=256, chunk_size=512)
    params["student_train"].update(epochs=2, batch_size=64, num_workers=1)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project after one `dvc repro` on 2000 + 500 Fashion-MNIST images, a fifth of train
    held out as `val` (read-only)."""
    if not FASHION.exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    work = tmp_path_factory.mktemp("e2e")
    copy_project(work)
    sh(["git", "init", "-q"], work)
    _shrink(work / "params.yaml")
    sh(["dvc", "repro"], work)
    return work


@pytest.fixture
def built_copy(built: Path, tmp_path: Path) -> Path:
    """A copy of the built project (workspace, dvc.lock, dvc cache, git folder) to change freely."""
    return Path(shutil.copytree(built, tmp_path / "project", symlinks=True))

"""Shared fixtures for the reliability suite: a tiny prepared dataset, a trained teacher and its
stores, built once per session through the real CLI, plus helpers to run the CLI and to check
that a failure is one clear line and left nothing behind.

Everything is tiny (256 + 64 grey 28x28 images, 4 classes, an MLP, one epoch) so the suite stays
within a few minutes on two shared cores. Tests that change files work on copies.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner, Result

from pipeline.cli import main

os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")  # silences ffcv's TBB warning on fork

NUM_TRAIN, NUM_TEST, NUM_CLASSES = 256, 64, 4
CLASS_NAMES = ["zero", "one", "two", "three"]
BATCH, CHUNK = 32, 64  # teacher_dump: 4 train chunks, 1 test chunk


def make_npz(
    path: Path, *, seed: int = 0, num_train: int = NUM_TRAIN, num_test: int = NUM_TEST, **override: Any
) -> Path:
    """Write a tiny npz dataset (uint8 (N, 28, 28) images, int labels) and return its path.

    Images carry a faint class-dependent pattern so a teacher learns something in one epoch.
    `override` replaces any of x_train, y_train, x_test, y_test, class_names.
    """
    rng = np.random.default_rng(seed)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % NUM_CLASSES
        images = rng.integers(0, 160, (n, 28, 28), dtype=np.uint8)
        for c in range(NUM_CLASSES):
            images[labels == c, 7 * c : 7 * c + 7, :] += 90
        return images, labels.astype(np.int64)

    x_train, y_train = split(num_train)
    x_test, y_test = split(num_test)
    arrays = dict(
        x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, class_names=np.array(CLASS_NAMES)
    )
    arrays.update(override)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def base_params(npz: Path) -> dict[str, Any]:
    """params.yaml content for the tiny pipeline (CPU, one epoch, small batches and chunks)."""
    return {
        "data": {"name": "npz", "root": str(npz)},
        "prepare_data": {"num_workers": 1},
        "teacher_train": {
            "teachers": {"t": {"arch": "mlp", "epochs": 1, "batch_size": BATCH, "lr": 0.05, "device": "cpu"}}
        },
        "teacher_dump": {"dtype": "float16", "batch_size": BATCH, "chunk_size": CHUNK, "device": "cpu"},
        "adjust": {"methods": ["ps", "lsr"], "epsilon": 0.1},
        "student_train": {
            "arch": "mlp",
            "epochs": 1,
            "batch_size": BATCH,
            "lr": 0.05,
            "num_workers": 1,
            "device": "cpu",
            "experiments": {
                "ce": {"kd": False},
                "kd": {"teacher": "t", "adjust": "none", "dtd": "off"},
                "kd_ps_static": {"teacher": "t", "adjust": "ps", "dtd": "static"},
                "kd_static": {"teacher": "t", "adjust": "none", "dtd": "static"},
                "kd_ps_2ep": {"teacher": "t", "adjust": "ps", "dtd": "flsw", "epochs": 2},
            },
        },
    }


def write_params(path: Path, params: dict[str, Any], **sections: dict[str, Any]) -> Path:
    """Write `params` with some sections updated key by key (a deep copy; `params` is kept)."""
    content = yaml.safe_load(yaml.safe_dump(params))
    for section, values in sections.items():
        content.setdefault(section, {}).update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def cli(params: Path, *args: str) -> Result:
    """Run `lessons --params PARAMS ARGS...` in this process (as click would from a shell)."""
    return CliRunner().invoke(main, ["--params", str(params), *map(str, args)], obj={})


def ok(result: Result) -> Result:
    """Assert a CLI run succeeded, showing its output otherwise."""
    if result.exit_code != 0:
        raise AssertionError(f"exit {result.exit_code}:\n{result.output[-4000:]}\n{result.exception!r}")
    return result


def one_line_error(result: Result, *facts: str) -> str:
    """Assert a CLI run failed with one line, `Error: ...`, stating `facts`; return that line.

    One line: the run exits non-zero through click (no traceback anywhere), and the `Error:` line
    is the only one and the last non-empty line on stderr (no continuation, nothing after it).
    `facts` are what the message must say, not its wording: the key, path or value at fault
    (`"teacher_dump.batch_size"`, a file name) and the fix (`"lower"`, `"rebuild"`, a flag or the
    right spelling), each a substring of the line.
    """
    assert result.exit_code not in (0, None), f"expected a failure, got exit 0:\n{result.output[-2000:]}"
    assert isinstance(result.exception, SystemExit), (
        f"a traceback instead of a one-line error: {result.exception!r}\n{result.output[-3000:]}"
    )
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, f"expected one 'Error:' line:\n{result.output[-3000:]}"
    assert "Traceback" not in result.output
    line = errors[0]
    stderr = [text for text in result.stderr.splitlines() if text.strip()]
    assert stderr and stderr[-1] == line, (
        f"the error is not the last line on stderr:\n{result.stderr[-3000:]}"
    )
    if os.environ.get("RELIABILITY_ERROR_LOG"):  # collects every message, e.g. for a report
        with open(os.environ["RELIABILITY_ERROR_LOG"], "a") as log:
            log.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{line}\n")
    for fact in facts:
        assert fact in line, f"{fact!r} not in the error line:\n{line}"
    return line


def teacher_h5(store_path: Path, out: Path) -> Path:
    """A plain HDF5 file of a logit store's view-0 logits (float32) and labels, as another
    framework would write it (no lessons attributes)."""
    import h5py

    from storage import open_store

    store = open_store(store_path)
    with h5py.File(out, "w") as f:
        f["logits"] = store.read("logits")[0].astype(np.float32)
        f["labels"] = store.read("labels")
    return out


def as_written(store: Path) -> Path:
    """Re-record the content digest of a store edited in place, so it reads as a store that was
    *written* with that content (by a buggy producer, another tool): the checks behind the digest
    check are then the ones that must catch it."""
    from storage.soft_labels import content_digest

    zarr.open_group(store, mode="r+").attrs["content_digest"] = content_digest(store)
    return store


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path`, by relative path (lock files excluded)."""
    path = Path(path)
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def leftovers(out: Path) -> list[str]:
    """What a failed write left at `out` or beside it (`<out>.partial`, the unique temporary
    names `.<name>.*.partial` and `.<name>.*.old`, and the `<out>.old` of earlier versions); the
    documented `<out>.lock` file does not count."""
    out = Path(out)
    fixed = [
        p.name
        for p in (out, out.with_name(out.name + ".partial"), out.with_name(out.name + ".old"))
        if p.exists()
    ]
    unique = sorted(
        p.name
        for pattern in (f".{out.name}.*.partial", f".{out.name}.*.old")
        for p in out.parent.glob(pattern)
    )
    return fixed + unique


@dataclass(frozen=True)
class Pipeline:
    """The session's finished tiny pipeline (read-only: copy before changing anything)."""

    root: Path
    npz: Path
    params: dict[str, Any]
    params_path: Path
    data: Path
    checkpoint: Path
    stores: Path  # stores/ (holds t/)

    @property
    def teacher_stores(self) -> Path:
        return self.stores / "t"


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """prepare-data, teacher-train, teacher-dump, adjust (ps, lsr) and temperature, via the CLI."""
    root = tmp_path_factory.mktemp("pipeline")
    npz = make_npz(root / "tiny.npz")
    params = base_params(npz)
    params_path = write_params(root / "params.yaml", params)
    data, checkpoint, stores = root / "data", root / "checkpoints" / "t.pt", root / "stores"
    teacher = stores / "t"
    ok(cli(params_path, "prepare-data", "--out", data))
    ok(
        cli(
            params_path,
            "teacher-train",
            "--teacher",
            "t",
            "--data",
            data,
            "--checkpoint-out",
            checkpoint,
            "--metrics-out",
            root / "metrics" / "t.json",
            "--curve-out",
            root / "metrics" / "t-curve.json",
        )
    )
    ok(
        cli(
            params_path,
            "teacher-dump",
            "--teacher",
            "t",
            "--data",
            data,
            "--checkpoint",
            checkpoint,
            "--out",
            teacher / "logits.zarr",
            "--test-out",
            teacher / "test-logits.zarr",
        )
    )
    for method in ("ps", "lsr"):
        ok(
            cli(
                params_path,
                "adjust",
                "--method",
                method,
                "--logits",
                teacher / "logits.zarr",
                "--out",
                teacher / f"adjusted-{method}.zarr",
                "--metrics-out",
                root / "metrics" / f"{method}.json",
            )
        )
    ok(
        cli(
            params_path,
            "temperature",
            "--logits",
            teacher / "logits.zarr",
            "--out",
            teacher / "dtd.zarr",
            "--metrics-out",
            root / "metrics" / "dtd.json",
            "--histogram-out",
            root / "metrics" / "hist.json",
        )
    )
    return Pipeline(
        root=root,
        npz=npz,
        params=params,
        params_path=params_path,
        data=data,
        checkpoint=checkpoint,
        stores=stores,
    )


@pytest.fixture
def work(tmp_path: Path, pipeline: Pipeline) -> Path:
    """A per-test folder holding a copy of the session's stores (`stores/t/...`)."""
    shutil.copytree(pipeline.stores, tmp_path / "stores", ignore=shutil.ignore_patterns("*.lock"))
    return tmp_path


REPO_ROOT = Path(__file__).resolve().parents[2]


def child_env() -> dict[str, str]:
    """The environment for a child Python: it imports this checkout's code first, like the test
    process does, whichever checkout `pip install -e` last pointed `lessons` at."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def spawn_cli(
    params: Path, *args: str, cwd: Path, pause_s: float = 0.0, log: Path | None = None
) -> subprocess.Popen:
    """Start `lessons` in a real child process (tests/reliability/slow_cli.py).

    With `pause_s`, the child sleeps that long after each finished store chunk and after each
    saved training state, so a test can SIGKILL it at a known point.
    """
    env = {**child_env(), "LESSONS_TEST_PAUSE_S": str(pause_s), "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable,
        str(Path(__file__).with_name("slow_cli.py")),
        "--params",
        str(params),
        *map(str, args),
    ]
    if log is None:
        return subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
    with open(log, "wb") as stream:  # the child holds its own copy of the descriptor
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=stream, stderr=subprocess.STDOUT)


def wait_for(
    predicate: Any, proc: subprocess.Popen, timeout_s: float, what: str, log: Path | None = None
) -> None:
    """Poll `predicate()` every 50 ms until it holds; fail if `proc` exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(f"the child exited ({proc.returncode}) before {what}:\n{tail}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)

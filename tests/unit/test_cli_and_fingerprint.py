"""The CLI surface and the dataset fingerprint that ties every store to its data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from storage import dataset_fingerprint

STAGES = [
    "prepare-data",
    "teacher-train",
    "teacher-dump",
    "adjust",
    "temperature",
    "store-digests",
    "student-train",
    "report",
    "import-logits",
    "export",
]


def test_help_lists_every_stage_command():
    result = CliRunner().invoke(main, ["--help"], obj={})
    assert result.exit_code == 0
    for command in STAGES:
        assert f"  {command} " in result.output, command


@pytest.mark.parametrize(
    "args, message",
    [
        (["student-train", "--experiment", "kd"], "Error: Missing option '--data'."),
        (["student-trian"], "Error: No such command 'student-trian'. Did you mean 'student-train'?"),
        (["--bogus", "report"], "Error: No such option '--bogus'."),
        (["report", "--out", "{tmp}/f"], "Error: Invalid value for '--out'"),
    ],
)
def test_a_usage_error_is_one_error_line_with_exit_status_2(tmp_path, args, message):
    (tmp_path / "f").write_text("a file where a folder is expected")
    result = CliRunner().invoke(main, [a.format(tmp=tmp_path) for a in args], obj={})
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message) and "--help` lists the options" in lines[0], (
        result.output
    )


def test_python_dash_m_pipeline_is_the_same_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "teacher-dump" in proc.stdout


def _adjust_raising(exception: str, tmp_path) -> subprocess.CompletedProcess:
    """`lessons adjust ...` in a fresh interpreter whose `stages.adjust.run` raises `exception`."""
    code = (
        f"import sys, stages.adjust\n"
        f"def run(*args, **kwargs):\n    raise {exception}\n"
        f"stages.adjust.run = run\n"
        f"from pipeline.cli import run_main\n"
        f"sys.argv = ['lessons', 'adjust', '--method', 'ps', '--logits', {str(tmp_path / 'l.zarr')!r}, "
        f"'--out', {str(tmp_path / 'a.zarr')!r}, '--metrics-out', {str(tmp_path / 'm.json')!r}]\n"
        f"run_main()\n"
    )
    root = Path(__file__).resolve().parents[2]
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )


@pytest.mark.parametrize("exception", ["KeyError('a bug')", "ValueError('a bug')", "TypeError('a bug')"])
def test_a_genuine_bug_shows_its_traceback_and_a_non_zero_exit(tmp_path, exception):
    proc = _adjust_raising(exception, tmp_path)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr, proc.stderr
    assert (
        f"{exception.split('(')[0]}: 'a bug'" in proc.stderr
        or f"{exception.split('(')[0]}: a bug" in proc.stderr
    )
    assert not [line for line in proc.stderr.splitlines() if line.startswith("Error:")], proc.stderr


@pytest.mark.parametrize(
    "exception",
    [
        "__import__('storage').StoreError('l.zarr: no store here; run lessons teacher-dump first')",
        "__import__('storage').SettingsError('l.zarr: no store here; run lessons teacher-dump first')",
        "__import__('storage').LessonsError('l.zarr: no store here; run lessons teacher-dump first')",
    ],
)
def test_a_lessons_error_is_one_error_line_and_exit_status_1(tmp_path, exception):
    proc = _adjust_raising(exception, tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "Error: l.zarr: no store here; run lessons teacher-dump first"
    ], proc.stderr


def test_every_deliberate_error_class_is_a_lessons_error_and_keeps_its_builtin_type():
    import nets
    from pipeline.config import ConfigError
    from pipeline.datasets import DatasetError
    from stages.functional import InvalidLogitsError
    from stages.report import ReportError
    from stages.training import CheckpointError, DivergenceError
    from storage import LessonsError, OutputError, SettingsError, StoreError
    from storage.beton import BetonError
    from storage.h5 import H5Error
    from storage.manifest import ManifestError

    builtin = {
        ConfigError: ValueError,
        DatasetError: ValueError,
        InvalidLogitsError: ValueError,
        ReportError: ValueError,
        CheckpointError: ValueError,
        DivergenceError: FloatingPointError,
        SettingsError: ValueError,
        StoreError: ValueError,
        BetonError: ValueError,
        H5Error: ValueError,
        ManifestError: ValueError,
        OutputError: OSError,
        nets.UnknownArchitectureError: ValueError,
    }
    for cls, base in builtin.items():
        assert issubclass(cls, LessonsError) and issubclass(cls, base), cls
    assert OutputError(28, "disk full").strerror == "disk full"


def test_fingerprint_changes_when_one_label_or_one_pixel_changes():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 50)
    base = dataset_fingerprint(images, labels)
    assert base == dataset_fingerprint(images.copy(), labels.copy())
    one_label = labels.copy()
    one_label[17] = (one_label[17] + 1) % 10
    one_pixel = images.copy()
    one_pixel[49, 7, 7, 2] ^= 1
    swapped = images[[1, 0, *range(2, 50)]]
    fingerprints = {
        base,
        dataset_fingerprint(images, one_label),
        dataset_fingerprint(one_pixel, labels),
        dataset_fingerprint(swapped, labels),
        dataset_fingerprint(images[:49], labels[:49]),
    }
    assert len(fingerprints) == 5

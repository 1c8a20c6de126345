"""The CLI surface and the dataset fingerprint that ties every store to its data."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from storage import dataset_fingerprint

STAGES = ["prepare-data", "teacher-train", "teacher-dump", "adjust", "temperature", "store-digests",
          "student-train", "report", "import-logits", "export"]


def test_help_lists_every_stage_command():
    result = CliRunner().invoke(main, ["--help"], obj={})
    assert result.exit_code == 0
    for command in STAGES:
        assert f"  {command} " in result.output, command


@pytest.mark.parametrize("args, message", [
    (["student-train", "--experiment", "kd"], "Error: Missing option '--data'."),
    (["student-trian"], "Error: No such command 'student-trian'. Did you mean 'student-train'?"),
    (["--bogus", "report"], "Error: No such option '--bogus'."),
    (["report", "--out", "{tmp}/f"], "Error: Invalid value for '--out'"),
])
def test_a_usage_error_is_one_error_line_with_exit_status_2(tmp_path, args, message):
    (tmp_path / "f").write_text("a file where a folder is expected")
    result = CliRunner().invoke(main, [a.format(tmp=tmp_path) for a in args], obj={})
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message) and "--help` lists the options" in lines[0], \
        result.output


def test_python_dash_m_pipeline_is_the_same_cli():
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "teacher-dump" in proc.stdout


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
    fingerprints = {base, dataset_fingerprint(images, one_label), dataset_fingerprint(one_pixel, labels),
                    dataset_fingerprint(swapped, labels), dataset_fingerprint(images[:49], labels[:49])}
    assert len(fingerprints) == 5

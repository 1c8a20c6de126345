"""End to end: `dvc repro` in a fresh copy of the project, on a small real subset.

The same command the README's quick start runs (`make demo` = install + `dvc repro`), on
Fashion-MNIST from the Debian package, shrunk through params.yaml only. The repro runs once per
session (tests/e2e/conftest.py: `built`); the tests that change something work on a copy.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import ENV, TRAIN_SAMPLES, VAL_FRACTION, sh

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]


def test_dvc_repro_runs_every_stage_and_writes_the_report(built: Path):
    project = built
    summary = (project / "reports" / "summary.md").read_text()
    experiments = yaml.safe_load((project / "params.yaml").read_text())["student_train"]["experiments"]
    for name in experiments:
        assert f"| {name} |" in summary
        metrics = json.loads((project / "metrics" / "students" / f"{name}-seed0.json").read_text())
        assert 0.25 < metrics["test_top1"] <= 1.0, (name, metrics["test_top1"])  # 10 classes: chance is 0.1
        record = json.loads((project / "metrics" / "students" / f"{name}-seed0-config.json").read_text())
        assert record["teacher"]["name"] == "cnn_small"
    for png in ("accuracy.png", "curves.png", "temperature.png"):
        assert (project / "reports" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    teacher = json.loads((project / "metrics" / "teachers" / "cnn_small.json").read_text())
    assert teacher["test_top1"] > 0.6
    ps = json.loads((project / "metrics" / "adjust" / "cnn_small-ps.json").read_text())
    train_rows = round(TRAIN_SAMPLES * (1 - VAL_FRACTION))  # the val rows are never rewritten
    store = json.loads((project / "stores" / "cnn_small" / "logits.zarr" / "zarr.json").read_text())
    num_views = store["attributes"]["num_views"]
    assert num_views == 2 and store["attributes"]["view_spec"]["views"] == "all"  # the demo's flip views
    assert ps["rewritten_views"] == round((1 - ps["teacher_train_accuracy"]) * train_rows * num_views)


def test_a_second_dvc_repro_runs_nothing(built_copy: Path):
    out = sh(["dvc", "repro"], built_copy)
    assert "Running stage" not in out
    assert "up to date" in sh(["dvc", "status"], built_copy)


def test_removing_an_experiment_reruns_only_the_report_which_names_its_files_and_keeps_them(built_copy: Path):
    project = built_copy
    params_path = project / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    del params["student_train"]["experiments"]["kd_flsw"]
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    kept = [
        project / "metrics" / "students" / "kd_flsw-seed0-config.json",
        project / "metrics" / "students" / "kd_flsw-seed0.json",
        project / "plots" / "students" / "kd_flsw-seed0.json",
    ]
    before = [p.read_bytes() for p in kept]
    status = sh(["dvc", "status"], project)
    changed = {
        line.strip().rstrip(":") for line in status.splitlines() if line and not line.startswith(("\t", " "))
    }
    assert changed == {"check_params", "report"}, status
    out = sh(["dvc", "repro"], project)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"check_params", "report"}, out
    summary = (project / "reports" / "summary.md").read_text()
    assert "| kd_flsw |" not in summary and "| kd_ps_flsw |" in summary
    (stray_line,) = [line for line in summary.splitlines() if line.startswith("Not shown")]
    assert stray_line.split("`")[1::2] == [
        "metrics/students/kd_flsw-seed0-config.json",
        "metrics/students/kd_flsw-seed0.json",
        "plots/students/kd_flsw-seed0.json",
    ]
    assert [p.read_bytes() for p in kept] == before  # the user's files, never deleted


def test_changing_one_students_lr_reruns_only_that_student_its_store_digest_and_the_report(built_copy: Path):
    project = built_copy
    params_path = project / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["student_train"]["experiments"]["kd_ps"]["lr"] = 0.02
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    status = sh(["dvc", "status"], project)
    changed = {
        line.strip().rstrip(":") for line in status.splitlines() if line and not line.startswith(("\t", " "))
    }
    # check_params reruns on any edit of params.yaml (a second); its output is unchanged,
    # so it makes nothing else rerun. The report lists student_train.experiments (which
    # runs it shows), so dvc sees that edit too. store_digests@kd_ps lists the experiment's
    # whole entry (dvc refuses a listed key that the entry does not set): it reruns in a
    # second and writes the same digest.
    assert changed == {"check_params", "store_digests@kd_ps", "student_train@kd_ps-0", "report"}, status
    out = sh(["dvc", "repro"], project)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"check_params", "store_digests@kd_ps", "student_train@kd_ps-0", "report"}, out


def test_a_bad_value_stops_dvc_repro_before_any_stage_deletes_its_outputs(built_copy: Path):
    project = built_copy
    params_path = project / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["student_train"]["experiments"]["kd"]["alpha"] = 1.5
    outputs = [
        project / "checkpoints" / "students" / "kd-seed0.pt",
        project / "metrics" / "students" / "kd-seed0.json",
        project / "plots" / "students" / "kd-seed0.json",
    ]
    before = [p.read_bytes() for p in outputs]
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run(["dvc", "repro"], cwd=project, env=ENV, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "student_train.experiments.kd.alpha: must lie in [0, 1], got 1.5" in proc.stdout + proc.stderr
    assert "Running stage 'student_train" not in proc.stdout
    assert [p.read_bytes() for p in outputs] == before

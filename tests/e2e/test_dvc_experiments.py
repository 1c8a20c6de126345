"""`dvc exp run -S ...` then `dvc exp show`: every experiment shows its metrics, as numbers.

On a copy of the session's built project (tests/e2e/conftest.py: `built`, Fashion-MNIST subset,
every stage already run), committed to git as the experiments' baseline: each experiment reruns
only what its override touches (the `kd` student and the report). Two experiments override a key
the KD experiment does not set (`++student_train.experiments.kd.alpha=...`: add the key, or
override it where the previous run left it in the workspace, as the README says).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.conftest import run, sh

# 1800 s as test_dvc_repro.py: the first e2e test in collection order (this one) also pays for the
# session's `built` repro (5 min beside other jobs), which pytest-timeout counts against it.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture
def project(built_copy: Path) -> Path:
    for args in (
        ["git", "config", "user.email", "test@example.com"],
        ["git", "config", "user.name", "test"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "built"],
    ):
        sh(args, built_copy)
    return built_copy


def _experiments(show: list) -> dict[str, dict]:
    """experiment name -> its `data` in `dvc exp show --json` (baseline and workspace left out)."""
    found = {}
    for baseline in show:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs", []):
                found[rev["name"]] = rev["data"]
    return found


def test_every_experiment_of_a_sweep_shows_its_numeric_metrics(project: Path):
    for alpha in ("0.5", "0.7"):
        sh(
            [
                "dvc",
                "exp",
                "run",
                "-n",
                f"alpha-{alpha}",
                "-S",
                f"++student_train.experiments.kd.alpha={alpha}",
            ],
            project,
        )
    experiments = _experiments(json.loads(run(["dvc", "exp", "show", "--json"], project).stdout))
    assert set(experiments) == {"alpha-0.5", "alpha-0.7"}
    for name, data in experiments.items():
        alpha = data["params"]["params.yaml"]["data"]["student_train"]["experiments"]["kd"]["alpha"]
        assert alpha == float(name.split("-")[1])
        metrics = data["metrics"]
        for path in (
            "metrics/students/kd-seed0.json",
            "metrics/students/ce-seed0.json",
            "metrics/teachers/cnn_small.json",
        ):
            assert "error" not in metrics[path], (name, path, metrics[path])
            values = metrics[path]["data"]
            assert all(type(value) in (int, float) for value in values.values()), (name, path, values)
            assert 0.0 <= values["val_top1"] <= 1.0 and 0.0 <= values["test_top1"] <= 1.0

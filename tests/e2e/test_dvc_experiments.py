"""`dvc exp run -S ...` then `dvc exp show`: every experiment shows its metrics, as numbers.

A tiny copy of the project (the tracked files, so the real .gitignore and dvc.yaml), on the
reliability suite's tiny npz (256 + 64 grey 28x28 images, 4 classes), an MLP teacher and two
MLP students of one epoch. Two experiments override a key the KD experiment does not set
(`++student_train.experiments.kd.alpha=...`: add the key, or override it where the previous run
left it in the workspace, as the README says).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.reliability.conftest import make_npz

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]


def _sh(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "NUMBA_THREADING_LAYER": "omp",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("exp")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    for rel in tracked.stdout.splitlines():
        if (ROOT / rel).is_file():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, work / rel)
    make_npz(work / "tiny.npz")
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["data"].update(name="npz", root="tiny.npz", validation_fraction=0.25)
    params["prepare_data"]["num_workers"] = 1
    params["teacher_train"]["teachers"] = {
        "t": {"arch": "mlp", "epochs": 1, "batch_size": 32, "lr": 0.05, "device": "cpu"}}
    params["teacher_dump"].update(batch_size=32, chunk_size=64, device="cpu")
    params["adjust"]["methods"] = ["ps"]
    params["student_train"].update(arch="mlp", epochs=1, batch_size=32, num_workers=1, device="cpu", experiments={
        "ce": {"teacher": "t", "kd": False}, "kd": {"teacher": "t", "kd": True, "adjust": "none", "dtd": "off"}})
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (["git", "init", "-q"], ["git", "config", "user.email", "test@example.com"],
                 ["git", "config", "user.name", "test"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny"]):
        _sh(args, work)
    return work


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
        _sh(["dvc", "exp", "run", "-n", f"alpha-{alpha}", "-S", f"++student_train.experiments.kd.alpha={alpha}"],
            project)
    experiments = _experiments(json.loads(_sh(["dvc", "exp", "show", "--json"], project)))
    assert set(experiments) == {"alpha-0.5", "alpha-0.7"}
    for name, data in experiments.items():
        alpha = data["params"]["params.yaml"]["data"]["student_train"]["experiments"]["kd"]["alpha"]
        assert alpha == float(name.split("-")[1])
        metrics = data["metrics"]
        for path in ("metrics/students/kd-seed0.json", "metrics/students/ce-seed0.json", "metrics/teachers/t.json"):
            assert "error" not in metrics[path], (name, path, metrics[path])
            values = metrics[path]["data"]
            assert all(type(value) in (int, float) for value in values.values()), (name, path, values)
            assert 0.0 <= values["val_top1"] <= 1.0 and 0.0 <= values["test_top1"] <= 1.0

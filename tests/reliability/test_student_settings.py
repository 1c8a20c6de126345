"""Student settings from params.yaml reach the trainer: the lr schedule, the fixed-row τ."""

from __future__ import annotations

import json
import math

import pytest

from tests.reliability.conftest import BATCH, NUM_TRAIN, cli, ok, write_params


def _lr_per_epoch(tmp_path, pipeline, name: str, **student: object) -> list[float]:
    params = write_params(tmp_path / f"{name}.yaml", pipeline.params, student_train=student)
    ok(
        cli(
            params,
            "student-train",
            "--experiment",
            "kd_ps_2ep",
            "--data",
            pipeline.data,
            "--stores",
            pipeline.stores,
            "--checkpoint-out",
            tmp_path / f"{name}.pt",
            "--metrics-out",
            tmp_path / f"{name}.json",
            "--curve-out",
            tmp_path / f"{name}-curve.json",
        )
    )
    return [row["lr"] for row in json.loads((tmp_path / f"{name}-curve.json").read_text())]


def test_a_step_schedule_drops_the_lr_by_gamma_at_the_milestone_and_cosine_decays(tmp_path, pipeline):
    # kd_ps_2ep: 2 epochs at lr 0.05, 8 steps each (drop_last); the curve records the lr of
    # each epoch's last step, at progress 7/16 and 15/16 of the run.
    steps = NUM_TRAIN // BATCH
    progress = [(steps - 1) / (2 * steps), (2 * steps - 1) / (2 * steps)]
    step = _lr_per_epoch(tmp_path, pipeline, "step", schedule="step", milestones=[0.5], gamma=0.2)
    assert step == pytest.approx([0.05, 0.05 * 0.2], rel=1e-12)
    cosine = _lr_per_epoch(tmp_path, pipeline, "cosine")
    assert cosine == pytest.approx([0.05 * 0.5 * (1 + math.cos(math.pi * p)) for p in progress], rel=1e-12)


def test_a_fixed_target_temperature_reaches_the_trainer_and_its_metrics(tmp_path, pipeline):
    experiments = dict(pipeline.params["student_train"]["experiments"])
    experiments["lsr_t2"] = {"teacher": "t", "adjust": "lsr", "dtd": "off", "fixed_target_temperature": 2.0}
    experiments["lsr"] = {"teacher": "t", "adjust": "lsr", "dtd": "off"}  # default: 1.0 (DESIGN §4)
    params = write_params(
        tmp_path / "params.yaml", pipeline.params, student_train={"experiments": experiments}
    )
    losses = {}
    for name in ("lsr", "lsr_t2"):
        ok(
            cli(
                params,
                "student-train",
                "--experiment",
                name,
                "--data",
                pipeline.data,
                "--stores",
                pipeline.stores,
                "--checkpoint-out",
                tmp_path / f"{name}.pt",
                "--metrics-out",
                tmp_path / f"{name}.json",
                "--curve-out",
                tmp_path / f"{name}-curve.json",
            )
        )
        record = json.loads((tmp_path / f"{name}-config.json").read_text())  # settings beside the metrics
        assert record["config"]["fixed_target_temperature"] == (2.0 if name == "lsr_t2" else 1.0)
        losses[name] = json.loads((tmp_path / f"{name}-curve.json").read_text())[0]["train_loss"]
    # The tiny teacher is right on every training image, so no row is fixed and the knob, which
    # touches fixed rows only, must leave training unchanged (the math on fixed rows is checked
    # against numpy in tests/unit/test_student_gather.py).
    assert json.loads((pipeline.root / "metrics" / "lsr.json").read_text())["rewritten_views"] == 0
    assert losses["lsr"] == losses["lsr_t2"]

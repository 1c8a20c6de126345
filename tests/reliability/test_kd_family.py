"""The logit-KD family (`loss: kd | dkd | ls | ttm`) through the real CLI: each member trains a
student from the session's stores, and `loss: dkd` with KA-LSR's fixed-target rows is refused in
one line by check-params and by student-train, with nothing written."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from tests.reliability.conftest import Pipeline, cli, ok, one_line_error, write_params

FAMILY = {
    "kd_ps_static": {"teacher": "t", "adjust": "ps", "dtd": "static"},  # the session's own kd run
    "dkd_ps_static": {"teacher": "t", "adjust": "ps", "dtd": "static", "loss": "dkd", "dkd_beta": 2.0},
    "ls_lsr_flsw": {"teacher": "t", "adjust": "lsr", "dtd": "flsw", "loss": "ls"},
    "ttm_lsr_cwsm": {"teacher": "t", "adjust": "lsr", "dtd": "cwsm", "loss": "ttm"},
    # the online teacher path dispatches on loss the same way
    "dkd_online": {"teacher": "t", "adjust": "none", "dtd": "flsw", "loss": "dkd", "teacher_mode": "online"},
}


def _train(params, pipeline: Pipeline, tmp_path, name: str):
    return cli(
        params,
        "student-train",
        "--experiment",
        name,
        "--data",
        pipeline.data,
        "--stores",
        pipeline.stores,
        "--teacher-checkpoints",
        pipeline.checkpoint.parent,
        "--checkpoint-out",
        tmp_path / f"{name}.pt",
        "--metrics-out",
        tmp_path / f"{name}.json",
        "--curve-out",
        tmp_path / f"{name}-curve.json",
    )


def test_each_loss_of_the_family_trains_a_student_and_records_its_loss(tmp_path, pipeline: Pipeline):
    experiments = {**pipeline.params["student_train"]["experiments"], **FAMILY}
    params = write_params(
        tmp_path / "params.yaml", pipeline.params, student_train={"experiments": experiments}
    )
    first_loss = {}
    for name in FAMILY:
        ok(_train(params, pipeline, tmp_path, name))
        metrics = json.loads((tmp_path / f"{name}.json").read_text())
        assert 0.0 <= metrics["test_top1"] <= 1.0
        record = json.loads((tmp_path / f"{name}-config.json").read_text())
        assert record["config"]["loss"] == FAMILY[name].get("loss", "kd")
        assert record["config"]["dkd_beta"] == (2.0 if name == "dkd_ps_static" else 8.0)
        curve = json.loads((tmp_path / f"{name}-curve.json").read_text())
        first_loss[name] = curve[0]["train_loss"]
        assert math.isfinite(first_loss[name]) and first_loss[name] > 0
    assert len(set(first_loss.values())) == len(FAMILY), first_loss  # a different training for each


def test_check_params_refuses_dkd_with_ka_lsr_in_one_line_and_writes_nothing(tmp_path, pipeline: Pipeline):
    experiments = {
        **pipeline.params["student_train"]["experiments"],
        "dkd_lsr": {"teacher": "t", "adjust": "lsr", "loss": "dkd"},
    }
    params = write_params(
        tmp_path / "params.yaml", pipeline.params, student_train={"experiments": experiments}
    )
    one_line_error(
        cli(params, "check-params", "--out", tmp_path / "check.json"),
        "student_train.experiments.dkd_lsr.loss",
        "adjust: lsr",
        "use adjust: ps or none",
    )
    assert not (tmp_path / "check.json").exists()


def test_student_train_refuses_dkd_with_ka_lsr_in_one_line_and_writes_nothing(tmp_path, pipeline: Pipeline):
    experiments = {
        **pipeline.params["student_train"]["experiments"],
        "dkd_lsr": {"teacher": "t", "adjust": "lsr", "loss": "dkd"},
    }
    params = write_params(
        tmp_path / "params.yaml", pipeline.params, student_train={"experiments": experiments}
    )
    one_line_error(_train(params, pipeline, tmp_path, "dkd_lsr"), "dkd_lsr.loss", "fixed-target rows")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_the_trainer_itself_refuses_a_resolved_dkd_experiment_on_ka_lsr(tmp_path, pipeline: Pipeline):
    # What a caller that builds ResolvedExperiment by hand meets (the config refuses it on load).
    import torch

    from pipeline.config import load_params
    from pipeline.sections import TemperatureConfig
    from stages import student_train
    from storage import StoreError

    kd = load_params(pipeline.params_path).student_train.experiment("kd")
    experiment = dataclasses.replace(kd, name="dkd_lsr", adjust="lsr", loss="dkd")
    with pytest.raises(StoreError, match="dkd is undefined on the fixed-target rows of the KA-LSR store"):
        student_train.run(
            experiment,
            temperature_config=TemperatureConfig(),
            data_dir=pipeline.data,
            stores_dir=pipeline.teacher_stores,
            checkpoint_out=tmp_path / "out" / "s.pt",
            metrics_out=tmp_path / "out" / "s.json",
            curve_out=tmp_path / "out" / "s-curve.json",
            device=torch.device("cpu"),
        )
    assert [p.name for p in (tmp_path / "out").iterdir()] in ([], ["s.pt.lock"])


def test_a_dkd_warmup_scales_the_first_epochs_dkd_weights_exactly(tmp_path, pipeline: Pipeline):
    # One epoch of dkd_warmup 4 trains at weight 1/4 (stages.functional.dkd_warmup_weight): bit
    # for bit the student of dkd_alpha and dkd_beta a quarter of theirs without a warm-up.
    import torch

    base = {"teacher": "t", "adjust": "ps", "dtd": "off", "loss": "dkd"}
    experiments = {
        **pipeline.params["student_train"]["experiments"],
        "dkd_warm": {**base, "dkd_alpha": 2.0, "dkd_beta": 8.0, "dkd_warmup": 4},
        "dkd_quarter": {**base, "dkd_alpha": 0.5, "dkd_beta": 2.0},
        "dkd_full": {**base, "dkd_alpha": 2.0, "dkd_beta": 8.0},
    }
    params = write_params(
        tmp_path / "params.yaml", pipeline.params, student_train={"experiments": experiments}
    )
    states, losses = {}, {}
    for name in ("dkd_warm", "dkd_quarter", "dkd_full"):
        ok(_train(params, pipeline, tmp_path, name))
        states[name] = torch.load(tmp_path / f"{name}.pt", map_location="cpu", weights_only=False)
        losses[name] = json.loads((tmp_path / f"{name}-curve.json").read_text())[0]["train_loss"]
    weights = {name: state["state_dict"] for name, state in states.items()}
    assert weights["dkd_warm"].keys() == weights["dkd_quarter"].keys()
    for key, value in weights["dkd_quarter"].items():
        assert torch.equal(weights["dkd_warm"][key], value), key
    assert any(not torch.equal(weights["dkd_full"][k], v) for k, v in weights["dkd_quarter"].items())
    assert losses["dkd_warm"] == losses["dkd_quarter"] != losses["dkd_full"]
    record = json.loads((tmp_path / "dkd_warm-config.json").read_text())
    assert record["config"]["dkd_warmup"] == 4

"""`lessons ensemble` on the tiny pipeline: two real teachers become one teacher that students,
KA and DTD use like any other; what cannot use it (an online student, verify-views) says so in
one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.functional import ensemble_logits
from storage import open_store
from tests.reliability.conftest import Pipeline, cli, leftovers, ok, one_line_error, write_params


@pytest.fixture(scope="module")
def pair(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A second teacher `u` (another seed) dumped beside `t`, and params with ensemble `pair`."""
    root = tmp_path_factory.mktemp("ensemble")
    stores = root / "stores"
    shutil.copytree(pipeline.stores / "t", stores / "t", ignore=shutil.ignore_patterns("*.lock"))
    teachers = dict(pipeline.params["teacher_train"]["teachers"])
    teachers["u"] = {**teachers["t"], "seed": 1}
    experiments = dict(pipeline.params["student_train"]["experiments"])
    experiments["kd_pair"] = {"teacher": "pair", "adjust": "none", "dtd": "off"}
    experiments["kd_pair_ps_static"] = {"teacher": "pair", "adjust": "ps", "dtd": "static"}
    experiments["kd_pair_online"] = {"teacher": "pair", "adjust": "none", "teacher_mode": "online"}
    params = write_params(
        root / "params.yaml",
        pipeline.params,
        teacher_train={"teachers": teachers},
        ensemble={"ensembles": {"pair": {"teachers": ["t", "u"], "combine": "prob", "temperature": 4.0}}},
        student_train={"experiments": experiments},
    )
    checkpoint = root / "u.pt"
    ok(
        cli(
            params,
            "teacher-train",
            "--teacher",
            "u",
            "--data",
            pipeline.data,
            "--checkpoint-out",
            checkpoint,
            "--metrics-out",
            root / "u.json",
            "--curve-out",
            root / "u-curve.json",
        )
    )
    ok(
        cli(
            params,
            "teacher-dump",
            "--teacher",
            "u",
            "--data",
            pipeline.data,
            "--checkpoint",
            checkpoint,
            "--out",
            stores / "u" / "logits.zarr",
            "--test-out",
            stores / "u" / "test-logits.zarr",
        )
    )
    return params, stores


def _student(params: Path, pipeline: Pipeline, stores: Path, experiment: str, out: Path):
    return cli(
        params,
        "student-train",
        "--experiment",
        experiment,
        "--data",
        pipeline.data,
        "--stores",
        stores,
        "--checkpoint-out",
        out / f"{experiment}.pt",
        "--metrics-out",
        out / f"{experiment}.json",
        "--curve-out",
        out / f"{experiment}-curve.json",
        "--teacher-checkpoints",
        pipeline.checkpoint.parent,
    )


def test_an_ensemble_of_two_real_teachers_trains_a_student_and_feeds_ka_and_dtd(pipeline, pair, tmp_path):
    params, stores = pair
    result = ok(cli(params, "ensemble", "--ensemble", "pair", "--stores", stores))
    assert "logits.zarr: top-1" in result.output and "test-logits.zarr: top-1" in result.output
    train, test = (
        open_store(stores / "pair" / f, kind="logits") for f in ("logits.zarr", "test-logits.zarr")
    )
    assert train.attrs["teacher"] == test.attrs["teacher"]  # what a student checks
    assert train.attrs["teacher"]["arch"] == "ensemble"
    assert sorted(m["name"] for m in train.attrs["teacher"]["members"]) == ["t", "u"]
    members = [open_store(stores / s["store"], kind="logits") for s in train.attrs["sources"]]
    assert [s["content_digest"] for s in train.attrs["sources"]] == [m.content_digest for m in members]
    stacked = torch.from_numpy(np.stack([m.read("logits").astype(np.float32) for m in members]))
    expected = ensemble_logits(stacked.reshape(2, -1, stacked.shape[-1]), combine="prob", temperature=4.0)
    np.testing.assert_array_equal(
        train.read("logits").reshape(expected.shape), expected.numpy().astype(np.float16)
    )
    assert np.array_equal(train.read("labels"), members[0].read("labels"))
    # KA and DTD read the ensemble store like a teacher's
    ok(
        cli(
            params,
            "adjust",
            "--method",
            "ps",
            "--logits",
            stores / "pair" / "logits.zarr",
            "--out",
            stores / "pair" / "adjusted-ps.zarr",
            "--metrics-out",
            tmp_path / "ps.json",
        )
    )
    ok(
        cli(
            params,
            "temperature",
            "--logits",
            stores / "pair" / "logits.zarr",
            "--out",
            stores / "pair" / "dtd.zarr",
            "--metrics-out",
            tmp_path / "dtd.json",
            "--histogram-out",
            tmp_path / "hist.json",
        )
    )
    for experiment in ("kd_pair", "kd_pair_ps_static"):
        ok(_student(params, pipeline, stores, experiment, tmp_path))
        record = json.loads((tmp_path / f"{experiment}-config.json").read_text())
        assert record["teacher"]["arch"] == "ensemble"
        assert record["teacher"]["checkpoint_sha256"] == train.attrs["teacher"]["checkpoint_sha256"]
        assert 0.0 <= json.loads((tmp_path / f"{experiment}.json").read_text())["test_top1"] <= 1.0
    # an online student needs one checkpoint: refused in one line, before training
    line = one_line_error(
        _student(params, pipeline, stores, "kd_pair_online", tmp_path),
        "kd_pair_online",
        "teacher_mode: offline",
    )
    assert "ensemble" in line and not (tmp_path / "kd_pair_online.pt").exists()
    # verify-views cannot replay an ensemble with any one checkpoint
    one_line_error(
        cli(
            params,
            "verify-views",
            stores / "pair" / "logits.zarr",
            "--data",
            pipeline.data,
            "--checkpoint",
            pipeline.checkpoint,
        ),
        "ensemble of teachers",
        "each member",
    )
    # a rerun writes the same bytes
    digest = train.content_digest
    ok(cli(params, "ensemble", "--ensemble", "pair", "--stores", stores))
    assert open_store(stores / "pair" / "logits.zarr").content_digest == digest


def test_an_ensemble_whose_member_test_store_is_another_teachers_is_refused_writing_nothing(pair, tmp_path):
    params, stores = pair
    work = tmp_path / "stores"
    for name in ("t", "u"):
        shutil.copytree(stores / name, work / name, ignore=shutil.ignore_patterns("*.lock"))
    shutil.rmtree(work / "u" / "test-logits.zarr")
    shutil.copytree(work / "t" / "test-logits.zarr", work / "u" / "test-logits.zarr")
    one_line_error(cli(params, "ensemble", "--ensemble", "pair", "--stores", work), "test-logits.zarr")
    assert not (work / "pair").exists() or not leftovers(work / "pair" / "logits.zarr")

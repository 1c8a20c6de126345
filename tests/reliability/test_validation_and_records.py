"""A validation split (`data.validation_fraction`) through the real CLI, and what every run records:
metrics files hold numbers only, `<stem>-config.json` beside them and the checkpoints hold the
fully resolved configuration (defaults included)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import DataConfig, TeacherConfig, TemperatureConfig, load_params
from storage import dataset_fingerprint, open_store
from tests.reliability.conftest import NUM_CLASSES, NUM_TRAIN, Pipeline, cli, ok, one_line_error, write_params

FRACTION = 0.25
NUM_VAL = round(FRACTION * NUM_TRAIN)  # 64: 16 of each of the 4 balanced classes


@dataclasses.dataclass(frozen=True)
class ValPipeline:
    root: Path
    params_path: Path
    data: Path
    stores: Path
    metrics: Path
    curves: Path
    checkpoints: Path


@pytest.fixture(scope="module")
def val_pipeline(tmp_path_factory: pytest.TempPathFactory, pipeline: Pipeline) -> ValPipeline:
    """The session's tiny dataset with a quarter of train held out: prepare-data, teacher-train,
    teacher-dump, adjust ps, temperature and two students (ce, kd with ps + flsw and 2 epochs)."""
    root = tmp_path_factory.mktemp("val")
    experiments = {
        "ce": {"kd": False, "teacher": "t"},
        "kd": {"teacher": "t", "adjust": "ps", "dtd": "flsw", "epochs": 2, "lr": 0.02},
    }
    params_path = write_params(
        root / "params.yaml",
        pipeline.params,
        data={"validation_fraction": FRACTION},
        adjust={"methods": ["ps"]},
        student_train={"experiments": experiments},
    )
    data, stores, metrics, curves = root / "data", root / "stores", root / "metrics", root / "plots"
    checkpoints, teacher = root / "checkpoints", root / "stores" / "t"
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
            checkpoints / "t.pt",
            "--metrics-out",
            metrics / "teachers" / "t.json",
            "--curve-out",
            metrics / "teachers" / "t-curve.json",
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
            checkpoints / "t.pt",
            "--out",
            teacher / "logits.zarr",
            "--test-out",
            teacher / "test-logits.zarr",
        )
    )
    ok(
        cli(
            params_path,
            "adjust",
            "--method",
            "ps",
            "--logits",
            teacher / "logits.zarr",
            "--out",
            teacher / "adjusted-ps.zarr",
            "--metrics-out",
            metrics / "adjust" / "t-ps.json",
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
            metrics / "temperature" / "t.json",
            "--histogram-out",
            curves / "temperature" / "t.json",
        )
    )
    for name in experiments:
        ok(
            cli(
                params_path,
                "student-train",
                "--experiment",
                name,
                "--data",
                data,
                "--stores",
                stores,
                "--checkpoint-out",
                checkpoints / "students" / f"{name}-seed0.pt",
                "--metrics-out",
                metrics / "students" / f"{name}-seed0.json",
                "--curve-out",
                curves / "students" / f"{name}-seed0.json",
            )
        )
    return ValPipeline(root, params_path, data, stores, metrics, curves, checkpoints)


def _json(path: Path):
    return json.loads(path.read_text())


# --- the validation split ----------------------------------------------------------------------


def test_prepare_data_writes_a_balanced_val_split_disjoint_from_train_with_its_own_fingerprint(
    val_pipeline: ValPipeline, pipeline: Pipeline
):
    manifest = _json(val_pipeline.data / "manifest.json")
    splits = manifest["splits"]
    assert {name: info["num_samples"] for name, info in splits.items()} == {
        "train": NUM_TRAIN - NUM_VAL,
        "val": NUM_VAL,
        "test": 64,
    }
    assert splits["val"]["class_counts"] == [NUM_VAL // NUM_CLASSES] * NUM_CLASSES
    assert manifest["data"]["validation_fraction"] == FRACTION
    source = np.load(pipeline.npz)
    val_rows = np.array(splits["val"]["source_index"])
    train_rows = np.setdiff1d(np.arange(NUM_TRAIN), val_rows)
    assert len(np.unique(val_rows)) == NUM_VAL  # distinct rows of the source's train split
    assert splits["val"]["fingerprint"] == dataset_fingerprint(
        source["x_train"][val_rows][..., None], source["y_train"][val_rows]
    )
    assert splits["train"]["fingerprint"] == dataset_fingerprint(
        source["x_train"][train_rows][..., None], source["y_train"][train_rows]
    )
    assert np.load(val_pipeline.data / "val-labels.npy").tolist() == source["y_train"][val_rows].tolist()
    assert (val_pipeline.data / "val.beton").is_file()


def test_the_val_split_is_the_same_on_a_second_prepare_and_moves_with_data_seed(
    tmp_path, val_pipeline, pipeline
):
    again = write_params(tmp_path / "again.yaml", pipeline.params, data={"validation_fraction": FRACTION})
    ok(cli(again, "prepare-data", "--out", tmp_path / "again"))
    first, second = (_json(folder / "manifest.json") for folder in (val_pipeline.data, tmp_path / "again"))
    assert first["splits"] == second["splits"]  # fingerprints, beton sha256 and source rows alike
    other = write_params(
        tmp_path / "other.yaml", pipeline.params, data={"validation_fraction": FRACTION, "seed": 1}
    )
    ok(cli(other, "prepare-data", "--out", tmp_path / "other"))
    moved = _json(tmp_path / "other" / "manifest.json")["splits"]["val"]
    assert moved["source_index"] != first["splits"]["val"]["source_index"]
    assert moved["class_counts"] == first["splits"]["val"]["class_counts"]


def test_without_a_validation_fraction_there_is_no_val_split_and_no_val_metric(pipeline: Pipeline):
    manifest = _json(pipeline.data / "manifest.json")
    assert set(manifest["splits"]) == {"train", "test"} and "validation_fraction" not in manifest["data"]
    assert not (pipeline.data / "val.beton").exists()
    teacher = _json(pipeline.root / "metrics" / "t.json")
    assert (
        "val_top1" not in teacher and "val_top1" not in _json(pipeline.root / "metrics" / "t-curve.json")[0]
    )


def test_the_teacher_and_students_train_on_train_only_and_report_val_and_test_top1(val_pipeline: ValPipeline):
    num_train = NUM_TRAIN - NUM_VAL
    logits = open_store(val_pipeline.stores / "t" / "logits.zarr")
    assert logits.read("logits").shape == (1, num_train, NUM_CLASSES)  # stores cover the train split
    assert np.array_equal(logits.read("sample_index"), np.arange(num_train))
    for metrics_path, curve_path, epochs in (
        (val_pipeline.metrics / "teachers" / "t.json", val_pipeline.metrics / "teachers" / "t-curve.json", 1),
        (
            val_pipeline.metrics / "students" / "kd-seed0.json",
            val_pipeline.curves / "students" / "kd-seed0.json",
            2,
        ),
        (
            val_pipeline.metrics / "students" / "ce-seed0.json",
            val_pipeline.curves / "students" / "ce-seed0.json",
            1,
        ),
    ):
        metrics, curve = _json(metrics_path), _json(curve_path)
        for key in ("val_top1", "test_top1"):
            assert 0.0 <= metrics[key] <= 1.0
            assert len(curve) == epochs and all(0.0 <= row[key] <= 1.0 for row in curve)
            # accuracies over 64 images are multiples of 1/64
            assert metrics[key] * 64 == pytest.approx(round(metrics[key] * 64))
        assert metrics["val_top1"] == curve[-1]["val_top1"]


def test_check_params_refuses_a_validation_fraction_outside_zero_to_one(tmp_path, pipeline: Pipeline):
    for value in (1.0, -0.5):
        path = write_params(tmp_path / "params.yaml", pipeline.params, data={"validation_fraction": value})
        one_line_error(
            cli(path, "check-params", "--out", tmp_path / "check.json"),
            "data.validation_fraction",
            "[0, 1)",
            str(value),
        )
        assert not (tmp_path / "check.json").exists()


# --- metrics hold numbers; the recipe goes beside them and into the checkpoint ------------------


def _numbers_only(path: Path) -> dict:
    metrics = _json(path)
    assert isinstance(metrics, dict) and metrics
    assert all(type(value) in (int, float) for value in metrics.values()), (path, metrics)
    return metrics


def test_every_metrics_file_holds_numbers_only(pipeline: Pipeline, val_pipeline: ValPipeline):
    files = [pipeline.root / "metrics" / name for name in ("t.json", "ps.json", "lsr.json", "dtd.json")]
    files += [
        val_pipeline.metrics / sub
        for sub in (
            "teachers/t.json",
            "adjust/t-ps.json",
            "temperature/t.json",
            "students/ce-seed0.json",
            "students/kd-seed0.json",
        )
    ]
    for path in files:
        _numbers_only(path)


def test_the_config_records_beside_the_metrics_hold_the_names_and_the_resolved_configuration(
    val_pipeline: ValPipeline,
):
    params = load_params(val_pipeline.params_path)
    teacher = _json(val_pipeline.metrics / "teachers" / "t-config.json")
    assert (teacher["teacher"], teacher["arch"]) == ("t", "mlp")
    assert teacher["config"] == json.loads(json.dumps(dataclasses.asdict(params.teacher_train.teacher("t"))))
    assert teacher["data"] == json.loads(json.dumps(dataclasses.asdict(params.data)))
    assert teacher["dataset"] == {
        "name": "npz",
        "num_classes": NUM_CLASSES,
        "splits": {"train": NUM_TRAIN - NUM_VAL, "val": NUM_VAL, "test": 64},
    }
    assert len(teacher["checkpoint_sha256"]) == 64
    student = _json(val_pipeline.metrics / "students" / "kd-seed0-config.json")
    resolved = params.student_train.experiment("kd", 0)
    assert student["experiment"] == "kd" and student["seed"] == 0
    assert student["config"] == json.loads(json.dumps(dataclasses.asdict(resolved)))
    assert student["config"]["momentum"] == 0.9 and student["config"]["weight_decay"] == 5e-4  # defaults
    assert student["overrides"] == {"epochs": 2, "lr": 0.02}
    # The temperature keys the student's loss reads (histogram_bins and the dask scheduler are the
    # temperature stage's alone).
    assert student["temperature"] == {
        k: v
        for k, v in dataclasses.asdict(TemperatureConfig()).items()
        if k not in ("histogram_bins", "scheduler")
    }
    assert student["teacher"] == {
        "name": "t",
        "arch": "mlp",
        "checkpoint_sha256": teacher["checkpoint_sha256"],
    }
    adjust = _json(val_pipeline.metrics / "adjust" / "t-ps-config.json")
    assert adjust["method"] == "ps" and len(adjust["rewrites_per_class"]) == NUM_CLASSES


def test_checkpoints_carry_their_fully_resolved_configuration(val_pipeline: ValPipeline):
    params = load_params(val_pipeline.params_path)
    teacher = torch.load(val_pipeline.checkpoints / "t.pt", weights_only=True)
    assert teacher["teacher"] == "t"
    assert TeacherConfig(**teacher["config"]) == params.teacher_train.teacher("t")
    assert DataConfig(**teacher["data"]) == params.data
    student = torch.load(val_pipeline.checkpoints / "students" / "kd-seed0.pt", weights_only=True)
    assert student["experiment"] == "kd" and student["overrides"] == {"epochs": 2, "lr": 0.02}
    assert student["config"] == dataclasses.asdict(params.student_train.experiment("kd", 0))
    assert (
        TemperatureConfig(
            **student["temperature"],
            histogram_bins=params.temperature.histogram_bins,
            scheduler=params.temperature.scheduler,
        )
        == params.temperature
    )
    assert DataConfig(**student["data"]) == params.data
    assert student["teacher"]["name"] == "t"


def test_the_report_shows_val_and_test_top1_the_split_sizes_and_each_experiments_settings(
    val_pipeline: ValPipeline,
):
    ok(
        cli(
            val_pipeline.params_path,
            "report",
            "--students",
            val_pipeline.metrics / "students",
            "--curves",
            val_pipeline.curves / "students",
            "--metrics-root",
            val_pipeline.metrics,
            "--histograms",
            val_pipeline.curves / "temperature",
            "--out",
            val_pipeline.root / "reports",
        )
    )
    text = (val_pipeline.root / "reports" / "summary.md").read_text()
    assert f"(train {NUM_TRAIN - NUM_VAL} / val {NUM_VAL} / test 64 images, 4 classes)" in text
    header = next(line for line in text.splitlines() if line.startswith("| experiment |"))
    assert "| val top-1 | student top-1 |" in header
    kd_row = next(line for line in text.splitlines() if line.startswith("| kd |"))
    assert kd_row.endswith("| epochs 2, lr 0.02, τ0 4, β 1, γ 1 |")
    assert "shared student settings: arch mlp, epochs 1, batch 32, lr 0.05, alpha 0.9" in text

"""Each paper preset (params/{cifar100,cinic10,tinyimagenet}.yaml) runs end to end through the CLI
on a miniature of its dataset in the real on-disk layout: check-params, prepare-data,
teacher-train, teacher-dump, adjust, temperature, student-train (CE and KD + KA-PS + DTD-FLSW).

The preset is loaded as written and shrunk only where a CPU test must (data.root to the
miniature, one teacher, one epoch, small batches, CPU, and for 32x32 data the `scheduled` single
view of one epoch instead of all 162); data.name, the layout, the nets and the Tiny ImageNet views
are the preset's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from storage import open_store
from tests.miniatures import write_cifar100, write_cinic10, write_tinyimagenet

REPO_ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ("resnet20_ce", "resnet20_kd_ps_flsw")


def shrunk_preset(name: str, root: Path) -> dict[str, Any]:
    """The preset `name` with data.root at `root` and the sizes a CPU test affords."""
    params = yaml.safe_load((REPO_ROOT / "params" / f"{name}.yaml").read_text())
    params["data"].update(root=str(root), max_train_samples=40, max_test_samples=20)
    params["prepare_data"]["num_workers"] = 1
    teacher = params["teacher_train"]["teachers"]["resnet56"]
    teacher.update(arch="resnet8", epochs=1, batch_size=8, device="cpu")  # resnet56: 7x the time
    params["teacher_train"]["teachers"] = {"resnet56": teacher}
    params["teacher_dump"].update(batch_size=32, chunk_size=64, device="cpu")
    if params["teacher_dump"]["views"] == "all":  # 162 views of every image: too slow on CPU
        params["teacher_dump"].update(views="scheduled", epochs=1, seeds=[0])
    student = params["student_train"]
    student.update(epochs=1, batch_size=8, num_workers=1, device="cpu")
    student["experiments"] = {e: student["experiments"][e] for e in EXPERIMENTS}
    params["report"] = {"baseline": "resnet20_ce", "kd_baseline": "resnet20_kd_ps_flsw"}
    return params


def lessons(params: Path, *args: Any) -> str:
    result = CliRunner().invoke(main, ["--params", str(params), *map(str, args)], obj={})
    assert result.exit_code == 0, f"lessons {args[0]}: exit {result.exit_code}\n{result.output[-3000:]}"
    return result.output


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "num_classes", "num_train", "views", "view_kind"),
    [
        ("cifar100", 100, 40, 1, "pad_crop_flip"),
        ("cinic10", 10, 20, 1, "pad_crop_flip"),
        ("tinyimagenet", 3, 12, 10, "resized_crop_flip"),
    ],
)
def test_a_preset_runs_every_stage_through_the_cli_on_a_miniature_of_its_dataset(
    name, num_classes, num_train, views, view_kind, tmp_path
):
    if name == "cifar100":
        write_cifar100(tmp_path / "raw", train_per_class=1, test_per_class=1)
        root = tmp_path / "raw"
    elif name == "cinic10":
        write_cinic10(tmp_path / "raw", {"train": 2, "valid": 1, "test": 1})
        root = tmp_path / "raw"
    else:
        write_tinyimagenet(tmp_path / "raw", train_per_class=4, val_per_class=2)
        root = tmp_path / "raw" / "tiny-imagenet-200"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(shrunk_preset(name, root), sort_keys=False))
    data, stores, metrics = tmp_path / "data" / name, tmp_path / "stores", tmp_path / "metrics"
    teacher = stores / "resnet56"

    assert "1 teacher(s), 2 experiment(s) x 1 seed(s): ok" in lessons(params, "check-params")
    lessons(params, "prepare-data", "--out", data)
    manifest = json.loads((data / "manifest.json").read_text())
    assert (manifest["dataset"], manifest["num_classes"]) == (name, num_classes)
    lessons(
        params, "teacher-train", "--teacher", "resnet56", "--data", data,
        "--checkpoint-out", tmp_path / "resnet56.pt", "--metrics-out", metrics / "resnet56.json",
        "--curve-out", metrics / "resnet56-curve.json",
    )  # fmt: skip
    lessons(
        params, "teacher-dump", "--teacher", "resnet56", "--data", data,
        "--checkpoint", tmp_path / "resnet56.pt", "--out", teacher / "logits.zarr",
        "--test-out", teacher / "test-logits.zarr",
    )  # fmt: skip
    store = open_store(teacher / "logits.zarr")
    assert store.array("logits").shape == (views, num_train, num_classes)
    assert store.group.attrs["view_spec"]["kind"] == view_kind
    lessons(
        params, "adjust", "--method", "ps", "--logits", teacher / "logits.zarr",
        "--out", teacher / "adjusted-ps.zarr", "--metrics-out", metrics / "ps.json",
    )  # fmt: skip
    lessons(
        params, "temperature", "--logits", teacher / "logits.zarr", "--out", teacher / "dtd.zarr",
        "--metrics-out", metrics / "dtd.json", "--histogram-out", metrics / "hist.json",
    )  # fmt: skip
    for experiment in EXPERIMENTS:
        lessons(
            params, "student-train", "--experiment", experiment, "--data", data, "--stores", stores,
            "--checkpoint-out", tmp_path / f"{experiment}.pt",
            "--metrics-out", metrics / f"{experiment}.json",
            "--curve-out", metrics / f"{experiment}-curve.json",
        )  # fmt: skip
        record = json.loads((metrics / f"{experiment}-config.json").read_text())
        assert record["config"]["arch"] == "resnet20"
        assert 0.0 <= json.loads((metrics / f"{experiment}.json").read_text())["test_top1"] <= 1.0

"""The paper's datasets as presets (params/{cifar100,cinic10,tinyimagenet}.yaml): each preset
loads and passes `lessons check-params` as written, against a miniature of its dataset in the real
on-disk layout; a broken layout is a one-line error naming the missing file and the fix; the
README's commands name the presets and where each dataset goes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import load_params
from tests.miniatures import write_cifar100, write_cinic10, write_tinyimagenet

REPO_ROOT = Path(__file__).resolve().parents[2]
PRESETS = ("cifar100", "cinic10", "tinyimagenet")
PAIRS = {"resnet56": "resnet20", "resnet32x4": "resnet8x4", "wrn_40_2": "wrn_16_2"}
KINDS = ("ce", "kd", "kd_ps", "kd_lsr", "kd_flsw", "kd_ps_flsw")


def write_miniature(name: str, cwd: Path) -> None:
    """The miniature of preset `name` where the preset's relative `data.root` points from `cwd`."""
    if name == "cifar100":
        write_cifar100(cwd / "raw" / "cifar100")
    elif name == "cinic10":
        write_cinic10(cwd / "raw" / "cinic10")
    else:
        write_tinyimagenet(cwd / "raw")


def check_params(name: str, cwd: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(cwd)
    preset = REPO_ROOT / "params" / f"{name}.yaml"
    return CliRunner().invoke(main, ["--params", str(preset), "check-params"], obj={})


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_passes_check_params_as_written_against_a_miniature_at_its_root(
    name, tmp_path, monkeypatch
):
    write_miniature(name, tmp_path)
    result = check_params(name, tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    assert "params: 3 teacher(s), 18 experiment(s) x 1 seed(s): ok" in result.output


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_is_the_crd_zoo_on_the_crd_240_epoch_schedule(name):
    params = load_params(REPO_ROOT / "params" / f"{name}.yaml")
    assert params.data.name == name
    assert {t: c.arch for t, c in params.teacher_train.teachers.items()} == {t: t for t in PAIRS}
    crd = dict(epochs=240, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="step")
    crd |= dict(milestones=(0.625, 0.75, 0.875), gamma=0.1)
    for config in (*params.teacher_train.teachers.values(), params.student_train):
        assert {key: getattr(config, key) for key in crd} == crd
    # 0.625 * 240 = 150, 0.75 * 240 = 180, 0.875 * 240 = 210: CRD's lr_decay_epochs, exactly
    assert [m * 240 for m in params.student_train.milestones] == [150.0, 180.0, 210.0]
    expected = {f"{s}_{k}": (s, None if k == "ce" else t) for t, s in PAIRS.items() for k in KINDS}
    runs = {n: params.student_train.experiment(n) for n in params.student_train.experiments}
    assert {n: (e.arch, e.teacher) for n, e in runs.items()} == expected
    assert (params.student_train.alpha, params.temperature.base_temperature) == (0.9, 4.0)
    assert params.teacher_dump.views == ("sample" if name == "tinyimagenet" else "all")


@pytest.mark.parametrize(
    ("name", "remove", "facts"),
    [
        ("cifar100", "raw/cifar100/cifar-100-python/meta", ["cifar-100-python/meta", "download CIFAR-100"]),
        ("cinic10", "raw/cinic10/test/frog", ["raw/cinic10/test/frog", "download CINIC-10"]),
        ("tinyimagenet", "raw/tiny-imagenet-200/wnids.txt", ["wnids.txt", "download Tiny ImageNet"]),
        (
            "tinyimagenet",
            "raw/tiny-imagenet-200/val/val_annotations.txt",
            ["val/val_annotations.txt", "tiny-imagenet-200/ folder"],
        ),
        (
            "tinyimagenet",
            "raw/tiny-imagenet-200/train/n01443537",
            ["train/n01443537/images for wnid n01443537", "download Tiny ImageNet"],
        ),
    ],
)
def test_check_params_names_the_missing_file_of_a_broken_layout_in_one_line(
    name, remove, facts, tmp_path, monkeypatch
):
    write_miniature(name, tmp_path)
    target = tmp_path / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    result = check_params(name, tmp_path, monkeypatch)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: data.root: "), result.output
    for fact in facts:
        assert fact in lines[0]


def test_preset_commands_in_the_readme_name_files_that_exist():
    readme = (REPO_ROOT / "README.md").read_text()
    for name in PRESETS:
        assert f"cp params/{name}.yaml params.yaml && dvc repro" in readme
        assert (REPO_ROOT / "params" / f"{name}.yaml").is_file()
        text = (REPO_ROOT / "params" / f"{name}.yaml").read_text()
        root = yaml.safe_load(text)["data"]["root"]
        assert f"`{root}/`" in readme

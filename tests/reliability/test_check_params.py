"""`lessons check-params` runs first under dvc: whatever would make a later stage fail (after dvc
deleted that stage's old outputs) must be refused here, in one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.reliability.conftest import Pipeline, cli, ok, one_line_error, write_params


def _check(tmp_path: Path, params: dict, **sections: dict):
    return cli(
        write_params(tmp_path / "params.yaml", params, **sections),
        "check-params",
        "--out",
        tmp_path / "check.json",
    )


def test_the_session_params_pass(tmp_path, pipeline: Pipeline):
    assert "ok" in ok(_check(tmp_path, pipeline.params)).output


def test_an_empty_params_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("")
    one_line_error(
        cli(path, "check-params", "--out", tmp_path / "check.json"),
        "teacher_train.teachers",
        "no teacher",
        "add one",
    )
    assert not (tmp_path / "check.json").exists()


def test_params_without_experiments_are_refused(tmp_path, pipeline: Pipeline):
    params = yaml.safe_load(yaml.safe_dump(pipeline.params))
    params["student_train"]["experiments"] = {}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    one_line_error(cli(path, "check-params"), "student_train.experiments", "no experiment")


@pytest.mark.parametrize("root", ["missing.npz", "/nowhere/at/all.npz"])
def test_a_missing_data_root_is_refused_naming_the_key_and_the_path(tmp_path, pipeline: Pipeline, root):
    line = one_line_error(
        _check(tmp_path, pipeline.params, data={"root": root}), "data.root", root, "does not exist"
    )
    assert not (tmp_path / "check.json").exists()
    if not Path(root).is_absolute():
        assert "(from " in line  # a relative path names the folder it was resolved from


def test_a_missing_teacher_checkpoint_file_is_refused(tmp_path, pipeline: Pipeline):
    teachers = {
        "t": {**pipeline.params["teacher_train"]["teachers"]["t"], "checkpoint": str(tmp_path / "t.pt")}
    }
    one_line_error(
        _check(tmp_path, pipeline.params, teacher_train={"teachers": teachers}),
        "teacher_train.teachers.t.checkpoint",
        str(tmp_path / "t.pt"),
        "not a file",
    )


def test_a_given_teacher_checkpoint_file_passes(tmp_path, pipeline: Pipeline):
    teachers = {
        "t": {**pipeline.params["teacher_train"]["teachers"]["t"], "checkpoint": str(pipeline.checkpoint)}
    }
    ok(_check(tmp_path, pipeline.params, teacher_train={"teachers": teachers}))


@pytest.mark.parametrize("section", ["teacher", "teacher_dump", "student_train"])
def test_device_cuda_without_a_gpu_is_refused(tmp_path, pipeline: Pipeline, section):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    params = yaml.safe_load(yaml.safe_dump(pipeline.params))
    if section == "teacher":
        params["teacher_train"]["teachers"]["t"]["device"] = "cuda"
        key = "teacher_train.teachers.t.device"
    else:
        params[section]["device"] = "cuda"
        key = f"{section}.device"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    one_line_error(cli(path, "check-params"), key, "no CUDA device", "auto")


@pytest.mark.parametrize(
    "text, line, column",
    [
        ("data:\n  name: [fashion\n", 3, 1),
        ("data:\n name: x\n  root: y\n", 3, 7),
    ],
)
def test_invalid_yaml_names_its_line_and_column(tmp_path, text, line, column):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    one_line_error(cli(path, "check-params"), str(path), "not valid YAML", f"line {line}, column {column}")


def test_an_unknown_dataset_names_data_name_and_the_closest_known_one(tmp_path, pipeline: Pipeline):
    one_line_error(
        _check(tmp_path, pipeline.params, data={"name": "npz2"}), "data.name", "did you mean 'npz'"
    )


def test_an_experiment_naming_an_unknown_teacher_names_its_own_key(tmp_path, pipeline: Pipeline):
    experiments = dict(pipeline.params["student_train"]["experiments"], kd={"teacher": "nobody"})
    one_line_error(
        _check(tmp_path, pipeline.params, student_train={"experiments": experiments}),
        "student_train.experiments.kd.teacher",
        "'nobody'",
    )


@pytest.mark.parametrize(
    "content, fragment", [(b"\xff\xfe data", "not UTF-8"), (b"[]\n", "must be a mapping")]
)
def test_a_params_file_that_is_not_utf8_text_or_not_a_mapping_is_one_line(tmp_path, content, fragment):
    path = tmp_path / "params.yaml"
    path.write_bytes(content)
    one_line_error(cli(path, "check-params"), str(path), fragment)

"""Bounds that keep the loss a number: temperatures where the KD loss is finite in float32, a
NaN/inf loss that names the knob behind it, and YAML 1.1 floats read as text."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from pipeline.config import TemperatureConfig
from stages.student_train import Lessons, explain_nonfinite_kd_loss, kd_batch_loss
from stages.training import explain_cross_entropy, train_epoch
from tests.reliability.conftest import base_params, cli, make_npz, ok, one_line_error, write_params

FLOAT16_MAX = 65504.0


def _check_params(tmp_path, params: dict, **sections) -> object:
    return cli(
        write_params(tmp_path / "params.yaml", params, **sections),
        "check-params",
        "--out",
        tmp_path / "check.json",
    )


def _extreme_batch(batch: int = 4, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float16-max logits, adversarial: the teacher's top class is the student's bottom one."""
    student = torch.zeros(batch, classes)
    teacher = torch.zeros(batch, classes)
    student[:, 0], student[:, 1] = FLOAT16_MAX, -FLOAT16_MAX
    teacher[:, 1], teacher[:, 0] = FLOAT16_MAX, -FLOAT16_MAX
    student[1], teacher[1] = (
        torch.linspace(-FLOAT16_MAX, FLOAT16_MAX, classes),
        torch.linspace(FLOAT16_MAX, -FLOAT16_MAX, classes),
    )
    return student, teacher, torch.arange(batch) % classes


def _lessons(teacher: torch.Tensor, static: float | None = None) -> Lessons:
    batch = teacher.shape[0]
    return Lessons(
        target_logits=teacher.to(torch.float16).float(),
        fixed_target=torch.zeros(batch, dtype=torch.bool),
        teacher_logits=teacher,
        static_temperature=None if static is None else torch.full((batch,), static),
    )


def _loss_and_grad(config: TemperatureConfig, dtd: str, static: float | None = None) -> tuple[float, bool]:
    """The trainer's KD loss (kd_batch_loss, alpha 0.9) and whether its gradient is finite."""
    student, teacher, labels = _extreme_batch()
    student[3] = torch.randn(student.shape[1])  # a row unlike the others: DTD weights differ
    student.requires_grad_(True)
    loss = kd_batch_loss(
        student,
        labels,
        torch.arange(labels.shape[0]),
        lessons=_lessons(teacher, static),
        alpha=0.9,
        dtd=dtd,
        temperature_config=config,
    )
    loss.backward()
    return loss.item(), bool(torch.isfinite(student.grad).all())


# -- 1. temperature bounds ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "temperature, key, fix",
    [
        ({"min_temperature": 1.0e-45, "beta": 1.0e30}, "temperature.min_temperature", ("raise", "0.0001")),
        ({"max_temperature": 1.0e20}, "temperature.max_temperature", ("lower", "10000")),
        (
            {"min_temperature": 1.0e-5, "base_temperature": 1.0e-5},
            "temperature.min_temperature",
            ("raise", "0.0001"),
        ),
    ],
)
def test_check_params_refuses_a_temperature_outside_the_finite_range_in_one_line(
    tmp_path, temperature, key, fix
):
    result = _check_params(tmp_path, base_params(make_npz(tmp_path / "x.npz")), temperature=temperature)
    line = one_line_error(result, key, "[0.0001, 10000]", "finite in float32", *fix)
    assert "lower the learning rate" not in line
    assert not (tmp_path / "check.json").exists()


def test_check_params_refuses_a_fixed_target_temperature_outside_the_range(tmp_path):
    params = base_params(make_npz(tmp_path / "x.npz"))
    params["student_train"]["experiments"]["lsr"] = {
        "teacher": "t",
        "adjust": "lsr",
        "fixed_target_temperature": 1.0e5,
    }
    one_line_error(
        _check_params(tmp_path, params),
        "student_train.experiments.lsr.fixed_target_temperature",
        "[0.0001, 10000]",
        "lower",
        "10000",
    )


@pytest.mark.parametrize(
    "temperature, facts",
    [
        ({"beta": 1.0e39}, ("temperature.beta", "[-1e+38, 1e+38]")),
        ({"gamma": 200.0}, ("temperature.gamma", "<= 64")),
    ],
)
def test_check_params_refuses_a_beta_or_gamma_that_would_overflow_float32(tmp_path, temperature, facts):
    one_line_error(
        _check_params(tmp_path, base_params(make_npz(tmp_path / "x.npz")), temperature=temperature), *facts
    )


def test_the_ends_of_the_range_pass_and_give_a_finite_loss_with_float16_max_logits(tmp_path):
    ends = {"min_temperature": 1.0e-4, "base_temperature": 1.0e-4, "max_temperature": 1.0e4, "beta": 1.0e30}
    ok(_check_params(tmp_path, base_params(make_npz(tmp_path / "x.npz")), temperature=ends))
    assert json.loads((tmp_path / "check.json").read_text()) == {"params": "checked"}
    for base in (1.0e-4, 1.0e4):  # every row at one end (dtd off), then DTD spread over both
        loss, grad_finite = _loss_and_grad(TemperatureConfig(**{**ends, "base_temperature": base}), "off")
        assert torch.isfinite(torch.tensor(loss)) and loss > 0 and grad_finite, (base, loss)
    for dtd in ("flsw", "cwsm"):
        loss, grad_finite = _loss_and_grad(TemperatureConfig(**ends), dtd)
        assert torch.isfinite(torch.tensor(loss)) and grad_finite, (dtd, loss)


def test_the_values_from_the_issue_do_make_the_same_loss_nan():
    # Why the refusal matters: built past the check, these settings turn the same loss into NaN.
    for key, value in (("min_temperature", 1.0e-45), ("max_temperature", 1.0e20)):
        config = TemperatureConfig(beta=1.0e30)
        object.__setattr__(config, key, value)
        if key == "max_temperature":
            object.__setattr__(config, "base_temperature", value)
        loss, _ = _loss_and_grad(config, "flsw" if key == "min_temperature" else "off")
        assert loss != loss, (key, loss)  # NaN


# -- 2. a NaN/inf loss names the knob ----------------------------------------------------------


def test_a_nan_kd_loss_from_a_temperature_names_the_temperature_keys_not_the_learning_rate():
    student, teacher, labels = _extreme_batch()
    student[3] = torch.randn(student.shape[1])
    config = TemperatureConfig(beta=1.0e30)
    object.__setattr__(config, "min_temperature", 1.0e-45)  # as a config from before the check held
    supervision = dict(lessons=_lessons(teacher), alpha=0.9, dtd="flsw", temperature_config=config)
    index = torch.arange(labels.shape[0])
    assert not torch.isfinite(kd_batch_loss(student, labels, index, **supervision))
    message = explain_nonfinite_kd_loss(
        student, labels, index, **supervision, where="student_train.experiments.kd", lr=0.05
    )
    assert "KD term" in message and "is nan" in message
    assert "temperature.min_temperature" in message and "[0.0001, 10000]" in message
    assert "learning rate" not in message and "\n" not in message


def test_a_nan_kd_loss_from_a_stale_dtd_store_says_to_rebuild_it():
    student, teacher, labels = _extreme_batch()
    lessons = _lessons(teacher, static=1.0e-45)
    message = explain_nonfinite_kd_loss(
        student,
        labels,
        torch.arange(labels.shape[0]),
        lessons=lessons,
        alpha=0.9,
        dtd="static",
        temperature_config=TemperatureConfig(),
    )
    assert "dtd.zarr" in message and "lessons temperature" in message and "min_temperature" in message


def _tiny_run(loss_fn, explain, lr: float) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    batches = [
        (torch.randint(0, 255, (16, 8), dtype=torch.uint8), torch.arange(16) % 4, torch.arange(16))
    ] * 4
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    train_epoch(
        model,
        batches,
        optimizer,
        loss_fn=loss_fn,
        prepare=lambda images, _index: images.float(),
        lr_at=lambda _step: lr,
        step=0,
        device=torch.device("cpu"),
        explain=explain,
    )


@pytest.mark.parametrize("dtd", ["off", "flsw", "cwsm"])
def test_a_student_diverging_under_a_huge_learning_rate_is_told_to_lower_it(dtd):
    teacher = torch.randn(16, 4)
    supervision = dict(lessons=_lessons(teacher), alpha=0.9, dtd=dtd, temperature_config=TemperatureConfig())
    with pytest.raises(FloatingPointError) as info:
        _tiny_run(
            lambda logits, labels, index: kd_batch_loss(logits, labels, index, **supervision),
            lambda logits, labels, index: explain_nonfinite_kd_loss(
                logits, labels, index, **supervision, where="student_train.experiments.kd", lr=1e37
            ),
            lr=1e37,
        )
    message = str(info.value)
    assert "the student diverged" in message and "student_train.experiments.kd.lr" in message
    assert "now 1e+37" in message and "temperature." not in message and "teacher dump" not in message


def test_a_teacher_diverging_under_a_huge_learning_rate_names_its_lr_and_weight_decay():
    explain = explain_cross_entropy("teacher", "teacher_train.teachers.t.lr (now 1e+37) or its weight_decay")
    with pytest.raises(FloatingPointError) as info:
        _tiny_run(
            lambda logits, labels, _index: torch.nn.functional.cross_entropy(logits, labels), explain, lr=1e37
        )
    assert "the teacher diverged" in str(info.value) and "teacher_train.teachers.t.lr" in str(info.value)


def test_student_train_with_a_huge_learning_rate_fails_in_one_line_naming_the_lr(tmp_path, pipeline):
    params = write_params(tmp_path / "params.yaml", pipeline.params, student_train={"lr": 1.0e30})
    result = cli(
        params,
        "student-train",
        "--experiment",
        "kd",
        "--data",
        pipeline.data,
        "--stores",
        pipeline.stores,
        "--checkpoint-out",
        tmp_path / "s.pt",
        "--metrics-out",
        tmp_path / "s.json",
        "--curve-out",
        tmp_path / "c.json",
    )
    one_line_error(
        result, "the student diverged", "lower the learning rate", "student_train.experiments.kd.lr"
    )
    assert not (tmp_path / "s.pt").exists() and not (tmp_path / "s.json").exists()


# -- 3. YAML 1.1 floats ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, key, spelling",
    [
        ("temperature:\n  max_temperature: 1.0e30\n", "temperature.max_temperature", "1.0e+30"),
        ("student_train:\n  lr: 1e-3\n", "student_train.lr", "1.0e-3"),
        ("temperature:\n  beta: '0.5'\n", "temperature.beta", "0.5"),
    ],
)
def test_a_float_yaml_read_as_text_says_so_and_gives_the_spelling_it_reads(tmp_path, line, key, spelling):
    path = tmp_path / "params.yaml"
    path.write_text(line)
    error = one_line_error(cli(path, "check-params"), key, "YAML read", "as text", f"write {spelling}")
    assert error.endswith(f"write {spelling}")
    written = line.split(": ", 1)[1].strip()
    assert yaml.safe_load(spelling) == float(written.strip("'"))  # the same number, read as one
    path.write_text(line.replace(written, spelling))
    assert "YAML read" not in cli(path, "check-params").output


def test_teacher_train_with_a_huge_learning_rate_fails_in_one_line_naming_lr_and_weight_decay(
    tmp_path, pipeline
):
    teacher = {**pipeline.params["teacher_train"]["teachers"]["t"], "lr": 1.0e30}
    params = write_params(
        tmp_path / "params.yaml", pipeline.params, teacher_train={"teachers": {"t": teacher}}
    )
    result = cli(
        params,
        "teacher-train",
        "--teacher",
        "t",
        "--data",
        pipeline.data,
        "--checkpoint-out",
        tmp_path / "t.pt",
        "--metrics-out",
        tmp_path / "t.json",
        "--curve-out",
        tmp_path / "c.json",
    )
    one_line_error(result, "the teacher diverged", "teacher_train.teachers.t.lr", "1e+30", "weight_decay")
    assert not (tmp_path / "t.pt").exists() and not (tmp_path / "t.json").exists()

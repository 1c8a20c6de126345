"""Bounds that keep the loss a number: temperatures where the KD loss is finite in float32, a
NaN/inf loss that names the knob behind it, and YAML 1.1 floats read as text."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from pipeline.config import TemperatureConfig
from stages.student_train import Lessons, kd_batch_loss
from tests.reliability.conftest import base_params, cli, ok, one_line_error, write_params

FLOAT16_MAX = 65504.0


def _check_params(tmp_path, params: dict, **sections) -> object:
    return cli(write_params(tmp_path / "params.yaml", params, **sections), "check-params",
               "--out", tmp_path / "check.json")


def _extreme_batch(batch: int = 4, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float16-max logits, adversarial: the teacher's top class is the student's bottom one."""
    student = torch.zeros(batch, classes)
    teacher = torch.zeros(batch, classes)
    student[:, 0], student[:, 1] = FLOAT16_MAX, -FLOAT16_MAX
    teacher[:, 1], teacher[:, 0] = FLOAT16_MAX, -FLOAT16_MAX
    student[1], teacher[1] = torch.linspace(-FLOAT16_MAX, FLOAT16_MAX, classes), torch.linspace(
        FLOAT16_MAX, -FLOAT16_MAX, classes)
    return student, teacher, torch.arange(batch) % classes


def _lessons(teacher: torch.Tensor, static: float | None = None) -> Lessons:
    batch = teacher.shape[0]
    return Lessons(target_logits=teacher.to(torch.float16).float(), fixed_target=torch.zeros(batch, dtype=torch.bool),
                   teacher_logits=teacher,
                   static_temperature=None if static is None else torch.full((batch,), static))


def _loss_and_grad(config: TemperatureConfig, dtd: str, static: float | None = None) -> tuple[float, bool]:
    """The trainer's KD loss (kd_batch_loss, alpha 0.9) and whether its gradient is finite."""
    student, teacher, labels = _extreme_batch()
    student[3] = torch.randn(student.shape[1])  # a row unlike the others: DTD weights differ
    student.requires_grad_(True)
    loss = kd_batch_loss(student, labels, torch.arange(labels.shape[0]), lessons=_lessons(teacher, static),
                         alpha=0.9, dtd=dtd, temperature_config=config)
    loss.backward()
    return loss.item(), bool(torch.isfinite(student.grad).all())


# -- 1. temperature bounds ---------------------------------------------------------------------

@pytest.mark.parametrize("temperature, key, fix", [
    ({"min_temperature": 1.0e-45, "beta": 1.0e30}, "temperature.min_temperature", "raise it to at least 0.0001"),
    ({"max_temperature": 1.0e20}, "temperature.max_temperature", "lower it to at most 10000"),
    ({"min_temperature": 1.0e-5, "base_temperature": 1.0e-5}, "temperature.min_temperature", "at least 0.0001"),
])
def test_check_params_refuses_a_temperature_outside_the_finite_range_in_one_line(tmp_path, temperature, key, fix):
    result = _check_params(tmp_path, base_params(tmp_path / "x.npz"), temperature=temperature)
    line = one_line_error(result, key, "[0.0001, 10000]", "finite in float32", fix)
    assert "lower the learning rate" not in line
    assert not (tmp_path / "check.json").exists()


def test_check_params_refuses_a_fixed_target_temperature_outside_the_range(tmp_path):
    params = base_params(tmp_path / "x.npz")
    params["student_train"]["experiments"]["lsr"] = {"teacher": "t", "adjust": "lsr",
                                                     "fixed_target_temperature": 1.0e5}
    one_line_error(_check_params(tmp_path, params), "student_train.experiments.lsr.fixed_target_temperature",
                   "[0.0001, 10000]", "lower it to at most 10000")


@pytest.mark.parametrize("temperature, fragment", [
    ({"beta": 1.0e39}, "temperature.beta: must lie in [-1e+38, 1e+38]"),
    ({"gamma": 200.0}, "temperature.gamma: the FLSW exponent must be <= 64"),
])
def test_check_params_refuses_a_beta_or_gamma_that_would_overflow_float32(tmp_path, temperature, fragment):
    one_line_error(_check_params(tmp_path, base_params(tmp_path / "x.npz"), temperature=temperature), fragment)


def test_the_ends_of_the_range_pass_and_give_a_finite_loss_with_float16_max_logits(tmp_path):
    ends = {"min_temperature": 1.0e-4, "base_temperature": 1.0e-4, "max_temperature": 1.0e4, "beta": 1.0e30}
    ok(_check_params(tmp_path, base_params(tmp_path / "x.npz"), temperature=ends))
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


# -- 3. YAML 1.1 floats ------------------------------------------------------------------------

@pytest.mark.parametrize("line, key, spelling", [
    ("temperature:\n  max_temperature: 1.0e30\n", "temperature.max_temperature", "1.0e+30"),
    ("student_train:\n  lr: 1e-3\n", "student_train.lr", "1.0e-3"),
    ("temperature:\n  beta: '0.5'\n", "temperature.beta", "0.5"),
])
def test_a_float_yaml_read_as_text_says_so_and_gives_the_spelling_it_reads(tmp_path, line, key, spelling):
    path = tmp_path / "params.yaml"
    path.write_text(line)
    error = one_line_error(cli(path, "check-params"), key, "YAML read", "as text", f"write {spelling}")
    assert error.endswith(f"write {spelling}")
    written = line.split(": ", 1)[1].strip()
    assert yaml.safe_load(spelling) == float(written.strip("'"))  # the same number, read as one
    path.write_text(line.replace(written, spelling))
    assert "YAML read" not in cli(path, "check-params").output

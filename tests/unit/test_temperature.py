"""Unit tests for the DTD math in stages.temperature (arXiv:1911.07471 §3.2, DESIGN §4)."""

from __future__ import annotations

import math

import pytest
import torch

from stages.functional import InvalidLogitsError
from stages.temperature import (
    cwsm_weights,
    dynamic_temperature,
    flsw_weights,
    teacher_statistics,
)

F64 = torch.float64
BOUNDS = dict(min_temperature=1.0, max_temperature=8.0)


# --- weights -----------------------------------------------------------------------------------


def test_flsw_weights_and_temperatures_on_a_two_sample_batch():
    # Row 1: cos((3,4),(4,3)) = 24/25, so w = (1/25)^0.5 = 0.2.
    # Row 2: cos((1,0),(-1,0)) = -1, so w = 2^0.5.
    student = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=F64)
    teacher = torch.tensor([[4.0, 3.0], [-1.0, 0.0]], dtype=F64)
    weights = flsw_weights(student, teacher, gamma=0.5)
    assert weights.tolist() == pytest.approx([0.2, math.sqrt(2.0)], rel=1e-12)
    # mean = (0.2 + sqrt 2) / 2; tau = 4 + (mean - w) * 2.
    temperatures = dynamic_temperature(weights, base_temperature=4.0, beta=2.0, **BOUNDS)
    assert temperatures.tolist() == pytest.approx(
        [4.0 + (math.sqrt(2.0) - 0.2), 4.0 - (math.sqrt(2.0) - 0.2)], rel=1e-12
    )


def test_flsw_is_scale_invariant_and_one_for_an_all_zero_row():
    student = torch.tensor([[0.0, 0.0, 0.0], [1e30, 2e30, 0.0]])
    teacher = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 0.0]])
    weights = flsw_weights(student, teacher, gamma=2.0)
    assert weights.tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


def test_flsw_rejects_a_negative_gamma_and_mismatched_shapes():
    with pytest.raises(ValueError):
        flsw_weights(torch.ones(2, 3), torch.ones(2, 3), gamma=-1.0)
    with pytest.raises(InvalidLogitsError):
        flsw_weights(torch.ones(2, 3), torch.ones(2, 4), gamma=1.0)


def test_cwsm_weights_and_temperatures_on_a_two_sample_batch():
    # Row 1: softmax(0, 0) peaks at 0.5; row 2: softmax(ln 3, 0) peaks at 0.75.
    student = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=F64)
    weights = cwsm_weights(student)
    w1, w2 = 1.0 / 0.501, 1.0 / 0.751
    assert weights.tolist() == pytest.approx([w1, w2], rel=1e-12)
    temperatures = dynamic_temperature(weights, base_temperature=4.0, beta=1.0, **BOUNDS)
    half_gap = (w1 - w2) / 2  # = 0.33222...
    assert temperatures.tolist() == pytest.approx([4.0 - half_gap, 4.0 + half_gap], rel=1e-12)


def test_teacher_only_weights_with_a_dataset_mean_give_static_temperatures():
    teacher = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=F64)
    weights = teacher_statistics(teacher)["omega_teacher"]
    assert weights.tolist() == pytest.approx([1.0 / 0.501, 1.0 / 0.751], rel=1e-12)
    temperatures = dynamic_temperature(weights, base_temperature=4.0, beta=3.0, reference_mean=1.5, **BOUNDS)
    assert temperatures.tolist() == pytest.approx(
        [4.0 + (1.5 - 1.0 / 0.501) * 3.0, 4.0 + (1.5 - 1.0 / 0.751) * 3.0], rel=1e-12
    )


def test_a_uniform_student_of_c_classes_gets_the_largest_cwsm_weight():
    assert cwsm_weights(torch.zeros(1, 10, dtype=F64)).item() == pytest.approx(1.0 / 0.101)


# --- dynamic temperature -----------------------------------------------------------------------


def test_dynamic_temperature_is_clamped_to_its_bounds():
    # mean 5: 4 + 5 = 9 -> 8 and 4 - 5 = -1 -> 1.
    temperatures = dynamic_temperature(torch.tensor([0.0, 10.0]), base_temperature=4.0, beta=1.0, **BOUNDS)
    assert temperatures.tolist() == [8.0, 1.0]


def test_equal_weights_give_the_base_temperature():
    temperatures = dynamic_temperature(torch.full((3,), 0.7), base_temperature=4.0, beta=5.0, **BOUNDS)
    assert temperatures.tolist() == pytest.approx([4.0] * 3)


def test_float16_weights_give_float32_temperatures():
    temperatures = dynamic_temperature(
        torch.tensor([1.0, 2.0], dtype=torch.float16), base_temperature=4.0, beta=1.0, **BOUNDS
    )
    assert temperatures.dtype == torch.float32
    assert temperatures.tolist() == [4.5, 3.5]


def test_an_empty_batch_gives_no_temperatures():
    assert dynamic_temperature(torch.zeros(0), base_temperature=4.0, beta=1.0, **BOUNDS).shape == (0,)


@pytest.mark.parametrize("low, high", [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0), (1.0, float("inf"))])
def test_dynamic_temperature_rejects_bounds_that_are_not_positive_and_ordered(low, high):
    with pytest.raises(ValueError):
        dynamic_temperature(
            torch.ones(2), base_temperature=4.0, beta=1.0, min_temperature=low, max_temperature=high
        )


def test_dynamic_temperature_rejects_nan_weights():
    with pytest.raises(ValueError):
        dynamic_temperature(torch.tensor([1.0, float("nan")]), base_temperature=4.0, beta=1.0, **BOUNDS)


# --- teacher statistics ------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [1, 2, 10, 1000])
def test_the_entropy_of_a_uniform_row_is_log_c(num_classes):
    stats = teacher_statistics(torch.full((2, num_classes), 3.0, dtype=F64))
    assert stats["teacher_entropy"].tolist() == pytest.approx(
        [math.log(num_classes)] * 2, rel=1e-12, abs=1e-15
    )
    assert stats["teacher_max_prob"].tolist() == pytest.approx([1.0 / num_classes] * 2)


def test_statistics_of_a_known_row():
    probs = [0.5, 0.3, 0.2]
    logits = torch.tensor([[math.log(p) for p in probs]], dtype=F64)
    stats = teacher_statistics(logits)
    assert set(stats) == {
        "teacher_max_prob",
        "teacher_entropy",
        "teacher_margin",
        "teacher_logit_norm",
        "omega_teacher",
    }
    assert stats["omega_teacher"].item() == pytest.approx(1.0 / 0.501, rel=1e-12)
    assert stats["teacher_max_prob"].item() == pytest.approx(0.5, rel=1e-12)
    assert stats["teacher_margin"].item() == pytest.approx(0.2, rel=1e-12)
    assert stats["teacher_entropy"].item() == pytest.approx(-sum(p * math.log(p) for p in probs), rel=1e-12)
    assert stats["teacher_logit_norm"].item() == pytest.approx(
        math.sqrt(sum(math.log(p) ** 2 for p in probs)), rel=1e-12
    )


def test_with_one_class_the_margin_is_the_max_probability_one():
    stats = teacher_statistics(torch.tensor([[7.0], [-2.0]]))
    assert stats["teacher_margin"].tolist() == [1.0, 1.0]
    assert stats["teacher_max_prob"].tolist() == [1.0, 1.0]
    assert stats["teacher_entropy"].tolist() == [0.0, 0.0]


def test_statistics_of_float16_logits_are_float32_and_finite_at_the_float16_max():
    logits = torch.tensor([[65504.0, -65504.0, 0.0]], dtype=torch.float16)
    stats = teacher_statistics(logits)
    for value in stats.values():
        assert value.dtype == torch.float32 and torch.isfinite(value).all()
    assert stats["teacher_max_prob"].item() == 1.0
    assert stats["teacher_entropy"].item() == 0.0
    assert stats["teacher_logit_norm"].item() == pytest.approx(65504.0 * math.sqrt(2), rel=1e-6)


def test_statistics_reject_nan_logits():
    with pytest.raises(InvalidLogitsError):
        teacher_statistics(torch.tensor([[0.0, float("nan")]]))

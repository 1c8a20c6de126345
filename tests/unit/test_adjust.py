"""Unit tests for the Knowledge Adjustment math in stages.adjust (arXiv:1911.07471 §3.1)."""

from __future__ import annotations

import math

import pytest
import torch

from stages.adjust import AdjustedTargets, knowledge_adjustment, label_smoothing, probability_shift
from stages.functional import InvalidLogitsError


def bits(tensor: torch.Tensor) -> list:
    """The raw bit patterns, so -0.0 and 0.0 (or two NaN payloads) compare as different."""
    int_type = {torch.float16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}
    return tensor.view(int_type[tensor.dtype]).tolist()


# --- probability shift -------------------------------------------------------------------------


def test_ps_swaps_the_predicted_and_true_logits_of_a_wrong_row():
    shifted = probability_shift(torch.tensor([[1.0, 3.0, 2.0]]), torch.tensor([0]))
    assert shifted.tolist() == [[3.0, 1.0, 2.0]]


def test_ps_leaves_a_right_row_unchanged():
    shifted = probability_shift(torch.tensor([[3.0, 1.0, 2.0]]), torch.tensor([0]))
    assert shifted.tolist() == [[3.0, 1.0, 2.0]]


def test_ps_leaves_a_row_unchanged_when_the_label_ties_the_max():
    shifted = probability_shift(torch.tensor([[3.0, 3.0, 1.0]]), torch.tensor([1]))
    assert shifted.tolist() == [[3.0, 3.0, 1.0]]


def test_ps_swaps_with_the_first_max_when_the_label_is_not_among_tied_maxima():
    shifted = probability_shift(torch.tensor([[3.0, 3.0, 1.0]]), torch.tensor([2]))
    assert shifted.tolist() == [[1.0, 3.0, 3.0]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_ps_keeps_the_dtype_copies_bits_exactly_and_does_not_touch_its_input(dtype):
    logits = torch.tensor([[-0.0, 0.1, 0.3], [0.7, -0.0, 0.2]], dtype=dtype)
    before = bits(logits.clone())
    shifted = probability_shift(logits, torch.tensor([0, 0]))
    assert shifted.dtype == dtype
    assert bits(logits) == before
    expected = logits.clone()
    expected[0, 0], expected[0, 2] = logits[0, 2], logits[0, 0]
    assert bits(shifted) == bits(expected)
    assert bits(shifted[1]) == bits(logits[1])


def test_ps_rejects_labels_out_of_range():
    with pytest.raises(InvalidLogitsError):
        probability_shift(torch.zeros(2, 3), torch.tensor([0, 3]))


# --- label smoothing ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [2, 10, 100])
def test_lsr_rows_sum_to_one_and_equal_the_hand_value(num_classes):
    epsilon = 0.1
    logits = torch.zeros(1, num_classes, dtype=torch.float64)
    logits[0, 0] = 5.0  # teacher predicts class 0, label is the last class: wrong
    label = num_classes - 1
    target, fixed = label_smoothing(logits, torch.tensor([label]), epsilon)
    assert fixed.tolist() == [True]
    probs = target.exp()
    assert abs(probs.sum().item() - 1.0) < 1e-12
    off = 0.1 / num_classes
    expected = [math.log(off)] * num_classes
    expected[label] = math.log(0.9 + off)
    assert target[0].tolist() == pytest.approx(expected, rel=1e-15, abs=0)


def test_lsr_with_ten_classes_and_epsilon_point_one_gives_log_091_and_log_001():
    logits = torch.arange(10, dtype=torch.float64).unsqueeze(0)
    target, _ = label_smoothing(logits, torch.tensor([3]), 0.1)
    assert target[0, 3].item() == pytest.approx(math.log(0.91), rel=1e-15)
    assert target[0, 0].item() == pytest.approx(math.log(0.01), rel=1e-15)


def test_lsr_marks_fixed_target_only_on_wrong_rows_and_keeps_right_rows_bit_exact():
    logits = torch.tensor([[1.0, 3.0, 2.0], [3.0, 1.0, 2.0], [3.0, 3.0, 1.0]])
    target, fixed = label_smoothing(logits, torch.tensor([0, 0, 1]), 0.2)
    assert fixed.tolist() == [True, False, False]
    assert bits(target[1:]) == bits(logits[1:])
    assert target.dtype == torch.float32


def test_lsr_keeps_float16_dtype():
    logits = torch.tensor([[1.0, 3.0]], dtype=torch.float16)
    target, _ = label_smoothing(logits, torch.tensor([0]), 0.1)
    assert target.dtype == torch.float16
    assert target[0].tolist() == [
        torch.tensor(math.log(0.95), dtype=torch.float16).item(),
        torch.tensor(math.log(0.05), dtype=torch.float16).item(),
    ]


@pytest.mark.parametrize("epsilon", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_lsr_rejects_epsilon_outside_zero_one(epsilon):
    with pytest.raises(ValueError):
        label_smoothing(torch.zeros(1, 3), torch.tensor([0]), epsilon)


# --- knowledge_adjustment ----------------------------------------------------------------------

LOGITS = torch.tensor([[1.0, 3.0, 2.0], [3.0, 1.0, 2.0], [0.0, 0.0, 5.0]])
LABELS = torch.tensor([0, 0, 1])


def test_knowledge_adjustment_none_changes_nothing():
    adjusted = knowledge_adjustment(LOGITS, LABELS, "none")
    assert isinstance(adjusted, AdjustedTargets)
    assert torch.equal(adjusted.target_logits, LOGITS)
    assert adjusted.target_logits is not LOGITS
    assert not adjusted.fixed_target.any() and not adjusted.rewritten.any()


def test_knowledge_adjustment_ps_rewrites_wrong_rows_without_fixing_them():
    adjusted = knowledge_adjustment(LOGITS, LABELS, "ps")
    assert adjusted.target_logits.tolist() == [[3.0, 1.0, 2.0], [3.0, 1.0, 2.0], [0.0, 5.0, 0.0]]
    assert adjusted.rewritten.tolist() == [True, False, True]
    assert adjusted.fixed_target.tolist() == [False, False, False]


def test_knowledge_adjustment_lsr_rewrites_and_fixes_wrong_rows():
    adjusted = knowledge_adjustment(LOGITS, LABELS, "lsr", epsilon=0.3)
    assert adjusted.rewritten.tolist() == [True, False, True]
    assert adjusted.fixed_target.tolist() == [True, False, True]
    assert adjusted.target_logits[2].tolist() == pytest.approx(
        [math.log(0.1), math.log(0.8), math.log(0.1)], rel=1e-6
    )


def test_knowledge_adjustment_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="method"):
        knowledge_adjustment(LOGITS, LABELS, "swap")  # type: ignore[arg-type]


def test_adjusted_targets_is_frozen():
    adjusted = knowledge_adjustment(LOGITS, LABELS, "ps")
    with pytest.raises(AttributeError):
        adjusted.rewritten = adjusted.fixed_target  # type: ignore[misc]

"""Unit tests for stages.functional: input checks, teacher wrongness and the KD loss.

Golden values are derived by hand (closed forms with `math`) or in float64 numpy, never by
calling the function under test. The KD loss checks nothing itself: its inputs are checked where
they enter (tests/unit/test_config.py for alpha and temperatures, test_student_gather.py for the
stores), so here it only meets valid input.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.functional import InvalidLogitsError, kd_loss, teacher_is_wrong, validate_logits_and_labels


def np_log_softmax(x: np.ndarray, temperature: float | np.ndarray = 1.0) -> np.ndarray:
    """Row-wise float64 log-softmax of x / temperature, independent of torch."""
    z = np.asarray(x, dtype=np.float64) / np.reshape(temperature, (-1, 1))
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_kl(log_q: np.ndarray, log_p: np.ndarray) -> np.ndarray:
    """Row-wise KL(q || p) in float64 from log-probabilities."""
    return (np.exp(log_q) * (log_q - log_p)).sum(axis=1)


def np_kd_term(
    student: np.ndarray,
    target: np.ndarray,
    temperature: float | np.ndarray,
    fixed: np.ndarray | None = None,
    student_temperature=None,
) -> float:
    """mean_b tau_b^2 KL(q_b || p_b) in float64; fixed rows take q = softmax(target) unsoftened."""
    tau = np.broadcast_to(np.asarray(temperature, dtype=np.float64), (len(student),))
    log_q = np_log_softmax(target, tau)
    if fixed is not None:
        log_q = np.where(fixed[:, None], np_log_softmax(target), log_q)
    return float(np.mean(tau**2 * np_kl(log_q, np_log_softmax(student, tau))))


def kd(student, target, labels=None, *, alpha=1.0, temperature=1.0, fixed_target=None):
    """`kd_loss` on tensors or arrays, labels 0 and no fixed rows unless given."""
    student, target = (torch.as_tensor(x) for x in (student, target))
    batch = student.shape[0]
    labels = torch.zeros(batch, dtype=torch.long) if labels is None else torch.as_tensor(labels)
    fixed = torch.zeros(batch, dtype=torch.bool) if fixed_target is None else torch.as_tensor(fixed_target)
    temperature = torch.as_tensor(temperature) if isinstance(temperature, np.ndarray) else temperature
    return kd_loss(student, target, labels, alpha=alpha, temperature=temperature, fixed_target=fixed)


# --- validate_logits_and_labels -------------------------------------------------------------


def test_valid_logits_and_int32_labels_pass_validation():
    validate_logits_and_labels(torch.zeros(3, 4), torch.tensor([0, 3, 2], dtype=torch.int32))


@pytest.mark.parametrize(
    "logits, labels",
    [
        (torch.zeros(4), torch.zeros(4, dtype=torch.long)),  # 1-D logits
        (torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long)),  # 3-D logits
        (torch.zeros(3, 4), torch.zeros(3, 1, dtype=torch.long)),  # 2-D labels
        (torch.zeros(3, 4), torch.zeros(2, dtype=torch.long)),  # N mismatch
        (torch.zeros(3, 0), torch.zeros(3, dtype=torch.long)),  # C = 0
        (torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long)),  # int logits
        (torch.zeros(3, 4), torch.zeros(3)),  # float labels
        (torch.zeros(3, 4), torch.zeros(3, dtype=torch.bool)),  # bool labels
    ],
)
def test_wrong_shapes_and_dtypes_raise_invalid_logits_error(logits, labels):
    with pytest.raises(InvalidLogitsError):
        validate_logits_and_labels(logits, labels)


def test_a_label_out_of_range_is_reported_with_its_value_and_row():
    labels = torch.tensor([0, 1, 7, 2, 9])
    with pytest.raises(InvalidLogitsError, match=r"value 7 at row 2 .*\[0, 4\).*2 labels"):
        validate_logits_and_labels(torch.zeros(5, 4), labels)


def test_a_negative_label_is_rejected():
    with pytest.raises(InvalidLogitsError, match="value -1 at row 1"):
        validate_logits_and_labels(torch.zeros(2, 4), torch.tensor([0, -1]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_logits_are_reported_with_the_number_of_rows(bad):
    logits = torch.zeros(6, 3)
    logits[1, 2] = bad
    logits[4, 0] = bad
    logits[4, 1] = bad
    with pytest.raises(InvalidLogitsError, match=r"2 of 6 rows \(first at row 1\)"):
        validate_logits_and_labels(logits, torch.zeros(6, dtype=torch.long))


def test_error_messages_are_one_line():
    with pytest.raises(InvalidLogitsError) as info:
        validate_logits_and_labels(torch.zeros(2, 3), torch.tensor([0, 5]))
    assert "\n" not in str(info.value)


def test_invalid_logits_error_is_a_value_error():
    assert issubclass(InvalidLogitsError, ValueError)


# --- teacher_is_wrong ------------------------------------------------------------------------


def test_teacher_is_wrong_only_when_the_label_logit_is_strictly_below_the_max():
    logits = torch.tensor([[1.0, 3.0, 2.0], [3.0, 1.0, 2.0], [3.0, 3.0, 1.0], [3.0, 3.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 2])
    assert teacher_is_wrong(logits, labels).tolist() == [True, False, False, True]


def test_teacher_is_never_wrong_with_one_class():
    assert not teacher_is_wrong(torch.randn(5, 1), torch.zeros(5, dtype=torch.long)).any()


def test_teacher_is_wrong_validates_its_inputs():
    with pytest.raises(InvalidLogitsError):
        teacher_is_wrong(torch.zeros(2, 3), torch.tensor([0, 3]))


# --- kd_loss: tempered log-softmax ------------------------------------------------------------


def test_the_kd_term_matches_float64_numpy_at_several_temperatures():
    rng = np.random.default_rng(0)
    student, target = rng.normal(size=(2, 5, 7)) * 3
    for temperature in (0.5, 1.0, 4.0):
        got = kd(student, target, temperature=temperature)
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(np_kd_term(student, target, temperature), rel=1e-12, abs=1e-15)


def test_float16_logits_of_60000_are_softened_exactly_in_float32():
    # log p = (0, -60000) and log q = (-60000, 0): KL(q || p) = 1 * (0 - (-60000)) = 60000 exactly.
    student = torch.tensor([[60000.0, 0.0]], dtype=torch.float16)
    target = torch.tensor([[0.0, 60000.0]], dtype=torch.float16)
    got = kd(student, target)
    assert got.dtype == torch.float32
    assert got.item() == 60000.0


def test_the_kd_loss_at_the_smallest_temperature_and_the_largest_logits_has_no_nan():
    # |logits| up to LOGIT_LIMIT = 1e33 at tau = 1e-4 (pipeline/sections.py): shifting by the row max
    # first keeps every tempered logit finite, so identical sides give exactly 0.
    logits = torch.tensor([[1.0e33, -1.0e33, 1.0]], requires_grad=True)
    got = kd(logits, logits.detach(), temperature=1e-4)
    assert got.item() == 0.0
    got.backward()
    assert torch.isfinite(logits.grad).all()


# --- kd_loss -----------------------------------------------------------------------------------


def test_kd_loss_is_the_kl_of_two_known_distributions():
    # q = (1/2, 1/2), p = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3).
    target = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    student = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    loss = kd(student, target, alpha=1.0, temperature=1.0)
    assert loss.item() == pytest.approx(0.5 * math.log(4.0 / 3.0), rel=1e-12)


def test_kd_loss_at_temperature_two_is_four_times_the_softened_kl():
    # Softened by 2, the student becomes (1, sqrt 3)/(1 + sqrt 3); the target stays uniform.
    target = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    student = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    r3 = math.sqrt(3.0)
    kl = 0.5 * math.log(0.5 * (1 + r3)) + 0.5 * math.log(0.5 * (1 + r3) / r3)
    scaled = kd(student, target, alpha=1.0, temperature=2.0)
    assert scaled.item() == pytest.approx(4.0 * kl, rel=1e-12)


def test_kd_loss_scales_each_row_by_its_own_squared_temperature():
    rng = np.random.default_rng(1)
    student, target = rng.normal(size=(2, 3, 5)) * 2
    temperatures = np.array([0.5, 1.0, 3.0])
    expected = np.mean(
        temperatures**2 * np_kl(np_log_softmax(target, temperatures), np_log_softmax(student, temperatures))
    )
    loss = kd(student, target, [0, 1, 2], alpha=1.0, temperature=temperatures)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # a row's own temperature softens that row only: rows 0 and 2 alone give their own terms
    for row in (0, 2):
        alone = kd(student[row : row + 1], target[row : row + 1], temperature=temperatures[row : row + 1])
        assert alone.item() == pytest.approx(
            np_kd_term(student[row : row + 1], target[row : row + 1], temperatures[row]), rel=1e-12
        )


def test_kd_loss_divides_the_summed_kl_by_the_batch_size_not_by_batch_times_classes():
    rng = np.random.default_rng(2)
    student, target = rng.normal(size=(2, 2, 3))
    rows = np_kl(np_log_softmax(target), np_log_softmax(student))
    loss = kd(student, target, [0, 1], alpha=1.0, temperature=1.0).item()
    assert loss == pytest.approx(rows.sum() / 2, rel=1e-12)
    assert loss != pytest.approx(rows.sum() / 6, rel=1e-3)


def test_kd_loss_with_alpha_zero_is_exactly_cross_entropy():
    rng = np.random.default_rng(3)
    student = torch.from_numpy(rng.normal(size=(4, 5)).astype(np.float32))
    target = torch.from_numpy(rng.normal(size=(4, 5)).astype(np.float32))
    labels = torch.tensor([0, 4, 2, 2])
    loss = kd(student, target, labels, alpha=0.0, temperature=4.0)
    assert torch.equal(loss, F.cross_entropy(student, labels))
    by_hand = -np_log_softmax(student.numpy())[np.arange(4), labels.numpy()].mean()
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)


def test_kd_loss_mixes_cross_entropy_and_kd_with_alpha():
    rng = np.random.default_rng(4)
    student, target = rng.normal(size=(2, 3, 4))
    labels = np.array([1, 3, 0])
    ce = -np_log_softmax(student)[np.arange(3), labels].mean()
    kd_term = 9.0 * np_kl(np_log_softmax(target, 3.0), np_log_softmax(student, 3.0)).mean()
    loss = kd(student, target, labels, alpha=0.7, temperature=3.0)
    assert loss.item() == pytest.approx(0.3 * ce + 0.7 * kd_term, rel=1e-12)
    assert kd(student, target, labels, alpha=0.0, temperature=3.0).item() == pytest.approx(ce, rel=1e-12)
    assert kd(student, target, labels, alpha=1.0, temperature=3.0).item() == pytest.approx(kd_term, rel=1e-12)


def test_the_kd_term_is_zero_when_student_logits_equal_target_logits():
    logits = torch.randn(6, 10) * 5
    loss = kd(logits, logits.clone(), alpha=1.0, temperature=torch.linspace(0.5, 8.0, 6))
    assert loss.item() == 0.0


def test_no_gradient_reaches_the_target_logits():
    student = torch.randn(3, 4, requires_grad=True)
    target = torch.randn(3, 4, requires_grad=True)
    loss = kd(student, target, [0, 1, 2], alpha=0.9, temperature=4.0)
    loss.backward()
    assert target.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_the_gradient_of_the_scaled_kd_term_is_tau_times_p_minus_q_over_batch():
    # d/ds [tau^2 KL(q || softmax(s/tau))] = tau (softmax(s/tau) - q); divided by B = 2.
    rng = np.random.default_rng(5)
    student_np, target_np = rng.normal(size=(2, 2, 3))
    student = torch.from_numpy(student_np).requires_grad_(True)
    kd(student, target_np, alpha=1.0, temperature=2.5).backward()
    p = np.exp(np_log_softmax(student_np, 2.5))
    q = np.exp(np_log_softmax(target_np, 2.5))
    np.testing.assert_allclose(student.grad.numpy(), 2.5 * (p - q) / 2, rtol=1e-10, atol=1e-14)


def test_fixed_target_rows_are_not_softened_by_the_temperature():
    # q = (0.9, 0.05, 0.05) stored as log q; uniform student stays uniform at any temperature.
    q = np.array([0.9, 0.05, 0.05])
    target = torch.from_numpy(np.log(q)).unsqueeze(0)
    student = torch.zeros(1, 3, dtype=torch.float64)
    by_hand = 16.0 * (0.9 * math.log(0.9 * 3) + 2 * 0.05 * math.log(0.05 * 3))
    fixed = kd(student, target, alpha=1.0, temperature=4.0, fixed_target=[True])
    softened = kd(student, target, alpha=1.0, temperature=4.0, fixed_target=[False])
    assert fixed.item() == pytest.approx(by_hand, rel=1e-12)
    q_soft = q**0.25 / (q**0.25).sum()
    assert softened.item() == pytest.approx(16.0 * np.sum(q_soft * np.log(q_soft * 3)), rel=1e-12)


def test_fixed_target_applies_row_by_row():
    q = np.log(np.array([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05]]))
    student = np.zeros((2, 3))
    fixed_row = 4.0 * np_kl(q, np_log_softmax(student))[0]
    soft_row = 4.0 * np_kl(np_log_softmax(q, 2.0), np_log_softmax(student, 2.0))[1]
    loss = kd(student, q, [0, 0], alpha=1.0, temperature=2.0, fixed_target=[True, False])
    assert loss.item() == pytest.approx((fixed_row + soft_row) / 2, rel=1e-12)


def test_fixed_rows_at_their_own_temperature_match_float64_numpy():
    # What student-train passes for KA-LSR with fixed_target_temperature: tau = 1 on fixed rows.
    rng = np.random.default_rng(6)
    student, target = rng.normal(size=(2, 8, 6)) * 3
    fixed = rng.random(8) < 0.5
    tau = np.where(fixed, 1.0, 4.0)
    loss = kd(student, target, alpha=1.0, temperature=tau, fixed_target=fixed)
    assert loss.item() == pytest.approx(np_kd_term(student, target, tau, fixed), rel=1e-12)


def test_float16_logits_of_60000_give_a_finite_float32_loss():
    student = torch.tensor([[60000.0, 0.0, -60000.0]], dtype=torch.float16)
    target = torch.tensor([[0.0, 60000.0, 0.0]], dtype=torch.float16)
    loss = kd(student, target, alpha=0.5, temperature=1.0)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    # CE ~ 0 (log-prob of the label is 0), KL ~ 60000 (all target mass on a class at -60000).
    assert loss.item() == pytest.approx(0.5 * 60000.0, rel=1e-6)


def test_float16_student_gets_a_float16_gradient():
    student = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float16, requires_grad=True)
    loss = kd(student, torch.zeros(1, 3, dtype=torch.float16), alpha=0.5, temperature=2.0)
    loss.backward()
    assert student.grad.dtype == torch.float16 and torch.isfinite(student.grad).all()

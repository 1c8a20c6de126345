"""Unit tests for the logit-KD family in stages.functional: dkd, ls and ttm (issue 13).

Each loss is checked against an independent float64 numpy version written here from the paper's
equations (probabilities, not log-space tricks), on golden hand cases computed with `math`, and
on the properties the papers imply. Nothing here calls the function under test to get a value.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.functional import (
    LOSSES,
    distillation_loss,
    dkd_loss,
    dkd_parts,
    dkd_warmup_weight,
    kd_loss,
    ls_loss,
    standardize_logits,
    ttm_loss,
)


def np_softmax(x: np.ndarray, temperature: float | np.ndarray = 1.0) -> np.ndarray:
    z = np.asarray(x, dtype=np.float64) / np.reshape(temperature, (-1, 1))
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_kl(q: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Row-wise KL(q || p) from probabilities (0·log 0 = 0)."""
    safe = np.where(q > 0, q, 1.0)
    return np.where(q > 0, q * np.log(safe / p), 0.0).sum(axis=1)


def np_ce(student: np.ndarray, labels: np.ndarray) -> float:
    p = np_softmax(student)
    return float(-np.mean(np.log(p[np.arange(len(labels)), labels])))


def np_dkd_parts(student, target, labels, tau) -> tuple[np.ndarray, np.ndarray]:
    """TCKD and NCKD per row, Zhao et al. 2022 Eq. (1)-(4), from probabilities as mdistiller does."""
    p, q = np_softmax(student, tau), np_softmax(target, tau)
    rows = np.arange(len(labels))
    pt, qt = p[rows, labels], q[rows, labels]
    tckd = qt * np.log(qt / pt) + (1 - qt) * np.log((1 - qt) / (1 - pt))
    keep = np.ones_like(p, dtype=bool)
    keep[rows, labels] = False
    p_hat = p[keep].reshape(len(p), -1) / (1 - pt)[:, None]
    q_hat = q[keep].reshape(len(q), -1) / (1 - qt)[:, None]
    return tckd, np_kl(q_hat, p_hat)


def np_zscore(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x - x.mean(axis=1, keepdims=True)) / (x.std(axis=1, ddof=1, keepdims=True) + 1e-7)


def _case(seed: int, batch: int = 12, classes: int = 7, scale: float = 3.0):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(batch, classes)) * scale
    target = rng.normal(size=(batch, classes)) * scale
    labels = rng.integers(0, classes, batch)
    tau = rng.uniform(0.5, 6.0, batch)
    fixed = rng.random(batch) < 0.4
    return student, target, labels, tau, fixed


def t64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x))


# --- dkd ---------------------------------------------------------------------------------------


def test_dkd_on_a_three_class_hand_case_is_tckd_plus_eight_nckd():
    # uniform student, teacher q = (0.5, 0.3, 0.2), label 0, tau 1:
    # TCKD = KL((.5, .5) || (1/3, 2/3)); NCKD = KL((.6, .4) || (.5, .5)).
    tckd = 0.5 * math.log(0.5 / (1 / 3)) + 0.5 * math.log(0.5 / (2 / 3))
    nckd = 0.6 * math.log(0.6 / 0.5) + 0.4 * math.log(0.4 / 0.5)
    student = torch.zeros(1, 3, dtype=torch.float64)
    target = torch.log(torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64))
    labels = torch.tensor([0])
    got = dkd_loss(student, target, labels, alpha=1.0, temperature=1.0, dkd_alpha=1.0, dkd_beta=8.0)
    assert got.item() == pytest.approx(tckd + 8 * nckd, rel=1e-12)
    parts = dkd_parts(student, target, labels, temperature=1.0)
    assert [v.item() for v in parts] == pytest.approx([tckd, nckd], rel=1e-12)


def test_dkd_matches_float64_numpy_with_a_per_sample_temperature_and_alpha_mixing_cross_entropy():
    student, target, labels, tau, _ = _case(1)
    tckd, nckd = np_dkd_parts(student, target, labels, tau)
    want = 0.3 * np_ce(student, labels) + 0.7 * np.mean(tau**2 * (1.5 * tckd + 4.0 * nckd))
    got = dkd_loss(
        t64(student), t64(target), t64(labels), alpha=0.7, temperature=t64(tau), dkd_alpha=1.5, dkd_beta=4.0
    )
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_tckd_plus_one_minus_the_teachers_target_mass_times_nckd_is_the_kd_kl():
    # Zhao et al. 2022 Eq. (5): KD = TCKD + (1 - q_y) NCKD, row by row, at any temperature.
    student, target, labels, tau, _ = _case(2)
    tckd, nckd = dkd_parts(t64(student), t64(target), t64(labels), temperature=t64(tau))
    q = np_softmax(target, tau)
    qt = q[np.arange(len(labels)), labels]
    kl = np_kl(q, np_softmax(student, tau))
    np.testing.assert_allclose((tckd + (1 - t64(qt)) * nckd).numpy(), kl, rtol=1e-10)


def test_dkd_parts_are_non_negative_and_zero_when_the_student_equals_the_teacher():
    student, target, labels, tau, _ = _case(3)
    tckd, nckd = dkd_parts(t64(student), t64(target), t64(labels), temperature=t64(tau))
    assert bool((tckd >= -1e-15).all()) and bool((nckd >= -1e-15).all())
    assert float(tckd.max()) > 0.01 and float(nckd.max()) > 0.01
    same = dkd_parts(t64(target) + 5.0, t64(target), t64(labels), temperature=t64(tau))
    for part in same:
        assert float(part.abs().max()) < 1e-12


def test_dkd_with_two_classes_has_no_non_target_term():
    student = torch.tensor([[2.0, -1.0], [0.0, 3.0]], dtype=torch.float64)
    target = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    _, nckd = dkd_parts(student, target, torch.tensor([0, 1]), temperature=2.0)
    assert nckd.tolist() == [0.0, 0.0]


def test_dkd_at_a_tiny_temperature_with_a_confident_teacher_is_finite_with_a_finite_gradient():
    student = torch.tensor([[30.0, -30.0, 0.0, 5.0]], requires_grad=True)
    target = torch.tensor([[-60.0, 60.0, 0.0, 0.0]])
    loss = dkd_loss(
        student, target, torch.tensor([1]), alpha=0.9, temperature=0.05, dkd_alpha=1.0, dkd_beta=8.0
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_no_gradient_of_dkd_reaches_the_targets():
    target = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    loss = dkd_loss(
        torch.randn(4, 5, dtype=torch.float64),
        target,
        torch.tensor([0, 1, 2, 3]),
        alpha=1.0,
        temperature=4.0,
        dkd_alpha=1.0,
        dkd_beta=8.0,
    )
    assert not loss.requires_grad


@pytest.mark.parametrize(
    ("epoch", "warmup", "weight"),
    [
        (0, 0, 1.0),  # no warm-up
        (5, 0, 1.0),
        (0, 20, 0.05),  # mdistiller's first epoch (its epoch 1): 1 / 20
        (9, 20, 0.5),
        (18, 20, 0.95),
        (19, 20, 1.0),  # full weight from the 20th epoch on
        (100, 20, 1.0),
        (0, 1, 1.0),
        (0, 3, 1 / 3),
        (1, 3, 2 / 3),
    ],
)
def test_the_dkd_warmup_weight_ramps_linearly_to_one_over_the_warmup_epochs(epoch, warmup, weight):
    assert dkd_warmup_weight(epoch, warmup) == pytest.approx(weight, abs=1e-15)


@pytest.mark.parametrize(("epoch", "warmup"), [(-1, 20), (0, -1)])
def test_the_dkd_warmup_weight_refuses_a_negative_epoch_or_warmup(epoch, warmup):
    with pytest.raises(ValueError, match="must be >= 0"):
        dkd_warmup_weight(epoch, warmup)


def test_scaling_both_dkd_weights_scales_the_dkd_term_alone_as_the_warmup_needs():
    # The student applies the warm-up by scaling dkd_alpha and dkd_beta: that must be w·DKD with
    # the CE term untouched (mdistiller: CE + min(epoch / warmup, 1)·DKD).
    student, target, labels, tau, _ = (t64(x) for x in _case(13))
    tckd, nckd = np_dkd_parts(student.numpy(), target.numpy(), labels.numpy(), tau.numpy())
    term = float(np.mean(tau.numpy() ** 2 * (1.5 * tckd + 6.0 * nckd)))
    ce = np_ce(student.numpy(), labels.numpy())
    w = 0.25
    got = dkd_loss(student, target, labels, alpha=0.6, temperature=tau, dkd_alpha=1.5 * w, dkd_beta=6.0 * w)
    assert got.item() == pytest.approx(0.4 * ce + 0.6 * w * term, rel=1e-12)


# --- ls ----------------------------------------------------------------------------------------


def test_standardized_logits_are_numpy_z_scores_with_the_bessel_corrected_std():
    student, *_ = _case(4)
    np.testing.assert_allclose(standardize_logits(t64(student)).numpy(), np_zscore(student), rtol=1e-12)
    # by hand: (1, 2, 3) has mean 2 and Bessel std 1
    row = standardize_logits(torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64))[0]
    assert row.tolist() == pytest.approx([-1 / (1 + 1e-7), 0.0, 1 / (1 + 1e-7)], rel=1e-12)


def test_ls_on_a_three_class_hand_case():
    # Z(t) for t = (1, 2, 3) is (-1, 0, 1); Z(s) for s = (0, 0, 1) is (-1, -1, 2)/sqrt(3); tau 1.
    q = [math.exp(v) / (math.exp(-1) + 1 + math.exp(1)) for v in (-1.0, 0.0, 1.0)]
    zs = [-1 / math.sqrt(3), -1 / math.sqrt(3), 2 / math.sqrt(3)]
    p = [math.exp(v) / sum(math.exp(w) for w in zs) for v in zs]
    want = sum(qi * math.log(qi / pi) for qi, pi in zip(q, p, strict=True))
    got = ls_loss(
        torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64),
        torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64),
        torch.tensor([2]),
        alpha=1.0,
        temperature=1.0,
        fixed_target=torch.tensor([False]),
    )
    assert got.item() == pytest.approx(want, rel=1e-6)  # 1e-7 added to each std


def test_ls_matches_float64_numpy_with_a_per_sample_temperature_and_fixed_rows_matched_as_kd():
    student, target, labels, tau, fixed = _case(5)
    soft = np_kl(np_softmax(np_zscore(target), tau), np_softmax(np_zscore(student), tau))
    as_kd = np_kl(np_softmax(target), np_softmax(student, tau))  # fixed rows: target as is
    want = 0.2 * np_ce(student, labels) + 0.8 * np.mean(tau**2 * np.where(fixed, as_kd, soft))
    got = ls_loss(
        t64(student), t64(target), t64(labels), alpha=0.8, temperature=t64(tau), fixed_target=t64(fixed)
    )
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_ls_kd_term_is_zero_for_a_student_that_is_a_positive_scale_and_shift_of_the_teacher():
    _, target, labels, tau, _ = _case(6)
    no_fixed = torch.zeros(len(labels), dtype=torch.bool)
    ls = ls_loss(
        t64(3 * target + 5), t64(target), t64(labels), alpha=1.0, temperature=t64(tau), fixed_target=no_fixed
    )
    kd = kd_loss(
        t64(3 * target + 5), t64(target), t64(labels), alpha=1.0, temperature=t64(tau), fixed_target=no_fixed
    )
    assert abs(ls.item()) < 1e-12 and kd.item() > 1.0  # plain KD asks for the teacher's scale too


def test_ls_cross_entropy_is_on_the_plain_student_logits():
    student, target, labels, tau, fixed = _case(7)
    got = ls_loss(
        t64(student), t64(target), t64(labels), alpha=0.0, temperature=t64(tau), fixed_target=t64(fixed)
    )
    assert got.item() == pytest.approx(np_ce(student, labels), rel=1e-12)


# --- ttm ---------------------------------------------------------------------------------------


def test_ttm_on_a_three_class_hand_case_transforms_the_teacher_only():
    # teacher p = (0.5, 0.3, 0.2) at tau 2 is p^(1/2) renormalised; the student stays uniform
    # (unsoftened); weight tau = 2, no tau^2.
    roots = [math.sqrt(v) for v in (0.5, 0.3, 0.2)]
    q = [r / sum(roots) for r in roots]
    want = 2.0 * sum(qi * math.log(3 * qi) for qi in q)
    got = ttm_loss(
        torch.zeros(1, 3, dtype=torch.float64),
        torch.log(torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)),
        torch.tensor([0]),
        alpha=1.0,
        temperature=2.0,
        fixed_target=torch.tensor([False]),
    )
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_ttm_matches_float64_numpy_with_a_per_sample_temperature_and_fixed_rows_as_they_are():
    student, target, labels, tau, fixed = _case(8)
    q = np.where(fixed[:, None], np_softmax(target), np_softmax(target, tau))
    want = 0.4 * np_ce(student, labels) + 0.6 * np.mean(tau * np_kl(q, np_softmax(student)))
    got = ttm_loss(
        t64(student), t64(target), t64(labels), alpha=0.6, temperature=t64(tau), fixed_target=t64(fixed)
    )
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_ttm_kd_term_is_zero_when_the_student_equals_the_transformed_teacher():
    _, target, labels, tau, _ = _case(9)
    no_fixed = torch.zeros(len(labels), dtype=torch.bool)
    transformed = target / tau[:, None] + 7.0
    got = ttm_loss(
        t64(transformed), t64(target), t64(labels), alpha=1.0, temperature=t64(tau), fixed_target=no_fixed
    )
    assert abs(got.item()) < 1e-12
    untransformed = ttm_loss(
        t64(target), t64(target), t64(labels), alpha=1.0, temperature=t64(tau), fixed_target=no_fixed
    )
    assert untransformed.item() > 0.01


def test_ttm_targets_are_precomputable_as_fixed_rows_of_the_transformed_teacher():
    student, target, labels, tau, _ = _case(10)
    precomputed = np.log(np_softmax(target, tau))  # what a teacher-only stage could store
    everything = torch.ones(len(labels), dtype=torch.bool)
    online = ttm_loss(
        t64(student), t64(target), t64(labels), alpha=0.9, temperature=t64(tau), fixed_target=~everything
    )
    stored = ttm_loss(
        t64(student), t64(precomputed), t64(labels), alpha=0.9, temperature=t64(tau), fixed_target=everything
    )
    assert stored.item() == pytest.approx(online.item(), rel=1e-12)


def test_ttm_at_alpha_0_9_and_tau_4_is_the_papers_ce_plus_36_kl_scaled_by_one_minus_alpha():
    # Zheng & Yang 2024 Eq. (19): beta = alpha tau / (1 - alpha) = 36 keeps KD's balance (their Fig. 1).
    student, target, labels, _, _ = _case(11)
    paper = np_ce(student, labels) + 36.0 * np.mean(np_kl(np_softmax(target, 4.0), np_softmax(student)))
    got = ttm_loss(
        t64(student),
        t64(target),
        t64(labels),
        alpha=0.9,
        temperature=4.0,
        fixed_target=torch.zeros(len(labels), dtype=torch.bool),
    )
    assert got.item() / (1 - 0.9) == pytest.approx(paper, rel=1e-10)


# --- all of them -------------------------------------------------------------------------------


def test_distillation_loss_kd_is_kd_loss_bit_for_bit_and_each_name_reaches_its_loss():
    student, target, labels, tau, fixed = (t64(x) for x in _case(12))
    fixed = fixed.bool()
    common = dict(alpha=0.9, temperature=tau)
    assert torch.equal(
        distillation_loss("kd", student, target, labels, fixed_target=fixed, **common),
        kd_loss(student, target, labels, fixed_target=fixed, **common),
    )
    no_fixed = torch.zeros_like(fixed)
    assert torch.equal(
        distillation_loss(
            "dkd", student, target, labels, fixed_target=no_fixed, dkd_alpha=2.0, dkd_beta=3.0, **common
        ),
        dkd_loss(student, target, labels, dkd_alpha=2.0, dkd_beta=3.0, **common),
    )
    assert torch.equal(
        distillation_loss("ls", student, target, labels, fixed_target=fixed, **common),
        ls_loss(student, target, labels, fixed_target=fixed, **common),
    )
    assert torch.equal(
        distillation_loss("ttm", student, target, labels, fixed_target=fixed, **common),
        ttm_loss(student, target, labels, fixed_target=fixed, **common),
    )
    with pytest.raises(ValueError, match="unknown loss 'dist'"):
        distillation_loss("dist", student, target, labels, fixed_target=fixed, **common)


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_is_float32_finite_and_trains_from_float16_logits(loss):
    student = torch.tensor(
        [[2.0, 0.0, -1.0], [60000.0, 0.0, -60000.0]], dtype=torch.float16, requires_grad=True
    )
    target = torch.tensor([[0.0, 1.0, 0.5], [0.0, 60000.0, 0.0]], dtype=torch.float16)
    value = distillation_loss(
        loss,
        student,
        target,
        torch.tensor([1, 0]),
        alpha=0.5,
        temperature=torch.tensor([2.0, 1.0]),
        fixed_target=torch.zeros(2, dtype=torch.bool),
    )
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value) and value.item() > 0
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("loss", LOSSES)
def test_the_gradient_of_every_loss_moves_the_student_towards_lower_loss(loss):
    torch.manual_seed(0)
    student = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    target, labels = torch.randn(8, 5, dtype=torch.float64) * 3, torch.randint(0, 5, (8,))
    kwargs = dict(alpha=0.9, temperature=torch.full((8,), 3.0, dtype=torch.float64))
    before = distillation_loss(
        loss, student, target, labels, fixed_target=torch.zeros(8, dtype=torch.bool), **kwargs
    )
    (grad,) = torch.autograd.grad(before, student)
    after = distillation_loss(
        loss,
        student.detach() - 0.1 * grad,
        target,
        labels,
        fixed_target=torch.zeros(8, dtype=torch.bool),
        **kwargs,
    )
    assert after.item() < before.item()
    assert F.cross_entropy(student, labels).item() > 0  # a real batch, not a solved one

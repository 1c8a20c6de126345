"""Unit tests for stages.topk: packing, the rest-bucket KD loss, KA and DTD statistics on top-k rows.

Golden values come from the dense logits in float64 numpy (`np_topk_kd`, written from the
module doc's definition, not by calling the functions under test) or from the dense functions
(`kd_loss`, `knowledge_adjustment`, `teacher_statistics`) where the top-k form must equal them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.adjust import knowledge_adjustment, topk_knowledge_adjustment
from stages.functional import InvalidLogitsError, kd_loss
from stages.temperature import flsw_weights, teacher_statistics, topk_teacher_statistics
from stages.topk import (
    student_log_probs_on_support,
    topk_compress,
    topk_kd_loss,
    topk_label_smoothing,
    topk_probability_shift,
    topk_target_log_probs,
    topk_teacher_is_wrong,
    topk_teacher_logits_estimate,
    topk_to_dense,
)


def _logits(rows: int, num_classes: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Rows like a trained teacher's: N(0, 2) noise plus a margin of 6 at one class."""
    gen = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(rows, num_classes, generator=gen, dtype=torch.float64)
    logits[torch.arange(rows), torch.randint(num_classes, (rows,), generator=gen)] += 6.0
    return logits.to(dtype)


def np_topk_kd(student: np.ndarray, teacher: np.ndarray, k: int, tau: float) -> float:
    """mean_b τ²·KL over K + 1 buckets, float64 numpy from the dense rows (module doc of stages.topk).

    Each side's bucket logits: its kept logits, and for the rest C − K copies of the uniform logit
    u = log(Σ_rest exp(x) / (C − K)), all divided by τ and normalised over the K + 1 buckets.
    """
    total = 0.0
    num_classes = teacher.shape[1]
    for s_row, t_row in zip(student.astype(np.float64), teacher.astype(np.float64), strict=True):
        support = np.argsort(-t_row, kind="stable")[:k]
        rest = np.setdiff1d(np.arange(num_classes), support)

        def buckets(row: np.ndarray, support=support, rest=rest) -> np.ndarray:
            kept = row[support] / tau
            if rest.size == 0:
                z = kept
            else:
                u = np.log(np.exp(row[rest]).sum() / rest.size)
                z = np.append(kept, np.log(rest.size) + u / tau)
            z = z - z.max()
            return z - np.log(np.exp(z).sum())

        log_q, log_p = buckets(t_row), buckets(s_row)
        total += tau**2 * float((np.exp(log_q) * (log_q - log_p)).sum())
    return total / teacher.shape[0]


def test_topk_compress_keeps_the_k_largest_logits_their_ids_and_the_full_row_log_sum_exp():
    logits = torch.tensor([[0.5, 3.0, -1.0, 3.0, 2.0]])
    values, indices, lse = topk_compress(logits, 3)
    assert values.tolist() == [[3.0, 3.0, 2.0]]
    assert indices.tolist() == [[1, 3, 4]]  # the tie 3.0 goes to the lower id first
    assert indices.dtype == torch.int16 and lse.dtype == torch.float32
    assert lse.item() == pytest.approx(math.log(sum(math.exp(x) for x in (0.5, 3.0, -1.0, 3.0, 2.0))))


def test_topk_indices_are_int32_beyond_32767_classes():
    assert topk_compress(torch.zeros(1, 32768), 2)[1].dtype == torch.int32
    assert topk_compress(torch.zeros(1, 32767), 2)[1].dtype == torch.int16


@pytest.mark.parametrize("k", [0, 6])
def test_topk_compress_refuses_k_outside_one_to_c(k):
    with pytest.raises(ValueError, match=r"k must lie in \[1, C = 5\]"):
        topk_compress(torch.zeros(2, 5), k)


def test_teacher_buckets_at_tau_one_are_the_dense_softmax_on_the_support_and_the_exact_rest():
    teacher = _logits(6, 50)
    values, indices, lse = topk_compress(teacher, 5)
    log_q = topk_target_log_probs(values, indices, lse, 50)
    dense = torch.log_softmax(teacher, dim=1)
    torch.testing.assert_close(log_q[:, :5], dense.gather(1, indices.long()), rtol=0, atol=1e-12)
    rest = 1.0 - dense.gather(1, indices.long()).exp().sum(dim=1)
    torch.testing.assert_close(log_q[:, 5].exp(), rest, rtol=1e-9, atol=0)


@pytest.mark.parametrize("tau", [1.0, 0.5, 4.0])
def test_a_student_equal_to_the_teacher_has_zero_kl_on_a_topk_target(tau):
    teacher = _logits(8, 100)
    values, indices, lse = topk_compress(teacher, 10)
    loss = topk_kd_loss(
        teacher.clone(), values, indices, lse, torch.zeros(8, dtype=torch.long), alpha=1.0, temperature=tau
    )
    assert abs(loss.item()) < 1e-12


@pytest.mark.parametrize("tau", [1.0, 4.0, 0.7])
@pytest.mark.parametrize("k", [1, 3, 20])
def test_topk_kd_loss_matches_an_independent_float64_numpy_version(k, tau):
    teacher, student = _logits(5, 20, seed=1), _logits(5, 20, seed=2)
    values, indices, lse = topk_compress(teacher, k)
    got = topk_kd_loss(
        student, values, indices, lse, torch.zeros(5, dtype=torch.long), alpha=1.0, temperature=tau
    )
    assert got.item() == pytest.approx(np_topk_kd(student.numpy(), teacher.numpy(), k, tau), rel=1e-10)


def test_topk_kd_loss_at_k_equal_c_is_the_dense_kd_loss_per_sample_temperatures_included():
    teacher, student = _logits(6, 10, seed=3), _logits(6, 10, seed=4)
    labels = torch.arange(6) % 10
    tau = torch.tensor([1.0, 2.0, 4.0, 0.5, 3.0, 1.5], dtype=torch.float64)
    values, indices, lse = topk_compress(teacher, 10)
    got = topk_kd_loss(student, values, indices, lse, labels, alpha=0.7, temperature=tau)
    want = kd_loss(
        student, teacher, labels, alpha=0.7, temperature=tau, fixed_target=torch.zeros(6, dtype=torch.bool)
    )
    assert got.item() == pytest.approx(want.item(), rel=1e-12)


def test_topk_kd_loss_in_float32_from_float16_values_stays_close_to_float64():
    teacher, student = _logits(64, 1000, seed=5), _logits(64, 1000, seed=6)
    values, indices, lse = topk_compress(teacher.half().float(), 10)
    got = topk_kd_loss(
        student.float(),
        values.half(),
        indices,
        lse,
        torch.zeros(64, dtype=torch.long),
        alpha=1.0,
        temperature=4.0,
    )
    want = np_topk_kd(student.numpy(), teacher.half().double().numpy(), 10, 4.0)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want, rel=1e-4)


def test_the_gradient_of_the_topk_loss_is_finite_and_zero_for_a_student_equal_to_the_teacher():
    teacher = _logits(4, 30, seed=7)
    values, indices, lse = topk_compress(teacher, 5)
    student = teacher.clone().requires_grad_(True)
    topk_kd_loss(
        student, values, indices, lse, torch.zeros(4, dtype=torch.long), alpha=1.0, temperature=3.0
    ).backward()
    assert student.grad is not None and student.grad.abs().max().item() < 1e-12


def test_a_row_whose_tail_has_no_mass_contributes_no_nan():
    teacher = torch.tensor([[100.0, 0.0, -200.0, -200.0]], dtype=torch.float32)  # tail mass 0 in float32
    values, indices, lse = topk_compress(teacher, 2)
    student = torch.tensor([[1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    loss = topk_kd_loss(student, values, indices, lse, torch.tensor([0]), alpha=1.0, temperature=2.0)
    loss.backward()
    assert math.isfinite(loss.item()) and bool(torch.isfinite(student.grad).all())


def test_topk_to_dense_is_exact_on_the_support_and_spreads_the_rest_evenly():
    teacher = _logits(3, 12, seed=8)
    values, indices, lse = topk_compress(teacher, 4)
    dense = torch.softmax(topk_to_dense(values, indices, lse, 12), dim=1)
    exact = torch.softmax(teacher, dim=1)
    torch.testing.assert_close(
        dense.gather(1, indices.long()), exact.gather(1, indices.long()), rtol=1e-12, atol=0
    )
    rest = dense.scatter(1, indices.long(), 0.0)
    nonzero = rest[rest > 0].reshape(3, 8)
    torch.testing.assert_close(nonzero, nonzero[:, :1].expand(-1, 8))


def test_a_label_outside_the_support_makes_the_teacher_wrong_and_ps_puts_it_on_top_exactly():
    teacher = torch.tensor([[5.0, 1.0, 4.0, 0.0, 2.0, -1.0]], dtype=torch.float64)
    labels = torch.tensor([3])  # outside the top 3 (ids 0, 2, 4)
    values, indices, lse = topk_compress(teacher, 3)
    assert topk_teacher_is_wrong(values, indices, labels).tolist() == [True]
    shifted, rewritten = topk_probability_shift(values, indices, labels)
    assert shifted.tolist() == [[3, 2, 4]] and rewritten.tolist() == [True]
    dense_ps = knowledge_adjustment(teacher, labels, "ps").target_logits  # class 0 now holds 0.0
    want = torch.log_softmax(dense_ps, dim=1)
    got = topk_target_log_probs(values, shifted, lse, 6)  # values and lse unchanged by PS
    torch.testing.assert_close(got[:, :3], want.gather(1, shifted.long()), rtol=0, atol=1e-12)
    rest = 1 - want.gather(1, shifted.long()).exp().sum(1)
    torch.testing.assert_close(got[:, 3].exp(), rest, rtol=1e-12, atol=0)


def test_ps_on_topk_rows_equals_dense_ps_when_the_label_is_kept_and_leaves_right_rows_alone():
    teacher = _logits(200, 10, seed=9)
    labels = torch.randint(10, (200,), generator=torch.Generator().manual_seed(1))
    values, indices, _lse = topk_compress(teacher, 10)  # every label is kept
    shifted, rewritten = topk_probability_shift(values, indices, labels)
    dense = knowledge_adjustment(teacher, labels, "ps")
    assert rewritten.tolist() == dense.rewritten.tolist() and 0 < int(rewritten.sum()) < 200
    rebuilt = torch.empty_like(teacher).scatter_(1, shifted.long(), values)
    assert torch.equal(rebuilt, dense.target_logits)


def test_lsr_on_topk_rows_keeps_the_label_and_equals_the_smoothed_one_hot_at_tau_one():
    teacher = torch.tensor([[5.0, 1.0, 4.0, 0.0, 2.0, -1.0]], dtype=torch.float64)
    labels = torch.tensor([3])
    values, indices, _lse = topk_compress(teacher, 3)
    new_values, new_indices, zero_lse, rewritten = topk_label_smoothing(values, indices, labels, 6, 0.1)
    assert rewritten.tolist() == [True] and zero_lse.tolist() == [True] and 3 in new_indices[0].tolist()
    log_q = topk_target_log_probs(new_values, new_indices, torch.zeros(1, dtype=torch.float64), 6)
    want = np.full(6, 0.1 / 6)
    want[3] += 0.9
    np.testing.assert_allclose(log_q[0, :3].exp().numpy(), want[new_indices[0].numpy()], rtol=1e-12)
    assert log_q[0, 3].exp().item() == pytest.approx(3 * 0.1 / 6, rel=1e-12)


def test_dtd_statistics_from_topk_rows_are_exact_for_max_prob_margin_and_omega():
    teacher = _logits(20, 100, seed=10)
    values, indices, lse = topk_compress(teacher, 5)
    got, want = topk_teacher_statistics(values, indices, lse, 100), teacher_statistics(teacher)
    for name in ("teacher_max_prob", "teacher_margin", "omega_teacher"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-15)
    assert bool(
        (got["teacher_entropy"] >= want["teacher_entropy"] - 1e-12).all()
    )  # uniform tail: upper bound
    assert bool((got["teacher_entropy"] <= math.log(100) + 1e-12).all())


def test_dtd_statistics_from_topk_rows_at_k_equal_c_are_the_dense_ones():
    teacher = _logits(20, 10, seed=11)
    got, want = topk_teacher_statistics(*topk_compress(teacher, 10), 10), teacher_statistics(teacher)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-12, atol=1e-12)


def test_the_student_buckets_at_tau_one_are_its_exact_softmax_on_the_support_and_rest():
    student = _logits(4, 30, seed=12)
    indices = topk_compress(_logits(4, 30, seed=13), 6)[1]
    log_p = student_log_probs_on_support(student, indices)
    dense = torch.log_softmax(student, dim=1)
    torch.testing.assert_close(log_p[:, :6], dense.gather(1, indices.long()), rtol=0, atol=1e-12)
    torch.testing.assert_close(log_p.exp().sum(1), torch.ones(4, dtype=torch.float64))


def _bucket_probs_of_dense(target: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(B, K + 1): softmax of dense target rows at `indices`, and the rest of each row's mass."""
    kept = torch.softmax(target.double(), dim=1).gather(1, indices.long())
    return torch.cat([kept, 1 - kept.sum(1, keepdim=True)], dim=1)


@pytest.mark.parametrize("method", ["ps", "lsr"])
def test_ka_on_float16_topk_rows_gives_the_dense_ka_targets_buckets(method):
    teacher = _logits(300, 10, seed=14, dtype=torch.float16)
    labels = torch.randint(10, (300,), generator=torch.Generator().manual_seed(2))
    labels[::2] = teacher[::2].float().argmax(1)  # half the rows right
    values, indices, lse = topk_compress(teacher, 3)
    got = topk_knowledge_adjustment(values, indices, lse, labels, method, 10, 0.1)
    dense = knowledge_adjustment(teacher, labels, method, 0.1)
    assert got.topk_values.dtype == torch.float16 and got.topk_indices.dtype == torch.int16
    assert got.rewritten.tolist() == dense.rewritten.tolist()
    assert got.fixed_target.tolist() == dense.fixed_target.tolist() and 30 < int(got.rewritten.sum()) < 270
    outside = ~(indices.long() == labels[:, None]).any(1)
    assert bool((got.rewritten & outside).any())  # labels that join the support
    buckets = topk_target_log_probs(got.topk_values, got.topk_indices, got.lse, 10).exp()
    torch.testing.assert_close(
        buckets.double(), _bucket_probs_of_dense(dense.target_logits, got.topk_indices), rtol=0, atol=1e-6
    )
    right = ~got.rewritten
    assert torch.equal(got.topk_values[right], values[right]) and torch.equal(got.lse[right], lse[right])


def test_ka_on_topk_rows_refuses_nan_values_and_class_ids_out_of_range():
    values, indices, lse = topk_compress(_logits(4, 6, seed=15), 2)
    labels = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(InvalidLogitsError, match="NaN or inf in 1 of 4 rows"):
        topk_knowledge_adjustment(
            values, indices, lse.index_fill(0, torch.tensor([2]), math.nan), labels, "ps", 6
        )
    with pytest.raises(InvalidLogitsError, match="topk_indices: a class id outside"):
        topk_knowledge_adjustment(values, indices + 6, lse, labels, "ps", 6)


def test_the_teacher_estimate_for_flsw_is_exact_when_the_tail_logits_are_equal():
    teacher = _logits(50, 12, seed=16)
    indices = topk_compress(teacher, 4)[1].long()
    kept = torch.zeros_like(teacher, dtype=torch.bool).scatter_(1, indices, True)
    floor = teacher.gather(1, indices).amin(1, keepdim=True) - 1.0  # (50, 1)
    teacher = torch.where(kept, teacher, floor)  # the 8 others share one logit, below the kept 4
    estimate = topk_teacher_logits_estimate(*topk_compress(teacher, 4), 12)
    torch.testing.assert_close(estimate, teacher, rtol=0, atol=1e-9)
    student = _logits(50, 12, seed=17)
    torch.testing.assert_close(flsw_weights(student, estimate, 2.0), flsw_weights(student, teacher, 2.0))


def test_the_teacher_estimate_for_flsw_stays_finite_and_below_the_kept_logits_when_no_tail_mass_is_left():
    # the tail mass rounds to 0 in float32: the tail logits are at most lse + log(eps / (C − K)), and v_K
    teacher = torch.tensor([[60.0, 59.0, -30.0, -35.0], [60.0, 40.0, -30.0, -35.0]], dtype=torch.float32)
    values, indices, lse = topk_compress(teacher, 2)
    assert topk_to_dense(values, indices, lse, 4)[0, 2].item() == torch.finfo(torch.float32).min
    estimate = topk_teacher_logits_estimate(values, indices, lse, 4)
    assert bool(torch.isfinite(estimate).all()) and torch.equal(estimate[:, :2], teacher[:, :2])
    assert torch.equal(estimate[:, 2], estimate[:, 3])
    bound = lse[0].item() + math.log(torch.finfo(torch.float32).eps / 2)  # 43.0
    assert estimate[0, 2].item() == pytest.approx(bound, abs=1e-4) and estimate[1, 2].item() == 40.0

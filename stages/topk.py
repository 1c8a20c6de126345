"""Top-k soft labels (DESIGN §9): packing, the KD loss over a top-k target, KA and DTD statistics.

A top-k row keeps, per view, the K largest teacher logits `topk_values` (sorted descending;
ties broken towards the lower class id), their class ids `topk_indices` and the log-sum-exp
`lse` of the full row at τ = 1. Every kept probability is then exact at τ = 1,
q_i = exp(v_i − lse), and so is the tail mass m = Σ_{j ∉ S} exp(t_j) = exp(lse) − Σ_i exp(v_i).

**The rest bucket.** The KD loss over a top-k target compares K + 1 buckets on both sides: the
K kept classes S and one "rest" bucket R holding the other C − K classes. The tail logits
themselves are unknown, so at τ ≠ 1 both sides treat R as C − K equal logits
u = log(m / (C − K)) that carry the row's exact τ = 1 tail mass m (the teacher's from its lse,
the student's from its own logits):

    bucket logits at τ:   (v_i − a) / τ  for i ∈ S,    log(C − K) + (u − a) / τ  for R,

with a the row max (for stability), and each side normalised over these K + 1 buckets
(log_softmax). Hence:

- at τ = 1 both sides are exact: the teacher's buckets are softmax(t) on S and 1 − Σ_S on R,
  the student's softmax(s) on S and its true rest mass; the loss is the KL of the two exact
  (K + 1)-bucket distributions;
- at any τ a student equal to the teacher gives KL = 0 (same buckets, same formula);
- at K = C there is no rest bucket and the loss is the dense KD loss exactly;
- at τ ≠ 1 the teacher's rest mass is an approximation of Σ_R exp(t_j/τ)/Z_τ: by concavity of
  x ↦ x^{1/τ} the uniform tail *over*-estimates it for τ > 1 and under-estimates it for τ < 1;
  the student side is normalised over the same support with the same rule, and its kept
  probabilities at τ ≠ 1 are relative to that approximate rest, not to softmax(s/τ).

Pure tensor functions (no I/O); math in float32, or float64 when an input is float64.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from stages.functional import compute_dtype

INT16_CLASSES = 32767  # the largest class count whose ids fit int16


def topk_index_dtype(num_classes: int) -> torch.dtype:
    """int16 for C <= 32767 (every class id fits), else int32."""
    return torch.int16 if num_classes <= INT16_CLASSES else torch.int32


def topk_compress(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pack dense logits into a top-k row (DESIGN §9).

    Ties are broken towards the lower class id (a stable descending sort), so the packing is the
    same on every device and a store written twice holds the same bytes.

    Args:
        logits: (..., C) floating, finite. k: 1 <= k <= C.
    Returns:
        `topk_values` (..., K), the input dtype, the K largest logits, sorted descending (exact
        copies); `topk_indices` (..., K) int16 (int32 if C > 32767), their class ids, distinct
        per row; `lse` (...,) float32 (float64 for float64 input), the full row's log-sum-exp.
    Raises:
        ValueError: k outside [1, C].
    """
    num_classes = logits.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"topk: k must lie in [1, C = {num_classes}], got {k}")
    order = torch.sort(logits, dim=-1, descending=True, stable=True)
    values = order.values[..., :k].contiguous()  # (..., K)
    indices = order.indices[..., :k].to(topk_index_dtype(num_classes))  # (..., K)
    lse = torch.logsumexp(logits.to(compute_dtype(logits)), dim=-1)  # (...,)
    return values, indices, lse


def tail_log_mass(topk_values: Tensor, lse: Tensor, num_classes: int) -> Tensor:
    """log m, m = exp(lse) − Σ_i exp(v_i): the log of the τ = 1 mass outside the kept classes.

    Args:
        topk_values: (B, K) float. lse: (B,) float. num_classes: C >= K.
    Returns:
        (B,) in the compute dtype; −inf where K = C or where rounding leaves no tail mass.
    """
    dtype = compute_dtype(topk_values, lse)
    values, lse = topk_values.to(dtype), lse.to(dtype)
    if topk_values.shape[-1] >= num_classes:
        return torch.full_like(lse, -math.inf)
    kept = torch.logsumexp(values, dim=-1)  # (B,) log Σ_S exp(v)
    return lse + torch.log(-torch.expm1((kept - lse).clamp_max(0.0)))  # log(1 − e^{kept−lse}) ≥ −inf


def _bucket_logits(kept: Tensor, tail: Tensor, tail_count: int, tau: Tensor) -> Tensor:
    """(B, K) kept logits + (B,) τ=1 tail log-mass -> (B, K [+1]) bucket logits at τ (module doc)."""
    top = kept.detach().amax(dim=1, keepdim=True)  # (B, 1) a, the row max
    if tail_count == 0:
        return (kept - top) / tau
    log_count = math.log(tail_count)
    uniform = tail.unsqueeze(1) - log_count  # (B, 1) u = log(m / (C − K)); −inf for no mass
    top = torch.maximum(top, uniform.detach())  # a student's tail may outweigh its kept logits
    return torch.cat([(kept - top) / tau, log_count + (uniform - top) / tau], dim=1)  # (B, K + 1)


def topk_target_log_probs(
    topk_values: Tensor,
    topk_indices: Tensor,
    lse: Tensor,
    num_classes: int,
    temperature: float | Tensor = 1.0,
) -> Tensor:
    """The teacher's (K + 1)-bucket log-distribution at τ (module doc: the rest bucket).

    Args:
        topk_values: (B, K) float, finite. topk_indices: (B, K) int (unused beyond its shape;
            kept for a symmetric signature). lse: (B,) float. num_classes: C >= K.
        temperature: a float or (B,) float, every τ > 0.
    Returns:
        (B, K + 1) (B, K when K = C) log-probabilities, rows sum to 1; column K is the rest
        bucket (−inf when it holds no mass). Exact at τ = 1: exp(v_i − lse) and 1 − Σ of them.
    """
    dtype = compute_dtype(topk_values, lse)
    values = topk_values.detach().to(dtype)
    tau = torch.as_tensor(temperature, dtype=dtype, device=values.device).detach().reshape(-1, 1)
    tail = tail_log_mass(values, lse.detach().to(dtype), num_classes)  # (B,)
    buckets = _bucket_logits(values, tail, num_classes - topk_indices.shape[1], tau)
    return F.log_softmax(buckets, dim=1)


def student_log_probs_on_support(
    student_logits: Tensor, topk_indices: Tensor, temperature: float | Tensor = 1.0
) -> Tensor:
    """The student's (K + 1)-bucket log-distribution over the teacher's support (module doc).

    Args:
        student_logits: (B, C) float. topk_indices: (B, K) int, distinct per row, in [0, C).
        temperature: a float or (B,) float, every τ > 0.
    Returns:
        (B, K + 1) (B, K when K = C) log-probabilities, differentiable in `student_logits`;
        exact at τ = 1: log softmax(s) at the kept ids and the log of the rest's mass.
    """
    dtype = compute_dtype(student_logits)
    student = student_logits.to(dtype)  # (B, C)
    index = topk_indices.long()  # (B, K)
    tau = torch.as_tensor(temperature, dtype=dtype, device=student.device).detach().reshape(-1, 1)
    kept = student.gather(1, index)  # (B, K)
    tail_count = student.shape[1] - index.shape[1]
    tail = student.scatter(1, index, -math.inf).logsumexp(dim=1) if tail_count else kept[:, 0]  # (B,)
    return F.log_softmax(_bucket_logits(kept, tail, tail_count, tau), dim=1)


def topk_kd_loss(
    student_logits: Tensor,
    topk_values: Tensor,
    topk_indices: Tensor,
    lse: Tensor,
    labels: Tensor,
    *,
    alpha: float,
    temperature: float | Tensor,
    fixed_target: Tensor | None = None,
) -> Tensor:
    """(1−α)·CE + α·mean_b τ_b²·KL(q_b ‖ p_b) over a top-k target (DESIGN §4, §9; arXiv:1503.02531).

    q_b and p_b are the teacher's and the student's (K + 1)-bucket distributions at τ_b
    (`topk_target_log_probs`, `student_log_probs_on_support`; module doc). On `fixed_target`
    rows (KA-LSR, `topk_label_smoothing`) the teacher buckets are taken at τ = 1 unsoftened, as
    `stages.functional.kd_loss` does; the caller picks those rows' τ_b for the student side and
    the weight. Terms with q = 0 contribute 0. With K = C this is `kd_loss` exactly (a
    permutation of the classes); a student equal to the teacher gives KL = 0 at every τ.

    Args:
        student_logits: (B, C) float, B >= 1. topk_values: (B, K) float, finite.
        topk_indices: (B, K) int, distinct per row, in [0, C). lse: (B,) float.
        labels: (B,) int64 in [0, C). alpha: in [0, 1].
        temperature: a float or (B,) float, every τ > 0. fixed_target: (B,) bool or None.
    Returns:
        Scalar tensor, nats, >= 0: float32, or float64 if an input is float64.
    """
    dtype = compute_dtype(student_logits, topk_values, lse)
    student = student_logits.to(dtype)  # (B, C)
    values, lse = topk_values.to(student.device, dtype), lse.to(student.device, dtype)
    tau = torch.as_tensor(temperature, dtype=dtype, device=student.device).detach().reshape(-1)  # (B|1,)
    log_q = topk_target_log_probs(values, topk_indices, lse, student.shape[1], tau)  # (B, K+1)
    if fixed_target is not None and bool(fixed_target.any()):
        plain = topk_target_log_probs(values, topk_indices, lse, student.shape[1], 1.0)
        log_q = torch.where(fixed_target.to(student.device).unsqueeze(1), plain, log_q)
    log_p = student_log_probs_on_support(student, topk_indices.to(student.device), tau)  # (B, K+1)
    has_mass = log_q > -math.inf
    terms = torch.where(has_mass, log_q.exp() * (log_q - log_p), torch.zeros_like(log_p))
    kl = terms.sum(dim=1)  # (B,) nats
    kd = (tau.expand_as(kl) ** 2 * kl).sum() / kl.shape[0]  # batchmean
    return (1 - alpha) * F.cross_entropy(student, labels) + alpha * kd


def topk_to_dense(topk_values: Tensor, topk_indices: Tensor, lse: Tensor, num_classes: int) -> Tensor:
    """Dense logits whose softmax is exact on the kept classes at τ = 1: the tail spread uniformly.

    Every class outside the support gets the uniform tail logit u = log(m / (C − K))
    (`tail_log_mass`), so softmax of the result is the teacher's exact distribution on S and
    puts the exact rest mass, evenly, on the others. A row with no tail mass gets the smallest
    finite value of the dtype (probability 0) there, never −inf. For consumers that need dense
    rows (FLSW's cosine: an approximation there, the tail logits being unknown).

    Args:
        topk_values: (B, K) float. topk_indices: (B, K) int, distinct per row. lse: (B,) float.
        num_classes: C >= K.
    Returns:
        (B, C) in the compute dtype.
    """
    dtype = compute_dtype(topk_values, lse)
    values = topk_values.to(dtype)
    tail = tail_log_mass(values, lse, num_classes)  # (B,)
    if num_classes > values.shape[1]:
        uniform = (tail - math.log(num_classes - values.shape[1])).clamp_min(torch.finfo(dtype).min)
    else:
        uniform = torch.zeros_like(tail)  # no class is left to fill
    dense = uniform.unsqueeze(1).expand(-1, num_classes).clone()  # (B, C)
    return dense.scatter_(1, topk_indices.long(), values)


def topk_teacher_logits_estimate(
    topk_values: Tensor, topk_indices: Tensor, lse: Tensor, num_classes: int
) -> Tensor:
    """Dense teacher logits estimated from top-k rows, for FLSW's cosine (DESIGN §4 "FLSW", §9).

    FLSW's ω = (1 − cos(s, t))^γ needs all C teacher logits, and the C − K outside the support
    are not stored: each is taken as u = log(m / (C − K)), the logit of an even tail with the
    row's exact τ = 1 tail mass m (`tail_log_mass`). This is exact when the tail logits are
    equal and otherwise an estimate (u >= their mean, by Jensen; u <= v_K, the smallest kept
    value). Where rounding leaves no tail mass, m is taken as the largest mass that rounds to
    none, eps·e^lse (a finite logit near the tail's true scale, unlike `topk_to_dense`, whose
    smallest finite value would dominate a cosine).

    Args:
        topk_values: (B, K) float, finite, sorted descending. topk_indices: (B, K) int,
            distinct per row, in [0, C). lse: (B,) float, finite. num_classes: C >= K.
    Returns:
        (B, C) in the compute dtype, finite; the kept classes hold `topk_values` exactly.
    """
    dtype = compute_dtype(topk_values, lse)
    values, lse = topk_values.to(dtype), lse.to(dtype)
    tail_count = num_classes - values.shape[1]
    if tail_count:
        tail = torch.maximum(
            tail_log_mass(values, lse, num_classes), lse + math.log(torch.finfo(dtype).eps)
        )  # (B,)
        uniform = torch.minimum(tail - math.log(tail_count), values[:, -1])  # (B,) u
    else:
        uniform = torch.zeros_like(lse)  # no class is left to fill
    dense = uniform.unsqueeze(1).expand(-1, num_classes).clone()  # (B, C)
    return dense.scatter_(1, topk_indices.long(), values)


@dataclasses.dataclass(frozen=True)
class TopkRows:
    """Top-k rows of a store, one per sample, on one device (DESIGN §9).

    Attributes:
        values: (N, K) float32, sorted descending. indices: (N, K) int64, distinct per row, in
            [0, C). lse: (N,) float32, the full row's log-sum-exp. num_classes: C.
    """

    values: Tensor
    indices: Tensor
    lse: Tensor
    num_classes: int

    def __getitem__(self, index: Tensor) -> TopkRows:
        """The rows at `index` (B,) int64: a TopkRows of B rows."""
        return TopkRows(self.values[index], self.indices[index], self.lse[index], self.num_classes)


def topk_teacher_is_wrong(topk_values: Tensor, topk_indices: Tensor, labels: Tensor) -> Tensor:
    """Where the teacher is wrong on a top-k row (DESIGN §4 "Teacher wrong").

    A label inside the support: wrong iff its logit is strictly below the row max (exact, as on
    dense rows). A label outside the support: its logit is at most the smallest kept value and
    the teacher is counted wrong (exact unless the row's maximum is shared by more than K
    classes, where the dense rule would call it right).

    Args:
        topk_values: (B, K) float. topk_indices: (B, K) int. labels: (B,) int.
    Returns:
        (B,) bool.
    """
    hit = topk_indices.long() == labels.long().unsqueeze(1)  # (B, K)
    label_value = torch.where(hit, topk_values, torch.full_like(topk_values, -math.inf)).amax(dim=1)
    return label_value < topk_values.amax(dim=1)


def topk_probability_shift(
    topk_values: Tensor, topk_indices: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor]:
    """KA-PS on top-k rows (DESIGN §4, arXiv:1911.07471 §3.1): the label takes the top logit.

    Only class ids move; `topk_values` and `lse` are unchanged, so the packed row stays sorted.
    On a wrong row the predicted class (the first kept, the row max) and the label exchange
    logits:
    - label inside the support: the two ids swap places;
    - label outside the support: the label joins the support at the predicted class's place,
      and the predicted class drops into the rest with the label's (unknown) logit t_y. The
      tail then holds the same multiset minus t_y plus t_y: its mass and the lse are unchanged,
      so the shifted row is exact at τ = 1 in the rest-bucket form (the dense PS target's
      buckets over the new support).

    Args:
        topk_values: (B, K) float, sorted descending. topk_indices: (B, K) int. labels: (B,) int.
    Returns:
        (shifted `topk_indices` (B, K), same dtype, distinct per row; rewritten (B,) bool).
    """
    wrong = topk_teacher_is_wrong(topk_values, topk_indices, labels)  # (B,)
    index = topk_indices.long()
    label = labels.long().unsqueeze(1)  # (B, 1)
    predicted = index[:, :1]  # (B, 1): values are sorted, column 0 is the row max
    swapped = torch.where(index == label, predicted, index)  # the label's place gets the prediction
    swapped[:, :1] = label  # the prediction's place gets the label
    shifted = torch.where(wrong.unsqueeze(1), swapped, index)
    return shifted.to(topk_indices.dtype), wrong


def topk_label_smoothing(
    topk_values: Tensor, topk_indices: Tensor, labels: Tensor, num_classes: int, epsilon: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """KA-LSR on top-k rows (DESIGN §4): wrong rows become q = (1−ε)·onehot(y) + ε/C, exactly.

    A wrong row's values become log q over its support and its lse 0 (q sums to 1); the label
    joins the support at the place of the smallest kept value when it is outside (every other
    class has the same mass ε/C, so any may leave). Such rows are fixed targets: the KD loss
    takes them at τ = 1 (`topk_kd_loss(fixed_target=...)`). Right rows are unchanged; their
    lse is returned as given by the caller (pass it through).

    Args:
        topk_values: (B, K) float. topk_indices: (B, K) int. labels: (B,) int in [0, C).
        num_classes: C. epsilon: in (0, 1).
    Returns:
        (values (B, K) compute dtype, indices (B, K) input dtype, lse_is_zero (B,) bool = the
        rewritten rows, whose lse must be set to 0, rewritten (B,) bool).
    """
    dtype = compute_dtype(topk_values)
    wrong = topk_teacher_is_wrong(topk_values, topk_indices, labels)  # (B,)
    index = topk_indices.long()
    label = labels.long().unsqueeze(1)
    present = (index == label).any(dim=1, keepdim=True)  # (B, 1)
    joined = index.clone()
    joined[:, -1:] = torch.where(present, index[:, -1:], label)
    smooth = torch.full(index.shape, math.log(epsilon / num_classes), dtype=dtype, device=index.device)
    smooth = torch.where(joined == label, math.log(1 - epsilon + epsilon / num_classes), smooth)
    values = torch.where(wrong.unsqueeze(1), smooth, topk_values.to(dtype))
    indices = torch.where(wrong.unsqueeze(1), joined, index).to(topk_indices.dtype)
    return values, indices, wrong.clone(), wrong

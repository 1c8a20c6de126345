"""Pure tensor math shared by the stages: input checks, teacher wrongness and the KD loss.

Everything here is tensor in, tensor out: no I/O, no global state. The formulas are those of
DESIGN §4 for *Preparing Lessons: Improve Knowledge Distillation with Better Supervision*
(Wen, Lai, Qian; arXiv:1911.07471) and Hinton et al.'s KD loss (arXiv:1503.02531).

Numerics: every function computes in float32 whatever the input dtype (float16 and bfloat16 are
upcast first), or in float64 when an input is float64, so tests can check golden values exactly.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from storage.errors import LessonsError

logger = logging.getLogger(__name__)


class InvalidLogitsError(LessonsError, ValueError):
    """Bad input to a KD/KA/DTD math function (shape, dtype, label range, NaN/inf).

    The message is one line that says what is wrong and how to fix it, so the CLI can show it
    as is, without a traceback.
    """


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the math runs in: float64 if any input is float64, else float32.

    Args:
        *tensors: any tensors (float16, bfloat16, float32, float64, ...).
    Returns:
        `torch.float64` or `torch.float32`.
    """
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_logits(logits: object, name: str = "logits") -> Tensor:
    """Check logits and bring them to the compute dtype (DESIGN §7: clear errors for NaN/inf logits).

    Args:
        logits: should be an (N, C) floating tensor, C >= 1, every value finite.
        name: what to call it in the error message.
    Returns:
        (N, C) the same values in float32, or float64 for float64 input (the input itself when
        already so; float16/bfloat16 upcast exactly).
    Raises:
        InvalidLogitsError: not a tensor, not floating, ndim != 2, C < 1, or NaN/inf values
            (the message gives how many rows and the first one).
    """
    if not isinstance(logits, Tensor):
        raise InvalidLogitsError(f"{name}: expected a torch.Tensor, got {type(logits).__name__}")
    if not logits.dtype.is_floating_point:
        raise InvalidLogitsError(
            f"{name}: expected a floating dtype, got {logits.dtype}; cast the logits to float32"
        )
    if logits.ndim != 2:
        raise InvalidLogitsError(
            f"{name}: expected shape (N, C), got {tuple(logits.shape)}; "
            "flatten views with reshape(-1, C) first"
        )
    if logits.shape[1] < 1:
        raise InvalidLogitsError(f"{name}: need at least one class (C >= 1), got shape {tuple(logits.shape)}")
    logits = logits.to(compute_dtype(logits))
    finite_rows = torch.isfinite(
        logits.abs().amax(dim=1)
    )  # (N,): a row holds NaN/inf iff its max |logit| does
    if not bool(finite_rows.all()):
        bad = (~finite_rows).nonzero(as_tuple=True)[0]
        raise InvalidLogitsError(
            f"{name}: NaN or inf in {bad.numel()} of {logits.shape[0]} rows (first at row "
            f"{int(bad[0])}); re-run the teacher dump, or store float32 if float16 overflowed"
        )
    return logits


def validate_logits_and_labels(logits: Tensor, labels: Tensor, *, name: str = "logits") -> Tensor:
    """Check a batch of logits and its labels before any KA/DTD/KD math (DESIGN §3, §7).

    Args:
        logits: (N, C) floating tensor, C >= 1, every value finite.
        labels: (N,) integer tensor (not bool) on the same device, values in [0, C).
        name: what to call `logits` in the error message (e.g. "teacher_logits").
    Returns:
        `check_logits(logits)`: (N, C) in the compute dtype, returned only if everything holds.
    Raises:
        InvalidLogitsError: a non-tensor, non-floating logits, non-integer labels, wrong ndim,
            N mismatch, C < 1, different devices, a label outside [0, C) (the message gives the
            first bad value and its row), or NaN/inf logits (the message gives how many rows).
    """
    checked = check_logits(logits, name)
    if not isinstance(labels, Tensor):
        raise InvalidLogitsError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise InvalidLogitsError(
            f"labels: expected an integer dtype, got {labels.dtype}; pass class ids as int64"
        )
    if labels.ndim != 1:
        raise InvalidLogitsError(f"labels: expected shape (N,), got {tuple(labels.shape)}")
    if labels.shape[0] != logits.shape[0]:
        raise InvalidLogitsError(
            f"labels: {labels.shape[0]} labels for {logits.shape[0]} rows of {name}; "
            "labels and logits must be in the same sample order"
        )
    if labels.device != logits.device:
        raise InvalidLogitsError(
            f"labels on {labels.device} but {name} on {logits.device}; move both to one device"
        )
    num_classes = logits.shape[1]
    out_of_range = (labels < 0) | (labels >= num_classes)
    if bool(out_of_range.any()):
        bad = out_of_range.nonzero(as_tuple=True)[0]
        first = int(bad[0])
        raise InvalidLogitsError(
            f"labels: value {int(labels[first])} at row {first} is outside [0, {num_classes}) "
            f"({bad.numel()} labels out of range); the labels do not match {name} with "
            f"C={num_classes} classes"
        )
    return checked


def teacher_is_wrong(teacher_logits: Tensor, labels: Tensor) -> Tensor:
    """Where the teacher's prediction disagrees with the label (DESIGN §4 "Teacher wrong").

    The teacher is wrong on a row when the label's logit is strictly below the row maximum; a
    tie that includes the label counts as correct. The comparison is exact in the storage dtype,
    so the answer is the same on every device (an exact float32 upcast changes nothing).

    Args:
        teacher_logits: (N, C) floating, finite.
        labels: (N,) integer in [0, C).
    Returns:
        (N,) bool, True where the teacher is wrong. Always False when C == 1.
    Raises:
        InvalidLogitsError: see `validate_logits_and_labels`.
    """
    logits = validate_logits_and_labels(teacher_logits, labels, name="teacher_logits")  # (N, C)
    label_logit = logits.gather(1, labels.long().unsqueeze(1)).squeeze(1)  # (N,)
    return label_logit < logits.amax(dim=1)


def kd_loss(
    student_logits: Tensor,
    target_logits: Tensor,
    labels: Tensor,
    *,
    alpha: float,
    temperature: float | Tensor,
    fixed_target: Tensor,
) -> Tensor:
    """(1−α)·CE + α·mean_b τ_b²·KL(q_b ‖ p_b)  (DESIGN §4; arXiv:1911.07471 §3; arXiv:1503.02531).

    p_b = softmax(s_b / τ_b) and q_b = softmax(t_b / τ_b), or q_b = softmax(t_b) unsoftened on
    `fixed_target` rows (KA-LSR stores a log-distribution there; the caller picks those rows' τ_b
    for the student side and the weight). Each side is shifted by its row max before dividing
    by τ, so a tiny τ gives −inf probabilities, never inf − inf = NaN. Math in float32 (float64
    if an input is float64); no gradient reaches the targets or τ. Inputs are checked where
    they enter (config and store load, DESIGN §7), not in every step.

    Args:
        student_logits: (B, C) float, B >= 1. target_logits: (B, C) float, finite.
        labels: (B,) int64 in [0, C). alpha: in [0, 1].
        temperature: a float or (B,) float tensor, every τ > 0. fixed_target: (B,) bool.
    Returns:
        Scalar tensor, nats, >= 0: float32, or float64 if an input is float64.
    """
    dtype = compute_dtype(student_logits, target_logits)  # float32|64
    student = student_logits.to(dtype)  # (B, C)
    target = target_logits.detach().to(device=student.device, dtype=dtype)  # (B, C)
    tau = torch.as_tensor(temperature, dtype=dtype, device=student.device).detach().reshape(-1, 1)  # (B|1, 1)
    log_p = F.log_softmax((student - student.detach().amax(1, keepdim=True)) / tau, dim=1)  # (B, C)
    soft = torch.where(fixed_target.unsqueeze(1), target, (target - target.amax(1, keepdim=True)) / tau)
    log_q = F.log_softmax(soft, dim=1)  # (B, C)
    kl = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(1)  # (B,) nats
    kd = (tau[:, 0] ** 2 * kl).sum() / kl.shape[0]  # batchmean
    return (1 - alpha) * F.cross_entropy(student, labels) + alpha * kd


def ensemble_logits(teacher_logits: Tensor, *, combine: str, temperature: float) -> Tensor:
    """One row of logits per sample for an ensemble of S teachers: τ·log q, q combined at τ.

    With p_s = softmax(z_s / τ) the distribution of teacher s at temperature τ:
      * `log_prob`: q ∝ exp(mean_s log p_s), the normalised geometric mean (a product of
        experts); it equals softmax(mean_s z_s / τ), so its stored row τ·log q is the mean
        logit row shifted per row, and softmax(stored / T) is the geometric-mean ensemble at
        every temperature T, not only at τ.
      * `prob`: q = mean_s p_s, the arithmetic mean (a uniform mixture). softmax(stored / T)
        is that mixture only at T = τ; at T ≠ τ it is the mixture at τ re-tempered (q^{τ/T},
        normalised). Build it at the temperature the students distil with.
    Hinton et al. 2015 (arXiv:1503.02531) §1 name both means of an ensemble's predictive
    distributions as soft targets; the arithmetic mean is the deep-ensemble prediction of
    Lakshminarayanan et al. 2017 (arXiv:1612.01474) §2.4. Each teacher row is shifted by its
    max before dividing by τ (no overflow at small τ); math in float32 (float64 for float64
    input); the mean over teachers is taken in the order given (callers that need bytes
    independent of the order sort the teachers first).

    Args:
        teacher_logits: (S, N, C) floating, finite, S >= 1, C >= 1: teacher s's logits of
            sample n (the same views of the same samples for every s).
        combine: `log_prob` or `prob`.
        temperature: τ, finite and > 0.
    Returns:
        (N, C) float32 (float64 for float64 input): τ·log q; every row is a valid logit row
        with max <= 0 (up to rounding) and Σ_c exp(row / τ) = 1, so softmax(row / τ) = q.
    Raises:
        InvalidLogitsError: not (S, N, C) floating with S, C >= 1, or NaN/inf logits.
        ValueError: an unknown `combine`, or τ not finite and > 0.
    """
    if combine not in ("log_prob", "prob"):
        raise ValueError(f"combine: must be log_prob or prob, got {combine!r}")
    temperature = float(temperature)
    if not 0.0 < temperature < float("inf"):
        raise ValueError(f"temperature: the ensemble's τ must be finite and > 0, got {temperature}")
    if not isinstance(teacher_logits, Tensor) or teacher_logits.ndim != 3 or teacher_logits.shape[0] < 1:
        raise InvalidLogitsError(
            f"teacher_logits: expected an (S, N, C) tensor with S >= 1 teachers, got "
            f"{tuple(getattr(teacher_logits, 'shape', ()))}; stack the teachers on axis 0"
        )
    teachers, samples, num_classes = teacher_logits.shape
    logits = check_logits(teacher_logits.reshape(teachers * samples, num_classes), "teacher_logits")
    logits = logits.reshape(teachers, samples, num_classes)  # (S, N, C) float32|64
    shifted = (logits - logits.amax(dim=2, keepdim=True)) / temperature  # (S, N, C), max 0
    log_p = F.log_softmax(shifted, dim=2)  # (S, N, C) log p_s
    if combine == "log_prob":
        log_q = F.log_softmax(log_p.mean(dim=0), dim=1)  # (N, C) normalised geometric mean
    else:
        log_q = torch.logsumexp(log_p, dim=0) - math.log(teachers)  # (N, C) log of the mean
    return temperature * log_q

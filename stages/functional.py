"""Pure tensor math shared by the stages: input checks, tempered log-softmax and the KD loss.

Everything here is tensor in, tensor out: no I/O, no global state. The formulas are those of
DESIGN §4 for *Preparing Lessons: Improve Knowledge Distillation with Better Supervision*
(Wen, Lai, Qian; arXiv:1911.07471) and Hinton et al.'s KD loss (arXiv:1503.02531).

Numerics: every function computes in float32 whatever the input dtype (float16 and bfloat16 are
upcast first), or in float64 when an input is float64, so tests can check golden values exactly.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "InvalidLogitsError",
    "check_logits",
    "compute_dtype",
    "kd_loss",
    "kd_loss_terms",
    "log_softmax_with_temperature",
    "teacher_is_wrong",
    "validate_logits_and_labels",
]


class InvalidLogitsError(ValueError):
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


def check_logits(logits: object, name: str = "logits") -> None:
    """Check logits that come without labels (DESIGN §7: clear errors for NaN/inf logits).

    Args:
        logits: should be an (N, C) floating tensor, C >= 1, every value finite.
        name: what to call it in the error message.
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
        raise InvalidLogitsError(f"{name}: need at least one class (C >= 1), got shape "
                                 f"{tuple(logits.shape)}")
    finite_rows = torch.isfinite(logits).all(dim=1)
    if not bool(finite_rows.all()):
        bad = (~finite_rows).nonzero(as_tuple=True)[0]
        raise InvalidLogitsError(
            f"{name}: NaN or inf in {bad.numel()} of {logits.shape[0]} rows (first at row "
            f"{int(bad[0])}); re-run the teacher dump, or store float32 if float16 overflowed"
        )


def validate_logits_and_labels(logits: Tensor, labels: Tensor, *, name: str = "logits") -> None:
    """Check a batch of logits and its labels before any KA/DTD/KD math (DESIGN §3, §7).

    Args:
        logits: (N, C) floating tensor, C >= 1, every value finite.
        labels: (N,) integer tensor (not bool) on the same device, values in [0, C).
        name: what to call `logits` in the error message (e.g. "teacher_logits").
    Returns:
        None; returns only if everything holds.
    Raises:
        InvalidLogitsError: a non-tensor, non-floating logits, non-integer labels, wrong ndim,
            N mismatch, C < 1, different devices, a label outside [0, C) (the message gives the
            first bad value and its row), or NaN/inf logits (the message gives how many rows).
    """
    check_logits(logits, name)
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


def teacher_is_wrong(teacher_logits: Tensor, labels: Tensor) -> Tensor:
    """Where the teacher's prediction disagrees with the label (DESIGN §4 "Teacher wrong").

    The teacher is wrong on a row when the label's logit is strictly below the row maximum; a
    tie that includes the label counts as correct. The comparison is exact in the storage dtype,
    so the answer is the same on every device.

    Args:
        teacher_logits: (N, C) floating, finite.
        labels: (N,) integer in [0, C).
    Returns:
        (N,) bool, True where the teacher is wrong. Always False when C == 1.
    Raises:
        InvalidLogitsError: see `validate_logits_and_labels`.
    """
    validate_logits_and_labels(teacher_logits, labels, name="teacher_logits")
    label_logit = teacher_logits.gather(1, labels.long().unsqueeze(1)).squeeze(1)
    return label_logit < teacher_logits.amax(dim=1)


def _temperature_column(temperature: float | Tensor, batch: int, dtype: torch.dtype,
                        device: torch.device, *, check: bool = True) -> Tensor:
    """Temperature as a detached (B, 1) or (1, 1) tensor in `dtype`; checks 0 < τ < inf."""
    if isinstance(temperature, Tensor):
        if temperature.ndim == 0:
            column = temperature.reshape(1, 1)
        elif temperature.ndim == 1 and temperature.shape[0] == batch:
            column = temperature.unsqueeze(1)
        else:
            raise InvalidLogitsError(
                f"temperature: expected a float, a 0-d tensor or shape ({batch},), got "
                f"{tuple(temperature.shape)}"
            )
        column = column.detach().to(device=device, dtype=dtype)
        if check and not bool(((column > 0) & torch.isfinite(column)).all()):
            raise ValueError(
                "temperature: every value must be finite and > 0; clamp DTD temperatures to "
                "[min_temperature, max_temperature] with min_temperature > 0"
            )
        return column
    temperature = float(temperature)
    if not (0.0 < temperature < float("inf")):
        raise ValueError(f"temperature: must be finite and > 0, got {temperature}")
    return torch.full((1, 1), temperature, dtype=dtype, device=device)


def _log_softmax_tempered(logits: Tensor, column: Tensor) -> Tensor:
    """log softmax(logits / τ) row-wise, shifting by the row max before dividing.

    Shifting first makes the row max exactly 0 after the division, so a tiny τ or a huge logit
    can only push other entries to -inf (probability 0), never produce inf - inf = NaN.
    """
    shifted = logits - logits.detach().amax(dim=1, keepdim=True)
    return F.log_softmax(shifted / column, dim=1)


def log_softmax_with_temperature(logits: Tensor, temperature: float | Tensor) -> Tensor:
    """Row-wise log p^τ = log softmax(logits / τ) (Hinton et al. 2015; DESIGN §4 notation).

    Computed with `log_softmax` (never log of softmax) after subtracting the row maximum, so it is
    stable at small τ and for logits up to the float32 range. Differentiable w.r.t. `logits`;
    the temperature is treated as a constant (detached).

    Args:
        logits: (B, C) floating, finite. float16/bfloat16/float32 are computed in float32,
            float64 in float64.
        temperature: a float, a 0-d tensor or a (B,) tensor (one τ per row); every τ > 0.
    Returns:
        (B, C) float32 (float64 for float64 input); every row's exp sums to 1; values <= 0.
    Raises:
        InvalidLogitsError: logits not (B, C) floating and finite, or temperature of wrong shape.
        ValueError: a temperature <= 0, NaN or inf.
    """
    check_logits(logits, "logits")
    dtype = compute_dtype(logits)
    column = _temperature_column(temperature, logits.shape[0], dtype, logits.device)
    return _log_softmax_tempered(logits.to(dtype), column)


def _kl_rows(log_q: Tensor, log_p: Tensor) -> Tensor:
    """Per-row KL(q ‖ p) = Σ_c q_c (log q_c − log p_c) in nats, with 0·log 0 = 0.

    Equivalent to `F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(1)` except that
    classes with q_c = 0 exactly (log q_c = -inf) contribute 0 instead of NaN.
    """
    q = log_q.exp()
    terms = q * (log_q - log_p)
    return torch.where(q > 0, terms, torch.zeros_like(terms)).sum(dim=1)


def kd_loss_terms(
    student_logits: Tensor,
    target_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float | Tensor,
    fixed_target: Tensor | None = None,
    temperature_squared_scaling: bool = True,
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """The two terms of the student loss, separately (DESIGN §4 "Student loss"; paper §3).

    ce = (1/B) Σ_b −log softmax(s_b)[y_b], and
    kd = (1/B) Σ_b w_b · KL(q_b ‖ p^{τ_b}(s_b)), with
    q_b = softmax(target_b / τ_b), or q_b = softmax(target_b) (not softened) where
    `fixed_target[b]` (KA-LSR rows store a fixed log-distribution), and w_b = τ_b² (Hinton's
    scaling) when `temperature_squared_scaling` else 1. KL is summed over classes and divided by
    the batch size B ("batchmean"), from log-softmax on both sides. The target side and the
    temperature are detached: no gradient reaches `target_logits` or a DTD temperature.

    Args:
        student_logits: (B, C) floating, finite, B >= 1; gradients flow into it.
        target_logits: (B, C) floating, finite; the (KA-adjusted) teacher logits, or for
            fixed rows log-probabilities.
        labels: (B,) integer in [0, C).
        temperature: float, 0-d tensor or (B,) tensor (per-sample DTD τ); every τ > 0.
        fixed_target: (B,) bool or None (= no fixed rows).
        temperature_squared_scaling: multiply each row's KL by τ_b².
        validate: check label range, finiteness and τ > 0 (each a host sync on GPU). Shapes are
            always checked; pass False only for inputs already validated upstream.
    Returns:
        (ce, kd): two scalar tensors, float32 (float64 if either logits input is float64), nats.
    Raises:
        InvalidLogitsError: shapes disagree, B == 0, bad labels, NaN/inf logits, fixed_target not
            (B,) bool, or temperature of the wrong shape.
        ValueError: a temperature <= 0, NaN or inf.
    """
    if validate:
        validate_logits_and_labels(student_logits, labels, name="student_logits")
        check_logits(target_logits, "target_logits")
    elif not (isinstance(student_logits, Tensor) and student_logits.ndim == 2):
        raise InvalidLogitsError("student_logits: expected a (B, C) tensor")
    if target_logits.shape != student_logits.shape:
        raise InvalidLogitsError(
            f"target_logits: shape {tuple(target_logits.shape)} differs from student_logits "
            f"{tuple(student_logits.shape)}; gather the targets by sample_index for this batch"
        )
    if labels.shape != student_logits.shape[:1]:
        raise InvalidLogitsError(
            f"labels: expected shape ({student_logits.shape[0]},), got {tuple(labels.shape)}"
        )
    batch = student_logits.shape[0]
    if batch == 0:
        raise InvalidLogitsError("student_logits: empty batch (B = 0); drop empty batches")
    dtype = compute_dtype(student_logits, target_logits)
    device = student_logits.device
    column = _temperature_column(temperature, batch, dtype, device, check=validate)

    student = student_logits.to(dtype)
    target = target_logits.detach().to(device=device, dtype=dtype)
    ce = F.cross_entropy(student, labels.long())

    log_p = _log_softmax_tempered(student, column)
    log_q = _log_softmax_tempered(target, column)
    if fixed_target is not None:
        if (not isinstance(fixed_target, Tensor) or fixed_target.dtype != torch.bool
                or fixed_target.shape != (batch,)):
            raise InvalidLogitsError(
                f"fixed_target: expected a ({batch},) bool tensor, got "
                f"{getattr(fixed_target, 'dtype', type(fixed_target).__name__)} "
                f"{tuple(getattr(fixed_target, 'shape', ()))}"
            )
        fixed = fixed_target.to(device).unsqueeze(1)
        log_q = torch.where(fixed, F.log_softmax(target, dim=1), log_q)

    kl = _kl_rows(log_q, log_p)
    if temperature_squared_scaling:
        kl = kl * column.squeeze(1).square()
    kd = kl.sum() / batch
    return ce, kd


def kd_loss(
    student_logits: Tensor,
    target_logits: Tensor,
    labels: Tensor,
    *,
    alpha: float,
    temperature: float | Tensor,
    fixed_target: Tensor | None = None,
    temperature_squared_scaling: bool = True,
    validate: bool = True,
) -> Tensor:
    """Student loss L = (1−α)·CE(s, y) + α·(1/B)·Σ_b w_b·KL(q_b ‖ p^{τ_b}(s_b)) (DESIGN §4).

    Hinton et al.'s KD loss with the per-sample temperatures of DTD (paper §3.2) and the fixed
    targets of KA-LSR (paper §3.1); see `kd_loss_terms` for the two terms. With α = 0 the result
    is exactly `F.cross_entropy(student_logits, labels)` (in the compute dtype).

    Args:
        student_logits: (B, C) floating, finite, B >= 1.
        target_logits: (B, C) floating, finite (detached inside).
        labels: (B,) integer in [0, C).
        alpha: weight of the KD term, in [0, 1].
        temperature: float, 0-d tensor or (B,) tensor; every τ > 0 (detached inside).
        fixed_target: (B,) bool or None; True rows use softmax(target) unsoftened.
        temperature_squared_scaling: weight each row's KL by τ_b² (default, Hinton) or by 1.
        validate: see `kd_loss_terms`.
    Returns:
        Scalar tensor, float32 (float64 if either logits input is float64), nats, >= 0.
    Raises:
        InvalidLogitsError: see `kd_loss_terms`.
        ValueError: alpha outside [0, 1], or a temperature <= 0, NaN or inf.
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: must lie in [0, 1], got {alpha}")
    ce, kd = kd_loss_terms(
        student_logits,
        target_logits,
        labels,
        temperature=temperature,
        fixed_target=fixed_target,
        temperature_squared_scaling=temperature_squared_scaling,
        validate=validate,
    )
    if alpha == 0.0:
        return ce
    if alpha == 1.0:
        return kd
    return (1.0 - alpha) * ce + alpha * kd

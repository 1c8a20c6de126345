"""Stage `temperature`: Dynamic Temperature Distillation (DTD) weights and statistics.

*Preparing Lessons: Improve Knowledge Distillation with Better Supervision* (Wen, Lai, Qian;
arXiv:1911.07471) §3.2, as DESIGN §4 specifies it: a per-sample temperature
τ_x = clamp(τ0 + (mean ω − ω_x)·β, τ_min, τ_max), where ω_x is large for samples the student
finds hard (so they get a lower τ and sharper targets). FLSW and CWSM depend on the student and
are computed online by the trainer; the teacher-only weight and the teacher statistics are
precomputed by this stage. The pure math sits at the top; `run()` below loops and writes.

All math runs in float32 (float64 for float64 input) whatever the storage dtype.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from stages.functional import InvalidLogitsError, check_logits, compute_dtype

logger = logging.getLogger(__name__)

#: Added to the max probability in the CWSM and teacher-only weights (DESIGN §4).
CONFIDENCE_EPS = 1e-3


def flsw_weights(student_logits: Tensor, teacher_logits: Tensor, gamma: float) -> Tensor:
    """FLSW weight ω_x = (1 − cos(s_x, t_x))^γ (paper §3.2, DESIGN §4 "FLSW").

    The cosine is that of the L2-normalised logit vectors. Each row is first divided by its
    largest absolute value (cosine is scale-invariant), so huge logits cannot overflow the norm;
    an all-zero row has cosine 0 with anything (ω = 1). 1 − cos is clamped to [0, 2] against
    rounding. Differentiable; the trainer normally calls it under `torch.no_grad()`.

    Args:
        student_logits: (B, C) floating, finite.
        teacher_logits: (B, C) floating, finite; the teacher's logits as dumped (before KA).
        gamma: exponent, finite and >= 0.
    Returns:
        (B,) float32 (float64 if an input is float64), values in [0, 2^γ].
    Raises:
        InvalidLogitsError: bad shapes, NaN/inf, or the two inputs differ in shape.
        ValueError: gamma negative, NaN or inf.
    """
    check_logits(student_logits, "student_logits")
    check_logits(teacher_logits, "teacher_logits")
    if student_logits.shape != teacher_logits.shape:
        raise InvalidLogitsError(
            f"teacher_logits: shape {tuple(teacher_logits.shape)} differs from student_logits "
            f"{tuple(student_logits.shape)}; gather the teacher rows for this batch"
        )
    gamma = float(gamma)
    if not 0.0 <= gamma < float("inf"):
        raise ValueError(f"gamma: the FLSW exponent must be finite and >= 0, got {gamma}")
    dtype = compute_dtype(student_logits, teacher_logits)

    def unit_rows(logits: Tensor) -> Tensor:
        logits = logits.to(dtype)
        scale = logits.detach().abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
        return F.normalize(logits / scale, p=2.0, dim=1, eps=1e-12)

    cosine = (unit_rows(student_logits) * unit_rows(teacher_logits.to(student_logits.device)))
    distance = (1.0 - cosine.sum(dim=1)).clamp(0.0, 2.0)
    return distance.pow(gamma)


def _inverse_confidence(logits: Tensor) -> Tensor:
    """1 / (max_c softmax(logits)_c + 1e-3), row-wise, from log_softmax."""
    dtype = compute_dtype(logits)
    max_prob = F.log_softmax(logits.to(dtype), dim=1).amax(dim=1).exp()
    return 1.0 / (max_prob + CONFIDENCE_EPS)


def cwsm_weights(student_logits: Tensor) -> Tensor:
    """CWSM weight ω_x = 1 / (max_c softmax(s_x)_c + 1e-3) (paper §3.2, DESIGN §4 "CWSM").

    Args:
        student_logits: (B, C) floating, finite.
    Returns:
        (B,) float32 (float64 for float64 input), in [1/1.001, 1/(1/C + 0.001)].
    Raises:
        InvalidLogitsError: bad shape or NaN/inf logits.
    """
    check_logits(student_logits, "student_logits")
    return _inverse_confidence(student_logits)


def teacher_only_weights(teacher_logits: Tensor) -> Tensor:
    """Teacher-only weight ω^T_x = 1 / (max_c softmax(t_x)_c + 1e-3) (DESIGN §4, DTD stage).

    CWSM with the teacher in place of the student, so it can be precomputed once per store and
    turned into a static temperature with `dynamic_temperature(..., reference_mean=mean ω^T)`.

    Args:
        teacher_logits: (N, C) floating, finite.
    Returns:
        (N,) float32 (float64 for float64 input), in [1/1.001, 1/(1/C + 0.001)].
    Raises:
        InvalidLogitsError: bad shape or NaN/inf logits.
    """
    check_logits(teacher_logits, "teacher_logits")
    return _inverse_confidence(teacher_logits)


def dynamic_temperature(
    weights: Tensor,
    *,
    base_temperature: float,
    beta: float,
    min_temperature: float,
    max_temperature: float,
    reference_mean: float | Tensor | None = None,
) -> Tensor:
    """Per-sample DTD temperature τ_x = clamp(τ0 + (mean − ω_x)·β, τ_min, τ_max) (DESIGN §4).

    `mean` is the batch mean of `weights` (online FLSW/CWSM) unless `reference_mean` is given
    (the dataset mean of ω^T for the static teacher-only variant). A weight above the mean (a
    harder sample) gets a lower temperature when β > 0.

    Args:
        weights: (B,) floating, finite; B may be 0 (returns an empty tensor).
        base_temperature: τ0, finite.
        beta: temperature change per unit of weight below the mean, finite.
        min_temperature: τ_min > 0.
        max_temperature: τ_max >= τ_min, finite.
        reference_mean: a float or 0-d tensor to use instead of the batch mean, or None.
    Returns:
        (B,) float32 (float64 for float64 weights), every value in [τ_min, τ_max] (the bounds
        as rounded to that dtype), so always > 0. Not detached.
    Raises:
        ValueError: not 0 < τ_min <= τ_max < inf, a non-finite τ0/β/reference_mean, or weights
            that are not a finite (B,) floating tensor.
    """
    if not 0.0 < min_temperature <= max_temperature < float("inf"):
        raise ValueError(
            "temperature: need 0 < min_temperature <= max_temperature < inf, got "
            f"min_temperature={min_temperature}, max_temperature={max_temperature}"
        )
    for key, value in (("base_temperature", base_temperature), ("beta", beta)):
        if not abs(float(value)) < float("inf"):
            raise ValueError(f"{key}: must be finite, got {value}")
    if not isinstance(weights, Tensor) or not weights.dtype.is_floating_point or weights.ndim != 1:
        raise ValueError(
            f"weights: expected a (B,) floating tensor, got "
            f"{getattr(weights, 'dtype', type(weights).__name__)} "
            f"{tuple(getattr(weights, 'shape', ()))}"
        )
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("weights: NaN or inf DTD weights; check the logits they came from")
    dtype = compute_dtype(weights)
    values = weights.to(dtype)
    if reference_mean is None:
        if values.numel() == 0:
            return values.clone()
        mean = values.mean()
    else:
        mean = torch.as_tensor(reference_mean).to(device=values.device, dtype=dtype)
        if mean.numel() != 1 or not bool(torch.isfinite(mean).all()):
            raise ValueError(f"reference_mean: expected one finite number, got {reference_mean}")
        mean = mean.reshape(())
    if not float(torch.tensor(min_temperature, dtype=dtype)) > 0.0:
        raise ValueError(
            f"min_temperature: {min_temperature} rounds to 0 in {dtype}; use a larger minimum"
        )
    temperature = float(base_temperature) + (mean - values) * float(beta)
    return temperature.clamp(float(min_temperature), float(max_temperature))


def teacher_statistics(teacher_logits: Tensor) -> dict[str, Tensor]:
    """Per-sample teacher statistics that DTD precomputes (DESIGN §4, paper §3.2).

    Args:
        teacher_logits: (N, C) floating, finite.
    Returns:
        A dict of (N,) tensors, float32 (float64 for float64 input):
        `teacher_max_prob`: max_c softmax(t)_c, in [1/C, 1];
        `teacher_entropy`: −Σ_c p_c log p_c in nats from log_softmax, in [0, log C]
            (a uniform row gives log C; 0·log 0 = 0);
        `teacher_margin`: top-1 minus top-2 probability, in [0, 1]; the max probability (1.0)
            when C == 1;
        `teacher_logit_norm`: L2 norm of the logit vector, >= 0 (computed after dividing the row
            by its max |value|, so huge logits do not overflow needlessly).
    Raises:
        InvalidLogitsError: bad shape or NaN/inf logits.
    """
    check_logits(teacher_logits, "teacher_logits")
    dtype = compute_dtype(teacher_logits)
    logits = teacher_logits.to(dtype)
    log_prob = F.log_softmax(logits, dim=1)
    prob = log_prob.exp()
    plogp = torch.where(prob > 0, prob * log_prob, torch.zeros_like(prob))
    entropy = (-plogp.sum(dim=1)).clamp_min(0.0) + 0.0  # + 0.0 turns -0.0 into 0.0
    if logits.shape[1] >= 2:
        top2 = prob.topk(2, dim=1).values
        max_prob = top2[:, 0]
        margin = top2[:, 0] - top2[:, 1]
    else:
        max_prob = prob[:, 0]
        margin = max_prob.clone()
    scale = logits.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    norm = torch.linalg.vector_norm(logits / scale, dim=1) * scale.squeeze(1)
    return {
        "teacher_max_prob": max_prob,
        "teacher_entropy": entropy,
        "teacher_margin": margin,
        "teacher_logit_norm": norm,
    }

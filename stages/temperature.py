"""Stage `temperature`: Dynamic Temperature Distillation (DTD) weights and statistics.

*Preparing Lessons: Improve Knowledge Distillation with Better Supervision* (Wen, Lai, Qian;
arXiv:1911.07471) §3.2, as DESIGN §4 specifies it: a per-sample temperature
τ_x = clamp(τ0 + (mean ω − ω_x)·β, τ_min, τ_max), where ω_x is large for samples the student
finds hard (so they get a lower τ and sharper targets). FLSW and CWSM depend on the student and
are computed online by the trainer; the teacher-only weight and the teacher statistics are
precomputed by this stage, into `dtd.zarr` (store kind `dtd`; an experiment's `dtd` key picks
the mode, README "One story for DTD's names"). The pure math sits at the top; `run()` below
loops and writes.

All math runs in float32 (float64 for float64 input) whatever the storage dtype.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from stages.functional import InvalidLogitsError, check_logits, compute_dtype
from stages.parallel import block_rows, dask_scheduler, one_torch_thread, prefixed
from stages.topk import topk_target_log_probs, topk_to_dense
from storage import ArraySpec, StoreWriter, atomic_write_json, checked_reads, open_store
from storage.atomic import ensure_parents
from storage.versions import library_versions

if TYPE_CHECKING:
    from pipeline.config import TemperatureConfig

logger = logging.getLogger(__name__)

#: Added to the max probability in the CWSM and teacher-only weights (DESIGN §4).
CONFIDENCE_EPS = 1e-3
#: What `teacher_statistics` returns per (view, sample), the float32 (V, N) arrays of `dtd.zarr`.
STATISTICS = ("teacher_max_prob", "teacher_entropy", "teacher_margin", "teacher_logit_norm", "omega_teacher")


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

    cosine = unit_rows(student_logits) * unit_rows(teacher_logits.to(student_logits.device))
    distance = (1.0 - cosine.sum(dim=1)).clamp(0.0, 2.0)
    return distance.pow(gamma)


def _inverse_confidence(log_prob: Tensor) -> Tensor:
    """ω = 1 / (max_c p_c + 1e-3) from (N, C) log-probabilities -> (N,): CWSM and teacher-only."""
    return 1.0 / (log_prob.amax(dim=1).exp() + CONFIDENCE_EPS)


def cwsm_weights(student_logits: Tensor) -> Tensor:
    """CWSM weight ω_x = 1 / (max_c softmax(s_x)_c + 1e-3) (paper §3.2, DESIGN §4 "CWSM").

    Args:
        student_logits: (B, C) floating, finite.
    Returns:
        (B,) float32 (float64 for float64 input), in [1/1.001, 1/(1/C + 0.001)].
    Raises:
        InvalidLogitsError: bad shape or NaN/inf logits.
    """
    return _inverse_confidence(F.log_softmax(check_logits(student_logits, "student_logits"), dim=1))


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
        raise ValueError(f"min_temperature: {min_temperature} rounds to 0 in {dtype}; use a larger minimum")
    temperature = float(base_temperature) + (mean - values) * float(beta)
    return temperature.clamp(float(min_temperature), float(max_temperature))


def teacher_statistics(teacher_logits: Tensor) -> dict[str, Tensor]:
    """Per-sample teacher statistics that DTD precomputes (DESIGN §4, paper §3.2): the stage's path.

    Args:
        teacher_logits: (N, C) floating, finite.
    Returns:
        A dict of (N,) tensors, float32 (float64 for float64 input), in `STATISTICS` order:
        `teacher_max_prob`: max_c softmax(t)_c, in [1/C, 1];
        `teacher_entropy`: −Σ_c p_c log p_c in nats from log_softmax, in [0, log C]
            (a uniform row gives log C; 0·log 0 = 0);
        `teacher_margin`: top-1 minus top-2 probability, in [0, 1]; the max probability (1.0)
            when C == 1;
        `teacher_logit_norm`: L2 norm of the logit vector, >= 0 (computed after dividing the row
            by its max |value|, so huge logits do not overflow needlessly);
        `omega_teacher`: the teacher-only weight ω^T = 1 / (max_c softmax(t)_c + 1e-3), CWSM with
            the teacher in place of the student, in [1/1.001, 1/(1/C + 0.001)]; the stage turns
            it into τ^T with `dynamic_temperature(..., reference_mean=mean ω^T)`.
    Raises:
        InvalidLogitsError: bad shape or NaN/inf logits.
    """
    logits = check_logits(teacher_logits, "teacher_logits")  # (N, C) float32|64
    log_prob = F.log_softmax(logits, dim=1)  # (N, C)
    omega = _inverse_confidence(log_prob)  # (N,) ω^T
    prob = log_prob.exp()
    plogp = torch.where(prob > 0, prob * log_prob, torch.zeros_like(prob))
    entropy = (-plogp.sum(dim=1)).clamp_min(0.0) + 0.0  # + 0.0 turns -0.0 into 0.0
    if logits.shape[1] >= 2:
        # The two largest probabilities (what topk(2) gives, ties included), several times faster;
        # `prob` is not used below, so its top entry is masked in place.
        max_prob, top_class = prob.max(dim=1)
        second = prob.scatter_(1, top_class.unsqueeze(1), float("-inf")).amax(dim=1)
        margin = max_prob - second
    else:
        max_prob = prob[:, 0]
        margin = max_prob.clone()
    norm = _row_norm(logits)
    return {
        "teacher_max_prob": max_prob,
        "teacher_entropy": entropy,
        "teacher_margin": margin,
        "teacher_logit_norm": norm,
        "omega_teacher": omega,
    }


def _row_norm(logits: Tensor) -> Tensor:
    """(B,) L2 norm of each (B, C) row, scaled by its max |logit| first so float16-range rows
    neither overflow nor underflow when squared."""
    scale = logits.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(logits.dtype).tiny)
    return torch.linalg.vector_norm(logits / scale, dim=1) * scale.squeeze(1)


def topk_teacher_statistics(
    topk_values: Tensor, topk_indices: Tensor, lse: Tensor, num_classes: int
) -> dict[str, Tensor]:
    """`teacher_statistics` from top-k rows (DESIGN §4 DTD, §9).

    Exact: `teacher_max_prob` = exp(v_1 − lse), `omega_teacher` = 1/(max prob + 1e-3) and
    `teacher_margin` = exp(v_1 − lse) − exp(v_2 − lse) (K >= 2; the max prob when C = 1; when
    K = 1 < C the second probability is bounded by min(exp(v_1 − lse), tail mass), which is
    used). Approximate, with the tail spread uniformly (`topk_to_dense`): `teacher_entropy`
    (an upper bound: the uniform tail has the largest entropy for its mass) and
    `teacher_logit_norm` (the tail logits are unknown; each is taken as the uniform one).

    Args:
        topk_values: (B, K) float, sorted descending. topk_indices: (B, K) int. lse: (B,) float.
        num_classes: C >= K.
    Returns:
        A dict of (B,) tensors in the compute dtype, the keys of `STATISTICS`.
    """
    dtype = compute_dtype(topk_values, lse)
    values, lse = topk_values.to(dtype), lse.to(dtype)
    log_q = topk_target_log_probs(values, topk_indices, lse, num_classes)  # (B, K[+1]) exact at τ=1
    q = log_q.exp()
    max_prob = q[:, 0]
    if values.shape[1] >= 2:
        margin = max_prob - q[:, 1]
    elif num_classes == 1:
        margin = max_prob.clone()
    else:
        margin = max_prob - torch.minimum(max_prob, q[:, -1])
    tail_count = num_classes - values.shape[1]
    plogp = torch.where(q > 0, q * log_q, torch.zeros_like(q))  # (B, K[+1])
    if tail_count:  # the rest bucket's mass spread over C − K classes adds m·log(C − K)
        plogp[:, -1] = plogp[:, -1] - q[:, -1] * math.log(tail_count)
    entropy = (-plogp.sum(dim=1)).clamp_min(0.0) + 0.0
    dense = topk_to_dense(values, topk_indices, lse, num_classes)  # (B, C)
    norm = _row_norm(dense)
    return {
        "teacher_max_prob": max_prob,
        "teacher_entropy": entropy,
        "teacher_margin": margin,
        "teacher_logit_norm": norm,
        "omega_teacher": 1.0 / (max_prob + CONFIDENCE_EPS),
    }


# ---------------------------------------------------------------------------------------------
# Stage `temperature`: I/O around the pure functions above.
# ---------------------------------------------------------------------------------------------

QUANTILES = (5, 25, 50, 75, 95)


def _statistics_block(logits: np.ndarray, block_info: Any = None) -> np.ndarray:
    """(V, n, C) logits -> (V, n, 5) float32: the STATISTICS, in order."""
    views, rows, num_classes = logits.shape
    flat = torch.from_numpy(np.ascontiguousarray(logits)).reshape(views * rows, num_classes)
    with one_torch_thread():
        try:
            stats = teacher_statistics(flat)
        except InvalidLogitsError as exc:  # say where in the store (rows are block-relative)
            raise InvalidLogitsError(f"{block_rows(block_info)}{exc}") from exc
        packed = torch.stack([stats[name].float() for name in STATISTICS], dim=1)  # (V·n, 5)
    return packed.reshape(views, rows, len(STATISTICS)).numpy()


def _topk_statistics_block(
    topk_values: np.ndarray,
    topk_indices: np.ndarray,
    lse: np.ndarray,
    *,
    num_classes: int,
    block_info: Any = None,
) -> np.ndarray:
    """(V, n, K) top-k rows and lse (V, n, 1) -> (V, n, 5) float32: `topk_teacher_statistics`."""
    views, rows, k = topk_values.shape
    values = torch.from_numpy(np.ascontiguousarray(topk_values)).reshape(views * rows, k).float()
    indices = torch.from_numpy(np.ascontiguousarray(topk_indices)).reshape(views * rows, k)
    row_lse = torch.from_numpy(np.ascontiguousarray(lse)).reshape(views * rows).float()
    finite = torch.isfinite(values).all(dim=1) & torch.isfinite(row_lse)  # (V·n,)
    if not bool(finite.all()):
        bad = (~finite).nonzero(as_tuple=True)[0]
        raise InvalidLogitsError(
            f"{block_rows(block_info)}topk_values/lse: NaN or inf in {bad.numel()} of "
            f"{finite.shape[0]} rows (first at row {int(bad[0])}); re-run the teacher dump"
        )
    with one_torch_thread():
        stats = topk_teacher_statistics(values, indices, row_lse, num_classes)
        packed = torch.stack([stats[name].float() for name in STATISTICS], dim=1)  # (V·n, 5)
    return packed.reshape(views, rows, len(STATISTICS)).numpy()


def _temperature_block(omega: np.ndarray, *, reference_mean: float, config: TemperatureConfig) -> np.ndarray:
    weights = torch.from_numpy(np.ascontiguousarray(omega)).reshape(-1)
    temperature = dynamic_temperature(
        weights,
        base_temperature=config.base_temperature,
        beta=config.beta,
        min_temperature=config.min_temperature,
        max_temperature=config.max_temperature,
        reference_mean=reference_mean,
    )
    return temperature.float().reshape(omega.shape).numpy()


def _summary_parts(values: Any, name: str) -> dict[str, Any]:
    """The dask reductions behind `_summary`: mean, std, min, max and quantiles (out of core)."""
    import dask.array as da

    flat = values.reshape(-1)
    return {
        f"{name}_mean": flat.mean(),
        f"{name}_std": flat.std(),
        f"{name}_min": flat.min(),
        f"{name}_max": flat.max(),
        f"{name}_quantiles": da.percentile(flat, list(QUANTILES), method="linear"),
    }


def _summary(parts: dict[str, Any], name: str) -> dict[str, Any]:
    """Mean, std, min, max and quantiles of `name` from the computed `_summary_parts`."""
    return {
        **{f"{name}_{key}": float(parts[f"{name}_{key}"]) for key in ("mean", "std", "min", "max")},
        **{f"{name}_p{q:02d}": float(v) for q, v in zip(QUANTILES, parts[f"{name}_quantiles"], strict=True)},
    }


def run(
    config: TemperatureConfig,
    *,
    logits_path: str | Path,
    out: str | Path,
    metrics_out: str | Path,
    histogram_out: str | Path,
    plot_out: str | Path | None = None,
    scheduler: str | None = None,
) -> dict[str, Any]:
    """Precompute the teacher-side DTD statistics of a logit store (arXiv:1911.07471 §3.2).

    Writes `dtd.zarr` with, per (view, sample), float32 (V, N): `teacher_max_prob`,
    `teacher_entropy` (nats), `teacher_margin`, `teacher_logit_norm`, `omega_teacher`
    (ω^T = 1/(max softmax(t) + 1e-3)) and `static_temperature`
    (τ^T = clamp(τ0 + (mean_dataset ω^T − ω^T)·β, τmin, τmax)); the dataset-level mean, std,
    min, max and quantiles of ω^T and τ^T in the attributes and in `metrics_out`; a histogram
    of τ^T as DVC plot data (`histogram_out`) and, if `plot_out` is given, as a PNG. dask runs
    on the `dask.distributed` cluster at `scheduler`, else at `config.scheduler`, else on local
    threads; the store is the same on each.

    The statistics describe the teacher as dumped (before KA), so one dtd.zarr serves every KA
    method. Chunks of N follow the input's; peak memory does not grow with N. From a top-k store
    (DESIGN §9) they come from `topk_teacher_statistics` (max prob, margin, ω^T and so τ^T exact;
    entropy and logit norm estimated with a uniform tail), same schema, attribute `source_layout`.

    Raises:
        StoreError: the input is missing, unfinished or not a logit store, or its arrays disagree
            with its attributes or its sample_index is not the canonical order.
        InvalidLogitsError: NaN/inf logits.
    """
    import dask.array as da

    # Unwritable metrics/plot paths fail before any work (not after the store is written).
    ensure_parents(metrics_out, histogram_out, *([plot_out] if plot_out is not None else []))
    source = open_store(logits_path, kind="logits", layouts=("dense", "topk"))
    source.check_layout()
    chunk_rows = source.chunk_rows
    topk = source.attrs.get("topk") if source.attrs.get("layout") == "topk" else None
    if topk is None:
        logits = da.from_zarr(source.array("logits"))
        packed = da.map_blocks(
            _statistics_block,
            logits,
            dtype=np.float32,
            chunks=(logits.chunks[0], logits.chunks[1], (len(STATISTICS),)),
        )
    else:  # DESIGN §9: the statistics of the top-k rows (`topk_teacher_statistics`)
        values = da.from_zarr(source.array("topk_values"))
        packed = da.map_blocks(
            _topk_statistics_block,
            values,
            da.from_zarr(source.array("topk_indices")).rechunk(values.chunks),
            da.from_zarr(source.array("lse")).rechunk(values.chunks[:2])[..., None],
            num_classes=int(source.attrs["num_classes"]),
            dtype=np.float32,
            chunks=(values.chunks[0], values.chunks[1], (len(STATISTICS),)),
        )
    views, samples = packed.shape[:2]
    attrs: dict[str, Any] = {
        key: source.attrs[key]
        for key in (
            "split",
            "dataset",
            "dataset_fingerprint",
            "num_classes",
            "num_views",
            "view_spec",
            "teacher",
        )
        if key in source.attrs
    }
    if topk is not None:  # entropy and logit norm are then estimates (`topk_teacher_statistics`)
        attrs["source_layout"] = {"layout": "topk", "topk": topk}
    attrs.update(
        source=source.as_source(),
        versions=library_versions(),
        temperature={
            "base_temperature": config.base_temperature,
            "beta": config.beta,
            "min_temperature": config.min_temperature,
            "max_temperature": config.max_temperature,
        },
    )
    arrays = {
        name: ArraySpec((views, samples), "float32", sample_axis=1)
        for name in (*STATISTICS, "static_temperature")
    }
    arrays["sample_index"] = ArraySpec((samples,), "int64")
    started = time.perf_counter()
    with (
        dask_scheduler(
            scheduler or config.scheduler, where="--scheduler" if scheduler else "temperature.scheduler"
        ) as dask_sched,
        StoreWriter(out, kind="dtd", arrays=arrays, attrs=attrs, chunk_rows=chunk_rows) as writer,
        prefixed(str(logits_path), InvalidLogitsError),
        checked_reads(logits_path),
    ):
        totals = writer.write_dask(
            {name: packed[..., k] for k, name in enumerate(STATISTICS)}
            | {"sample_index": da.from_array(source.read("sample_index"), chunks=(chunk_rows,))},
            scheduler=dask_sched,
            reductions={"omega_sum": packed[..., -1].sum(dtype=np.float64)},
        )
        omega_mean = float(totals["omega_sum"]) / (views * samples)
        omega = da.from_zarr(writer.partial_array("omega_teacher"))
        temperature = omega.map_blocks(
            _temperature_block, reference_mean=omega_mean, config=config, dtype=np.float32
        )
        counts, edges = da.histogram(
            temperature, bins=config.histogram_bins, range=(config.min_temperature, config.max_temperature)
        )
        # One pass writes τ^T and computes both summaries and the histogram (`temperature` holds
        # exactly the float32 values stored), instead of reading ω^T and τ^T back three times.
        parts = writer.write_dask(
            {"static_temperature": temperature},
            scheduler=dask_sched,
            reductions={
                **_summary_parts(omega, "omega_teacher"),
                **_summary_parts(temperature, "static_temperature"),
                "histogram": counts,
            },
        )
        summary = {**_summary(parts, "omega_teacher"), **_summary(parts, "static_temperature")}
        counts = parts["histogram"]
        writer.finalize(extra_attrs={"summary": summary})
    histogram = [
        {"temperature": round(float((lo + hi) / 2), 6), "count": int(c)}
        for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True)
    ]
    atomic_write_json(histogram_out, histogram)
    summary["elapsed_s"] = round(time.perf_counter() - started, 3)
    atomic_write_json(metrics_out, summary)
    if plot_out is not None:
        plot_temperature_histogram(histogram, plot_out, title=f"{attrs.get('teacher', {}).get('name', '')}")
    logger.info(
        "temperature: static tau mean %.3f, std %.3f, p5 %.3f, p95 %.3f",
        summary["static_temperature_mean"],
        summary["static_temperature_std"],
        summary["static_temperature_p05"],
        summary["static_temperature_p95"],
    )
    return summary


def plot_temperature_histogram(histogram: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Bar chart of the static temperature histogram, as a PNG (written atomically)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from storage.atomic import atomic_write_bytes

    centers = [row["temperature"] for row in histogram]
    width = (centers[1] - centers[0]) if len(centers) > 1 else 0.1
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(centers, [row["count"] for row in histogram], width=width * 0.9)
    ax.set_xlabel("static temperature τ^T")
    ax.set_ylabel("views")
    ax.set_title(f"DTD teacher-only temperature {title}".strip())
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())

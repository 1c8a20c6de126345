"""Stage `adjust`: Knowledge Adjustment (KA) of the teacher's soft labels.

*Preparing Lessons: Improve Knowledge Distillation with Better Supervision* (Wen, Lai, Qian;
arXiv:1911.07471) §3.1 and DESIGN §4: where the teacher is wrong, either swap its predicted and
true class logits (Probability Shift, PS) or replace its distribution by a smoothed one-hot
(Label Smoothing Regularization, LSR). The pure math sits at the top of this module; `run()` below
loops over store blocks and writes.

Every function here is row-wise: processing any split of the rows and concatenating gives the
same bits as processing the whole array.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from stages.functional import InvalidLogitsError, compute_dtype, teacher_is_wrong
from stages.parallel import block_rows, dask_scheduler, one_torch_thread, prefixed
from stages.topk import topk_label_smoothing, topk_probability_shift, topk_teacher_is_wrong
from stages.views import StoredViews, stored_views_of
from storage import ArraySpec, StoreError, StoreWriter, atomic_write_json, checked_reads, open_store
from storage.atomic import ensure_parents
from storage.versions import library_versions

if TYPE_CHECKING:
    from pipeline.config import AdjustConfig

logger = logging.getLogger(__name__)

AdjustMethod = Literal["ps", "lsr", "none"]


@dataclass(frozen=True, eq=False)
class AdjustedTargets:
    """Result of Knowledge Adjustment on one block of rows (DESIGN §3 `adjusted-<method>.zarr`).

    Attributes:
        target_logits: (N, C), dtype of the teacher logits; what the KD loss softens (or, where
            `fixed_target`, uses as a log-distribution unsoftened).
        fixed_target: (N,) bool; True where the target must not be softened by τ (LSR rows).
        rewritten: (N,) bool; True where KA changed the row (the teacher was wrong).
        wrong: (N,) bool; True where the teacher is wrong (`teacher_is_wrong`), whatever the
            method: equal to `rewritten` except for "none", which rewrites nothing.
    """

    target_logits: Tensor
    fixed_target: Tensor
    rewritten: Tensor
    wrong: Tensor

    def __post_init__(self) -> None:
        rows = self.target_logits.shape[:1]
        if any(mask.shape != rows for mask in (self.fixed_target, self.rewritten, self.wrong)):
            raise InvalidLogitsError(
                f"AdjustedTargets: fixed_target {tuple(self.fixed_target.shape)}, rewritten "
                f"{tuple(self.rewritten.shape)} and wrong {tuple(self.wrong.shape)} must all have "
                f"shape {tuple(rows)}"
            )


def knowledge_adjustment(
    teacher_logits: Tensor,
    labels: Tensor,
    method: AdjustMethod,
    epsilon: float = 0.1,
) -> AdjustedTargets:
    """Apply one KA method to a block of teacher logits (paper §3.1, DESIGN §4).

    The one implementation of KA: the stage runs it block by block, and `probability_shift` and
    `label_smoothing` are views of it. Float16/bfloat16 logits are checked, compared and shifted
    in float32 (an exact round trip; CPU half kernels are several times slower).

    PS: on a wrong row (label's logit strictly below the row max) the values at the teacher's
    predicted class (argmax, first max on ties) and at the label are exchanged, every other
    entry keeps its value; swapping the logits swaps the probabilities at every temperature, so
    the result is softened later by any τ. LSR: a wrong row becomes log((1−ε)·onehot(y) + ε/C),
    computed in float64 and cast once to the input dtype, a fixed distribution that the KD loss
    must not re-soften (`fixed_target`).

    Args:
        teacher_logits: (N, C) floating, finite (for a (V, N, C) store, flatten to (V·N, C) and
            repeat the labels V times).
        labels: (N,) integer in [0, C).
        method: "ps" (probability shift), "lsr" (label smoothing, fixed targets) or "none".
        epsilon: LSR smoothing mass in (0, 1); checked only for "lsr".
    Returns:
        AdjustedTargets; target_logits is a new tensor of the input's dtype whose right rows are
        bit-exact copies of the input. "none": a copy, nothing rewritten or fixed. "ps": every
        entry is a bit-exact copy of an entry of the same row, the label a mode of every row;
        fixed_target all False, rewritten = wrong. "lsr": fixed_target = rewritten = wrong.
    Raises:
        InvalidLogitsError: wrong shapes/dtypes, a label outside [0, C), NaN/inf logits.
        ValueError: an unknown method, or epsilon outside (0, 1) for "lsr".
    """
    if method not in ("ps", "lsr", "none"):
        raise ValueError(f"method: expected one of 'ps', 'lsr', 'none', got {method!r}")
    if method == "lsr":
        epsilon = _check_epsilon(epsilon)
    wrong = teacher_is_wrong(teacher_logits, labels)  # (N,) bool; validates
    nothing = torch.zeros_like(wrong)
    if method == "none":
        return AdjustedTargets(teacher_logits.clone(), nothing, nothing.clone(), wrong)
    rows = wrong.nonzero().squeeze(1)  # (W,) the wrong rows only
    label_col = labels[rows].long().unsqueeze(1)  # (W, 1)
    if method == "ps":
        shifted = teacher_logits.clone()
        block = teacher_logits[rows].to(compute_dtype(teacher_logits))  # (W, C) float32|64, exact
        pred_col = block.argmax(dim=1, keepdim=True)  # (W, 1) first max
        swapped = block.scatter(1, pred_col, block.gather(1, label_col))
        shifted[rows] = swapped.scatter_(1, label_col, block.gather(1, pred_col)).to(shifted.dtype)
        return AdjustedTargets(shifted, nothing, wrong, wrong.clone())
    num_classes = teacher_logits.shape[1]
    off_value = epsilon / num_classes
    on_value = (1.0 - epsilon) + off_value
    classes = torch.arange(num_classes, device=teacher_logits.device).unsqueeze(0)  # (1, C)
    at_label = classes == labels.long().unsqueeze(1)  # (N, C)
    smoothed = torch.where(
        at_label,
        torch.tensor(math.log(on_value), dtype=torch.float64, device=teacher_logits.device),
        torch.tensor(math.log(off_value), dtype=torch.float64, device=teacher_logits.device),
    ).to(teacher_logits.dtype)  # (N, C)
    target_logits = torch.where(wrong.unsqueeze(1), smoothed, teacher_logits)
    return AdjustedTargets(target_logits, wrong, wrong.clone(), wrong.clone())


@dataclass(frozen=True, eq=False)
class TopkAdjustedTargets:
    """KA on one block of top-k rows (DESIGN §9; the top-k form of `AdjustedTargets`).

    Attributes:
        topk_values: (N, K), the input's dtype; the kept target logits (log q on LSR rows).
        topk_indices: (N, K), the input's dtype; their class ids, distinct per row.
        lse: (N,) float32; the log-sum-exp of the full target row (the source's on right and
            PS rows, that of the stored LSR row — rounded log q on the support, ε/C on the rest —
            on LSR rows).
        fixed_target, rewritten, wrong: (N,) bool, as in `AdjustedTargets`.
    """

    topk_values: Tensor
    topk_indices: Tensor
    lse: Tensor
    fixed_target: Tensor
    rewritten: Tensor
    wrong: Tensor


def topk_knowledge_adjustment(
    topk_values: Tensor,
    topk_indices: Tensor,
    lse: Tensor,
    labels: Tensor,
    method: AdjustMethod,
    num_classes: int,
    epsilon: float = 0.1,
) -> TopkAdjustedTargets:
    """KA on top-k rows (paper §3.1, DESIGN §4, §9): `knowledge_adjustment` for a top-k store.

    PS moves class ids only (`stages.topk.topk_probability_shift`: values and lse unchanged,
    exact at τ = 1 in the rest-bucket form, the label joining the support when it was outside).
    LSR (`stages.topk.topk_label_smoothing`) writes log q on the support of a wrong row, rounded
    to the input dtype as the dense path rounds its rows, and the lse of that stored row with
    ε/C on each of the C − K classes outside it, so the rest bucket holds exactly the dense LSR
    row's tail mass; such rows are fixed targets. "none" copies.

    Args:
        topk_values: (N, K) floating, finite, sorted descending. topk_indices: (N, K) int,
            distinct per row, in [0, C). lse: (N,) floating, finite. labels: (N,) int in [0, C).
        method: ps | lsr | none. num_classes: C >= K. epsilon: LSR mass in (0, 1), for "lsr".
    Returns:
        TopkAdjustedTargets; right rows are bit-exact copies of the input.
    Raises:
        InvalidLogitsError: NaN/inf values or lse, class ids or labels outside [0, C).
        ValueError: an unknown method, or epsilon outside (0, 1) for "lsr".
    """
    if method not in ("ps", "lsr", "none"):
        raise ValueError(f"method: expected one of 'ps', 'lsr', 'none', got {method!r}")
    if method == "lsr":
        epsilon = _check_epsilon(epsilon)
    finite = torch.isfinite(topk_values.float()).all(dim=1) & torch.isfinite(lse.float())  # (N,)
    if not bool(finite.all()):
        bad = (~finite).nonzero(as_tuple=True)[0]
        raise InvalidLogitsError(
            f"topk_values/lse: NaN or inf in {bad.numel()} of {finite.shape[0]} rows (first at row "
            f"{int(bad[0])}); re-run the teacher dump, or store float32 if float16 overflowed"
        )
    for name, ids in (("topk_indices", topk_indices), ("labels", labels)):
        outside = (ids < 0) | (ids >= num_classes)
        if bool(outside.any()):
            row = int(outside.nonzero(as_tuple=True)[0][0])
            raise InvalidLogitsError(
                f"{name}: a class id outside [0, {num_classes}) at row {row}; rebuild the store"
            )
    wrong = topk_teacher_is_wrong(topk_values.float(), topk_indices, labels)  # (N,)
    nothing = torch.zeros_like(wrong)
    lse = lse.float()
    if method == "none":
        copies = (topk_values.clone(), topk_indices.clone(), lse.clone())
        return TopkAdjustedTargets(*copies, nothing, nothing.clone(), wrong)
    if method == "ps":
        shifted, rewritten = topk_probability_shift(topk_values, topk_indices, labels)
        return TopkAdjustedTargets(topk_values.clone(), shifted, lse.clone(), nothing, rewritten, wrong)
    smoothed, indices, _, rewritten = topk_label_smoothing(
        topk_values, topk_indices, labels, num_classes, epsilon
    )
    values = smoothed.to(topk_values.dtype)  # (N, K), rounded as the store holds it
    row_lse = torch.logsumexp(values.double(), dim=1)  # (N,) the support's share
    tail_count = num_classes - values.shape[1]
    if tail_count:  # each of the C − K classes outside the support holds ε/C, rounded likewise
        off = torch.tensor(math.log(epsilon / num_classes), dtype=torch.float64).to(values.dtype).double()
        row_lse = torch.logaddexp(row_lse, off + math.log(tail_count))
    target_lse = torch.where(rewritten, row_lse.float(), lse)
    return TopkAdjustedTargets(values, indices, target_lse, rewritten, rewritten.clone(), wrong)


def probability_shift(teacher_logits: Tensor, labels: Tensor) -> Tensor:
    """Swap the predicted and true class logits where the teacher is wrong (KA-PS, paper §3.1).

    `knowledge_adjustment(teacher_logits, labels, "ps").target_logits`, the stage's own path.

    Args:
        teacher_logits: (N, C) floating, finite; any float dtype (no arithmetic is done).
        labels: (N,) integer in [0, C).
    Returns:
        (N, C), same dtype and device; a new tensor. Every entry is a bit-exact copy of an input
        entry of the same row; rows where the teacher is right are unchanged; in every row the
        label's value equals the row max (the label is a mode) and the multiset of values is kept.
    Raises:
        InvalidLogitsError: wrong shapes/dtypes, a label outside [0, C), NaN/inf logits.
    """
    return knowledge_adjustment(teacher_logits, labels, "ps").target_logits


def _check_epsilon(epsilon: float) -> float:
    epsilon = float(epsilon)
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon: the LSR smoothing mass must lie in (0, 1), got {epsilon}")
    return epsilon


def label_smoothing(teacher_logits: Tensor, labels: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """Replace wrong teacher rows by log((1−ε)·onehot(y) + ε/C) (KA-LSR, paper §3.1).

    `knowledge_adjustment(teacher_logits, labels, "lsr", epsilon)`, the stage's own path. With a
    float16 input the stored log-probabilities are rounded to float16; the KD loss re-normalises
    them with log_softmax.

    Args:
        teacher_logits: (N, C) floating, finite.
        labels: (N,) integer in [0, C).
        epsilon: smoothing mass, in (0, 1).
    Returns:
        (target_logits, fixed_target):
        target_logits: (N, C), same dtype as `teacher_logits`; wrong rows hold the log of a
            distribution that sums to 1 (exactly, up to float64 rounding, before the cast) and
            peaks at the label; right rows are bit-exact copies of the input.
        fixed_target: (N,) bool, True exactly on the rewritten (wrong) rows.
    Raises:
        InvalidLogitsError: wrong shapes/dtypes, a label outside [0, C), NaN/inf logits.
        ValueError: epsilon outside (0, 1).
    """
    adjusted = knowledge_adjustment(teacher_logits, labels, "lsr", epsilon)
    return adjusted.target_logits, adjusted.fixed_target


# ---------------------------------------------------------------------------------------------
# Stage `adjust`: I/O around the pure functions above.
# ---------------------------------------------------------------------------------------------


def _adjust_block(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    method: AdjustMethod,
    epsilon: float,
    plain: int | None = None,
    block_info: Any = None,
) -> np.ndarray:
    """One (V, n, C) block, labels (1, n, 1) -> packed (V, n, C + 4) float32: target logits,
    fixed, rewritten, wrong, and whether the view's top class differs from that of view `plain`
    (the plain image; all 0 when None)."""
    views, rows, num_classes = logits.shape
    flat = torch.from_numpy(np.ascontiguousarray(logits)).reshape(views * rows, num_classes)  # (V·n, C)
    flat_labels = torch.from_numpy(np.ascontiguousarray(labels).reshape(-1)).repeat(views)  # (V·n,)
    with one_torch_thread():
        try:
            adjusted = knowledge_adjustment(flat, flat_labels, method, epsilon)
        except InvalidLogitsError as exc:  # say where in the store (rows below are block-relative)
            raise InvalidLogitsError(f"{block_rows(block_info)}{exc}") from exc
        top = flat.float().argmax(dim=1).reshape(views, rows)  # (V, n), first max on ties
        changed = top != top[plain] if plain is not None else torch.zeros_like(top, dtype=torch.bool)
        masks = [adjusted.fixed_target, adjusted.rewritten, adjusted.wrong, changed.reshape(-1)]
        packed = torch.cat([adjusted.target_logits.float(), *(m.float()[:, None] for m in masks)], dim=1)
    return packed.reshape(views, rows, num_classes + 4).numpy()


def _adjust_topk_block(
    topk_values: np.ndarray,
    topk_indices: np.ndarray,
    lse: np.ndarray,
    labels: np.ndarray,
    *,
    method: AdjustMethod,
    epsilon: float,
    num_classes: int,
    plain: int | None = None,
    block_info: Any = None,
) -> np.ndarray:
    """One (V, n, K) block of top-k rows, lse (V, n, 1), labels (1, n, 1) -> packed (V, n, 2K + 5)
    float32: target values, target class ids, target lse, then the four masks of `_adjust_block`
    (float32 holds float16 values and class ids below 2^24 exactly)."""
    views, rows, k = topk_values.shape

    def flat(array: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).reshape(views * rows, -1)  # (V·n, ·)

    flat_labels = torch.from_numpy(np.ascontiguousarray(labels).reshape(-1)).repeat(views)  # (V·n,)
    with one_torch_thread():
        try:
            adjusted = topk_knowledge_adjustment(
                flat(topk_values),
                flat(topk_indices),
                flat(lse)[:, 0],
                flat_labels,
                method,
                num_classes,
                epsilon,
            )
        except InvalidLogitsError as exc:  # say where in the store (rows below are block-relative)
            raise InvalidLogitsError(f"{block_rows(block_info)}{exc}") from exc
        top = flat(topk_indices)[:, 0].long().reshape(views, rows)  # (V, n): sorted rows, first max
        changed = top != top[plain] if plain is not None else torch.zeros_like(top, dtype=torch.bool)
        columns = [
            adjusted.topk_values.float(),
            adjusted.topk_indices.float(),
            *(
                m.float()[:, None]
                for m in (
                    adjusted.lse,
                    adjusted.fixed_target,
                    adjusted.rewritten,
                    adjusted.wrong,
                    changed.reshape(-1),
                )
            ),
        ]
        packed = torch.cat(columns, dim=1)  # (V·n, 2K + 5)
    return packed.reshape(views, rows, 2 * k + 5).numpy()


def plain_view_index(views: StoredViews) -> int | None:
    """The index of the plain image among a store's views: 0 for a V = 1 store of the plain image,
    its place in the enumerated set for `views: all`, None when the store does not hold it."""
    if views.mode == "none":
        return 0
    return views.augmentation.plain_view() if views.mode == "all" else None


def adjustment_summary(counts: dict[str, Any], total_views: int) -> dict[str, Any]:
    """Counts of a KA store: views rewritten, fraction, per-class rewrites, teacher accuracy.

    Args:
        counts: {"rewritten": int, "wrong": int (views where the teacher is wrong),
            "per_class": (C,) rewrites by true class}. total_views: V·N.
    """
    return {
        "rewritten_views": int(counts["rewritten"]),
        "rewritten_fraction": float(counts["rewritten"]) / total_views,
        "teacher_train_accuracy": 1.0 - float(counts["wrong"]) / total_views,
        "rewrites_per_class": [round(c) for c in np.asarray(counts["per_class"])],
    }


def run(
    config: AdjustConfig,
    *,
    method: AdjustMethod,
    logits_path: str | Path,
    out: str | Path,
    metrics_out: str | Path,
    scheduler: str | None = None,
) -> dict[str, Any]:
    """Rewrite the wrong teacher distributions of a logit store (KA, arXiv:1911.07471 §3.1).

    Reads `logits.zarr` chunk by chunk as a dask array (output chunks = input chunks, so peak
    memory does not grow with N) and writes `adjusted-<method>.zarr`: `target_logits`
    (V, N, C, the input's dtype), `fixed_target` (V, N) bool, `rewritten` (V, N) bool, with the
    input's fingerprint, teacher and counts in the attributes, and the counts as JSON metrics
    (numbers only; the method, epsilon, teacher and per-class counts in `<stem>-config.json`).
    From a top-k store (DESIGN §9) the targets stay top-k (`topk_knowledge_adjustment`):
    `target_topk_values`/`target_topk_indices` (V, N, K) in the input's dtypes and `target_lse`
    (V, N) float32 in place of `target_logits`, attributes `layout: topk`, `topk: K`; the same
    masks and metrics (a label outside the support counts as the teacher being wrong).

    Args:
        config: AdjustConfig (epsilon). method: ps | lsr | none.
        scheduler: a `dask.distributed` address, else `config.scheduler`; None for both: dask's
            local threaded scheduler.
    Raises:
        StoreError: the input is missing, unfinished, or not a train-split logit store, or its
            arrays disagree with its attributes or its sample_index is not the canonical order.
        InvalidLogitsError: NaN/inf logits or labels outside [0, C) in the input.
    """
    import dask.array as da

    if method not in ("ps", "lsr", "none"):
        raise ValueError(f"adjust: unknown method {method!r}; use ps, lsr or none")
    ensure_parents(metrics_out)  # an unwritable metrics path fails before any work
    source = open_store(logits_path, kind="logits", layouts=("dense", "topk"))
    source.check_layout()
    if source.attrs.get("split") != "train":
        raise StoreError(
            f"{logits_path}: a {source.attrs.get('split')!r}-split logit store; KA rewrites "
            "the train split's targets: pass the teacher's logits.zarr"
        )
    topk = source.attrs.get("topk") if source.attrs.get("layout") == "topk" else None
    rows_name = "logits" if topk is None else "topk_values"
    views, samples = source.array(rows_name).shape[:2]
    num_classes = int(source.attrs["num_classes"])
    labels = source.read("labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise InvalidLogitsError(
            f"{logits_path}: labels outside [0, {num_classes}) in the store; "
            "rebuild it from the prepared dataset"
        )
    chunk_rows = source.chunk_rows
    labels_da = da.from_array(labels, chunks=(chunk_rows,))
    plain = plain_view_index(stored_views_of(source))
    dtype = str(source.array(rows_name).dtype)
    settings = dict(method=method, epsilon=config.epsilon, plain=plain if views > 1 else None)
    if topk is None:  # dense rows: target_logits (V, N, C)
        logits = da.from_zarr(source.array("logits"))
        width = num_classes
        packed = da.map_blocks(
            _adjust_block,
            logits,
            labels_da[None, :, None],
            **settings,
            dtype=np.float32,
            chunks=(logits.chunks[0], logits.chunks[1], (width + 4,)),
        )
        targets: dict[str, tuple[Any, tuple[int, ...], str]] = {
            "target_logits": (packed[..., :width], (views, samples, num_classes), dtype)
        }
    else:  # top-k rows (DESIGN §9): target_topk_values/target_topk_indices (V, N, K), target_lse (V, N)
        values = da.from_zarr(source.array("topk_values"))
        indices = da.from_zarr(source.array("topk_indices")).rechunk(values.chunks)
        lse = da.from_zarr(source.array("lse")).rechunk(values.chunks[:2])
        width = 2 * topk + 1
        packed = da.map_blocks(
            _adjust_topk_block,
            values,
            indices,
            lse[..., None],
            labels_da[None, :, None],
            **settings,
            num_classes=num_classes,
            dtype=np.float32,
            chunks=(values.chunks[0], values.chunks[1], (width + 4,)),
        )
        index_dtype = str(source.array("topk_indices").dtype)
        targets = {
            "target_topk_values": (packed[..., :topk], (views, samples, topk), dtype),
            "target_topk_indices": (packed[..., topk : 2 * topk], (views, samples, topk), index_dtype),
            "target_lse": (packed[..., 2 * topk], (views, samples), "float32"),
        }
    attrs: dict[str, Any] = {
        key: source.attrs[key]
        for key in (
            "layout",
            "topk",
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
    attrs.update(
        method=method,
        epsilon=config.epsilon if method == "lsr" else None,
        source=source.as_source(),
        versions=library_versions(),
    )
    arrays = {
        "sample_index": ArraySpec((samples,), "int64"),
        **{name: ArraySpec(shape, kind, sample_axis=1) for name, (_, shape, kind) in targets.items()},
        "fixed_target": ArraySpec((views, samples), "bool", sample_axis=1),
        "rewritten": ArraySpec((views, samples), "bool", sample_axis=1),
    }
    started = time.perf_counter()
    rewritten = packed[..., width + 1] > 0.5
    wrong = packed[..., width + 2] > 0.5  # (V, N)
    view_reductions = {}
    if plain is not None and views > 1:  # the plain image is one of the stored views (views: all)
        view_reductions = {
            "right_plain_wrong_some_view": (~wrong[plain] & wrong.any(axis=0)).sum(),
            "top_class_changed": (packed[..., width + 3] > 0.5).sum(),
        }
    with (
        dask_scheduler(
            scheduler or config.scheduler, where="--scheduler" if scheduler else "adjust.scheduler"
        ) as dask_sched,
        StoreWriter(out, kind="adjusted", arrays=arrays, attrs=attrs, chunk_rows=chunk_rows) as writer,
        prefixed(str(logits_path), InvalidLogitsError),
        checked_reads(logits_path),
    ):
        counts = writer.write_dask(
            {
                "sample_index": da.from_array(source.read("sample_index"), chunks=(chunk_rows,)),
                **{name: value for name, (value, _, _) in targets.items()},
                "fixed_target": packed[..., width] > 0.5,
                "rewritten": rewritten,
            },
            scheduler=dask_sched,
            reductions={
                "wrong": wrong.sum(),
                **view_reductions,
                "per_class": da.bincount(labels_da, weights=rewritten.sum(axis=0), minlength=num_classes),
                "rewritten": rewritten.sum(),
            },
        )
        summary = adjustment_summary(counts, views * samples)
        if view_reductions:
            summary["right_plain_wrong_some_view"] = float(counts["right_plain_wrong_some_view"]) / samples
            summary["top_class_changed_fraction"] = float(counts["top_class_changed"]) / (views * samples)
        writer.finalize(extra_attrs=summary)
    summary.update(method=method, elapsed_s=round(time.perf_counter() - started, 3))
    # Numbers only in the metrics file (dvc metrics/exp show); the method, its epsilon, the teacher
    # and the per-class list go to `<stem>-config.json` beside it.
    record_keys = ("method", "rewrites_per_class")
    metrics_out = Path(metrics_out)
    atomic_write_json(
        metrics_out.with_name(f"{metrics_out.stem}-config.json"),
        {
            **{key: summary[key] for key in record_keys},
            "epsilon": attrs["epsilon"],
            "teacher": attrs.get("teacher"),
            "logits": str(logits_path),
        },
    )
    atomic_write_json(metrics_out, {key: value for key, value in summary.items() if key not in record_keys})
    logger.info(
        "adjust %s: rewrote %d of %d views (%.2f%%), teacher train accuracy %.4f",
        method,
        summary["rewritten_views"],
        views * samples,
        100 * summary["rewritten_fraction"],
        summary["teacher_train_accuracy"],
    )
    return summary

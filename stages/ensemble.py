"""Stage `ensemble`: several teachers' logit stores of one dataset and views become one logit store.

`stores/<ensemble>/logits.zarr` and `test-logits.zarr` hold, per (view, sample), τ·log q with q
the teachers' distributions at τ combined by `ensemble.ensembles.<name>.combine` (the pure math:
`stages.functional.ensemble_logits`). They have the schema `teacher_dump` writes (`logits`,
`labels`, `sample_index`, `view_params`), so students, `adjust` and `temperature` read them like
any teacher's. The `teacher` attribute names no checkpoint: `arch` is `ensemble`, `members` lists
each teacher (name, arch, checkpoint sha256) and `checkpoint_sha256` is the ensemble's identity,
the sha256 of the sorted member checkpoints, the combine rule and τ, so the train and test
stores of one ensemble agree (students check it) and any other ensemble differs. `sources`
records every source store's content digest (DESIGN §8).

Sources are checked before anything is written; a mismatch (dataset, split, views, classes,
samples, labels, view_params, kind, fewer than two, a duplicate) is one line. Teachers are
combined in checkpoint-sha256 order, so the output is byte-identical whatever order they are
listed in and on every rerun. Chunks of N are those of the first source; dask reads every source
chunk by chunk, so memory does not grow with N; `StoreWriter` makes the output atomic.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stages.functional import InvalidLogitsError, ensemble_logits
from stages.parallel import block_rows, dask_scheduler, one_torch_thread, prefixed
from storage import ArraySpec, StoreError, StoreWriter, checked_reads, open_store
from storage.soft_labels import FLOAT16_MAX, SoftLabelStore
from storage.versions import library_versions

if TYPE_CHECKING:
    from pipeline.config import EnsembleConfig, EnsembleSpec

logger = logging.getLogger(__name__)

#: Store attributes every source must share with the first (named in the refusal).
SHARED_ATTRS = ("split", "dataset_fingerprint", "num_classes", "num_views", "num_samples", "view_spec")
#: Teacher attributes copied into the ensemble's `teacher` when every member has the same value.
PREPROCESSING = ("pixel_mean", "pixel_std", "image_shape")
#: The two stores of a teacher folder an ensemble builds, train split first.
SPLIT_STORES = ("logits.zarr", "test-logits.zarr")


def ensemble_identity(checkpoints: Sequence[str], *, combine: str, temperature: float) -> str:
    """The ensemble's `checkpoint_sha256`: sha256 over the sorted member checkpoint sha256s, the
    combine rule and τ (the same for the train and the test store of one ensemble)."""
    text = "\n".join(["lessons-ensemble-v1", combine, repr(float(temperature)), *sorted(checkpoints)])
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class EnsemblePlan:
    """A checked ensemble of one split, ready to write (`plan` makes it, `write` writes it)."""

    sources: tuple[SoftLabelStore, ...]  # in checkpoint sha256 order
    out: Path
    attrs: dict[str, Any]
    arrays: dict[str, ArraySpec]
    chunk_rows: int
    combine: str
    temperature: float


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:36] + "...'"


def plan(spec: EnsembleSpec, *, name: str, sources: Sequence[str | Path], out: str | Path) -> EnsemblePlan:
    """Open and cross-check the source logit stores of one split; write nothing.

    Args:
        spec: EnsembleSpec (combine, temperature; its `teachers` are not read here).
        name: the ensemble's name (recorded as the teacher name).
        sources: the logit stores to combine, at least two, one per teacher.
        out: the store to write (must not be one of the sources).
    Returns:
        the EnsemblePlan.
    Raises:
        StoreError: fewer than two sources; a source missing, unfinished or not a logit store; two
            sources of one teacher checkpoint or one content; sources of different splits,
            datasets, class counts, sample counts, views, labels or view_params; `out` is a source.
    """
    paths = [Path(p) for p in sources]
    if len(paths) < 2:
        raise StoreError(
            f"ensemble {name}: needs at least two teacher logit stores, got {len(paths)}; "
            "list two or more teachers in ensemble.ensembles"
        )
    stores = []
    for path in paths:
        if path.resolve() == Path(out).resolve():
            raise StoreError(f"ensemble {name}: the output {out} is one of its sources; write it elsewhere")
        store = open_store(path, kind="logits")
        store.check_layout()
        recorded = store.attrs.get("teacher")
        if not isinstance(recorded, dict) or not isinstance(recorded.get("checkpoint_sha256"), str):
            raise StoreError(
                f"{path}: records no teacher checkpoint sha256, so the ensemble cannot name it; "
                "rebuild it (lessons teacher-dump or import-logits)"
            )
        if np.dtype(store.array("logits").dtype).kind != "f":
            raise StoreError(f"{path}: logits of dtype {store.array('logits').dtype}, not float; rebuild it")
        stores.append(store)
    first = stores[0]
    for store in stores[1:]:
        for key in SHARED_ATTRS:
            if store.attrs.get(key) != first.attrs.get(key):
                raise StoreError(
                    f"{store.path}: {key} is {_short(store.attrs.get(key))} but {first.path} has "
                    f"{_short(first.attrs.get(key))}; an ensemble combines stores of one dataset, split "
                    "and views: dump every teacher with the same data and teacher_dump settings"
                )
    seen: dict[str, Path] = {}
    for store in stores:
        for what, key in (
            ("teacher checkpoint", store.attrs["teacher"]["checkpoint_sha256"]),
            ("content", store.content_digest),
        ):
            other = seen.get(f"{what}:{key}")
            if other is not None:
                raise StoreError(
                    f"{store.path}: the same {what} ({key[:12]}...) as {other}; an ensemble lists "
                    "each teacher once: remove the duplicate"
                )
            seen[f"{what}:{key}"] = store.path
    import dask.array as da

    labels = first.read("labels")
    view_params = da.from_zarr(first.array("view_params"))
    for store in stores[1:]:
        their_labels = store.read("labels")
        if not np.array_equal(their_labels, labels):
            row = int(np.flatnonzero(their_labels != labels)[0])
            raise StoreError(
                f"{store.path}: labels differ from {first.path} (sample {row}: {int(their_labels[row])} vs "
                f"{int(labels[row])}); the stores belong to other datasets: rebuild them"
            )
        theirs = da.from_zarr(store.array("view_params"))
        with checked_reads(store.path):
            same = theirs.shape == view_params.shape and bool((theirs == view_params).all().compute())
        if not same:
            raise StoreError(
                f"{store.path}: view_params differ from {first.path}; the stores hold other views of "
                "the samples: dump every teacher with the same teacher_dump views settings"
            )
    stores.sort(key=lambda s: (s.attrs["teacher"]["checkpoint_sha256"], s.content_digest))
    first = stores[0]  # the output's chunks and copied arrays follow it, whatever the listed order
    members = [
        {key: s.attrs["teacher"].get(key) for key in ("name", "arch", "checkpoint_sha256")} for s in stores
    ]
    teacher: dict[str, Any] = {
        "name": name,
        "arch": "ensemble",
        "checkpoint_sha256": ensemble_identity(
            [m["checkpoint_sha256"] for m in members], combine=spec.combine, temperature=spec.temperature
        ),
        "combine": spec.combine,
        "temperature": spec.temperature,
        "members": members,
    }
    for key in PREPROCESSING:
        values = [s.attrs["teacher"].get(key) for s in stores]
        if values[0] is not None and all(v == values[0] for v in values):
            teacher[key] = values[0]
    dtype = "float32" if any(s.array("logits").dtype == np.float32 for s in stores) else "float16"
    attrs: dict[str, Any] = {
        key: first.attrs[key] for key in ("split", "dataset", *SHARED_ATTRS) if key in first.attrs
    }
    attrs.pop("num_samples", None)  # StoreWriter records it
    attrs.update(
        logits_dtype=dtype,
        teacher=teacher,
        sources=[
            {
                "store": f"{s.path.parent.name}/{s.path.name}",
                "teacher": s.attrs["teacher"].get("name"),
                "checkpoint_sha256": s.attrs["teacher"]["checkpoint_sha256"],
                "content_digest": s.content_digest,
            }
            for s in stores
        ],
        versions=library_versions(),
    )
    views, samples, num_classes = first.array("logits").shape
    params_shape = tuple(first.array("view_params").shape)
    arrays = {
        "logits": ArraySpec((views, samples, num_classes), dtype, sample_axis=1),
        "labels": ArraySpec((samples,), "int64"),
        "sample_index": ArraySpec((samples,), "int64"),
        "view_params": ArraySpec(params_shape, str(first.array("view_params").dtype), sample_axis=1),
    }
    return EnsemblePlan(
        sources=tuple(stores),
        out=Path(out),
        attrs=attrs,
        arrays=arrays,
        chunk_rows=first.chunk_rows,
        combine=spec.combine,
        temperature=spec.temperature,
    )


def _ensemble_block(
    labels: np.ndarray,
    *logits: np.ndarray,
    combine: str,
    temperature: float,
    float16: bool,
    block_info: Any = None,
) -> np.ndarray:
    """Labels (1, n, 1) and S blocks (V, n, C) -> packed (V, n, C + S + 1) float32: the ensemble
    logits, then per view whether each teacher and the ensemble put the label first."""
    views, rows, num_classes = logits[0].shape
    stacked = torch.from_numpy(np.stack([np.asarray(block, dtype=np.float32) for block in logits]))
    stacked = stacked.reshape(len(logits), views * rows, num_classes)  # (S, V·n, C)
    flat_labels = torch.from_numpy(np.ascontiguousarray(labels).reshape(-1)).repeat(views)  # (V·n,)
    with one_torch_thread():
        try:
            combined = ensemble_logits(stacked, combine=combine, temperature=temperature)  # (V·n, C)
        except InvalidLogitsError as exc:
            raise InvalidLogitsError(f"{block_rows(block_info, axis=1)}{exc}") from exc
        if float16 and combined.numel() and float(combined.abs().max()) > FLOAT16_MAX:
            raise StoreError(
                f"{block_rows(block_info, axis=1)}ensemble logits reach {float(combined.abs().max()):.4g}, "
                f"beyond the float16 range ({FLOAT16_MAX:g}); dump the teachers with "
                "teacher_dump.dtype: float32"
            )
        right = [(t.argmax(dim=1) == flat_labels).float() for t in (*stacked, combined)]  # S+1 × (V·n,)
        packed = torch.cat([combined.float(), torch.stack(right, dim=1)], dim=1)
    return packed.reshape(views, rows, num_classes + len(logits) + 1).numpy()


def write(plan: EnsemblePlan, *, scheduler: str | None = None) -> dict[str, Any]:
    """Write the planned ensemble store (resumable and atomic through StoreWriter).

    Returns:
        {"views", "ensemble_top1", "member_top1": {teacher: top-1 over all views}, "elapsed_s"}.
    Raises:
        StoreError: ensemble logits beyond float16 range for a float16 store, or a source chunk
            that fails its checksum.
        InvalidLogitsError: NaN/inf logits in a source.
    """
    import dask.array as da

    first = plan.sources[0]
    views, samples, num_classes = plan.arrays["logits"].shape
    rows = plan.chunk_rows
    logits = [da.from_zarr(s.array("logits")).rechunk((views, rows, num_classes)) for s in plan.sources]
    labels = first.read("labels")
    labels_da = da.from_array(labels, chunks=(rows,))
    packed = da.map_blocks(
        _ensemble_block,
        labels_da[None, :, None],
        *logits,
        combine=plan.combine,
        temperature=plan.temperature,
        float16=plan.arrays["logits"].dtype == "float16",
        dtype=np.float32,
        chunks=(logits[0].chunks[0], logits[0].chunks[1], (num_classes + len(logits) + 1,)),
    )
    params = da.from_zarr(first.array("view_params")).rechunk(
        (views, rows, plan.arrays["view_params"].shape[2])
    )
    started = time.perf_counter()
    names = [s.attrs["teacher"].get("name") or s.path.parent.name for s in plan.sources]
    with (
        dask_scheduler(scheduler) as dask_sched,
        StoreWriter(plan.out, kind="logits", arrays=plan.arrays, attrs=plan.attrs, chunk_rows=rows) as writer,
        prefixed(f"ensemble {plan.attrs['teacher']['name']}", InvalidLogitsError, StoreError),
        checked_reads(first.path),
    ):
        counts = writer.write_dask(
            {
                "logits": packed[..., :num_classes],
                "labels": labels_da,
                "sample_index": da.from_array(first.read("sample_index"), chunks=(rows,)),
                "view_params": params,
            },
            scheduler=dask_sched,
            reductions={f"right{k}": packed[..., num_classes + k].sum() for k in range(len(logits) + 1)},
        )
        total = views * samples
        summary: dict[str, Any] = {
            "views": total,
            "ensemble_top1": float(counts[f"right{len(logits)}"]) / total,
            "member_top1": {name: float(counts[f"right{k}"]) / total for k, name in enumerate(names)},
        }
        writer.finalize(extra_attrs={"top1": summary})
    summary["elapsed_s"] = round(time.perf_counter() - started, 3)
    logger.info(
        "ensemble %s: %d views, top-1 %.4f (members %s)",
        plan.out,
        total,
        summary["ensemble_top1"],
        ", ".join(f"{k} {v:.4f}" for k, v in summary["member_top1"].items()),
    )
    return summary


def run(
    config: EnsembleConfig, *, name: str, stores_root: str | Path, scheduler: str | None = None
) -> dict[str, dict[str, Any]]:
    """Build `stores_root/<name>/logits.zarr` and `test-logits.zarr` from the members' stores.

    Both splits are checked before either is written, and the train and test stores of every
    member must come from one checkpoint (the ensemble's identity depends on it).

    Args:
        config: EnsembleConfig; `config.ensembles[name]` names the teachers, combine and τ.
        stores_root: the folder holding one store folder per teacher (`stores`).
    Returns:
        {store file name: `write`'s summary}.
    Raises:
        ConfigError: no ensemble `name`.
        StoreError: as `plan` and `write`, or a member whose train and test stores name other
            checkpoints.
    """
    spec = config.ensemble(name)
    root = Path(stores_root)
    plans = [
        plan(spec, name=name, sources=[root / t / file for t in spec.teachers], out=root / name / file)
        for file in SPLIT_STORES
    ]
    train, test = plans
    for a, b in zip(train.sources, test.sources, strict=True):
        if a.attrs["teacher"] != b.attrs["teacher"]:
            raise StoreError(
                f"{b.path}: from another teacher checkpoint than {a.path} (or another member order); "
                "rerun teacher-dump for that teacher"
            )
    return {p.out.name: write(p, scheduler=scheduler) for p in plans}

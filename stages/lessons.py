"""The lessons of one offline student experiment: its stores, checked against the dataset and
each other, and each epoch's supervision gathered from the views the student draws (DESIGN §5).

The stores hold V views of every sample. At (seed, epoch) the student uses stored view
v = `StoredViews.pick(seed, epoch, n)` of sample n: it trains on the image `view_params[v, n]`
rebuilds and on the targets of `logits[v, n]` (KA-adjusted and DTD statistics of that same view).
Since every (v, n) of an epoch is known before the epoch starts, the epoch's rows are gathered
once per epoch: from arrays held in memory, or — for lessons larger than
`student_train.max_lesson_bytes` — streamed from the stores in chunk order, one pass per epoch,
never holding V·N·C. Both give identical tensors.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stages.topk import TopkRows
from stages.views import Augmentation, StoredViews, ViewError, stored_views_of
from storage import StoreError, open_store
from storage.soft_labels import SoftLabelStore, checked_reads

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Lessons:
    """One epoch's per-sample supervision, indexed by sample_index, on one device.

    target_logits: (N, C) float32 (KA-adjusted teacher logits, or log q for fixed rows); from a
        top-k store (DESIGN §9), the same as `TopkRows` (N rows of K).
    fixed_target: (N,) bool (LSR rows: use softmax(target) without softening).
    teacher_logits: (N, C) float32, the teacher as dumped (for FLSW), `TopkRows` from a top-k
        store, or None.
    static_temperature: (N,) float32 τ^T, or None.
    """

    target_logits: Tensor | TopkRows
    fixed_target: Tensor
    teacher_logits: Tensor | TopkRows | None
    static_temperature: Tensor | None


@dataclasses.dataclass
class _Source:
    """One (V, N, ...) array a student reads: its store, and its values once loaded in memory."""

    store: SoftLabelStore
    name: str
    positive: bool = False  # temperatures: values must be > 0
    values: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        array = self.store.array(self.name)
        return int(np.prod(array.shape)) * array.dtype.itemsize


class LessonStores:
    """The stores one offline experiment reads, with the views they hold.

    Use `open_lessons` to build one. `epoch(seed, epoch)` returns that epoch's Lessons and the
    view params of the images the student trains on.
    """

    def __init__(
        self,
        sources: dict[str, _Source],
        views: StoredViews,
        view_params: _Source,
        *,
        streamed: bool,
        device: torch.device,
    ) -> None:
        self.sources, self.views, self.view_params = sources, views, view_params
        self.streamed, self.device = streamed, device
        if not streamed:
            loaded: dict[tuple[Path, str], np.ndarray] = {}
            for source in (*sources.values(), view_params):
                key = (source.store.path, source.name)
                if key not in loaded:
                    with checked_reads(source.store.path):
                        loaded[key] = np.asarray(source.store.array(source.name)[...])
                source.values = loaded[key]

    @property
    def topk(self) -> bool:
        """Whether the targets are top-k rows (a `layout: topk` store, DESIGN §9), not dense ones."""
        return "target_logits" not in self.sources

    @property
    def num_views(self) -> int:
        return self.views.num_views

    @property
    def num_classes(self) -> int:
        return int(self.view_params.store.attrs["num_classes"])

    def check_covers(self, seed: int, epochs: int, *, where: str = "student") -> None:
        """Refuse, before any training, a run whose (seed, epoch) the stores do not hold.

        Raises:
            ViewError: a scheduled store without this seed or with fewer epochs.
        """
        for epoch in range(epochs):
            self.views.pick(seed, epoch, np.zeros(1, dtype=np.int64), where=where)

    def gather(self, source: _Source, pick: np.ndarray) -> np.ndarray:
        """Rows `source[pick[n], n]` for every n: (N, ...) in the store's dtype.

        In memory: one fancy index. Streamed: the store's chunks in order, one pass.
        """
        rows = np.arange(pick.shape[0])
        if source.values is not None:
            return source.values[pick, rows]
        return source.store.read_pairs(source.name, pick, rows)

    def epoch(self, seed: int, epoch: int, *, where: str = "student") -> tuple[Lessons, np.ndarray | None]:
        """The Lessons of (seed, epoch) and the (N, P) int16 view params of the student's images
        (None for a `none` store: the student draws its own views and reads the plain image's targets).

        Raises:
            ViewError: a scheduled store that does not hold (seed, epoch).
            StoreError: a gathered value is NaN/inf (or <= 0 for temperatures): the store was
                changed after it was written.
        """
        num_samples = self.view_params.store.num_samples
        pick = self.views.pick(seed, epoch, np.arange(num_samples, dtype=np.int64), where=where)
        tensors: dict[str, Tensor | None] = {"teacher_logits": None, "static_temperature": None}
        gathered: dict[tuple[Path, str], np.ndarray] = {}  # logits serve as targets and for FLSW: read once
        for key, source in self.sources.items():
            at = (source.store.path, source.name)
            if at not in gathered:
                gathered[at] = self.gather(source, pick)
            read = gathered[at]
            if key.endswith(".indices"):  # top-k class ids
                read = _class_ids(read, source, pick)
            elif key != "fixed_target":
                read = _finite(read.astype(np.float32), source, pick)
            tensors[key] = torch.from_numpy(read).to(self.device)
        if "fixed_target" not in self.sources:
            tensors["fixed_target"] = torch.zeros(num_samples, dtype=torch.bool, device=self.device)
        fields: dict[str, Any] = {key: value for key, value in tensors.items() if "." not in key}
        for field in ("target_logits", "teacher_logits"):  # (N, K) + (N, K) + (N,) -> TopkRows
            if f"{field}.values" in tensors:
                values, indices, lse = (tensors[f"{field}.{part}"] for part in ("values", "indices", "lse"))
                assert values is not None and indices is not None and lse is not None
                fields[field] = TopkRows(values, indices, lse, self.num_classes)
        lessons = Lessons(**fields)
        params = None if self.views.mode == "none" else self.gather(self.view_params, pick)
        return lessons, params


def _finite(values: np.ndarray, source: _Source, pick: np.ndarray) -> np.ndarray:
    """`values` (N, ...) float32, refused when it holds NaN/inf, or with `source.positive` a value
    <= 0 (temperatures): the KD loss checks nothing per step, and training on them would only
    report a NaN loss. A missing chunk never gets here: `open_store` refuses it."""
    bad = ~(np.isfinite(values) & (values > 0)) if source.positive else ~np.isfinite(values)
    if bad.any():
        rows = np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))
        what = "NaN/inf or values <= 0" if source.positive else "NaN/inf"
        raise StoreError(
            f"{source.store.path}: {source.name} has {what} in {rows.size} rows (first: sample "
            f"{int(rows[0])}, view {int(pick[rows[0]])}); lessons never writes them, so the store "
            "was changed after it was written: rebuild it"
        )
    return values


def _class_ids(values: np.ndarray, source: _Source, pick: np.ndarray) -> np.ndarray:
    """(N, K) top-k class ids as int64, refused when one lies outside [0, C) (a changed store)."""
    num_classes = int(source.store.attrs["num_classes"])
    bad = ((values < 0) | (values >= num_classes)).any(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise StoreError(
            f"{source.store.path}: {source.name} has class ids outside [0, {num_classes}) in "
            f"{rows.size} rows (first: sample {int(rows[0])}, view {int(pick[rows[0]])}); lessons "
            "never writes them, so the store was changed after it was written: rebuild it"
        )
    return values.astype(np.int64)


def check_views(store: SoftLabelStore, augmentation: Augmentation, *, where: str) -> StoredViews:
    """The views `store` holds, checked against the augmentation the student trains with.

    Raises:
        ViewError: a multi-view store read by a student without augmentation, or a store whose
            `view_spec` names another augmentation — one line naming the key and the fix.
    """
    views = stored_views_of(store)
    if "logits" in store and store.array("logits").shape[0] != views.num_views:
        raise StoreError(
            f"{store.path}: view_spec says {views.num_views} views but logits hold "
            f"{store.array('logits').shape[0]}; rebuild it (lessons teacher-dump)"
        )
    if views.mode == "none":
        return views
    if augmentation.kind == "identity":
        raise ViewError(
            f"{where}: student_train.augment is false, but {store.path} holds {views.num_views} "
            f"views ({views.mode}) of each image, which only an augmenting student reads: set "
            "student_train.augment: true, or dump with teacher_dump.views: none"
        )
    if views.augmentation != augmentation:
        raise ViewError(
            f"{store.path}: view_spec is {views.augmentation.spec()}, but the student trains with "
            f"{augmentation.spec()}; rebuild the store (lessons teacher-dump) for this dataset"
        )
    return views


def open_lessons(
    store_dir: Path,
    *,
    adjust: str,
    dtd: str,
    manifest: dict[str, Any],
    augmentation: Augmentation,
    max_bytes: int,
    device: torch.device,
    where: str = "student",
) -> tuple[LessonStores, dict[str, Any], dict[str, str]]:
    """Open and cross-check the stores of one teacher for one offline experiment.

    Reads `logits.zarr`, `adjusted-<adjust>.zarr` (unless adjust is none) and `dtd.zarr` (for dtd
    static); the raw logits are loaded only when the loss reads them (adjust none, or dtd flsw).
    A top-k `logits.zarr` (DESIGN §9) and its top-k `adjusted-<adjust>.zarr` give `TopkRows`.

    Returns:
        (the LessonStores on `device` — in memory when they fit `max_bytes`, else streamed —, the
        teacher attributes of the logits store, {store folder name: content digest} of every store read).
    Raises:
        StoreError: a store is missing or unfinished, or its fingerprint, class count,
            sample_index or teacher checkpoint does not match, or a KA/DTD store was derived
            from another dump than `logits.zarr` (content digest or sample_index).
        ViewError: the stored views do not fit the student's augmentation (`check_views`).
    """
    train = manifest["splits"]["train"]
    expected = dict(dataset_fingerprint=train["fingerprint"], num_classes=manifest["num_classes"])
    dataset = f"the prepared dataset ({manifest['dataset']})"
    logits_path = store_dir / "logits.zarr"
    logits_store = open_store(logits_path, kind="logits", layouts=("dense", "topk"))
    logits_store.expect(**expected, split="train", against=dataset)
    logits_store.expect_sample_index(np.arange(train["num_samples"], dtype=np.int64), against=dataset)
    views = check_views(logits_store, augmentation, where=where)
    teacher = logits_store.attrs["teacher"]
    digests = {logits_path.name: logits_store.content_digest}
    topk = logits_store.attrs.get("layout") == "topk"

    def rows(store: SoftLabelStore, field: str, prefix: str) -> dict[str, _Source]:
        """The sources of a field's rows: `<prefix>logits`, or a top-k store's three arrays."""
        if not topk:
            return {field: _Source(store, f"{prefix}logits")}
        parts = {"values": "topk_values", "indices": "topk_indices", "lse": "lse"}
        return {f"{field}.{part}": _Source(store, f"{prefix}{name}") for part, name in parts.items()}

    sources: dict[str, _Source] = {}
    if adjust == "none":
        sources.update(rows(logits_store, "target_logits", ""))
    else:
        adjusted_path = store_dir / f"adjusted-{adjust}.zarr"
        adjusted = open_store(adjusted_path, kind="adjusted", layouts=("dense", "topk"))
        adjusted.expect(**expected, method=adjust, against=dataset)
        adjusted.expect(teacher=teacher, against=str(logits_path))
        adjusted.expect_source(logits_store)
        digests[adjusted.path.name] = adjusted.content_digest
        sources.update(rows(adjusted, "target_logits", "target_"))
        sources["fixed_target"] = _Source(adjusted, "fixed_target")
    if dtd == "flsw":
        sources.update(rows(logits_store, "teacher_logits", ""))
    if dtd == "static":
        dtd_store = open_store(store_dir / "dtd.zarr", kind="dtd")
        dtd_store.expect(**expected, against=dataset)
        dtd_store.expect(teacher=teacher, against=str(logits_path))
        dtd_store.expect_source(logits_store)
        digests[dtd_store.path.name] = dtd_store.content_digest
        sources["static_temperature"] = _Source(dtd_store, "static_temperature", positive=True)
    view_params = _Source(logits_store, "view_params")
    unique = {(s.store.path, s.name): s for s in (*sources.values(), view_params)}
    total = sum(source.nbytes for source in unique.values())
    streamed = total > max_bytes
    if streamed:
        logger.info(
            "lessons of %s: %.2f GB > student_train.max_lesson_bytes: streamed once per epoch",
            store_dir,
            total / 1e9,
        )
    return LessonStores(sources, views, view_params, streamed=streamed, device=device), teacher, digests

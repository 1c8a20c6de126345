"""Bring your own logits: an HDF5 file of teacher logits computed elsewhere becomes a store.

Accepted HDF5 layout: dataset `logits` (N, C) or (V, N, C), and `sample_index` (N,) and/or
`labels` (N,). Rows are put in sample_index order; the file is refused when its sample count,
class count, sample_index or labels do not match the prepared dataset.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from stages.teacher_dump import VIEW_SPEC
from stages.views import StoredViews, ViewError
from storage import ArraySpec, StoreError, StoreWriter
from storage.h5 import H5Error, H5Source
from storage.manifest import file_sha256, read_labels, read_prepared
from storage.soft_labels import check_blocks
from storage.versions import library_versions

logger = logging.getLogger(__name__)


def import_logits(
    h5_file: str | Path,
    *,
    data_dir: str | Path,
    out: str | Path,
    split: str,
    teacher: str,
    dtype: str,
    chunk_rows: int,
) -> int:
    """Check an HDF5 file of logits against the prepared dataset and write it as a logit store.

    Only the datasets `logits`, `sample_index`, `labels`, `view_params` and the attributes
    `dataset_fingerprint` (and `view_spec` for V > 1) are read; anything else in the file is
    never loaded. `logits` and `view_params` are read `chunk_rows` rows at a time (once to check
    the values, once to write them), so memory holds one chunk of them, not the whole file.

    Returns:
        the number of rows (N).
    Raises:
        H5Error: the file lacks `logits`, or lacks both `sample_index` and `labels`.
        H5Error: `labels`, `sample_index` or `view_params` of the wrong shape or dtype; an
            attribute that cannot be read, or a `dataset_fingerprint` that is not a string
            (naming the file and the attribute).
        StoreError: N, C, sample_index, labels or an exported store's dataset fingerprint do not
            match the dataset; labels outside [0, C); NaN/inf logits, or logits beyond float16
            range for a float16 store (checked before anything is written).
    """
    manifest = read_prepared(data_dir, verify_betons=False)
    labels = read_labels(data_dir, split, manifest)
    with H5Source(h5_file) as source:
        logits_ds = source.dataset("logits")
        if logits_ds is None:
            raise H5Error(f"{h5_file}: no dataset named 'logits' (expected (N, C) or (V, N, C))")
        if logits_ds.ndim not in (2, 3) or logits_ds.dtype.kind != "f":
            raise H5Error(
                f"{h5_file}: 'logits' must be float (N, C) or (V, N, C), got "
                f"{logits_ds.dtype} {logits_ds.shape}"
            )
        num_views, num_samples, num_classes = (
            (1, *logits_ds.shape) if logits_ds.ndim == 2 else logits_ds.shape
        )
        expected_n, expected_c = manifest["splits"][split]["num_samples"], manifest["num_classes"]
        if num_samples != expected_n:
            raise StoreError(
                f"{h5_file}: {num_samples} rows of logits but the {split} split of "
                f"{manifest['dataset']} has {expected_n}"
            )
        if num_classes != expected_c:
            raise StoreError(
                f"{h5_file}: {num_classes} classes of logits but {manifest['dataset']} has {expected_c}"
            )
        fingerprint = manifest["splits"][split]["fingerprint"]
        given_fingerprint = source.attr("dataset_fingerprint")
        if given_fingerprint is not None and not isinstance(given_fingerprint, str):
            raise H5Error(
                f"{h5_file}: attribute 'dataset_fingerprint' must be a string (the sha256 of "
                f"the dataset the logits belong to), got {type(given_fingerprint).__name__} "
                f"{str(given_fingerprint)[:40]}; remove the attribute or write it as text"
            )
        if given_fingerprint not in (None, fingerprint):
            raise StoreError(
                f"{h5_file}: exported from a store of dataset fingerprint "
                f"{given_fingerprint[:16]}... but the {split} split of "
                f"{data_dir} has {fingerprint[:16]}...; the logits belong to another "
                "dataset, subset or order"
            )
        found = {name: source.dataset(name) for name in ("sample_index", "labels")}
        if found["sample_index"] is None and found["labels"] is None:
            raise H5Error(f"{h5_file}: needs a 'sample_index' or a 'labels' dataset to check alignment")
        for name, ds in found.items():
            if ds is not None and (ds.shape != (num_samples,) or ds.dtype.kind not in "iu"):
                raise H5Error(
                    f"{h5_file}: {name!r} must be integer ({num_samples},) like the logits' rows, "
                    f"got {ds.dtype} {ds.shape}"
                )
        order = np.arange(num_samples)
        if found["sample_index"] is not None:
            sample_index = source.read("sample_index").astype(np.int64)
            if not np.array_equal(np.sort(sample_index), order):
                raise StoreError(f"{h5_file}: 'sample_index' is not a permutation of 0..{num_samples - 1}")
            order = np.argsort(sample_index, kind="stable")
        if found["labels"] is not None:
            given = source.read("labels").astype(np.int64)[order]
            outside = np.flatnonzero((given < 0) | (given >= num_classes))
            if outside.size:
                raise StoreError(
                    f"{h5_file}: label {given[outside[0]]} of sample {outside[0]} is outside "
                    f"[0, {num_classes}) ({outside.size} such rows); the labels are not class "
                    f"ids of {manifest['dataset']}"
                )
            wrong = np.flatnonzero(given != labels)
            if wrong.size:
                raise StoreError(
                    f"{h5_file}: labels differ from the dataset at {wrong.size} rows (first: "
                    f"sample {wrong[0]}, {given[wrong[0]]} vs {labels[wrong[0]]}); the logits "
                    "belong to another dataset or order"
                )
        view_params_ds = source.dataset("view_params")
        if view_params_ds is None:
            view_params_spec = ArraySpec((num_views, num_samples, 0), "int16", sample_axis=1)
        elif (
            view_params_ds.ndim != 3
            or view_params_ds.shape[:2] != (num_views, num_samples)
            or view_params_ds.dtype.kind not in "iuf"
        ):
            raise H5Error(
                f"{h5_file}: 'view_params' must be numeric (V, N, P) = ({num_views}, {num_samples}, P) "
                f"like the logits, got {view_params_ds.dtype} {view_params_ds.shape}"
            )
        else:
            view_params_spec = ArraySpec(view_params_ds.shape, str(view_params_ds.dtype), sample_axis=1)
        if num_views < 1:
            raise H5Error(f"{h5_file}: 'logits' hold no view (V = 0); export at least one view per sample")
        if num_views > 1:  # several views: they must be views lessons can rebuild, checked before writing
            spec = source.attr("view_spec", None)
            if isinstance(spec, str):  # a foreign file's JSON text (refused below when it is not)
                with contextlib.suppress(ValueError):
                    spec = json.loads(spec)
            try:
                views = StoredViews.from_spec(spec)
                if view_params_ds is None:
                    raise ViewError("a multi-view file needs its 'view_params' (V, N, P)")
                views.check_params(np.asarray(source.read("view_params")))
            except ViewError as exc:
                raise H5Error(
                    f"{h5_file}: {num_views} views per sample, but {exc}; export the views with the "
                    "view_spec and view_params lessons writes (lessons export of a multi-view store)"
                ) from exc
        file_rows = [
            np.arange(start, min(start + chunk_rows, num_samples))
            for start in range(0, num_samples, max(chunk_rows, 1))
        ]
        check_blocks(
            (_read_rows(source, "logits", rows) for rows in file_rows), dtype, where=f"{h5_file}: 'logits'"
        )  # before any output exists
        store_attrs: dict[str, Any] = {
            "split": split,
            "dataset": manifest["dataset"],
            "dataset_fingerprint": fingerprint,
            "num_classes": num_classes,
            "num_views": num_views,
            "view_spec": source.attr("view_spec", VIEW_SPEC) if num_views > 1 else VIEW_SPEC,
            "logits_dtype": dtype,
            "teacher": {
                "name": teacher,
                "arch": "external",
                "checkpoint_sha256": file_sha256(h5_file),
                "source": Path(h5_file).name,
            },
            "versions": library_versions(),
        }
        specs = {
            "logits": ArraySpec((num_views, num_samples, num_classes), dtype, sample_axis=1),
            "labels": ArraySpec((num_samples,), "int64"),
            "sample_index": ArraySpec((num_samples,), "int64"),
            "view_params": view_params_spec,
        }
        with StoreWriter(
            out, kind="logits", arrays=specs, attrs=store_attrs, chunk_rows=chunk_rows
        ) as writer:
            for chunk in writer.pending_chunks():
                rows = writer.rows(chunk)
                view_params = (
                    np.zeros((num_views, rows.stop - rows.start, 0), dtype=np.int16)
                    if view_params_ds is None
                    else _read_rows(source, "view_params", order[rows])
                )
                writer.write_chunk(
                    chunk,
                    {
                        "logits": _read_rows(source, "logits", order[rows]),
                        "labels": labels[rows],
                        "sample_index": np.arange(rows.start, rows.stop),
                        "view_params": view_params,
                    },
                )
            writer.finalize()
    logger.info("%s: imported %d x %d x %d logits from %s", out, num_views, num_samples, num_classes, h5_file)
    return num_samples


def _read_rows(source: H5Source, name: str, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` of dataset `name` ((N, ...) or (V, N, ...)) as (V, n, ...), in the given order.

    Args:
        rows: (n,) int64 distinct file row numbers, any order. A run of consecutive rows is one
            slice; otherwise the rows are read in increasing order (h5py's list selection) and
            put back in the asked-for order.
    Raises:
        H5Error: the rows cannot be read.
    """
    ds = source.dataset(name)
    assert ds is not None
    views_first = ds.ndim == 3
    if rows.size and rows[-1] - rows[0] == rows.size - 1 and np.all(np.diff(rows) == 1):
        index: Any = slice(int(rows[0]), int(rows[-1]) + 1)
        inverse = None
    else:
        inverse = np.argsort(rows, kind="stable")
        index = rows[inverse].tolist()
    block = source.read(name, (slice(None), index) if views_first else index)
    if not views_first:
        block = block[None]
    if inverse is None:
        return block
    ordered = np.empty_like(block)
    ordered[:, inverse] = block
    return ordered

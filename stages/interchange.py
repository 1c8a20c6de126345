"""Bring your own logits: an HDF5 file of teacher logits computed elsewhere becomes a store.

Accepted HDF5 layout: dataset `logits` (N, C) or (V, N, C), and `sample_index` (N,) and/or
`labels` (N,). Rows are put in sample_index order; the file is refused when its sample count,
class count, sample_index or labels do not match the prepared dataset.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from stages.teacher_dump import VIEW_SPEC
from storage import ArraySpec, StoreError, StoreWriter
from storage.soft_labels import check_values
from storage.h5 import H5Error, read_h5
from storage.manifest import file_sha256, read_labels, read_prepared
from storage.versions import library_versions

logger = logging.getLogger(__name__)


def import_logits(h5_file: str | Path, *, data_dir: str | Path, out: str | Path, split: str,
                  teacher: str, dtype: str, chunk_rows: int) -> int:
    """Check an HDF5 file of logits against the prepared dataset and write it as a logit store.

    Returns:
        the number of rows (N).
    Raises:
        H5Error: the file lacks `logits`, or lacks both `sample_index` and `labels`.
        H5Error: `labels`, `sample_index` or `view_params` of the wrong shape or dtype.
        StoreError: N, C, sample_index, labels or an exported store's dataset fingerprint do not
            match the dataset; labels outside [0, C); NaN/inf logits, or logits beyond float16
            range for a float16 store (checked before anything is written).
    """
    manifest = read_prepared(data_dir, verify_betons=False)
    labels = read_labels(data_dir, split, manifest)
    arrays, attrs = read_h5(h5_file)
    if "logits" not in arrays:
        raise H5Error(f"{h5_file}: no dataset named 'logits' (expected (N, C) or (V, N, C))")
    logits = arrays["logits"]
    if logits.ndim == 2:
        logits = logits[None]
    if logits.ndim != 3 or logits.dtype.kind != "f":
        raise H5Error(f"{h5_file}: 'logits' must be float (N, C) or (V, N, C), got "
                      f"{arrays['logits'].dtype} {arrays['logits'].shape}")
    num_views, num_samples, num_classes = logits.shape
    expected_n, expected_c = manifest["splits"][split]["num_samples"], manifest["num_classes"]
    if num_samples != expected_n:
        raise StoreError(f"{h5_file}: {num_samples} rows of logits but the {split} split of "
                         f"{manifest['dataset']} has {expected_n}")
    if num_classes != expected_c:
        raise StoreError(f"{h5_file}: {num_classes} classes of logits but {manifest['dataset']} "
                         f"has {expected_c}")
    fingerprint = manifest["splits"][split]["fingerprint"]
    if attrs.get("dataset_fingerprint") not in (None, fingerprint):
        raise StoreError(f"{h5_file}: exported from a store of dataset fingerprint "
                         f"{str(attrs['dataset_fingerprint'])[:16]}... but the {split} split of "
                         f"{data_dir} has {fingerprint[:16]}...; the logits belong to another "
                         "dataset, subset or order")
    if "sample_index" not in arrays and "labels" not in arrays:
        raise H5Error(f"{h5_file}: needs a 'sample_index' or a 'labels' dataset to check alignment")
    for name in ("sample_index", "labels"):
        if name in arrays and (arrays[name].shape != (num_samples,) or arrays[name].dtype.kind not in "iu"):
            raise H5Error(f"{h5_file}: {name!r} must be integer ({num_samples},) like the logits' rows, "
                          f"got {arrays[name].dtype} {arrays[name].shape}")
    order = np.arange(num_samples)
    if "sample_index" in arrays:
        sample_index = np.asarray(arrays["sample_index"]).astype(np.int64)
        if not np.array_equal(np.sort(sample_index), order):
            raise StoreError(f"{h5_file}: 'sample_index' is not a permutation of 0..{num_samples - 1}")
        order = np.argsort(sample_index, kind="stable")
    if "labels" in arrays:
        given = np.asarray(arrays["labels"]).astype(np.int64)[order]
        outside = np.flatnonzero((given < 0) | (given >= num_classes))
        if outside.size:
            raise StoreError(f"{h5_file}: label {given[outside[0]]} of sample {outside[0]} is outside "
                             f"[0, {num_classes}) ({outside.size} such rows); the labels are not class "
                             f"ids of {manifest['dataset']}")
        wrong = np.flatnonzero(given != labels)
        if wrong.size:
            raise StoreError(f"{h5_file}: labels differ from the dataset at {wrong.size} rows (first: "
                             f"sample {wrong[0]}, {given[wrong[0]]} vs {labels[wrong[0]]}); the logits "
                             "belong to another dataset or order")
    logits = logits[:, order]
    store_attrs: dict[str, Any] = {
        "split": split, "dataset": manifest["dataset"],
        "dataset_fingerprint": manifest["splits"][split]["fingerprint"],
        "num_classes": num_classes, "num_views": num_views,
        "view_spec": attrs.get("view_spec", VIEW_SPEC) if num_views > 1 else VIEW_SPEC,
        "logits_dtype": dtype,
        "teacher": {"name": teacher, "arch": "external", "checkpoint_sha256": file_sha256(h5_file),
                    "source": Path(h5_file).name},
        "versions": library_versions(),
    }
    view_params = arrays.get("view_params")
    if view_params is None:
        view_params = np.zeros((num_views, num_samples, 0), dtype=np.int16)
    elif view_params.ndim != 3 or view_params.shape[:2] != (num_views, num_samples) \
            or view_params.dtype.kind not in "iuf":
        raise H5Error(f"{h5_file}: 'view_params' must be numeric (V, N, P) = ({num_views}, {num_samples}, P) "
                      f"like the logits, got {view_params.dtype} {view_params.shape}")
    else:
        view_params = view_params[:, order]
    check_values(logits, dtype, where=f"{h5_file}: 'logits'")  # before any output exists
    specs = {
        "logits": ArraySpec((num_views, num_samples, num_classes), dtype, sample_axis=1),
        "labels": ArraySpec((num_samples,), "int64"),
        "sample_index": ArraySpec((num_samples,), "int64"),
        "view_params": ArraySpec(view_params.shape, str(view_params.dtype), sample_axis=1),
    }
    with StoreWriter(out, kind="logits", arrays=specs, attrs=store_attrs, chunk_rows=chunk_rows) as writer:
        for chunk in writer.pending_chunks():
            rows = writer.rows(chunk)
            writer.write_chunk(chunk, {"logits": logits[:, rows], "labels": labels[rows],
                                       "sample_index": np.arange(rows.start, rows.stop),
                                       "view_params": view_params[:, rows]})
        writer.finalize()
    logger.info("%s: imported %d x %d x %d logits from %s", out, num_views, num_samples, num_classes, h5_file)
    return num_samples

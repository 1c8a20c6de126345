"""HDF5 import/export: teacher logits computed elsewhere in, any store out.

Export writes every array of a store as an HDF5 dataset and every attribute as a JSON string
attribute (so nested attributes survive), which `read_h5` reads back bit for bit.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from storage.atomic import OutputError, describe_os_error, temporary_sibling
from storage.soft_labels import SoftLabelStore

logger = logging.getLogger(__name__)


class H5Error(ValueError):
    """An HDF5 file is missing, unreadable or lacks the datasets asked for."""


def export_h5(store: SoftLabelStore, path: str | Path) -> None:
    """Write every array and attribute of `store` to `path` (HDF5), atomically.

    Raises:
        OutputError: not writable or disk full (no half-written file is left), or `path` holds
            something other than an earlier export (it is left as it is).
    """
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not _is_export(path):
        raise OutputError(errno.EEXIST, f"{path}: exists and is not an HDF5 export of lessons; lessons only "
                                        "replaces its own exports: choose another file name or move it away")
    tmp = None
    try:
        tmp = temporary_sibling(path)
        with h5py.File(tmp, "w") as f:
            for name in sorted(store.group.array_keys()):
                f.create_dataset(name, data=store.read(name), compression="gzip", compression_opts=4)
            for key, value in sorted(store.attrs.items()):
                f.attrs[key] = json.dumps(value)
            f.attrs["lessons_export"] = json.dumps(True)
        tmp.replace(path)
    except BaseException as exc:  # e.g. a damaged chunk: no half-written export stays behind
        if tmp is not None:
            with contextlib.suppress(OSError):  # e.g. ENOTDIR: the cause, not a second error
                tmp.unlink()
        if isinstance(exc, OSError):
            raise OutputError(exc.errno, describe_os_error(exc, path)) from exc
        raise
    logger.info("%s: exported %s", path, store.path)


def _is_export(path: Path) -> bool:
    """Whether `path` is a regular file written by `export_h5` (an HDF5 file marked as ours)."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return "lessons_export" in f.attrs
    except OSError:
        return False


def read_h5(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """All datasets (in memory) and attributes of an HDF5 file.

    Attributes written by `export_h5` are decoded from JSON; foreign attributes are returned as is.

    Raises:
        H5Error: missing or not an HDF5 file.
    """
    path = Path(path)
    if not path.is_file():
        raise H5Error(f"{path}: no such file")
    try:
        with h5py.File(path, "r") as f:
            arrays = {name: f[name][...] for name in f.keys() if isinstance(f[name], h5py.Dataset)}
            raw_attrs = dict(f.attrs)
    except OSError as exc:
        raise H5Error(f"{path}: not a readable HDF5 file ({exc})") from exc
    exported = "lessons_export" in raw_attrs
    attrs: dict[str, Any] = {}
    for key, value in raw_attrs.items():
        if key == "lessons_export":
            continue
        attrs[key] = json.loads(value) if exported else (value.item() if hasattr(value, "item") else value)
    return arrays, attrs

"""HDF5 import/export: teacher logits computed elsewhere in, any store out.

Export writes every array of a store as an HDF5 dataset and every attribute as a JSON string
attribute (so nested attributes survive), which `read_h5` reads back bit for bit.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from storage.atomic import OutputError, describe_os_error, temporary_sibling
from storage.errors import LessonsError
from storage.soft_labels import SoftLabelStore

logger = logging.getLogger(__name__)


class H5Error(LessonsError, ValueError):
    """An HDF5 file is missing, unreadable or lacks the datasets asked for."""


def export_h5(store: SoftLabelStore, path: str | Path) -> None:
    """Write every array and attribute of `store` to `path` (HDF5), atomically.

    Raises:
        OutputError: not writable or disk full (no half-written file is left), or `path` holds
            something other than an earlier export (it is left as it is).
    """
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not _is_export(path):
        raise OutputError(
            errno.EEXIST,
            f"{path}: exists and is not an HDF5 export of lessons; lessons only "
            "replaces its own exports: choose another file name or move it away",
        )
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
        with H5Source(path) as source:
            return source.exported
    except H5Error:
        return False


class H5Source:
    """An HDF5 file opened read-only whose datasets and attributes are read only when asked for.

    Use as a context manager. Nothing is read on opening, so large datasets and attributes of
    types lessons does not know cost nothing unless asked for by name.

    Raises:
        H5Error: (on entering) missing or not an HDF5 file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: h5py.File | None = None

    def __enter__(self) -> H5Source:
        if not self.path.is_file():
            raise H5Error(f"{self.path}: no such file")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise H5Error(f"{self.path}: not a readable HDF5 file ({exc})") from exc
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def file(self) -> h5py.File:
        assert self._file is not None, "use H5Source as a context manager"
        return self._file

    @property
    def exported(self) -> bool:
        """Whether `export_h5` wrote the file (its attributes are then JSON strings)."""
        return "lessons_export" in self.file.attrs

    def names(self) -> list[str]:
        """The top-level datasets' names (groups and other objects left out)."""
        return [name for name in self.file if isinstance(self.file.get(name), h5py.Dataset)]

    def dataset(self, name: str) -> h5py.Dataset | None:
        """The top-level dataset `name` (shape and dtype only; no data read), None if absent."""
        found = self.file.get(name)
        return found if isinstance(found, h5py.Dataset) else None

    def read(self, name: str, index: Any = ()) -> np.ndarray:
        """`dataset[index]` in memory, e.g. a slice or an increasing list of rows.

        Raises:
            H5Error: no such dataset, or its data cannot be read (a damaged file, a missing
                compression filter).
        """
        found = self.dataset(name)
        if found is None:
            raise H5Error(f"{self.path}: no dataset named {name!r}")
        try:
            return np.asarray(found[index])
        except (OSError, ValueError, TypeError) as exc:
            raise H5Error(
                f"{self.path}: dataset {name!r} cannot be read ({exc}); "
                "the file is damaged or needs a filter h5py lacks"
            ) from exc

    def attr(self, key: str, default: Any = None) -> Any:
        """Top-level attribute `key` as plain Python, `default` if absent.

        An exported file's attributes are decoded from JSON. A foreign attribute becomes a
        Python scalar, str (bytes decoded when UTF-8), list (arrays, nested for n-D) or None
        (an empty attribute).

        Raises:
            H5Error: naming the file and the attribute, when its value cannot be read or (in an
                exported file) is not JSON.
        """
        if key not in self.file.attrs:
            return default
        try:
            raw = self.file.attrs[key]
        except (OSError, TypeError, ValueError) as exc:  # e.g. a type h5py cannot map to numpy
            raise H5Error(
                f"{self.path}: attribute {key!r} cannot be read ({exc}); "
                "rewrite it as a number, string or numeric array"
            ) from exc
        value = _plain(raw)
        if not self.exported:
            return value
        try:
            return json.loads(value)
        except (TypeError, ValueError) as exc:
            raise H5Error(
                f"{self.path}: attribute {key!r} is not the JSON text that lessons export "
                f"writes ({exc}); re-export the store"
            ) from exc


def _plain(value: Any) -> Any:
    """An attribute value as plain Python: numpy scalars and size-1 arrays to scalars, other
    arrays to (nested) lists, UTF-8 bytes to str, an empty attribute to None."""
    if isinstance(value, h5py.Empty):
        return None
    if isinstance(value, np.ndarray):
        return _plain(value.item()) if value.size == 1 else [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


def read_h5(
    path: str | Path, names: Iterable[str] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Datasets (in memory) and attributes of an HDF5 file.

    Args:
        path: the file. names: the datasets to read (those absent are left out); None reads
            every top-level dataset (the export round trip).
    Returns:
        (name -> array, attribute -> value). Attributes written by `export_h5` are decoded from
        JSON; foreign ones are plain Python (see `H5Source.attr`).
    Raises:
        H5Error: missing or not an HDF5 file, a dataset that cannot be read, or an attribute
            that cannot be read (naming it).
    """
    with H5Source(path) as source:
        wanted = source.names() if names is None else [n for n in names if source.dataset(n) is not None]
        arrays = {name: source.read(name) for name in wanted}
        attrs = {key: source.attr(key) for key in source.file.attrs if key != "lessons_export"}
    return arrays, attrs

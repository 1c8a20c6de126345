"""Storage: zarr soft-label stores, FFCV betons, HDF5 import/export, manifests, atomic writes.

Imports no torch models and no stage code (DESIGN.md §2).
"""

from storage.atomic import OutputError, atomic_write_json, partial_path
from storage.errors import LessonsError, SettingsError
from storage.manifest import dataset_fingerprint, write_manifest
from storage.soft_labels import ArraySpec, StoreError, StoreWriter, checked_reads, open_store

__all__ = [
    "ArraySpec",
    "LessonsError",
    "OutputError",
    "SettingsError",
    "StoreError",
    "StoreWriter",
    "atomic_write_json",
    "checked_reads",
    "dataset_fingerprint",
    "open_store",
    "partial_path",
    "write_manifest",
]

"""Storage: zarr soft-label stores, FFCV betons, HDF5 import/export, manifests, atomic writes.

Imports no torch models and no stage code (DESIGN.md §2).
"""
from storage.atomic import OutputError, atomic_write_json, exclusive_lock, partial_path
from storage.manifest import ManifestError, dataset_fingerprint, read_manifest, write_manifest
from storage.soft_labels import (
    SCHEMA_VERSION,
    ArraySpec,
    SoftLabelStore,
    StoreError,
    StoreWriter,
    checked_reads,
    open_store,
)

__all__ = [
    "SCHEMA_VERSION", "ArraySpec", "ManifestError", "OutputError", "SoftLabelStore", "StoreError",
    "StoreWriter", "atomic_write_json", "checked_reads", "dataset_fingerprint", "exclusive_lock", "open_store",
    "partial_path", "read_manifest", "write_manifest",
]

"""Dataset fingerprints and `manifest.json`, the record of what a prepared dataset is.

The fingerprint is what ties every store to the exact images and labels it was computed from:
sha256 over a version tag, the image array's shape and dtype, the labels and the image bytes,
in canonical order. Changing one pixel, one label, the order or the subset changes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from storage.atomic import atomic_write_json
from storage.errors import LessonsError

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1


class ManifestError(LessonsError, ValueError):
    """`manifest.json` is missing, unreadable or of another version."""


def dataset_fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 hex digest identifying one split.

    Args:
        images: (N, H, W, C) uint8. labels: (N,) integer.
    Returns:
        64 hex characters; equal iff shapes, dtypes, labels and every image byte are equal.
    """
    digest = hashlib.sha256(b"lessons-dataset-fingerprint-v1\n")
    digest.update(json.dumps([list(images.shape), str(images.dtype), list(labels.shape)]).encode())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    images = np.ascontiguousarray(images)
    step = 4096  # hash in slices so a large dataset is never copied whole
    for start in range(0, images.shape[0], step):
        digest.update(images[start : start + step].tobytes())
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> None:
    """Write `manifest.json` atomically, with `manifest_version` added."""
    atomic_write_json(path, {**manifest, "manifest_version": MANIFEST_VERSION})


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read `manifest.json` written by `prepare-data`.

    Raises:
        ManifestError: missing, not JSON, or another manifest version.
    """
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ManifestError(f"{path}: no dataset manifest; run `lessons prepare-data` first") from exc
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc}); rerun `lessons prepare-data`") from exc
    if not isinstance(manifest, dict):
        raise ManifestError(
            f"{path}: not a dataset manifest (a JSON {type(manifest).__name__}); rerun `lessons prepare-data`"
        )
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise ManifestError(
            f"{path}: manifest version {manifest.get('manifest_version')!r}, "
            f"expected {MANIFEST_VERSION}; rerun `lessons prepare-data`"
        )
    required = ("dataset", "num_classes", "image_shape", "pixel_mean", "pixel_std", "splits")
    missing = [key for key in required if key not in manifest]
    if (
        missing
        or not isinstance(manifest["splits"], dict)
        or not {"train", "test"} <= set(manifest["splits"])
    ):
        raise ManifestError(
            f"{path}: the manifest lacks {missing or ['splits.train/test']}; it was edited or "
            "truncated: rerun `lessons prepare-data`"
        )
    return manifest


def read_prepared(data_dir: str | Path, verify_betons: bool = True) -> dict[str, Any]:
    """The manifest of a prepared dataset folder, after checking its betons are the ones it lists.

    Raises:
        ManifestError: no manifest, a beton missing, or a beton whose sha256 differs from the
            manifest's (the folder was partly overwritten: rerun `lessons prepare-data`).
    """
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir / "manifest.json")
    if verify_betons:
        for split, info in manifest["splits"].items():
            beton = data_dir / f"{split}.beton"
            if not beton.is_file():
                raise ManifestError(f"{beton}: missing; rerun `lessons prepare-data`")
            if file_sha256(beton) != info.get("beton_sha256"):
                raise ManifestError(
                    f"{beton}: does not match {data_dir / 'manifest.json'} "
                    "(sha256 differs); rerun `lessons prepare-data`"
                )
    return manifest


def read_labels(data_dir: str | Path, split: str, manifest: dict[str, Any]) -> np.ndarray:
    """The (N,) int64 labels of `split` in sample_index order, checked against the manifest.

    Raises:
        ManifestError: the file is missing or its length or class counts differ from the manifest.
    """
    path = Path(data_dir) / f"{split}-labels.npy"
    try:
        labels = np.load(path)
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: cannot read labels ({exc}); rerun `lessons prepare-data`") from exc
    info = manifest["splits"][split]
    counts = np.bincount(labels, minlength=manifest["num_classes"]).tolist() if labels.size else []
    if labels.shape != (info["num_samples"],) or counts != info["class_counts"]:
        raise ManifestError(f"{path}: does not match the manifest; rerun `lessons prepare-data`")
    return labels.astype(np.int64, copy=False)

"""A `.npz` file of packed JPEG bytes or uint8 arrays, in npz row order."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from pipeline.datasets.source import DatasetError, Source, array_source, decode


def load_npz(root: Path) -> tuple[tuple[str, ...], Source, Source]:
    """A `.npz` as in shared/data: JPEG bytes + offsets (`train_jpeg`, ...) or uint8 arrays."""
    if not root.is_file():
        raise DatasetError(f"{root} is not a file; set data.root to the .npz file itself")
    try:
        with np.load(root, allow_pickle=False) as packed:
            arrays = {key: packed[key] for key in packed.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DatasetError(
            f"{root}: not a readable .npz file ({exc}); replace it with an intact copy"
        ) from exc
    jpeg_keys = [f"{s}_{k}" for s in ("train", "test") for k in ("jpeg", "offsets", "labels")]
    array_keys = ["x_train", "y_train", "x_test", "y_test"]
    layout = next((keys for keys in (jpeg_keys, array_keys) if all(k in arrays for k in keys)), None)
    if layout is None or "class_names" not in arrays:
        raise DatasetError(
            f"{root}: keys {sorted(arrays)} are neither {jpeg_keys} nor {array_keys} "
            "(each plus class_names); repack it in one of the two layouts"
        )
    class_names = tuple(c.decode() if isinstance(c, bytes) else str(c) for c in arrays["class_names"])
    sources = []
    for split in ("train", "test"):
        labels = arrays[f"{split}_labels"] if layout is jpeg_keys else arrays[f"y_{split}"]
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(
                f"{root}: {split} labels must be a 1-D integer array, got "
                f"{labels.dtype} {labels.shape}; repack the file"
            )
        labels = labels.astype(np.int64)
        if layout is array_keys:
            images = arrays[f"x_{split}"]
            if images.ndim == 3:
                images = images[..., None]
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
                raise DatasetError(
                    f"{root}: x_{split} must be uint8 (N, H, W[, C]) with C in {{1, 3}}, got "
                    f"{images.dtype} {images.shape}; repack the file"
                )
            sources.append(array_source(np.ascontiguousarray(images), labels, f"{root}: {split}"))
            continue
        buffer, offsets = arrays[f"{split}_jpeg"], arrays[f"{split}_offsets"].astype(np.int64)
        if (
            buffer.dtype != np.uint8
            or offsets.shape != (len(labels) + 1,)
            or offsets[0] < 0
            or offsets[-1] > len(buffer)
            or np.any(np.diff(offsets) < 0)
        ):
            raise DatasetError(
                f"{root}: {split}_offsets must be N+1 = {len(labels) + 1} non-decreasing "
                f"positions into the uint8 {split}_jpeg buffer; repack the file"
            )

        def read(idx: np.ndarray, buffer=buffer, offsets=offsets, split=split) -> np.ndarray:
            blobs = [buffer[offsets[i] : offsets[i + 1]].tobytes() for i in idx]
            return decode(blobs, [f"{root}: {split} row {i}" for i in idx])

        sources.append(Source(labels, read))
    return class_names, sources[0], sources[1]

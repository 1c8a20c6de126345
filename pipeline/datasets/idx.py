"""Fashion-MNIST from its four IDX files (gzip-compressed or not), in IDX file order."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from pipeline.datasets.source import DatasetError, Source, array_source


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (magic 0x0000080<ndim>), gzip-compressed or not."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(
                f"{path}: not a valid gzip file ({exc}); replace it with an intact copy"
            ) from exc
    magic = raw[:4]
    if magic != bytes([0, 0, 0x08, ndim]):
        raise DatasetError(
            f"{path}: bad IDX magic number 0x{magic.hex()} (expected 0x0000080{ndim}); "
            "the file is corrupt or not this IDX file, replace it with an intact copy"
        )
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header]) if len(raw) >= header else ()
    expected = header + int(np.prod(dims, dtype=np.int64)) if dims else header
    if len(raw) != expected:
        raise DatasetError(
            f"{path}: {len(raw)} bytes but an IDX file of shape {dims} needs {expected}; "
            "the file is truncated or corrupt, replace it with an intact copy"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy()


def _idx_split(root: Path, prefix: str) -> Source:
    arrays = []
    for stem, ndim in ((f"{prefix}-images-idx3-ubyte", 3), (f"{prefix}-labels-idx1-ubyte", 1)):
        path = next((p for p in (root / stem, root / f"{stem}.gz") if p.is_file()), None)
        if path is None:
            raise DatasetError(
                f"no {stem} or {stem}.gz under {root}; point data.root at the folder "
                "holding the four IDX files"
            )
        arrays.append(_read_idx(path, ndim))
    images, labels = arrays
    return array_source(images[..., None], labels, f"{root}/{prefix}-*")


FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def load_fashion_mnist(root: Path) -> tuple[tuple[str, ...], Source, Source]:
    return FASHION_MNIST_CLASSES, _idx_split(root, "train"), _idx_split(root, "t10k")

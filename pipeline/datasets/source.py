"""What every dataset loader returns: a `Source` per split, plus the shared image decoder.

A loader maps a root to (class names, train source, test source). A source holds the labels of the
whole split and reads the images of the rows it is asked for, so a small subset of a JPEG or
image-folder dataset decodes only those rows.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from storage.errors import LessonsError


class DatasetError(LessonsError, ValueError):
    """A dataset is unknown, missing, corrupt or inconsistent (one line: what + how to fix)."""


class Source(NamedTuple):
    labels: np.ndarray  # (N,) int64, canonical order
    read_images: Callable[[np.ndarray], np.ndarray]  # sorted indices -> (n, H, W, C) uint8


def array_source(images: np.ndarray, labels: np.ndarray, where: str) -> Source:
    if len(images) != len(labels):
        raise DatasetError(f"{where}: {len(images)} images but {len(labels)} labels; the files disagree")
    n = len(labels)
    read = lambda idx: images if len(idx) == n else np.ascontiguousarray(images[idx])  # noqa: E731
    return Source(labels.astype(np.int64), read)


_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def decode(sources: Sequence[Path | bytes], names: Sequence[str]) -> np.ndarray:
    """Decode images with Pillow to (n, H, W, 3) RGB, or (n, H, W, 1) when every one is grey."""
    images: np.ndarray | None = None
    all_grey = True
    for i, (source, name) in enumerate(zip(sources, names, strict=True)):
        try:
            with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as image:
                if image.mode in _GREY_MODES:
                    pixels = np.asarray(image.convert("L"))[..., None]
                else:
                    pixels = np.asarray(image.convert("RGB"))
                    all_grey = False
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DatasetError(f"{name}: cannot decode the image ({exc}); replace or remove it") from exc
        if images is None:
            images, first = np.empty((len(sources), *pixels.shape[:2], 3), np.uint8), name
        elif pixels.shape[:2] != images.shape[1:3]:
            raise DatasetError(
                f"{name}: image is {pixels.shape[1]}x{pixels.shape[0]} but {first} is "
                f"{images.shape[2]}x{images.shape[1]}; resize all images to one size"
            )
        images[i] = pixels  # a grey (H, W, 1) image fills R=G=B, exactly as Pillow's L->RGB
    if images is None:
        return np.empty((0, 1, 1, 3), np.uint8)
    return np.ascontiguousarray(images[..., :1]) if all_grey else images

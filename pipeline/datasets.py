"""Offline datasets by name: one registry, one in-memory format, one canonical order.

`load_dataset(DataConfig)` returns a `Dataset` whose splits hold (N, H, W, C) uint8 images and
(N,) int64 labels in the dataset's **canonical order** -- the order its source defines, the same on
every machine:

| name            | source under `data.root`                          | canonical order             |
|-----------------|---------------------------------------------------|-----------------------------|
| `fashion_mnist` | IDX files `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]` | IDX file order  |
| `cifar10`       | torchvision's `cifar-10-batches-py/` pickles      | batch 1..5 then rows        |
| `cifar100`      | torchvision's `cifar-100-python/` pickles (fine labels) | file row order        |
| `npz`           | a `.npz` file: packed JPEG bytes or uint8 arrays  | npz row order               |
| `imagefolder`   | `train/<class>/*`, `val|test/<class>/*`, or Tiny ImageNet | (class name, file name) |

A `sample_index` is a position in that order *after* subsetting (`balanced_subset`) and, when
`data.validation_fraction` > 0, after the `val` rows (`validation_split`) are taken out of the
train split: the train split keeps its remaining rows in canonical order. Nothing is ever
downloaded. Adding a dataset is one loader function plus one `_REGISTRY` entry.
"""
from __future__ import annotations

import difflib
import gzip
import io
import logging
import pickle
import struct
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from pipeline.config import DataConfig

logger = logging.getLogger(__name__)

__all__ = [
    "DatasetError", "Split", "Dataset", "available_datasets", "data_root", "default_root", "load_dataset",
    "balanced_subset", "validation_split",
]


class DatasetError(ValueError):
    """A dataset is unknown, missing, corrupt or inconsistent (one line: what + how to fix)."""


def _check_split(images: np.ndarray, labels: np.ndarray, where: str) -> None:
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
            and images.shape[3] in (1, 3) and images.flags.c_contiguous):
        shape, dtype = getattr(images, "shape", None), getattr(images, "dtype", type(images))
        raise DatasetError(f"{where} images: need a C-contiguous (N, H, W, C) uint8 array with "
                           f"C in {{1, 3}}, got shape {shape} dtype {dtype}")
    if not (isinstance(labels, np.ndarray) and labels.dtype == np.int64 and labels.ndim == 1):
        raise DatasetError(f"{where} labels: need an (N,) int64 array, got "
                           f"shape {getattr(labels, 'shape', None)} dtype {getattr(labels, 'dtype', None)}")
    if len(images) != len(labels):
        raise DatasetError(f"{where}: {len(images)} images but {len(labels)} labels; "
                           "every image needs exactly one label")


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    if len(labels) == 0:
        return
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        row = int(bad[0])
        raise DatasetError(f"{where} label {int(labels[row])} at row {row} is outside "
                           f"[0, {num_classes}) ({len(bad)} such rows); fix the labels or the class names")


@dataclass(frozen=True, eq=False)
class Split:
    """One split in canonical order.

    Attributes:
        images: (N, H, W, C) uint8, C in {1, 3}, C-contiguous, HWC with RGB channel order.
        labels: (N,) int64 in [0, num_classes).
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        _check_split(self.images, self.labels, "split")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True, eq=False)
class Dataset:
    """The splits of a dataset plus its class names (index c names class c).

    `val` is None unless `data.validation_fraction` > 0; then it holds the train rows held out
    (`validation_split`) and `val_source_index` their positions in the source's canonical train
    order (before any `max_train_samples` subset), (N_val,) int64, ascending.
    """

    name: str
    class_names: tuple[str, ...]
    train: Split
    test: Split
    val: Split | None = None
    val_source_index: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not self.class_names:
            raise DatasetError(f"{self.name}: no class names")
        if self.train.images.shape[1:] != self.test.images.shape[1:]:
            raise DatasetError(f"{self.name}: train images are {self.train.images.shape[1:]} but "
                               f"test images are {self.test.images.shape[1:]}; both splits need one shape")
        for split_name, split in self.splits().items():
            _check_labels(split.labels, self.num_classes, f"{self.name}: {split_name}")

    def splits(self) -> dict[str, Split]:
        """{"train", "val" (when there is one), "test"} -> Split, in that order."""
        named = {"train": self.train, "val": self.val, "test": self.test}
        return {name: split for name, split in named.items() if split is not None}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image in both splits."""
        return tuple(int(d) for d in self.train.images.shape[1:])  # type: ignore[return-value]


def balanced_subset(labels: np.ndarray, max_samples: int | None, seed: int, split: str) -> np.ndarray:
    """Pick a class-balanced, seeded subset of a split, keeping canonical order.

    Each of the C classes present gets max_samples // C rows; the remainder goes one row each to
    the first classes of a seeded class permutation. A class with fewer rows gives all of them and
    its shortfall is spread over the other classes the same way, so exactly
    min(max_samples, N) rows come back. Within a class the rows are the first ones of a seeded
    permutation, so a larger quota keeps every row a smaller one picked.

    Args:
        labels: (N,) integer class ids.
        max_samples: rows wanted; None (or >= N) means every row.
        seed: `data.seed`. The generator is `default_rng(SeedSequence([seed, 0 | 1]))`, 0 for the
            train split and 1 for test, so the two splits draw independent streams.
        split: "train" or "test".
    Returns:
        (min(max_samples, N),) int64 indices into `labels`, sorted ascending, unique.
    Raises:
        ValueError: `split` is not train/test, `max_samples` < 1, or labels are not 1-D integers.
    """
    streams = {"train": 0, "test": 1}
    if split not in streams:
        raise ValueError(f"balanced_subset: split must be 'train' or 'test', got {split!r}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or len(labels) == 0):
        raise ValueError(f"balanced_subset: labels must be a 1-D integer array, got "
                         f"shape {labels.shape} dtype {labels.dtype}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"balanced_subset: max_samples must be None or >= 1, got {max_samples}")
    if max_samples is None or max_samples >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([seed, streams[split]]))
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    class_order = rng.permutation(len(classes))
    quota = np.zeros(len(classes), dtype=np.int64)
    remaining = max_samples
    while remaining > 0:  # water-filling: each pass fills or exhausts at least one class
        open_classes = class_order[quota[class_order] < counts[class_order]]
        share, extra = divmod(remaining, len(open_classes))
        if share == 0:
            quota[open_classes[:extra]] += 1
            break
        add = np.minimum(share, counts[open_classes] - quota[open_classes])
        quota[open_classes] += add
        remaining -= int(add.sum())
    picked = []
    for c in range(len(classes)):
        members = np.flatnonzero(inverse == c)
        picked.append(members[rng.permutation(len(members))[: quota[c]]])
    return np.sort(np.concatenate(picked)).astype(np.int64)


VALIDATION_STREAM = 2  # the SeedSequence stream of `validation_split` (0: train subset, 1: test)


def validation_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the train rows into (train, val), stratified by class and seeded.

    Each class c with n_c rows gives round(fraction · n_c) of them to `val` (Python's round, half
    to even), at most n_c − 1 so that every class keeps a training row: the class proportions of
    `val` are those of the train split (a balanced train split gives a balanced `val`). Within a
    class the rows are the first ones of a permutation drawn from
    `default_rng(SeedSequence([seed, VALIDATION_STREAM]))`, so the split depends only on the
    labels, `fraction` and `seed`.

    Args:
        labels: (N,) integer class ids of the train split (after any `max_train_samples` subset).
        fraction: `data.validation_fraction`, in [0, 1); 0 gives an empty `val`.
        seed: `data.seed`.
    Returns:
        (train_rows, val_rows): int64 indices into `labels`, each sorted ascending, disjoint, and
        together every row once.
    Raises:
        ValueError: `fraction` outside [0, 1), labels not 1-D integers, or `fraction` > 0 but too
            small to hold out a single row.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or len(labels) == 0):
        raise ValueError(f"validation_split: labels must be a 1-D integer array, got "
                         f"shape {labels.shape} dtype {labels.dtype}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"data.validation_fraction: must lie in [0, 1), got {fraction}")
    everything = np.arange(len(labels), dtype=np.int64)
    if fraction == 0.0:
        return everything, np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([seed, VALIDATION_STREAM]))
    classes, inverse = np.unique(labels, return_inverse=True)
    held = []
    for c in range(len(classes)):
        members = np.flatnonzero(inverse == c)
        quota = min(round(fraction * len(members)), len(members) - 1)
        held.append(members[rng.permutation(len(members))[:quota]])
    val_rows = np.sort(np.concatenate(held)).astype(np.int64)
    if len(val_rows) == 0:
        raise ValueError(f"data.validation_fraction: {fraction} of {len(labels)} training images holds out "
                         f"no image of any class (round(fraction × class size) = 0); raise it or set 0.0")
    keep = np.ones(len(labels), dtype=bool)
    keep[val_rows] = False
    return everything[keep], val_rows


# ---------------------------------------------------------------------------------------------
# Loaders: each maps a root to (class names, train source, test source). A source holds the
# labels of the whole split and reads the images of the rows it is asked for, so a small subset
# of a JPEG or image-folder dataset decodes only those rows.


class _Source(NamedTuple):
    labels: np.ndarray  # (N,) int64, canonical order
    read_images: Callable[[np.ndarray], np.ndarray]  # sorted indices -> (n, H, W, C) uint8


def _array_source(images: np.ndarray, labels: np.ndarray, where: str) -> _Source:
    if len(images) != len(labels):
        raise DatasetError(f"{where}: {len(images)} images but {len(labels)} labels; the files disagree")
    n = len(labels)
    read = lambda idx: images if len(idx) == n else np.ascontiguousarray(images[idx])  # noqa: E731
    return _Source(labels.astype(np.int64), read)


_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


def _decode(sources: Sequence[Path | bytes], names: Sequence[str]) -> np.ndarray:
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
            raise DatasetError(f"{name}: image is {pixels.shape[1]}x{pixels.shape[0]} but {first} is "
                               f"{images.shape[2]}x{images.shape[1]}; resize all images to one size")
        images[i] = pixels  # a grey (H, W, 1) image fills R=G=B, exactly as Pillow's L->RGB
    if images is None:
        return np.empty((0, 1, 1, 3), np.uint8)
    return np.ascontiguousarray(images[..., :1]) if all_grey else images


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (magic 0x0000080<ndim>), gzip-compressed or not."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(f"{path}: not a valid gzip file ({exc}); "
                               "replace it with an intact copy") from exc
    magic = raw[:4]
    if magic != bytes([0, 0, 0x08, ndim]):
        raise DatasetError(f"{path}: bad IDX magic number 0x{magic.hex()} (expected 0x0000080{ndim}); "
                           "the file is corrupt or not this IDX file, replace it with an intact copy")
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header]) if len(raw) >= header else ()
    expected = header + int(np.prod(dims, dtype=np.int64)) if dims else header
    if len(raw) != expected:
        raise DatasetError(f"{path}: {len(raw)} bytes but an IDX file of shape {dims} needs {expected}; "
                           "the file is truncated or corrupt, replace it with an intact copy")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy()


def _idx_split(root: Path, prefix: str) -> _Source:
    arrays = []
    for stem, ndim in ((f"{prefix}-images-idx3-ubyte", 3), (f"{prefix}-labels-idx1-ubyte", 1)):
        path = next((p for p in (root / stem, root / f"{stem}.gz") if p.is_file()), None)
        if path is None:
            raise DatasetError(f"no {stem} or {stem}.gz under {root}; point data.root at the folder "
                               "holding the four IDX files")
        arrays.append(_read_idx(path, ndim))
    images, labels = arrays
    return _array_source(images[..., None], labels, f"{root}/{prefix}-*")


FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")


def _load_fashion_mnist(root: Path) -> tuple[tuple[str, ...], _Source, _Source]:
    return FASHION_MNIST_CLASSES, _idx_split(root, "train"), _idx_split(root, "t10k")


def _load_cifar(root: Path, hundred: bool) -> tuple[tuple[str, ...], _Source, _Source]:
    """Read torchvision's CIFAR layout by the file list torchvision itself declares.

    torchvision's `CIFAR10(root, download=False)` refuses any file whose md5 differs from the
    official release, so it cannot read a re-packed or generated copy. This reads the same pickles
    the same way (`pickle.load(encoding="latin1")`, `labels` or else `fine_labels`, CHW -> HWC),
    checks their structure instead, and only logs a warning on an md5 mismatch. Like torchvision,
    it unpickles: only point it at files you trust.
    """
    from torchvision.datasets import CIFAR10, CIFAR100
    from torchvision.datasets.utils import check_integrity

    spec = CIFAR100 if hundred else CIFAR10
    folder = root / spec.base_folder
    wanted = [name for name, _ in spec.train_list + spec.test_list] + [spec.meta["filename"]]
    missing = [name for name in wanted if not (folder / name).is_file()]
    if missing:
        title = "CIFAR-100" if hundred else "CIFAR-10"
        raise DatasetError(f"no torchvision {title} files under {root} (missing {folder}/{missing[0]}, "
                           f"expected {', '.join(wanted)}); download {title} yourself "
                           "(torchvision layout) and set data.root to the folder holding "
                           f"{spec.base_folder}/")

    def unpickle(name: str) -> dict:
        try:
            with open(folder / name, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            if not isinstance(entry, dict):
                raise TypeError(f"a {type(entry).__name__}, not a dict")
        except Exception as exc:  # any failure to unpickle means the file is not a CIFAR batch
            raise DatasetError(f"{folder / name}: not a CIFAR pickle ({exc}); replace it with an "
                               "intact copy") from exc
        return {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}

    for name, md5 in spec.train_list + spec.test_list + [(spec.meta["filename"], spec.meta["md5"])]:
        if not check_integrity(str(folder / name), md5):
            logger.warning("%s differs from the official release (md5); reading it anyway", folder / name)

    def split(files: list) -> _Source:
        images, labels = [], []
        for name, _ in files:
            entry = unpickle(name)
            data = np.asarray(entry.get("data"))
            batch_labels = entry.get("labels", entry.get("fine_labels"))
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or \
                    batch_labels is None or len(batch_labels) != len(data):
                raise DatasetError(f"{folder / name}: need 'data' uint8 (n, 3072) and n labels, got "
                                   f"{data.dtype} {data.shape}; replace it with an intact copy")
            images.append(data)
            labels.append(np.asarray(batch_labels, dtype=np.int64))
        hwc = np.vstack(images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return _array_source(np.ascontiguousarray(hwc), np.concatenate(labels), str(folder))

    meta = unpickle(spec.meta["filename"])
    if spec.meta["key"] not in meta:
        raise DatasetError(f"{folder / spec.meta['filename']}: no {spec.meta['key']!r} entry; "
                           "replace it with an intact copy")
    class_names = tuple(str(c) for c in meta[spec.meta["key"]])
    return class_names, split(spec.train_list), split(spec.test_list)


def _load_npz(root: Path) -> tuple[tuple[str, ...], _Source, _Source]:
    """A `.npz` as in shared/data: JPEG bytes + offsets (`train_jpeg`, ...) or uint8 arrays."""
    if not root.is_file():
        raise DatasetError(f"{root} is not a file; set data.root to the .npz file itself")
    try:
        with np.load(root, allow_pickle=False) as packed:
            arrays = {key: packed[key] for key in packed.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DatasetError(f"{root}: not a readable .npz file ({exc}); "
                           "replace it with an intact copy") from exc
    jpeg_keys = [f"{s}_{k}" for s in ("train", "test") for k in ("jpeg", "offsets", "labels")]
    array_keys = ["x_train", "y_train", "x_test", "y_test"]
    layout = next((keys for keys in (jpeg_keys, array_keys) if all(k in arrays for k in keys)), None)
    if layout is None or "class_names" not in arrays:
        raise DatasetError(f"{root}: keys {sorted(arrays)} are neither {jpeg_keys} nor {array_keys} "
                           "(each plus class_names); repack it in one of the two layouts")
    class_names = tuple(c.decode() if isinstance(c, bytes) else str(c) for c in arrays["class_names"])
    sources = []
    for split in ("train", "test"):
        labels = arrays[f"{split}_labels"] if layout is jpeg_keys else arrays[f"y_{split}"]
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(f"{root}: {split} labels must be a 1-D integer array, got "
                               f"{labels.dtype} {labels.shape}; repack the file")
        labels = labels.astype(np.int64)
        if layout is array_keys:
            images = arrays[f"x_{split}"]
            if images.ndim == 3:
                images = images[..., None]
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
                raise DatasetError(f"{root}: x_{split} must be uint8 (N, H, W[, C]) with C in {{1, 3}}, got "
                                   f"{images.dtype} {images.shape}; repack the file")
            sources.append(_array_source(np.ascontiguousarray(images), labels, f"{root}: {split}"))
            continue
        buffer, offsets = arrays[f"{split}_jpeg"], arrays[f"{split}_offsets"].astype(np.int64)
        if (buffer.dtype != np.uint8 or offsets.shape != (len(labels) + 1,) or offsets[0] < 0
                or offsets[-1] > len(buffer) or np.any(np.diff(offsets) < 0)):
            raise DatasetError(f"{root}: {split}_offsets must be N+1 = {len(labels) + 1} non-decreasing "
                               f"positions into the uint8 {split}_jpeg buffer; repack the file")

        def read(idx: np.ndarray, buffer=buffer, offsets=offsets, split=split) -> np.ndarray:
            blobs = [buffer[offsets[i]:offsets[i + 1]].tobytes() for i in idx]
            return _decode(blobs, [f"{root}: {split} row {i}" for i in idx])

        sources.append(_Source(labels, read))
    return class_names, sources[0], sources[1]


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    if (folder / "images").is_dir():  # Tiny ImageNet: train/<wnid>/images/*.JPEG beside boxes.txt
        folder = folder / "images"
    return sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in _IMAGE_SUFFIXES), key=lambda p: p.name)


def _folder_source(files_by_class: dict[str, list[Path]], class_index: dict[str, int]) -> _Source:
    paths = [p for name in sorted(files_by_class) for p in files_by_class[name]]
    labels = np.array([class_index[name] for name in sorted(files_by_class)
                       for _ in files_by_class[name]], dtype=np.int64)
    return _Source(labels, lambda idx: _decode([paths[i] for i in idx], [str(paths[i]) for i in idx]))


def _load_imagefolder(root: Path) -> tuple[tuple[str, ...], _Source, _Source]:
    """`train/<class>/*` with `val/<class>/*` (else `test/`, else `valid/`), or Tiny ImageNet.

    Tiny ImageNet: `train/<wnid>/images/*.JPEG` and `val/images/*.JPEG` labelled by
    `val/val_annotations.txt` (file, wnid, box; tab-separated). Class names are the sorted train
    folder names; rows are sorted by (class name, file name).
    """
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DatasetError(f"no train/ folder under {root}; lay images out as train/<class>/* and "
                           "val/<class>/* (or Tiny ImageNet's layout)")
    class_names = tuple(_class_folders(train_dir))
    if not class_names:
        raise DatasetError(f"{train_dir} has no class folders; put each class's images in train/<class>/")
    class_index = {name: c for c, name in enumerate(class_names)}

    def scan(split_dir: Path, names: Sequence[str]) -> dict[str, list[Path]]:
        files = {name: _image_files(split_dir / name) for name in names}
        empty = next((name for name in names if not files[name]), None)
        if empty is not None:
            suffixes = ", ".join(sorted(_IMAGE_SUFFIXES))
            raise DatasetError(f"{split_dir / empty} holds no image files ({suffixes}); "
                               "add its images or remove the folder")
        return files

    train = scan(train_dir, class_names)
    annotations = root / "val" / "val_annotations.txt"
    if annotations.is_file():
        image_dir = root / "val" / "images"
        present = {p.name: p for p in (_image_files(image_dir) if image_dir.is_dir() else [])}
        test: dict[str, list[Path]] = {}
        for line_no, line in enumerate(annotations.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2 or fields[1] not in class_index or fields[0] not in present:
                raise DatasetError(f"{annotations}:{line_no}: {line.strip()!r} needs an image in "
                                   f"{image_dir} and a wnid that is a train/ folder; fix the line")
            test.setdefault(fields[1], []).append(present.pop(fields[0]))
        if present:
            raise DatasetError(f"{image_dir / min(present)} has no line in {annotations}; "
                               "add one or remove the image")
        test = {name: sorted(paths, key=lambda p: p.name) for name, paths in test.items()}
    else:
        test_dir = next((root / d for d in ("val", "test", "valid") if (root / d).is_dir()), None)
        if test_dir is None:
            raise DatasetError(f"no val/, test/ or valid/ folder under {root}; add the evaluation "
                               "split as val/<class>/*")
        names = _class_folders(test_dir)
        unknown = [name for name in names if name not in class_index]
        if unknown:
            raise DatasetError(f"{test_dir / unknown[0]} is not a class of {train_dir}; rename or remove it")
        test = scan(test_dir, names)
    return class_names, _folder_source(train, class_index), _folder_source(test, class_index)


class _Entry(NamedTuple):
    loader: Callable[[Path], tuple[tuple[str, ...], _Source, _Source]]
    default_root: str | None
    hint: str  # how to get the data, for "missing" errors


_REGISTRY: dict[str, _Entry] = {
    "fashion_mnist": _Entry(_load_fashion_mnist, "/usr/share/datasets/fashion-mnist",
                            "install the Debian package dataset-fashion-mnist or set data.root to "
                            "a folder with the four IDX files"),
    "cifar10": _Entry(lambda root: _load_cifar(root, hundred=False), None,
                      "download CIFAR-10 yourself and set data.root to the folder holding "
                      "cifar-10-batches-py/"),
    "cifar100": _Entry(lambda root: _load_cifar(root, hundred=True), None,
                       "download CIFAR-100 yourself and set data.root to the folder holding "
                       "cifar-100-python/"),
    "npz": _Entry(_load_npz, None, "set data.root to a .npz file (see shared/data/README.md)"),
    "imagefolder": _Entry(_load_imagefolder, None,
                          "set data.root to a folder with train/<class>/* and val/<class>/*"),
}


def available_datasets() -> list[str]:
    """Names `data.name` accepts, sorted."""
    return sorted(_REGISTRY)


def default_root(name: str) -> str | None:
    """Where dataset `name` is read from when `data.root` is null (None: it must be set).

    Raises:
        DatasetError: unknown name.
    """
    return _entry(name).default_root


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise DatasetError(f"unknown dataset {name!r}; {hint}known: {', '.join(available_datasets())}")
    return _REGISTRY[name]


def data_root(config: DataConfig) -> Path:
    """The existing file or folder `config` reads its dataset from (`data.root`, or the dataset's
    default root when null; a relative path is relative to the working directory).

    Raises:
        DatasetError: unknown dataset name, root unset without a default, or root missing.
    """
    entry = _entry(config.name)
    root_text = config.root if config.root is not None else entry.default_root
    if root_text is None:
        raise DatasetError(f"{config.name}: data.root is not set and there is no default; {entry.hint}")
    root = Path(root_text).expanduser()
    if not root.exists():
        shown = root if root.is_absolute() else f"{root} (from {Path.cwd()})"
        raise DatasetError(f"{config.name}: {shown} does not exist; {entry.hint}")
    return root


def load_dataset(config: DataConfig) -> Dataset:
    """Load both splits of `config.name`, validate them and apply the balanced subsets.

    Args:
        config: `data` section: name, root (None = `default_root(name)`), max_train_samples,
            max_test_samples (None = all; more than the split = all), validation_fraction, seed.
    Returns:
        A `Dataset` in canonical order restricted to `balanced_subset` rows (sorted, so the
        canonical order is kept), with the `validation_split` rows of the train subset moved to
        `val` when `validation_fraction` > 0; sample_index n is row n of the returned split. Images decoded
        from files are RGB, or grey (C=1) when every decoded image of both splits is grey.
    Raises:
        DatasetError: unknown name, root unset or missing, missing/corrupt files, empty split,
            labels outside [0, C), images of inconsistent shape, or a validation fraction that
            holds out no image.
    """
    entry = _entry(config.name)
    root = data_root(config)
    started = time.perf_counter()
    try:
        class_names, *sources = entry.loader(root)
        arrays = {}
        for split, source, max_samples in (("train", sources[0], config.max_train_samples),
                                           ("test", sources[1], config.max_test_samples)):
            if len(source.labels) == 0:
                raise DatasetError(f"the {split} split of {root} is empty; add its samples")
            _check_labels(source.labels, len(class_names), f"{root}: {split}")
            if max_samples is not None and max_samples > len(source.labels):
                logger.warning("data.max_%s_samples is %d but %s has %d %s images: using all of them",
                               split, max_samples, root, len(source.labels), split)
            rows = balanced_subset(source.labels, max_samples, config.seed, split)
            if split == "train" and config.validation_fraction > 0.0:
                try:
                    kept, held = validation_split(source.labels[rows], config.validation_fraction, config.seed)
                except ValueError as exc:
                    raise DatasetError(str(exc)) from exc
                val_source_index = rows[held]
                arrays["val"] = (source.read_images(val_source_index), source.labels[val_source_index])
                rows = rows[kept]
            arrays[split] = (source.read_images(rows), source.labels[rows])
        channels = {images.shape[-1] for images, _ in arrays.values()}
        if channels == {1, 3}:  # a grey split beside an RGB one: replicate, exactly as L->RGB
            arrays = {split: (np.repeat(images, 3, axis=3) if images.shape[-1] == 1 else images, labels)
                      for split, (images, labels) in arrays.items()}
        splits = {}
        for split, (images, labels) in arrays.items():
            _check_split(images, labels, split)
            splits[split] = Split(images, labels)
        dataset = Dataset(config.name, tuple(class_names), splits["train"], splits["test"],
                          val=splits.get("val"),
                          val_source_index=val_source_index if "val" in splits else None)
    except DatasetError as exc:
        raise DatasetError(exc.args[0] if str(exc).startswith(config.name) else
                           f"{config.name}: {exc}") from exc
    logger.info("%s: %d train + %s%d test images of %s, %d classes, from %s in %.1f s", config.name,
                len(dataset.train), f"{len(dataset.val)} val + " if dataset.val is not None else "",
                len(dataset.test), dataset.image_shape, dataset.num_classes, root,
                time.perf_counter() - started)
    return dataset

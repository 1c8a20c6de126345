"""Offline datasets by name: one registry, one in-memory format, one canonical order.

`load_dataset(DataConfig)` returns a `Dataset` whose splits hold (N, H, W, C) uint8 images and
(N,) int64 labels in the dataset's **canonical order** -- the order its source defines, the same on
every machine:

| name            | source under `data.root`                          | canonical order             |
|-----------------|---------------------------------------------------|-----------------------------|
| `fashion_mnist` | IDX files `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]` | IDX file order  |
| `cifar10`       | torchvision's `cifar-10-batches-py/` pickles      | batch 1..5 then rows        |
| `cifar100`      | torchvision's `cifar-100-python/` pickles (fine labels) | file row order        |
| `cinic10`       | CINIC-10's `train/<class>/*.png`, `test/<class>/*.png` | (class, file name)  |
| `tinyimagenet`  | `tiny-imagenet-200/` (`wnids.txt`; `val/` is the test split) | (wnid, file name) |
| `npz`           | a `.npz` file: packed JPEG bytes or uint8 arrays  | npz row order               |
| `imagefolder`   | `train/<class>/*`, `val|test/<class>/*`, or Tiny ImageNet | (class name, file name) |

A `sample_index` is a position in that order *after* subsetting (`balanced_subset`) and, when
`data.validation_fraction` > 0, after the `val` rows (`validation_split`) are taken out of the
train split: the train split keeps its remaining rows in canonical order. Nothing is ever
downloaded. Each source has its own module (`idx`, `cifar`, `npz`, `imagefolder`, `cinic`,
`tinyimagenet`) returning `source.Source`s; adding a dataset is one such loader plus one
`_REGISTRY` entry (with, where the layout is fixed, a cheap `layout` check for `check_layout`).
"""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.config import DataConfig
from pipeline.datasets.cifar import check_cifar_layout, load_cifar
from pipeline.datasets.cinic import check_cinic10_layout, load_cinic10
from pipeline.datasets.idx import FASHION_MNIST_CLASSES, load_fashion_mnist
from pipeline.datasets.imagefolder import load_imagefolder
from pipeline.datasets.npz import load_npz
from pipeline.datasets.source import DatasetError, Source
from pipeline.datasets.subsets import VALIDATION_STREAM, balanced_subset, validation_split
from pipeline.datasets.tinyimagenet import load_tinyimagenet, tinyimagenet_wnids

logger = logging.getLogger(__name__)

__all__ = [
    "DatasetError",
    "Split",
    "Dataset",
    "available_datasets",
    "check_layout",
    "count_classes",
    "data_root",
    "default_root",
    "load_dataset",
    "balanced_subset",
    "validation_split",
    "FASHION_MNIST_CLASSES",
    "VALIDATION_STREAM",
]


def _check_split(images: np.ndarray, labels: np.ndarray, where: str) -> None:
    if not (
        isinstance(images, np.ndarray)
        and images.dtype == np.uint8
        and images.ndim == 4
        and images.shape[3] in (1, 3)
        and images.flags.c_contiguous
    ):
        shape, dtype = getattr(images, "shape", None), getattr(images, "dtype", type(images))
        raise DatasetError(
            f"{where} images: need a C-contiguous (N, H, W, C) uint8 array with "
            f"C in {{1, 3}}, got shape {shape} dtype {dtype}"
        )
    if not (isinstance(labels, np.ndarray) and labels.dtype == np.int64 and labels.ndim == 1):
        raise DatasetError(
            f"{where} labels: need an (N,) int64 array, got "
            f"shape {getattr(labels, 'shape', None)} dtype {getattr(labels, 'dtype', None)}"
        )
    if len(images) != len(labels):
        raise DatasetError(
            f"{where}: {len(images)} images but {len(labels)} labels; every image needs exactly one label"
        )


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    if len(labels) == 0:
        return
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        row = int(bad[0])
        raise DatasetError(
            f"{where} label {int(labels[row])} at row {row} is outside "
            f"[0, {num_classes}) ({len(bad)} such rows); fix the labels or the class names"
        )


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
            raise DatasetError(
                f"{self.name}: train images are {self.train.images.shape[1:]} but "
                f"test images are {self.test.images.shape[1:]}; both splits need one shape"
            )
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


class _Entry(NamedTuple):
    loader: Callable[[Path], tuple[tuple[str, ...], Source, Source]]
    default_root: str | None
    hint: str  # how to get the data, for "missing" errors
    # A cheap check of a fixed on-disk layout (files and folders exist; no image is read), for
    # `check_layout`; None: only the root's existence is checked before the loader runs.
    layout: Callable[[Path], object] | None = None


_REGISTRY: dict[str, _Entry] = {
    "fashion_mnist": _Entry(
        load_fashion_mnist,
        "/usr/share/datasets/fashion-mnist",
        "install the Debian package dataset-fashion-mnist or set data.root to "
        "a folder with the four IDX files",
    ),
    "cifar10": _Entry(
        lambda root: load_cifar(root, hundred=False),
        None,
        "download CIFAR-10 yourself and set data.root to the folder holding cifar-10-batches-py/",
    ),
    "cifar100": _Entry(
        lambda root: load_cifar(root, hundred=True),
        None,
        "download CIFAR-100 yourself and set data.root to the folder holding cifar-100-python/",
        lambda root: check_cifar_layout(root, hundred=True),
    ),
    "cinic10": _Entry(
        load_cinic10,
        None,
        "download CINIC-10 yourself and set data.root to the folder holding train/ valid/ test/",
        check_cinic10_layout,
    ),
    "tinyimagenet": _Entry(
        load_tinyimagenet,
        None,
        "download Tiny ImageNet yourself and set data.root to its tiny-imagenet-200/ folder",
        tinyimagenet_wnids,
    ),
    "npz": _Entry(load_npz, None, "set data.root to a .npz file (see shared/data/README.md)"),
    "imagefolder": _Entry(
        load_imagefolder, None, "set data.root to a folder with train/<class>/* and val/<class>/*"
    ),
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


def check_layout(config: DataConfig) -> None:
    """Check, without reading any image, that the dataset `config` names is laid out as its
    loader expects (`lessons check-params` runs this before any stage).

    Datasets with a fixed layout (`cifar100`, `cinic10`, `tinyimagenet`) check that their files
    and folders exist; the others only that the root does.
    Raises:
        DatasetError: unknown name, root unset or missing, or a missing file or folder (named,
            with the fix).
    """
    root = data_root(config)
    layout = _entry(config.name).layout
    if layout is None:
        return
    try:
        layout(root)
    except DatasetError as exc:
        raise DatasetError(f"{config.name}: {exc}") from exc


def count_classes(config: DataConfig) -> int:
    """The class count C of the dataset `config` names, from its class names (no image is read).

    Raises:
        DatasetError: unknown name, root unset or missing, or files the loader cannot read.
    """
    try:
        return len(_entry(config.name).loader(data_root(config))[0])
    except DatasetError as exc:
        raise DatasetError(
            exc.args[0] if str(exc).startswith(config.name) else f"{config.name}: {exc}"
        ) from exc


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
        for split, source, max_samples in (
            ("train", sources[0], config.max_train_samples),
            ("test", sources[1], config.max_test_samples),
        ):
            if len(source.labels) == 0:
                raise DatasetError(f"the {split} split of {root} is empty; add its samples")
            _check_labels(source.labels, len(class_names), f"{root}: {split}")
            if max_samples is not None and max_samples > len(source.labels):
                logger.warning(
                    "data.max_%s_samples is %d but %s has %d %s images: using all of them",
                    split,
                    max_samples,
                    root,
                    len(source.labels),
                    split,
                )
            rows = balanced_subset(source.labels, max_samples, config.seed, split)
            if split == "train" and config.validation_fraction > 0.0:
                try:
                    kept, held = validation_split(
                        source.labels[rows], config.validation_fraction, config.seed
                    )
                except ValueError as exc:
                    raise DatasetError(str(exc)) from exc
                val_source_index = rows[held]
                arrays["val"] = (source.read_images(val_source_index), source.labels[val_source_index])
                rows = rows[kept]
            arrays[split] = (source.read_images(rows), source.labels[rows])
        channels = {images.shape[-1] for images, _ in arrays.values()}
        if channels == {1, 3}:  # a grey split beside an RGB one: replicate, exactly as L->RGB
            arrays = {
                split: (np.repeat(images, 3, axis=3) if images.shape[-1] == 1 else images, labels)
                for split, (images, labels) in arrays.items()
            }
        splits = {}
        for split, (images, labels) in arrays.items():
            _check_split(images, labels, split)
            splits[split] = Split(images, labels)
        dataset = Dataset(
            config.name,
            tuple(class_names),
            splits["train"],
            splits["test"],
            val=splits.get("val"),
            val_source_index=val_source_index if "val" in splits else None,
        )
    except DatasetError as exc:
        raise DatasetError(
            exc.args[0] if str(exc).startswith(config.name) else f"{config.name}: {exc}"
        ) from exc
    logger.info(
        "%s: %d train + %s%d test images of %s, %d classes, from %s in %.1f s",
        config.name,
        len(dataset.train),
        f"{len(dataset.val)} val + " if dataset.val is not None else "",
        len(dataset.test),
        dataset.image_shape,
        dataset.num_classes,
        root,
        time.perf_counter() - started,
    )
    return dataset

"""Stage `prepare_data`: write the FFCV betons and `manifest.json` of one dataset.

Output folder `data/<dataset>/`: `train.beton`, `test.beton` (image, label, sample_index) and
`{train,test}-labels.npy` (int64 labels in sample_index order) and
`manifest.json` (sizes, classes, image shape, per-channel pixel mean/std of the train split,
each split's dataset fingerprint and each beton's sha256). With `data.validation_fraction` > 0
there is a third split, `val.beton` and `val-labels.npy`, whose manifest entry also lists
`source_index`: each val row's position in the source's canonical train order; the train split
then holds the other rows. With 0.0 the folder is byte-identical to one written before the
validation split existed (the manifest's `data` record leaves the key out). The folder is built as
`<out>.partial/` and renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from storage import dataset_fingerprint, partial_path, write_manifest
from storage.atomic import (
    OutputError,
    create_work_dir,
    describe_os_error,
    exclusive_lock,
    refuse_foreign_output,
    replace_dir,
)
from storage.beton import write_beton
from storage.manifest import file_sha256

if TYPE_CHECKING:
    from pipeline.config import DataConfig, PrepareDataConfig
    from pipeline.datasets import Dataset

logger = logging.getLogger(__name__)


def pixel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 (N, H, W, C) images, in [0, 1] units, float64 sums."""
    count = images.shape[0] * images.shape[1] * images.shape[2]
    total = np.zeros(images.shape[-1])
    squares = np.zeros(images.shape[-1])
    for start in range(0, images.shape[0], 8192):
        block = images[start : start + 8192].astype(np.float64) / 255.0
        total += block.sum(axis=(0, 1, 2))
        squares += (block**2).sum(axis=(0, 1, 2))
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 1e-12))
    return mean.tolist(), std.tolist()


def build_manifest(dataset: Dataset, data_config: DataConfig) -> dict[str, Any]:
    """The manifest of `dataset` (a pipeline.datasets.Dataset), without beton hashes."""
    mean, std = pixel_stats(dataset.train.images)
    splits = {}
    for split_name, split in dataset.splits().items():
        splits[split_name] = {
            "num_samples": int(split.labels.shape[0]),
            "fingerprint": dataset_fingerprint(split.images, split.labels),
            "class_counts": np.bincount(split.labels, minlength=dataset.num_classes).tolist(),
        }
    if dataset.val is not None and dataset.val_source_index is not None:
        splits["val"]["source_index"] = [int(i) for i in dataset.val_source_index]
    data = dataclasses.asdict(data_config)
    if data.get("validation_fraction") == 0.0:
        del data["validation_fraction"]  # the default: keep the manifest of a dataset without val as it was
    return {
        "dataset": dataset.name,
        "data": data,
        "num_classes": dataset.num_classes,
        "class_names": list(dataset.class_names),
        "image_shape": list(dataset.image_shape),
        "pixel_mean": mean,
        "pixel_std": std,
        "splits": splits,
    }


def run(
    config: PrepareDataConfig, dataset: Dataset, data_config: DataConfig, out_dir: str | Path
) -> dict[str, Any]:
    """Write `out_dir/{train,test}.beton` (and `val.beton`) and `out_dir/manifest.json` atomically.

    Args:
        config: PrepareDataConfig. dataset: a loaded pipeline.datasets.Dataset.
        data_config: the DataConfig it was loaded with (recorded in the manifest).
        out_dir: the dataset folder, e.g. `data/fashion_mnist`.
    Returns:
        the manifest.
    Raises:
        OutputError: `out_dir` is locked by another process, not writable, or the disk is full.
    """
    out_dir = Path(out_dir)
    what = "a prepared dataset"
    refuse_foreign_output(out_dir, "manifest.json", what, signature="manifest_version")
    work = partial_path(out_dir)
    manifest = build_manifest(dataset, data_config)
    with exclusive_lock(out_dir):
        try:
            create_work_dir(work)  # refuses a folder at that name that lessons did not make
        except OutputError:
            raise
        except OSError as exc:
            raise OutputError(exc.errno, describe_os_error(exc, work)) from exc
        try:
            for split_name, split in dataset.splits().items():
                beton = work / f"{split_name}.beton"
                write_beton(beton, split.images, split.labels, num_workers=config.num_workers)
                manifest["splits"][split_name]["beton_sha256"] = file_sha256(beton)
                np.save(work / f"{split_name}-labels.npy", split.labels.astype(np.int64))
            write_manifest(work / "manifest.json", manifest)
            replace_dir(work, out_dir, marker="manifest.json", what=what, signature="manifest_version")
        except BaseException as exc:
            shutil.rmtree(work, ignore_errors=True)  # the work folder created above: ours
            if isinstance(exc, OSError) and not isinstance(exc, OutputError):
                raise OutputError(exc.errno, describe_os_error(exc, out_dir)) from exc
            raise
    sizes = ", ".join(f"{info['num_samples']} {name}" for name, info in manifest["splits"].items())
    logger.info(
        "%s: %s ready (%s, %d classes, images %s)",
        out_dir,
        dataset.name,
        sizes,
        manifest["num_classes"],
        "x".join(map(str, manifest["image_shape"])),
    )
    return manifest

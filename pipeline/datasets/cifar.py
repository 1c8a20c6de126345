"""CIFAR-10 and CIFAR-100 from torchvision's pickles (batch 1..5 then rows; fine labels)."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np

from pipeline.datasets.source import DatasetError, Source, array_source

logger = logging.getLogger(__name__)


def check_cifar_layout(root: Path, hundred: bool) -> None:
    """Check that every pickle torchvision's layout declares is a file under `root` (none is read).

    Raises:
        DatasetError: naming the first missing file, the files expected and the fix.
    """
    from torchvision.datasets import CIFAR10, CIFAR100

    spec = CIFAR100 if hundred else CIFAR10
    folder = root / spec.base_folder
    wanted = [name for name, _ in spec.train_list + spec.test_list] + [spec.meta["filename"]]
    missing = [name for name in wanted if not (folder / name).is_file()]
    if missing:
        title = "CIFAR-100" if hundred else "CIFAR-10"
        raise DatasetError(
            f"no torchvision {title} files under {root} (missing {folder}/{missing[0]}, "
            f"expected {', '.join(wanted)}); download {title} yourself "
            "(torchvision layout) and set data.root to the folder holding "
            f"{spec.base_folder}/"
        )


def load_cifar(root: Path, hundred: bool) -> tuple[tuple[str, ...], Source, Source]:
    """Read torchvision's CIFAR layout by the file list torchvision itself declares.

    torchvision's `CIFAR10(root, download=False)` refuses any file whose md5 differs from the
    official release, so it cannot read a re-packed or generated copy. This reads the same pickles
    the same way (`pickle.load(encoding="latin1")`, `labels` or else `fine_labels`, CHW -> HWC),
    checks their structure instead, and only logs a warning on an md5 mismatch. Like torchvision,
    it unpickles: only point it at files you trust.
    """
    from torchvision.datasets import CIFAR10, CIFAR100
    from torchvision.datasets.utils import check_integrity

    check_cifar_layout(root, hundred)
    spec = CIFAR100 if hundred else CIFAR10
    folder = root / spec.base_folder

    def unpickle(name: str) -> dict:
        try:
            with open(folder / name, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            if not isinstance(entry, dict):
                raise TypeError(f"a {type(entry).__name__}, not a dict")
        except Exception as exc:  # any failure to unpickle means the file is not a CIFAR batch
            raise DatasetError(
                f"{folder / name}: not a CIFAR pickle ({exc}); replace it with an intact copy"
            ) from exc
        return {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}

    for name, md5 in spec.train_list + spec.test_list + [(spec.meta["filename"], spec.meta["md5"])]:
        if not check_integrity(str(folder / name), md5):
            logger.warning("%s differs from the official release (md5); reading it anyway", folder / name)

    def split(files: list) -> Source:
        images, labels = [], []
        for name, _ in files:
            entry = unpickle(name)
            data = np.asarray(entry.get("data"))
            batch_labels = entry.get("labels", entry.get("fine_labels"))
            if (
                data.dtype != np.uint8
                or data.ndim != 2
                or data.shape[1] != 3 * 32 * 32
                or batch_labels is None
                or len(batch_labels) != len(data)
            ):
                raise DatasetError(
                    f"{folder / name}: need 'data' uint8 (n, 3072) and n labels, got "
                    f"{data.dtype} {data.shape}; replace it with an intact copy"
                )
            images.append(data)
            labels.append(np.asarray(batch_labels, dtype=np.int64))
        hwc = np.vstack(images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return array_source(np.ascontiguousarray(hwc), np.concatenate(labels), str(folder))

    meta = unpickle(spec.meta["filename"])
    if spec.meta["key"] not in meta:
        raise DatasetError(
            f"{folder / spec.meta['filename']}: no {spec.meta['key']!r} entry; replace it with an intact copy"
        )
    class_names = tuple(str(c) for c in meta[spec.meta["key"]])
    return class_names, split(spec.train_list), split(spec.test_list)

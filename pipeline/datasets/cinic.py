"""CINIC-10 (Darlow et al. 2018, arXiv:1810.03505) in its release layout, the paper's second dataset.

`CINIC-10/` holds `train/`, `valid/` and `test/`, each with one folder per CIFAR-10 class of
32×32 PNGs (90 000 images a split, 9 000 a class). lessons trains on `train/` and tests on
`test/`, the release's own roles; `valid/` is not read (hold out `data.validation_fraction` of
`train/` to tune). Which splits arXiv:1911.07471 trained on is not stated in what we could
check. Class c is the c-th class name in sorted order (CIFAR-10's label order); rows are sorted
by (class, file name).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.datasets.imagefolder import class_folders, folder_source, scan
from pipeline.datasets.source import DatasetError, Source

CINIC10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
FIX = (
    "download CINIC-10 (CINIC-10.tar.gz) yourself and set data.root to the folder holding train/ valid/ test/"
)


def check_cinic10_layout(root: Path) -> None:
    """Check that `root/train/` and `root/test/` each hold exactly the ten class folders.

    Raises:
        DatasetError: a missing split or class folder, or a folder that is not a CINIC-10 class.
    """
    for split in ("train", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            raise DatasetError(f"no CINIC-10 folder {split_dir}; {FIX}")
        missing = next((c for c in CINIC10_CLASSES if not (split_dir / c).is_dir()), None)
        if missing is not None:
            raise DatasetError(f"no CINIC-10 class folder {split_dir / missing}; {FIX}")
        extra = sorted(set(class_folders(split_dir)) - set(CINIC10_CLASSES))
        if extra:
            raise DatasetError(
                f"{split_dir / extra[0]} is not a CINIC-10 class ({', '.join(CINIC10_CLASSES)}); remove it"
            )


def load_cinic10(root: Path) -> tuple[tuple[str, ...], Source, Source]:
    """(the ten class names, train/ source, test/ source) of CINIC-10 at `root`.

    Raises:
        DatasetError: a broken layout (`check_cinic10_layout`) or an empty class folder.
    """
    check_cinic10_layout(root)
    class_index = {name: c for c, name in enumerate(CINIC10_CLASSES)}
    train = scan(root / "train", CINIC10_CLASSES)
    test = scan(root / "test", CINIC10_CLASSES)
    return CINIC10_CLASSES, folder_source(train, class_index), folder_source(test, class_index)

"""An image folder (`train/<class>/*` beside `val|test|valid/<class>/*`) or Tiny ImageNet, in
(class name, file name) order."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.datasets.source import DatasetError, Source, decode

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


def class_folders(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def image_files(folder: Path) -> list[Path]:
    if (folder / "images").is_dir():  # Tiny ImageNet: train/<wnid>/images/*.JPEG beside boxes.txt
        folder = folder / "images"
    return sorted(
        (
            p
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        ),
        key=lambda p: p.name,
    )


def folder_source(files_by_class: dict[str, list[Path]], class_index: dict[str, int]) -> Source:
    paths = [p for name in sorted(files_by_class) for p in files_by_class[name]]
    labels = np.array(
        [class_index[name] for name in sorted(files_by_class) for _ in files_by_class[name]], dtype=np.int64
    )
    return Source(labels, lambda idx: decode([paths[i] for i in idx], [str(paths[i]) for i in idx]))


def scan(split_dir: Path, names: Sequence[str]) -> dict[str, list[Path]]:
    """The image files of `split_dir/<name>` for every class folder name, each non-empty.

    Raises:
        DatasetError: a class folder without image files.
    """
    files = {name: image_files(split_dir / name) for name in names}
    empty = next((name for name in names if not files[name]), None)
    if empty is not None:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise DatasetError(
            f"{split_dir / empty} holds no image files ({suffixes}); add its images or remove the folder"
        )
    return files


def read_val_annotations(val_dir: Path, class_index: dict[str, int]) -> dict[str, list[Path]]:
    """Tiny ImageNet's labelled val split: `val_dir/images/*` by `val_dir/val_annotations.txt`.

    Each line is `file<TAB>wnid<TAB>box` (four box numbers); the file must be in `images/` and the
    wnid a class. Returns wnid -> its images sorted by file name.
    Raises:
        DatasetError: a line naming a missing image or an unknown wnid (file and line number), or
            an image no line names.
    """
    annotations = val_dir / "val_annotations.txt"
    image_dir = val_dir / "images"
    present = {p.name: p for p in (image_files(image_dir) if image_dir.is_dir() else [])}
    test: dict[str, list[Path]] = {}
    try:
        lines = annotations.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(
            f"{annotations}: cannot read it as text ({exc}); replace it with an intact copy"
        ) from exc
    for line_no, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2 or fields[1] not in class_index or fields[0] not in present:
            raise DatasetError(
                f"{annotations}:{line_no}: {line.strip()!r} needs an image in "
                f"{image_dir} and a wnid that is a train/ folder; fix the line"
            )
        test.setdefault(fields[1], []).append(present.pop(fields[0]))
    if present:
        raise DatasetError(
            f"{image_dir / min(present)} has no line in {annotations}; add one or remove the image"
        )
    return {name: sorted(paths, key=lambda p: p.name) for name, paths in test.items()}


def load_imagefolder(root: Path) -> tuple[tuple[str, ...], Source, Source]:
    """`train/<class>/*` with `val/<class>/*` (else `test/`, else `valid/`), or Tiny ImageNet.

    Tiny ImageNet: `train/<wnid>/images/*.JPEG` and `val/images/*.JPEG` labelled by
    `val/val_annotations.txt` (file, wnid, box; tab-separated). Class names are the sorted train
    folder names; rows are sorted by (class name, file name).
    """
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DatasetError(
            f"no train/ folder under {root}; lay images out as train/<class>/* and "
            "val/<class>/* (or Tiny ImageNet's layout)"
        )
    class_names = tuple(class_folders(train_dir))
    if not class_names:
        raise DatasetError(f"{train_dir} has no class folders; put each class's images in train/<class>/")
    class_index = {name: c for c, name in enumerate(class_names)}

    train = scan(train_dir, class_names)
    annotations = root / "val" / "val_annotations.txt"
    if annotations.is_file():
        test = read_val_annotations(root / "val", class_index)
    else:
        test_dir = next((root / d for d in ("val", "test", "valid") if (root / d).is_dir()), None)
        if test_dir is None:
            raise DatasetError(
                f"no val/, test/ or valid/ folder under {root}; add the evaluation split as val/<class>/*"
            )
        names = class_folders(test_dir)
        unknown = [name for name in names if name not in class_index]
        if unknown:
            raise DatasetError(f"{test_dir / unknown[0]} is not a class of {train_dir}; rename or remove it")
        test = scan(test_dir, names)
    return class_names, folder_source(train, class_index), folder_source(test, class_index)

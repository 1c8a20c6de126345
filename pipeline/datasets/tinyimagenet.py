"""Tiny ImageNet (Stanford CS231N) in its release layout, the paper's third dataset.

`tiny-imagenet-200/` holds `wnids.txt` (the 200 class wnids, one a line), `words.txt` (wnid ->
names, not read), `train/<wnid>/images/*.JPEG` (500 a class) and `val/images/*.JPEG` (10 000)
labelled by `val/val_annotations.txt` (file, wnid, box; tab-separated). The release's `test/` has
no labels, so `val` serves as the test split, as in the KD literature that uses it. Images are
64×64 RGB; class c is the c-th wnid in sorted order (torchvision's `ImageFolder` order over
`train/`); rows are sorted by (wnid, file name).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.datasets.imagefolder import folder_source, read_val_annotations, scan
from pipeline.datasets.source import DatasetError, Source

FIX = (
    "download Tiny ImageNet (tiny-imagenet-200.zip) yourself and set data.root to its "
    "tiny-imagenet-200/ folder"
)


def tinyimagenet_wnids(root: Path) -> tuple[str, ...]:
    """The sorted wnids of `root/wnids.txt`, after checking the layout's folders and files exist.

    Raises:
        DatasetError: a missing file or folder (named, with the fix), an empty or duplicated
            wnid list, or a wnid without its `train/<wnid>/images/` folder.
    """
    wnids_file = root / "wnids.txt"
    for path, kind in (
        (wnids_file, "file"),
        (root / "train", "folder"),
        (root / "val" / "images", "folder"),
        (root / "val" / "val_annotations.txt", "file"),
    ):
        if not (path.is_file() if kind == "file" else path.is_dir()):
            raise DatasetError(f"no Tiny ImageNet {kind} {path}; {FIX}")
    try:
        wnids = wnids_file.read_text().split()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(
            f"{wnids_file}: cannot read it as text ({exc}); replace it with an intact copy"
        ) from exc
    if not wnids or len(set(wnids)) != len(wnids):
        raise DatasetError(
            f"{wnids_file}: needs distinct wnids, one a line (got {len(wnids)} entries, "
            f"{len(set(wnids))} distinct); replace it with an intact copy"
        )
    missing = next((w for w in sorted(wnids) if not (root / "train" / w / "images").is_dir()), None)
    if missing is not None:
        raise DatasetError(
            f"no folder {root / 'train' / missing / 'images'} for wnid {missing} of {wnids_file}; {FIX}"
        )
    return tuple(sorted(wnids))


def load_tinyimagenet(root: Path) -> tuple[tuple[str, ...], Source, Source]:
    """(sorted wnids, train source, val source as the test split) of Tiny ImageNet at `root`.

    Raises:
        DatasetError: a broken layout (`tinyimagenet_wnids`), a train folder that is not in
            `wnids.txt`, an empty class folder, or a `val_annotations.txt` line naming a missing
            image or an unknown wnid (`read_val_annotations`).
    """
    class_names = tinyimagenet_wnids(root)
    extra = sorted({d.name for d in (root / "train").iterdir() if d.is_dir()} - set(class_names))
    if extra:
        raise DatasetError(
            f"{root / 'train' / extra[0]} is not a wnid of {root / 'wnids.txt'}; add it there or "
            "remove the folder"
        )
    class_index = {name: c for c, name in enumerate(class_names)}
    train = scan(root / "train", class_names)  # image_files reads train/<wnid>/images/
    test = read_val_annotations(root / "val", class_index)
    return class_names, folder_source(train, class_index), folder_source(test, class_index)

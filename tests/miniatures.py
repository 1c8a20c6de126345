"""Miniature copies of the paper's datasets in their real on-disk layouts (CIFAR-100's pickles,
CINIC-10's folders, Tiny ImageNet's release folder), for the preset tests.

Each writer returns what it wrote, so a test can check the loader against values it chose
rather than against the loader's own reading. Images are random pixels with a faint
class-dependent band, so a teacher learns a little in one epoch.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CINIC10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _image(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    pixels = rng.integers(0, 160, (size, size, 3), dtype=np.uint8)
    band = size * (label % 8) // 8
    pixels[band : band + size // 8, :, label % 3] += 90
    return pixels


def write_cifar100(root: Path, train_per_class: int = 1, test_per_class: int = 1) -> dict[str, np.ndarray]:
    """`root/cifar-100-python/{train,test,meta}` as torchvision's pickles (protocol 2, latin1).

    Rows are in a shuffled class order; coarse labels differ from the fine ones (fine // 5).
    Returns {"train_fine", "test_fine", "train_coarse", "train_data", "test_data"}: the fine labels
    (N,) and the (N, 3072) CHW rows written.
    """
    rng = np.random.default_rng(100)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written: dict[str, np.ndarray] = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        fine = rng.permutation(np.repeat(np.arange(100), per_class))
        data = np.stack([_image(rng, int(y), 32).transpose(2, 0, 1).reshape(-1) for y in fine])
        coarse = fine // 5
        entry = {
            "filenames": [f"img_{i}.png" for i in range(len(fine))],
            "batch_label": f"{split}ing batch 1 of 1",
            "fine_labels": fine.tolist(),
            "coarse_labels": coarse.tolist(),
            "data": data,
        }
        (folder / split).write_bytes(pickle.dumps(entry, protocol=2))
        written[f"{split}_fine"], written[f"{split}_coarse"], written[f"{split}_data"] = fine, coarse, data
    meta = {
        "fine_label_names": [f"fine_{i:02d}" for i in range(100)],
        "coarse_label_names": [f"coarse_{i:02d}" for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def write_cinic10(
    root: Path, per_class: dict[str, int] | None = None
) -> dict[str, list[tuple[Path, int, np.ndarray]]]:
    """`root/{train,valid,test}/<class>/*.png` with CINIC-10's file names (`cifar10-<split>-<n>.png`
    for the CIFAR part, `<wnid>_<n>.png` for the ImageNet part), 32x32 RGB PNGs.

    Returns split -> [(path, label, pixels)] in the order written (not sorted).
    """
    per_class = per_class or {"train": 2, "valid": 1, "test": 1}
    rng = np.random.default_rng(10)
    written: dict[str, list[tuple[Path, int, np.ndarray]]] = {}
    for split, count in per_class.items():
        written[split] = []
        for label, name in enumerate(CINIC10_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                cifar_part = f"cifar10-{split}-{100 + 7 * i + label}.png"
                file = cifar_part if i % 2 else f"n0{label}444{i}_{i + 3}.png"
                pixels = _image(rng, label, 32)
                Image.fromarray(pixels).save(folder / file)
                written[split].append((folder / file, label, pixels))
    return written


def write_tinyimagenet(
    root: Path,
    wnids: tuple[str, ...] = ("n09999999", "n01443537", "n02124075"),
    train_per_class: int = 2,
    val_per_class: int = 1,
) -> dict[str, list[tuple[Path, str]]]:
    """`root/tiny-imagenet-200/` as released: `wnids.txt` (in the order given, not sorted),
    `words.txt`, `train/<wnid>/images/<wnid>_<n>.JPEG` beside `<wnid>_boxes.txt`,
    `val/images/val_<n>.JPEG` with `val/val_annotations.txt` (lines in a shuffled order) and an
    unlabelled `test/images/`. 64x64 RGB JPEGs.

    Returns {"train": [(path, wnid)], "val": [(path, wnid)]}, as written.
    """
    rng = np.random.default_rng(200)
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (base / "words.txt").write_text("".join(f"{w}\tthing {i}, other name\n" for i, w in enumerate(wnids)))
    order = {w: c for c, w in enumerate(sorted(wnids))}
    written: dict[str, list[tuple[Path, str]]] = {"train": [], "val": []}
    for wnid in wnids:
        images = base / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(train_per_class):
            Image.fromarray(_image(rng, order[wnid], 64)).save(images / f"{wnid}_{i}.JPEG")
            written["train"].append((images / f"{wnid}_{i}.JPEG", wnid))
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
    val_images = base / "val" / "images"
    val_images.mkdir(parents=True)
    labels = [w for w in wnids for _ in range(val_per_class)]
    lines = []
    for n, k in enumerate(rng.permutation(len(labels))):
        wnid = labels[int(k)]
        Image.fromarray(_image(rng, order[wnid], 64)).save(val_images / f"val_{n}.JPEG")
        written["val"].append((val_images / f"val_{n}.JPEG", wnid))
        lines.append(f"val_{n}.JPEG\t{wnid}\t1\t2\t60\t61\n")
    (base / "val" / "val_annotations.txt").write_text("".join(lines[i] for i in rng.permutation(len(lines))))
    (base / "test" / "images").mkdir(parents=True)
    Image.fromarray(_image(rng, 0, 64)).save(base / "test" / "images" / "test_0.JPEG")
    return written

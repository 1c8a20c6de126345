"""The dataset registry: real files, tiny generated files in every layout, subsets, errors."""

from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.config import DataConfig
from pipeline.datasets import (
    FASHION_MNIST_CLASSES,
    Dataset,
    DatasetError,
    Split,
    available_datasets,
    balanced_subset,
    default_root,
    load_dataset,
    validation_split,
)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def load(name: str, root: Path | str | None, **kwargs) -> Dataset:
    return load_dataset(DataConfig(name=name, root=None if root is None else str(root), **kwargs))


def rand_images(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, shape, dtype=np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(buffer, "PNG")
    return buffer.getvalue()


def assert_valid_split(split: Split, n: int, shape: tuple[int, int, int]) -> None:
    assert split.images.shape == (n, *shape) and split.images.dtype == np.uint8
    assert split.images.flags.c_contiguous
    assert split.labels.shape == (n,) and split.labels.dtype == np.int64


# ---- real files ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion_mnist() -> Dataset:
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"{FASHION_DIR} is absent (apt-get install dataset-fashion-mnist)")
    return load("fashion_mnist", None)


def test_fashion_mnist_from_the_debian_package_has_the_known_sizes_shapes_and_first_labels(fashion_mnist):
    assert default_root("fashion_mnist") == str(FASHION_DIR)
    assert_valid_split(fashion_mnist.train, 60000, (28, 28, 1))
    assert_valid_split(fashion_mnist.test, 10000, (28, 28, 1))
    assert fashion_mnist.train.labels[:5].tolist() == [9, 0, 0, 3, 0]
    assert fashion_mnist.test.labels[:5].tolist() == [9, 2, 1, 1, 6]
    assert fashion_mnist.class_names == FASHION_MNIST_CLASSES and fashion_mnist.num_classes == 10
    assert fashion_mnist.image_shape == (28, 28, 1)
    assert np.bincount(fashion_mnist.train.labels).tolist() == [6000] * 10


def test_fashion_mnist_subset_is_balanced_and_keeps_the_canonical_order(fashion_mnist):
    subset = load("fashion_mnist", None, max_train_samples=1000, max_test_samples=25, seed=3)
    rows = balanced_subset(fashion_mnist.train.labels, 1000, 3, "train")
    assert np.bincount(subset.train.labels).tolist() == [100] * 10
    assert np.array_equal(subset.train.images, fashion_mnist.train.images[rows])
    assert np.array_equal(subset.train.labels, fashion_mnist.train.labels[rows])
    assert sorted(np.bincount(subset.test.labels, minlength=10).tolist()) == [2] * 5 + [3] * 5


def test_cifar10_small_npz_loads_1000_and_1000_images_with_100_per_class(shared_data_dir):
    path = shared_data_dir / "cifar10-small.npz"
    dataset = load("npz", path)
    assert_valid_split(dataset.train, 1000, (32, 32, 3))
    assert_valid_split(dataset.test, 1000, (32, 32, 3))
    for split in (dataset.train, dataset.test):
        assert np.bincount(split.labels).tolist() == [100] * 10
    with np.load(path) as packed:
        assert np.array_equal(dataset.train.images, packed["x_train"])
        assert np.array_equal(dataset.test.labels, packed["y_test"])
    assert dataset.class_names[0] == "airplane" and dataset.num_classes == 10


def decode_rows(path: Path, split: str, rows: np.ndarray) -> np.ndarray:
    with np.load(path) as packed:
        buffer, offsets = packed[f"{split}_jpeg"], packed[f"{split}_offsets"]
    return np.stack(
        [
            np.array(Image.open(io.BytesIO(bytes(buffer[offsets[i] : offsets[i + 1]]))).convert("RGB"))
            for i in rows
        ]
    )


def test_cifar10_jpeg_npz_subset_of_500_has_50_per_class_equal_to_independently_decoded_rows(shared_data_dir):
    path = shared_data_dir / "cifar10-jpeg.npz"
    dataset = load("npz", path, max_train_samples=500, max_test_samples=100, seed=7)
    assert_valid_split(dataset.train, 500, (32, 32, 3))
    assert np.bincount(dataset.train.labels).tolist() == [50] * 10
    assert np.bincount(dataset.test.labels).tolist() == [10] * 10
    with np.load(path) as packed:
        all_labels = packed["train_labels"]
    rows = balanced_subset(all_labels, 500, 7, "train")
    assert np.array_equal(dataset.train.labels, all_labels[rows])
    assert np.array_equal(dataset.train.images, decode_rows(path, "train", rows))


@pytest.mark.slow
def test_cifar10_jpeg_npz_full_load_equals_the_shared_reference_loader(shared_data_dir):
    spec = importlib.util.spec_from_file_location("shared_loaders", shared_data_dir / "loaders.py")
    loaders = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaders)
    path = shared_data_dir / "cifar10-jpeg.npz"
    (x_train, y_train), (x_test, y_test), class_names = loaders.load_cifar10(path)
    dataset = load("npz", path)
    assert np.array_equal(dataset.train.images, x_train) and np.array_equal(dataset.train.labels, y_train)
    assert np.array_equal(dataset.test.images, x_test) and np.array_equal(dataset.test.labels, y_test)
    assert list(dataset.class_names) == class_names


# ---- IDX ----------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if gz:
        path, payload = path.with_name(path.name + ".gz"), gzip.compress(payload)
    path.write_bytes(payload)
    return path


def write_fashion(root: Path, gz: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rand_images(rng, (7, 5, 4)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 7, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rand_images(rng, (3, 5, 4)),
        "t10k-labels-idx1-ubyte": np.array([9, 0, 4], dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        write_idx(root / stem, array, gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_idx_files_round_trip_exactly_in_file_order(tmp_path, gz):
    arrays = write_fashion(tmp_path, gz)
    dataset = load("fashion_mnist", tmp_path)
    assert_valid_split(dataset.train, 7, (5, 4, 1))
    assert np.array_equal(dataset.train.images[..., 0], arrays["train-images-idx3-ubyte"])
    assert dataset.train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert np.array_equal(dataset.test.images[..., 0], arrays["t10k-images-idx3-ubyte"])
    assert dataset.test.labels.tolist() == [9, 0, 4]


@pytest.mark.parametrize("damage", ["bad magic", "truncated", "not gzip", "header only"])
def test_a_corrupt_idx_file_is_a_dataset_error_naming_the_file(tmp_path, damage):
    write_fashion(tmp_path, gz=damage == "not gzip")
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if damage == "not gzip" else ""))
    raw = path.read_bytes()
    path.write_bytes(
        {
            "bad magic": b"\x00\x00\x08\x01" + raw[4:],
            "truncated": raw[:-1],
            "not gzip": b"this is not gzip",
            "header only": raw[:6],
        }[damage]
    )
    with pytest.raises(DatasetError, match=r"fashion_mnist: .*train-images-idx3-ubyte.*replace it"):
        load("fashion_mnist", tmp_path)


def test_idx_label_file_with_a_label_outside_the_classes_is_refused(tmp_path):
    write_fashion(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([9, 10, 4], dtype=np.uint8), gz=False)
    with pytest.raises(DatasetError, match=r"test label 10 at row 1 is outside \[0, 10\)"):
        load("fashion_mnist", tmp_path)


def test_idx_image_and_label_counts_that_disagree_are_refused(tmp_path):
    write_fashion(tmp_path, gz=True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 2], dtype=np.uint8), gz=True)
    with pytest.raises(DatasetError, match="3 images but 2 labels"):
        load("fashion_mnist", tmp_path)


def test_a_missing_idx_file_names_what_was_expected(tmp_path):
    write_fashion(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"no t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte\.gz under"):
        load("fashion_mnist", tmp_path)


# ---- torchvision CIFAR pickles ------------------------------------------------------------------


def write_cifar(root: Path, hundred: bool, rows: int = 3) -> tuple[list, list]:
    """Write torchvision's on-disk CIFAR layout; return [(data, labels)] per train/test file."""
    rng = np.random.default_rng(1)
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    files = (
        {"train": ["train"], "test": ["test"]}
        if hundred
        else {"train": [f"data_batch_{b}" for b in range(1, 6)], "test": ["test_batch"]}
    )
    written = {}
    for split, names in files.items():
        written[split] = []
        for name in names:
            data = rand_images(rng, (rows, 3072))
            labels = rng.integers(0, 100 if hundred else 10, rows).tolist()
            entry = {"batch_label": name, "data": data, "filenames": [f"{name}_{i}.png" for i in range(rows)]}
            if hundred:
                entry.update(fine_labels=labels, coarse_labels=[label // 5 for label in labels])
            else:
                entry["labels"] = labels
            (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
            written[split].append((data, labels))
    meta = (
        {
            "fine_label_names": [f"fine{i}" for i in range(100)],
            "coarse_label_names": [f"coarse{i}" for i in range(20)],
        }
        if hundred
        else {"num_cases_per_batch": rows, "label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}
    )
    (folder / ("meta" if hundred else "batches.meta")).write_bytes(pickle.dumps(meta, protocol=2))
    return written["train"], written["test"]


@pytest.mark.parametrize("hundred", [False, True], ids=["cifar10", "cifar100"])
def test_cifar_pickles_round_trip_in_batch_order_with_chw_rows_turned_to_hwc(tmp_path, hundred):
    train, test = write_cifar(tmp_path, hundred)
    dataset = load("cifar100" if hundred else "cifar10", tmp_path)
    assert dataset.num_classes == (100 if hundred else 10)
    assert dataset.class_names[3] == ("fine3" if hundred else "class3")
    for split, written in ((dataset.train, train), (dataset.test, test)):
        data = np.concatenate([d for d, _ in written])
        assert_valid_split(split, len(data), (32, 32, 3))
        assert split.labels.tolist() == [label for _, labels in written for label in labels]
        for n, y, x, c in [(0, 0, 0, 0), (1, 2, 5, 1), (len(data) - 1, 31, 30, 2), (2, 17, 0, 2)]:
            assert split.images[n, y, x, c] == data[n, c * 1024 + y * 32 + x]


@pytest.mark.parametrize("hundred", [False, True], ids=["cifar10", "cifar100"])
def test_cifar_loader_agrees_with_torchvision_when_its_md5_check_is_bypassed(tmp_path, monkeypatch, hundred):
    # torchvision refuses generated files (md5 of the official release); with its check patched
    # out it reads them, and must see exactly what our loader sees.
    import torchvision.datasets.cifar as tv_cifar

    reader = tv_cifar.CIFAR100 if hundred else tv_cifar.CIFAR10
    write_cifar(tmp_path, hundred)
    dataset = load("cifar100" if hundred else "cifar10", tmp_path)
    with pytest.raises(RuntimeError):
        reader(str(tmp_path), train=True, download=False)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    for train, split in ((True, dataset.train), (False, dataset.test)):
        reference = reader(str(tmp_path), train=train, download=False)
        assert np.array_equal(split.images, reference.data)
        assert split.labels.tolist() == list(reference.targets)
    assert list(dataset.class_names) == reference.classes


def test_cifar_root_without_the_torchvision_folder_says_what_is_expected(tmp_path):
    expected = r"cifar10: no torchvision CIFAR-10 files under .*cifar-10-batches-py/data_batch_1"
    with pytest.raises(DatasetError, match=expected):
        load("cifar10", tmp_path)
    with pytest.raises(DatasetError, match=re.escape("cifar100: data.root is not set")):
        load("cifar100", None)


def test_a_cifar_batch_that_is_not_a_pickle_is_refused(tmp_path):
    write_cifar(tmp_path, hundred=False)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="data_batch_3: not a CIFAR pickle"):
        load("cifar10", tmp_path)


# ---- npz ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [3, 0], ids=["rgb", "grey-without-channel-axis"])
def test_npz_arrays_round_trip_in_row_order(tmp_path, channels):
    rng = np.random.default_rng(2)
    shape = (6, 4) + ((channels,) if channels else ())
    x_train, x_test = rand_images(rng, (9, *shape)), rand_images(rng, (4, *shape))
    y_train, y_test = np.array([2, 0, 1, 1, 2, 0, 0, 1, 2]), np.array([1, 0, 2, 2])
    np.savez(
        tmp_path / "d.npz",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        class_names=np.array(["a", "b", "c"]),
    )
    dataset = load("npz", tmp_path / "d.npz")
    assert dataset.image_shape == (6, 4, channels or 1)
    assert np.array_equal(dataset.train.images.reshape(x_train.shape), x_train)
    assert np.array_equal(dataset.test.images.reshape(x_test.shape), x_test)
    assert dataset.train.labels.tolist() == y_train.tolist() and dataset.class_names == ("a", "b", "c")


@pytest.mark.parametrize("channels", [3, 1], ids=["rgb", "grey"])
def test_npz_packed_image_bytes_round_trip_in_row_order(tmp_path, channels):
    rng = np.random.default_rng(3)
    images = {"train": rand_images(rng, (8, 5, 7, channels)), "test": rand_images(rng, (3, 5, 7, channels))}
    labels = {"train": np.array([1, 0, 1, 0, 0, 1, 1, 0]), "test": np.array([0, 1, 1])}
    packed = {"class_names": np.array(["zero", "one"])}
    for split, stack in images.items():
        blobs = [png_bytes(image) for image in stack]  # lossless, so pixels must come back exactly
        packed[f"{split}_jpeg"] = np.frombuffer(b"".join(blobs), np.uint8)
        packed[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        packed[f"{split}_labels"] = labels[split]
    np.savez(tmp_path / "p.npz", **packed)
    dataset = load("npz", tmp_path / "p.npz")
    assert np.array_equal(dataset.train.images, images["train"])
    assert np.array_equal(dataset.test.images, images["test"])
    assert dataset.test.labels.tolist() == [0, 1, 1]
    subset = load("npz", tmp_path / "p.npz", max_train_samples=4)
    rows = balanced_subset(labels["train"], 4, 0, "train")
    assert np.array_equal(subset.train.images, images["train"][rows])


def test_npz_with_labels_outside_the_class_names_is_refused(tmp_path):
    x = np.zeros((3, 2, 2, 3), np.uint8)
    np.savez(
        tmp_path / "d.npz",
        x_train=x,
        y_train=np.array([0, 1, 2]),
        x_test=x,
        y_test=np.array([0, 3, 1]),
        class_names=np.array(["a", "b", "c"]),
    )
    with pytest.raises(DatasetError, match=r"npz: .*test label 3 at row 1 is outside \[0, 3\)"):
        load("npz", tmp_path / "d.npz")


def test_npz_with_an_empty_split_or_unknown_keys_is_refused(tmp_path):
    x = np.zeros((3, 2, 2), np.uint8)
    np.savez(
        tmp_path / "empty.npz",
        x_train=x,
        y_train=np.array([0, 1, 0]),
        x_test=x[:0],
        y_test=np.zeros(0, np.int64),
        class_names=np.array(["a", "b"]),
    )
    with pytest.raises(DatasetError, match=r"test split .* is empty"):
        load("npz", tmp_path / "empty.npz")
    np.savez(tmp_path / "odd.npz", images=x)
    with pytest.raises(DatasetError, match=r"keys \['images'\] are neither"):
        load("npz", tmp_path / "odd.npz")
    with pytest.raises(DatasetError, match="is not a file"):
        load("npz", tmp_path)


# ---- image folders ------------------------------------------------------------------------------


def write_folder(
    root: Path, layout: dict[str, dict[str, list[str]]], shape=(5, 6, 3), seed=4
) -> dict[Path, np.ndarray]:
    """layout: split -> class -> file names; every file a PNG of random pixels. Returns path -> pixels."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, classes in layout.items():
        for name, files in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for file in files:
                pixels = rand_images(rng, shape)
                (root / split / name / file).write_bytes(png_bytes(pixels))
                written[root / split / name / file] = pixels
    return written


def test_imagefolder_round_trips_sorted_by_class_name_then_file_name(tmp_path):
    layout = {
        "train": {"dog": ["b.png", "a.png"], "ant": ["9.png", "10.png", "x.PNG"], "cat": ["c.png"]},
        "val": {"cat": ["2.png", "1.png"], "ant": ["z.png"]},
    }
    written = write_folder(tmp_path, layout)
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    dataset = load("imagefolder", tmp_path)
    assert dataset.class_names == ("ant", "cat", "dog") and dataset.image_shape == (5, 6, 3)
    order = [
        ("ant", "10.png"),
        ("ant", "9.png"),
        ("ant", "x.PNG"),
        ("cat", "c.png"),
        ("dog", "a.png"),
        ("dog", "b.png"),
    ]
    assert dataset.train.labels.tolist() == [0, 0, 0, 1, 2, 2]
    expected = np.stack([written[tmp_path / "train" / c / f] for c, f in order])
    assert np.array_equal(dataset.train.images, expected)
    assert dataset.test.labels.tolist() == [0, 1, 1]
    val_order = [("ant", "z.png"), ("cat", "1.png"), ("cat", "2.png")]
    expected = np.stack([written[tmp_path / "val" / c / f] for c, f in val_order])
    assert np.array_equal(dataset.test.images, expected)


def test_imagefolder_uses_test_when_val_is_missing_and_keeps_all_grey_images_grey(tmp_path):
    written = write_folder(
        tmp_path,
        {"train": {"a": ["1.png"], "b": ["1.png", "2.png"]}, "test": {"b": ["1.png"]}},
        shape=(4, 4, 1),
    )
    dataset = load("imagefolder", tmp_path)
    assert dataset.image_shape == (4, 4, 1) and dataset.test.labels.tolist() == [1]
    assert np.array_equal(dataset.test.images[0], written[tmp_path / "test" / "b" / "1.png"])


def test_imagefolder_with_one_grey_image_among_rgb_ones_replicates_its_channel(tmp_path):
    write_folder(tmp_path, {"train": {"a": ["1.png"]}, "val": {"a": ["1.png"]}}, shape=(4, 4, 3))
    grey = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
    (tmp_path / "train" / "a" / "2.png").write_bytes(png_bytes(grey))
    dataset = load("imagefolder", tmp_path)
    assert dataset.image_shape == (4, 4, 3)
    assert np.array_equal(dataset.train.images[1], np.repeat(grey, 3, axis=2))


def test_imagefolder_images_of_different_sizes_are_refused_naming_the_file(tmp_path):
    write_folder(tmp_path, {"train": {"a": ["1.png"]}, "val": {"a": ["1.png"]}})
    (tmp_path / "train" / "a" / "2.png").write_bytes(png_bytes(np.zeros((7, 7, 3), np.uint8)))
    expected = r"imagefolder: .*train/a/2\.png: image is 7x7 but .*1\.png is 6x5"
    with pytest.raises(DatasetError, match=expected):
        load("imagefolder", tmp_path)


def test_imagefolder_empty_class_folder_or_empty_train_folder_is_refused(tmp_path):
    write_folder(tmp_path, {"train": {"a": ["1.png"]}, "val": {"a": ["1.png"]}})
    (tmp_path / "train" / "b").mkdir()
    with pytest.raises(DatasetError, match=r"train/b holds no image files"):
        load("imagefolder", tmp_path)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="has no class folders"):
        load("imagefolder", tmp_path / "empty")


def test_imagefolder_val_class_unknown_to_train_is_refused(tmp_path):
    write_folder(tmp_path, {"train": {"a": ["1.png"]}, "val": {"a": ["1.png"], "zebra": ["1.png"]}})
    with pytest.raises(DatasetError, match="zebra is not a class of"):
        load("imagefolder", tmp_path)


def write_tiny_imagenet(root: Path) -> dict[Path, np.ndarray]:
    """Tiny ImageNet layout with real JPEGs; returns path -> pixels as Pillow decodes them."""
    rng = np.random.default_rng(5)
    decoded = {}

    def jpeg(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rand_images(rng, (8, 8, 3))).save(path, "JPEG", quality=90)
        decoded[path] = np.array(Image.open(path).convert("RGB"))

    for wnid in ("n02", "n01"):
        for i in (1, 0):
            jpeg(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t7\t7\n")
    annotations = {"val_0.JPEG": "n02", "val_1.JPEG": "n01", "val_10.JPEG": "n02", "val_2.JPEG": "n01"}
    for file in annotations:
        jpeg(root / "val" / "images" / file)
    (root / "val" / "val_annotations.txt").write_text(
        "".join(f"{file}\t{wnid}\t0\t1\t6\t7\n" for file, wnid in annotations.items())
    )
    (root / "test" / "images").mkdir(parents=True)  # unlabelled in the real release: ignored
    return decoded


def test_tiny_imagenet_layout_reads_val_labels_from_val_annotations(tmp_path):
    decoded = write_tiny_imagenet(tmp_path)
    dataset = load("imagefolder", tmp_path)
    assert dataset.class_names == ("n01", "n02")
    train_order = ["n01/images/n01_0", "n01/images/n01_1", "n02/images/n02_0", "n02/images/n02_1"]
    assert dataset.train.labels.tolist() == [0, 0, 1, 1]
    assert np.array_equal(
        dataset.train.images, np.stack([decoded[tmp_path / "train" / f"{name}.JPEG"] for name in train_order])
    )
    val_order = ["val_1", "val_2", "val_0", "val_10"]  # (wnid, file name)
    assert dataset.test.labels.tolist() == [0, 0, 1, 1]
    assert np.array_equal(
        dataset.test.images,
        np.stack([decoded[tmp_path / "val" / "images" / f"{name}.JPEG"] for name in val_order]),
    )


def test_tiny_imagenet_annotation_for_a_missing_image_is_refused(tmp_path):
    write_tiny_imagenet(tmp_path)
    (tmp_path / "val" / "images" / "val_2.JPEG").unlink()
    with pytest.raises(DatasetError, match=r"val_annotations.txt:4: .*val_2.JPEG"):
        load("imagefolder", tmp_path)


# ---- names, roots, config errors ----------------------------------------------------------------


def test_registry_lists_every_dataset_and_their_default_roots():
    assert available_datasets() == [
        "cifar10",
        "cifar100",
        "cinic10",
        "fashion_mnist",
        "imagefolder",
        "npz",
        "tinyimagenet",
    ]
    assert default_root("npz") is None


def test_unknown_dataset_error_lists_known_names_and_suggests_the_closest():
    expected = r"unknown dataset 'cifar_10'; did you mean 'cifar10'\? known: cifar10, "
    with pytest.raises(DatasetError, match=expected):
        load("cifar_10", None)
    with pytest.raises(DatasetError, match=r"known: .*fashion_mnist"):
        default_root("mnist-ish-thing")


def test_missing_root_is_a_one_line_error_with_a_fix(tmp_path):
    with pytest.raises(DatasetError) as info:
        load("fashion_mnist", tmp_path / "nope")
    message = str(info.value)
    assert "fashion_mnist: " in message and "does not exist" in message and "dataset-fashion-mnist" in message
    assert "\n" not in message


def test_split_refuses_arrays_that_break_the_layout():
    with pytest.raises(DatasetError, match="C in"):
        Split(np.zeros((2, 4, 4, 2), np.uint8), np.zeros(2, np.int64))
    with pytest.raises(DatasetError, match="int64"):
        Split(np.zeros((2, 4, 4, 1), np.uint8), np.zeros(2, np.int32))
    with pytest.raises(DatasetError, match="2 images but 3 labels"):
        Split(np.zeros((2, 4, 4, 1), np.uint8), np.zeros(3, np.int64))


# ---- balanced_subset ----------------------------------------------------------------------------


def test_balanced_subset_gives_each_class_its_share_plus_a_seeded_remainder():
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 100))
    rows = balanced_subset(labels, 55, seed=0, split="train")
    assert rows.dtype == np.int64 and len(rows) == 55
    assert np.all(np.diff(rows) > 0)
    assert sorted(np.bincount(labels[rows], minlength=10).tolist()) == [5] * 5 + [6] * 5


def test_balanced_subset_is_deterministic_and_differs_across_seeds_and_splits():
    labels = np.repeat(np.arange(4), 50)
    first = balanced_subset(labels, 21, seed=1, split="train")
    assert np.array_equal(first, balanced_subset(labels, 21, seed=1, split="train"))
    other_seed = balanced_subset(labels, 21, seed=2, split="train")
    for c in range(4):  # every class draws from the seed, not just its first rows
        assert set(first[labels[first] == c]) != set(other_seed[labels[other_seed] == c])
    assert not np.array_equal(first, balanced_subset(labels, 21, seed=1, split="test"))


def test_balanced_subset_takes_all_of_a_small_class_and_fills_up_from_the_others():
    labels = np.array([0] * 2 + [1] * 50 + [2] * 50)
    rows = balanced_subset(labels, 30, seed=0, split="test")
    assert np.bincount(labels[rows]).tolist() == [2, 14, 14]


def test_balanced_subset_returns_everything_for_none_or_a_larger_request():
    labels = np.array([1, 0, 1])
    assert balanced_subset(labels, None, 0, "train").tolist() == [0, 1, 2]
    assert balanced_subset(labels, 10, 0, "train").tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="split"):
        balanced_subset(labels, 2, 0, "val")


def test_a_larger_quota_keeps_every_row_a_smaller_one_picked():
    labels = np.repeat(np.arange(5), 40)
    small, large = balanced_subset(labels, 50, 9, "train"), balanced_subset(labels, 100, 9, "train")
    assert set(small.tolist()) <= set(large.tolist())


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 5), min_size=1, max_size=120),
    max_samples=st.integers(1, 150),
    seed=st.integers(0, 2**32 - 1),
)
def test_balanced_subset_is_as_balanced_as_the_class_sizes_allow(labels, max_samples, seed):
    labels = np.array(labels)
    rows = balanced_subset(labels, max_samples, seed, "train")
    assert len(rows) == min(max_samples, len(labels))
    assert np.all(np.diff(rows) > 0) and rows.min() >= 0 and rows.max() < len(labels)
    available, picked = np.bincount(labels, minlength=6), np.bincount(labels[rows], minlength=6)
    present = available > 0
    open_classes = present & (picked < available)  # classes not exhausted
    if open_classes.any():
        # no class is left more than one row behind another while it still has rows to give
        assert picked[open_classes].min() >= picked[present].max() - 1


def test_a_relative_missing_root_names_the_folder_it_was_taken_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match=rf"npz: ../x.npz \(from {tmp_path}\) does not exist"):
        load("npz", "../x.npz")


def test_a_subset_larger_than_the_split_warns_and_takes_every_row(tmp_path, caplog):
    rng = np.random.default_rng(4)
    x = rand_images(rng, (6, 4, 4, 1))
    np.savez(
        tmp_path / "d.npz",
        x_train=x,
        y_train=np.array([0, 1, 0, 1, 0, 1]),
        x_test=x[:2],
        y_test=np.array([0, 1]),
        class_names=np.array(["a", "b"]),
    )
    with caplog.at_level("WARNING", logger="pipeline.datasets"):
        dataset = load("npz", tmp_path / "d.npz", max_train_samples=100)
    assert len(dataset.train.labels) == 6
    assert (
        "data.max_train_samples is 100" in caplog.text
        and "has 6 train images: using all of them" in caplog.text
    )


# ---- validation_split ---------------------------------------------------------------------------


def test_the_validation_split_takes_the_same_fraction_of_every_class_and_is_disjoint_from_train():
    labels = np.random.default_rng(5).permutation(np.repeat(np.arange(4), [40, 40, 20, 10]))
    train, val = validation_split(labels, 0.25, seed=0)
    assert train.dtype == val.dtype == np.int64
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(110))
    # round(0.25 * n_c): 10, 10, 5 and round(2.5) = 2 (half to even) rows of the four classes
    assert np.bincount(labels[val], minlength=4).tolist() == [10, 10, 5, 2]


def test_the_validation_split_is_seeded_reproducible_and_drawn_within_each_class():
    labels = np.repeat(np.arange(3), 30)
    first = validation_split(labels, 0.2, seed=7)[1]
    assert np.array_equal(first, validation_split(labels, 0.2, seed=7)[1])
    other = validation_split(labels, 0.2, seed=8)[1]
    for c in range(3):  # every class draws from the seed, not just its first rows
        assert set(first[labels[first] == c]) != set(other[labels[other] == c])
        assert set(first[labels[first] == c]) != set(range(30 * c, 30 * c + 6))
    # the documented key: SeedSequence([seed, 2]), a permutation per class in class order
    rng = np.random.default_rng(np.random.SeedSequence([7, 2]))
    expected = np.concatenate([30 * c + rng.permutation(30)[:6] for c in range(3)])
    assert np.array_equal(first, np.sort(expected))


def test_a_zero_validation_fraction_holds_out_nothing():
    train, val = validation_split(np.array([1, 0, 1, 2]), 0.0, seed=0)
    assert train.tolist() == [0, 1, 2, 3] and val.tolist() == []


def test_every_class_keeps_a_training_row_and_a_fraction_holding_out_nothing_is_refused():
    labels = np.array([0, 1, 1, 2, 2, 2])
    _, val = validation_split(labels, 0.9, seed=0)
    assert np.bincount(labels[val], minlength=3).tolist() == [0, 1, 2]  # n_c - 1 at most
    with pytest.raises(
        ValueError, match=re.escape("data.validation_fraction: 0.01 of 6 training images holds out no image")
    ):
        validation_split(labels, 0.01, seed=0)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\)"):
        validation_split(labels, 1.0, seed=0)


def _npz_with_unique_images(path: Path, n_train: int = 40, n_test: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """An npz whose train image i is filled with the value i (so a row names its source row)."""
    x_train = np.repeat(np.arange(n_train, dtype=np.uint8), 16).reshape(n_train, 4, 4, 1)
    y_train = np.arange(n_train) % 4
    np.savez(
        path,
        x_train=x_train,
        y_train=y_train,
        x_test=x_train[:n_test],
        y_test=y_train[:n_test],
        class_names=np.array(["a", "b", "c", "d"]),
    )
    return x_train, y_train


def test_load_dataset_carves_the_val_split_from_the_train_subset_and_records_its_source_rows(tmp_path):
    x_train, y_train = _npz_with_unique_images(tmp_path / "d.npz")
    dataset = load("npz", tmp_path / "d.npz", max_train_samples=32, validation_fraction=0.25, seed=3)
    subset = balanced_subset(y_train, 32, 3, "train")
    kept, held = validation_split(y_train[subset], 0.25, 3)
    assert dataset.val is not None and len(dataset.val) == 8 and len(dataset.train) == 24
    assert np.array_equal(dataset.val_source_index, subset[held])
    assert np.array_equal(dataset.val.images, x_train[subset[held]])
    assert np.array_equal(dataset.train.images, x_train[subset[kept]])
    assert np.bincount(dataset.val.labels, minlength=4).tolist() == [2, 2, 2, 2]
    assert not set(dataset.train.images[:, 0, 0, 0].tolist()) & set(dataset.val.images[:, 0, 0, 0].tolist())
    assert list(dataset.splits()) == ["train", "val", "test"]


def test_load_dataset_without_a_validation_fraction_has_no_val_split_and_the_same_train_split(tmp_path):
    x_train, _ = _npz_with_unique_images(tmp_path / "d.npz")
    dataset = load("npz", tmp_path / "d.npz")
    assert dataset.val is None and dataset.val_source_index is None
    assert list(dataset.splits()) == ["train", "test"]
    assert np.array_equal(dataset.train.images, x_train)


def test_a_validation_fraction_that_holds_out_nothing_is_a_dataset_error(tmp_path):
    _npz_with_unique_images(tmp_path / "d.npz")
    with pytest.raises(
        DatasetError, match=re.escape("npz: data.validation_fraction: 0.001 of 40 training images")
    ):
        load("npz", tmp_path / "d.npz", validation_fraction=0.001)

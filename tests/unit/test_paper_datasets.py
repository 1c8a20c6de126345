"""The loaders of the paper's datasets (`cifar100`, `cinic10`, `tinyimagenet`) on miniatures in
their real on-disk layouts: the labels are the ones written (CIFAR-100's fine labels, Tiny
ImageNet's val labels from val_annotations.txt), the order is canonical, and a broken layout is
refused naming the file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DataConfig
from pipeline.datasets import DatasetError, check_layout, load_dataset
from tests.miniatures import CINIC10_CLASSES, write_cifar100, write_cinic10, write_tinyimagenet


def test_cifar100_gives_the_fine_labels_written_in_file_row_order(tmp_path):
    written = write_cifar100(tmp_path, train_per_class=2, test_per_class=1)
    dataset = load_dataset(DataConfig(name="cifar100", root=str(tmp_path)))
    assert dataset.num_classes == 100 and dataset.class_names[7] == "fine_07"
    assert dataset.train.labels.tolist() == written["train_fine"].tolist()
    assert dataset.test.labels.tolist() == written["test_fine"].tolist()
    assert dataset.train.labels.tolist() != written["train_coarse"].tolist()
    row = written["train_data"][5].reshape(3, 32, 32).transpose(1, 2, 0)  # CHW -> HWC
    assert np.array_equal(dataset.train.images[5], row)


def test_cinic10_trains_on_train_tests_on_test_and_never_reads_valid(tmp_path):
    written = write_cinic10(tmp_path, {"train": 3, "valid": 2, "test": 1})
    dataset = load_dataset(DataConfig(name="cinic10", root=str(tmp_path)))
    assert dataset.class_names == CINIC10_CLASSES
    assert dataset.image_shape == (32, 32, 3) and (len(dataset.train), len(dataset.test)) == (30, 10)
    for split, rows in (("train", dataset.train), ("test", dataset.test)):
        ordered = sorted(written[split], key=lambda item: (item[1], item[0].name))  # (class, file)
        assert rows.labels.tolist() == [label for _, label, _ in ordered]
        assert np.array_equal(rows.images, np.stack([pixels for _, _, pixels in ordered]))
    assert dataset.train.labels.tolist() == [c for c in range(10) for _ in range(3)]
    (tmp_path / "valid" / "cat" / "broken.png").write_bytes(b"not a png")  # valid/ is not read
    assert len(load_dataset(DataConfig(name="cinic10", root=str(tmp_path))).train) == 30


def test_cinic10_refuses_a_folder_that_is_not_one_of_its_classes(tmp_path):
    write_cinic10(tmp_path, {"train": 1, "test": 1})
    (tmp_path / "train" / "zebra").mkdir()
    with pytest.raises(DatasetError, match=r"cinic10: .*train/zebra is not a CINIC-10 class"):
        load_dataset(DataConfig(name="cinic10", root=str(tmp_path)))


def test_tinyimagenet_labels_val_from_val_annotations_and_orders_classes_by_sorted_wnid(tmp_path):
    written = write_tinyimagenet(tmp_path, train_per_class=2, val_per_class=2)
    root = tmp_path / "tiny-imagenet-200"
    dataset = load_dataset(DataConfig(name="tinyimagenet", root=str(root)))
    assert dataset.class_names == ("n01443537", "n02124075", "n09999999")  # wnids.txt is unsorted
    assert dataset.image_shape == (64, 64, 3)
    assert dataset.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    # val: the label of each file is its val_annotations.txt wnid, rows sorted by (wnid, file)
    by_file = {path.name: dataset.class_names.index(wnid) for path, wnid in written["val"]}
    ordered = sorted(by_file, key=lambda file: (by_file[file], file))
    assert dataset.test.labels.tolist() == [by_file[file] for file in ordered] == [0, 0, 1, 1, 2, 2]
    for row, file in enumerate(ordered):
        expected = np.asarray(Image.open(root / "val" / "images" / file).convert("RGB"))
        assert np.array_equal(dataset.test.images[row], expected)


def test_tinyimagenet_refuses_a_train_folder_missing_from_wnids_txt(tmp_path):
    write_tinyimagenet(tmp_path)
    root = tmp_path / "tiny-imagenet-200"
    (root / "wnids.txt").write_text("n01443537\nn02124075\n")
    with pytest.raises(DatasetError, match=r"train/n09999999 is not a wnid of .*wnids\.txt; add it there"):
        load_dataset(DataConfig(name="tinyimagenet", root=str(root)))


def test_check_layout_reads_no_image_and_passes_datasets_without_a_fixed_layout(tmp_path):
    write_tinyimagenet(tmp_path)
    root = tmp_path / "tiny-imagenet-200"
    for image in root.rglob("*.JPEG"):
        image.write_bytes(b"")  # unreadable images: only the loader would notice
    check_layout(DataConfig(name="tinyimagenet", root=str(root)))
    check_layout(DataConfig(name="imagefolder", root=str(tmp_path)))
    with pytest.raises(DatasetError, match="does not exist"):
        check_layout(DataConfig(name="cinic10", root=str(tmp_path / "nope")))

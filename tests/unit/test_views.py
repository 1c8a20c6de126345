"""Keyed views: pad-and-crop + flip geometry, drawn from explicit keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from stages.views import (
    Augmentation,
    StoredViews,
    ViewError,
    apply_views,
    augmentation_from_spec,
    keyed_integers,
    training_augmentation,
)

CIFAR = training_augmentation((32, 32, 3))


def augmentation_params(seed, epoch, index, *, padding, flip):
    """The student's keyed draw of pad-crop-flip params (the one draw path)."""
    return Augmentation("pad_crop_flip", (32, 32), padding=padding, flip=flip).draw(seed, epoch, index)[1]


def test_apply_views_matches_torchvision_pad_crop_and_flip_for_every_offset():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8))
    params = torch.tensor([[0, 0, 0], [8, 8, 1], [4, 4, 0], [1, 7, 1], [7, 2, 0], [3, 5, 1]])
    got = apply_views(images, params, padding=4)
    for b in range(6):
        dy, dx, flip = params[b].tolist()
        want = TF.crop(TF.pad(images[b], [4, 4, 4, 4], fill=0), dy, dx, 32, 32)
        if flip:
            want = TF.horizontal_flip(want)
        assert torch.equal(got[b], want), b


def test_the_centre_view_without_flip_is_the_plain_image():
    images = torch.arange(2 * 1 * 28 * 28, dtype=torch.float32).view(2, 1, 28, 28)
    assert torch.equal(apply_views(images, torch.tensor([[4, 4, 0], [4, 4, 0]]), padding=4), images)
    assert torch.equal(apply_views(images, torch.tensor([[0, 0, 0], [0, 0, 0]]), padding=0), images)


def test_flip_only_views_mirror_columns():
    images = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    out = apply_views(images, torch.tensor([[0, 0, 1]]), padding=0)
    assert torch.equal(out, images.flip(-1))


def test_keyed_draws_depend_on_the_key_and_sample_not_on_batch_order():
    index = np.arange(1000, dtype=np.int64)
    a = augmentation_params(7, 3, index, padding=4, flip=True)
    perm = np.random.default_rng(1).permutation(1000)
    b = augmentation_params(7, 3, index[perm], padding=4, flip=True)
    assert np.array_equal(a[perm], b)
    assert not np.array_equal(a, augmentation_params(7, 4, index, padding=4, flip=True))
    assert not np.array_equal(a, augmentation_params(8, 3, index, padding=4, flip=True))


def test_keyed_draws_cover_their_range_evenly():
    draws = keyed_integers((0, 0, 1), np.arange(90_000, dtype=np.int64), 9)
    counts = np.bincount(draws, minlength=9)
    assert draws.min() == 0 and draws.max() == 8
    assert np.all(np.abs(counts - 10_000) < 500)  # ~5 sigma for a fair 9-sided die
    params = augmentation_params(0, 0, np.arange(20_000, dtype=np.int64), padding=4, flip=True)
    assert abs(params[:, 2].mean() - 0.5) < 0.02


def test_without_flip_no_view_is_flipped():
    params = augmentation_params(0, 0, np.arange(100, dtype=np.int64), padding=0, flip=False)
    assert np.all(params == 0)


def test_the_cifar_view_set_is_exactly_the_support_of_pad4_crop_and_flip():
    views = CIFAR.all_views()
    assert views.shape == (162, 3) and views.dtype == np.int16
    assert len({tuple(v) for v in views.tolist()}) == 162
    # torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip support, built independently
    rng = np.random.default_rng(3)
    image = torch.from_numpy(rng.integers(1, 256, (3, 32, 32), dtype=np.uint8))
    support = set()
    for dy in range(9):
        for dx in range(9):
            crop = TF.crop(TF.pad(image, [4, 4, 4, 4], fill=0), dy, dx, 32, 32)
            support.add(crop.numpy().tobytes())
            support.add(TF.horizontal_flip(crop).numpy().tobytes())
    ours = CIFAR.apply(image[None].expand(162, -1, -1, -1), views)
    assert {v.numpy().tobytes() for v in ours} == support and len(support) == 162
    assert tuple(views[CIFAR.plain_view()]) == (4, 4, 0)


def test_fashion_mnist_has_two_flip_views_and_no_augmentation_has_one():
    flip = training_augmentation((28, 28, 1))
    assert flip.num_views == 2 and flip.all_views().tolist() == [[0, 0, 0], [0, 0, 1]]
    assert training_augmentation((28, 28, 1), augment=False).num_views == 1
    assert training_augmentation((64, 64, 3)).kind == "resized_crop_flip"


def test_the_trainers_draw_reaches_every_view_uniformly():
    index, params = CIFAR.draw(5, 2, np.arange(162 * 400, dtype=np.int64))
    counts = np.bincount(index, minlength=162)
    assert counts.min() > 0
    chi2 = ((counts - 400) ** 2 / 400).sum()
    assert chi2 < 161 + 5 * np.sqrt(2 * 161)  # far below for a fair draw; ~5 sigma
    assert np.array_equal(params, CIFAR.all_views()[index])


def test_resized_crops_fit_the_image_and_follow_torchvision():
    rrc = training_augmentation((64, 96, 3))
    params = rrc.sample((1, 2), np.arange(2000, dtype=np.int64))
    top, left, height, width, flip = params.T.astype(int)
    assert (
        (top >= 0).all() and (left >= 0).all() and (top + height <= 64).all() and (left + width <= 96).all()
    )
    area = height * width / (64 * 96)
    assert area.min() >= 0.07 and area.max() <= 1.0 and 0.4 < flip.mean() < 0.6
    assert np.array_equal(params, rrc.sample((1, 2), np.arange(2000, dtype=np.int64)))
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 3, 64, 96), dtype=np.uint8))
    out = rrc.apply(images, params[:3])
    for b in range(3):
        want = TF.resized_crop(images[b], *map(int, params[b, :4]), [64, 96], antialias=True)
        assert torch.equal(out[b], TF.horizontal_flip(want) if params[b, 4] else want)


def test_a_view_spec_round_trips_to_the_same_augmentation():
    for aug in (CIFAR, training_augmentation((28, 28, 1)), training_augmentation((96, 96, 3))):
        assert augmentation_from_spec(aug.spec()) == aug
        plan = StoredViews.plan("sample", aug, num_views=3, seed=7)
        assert StoredViews.from_spec(plan.spec()) == plan


def test_a_scheduled_store_holds_exactly_the_views_each_seed_and_epoch_draws():
    plan = StoredViews.plan("scheduled", CIFAR, seeds=(0, 2), epochs=3)
    index = np.arange(50, dtype=np.int64)
    params = plan.view_params(index)
    assert params.shape == (6, 50, 3)
    for i, seed in enumerate((0, 2)):
        for epoch in range(3):
            slot = plan.pick(seed, epoch, index)
            assert (slot == i * 3 + epoch).all()
            assert np.array_equal(params[slot, index], CIFAR.draw(seed, epoch, index)[1])
    with pytest.raises(ViewError, match=r"teacher_dump\.seeds"):
        plan.pick(1, 0, index)
    with pytest.raises(ViewError, match=r"teacher_dump\.epochs"):
        plan.pick(0, 3, index)


def test_an_all_store_gives_the_student_the_views_it_would_draw_itself():
    plan = StoredViews.plan("all", CIFAR)
    index = np.arange(300, dtype=np.int64)
    params = plan.view_params(index)
    v = plan.pick(4, 1, index)
    assert np.array_equal(params[v, index], CIFAR.draw(4, 1, index)[1])


def test_view_settings_the_augmentation_cannot_support_are_refused():
    with pytest.raises(ViewError, match="views: sample with num_views"):
        StoredViews.plan("all", training_augmentation((64, 64, 3)))
    with pytest.raises(ViewError, match=r"teacher_dump\.num_views"):
        StoredViews.plan("sample", CIFAR)
    with pytest.raises(ViewError, match="augment: false"):
        StoredViews.plan("all", training_augmentation((32, 32, 3), augment=False))


def test_a_multi_view_dump_chunk_holds_at_most_64_mib_of_logits_in_whole_batches():
    from pipeline.config import TeacherDumpConfig
    from stages.teacher_dump import dump_chunk_rows

    config = TeacherDumpConfig(batch_size=1024, chunk_size=16384)
    assert dump_chunk_rows(config, 1, 10) == 16384  # single-view stores keep their chunking
    assert dump_chunk_rows(config, 2, 10) == 16384
    rows = dump_chunk_rows(config, 162, 10)  # 64 MiB / (162 * 10 * 4 B) = 10 356 rows
    assert rows == 10240 and rows * 162 * 10 * 4 <= 64 * 2**20
    assert dump_chunk_rows(config, 162, 100) == 1024  # 1 035 rows fit: one whole batch
    assert dump_chunk_rows(config, 162, 1000) == 1024  # never below one batch

"""Keyed views: pad-and-crop + flip geometry, drawn from explicit keys."""
from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from stages.views import apply_views, augmentation_params, keyed_integers


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

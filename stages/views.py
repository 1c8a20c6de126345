"""View geometry: the standard pad-and-crop + flip augmentation, drawn from explicit keys.

Every random choice is a pure function of (seed, epoch, sample_index): a counter-based hash
(SplitMix64, Steele et al. 2014), never a global RNG, batch order or worker state (STYLE.md
principle 4), so a resumed run sees exactly the views an uninterrupted run would have seen.
`view_params` rows are (dy, dx, flip): the crop offset into the zero-padded image and a flag.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def keyed_integers(key: tuple[int, ...], sample_index: np.ndarray, high: int) -> np.ndarray:
    """Integers in [0, high) that depend only on `key` and each `sample_index`.

    Args:
        key: explicit integers (e.g. (seed, epoch, stream)).
        sample_index: (B,) int64 >= 0.
        high: exclusive upper bound, >= 1.
    Returns:
        (B,) int64.
    """
    state = np.full(sample_index.shape, 0x5EED, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for part in key:
            state = _splitmix64(state ^ np.uint64(part & 0xFFFFFFFFFFFFFFFF))
        state = _splitmix64(state ^ sample_index.astype(np.uint64))
    return (state % np.uint64(high)).astype(np.int64)


def augmentation_params(seed: int, epoch: int, sample_index: np.ndarray, *, padding: int,
                        flip: bool) -> np.ndarray:
    """The (dy, dx, flip) of each sample's training view for this epoch.

    Args:
        seed, epoch: the explicit key. sample_index: (B,) int64.
        padding: zero padding on each side (4 for CIFAR); offsets lie in [0, 2·padding].
        flip: whether horizontal flips are drawn (probability 1/2).
    Returns:
        (B, 3) int16 view_params.
    """
    offsets = 2 * padding + 1
    dy = keyed_integers((seed, epoch, 1), sample_index, offsets)
    dx = keyed_integers((seed, epoch, 2), sample_index, offsets)
    flips = keyed_integers((seed, epoch, 3), sample_index, 2) if flip else np.zeros_like(dy)
    return np.stack([dy, dx, flips], axis=1).astype(np.int16)


def apply_views(images: Tensor, view_params: Tensor, *, padding: int) -> Tensor:
    """Apply each row's view: zero-pad by `padding`, crop H×W at (dy, dx), flip if asked.

    Args:
        images: (B, C, H, W) any dtype. view_params: (B, 3) integer (dy, dx, flip),
            dy, dx in [0, 2·padding].
    Returns:
        (B, C, H, W), same dtype; `(padding, padding, 0)` returns the image unchanged.
    """
    batch, _, height, width = images.shape
    view_params = view_params.to(device=images.device, dtype=torch.long)
    if padding:
        images = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    rows = view_params[:, 0:1] + torch.arange(height, device=images.device)  # (B, H)
    cols = view_params[:, 1:2] + torch.arange(width, device=images.device)  # (B, W)
    flipped = view_params[:, 2:3].bool()
    cols = torch.where(flipped, cols.flip(1), cols)
    hwc = images.permute(0, 2, 3, 1)  # (B, H+2p, W+2p, C)
    batch_index = torch.arange(batch, device=images.device)[:, None, None]
    out = hwc[batch_index, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()

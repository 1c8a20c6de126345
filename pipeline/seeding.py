"""Device choice and torch's thread count. Random draws come from explicit keys (STYLE principle 4):
`np.random.SeedSequence` per draw, and `torch.manual_seed(seed)` before a net is built."""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when available, else cpu. Raises ValueError for cuda without a GPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for but no CUDA device is visible; use auto or cpu")
    return torch.device(device)


def use_all_cores() -> int:
    """Give torch every core this process may run on (ffcv's import resets it to 1)."""
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    return cores

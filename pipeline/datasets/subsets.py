"""The rows a `Dataset` keeps: a class-balanced seeded subset, and the stratified `val` hold-out."""

from __future__ import annotations

import numpy as np


def balanced_subset(labels: np.ndarray, max_samples: int | None, seed: int, split: str) -> np.ndarray:
    """Pick a class-balanced, seeded subset of a split, keeping canonical order.

    Each of the C classes present gets max_samples // C rows; the remainder goes one row each to
    the first classes of a seeded class permutation. A class with fewer rows gives all of them and
    its shortfall is spread over the other classes the same way, so exactly
    min(max_samples, N) rows come back. Within a class the rows are the first ones of a seeded
    permutation, so a larger quota keeps every row a smaller one picked.

    Args:
        labels: (N,) integer class ids.
        max_samples: rows wanted; None (or >= N) means every row.
        seed: `data.seed`. The generator is `default_rng(SeedSequence([seed, 0 | 1]))`, 0 for the
            train split and 1 for test, so the two splits draw independent streams.
        split: "train" or "test".
    Returns:
        (min(max_samples, N),) int64 indices into `labels`, sorted ascending, unique.
    Raises:
        ValueError: `split` is not train/test, `max_samples` < 1, or labels are not 1-D integers.
    """
    streams = {"train": 0, "test": 1}
    if split not in streams:
        raise ValueError(f"balanced_subset: split must be 'train' or 'test', got {split!r}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or len(labels) == 0):
        raise ValueError(
            f"balanced_subset: labels must be a 1-D integer array, got "
            f"shape {labels.shape} dtype {labels.dtype}"
        )
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"balanced_subset: max_samples must be None or >= 1, got {max_samples}")
    if max_samples is None or max_samples >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([seed, streams[split]]))
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    class_order = rng.permutation(len(classes))
    quota = np.zeros(len(classes), dtype=np.int64)
    remaining = max_samples
    while remaining > 0:  # water-filling: each pass fills or exhausts at least one class
        open_classes = class_order[quota[class_order] < counts[class_order]]
        share, extra = divmod(remaining, len(open_classes))
        if share == 0:
            quota[open_classes[:extra]] += 1
            break
        add = np.minimum(share, counts[open_classes] - quota[open_classes])
        quota[open_classes] += add
        remaining -= int(add.sum())
    picked = []
    for c in range(len(classes)):
        members = np.flatnonzero(inverse == c)
        picked.append(members[rng.permutation(len(members))[: quota[c]]])
    return np.sort(np.concatenate(picked)).astype(np.int64)


VALIDATION_STREAM = 2  # the SeedSequence stream of `validation_split` (0: train subset, 1: test)


def validation_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the train rows into (train, val), stratified by class and seeded.

    Each class c with n_c rows gives round(fraction · n_c) of them to `val` (Python's round, half
    to even), at most n_c − 1 so that every class keeps a training row: the class proportions of
    `val` are those of the train split (a balanced train split gives a balanced `val`). Within a
    class the rows are the first ones of a permutation drawn from
    `default_rng(SeedSequence([seed, VALIDATION_STREAM]))`, so the split depends only on the
    labels, `fraction` and `seed`.

    Args:
        labels: (N,) integer class ids of the train split (after any `max_train_samples` subset).
        fraction: `data.validation_fraction`, in [0, 1); 0 gives an empty `val`.
        seed: `data.seed`.
    Returns:
        (train_rows, val_rows): int64 indices into `labels`, each sorted ascending, disjoint, and
        together every row once.
    Raises:
        ValueError: `fraction` outside [0, 1), labels not 1-D integers, or `fraction` > 0 but too
            small to hold out a single row.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or len(labels) == 0):
        raise ValueError(
            f"validation_split: labels must be a 1-D integer array, got "
            f"shape {labels.shape} dtype {labels.dtype}"
        )
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"data.validation_fraction: must lie in [0, 1), got {fraction}")
    everything = np.arange(len(labels), dtype=np.int64)
    if fraction == 0.0:
        return everything, np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([seed, VALIDATION_STREAM]))
    classes, inverse = np.unique(labels, return_inverse=True)
    held = []
    for c in range(len(classes)):
        members = np.flatnonzero(inverse == c)
        quota = min(round(fraction * len(members)), len(members) - 1)
        held.append(members[rng.permutation(len(members))[:quota]])
    val_rows = np.sort(np.concatenate(held)).astype(np.int64)
    if len(val_rows) == 0:
        raise ValueError(
            f"data.validation_fraction: {fraction} of {len(labels)} training images holds out "
            f"no image of any class (round(fraction × class size) = 0); raise it or set 0.0"
        )
    keep = np.ones(len(labels), dtype=bool)
    keep[val_rows] = False
    return everything[keep], val_rows

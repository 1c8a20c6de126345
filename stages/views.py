"""The training augmentation, defined once: the student, the teacher dump and the replay check
all draw and apply views through `Augmentation` (DESIGN.md §5).

A view is one row of `view_params`, the numbers that rebuild it exactly:

- `identity` (`augment: false`): no params (P = 0); the plain image (V = 1).
- `pad_crop_flip` (32×32 with padding 4; 28×28 with padding 0, flip only): (dy, dx, flip);
  enumerable, (2p+1)²·2 views (162 for CIFAR, 2 for Fashion-MNIST).
- `resized_crop_flip` (images ≥ 64 px): (top, left, height, width, flip); sampled like
  torchvision's RandomResizedCrop (scale, ratio) + flip.

Every random choice is a pure function of an explicit key (seed, epoch, sample_index) — a
counter-based hash (SplitMix64, Steele et al. 2014), never a global RNG, batch order or worker
state (STYLE.md principle 4) — so a resumed run sees exactly the views an uninterrupted run would
have seen, and a store dumped for `(seed, epoch)` holds exactly the views the student draws.
For an enumerable augmentation the student's draw is a view *index* v, uniform over the V views,
and `all_views()[v]` its params: with every view stored, an offline student reading
`logits[v, n]` sees exactly the images and teacher targets of the online student.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from storage.errors import LessonsError
from storage.soft_labels import StoreError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)

# Streams of the keyed hash, so that draws for different purposes never coincide.
_VIEW_STREAM = 11  # the student's view index per (seed, epoch, n)
_CROP_STREAM = 12  # resized-crop attempts (scale, log-ratio, position)
_FLIP_STREAM = 13  # resized-crop flips
_PICK_STREAM = 14  # the student's pick among K sampled views of a `sample` store
_SAMPLE_STREAM = 15  # the K views per image of a `sample` store

ViewKind = Literal["identity", "pad_crop_flip", "resized_crop_flip"]


class ViewError(LessonsError, ValueError):
    """A view setting the augmentation cannot support, or a store whose views do not fit it."""


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _keyed_state(key: tuple[int, ...], sample_index: np.ndarray) -> np.ndarray:
    state = np.full(np.shape(sample_index), 0x5EED, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for part in key:
            state = _splitmix64(state ^ np.uint64(part & 0xFFFFFFFFFFFFFFFF))
        return _splitmix64(state ^ np.asarray(sample_index).astype(np.uint64))


def keyed_integers(key: tuple[int, ...], sample_index: np.ndarray, high: int) -> np.ndarray:
    """Integers in [0, high) that depend only on `key` and each `sample_index`.

    Args:
        key: explicit integers (e.g. (seed, epoch, stream)).
        sample_index: (B,) int64 >= 0.
        high: exclusive upper bound, >= 1.
    Returns:
        (B,) int64.
    """
    return (_keyed_state(key, sample_index) % np.uint64(high)).astype(np.int64)


def keyed_uniform(key: tuple[int, ...], sample_index: np.ndarray) -> np.ndarray:
    """Floats in [0, 1) (53 random bits) that depend only on `key` and each `sample_index`: (B,) float64."""
    return (_keyed_state(key, sample_index) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def apply_views(images: Tensor, view_params: Tensor, *, padding: int) -> Tensor:
    """Apply each row's pad-crop-flip view: zero-pad by `padding`, crop H×W at (dy, dx), flip if asked.

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


def apply_resized_crops(images: Tensor, view_params: Tensor) -> Tensor:
    """Crop each image at (top, left, height, width), resize it back to H×W (bilinear,
    antialiased, torchvision's `resized_crop`), and flip it if asked.

    Args:
        images: (B, C, H, W) uint8 or float. view_params: (B, 5) integer (top, left, height,
            width, flip) inside the H×W image.
    Returns:
        (B, C, H, W), same dtype.
    """
    size = list(images.shape[-2:])
    out = torch.empty_like(images)
    for b, (top, left, height, width, flip) in enumerate(view_params.tolist()):
        view = TF.resized_crop(images[b], top, left, height, width, size, antialias=True)
        out[b] = TF.horizontal_flip(view) if flip else view
    return out


@dataclass(frozen=True)
class Augmentation:
    """The training augmentation of a dataset: its view set, its keyed draw and its apply.

    Attributes:
        kind: identity | pad_crop_flip | resized_crop_flip.
        image_size: (H, W) in pixels.
        padding: zero padding on each side for pad_crop_flip (4 for 32×32; 0: flip only).
        flip: whether horizontal flips are part of the view set.
        scale, ratio: RandomResizedCrop's area fraction and aspect-ratio range (resized_crop_flip).
    """

    kind: ViewKind
    image_size: tuple[int, int]
    padding: int = 0
    flip: bool = False
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    @property
    def param_names(self) -> tuple[str, ...]:
        """The names of the P columns of `view_params`."""
        return {
            "identity": (),
            "pad_crop_flip": ("dy", "dx", "flip"),
            "resized_crop_flip": ("top", "left", "height", "width", "flip"),
        }[self.kind]

    @property
    def enumerable(self) -> bool:
        """Whether the view set is finite (identity, pad_crop_flip)."""
        return self.kind != "resized_crop_flip"

    @property
    def num_views(self) -> int:
        """V of the enumerated view set. Raises ViewError for a sampled augmentation."""
        if not self.enumerable:
            raise ViewError(
                f"{self.kind} views are sampled, not enumerable: use views: sample with num_views"
            )
        if self.kind == "identity":
            return 1
        return (2 * self.padding + 1) ** 2 * (2 if self.flip else 1)

    def spec(self) -> dict[str, Any]:
        """The `view_spec` of the augmentation (JSON; stored in every multi-view store)."""
        spec: dict[str, Any] = {
            "kind": self.kind,
            "image_size": list(self.image_size),
            "view_param_names": list(self.param_names),
        }
        if self.kind == "pad_crop_flip":
            spec.update(padding=self.padding, flip=self.flip)
        elif self.kind == "resized_crop_flip":
            spec.update(scale=list(self.scale), ratio=list(self.ratio), flip=self.flip)
        return spec

    def all_views(self) -> np.ndarray:
        """The enumerated view set in canonical order: (V, P) int16, row v = view v.

        pad_crop_flip orders views by (dy, dx, flip), dy and dx in [0, 2·padding].
        """
        if self.kind == "identity":
            return np.zeros((1, 0), dtype=np.int16)
        if self.kind != "pad_crop_flip":
            raise ViewError(
                f"{self.kind} views are sampled, not enumerable: use views: sample with num_views"
            )
        offsets = np.arange(2 * self.padding + 1)
        flips = np.arange(2 if self.flip else 1)
        grid = np.stack(np.meshgrid(offsets, offsets, flips, indexing="ij"), axis=-1).reshape(-1, 3)
        return grid.astype(np.int16)

    def plain_view(self) -> int | None:
        """The index of the plain image in `all_views()` (None when it is not enumerable)."""
        if self.kind == "identity":
            return 0
        if self.kind != "pad_crop_flip":
            return None
        side, flips = 2 * self.padding + 1, 2 if self.flip else 1
        return (self.padding * side + self.padding) * flips

    def sample(self, key: tuple[int, ...], sample_index: np.ndarray) -> np.ndarray:
        """One random view per sample from the explicit `key`: (B, P) int16.

        resized_crop_flip follows torchvision's `RandomResizedCrop.get_params` (10 attempts of
        area ∈ scale·H·W and log-uniform aspect ratio; the centre crop at the ratio bound when none
        fits) with every uniform number drawn from (key, attempt, sample_index). Enumerable
        augmentations draw a uniform view of `all_views()`.
        """
        sample_index = np.asarray(sample_index, dtype=np.int64)
        if self.enumerable:
            return self.all_views()[keyed_integers((*key, _SAMPLE_STREAM), sample_index, self.num_views)]
        height, width = self.image_size
        area = float(height * width)
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        out = np.zeros((sample_index.shape[0], 5), dtype=np.int64)
        found = np.zeros(sample_index.shape[0], dtype=bool)
        for attempt in range(10):
            u = [keyed_uniform((*key, _CROP_STREAM, attempt, part), sample_index) for part in range(4)]
            target = area * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
            aspect = np.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
            w = np.round(np.sqrt(target * aspect)).astype(np.int64)
            h = np.round(np.sqrt(target / aspect)).astype(np.int64)
            fits = ~found & (w > 0) & (h > 0) & (w <= width) & (h <= height)
            top = np.floor(u[2] * (height - h + 1)).astype(np.int64)
            left = np.floor(u[3] * (width - w + 1)).astype(np.int64)
            out[fits, :4] = np.stack([top, left, h, w], axis=1)[fits]
            found |= fits
        if not found.all():  # torchvision's fallback: the centre crop at the nearest ratio bound
            in_ratio = width / height
            if in_ratio < self.ratio[0]:
                crop_w, crop_h = width, round(width / self.ratio[0])
            elif in_ratio > self.ratio[1]:
                crop_h, crop_w = height, round(height * self.ratio[1])
            else:
                crop_w, crop_h = width, height
            out[~found, :4] = [(height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w]
        if self.flip:
            out[:, 4] = keyed_integers((*key, _FLIP_STREAM), sample_index, 2)
        return out.astype(np.int16)

    def draw(self, seed: int, epoch: int, sample_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The student's view of each sample at (seed, epoch).

        Returns:
            (view_index (B,) int64: v in [0, V) for an enumerable augmentation, -1 for a sampled
            one; view_params (B, P) int16). With V views stored, `logits[v, n]` is the teacher on
            exactly this view.
        """
        sample_index = np.asarray(sample_index, dtype=np.int64)
        if self.enumerable:
            index = keyed_integers((seed, epoch, _VIEW_STREAM), sample_index, self.num_views)
            return index, self.all_views()[index]
        return np.full(sample_index.shape, -1, dtype=np.int64), self.sample((seed, epoch), sample_index)

    def apply(self, images: Tensor, view_params: Tensor | np.ndarray) -> Tensor:
        """Rebuild each row's view of `images` (B, C, H, W) from `view_params` (B, P).

        Returns:
            (B, C, H, W), same dtype.
        """
        view_params = torch.as_tensor(view_params)
        if self.kind == "identity":
            return images
        if self.kind == "pad_crop_flip":
            return apply_views(images, view_params, padding=self.padding)
        return apply_resized_crops(images, view_params)


def training_augmentation(image_shape: tuple[int, ...] | list[int], augment: bool = True) -> Augmentation:
    """The augmentation lessons trains with for images of `image_shape` (H, W, C).

    ≥ 64 px: random-resized-crop + flip (the ImageNet recipe); ≥ 32 px: pad-4 crop + flip (the
    CIFAR recipe, 162 views); smaller (28×28): flip only (2 views); `augment` false: identity.
    """
    height, width = int(image_shape[0]), int(image_shape[1])
    if not augment:
        return Augmentation("identity", (height, width))
    if min(height, width) >= 64:
        return Augmentation("resized_crop_flip", (height, width), flip=True)
    return Augmentation("pad_crop_flip", (height, width), padding=4 if height >= 32 else 0, flip=True)


def augmentation_from_spec(spec: dict[str, Any]) -> Augmentation:
    """The Augmentation a store's `view_spec` names (its inverse: `Augmentation.spec`).

    Raises:
        ViewError: an unknown kind.
    """
    kind = spec.get("kind")
    size = tuple(spec.get("image_size", (0, 0)))
    if kind == "identity":
        return Augmentation("identity", size)
    if kind == "pad_crop_flip":
        return Augmentation("pad_crop_flip", size, padding=int(spec["padding"]), flip=bool(spec["flip"]))
    if kind == "resized_crop_flip":
        return Augmentation(
            "resized_crop_flip",
            size,
            flip=bool(spec["flip"]),
            scale=tuple(spec["scale"]),
            ratio=tuple(spec["ratio"]),
        )
    raise ViewError(
        f"view_spec kind {kind!r} is not one lessons knows (identity, pad_crop_flip, resized_crop_flip)"
    )


ViewMode = Literal["none", "all", "scheduled", "sample"]


def stored_views_of(store: Any) -> StoredViews:
    """The StoredViews of a store (its `view_spec`, checked against its `view_params`).

    Raises:
        StoreError: naming the store, when either is not what lessons writes.
    """
    try:
        views = StoredViews.from_spec(store.attrs.get("view_spec") or {"kind": "identity"})
        views.check_params(np.asarray(store.array("view_params")[...]))
    except ViewError as exc:
        raise StoreError(f"{store.path}: {exc}; the store was not written by lessons: rebuild it") from exc
    return views


@dataclass(frozen=True)
class StoredViews:
    """Which views of each image a store holds on its V axis (`teacher_dump.views`), and which of
    them the student uses at (seed, epoch).

    | mode | V | view v of sample n | the student's pick at (seed, epoch) |
    |---|---|---|---|
    | none | 1 | the plain image | 0 (it still trains on its own keyed views: a fixed teacher) |
    | all | the augmentation's V | `all_views()[v]` | its keyed draw v (uniform over V) |
    | scheduled | seeds × epochs | slot i·E + e = the draw of (seeds[i], e) | the slot of (seed, epoch) |
    | sample | num_views K | `sample((seed, k), n)` | uniform k from (seed, epoch, n) |

    With `all` and `scheduled` the offline student sees exactly the images the online student sees.
    """

    mode: ViewMode
    augmentation: Augmentation
    num_views: int = 1
    seeds: tuple[int, ...] = ()
    epochs: int = 0
    seed: int = 0

    @classmethod
    def plan(
        cls,
        mode: ViewMode,
        augmentation: Augmentation,
        *,
        num_views: int | None = None,
        seeds: tuple[int, ...] = (0,),
        epochs: int = 1,
        seed: int = 0,
    ) -> StoredViews:
        """The views a dump of `mode` stores for `augmentation`.

        Raises:
            ViewError: `all` of a sampled augmentation, `sample` without num_views >= 1, any
                multi-view mode of the identity (augment: false), or `scheduled` without seeds
                and epochs >= 1 — one line naming the teacher_dump key and the fix.
        """
        if mode == "none":
            return cls("none", Augmentation("identity", augmentation.image_size))
        if augmentation.kind == "identity":
            raise ViewError(
                f"teacher_dump.views: {mode} needs a training augmentation, but this student "
                "trains without one (augment: false): use views: none"
            )
        if mode == "all":
            if not augmentation.enumerable:
                raise ViewError(
                    f"teacher_dump.views: all needs an enumerable augmentation, but "
                    f"{augmentation.kind} views are sampled: use views: sample with num_views: K, "
                    "or views: scheduled"
                )
            return cls("all", augmentation, augmentation.num_views)
        if mode == "scheduled":
            if not seeds or epochs < 1:
                raise ViewError(
                    "teacher_dump.views: scheduled needs teacher_dump.seeds (non-empty) and "
                    f"teacher_dump.epochs >= 1, got seeds {list(seeds)}, epochs {epochs}"
                )
            return cls("scheduled", augmentation, len(seeds) * epochs, tuple(seeds), epochs)
        if mode == "sample":
            if num_views is None or num_views < 1:
                raise ViewError(
                    "teacher_dump.views: sample needs teacher_dump.num_views (an integer >= 1), "
                    f"got {num_views}: set num_views: K"
                )
            return cls("sample", augmentation, int(num_views), seed=seed)
        raise ViewError(f"teacher_dump.views: must be none, all, scheduled or sample, got {mode!r}")

    def spec(self) -> dict[str, Any]:
        """The store's `view_spec`: the augmentation's spec plus the mode and what it needs."""
        spec = {**self.augmentation.spec(), "views": self.mode, "num_views": self.num_views}
        if self.mode == "scheduled":
            spec.update(seeds=list(self.seeds), epochs=self.epochs)
        elif self.mode == "sample":
            spec.update(seed=self.seed)
        return spec

    @classmethod
    def from_spec(cls, spec: Any) -> StoredViews:
        """Inverse of `spec`. A store written before views existed (no `views` key, V = 1) is `none`.

        Raises:
            ViewError: `spec` is not a view_spec lessons wrote (not a mapping, an unknown kind or
                mode, a missing or malformed entry).
        """
        if not isinstance(spec, dict):
            raise ViewError(f"view_spec must be a mapping as lessons writes it, got {spec!r}")
        try:
            augmentation = augmentation_from_spec(spec)
            mode = spec.get("views", "none")
            if mode not in ("none", "all", "scheduled", "sample"):
                raise ViewError(f"view_spec views {mode!r} is not none, all, scheduled or sample")
            return cls(
                mode,
                augmentation,
                int(spec.get("num_views", 1)),
                tuple(int(seed) for seed in spec.get("seeds", ())),
                int(spec.get("epochs", 0)),
                int(spec.get("seed", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ViewError):
                raise
            raise ViewError(
                f"view_spec {spec!r} is not one lessons wrote ({type(exc).__name__}: {exc})"
            ) from exc

    def check_params(self, view_params: np.ndarray) -> None:
        """Refuse stored `view_params` (V, N, P) that this view set cannot have produced.

        Raises:
            ViewError: V differs from `num_views`, P from the augmentation's parameters, or a
                value lies outside its range (an offset beyond the padding, a flag other than
                0/1, a crop outside the image).
        """
        names = self.augmentation.param_names
        if (
            view_params.ndim != 3
            or view_params.shape[0] != self.num_views
            or view_params.shape[2] != len(names)
        ):
            raise ViewError(
                f"view_params have shape {view_params.shape}, but the view_spec says ({self.num_views}, N, "
                f"{len(names)}) {list(names)}"
            )
        if not view_params.size:
            return
        values = view_params.astype(np.int64)
        height, width = self.augmentation.image_size
        if self.augmentation.kind == "pad_crop_flip":
            top = 2 * self.augmentation.padding
            bad = bool((values[..., :2] < 0).any() or (values[..., :2] > top).any())
        else:
            top_, left, crop_h, crop_w = (values[..., i] for i in range(4))
            bad = bool(
                (top_ < 0).any()
                or (left < 0).any()
                or (crop_h < 1).any()
                or (crop_w < 1).any()
                or (top_ + crop_h > height).any()
                or (left + crop_w > width).any()
            )
        flips = values[..., -1]
        if bad or ((flips != 0) & (flips != 1)).any() or (not self.augmentation.flip and flips.any()):
            raise ViewError(
                f"view_params hold values outside the {self.augmentation.kind} views of the view_spec"
            )

    def view_params(self, sample_index: np.ndarray) -> np.ndarray:
        """The params of every stored view of each sample: (V, B, P) int16 (the dump's input)."""
        sample_index = np.asarray(sample_index, dtype=np.int64)
        count, names = sample_index.shape[0], self.augmentation.param_names
        if self.mode == "none":
            return np.zeros((1, count, 0), dtype=np.int16)
        if self.mode == "all":
            return np.repeat(self.augmentation.all_views()[:, None, :], count, axis=1)
        if self.mode == "scheduled":
            return np.stack(
                [
                    self.augmentation.draw(seed, epoch, sample_index)[1]
                    for seed in self.seeds
                    for epoch in range(self.epochs)
                ]
            )
        out = np.empty((self.num_views, count, len(names)), dtype=np.int16)
        for k in range(self.num_views):
            out[k] = self.augmentation.sample((self.seed, k), sample_index)
        return out

    def pick(self, seed: int, epoch: int, sample_index: np.ndarray, *, where: str = "student") -> np.ndarray:
        """The stored view v the student uses for each sample at (seed, epoch): (B,) int64.

        Raises:
            ViewError: a `scheduled` store that does not hold (seed, epoch).
        """
        sample_index = np.asarray(sample_index, dtype=np.int64)
        if self.mode == "none":
            return np.zeros(sample_index.shape, dtype=np.int64)
        if self.mode == "all":
            return self.augmentation.draw(seed, epoch, sample_index)[0]
        if self.mode == "scheduled":
            if seed not in self.seeds or not 0 <= epoch < self.epochs:
                raise ViewError(
                    f"{where}: seed {seed}, epoch {epoch + 1} is not in the scheduled store "
                    f"(seeds {list(self.seeds)} × {self.epochs} epochs): add the seed to "
                    "teacher_dump.seeds and raise teacher_dump.epochs, or use views: all"
                )
            return np.full(sample_index.shape, self.seeds.index(seed) * self.epochs + epoch, dtype=np.int64)
        return keyed_integers((seed, epoch, _PICK_STREAM), sample_index, self.num_views)

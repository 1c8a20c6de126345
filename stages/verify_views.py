"""Command `verify-views`: replay stored views and check the teacher still gives the stored logits.

For a random sample of (view v, sample n) pairs of a logit store, the image is rebuilt from
`view_params[v, n]` with the same `Augmentation.apply` the dump and the student use, the teacher
checkpoint runs on it, and the largest |Δ logit| against `logits[v, n]` is reported (TinyViT ships
such a check for its stored augmentations); for a top-k store (DESIGN §9), against the kept
`topk_values[v, n]` at their class ids and the row's `lse[v, n]`. A store whose views, images or
teacher drifted from what its attributes say fails it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.training import channel_stats, load_checkpoint, normalize
from stages.views import stored_views_of
from storage import StoreError, open_store
from storage.beton import make_loader
from storage.manifest import file_sha256, read_prepared

logger = logging.getLogger(__name__)


# A forward under autocast rounds every layer's output to the autocast dtype; replayed in other
# batch compositions, its logits move by a few of that dtype's ulps at the largest |logit|
# (8 significant bits for bfloat16, 11 for float16): allow 4 ulps.
AUTOCAST_RELATIVE = {"bfloat16": 2.0**-6, "float16": 2.0**-9}


def replay_tolerance(stored: np.ndarray, dtype: str, autocast: str = "none") -> float:
    """The largest |Δ logit| a faithful store may show: float16 storage rounds to 11 significant
    bits (a relative half-ulp of 2^-11 at the largest |logit| replayed), plus 1e-3 for float32
    forward-pass rounding (other batch compositions, channels-last kernels), plus, for a dump
    under autocast, `AUTOCAST_RELATIVE` of the largest |logit|."""
    peak = float(np.abs(stored).max()) if stored.size else 0.0
    storage = 2.0**-11 * peak if dtype == "float16" else 0.0
    return storage + AUTOCAST_RELATIVE.get(autocast, 0.0) * peak + 1e-3


def run(
    store_path: str | Path,
    *,
    data_dir: str | Path,
    checkpoint: str | Path,
    samples: int,
    seed: int = 0,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Replay `samples` random (v, n) pairs of the train-split store at `store_path`.

    Args:
        store_path: a `logits.zarr` store. data_dir: its prepared dataset. checkpoint: the
            teacher checkpoint it was dumped from. samples: pairs to replay (>= 1). seed: which pairs.
    Returns:
        {"pairs", "views", "max_abs_diff", "tolerance", "ok"} (max_abs_diff in logits).
    Raises:
        StoreError: the store is not from this dataset or checkpoint, or is not a train-split store.
        ManifestError, CheckpointError: as their readers raise them.
    """
    device = device or torch.device("cpu")
    data_dir = Path(data_dir)
    store = open_store(store_path, kind="logits", layouts=("dense", "topk"))
    manifest = read_prepared(data_dir)
    split = store.attrs.get("split", "train")
    store.expect(dataset_fingerprint=manifest["splits"][split]["fingerprint"], against=str(data_dir))
    teacher = store.attrs.get("teacher")
    if isinstance(teacher, dict) and teacher.get("arch") == "ensemble":
        names = ", ".join(str(m.get("name")) for m in teacher.get("members", []))
        raise StoreError(
            f"{store_path}: an ensemble of teachers {names} (lessons ensemble), which no one "
            "checkpoint replays; verify each member's own store against its checkpoint instead"
        )
    sha256 = file_sha256(checkpoint)
    if not isinstance(teacher, dict) or teacher.get("checkpoint_sha256") != sha256:
        raise StoreError(
            f"{store_path}: was dumped from another checkpoint than {checkpoint} (sha256 differs); "
            "name the checkpoint it came from (stores/<teacher> ↔ checkpoints/teachers/<teacher>.pt)"
        )
    views = stored_views_of(store)
    topk = store.attrs.get("layout") == "topk"
    rows_name = "topk_values" if topk else "logits"
    num_views, num_samples = store.array(rows_name).shape[:2]
    rng = np.random.default_rng(seed)
    count = min(samples, num_views * num_samples)
    flat = rng.choice(num_views * num_samples, size=count, replace=False)
    pair_view, pair_sample = flat // num_samples, flat % num_samples
    order = np.argsort(pair_sample, kind="stable")
    pair_view, pair_sample = pair_view[order], pair_sample[order]
    stored = store.read_pairs(rows_name, pair_view, pair_sample).astype(np.float32)  # (count, C|K)
    params = store.read_pairs("view_params", pair_view, pair_sample)
    model, _ = load_checkpoint(checkpoint, manifest=manifest)
    model.to(device).eval()
    mean, std = channel_stats(manifest, device)
    unique = np.unique(pair_sample)
    images: dict[int, torch.Tensor] = {}
    loader = make_loader(
        data_dir / f"{split}.beton", batch_size=min(256, unique.size), shuffle=False, indices=unique
    )
    for batch_images, _, sample_index in loader:
        for image, n in zip(batch_images, sample_index.tolist(), strict=True):
            images[n] = image.clone()
    autocast = str(teacher.get("forward_autocast", "none"))
    replayed = np.empty((count, int(store.attrs["num_classes"])), dtype=np.float32)  # (count, C)
    for start in range(0, count, 256):
        rows = slice(start, min(start + 256, count))
        batch = torch.stack([images[int(n)] for n in pair_sample[rows]]).to(device)
        with torch.no_grad():
            inputs = normalize(views.augmentation.apply(batch, params[rows]), mean, std)
            dtype = getattr(torch, autocast, None)
            with torch.autocast(device.type, dtype=dtype, enabled=autocast != "none"):
                replayed[rows] = model(inputs).float().cpu().numpy()
    if topk:  # the replayed logits at the kept class ids, and the full row's log-sum-exp
        indices = store.read_pairs("topk_indices", pair_view, pair_sample).astype(np.int64)  # (count, K)
        lse = store.read_pairs("lse", pair_view, pair_sample)  # (count,)
        replayed_lse = torch.logsumexp(torch.from_numpy(replayed), dim=1).numpy()
        replayed = np.concatenate([np.take_along_axis(replayed, indices, 1), replayed_lse[:, None]], axis=1)
        stored = np.concatenate([stored, lse[:, None]], axis=1)  # (count, K + 1)
    max_abs_diff = float(np.abs(replayed - stored).max())
    tolerance = replay_tolerance(stored, store.attrs.get("logits_dtype", "float16"), autocast)
    result = {
        "pairs": int(count),
        "views": int(num_views),
        "max_abs_diff": max_abs_diff,
        "tolerance": tolerance,
        "ok": max_abs_diff <= tolerance,
    }
    logger.info(
        "verify-views %s: %d pairs, max |Δ logit| %.3g (tolerance %.3g)",
        store_path,
        count,
        max_abs_diff,
        tolerance,
    )
    return result

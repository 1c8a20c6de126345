"""Logit store size: bytes per sample and compression ratio, float16 vs float32, C = 10 and 100.

Stores are written the way the pipeline writes them and their chunk files are measured on disk
(Blosc zstd level 3 + byte shuffle, `storage.soft_labels`):

  real       C = 10: a `cnn_small` teacher trained for a few epochs on Fashion-MNIST
             (`stages.teacher_train.run`), then `stages.teacher_dump.run` with dtype float16 and
             float32 — the real stage, the real logits (train split).
  synthetic  C = 10 and C = 100: rows shaped like a trained teacher's (N(0, 2) noise plus a margin
             of 8 at the predicted class, the label for 80 % of rows), written with
             `StoreWriter` in the same layout (bench.ka_dtd.write_logits_store); the C = 10 pair
             shows how close the synthetic rows come to the real ones.

  views      `views: all` stores (V = 162 pad-4 crop + flip views) of the first 256 CIFAR-10 train
             images, written by `stages.teacher_dump.dump_split` (float16): C = 10 from a `cnn_small`
             trained briefly (2 epochs on 5 000 images) and from a random-init one; C = 100 from a
             random-init `cnn_small` with 100 outputs (no CIFAR-100 data here). Bytes per view
             (logits + view_params chunks ÷ V·N) are extrapolated linearly to N = 50 000 (CIFAR-10 /
             CIFAR-100 train split): the sample is one chunk of 256 rows where a real dump writes
             16 384-row chunks; Blosc compresses in blocks, so the per-view ratio is expected to hold.

Sizes are deterministic: there is nothing to repeat or interleave.

    python -m bench.storage_size [--quick] [--out FILE]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common

NAME = "storage_size"


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(store: Path) -> dict[str, Any]:
    """Bytes of the `logits` array's chunks, of the whole store, and the compression ratio."""
    import numpy as np

    from storage import open_store

    opened = open_store(store, kind="logits")
    logits = opened.array("logits")
    views, samples, num_classes = logits.shape
    raw = views * samples * num_classes * np.dtype(logits.dtype).itemsize
    chunk_bytes = sum(
        p.stat().st_size for p in (store / "logits").rglob("*") if p.is_file() and p.name != "zarr.json"
    )
    return {
        "num_samples": samples,
        "num_views": views,
        "num_classes": num_classes,
        "dtype": str(logits.dtype),
        "logits_bytes": chunk_bytes,
        "raw_bytes": raw,
        "bytes_per_sample": chunk_bytes / samples,
        "raw_bytes_per_sample": raw / samples,
        "compression_ratio": raw / chunk_bytes,
        "store_bytes_per_sample": _dir_bytes(store) / samples,
    }


def real_teacher(work: Path, quick: bool) -> list[dict[str, Any]]:
    import torch

    from pipeline.config import TeacherConfig, TeacherDumpConfig
    from stages import teacher_dump, teacher_train

    data_dir = work / "fashion_mnist"
    common.prepare(common.fashion_mnist(1024 if quick else 20000, 256 if quick else 2000), data_dir)
    common.ready_torch()
    device = torch.device("cpu")
    checkpoint = work / "cnn_small.pt"
    metrics = teacher_train.run(
        TeacherConfig(arch="cnn_small", epochs=1 if quick else 3),
        name="cnn_small",
        data_dir=data_dir,
        checkpoint_out=checkpoint,
        metrics_out=work / "teacher.json",
        curve_out=work / "curve.json",
        device=device,
    )
    rows = []
    for dtype in ("float16", "float32"):
        out = work / f"real-{dtype}.zarr"
        teacher_dump.run(
            TeacherDumpConfig(dtype=dtype),
            teacher="cnn_small",
            data_dir=data_dir,
            checkpoint=checkpoint,
            train_out=out,
            test_out=work / f"real-{dtype}-test.zarr",
            device=device,
        )
        rows.append(
            {
                "source": "real cnn_small on fashion_mnist (train split)",
                "teacher_train_top1": metrics["train_top1"],
                **measure(out),
            }
        )
    return rows


def synthetic(work: Path, quick: bool) -> list[dict[str, Any]]:
    from bench.ka_dtd import write_logits_store

    rows = []
    samples = 4096 if quick else 50000
    for num_classes in (10, 100):
        for dtype in ("float16", "float32"):  # the same draws, rounded to float16 or not
            out = work / f"synthetic-{num_classes}-{dtype}.zarr"
            write_logits_store(out, samples, 16384, num_classes=num_classes, dtype=dtype)
            rows.append({"source": "synthetic", **measure(out)})
    return rows


def _array_bytes(store: Path, name: str) -> int:
    return sum(p.stat().st_size for p in (store / name).rglob("*") if p.is_file() and p.name != "zarr.json")


def views_stores(work: Path, quick: bool) -> list[dict[str, Any]]:
    """162-view float16 stores of CIFAR-10 images from real `dump_split` runs, per view and extrapolated."""
    import torch

    import nets
    from pipeline.config import TeacherConfig, TeacherDumpConfig
    from stages import teacher_train
    from stages.teacher_dump import dump_split, store_attrs
    from stages.training import channel_stats, load_checkpoint
    from stages.views import StoredViews, training_augmentation

    data_dir = work / "cifar10"
    _, manifest = common.prepare(
        common.cifar10(512 if quick else 5000, 256), data_dir
    )  # 5 000: `images` below
    common.ready_torch()
    device = torch.device("cpu")
    checkpoint = work / "cifar-cnn_small.pt"
    epochs, images = (1, 512) if quick else (2, 5000)
    metrics = teacher_train.run(
        TeacherConfig(arch="cnn_small", epochs=epochs),
        name="cnn_small",
        data_dir=data_dir,
        checkpoint_out=checkpoint,
        metrics_out=work / "cifar-teacher.json",
        curve_out=work / "cifar-curve.json",
        device=device,
    )
    trained, _ = load_checkpoint(checkpoint, manifest=manifest)
    views = StoredViews.plan("all", training_augmentation(manifest["image_shape"]))
    num_samples = 32 if quick else 256
    config = TeacherDumpConfig(batch_size=num_samples, chunk_size=num_samples, views="all")
    mean, std = channel_stats(manifest, device)
    rows: list[dict[str, Any]] = []
    for label, num_classes, model in (
        (f"trained cnn_small ({epochs} epochs, {images} CIFAR-10 images)", 10, trained),
        ("random-init cnn_small", 10, None),
        ("random-init cnn_small, 100 outputs", 100, None),
    ):
        if model is None:
            torch.manual_seed(0)
            model = nets.build_net("cnn_small", num_classes, in_channels=3, image_size=32)
        model.eval()
        attrs = store_attrs(
            manifest={**manifest, "num_classes": num_classes},
            split="train",
            teacher="cnn_small",
            checkpoint_meta={"arch": "cnn_small"},
            checkpoint_sha256="0" * 64,
            dtype="float16",
            views=views,
        )
        out = work / f"views-{num_classes}-{len(rows)}.zarr"
        dump_split(
            model,
            beton=data_dir / "train.beton",
            out=out,
            num_samples=num_samples,
            attrs=attrs,
            config=config,
            mean=mean,
            std=std,
            device=device,
            views=views,
        )
        row = {"source": f"views: {label}", **measure(out)}
        cells = row["num_views"] * row["num_samples"]
        view_params = _array_bytes(out, "view_params")
        row.update(
            logits_bytes_per_view=row["logits_bytes"] / cells,
            view_params_bytes_per_view=view_params / cells,
            bytes_per_view=(row["logits_bytes"] + view_params) / cells,
        )
        if "trained" in label:
            row["teacher_train_top1"] = metrics["train_top1"]
        row["extrapolated_50000"] = {
            "num_samples": 50000,
            "num_views": row["num_views"],
            "logits_bytes": row["logits_bytes_per_view"] * cells / num_samples * 50000,
            "view_params_bytes": row["view_params_bytes_per_view"] * cells / num_samples * 50000,
            "raw_logits_bytes": row["num_views"] * 50000 * num_classes * 2,
        }
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    started = time.perf_counter()
    with common.tempdir(NAME) as tmp:
        rows = real_teacher(Path(tmp), args.quick) + synthetic(Path(tmp), args.quick)
        view_rows = views_stores(Path(tmp), args.quick)
    for row in rows:
        print(
            f"{row['source'][:9]:9s} C={row['num_classes']:3d} {row['dtype']}: "
            f"{row['bytes_per_sample']:.1f} B/sample (raw {row['raw_bytes_per_sample']:.0f}), "
            f"ratio {row['compression_ratio']:.2f}"
        )
    for row in view_rows:
        total = row["extrapolated_50000"]
        print(
            f"{row['source']}: C={row['num_classes']} V={row['num_views']}: "
            f"{row['bytes_per_view']:.1f} B/view "
            f"(logits {row['logits_bytes_per_view']:.1f}, raw {2 * row['num_classes']}; view_params "
            f"{row['view_params_bytes_per_view']:.2f}), ratio {row['compression_ratio']:.2f}; N=50 000: "
            f"{(total['logits_bytes'] + total['view_params_bytes']) / 1e6:.0f} MB"
        )
    result = {
        "quick": args.quick,
        "codec": "blosc zstd clevel 3, byte shuffle",
        "chunk_rows": 16384,
        "rows": rows,
        "views": view_rows,
    }
    common.write_result(NAME, result, args.out, started)
    return result


if __name__ == "__main__":
    common.main_guard(main)

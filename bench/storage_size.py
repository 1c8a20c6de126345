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
    chunk_bytes = sum(p.stat().st_size for p in (store / "logits").rglob("*")
                      if p.is_file() and p.name != "zarr.json")
    return {"num_samples": samples, "num_classes": num_classes, "dtype": str(logits.dtype),
            "logits_bytes": chunk_bytes, "raw_bytes": raw,
            "bytes_per_sample": chunk_bytes / samples, "raw_bytes_per_sample": raw / samples,
            "compression_ratio": raw / chunk_bytes,
            "store_bytes_per_sample": _dir_bytes(store) / samples}


def real_teacher(work: Path, quick: bool) -> list[dict[str, Any]]:
    import torch

    from pipeline.config import TeacherConfig, TeacherDumpConfig
    from stages import teacher_dump, teacher_train

    data_dir = work / "fashion_mnist"
    common.prepare(common.fashion_mnist(1024 if quick else 20000, 256 if quick else 2000), data_dir)
    common.ready_torch()
    device = torch.device("cpu")
    checkpoint = work / "cnn_small.pt"
    metrics = teacher_train.run(TeacherConfig(arch="cnn_small", epochs=1 if quick else 3), name="cnn_small",
                                data_dir=data_dir, checkpoint_out=checkpoint, metrics_out=work / "teacher.json",
                                curve_out=work / "curve.json", device=device)
    rows = []
    for dtype in ("float16", "float32"):
        out = work / f"real-{dtype}.zarr"
        teacher_dump.run(TeacherDumpConfig(dtype=dtype), teacher="cnn_small", data_dir=data_dir,
                         checkpoint=checkpoint, train_out=out, test_out=work / f"real-{dtype}-test.zarr",
                         device=device)
        rows.append({"source": "real cnn_small on fashion_mnist (train split)",
                     "teacher_train_top1": metrics["train_top1"], **measure(out)})
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    started = time.perf_counter()
    with common.tempdir(NAME) as tmp:
        rows = real_teacher(Path(tmp), args.quick) + synthetic(Path(tmp), args.quick)
    for row in rows:
        print(f"{row['source'][:9]:9s} C={row['num_classes']:3d} {row['dtype']}: "
              f"{row['bytes_per_sample']:.1f} B/sample (raw {row['raw_bytes_per_sample']:.0f}), "
              f"ratio {row['compression_ratio']:.2f}")
    result = {"quick": args.quick, "codec": "blosc zstd clevel 3, byte shuffle", "chunk_rows": 16384,
              "rows": rows}
    common.write_result(NAME, result, args.out, started)
    return result


if __name__ == "__main__":
    common.main_guard(main)

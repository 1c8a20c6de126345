"""The bare forward loop a teacher dump is measured against (bench/gpu.sh): views/s of `model(x)`.

One batch of real training images, normalised and channels-last on the device, is forwarded
`--reps` times under `torch.inference_mode` (and the dump's autocast); the clock stops after a
device synchronisation. No loading, no view building, no copy out, no store: the ceiling a dump
of that teacher on that device can approach.

    python -m bench.gpu_floor --data DIR --checkpoint T.pt [--batch-size B] [--reps R]
        [--autocast none|bfloat16|float16] [--device auto|cpu|cuda]

Prints one JSON line: {"device", "batch_size", "views_per_s", "autocast"}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--autocast", choices=("none", "bfloat16", "float16"), default="none")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    import ffcv  # noqa: F401  (before torch's thread count is set)
    import torch

    from pipeline.seeding import resolve_device, use_all_cores
    from stages.training import channel_stats, load_checkpoint, normalize
    from storage.beton import make_loader
    from storage.manifest import read_prepared

    use_all_cores()
    device = resolve_device(args.device)
    manifest = read_prepared(args.data)
    model, _ = load_checkpoint(args.checkpoint, manifest=manifest)
    model.to(device).eval().to(memory_format=torch.channels_last)
    loader = make_loader(args.data / "train.beton", batch_size=args.batch_size, shuffle=False)
    images = next(iter(loader))[0].clone().to(device)
    mean, std = channel_stats(manifest, device)
    x = normalize(images, mean, std).contiguous(memory_format=torch.channels_last)
    autocast = (
        torch.autocast(device.type, dtype=getattr(torch, args.autocast))
        if args.autocast != "none"
        else contextlib.nullcontext()
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode(), autocast:
        for _ in range(3):  # warm-up: cuDNN's kernel choice, oneDNN's primitive cache
            model(x)
        sync()
        start = time.perf_counter()
        for _ in range(args.reps):
            model(x)
        sync()
        elapsed = time.perf_counter() - start
    result = {
        "device": str(device),
        "batch_size": int(x.shape[0]),
        "views_per_s": round(x.shape[0] * args.reps / elapsed, 1),
        "autocast": args.autocast,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""Teacher dump throughput: `stages.teacher_dump.dump_split` against a bare forward loop.

Contenders, interleaved in one run, per (dataset, teacher):
  dump   the real dump: the project's ffcv loader over the beton, normalise, forward, float16
         store written through StoreWriter (a fresh store per repetition); its own
         load_s / forward_s / write_s give the share of time in each part.
  floor  `model(x)` under no_grad over the same images, preloaded and normalised, same batch.
Figure: dump images/s ÷ floor images/s (target ≥ 0.9). The torch thread count seen at every
forward call (a forward pre-hook) is recorded for both.

    python -m bench.teacher_dump [--quick] [--reps N] [--out FILE]
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

NAME = "teacher_dump"
TARGET = 0.9


def _setups(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [{"dataset": "fashion_mnist", "teacher": "cnn_small", "num_samples": 512, "batch_size": 128}]
    return [
        {"dataset": "fashion_mnist", "teacher": "cnn_small", "num_samples": 16384, "batch_size": 1024},
        {"dataset": "cifar10", "teacher": "resnet20", "num_samples": 4096, "batch_size": 1024},
    ]


def bench_setup(setup: dict[str, Any], reps: int, work: Path) -> dict[str, Any]:
    import torch

    import nets
    from pipeline.config import TeacherDumpConfig
    from stages.teacher_dump import dump_split, store_attrs
    from stages.training import channel_stats, normalize

    data_config = (common.fashion_mnist if setup["dataset"] == "fashion_mnist" else common.cifar10)(
        setup["num_samples"], 256)
    data_dir = work / setup["dataset"]
    dataset, manifest = common.prepare(data_config, data_dir)
    common.ready_torch()
    height, _, channels = manifest["image_shape"]
    num_samples = manifest["splits"]["train"]["num_samples"]
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = nets.build_net(setup["teacher"], manifest["num_classes"], in_channels=channels,
                           image_size=height).eval()
    mean, std = channel_stats(manifest, device)
    config = TeacherDumpConfig(batch_size=setup["batch_size"],
                               chunk_size=setup["batch_size"] * max(1, 16384 // setup["batch_size"]))
    attrs = store_attrs(manifest=manifest, split="train", teacher=setup["teacher"],
                        checkpoint_meta={"arch": setup["teacher"]}, checkpoint_sha256="0" * 64,
                        dtype=config.dtype)
    images = torch.from_numpy(dataset.train.images).permute(0, 3, 1, 2).contiguous()
    batches = [normalize(images[i:i + config.batch_size], mean, std)
               for i in range(0, num_samples, config.batch_size)]
    threads_seen: list[int] = []
    model.register_forward_pre_hook(lambda _m, _x: threads_seen.append(torch.get_num_threads()))
    counter = iter(range(10**9))

    def dump() -> dict[str, float]:
        out = work / "stores" / f"logits-{next(counter)}.zarr"
        threads_seen.clear()
        started = time.perf_counter()
        timing = dump_split(model, beton=data_dir / "train.beton", out=out, num_samples=num_samples,
                            attrs=attrs, config=config, mean=mean, std=std, device=device,
                            image_shape=tuple(manifest["image_shape"]))
        elapsed = time.perf_counter() - started
        assert timing["rows"] == num_samples, timing
        shutil.rmtree(out)
        return {"images_per_s": num_samples / elapsed, "elapsed_s": elapsed,
                "load_s": timing["load_s"], "forward_s": timing["forward_s"],
                "write_s": timing["write_s"], "threads": min(threads_seen)}

    def floor() -> dict[str, float]:
        threads_seen.clear()
        started = time.perf_counter()
        with torch.no_grad():
            for x in batches:
                model(x)
        elapsed = time.perf_counter() - started
        return {"images_per_s": num_samples / elapsed, "elapsed_s": elapsed, "threads": min(threads_seen)}

    print(f"{setup['dataset']} {setup['teacher']}: N={num_samples}, batch {config.batch_size}, "
          f"torch threads {torch.get_num_threads()}")
    samples = common.interleave({"dump": dump, "floor": floor}, reps)
    dumps, floors = samples["dump"], samples["floor"]
    ratio = common.ratio_summary([d["images_per_s"] for d in dumps], [f["images_per_s"] for f in floors])
    shares = {part: common.summary([d[part] / d["elapsed_s"] for d in dumps])
              for part in ("load_s", "forward_s", "write_s")}
    result = {
        **setup, "num_samples": num_samples, "chunk_size": config.chunk_size, "dtype": config.dtype,
        "dump_images_per_s": common.summary([d["images_per_s"] for d in dumps]),
        "floor_images_per_s": common.summary([f["images_per_s"] for f in floors]),
        "ratio_dump_over_floor": ratio,
        "share_of_dump_time": {k.replace("_s", ""): v for k, v in shares.items()},
        "other_share": common.summary([1 - sum(d[p] for p in ("load_s", "forward_s", "write_s")) / d["elapsed_s"]
                                       for d in dumps]),
        "torch_threads_in_loop": {"dump": sorted({d["threads"] for d in dumps}),
                                  "floor": sorted({f["threads"] for f in floors})},
        "target": TARGET, "verdict": common.verdict(ratio["median"], TARGET),
    }
    print(f"  dump/floor {common.fmt(ratio)} (target >= {TARGET}: {result['verdict']}); shares "
          + ", ".join(f"{k} {v['median']:.2f}" for k, v in result["share_of_dump_time"].items()))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    reps = args.reps or (2 if args.quick else 5)
    started = time.perf_counter()
    with common.tempdir(NAME) as tmp:
        results = [bench_setup(setup, reps, Path(tmp) / str(i)) for i, setup in enumerate(_setups(args.quick))]
    result = {"quick": args.quick, "reps": reps, "setups": results}
    common.write_result(NAME, result, args.out, started)
    return result


if __name__ == "__main__":
    common.main_guard(main)

"""Teacher dump throughput: `stages.teacher_dump.dump_split` against a bare forward loop.

Contenders, interleaved in one run, per (dataset, teacher):
  dump   the real dump: the project's ffcv loader over the beton, normalise, forward, float16
         store written through StoreWriter (a fresh store per repetition); its own
         load_s / forward_s / write_s give the share of time in each part.
  floor_nchw  `model(x)` under no_grad over the same images, preloaded and normalised, same
              batch, default (NCHW) memory format: the bare loop.
  floor_cl    the same with model and batches in channels-last format (faster on CPU).
  dump@REF    with --baseline-ref: `stages/teacher_dump.py` of that git revision (before/after).

With `views: all` (the `views` setups: every one of the 162 pad-4 crop + flip views of each CIFAR
image, 2 flips for Fashion-MNIST) the dump forwards V views of every loaded batch, and the
contenders are, for the same N images × V views (images/s counts views):
  dump        `dump_split(..., views=StoredViews all)`: loader, per view `Augmentation.apply` +
              normalise + channels-last, forward, (V, N, C) store written.
  floor_cl    the bare forward loop: `model(x)` over the N·V views, built beforehand with the same
              `Augmentation.apply` + `normalize`, preloaded, channels-last (model too). Building the
              views is NOT in this floor's time: the strict floor, the target's denominator.
  floor_views the same loop over the preloaded uint8 images (NCHW, like the loader's), building each
              view in the loop exactly as the dump does (apply + normalise + channels-last), then
              `model(x)`: what the dump cannot avoid short of a faster view builder; no loader,
              no store, no copy of the logits out.
Figure: dump images/s ÷ the faster pure-forward floor's images/s in the same repetition (target
≥ 0.9; floor_nchw or floor_cl for V = 1, floor_cl with views); dump ÷ floor_views is reported
beside it. The torch thread count seen at every forward call (a forward pre-hook) is recorded.

    python -m bench.teacher_dump [--quick] [--reps N] [--out FILE] [--baseline-ref REF] [--only v1|views]
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import inspect
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common

NAME = "teacher_dump"
TARGET = 0.9


def _setups(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [
            {"dataset": "fashion_mnist", "teacher": "cnn_small", "num_samples": 512, "batch_size": 128},
            {
                "dataset": "fashion_mnist",
                "teacher": "cnn_small",
                "num_samples": 256,
                "batch_size": 128,
                "views": "all",
            },
        ]
    return [
        # Subsets, so that a repetition fits in tens of seconds on 2 shared cores; the loader's
        # fixed start-up cost (about 1 s: ffcv builds and JIT-compiles its pipeline per loader)
        # weighs more on them than on a whole split.
        {"dataset": "fashion_mnist", "teacher": "cnn_small", "num_samples": 16384, "batch_size": 1024},
        {"dataset": "cifar10", "teacher": "resnet20", "num_samples": 4096, "batch_size": 512},
        # 162 views: 256 images x 162 = 41 472 forwards per contender and repetition (the issue's
        # 5 000 images would take 15 min per contender here); batch 256 = one chunk of rows.
        {"dataset": "cifar10", "teacher": "resnet20", "num_samples": 256, "batch_size": 256, "views": "all"},
    ]


def _baseline_dump_split(ref: str, work: Path, image_shape: tuple[int, int, int]) -> Any:
    """`dump_split` from `stages/teacher_dump.py` at git revision `ref` (other modules: current)."""
    source = subprocess.run(
        ["git", "show", f"{ref}:stages/teacher_dump.py"],
        cwd=common.REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = work / "teacher_dump_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("teacher_dump_baseline", path)
    assert spec is not None and spec.loader is not None
    module: Any = importlib.util.module_from_spec(spec)  # a module of an older revision: names unknown here
    spec.loader.exec_module(module)
    # A baseline from before make_loader lost `augment` (always False) and `image_shape` (used
    # only for augmentation), and dump_split its `image_shape` (passed on to make_loader only).
    current = module.make_loader
    module.make_loader = lambda *args, augment=False, image_shape=None, **kwargs: current(*args, **kwargs)
    if "image_shape" in inspect.signature(module.dump_split).parameters:
        return functools.partial(module.dump_split, image_shape=image_shape)
    return module.dump_split


def bench_setup(
    setup: dict[str, Any], reps: int, work: Path, baseline_ref: str | None = None
) -> dict[str, Any]:
    import numpy as np
    import torch

    import nets
    from pipeline.config import TeacherDumpConfig
    from stages.teacher_dump import dump_split, store_attrs
    from stages.training import channel_stats, normalize
    from stages.views import StoredViews, training_augmentation

    data_config = (common.fashion_mnist if setup["dataset"] == "fashion_mnist" else common.cifar10)(
        setup["num_samples"], 256
    )
    data_dir = work / setup["dataset"]
    dataset, manifest = common.prepare(data_config, data_dir)
    common.ready_torch()
    height, _, channels = manifest["image_shape"]
    num_samples = manifest["splits"]["train"]["num_samples"]
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = nets.build_net(
        setup["teacher"], manifest["num_classes"], in_channels=channels, image_size=height
    ).eval()
    mean, std = channel_stats(manifest, device)
    config = TeacherDumpConfig(
        batch_size=setup["batch_size"], chunk_size=setup["batch_size"] * max(1, 16384 // setup["batch_size"])
    )
    attrs = store_attrs(
        manifest=manifest,
        split="train",
        teacher=setup["teacher"],
        checkpoint_meta={"arch": setup["teacher"]},
        checkpoint_sha256="0" * 64,
        dtype=config.dtype,
        views=None,
    )
    views = None
    if setup.get("views"):
        views = StoredViews.plan(setup["views"], training_augmentation(manifest["image_shape"]))
        attrs = store_attrs(
            manifest=manifest,
            split="train",
            teacher=setup["teacher"],
            checkpoint_meta={"arch": setup["teacher"]},
            checkpoint_sha256="0" * 64,
            dtype=config.dtype,
            views=views,
        )
    num_views = 1 if views is None else views.num_views
    # (N, H, W, C) -> (N, C, H, W) with standard strides (for C = 1, `.contiguous()` after a
    # permute would keep channels-last strides and make this the channels-last floor).
    images = torch.empty((num_samples, channels, height, height), dtype=torch.uint8)
    images.copy_(torch.from_numpy(dataset.train.images).permute(0, 3, 1, 2))
    channels_last = torch.channels_last
    starts = range(0, num_samples, config.batch_size)
    if views is None:
        batches = [normalize(images[i : i + config.batch_size], mean, std) for i in starts]
        batches_cl = [x.contiguous(memory_format=channels_last) for x in batches]
    else:  # every view of every batch, built as the dump builds it, preloaded
        view_params = views.view_params(np.arange(num_samples))  # (V, N, P)
        batches = []
        batches_cl = [
            normalize(
                views.augmentation.apply(
                    images[i : i + config.batch_size], view_params[v, i : i + config.batch_size]
                ),
                mean,
                std,
            ).contiguous(memory_format=channels_last)
            for i in starts
            for v in range(num_views)
        ]
    model_nchw = copy.deepcopy(model)
    model_cl = copy.deepcopy(model).to(memory_format=channels_last)
    threads_seen: list[int] = []
    for net in (model, model_nchw, model_cl):
        net.register_forward_pre_hook(lambda _m, _x: threads_seen.append(torch.get_num_threads()))
    counter = iter(range(10**9))

    def dump_with(dump_fn: Any, net: torch.nn.Module) -> Any:
        def dump() -> dict[str, float]:
            out = work / "stores" / f"logits-{next(counter)}.zarr"
            threads_seen.clear()
            started = time.perf_counter()
            timing = dump_fn(
                net,
                beton=data_dir / "train.beton",
                out=out,
                num_samples=num_samples,
                attrs=attrs,
                config=config,
                mean=mean,
                std=std,
                device=device,
                **({} if views is None else {"views": views}),
            )
            elapsed = time.perf_counter() - started
            assert timing["rows"] == num_samples, timing
            shutil.rmtree(out)
            return {
                "images_per_s": num_samples * num_views / elapsed,
                "elapsed_s": elapsed,
                "load_s": timing["load_s"],
                "forward_s": timing["forward_s"],
                "write_s": timing["write_s"],
                "threads": min(threads_seen),
            }

        return dump

    def floor_with(net: torch.nn.Module, inputs: list[torch.Tensor]) -> Any:
        def floor() -> dict[str, float]:
            threads_seen.clear()
            started = time.perf_counter()
            with torch.no_grad():
                for x in inputs:
                    net(x)
            elapsed = time.perf_counter() - started
            return {
                "images_per_s": num_samples * num_views / elapsed,
                "elapsed_s": elapsed,
                "threads": min(threads_seen),
            }

        return floor

    def floor_building_views() -> dict[str, float]:
        assert views is not None  # only a views setup times this floor
        threads_seen.clear()
        started = time.perf_counter()
        with torch.no_grad():
            for i in starts:
                batch = images[i : i + config.batch_size]
                for v in range(num_views):
                    x = normalize(
                        views.augmentation.apply(batch, view_params[v, i : i + config.batch_size]), mean, std
                    )
                    model_cl(x.contiguous(memory_format=channels_last))
        elapsed = time.perf_counter() - started
        return {
            "images_per_s": num_samples * num_views / elapsed,
            "elapsed_s": elapsed,
            "threads": min(threads_seen),
        }

    contenders = {"dump": dump_with(dump_split, model)}
    if views is None:
        contenders["floor_nchw"] = floor_with(model_nchw, batches)
    contenders["floor_cl"] = floor_with(model_cl, batches_cl)
    if views is not None:
        contenders["floor_views"] = floor_building_views
    if baseline_ref and views is None:
        contenders[f"dump@{baseline_ref}"] = dump_with(
            _baseline_dump_split(baseline_ref, work, tuple(manifest["image_shape"])),
            copy.deepcopy(model_nchw),
        )

    print(
        f"{setup['dataset']} {setup['teacher']}: N={num_samples}, V={num_views}, batch {config.batch_size}, "
        f"torch threads {torch.get_num_threads()}"
    )

    def warm_up() -> None:  # oneDNN builds its kernels for a shape on first use: not timed
        with torch.no_grad():
            if batches:
                model_nchw(batches[0])
            model_cl(batches_cl[0])
            model.to(memory_format=channels_last)(batches_cl[0])

    warm_up()
    samples = common.interleave(contenders, reps, warmup=False)
    dumps = samples["dump"]
    pure_floors = [samples[name] for name in ("floor_nchw", "floor_cl") if name in samples]
    best_floor = [max(runs[r]["images_per_s"] for runs in pure_floors) for r in range(reps)]
    ratio = common.ratio_summary([d["images_per_s"] for d in dumps], best_floor)
    shares = {
        part: common.summary([d[part] / d["elapsed_s"] for d in dumps])
        for part in ("load_s", "forward_s", "write_s")
    }
    result = {
        **setup,
        "views": setup.get("views", "none"),
        "num_views": num_views,
        "num_samples": num_samples,
        "chunk_size": config.chunk_size,
        "dtype": config.dtype,
        "images_per_s": {
            name: common.summary([r["images_per_s"] for r in runs]) for name, runs in samples.items()
        },
        "ratio_dump_over_floor": ratio,
        **{
            f"ratio_dump_over_{name}": common.ratio_summary(
                [d["images_per_s"] for d in dumps], [f["images_per_s"] for f in samples[name]]
            )
            for name in ("floor_nchw", "floor_views")
            if name in samples
        },
        "share_of_dump_time": {k.replace("_s", ""): v for k, v in shares.items()},
        "other_share": common.summary(
            [1 - sum(d[p] for p in ("load_s", "forward_s", "write_s")) / d["elapsed_s"] for d in dumps]
        ),
        "torch_threads_in_loop": {
            name: sorted({r["threads"] for r in runs}) for name, runs in samples.items()
        },
        "target": TARGET,
        "verdict": common.verdict(ratio["median"], TARGET),
    }
    if baseline_ref:
        before = samples[f"dump@{baseline_ref}"]
        result["baseline"] = {
            "ref": baseline_ref,
            "ratio_dump_over_floor": common.ratio_summary([b["images_per_s"] for b in before], best_floor),
            "speedup": common.ratio_summary(
                [d["images_per_s"] for d in dumps], [b["images_per_s"] for b in before]
            ),
            "share_of_dump_time": {
                part.replace("_s", ""): common.summary([b[part] / b["elapsed_s"] for b in before])
                for part in ("load_s", "forward_s", "write_s")
            },
        }
        print(
            f"  before ({baseline_ref}): "
            f"dump/floor {common.fmt(result['baseline']['ratio_dump_over_floor'])}, "
            f"speedup {common.fmt(result['baseline']['speedup'])}"
        )
    if "ratio_dump_over_floor_views" in result:
        print(
            "  dump/floor_views (views built in the loop) "
            f"{common.fmt(result['ratio_dump_over_floor_views'])}"
        )
    print(
        f"  dump/floor {common.fmt(ratio)} (target >= {TARGET}: {result['verdict']}); shares "
        + ", ".join(f"{k} {v['median']:.2f}" for k, v in result["share_of_dump_time"].items())
    )
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cli = common.parser(__doc__.splitlines()[0])
    cli.add_argument(
        "--baseline-ref",
        default=None,
        help="also run stages/teacher_dump.py of this git revision (before/after)",
    )
    cli.add_argument(
        "--only",
        choices=("v1", "views"),
        default=None,
        help="run only the plain-image (V = 1) setups or only the views: all setups",
    )
    args = cli.parse_args(argv)
    reps = args.reps or (2 if args.quick else 3)
    setups = [
        s for s in _setups(args.quick) if args.only is None or (args.only == "views") == bool(s.get("views"))
    ]
    started = time.perf_counter()
    with common.tempdir(NAME) as tmp:
        results = [
            bench_setup(setup, reps, Path(tmp) / str(i), args.baseline_ref) for i, setup in enumerate(setups)
        ]
    result = {"quick": args.quick, "reps": reps, "setups": results}
    common.write_result(NAME, result, args.out, started)
    return result


if __name__ == "__main__":
    common.main_guard(main)

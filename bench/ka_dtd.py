"""KA + DTD stages over a large logit store: seconds and peak RSS against the zarr I/O floor.

For N = 50 000 and N = 2 000 000 rows of C = 100 float16 logits (a store written chunk by chunk
with `storage.StoreWriter`, as `teacher_dump` writes it, never whole in memory), two contenders
run, each in its own subprocess (so its peak RSS is its own), interleaved:

  stages  `stages.adjust.run` (method ps) then `stages.temperature.run`, as `lessons adjust` and
          `lessons temperature` run them (dask, local threaded scheduler).
  floor   the bare I/O those stages cannot avoid: read the logits chunk by chunk with zarr and write
          a same-shaped float16 array plus the small (V, N) arrays (2 bool, 6 float32), same chunks
          and codec (Blosc zstd 3, byte shuffle).

Figures: stages seconds ÷ floor seconds (target ≤ 1.5); the stages' peak RSS at 2M (target
< 1 GiB) and its change between 50k and 2M (target within 20 %).

The `views` group runs the same two contenders on `views: all` stores: V = 162 (pad-4 crop + flip
of 32×32), C = 10, N = 5 000 and 20 000 (V·N = 0.8M and 3.2M rows), 1 024 rows per chunk: a
(162, 1024, 10) float16 chunk is 3.3 MB, the bytes of a (1, 16384, 100) one. Same figures: time ÷
floor (≤ 1.5) and peak RSS flat in N (within 20 % from 5 000 to 20 000).

    python -m bench.ka_dtd [--quick] [--reps N] [--out FILE] [--only v1|views]
"""

from __future__ import annotations

import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common

NAME = "ka_dtd"
NUM_CLASSES = 100
VIEWS_CLASSES = 10
TARGET_TIME = 1.5
TARGET_RSS_GROWTH = 0.2
TARGET_RSS_BYTES = 1 << 30
SMALL_ARRAYS = {
    "fixed_target": "bool",
    "rewritten": "bool",
    "teacher_max_prob": "float32",
    "teacher_entropy": "float32",
    "teacher_margin": "float32",
    "teacher_logit_norm": "float32",
    "omega_teacher": "float32",
    "static_temperature": "float32",
}


def write_logits_store(
    path: Path,
    num_samples: int,
    chunk_rows: int,
    seed: int = 0,
    num_classes: int = NUM_CLASSES,
    dtype: str = "float16",
    views: bool = False,
) -> None:
    """A (V, N, C) teacher logit store, one chunk of rows in memory at a time: V = 1 (the plain
    image), or with `views` V = 162 (`views: all` of 32×32 images, view_params and view_spec as
    `teacher_dump` writes them).

    Rows look like a trained teacher's: N(0, 2) noise plus a margin of 8 at the predicted class,
    which is the label for 80 % of the rows (the rest are the rows KA rewrites); each view draws
    its own prediction.
    """
    import numpy as np

    from stages.views import StoredViews, training_augmentation
    from storage import ArraySpec, StoreWriter

    stored = StoredViews.plan("all" if views else "none", training_augmentation((32, 32, 3)))
    num_views, num_params = stored.num_views, len(stored.augmentation.param_names)
    arrays = {
        "logits": ArraySpec((num_views, num_samples, num_classes), dtype, sample_axis=1),
        "labels": ArraySpec((num_samples,), "int64"),
        "sample_index": ArraySpec((num_samples,), "int64"),
        "view_params": ArraySpec((num_views, num_samples, num_params), "int16", sample_axis=1),
    }
    attrs = {
        "split": "train",
        "dataset": "synthetic",
        "dataset_fingerprint": f"bench-{num_samples}",
        "num_classes": num_classes,
        "num_views": num_views,
        "view_spec": stored.spec() if views else {"kind": "identity", "num_views": 1, "view_param_names": []},
        "logits_dtype": dtype,
        "teacher": {"name": "bench", "arch": "none"},
    }
    with StoreWriter(path, kind="logits", arrays=arrays, attrs=attrs, chunk_rows=chunk_rows) as writer:
        for chunk in writer.pending_chunks():
            rows = writer.rows(chunk)
            rng = np.random.default_rng(np.random.SeedSequence([seed, chunk]))
            count = rows.stop - rows.start
            labels = rng.integers(0, num_classes, count)
            shape = (num_views, count)
            predicted = np.where(rng.random(shape) < 0.8, labels, rng.integers(0, num_classes, shape))
            logits = rng.standard_normal((*shape, num_classes), dtype=np.float32) * 2.0
            np.put_along_axis(
                logits,
                predicted[..., None],
                np.take_along_axis(logits, predicted[..., None], axis=-1) + 8.0,
                axis=-1,
            )
            writer.write_chunk(
                chunk,
                {
                    "logits": logits.astype(dtype),
                    "labels": labels,
                    "sample_index": np.arange(rows.start, rows.stop, dtype=np.int64),
                    "view_params": stored.view_params(np.arange(rows.start, rows.stop)),
                },
            )
        writer.finalize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child_stages(logits: Path, work: Path) -> dict[str, Any]:
    from pipeline.config import AdjustConfig, TemperatureConfig
    from stages import adjust, temperature

    baseline = _peak_rss_bytes()
    started = time.perf_counter()
    adjust.run(
        AdjustConfig(),
        method="ps",
        logits_path=logits,
        out=work / "adjusted-ps.zarr",
        metrics_out=work / "adjust.json",
    )
    middle = time.perf_counter()
    temperature.run(
        TemperatureConfig(),
        logits_path=logits,
        out=work / "dtd.zarr",
        metrics_out=work / "dtd.json",
        histogram_out=work / "dtd-histogram.json",
    )
    ended = time.perf_counter()
    return {
        "elapsed_s": ended - started,
        "adjust_s": middle - started,
        "temperature_s": ended - middle,
        "peak_rss_bytes": _peak_rss_bytes(),
        "rss_after_imports_bytes": baseline,
    }


def child_floor(logits: Path, work: Path) -> dict[str, Any]:
    import numpy as np
    import zarr

    from storage import open_store
    from storage.soft_labels import _compressors

    baseline = _peak_rss_bytes()
    started = time.perf_counter()
    source = open_store(logits, kind="logits").array("logits")
    views, samples, num_classes = source.shape
    rows = source.chunks[1]
    group = zarr.open_group(work / "floor.zarr", mode="w", zarr_format=3)
    target = group.create_array(
        "target_logits",
        shape=source.shape,
        dtype=source.dtype,
        chunks=(views, rows, num_classes),
        compressors=_compressors(str(source.dtype)),
    )
    small = {
        name: group.create_array(
            name, shape=(views, samples), dtype=dtype, chunks=(views, rows), compressors=_compressors(dtype)
        )
        for name, dtype in SMALL_ARRAYS.items()
    }
    for start in range(0, samples, rows):
        block = np.asarray(source[:, start : start + rows])
        target[:, start : start + rows] = block
        column = block[..., 0]
        for array in small.values():
            array[:, start : start + rows] = (
                column > 0 if array.dtype == np.bool_ else column.astype(np.float32)
            )
    return {
        "elapsed_s": time.perf_counter() - started,
        "peak_rss_bytes": _peak_rss_bytes(),
        "rss_after_imports_bytes": baseline,
    }


def _child_main(argv: list[str]) -> None:
    kind, logits, work = argv[0], Path(argv[1]), Path(argv[2])
    if os.environ.get("LESSONS_BENCH_CODE"):  # the stages of another revision (--baseline-ref)
        sys.path.insert(0, os.environ["LESSONS_BENCH_CODE"])
    # Import what the stages import before measuring, so both contenders carry the same libraries.
    import dask.array  # noqa: F401
    import torch  # noqa: F401

    import stages.adjust
    import stages.temperature  # noqa: F401

    work.mkdir(parents=True, exist_ok=True)
    result = (child_stages if kind == "stages" else child_floor)(logits, work)
    print("RESULT " + json.dumps(result), flush=True)


def run_child(kind: str, logits: Path, work: Path, code: Path | None = None) -> dict[str, Any]:
    """Run one contender in a fresh subprocess; returns its timings and peak RSS.

    `code`: a folder holding another revision's `stages/`, `storage/`, `pipeline/` to run instead.
    """
    shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(common.REPO_ROOT)}
    if code is not None:
        env["LESSONS_BENCH_CODE"] = str(code)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.ka_dtd", "--child", kind, str(logits), str(work)],
        cwd=common.REPO_ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{proc.stderr[-4000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT ") :])
    result["process_s"] = time.perf_counter() - started
    shutil.rmtree(work, ignore_errors=True)
    return result


def _size_entry(
    samples: dict[str, list[Any]],
    prefix: str,
    size: int,
    num_classes: int,
    chunk_rows: int,
    num_views: int,
    baseline_ref: str | None,
) -> dict[str, Any]:
    stages_runs, floor_runs = samples[f"{prefix}stages_{size}"], samples[f"{prefix}floor_{size}"]
    ratio = common.ratio_summary([s["elapsed_s"] for s in stages_runs], [f["elapsed_s"] for f in floor_runs])
    entry = {
        "num_samples": size,
        "num_views": num_views,
        "num_classes": num_classes,
        "dtype": "float16",
        "chunk_rows": chunk_rows,
        "stages_s": common.summary([s["elapsed_s"] for s in stages_runs]),
        "adjust_s": common.summary([s["adjust_s"] for s in stages_runs]),
        "temperature_s": common.summary([s["temperature_s"] for s in stages_runs]),
        "floor_s": common.summary([f["elapsed_s"] for f in floor_runs]),
        "stages_over_floor": ratio,
        "stages_peak_rss_bytes": common.summary([s["peak_rss_bytes"] for s in stages_runs]),
        "floor_peak_rss_bytes": common.summary([f["peak_rss_bytes"] for f in floor_runs]),
        "rss_after_imports_bytes": common.summary([s["rss_after_imports_bytes"] for s in stages_runs]),
        "verdict_time": "pass" if ratio["median"] <= TARGET_TIME else "miss",
    }
    if baseline_ref:
        before = samples[f"baseline_{size}"]
        entry["baseline"] = {
            "ref": baseline_ref,
            "stages_s": common.summary([b["elapsed_s"] for b in before]),
            "adjust_s": common.summary([b["adjust_s"] for b in before]),
            "temperature_s": common.summary([b["temperature_s"] for b in before]),
            "stages_over_floor": common.ratio_summary(
                [b["elapsed_s"] for b in before], [f["elapsed_s"] for f in floor_runs]
            ),
            "peak_rss_bytes": common.summary([b["peak_rss_bytes"] for b in before]),
            "speedup": common.ratio_summary(
                [b["elapsed_s"] for b in before], [s["elapsed_s"] for s in stages_runs]
            ),
        }
    return entry


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        _child_main(argv[1:])
        return {}
    cli = common.parser(__doc__.splitlines()[0])
    cli.add_argument(
        "--baseline-ref",
        default=None,
        help="also run the stages of this git revision (a before/after contender)",
    )
    cli.add_argument(
        "--only",
        choices=("v1", "views"),
        default=None,
        help="run only the plain-image (V = 1, C = 100) group or only the 162-view group",
    )
    args = cli.parse_args(argv)
    reps = args.reps or (1 if args.quick else 3)
    # group -> (sizes, classes, chunk rows, views)
    groups = {
        "v1": (
            [2_000, 20_000] if args.quick else [50_000, 2_000_000],
            NUM_CLASSES,
            1024 if args.quick else 16384,
            False,
        ),  # 16384: teacher_dump.chunk_size's default
        "views": (
            [256, 1024] if args.quick else [5_000, 20_000],
            VIEWS_CLASSES,
            128 if args.quick else 1024,
            True,
        ),
    }
    groups = {g: spec for g, spec in groups.items() if args.only in (None, g)}
    started = time.perf_counter()
    samples: dict[str, list[Any]] = {}
    with common.tempdir(NAME) as tmp:
        tmp = Path(tmp)
        stores, contenders = {}, {}
        for group, (sizes, num_classes, chunk_rows, views) in groups.items():
            for size in sizes:
                tick = time.perf_counter()
                key = f"{group}-{size}"
                stores[key] = tmp / f"logits-{key}.zarr"
                write_logits_store(stores[key], size, chunk_rows, num_classes=num_classes, views=views)
                print(
                    f"wrote a {'162 x ' if views else ''}{size} x {num_classes} float16 store in "
                    f"{time.perf_counter() - tick:.1f} s"
                )
                prefix = "" if group == "v1" else "views_"
                for kind in ("floor", "stages"):
                    contenders[f"{prefix}{kind}_{size}"] = functools.partial(
                        run_child, kind, stores[key], tmp / "work"
                    )
        if args.baseline_ref and "v1" in groups:
            baseline = tmp / "baseline"
            baseline.mkdir()
            archive = subprocess.run(
                ["git", "archive", args.baseline_ref, "stages", "storage", "pipeline", "nets"],
                cwd=common.REPO_ROOT,
                capture_output=True,
                check=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
            for size in groups["v1"][0]:
                contenders[f"baseline_{size}"] = functools.partial(
                    run_child, "stages", stores[f"v1-{size}"], tmp / "work", code=baseline
                )
        samples = common.interleave(contenders, reps, warmup=False)
    result: dict[str, Any] = {
        "quick": args.quick,
        "reps": reps,
        "target_stages_over_floor": TARGET_TIME,
        "target_rss_growth": TARGET_RSS_GROWTH,
    }
    for group, (sizes, num_classes, chunk_rows, views) in groups.items():
        prefix = "" if group == "v1" else "views_"
        per_size = {
            str(size): _size_entry(
                samples,
                prefix,
                size,
                num_classes,
                chunk_rows,
                162 if views else 1,
                args.baseline_ref if group == "v1" else None,
            )
            for size in sizes
        }
        small, large = (per_size[str(s)] for s in sizes)
        growth = large["stages_peak_rss_bytes"]["median"] / small["stages_peak_rss_bytes"]["median"] - 1
        figures = {
            "sizes": per_size,
            "stages_rss_growth": growth,
            "verdict_rss_growth": "pass" if abs(growth) <= TARGET_RSS_GROWTH else "miss",
            "stages_peak_rss_large_bytes": large["stages_peak_rss_bytes"]["median"],
        }
        if group == "v1":
            figures.update(
                target_rss_bytes=TARGET_RSS_BYTES,
                verdict_rss="pass" if large["stages_peak_rss_bytes"]["median"] < TARGET_RSS_BYTES else "miss",
            )
            result.update(figures)
        else:
            result["views"] = figures
        for size in sizes:
            entry = per_size[str(size)]
            stages_mib = entry["stages_peak_rss_bytes"]["median"] / 2**20
            floor_mib = entry["floor_peak_rss_bytes"]["median"] / 2**20
            print(
                f"{'V=162 ' if views else ''}N={size}: stages {common.fmt(entry['stages_s'])} s (adjust "
                f"{entry['adjust_s']['median']:.2f}, temperature {entry['temperature_s']['median']:.2f}), "
                f"floor {common.fmt(entry['floor_s'])} s, ratio {common.fmt(entry['stages_over_floor'])} "
                f"(target <= {TARGET_TIME}: {entry['verdict_time']}), peak RSS {stages_mib:.0f} MiB "
                f"(floor {floor_mib:.0f} MiB)"
            )
            if "baseline" in entry:
                before = entry["baseline"]
                print(
                    f"  before ({before['ref']}): {common.fmt(before['stages_s'])} s, ratio "
                    f"{common.fmt(before['stages_over_floor'])}, peak RSS "
                    f"{before['peak_rss_bytes']['median'] / 2**20:.0f} MiB; "
                    f"speedup {common.fmt(before['speedup'])}"
                )
        print(
            f"{'V=162 ' if views else ''}peak RSS growth {sizes[0]} -> {sizes[1]}: {100 * growth:+.1f} % "
            f"({figures['verdict_rss_growth']})"
            + (f"; < 1 GiB at {sizes[1]}: {figures['verdict_rss']}" if group == "v1" else "")
        )
    common.write_result(NAME, result, args.out, started)
    return result


if __name__ == "__main__":
    common.main_guard(main)

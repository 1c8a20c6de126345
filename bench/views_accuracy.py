"""Offline lessons with and without views against online KD: student accuracy over seeds.

Runs the pipeline's own commands (`lessons <stage>`, as dvc.yaml calls them) in a work folder:
one teacher, one dump per `teacher_dump.views` mode (none, all, scheduled for the run's seeds ×
epochs), KA-PS on each, then every (experiment, mode, seed) student, and writes a table of test
top-1 (mean ± sample std over seeds), wall time and images/s, plus the share of training views
on which the teacher's top class differs from its top class on the plain image.

    python -m bench.views_accuracy --dataset cifar10 --work /tmp/views-cifar   # the README recipe
    python -m bench.views_accuracy --dataset fashion_mnist --work /tmp/views-fm

Each command's output is kept, so an interrupted run resumes where it stopped (finished
students are not rerun). Nothing is tuned: every knob is at the recipe's value.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import RESULTS_DIR, shared_data_dir

RECIPES: dict[str, dict[str, Any]] = {
    "cifar10": {
        "data": {"name": "npz", "root": None, "max_train_samples": 5000, "max_test_samples": 5000},
        "teacher": {
            "arch": "resnet20",
            "epochs": 15,
            "batch_size": 128,
            "lr": 0.1,
            "weight_decay": 0.0005,
            "schedule": "cosine",
            "seed": 0,
        },
        "student": {"arch": "resnet8", "epochs": 8},
        "chunk_size": 1024,
    },
    "fashion_mnist": {
        "data": {"name": "fashion_mnist"},
        "teacher": {
            "arch": "cnn_small",
            "epochs": 3,
            "batch_size": 128,
            "lr": 0.05,
            "weight_decay": 0.0005,
            "schedule": "cosine",
            "seed": 0,
        },
        "student": {"arch": "cnn_tiny", "epochs": 3},
        "chunk_size": 16384,
    },
}
# (experiment, store mode or "online"): the runs of the table, in the order they run.
RUNS = [
    ("ce", "none"),
    ("kd", "none"),
    ("kd", "all"),
    ("kd", "online"),
    ("kd", "scheduled"),
    ("kd_ps_flsw", "none"),
    ("kd_ps_flsw", "all"),
    ("kd_ps_flsw", "online"),
    ("kd_ps_flsw", "scheduled"),
]
EXPERIMENTS: dict[str, dict[str, Any]] = {
    "ce": {"kd": False},
    "kd": {"adjust": "none", "dtd": "off"},
    "kd_ps_flsw": {"adjust": "ps", "dtd": "flsw"},
}


def params_for(recipe: dict[str, Any], seeds: list[int], views: str) -> dict[str, Any]:
    data: dict[str, Any] = dict(recipe["data"])
    if data["name"] == "npz":
        data["root"] = str(shared_data_dir() / "cifar10-jpeg.npz")
    experiments: dict[str, dict[str, Any]] = {}
    for name, settings in EXPERIMENTS.items():
        experiments[name] = {
            "teacher": "t",
            "kd": settings.get("kd", True),
            **({k: v for k, v in settings.items() if k != "kd"}),
        }
        if name != "ce":
            experiments[f"{name}_online"] = {**experiments[name], "teacher_mode": "online"}
    return {
        "data": data,
        "teacher_train": {"teachers": {"t": dict(recipe["teacher"])}},
        "teacher_dump": {
            "views": views,
            "seeds": seeds,
            "epochs": recipe["student"]["epochs"],
            "batch_size": 512,
            "chunk_size": recipe["chunk_size"],
        },
        "adjust": {"methods": ["ps"]},
        "student_train": {
            "arch": recipe["student"]["arch"],
            "epochs": recipe["student"]["epochs"],
            "seeds": seeds,
            "experiments": experiments,
        },
    }


def lessons(params: Path, *args: Any, log: Path) -> None:
    """Run one `lessons` command, its output appended to `log`; raise on failure."""
    with open(log, "a") as stream:
        stream.write(f"\n$ lessons {' '.join(map(str, args))}\n")
        stream.flush()
        started = time.perf_counter()
        code = subprocess.call(
            [sys.executable, "-m", "pipeline", "--params", str(params), *map(str, args)],
            stdout=stream,
            stderr=subprocess.STDOUT,
        )
        stream.write(f"# exit {code} after {time.perf_counter() - started:.1f} s\n")
    if code:
        raise SystemExit(f"lessons {args[0]} failed (exit {code}); see {log}")


def data_and_teacher(params: Path, work: Path, *, log: Path) -> tuple[Path, Path]:
    """Prepare `work/data` and train teacher `t` into `work/checkpoints/t.pt`, each unless
    already there (a resumed run); returns (data folder, checkpoint)."""
    data, checkpoint = work / "data", work / "checkpoints" / "t.pt"
    if not (data / "manifest.json").exists():
        lessons(params, "prepare-data", "--out", data, log=log)
    if not checkpoint.exists():
        lessons(
            params,
            "teacher-train",
            "--teacher",
            "t",
            "--data",
            data,
            "--checkpoint-out",
            checkpoint,
            "--metrics-out",
            work / "teacher.json",
            "--curve-out",
            work / "teacher-curve.json",
            log=log,
        )
    return data, checkpoint


def recipe_parser(description: str, datasets: list[str]) -> argparse.ArgumentParser:
    """The recipe runners' common flags: --dataset (one of `datasets`, default fashion_mnist),
    --work (required) and --seeds (default 0 1 2)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--dataset", choices=datasets, default="fashion_mnist", help="the recipe (default: %(default)s)"
    )
    parser.add_argument(
        "--work", type=Path, required=True, help="work folder: data, stores, students, log; a rerun resumes"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds (default: %(default)s)"
    )
    return parser


def publish(work: Path, name: str, lines: list[str], record: dict[str, Any]) -> None:
    """Write a recipe's table (`work/table.md`) and record (`bench/results/<name>.json`), and print
    the table."""
    (work / "table.md").write_text("\n".join(lines) + "\n")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(record, indent=2))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(RECIPES), default="cifar10")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=["none", "all", "scheduled", "online"])
    args = parser.parse_args()
    recipe, work = RECIPES[args.dataset], args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    os.chdir(work)
    params = {}
    for views in ("none", "all", "scheduled"):
        params[views] = work / f"params-{views}.yaml"
        params[views].write_text(yaml.safe_dump(params_for(recipe, args.seeds, views), sort_keys=False))
    data, checkpoint = data_and_teacher(params["none"], work, log=log)
    timings: dict[str, float] = (
        json.loads((work / "dumps.json").read_text()) if (work / "dumps.json").exists() else {}
    )
    for views in ("none", "all", "scheduled"):
        if views not in args.modes and not (views == "none" and "online" in args.modes):
            continue
        teacher = work / f"stores-{views}" / "t"
        if not (teacher / "adjusted-ps.zarr").exists():
            started = time.perf_counter()
            lessons(
                params[views],
                "teacher-dump",
                "--teacher",
                "t",
                "--data",
                data,
                "--checkpoint",
                checkpoint,
                "--out",
                teacher / "logits.zarr",
                "--test-out",
                teacher / "test-logits.zarr",
                log=log,
            )
            timings[f"dump_{views}_s"] = round(time.perf_counter() - started, 1)
            started = time.perf_counter()
            lessons(
                params[views],
                "adjust",
                "--method",
                "ps",
                "--logits",
                teacher / "logits.zarr",
                "--out",
                teacher / "adjusted-ps.zarr",
                "--metrics-out",
                work / f"adjust-{views}.json",
                log=log,
            )
            timings[f"adjust_{views}_s"] = round(time.perf_counter() - started, 1)
            (work / "dumps.json").write_text(json.dumps(timings, indent=2))
    for seed in args.seeds:
        for experiment, mode in RUNS:
            if mode not in args.modes or (experiment == "ce" and seed not in args.seeds):
                continue
            name = f"{experiment}_online" if mode == "online" else experiment
            store_mode = "none" if mode == "online" else mode
            out = work / "students" / f"{experiment}-{mode}-seed{seed}"
            if (out / "metrics.json").exists():
                continue
            out.mkdir(parents=True, exist_ok=True)
            lessons(
                params[store_mode],
                "student-train",
                "--experiment",
                name,
                "--seed",
                seed,
                "--data",
                data,
                "--stores",
                work / f"stores-{store_mode}",
                "--teacher-checkpoints",
                checkpoint.parent,
                "--checkpoint-out",
                out / "student.pt",
                "--metrics-out",
                out / "metrics.json",
                "--curve-out",
                out / "curve.json",
                log=log,
            )
    write_table(work, args.dataset, args.seeds, timings)


def write_table(work: Path, dataset: str, seeds: list[int], timings: dict[str, float]) -> None:
    rows: list[str] = []
    record: dict[str, Any] = {"dataset": dataset, "seeds": seeds, "timings": timings, "runs": {}}
    teacher = json.loads((work / "teacher.json").read_text())
    for experiment, mode in RUNS:
        metrics = [
            json.loads(p.read_text())
            for seed in seeds
            if (p := work / "students" / f"{experiment}-{mode}-seed{seed}" / "metrics.json").exists()
        ]
        if not metrics:
            continue
        top1 = [100 * m["test_top1"] for m in metrics]
        mean, std = statistics.mean(top1), statistics.stdev(top1) if len(top1) > 1 else float("nan")
        wall = statistics.mean(m["wall_s"] for m in metrics)
        speed = statistics.mean(m["images_per_s"] for m in metrics)
        record["runs"][f"{experiment}/{mode}"] = {"test_top1": top1, "wall_s": wall, "images_per_s": speed}
        rows.append(
            f"| {experiment} | {mode} | {mean:.2f} ± {std:.2f} | {len(top1)} | {wall:.0f} | {speed:.0f} |"
        )
    changed = {}
    for views in ("all",):
        path = work / f"adjust-{views}.json"
        if path.exists():
            changed[views] = json.loads(path.read_text())
    lines = [
        f"# {dataset}: offline lessons by view mode vs online KD",
        "",
        f"teacher test top-1 {100 * teacher['test_top1']:.2f}%; seeds {seeds}; dump/adjust seconds {timings}",
        "",
        "| experiment | lessons | test top-1 (%) | seeds | wall s | img/s |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    for views, metrics in changed.items():
        lines += [
            "",
            f"views: {views}: teacher top class differs from the plain image's on "
            f"{100 * metrics.get('top_class_changed_fraction', float('nan')):.2f}% of training views; "
            f"right on the plain image but wrong on some view: "
            f"{100 * metrics.get('right_plain_wrong_some_view', float('nan')):.2f}% of samples; "
            f"teacher train accuracy over views {100 * metrics['teacher_train_accuracy']:.2f}%",
        ]
        record[f"adjust_{views}"] = metrics
    publish(work, f"views_accuracy_{dataset}", lines, record)


if __name__ == "__main__":
    main()

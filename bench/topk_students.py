"""Students from top-k stores against the dense store: test top-1 over seeds (DESIGN §9).

Runs the pipeline's own commands (`lessons <stage>`, as dvc.yaml calls them) in a work folder:
one teacher, one train-split dump per layout (dense, and `layout: topk` for each K), KA-PS on
each, then every (experiment, layout, seed) student, and writes a table of test top-1 (mean ±
sample std over seeds) and the agreement with the teacher.

    python -m bench.topk_students --work /tmp/topk-fm     # Fashion-MNIST, 10 000 train images
    python -m bench.topk_students --dataset cifar10 --topk 5 --work /tmp/topk-cifar

`--dataset cifar10` is the CIFAR-10 recipe of bench/views_accuracy.py (5 000 train images,
resnet20 teacher, resnet8 students) with views `none`, so its teacher, dense store and dense
students are those of bench/kd_family.py's `t0` (same recipe, same seeds). K = 10 cannot exist
there (K < C = 10): K = 5 keeps half the classes. `--student-layouts topk5` trains only the
top-k students when the dense ones already exist elsewhere (kd_family's `kd`/`kd_ps` rows of `t0`).

Each command's output is kept, so an interrupted run resumes where it stopped (finished
students are not rerun). Nothing is tuned: every knob is the small recipe below.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import shared_data_dir
from bench.views_accuracy import RECIPES, data_and_teacher, lessons, publish, recipe_parser

RECIPE: dict[str, Any] = {
    "data": {"name": "fashion_mnist", "max_train_samples": 10000},
    "teacher": {
        "arch": "cnn_small",
        "epochs": 2,
        "batch_size": 128,
        "lr": 0.05,
        "weight_decay": 0.0005,
        "schedule": "cosine",
        "seed": 0,
    },
    "student": {"arch": "cnn_tiny", "epochs": 2},
    "views": "all",
}
CIFAR10: dict[str, Any] = {
    "data": {**RECIPES["cifar10"]["data"], "root": str(shared_data_dir() / "cifar10-jpeg.npz")},
    "teacher": RECIPES["cifar10"]["teacher"],
    "student": RECIPES["cifar10"]["student"],
    "views": "none",
    "chunk_size": RECIPES["cifar10"]["chunk_size"],
}
DATASETS = {"fashion_mnist": RECIPE, "cifar10": CIFAR10}
EXPERIMENTS: dict[str, dict[str, Any]] = {
    "kd": {"teacher": "t", "adjust": "none", "dtd": "off"},
    "kd_ps": {"teacher": "t", "adjust": "ps", "dtd": "off"},
}


def params_for(recipe: dict[str, Any], layout: str, seeds: list[int]) -> dict[str, Any]:
    """params.yaml of one recipe and layout: "dense" or "topk<K>"."""
    dump: dict[str, Any] = {"views": recipe["views"], "batch_size": 512}
    if "chunk_size" in recipe:
        dump["chunk_size"] = recipe["chunk_size"]
    if layout != "dense":
        dump.update(layout="topk", topk=int(layout.removeprefix("topk")))
    return {
        "data": dict(recipe["data"]),
        "teacher_train": {"teachers": {"t": dict(recipe["teacher"])}},
        "teacher_dump": dump,
        "adjust": {"methods": ["ps"]},
        "student_train": {**recipe["student"], "seeds": seeds, "experiments": EXPERIMENTS},
    }


def main() -> None:
    parser = recipe_parser(__doc__.split("\n\n")[0], sorted(DATASETS))
    parser.add_argument(
        "--topk",
        type=int,
        nargs="+",
        default=[3, 5],
        help="K of each top-k store, K < C (default: %(default)s)",
    )
    parser.add_argument(
        "--experiments",
        nargs="+",
        default=list(EXPERIMENTS),
        help="student experiments (default: %(default)s)",
    )
    parser.add_argument(
        "--student-layouts",
        nargs="+",
        default=None,
        help="train students only from these layouts (dense, topk<K>); default: every layout",
    )
    args = parser.parse_args()
    recipe, work = DATASETS[args.dataset], args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    os.chdir(work)
    layouts = ["dense", *(f"topk{k}" for k in args.topk)]
    params = {}
    for layout in layouts:
        params[layout] = work / f"params-{layout}.yaml"
        params[layout].write_text(yaml.safe_dump(params_for(recipe, layout, args.seeds), sort_keys=False))
    data, checkpoint = data_and_teacher(params["dense"], work, log=log)
    timings: dict[str, float] = {}
    for layout in layouts:
        teacher = work / f"stores-{layout}" / "t"
        if (teacher / "adjusted-ps.zarr").exists():
            continue
        started = time.perf_counter()
        lessons(
            params[layout],
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
        lessons(
            params[layout],
            "adjust",
            "--method",
            "ps",
            "--logits",
            teacher / "logits.zarr",
            "--out",
            teacher / "adjusted-ps.zarr",
            "--metrics-out",
            work / f"adjust-{layout}.json",
            log=log,
        )
        timings[f"dump_adjust_{layout}_s"] = round(time.perf_counter() - started, 1)
    for seed in args.seeds:
        for experiment in args.experiments:
            for layout in args.student_layouts or layouts:
                out = work / "students" / f"{experiment}-{layout}-seed{seed}"
                if (out / "metrics.json").exists():
                    continue
                out.mkdir(parents=True, exist_ok=True)
                lessons(
                    params[layout],
                    "student-train",
                    "--experiment",
                    experiment,
                    "--seed",
                    seed,
                    "--data",
                    data,
                    "--stores",
                    work / f"stores-{layout}",
                    "--checkpoint-out",
                    out / "student.pt",
                    "--metrics-out",
                    out / "metrics.json",
                    "--curve-out",
                    out / "curve.json",
                    log=log,
                )
    name = "topk_students" if args.dataset == "fashion_mnist" else f"topk_students_{args.dataset}"
    write_table(work, name, recipe, args.seeds, layouts, args.experiments)


def write_table(
    work: Path,
    name: str,
    recipe: dict[str, Any],
    seeds: list[int],
    layouts: list[str],
    experiments: list[str],
) -> None:
    teacher = json.loads((work / "teacher.json").read_text())
    record: dict[str, Any] = {"recipe": recipe, "seeds": seeds, "teacher": teacher, "runs": {}}
    rows = []
    for experiment in experiments:
        for layout in layouts:
            metrics = [
                json.loads(p.read_text())
                for seed in seeds
                if (p := work / "students" / f"{experiment}-{layout}-seed{seed}" / "metrics.json").exists()
            ]
            if len(metrics) < len(seeds):
                continue  # never a row with fewer seeds than asked (as kd_family)
            top1 = [100 * m["test_top1"] for m in metrics]
            agree = [100 * m["agreement_top1"] for m in metrics]
            std = statistics.stdev(top1) if len(top1) > 1 else float("nan")
            record["runs"][f"{experiment}/{layout}"] = {"test_top1": top1, "agreement_top1": agree}
            rows.append(
                f"| {experiment} | {layout} | {statistics.mean(top1):.2f} ± {std:.2f} | "
                f"{' / '.join(f'{t:.2f}' for t in top1)} | {statistics.mean(agree):.2f} |"
            )
    lines = [
        f"teacher test top-1 {100 * teacher['test_top1']:.2f}%; seeds {seeds}",
        "",
        "| experiment | store | test top-1 (%) mean ± std | per seed | agreement with teacher (%) |",
        "|---|---|---|---|---|",
        *rows,
    ]
    publish(work, name, lines, record)


if __name__ == "__main__":
    main()

"""The logit-KD family and a two-teacher ensemble from cached lessons: student accuracy over seeds.

Runs the pipeline's own commands (`lessons <stage>`, as dvc.yaml calls them) in a work folder,
as bench/views_accuracy.py does: one teacher `t0` trained and dumped once (views `none`, the
plain image: the cheapest dump), KA-PS on its store, then students with `loss: kd | dkd | ls |
ttm`, each with `adjust: none` and `adjust: ps` (dtd off), plus a cross-entropy student; then
a second teacher `t1` (same arch, teacher seed 1), the ensemble `pair` of t0 and t1
(`combine: log_prob`, `lessons ensemble`), and `kd` / `kd` + PS students from the ensemble
beside the same from t1 (those from t0 are the family's `kd` rows). Writes a table of test top-1
(mean ± sample std over seeds, only rows with every seed), wall time and images/s.

    python -m bench.kd_family --dataset fashion_mnist --work /tmp/kd-family-fm

Groups run in the order given by --groups (default: family ensemble ls_ps ensemble_ps, so a
cut drops the last first); within a group, seed by seed. The README's Fashion-MNIST table ran
`--groups family ensemble ls_ps` (ensemble_ps cut to fit about 70 minutes on the shared 2-core
machine); `--groups ensemble_ps` on the same --work adds it. The table lists only rows with
every seed. Each command's output is kept, so an
interrupted run resumes where it stopped (finished students are not rerun). Nothing is tuned:
each loss at its defaults (dkd α 1 β 8, τ = temperature.base_temperature 4, alpha 0.9).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from bench.views_accuracy import RECIPES, lessons, publish, recipe_parser

LOSSES = ("kd", "dkd", "ls", "ttm")
# (row name, teacher, experiment settings) per group, in the order they run.
GROUPS: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "family": [
        ("ce", "t0", {"kd": False}),
        *[
            (f"{loss}{suffix}", "t0", {"loss": loss, "adjust": adjust, "dtd": "off"})
            for loss in LOSSES
            for suffix, adjust in (("", "none"), ("_ps", "ps"))
            if (loss, adjust) != ("ls", "ps")
        ],
    ],
    "ensemble": [
        ("kd", "t1", {"loss": "kd", "adjust": "none", "dtd": "off"}),
        ("kd", "pair", {"loss": "kd", "adjust": "none", "dtd": "off"}),
    ],
    "ls_ps": [("ls_ps", "t0", {"loss": "ls", "adjust": "ps", "dtd": "off"})],
    "ensemble_ps": [
        ("kd_ps", "t1", {"loss": "kd", "adjust": "ps", "dtd": "off"}),
        ("kd_ps", "pair", {"loss": "kd", "adjust": "ps", "dtd": "off"}),
    ],
}
TABLE_ORDER = [
    ("ce", "t0"),
    *[(f"{loss}{suffix}", "t0") for loss in LOSSES for suffix in ("", "_ps")],
    ("kd", "t1"),
    ("kd", "pair"),
    ("kd_ps", "t1"),
    ("kd_ps", "pair"),
]


def experiment_name(row: str, teacher: str) -> str:
    return f"{row}_{teacher}"


def params_for(recipe: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    data: dict[str, Any] = dict(recipe["data"])
    if data["name"] == "npz":
        from bench.common import shared_data_dir

        data["root"] = str(shared_data_dir() / "cifar10-jpeg.npz")
    experiments: dict[str, dict[str, Any]] = {}
    for runs in GROUPS.values():
        for row, teacher, settings in runs:
            experiments[experiment_name(row, teacher)] = {"teacher": teacher, "kd": True, **settings}
    teachers = {name: {**recipe["teacher"], "seed": seed} for name, seed in (("t0", 0), ("t1", 1))}
    return {
        "data": data,
        "teacher_train": {"teachers": teachers},
        "teacher_dump": {
            "views": "none",
            "seeds": seeds,
            "epochs": recipe["student"]["epochs"],
            "batch_size": 512,
            "chunk_size": recipe["chunk_size"],
        },
        "adjust": {"methods": ["ps"]},
        "ensemble": {"ensembles": {"pair": {"teachers": ["t0", "t1"], "combine": "log_prob"}}},
        "student_train": {
            "arch": recipe["student"]["arch"],
            "epochs": recipe["student"]["epochs"],
            "seeds": seeds,
            "experiments": experiments,
        },
    }


class Work:
    """The work folder: params, data, checkpoints, stores, students, timings and the log."""

    def __init__(self, root: Path, params: Path) -> None:
        self.root, self.params, self.log = root, params, root / "log.txt"
        self.data, self.stores, self.checkpoints = root / "data", root / "stores", root / "checkpoints"
        self.timings_path = root / "timings.json"
        self.timings: dict[str, float] = (
            json.loads(self.timings_path.read_text()) if self.timings_path.exists() else {}
        )

    def timed(self, key: str, *args: Any) -> None:
        started = time.perf_counter()
        lessons(self.params, *args, log=self.log)
        self.timings[key] = round(time.perf_counter() - started, 1)
        self.timings_path.write_text(json.dumps(self.timings, indent=2))

    def teacher(self, name: str) -> None:
        """Train and dump teacher `name` (views none) unless done."""
        checkpoint, store = self.checkpoints / f"{name}.pt", self.stores / name
        if not checkpoint.exists():
            self.timed(
                f"train_{name}_s",
                "teacher-train",
                "--teacher",
                name,
                "--data",
                self.data,
                "--checkpoint-out",
                checkpoint,
                "--metrics-out",
                self.root / f"teacher-{name}.json",
                "--curve-out",
                self.root / f"teacher-{name}-curve.json",
            )
        if not (store / "test-logits.zarr").exists():
            self.timed(
                f"dump_{name}_s",
                "teacher-dump",
                "--teacher",
                name,
                "--data",
                self.data,
                "--checkpoint",
                checkpoint,
                "--out",
                store / "logits.zarr",
                "--test-out",
                store / "test-logits.zarr",
            )

    def ensemble(self) -> None:
        if not (self.stores / "pair" / "test-logits.zarr").exists():
            self.timed("ensemble_pair_s", "ensemble", "--ensemble", "pair", "--stores", self.stores)

    def adjust_ps(self, name: str) -> None:
        store = self.stores / name
        if not (store / "adjusted-ps.zarr").exists():
            self.timed(
                f"adjust_{name}_s",
                "adjust",
                "--method",
                "ps",
                "--logits",
                store / "logits.zarr",
                "--out",
                store / "adjusted-ps.zarr",
                "--metrics-out",
                self.root / f"adjust-{name}.json",
            )

    def student(self, row: str, teacher: str, seed: int) -> None:
        out = self.root / "students" / f"{row}-{teacher}-seed{seed}"
        if (out / "metrics.json").exists():
            return
        out.mkdir(parents=True, exist_ok=True)
        lessons(
            self.params,
            "student-train",
            "--experiment",
            experiment_name(row, teacher),
            "--seed",
            seed,
            "--data",
            self.data,
            "--stores",
            self.stores,
            "--teacher-checkpoints",
            self.checkpoints,
            "--checkpoint-out",
            out / "student.pt",
            "--metrics-out",
            out / "metrics.json",
            "--curve-out",
            out / "curve.json",
            log=self.log,
        )
        with open(self.log, "a") as stream:
            stream.write(f"# done {row}-{teacher}-seed{seed}\n")


def main() -> None:
    parser = recipe_parser(__doc__.split("\n\n")[0], sorted(RECIPES))
    parser.add_argument(
        "--groups",
        nargs="+",
        choices=list(GROUPS),
        default=list(GROUPS),
        help="groups of students, run in this order (default: %(default)s)",
    )
    parser.add_argument("--table-only", action="store_true", help="Write the table from finished runs.")
    args = parser.parse_args()
    recipe, root = RECIPES[args.dataset], args.work.resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.chdir(root)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(params_for(recipe, args.seeds), sort_keys=False))
    work = Work(root, params)
    if not args.table_only:
        if not (work.data / "manifest.json").exists():
            work.timed("prepare_s", "prepare-data", "--out", work.data)
        for group in args.groups:
            teachers = {teacher for _, teacher, _ in GROUPS[group]}
            for name in ("t0", "t1"):
                if name in teachers or "pair" in teachers:
                    work.teacher(name)
            if "pair" in teachers:
                work.ensemble()
            for _row, teacher, settings in GROUPS[group]:
                if settings.get("adjust") == "ps":
                    work.adjust_ps(teacher)
            for seed in args.seeds:
                for row, teacher, _ in GROUPS[group]:
                    work.student(row, teacher, seed)
    write_table(root, args.dataset, args.seeds, work.timings)


def write_table(root: Path, dataset: str, seeds: list[int], timings: dict[str, float]) -> None:
    record: dict[str, Any] = {
        "dataset": dataset,
        "seeds": seeds,
        "timings": timings,
        "teachers": {},
        "runs": {},
    }
    for name in ("t0", "t1"):
        path = root / f"teacher-{name}.json"
        if path.exists():
            record["teachers"][name] = 100 * json.loads(path.read_text())["test_top1"]
    log = root / "log.txt"
    for line in log.read_text().splitlines() if log.exists() else []:
        # `lessons ensemble` prints "<stores>/pair/test-logits.zarr: top-1 0.9123 (members ...)"
        if "pair/test-logits.zarr: top-1" in line:
            record["teachers"]["pair"] = 100 * float(line.split("top-1 ")[1].split()[0])
    rows: list[str] = []
    for row, teacher in TABLE_ORDER:
        metrics = [
            json.loads(p.read_text())
            for seed in seeds
            if (p := root / "students" / f"{row}-{teacher}-seed{seed}" / "metrics.json").exists()
        ]
        if len(metrics) < len(seeds) or len(seeds) < 2:
            continue  # never a row with fewer seeds than asked
        top1 = [100 * m["test_top1"] for m in metrics]
        mean, std = statistics.mean(top1), statistics.stdev(top1)
        wall = statistics.mean(m["wall_s"] for m in metrics)
        speed = statistics.mean(m["images_per_s"] for m in metrics)
        record["runs"][f"{row}/{teacher}"] = {
            "test_top1": top1,
            "mean": mean,
            "std": std,
            "wall_s": wall,
            "images_per_s": speed,
        }
        per_seed = ", ".join(f"{v:.2f}" for v in top1)
        rows.append(f"| {row} | {teacher} | {mean:.2f} ± {std:.2f} | {per_seed} | {wall:.0f} | {speed:.0f} |")
    teachers = ", ".join(f"{k} {v:.2f}%" for k, v in record["teachers"].items())
    lines = [
        f"# {dataset}: the logit-KD family and a two-teacher ensemble (views none, untuned)",
        "",
        f"teacher test top-1: {teachers}; seeds {seeds}; stage seconds {timings}",
        "",
        "| student | teacher | test top-1 (%) | per seed | wall s | img/s |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    publish(root, f"kd_family_{dataset}", lines, record)


if __name__ == "__main__":
    main()

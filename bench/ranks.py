"""Ranks: the teacher dump (and, where `student_train.nproc` exists, a student) as 1 and as 2
torchrun processes on this host, side by side (issue #16; DESIGN §6).

Contenders, interleaved, each a real `lessons` command in a child process (start-up, the
torchrun rendezvous and the store's publication included, as a user pays them):
  dump_1   `lessons teacher-dump` with teacher_dump.nproc 1
  dump_2   the same with nproc 2: two gloo ranks, each forwarding half of the chunks
  student_1 / student_2   `lessons student-train` (experiment kd) with student_train.nproc 1 / 2
Figure: views/s (dump: V·N train views + the test split over the command's wall time) and
images/s (student: epochs·N over the wall time), and the 2-process ÷ 1-process ratio. Every
2-process store is checked to be byte-identical to the 1-process one.

    python -m bench.ranks [--quick] [--reps N] [--out FILE]
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common

NAME = "ranks"


def _tree(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    started = time.perf_counter()
    reps = args.reps or (1 if args.quick else 3)
    images, epochs = (64, 1) if args.quick else (512, 2)
    import yaml

    from pipeline.config import TeacherConfig
    from pipeline.experiments import StudentTrainConfig

    student_ranks = "nproc" in StudentTrainConfig.__dataclass_fields__
    with common.tempdir(NAME) as tmp:
        work = Path(tmp)
        data_config = common.cifar10(images, 256)
        common.prepare(data_config, work / "data")
        common.ready_torch()
        import torch

        from stages import teacher_train

        teacher_train.run(
            TeacherConfig(arch="resnet20", epochs=1, batch_size=64),
            name="resnet20",
            data_dir=work / "data",
            checkpoint_out=work / "checkpoints" / "resnet20.pt",
            metrics_out=work / "teacher.json",
            curve_out=work / "teacher-curve.json",
            device=torch.device("cpu"),
        )
        env = {**os.environ, "PYTHONPATH": str(common.REPO_ROOT)}

        def params(nproc: int) -> Path:
            path = work / f"params-{nproc}.yaml"
            content = {
                "data": {
                    "name": "npz",
                    "root": data_config.root,
                    "max_train_samples": images,
                    "max_test_samples": 256,
                },
                "teacher_train": {"teachers": {"resnet20": {"arch": "resnet20", "device": "cpu"}}},
                # 162 views of every image, 2 chunks per rank at nproc 2
                "teacher_dump": {
                    "views": "all",
                    "batch_size": 32 if args.quick else 64,
                    "chunk_size": 32 if args.quick else 128,
                    "device": "cpu",
                    "nproc": nproc,
                },
                "student_train": {
                    "arch": "resnet8",
                    "epochs": epochs,
                    "batch_size": 64,
                    "device": "cpu",
                    "num_workers": 1,
                    **({"nproc": nproc} if student_ranks else {}),
                    "experiments": {"kd": {"teacher": "resnet20", "adjust": "none", "dtd": "off"}},
                },
            }
            path.write_text(yaml.safe_dump(content, sort_keys=False))
            return path

        def lessons(nproc: int, *command: str) -> float:
            start = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "pipeline", "--params", str(params(nproc)), *command],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
            )
            if done.returncode:
                raise RuntimeError(f"lessons {command[0]} (nproc {nproc}) failed:\n{done.stderr[-3000:]}")
            return time.perf_counter() - start

        stores = work / "stores"
        reference: dict[str, dict[str, str]] = {}

        def dump(nproc: int) -> float:
            out = stores / f"nproc{nproc}"
            shutil.rmtree(out, ignore_errors=True)
            wall = lessons(
                nproc,
                "teacher-dump",
                "--teacher",
                "resnet20",
                "--data",
                "data",
                "--checkpoint",
                "checkpoints/resnet20.pt",
                "--out",
                str(out / "logits.zarr"),
                "--test-out",
                str(out / "test-logits.zarr"),
            )
            trees = {name: _tree(out / name) for name in ("logits.zarr", "test-logits.zarr")}
            reference.setdefault("store", trees["logits.zarr"])
            assert trees["logits.zarr"] == reference["store"], "a store differs between nproc 1 and 2"
            return (162 * images + 256) / wall

        def student(nproc: int) -> float:
            target = stores / "resnet20"
            if not target.exists():
                shutil.copytree(stores / "nproc1", target)
            wall = lessons(
                nproc,
                "student-train",
                "--experiment",
                "kd",
                "--data",
                "data",
                "--stores",
                str(stores),
                "--checkpoint-out",
                f"student{nproc}.pt",
                "--metrics-out",
                f"student{nproc}.json",
                "--curve-out",
                f"student{nproc}-curve.json",
                "--no-resume",
            )
            return epochs * images / wall

        contenders: dict[str, Any] = {"dump_1": lambda: dump(1), "dump_2": lambda: dump(2)}
        if student_ranks:
            contenders |= {"student_1": lambda: student(1), "student_2": lambda: student(2)}
        samples = common.interleave(contenders, reps, warmup=False)
    result: dict[str, Any] = {
        "setup": {
            "images": images,
            "views": 162,
            "teacher": "resnet20",
            "student": "resnet8",
            "epochs": epochs,
        },
        "figures": {name: common.summary(values) for name, values in samples.items()},
        "ratios": {"dump_2_over_1": common.ratio_summary(samples["dump_2"], samples["dump_1"])},
        "stores_identical": True,
    }
    if student_ranks:
        result["ratios"]["student_2_over_1"] = common.ratio_summary(
            samples["student_2"], samples["student_1"]
        )
    for name, stats in result["figures"].items():
        print(f"{name}: {common.fmt(stats)} {'views' if name.startswith('dump') else 'images'}/s")
    for name, stats in result["ratios"].items():
        print(f"{name}: {common.fmt(stats)}")
    common.write_result(NAME, result, args.out, started)
    return result


if __name__ == "__main__":
    common.main_guard(main)

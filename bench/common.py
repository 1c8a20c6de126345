"""What every benchmark shares: arguments, interleaved repetitions, summaries, data and JSON.

A benchmark measures its contenders in one process, in one run, interleaved: repetition r runs
every contender once (A B C, then B C A, ...; the start rotates so no contender always follows
the same one), so load from other jobs on this shared machine hits all of them alike and the
ratios stay meaningful even when absolute numbers move. Each figure is reported as the median
over repetitions with its min–max.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"

# ffcv's `omp` numba layer avoids the fork warning and the crashing `workqueue` layer (FFCV-NOTES).
os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# On this shared 2-core machine, OpenMP's default spin-waiting makes 2-thread torch 3-8x slower
# whenever another job holds a core (a thread spins at a barrier while its peer is descheduled);
# passive waiting makes the numbers follow the code rather than the neighbours. It only takes
# effect when set before torch is first imported; an explicit OMP_WAIT_POLICY is respected.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_OMP_EFFECTIVE = "torch" not in sys.modules


def shared_data_dir() -> Path:
    """$LESSONS_SHARED_DATA, else <repo>/../shared/data (as tests/conftest.py)."""
    return Path(os.environ.get("LESSONS_SHARED_DATA") or REPO_ROOT.parent / "shared" / "data")


def parser(description: str) -> argparse.ArgumentParser:
    """The common options: --quick, --reps, --out."""
    args = argparse.ArgumentParser(description=description)
    args.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and few repetitions (a smoke test, not a measurement)",
    )
    args.add_argument("--reps", type=int, default=None, help="interleaved repetitions")
    args.add_argument(
        "--out", type=Path, default=None, help="JSON file to write (default bench/results/<name>.json)"
    )
    return args


def summary(values: Sequence[float]) -> dict[str, Any]:
    """{median, min, max, n, values} of repeated measurements."""
    values = [float(v) for v in values]
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": [round(v, 6) for v in values],
    }


def interleave(
    contenders: Mapping[str, Callable[[], float | dict[str, float]]],
    reps: int,
    *,
    warmup: bool | Mapping[str, Callable[[], Any]] = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, list[Any]]:
    """Run each contender once per repetition, interleaved, rotating the start.

    Args:
        contenders: name -> callable returning one measurement (a number or a dict of numbers).
        reps: repetitions. warmup: True runs every contender once first, unrecorded; a mapping
            gives a cheaper warm-up callable per contender; False skips it.
    Returns:
        name -> list of `reps` measurements.
    """
    log = log or (lambda line: print(line, flush=True))
    names = list(contenders)
    if warmup:
        for name in names:
            (warmup[name] if isinstance(warmup, Mapping) else contenders[name])()
    samples: dict[str, list[Any]] = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            value = contenders[name]()
            samples[name].append(value)
            shown = (
                value
                if isinstance(value, (int, float))
                else {k: round(v, 3) if isinstance(v, float) else v for k, v in value.items()}
            )
            log(
                f"  rep {rep + 1}/{reps} {name}: {shown if not isinstance(shown, float) else round(shown, 3)}"
            )
    return samples


def ratio_summary(numerators: Sequence[float], denominators: Sequence[float]) -> dict[str, Any]:
    """Per-repetition ratios (rep r of A over rep r of B: measured side by side) summarised."""
    return summary([a / b for a, b in zip(numerators, denominators, strict=True)])


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import numpy
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")
        if _OMP_EFFECTIVE
        else "default (torch imported first)",
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def write_result(name: str, result: dict[str, Any], out: Path | None, started: float) -> Path:
    """Add machine info and wall time, write the JSON, return its path."""
    result = {
        "benchmark": name,
        **result,
        "machine": machine(),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    path = Path(out) if out is not None else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path} (wall {result['wall_s']} s)")
    return path


def verdict(value: float, target: float) -> str:
    """'pass' when value >= target."""
    return "pass" if value >= target else "miss"


def tempdir(prefix: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=f"lessons-bench-{prefix}-")


def prepare(data_config: Any, out_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Load a dataset with the project's registry and write its betons + manifest (prepare_data).

    Returns:
        (the pipeline.datasets.Dataset, the manifest).
    """
    from pipeline.config import PrepareDataConfig
    from pipeline.datasets import load_dataset
    from stages import prepare_data

    dataset = load_dataset(data_config)
    return dataset, prepare_data.run(PrepareDataConfig(), dataset, data_config, out_dir)


def fashion_mnist(max_train: int | None, max_test: int | None = 1000) -> Any:
    from pipeline.config import DataConfig

    return DataConfig(max_train_samples=max_train, max_test_samples=max_test)


def cifar10(max_train: int | None, max_test: int | None = 1000) -> Any:
    from pipeline.config import DataConfig

    return DataConfig(
        name="npz",
        root=str(shared_data_dir() / "cifar10-jpeg.npz"),
        max_train_samples=max_train,
        max_test_samples=max_test,
    )


def ready_torch() -> int:
    """Import ffcv first (it resets torch's threads), then give torch every core (as the CLI)."""
    import ffcv  # noqa: F401

    from pipeline.seeding import use_all_cores

    return use_all_cores()


def fmt(stats: Mapping[str, Any], digits: int = 3) -> str:
    return f"{stats['median']:.{digits}g} [{stats['min']:.{digits}g}–{stats['max']:.{digits}g}]"


def main_guard(main: Callable[[list[str] | None], Any]) -> None:
    sys.exit(0 if main(None) is not None else 1)

"""Smoke tests of the benchmarks: every `bench/` script runs with --quick and writes its JSON.

Correctness only (the figures exist and are positive numbers); no timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

SCRIPTS = ["student_step", "teacher_dump", "ka_dtd", "loader", "storage_size", "topk"]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _summary_ok(stats: dict) -> None:
    assert stats["n"] >= 1 and stats["median"] > 0 and 0 < stats["min"] <= stats["median"] <= stats["max"]


def _check_student_step(result: dict) -> None:
    setup = result["setups"][0]
    assert set(setup["images_per_s"]) == {
        "ce",
        "lessons",
        "lessons_views",
        "online_cnn_small",
        "forward_cnn_small",
    }
    assert setup["num_views"] == 2  # Fashion-MNIST: flip only
    for stats in setup["images_per_s"].values():
        _summary_ok(stats)
    for key in (
        "lessons_over_ce",
        "lessons_views_over_ce",
        "lessons_views_streamed_over_ce",
        "gather_share_of_epoch",
        *(f"gather_epoch_s.{m}" for m in ("memory", "streamed")),
    ):
        _summary_ok(setup[key] if "." not in key else setup["gather_epoch_s"][key.split(".")[1]])
    teacher = setup["teachers"]["cnn_small"]
    for key in (
        "lessons_over_online",
        "limit",
        "fraction_of_limit",
        "views_lessons_over_online",
        "views_fraction_of_limit",
    ):
        _summary_ok(teacher[key])
    assert teacher["limit"]["min"] > 1


def _check_teacher_dump(result: dict) -> None:
    setup = result["setups"][0]
    assert set(setup["images_per_s"]) == {"dump", "floor_nchw", "floor_cl"}
    for stats in (*setup["images_per_s"].values(), setup["ratio_dump_over_floor"]):
        _summary_ok(stats)
    assert set(setup["share_of_dump_time"]) == {"load", "forward", "write"}
    assert 0 < sum(s["median"] for s in setup["share_of_dump_time"].values()) <= 1.0001
    views = result["setups"][1]
    assert views["views"] == "all" and views["num_views"] == 2
    assert set(views["images_per_s"]) == {"dump", "floor_cl", "floor_views"}
    for stats in (
        *views["images_per_s"].values(),
        views["ratio_dump_over_floor"],
        views["ratio_dump_over_floor_views"],
    ):
        _summary_ok(stats)


def _check_ka_dtd(result: dict) -> None:
    assert set(result["sizes"]) == {"2000", "20000"}
    for entry in result["sizes"].values():
        for key in (
            "stages_s",
            "adjust_s",
            "temperature_s",
            "floor_s",
            "stages_over_floor",
            "stages_peak_rss_bytes",
            "floor_peak_rss_bytes",
        ):
            _summary_ok(entry[key])
    assert isinstance(result["stages_rss_growth"], float)
    assert set(result["views"]["sizes"]) == {"256", "1024"}
    for entry in result["views"]["sizes"].values():
        assert entry["num_views"] == 162 and entry["num_classes"] == 10
        for key in ("stages_s", "floor_s", "stages_over_floor", "stages_peak_rss_bytes"):
            _summary_ok(entry[key])
    assert isinstance(result["views"]["stages_rss_growth"], float)


def _check_loader(result: dict) -> None:
    assert set(result["images_per_s"]) == {"ffcv", "torch"}
    for stats in (*result["images_per_s"].values(), result["ffcv_over_torch"]):
        _summary_ok(stats)


def _check_storage_size(result: dict) -> None:
    rows = result["rows"]
    assert {(r["num_classes"], r["dtype"]) for r in rows} >= {
        (10, "float16"),
        (10, "float32"),
        (100, "float16"),
        (100, "float32"),
    }
    for row in rows:
        assert row["bytes_per_sample"] > 0 and row["compression_ratio"] > 0
        assert row["raw_bytes_per_sample"] == row["num_classes"] * (2 if row["dtype"] == "float16" else 4)
    views = result["views"]
    assert {(r["num_classes"], r["num_views"]) for r in views} == {(10, 162), (100, 162)}
    for row in views:
        assert 0 < row["logits_bytes_per_view"] < 2 * row["num_classes"] * 1.2
        assert row["bytes_per_view"] > row["logits_bytes_per_view"]
        assert row["extrapolated_50000"]["raw_logits_bytes"] == 162 * 50000 * row["num_classes"] * 2


def _check_topk(result: dict) -> None:
    rows = result["rows"]
    generated = {(r["num_classes"], r["topk"]) for r in rows if r["source"] == "generated"}
    assert generated == {(c, k) for c in (100, 1000) for k in (5, 10, 20)}
    for row in rows:
        assert row["raw_bytes_per_view"] == 4 * row["topk"] + 4
        assert 0 < row["bytes_per_view"] <= row["raw_bytes_per_view"] * 1.2
        assert row["kl_tau1"] >= 0 and row["kl_tau4"] >= 0 and 0 < row["tail_mass"] < 1
    assert result["target"]["verdict"] in ("pass", "miss")


CHECKS = {
    "student_step": _check_student_step,
    "teacher_dump": _check_teacher_dump,
    "ka_dtd": _check_ka_dtd,
    "loader": _check_loader,
    "storage_size": _check_storage_size,
    "topk": _check_topk,
}


@pytest.mark.parametrize("form", ["module", "path"])
def test_every_script_runs_as_a_module_and_as_a_path(form):
    for name in SCRIPTS:
        command = ["-m", f"bench.{name}"] if form == "module" else [f"bench/{name}.py"]
        proc = subprocess.run(
            [sys.executable, *command, "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        assert "--quick" in proc.stdout and "--out" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", SCRIPTS)
def test_a_quick_run_writes_its_json_with_positive_figures(name, tmp_path, shared_data_dir):
    import importlib

    if not FASHION_MNIST.is_dir():
        pytest.skip(f"{FASHION_MNIST} is absent (apt-get install dataset-fashion-mnist)")
    out = tmp_path / f"{name}.json"
    importlib.import_module(f"bench.{name}").main(["--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["benchmark"] == name and result["quick"] is True
    assert result["wall_s"] > 0 and result["machine"]["cores"] >= 1 and result["machine"]["torch"]
    CHECKS[name](result)

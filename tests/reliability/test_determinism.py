"""Determinism: the same inputs and settings give byte-identical stores, run after run."""
from __future__ import annotations

import json

import numpy as np
import pytest

from storage import open_store
from tests.reliability.conftest import cli, ok, tree_digest


def test_dumping_the_same_teacher_twice_gives_byte_identical_stores(tmp_path, pipeline):
    out, test_out = tmp_path / "logits.zarr", tmp_path / "test-logits.zarr"
    ok(cli(pipeline.params_path, "teacher-dump", "--teacher", "t", "--data", pipeline.data,
           "--checkpoint", pipeline.checkpoint, "--out", out, "--test-out", test_out))
    reference = pipeline.teacher_stores
    assert tree_digest(out) == tree_digest(reference / "logits.zarr")
    assert tree_digest(test_out) == tree_digest(reference / "test-logits.zarr")
    for name in ("logits", "labels", "sample_index"):
        assert open_store(out).read(name).tobytes() == open_store(reference / "logits.zarr").read(name).tobytes()


@pytest.mark.parametrize("method", ["ps", "lsr"])
def test_adjusting_twice_gives_identical_arrays_and_files(tmp_path, pipeline, method):
    logits = pipeline.teacher_stores / "logits.zarr"
    runs = []
    for run in ("a", "b"):
        out = tmp_path / run / f"adjusted-{method}.zarr"
        ok(cli(pipeline.params_path, "adjust", "--method", method, "--logits", logits, "--out", out,
               "--metrics-out", tmp_path / run / "m.json"))
        runs.append(out)
    a, b = (open_store(p, kind="adjusted") for p in runs)
    for name in ("target_logits", "fixed_target", "rewritten"):
        assert a.read(name).tobytes() == b.read(name).tobytes(), name
    assert tree_digest(runs[0]) == tree_digest(runs[1])
    assert tree_digest(runs[0]) == tree_digest(pipeline.teacher_stores / f"adjusted-{method}.zarr")
    metrics = [json.loads((tmp_path / run / "m.json").read_text()) for run in ("a", "b")]
    for m in metrics:
        m.pop("elapsed_s")
    assert metrics[0] == metrics[1]


def test_temperature_twice_gives_identical_arrays_files_and_histograms(tmp_path, pipeline):
    logits = pipeline.teacher_stores / "logits.zarr"
    for run in ("a", "b"):
        ok(cli(pipeline.params_path, "temperature", "--logits", logits, "--out", tmp_path / run / "dtd.zarr",
               "--metrics-out", tmp_path / run / "m.json", "--histogram-out", tmp_path / run / "h.json"))
    a, b = (open_store(tmp_path / run / "dtd.zarr", kind="dtd") for run in ("a", "b"))
    assert sorted(a.group.array_keys()) == sorted(b.group.array_keys())
    for name in a.group.array_keys():
        assert a.read(name).tobytes() == b.read(name).tobytes(), name
    assert np.isfinite(a.read("static_temperature")).all()
    assert tree_digest(tmp_path / "a" / "dtd.zarr") == tree_digest(tmp_path / "b" / "dtd.zarr")
    assert (tmp_path / "a" / "h.json").read_bytes() == (tmp_path / "b" / "h.json").read_bytes()

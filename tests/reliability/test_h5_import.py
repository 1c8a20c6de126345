"""HDF5 files written by other tools: `lessons import-logits` reads only what it needs.

A file may hold large datasets and attributes of any type that lessons knows nothing about; the
import must neither load them into memory nor fail on them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from stages.views import StoredViews, training_augmentation
from storage import open_store
from tests.reliability.conftest import (
    NUM_TRAIN,
    child_env,
    cli,
    leftovers,
    ok,
    one_line_error,
    teacher_h5,
)

UNRELATED_MB = 400

# Runs the CLI in a fresh interpreter and prints that process's own peak RSS (VmHWM, KiB). Not
# getrusage's ru_maxrss: Linux carries it over exec from the forking process, here pytest itself.
_PEAK_RSS = """
import sys
from pipeline.cli import main
try:
    main(sys.argv[1:], obj={}, standalone_mode=False)
finally:
    status = open("/proc/self/status").read()
    print("PEAK_RSS_KIB", status.split("VmHWM:")[1].split()[0])
"""


def _import_peak_rss_mb(pipeline, h5: Path, out: Path) -> float:
    args = [
        "--params",
        str(pipeline.params_path),
        "import-logits",
        str(h5),
        "--data",
        str(pipeline.data),
        "--out",
        str(out),
    ]
    run = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, *args], env=child_env(), capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    line = next(line for line in run.stdout.splitlines() if line.startswith("PEAK_RSS_KIB"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_an_unrelated_large_dataset_in_the_h5_file_is_never_read_into_memory(tmp_path, pipeline):
    plain = teacher_h5(pipeline.teacher_stores / "logits.zarr", tmp_path / "plain.h5")
    big = teacher_h5(pipeline.teacher_stores / "logits.zarr", tmp_path / "big.h5")
    rows = UNRELATED_MB * 2**20 // (4 * 1024)
    with h5py.File(big, "a") as f:  # written in slices: the test itself never holds it in memory
        unrelated = f.create_dataset("embeddings", shape=(rows, 1024), dtype=np.float32)
        block = np.random.default_rng(0).standard_normal((4096, 1024), dtype=np.float32)
        for start in range(0, rows, block.shape[0]):
            unrelated[start : start + block.shape[0]] = block[: rows - start]
    try:
        assert big.stat().st_size > UNRELATED_MB * 2**20
        without_mb = _import_peak_rss_mb(pipeline, plain, tmp_path / "plain.zarr")
        with_mb = _import_peak_rss_mb(pipeline, big, tmp_path / "big.zarr")
    finally:
        big.unlink()
    assert with_mb - without_mb < UNRELATED_MB / 8, (
        f"peak RSS {with_mb:.0f} MB with a {UNRELATED_MB} MB unrelated dataset vs {without_mb:.0f} MB without"
    )
    np.testing.assert_array_equal(
        open_store(tmp_path / "big.zarr").read("logits"), open_store(tmp_path / "plain.zarr").read("logits")
    )


@pytest.mark.parametrize(
    "value",
    [
        [1, 2, 3],
        np.arange(6, dtype=np.float64).reshape(2, 3),
        np.array([b"resnet", b"cifar"]),
        np.array(["a", "bc"], dtype=h5py.string_dtype()),
        b"raw bytes",
        "a string",
        np.float32(0.5),
        h5py.Empty("f4"),
    ],
    ids=["list", "2-D array", "bytes array", "string array", "bytes", "string", "scalar", "empty"],
)
def test_a_foreign_attribute_of_any_type_does_not_break_an_import(tmp_path, pipeline, value):
    path = teacher_h5(pipeline.teacher_stores / "logits.zarr", tmp_path / "foreign.h5")
    with h5py.File(path, "a") as f:
        f.attrs["class_weights"] = value
    out = tmp_path / "logits.zarr"
    ok(cli(pipeline.params_path, "import-logits", path, "--data", pipeline.data, "--out", out))
    imported, original = open_store(out), open_store(pipeline.teacher_stores / "logits.zarr")
    np.testing.assert_array_equal(imported.read("logits"), original.read("logits"))
    assert "class_weights" not in imported.attrs


@pytest.mark.parametrize("value", [[1, 2, 3], np.zeros(4), 7])
def test_a_dataset_fingerprint_attribute_that_is_not_a_string_is_one_line_naming_file_and_attribute(
    tmp_path, pipeline, value
):
    path = teacher_h5(pipeline.teacher_stores / "logits.zarr", tmp_path / "foreign.h5")
    with h5py.File(path, "a") as f:
        f.attrs["dataset_fingerprint"] = value
    out = tmp_path / "logits.zarr"
    result = cli(pipeline.params_path, "import-logits", path, "--data", pipeline.data, "--out", out)
    one_line_error(result, "foreign.h5", "attribute 'dataset_fingerprint'", "must be a string")
    assert leftovers(out) == []


def test_a_dataset_fingerprint_attribute_stored_as_bytes_is_read_as_text(tmp_path, pipeline):
    store = open_store(pipeline.teacher_stores / "logits.zarr")
    path = teacher_h5(store.path, tmp_path / "foreign.h5")
    with h5py.File(path, "a") as f:
        f.attrs["dataset_fingerprint"] = np.bytes_(store.attrs["dataset_fingerprint"].encode())
    ok(
        cli(
            pipeline.params_path,
            "import-logits",
            path,
            "--data",
            pipeline.data,
            "--out",
            tmp_path / "ok.zarr",
        )
    )
    with h5py.File(path, "a") as f:
        f.attrs["dataset_fingerprint"] = np.bytes_(b"0" * 64)
    result = cli(
        pipeline.params_path, "import-logits", path, "--data", pipeline.data, "--out", tmp_path / "no.zarr"
    )
    one_line_error(result, "foreign.h5", "dataset fingerprint", "0000", "another dataset")


def test_shuffled_rows_with_a_sample_index_are_imported_in_sample_order(tmp_path, pipeline):
    """The rows are read chunk by chunk through the permutation, not as one array."""
    store = open_store(pipeline.teacher_stores / "logits.zarr")
    logits, labels = store.read("logits"), store.read("labels")
    perm = np.random.default_rng(3).permutation(NUM_TRAIN)
    views = np.stack([logits[0], logits[0] * 2])  # (2, N, C): two views, each its own values
    # two random flip views per image (views: sample), so the view_params differ row by row
    plan = StoredViews.plan("sample", training_augmentation((28, 28, 1)), num_views=2, seed=0)
    view_params = plan.view_params(np.arange(NUM_TRAIN))
    assert len({tuple(row) for row in view_params[0].tolist()}) == 2
    path = tmp_path / "shuffled.h5"
    with h5py.File(path, "w") as f:
        f["logits"] = views[:, perm].astype(np.float32)
        f["labels"] = labels[perm]
        f["sample_index"] = perm
        f["view_params"] = view_params[:, perm]
        f.attrs["view_spec"] = json.dumps(plan.spec())
    out = tmp_path / "logits.zarr"
    ok(cli(pipeline.params_path, "import-logits", path, "--data", pipeline.data, "--out", out))
    imported = open_store(out)
    np.testing.assert_array_equal(imported.read("logits"), views.astype(imported.read("logits").dtype))
    np.testing.assert_array_equal(imported.read("view_params"), view_params)
    np.testing.assert_array_equal(imported.read("labels"), labels)
    np.testing.assert_array_equal(imported.read("sample_index"), np.arange(NUM_TRAIN))

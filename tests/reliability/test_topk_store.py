"""Top-k stores (`teacher_dump.layout: topk`, DESIGN §9): the dump writes them exactly, check-params
refuses a K that cannot work, and every consumer that needs dense rows refuses one in one line,
writing nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from storage import open_store
from tests.reliability.conftest import (
    NUM_CLASSES,
    Pipeline,
    base_params,
    cli,
    leftovers,
    make_npz,
    ok,
    one_line_error,
    write_params,
)

K = 2


def _dump_topk(tmp_path: Path, pipeline: Pipeline, **dump: object) -> tuple[Path, Path]:
    params = write_params(
        tmp_path / "params.yaml", pipeline.params, teacher_dump={"layout": "topk", "topk": K, **dump}
    )
    out = tmp_path / "stores" / "t" / "logits.zarr"
    ok(
        cli(
            params,
            "teacher-dump",
            "--teacher",
            "t",
            "--data",
            pipeline.data,
            "--checkpoint",
            pipeline.checkpoint,
            "--out",
            out,
            "--test-out",
            out.with_name("test-logits.zarr"),
        )
    )
    return params, out


@pytest.fixture(scope="module")
def topk_store(tmp_path_factory: pytest.TempPathFactory, pipeline: Pipeline) -> tuple[Path, Path]:
    return _dump_topk(tmp_path_factory.mktemp("topk"), pipeline)


def test_a_topk_dump_holds_bit_for_bit_the_top_k_of_the_dense_store_and_its_log_sum_exp(pipeline, topk_store):
    dense = open_store(pipeline.teacher_stores / "logits.zarr").read("logits")  # (V, N, C) float16
    store = open_store(topk_store[1], layouts=("topk",))
    values, indices, lse = (store.read(name) for name in ("topk_values", "topk_indices", "lse"))
    assert store.attrs["layout"] == "topk" and store.attrs["topk"] == K
    assert values.dtype == np.float16 and indices.dtype == np.int16 and lse.dtype == np.float32
    assert values.shape == indices.shape == (*dense.shape[:2], K) and lse.shape == dense.shape[:2]
    order = np.argsort(-dense.astype(np.float64), axis=-1, kind="stable")[..., :K]
    np.testing.assert_array_equal(indices, order)
    assert np.array_equal(values.view(np.uint16), np.take_along_axis(dense, order, -1).view(np.uint16))
    want = torch.logsumexp(torch.from_numpy(dense.astype(np.float32)), dim=-1).numpy()
    np.testing.assert_allclose(lse, want, rtol=1e-6, atol=0)
    for name in ("labels", "sample_index", "view_params"):
        np.testing.assert_array_equal(
            store.read(name), open_store(pipeline.teacher_stores / "logits.zarr").read(name)
        )
    assert (
        "layout" not in open_store(topk_store[1].with_name("test-logits.zarr")).attrs
    )  # the test split is dense


def _listing(folder: Path) -> list[str]:
    """What `folder` holds, bar the documented `<out>.lock` files."""
    return sorted(p.name for p in folder.iterdir() if p.suffix != ".lock")


@pytest.mark.parametrize(
    "command",
    ["adjust", "temperature", "verify-views", "student-train"],
)
def test_a_consumer_that_needs_dense_rows_refuses_a_topk_store_in_one_line_writing_nothing(
    tmp_path, pipeline, topk_store, command
):
    params, store = topk_store
    out = tmp_path / "out"
    args = {
        "adjust": [
            "adjust",
            "--method",
            "ps",
            "--logits",
            store,
            "--out",
            out,
            "--metrics-out",
            tmp_path / "m.json",
        ],
        "temperature": [
            "temperature",
            "--logits",
            store,
            "--out",
            out,
            "--metrics-out",
            tmp_path / "m.json",
            "--histogram-out",
            tmp_path / "h.json",
        ],
        "verify-views": ["verify-views", store, "--data", pipeline.data, "--checkpoint", pipeline.checkpoint],
        "student-train": [
            "student-train",
            "--experiment",
            "kd",
            "--data",
            pipeline.data,
            "--stores",
            store.parent.parent,
            "--checkpoint-out",
            out,
            "--metrics-out",
            tmp_path / "m.json",
            "--curve-out",
            tmp_path / "c.json",
        ],
    }[command]
    before = _listing(tmp_path)
    one_line_error(cli(params, *args), str(store), "top-k store", "teacher_dump.layout: dense")
    assert leftovers(out) == [] and _listing(tmp_path) == before


def test_export_writes_a_topk_store_as_it_is(tmp_path, topk_store):
    import h5py

    ok(cli(topk_store[0], "export", topk_store[1], tmp_path / "x.h5"))
    with h5py.File(tmp_path / "x.h5") as f:
        assert sorted(f) == ["labels", "lse", "sample_index", "topk_indices", "topk_values", "view_params"]


def _check(tmp_path: Path, **dump: object):
    params = write_params(
        tmp_path / "params.yaml", base_params(make_npz(tmp_path / "x.npz")), teacher_dump=dump
    )
    return cli(params, "check-params", "--out", tmp_path / "check.json")


@pytest.mark.parametrize("topk", [NUM_CLASSES, NUM_CLASSES + 5])
def test_check_params_refuses_a_topk_of_at_least_the_class_count(tmp_path, topk):
    one_line_error(
        _check(tmp_path, layout="topk", topk=topk),
        "teacher_dump.topk",
        f"K = {topk}",
        f"C = {NUM_CLASSES}",
        "lower",
    )
    assert not (tmp_path / "check.json").exists()


@pytest.mark.parametrize(
    "dump, facts",
    [
        ({"layout": "topk", "topk": 0}, ("teacher_dump.topk", "K >= 1", "set topk")),
        ({"layout": "topk"}, ("teacher_dump.topk", "needs topk", "set topk")),
        ({"topk": 3}, ("teacher_dump.topk", "only read with layout: topk", "set layout: topk")),
        ({"layout": "sparse", "topk": 3}, ("teacher_dump.layout", "sparse")),
    ],
)
def test_check_params_refuses_a_topk_setting_that_cannot_work(tmp_path, dump, facts):
    one_line_error(_check(tmp_path, **dump), *facts)
    assert not (tmp_path / "check.json").exists()


def test_check_params_accepts_a_topk_below_the_class_count(tmp_path):
    ok(_check(tmp_path, layout="topk", topk=NUM_CLASSES - 1))


def test_a_topk_dump_refuses_k_of_at_least_c_before_writing_anything(tmp_path, pipeline):
    params = write_params(
        tmp_path / "params.yaml", pipeline.params, teacher_dump={"layout": "topk", "topk": NUM_CLASSES}
    )
    out = tmp_path / "logits.zarr"
    result = cli(
        params,
        "teacher-dump",
        "--teacher",
        "t",
        "--data",
        pipeline.data,
        "--checkpoint",
        pipeline.checkpoint,
        "--out",
        out,
        "--test-out",
        tmp_path / "test.zarr",
    )
    one_line_error(result, "teacher_dump.topk", f"C = {NUM_CLASSES}")
    assert leftovers(out) == [] and leftovers(tmp_path / "test.zarr") == []

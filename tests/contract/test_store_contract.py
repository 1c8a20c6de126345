"""The soft-label store contract, run against every backend: zarr stores and their HDF5 export."""

from __future__ import annotations

import json
import multiprocessing
import os

import numpy as np
import pytest

from storage import ArraySpec, OutputError, StoreError, StoreWriter, open_store, partial_path
from storage.h5 import export_h5, read_h5

N, C, V = 1000, 10, 2


def _arrays(dtype: str = "float16") -> dict[str, ArraySpec]:
    return {
        "logits": ArraySpec((V, N, C), dtype, sample_axis=1),
        "labels": ArraySpec((N,), "int64"),
        "sample_index": ArraySpec((N,), "int64"),
        "view_params": ArraySpec((V, N, 3), "int16", sample_axis=1),
    }


def _values(seed: int = 0, dtype: str = "float16") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "logits": (rng.normal(size=(V, N, C)) * 10).astype(dtype),
        "labels": rng.integers(0, C, N).astype(np.int64),
        "sample_index": np.arange(N, dtype=np.int64),
        "view_params": rng.integers(0, 9, (V, N, 3)).astype(np.int16),
    }


ATTRS = {"num_classes": C, "dataset_fingerprint": "f" * 64, "teacher": {"arch": "x", "sha": "y"}}


def write_store(path, values, *, chunk_rows=300, dtype="float16", stop_after=None):
    with StoreWriter(path, kind="logits", arrays=_arrays(dtype), attrs=ATTRS, chunk_rows=chunk_rows) as w:
        for i, chunk in enumerate(w.pending_chunks()):
            if stop_after is not None and i == stop_after:
                return
            rows = w.rows(chunk)
            w.write_chunk(chunk, {k: v[:, rows] if v.ndim == 3 else v[rows] for k, v in values.items()})
        w.finalize()


def read_back(backend, path, tmp_path):
    store = open_store(path, kind="logits")
    if backend == "zarr":
        return {name: store.read(name) for name in store.group.array_keys()}, store.attrs
    h5 = tmp_path / "export.h5"
    export_h5(store, h5)
    return read_h5(h5)


@pytest.mark.parametrize("backend", ["zarr", "h5"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_round_trip_is_bit_exact_with_schema_shapes_dtypes_and_attributes(tmp_path, backend, dtype):
    values = _values(dtype=dtype)
    write_store(tmp_path / "logits.zarr", values, dtype=dtype)
    arrays, attrs = read_back(backend, tmp_path / "logits.zarr", tmp_path)
    assert set(arrays) == set(values)
    for name, value in values.items():
        assert arrays[name].dtype == value.dtype, name
        assert arrays[name].shape == value.shape, name
        assert arrays[name].tobytes() == value.tobytes(), name
    assert attrs["schema_version"] == 1 and attrs["complete"] is True and attrs["kind"] == "logits"
    assert attrs["num_samples"] == N and attrs["teacher"] == {"arch": "x", "sha": "y"}
    assert not any(isinstance(v, str) and ":" in v and "T" in v for v in attrs.values())  # no timestamps


def test_the_store_is_chunked_along_samples_only_into_few_files(tmp_path):
    write_store(tmp_path / "logits.zarr", _values(), chunk_rows=300)
    store = open_store(tmp_path / "logits.zarr")
    assert store.array("logits").chunks == (V, 300, C)
    assert store.array("labels").chunks == (300,)
    files = sum(len(f) for _, _, f in os.walk(tmp_path / "logits.zarr"))
    assert files <= 4 * 4 + 10  # 4 arrays x 4 chunks + metadata


def test_an_interrupted_write_is_never_taken_for_a_finished_store(tmp_path):
    out = tmp_path / "logits.zarr"
    write_store(out, _values(), stop_after=2)
    assert partial_path(out).exists() and not out.exists()
    with pytest.raises(StoreError, match="unfinished write exists"):
        open_store(out)


def test_a_resumed_write_equals_an_uninterrupted_one_byte_for_byte(tmp_path):
    values = _values()
    write_store(tmp_path / "a.zarr", values)
    write_store(tmp_path / "b.zarr", values, stop_after=2)
    write_store(tmp_path / "b.zarr", values)  # resumes: chunks 0 and 1 are not rewritten
    for name in values:
        a = open_store(tmp_path / "a.zarr").read(name)
        b = open_store(tmp_path / "b.zarr").read(name)
        assert a.tobytes() == b.tobytes()


def test_a_partial_write_with_other_settings_is_discarded_not_resumed(tmp_path):
    out = tmp_path / "logits.zarr"
    write_store(out, _values(seed=0), stop_after=2)
    values = _values(seed=1)
    write_store(out, values, chunk_rows=250)
    assert open_store(out).read("logits").tobytes() == values["logits"].tobytes()


def test_every_chunk_is_written_even_one_equal_to_the_fill_value_and_a_missing_one_is_refused(tmp_path):
    """zarr skips a chunk equal to the fill value by default; a store writes it, so that a
    missing chunk file can only mean damage, which open_store names."""
    out = tmp_path / "s.zarr"
    arrays = {
        "x": ArraySpec((10,), "float32"),
        "ids": ArraySpec((10,), "int16"),
        "flag": ArraySpec((10,), "bool"),
    }
    with StoreWriter(out, kind="dtd", arrays=arrays, attrs={}, chunk_rows=5) as writer:
        for chunk in writer.pending_chunks():
            writer.write_chunk(
                chunk,
                {"x": np.ones(5, np.float32), "ids": np.full(5, -1, np.int16), "flag": np.zeros(5, bool)},
            )
        writer.finalize()
    for name in arrays:
        assert sorted(p.name for p in (out / name / "c").iterdir()) == ["0", "1"], name
    np.testing.assert_array_equal(open_store(out).read("ids"), np.full(10, -1))
    (out / "ids" / "c" / "1").unlink()
    with pytest.raises(
        StoreError, match=r"chunk ids/c/1 \(samples 5\.\.9\) is missing: the store is damaged"
    ):
        open_store(out)


def test_float16_overflow_is_refused_never_stored_as_inf(tmp_path):
    values = _values()
    values["logits"] = values["logits"].astype(np.float32)
    values["logits"][0, 5, 3] = 70000.0
    with pytest.raises(StoreError, match="beyond the float16 range"):
        write_store(tmp_path / "logits.zarr", values)
    assert not (tmp_path / "logits.zarr").exists()


def test_float32_storage_keeps_values_beyond_float16_range(tmp_path):
    values = _values(dtype="float32")
    values["logits"][0, 5, 3] = 70000.0
    write_store(tmp_path / "logits.zarr", values, dtype="float32")
    assert open_store(tmp_path / "logits.zarr").read("logits")[0, 5, 3] == 70000.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_logits_are_refused(tmp_path, bad):
    values = _values()
    values["logits"][1, 999, 0] = bad
    with pytest.raises(StoreError, match="NaN/inf"):
        write_store(tmp_path / "logits.zarr", values)


def test_a_store_of_another_schema_version_is_refused(tmp_path):
    out = tmp_path / "logits.zarr"
    write_store(out, _values())
    meta = json.loads((out / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 99
    (out / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="schema_version 99"):
        open_store(out)


def test_a_store_of_another_kind_is_refused(tmp_path):
    write_store(tmp_path / "logits.zarr", _values())
    with pytest.raises(StoreError, match="'dtd' store is expected"):
        open_store(tmp_path / "logits.zarr", kind="dtd")


def test_expect_names_both_sides_of_a_mismatch(tmp_path):
    write_store(tmp_path / "logits.zarr", _values())
    store = open_store(tmp_path / "logits.zarr")
    store.expect(num_classes=C)
    with pytest.raises(StoreError, match=r"num_classes is 10 in the store but 100"):
        store.expect(num_classes=100)
    with pytest.raises(StoreError, match="sample_index does not match"):
        store.expect_sample_index(np.arange(N)[::-1].copy())


def _hold_lock(path, ready, release):
    with StoreWriter(path, kind="logits", arrays=_arrays(), attrs=ATTRS, chunk_rows=300):
        ready.set()
        release.wait(30)


def test_a_second_writer_of_the_same_store_is_refused(tmp_path):
    out = tmp_path / "logits.zarr"
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(out, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(OutputError, match="another process is writing"):
            write_store(out, _values())
    finally:
        release.set()
        holder.join(30)
    write_store(out, _values())  # the lock is free again once the holder is gone
    assert open_store(out).num_samples == N


def test_a_finished_store_replaces_an_older_one_only_when_complete(tmp_path):
    out = tmp_path / "logits.zarr"
    old = _values(seed=0)
    write_store(out, old)
    write_store(out, _values(seed=1), stop_after=1)  # interrupted rewrite
    assert open_store(out).read("logits").tobytes() == old["logits"].tobytes()

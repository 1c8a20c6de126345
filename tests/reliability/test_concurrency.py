"""Concurrency: one writer per store (a second is refused at once, never interleaved), and
chunked writers never share a zarr chunk."""

from __future__ import annotations

import itertools
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import ArraySpec, StoreError, StoreWriter, open_store
from tests.reliability.conftest import (
    CHUNK,
    NUM_TRAIN,
    cli,
    ok,
    one_line_error,
    spawn_cli,
    teacher_h5,
    tree_digest,
    wait_for,
)


def test_a_second_writer_of_the_same_store_is_refused_at_once_and_the_first_is_untouched(tmp_path, pipeline):
    store = open_store(pipeline.teacher_stores / "logits.zarr")
    h5 = teacher_h5(store.path, tmp_path / "t.h5")
    out = tmp_path / "logits.zarr"
    partial = out.with_name(out.name + ".partial")
    marks = partial / ".lessons" / "done"
    args = ("import-logits", h5, "--data", pipeline.data, "--out", out)
    log = tmp_path / "first.log"
    first = spawn_cli(pipeline.params_path, *args, cwd=tmp_path, pause_s=60, log=log)
    try:
        wait_for(
            lambda: marks.is_dir() and any(m.name.isdigit() for m in marks.iterdir()),
            first,
            240,
            "the first writer's first chunk",
            log,
        )
        before = tree_digest(partial)
        started = time.monotonic()
        result = cli(pipeline.params_path, *args)
        elapsed_s = time.monotonic() - started
        one_line_error(result, "another process is writing this output", f"{out.name}.lock", "is held")
        assert elapsed_s < 10, f"the second writer waited {elapsed_s:.1f} s instead of failing at once"
        assert tree_digest(partial) == before  # nothing of the second writer got in
        assert not out.exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    # Once the first writer is gone its lock is released: the next run resumes its work.
    result = ok(cli(pipeline.params_path, *args))
    assert f"resuming, 1 of {-(-NUM_TRAIN // CHUNK)} chunks already written" in result.output
    np.testing.assert_array_equal(open_store(out).read("logits")[0], store.read("logits")[0])


def test_a_second_writer_in_the_same_process_is_refused_too(tmp_path):
    specs = {"x": ArraySpec((10,), "float32")}
    with (
        StoreWriter(tmp_path / "s.zarr", kind="dtd", arrays=specs, attrs={}, chunk_rows=5),
        pytest.raises(OSError, match="another process is writing this output"),
        StoreWriter(tmp_path / "s.zarr", kind="dtd", arrays=specs, attrs={}, chunk_rows=5),
    ):
        pass  # pragma: no cover


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_samples=st.integers(1, 700),
    chunk_rows=st.integers(1, 260),
    views=st.integers(1, 3),
    classes=st.integers(1, 5),
)
def test_writer_rows_coincide_with_the_zarr_chunks_of_every_array(num_samples, chunk_rows, views, classes):
    specs = {
        "logits": ArraySpec((views, num_samples, classes), "float16", sample_axis=1),
        "labels": ArraySpec((num_samples,), "int64"),
        "flags": ArraySpec((views, num_samples), "bool", sample_axis=1),
        "view_params": ArraySpec((views, num_samples, 0), "int16", sample_axis=1),
    }
    with (
        tempfile.TemporaryDirectory() as tmp,
        StoreWriter(
            Path(tmp) / "s.zarr", kind="logits", arrays=specs, attrs={}, chunk_rows=chunk_rows
        ) as writer,
    ):
        rows = [writer.rows(c) for c in range(writer.num_chunks)]
        # The writers' row ranges partition [0, N) in order, without gaps or overlaps...
        assert rows[0].start == 0 and rows[-1].stop == num_samples
        assert all(a.stop == b.start for a, b in itertools.pairwise(rows))
        assert all(r.stop > r.start for r in rows)
        for name, spec in specs.items():
            array = writer.partial_array(name)
            # ...and each is exactly one zarr chunk of every array (chunked along N only).
            assert array.chunks == spec.chunks(chunk_rows)
            step = array.chunks[spec.sample_axis]
            zarr_rows = [
                slice(start, min(start + step, num_samples)) for start in range(0, num_samples, step)
            ]
            assert zarr_rows == rows, name
            for axis, size in enumerate(array.shape):
                if axis != spec.sample_axis:
                    assert array.chunks[axis] >= size  # one chunk across every other axis


@settings(max_examples=15, deadline=None)
@given(num_samples=st.integers(2, 300), chunk_rows=st.integers(1, 64), data=st.data())
def test_dask_writes_whose_chunks_straddle_zarr_chunks_are_refused_before_writing(
    num_samples, chunk_rows, data
):
    import dask.array as da

    other = data.draw(st.integers(1, num_samples).filter(lambda c: c != min(chunk_rows, num_samples)))
    specs = {"x": ArraySpec((num_samples,), "float32")}
    with (
        tempfile.TemporaryDirectory() as tmp,
        StoreWriter(
            Path(tmp) / "s.zarr", kind="dtd", arrays=specs, attrs={}, chunk_rows=chunk_rows
        ) as writer,
    ):
        values = da.ones(num_samples, chunks=other, dtype=np.float32)
        if values.chunks == da.ones(num_samples, chunks=min(chunk_rows, num_samples)).chunks:
            return  # the same chunking after all (e.g. a single chunk)
        with pytest.raises(StoreError, match="do not coincide with the zarr chunks"):
            writer.write_dask({"x": values})
        assert writer.completed_chunks() == set()
        assert np.isnan(writer.partial_array("x")[...]).all()  # nothing was written

"""The `adjust` and `temperature` stages over zarr stores: values, counts, chunking, schedulers."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from pipeline.config import AdjustConfig, TemperatureConfig
from stages import adjust, temperature
from storage import ArraySpec, StoreError, StoreWriter, open_store

N, C = 997, 7


def make_logits_store(path, logits: np.ndarray, labels: np.ndarray, chunk_rows: int) -> None:
    views, samples, classes = logits.shape
    arrays = {
        "logits": ArraySpec(logits.shape, str(logits.dtype), 1),
        "labels": ArraySpec((samples,), "int64"),
        "sample_index": ArraySpec((samples,), "int64"),
        "view_params": ArraySpec((views, samples, 0), "int16", 1),
    }
    attrs = {
        "split": "train",
        "dataset_fingerprint": "d" * 64,
        "num_classes": classes,
        "num_views": views,
        "teacher": {"name": "t", "checkpoint_sha256": "c" * 64},
    }
    with StoreWriter(path, kind="logits", arrays=arrays, attrs=attrs, chunk_rows=chunk_rows) as writer:
        for chunk in writer.pending_chunks():
            rows = writer.rows(chunk)
            writer.write_chunk(
                chunk,
                {
                    "logits": logits[:, rows],
                    "labels": labels[rows],
                    "sample_index": np.arange(rows.start, rows.stop),
                    "view_params": np.zeros((views, rows.stop - rows.start, 0), np.int16),
                },
            )
        writer.finalize()


@pytest.fixture()
def teacher(tmp_path):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, C, N)
    logits = rng.normal(size=(1, N, C)) * 2
    logits[0, np.arange(N), labels] += 2.5  # a mostly-right teacher
    logits = logits.astype(np.float16)
    logits[0, 0, :] = 1.0  # a full tie: counts as right
    return logits, labels


def _run_adjust(tmp_path, logits, labels, method, chunk_rows, name="a", scheduler=None):
    make_logits_store(tmp_path / f"{name}-logits.zarr", logits, labels, chunk_rows)
    out = tmp_path / f"{name}-adjusted-{method}.zarr"
    summary = adjust.run(
        AdjustConfig(epsilon=0.2),
        method=method,
        logits_path=tmp_path / f"{name}-logits.zarr",
        out=out,
        metrics_out=tmp_path / f"{name}-{method}.json",
        scheduler=scheduler,
    )
    return open_store(out, kind="adjusted"), summary


def test_adjust_counts_match_an_independent_numpy_count(tmp_path, teacher):
    logits, labels = teacher
    store, summary = _run_adjust(tmp_path, logits, labels, "ps", chunk_rows=100)
    t = logits[0].astype(np.float64)
    wrong = t[np.arange(N), labels] < t.max(axis=1)
    assert summary["rewritten_views"] == wrong.sum() > 0
    assert summary["teacher_train_accuracy"] == pytest.approx(1 - wrong.mean())
    assert summary["rewrites_per_class"] == np.bincount(labels[wrong], minlength=C).tolist()
    assert np.array_equal(store.read("rewritten")[0], wrong)
    assert not store.read("fixed_target").any()
    assert store.attrs["rewritten_views"] == summary["rewritten_views"]
    assert store.attrs["dataset_fingerprint"] == "d" * 64 and store.attrs["teacher"]["name"] == "t"
    written = json.loads((tmp_path / "a-ps.json").read_text())
    assert written["rewritten_fraction"] == pytest.approx(wrong.mean())


def test_ps_store_swaps_exactly_the_two_logits_of_wrong_rows(tmp_path, teacher):
    logits, labels = teacher
    store, _ = _run_adjust(tmp_path, logits, labels, "ps", chunk_rows=128)
    got = store.read("target_logits")[0]
    want = logits[0].copy()
    for n in range(N):
        top = int(np.argmax(want[n].astype(np.float32)))
        if want[n, labels[n]] < want[n, top]:
            want[n, [top, labels[n]]] = want[n, [labels[n], top]]
    assert got.dtype == np.float16 and got.tobytes() == want.tobytes()


def test_lsr_store_holds_log_of_the_smoothed_one_hot_and_marks_it_fixed(tmp_path, teacher):
    logits, labels = teacher
    store, _ = _run_adjust(tmp_path, logits, labels, "lsr", chunk_rows=128)
    fixed = store.read("fixed_target")[0]
    rows = np.flatnonzero(fixed)
    target = store.read("target_logits")[0][rows].astype(np.float64)
    probs = np.exp(target)
    expected = np.full((rows.size, C), 0.2 / C)
    expected[np.arange(rows.size), labels[rows]] += 0.8
    np.testing.assert_allclose(probs, expected, rtol=2e-3)  # float16 storage of the log


def test_chunked_processing_equals_whole_array_processing_bit_for_bit(tmp_path, teacher):
    logits, labels = teacher
    for method in ("ps", "lsr"):
        small, _ = _run_adjust(tmp_path, logits, labels, method, chunk_rows=37, name="small")
        whole, _ = _run_adjust(tmp_path, logits, labels, method, chunk_rows=N, name="whole")
        for name in ("target_logits", "fixed_target", "rewritten"):
            assert small.read(name).tobytes() == whole.read(name).tobytes(), (method, name)


def test_temperature_matches_the_formula_computed_independently_in_numpy(tmp_path, teacher):
    logits, labels = teacher
    make_logits_store(tmp_path / "logits.zarr", logits, labels, 100)
    config = TemperatureConfig(base_temperature=4.0, beta=2.0, min_temperature=2.0, max_temperature=6.0)
    summary = temperature.run(
        config,
        logits_path=tmp_path / "logits.zarr",
        out=tmp_path / "dtd.zarr",
        metrics_out=tmp_path / "dtd.json",
        histogram_out=tmp_path / "h.json",
        plot_out=tmp_path / "h.png",
    )
    store = open_store(tmp_path / "dtd.zarr", kind="dtd")
    t = logits[0].astype(np.float64)
    p = np.exp(t - t.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    omega = 1.0 / (p.max(1) + 1e-3)
    tau = np.clip(4.0 + (omega.mean() - omega) * 2.0, 2.0, 6.0)
    np.testing.assert_allclose(store.read("omega_teacher")[0], omega, rtol=1e-5)
    np.testing.assert_allclose(store.read("static_temperature")[0], tau, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        store.read("teacher_entropy")[0], -(p * np.log(p)).sum(1), rtol=1e-4, atol=1e-6
    )
    top2 = np.sort(p, axis=1)[:, -2:]
    np.testing.assert_allclose(store.read("teacher_margin")[0], top2[:, 1] - top2[:, 0], atol=1e-5)
    assert summary["static_temperature_mean"] == pytest.approx(tau.mean(), rel=1e-5)
    assert summary["static_temperature_p95"] == pytest.approx(np.percentile(tau, 95), abs=0.05)
    histogram = json.loads((tmp_path / "h.json").read_text())
    assert sum(row["count"] for row in histogram) == N
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


def test_a_distributed_scheduler_gives_the_same_store_as_local_threads(tmp_path, teacher):
    distributed = pytest.importorskip("distributed")
    logits, labels = teacher
    local, _ = _run_adjust(tmp_path, logits, labels, "ps", chunk_rows=100, name="local")
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        remote, _ = _run_adjust(
            tmp_path, logits, labels, "ps", chunk_rows=100, name="remote", scheduler=cluster.scheduler_address
        )
    assert local.read("target_logits").tobytes() == remote.read("target_logits").tobytes()


def test_the_scheduler_key_in_params_runs_ka_and_dtd_on_that_cluster_and_the_option_wins(tmp_path, teacher):
    distributed = pytest.importorskip("distributed")
    from storage.errors import SettingsError

    logits, labels = teacher
    local, _ = _run_adjust(tmp_path, logits, labels, "ps", chunk_rows=100, name="local")
    source = tmp_path / "local-logits.zarr"

    def dtd(name: str, config: TemperatureConfig, scheduler: str | None = None):
        temperature.run(
            config,
            logits_path=source,
            out=tmp_path / f"{name}-dtd.zarr",
            metrics_out=tmp_path / f"{name}-dtd.json",
            histogram_out=tmp_path / f"{name}-h.json",
            scheduler=scheduler,
        )
        return open_store(tmp_path / f"{name}-dtd.zarr", kind="dtd").read("static_temperature")

    threads = dtd("threads", TemperatureConfig())
    nobody = "tcp://127.0.0.1:9"  # nothing listens there: reading the key means trying it
    with pytest.raises(
        SettingsError, match=re.escape(f"adjust.scheduler: cannot reach the dask scheduler at {nobody}")
    ):
        adjust.run(
            AdjustConfig(epsilon=0.2, scheduler=nobody),
            method="ps",
            logits_path=source,
            out=tmp_path / "x.zarr",
            metrics_out=tmp_path / "x.json",
        )
    assert not (tmp_path / "x.zarr").exists()
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        address = cluster.scheduler_address
        adjust.run(
            AdjustConfig(epsilon=0.2, scheduler=address),
            method="ps",
            logits_path=source,
            out=tmp_path / "params-adjusted.zarr",
            metrics_out=tmp_path / "params.json",
        )
        from_params = dtd("params", TemperatureConfig(scheduler=address))
        from_option = dtd("option", TemperatureConfig(scheduler=nobody), scheduler=address)
    remote = open_store(tmp_path / "params-adjusted.zarr", kind="adjusted")
    assert local.read("target_logits").tobytes() == remote.read("target_logits").tobytes()
    assert threads.tobytes() == from_params.tobytes() == from_option.tobytes()


def test_adjust_refuses_a_store_that_is_not_a_logit_store(tmp_path, teacher):
    logits, labels = teacher
    _run_adjust(tmp_path, logits, labels, "ps", chunk_rows=100)
    with pytest.raises(StoreError, match="'logits' store is expected"):
        adjust.run(
            AdjustConfig(),
            method="ps",
            logits_path=tmp_path / "a-adjusted-ps.zarr",
            out=tmp_path / "x.zarr",
            metrics_out=tmp_path / "x.json",
        )
    assert not (tmp_path / "x.zarr").exists()


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_student_train_refuses_a_dtd_store_whose_static_temperature_is_not_positive_on_load(
    tmp_path, teacher, bad
):
    # The KD loss checks nothing per step, so a temperature <= 0 must stop at load time, naming the store.
    import torch
    import zarr

    from stages.lessons import open_lessons
    from stages.views import training_augmentation

    def load_lessons(path, **kwargs):
        stores, _, _ = open_lessons(
            path, **kwargs, augmentation=training_augmentation((28, 28, 1)), max_bytes=1 << 30
        )
        return stores.epoch(0, 0)[0], None, None

    from tests.reliability.conftest import as_written

    logits, labels = teacher
    make_logits_store(tmp_path / "logits.zarr", logits, labels, 256)
    temperature.run(
        TemperatureConfig(),
        logits_path=tmp_path / "logits.zarr",
        out=tmp_path / "dtd.zarr",
        metrics_out=tmp_path / "t.json",
        histogram_out=tmp_path / "h.json",
    )
    manifest = {
        "dataset": "x",
        "num_classes": C,
        "splits": {"train": {"fingerprint": "d" * 64, "num_samples": N}},
    }
    lessons, _, _ = load_lessons(
        tmp_path, adjust="none", dtd="static", manifest=manifest, device=torch.device("cpu")
    )
    assert bool((lessons.static_temperature > 0).all())
    array = zarr.open_array(tmp_path / "dtd.zarr" / "static_temperature", mode="r+")
    array[0, 300] = bad
    as_written(tmp_path / "dtd.zarr")  # as if the store had been written so (the digest check passes)
    with pytest.raises(
        StoreError,
        match=r"static_temperature has NaN/inf or values <= 0 in 1 rows \(first: "
        r"sample 300, view 0\).*rebuild it",
    ):
        load_lessons(tmp_path, adjust="none", dtd="static", manifest=manifest, device=torch.device("cpu"))

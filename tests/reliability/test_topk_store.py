"""Top-k stores (`teacher_dump.layout: topk`, DESIGN §9): the dump writes them exactly, check-params
refuses a K that cannot work, KA, DTD, verify-views and every offline student read them (checked
against the dense store of the same teacher), and an ensemble, which needs dense rows, refuses
one in one line, writing nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from click.testing import Result

from stages.topk import topk_compress
from storage import open_store
from tests.reliability.conftest import (
    NUM_CLASSES,
    NUM_TRAIN,
    Pipeline,
    as_written,
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


def test_an_ensemble_of_a_topk_store_is_refused_in_one_line_writing_nothing(tmp_path, pipeline, topk_store):
    """Ensembles combine every logit of a row: the one consumer that still needs dense rows."""
    params, store = topk_store
    stores = tmp_path / "stores"
    shutil.copytree(store.parent, stores / "t", ignore=shutil.ignore_patterns("*.lock"))
    shutil.copytree(pipeline.teacher_stores, stores / "u", ignore=shutil.ignore_patterns("*.lock"))
    teachers = dict(pipeline.params["teacher_train"]["teachers"])
    params = write_params(
        tmp_path / "params.yaml",
        yaml.safe_load(params.read_text()),
        teacher_train={"teachers": {**teachers, "u": teachers["t"]}},
        ensemble={"ensembles": {"pair": {"teachers": ["t", "u"]}}},
    )
    before = _listing(stores)
    one_line_error(
        cli(params, "ensemble", "--ensemble", "pair", "--stores", stores),
        str(stores / "t" / "logits.zarr"),
        "top-k store",
        "teacher_dump.layout: dense",
    )
    assert _listing(stores) == before and leftovers(stores / "pair") == []


def _derive(params: Path, folder: Path, methods: tuple[str, ...] = ("ps", "lsr")) -> None:
    """adjust (each method) and temperature on `folder/logits.zarr`, writing beside it."""
    metrics = folder / "metrics"
    for method in methods:
        ok(
            cli(
                params,
                "adjust",
                "--method",
                method,
                "--logits",
                folder / "logits.zarr",
                "--out",
                folder / f"adjusted-{method}.zarr",
                "--metrics-out",
                metrics / f"{method}.json",
            )
        )
    ok(
        cli(
            params,
            "temperature",
            "--logits",
            folder / "logits.zarr",
            "--out",
            folder / "dtd.zarr",
            "--metrics-out",
            metrics / "dtd.json",
            "--histogram-out",
            metrics / "hist.json",
        )
    )


def _student(params: Path, pipeline: Pipeline, stores: Path, experiment: str, out: Path) -> Result:
    return cli(
        params,
        "student-train",
        "--experiment",
        experiment,
        "--data",
        pipeline.data,
        "--stores",
        stores,
        "--checkpoint-out",
        out / f"{experiment}.pt",
        "--metrics-out",
        out / f"{experiment}.json",
        "--curve-out",
        out / f"{experiment}-curve.json",
    )


EXPERIMENTS = {
    "kd_lsr": {"teacher": "t", "adjust": "lsr", "dtd": "off"},
    "kd_ps_cwsm": {"teacher": "t", "adjust": "ps", "dtd": "cwsm"},
    "kd_lsr_flsw": {"teacher": "t", "adjust": "lsr", "dtd": "flsw"},
}


def _wrong_teacher(dense: np.ndarray) -> np.ndarray:
    """(V, N, C) float16 logits, edited so the (accurate) fixture teacher is wrong on two thirds of
    the samples: rolled by one class on n % 3 == 0 (the label mostly leaves the top 2) and with
    its two largest values swapped on n % 3 == 1 (the label, where it was on top, stays in it)."""
    logits = dense.copy()
    n = np.arange(logits.shape[1])
    logits[:, n % 3 == 0] = np.roll(logits[:, n % 3 == 0], 1, axis=-1)
    rows = logits[:, n % 3 == 1]
    top2 = np.argsort(-rows.astype(np.float64), axis=-1, kind="stable")[..., :2]
    np.put_along_axis(rows, top2, np.take_along_axis(rows, top2[..., ::-1], -1), -1)
    logits[:, n % 3 == 1] = rows
    return logits


@pytest.fixture(scope="module")
def topk_lessons(
    topk_store: tuple[Path, Path], pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, Path]:
    """One edited (wrong) teacher twice: a dense store and its top-k store, each with its KA
    stores (ps, lsr) and dtd.zarr; and params with more experiments for the top-k side.

    Returns:
        (top-k params, top-k logits.zarr, dense teacher folder stores/t).
    """
    params, store = topk_store
    root = tmp_path_factory.mktemp("wrong")
    dense_dir, topk_dir = root / "dense" / "stores" / "t", root / "topk" / "stores" / "t"
    for source, folder in ((pipeline.teacher_stores, dense_dir), (store.parent, topk_dir)):
        for name in ("logits.zarr", "test-logits.zarr"):
            shutil.copytree(source / name, folder / name, ignore=shutil.ignore_patterns("*.lock"))
    array = zarr.open_array(dense_dir / "logits.zarr" / "logits", mode="r+")
    logits = _wrong_teacher(array[...])
    array[...] = logits
    as_written(dense_dir / "logits.zarr")
    values, indices, lse = topk_compress(torch.from_numpy(logits.astype(np.float32)), K)
    for name, value in (
        ("topk_values", values.numpy().astype(np.float16)),
        ("topk_indices", indices),
        ("lse", lse),
    ):
        zarr.open_array(topk_dir / "logits.zarr" / name, mode="r+")[...] = np.asarray(value)
    as_written(topk_dir / "logits.zarr")
    _derive(pipeline.params_path, dense_dir)
    _derive(params, topk_dir)
    experiments = {**pipeline.params["student_train"]["experiments"], **EXPERIMENTS}
    more = write_params(
        root / "params-more.yaml",
        yaml.safe_load(params.read_text()),
        student_train={"experiments": experiments},
    )
    return more, topk_dir / "logits.zarr", dense_dir


def _bucket_probs(values: np.ndarray, indices: np.ndarray, lse: np.ndarray) -> np.ndarray:
    """(R, K + 1) float64 probabilities of top-k rows: exp(v − lse) and the rest, 1 − their sum."""
    kept = np.exp(values.astype(np.float64) - lse.astype(np.float64)[:, None])
    return np.concatenate([kept, 1.0 - kept.sum(axis=1, keepdims=True)], axis=1)


def _dense_bucket_probs(logits: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """(R, K + 1) float64: softmax of dense rows at `indices`, and the rest of the row's mass."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    kept = np.take_along_axis(p, indices.astype(np.int64), axis=1)
    return np.concatenate([kept, 1.0 - kept.sum(axis=1, keepdims=True)], axis=1)


def _rows(store: Path, *names: str) -> list[np.ndarray]:
    opened = open_store(store, layouts=("dense", "topk"))
    return [opened.read(name).reshape(-1, *opened.read(name).shape[2:]) for name in names]


def test_ka_ps_on_a_topk_store_is_the_dense_ps_target_at_the_kept_classes(pipeline, topk_lessons):
    _, store, dense = topk_lessons
    adjusted = store.parent / "adjusted-ps.zarr"
    attrs = open_store(adjusted, kind="adjusted", layouts=("topk",)).attrs
    assert attrs["layout"] == "topk" and attrs["topk"] == K and attrs["method"] == "ps"
    values, indices, lse, rewritten, fixed = _rows(
        adjusted, "target_topk_values", "target_topk_indices", "target_lse", "rewritten", "fixed_target"
    )
    source_values, source_lse = _rows(store, "topk_values", "lse")
    dense_ps, dense_rewritten = _rows(dense / "adjusted-ps.zarr", "target_logits", "rewritten")
    # PS moves class ids only; the dense PS row holds, at each kept id, exactly the kept value
    assert np.array_equal(values.view(np.uint16), source_values.view(np.uint16))
    assert np.array_equal(lse, source_lse) and not fixed.any()
    gathered = np.take_along_axis(dense_ps, indices.astype(np.int64), axis=1)
    assert np.array_equal(gathered.view(np.uint16), values.view(np.uint16))
    labels = np.tile(open_store(store, layouts=("topk",)).read("labels"), values.shape[0] // NUM_TRAIN)
    assert (indices[:, 0] == labels).all()  # the label is on top of every row
    np.testing.assert_array_equal(rewritten, dense_rewritten)
    (source_indices,) = _rows(store, "topk_indices")
    outside = ~(source_indices == labels[:, None]).any(axis=1)  # the label is not among the kept
    assert (rewritten & outside).any() and (rewritten & ~outside).any() and not rewritten.all()
    metrics, dense_metrics = (
        json.loads(path.read_text())
        for path in (store.parent / "metrics" / "ps.json", dense / "metrics" / "ps.json")
    )
    for key in ("rewritten_views", "rewritten_fraction", "teacher_train_accuracy"):
        assert metrics[key] == dense_metrics[key], key
    config = json.loads((store.parent / "metrics" / "ps-config.json").read_text())
    dense_config = json.loads((dense / "metrics" / "ps-config.json").read_text())
    assert config["rewrites_per_class"] == dense_config["rewrites_per_class"]


def test_ka_lsr_on_a_topk_store_holds_the_dense_lsr_distribution_on_its_buckets(pipeline, topk_lessons):
    _, store, dense = topk_lessons
    adjusted = store.parent / "adjusted-lsr.zarr"
    values, indices, lse, fixed = _rows(
        adjusted, "target_topk_values", "target_topk_indices", "target_lse", "fixed_target"
    )
    dense_lsr, dense_fixed = _rows(dense / "adjusted-lsr.zarr", "target_logits", "fixed_target")
    np.testing.assert_array_equal(fixed, dense_fixed)
    assert fixed.any()
    labels = np.tile(open_store(store, layouts=("topk",)).read("labels"), values.shape[0] // NUM_TRAIN)
    assert (np.take_along_axis(indices, np.argmax(values, axis=1)[:, None], 1)[:, 0] == labels)[fixed].all()
    # on every row, the K + 1 buckets carry the dense LSR row's (re-normalised) probabilities
    np.testing.assert_allclose(
        _bucket_probs(values, indices, lse), _dense_bucket_probs(dense_lsr, indices), rtol=0, atol=2e-6
    )
    source_values, source_indices = _rows(store, "topk_values", "topk_indices")
    assert np.array_equal(values[~fixed].view(np.uint16), source_values[~fixed].view(np.uint16))
    assert np.array_equal(indices[~fixed], source_indices[~fixed])


def test_dtd_statistics_of_a_topk_store_are_topk_teacher_statistics_and_the_exact_ones_match_dense(
    pipeline, topk_lessons
):
    from stages.temperature import STATISTICS, topk_teacher_statistics

    _, store, dense = topk_lessons
    dtd, dense_dtd = (
        open_store(path, kind="dtd") for path in (store.parent / "dtd.zarr", dense / "dtd.zarr")
    )
    assert dtd.attrs["source_layout"] == {"layout": "topk", "topk": K}
    values, indices, lse = _rows(store, "topk_values", "topk_indices", "lse")
    want = topk_teacher_statistics(
        torch.from_numpy(values.astype(np.float32)),
        torch.from_numpy(indices),
        torch.from_numpy(lse),
        NUM_CLASSES,
    )
    for name in STATISTICS:
        stored = dtd.read(name)
        assert stored.dtype == np.float32 and stored.shape == dense_dtd.read(name).shape
        np.testing.assert_array_equal(stored.reshape(-1), want[name].numpy(), err_msg=name)
    for name in (
        "teacher_max_prob",
        "teacher_margin",
        "omega_teacher",
        "static_temperature",
    ):  # exact at τ = 1
        np.testing.assert_allclose(dtd.read(name), dense_dtd.read(name), rtol=2e-6, atol=1e-6, err_msg=name)
    assert (dtd.read("teacher_entropy") >= dense_dtd.read("teacher_entropy") - 1e-6).all()  # an upper bound
    metrics = json.loads((store.parent / "metrics" / "dtd.json").read_text())
    dense_metrics = json.loads((dense / "metrics" / "dtd.json").read_text())
    assert metrics.keys() == dense_metrics.keys()
    assert metrics["static_temperature_mean"] == pytest.approx(
        dense_metrics["static_temperature_mean"], rel=1e-5
    )


@pytest.mark.parametrize(
    "experiment", ["kd", "kd_ps_static", "kd_ps_2ep", "kd_lsr", "kd_ps_cwsm", "kd_lsr_flsw"]
)
def test_every_offline_student_trains_from_a_topk_store(tmp_path, pipeline, topk_lessons, experiment):
    params, store, _ = topk_lessons
    ok(_student(params, pipeline, store.parent.parent, experiment, tmp_path))
    metrics = json.loads((tmp_path / f"{experiment}.json").read_text())
    assert 0.0 <= metrics["test_top1"] <= 1.0 and 0.0 <= metrics["agreement_top1"] <= 1.0
    record = json.loads((tmp_path / f"{experiment}-config.json").read_text())
    assert (
        record["teacher"]["checkpoint_sha256"]
        == open_store(store, layouts=("topk",)).attrs["teacher"]["checkpoint_sha256"]
    )


def test_verify_views_replays_a_topk_store_and_fails_an_edited_one(tmp_path, pipeline, topk_store):
    params, store = topk_store
    args = ("--data", pipeline.data, "--checkpoint", pipeline.checkpoint, "--samples", "100")
    assert ": ok" in ok(cli(params, "verify-views", store, *args)).output
    copy = tmp_path / "logits.zarr"
    shutil.copytree(store, copy, ignore=shutil.ignore_patterns("*.lock"))
    array = zarr.open_array(copy / "lse", mode="r+")
    array[...] = array[...] + 0.5  # every row's log-sum-exp off by half a logit
    as_written(copy)
    line = one_line_error(cli(params, "verify-views", copy, *args), "max |Δ logit|", "rebuild it")
    assert "0.5" in line


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


def test_students_from_a_topk_store_with_k_one_below_c_train_as_the_dense_ones(tmp_path, pipeline):
    """At K = C − 1 the rest bucket is one class, whose logit the lse gives exactly: the KD loss,
    KA and the DTD statistics are then the dense ones, so the students must agree closely."""
    params, store = _dump_topk(tmp_path / "k3", pipeline, topk=NUM_CLASSES - 1)
    _derive(params, store.parent, methods=("ps",))
    for experiment in ("kd", "kd_ps_static", "kd_ps_2ep"):
        ok(_student(params, pipeline, store.parent.parent, experiment, tmp_path / "topk"))
        ok(_student(pipeline.params_path, pipeline, pipeline.stores, experiment, tmp_path / "dense"))
        topk, dense = (_weights(tmp_path / side / f"{experiment}.pt") for side in ("topk", "dense"))
        for name, value in dense.items():
            if value.is_floating_point():
                scale = float(value.abs().max()) + 1e-12
                assert float((topk[name] - value).abs().max()) <= 1e-5 * scale, (
                    experiment,
                    name,
                )  # measured: 4e-7
        curves = [
            json.loads((tmp_path / side / f"{experiment}-curve.json").read_text())
            for side in ("topk", "dense")
        ]
        assert curves[0][-1]["train_loss"] == pytest.approx(curves[1][-1]["train_loss"], rel=1e-5)


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


@pytest.mark.parametrize("adjust, dtd", [("ps", "static"), ("none", "flsw"), ("lsr", "off")])
def test_topk_lessons_are_the_stores_rows_and_streamed_equals_in_memory(pipeline, topk_lessons, adjust, dtd):
    from stages.lessons import open_lessons
    from stages.topk import TopkRows
    from stages.views import training_augmentation
    from storage.manifest import read_prepared

    _, store, _ = topk_lessons
    common = dict(
        adjust=adjust,
        dtd=dtd,
        manifest=read_prepared(pipeline.data),
        augmentation=training_augmentation((28, 28, 1)),
        device=torch.device("cpu"),
    )
    memory, _, _ = open_lessons(store.parent, max_bytes=1 << 30, **common)
    streamed, _, _ = open_lessons(store.parent, max_bytes=0, **common)
    assert not memory.streamed and streamed.streamed
    (a, _), (b, _) = memory.epoch(0, 0), streamed.epoch(0, 0)
    assert isinstance(a.target_logits, TopkRows) and isinstance(b.target_logits, TopkRows)
    source = store if adjust == "none" else store.parent / f"adjusted-{adjust}.zarr"
    prefix = "" if adjust == "none" else "target_"
    opened = open_store(source, layouts=("topk",))
    for part, name in (("values", "topk_values"), ("indices", "topk_indices"), ("lse", "lse")):
        want = opened.read(f"{prefix}{name}")[0]  # V = 1: view 0 of every sample
        assert torch.equal(getattr(a.target_logits, part), getattr(b.target_logits, part))
        np.testing.assert_array_equal(getattr(a.target_logits, part).numpy(), want)
    assert a.target_logits.values.dtype == torch.float32 and a.target_logits.indices.dtype == torch.int64
    assert torch.equal(a.fixed_target, b.fixed_target) and bool(a.fixed_target.any()) == (adjust == "lsr")
    assert isinstance(a.teacher_logits, TopkRows) == (dtd == "flsw")
    assert (a.static_temperature is not None) == (dtd == "static")


@pytest.mark.parametrize("command", ["adjust", "temperature"])
def test_nan_in_a_topk_store_is_one_line_for_ka_and_dtd_writing_nothing(tmp_path, topk_store, command):
    params, store = topk_store
    copy = tmp_path / "logits.zarr"
    shutil.copytree(store, copy, ignore=shutil.ignore_patterns("*.lock"))
    array = zarr.open_array(copy / "topk_values", mode="r+")
    block = array[...]
    block[0, 70, 1] = np.nan  # sample 70: the second chunk
    array[...] = block
    as_written(copy)
    out = tmp_path / "out.zarr"
    metrics = ("--metrics-out", tmp_path / "m.json")
    args = {
        "adjust": ["adjust", "--method", "ps", "--logits", copy, "--out", out, *metrics],
        "temperature": [
            "temperature",
            "--logits",
            copy,
            "--out",
            out,
            *metrics,
            "--histogram-out",
            tmp_path / "h.json",
        ],
    }[command]
    line = one_line_error(cli(params, *args), str(copy), "NaN or inf", "re-run the teacher dump")
    assert "row" in line and leftovers(out) == [] and not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("loss", ["dkd", "ls", "ttm"])
def test_a_loss_that_needs_every_teacher_logit_is_refused_on_a_topk_store_in_one_line(
    tmp_path, pipeline, topk_lessons, loss
):
    params, store, _ = topk_lessons
    content = yaml.safe_load(params.read_text())
    experiments = {"kd_other": {"teacher": "t", "adjust": "none", "dtd": "off", "loss": loss}}
    other = write_params(tmp_path / "params.yaml", content, student_train={"experiments": experiments})
    one_line_error(
        _student(other, pipeline, store.parent.parent, "kd_other", tmp_path),
        f"loss: {loss}",
        "top-k",
        "use loss: kd",
    )
    written = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))  # locks stay
    assert written == ["params.yaml"]


def test_check_params_refuses_a_loss_other_than_kd_with_topk_stores(tmp_path):
    params = base_params(make_npz(tmp_path / "x.npz"))
    experiments = {"kd_dkd": {"teacher": "t", "adjust": "none", "dtd": "off", "loss": "dkd"}}
    path = write_params(
        tmp_path / "params.yaml",
        params,
        teacher_dump={"layout": "topk", "topk": 2},
        student_train={"experiments": experiments},
    )
    one_line_error(
        cli(path, "check-params", "--out", tmp_path / "check.json"),
        "student_train.experiments.kd_dkd.loss",
        "layout: topk",
        "use loss: kd",
    )
    assert not (tmp_path / "check.json").exists()

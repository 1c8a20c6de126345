"""Teacher ensembles: the combine math (golden, properties) and the `ensemble` stage on small stores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import ConfigError, EnsembleConfig, EnsembleSpec, Params, from_dict
from stages import ensemble
from stages.functional import ensemble_logits
from stages.views import StoredViews, training_augmentation
from storage import ArraySpec, StoreError, StoreWriter, open_store
from storage.soft_labels import content_digest

N, C = 301, 5
VIEWS = StoredViews.plan("all", training_augmentation((28, 28, 1), True))  # the two flips of 28x28
V, SPEC_VIEWS = VIEWS.num_views, VIEWS.spec()


def numpy_ensemble(logits: np.ndarray, combine: str, temperature: float) -> np.ndarray:
    """Independent float64 reference: (S, N, C) -> τ·log q."""
    z = logits.astype(np.float64) / temperature
    log_p = z - z.max(axis=2, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=2, keepdims=True))
    if combine == "log_prob":
        mean = log_p.mean(axis=0)
        log_q = mean - np.log(np.exp(mean).sum(axis=1, keepdims=True))
    else:
        log_q = np.log(np.exp(log_p).mean(axis=0))
    return temperature * log_q


@pytest.mark.parametrize("combine", ["log_prob", "prob"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_ensemble_logits_equal_an_independent_float64_numpy_ensemble(combine, temperature):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 40, 7)) * 3
    got = ensemble_logits(torch.from_numpy(logits), combine=combine, temperature=temperature)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(
        got.numpy(), numpy_ensemble(logits, combine, temperature), rtol=1e-12, atol=1e-12
    )
    got32 = ensemble_logits(torch.from_numpy(logits).half(), combine=combine, temperature=temperature)
    reference = numpy_ensemble(logits.astype(np.float16), combine, temperature)
    np.testing.assert_allclose(got32.numpy(), reference, rtol=1e-5, atol=1e-4)


def test_a_hand_computed_two_teacher_row_gives_the_arithmetic_and_geometric_means():
    # Teacher 1 puts (0.8, 0.2), teacher 2 (0.2, 0.8) on two classes, at τ = 1.
    logits = torch.tensor([[[np.log(0.8), np.log(0.2)]], [[np.log(0.2), np.log(0.8)]]], dtype=torch.float64)
    prob = ensemble_logits(logits, combine="prob", temperature=1.0).exp()
    geometric = ensemble_logits(logits, combine="log_prob", temperature=1.0).exp()
    np.testing.assert_allclose(prob.numpy(), [[0.5, 0.5]], atol=1e-15)
    np.testing.assert_allclose(geometric.numpy(), [[0.5, 0.5]], atol=1e-15)
    logits[1, 0] = torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))
    # mean: (0.65, 0.35); geometric: sqrt(0.4), sqrt(0.1), normalised
    np.testing.assert_allclose(
        ensemble_logits(logits, combine="prob", temperature=1.0).exp().numpy(), [[0.65, 0.35]], atol=1e-15
    )
    g = np.sqrt([0.4, 0.1])
    np.testing.assert_allclose(
        ensemble_logits(logits, combine="log_prob", temperature=1.0).exp().numpy(), [g / g.sum()], atol=1e-15
    )


logit_rows = st.integers(1, 4).flatmap(
    lambda s: st.tuples(st.just(s), st.integers(1, 6), st.integers(2, 6), st.integers(0, 2**31))
)


@settings(max_examples=40, deadline=None)
@given(shape=logit_rows, combine=st.sampled_from(["log_prob", "prob"]), temperature=st.floats(0.1, 20.0))
def test_an_ensemble_of_identical_teachers_is_that_teacher_and_order_does_not_matter(
    shape, combine, temperature
):
    teachers, samples, classes, seed = shape
    rng = np.random.default_rng(seed)
    one = torch.from_numpy(rng.normal(size=(1, samples, classes)) * 5)
    same = ensemble_logits(one.expand(3, -1, -1), combine=combine, temperature=temperature)
    np.testing.assert_allclose(
        torch.softmax(same / temperature, dim=1).numpy(),
        torch.softmax(one[0] / temperature, dim=1).numpy(),
        atol=1e-12,
    )
    many = torch.from_numpy(rng.normal(size=(teachers, samples, classes)) * 5)
    forward = ensemble_logits(many, combine=combine, temperature=temperature)
    backward = ensemble_logits(many.flip(0), combine=combine, temperature=temperature)
    np.testing.assert_allclose(forward.numpy(), backward.numpy(), atol=1e-12)
    # every stored row is τ·log q: exp(row / τ) sums to 1
    np.testing.assert_allclose((forward / temperature).exp().sum(1).numpy(), 1.0, atol=1e-12)


def test_the_geometric_ensemble_is_the_softmax_of_the_mean_logits_at_every_temperature():
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(size=(3, 20, 6)) * 4)
    stored = ensemble_logits(logits, combine="log_prob", temperature=4.0)
    for kd_temperature in (1.0, 2.0, 4.0, 8.0):
        np.testing.assert_allclose(
            torch.softmax(stored / kd_temperature, dim=1).numpy(),
            torch.softmax(logits.mean(0) / kd_temperature, dim=1).numpy(),
            atol=1e-12,
        )


def test_ensemble_logits_refuse_bad_input_with_one_line():
    with pytest.raises(ValueError, match="combine"):
        ensemble_logits(torch.zeros(2, 1, 3), combine="max", temperature=1.0)
    with pytest.raises(ValueError, match="temperature"):
        ensemble_logits(torch.zeros(2, 1, 3), combine="prob", temperature=0.0)
    with pytest.raises(ValueError, match=r"\(S, N, C\)"):
        ensemble_logits(torch.zeros(2, 3), combine="prob", temperature=1.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        ensemble_logits(torch.full((2, 1, 3), float("nan")), combine="prob", temperature=1.0)


# --- the stage ------------------------------------------------------------------------------


def make_store(
    path: Path,
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    checkpoint: str,
    chunk_rows: int = 64,
    view_params: np.ndarray | None = None,
    **attrs: Any,
) -> Path:
    views, samples, classes = logits.shape
    if view_params is None:
        view_params = VIEWS.view_params(np.arange(samples))[:views]
    arrays = {
        "logits": ArraySpec(logits.shape, str(logits.dtype), 1),
        "labels": ArraySpec((samples,), "int64"),
        "sample_index": ArraySpec((samples,), "int64"),
        "view_params": ArraySpec(view_params.shape, "int16", 1),
    }
    attrs = {
        "split": "train",
        "dataset": "toy",
        "dataset_fingerprint": "d" * 64,
        "num_classes": classes,
        "num_views": views,
        "view_spec": SPEC_VIEWS,
        "teacher": {
            "name": path.parent.name,
            "arch": "mlp",
            "checkpoint_sha256": checkpoint,
            "pixel_mean": [0.5],
        },
        **attrs,
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
                    "view_params": view_params[:, rows],
                },
            )
        writer.finalize()
    return path


@pytest.fixture()
def two_teachers(tmp_path):
    rng = np.random.default_rng(5)
    labels = rng.integers(0, C, N)
    stores = {}
    for k, name in enumerate(("a", "b")):
        logits = rng.normal(size=(V, N, C)) * 2
        logits[:, np.arange(N), labels] += 1.5 + k
        logits = logits.astype(np.float16)
        # a differs in its chunking from b: the ensemble follows the first (sorted) source
        path = make_store(
            tmp_path / "stores" / name / "logits.zarr",
            logits,
            labels,
            checkpoint=f"{k + 1}" * 64,
            chunk_rows=64 if k == 0 else 100,
        )
        stores[name] = (path, logits)
    return tmp_path, labels, stores


SPEC = EnsembleSpec(teachers=("a", "b"), combine="prob", temperature=4.0)


def _build(tmp_path, sources, out_name="pair", spec=SPEC):
    out = tmp_path / "stores" / out_name / "logits.zarr"
    summary = ensemble.write(ensemble.plan(spec, name=out_name, sources=sources, out=out))
    return out, summary


def test_the_stage_writes_the_numpy_ensemble_with_the_first_sources_schema_and_provenance(two_teachers):
    tmp_path, labels, stores = two_teachers
    out, summary = _build(tmp_path, [stores["b"][0], stores["a"][0]])
    store = open_store(out, kind="logits")
    store.check_layout()
    expected = numpy_ensemble(np.stack([stores["a"][1], stores["b"][1]]).reshape(2, V * N, C), "prob", 4.0)
    got = store.read("logits")
    assert got.dtype == np.float16 and got.shape == (V, N, C)
    np.testing.assert_allclose(got.astype(np.float64), expected.reshape(V, N, C), atol=4e-3, rtol=1e-3)
    assert np.array_equal(store.read("labels"), labels)
    assert np.array_equal(store.read("view_params"), open_store(stores["a"][0]).read("view_params"))
    assert store.chunk_rows == 64  # a (checkpoint 11...) sorts first
    teacher = store.attrs["teacher"]
    assert teacher["arch"] == "ensemble" and teacher["name"] == "pair"
    assert [m["name"] for m in teacher["members"]] == ["a", "b"]
    assert teacher["checkpoint_sha256"] == ensemble.ensemble_identity(
        ["2" * 64, "1" * 64], combine="prob", temperature=4.0
    )
    assert teacher["pixel_mean"] == [0.5] and (teacher["combine"], teacher["temperature"]) == ("prob", 4.0)
    assert [s["content_digest"] for s in store.attrs["sources"]] == [
        open_store(stores[n][0]).content_digest for n in ("a", "b")
    ]
    assert [s["store"] for s in store.attrs["sources"]] == ["a/logits.zarr", "b/logits.zarr"]
    assert store.attrs["view_spec"] == SPEC_VIEWS and store.attrs["dataset_fingerprint"] == "d" * 64
    right = expected.reshape(V, N, C).argmax(2) == labels
    assert summary["ensemble_top1"] == pytest.approx(right.mean(), abs=2 / (V * N))
    assert summary["member_top1"]["a"] == pytest.approx((stores["a"][1].argmax(2) == labels).mean())


def test_the_stage_is_byte_identical_on_rerun_and_in_either_source_order(two_teachers):
    tmp_path, _, stores = two_teachers
    first, _ = _build(tmp_path, [stores["a"][0], stores["b"][0]], "one")
    again, _ = _build(tmp_path, [stores["b"][0], stores["a"][0]], "two")
    digest = content_digest(first)
    assert digest == content_digest(again)
    _build(tmp_path, [stores["a"][0], stores["b"][0]], "one")  # rerun over the finished store
    assert content_digest(first) == digest
    one, two = open_store(first).attrs, open_store(again).attrs
    assert one["teacher"]["checkpoint_sha256"] == two["teacher"]["checkpoint_sha256"]
    three, _ = _build(
        tmp_path, [stores["a"][0], stores["b"][0]], "three", EnsembleSpec(("a", "b"), "log_prob", 4.0)
    )
    assert open_store(three).attrs["teacher"]["checkpoint_sha256"] != one["teacher"]["checkpoint_sha256"]


def _nothing_written(tmp_path) -> None:
    assert not [p.name for p in (tmp_path / "stores").iterdir() if p.name not in ("a", "b", "c")]


@pytest.mark.parametrize(
    ("change", "fact"),
    [
        ({"dataset_fingerprint": "e" * 64}, "dataset_fingerprint"),
        ({"view_spec": {**SPEC_VIEWS, "flip": False}}, "view_spec"),
        ({"split": "test"}, "split"),
        ({"num_classes": C + 1}, "num_classes"),
    ],
)
def test_sources_of_another_dataset_split_views_or_class_count_are_refused_with_nothing_written(
    two_teachers, change, fact
):
    tmp_path, labels, stores = two_teachers
    logits = stores["b"][1]
    if "num_classes" in change:
        logits = np.concatenate([logits, np.zeros((V, N, 1), np.float16)], axis=2)
    other = make_store(
        tmp_path / "stores" / "c" / "logits.zarr", logits, labels, checkpoint="3" * 64, **change
    )
    with pytest.raises(StoreError, match=fact) as info:
        ensemble.plan(
            SPEC, name="pair", sources=[stores["a"][0], other], out=tmp_path / "stores" / "pair" / "x"
        )
    assert "\n" not in str(info.value)
    _nothing_written(tmp_path)


def test_sources_with_other_labels_view_params_or_sample_counts_are_refused(two_teachers):
    tmp_path, labels, stores = two_teachers
    a, logits = stores["a"][0], stores["b"][1]
    out = tmp_path / "stores" / "pair" / "logits.zarr"
    cases = {
        "labels differ": dict(logits=logits, labels=(labels + 1) % C),
        "view_params differ": dict(logits=logits, labels=labels, view_params=np.zeros((V, N, 3), np.int16)),
        "num_samples": dict(logits=logits[:, :-1], labels=labels[:-1]),
        "num_views": dict(logits=logits[:1], labels=labels),
    }
    for k, (fact, kwargs) in enumerate(cases.items()):
        other = make_store(tmp_path / "stores" / "c" / f"s{k}.zarr", checkpoint="3" * 64, **kwargs)
        with pytest.raises(StoreError, match=fact):
            ensemble.plan(SPEC, name="pair", sources=[a, other], out=out)
    _nothing_written(tmp_path)


def test_one_source_a_duplicate_a_derived_store_or_the_output_as_source_is_refused(two_teachers):
    tmp_path, labels, stores = two_teachers
    a, b = stores["a"][0], stores["b"][0]
    out = tmp_path / "stores" / "pair" / "logits.zarr"
    with pytest.raises(StoreError, match="at least two"):
        ensemble.plan(SPEC, name="pair", sources=[a], out=out)
    with pytest.raises(StoreError, match="same teacher checkpoint"):
        ensemble.plan(SPEC, name="pair", sources=[a, a], out=out)
    twin = make_store(tmp_path / "stores" / "c" / "logits.zarr", stores["a"][1], labels, checkpoint="1" * 64)
    with pytest.raises(StoreError, match="same teacher checkpoint"):
        ensemble.plan(SPEC, name="pair", sources=[a, twin], out=out)
    with pytest.raises(StoreError, match="'logits' store is expected"):
        from pipeline.config import AdjustConfig
        from stages import adjust

        adjusted = tmp_path / "stores" / "c" / "adjusted-ps.zarr"
        adjust.run(AdjustConfig(), method="ps", logits_path=a, out=adjusted, metrics_out=tmp_path / "m.json")
        ensemble.plan(SPEC, name="pair", sources=[b, adjusted], out=out)
    with pytest.raises(StoreError, match="is one of its sources"):
        ensemble.plan(SPEC, name="pair", sources=[a, b], out=b)
    _nothing_written(tmp_path)


def test_ensemble_logits_beyond_float16_range_are_refused_and_leave_nothing(tmp_path):
    labels = np.zeros(4, np.int64)
    big = np.zeros((1, 4, 3), np.float16)
    big[..., 0], big[..., 1] = 60000, -60000
    a = make_store(tmp_path / "stores" / "a" / "logits.zarr", big, labels, checkpoint="1" * 64)
    big[..., 0] = 59000  # another teacher, as sure: class 1 sits 119000 below class 0 in both
    b = make_store(tmp_path / "stores" / "b" / "logits.zarr", big, labels, checkpoint="2" * 64)
    out = tmp_path / "stores" / "pair" / "logits.zarr"
    spec = EnsembleSpec(("a", "b"), "prob", 1.0)
    with pytest.raises(StoreError, match="float16 range"):
        ensemble.write(ensemble.plan(spec, name="pair", sources=[a, b], out=out))
    assert not out.exists() and not out.with_name("logits.zarr.partial").exists()


def test_the_ensemble_section_is_strict_and_checked_against_the_teachers():
    with pytest.raises(ConfigError, match="at least two"):
        from_dict(EnsembleConfig, {"ensembles": {"e": {"teachers": ["a"]}}}, "ensemble")
    with pytest.raises(ConfigError, match="each teacher once"):
        from_dict(EnsembleConfig, {"ensembles": {"e": {"teachers": ["a", "a"]}}}, "ensemble")
    with pytest.raises(ConfigError, match="must be one of"):
        from_dict(
            EnsembleConfig, {"ensembles": {"e": {"teachers": ["a", "b"], "combine": "max"}}}, "ensemble"
        )
    with pytest.raises(ConfigError, match="temperature"):
        from_dict(
            EnsembleConfig, {"ensembles": {"e": {"teachers": ["a", "b"], "temperature": 0.0}}}, "ensemble"
        )
    teachers = {"teachers": {"a": {"arch": "mlp"}, "b": {"arch": "mlp"}}}

    def params(ensembles: dict[str, Any], experiments: dict[str, Any] | None = None) -> Params:
        raw = {"teacher_train": teachers, "ensemble": {"ensembles": ensembles}}
        raw["student_train"] = {"experiments": experiments or {"ce": {"kd": False}}}
        return from_dict(Params, raw, "")

    with pytest.raises(ConfigError, match=r"ensemble.ensembles.e.teachers: no teacher named 'z'"):
        params({"e": {"teachers": ["a", "z"]}}).check_pipeline()
    with pytest.raises(ConfigError, match="rename the ensemble"):
        params({"a": {"teachers": ["a", "b"]}}).check_pipeline()
    ok = params({"e": {"teachers": ["a", "b"]}}, {"kd": {"teacher": "e"}})
    assert ok.check_pipeline() == ["kd"] and ok.teacher_names() == ["a", "b", "e"]
    with pytest.raises(ConfigError, match="teacher_mode: offline"):
        params(
            {"e": {"teachers": ["a", "b"]}}, {"kd": {"teacher": "e", "teacher_mode": "online"}}
        ).check_pipeline()

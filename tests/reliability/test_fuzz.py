"""Fuzzing: the params loader and the pure KA / DTD / KD math never fail in an undocumented way.

The loader either loads or raises ConfigError. The math returns finite values in the documented
ranges for any finite input -- shapes N in 1..8, C in 1..12, float16/32/64, ties, logits at the
float16 limit (±65504) and ±1e30 in float32/64 -- or raises its documented InvalidLogitsError /
ValueError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import typing

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from pipeline import config as config_module
from pipeline.config import ConfigError, Params, from_dict, load_params
from stages.adjust import knowledge_adjustment
from stages.functional import InvalidLogitsError, kd_loss
from stages.temperature import (
    cwsm_weights,
    dynamic_temperature,
    flsw_weights,
    teacher_statistics,
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- params.yaml ------------------------------------------------------------------------------

SECTIONS = {f.name: typing.get_type_hints(Params)[f.name] for f in dataclasses.fields(Params)}


def _keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(
        [
            "ps",
            "lsr",
            "none",
            "off",
            "on",
            "flsw",
            "cwsm",
            "static",
            "cosine",
            "step",
            "auto",
            "cpu",
            "cuda",
            "float16",
            "float32",
            "mlp",
            "npz",
            "t",
            "",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=6), st.integers()), children, max_size=4),
    ),
    max_leaves=12,
)


@st.composite
def section_dicts(draw: st.DrawFn, cls: type) -> dict:
    """A mapping whose keys are mostly real keys of `cls` (some misspelled or foreign)."""
    keys = _keys(cls)
    chosen = draw(st.lists(st.sampled_from(keys), max_size=len(keys), unique=True))
    raw = {}
    for key in chosen:
        hint = typing.get_type_hints(cls)[key]
        origin = typing.get_origin(hint)
        if origin is dict:  # teachers / experiments: name -> nested section
            item = typing.get_args(hint)[1]
            raw[key] = draw(
                st.dictionaries(
                    st.text(min_size=1, max_size=4), st.one_of(section_dicts(item), values), max_size=3
                )
            )
        else:
            raw[key] = draw(values)
    if draw(st.booleans()):
        raw[draw(st.text(min_size=1, max_size=10))] = draw(values)
    return raw


@st.composite
def params_dicts(draw: st.DrawFn) -> object:
    if draw(st.integers(0, 9)) == 0:
        return draw(values)  # not even a mapping
    chosen = draw(st.lists(st.sampled_from(sorted(SECTIONS)), max_size=4, unique=True))
    raw = {name: draw(st.one_of(section_dicts(SECTIONS[name]), values)) for name in chosen}
    if draw(st.integers(0, 4)) == 0:
        raw[draw(st.text(max_size=8))] = draw(values)
    return raw


@FUZZ
@given(raw=params_dicts())
def test_the_params_loader_either_loads_or_raises_config_error(raw):
    try:
        params = from_dict(Params, raw, "")
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
        return
    assert isinstance(params, Params)
    for section in dataclasses.fields(params):
        value = getattr(params, section.name)
        for f in dataclasses.fields(value):
            number = getattr(value, f.name)
            if isinstance(number, float):
                assert math.isfinite(number), f"{section.name}.{f.name} = {number}"


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(raw=params_dicts())
def test_params_yaml_files_either_load_or_raise_config_error(tmp_path, raw):
    path = tmp_path / "params.yaml"
    try:
        path.write_text(yaml.safe_dump(raw))
    except (yaml.YAMLError, ValueError):
        assume(False)
    with contextlib.suppress(ConfigError):
        load_params(path)


@pytest.mark.parametrize(
    "text",
    [
        "data: {seed: 1e999}\n",
        "student_train: {lr: .inf}\n",
        "adjust: {epsilon: .nan}\n",
        "data: {seed: .nan}\n",
        f"student_train: {{lr: {10**400}}}\n",
    ],
)
def test_non_finite_and_huge_numbers_are_a_config_error(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_params(path)


def test_the_fuzzer_knows_every_section():
    assert set(SECTIONS) == {f.name for f in dataclasses.fields(config_module.Params)}


# -- the math -----------------------------------------------------------------------------------

DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
EXTREME = {torch.float16: 65504.0, torch.float32: 1e30, torch.float64: 1e30}


@st.composite
def logit_batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) logits with ties and extremes, and (N,) labels in [0, C)."""
    n, c = draw(st.integers(1, 8)), draw(st.integers(1, 12))
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    big = EXTREME[dtype]
    pool = draw(
        st.lists(
            st.one_of(
                st.sampled_from([0.0, 1.0, -1.0, big, -big, 0.5, 30.0]),
                st.floats(-big, big, width=16 if dtype == torch.float16 else 64),
            ),
            min_size=1,
            max_size=6,
        )
    )
    cells = draw(st.lists(st.sampled_from(pool), min_size=n * c, max_size=n * c))  # ties are likely
    logits = torch.tensor(cells, dtype=torch.float64).reshape(n, c).to(dtype)
    assume(bool(torch.isfinite(logits).all()))
    labels = torch.tensor(draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)), dtype=torch.long)
    return logits, labels


def _batch(
    rows: list[list[float]], labels: list[int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(rows, dtype=torch.float64).to(dtype), torch.tensor(labels)


F16_MAX = 65504.0
#: Edge cases every run checks: one class, two tied classes, ±float16 max, ±1e30.
EDGES = [
    _batch([[F16_MAX], [-F16_MAX]], [0, 0], torch.float16),
    _batch([[F16_MAX, F16_MAX], [-F16_MAX, F16_MAX], [0.0, 0.0]], [1, 0, 1], torch.float16),
    _batch([[1e30, -1e30], [-1e30, 1e30]], [1, 1], torch.float32),
    _batch([[1e30, 1e30, -1e30], [0.0, 0.0, 0.0]], [2, 1], torch.float64),
]


def _finite(*tensors: torch.Tensor) -> None:
    for t in tensors:
        assert bool(torch.isfinite(t.double()).all()), t


@FUZZ
@given(
    batch=logit_batches(), method=st.sampled_from(["ps", "lsr", "none"]), epsilon=st.floats(1e-6, 1 - 1e-6)
)
@example(batch=EDGES[0], method="lsr", epsilon=0.1)
@example(batch=EDGES[1], method="ps", epsilon=0.1)
@example(batch=EDGES[2], method="ps", epsilon=0.1)
@example(batch=EDGES[3], method="lsr", epsilon=0.5)
def test_knowledge_adjustment_gives_finite_targets_with_the_label_as_a_mode(batch, method, epsilon):
    logits, labels = batch
    result = knowledge_adjustment(logits, labels, method, epsilon)
    assert result.target_logits.dtype == logits.dtype and result.target_logits.shape == logits.shape
    _finite(result.target_logits)
    wrong = logits.gather(1, labels[:, None]).squeeze(1) < logits.amax(1)
    assert torch.equal(result.rewritten, wrong if method != "none" else torch.zeros_like(wrong))
    assert torch.equal(result.fixed_target, wrong if method == "lsr" else torch.zeros_like(wrong))
    if method != "none":  # every row now has the label as a mode
        label_value = result.target_logits.gather(1, labels[:, None]).squeeze(1)
        assert bool((label_value >= result.target_logits.amax(1)).all())
    right = ~wrong
    assert torch.equal(result.target_logits[right], logits[right])
    if method == "ps":  # the multiset of each row's values is kept
        assert torch.equal(result.target_logits.sort(1).values, logits.sort(1).values)
    if method == "lsr" and bool(wrong.any()):
        probs = result.target_logits[wrong].double().exp().sum(1)
        tolerance = 1e-2 if logits.dtype == torch.float16 else 1e-6
        assert bool(((probs - 1).abs() < tolerance).all())


@FUZZ
@given(batch=logit_batches())
@example(batch=EDGES[0])
@example(batch=EDGES[1])
@example(batch=EDGES[2])
@example(batch=EDGES[3])
def test_teacher_statistics_are_finite_and_in_their_documented_ranges(batch):
    logits, _ = batch
    n, c = logits.shape
    stats = teacher_statistics(logits)
    slack = 1e-5
    _finite(*stats.values())
    assert all(v.shape == (n,) for v in stats.values())
    assert bool(
        (stats["teacher_max_prob"] >= 1 / c - slack).all() and (stats["teacher_max_prob"] <= 1 + slack).all()
    )
    assert bool(
        (stats["teacher_entropy"] >= 0).all() and (stats["teacher_entropy"] <= math.log(c) + slack).all()
    )
    assert bool((stats["teacher_margin"] >= -slack).all() and (stats["teacher_margin"] <= 1 + slack).all())
    assert bool((stats["teacher_logit_norm"] >= 0).all())
    weights = stats["omega_teacher"]
    assert bool((weights >= 1 / 1.001 - slack).all() and (weights <= 1 / (1 / c + 1e-3) + slack).all())


@FUZZ
@given(
    batch=logit_batches(),
    gamma=st.floats(0, 4),
    base=st.floats(0.5, 10),
    beta=st.floats(-5, 5),
    low=st.floats(0.05, 2),
    span=st.floats(0, 10),
    reference=st.booleans(),
)
@example(batch=EDGES[1], gamma=2.0, base=4.0, beta=1.0, low=1.0, span=7.0, reference=False)
@example(batch=EDGES[2], gamma=1.0, base=4.0, beta=5.0, low=0.05, span=0.0, reference=True)
def test_dynamic_temperatures_are_finite_and_inside_the_clamp(batch, gamma, base, beta, low, span, reference):
    logits, _ = batch
    student = logits.flip(0)
    high = low + span
    for weights in (
        teacher_statistics(logits)["omega_teacher"],
        cwsm_weights(student),
        flsw_weights(student, logits, gamma),
    ):
        _finite(weights)
        mean = float(weights.double().mean()) if reference else None
        temperature = dynamic_temperature(
            weights,
            base_temperature=base,
            beta=beta,
            min_temperature=low,
            max_temperature=high,
            reference_mean=mean,
        )
        _finite(temperature)
        assert temperature.shape == weights.shape
        assert bool((temperature >= torch.tensor(low, dtype=temperature.dtype)).all())
        assert bool((temperature <= torch.tensor(high, dtype=temperature.dtype)).all())


@FUZZ
@given(
    weights=st.lists(st.floats(-1e30, 1e30), min_size=0, max_size=8),
    low=st.floats(1e-3, 2),
    high=st.floats(2, 20),
)
def test_dynamic_temperature_on_extreme_weights_stays_in_range(weights, low, high):
    temperature = dynamic_temperature(
        torch.tensor(weights, dtype=torch.float32),
        base_temperature=4.0,
        beta=1.0,
        min_temperature=low,
        max_temperature=high,
    )
    _finite(temperature)
    assert bool((temperature >= torch.tensor(low)).all() and (temperature <= torch.tensor(high)).all())


@FUZZ
@given(
    batch=logit_batches(),
    alpha=st.floats(0, 1),
    temperature=st.floats(0.05, 20),
    per_sample=st.booleans(),
    fixed=st.booleans(),
    data=st.data(),
)
def test_the_kd_loss_is_finite_and_non_negative(batch, alpha, temperature, per_sample, fixed, data):
    targets, labels = batch
    n, c = targets.shape
    student = (
        torch.tensor(
            data.draw(
                st.lists(
                    st.floats(
                        -EXTREME[targets.dtype],
                        EXTREME[targets.dtype],
                        width=16 if targets.dtype == torch.float16 else 64,
                    ),
                    min_size=n * c,
                    max_size=n * c,
                )
            ),
            dtype=torch.float64,
        )
        .reshape(n, c)
        .to(targets.dtype)
    )
    assume(bool(torch.isfinite(student).all()))
    tau = torch.full((n,), temperature) if per_sample else temperature
    fixed_target = (
        torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool)
        if fixed
        else torch.zeros(n, dtype=torch.bool)
    )
    student.requires_grad_(True)
    loss = kd_loss(student, targets, labels, alpha=alpha, temperature=tau, fixed_target=fixed_target)
    _finite(loss)
    value = float(loss.detach())
    assert loss.ndim == 0 and value >= -1e-6 * max(1.0, abs(value))
    loss.backward()
    _finite(student.grad)


@pytest.mark.parametrize(
    "call",
    [
        lambda: knowledge_adjustment(torch.tensor([[float("nan"), 1.0]]), torch.tensor([0]), "ps"),
        lambda: knowledge_adjustment(torch.zeros(2, 3), torch.tensor([0, 3]), "lsr"),
        lambda: knowledge_adjustment(torch.zeros(2, 3), torch.tensor([0, 1]), "lsr", epsilon=1.0),
        lambda: knowledge_adjustment(torch.zeros(2, 3), torch.tensor([0, 1]), "bogus"),
        lambda: knowledge_adjustment(torch.zeros(2, 0), torch.zeros(2, dtype=torch.long), "ps"),
        lambda: teacher_statistics(torch.tensor([[1.0, float("inf")]])),
        lambda: teacher_statistics(torch.zeros(3)),
        lambda: teacher_statistics(torch.zeros(2, 3, dtype=torch.long)),
        lambda: dynamic_temperature(
            torch.ones(3), base_temperature=4, beta=1, min_temperature=0, max_temperature=8
        ),
        lambda: dynamic_temperature(
            torch.tensor([1.0, float("nan")]),
            base_temperature=4,
            beta=1,
            min_temperature=1,
            max_temperature=8,
        ),
    ],
)  # the KD loss checks nothing per step: its alpha and temperatures are checked on config load
def test_bad_math_input_raises_the_documented_errors(call):
    with pytest.raises((InvalidLogitsError, ValueError)) as info:
        call()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("edge", range(len(EDGES)))
@pytest.mark.parametrize("temperature", [0.05, 1.0, 20.0])
def test_the_kd_loss_on_edge_logits_is_finite(edge, temperature):
    targets, labels = EDGES[edge]
    for student in (targets, -targets, targets.flip(0)):
        student = student.clone().requires_grad_(True)
        fixed = torch.arange(targets.shape[0]) % 2 == 0
        loss = kd_loss(student, targets, labels, alpha=0.9, temperature=temperature, fixed_target=fixed)
        _finite(loss)
        assert float(loss.detach()) >= 0
        loss.backward()
        _finite(student.grad)

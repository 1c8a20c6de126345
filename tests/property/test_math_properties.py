"""Property tests (hypothesis) for the KA, DTD and KD math (arXiv:1911.07471 §3, DESIGN §4)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stages.adjust import knowledge_adjustment, label_smoothing, probability_shift
from stages.functional import InvalidLogitsError, kd_loss, teacher_is_wrong
from stages.temperature import (
    cwsm_weights,
    dynamic_temperature,
    flsw_weights,
    teacher_statistics,
)

SETTINGS = settings(max_examples=60, deadline=None)
FLOAT16_MAX = float(np.finfo(np.float16).max)
TIE_VALUES = [-2.0, 0.0, 1.0, 3.0]  # drawn often, so ties (including the label) are common
EXTREME_VALUES = [-1e4, 1e4, -FLOAT16_MAX, FLOAT16_MAX, 0.0]
DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}


@st.composite
def logits_and_labels(
    draw, dtypes=("float16", "float32", "float64"), max_classes=8, extreme=False, min_rows=0
):
    """An (N, C) float array (ties and -0.0 likely) and (N,) labels in [0, C)."""
    dtype = DTYPES[draw(st.sampled_from(dtypes))]
    num_rows = draw(st.integers(min_rows, 10))
    num_classes = draw(st.integers(1, max_classes))
    width = {np.float16: 16, np.float32: 32, np.float64: 64}[dtype]
    special = EXTREME_VALUES if extreme else [*TIE_VALUES, -0.0]
    elements = st.one_of(
        st.sampled_from(special),
        st.floats(-50, 50, width=width, allow_nan=False, allow_infinity=False),
    )
    logits = draw(hnp.arrays(dtype, (num_rows, num_classes), elements=elements))
    labels = draw(hnp.arrays(np.int64, (num_rows,), elements=st.integers(0, num_classes - 1)))
    return torch.from_numpy(logits), torch.from_numpy(labels)


def bits(tensor: torch.Tensor) -> np.ndarray:
    """Raw bit patterns, for bit-for-bit comparisons (distinguishes -0.0 from 0.0)."""
    array = tensor.numpy()
    return array.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[array.itemsize])


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors: intra-op threads only add overhead (100x under load on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def np_softmax(x: np.ndarray, temperature: float) -> np.ndarray:
    z = x.astype(np.float64) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


# --- KA ----------------------------------------------------------------------------------------


@SETTINGS
@given(logits_and_labels())
def test_after_ps_the_label_is_a_mode_and_each_row_keeps_its_multiset(case):
    logits, labels = case
    shifted = probability_shift(logits, labels)
    assert shifted.dtype == logits.dtype and shifted.shape == logits.shape
    rows = np.arange(len(labels))
    s, t = shifted.numpy(), logits.numpy()
    if len(labels):
        np.testing.assert_array_equal(s[rows, labels.numpy()], s.max(axis=1))
    np.testing.assert_array_equal(np.sort(bits(shifted), axis=1), np.sort(bits(logits), axis=1))
    right = t[rows, labels.numpy()] >= t.max(axis=1, initial=-np.inf)
    np.testing.assert_array_equal(bits(shifted)[right], bits(logits)[right])
    assert ((bits(shifted) != bits(logits)).sum(axis=1) <= 2).all()


@SETTINGS
@given(logits_and_labels(dtypes=("float64",)), st.floats(0.05, 20.0))
def test_ps_commutes_with_softmax_at_any_temperature(case, temperature):
    logits, labels = case
    t = logits.numpy()
    expected = np_softmax(t, temperature)
    for row, label in enumerate(labels.tolist()):
        predicted = int(np.argmax(t[row]))  # numpy: first max
        if t[row, label] < t[row, predicted]:
            expected[row, [predicted, label]] = expected[row, [label, predicted]]
    got = np_softmax(probability_shift(logits, labels).numpy(), temperature)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-300)


@SETTINGS
@given(logits_and_labels(), st.lists(st.integers(0, 10), max_size=3), st.floats(0.01, 0.99))
def test_ka_on_a_split_of_the_rows_equals_ka_on_the_whole_bit_for_bit(case, cuts, epsilon):
    logits, labels = case
    bounds = [0, *sorted(min(c, len(labels)) for c in cuts), len(labels)]
    pieces = list(itertools.pairwise(bounds))

    whole = probability_shift(logits, labels)
    parts = torch.cat([probability_shift(logits[a:b], labels[a:b]) for a, b in pieces])
    np.testing.assert_array_equal(bits(parts), bits(whole))

    whole_lsr, whole_fixed = label_smoothing(logits, labels, epsilon)
    split = [label_smoothing(logits[a:b], labels[a:b], epsilon) for a, b in pieces]
    np.testing.assert_array_equal(bits(torch.cat([t for t, _ in split])), bits(whole_lsr))
    assert torch.equal(torch.cat([f for _, f in split]), whole_fixed)


@SETTINGS
@given(logits_and_labels(dtypes=("float64",), max_classes=40), st.floats(0.001, 0.999))
def test_lsr_rows_sum_to_one_and_peak_at_the_label(case, epsilon):
    logits, labels = case
    adjusted = knowledge_adjustment(logits, labels, "lsr", epsilon=epsilon)
    fixed = adjusted.fixed_target
    assert torch.equal(fixed, teacher_is_wrong(logits, labels))
    assert torch.equal(adjusted.rewritten, fixed)
    probs = adjusted.target_logits[fixed].exp()
    np.testing.assert_allclose(probs.sum(dim=1).numpy(), 1.0, rtol=0, atol=1e-12)
    if fixed.any():
        rows = torch.arange(len(labels))[fixed]
        assert (
            adjusted.target_logits[rows, labels[fixed]] == adjusted.target_logits[fixed].amax(dim=1)
        ).all()


# --- DTD ---------------------------------------------------------------------------------------


@SETTINGS
@given(
    hnp.arrays(
        st.sampled_from([np.float16, np.float32, np.float64]),
        st.integers(0, 16),
        elements=st.floats(-1e4, 1e4, width=16),
    ),
    st.floats(1e-3, 10.0),
    st.floats(0.0, 10.0),
    st.floats(-100.0, 100.0),
    st.floats(-100.0, 100.0),
    st.none() | st.floats(-1e4, 1e4),
)
def test_dynamic_temperatures_always_lie_in_their_bounds(weights, low, span, base, beta, mean):
    temperatures = dynamic_temperature(
        torch.from_numpy(weights),
        base_temperature=base,
        beta=beta,
        min_temperature=low,
        max_temperature=low + span,
        reference_mean=mean,
    )
    assert temperatures.shape == weights.shape
    bounds = torch.tensor([low, low + span], dtype=temperatures.dtype)  # as rounded to the dtype
    assert (temperatures >= bounds[0]).all() and (temperatures <= bounds[1]).all()
    assert (temperatures > 0).all()


# --- invalid input -----------------------------------------------------------------------------
# (The KD loss is not here: it checks nothing per step; its inputs are checked where they enter.)

LABELLED = {
    "teacher_is_wrong": teacher_is_wrong,
    "probability_shift": probability_shift,
    "label_smoothing": lambda t, y: label_smoothing(t, y, 0.1),
    "ka_ps": lambda t, y: knowledge_adjustment(t, y, "ps"),
    "ka_lsr": lambda t, y: knowledge_adjustment(t, y, "lsr"),
    "ka_none": lambda t, y: knowledge_adjustment(t, y, "none"),
}
UNLABELLED = {
    "flsw_weights": lambda t: flsw_weights(t, torch.ones_like(t), 1.0),
    "cwsm_weights": cwsm_weights,
    "teacher_statistics": teacher_statistics,
}


@SETTINGS
@given(logits_and_labels(min_rows=1), st.data(), st.sampled_from(sorted(LABELLED)))
def test_labels_outside_zero_c_raise_invalid_logits_error(case, data, name):
    logits, labels = case
    num_classes = logits.shape[1]
    row = data.draw(st.integers(0, len(labels) - 1))
    labels[row] = data.draw(st.integers(-1000, -1) | st.integers(num_classes, num_classes + 1000))
    with pytest.raises(InvalidLogitsError, match=f"value {int(labels[row])} at row {row} "):
        LABELLED[name](logits, labels)


@SETTINGS
@given(logits_and_labels(min_rows=1), st.data(), st.sampled_from(sorted(LABELLED) + sorted(UNLABELLED)))
def test_nan_or_inf_logits_raise_invalid_logits_error(case, data, name):
    logits, labels = case
    row = data.draw(st.integers(0, logits.shape[0] - 1))
    col = data.draw(st.integers(0, logits.shape[1] - 1))
    logits[row, col] = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    with pytest.raises(InvalidLogitsError, match="NaN or inf"):
        if name in LABELLED:
            LABELLED[name](logits, labels)
        else:
            UNLABELLED[name](logits)


# --- small C and extreme logits ----------------------------------------------------------------


def run_everything(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> list:
    """Every public function on one batch; returns every float tensor produced."""
    outputs = [
        probability_shift(logits, labels),
        *label_smoothing(logits, labels, 0.1)[:1],
        flsw_weights(logits, logits.flip(0), 0.5),
        cwsm_weights(logits),
        *teacher_statistics(logits).values(),
    ]
    student = logits.to(torch.float32).clone().requires_grad_(True)
    weights = cwsm_weights(student.detach())
    temperatures = dynamic_temperature(
        weights, base_temperature=temperature, beta=1.0, min_temperature=0.05, max_temperature=20.0
    )
    for target in (logits, logits.flip(0)):
        for fixed in (torch.zeros_like(labels, dtype=torch.bool), teacher_is_wrong(logits, labels)):
            loss = kd_loss(student, target, labels, alpha=0.5, temperature=temperatures, fixed_target=fixed)
            (grad,) = torch.autograd.grad(loss, student)
            outputs += [loss, grad]
    return outputs


@pytest.mark.parametrize("num_classes", [1, 2])
def test_one_and_two_classes_work(num_classes):
    logits = torch.tensor([[2.0, -1.0], [-3.0, 4.0], [0.0, 0.0]])[:, :num_classes]
    labels = torch.tensor([0, 0, 1]) % num_classes
    for value in run_everything(logits, labels, 4.0):
        assert torch.isfinite(value).all()
    if num_classes == 1:
        no_fixed = torch.zeros(3, dtype=torch.bool)
        assert (
            kd_loss(logits, logits.flip(0), labels, alpha=0.5, temperature=3.0, fixed_target=no_fixed).item()
            == 0.0
        )
        assert torch.equal(probability_shift(logits, labels), logits)


@SETTINGS
@given(logits_and_labels(dtypes=("float16", "float32"), extreme=True, min_rows=1), st.floats(0.05, 20.0))
def test_extreme_logits_give_finite_results(case, temperature):
    logits, labels = case
    for value in run_everything(logits, labels, temperature):
        assert torch.isfinite(value).all()

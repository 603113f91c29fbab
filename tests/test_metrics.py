"""Fidelity metrics: hand-computable cases, edge cases, and streaming == one shot."""

from __future__ import annotations

import json
import math
import tracemalloc
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgeopt.errors import DataError
from edgeopt.metrics import (
    AccuracyMeter,
    AgreementMeter,
    FidelityMeter,
    Float64Scratch,
    Rate,
    accuracy,
    cosine_similarity,
    json_number,
    looks_like_class_scores,
    max_abs_error,
    sqnr_db,
    top1_agreement,
)


def test_sqnr_of_one_small_error_is_signal_over_noise_energy():
    # signal energy 4, noise energy 0.1^2
    assert sqnr_db([1, 1, 1, 1], [1, 1, 1, 0.9]) == pytest.approx(10 * math.log10(4 / 0.01))


def test_sqnr_of_half_amplitude_is_6_db():
    # r - t = r / 2: noise energy is a quarter of the signal's
    assert sqnr_db([2.0, -4.0], [1.0, -2.0]) == pytest.approx(10 * math.log10(4))


def test_sqnr_without_error_is_infinite():
    assert sqnr_db([1.0, 2.0], [1.0, 2.0]) == math.inf
    assert sqnr_db([0.0, 0.0], [0.0, 0.0]) == math.inf


def test_sqnr_of_error_on_a_zero_signal_is_minus_infinity():
    assert sqnr_db([0.0, 0.0], [0.0, 1.0]) == -math.inf


def test_cosine_hand_cases():
    assert cosine_similarity([1.0, 0.0], [0.0, 1.0]) == pytest.approx(0.0)
    assert cosine_similarity([1.0, 2.0], [2.0, 4.0]) == pytest.approx(1.0)
    assert cosine_similarity([1.0, 2.0], [-1.0, -2.0]) == pytest.approx(-1.0)
    assert cosine_similarity([3.0, 4.0], [4.0, 3.0]) == pytest.approx(24 / 25)


def test_cosine_of_zero_tensors():
    assert cosine_similarity([0.0, 0.0], [0.0, 0.0]) == 1.0
    assert cosine_similarity([0.0, 0.0], [1.0, 0.0]) == 0.0


def test_max_abs_error():
    assert max_abs_error([[1.0, -2.0], [3.0, 0.5]], [[1.5, -2.0], [1.0, 0.5]]) == pytest.approx(2.0)


def test_meter_before_any_update_gives_nan():
    result = FidelityMeter().result()
    assert math.isnan(result.sqnr_db) and math.isnan(result.cosine) and result.elements == 0


def test_meter_refuses_different_shapes_naming_the_tensor():
    meter = FidelityMeter("conv1_out")
    with pytest.raises(DataError, match="conv1_out"):
        meter.update(np.zeros((1, 4)), np.zeros((1, 5)))


def test_meter_counts_elements_and_updates():
    meter = FidelityMeter()
    meter.update(np.ones((2, 3)), np.ones((2, 3)))
    meter.update(np.ones(4), np.ones(4))
    result = meter.result()
    assert (result.elements, result.updates) == (10, 2)


def test_sqnr_accumulates_energies_not_per_batch_db():
    # batch 1: signal 1, noise 0.01; batch 2: signal 100, noise 0.01 -> 10 log10(101 / 0.02)
    meter = FidelityMeter()
    meter.update([1.0], [0.9])
    meter.update([10.0], [9.9])
    assert meter.result().sqnr_db == pytest.approx(10 * math.log10(101 / 0.02))


_arrays = hnp.arrays(np.float32, st.integers(2, 60),
                     elements=st.floats(-100, 100, allow_nan=False, width=32))


@settings(max_examples=60, deadline=None)
@given(reference=_arrays, noise_seed=st.integers(0, 2**32 - 1), cuts=st.lists(st.integers(0, 60), max_size=4))
def test_streaming_equals_one_shot(reference, noise_seed, cuts):
    test = reference + np.random.default_rng(noise_seed).normal(0, 1, reference.shape).astype(np.float32)
    meter = FidelityMeter()
    bounds = [0, *sorted(c % (reference.size + 1) for c in cuts), reference.size]
    for start, stop in zip(bounds, bounds[1:]):
        meter.update(reference[start:stop], test[start:stop])
    streamed = meter.result()
    assert streamed.sqnr_db == pytest.approx(sqnr_db(reference, test), rel=1e-9, abs=1e-9)
    assert streamed.cosine == pytest.approx(cosine_similarity(reference, test), rel=1e-9, abs=1e-12)
    assert streamed.max_abs_error == pytest.approx(max_abs_error(reference, test))


@settings(max_examples=40, deadline=None)
@given(reference=_arrays, factor=st.floats(0.01, 100))
def test_sqnr_and_cosine_do_not_depend_on_scale(reference, factor):
    test = reference * np.float32(0.9) + np.float32(0.01)
    scaled = (reference.astype(np.float64) * factor, test.astype(np.float64) * factor)
    assert sqnr_db(*scaled) == pytest.approx(sqnr_db(reference, test), rel=1e-6, abs=1e-6)
    assert cosine_similarity(*scaled) == pytest.approx(cosine_similarity(reference, test), abs=1e-9)


def test_class_scores_are_two_dimensional_with_several_classes():
    assert looks_like_class_scores((1, 10))
    assert looks_like_class_scores((8, 2))
    assert not looks_like_class_scores((1, 1))
    assert not looks_like_class_scores((1, 3, 8, 8))
    assert not looks_like_class_scores((10,))


def test_top1_agreement_hand_case():
    reference = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    test = np.array([[0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5], [0.9, 0.0, 0.1]])
    assert top1_agreement(reference, test) == pytest.approx(0.5)


def test_agreement_streams_over_batches():
    meter = AgreementMeter("logits")
    meter.update([[1.0, 0.0]], [[2.0, 1.0]])
    meter.update([[0.0, 1.0]], [[1.0, 0.0]])
    assert meter.result() == Rate(matched=1, total=2)
    assert meter.result().value == 0.5


def test_agreement_refuses_different_shapes():
    with pytest.raises(DataError, match="logits"):
        AgreementMeter("logits").update(np.zeros((1, 10)), np.zeros((1, 9)))


def test_accuracy_against_labels():
    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert accuracy(scores, np.array([1, 0, 0])) == pytest.approx(2 / 3)


def test_accuracy_streams_and_accepts_column_labels():
    meter = AccuracyMeter()
    meter.update([[0.0, 1.0, 0.0]], [[1]])
    meter.update([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], [0, 1])
    assert meter.result() == Rate(matched=2, total=3)


def test_accuracy_refuses_float_labels_and_wrong_counts():
    with pytest.raises(DataError, match="integer"):
        accuracy([[0.0, 1.0]], [1.0])
    with pytest.raises(DataError, match="2 labels for 1 rows"):
        accuracy([[0.0, 1.0]], [1, 0])


def test_rate_without_rows_is_nan_and_json_is_strict():
    rate = Rate(matched=0, total=0)
    assert math.isnan(rate.value)
    assert json.dumps(rate.to_dict(), allow_nan=False) == '{"value": "nan", "matched": 0, "total": 0}'


def test_json_number():
    assert json_number(1.5) == 1.5
    assert (json_number(math.inf), json_number(-math.inf), json_number(math.nan)) == ("inf", "-inf", "nan")
    fidelity = FidelityMeter()
    fidelity.update([1.0], [1.0])
    assert json.loads(json.dumps(fidelity.result().to_dict(), allow_nan=False))["sqnr_db"] == "inf"


def test_non_finite_values_give_nan_metrics_not_a_perfect_score():
    """An inf in the float model's output made the cosine 1.0 and the max error 0.0 (min/max drop NaN)."""
    meter = FidelityMeter("y")
    meter.update(np.array([1.0, np.inf, 2.0]), np.array([1.0, 3.0, 2.0]))
    meter.update(np.array([1.0, 2.0]), np.array([1.0, 2.0]))
    result = meter.result()
    assert math.isnan(result.sqnr_db) and math.isnan(result.cosine) and result.max_abs_error == math.inf
    meter.update(np.array([np.nan]), np.array([1.0]))
    assert math.isnan(meter.result().max_abs_error)


def test_a_tensor_holding_minus_inf_in_both_models_warns_nothing():
    """A GPT-style causal mask (triu of -inf) added to the scores: -inf - -inf printed numpy's
    "RuntimeWarning: invalid value encountered in subtract" under every fp16, bf16 and int4 quantize and
    every compare of such a model. The metrics are NaN, as for any inf, without the warning."""
    meter = FidelityMeter("scores")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        meter.update(np.array([[0.5, -np.inf], [0.25, 0.75]], np.float32),
                     np.array([[0.5, -np.inf], [0.25, 0.75]], np.float16))
        result = meter.result()
    assert math.isnan(result.sqnr_db) and math.isnan(result.max_abs_error)


def _tensors(seed: int, sizes) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    pairs = []
    for size in sizes:
        reference = rng.standard_normal(size).astype(np.float32)
        pairs.append((reference, reference + np.float32(0.01) * rng.standard_normal(size).astype(np.float32)))
    return pairs


def test_meters_sharing_a_scratch_give_exactly_the_numbers_of_meters_without_one():
    """Work arrays reused across meters and updates, a larger tensor's values left in them, change no bit."""
    scratch, pairs = Float64Scratch(), _tensors(0, [70_000, 3, 150_000, 1_000, 70_000])
    shared = [FidelityMeter(str(i), scratch=scratch) for i in range(2)]
    alone = [FidelityMeter(str(i)) for i in range(2)]
    for index, (reference, test) in enumerate(pairs * 2):
        shared[index % 2].update(reference, test.astype(np.float64) if index % 3 else test)
        alone[index % 2].update(reference, test.astype(np.float64) if index % 3 else test)
    assert [meter.result() for meter in shared] == [meter.result() for meter in alone]


def test_an_update_with_a_scratch_allocates_no_float64_copy():
    """The comparison's per-update work arrays are reused, not allocated (and page-faulted) anew each time."""
    reference, test = _tensors(1, [250_000])[0]
    meter = FidelityMeter("x", scratch=Float64Scratch())
    meter.update(reference, test)  # the scratch grows to the tensor's size here
    tracemalloc.start()
    try:
        meter.update(reference, test)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < reference.size * 8 // 4  # a float64 copy alone is reference.size * 8 bytes

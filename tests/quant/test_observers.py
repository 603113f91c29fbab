"""Streaming observers and the ranges chosen from them, on distributions with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeopt.quant.observers import HistogramObserver, MinMaxObserver
from edgeopt.quant.range_choosers import entropy_range, expected_mse, mse_range, percentile_range

LEVELS = 256


def _laplace(size: int = 400_000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).laplace(0.0, 1.0, size).astype(np.float32)


def _histogram(*batches: np.ndarray, num_bins: int = 2048):
    observer = HistogramObserver(num_bins=num_bins)
    for batch in batches:
        observer.update(batch)
    return observer.result()


def _quantization_mse(x: np.ndarray, low: float, high: float) -> float:
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / (LEVELS - 1)
    q = np.clip(np.rint((x - low) / scale), 0, LEVELS - 1)
    return float(np.mean((q * scale + low - x.astype(np.float64)) ** 2))


# --------------------------------------------------------------------------
# min/max
# --------------------------------------------------------------------------


def test_minmax_is_the_same_in_one_batch_or_ten():
    x = _laplace(10_000)
    whole, streamed = MinMaxObserver(), MinMaxObserver()
    whole.update(x)
    for batch in np.array_split(x, 10):
        streamed.update(batch)
    assert whole.result() == streamed.result()
    assert whole.result().range == (float(x.min()), float(x.max()))


def test_minmax_skips_non_finite_values_and_starts_empty():
    observer = MinMaxObserver()
    assert observer.result().range == (0.0, 0.0)
    observer.update(np.array([1.0, np.nan, -2.0, np.inf], np.float32))
    assert observer.result().range == (-2.0, 1.0) and observer.result().count == 2


def test_minmax_per_channel():
    observer = MinMaxObserver(axis=1)
    observer.update(np.array([[1.0, -5.0], [3.0, 2.0]]))
    observer.update(np.array([[-1.0, 0.0]]))
    stats = observer.result()
    np.testing.assert_array_equal(stats.min, [-1.0, -5.0])
    np.testing.assert_array_equal(stats.max, [3.0, 2.0])
    assert stats.range == (-5.0, 3.0)


# --------------------------------------------------------------------------
# histogram
# --------------------------------------------------------------------------


def test_histogram_growth_rebins_exactly():
    """Merging bins is exact: the streamed counts equal a direct count on the final grid."""
    rng = np.random.default_rng(1)
    batches = [rng.normal(0, scale, 5000) for scale in (0.1, 1.0, 0.5, 30.0, 2.0)] + [np.array([-400.0])]
    stats = _histogram(*batches)
    values = np.concatenate(batches)
    direct = np.bincount(np.floor(values / stats.width).astype(np.int64) - stats.start, minlength=2048)
    np.testing.assert_array_equal(stats.counts, direct)
    assert (stats.min, stats.max, stats.total) == (values.min(), values.max(), values.size)


def test_histogram_is_deterministic_and_bounded():
    batches = [np.random.default_rng(seed).normal(seed, 1 + seed, 1000) for seed in range(20)]
    first, second = _histogram(*batches), _histogram(*batches)
    np.testing.assert_array_equal(first.counts, second.counts)
    assert (first.width, first.start) == (second.width, second.start)
    assert first.counts.shape == (2048,) and not first.counts.flags.writeable


def test_histogram_always_covers_zero_and_counts_exact_zeros():
    stats = _histogram(np.zeros(10), np.array([3.0, 0.0, 5.0]))
    assert stats.start <= 0 < stats.start + len(stats.counts)
    assert stats.zeros == 11 and stats.total == 13
    assert stats.counts[-stats.start] == 11


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=200))
def test_absolute_folds_the_signed_histogram(values):
    stats = _histogram(np.array(values))
    folded = stats.absolute()
    assert folded.sum() == stats.total
    magnitudes = np.abs(np.array(values))
    assert magnitudes.max() <= len(folded) * stats.width or stats.width == 0.0


# --------------------------------------------------------------------------
# range choosers
# --------------------------------------------------------------------------


def test_percentile_clips_outliers():
    x = np.random.default_rng(2).normal(0, 1, 100_000)
    x[:5] = [80, -60, 50, 70, -90]
    low, high = percentile_range(_histogram(x), 99.99)
    assert -5 < low < -3 and 3 < high < 5
    assert percentile_range(_histogram(x), 100.0) == pytest.approx((-90, 80), abs=0.1)


def test_entropy_and_mse_clip_the_tails_of_laplacian_data():
    x = _laplace()
    stats = _histogram(x)
    minmax_error = _quantization_mse(x, x.min(), x.max())
    absmax = max(-x.min(), x.max())
    for (low, high), gain in ((entropy_range(stats, LEVELS), 0.9), (mse_range(stats, LEVELS), 0.75)):
        assert 0.4 * absmax < max(-low, high) < 0.95 * absmax
        assert low < 0 < high
        assert _quantization_mse(x, low, high) < gain * minmax_error


def test_entropy_threshold_is_symmetric_for_signed_data_and_one_sided_for_relu():
    x = _laplace()
    low, high = entropy_range(_histogram(x), LEVELS)
    assert low == pytest.approx(-high, rel=0.01)
    relu = np.maximum(x, 0)
    for low, _ in (entropy_range(_histogram(relu), LEVELS), mse_range(_histogram(relu), LEVELS),
                   percentile_range(_histogram(relu), 99.9)):
        assert low == 0.0


def test_uniform_data_keeps_nearly_its_whole_range():
    x = np.random.default_rng(3).uniform(-1, 3, 200_000)
    stats = _histogram(x)
    for low, high in (entropy_range(stats, LEVELS), mse_range(stats, LEVELS)):
        assert low == pytest.approx(-1, abs=0.05) and high == pytest.approx(3, abs=0.05)


def test_expected_mse_predicts_the_measured_error():
    x = _laplace(200_000, seed=4)
    stats = _histogram(x)
    for low, high in [(x.min(), x.max()), (-6, 6), (-3, 8), (-1, 1)]:
        predicted = float(expected_mse(stats, low, high, LEVELS))
        assert predicted == pytest.approx(_quantization_mse(x, low, high), rel=0.05)


def test_mse_range_is_no_worse_than_minmax_by_its_own_measure():
    for x in (_laplace(50_000, 5), np.random.default_rng(5).normal(2, 1, 50_000) ** 3):
        stats = _histogram(x)
        best = expected_mse(stats, *mse_range(stats, LEVELS), LEVELS)
        assert best <= expected_mse(stats, x.min(), x.max(), LEVELS)


def test_all_choosers_handle_empty_and_constant_zero_data():
    for stats in (_histogram(), _histogram(np.zeros(100))):
        assert percentile_range(stats, 99.9) == (0.0, 0.0)
        assert entropy_range(stats) == (0.0, 0.0)
        assert mse_range(stats) == (0.0, 0.0)
        assert expected_mse(stats, 0.0, 0.0, LEVELS) == 0.0


def test_entropy_is_fast_on_a_full_histogram():
    import time

    stats = _histogram(np.random.default_rng(6).standard_t(3, 500_000))
    start = time.perf_counter()
    entropy_range(stats, LEVELS)
    mse_range(stats, LEVELS)
    assert time.perf_counter() - start < 0.5


def test_entropy_never_clips_most_of_a_narrow_gate_distribution():
    # An SE gate: hard-sigmoid outputs all within [0.447, 0.571], far from 0. The KL search alone
    # put its threshold at 0.447, clamping every gate to one constant.
    rng = np.random.default_rng(0)
    for gate in (rng.uniform(0.447, 0.571, size=20000), 0.447 + rng.exponential(0.02, size=20000),
                 np.r_[np.full(15000, 0.447), rng.uniform(0.447, 0.571, size=5000)]):
        gate = np.minimum(gate, 0.571).astype(np.float32)
        observer = HistogramObserver(num_bins=2048)
        observer.update(gate)
        lo, hi = entropy_range(observer.result())
        assert np.mean((gate < lo) | (gate > hi)) <= 0.011


def test_a_histogram_of_denormals_gets_a_nonzero_bin_width():
    """A span so small its bin width underflows to 0 (found by hypothesis: one value 5e-324)."""
    observer = HistogramObserver(num_bins=2048)
    observer.update(np.array([5e-324]))
    observer.update(np.array([0.0, 1e-310, -1e-315]))
    result = observer.result()
    assert result.width > 0 and result.total == 4
    assert (result.min, result.max) == (-1e-315, 1e-310)


def _direct_counts(values: np.ndarray, stats) -> np.ndarray:
    """Each finite value binned on its own on the final grid: the counts a histogram must hold."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return np.bincount(np.floor(values / stats.width).astype(np.int64) - stats.start, minlength=len(stats.counts))


def test_histogram_counts_a_batch_of_mostly_zeros_exactly():
    """A batch at least a quarter exact zeros (a ReLU's) adds them to their bin at once, the others
    binned one by one: the same counts as binning every value, -0.0, bin edges and non-finite values
    included."""
    rng = np.random.default_rng(7)
    first = rng.normal(0, 1, 1000).astype(np.float32)  # few zeros: every value binned
    observer = HistogramObserver(num_bins=2048)
    observer.update(first)
    width = observer.result().width
    edges = np.arange(-40, 41) * width
    relu = np.maximum(rng.normal(0, 1, 4000), 0.0)
    relu[:40] = -0.0
    batch = np.concatenate([relu, edges, np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf),
                            [np.inf, -np.inf, np.nan]])
    observer.update(batch)
    observer.update(np.zeros(7, np.float32))
    stats = observer.result()
    values = np.concatenate([first, batch, np.zeros(7)])
    np.testing.assert_array_equal(stats.counts, _direct_counts(values, stats))
    assert stats.zeros == np.count_nonzero(values == 0.0) == 7 + np.count_nonzero(relu == 0.0) + 1
    assert (stats.min, stats.max) == (float(np.nanmin(values[np.isfinite(values)])), float(np.max(batch[:-3])))


def test_histogram_of_a_long_batch_is_the_same_whatever_its_zeros_per_chunk():
    """A batch binned in chunks (some mostly zeros, some without any) counts as binning every value."""
    rng = np.random.default_rng(8)
    signed = rng.normal(0, 1, 150_000).astype(np.float32)
    relu = np.maximum(signed, 0.0)
    batch = np.concatenate([relu[:70_000], signed[70_000:], np.zeros(5_000, np.float32), relu[:30_000]])
    stats = _histogram(batch.reshape(1, -1, 5))
    np.testing.assert_array_equal(stats.counts, _direct_counts(batch, stats))
    assert stats.zeros == np.count_nonzero(batch == 0.0) and stats.total == batch.size

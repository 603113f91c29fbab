"""The vectorized KL threshold search against a plain per-threshold reference.

The reference follows TensorRT's calibration one threshold at a time: P is
the kept bins with the outliers added to the last one, Q the kept bins merged
into ``num_levels`` groups and spread evenly over each group's non-empty
bins, and a last bin with outlier mass but no kept count gets ``q = 1e-4 /
stop``. The candidate thresholds are the module's: a coarse stride over
``[num_levels, size]``, then every bin around the best coarse one; ties go to
the smaller threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest

from edgeopt.quant.range_choosers import _entropy_threshold_bins, _KlDivergence

HISTOGRAMS_PER_FAMILY = 80


def _reference_divergence(counts: np.ndarray, stop: int, num_levels: int) -> float:
    counts = counts.astype(np.float64)
    total, kept = counts.sum(), counts[:stop]
    kept_mass = kept.sum()
    if kept_mass == 0:
        return np.inf
    p = kept.copy()
    p[-1] += total - kept_mass
    p /= total
    group = np.arange(stop) * num_levels // stop
    group_mass = np.bincount(group, weights=kept, minlength=num_levels)
    group_filled = np.bincount(group, weights=kept > 0, minlength=num_levels)
    q = np.where(kept > 0, group_mass[group] / np.maximum(group_filled[group], 1), 0.0) / kept_mass
    if kept[-1] == 0:
        q[-1] = 1e-4 / stop
    present = p > 0
    return float(np.sum(p[present] * np.log(p[present] / q[present])))


def _first_minimum(stops, divergence: Callable[[int], float]) -> int:
    best, best_divergence = None, np.inf
    for stop in stops:
        value = divergence(stop)
        if best is None or value < best_divergence:
            best, best_divergence = stop, value
    return best


def _reference_threshold_bins(counts: np.ndarray, num_levels: int) -> int:
    nonzero = np.flatnonzero(counts)
    size = int(nonzero[-1]) + 1 if nonzero.size else 0
    if size <= num_levels:
        return max(size, 1)

    def divergence(stop: int) -> float:
        return _reference_divergence(counts, stop, num_levels)

    stride = max(1, (size - num_levels) // 128)
    coarse = list(range(num_levels, size + 1, stride))
    if coarse[-1] != size:
        coarse.append(size)
    best = _first_minimum(coarse, divergence)
    return _first_minimum(range(max(num_levels, best - stride + 1), min(size, best + stride - 1) + 1), divergence)


# --------------------------------------------------------------------------
# seeded histograms
# --------------------------------------------------------------------------


def _size(rng: np.random.Generator, num_levels: int) -> int:
    """Near ``num_levels`` (below, at, just past) or well past it (coarse stride > 1 from 384 bins on)."""
    if rng.random() < 0.5:
        return int(num_levels + rng.integers(-3, 12))
    return int(rng.integers(num_levels + 12, max(num_levels * 8, 2048) + 1))


def _binned(values: np.ndarray, size: int) -> np.ndarray:
    """Counts of ``|values|`` on ``size`` bins up to the largest (the last bin is never empty)."""
    magnitude = np.abs(values)
    index = np.minimum((magnitude / magnitude.max() * size).astype(np.int64), size - 1)
    return np.bincount(index, minlength=size)


def _mixture(rng, size):
    parts = [rng.normal(rng.uniform(-2, 2), rng.uniform(0.1, 1.5), rng.integers(200, 5000)) for _ in range(3)]
    return _binned(np.concatenate(parts), size)


def _laplacian_with_outliers(rng, size):
    values = rng.laplace(0.0, rng.uniform(0.2, 2.0), rng.integers(500, 20000))
    outliers = rng.uniform(5, 40, rng.integers(0, 4)) * rng.choice([-1, 1])
    return _binned(np.concatenate([values, outliers]), size)


def _relu_like(rng, size):
    values = np.maximum(rng.normal(rng.uniform(-1, 1), 1.0, rng.integers(300, 10000)), 0.0)
    return _binned(values[values > 0], size)  # exact zeros are taken out before the search


def _sparse(rng, size):
    counts = rng.poisson(rng.uniform(0.5, 50), size) * (rng.random(size) < rng.uniform(0.02, 0.3))
    counts[-1] = max(counts[-1], 1)
    return counts.astype(np.int64)


FAMILIES = {"mixture": _mixture, "laplacian": _laplacian_with_outliers, "relu": _relu_like, "sparse": _sparse}


def _histograms(family: str) -> Iterator[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(sorted(FAMILIES).index(family))
    for _ in range(HISTOGRAMS_PER_FAMILY):
        num_levels = int(rng.choice([8, 16, 128, 256]))
        yield FAMILIES[family](rng, _size(rng, num_levels)), num_levels


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_vectorized_threshold_equals_the_per_threshold_reference(family):
    for counts, num_levels in _histograms(family):
        assert _entropy_threshold_bins(counts, num_levels) == _reference_threshold_bins(counts, num_levels), (
            len(counts), num_levels)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_vectorized_divergences_equal_the_reference_at_every_threshold(family):
    for counts, num_levels in list(_histograms(family))[:10]:
        stops = np.arange(num_levels, len(counts) + 1)
        if not stops.size:
            continue
        expected = [_reference_divergence(counts, int(stop), num_levels) for stop in stops]
        np.testing.assert_allclose(_KlDivergence(counts, num_levels)(stops), expected, rtol=1e-9, atol=1e-12)


def test_a_last_kept_bin_without_counts_gets_the_smoothed_q():
    # 4 levels, stop 6: bin 5 is empty but receives the outlier mass of bins 6 and 7.
    counts = np.array([5, 3, 0, 2, 4, 0, 1, 1])
    expected = _reference_divergence(counts, 6, 4)
    assert np.isfinite(expected)
    np.testing.assert_allclose(_KlDivergence(counts, 4)(np.array([6])), [expected], rtol=1e-12)

"""Ranges chosen from a histogram of a tensor (:class:`~edgeopt.quant.observers.HistogramStats`).

``lo <= 0 <= hi`` is not required of them; the qparams step widens to include 0.

* :func:`percentile_range`: drop ``(100 - p)%`` of the mass at each end;
* :func:`entropy_range`: TensorRT's calibration -- the clipping threshold
  ``t`` that minimizes KL(P || Q), P the histogram clipped at ``t`` (outliers
  added to the last bin), Q the same histogram merged into the format's
  levels and expanded back. One-sided for non-negative tensors, on ``|x|``
  (a symmetric threshold) otherwise; a threshold that clips more than
  ``MAX_CLIPPED_FRACTION`` of the mass falls back to a percentile range;
* :func:`mse_range`: the range ``c * [min, max]`` minimizing the expected
  squared error :func:`expected_mse` = rounding noise ``scale**2 / 12`` on the
  mass inside plus the squared clipping distance of the mass outside.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from edgeopt.quant.observers import HistogramStats

__all__ = [
    "entropy_range",
    "expected_mse",
    "mse_range",
    "percentile_range",
]


def percentile_range(hist: HistogramStats, percentile: float) -> tuple[float, float]:
    """The range keeping the central ``percentile`` % of each tail: ``[P(100-p), P(p)]``."""
    total = hist.total
    if total == 0 or hist.width == 0.0:
        return hist.min, hist.max
    cumulative = np.cumsum(hist.counts)
    tail = total * (100.0 - percentile) / 100.0
    low_bin = int(np.searchsorted(cumulative, tail, side="right"))
    high_bin = int(np.searchsorted(cumulative, total - tail, side="left"))
    edges = hist.edges
    lo = max(float(edges[min(low_bin, len(hist.counts) - 1)]), hist.min)
    hi = min(float(edges[min(high_bin, len(hist.counts) - 1) + 1]), hist.max)
    return min(lo, hi), max(lo, hi)


class _KlDivergence:
    """KL(P || Q) of clipping ``counts`` at bin ``s`` (TensorRT's calibration), for many ``s`` at once.

    For a threshold at bin ``s`` (``s >= num_levels``): P is ``counts[:s]``
    with the outliers ``counts[s:]`` added to bin ``s - 1``, over the total
    ``T``. Q merges bins ``[0, s)`` into ``L = num_levels`` groups (bin ``i``
    in group ``i * L // s``, so group ``g`` spans bins ``[ceil(g s / L),
    ceil((g + 1) s / L))``) and spreads each group's sum ``G_g`` evenly over
    its ``n_g`` non-empty bins, over the kept mass ``K``: ``q_i = m_g / K``,
    ``m_g = G_g / n_g``, on non-empty bins, 0 elsewhere. Bin ``s - 1`` with
    outlier mass in P but none in Q gets ``q = 1e-4 / s`` instead of infinite
    divergence, as TensorRT smooths; no kept mass (K = 0) is infinitely
    divergent.

    Over the bins before ``s - 1`` (where ``p_i = c_i / T``) the divergence is
    ``(sum c_i log c_i - sum_g G'_g log m_g + C log(K / T)) / T``, ``G'`` the
    group sums without bin ``s - 1`` and ``C`` their total, so prefix sums of
    ``c``, ``c log c`` and of the non-empty bins (built once) give each
    threshold's divergence in O(L) without touching the bins again.
    """

    def __init__(self, counts: np.ndarray, num_levels: int) -> None:
        self.counts, self.num_levels = np.asarray(counts, dtype=np.int64), num_levels
        self.mass = np.concatenate([[0], np.cumsum(self.counts)])
        # the prefix sums the groups read, as float64 (integers below 2**53: exact), so that their
        # differences and quotients are float arithmetic, not integer-to-float conversions
        self.mass_float = self.mass.astype(np.float64)
        self.filled = np.concatenate([[0.0], np.cumsum(self.counts > 0, dtype=np.float64)])
        self.information = np.concatenate([[0.0], np.cumsum(self.counts * np.log(np.maximum(self.counts, 1)))])
        # ceil(g s / L) by a shift when L is a power of two (int8's 128 and 256 levels): what the division gives
        self._shift = num_levels.bit_length() - 1 if num_levels & (num_levels - 1) == 0 else None

    def __call__(self, stops: np.ndarray) -> np.ndarray:
        rows = max(1, _KL_CHUNK_ELEMENTS // self.num_levels)  # candidates x levels matrices stay small
        return np.concatenate([self._divergences(stops[i:i + rows]) for i in range(0, len(stops), rows)])

    def _divergences(self, stops: np.ndarray) -> np.ndarray:
        mass, levels = self.mass, self.num_levels
        total = float(mass[-1])
        bounds = np.arange(levels + 1) * stops[:, None] + (levels - 1)
        bounds = bounds >> self._shift if self._shift is not None else bounds // levels  # ceil(g s / L)
        group_mass = np.diff(self.mass_float[bounds], axis=1)
        level = group_mass / np.maximum(np.diff(self.filled[bounds], axis=1), 1.0)  # m_g
        # log m_g of the empty groups is never used (times G_g = 0; bin s - 1 is in an empty group only when it
        # is empty): any finite number does, and a plain log is 5x faster than one masked by where=
        log_level = np.log(np.maximum(level, np.finfo(np.float64).tiny))
        last = self.counts[stops - 1]
        weighted = (group_mass * log_level).sum(axis=1) - last * log_level[:, -1]  # sum_g G'_g log m_g
        kept = mass[stops]
        reference = (last + (total - kept)) / total  # P of bin s - 1: its count plus the outliers
        with np.errstate(divide="ignore", invalid="ignore"):  # K = 0 (log 0): infinite, set below
            before = (self.information[stops - 1] - weighted + mass[stops - 1] * np.log(kept / total)) / total
            smoothed = np.where(last > 0, level[:, -1] / np.maximum(kept, 1), 1e-4 / stops)
            tail = reference * np.log(np.where(reference > 0, reference / smoothed, 1.0))
        return np.where(kept > 0, before + tail, np.inf)


_KL_CHUNK_ELEMENTS = 1 << 13


def _entropy_threshold_bins(counts: np.ndarray, num_levels: int) -> int:
    """Number of leading bins whose clipping minimizes KL; coarse stride then refine.

    Equal divergences go to the smaller threshold (``argmin`` takes the first).
    """
    nonzero = np.flatnonzero(counts)
    size = int(nonzero[-1]) + 1 if nonzero.size else 0
    if size <= num_levels:
        return max(size, 1)
    divergence = _KlDivergence(counts, num_levels)
    stride = max(1, (size - num_levels) // 128)
    coarse = np.arange(num_levels, size + 1, stride)
    if coarse[-1] != size:
        coarse = np.append(coarse, size)
    best = int(coarse[np.argmin(divergence(coarse))])
    fine = np.arange(max(num_levels, best - stride + 1), min(size, best + stride - 1) + 1)
    return int(fine[np.argmin(divergence(fine))])


def entropy_range(hist: HistogramStats, num_quant_bins: int = 256) -> tuple[float, float]:
    """KL-divergence threshold (TensorRT): one-sided if min >= 0, else symmetric on ``|x|``.

    ``num_quant_bins`` is the number of levels of the format over the full
    range (256 for 8 bits); a symmetric threshold gives half of them to ``|x|``.
    """
    if hist.total == 0 or hist.width == 0.0:
        return hist.min, hist.max
    # Exact zeros quantize exactly whatever the threshold: leaving them out
    # keeps a ReLU's spike at 0 from dominating P.
    counts = hist.counts.copy()
    counts[-hist.start] -= hist.zeros
    hist = dataclasses.replace(hist, counts=counts, zeros=0)
    if hist.min >= 0.0:  # the grid starts at or below 0: bins from index -start on are [0, ...)
        stop = _entropy_threshold_bins(hist.counts[-hist.start:], num_quant_bins)
        chosen = hist.min, min(stop * hist.width, hist.max)
    else:
        stop = _entropy_threshold_bins(hist.absolute(), num_quant_bins // 2)
        threshold = stop * hist.width
        chosen = max(-threshold, hist.min), min(threshold, hist.max)
    return _limit_clipping(hist, chosen)


# The KL search assumes mass concentrated near 0; on a narrow distribution far from 0 (an SE gate
# living in [0.45, 0.57]) it can put the threshold below nearly all the data. A range may clip at
# most this fraction of the calibration values; past that the percentile range replaces it.
MAX_CLIPPED_FRACTION = 0.01
_FALLBACK_PERCENTILE = 99.99


def clipped_fraction(hist: HistogramStats, lo: float, hi: float) -> float:
    """Fraction of the histogram's mass in bins lying wholly outside ``[lo, hi]``."""
    if hist.total == 0:
        return 0.0
    edges = hist.edges
    outside = hist.counts[(edges[1:] < lo) | (edges[:-1] > hi)].sum()
    return float(outside) / float(hist.total)


def _limit_clipping(hist: HistogramStats, chosen: tuple[float, float]) -> tuple[float, float]:
    if clipped_fraction(hist, *chosen) <= MAX_CLIPPED_FRACTION:
        return chosen
    return percentile_range(hist, _FALLBACK_PERCENTILE)


def expected_mse(hist: HistogramStats, lo, hi, num_levels: int) -> np.ndarray:
    """Estimated mean squared quantization error of ranges ``[lo, hi]`` (vectorized over ranges).

    In-range mass contributes the rounding noise ``scale**2 / 12`` (except
    exact zeros, which quantize exactly); mass outside contributes its squared
    distance to the nearest bound (bin centers, plus the in-bin variance
    ``width**2 / 12``). Prefix sums of the counts and their first and second
    moments make each range O(log bins).
    """
    return _MseEstimate(hist)(lo, hi, num_levels)


class _MseEstimate:
    """:func:`expected_mse` on one histogram, its prefix sums built once for the many ranges of a search."""

    def __init__(self, hist: HistogramStats) -> None:
        self.hist, self.total, self.centers = hist, hist.total, hist.centers
        counts = hist.counts.astype(np.float64)
        self.moments = [np.concatenate([[0.0], np.cumsum(counts * self.centers**power)]) for power in range(3)]

    def __call__(self, lo, hi, num_levels: int) -> np.ndarray:
        hist, total, centers = self.hist, self.total, self.centers
        lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
        hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
        lo, hi = np.broadcast_arrays(lo, hi)
        if total == 0 or hist.width == 0.0:
            return np.zeros(lo.shape)
        below = np.searchsorted(centers, lo, side="left")  # bins [0, below) lie under lo
        above = np.searchsorted(centers, hi, side="right")  # bins [above, n) lie over hi

        def clipped(bound, start, stop):  # sum of count * (center - bound)**2 + in-bin variance
            mass, first, second = (m[stop] - m[start] for m in self.moments)
            return second - 2.0 * bound * first + bound**2 * mass + mass * hist.width**2 / 12.0, mass

        low_error, low_mass = clipped(lo, 0, below)
        high_error, high_mass = clipped(hi, above, len(centers))
        noisy_mass = np.maximum(total - low_mass - high_mass - hist.zeros, 0.0)
        scale = (hi - lo) / (num_levels - 1)
        error = np.maximum(low_error, 0.0) + np.maximum(high_error, 0.0) + noisy_mass * scale**2 / 12.0
        return error / total


def mse_range(hist: HistogramStats, num_levels: int = 256, num_candidates: int = 200) -> tuple[float, float]:
    """The range ``[a * min, b * max]``, a, b on a grid in (0, 1], of least :func:`expected_mse`.

    Starts from the best proportional range (a = b), then improves each
    bound with the other fixed (coordinate descent, a few rounds).
    """
    if hist.total == 0 or hist.width == 0.0:
        return hist.min, hist.max
    lowest, highest = min(hist.min, 0.0), max(hist.max, 0.0)
    fractions = np.arange(1, num_candidates + 1, dtype=np.float64) / num_candidates
    error = _MseEstimate(hist)
    best = fractions[int(np.argmin(error(fractions * lowest, fractions * highest, num_levels)))]
    lo, hi = best * lowest, best * highest
    for _ in range(3):
        # argmin takes the first (smallest) of equal errors: deterministic.
        hi = highest * fractions[int(np.argmin(error(lo, fractions * highest, num_levels)))]
        lo = lowest * fractions[int(np.argmin(error(fractions * lowest, hi, num_levels)))]
    return max(float(lo), hist.min), min(float(hi), hist.max)

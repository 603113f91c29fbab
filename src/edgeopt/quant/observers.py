"""Streaming statistics of a tensor: running min/max and a histogram.

Observers follow the estimator discipline: the constructor stores settings,
``update(array)`` streams one batch in (and keeps nothing of it), ``result()``
returns a frozen value. Memory is fixed by the settings, never by the data.

``HistogramObserver`` counts values on a grid anchored at zero: bin ``g``
covers ``[g * width, (g + 1) * width)`` and the histogram holds ``num_bins``
consecutive bins starting at ``start``. When a batch falls outside, the
width doubles (pairs of bins merge exactly: ``g -> floor(g / 2)``) until the
union fits, so the result depends only on the sequence of batches. The
covered range always includes 0, and folding the negative bins onto the
positive ones gives the histogram of ``|x|`` exactly.

The ranges chosen from these statistics (percentile, KL entropy, MSE) are in
:mod:`edgeopt.quant.range_choosers`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np

__all__ = [
    "HistogramObserver",
    "HistogramStats",
    "MinMaxObserver",
    "MinMaxStats",
]


def _finite_values(array) -> np.ndarray:
    values = np.asarray(array, dtype=np.float64).reshape(-1)
    if values.size and not np.isfinite(values).all():
        values = values[np.isfinite(values)]
    return values


@dataclass(frozen=True, kw_only=True)
class MinMaxStats:
    """Smallest and largest value seen (per channel along ``axis`` when set), and how many."""

    min: float | np.ndarray
    max: float | np.ndarray
    count: int
    axis: int | None = None

    @property
    def range(self) -> tuple[float, float]:
        return float(np.min(self.min)), float(np.max(self.max))


class MinMaxObserver:
    """Running min and max of a tensor, over all values or per slice along ``axis``."""

    def __init__(self, *, axis: int | None = None) -> None:
        self.axis = axis
        self._min: float | np.ndarray = math.inf
        self._max: float | np.ndarray = -math.inf
        self._count = 0

    def update(self, array) -> None:
        array = np.asarray(array)
        if self.axis is None:
            self._update_all(array)
            return
        moved = np.moveaxis(np.asarray(array, dtype=np.float64), self.axis, 0).reshape(array.shape[self.axis], -1)
        finite = np.isfinite(moved)
        self._min = np.minimum(self._min, np.where(finite, moved, np.inf).min(axis=1, initial=np.inf))
        self._max = np.maximum(self._max, np.where(finite, moved, -np.inf).max(axis=1, initial=-np.inf))
        self._count += int(finite.sum())

    def update_range(self, low: float, high: float, count: int) -> None:
        """Fold in a batch already reduced to its min and max (e.g. inside ONNX Runtime)."""
        if self.axis is not None:
            raise ValueError("update_range is for per-tensor observers (axis=None)")
        if math.isfinite(low) and math.isfinite(high):
            self._min, self._max = min(self._min, low), max(self._max, high)
            self._count += count

    def _update_all(self, array: np.ndarray) -> None:
        if not array.size:
            return
        low, high = float(array.min()), float(array.max())
        count = array.size
        if not (math.isfinite(low) and math.isfinite(high)):  # rare: pay for a filtered copy
            values = _finite_values(array)
            if not values.size:
                return
            low, high, count = float(values.min()), float(values.max()), values.size
        self._min, self._max = min(self._min, low), max(self._max, high)
        self._count += int(count)

    def result(self) -> MinMaxStats:
        if self.axis is None:
            minimum = self._min if self._count else 0.0
            maximum = self._max if self._count else 0.0
            return MinMaxStats(min=minimum, max=maximum, count=self._count)
        minimum, maximum = np.array(self._min, dtype=np.float64), np.array(self._max, dtype=np.float64)
        minimum[~np.isfinite(minimum)] = 0.0
        maximum[~np.isfinite(maximum)] = 0.0
        minimum.setflags(write=False)
        maximum.setflags(write=False)
        return MinMaxStats(min=minimum, max=maximum, count=self._count, axis=self.axis)


@dataclass(frozen=True, kw_only=True)
class HistogramStats:
    """Counts on ``num_bins`` bins of equal ``width``; bin ``i`` covers
    ``[(start + i) * width, (start + i + 1) * width)``. ``min``/``max`` are the
    exact extremes seen, ``zeros`` the number of exact zeros (also counted in
    their bin). ``counts`` is read-only."""

    counts: np.ndarray
    width: float
    start: int
    min: float
    max: float
    zeros: int = 0

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def edges(self) -> np.ndarray:
        return (self.start + np.arange(len(self.counts) + 1)) * self.width

    @property
    def centers(self) -> np.ndarray:
        return (self.start + np.arange(len(self.counts)) + 0.5) * self.width

    def absolute(self) -> np.ndarray:
        """Counts of ``|x|`` on bins ``[j * width, (j + 1) * width)``, j >= 0 (exact fold)."""
        size = max(self.start + len(self.counts), -self.start, 0)
        folded = np.zeros(size, dtype=np.int64)
        index = self.start + np.arange(len(self.counts))
        positive = index >= 0
        # Each side maps its bins to distinct |x| bins, so plain fancy-index adds are exact.
        folded[index[positive]] += self.counts[positive]
        folded[-index[~positive] - 1] += self.counts[~positive]
        return folded


_TWO_52 = float(2**52)
_TWO_52_BITS = int(np.array(_TWO_52).view(np.int64))
_ZEROS_APART_FRACTION = 4  # a chunk at least 1/4 exact zeros counts them apart from the other values
# Values binned at a time. The temporaries of a chunk (its float64 bin indices: 512 KiB) stay under
# glibc's mmap threshold (edgeopt.runtime.memory pins it at 1 MiB), so they reuse heap memory; a
# whole 224x224 activation's would be mapped afresh and page-faulted in at every batch (half the
# time of a histogram update).
_CHUNK_VALUES = 1 << 16


class HistogramObserver:
    """Streaming histogram on a zero-anchored grid whose bin width doubles as the range grows."""

    def __init__(self, *, num_bins: int = 2048) -> None:
        if num_bins < 16 or num_bins % 2:
            raise ValueError("num_bins must be an even number >= 16")
        self.num_bins = num_bins
        self._counts: np.ndarray | None = None
        self._width = 0.0
        self._start = 0
        self._pending_zeros = 0  # zeros seen before any non-zero value fixed the grid
        self._zeros = 0
        self._min = math.inf
        self._max = -math.inf

    def update(self, array, samples: int = 1) -> None:
        """Count ``array``: ``samples`` samples stacked along axis 0 (several run as one batch).

        The bin grid is set by the first sample holding a non-zero value and only ever doubles, so
        the samples are taken one by one until it is set: the histogram is then the same however
        the samples were grouped into runs.
        """
        array = np.asarray(array)
        if self._counts is None and samples > 1 and array.ndim and array.shape[0] % samples == 0:
            rows = array.shape[0] // samples
            for start in range(0, array.shape[0], rows):
                self._update(array[start:start + rows])
                if self._counts is not None:
                    if start + rows < array.shape[0]:
                        self._update(array[start + rows:])
                    return
            return
        self._update(array)

    def _update(self, array: np.ndarray) -> None:
        values = array.reshape(-1)
        if values.dtype != np.float32:
            values = values.astype(np.float64)
        if not values.size:
            return
        lo, hi = float(values.min()), float(values.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):  # rare: pay for a filtered copy
            values = values[np.isfinite(values)]
            if not values.size:
                return
            lo, hi = float(values.min()), float(values.max())
        self._min, self._max = min(self._min, lo), max(self._max, hi)
        if self._counts is None:
            if lo == 0.0 and hi == 0.0:
                self._zeros += values.size
                self._pending_zeros += values.size
                return
            self._init_grid(lo, hi)
        self._cover(lo, hi)
        has_zeros = lo <= 0.0 <= hi
        for start in range(0, values.size, _CHUNK_VALUES):
            self._count(values[start:start + _CHUNK_VALUES], has_zeros)

    def _count(self, values: np.ndarray, has_zeros: bool) -> None:
        """Add ``values`` (all on the grid) to the counts, and their exact zeros to ``zeros``."""
        if has_zeros:
            nonzero = values != 0.0
            zeros = values.size - int(np.count_nonzero(nonzero))
            self._zeros += zeros
            if zeros * _ZEROS_APART_FRACTION >= values.size:
                # a ReLU's zeros (half its values) go to their bin in one add: binning each one costs
                # more than copying the others out (and consecutive equal bins slow bincount most)
                values = np.compress(nonzero, values)
                self._counts[-self._start] += zeros
        self._counts += np.bincount(self._bin_index(values), minlength=self.num_bins)

    def _bin_index(self, values: np.ndarray) -> np.ndarray:
        """``floor(x / width) - start`` as int64, divided in float64 whatever the input type.

        The float-to-integer step reads bits instead of converting (3x faster):
        for an integer ``n`` in ``[0, 2**52)``, ``2**52 + n`` is exact in float64
        and its bit pattern is that of ``2**52`` plus ``n``. The index is in
        ``[0, num_bins)`` because :meth:`_cover` made the grid hold ``[lo, hi]``.
        """
        index = np.divide(values, self._width, dtype=np.float64)  # float32 widens exactly, in the same pass
        np.floor(index, out=index)
        index += _TWO_52 - self._start
        bits = index.view(np.int64)
        bits -= _TWO_52_BITS
        return bits

    def _init_grid(self, lo: float, hi: float) -> None:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        # n - 2 bins' worth of width leaves a bin of slack, so [lo, hi] fits the
        # zero-anchored grid whatever the offset of lo within its bin and the
        # rounding of lo / width.
        # (a span of denormals would divide to a zero width: the smallest normal float keeps it > 0)
        self._width = max((hi - lo) / (self.num_bins - 2), sys.float_info.min)
        self._start = math.floor(lo / self._width)
        self._counts = np.zeros(self.num_bins, dtype=np.int64)
        self._counts[-self._start] += self._pending_zeros
        self._pending_zeros = 0

    def _cover(self, lo: float, hi: float) -> None:
        low_index, high_index = math.floor(lo / self._width), math.floor(hi / self._width)
        if self._start <= low_index and high_index < self._start + self.num_bins:
            return
        # The span that must fit: the occupied bins, the new values and 0.
        occupied = np.flatnonzero(self._counts) + self._start
        first = min(low_index, int(occupied[0]) if occupied.size else 0, 0)
        stop = max(high_index, int(occupied[-1]) if occupied.size else 0, 0) + 1
        shift = 0
        while stop - first > self.num_bins:
            shift += 1
            first, stop = first // 2, (stop - 1) // 2 + 1
        counts = np.zeros(self.num_bins, dtype=np.int64)
        np.add.at(counts, (occupied >> shift) - first, self._counts[occupied - self._start])
        self._counts, self._start, self._width = counts, first, self._width * 2**shift

    def minmax(self) -> MinMaxStats:
        """Min and max of the finite values seen: what a :class:`MinMaxObserver` fed the same
        batches returns, without a second pass over each batch."""
        count = self._pending_zeros + (int(self._counts.sum()) if self._counts is not None else 0)
        if not count:
            return MinMaxStats(min=0.0, max=0.0, count=0)
        return MinMaxStats(min=self._min, max=self._max, count=count)

    def result(self) -> HistogramStats:
        if self._counts is None:  # nothing or only zeros seen: one bin around 0
            counts = np.zeros(self.num_bins, dtype=np.int64)
            counts[0] = self._pending_zeros
            counts.setflags(write=False)
            return HistogramStats(counts=counts, width=0.0, start=0, min=0.0, max=0.0, zeros=self._zeros)
        counts = self._counts.copy()
        counts.setflags(write=False)
        return HistogramStats(counts=counts, width=self._width, start=self._start, min=self._min, max=self._max,
                              zeros=self._zeros)

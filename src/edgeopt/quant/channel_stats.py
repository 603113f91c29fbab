"""Per-channel statistics of activations, streamed through the calibration pass.

Three accuracy tools need one number per channel of some tensors, summed or
maximised over every calibration sample: bias correction the channel means of
each layer's input (:class:`ChannelMeanHook`), SmoothQuant the channel maxima
of ``|x|`` (:class:`ChannelAbsMaxHook`), int4's clipping search the channel
mean squares and means (:class:`ChannelMomentsHook`), and int4's GPTQ the whole
correlation ``E[x x^T]`` of the channels with them (:class:`InputCorrelationHook`:
``K x K`` float64 sums per tensor). Each is an observer per tensor
behind one hook (:class:`ChannelStatsHook`): the calibration pass hands it
every batch, it finds each tensor among the fetched outputs (graph inputs: in
the feed) and skips what is absent or not float. Non-finite values are left
out of every statistic. Sums and maxima do not depend on how samples are
batched, so the hooks are ``groupable``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np

from edgeopt.quant.gptq import gptq_factor
from edgeopt.runtime.range_session import CHANNEL_MEAN_SUFFIXES

__all__ = [
    "ChannelAbsMax",
    "ChannelAbsMaxHook",
    "ChannelAbsMaxObserver",
    "ChannelMeanHook",
    "ChannelMeanObserver",
    "ChannelMeans",
    "ChannelMomentsHook",
    "ChannelMomentsObserver",
    "ChannelStatsHook",
    "InputCorrelationHook",
    "LayerInputStatistics",
]


def _readonly(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


# --------------------------------------------------------------------------
# observers: one tensor each
# --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ChannelAbsMax:
    """Largest ``|x|`` of each channel (float64, read-only), over ``count`` batches."""

    abs_max: np.ndarray
    count: int


class ChannelAbsMaxObserver:
    """Running ``max |x|`` of each slice along ``axis`` (non-finite values are left out)."""

    def __init__(self, *, axis: int = -1) -> None:
        self.axis = axis
        self._abs_max: np.ndarray | None = None
        self._count = 0

    def update(self, array) -> None:
        array = np.abs(np.asarray(array, dtype=np.float64))
        rows = np.moveaxis(array, self.axis, 0).reshape(array.shape[self.axis], -1)
        batch_max = np.where(np.isfinite(rows), rows, 0.0).max(axis=1, initial=0.0)
        self._abs_max = batch_max if self._abs_max is None else np.maximum(self._abs_max, batch_max)
        self._count += 1

    def result(self) -> ChannelAbsMax:
        abs_max = np.zeros(0) if self._abs_max is None else self._abs_max.copy()
        return ChannelAbsMax(abs_max=_readonly(abs_max), count=self._count)


@dataclass(frozen=True, kw_only=True)
class ChannelMeans:
    """Mean of each channel (float64, read-only) and how many finite values it averages."""

    mean: np.ndarray
    count: np.ndarray


class ChannelMeanObserver:
    """Running mean of each slice along ``axis`` (non-finite values are left out)."""

    def __init__(self, *, axis: int = 1) -> None:
        self.axis = axis
        self._sum: np.ndarray | None = None
        self._count: np.ndarray | None = None

    def update(self, array) -> None:
        array = np.asarray(array)
        axis = self.axis % array.ndim
        others = tuple(a for a in range(array.ndim) if a != axis)
        total = array.sum(axis=others, dtype=np.float64)
        # A float32/float64 sum in float64 cannot overflow, so finite sums mean finite values: the
        # masked pass below is only paid for a batch with NaN or infinity in it.
        if np.isfinite(total).all():
            count = np.full(array.shape[axis], array.size // max(array.shape[axis], 1), dtype=np.int64)
        else:
            finite = np.isfinite(array)
            total = np.where(finite, array, 0.0).sum(axis=others, dtype=np.float64)
            count = finite.sum(axis=others)
        self._add(total, count)

    def update_mean(self, mean: np.ndarray, count: int | np.ndarray) -> None:
        """Fold in a batch already reduced to its channel means over ``count`` values each (channels
        whose mean is not finite, from a NaN or infinity in the batch, are left out of it)."""
        mean = np.asarray(mean, dtype=np.float64).reshape(-1)
        finite = np.isfinite(mean)
        self._add(np.where(finite, mean * count, 0.0), np.where(finite, count, 0).astype(np.int64))

    def _add(self, total: np.ndarray, count: np.ndarray) -> None:
        """Fold in one batch's per-channel sums and value counts."""
        if self._sum is None:
            self._sum, self._count = total, count
        else:
            self._sum, self._count = self._sum + total, self._count + count

    def result(self) -> ChannelMeans:
        if self._sum is None:
            empty = np.zeros(0)
            return ChannelMeans(mean=_readonly(empty), count=_readonly(empty.astype(np.int64)))
        mean = self._sum / np.maximum(self._count, 1)
        return ChannelMeans(mean=_readonly(mean), count=_readonly(self._count.copy()))


class ChannelMeanSquareObserver(ChannelMeanObserver):
    """Running mean of ``x**2`` of each slice along ``axis`` (non-finite values are left out)."""

    def update(self, array) -> None:
        super().update(np.square(np.asarray(array, dtype=np.float64)))


class ChannelMomentsObserver:
    """Running means of ``x`` and of ``x**2`` of each slice along ``axis``."""

    def __init__(self, axis: int) -> None:
        self.first, self.second = ChannelMeanObserver(axis=axis), ChannelMeanSquareObserver(axis=axis)

    def update(self, array) -> None:
        self.first.update(array)
        self.second.update(array)


@dataclass(frozen=True, kw_only=True)
class LayerInputStatistics:
    """What the calibration pass saw of a layer's input ``x [..., K]``: ``E[x**2]`` per last-axis channel
    (float32 ``[K]``, as :class:`ChannelMomentsHook` gives it) and, for GPTQ, ``E[x x^T]`` (float64
    ``[K, K]``, read-only) over ``rows`` rows holding no NaN or infinity, or None."""

    mean_square: np.ndarray
    gram: np.ndarray | None = None
    rows: int = 0  # the samples (rows of x) ``gram`` averages
    #: ``E[x]`` per channel (float32 ``[K]``), or None: the clipping search's coherent error term
    mean: np.ndarray | None = None

    @cached_property
    def inverse_factor(self) -> np.ndarray:
        """GPTQ's upper ``U`` (:func:`edgeopt.quant.gptq.gptq_factor`: ``gram`` shrunk by its sampling noise);
        computed once for all the layers that read this input (``O(K^3)``, most of GPTQ's time on wide layers)."""
        return gptq_factor(self.gram[None], self.rows)[0]


class InputCorrelationObserver:
    """Running ``sum x^T x`` over the rows of ``x [..., K]`` (each row one sample of the K channels), and
    the channels' mean squares: memory ``K * K`` float64, whatever the data."""

    def __init__(self) -> None:
        self._mean_square = ChannelMeanSquareObserver(axis=-1)
        self._sum: np.ndarray | None = None
        self._rows = 0
        self._result: LayerInputStatistics | None = None

    def update(self, array) -> None:
        array = np.asarray(array)
        self._mean_square.update(array)
        rows = array.reshape(-1, array.shape[-1]).astype(np.float64)
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():  # a row with a NaN or infinity would spread it over the whole sum
            rows = rows[finite]
        if self._sum is None:
            self._sum = rows.T @ rows
        else:
            self._sum += rows.T @ rows
        self._rows += len(rows)

    def result(self) -> LayerInputStatistics | None:
        """The statistics (once: the sums become the mean in place, not a second ``K x K`` copy)."""
        if self._result is None and self._sum is not None and self._rows:
            mean_square = self._mean_square.result().mean.astype(np.float32)
            self._sum /= self._rows
            self._result = LayerInputStatistics(gram=_readonly(self._sum), mean_square=_readonly(mean_square),
                                                rows=self._rows)
        return self._result


# --------------------------------------------------------------------------
# hooks: the observers of several tensors, fed by the calibration pass
# --------------------------------------------------------------------------


class _Observer(Protocol):
    def update(self, array) -> None: ...


class ChannelStatsHook:
    """A calibration hook (``update(feed, outputs)``) feeding one observer per tensor of ``tensors``.

    ``tensors`` maps a tensor name to its channel axis; the calibration pass must fetch them
    (graph inputs come from the feed). ``result()`` gives each seen tensor's statistic.
    """

    groupable = True  # per-channel sums and maxima: the same whatever the batching

    def __init__(self, tensors: Mapping[str, int], observer: Callable[[int], _Observer]) -> None:
        self.tensors = dict(tensors)
        self._observers = {name: observer(axis) for name, axis in self.tensors.items()}

    def update(self, feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        for name, observer in self._observers.items():
            self._observe(observer, name, feed, outputs)

    def _observe(self, observer, name: str, feed: Mapping[str, np.ndarray],
                 outputs: Mapping[str, np.ndarray]) -> None:
        array = outputs[name] if name in outputs else feed.get(name)
        if array is not None and np.issubdtype(np.asarray(array).dtype, np.floating) and np.ndim(array):
            observer.update(array)

    def result(self) -> dict[str, np.ndarray]:
        """The statistic by tensor name (tensors never seen are left out)."""
        values = {name: self._value(observer) for name, observer in self._observers.items()}
        return {name: value for name, value in values.items() if value is not None}

    def _value(self, observer) -> np.ndarray | None:
        raise NotImplementedError


class ChannelAbsMaxHook(ChannelStatsHook):
    """Channel maxima of ``|x|`` of ``tensors`` (name -> channel axis), for SmoothQuant."""

    def __init__(self, tensors: Mapping[str, int]) -> None:
        super().__init__(tensors, lambda axis: ChannelAbsMaxObserver(axis=axis))

    def _value(self, observer: ChannelAbsMaxObserver) -> np.ndarray | None:
        result = observer.result()
        return result.abs_max if result.count else None


class ChannelMeanHook(ChannelStatsHook):
    """Channel means of ``tensors`` (name -> channel axis), for bias correction.

    The calibration pass gives each tensor whole, or (``channel_means``) its per-channel
    mean and element count computed inside ONNX Runtime.
    """

    channel_means = True

    def __init__(self, tensors: Mapping[str, int]) -> None:
        super().__init__(tensors, lambda axis: ChannelMeanObserver(axis=axis))
        # The batches' means reduced in ONNX Runtime, summed for all their tensors at once (one vector per
        # run, not one small update per tensor: 53 a run on a MobileNetV2), by tensor names.
        self._reduced: dict[tuple[tuple[str, int], ...], ChannelMeanObserver] = {}  # key: (name, channels) each

    def update(self, feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        reduced = []
        for name, observer in self._observers.items():
            mean = outputs.get(name + CHANNEL_MEAN_SUFFIXES[0])
            if mean is not None and np.issubdtype(mean.dtype, np.floating) and mean.size:
                reduced.append((name, mean))
            else:
                self._observe(observer, name, feed, outputs)
        if reduced:
            counts = [int(outputs[name + CHANNEL_MEAN_SUFFIXES[1]]) // mean.size for name, mean in reduced]
            means = np.concatenate([np.asarray(mean, dtype=np.float64).reshape(-1) for _, mean in reduced])
            key = tuple((name, mean.size) for name, mean in reduced)
            # the same float64 products and sums, element by element, as each tensor's own update_mean
            self._reduced.setdefault(key, ChannelMeanObserver()).update_mean(
                means, np.repeat(counts, [size for _, size in key]))

    def result(self) -> dict[str, np.ndarray]:
        for key, packed in self._reduced.items():  # each tensor's slice of the sums, to its observer
            bounds = np.cumsum([0, *(size for _, size in key)])
            for (name, _), start, stop in zip(key, bounds[:-1], bounds[1:]):
                self._observers[name]._add(packed._sum[start:stop], packed._count[start:stop])
        self._reduced.clear()
        return super().result()

    def _value(self, observer: ChannelMeanObserver) -> np.ndarray | None:
        mean = observer.result().mean
        return mean if mean.size else None


class ChannelMomentsHook(ChannelStatsHook):
    """:class:`LayerInputStatistics` of ``E[x**2]`` and ``E[x]`` per last-axis channel of ``tensors`` (float32),
    for int4's clipping search."""

    def __init__(self, tensors: Iterable[str]) -> None:
        super().__init__(dict.fromkeys(tensors, -1), lambda axis: ChannelMomentsObserver(axis=axis))

    def _value(self, observer: ChannelMomentsObserver) -> LayerInputStatistics | None:
        mean_square, mean = observer.second.result().mean, observer.first.result().mean
        if not mean_square.size:
            return None
        return LayerInputStatistics(mean_square=mean_square.astype(np.float32), mean=mean.astype(np.float32))


class InputCorrelationHook(ChannelStatsHook):
    """:class:`LayerInputStatistics` (with ``gram``) of the last-axis channels of ``tensors``, for int4's GPTQ."""

    def __init__(self, tensors: Iterable[str]) -> None:
        super().__init__(dict.fromkeys(tensors, -1), lambda axis: InputCorrelationObserver())

    def _value(self, observer: InputCorrelationObserver) -> LayerInputStatistics | None:
        return observer.result()

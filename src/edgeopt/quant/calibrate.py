"""Calibration: one streaming pass of the float model over the data.

ONNX Runtime runs the model with the tensors to observe added as outputs.
Each batch updates one min/max observer per tensor (and a histogram
observer when the method needs one) and is then dropped: memory is the
observers' fixed state plus one batch, whatever the size of the data.

From the statistics every method's range is computed (min/max, percentile,
entropy, MSE when histograms were kept), with the histogram-estimated
quantization error of each range. ``AUTO`` picks, per tensor, the method of
least estimated error. The result keeps all of them, so accuracy tools can
switch methods without running the data again.

Hooks (``update(feed, outputs)``) see every batch and the model outputs,
e.g. to check a converted model against the original on the same data.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.data import check_feed
from edgeopt.errors import DataError
from edgeopt.quant.config import CalibrationConfig, CalibrationMethod
from edgeopt.quant.observers import (
    HistogramObserver,
    HistogramStats,
    MinMaxObserver,
    MinMaxStats,
    entropy_range,
    expected_mse,
    mse_range,
    percentile_range,
)
from edgeopt.quant.registry import Batch, ProgressCallback
from edgeopt.runtime.ort import RANGE_SUFFIXES, range_session

__all__ = ["BatchHook", "CalibrationResult", "TensorCalibration", "calibrate"]

logger = logging.getLogger(__name__)

_METHOD_ORDER = tuple(CalibrationMethod)


class BatchHook(Protocol):
    def update(self, feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None: ...


@dataclass(frozen=True, kw_only=True)
class TensorCalibration:
    """Statistics of one tensor and the range of each method.

    ``ranges`` has MINMAX always, and PERCENTILE, ENTROPY, MSE when a
    histogram was kept; ``errors`` the estimated mean squared quantization
    error of each of those ranges (empty without a histogram). ``method`` is
    the method in use (for AUTO: the one chosen).
    """

    name: str
    dtype: np.dtype
    minmax: MinMaxStats
    histogram: HistogramStats | None
    ranges: Mapping[CalibrationMethod, tuple[float, float]]
    errors: Mapping[CalibrationMethod, float]
    method: CalibrationMethod

    @property
    def range(self) -> tuple[float, float]:
        return self.ranges[self.method]

    @property
    def is_float(self) -> bool:
        return self.dtype == np.float32


@dataclass(frozen=True, kw_only=True)
class CalibrationResult:
    """Per-tensor calibration, in the order the tensors were asked for."""

    tensors: Mapping[str, TensorCalibration]
    config: CalibrationConfig
    num_batches: int

    def ranges(self) -> dict[str, tuple[float, float]]:
        return {name: t.range for name, t in self.tensors.items() if t.is_float}

    def methods(self) -> dict[str, str]:
        return {name: t.method.value for name, t in self.tensors.items() if t.is_float}

    @property
    def non_float(self) -> frozenset[str]:
        """Observed tensors that turned out not to be float32 (so are not quantized)."""
        return frozenset(name for name, t in self.tensors.items() if not t.is_float)

    def with_method(self, method: CalibrationMethod) -> CalibrationResult:
        """The same statistics with another method (no new pass; histogram methods need histograms)."""
        config = replace(self.config, method=method)
        tensors = {name: replace(t, method=_chosen_method(method, t.ranges, t.errors))
                   for name, t in self.tensors.items()}
        return replace(self, tensors=types.MappingProxyType(tensors), config=config)


def _chosen_method(method: CalibrationMethod, ranges: Mapping, errors: Mapping) -> CalibrationMethod:
    if method is CalibrationMethod.AUTO:
        if not errors:
            return CalibrationMethod.MINMAX
        return min(errors, key=lambda m: (errors[m], _METHOD_ORDER.index(m)))
    if method not in ranges:
        raise ValueError(f"{method.value} needs histograms: calibrate with a histogram method")
    return method


def _method_ranges(minmax: MinMaxStats, histogram: HistogramStats | None,
                   config: CalibrationConfig) -> tuple[dict, dict]:
    ranges = {CalibrationMethod.MINMAX: minmax.range}
    if histogram is None:
        return ranges, {}
    levels = config.activation_format.num_levels
    ranges[CalibrationMethod.PERCENTILE] = percentile_range(histogram, config.percentile)
    ranges[CalibrationMethod.ENTROPY] = entropy_range(histogram, levels)
    ranges[CalibrationMethod.MSE] = mse_range(histogram, levels)
    errors = {m: float(expected_mse(histogram, r[0], r[1], levels)) for m, r in ranges.items()}
    return ranges, errors


class _TensorObserver:
    """Min/max (+ histogram) of one tensor; remembers the dtype of the first batch."""

    def __init__(self, name: str, config: CalibrationConfig) -> None:
        self.name = name
        self.config = config
        self.dtype: np.dtype | None = None
        self.minmax = MinMaxObserver()
        self.histogram = HistogramObserver(num_bins=config.num_bins) if config.method.needs_histogram else None

    def update_range(self, low: np.ndarray, high: np.ndarray) -> None:
        """A batch reduced to its min and max by ONNX Runtime (min/max-only observation)."""
        if self.dtype is None:
            self.dtype = low.dtype
        if low.dtype == np.float32:
            self.minmax.update_range(float(low), float(high), 1)

    def update(self, array: np.ndarray) -> None:
        if self.dtype is None:
            self.dtype = array.dtype
        if array.dtype != np.float32:
            return
        self.minmax.update(array)
        if self.histogram is not None:
            self.histogram.update(array)

    def result(self) -> TensorCalibration:
        minmax = self.minmax.result()
        histogram = self.histogram.result() if self.histogram is not None else None
        ranges, errors = _method_ranges(minmax, histogram, self.config)
        return TensorCalibration(
            name=self.name, dtype=self.dtype if self.dtype is not None else np.dtype(np.float32),
            minmax=minmax, histogram=histogram, ranges=types.MappingProxyType(ranges),
            errors=types.MappingProxyType(errors),
            method=_chosen_method(self.config.method, ranges, errors))


def _length(data: Iterable) -> int | None:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


def _check_data(data: object) -> None:
    if data is None:
        raise DataError("calibration needs data: give --data (a folder of .npy/.npz files, images, "
                        "or a module:function)")
    if isinstance(data, Mapping) or not isinstance(data, Iterable):
        raise DataError("calibration data must be an iterable of {input_name: array} batches "
                        f"(got a {type(data).__name__}): wrap a single batch in a list")


def _range_names(names: Sequence[str]) -> list[str]:
    return [name + suffix for name in names for suffix in RANGE_SUFFIXES]


def _observe(observer: _TensorObserver, name: str, feed: Batch, outputs: Mapping[str, np.ndarray],
             input_names: set[str]) -> None:
    """Feed the observer the tensor itself, or its min and max when ONNX Runtime reduced it."""
    if name in input_names:
        observer.update(feed[name])
    elif name in outputs:
        observer.update(outputs[name])
    else:
        observer.update_range(outputs[name + RANGE_SUFFIXES[0]], outputs[name + RANGE_SUFFIXES[1]])


# Batch-1 samples run GROUP_SIZE at a time on a copy of the model with a free batch dim: the same
# min/max and histograms, a tenth of the per-call overhead. Only without hooks (they see single
# samples) and when every input has batch dim 1; a model that hard-codes its batch (a Reshape to
# [1, ...]) fails the first group's check and falls back to one sample per run.
# Groups stay small for big inputs, where per-call overhead no longer matters and a batch's
# activations would dominate peak memory: at most GROUP_INPUT_BYTES of input per group.
GROUP_SIZE = 16
GROUP_INPUT_BYTES = 1 << 20


def _group_size(specs: Sequence[eir.InputSpec], hooks: Sequence[BatchHook]) -> int:
    groupable = not hooks and bool(specs) and all(spec.is_static and spec.shape and spec.shape[0] == 1
                                                  for spec in specs)
    if not groupable:
        return 1
    sample_bytes = sum(int(np.prod(spec.shape)) * spec.dtype.itemsize for spec in specs)
    return max(1, min(GROUP_SIZE, GROUP_INPUT_BYTES // max(sample_bytes, 1)))


def _groups(data: Iterable[Batch], specs: Sequence[eir.InputSpec], size: int) -> Iterator[list[dict]]:
    """Checked feeds, in runs of up to ``size`` with identical shapes (in data order)."""
    group: list[dict] = []
    for index, batch in enumerate(data):
        feed = check_feed(specs, batch, where=f"calibration batch {index + 1}")
        if group and (len(group) == size or not _same_shapes(feed, group[0])):
            yield group
            group = []
        group.append(feed)
    if group:
        yield group


def _same_shapes(feed: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray]) -> bool:
    for name, array in feed.items():
        if array.shape != other[name].shape:
            return False
    return True


class _Runner:
    """Runs groups of feeds as one batch while the model allows it, else one by one."""

    def __init__(self, model: ir.Model, whole: Sequence[str], reduced: Sequence[str], fetch: Sequence[str], *,
                 group: int) -> None:
        self.model, self.whole, self.reduced = model, whole, reduced
        self.outputs = [value.name for value in model.graph.outputs]
        self.fetch = list(fetch)
        self.group = group
        self.grouped = group > 1
        self.session = range_session(model, whole, reduced, free_batch=self.grouped)

    def run(self, feeds: list[dict]) -> Iterator[tuple[dict, dict]]:
        if self.grouped and len(feeds) > 1:
            joined = {name: np.concatenate([feed[name] for feed in feeds]) for name in feeds[0]}
            outputs = self._try_group(joined, len(feeds))
            if outputs is not None:
                yield joined, outputs
                return
        for feed in feeds:
            yield feed, (self.session.run(feed, self.fetch) if self.fetch else {})

    def _try_group(self, feed: dict, count: int) -> dict | None:
        try:
            outputs = self.session.run(feed, list(dict.fromkeys([*self.fetch, *self.outputs])))
        except DataError:
            outputs = None
        if outputs is not None and all(outputs[o].shape[:1] == (count,) for o in self.outputs):
            return outputs
        logger.info("the model does not batch (it fixes its batch size): calibrating one sample per run")
        self.grouped = False
        self.session = range_session(self.model, self.whole, self.reduced)
        return None


def calibrate(
    model: ir.Model,
    data: Iterable[Batch],
    tensors: Sequence[str],
    config: CalibrationConfig,
    *,
    progress: ProgressCallback | None = None,
    hooks: Sequence[BatchHook] = (),
) -> CalibrationResult:
    """Observe ``tensors`` (graph inputs or node outputs) over ``data`` in one ORT pass."""
    _check_data(data)
    names = list(dict.fromkeys(tensors))
    specs = eir.model_inputs(model)
    input_names = {spec.name for spec in specs}
    computed = [name for name in names if name not in input_names]
    model_outputs = [value.name for value in model.graph.outputs] if hooks else []
    # Tensors only min/max-observed come back as two scalars reduced inside ONNX Runtime; histograms
    # and hooks need the whole tensor.
    hook_tensors = {t for hook in hooks for t in getattr(hook, "tensors", ())} | set(model_outputs)
    whole = [n for n in computed if config.method.needs_histogram or n in hook_tensors]
    reduced = [n for n in computed if n not in set(whole)]
    fetch = list(dict.fromkeys([*model_outputs, *whole, *_range_names(reduced)]))
    runner = _Runner(model, whole, reduced, fetch, group=_group_size(specs, hooks))
    observers = {name: _TensorObserver(name, config) for name in names}
    total, done = _length(data), 0
    for feeds in _groups(data, specs, runner.group):
        for feed, outputs in runner.run(feeds):
            for name, observer in observers.items():
                _observe(observer, name, feed, outputs, input_names)
            for hook in hooks:
                hook.update(feed, outputs)
            samples = len(next(iter(feed.values()))) if runner.grouped else 1
            del feed, outputs  # keep nothing of a batch
            for _ in range(samples):
                done += 1
                if progress is not None:
                    progress(done, total)
        del feeds  # before the next group is read: at most one group is alive
    if done == 0:
        raise DataError("calibration data is empty: give at least one batch")
    logger.info("calibrated %d tensors on %d batches", len(names), done)
    results = {name: observer.result() for name, observer in observers.items()}
    return CalibrationResult(tensors=types.MappingProxyType(results), config=config, num_batches=done)

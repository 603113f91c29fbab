"""Calibration: one streaming pass of the float model over the data.

ONNX Runtime runs the model with the tensors to observe added as outputs.
Each batch updates one min/max observer per tensor (and a histogram
observer when the method needs one) and is then dropped: memory is the
observers' fixed state plus one batch, whatever the size of the data.

From the statistics each method's range follows (min/max, percentile,
entropy, MSE when histograms were kept), with the histogram-estimated
quantization error of each range. ``AUTO`` picks, per tensor, the method of
least estimated error. The result keeps the statistics and computes a range
when it is first asked for (the searches cost more than the data pass on
small models), so accuracy tools can switch methods without running the
data again.

A tensor that only rearranges another observed tensor's values (Reshape,
Transpose, Flatten, Squeeze, Unsqueeze, Identity, chained) holds the same
values batch by batch, so it is not observed again: it takes that tensor's
statistics (the same values, hence the same min, max and histogram).

With the min/max method the extremes are reduced inside ONNX Runtime. The
min of a tensor a clamp keeps at or above 0 (Relu, ReLU6's Clip) is not
reduced: it is the clamp's floor, since a quantization range holds 0 whatever
a min at or above 0 is (MobileNetV2's ReLU6 outputs are 88 % of the values
it observes).

Hooks (``update(feed, outputs)``) see every batch and the model outputs,
e.g. to check a converted model against the original on the same data.
"""

from __future__ import annotations

import logging
import math
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.errors import DataError, EmptyDataError
from edgeopt.passes import activation_clamp
from edgeopt.quant.config import CalibrationConfig, CalibrationMethod
from edgeopt.quant.grouping import Runner, fetched_bytes, group_size, groups, run_bytes, runs_in_flight
from edgeopt.quant.observers import HistogramObserver, HistogramStats, MinMaxObserver, MinMaxStats
from edgeopt.quant.range_choosers import entropy_range, expected_mse, mse_range, percentile_range
from edgeopt.quant.registry import Batch, ProgressCallback
from edgeopt.runtime.memory import return_freed_memory
from edgeopt.runtime.range_session import CHANNEL_MEAN_SUFFIXES, PACKED_RANGE_OUTPUTS, RANGE_SUFFIXES
from edgeopt.runtime.tap_gather import TapGather

__all__ = ["BatchHook", "CalibrationResult", "TensorCalibration", "calibrate", "same_values_aliases"]

logger = logging.getLogger(__name__)

_METHOD_ORDER = tuple(CalibrationMethod)


class BatchHook(Protocol):
    """Sees every batch (``feed``) and what the pass fetched for it (``outputs``).

    A hook whose statistics do not depend on how samples are batched (sums, maxima over all
    samples) sets a class attribute ``groupable = True``: the pass may then hand it several
    batch-1 samples run as one batch. Without it, calibration runs the samples one by one.
    A hook lists in ``tensors`` what it reads whole from ``outputs``. One that can take sampled
    positions of some of them instead lists those in ``gathers`` (output name ->
    :class:`~edgeopt.runtime.tap_gather.TapGather`) and the tensors it still needs whole then in
    ``whole_tensors``; ``outputs`` holds the gathers and their rows' stream indices
    (``TAP_STREAM_INPUT``), unless a gather's tensor comes whole anyway.
    """

    def update(self, feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None: ...


@dataclass(frozen=True, kw_only=True)
class TensorCalibration:
    """Statistics of one tensor and the range of each method.

    ``ranges`` has MINMAX always, and PERCENTILE, ENTROPY, MSE when a
    histogram was kept; ``errors`` the estimated mean squared quantization
    error of each of those ranges (empty without a histogram). Both are
    read-only mappings computing a value when first read. ``method`` is the
    method in use (for AUTO: the one chosen).
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

    def restricted(self, names: Sequence[str]) -> CalibrationResult:
        """The calibration of ``names`` alone (all observed here), in that order."""
        return replace(self, tensors=types.MappingProxyType({name: self.tensors[name] for name in names}))

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


class _MethodTable:
    """The range and estimated error of each method for one tensor, each computed when first asked for."""

    def __init__(self, minmax: MinMaxStats, histogram: HistogramStats | None, config: CalibrationConfig) -> None:
        self.minmax, self.histogram, self.config = minmax, histogram, config
        self.methods = (CalibrationMethod.MINMAX,) if histogram is None else _HISTOGRAM_METHODS
        self._ranges: dict[CalibrationMethod, tuple[float, float]] = {}
        self._errors: dict[CalibrationMethod, float] = {}

    def range(self, method: CalibrationMethod) -> tuple[float, float]:
        if method not in self._ranges:
            self._ranges[method] = self._search(method)
        return self._ranges[method]

    def error(self, method: CalibrationMethod) -> float:
        if not self._errors:  # errors are there to be compared: all at once, in one vectorized call
            low, high = zip(*(self.range(m) for m in self.methods))
            levels = self.config.activation_format.num_levels
            errors = expected_mse(self.histogram, np.array(low), np.array(high), levels)
            self._errors.update(zip(self.methods, map(float, errors)))
        return self._errors[method]

    def _search(self, method: CalibrationMethod) -> tuple[float, float]:
        levels = self.config.activation_format.num_levels
        if method is CalibrationMethod.MINMAX:
            return self.minmax.range
        if method is CalibrationMethod.PERCENTILE:
            return percentile_range(self.histogram, self.config.percentile)
        if method is CalibrationMethod.ENTROPY:
            return entropy_range(self.histogram, levels)
        return mse_range(self.histogram, levels)


_HISTOGRAM_METHODS = (CalibrationMethod.MINMAX, CalibrationMethod.PERCENTILE, CalibrationMethod.ENTROPY,
                      CalibrationMethod.MSE)


class _LazyMapping(Mapping):
    """Read-only ``{key: value(key)}`` over fixed keys; ``value`` runs when a key is read (it caches)."""

    def __init__(self, keys: Sequence, value: Callable) -> None:
        self._keys, self._value = tuple(keys), value

    def __getitem__(self, key):
        if key not in self._keys:
            raise KeyError(key)
        return self._value(key)

    def __contains__(self, key) -> bool:  # without computing the value
        return key in self._keys

    def __iter__(self) -> Iterator:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"{{{', '.join(f'{key}: ...' for key in self._keys)}}}"


class _TensorObserver:
    """Min/max (+ histogram) of one tensor; remembers the dtype of the first batch.

    Histogram methods see whole tensors, and the histogram observer keeps their
    min and max too; min/max-only observation also takes a batch's extremes
    reduced inside ONNX Runtime (``update_range``, ``update_packed``).
    """

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

    def update_packed(self, low: float, high: float, batches: int) -> None:
        """The min and max of a float32 tensor over ``batches`` batches, folded by :class:`_PackedRanges`."""
        self.dtype = np.dtype(np.float32)
        self.minmax.update_range(low, high, batches)

    def update(self, array: np.ndarray, samples: int = 1) -> None:
        if self.dtype is None:
            self.dtype = array.dtype
        if array.dtype != np.float32:
            return
        if self.histogram is not None:  # it keeps the min and max too
            self.histogram.update(array, samples)
        else:
            self.minmax.update(array)

    def result(self) -> TensorCalibration:
        histogram = self.histogram.result() if self.histogram is not None else None
        minmax = self.histogram.minmax() if self.histogram is not None else self.minmax.result()
        table = _MethodTable(minmax, histogram, self.config)
        ranges = _LazyMapping(table.methods, table.range)
        errors = _LazyMapping(table.methods if histogram is not None else (), table.error)
        return TensorCalibration(
            name=self.name, dtype=self.dtype if self.dtype is not None else np.dtype(np.float32),
            minmax=minmax, histogram=histogram, ranges=ranges, errors=errors,
            method=_chosen_method(self.config.method, ranges, errors))


class _PackedRanges:
    """Running min and max of the float32 tensors whose extremes ONNX Runtime packs in two arrays.

    Per tensor the same fold as :meth:`MinMaxObserver.update_range` batch by
    batch (a batch with a non-finite extreme is skipped; equal values keep the
    one seen first), on arrays instead of one Python call per tensor.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self._min = np.full(len(self.names), np.inf)
        self._max = np.full(len(self.names), -np.inf)
        self._batches = np.zeros(len(self.names), dtype=np.int64)

    def update(self, low: np.ndarray, high: np.ndarray) -> None:
        finite = np.isfinite(low) & np.isfinite(high)
        self._min = np.where(finite & (low < self._min), low, self._min)
        self._max = np.where(finite & (high > self._max), high, self._max)
        self._batches += finite

    def fold_into(self, observers: Mapping[str, _TensorObserver]) -> None:
        for name, low, high, batches in zip(self.names, self._min, self._max, self._batches):
            observers[name].update_packed(float(low), float(high), int(batches))


def _length(data: Iterable) -> int | None:
    """How many batches ``data`` holds if known: its length, or a data source's ``num_samples``."""
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return getattr(data, "num_samples", None)


def _check_data(data: object) -> None:
    if data is None:
        raise DataError("calibration needs data: give --data (a folder of .npy/.npz files, images, "
                        "or a module:function)")
    if isinstance(data, Mapping) or not isinstance(data, Iterable):
        raise DataError("calibration data must be an iterable of {input_name: array} batches "
                        f"(got a {type(data).__name__}): wrap a single batch in a list")


def _range_names(names: Sequence[str]) -> list[str]:
    return [name + suffix for name in names for suffix in RANGE_SUFFIXES]


def _floors(model: ir.Model, names: Sequence[str]) -> dict[str, float]:
    """The lower bound of each of ``names`` made by a clamp (Relu, Clip with constant bounds) that keeps
    it at or above 0."""
    wanted, floors = set(names), {}
    for node in model.graph:
        clamp = activation_clamp(node) if node.outputs and node.outputs[0].name in wanted else None
        if clamp is not None and 0.0 <= clamp[0] < math.inf:
            floors[node.outputs[0].name] = float(clamp[0])
    return floors


def _float32_outputs(model: ir.Model, names: Sequence[str]) -> list[str]:
    """Those of ``names`` that nodes of the graph declare float32."""
    declared = {value.name: value.dtype for node in model.graph for value in node.outputs}
    return [name for name in names if declared.get(name) == ir.DataType.FLOAT]


class _Observation:
    """The observer of every tensor, and where in a run's feed and outputs each one reads its batch.

    Graph inputs come from the feed; ``whole`` tensors whole from the outputs;
    the others as min and max reduced inside ONNX Runtime: packed in two
    arrays for the tensors declared float32, two scalars each for the rest.
    ``for_hooks`` are fetched whole too, for the hooks, but observed as the others.
    The min of a packed tensor with a floor (``floors``, of packed tensors: the lower bound, at least 0, of
    the clamp that made it) is that floor, not observed: its range holds 0 anyway (see ``range_session``).
    """

    def __init__(self, names: Sequence[str], config: CalibrationConfig, *, inputs: set[str],
                 whole: Sequence[str], packed: Sequence[str], for_hooks: Sequence[str] = (),
                 channel_means: Mapping[str, tuple[int, int]] | None = None,
                 floors: Mapping[str, float] | None = None, gathers: Mapping[str, TapGather] | None = None) -> None:
        self.observers = {name: _TensorObserver(name, config) for name in names}
        self.gathers = dict(gathers or {})  # for hooks: output name -> sampled positions of a tensor
        self.inputs = [name for name in names if name in inputs]
        self.whole, self.packed = list(whole), _PackedRanges(packed)
        self.floors = dict(floors or {})
        observed_whole = set(self.whole)
        self.for_hooks = [name for name in for_hooks if name not in observed_whole]
        self.channel_means = dict(channel_means or {})  # for hooks: name -> (channel axis, rank)
        done = {*self.inputs, *self.whole, *self.packed.names}
        self.reduced = [name for name in names if name not in done]

    @property
    def full(self) -> list[str]:
        """The tensors a run returns whole."""
        return [*self.whole, *self.for_hooks]

    @property
    def fetch(self) -> list[str]:
        """The session outputs one run must return."""
        means = [name + suffix for name in self.channel_means for suffix in CHANNEL_MEAN_SUFFIXES]
        return [*self.full, *_range_names(self.reduced), *(PACKED_RANGE_OUTPUTS if self.packed.names else ()),
                *means, *self.gathers]

    def update(self, feed: Batch, outputs: Mapping[str, np.ndarray], samples: int = 1) -> None:
        """One run's tensors; ``samples`` batch-1 samples stacked on axis 0 when they ran as one batch."""
        for name in self.inputs:
            self.observers[name].update(feed[name], samples)
        for name in self.whole:
            self.observers[name].update(outputs[name], samples)
        for name in self.reduced:
            self.observers[name].update_range(outputs[name + RANGE_SUFFIXES[0]], outputs[name + RANGE_SUFFIXES[1]])
        if self.packed.names:
            self.packed.update(outputs[PACKED_RANGE_OUTPUTS[0]], outputs[PACKED_RANGE_OUTPUTS[1]])

    def results(self) -> dict[str, TensorCalibration]:
        self.packed.fold_into(self.observers)
        return {name: observer.result() for name, observer in self.observers.items()}


def _channel_mean_axes(model: ir.Model, wanted: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """(channel axis, rank) of each tensor whose rank is known (the others are fetched whole)."""
    values = {v.name: v for node in model.graph for v in node.outputs if v.name in wanted}
    axes = {}
    for name, axis in wanted.items():
        value = values.get(name)
        rank = len(value.shape) if value is not None and value.shape is not None else None
        if rank and -rank <= axis < rank:
            axes[name] = (axis % rank, rank)
    return axes


# Ops whose first output holds exactly the values of their first input, rearranged.
_SAME_VALUES_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity")


def same_values_aliases(model: ir.Model, names: Sequence[str], *, keep: Iterable[str] = ()) -> dict[str, str]:
    """``{alias: root}`` for those of ``names`` (except ``keep``) that rearrange another of ``names``.

    ``root`` is reached from ``alias`` through a chain of :data:`_SAME_VALUES_OPS`
    (whose intermediate tensors need not be in ``names``), so the two hold the
    same multiset of values on every run and have the same statistics.
    """
    wanted, kept = set(names), set(keep)
    nearest: dict[str, str] = {}  # tensor -> root of the nearest tensor of ``names`` up its chain
    aliases = {}
    for node in model.graph:  # topological order: a node's input is settled before its outputs
        if not (eir.is_op(node, *_SAME_VALUES_OPS) and node.inputs and node.inputs[0] is not None):
            continue
        source, output = node.inputs[0].name, node.outputs[0].name
        root = nearest.get(source, source if source in wanted else None)
        if output in wanted and (root is None or output in kept):
            continue  # observed itself: a root, found by the default above
        if root is not None:
            nearest[output] = root
            if output in wanted:
                aliases[output] = root
    return aliases


#: Runs returning at most this many bytes whole, and no tap gathers, are observed on the calling thread:
#: the threads' handoffs cost more than their overlap gains (the 32x32 benchmark nets, 1-4 MB a run of 16
#: samples: 5-10 % less time; a 224x224 MobileNetV2's 27 MB a run: 20 % more).
INLINE_OBSERVATION_BYTES = 4 << 20


def _observe_runs(runs: Iterable[tuple[Batch, Mapping[str, np.ndarray], int]], observation: _Observation,
                  hooks: Sequence[BatchHook], *, inline: bool, progress: ProgressCallback | None,
                  total: int | None) -> int:
    """Observe every run's tensors and feed the hooks, in run order; the number of samples seen.

    ``inline``: on this thread, between runs. Else observing a batch overlaps ONNX Runtime's runs of the
    next ones (two at once where they return little whole, see runs_in_flight): one worker thread observes
    the tensors (histograms), another feeds the hooks, each taking the batches in order and at most one
    behind, so results are those of a plain loop and no more than two batches' outputs are alive at once,
    six while runs go ahead (four queued)."""

    def feed_hooks(feed: Batch, outputs: Mapping[str, np.ndarray]) -> None:
        for hook in hooks:
            hook.update(feed, outputs)

    done = 0

    def count(samples: int) -> None:
        nonlocal done
        for _ in range(samples):
            done += 1
            if progress is not None:
                progress(done, total)

    if inline:
        for feed, outputs, samples in runs:
            observation.update(feed, outputs, samples)
            feed_hooks(feed, outputs)
            count(samples)
        return done
    with (ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeopt-observe") as worker,
          ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeopt-hooks") as hook_worker):
        pending = []
        for feed, outputs, samples in runs:
            for future in pending:
                future.result()
            pending = [worker.submit(observation.update, feed, outputs, samples)]
            if hooks:
                pending.append(hook_worker.submit(feed_hooks, feed, outputs))
            del feed, outputs  # the workers hold the batch until it is observed
            count(samples)
        for future in pending:
            future.result()
    return done


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
    return_freed_memory()
    names = list(dict.fromkeys(tensors))
    specs = eir.model_inputs(model)
    input_names = {spec.name for spec in specs}
    model_outputs = [value.name for value in model.graph.outputs] if hooks else []
    # Tensors only min/max-observed come back as their min and max reduced inside ONNX Runtime;
    # histograms and hooks need the whole tensor. Hooks that only want channel means get them
    # reduced inside ONNX Runtime too, unless the tensor comes whole anyway (another hook reads it).
    mean_hooks = [hook for hook in hooks if getattr(hook, "channel_means", False)]
    read_whole = {t for hook in hooks if hook not in mean_hooks
                  for t in getattr(hook, "whole_tensors", getattr(hook, "tensors", ()))}
    observed = {name for name in names if name not in input_names}
    mean_axes = {t: axis for hook in mean_hooks for t, axis in hook.tensors.items() if t in observed}
    no_rank = set(mean_axes) - set(_channel_mean_axes(model, mean_axes))  # their means: from the whole tensor
    # a tensor fetched whole for a hook is observed itself; the other rearrangements take their root's statistics
    aliases = same_values_aliases(model, names, keep={*read_whole, *model_outputs, *no_rank})
    computed = [name for name in names if name in observed and name not in aliases]
    # a hook's tensor comes whole for the hook; its min and max, with a min/max method, still from ONNX Runtime
    whole = [n for n in computed if config.method.needs_histogram or n in model_outputs]
    for_hooks = [n for n in computed if n in read_whole and n not in whole]
    fetched = {*whole, *for_hooks}
    wanted_means = {t: axis for t, axis in mean_axes.items() if t not in fetched}
    means = _channel_mean_axes(model, wanted_means)
    whole += [t for t in wanted_means if t not in means]  # rank unknown: fetched whole after all
    reduced = [n for n in computed if n not in whole]
    packed = _float32_outputs(model, reduced)
    # sampled positions of a tensor, for a hook, unless it comes whole anyway (the hook reads it whole then)
    gathers = {output: gather for hook in hooks for output, gather in getattr(hook, "gathers", {}).items()
               if gather.source not in {*whole, *for_hooks, *model_outputs}}
    observation = _Observation([n for n in names if n not in aliases], config, inputs=input_names, whole=whole,
                               packed=packed, for_hooks=for_hooks, channel_means=means, floors=_floors(model, packed),
                               gathers=gathers)
    fetch = list(dict.fromkeys([*model_outputs, *observation.fetch]))
    gathered_bytes = sum(gather.row_bytes for gather in gathers.values())
    group = group_size(specs, hooks, fetched_bytes=fetched_bytes(model, observation.full) + gathered_bytes)
    width = runs_in_flight(model, observation.full, group, gathered_bytes=gathered_bytes)
    runner = Runner(model, observation, fetch, group=group, width=width)
    runs = runner.run_all(groups(data, specs, runner.group))
    returned = run_bytes(model, observation.full, group)
    light = not gathers and returned is not None and returned <= INLINE_OBSERVATION_BYTES
    done = _observe_runs(runs, observation, hooks, inline=light, progress=progress, total=_length(data))
    if done == 0:
        raise EmptyDataError("calibration data is empty: give at least one batch")
    logger.info("calibrated %d tensors (%d of them rearranging another) on %d batches", len(names), len(aliases),
                done)
    observed_results = observation.results()
    results = {name: replace(observed_results[aliases[name]], name=name) if name in aliases
               else observed_results[name] for name in names}
    return CalibrationResult(tensors=types.MappingProxyType(results), config=config, num_batches=done)

"""Depthwise convolutions rounded by GPTQ (``--depthwise-gptq``), from statistics of the one calibration pass.

An output channel of a depthwise 3x3 convolution sums 9 products, so its
weights' rounding errors do not average out as those of a 1x1 convolution
over 96 channels do, and int8 MobileNets lose much of their fidelity there.
GPTQ (:mod:`edgeopt.quant.gptq`) rounds a layer's weights so that the errors
cancel in the layer's output; all it needs of the data is the correlation
``H = E[x x^T]`` of the taps each output channel reads. For a depthwise
convolution (``weight [M, 1, k...]``, ``group > 1``) that is a ``K x K``
matrix per input channel (``K = k*k`` taps), small enough to gather in the
calibration pass itself, beside the ranges: :class:`DepthwiseCorrelationHook`
reads each layer's input batch by batch (only the taps it needs, gathered inside
ONNX Runtime, where the input's shape allows: ``DepthwiseCorrelationHook.gathers``) and sums ``x x^T`` over
:data:`POSITIONS` output positions of each sample (one in each band of rows
and each band of columns, offset from sample to sample; every position of a
smaller feature map), the even and the odd samples apart. The samples' count, not the feature
map's size, sets the rows: 200 samples give 1,600 per layer, which GPTQ
shrinks toward the diagonal by their sampling noise. :func:`round_depthwise`
rounds each layer's weights from those sums; an output channel keeps the
nearest rounding unless GPTQ fitted on the even samples also cuts the output
error on the odd ones, and the other way round (GPTQ's own guard judges it
on the samples it fitted, which a 25-tap channel can overfit).

``benchmarks/rounding.py`` (output SQNR against the float model on each
model's larger evaluation set, one run each): MobileNetV2 at 224x224 14.89 ->
15.25 dB (top-1 agreement 67.8 -> 71.5 %) for 10-27 % more time (3.25 against
2.56 s in the run of 2026-11-25 02:32 UTC; with min/max ranges +0.26 s on 1.2 s then, 1.0-1.1
against 1.7-1.8 s once the min/max pass got cheaper, and 0.73-0.77 against 1.15-1.28 s once the taps were
gathered in ONNX Runtime, fresh processes, 2026-11-25 05:00 and 07:45 UTC), the 32x32
depthwise-separable nets +0.02 to +0.76 dB, the models without depthwise
layers unchanged. On those 32x32 nets, whose calibration takes 0.1-0.3 s,
the statistics and the rounding add 20 % (the demo) to 150 % (MobileNetV3's
5x5 layers) of the calibration time, past the 0.5x of ONNX Runtime's that
the benchmark holds it to. So by default the layers are rounded this way
only where the statistics' multiply-adds are at most :data:`DEFAULT_MAX_SHARE`
of the model's (:func:`statistics_share`: 1.5 % on that MobileNetV2, 0.5 % on
the test MobileViT, 28-170 % on those nets); ``--depthwise-gptq`` and ``--no-depthwise-gptq`` decide
either way. ``--gptq`` and ``--adaround`` round every layer, these included,
from sampled input rows.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
import math
import os

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.analysis.cost import analyze_cost, sample_shape
from edgeopt.quant.adaround import (SHARED_WEIGHT, AdaRoundResult, RoundedLayer, conv_geometry,
                                    quantized_weight_axis)
from edgeopt.quant.adaround_solver import channel_scales
from edgeopt.quant.config import PerChannel, PerTensor
from edgeopt.quant.gptq import gptq_from_gram, output_error
from edgeopt.quant.primitives import quantize_per_channel
from edgeopt.runtime.memory import MMAP_THRESHOLD_BYTES
from edgeopt.runtime.tap_gather import TAP_STREAM_INPUT, TapGather, check_stream

__all__ = ["DEFAULT_MAX_SHARE", "POSITIONS", "DepthwiseCorrelationHook", "DepthwiseInputs", "is_depthwise",
           "round_depthwise", "statistics_share"]

#: Output positions per sample whose input taps are summed: every position of a feature map this
#: small or smaller, an evenly spaced sample of a larger one.
POSITIONS = 8
#: Samples gathered at a time (their taps: 16 x 8 positions x 25 taps x 960 channels, 3 million
#: values at most in a MobileNet).
_CHUNK = 16
#: Sample ``i`` of a large feature map takes the positions of set ``i mod 8`` (:func:`_positions`).
_PHASES = 8
#: Tap rows of a layer's fold gathered before their correlations are summed: 2 samples' worth (a wide layer's
#: fewer: see _TEMPORARY_BYTES). One sample at a time (a 224x224 model runs its samples one by one) took 15 %
#: more time than 2, 4 or 16 did (the hook alone on a 224x224 MobileNetV2's 64 samples: 0.17 against 0.14-0.15 s),
#: and 16 held up to 2 MB of taps a sample waiting, 5-8 MB more peak RSS than 2 did with its runs in flight.
_FOLD_ROWS = 2 * POSITIONS
#: The size kept under glibc's mmap threshold (pinned by :mod:`edgeopt.runtime.memory`) by the temporaries of
#: folding taps and of rounding: a larger one is mapped afresh and page-faulted in at every use.
_TEMPORARY_BYTES = MMAP_THRESHOLD_BYTES * 3 // 4


#: Without ``depthwise_gptq`` set either way, the depthwise layers are rounded by GPTQ when their statistics'
#: multiply-adds per sample are at most this share of the model's (:func:`statistics_share`).
DEFAULT_MAX_SHARE = 0.02


def statistics_share(model: ir.Model, layers: Collection[str]) -> float:
    """The multiply-adds of the tap correlations of ``layers``, over the model's (``inf`` when either is
    unknown).

    A layer of ``G`` groups (input channels) and ``K`` taps adds ``G * K * K`` per output position
    sampled (:data:`POSITIONS` per sample, or fewer on a smaller map); the model's are those of
    :func:`edgeopt.analysis.cost.analyze_cost`, both counted with a free leading (batch) dim as one
    sample. A node of unknown size counts as nothing in the model's, and a layer of ``layers`` of
    unknown size makes the share ``inf``: an unknown model looks costly. Measured: MobileNetV2 at
    224x224, 1.5 %, calibrates in 10-27 % more time; the benchmark's 32x32 nets (28-170 %) in 20-150 %
    more.
    """
    by_name = {node.name: node for node in model.graph}
    statistics = 0
    for name in layers:
        node = by_name.get(name)
        output = sample_shape(node.outputs[0]) if node is not None and node.outputs else None
        weight = node.inputs[1].shape if output is not None and len(node.inputs) > 1 else None
        if output is None or weight is None or not all(isinstance(dim, int) for dim in weight):
            return math.inf
        taps = math.prod(list(weight)[2:])
        positions = min(POSITIONS, math.prod(output[2:]))
        statistics += output[0] * node.attributes.get_int("group", 1) * positions * taps * taps
    model_macs = analyze_cost(model, free_batch_as_one=True).macs
    return statistics / model_macs if model_macs else math.inf


def is_depthwise(node: ir.Node) -> bool:
    """A depthwise 1-D or 2-D Conv: groups of one input channel each (``group > 1``, a float constant
    weight ``[M, 1, k...]`` of more than one tap). A Conv of a one-channel input (a grayscale network's
    first layer) has that weight too, but rounding the demo model's that way made its output less
    faithful (29.62 -> 29.38 dB on the benchmark's 4,050 images), so it keeps the nearest rounding."""
    if not eir.is_op(node, "Conv") or len(node.inputs) < 2 or node.inputs[0] is None:
        return False
    weight = eir.constant_array(node.inputs[1])
    return (node.attributes.get_int("group", 1) > 1 and weight is not None
            and np.issubdtype(weight.dtype, np.floating) and weight.ndim in (3, 4)
            and weight.shape[1] == 1 and int(np.prod(weight.shape[2:])) > 1)


@dataclass(frozen=True, kw_only=True)
class DepthwiseInputs:
    """What the calibration pass saw of a depthwise layer's input: per input channel (group), the mean
    ``E[x x^T]`` of the taps one output position reads, over the even and over the odd samples apart
    (``folds``: float64 ``[F, G, K, K]``, ``K`` taps; ``F`` = 2, or 1 when one of them saw nothing),
    each over ``rows[f, g]`` positions holding no NaN or infinity (a channel with none: zeros)."""

    folds: np.ndarray
    rows: np.ndarray

    @property
    def gram(self) -> np.ndarray:
        """``E[x x^T]`` over all the samples: ``[G, K, K]``."""
        total = self.rows.sum(axis=0)
        weights = self.rows / np.maximum(total, 1)
        return np.einsum("fg,fgkl->gkl", weights, self.folds)


def _positions(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns ``[phases, P]`` of the output positions each of the :data:`_PHASES` sets holds: every
    position when there are at most :data:`POSITIONS`; else a Latin-hypercube sample of the map, one
    position in each of ``P`` bands of rows and in each of ``P`` bands of columns (band ``j`` of rows
    with band ``3 j mod P`` of columns), offset within the bands from set to set, so that the sets
    together cover ``8 P`` rows and columns, the padded borders included. (Positions taken every
    ``H W / P`` along the flattened map fell in one column when ``H`` was a multiple of ``P``, and the
    left and right borders were never read.)"""
    positions = height * width
    if positions <= POSITIONS:
        flat = np.broadcast_to(np.arange(positions), (_PHASES, positions))
        return np.divmod(flat, width)
    take = POSITIONS
    step = 3 if math.gcd(3, take) == 1 else 1
    band = np.arange(take)
    phase = np.arange(_PHASES)[:, None]
    rows = (band + (phase + 0.5) / _PHASES) / take
    cols = ((band * step) % take + ((phase * 5) % _PHASES + 0.5) / _PHASES) / take
    return (np.minimum(np.floor(rows * height), height - 1).astype(np.int64),
            np.minimum(np.floor(cols * width), width - 1).astype(np.int64))


class DepthwiseCorrelationHook:
    """A calibration hook summing the tap correlations of the inputs of the depthwise layers among ``nodes``.

    ``tensors`` lists what the calibration pass must fetch, ``layers`` the layers
    it covers; ``result()`` maps node name to :class:`DepthwiseInputs`.
    """

    #: Which positions a sample gives depends on its index in the stream, not on how samples are batched.
    groupable = True
    #: Layers refused while sampling (the sampler of AdaRound's has some): none, non-depthwise ones are not taken.
    skipped: tuple[tuple[str, str], ...] = ()

    def __init__(self, model: ir.Model, nodes: Collection[str]) -> None:
        by_name = {node.name: node for node in model.graph}
        self._layers = {name: by_name[name] for name in dict.fromkeys(nodes)
                        if name in by_name and is_depthwise(by_name[name])}
        self.layers = frozenset(self._layers)
        self._weights = {name: eir.constant_array(node.inputs[1]) for name, node in self._layers.items()}
        self._window = {name: int(np.prod(weight.shape[2:])) for name, weight in self._weights.items()}  # taps
        self.tensors = tuple(dict.fromkeys(node.inputs[0].name for node in self._layers.values()))
        self._sums: dict[str, np.ndarray] = {}
        self._rows: dict[str, np.ndarray] = {}
        self._seen: dict[str, int] = {}
        self._tap_cache: dict[tuple, tuple[np.ndarray, list]] = {}
        self._waiting: dict[tuple[str, int], list[np.ndarray]] = {}  # taps not yet in the sums, by layer and fold
        #: What :meth:`update` takes instead of a layer's whole input where a calibration pass can give it: the
        #: taps of the layer's positions gathered inside ONNX Runtime (output name -> gather), a few hundred KB
        #: a sample where a 224x224 MobileNetV2's inputs are 15 MB (:mod:`edgeopt.runtime.tap_gather`).
        self.gathers: dict[str, TapGather] = {}
        self._gathered: dict[str, tuple[str, tuple[int, ...]]] = {}  # layer -> its gather's output, input spatial dims
        for name, node in self._layers.items():
            spatial = _gatherable_spatial(model, node, self._weights[name].ndim)
            if spatial is not None:
                output = f"{name}__edgeopt_taps"
                self.gathers[output] = TapGather(node.inputs[0].name, self._taps(name, node, spatial)[0],
                                                 int(node.inputs[0].shape[1]), eir.numpy_dtype(node.inputs[0]))
                self._gathered[name] = (output, spatial)
        self.whole_tensors = tuple(dict.fromkeys(node.inputs[0].name for name, node in self._layers.items()
                                                 if name not in self._gathered))

    def update(self, feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        for name, node in self._layers.items():
            output, spatial = self._gathered.get(name, ("", ()))
            gathered = outputs.get(output)
            if gathered is not None:
                self._add_gathered(name, node, gathered, outputs.get(TAP_STREAM_INPUT), spatial)
                continue
            tensor = node.inputs[0].name
            batch = outputs[tensor] if tensor in outputs else feed.get(tensor)
            if batch is None:
                continue
            batch, weight = np.asarray(batch), self._weights[name]
            group = node.attributes.get_int("group", 1)
            if (not np.issubdtype(batch.dtype, np.floating) or batch.ndim != weight.ndim
                    or batch.shape[1] != group or not batch.shape[0]):
                continue
            for start in range(0, batch.shape[0], _CHUNK):
                self._add(name, node, batch[start:start + _CHUNK])

    def _add(self, name: str, node: ir.Node, batch: np.ndarray) -> None:
        """Fold one chunk of samples ``[B, C, *spatial]`` into the layer's sums."""
        count, channels = batch.shape[:2]
        planes = batch.reshape(count, channels, -1)
        index, padding = self._taps(name, node, batch.shape[2:])
        first = self._seen.get(name, 0)
        self._seen[name] = first + count
        for sample, stream in enumerate(range(first, first + count)):  # its place in the stream: phase and fold
            self._add_sample(name, planes[sample].take(index[stream % _PHASES], axis=1), stream, padding)

    def _add_gathered(self, name: str, node: ir.Node, gathered: np.ndarray, stream: np.ndarray | None,
                      spatial: tuple[int, ...]) -> None:
        """Fold the taps of a run's samples gathered in ONNX Runtime (``[B, C, P K]``) into the layer's sums."""
        first = self._seen.get(name, 0)
        check_stream(stream, gathered, first, f"the input of {name!r}", "calibrate it with --no-depthwise-gptq")
        self._seen[name] = first + gathered.shape[0]
        padding = self._taps(name, node, spatial)[1]
        if not gathered.flags.writeable:
            gathered = gathered.copy()
        for taps, index in zip(gathered, stream.tolist()):
            self._add_sample(name, taps, index, padding)

    def _add_sample(self, name: str, taps: np.ndarray, stream: int, padding: list) -> None:
        """One sample's taps ``[C, P K]`` (written over), the ``stream``-th: those on the zero padding (whose
        index points at some position of the map, whatever it holds) set to 0, then buffered for its fold."""
        phase = stream % _PHASES
        if padding[phase] is not None:
            np.copyto(taps, 0, where=padding[phase])
        self._buffer(name, stream % 2, taps.reshape(taps.shape[0], -1, self._window[name]))

    def _buffer(self, name: str, fold: int, taps: np.ndarray) -> None:
        """Keep ``taps [C, rows, K]`` until :data:`_FOLD_ROWS` rows of the layer's fold are waiting (or
        :data:`_TEMPORARY_BYTES` of them as float64), then add them at once: the correlations are many
        small products, whose count costs more than their size."""
        waiting = self._waiting.setdefault((name, fold), [])
        waiting.append(taps)
        rows = sum(part.shape[1] for part in waiting)
        if rows >= _FOLD_ROWS or rows * taps.shape[0] * taps.shape[2] * 8 >= _TEMPORARY_BYTES:
            self._flush(name, fold)

    def _flush(self, name: str, fold: int) -> None:
        waiting = self._waiting.pop((name, fold), [])
        if not waiting:
            return
        # copied straight into one float64 array: concatenating first and converting after took twice the time
        taps = np.empty((waiting[0].shape[0], sum(part.shape[1] for part in waiting), waiting[0].shape[2]))
        start = 0
        for part in waiting:
            taps[:, start:start + part.shape[1]] = part
            start += part.shape[1]
        self._fold_in(name, fold, taps)

    def _fold_in(self, name: str, fold: int, taps: np.ndarray) -> None:
        """Add the correlations of ``taps [C, rows, K]`` (float64) to the layer's sums of ``fold``."""
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf: found below, left out
            gram = _gram(taps)
        rows = np.full(taps.shape[0], taps.shape[1], dtype=np.int64)
        if not np.isfinite(gram).all():  # a position with a NaN or infinity says nothing of the rounding
            finite = np.isfinite(taps).all(axis=2)
            taps = np.where(finite[..., None], taps, 0.0)
            gram, rows = _gram(taps), finite.sum(axis=1)
        if name not in self._sums:
            self._sums[name] = np.zeros((2, *gram.shape))
            self._rows[name] = np.zeros((2, len(rows)), dtype=np.int64)
        self._sums[name][fold] += gram
        self._rows[name][fold] += rows

    def _taps(self, name: str, node: ir.Node, spatial: tuple[int, ...]) -> tuple[np.ndarray, list]:
        """For each of the :data:`_PHASES` sets of a sample's positions, where the taps of its positions lie
        in the flattened input plane (``[phases, P K]``: ``P`` positions of ``K`` taps, positions outermost),
        and which of them fall on the zero padding instead (``[P K]`` per phase; None when none does)."""
        key = (name, spatial)
        if key not in self._tap_cache:
            weight = self._weights[name]
            pads, strides, dilations, (out_h, out_w) = conv_geometry(node, weight, spatial)
            height, width = (1, spatial[0]) if weight.ndim == 3 else spatial
            kernel = (1, weight.shape[2]) if weight.ndim == 3 else weight.shape[2:]
            y, x = _positions(max(out_h, 1), max(out_w, 1))  # [phases, P] each
            rows_at = y[..., None] * strides[0] - pads[0] + np.arange(kernel[0]) * dilations[0]  # [phases, P, kh]
            cols_at = x[..., None] * strides[1] - pads[1] + np.arange(kernel[1]) * dilations[1]  # [phases, P, kw]
            inside = (((rows_at >= 0) & (rows_at < height))[..., :, None]
                      & ((cols_at >= 0) & (cols_at < width))[..., None, :])
            index = (np.clip(rows_at, 0, height - 1)[..., :, None] * width
                     + np.clip(cols_at, 0, width - 1)[..., None, :])
            self._tap_cache[key] = (index.reshape(_PHASES, -1),
                                    [None if row.all() else ~row for row in inside.reshape(_PHASES, -1)])
        return self._tap_cache[key]

    def result(self) -> dict[str, DepthwiseInputs]:
        """The tap correlations by layer (layers never seen, or whose every position held NaN, left out;
        a fold of samples whose every position held NaN too)."""
        for name, fold in list(self._waiting):
            self._flush(name, fold)
        results = {}
        for name, sums in self._sums.items():
            rows = self._rows[name]
            seen = rows.max(axis=1) > 0
            if seen.any():
                folds = sums[seen] / np.maximum(rows[seen], 1)[:, :, None, None]
                results[name] = DepthwiseInputs(folds=folds, rows=rows[seen].copy())
        return results


def _gatherable_spatial(model: ir.Model, node: ir.Node, rank: int) -> tuple[int, ...] | None:
    """The spatial dims of a depthwise layer's input when its taps can be gathered inside ONNX Runtime: made
    by a node (a graph input is in the feed already), of the weight's rank, its channels and spatial dims
    static, and its batch dim that of every graph input (the same literal or the same symbol), so that its
    rows are the run's rows."""
    value = node.inputs[0]
    dims = list(value.shape.dims) if value.shape is not None else []
    dtype = eir.numpy_dtype(value)
    if (value.producer() is None or len(dims) != rank or dtype is None or not np.issubdtype(dtype, np.floating)
            or not all(isinstance(dim, int) and dim > 0 for dim in dims[1:])):
        return None
    batch = dims[0]
    if not isinstance(batch, int) and getattr(batch, "value", None) is None:
        return None
    inputs = list(model.graph.inputs)
    if not inputs or not all(i.shape is not None and len(i.shape) and i.shape.dims[0] == batch for i in inputs):
        return None
    return tuple(dims[2:])


def _gram(taps: np.ndarray) -> np.ndarray:
    """``x^T x`` of each ``[rows, K]`` matrix of ``taps [C, rows, K]``. The transposed operand is made
    contiguous: numpy's matmul of a transposed stack of small matrices loops element by element, 7 times
    slower (0.65 against 0.09 ms for 96 channels of 128 rows of 9 taps)."""
    return np.ascontiguousarray(taps.transpose(0, 2, 1)) @ taps


def round_depthwise(model: ir.Model, inputs: Mapping[str, DepthwiseInputs],
                    granularity: PerTensor | PerChannel = PerChannel()) -> AdaRoundResult:
    """GPTQ rounding of each depthwise layer in ``inputs`` (node name -> :class:`DepthwiseInputs`).

    ``model`` is only read. Scales are the QDQ builder's (min/max int8
    symmetric, per output channel or per tensor); the result plugs into the
    QDQ builder and bias correction as AdaRound's does. The layers of one
    shape (taps, channel multiplier) are solved together, as one batch.
    """
    by_name = {node.name: node for node in model.graph}
    taken: dict[str, _Layer] = {}
    scales, axes, skipped = {}, {}, []
    for name, seen in inputs.items():
        node = by_name.get(name)
        if node is None or not is_depthwise(node):
            skipped.append((name, "not a depthwise Conv of this model"))
            continue
        weight_name, weight = node.inputs[1].name, eir.constant_array(node.inputs[1])
        axis = quantized_weight_axis(node, weight.ndim, granularity)
        if weight_name in scales:
            skipped.append((name, f"its weight {weight_name!r} {SHARED_WEIGHT}"))
            continue
        if axis not in (None, 0):
            skipped.append((name, f"its scales run along weight axis {axis}, not the output channels"))
            continue
        _, scales[weight_name], _ = quantize_per_channel(weight, axis)
        axes[weight_name] = axis
        group = node.attributes.get_int("group", 1)
        matrices = weight.astype(np.float64).reshape(group, weight.shape[0] // group, -1)
        step_sizes = channel_scales(scales[weight_name], matrices)[..., None]
        taken[name] = _Layer(node=node, weight=weight, seen=seen, step_sizes=step_sizes, steps=matrices / step_sizes)
    ints = _rounded_together(list(taken.values()))
    layers = []
    for layer, rounded in zip(taken.values(), ints):
        steps, step_sizes, gram = layer.steps, layer.step_sizes, layer.seen.gram
        nearest = np.clip(np.rint(steps), -127, 127)
        layers.append(RoundedLayer(
            node=eir.node_label(layer.node), weight=layer.node.inputs[1].name,
            samples=int(layer.seen.rows.sum(axis=0).max()),
            mse_nearest=float(np.mean(output_error((steps - nearest) * step_sizes, gram))),
            mse_learned=float(np.mean(output_error((steps - rounded) * step_sizes, gram))),
            channels_learned=int(np.any(rounded != nearest, axis=2).sum()), channels=int(np.prod(rounded.shape[:2]))))
    weights = {layer.node.inputs[1].name: rounded.reshape(layer.weight.shape)
               for layer, rounded in zip(taken.values(), ints)}
    return AdaRoundResult(weights=weights, scales=scales, axes=axes, layers=tuple(layers), skipped=tuple(skipped),
                          granularity=granularity)


@dataclass(frozen=True, kw_only=True)
class _Layer:
    """A depthwise layer to round: its node, float weight, statistics, and weights over their scales."""

    node: ir.Node
    weight: np.ndarray
    seen: DepthwiseInputs
    step_sizes: np.ndarray  # [G, N, 1]
    steps: np.ndarray  # [G, N, K]


def _rounded_together(layers: list[_Layer]) -> list[np.ndarray]:
    """:func:`_rounded` of each layer, the layers of one shape (``N``, ``K``) with both folds stacked along the
    groups and solved as one problem (each group's channels are solved alone: the result is the same)."""
    results: list[np.ndarray | None] = [None] * len(layers)
    batches: dict[tuple[int, int], list[int]] = {}
    for index, layer in enumerate(layers):
        if len(layer.seen.rows) < 2:  # one fold only: nothing to check a rounding on
            results[index] = np.clip(np.rint(layer.steps), -127, 127).astype(np.int8)
        else:
            batches.setdefault(layer.steps.shape[1:], []).append(index)
    for (_, width), members in batches.items():
        # channels rounded at a time: their three problems' K x K float64 temporaries within _TEMPORARY_BYTES
        # (all of a 224x224 MobileNetV2's 7,000 at once took 0.40 s instead of 0.10, in page faults)
        at_once = max(1, _TEMPORARY_BYTES // (3 * width * width * 8))
        steps = np.concatenate([layers[i].steps for i in members])
        folds = np.concatenate([layers[i].seen.folds for i in members], axis=1)
        rows = np.concatenate([layers[i].seen.rows for i in members], axis=1)
        parts = [slice(start, start + at_once) for start in range(0, len(steps), at_once)]
        stacked = np.concatenate(_mapped(lambda part: _rounded(steps[part], folds[:, part], rows[:, part]), parts))
        bounds = np.cumsum([0, *(len(layers[i].steps) for i in members)])
        for i, start, stop in zip(members, bounds[:-1], bounds[1:]):
            results[i] = stacked[start:stop]
    return results


def _mapped(function, items: list) -> list:
    """``[function(item) for item in items]``, on a thread per core when there are several items: the channels'
    problems are independent, and numpy's work on them runs outside the GIL for the most part (a 224x224
    MobileNetV2's 18 parts: 0.09 -> 0.07-0.08 s)."""
    workers = min(len(items), os.cpu_count() or 1)
    if workers < 2:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edgeopt-round") as pool:
        return list(pool.map(function, items))


def _rounded(steps: np.ndarray, folds: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Int8 ``[G, N, K]``: GPTQ's rounding on all the samples for each output channel whose GPTQ rounding
    fitted on one fold of them (``folds [2, G, K, K]``, means over ``rows [2, G]``) has less output error
    than the nearest rounding on the other, summed over both ways round; the nearest for the others. GPTQ's
    own guard judges it on the samples it fitted, which a 25-tap channel can overfit when they are few: a
    channel whose rounding does not carry over to unseen samples keeps the nearest. The three GPTQ
    problems (each fold, all samples) are solved as one batch."""
    nearest = np.clip(np.rint(steps), -127, 127)
    pooled_gram = DepthwiseInputs(folds=folds, rows=rows).gram
    grams = np.concatenate([folds[0], folds[1], pooled_gram])
    counts = np.concatenate([rows[0], rows[1], rows.sum(axis=0)])
    fold0, fold1, pooled = gptq_from_gram(np.concatenate([steps] * 3), grams, counts).reshape(3, *steps.shape)
    learned = output_error(steps - fold0, folds[1]) + output_error(steps - fold1, folds[0])
    nearest_error = output_error(steps - nearest, folds[1]) + output_error(steps - nearest, folds[0])
    return np.where((learned < nearest_error)[..., None], pooled, nearest).astype(np.int8)

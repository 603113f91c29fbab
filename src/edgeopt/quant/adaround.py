"""AdaRound for a model: sample each layer's inputs, learn its rounding, return int8 weights.

One pass of calibration data through ONNX Runtime samples the float model's
input of every Conv/Gemm/MatMul with a constant weight; each layer's
rounding is then learned by :func:`edgeopt.quant.adaround_solver.adaround_layer`
(the objective, its relaxation and the solvers are documented there), and
the int8 weights come back by weight tensor name, with their scales, for the
QDQ builder. ``model`` is only read.

Layouts: a layer is ``G`` independent problems ``W[G, N, K]``, ``X[G, S, K]``.
A Conv ``W[M, C/g, kh, kw]`` has ``G = g``, ``N = M/g`` and ``K = C/g kh kw``
with the im2col patches of the group's channels (a 1-D Conv ``W[M, C/g, k]`` as the 2-D Conv of
kernel ``1 x k`` over an input of height 1 that it equals); Gemm/MatMul have ``G = 1``
and the input's rows (weight ``[K, N]`` viewed as ``[N, K]``).

Samples: up to ``max_samples`` rows (patch positions) per layer, reservoir-
sampled from the calibration stream with a generator seeded by the layer's
name: deterministic for a given data order, whichever other layers are
sampled; memory ``max_samples x K`` float32 per layer, all layers at once
(one pass over the data). Inputs are the float model's. A
layer with fewer samples than weights per output channel would overfit and
is left to round-to-nearest.

Scales are the QDQ builder's: min/max int8 symmetric per output channel (or
per tensor). Each rounded layer reports its output MSE on its samples for
nearest and learned rounding.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.quant.adaround_solver import AdaRoundConfig, Backend, adaround_layer, channel_scales
from edgeopt.quant.bias_correction import round_to_nearest
from edgeopt.quant.config import PerChannel, PerTensor
from edgeopt.quant.ops import weight_axis
from edgeopt.quant.primitives import dequantize, quantize_per_channel
from edgeopt.quant.registry import Batch, ProgressCallback
from edgeopt.runtime.ort import observing_session

# AdaRoundConfig, Backend and adaround_layer live in adaround_solver; they are
# re-exported here because they are part of AdaRound's public API.
__all__ = [
    "AdaRoundConfig",
    "AdaRoundResult",
    "Backend",
    "LayerInputSampler",
    "RoundedLayer",
    "SHARED_WEIGHT",
    "adaround_layer",
    "adaround_model",
    "adaround_weights",
    "conv_geometry",
    "quantized_weight_axis",
]

logger = logging.getLogger(__name__)

#: A layer's rounding: ``(weight[G, N, K], samples[G, S, K], scales[G, N]) -> int8[G, N, K]``.
Solver = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


# --------------------------------------------------------------------------
# layer inputs from calibration data: im2col rows, reservoir-sampled
# --------------------------------------------------------------------------


class _Reservoir:
    """Algorithm R over a stream of rows, vectorized per offer; seeded, so deterministic."""

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self.capacity = capacity
        self.rng = rng
        self.seen = 0
        self.rows: np.ndarray | None = None

    def choose(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``(candidates, slots)``: which of the ``count`` next rows are kept, and where."""
        index = self.seen + np.arange(count)
        slots = np.where(index < self.capacity, index, self.rng.integers(0, index + 1))
        kept = np.flatnonzero(slots < self.capacity)
        # Later rows overwrite earlier ones in the same slot, as the sequential algorithm does.
        _, last = np.unique(slots[kept][::-1], return_index=True)
        kept = kept[::-1][last]
        self.seen += count
        return kept, slots[kept]

    def store(self, slots: np.ndarray, rows: np.ndarray) -> None:
        if self.rows is None:
            self.rows = np.zeros((self.capacity, rows.shape[1]), dtype=np.float32)
        self.rows[slots] = rows

    def result(self) -> np.ndarray | None:
        """The rows kept, as a read-only view until the next offer: a copy doubled the memory of
        AdaRound's and GPTQ's samples (MobileNetV2 at 224x224: peak RSS 910 -> 634 MB)."""
        if self.rows is None:
            return None
        rows = self.rows[: min(self.capacity, self.seen)]
        rows.flags.writeable = False
        return rows


def _conv_attributes(node: ir.Node, rank: int) -> tuple[list[int], list[int], list[int], str]:
    """``(pads, strides, dilations, auto_pad)`` of a Conv with ``rank`` spatial axes, ONNX defaults filled in."""
    return (list(node.attributes.get_ints("pads", [0] * 2 * rank)),
            list(node.attributes.get_ints("strides", [1] * rank)),
            list(node.attributes.get_ints("dilations", [1] * rank)),
            node.attributes.get_string("auto_pad", "NOTSET"))


def conv_geometry(node: ir.Node, weight: np.ndarray, spatial: tuple[int, ...]) -> tuple[list[int], ...]:
    """``(pads [top, left, bottom, right], strides, dilations, output size)`` of a 2-D Conv; of a 1-D
    Conv (weight ``[M, C/g, k]``, ``spatial`` ``(L,)``) those of the 2-D Conv it equals: kernel ``1 x k``
    over an input of height 1."""
    pads, strides, dilations, auto_pad = _conv_attributes(node, weight.ndim - 2)
    kernel, spatial = list(weight.shape[2:]), list(spatial)
    if weight.ndim == 3:
        pads, strides, dilations, kernel, spatial = ([0, pads[0], 0, pads[1]], [1, *strides], [1, *dilations],
                                                     [1, *kernel], [1, *spatial])
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0, 0, 0, 0]
        for axis in range(2):
            total = max((math.ceil(spatial[axis] / strides[axis]) - 1) * strides[axis]
                        + (kernel[axis] - 1) * dilations[axis] + 1 - spatial[axis], 0)
            small = total // 2
            pads[axis], pads[axis + 2] = (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)
    elif auto_pad != "NOTSET":
        pads = [0, 0, 0, 0]
    size = [(spatial[a] + pads[a] + pads[a + 2] - (kernel[a] - 1) * dilations[a] - 1) // strides[a] + 1
            for a in range(2)]
    return pads, strides, dilations, size


def _conv_patches(node: ir.Node, weight: np.ndarray, batch: np.ndarray, reservoir: _Reservoir) -> None:
    pads, strides, dilations, (height, width) = conv_geometry(node, weight, batch.shape[2:])
    if weight.ndim == 3:  # a 1-D Conv's [N, C, L] input as [N, C, 1, L], its kernel as 1 x k
        batch, weight = batch[:, :, None, :], weight[:, :, None, :]
    candidates, slots = reservoir.choose(batch.shape[0] * height * width)
    if len(candidates) == 0:  # the reservoir is full and keeps none of this batch
        return
    image, y, x = np.unravel_index(candidates, (batch.shape[0], height, width))
    if any(pads):
        batch = np.pad(batch, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    # a view of every patch (no copy), of which only the chosen ones are read
    span = [(weight.shape[2 + a] - 1) * dilations[a] + 1 for a in range(2)]
    windows = np.lib.stride_tricks.sliding_window_view(batch, span, axis=(2, 3))
    windows = windows[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]
    patches = windows[image, :, y, x]
    reservoir.store(slots, patches.reshape(len(candidates), -1))


def _input_rows(node: ir.Node, batch: np.ndarray) -> np.ndarray:
    """A Gemm/MatMul input as it multiplies the weight: one sample per row (of the last axis)."""
    return batch.T if node.op_type == "Gemm" and node.attributes.get_int("transA", 0) else batch


def _dense_rows(batch: np.ndarray, reservoir: _Reservoir) -> None:
    rows = batch.reshape(-1, batch.shape[-1])
    candidates, slots = reservoir.choose(rows.shape[0])
    reservoir.store(slots, rows[candidates])


def _layer_refusal(node: ir.Node | None) -> str | None:
    """Why ``node`` is not a layer AdaRound handles (None when it is)."""
    if node is None:
        return "no node of that name"
    if not eir.is_op(node, "Conv", "Gemm", "MatMul"):
        return f"{node.op_type} is not a Conv/Gemm/MatMul"
    weight = eir.constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or not np.issubdtype(weight.dtype, np.floating):
        return "the weight is not a float constant"
    if node.op_type == "Conv" and weight.ndim not in (3, 4):
        return f"only 1-D and 2-D convolutions (weight rank {weight.ndim})"
    if node.op_type != "Conv" and weight.ndim != 2:
        return f"the weight has rank {weight.ndim}, not 2"
    return None


def _name_key(name: str) -> int:
    """A layer's own seed key, from its name: its sample does not depend on which other layers are
    sampled (an --exclude, a round of the accuracy search), as a key from its position would."""
    return zlib.crc32(name.encode("utf-8"))


#: A layer's batches are offered to its reservoir together once they hold this many values (1 MiB).
_PENDING_VALUES = 1 << 18


class LayerInputSampler:
    """A calibration hook collecting up to ``max_samples`` input rows per layer (im2col for Conv).

    ``tensors`` lists what the calibration pass must fetch; ``update(feed,
    outputs)`` streams a batch; ``result()`` maps node name to rows ``[S, K]``
    (``K = C kh kw`` for a Conv, channels outermost). Nodes AdaRound cannot
    handle are listed in ``skipped`` with the reason, and not sampled.
    """

    #: The rows kept do not depend on how samples are batched (a stream of rows, image by image and
    #: position by position, whose random draws are one per row), so calibration may run batch-1 samples
    #: in groups (``edgeopt.quant.grouping``): --gptq on the benchmark's 32x32 MobileNetV3 took 1.8 s, now 0.5 s.
    groupable = True

    def __init__(self, model: ir.Model, nodes: Sequence[str], *, max_samples: int = 1024, seed: int = 0) -> None:
        by_name = {node.name: node for node in model.graph}
        refusals = {name: _layer_refusal(by_name.get(name)) for name in dict.fromkeys(nodes)}
        self.skipped = tuple((name, reason) for name, reason in refusals.items() if reason is not None)
        self._layers = {name: by_name[name] for name, reason in refusals.items() if reason is None}
        self.layers = frozenset(self._layers)  # the layers sampled
        self._weights = {name: eir.constant_array(node.inputs[1]) for name, node in self._layers.items()}
        self._reservoirs = {name: _Reservoir(max_samples, np.random.default_rng([seed, _name_key(name)]))
                            for name in self._layers}
        self.tensors = tuple(dict.fromkeys(node.inputs[0].name for node in self._layers.values()))
        self._pending: dict[str, list[np.ndarray]] = {}  # per layer, batches not yet offered to its reservoir
        self._pending_values: dict[str, int] = {}

    def update(self, feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        for name, node in self._layers.items():
            tensor = node.inputs[0].name
            if tensor in outputs:
                batch = np.asarray(outputs[tensor], dtype=np.float32)
            else:  # kept until flushed: a copy, as the caller may refill its feed's buffer for the next batch
                batch = np.array(feed[tensor], dtype=np.float32)
            if node.op_type != "Conv":
                batch = _input_rows(node, batch)
            pending = self._pending.get(name)
            if pending and pending[0].shape[1:] != batch.shape[1:]:  # samples of another shape
                self._flush(name)
            self._pending.setdefault(name, []).append(batch)
            self._pending_values[name] = self._pending_values.get(name, 0) + batch.size
            if self._pending_values[name] >= _PENDING_VALUES:
                self._flush(name)

    def _flush(self, name: str) -> None:
        """Offer a layer's pending batches to its reservoir as one: a small layer input (the batch-1
        samples of a 32x32 model) costs the same few calls for every batch, whatever its size."""
        pending = self._pending.pop(name, [])
        self._pending_values.pop(name, None)
        if not pending:
            return
        node, batch = self._layers[name], pending[0] if len(pending) == 1 else np.concatenate(pending)
        if node.op_type == "Conv":
            _conv_patches(node, self._weights[name], batch, self._reservoirs[name])
        else:
            _dense_rows(batch, self._reservoirs[name])

    def result(self) -> dict[str, np.ndarray]:
        for name in list(self._pending):
            self._flush(name)
        results = {name: reservoir.result() for name, reservoir in self._reservoirs.items()}
        return {name: rows for name, rows in results.items() if rows is not None}


# --------------------------------------------------------------------------
# a model
# --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RoundedLayer:
    """One layer's result: mean squared output error on its samples, nearest vs the learned rounding."""

    node: str
    weight: str
    samples: int
    mse_nearest: float
    mse_learned: float
    #: output channels whose learned rounding differs from the nearest, of ``channels`` (depthwise GPTQ's)
    channels_learned: int | None = None
    channels: int | None = None


@dataclass(frozen=True, kw_only=True)
class AdaRoundResult:
    """Int8 weights by weight tensor name (in the weight's own layout), their scales, and a report.

    ``weights[name]`` pairs with ``scales[name]`` along the QDQ builder's
    axis for that op (``quant.ops.weight_axis``; None when per tensor).
    """

    weights: Mapping[str, np.ndarray]
    scales: Mapping[str, np.ndarray]
    axes: Mapping[str, int | None]
    layers: tuple[RoundedLayer, ...]
    skipped: tuple[tuple[str, str], ...]
    granularity: PerTensor | PerChannel = PerChannel()

    def rounded_weights(self) -> dict[tuple[str, int | None], np.ndarray]:
        """The weights by ``(name, axis)``, for the QDQ builder: a use along another axis has other scales."""
        return {(name, self.axes[name]): ints for name, ints in self.weights.items()}

    def weight_quantizer(self):
        """``quantize_weight(weight, node)`` for bias correction: these weights, nearest for others (and for
        a use of one of these along another axis)."""
        nearest = round_to_nearest(self.granularity)

        def quantize_weight(weight: np.ndarray, node: ir.Node) -> np.ndarray:
            name = node.inputs[1].name
            axis = quantized_weight_axis(node, weight.ndim, self.granularity)
            if name not in self.weights or axis != self.axes[name]:
                return nearest(weight, node)
            return dequantize(self.weights[name], self.scales[name], 0, axis=self.axes[name])

        return quantize_weight


def _weight_matrices(node: ir.Node, weight: np.ndarray) -> np.ndarray:
    """The weight as ``[G, N, K]``: output channels of each group by that group's inputs."""
    if node.op_type == "Conv":
        group = node.attributes.get_int("group", 1)
        return weight.reshape(group, weight.shape[0] // group, -1)
    transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
    return (weight if transposed else weight.T)[None]


def _sample_matrices(node: ir.Node, rows: np.ndarray) -> np.ndarray:
    """Input rows ``[S, K_total]`` as ``[G, S, K]`` (a Conv patch lists its channels outermost)."""
    group = node.attributes.get_int("group", 1) if node.op_type == "Conv" else 1
    return rows.reshape(rows.shape[0], group, -1).transpose(1, 0, 2)


def _from_matrices(node: ir.Node, ints: np.ndarray, weight: np.ndarray) -> np.ndarray:
    if node.op_type == "Conv":
        return ints.reshape(weight.shape)
    transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
    return ints[0] if transposed else ints[0].T


def _output_mse(matrices: np.ndarray, samples: np.ndarray, quantized: np.ndarray) -> float:
    error = (matrices - quantized) @ samples.transpose(0, 2, 1)  # [G, N, S]
    return float(np.mean(error**2))


def quantized_weight_axis(node: ir.Node, rank: int, granularity: PerTensor | PerChannel) -> int | None:
    """The axis of ``node``'s weight (of rank ``rank``) that the QDQ builder gives its scales (None: one scale)."""
    if not isinstance(granularity, PerChannel):
        return None
    return granularity.axis if granularity.axis is not None else weight_axis(node, rank)


def _round_layer(node: ir.Node, rows: np.ndarray, solve: Solver,
                 granularity: PerTensor | PerChannel) -> tuple[np.ndarray, np.ndarray, int | None, RoundedLayer]:
    weight = eir.constant_array(node.inputs[1])
    axis = quantized_weight_axis(node, weight.ndim, granularity)
    nearest, scale, _ = quantize_per_channel(weight, axis)
    matrices = _weight_matrices(node, weight.astype(np.float64))
    samples = _sample_matrices(node, rows.astype(np.float64))
    row_scales = channel_scales(scale, matrices)[..., None]
    ints = solve(matrices, samples, row_scales[..., 0])
    report = RoundedLayer(
        node=eir.node_label(node), weight=node.inputs[1].name, samples=rows.shape[0],
        mse_nearest=_output_mse(matrices, samples, _weight_matrices(node, nearest) * row_scales),
        mse_learned=_output_mse(matrices, samples, ints * row_scales))
    return _from_matrices(node, ints, weight), scale, axis, report


#: How a layer whose weight an earlier layer rounded already is skipped (which one rounds it depends on
#: which layers are there).
SHARED_WEIGHT = "is shared with an earlier layer"


def _refusal(node: ir.Node | None, rows: np.ndarray, done: Mapping[str, np.ndarray], capacity: int) -> str | None:
    reason = _layer_refusal(node)
    if reason is not None:
        return reason
    if node.inputs[1].name in done:
        return f"its weight {node.inputs[1].name!r} {SHARED_WEIGHT}"
    width = _weight_matrices(node, eir.constant_array(node.inputs[1])).shape[2]
    if rows.shape[0] < width <= capacity:
        return (f"{rows.shape[0]} input samples for {width} weights per output channel would overfit: "
                "give more calibration data")
    if rows.shape[0] < width:  # no data fills a sample wider than its capacity
        return (f"{width} weights per output channel, and a layer's sample holds {capacity} input rows: "
                "too wide to learn")
    return None


def _finite_rows(name: str, rows: np.ndarray) -> np.ndarray:
    """``rows`` without those holding inf/NaN (a Log of a zero upstream): they say nothing of the
    rounding, and a single one makes the solvers' sums NaN, every weight of the layer with them."""
    finite = np.isfinite(rows).all(axis=1)
    if finite.all():
        return rows
    logger.info("%s: %d of %d input samples hold inf/NaN, left out", name, rows.shape[0] - finite.sum(), len(rows))
    return rows[finite]


def adaround_weights(model: ir.Model, samples: Mapping[str, np.ndarray], *,
                     config: AdaRoundConfig = AdaRoundConfig(),
                     granularity: PerTensor | PerChannel = PerChannel(),
                     progress: ProgressCallback | None = None, solver: Solver | None = None) -> AdaRoundResult:
    """Learn the rounding of every layer in ``samples`` (node name -> rows, :class:`LayerInputSampler`).

    ``model`` is only read. Scales are the QDQ builder's: min/max int8
    symmetric per output channel (or per tensor with ``PerTensor()``). A
    layer with fewer samples than weights per output channel is skipped.
    ``progress(done, total)`` counts layers. ``solver(weight[G, N, K],
    samples[G, S, K], scales[G, N])`` rounds a layer: AdaRound with ``config``
    by default, or e.g. :func:`edgeopt.quant.gptq.gptq_layer`.
    """
    solve = solver or (lambda weight, rows, scales: adaround_layer(weight, rows, scales, config))
    by_name = {node.name: node for node in model.graph}
    weights, scales, axes, layers, skipped = {}, {}, {}, [], []
    for done, (name, rows) in enumerate(samples.items(), start=1):
        node, rows = by_name.get(name), _finite_rows(name, rows)
        refusal = _refusal(node, rows, weights, config.max_samples)
        if refusal is not None:
            skipped.append((name, refusal))
        else:
            ints, scale, axis, report = _round_layer(node, rows, solve, granularity)
            weights[report.weight], scales[report.weight], axes[report.weight] = ints, scale, axis
            layers.append(report)
            logger.info("learned rounding %s: output mse %.3g -> %.3g", name, report.mse_nearest, report.mse_learned)
        if progress is not None:
            progress(done, len(samples))
    return AdaRoundResult(weights=weights, scales=scales, axes=axes, layers=tuple(layers), skipped=tuple(skipped),
                          granularity=granularity)


def adaround_model(model: ir.Model, data: Iterable[Batch], *, nodes: Sequence[str] | None = None,
                   config: AdaRoundConfig = AdaRoundConfig(),
                   granularity: PerTensor | PerChannel = PerChannel(),
                   progress: ProgressCallback | None = None) -> AdaRoundResult:
    """AdaRound for ``nodes`` (default: every Conv/Gemm/MatMul with a constant weight) of ``model``.

    One pass of ``data`` through ONNX Runtime samples each layer's inputs
    (:class:`LayerInputSampler`), then :func:`adaround_weights` learns the
    rounding. ``model`` is only read; the int8 weights are returned by
    weight tensor name for the QDQ builder.
    """
    names = list(nodes) if nodes is not None else [n.name for n in model.graph if _layer_refusal(n) is None]
    sampler = LayerInputSampler(model, names, max_samples=config.max_samples, seed=config.seed)
    inputs = {spec.name for spec in eir.model_inputs(model)}
    fetch = [name for name in sampler.tensors if name not in inputs]
    session = observing_session(model, fetch)
    for batch in data:
        sampler.update(batch, session.run(batch, fetch) if fetch else {})
    result = adaround_weights(model, sampler.result(), config=config, granularity=granularity, progress=progress)
    return dataclasses.replace(result, skipped=(*sampler.skipped, *result.skipped))

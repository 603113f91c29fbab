"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", section 4.2).

Quantizing a weight ``W`` to ``W~ = W + e`` shifts the layer's expected output::

    E[W~ x] - E[W x] = e E[x]

The rounding errors of one output channel need not cancel (a depthwise
channel sums only ``k*k`` of them), so the shift is biased, and the layers
after add theirs. Subtracting it from the bias, ``b' = b - e mu`` with
``mu = E[x]`` the per-channel mean of the layer's input, makes the quantized
layer right on average. Per op:

* Conv ``W[M, C/g, k...]``: ``shift_o = sum_{c,k} e[o, c, k] mu[g(o) C/g + c]``
  with ``g(o) = o // (M/g)`` the group of output channel ``o``. This takes
  every kernel tap's expected input to be the channel mean, i.e. spatially
  stationary statistics: exact for 1x1 stride-1 convolutions; for larger
  kernels each tap sees a shifted window, and where the kernel overlaps zero
  padding the true shift is smaller. That is the standard approximation:
  one correction per channel, right on average over positions.
* Gemm ``y = alpha A B + beta C``: ``shift = alpha mu e`` (``e`` as ``[K, N]``;
  ``transB`` transposes it) and ``C' = C - shift / beta``; a Gemm without
  ``C`` gets one.
* MatMul ``A[..., K] @ B[K, N]``: ``shift = mu e``, taken off the constant of
  the Add that reads the MatMul alone (the bias of an exported Linear).

``mu`` is measured on calibration data ("empirical" correction) with
:class:`ChannelMeanObserver`: the mean of the *float* model's input to each
layer, one pass, streamed. Each layer thus corrects its own weight error; a
shift its inputs inherit from earlier layers is removed by those layers'
corrections.

The quantized weight ``W~`` comes from ``quantize_weight(W, node)``, by
default round-to-nearest int8 per output channel (:func:`round_to_nearest`);
AdaRound's weights plug in the same way. Only layers whose weight is
quantized are corrected (``layers``): one that stays float (``--exclude``,
the accuracy search) has no weight error, and a shift would add one.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.quant.channel_stats import ChannelMeanHook, ChannelMeanObserver, ChannelMeans
from edgeopt.quant.config import PerChannel, PerTensor
from edgeopt.quant.ops import weight_axis
from edgeopt.quant.primitives import dequantize, quantize_per_channel

__all__ = [
    "BiasCorrectionReport",
    "ChannelMeanHook",
    "ChannelMeanObserver",
    "ChannelMeans",
    "CorrectedLayer",
    "WeightQuantizer",
    "correct_biases",
    "correction_inputs",
    "round_to_nearest",
]

_LINEAR = ("Conv", "Gemm", "MatMul")

#: ``quantize_weight(weight, node)`` -> the dequantized weight, same shape and layout.
WeightQuantizer = Callable[[np.ndarray, ir.Node], np.ndarray]


def _input_channel_axis(node: ir.Node) -> int:
    if node.op_type == "Conv":
        return 1
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transA", 0) else 1
    return -1


def _is_linear(node: ir.Node) -> bool:
    return eir.is_op(node, *_LINEAR)


def _float_weight(node: ir.Node) -> np.ndarray | None:
    weight = eir.constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    return weight if weight is not None and np.issubdtype(weight.dtype, np.floating) else None


def _corrected_layers(model: ir.Model, layers: Collection[str] | None) -> list[ir.Node]:
    """Conv/Gemm/MatMul nodes with an input, among ``layers`` (node names; None: all of them)."""
    return [node for node in model.graph if _is_linear(node) and node.inputs[0] is not None
            and (layers is None or node.name in layers)]


def correction_inputs(model: ir.Model, layers: Collection[str] | None = None) -> dict[str, int]:
    """The tensors whose channel means bias correction needs: input name -> channel axis.
    ``layers``: the names of the nodes whose weights are quantized (None: every linear layer)."""
    tensors: dict[str, int] = {}
    for node in _corrected_layers(model, layers):
        if _float_weight(node) is not None:
            tensors.setdefault(node.inputs[0].name, _input_channel_axis(node))
    return tensors


# --------------------------------------------------------------------------
# weight quantizer
# --------------------------------------------------------------------------


def round_to_nearest(granularity: PerTensor | PerChannel = PerChannel()) -> WeightQuantizer:
    """Int8 symmetric round-to-nearest, per output channel (or per tensor), as the QDQ builder does."""

    def quantize_weight(weight: np.ndarray, node: ir.Node) -> np.ndarray:
        axis = None
        if isinstance(granularity, PerChannel):
            axis = granularity.axis if granularity.axis is not None else weight_axis(node, weight.ndim)
        q, scale, zero_point = quantize_per_channel(weight, axis)
        return dequantize(q, scale, zero_point, axis=axis)

    return quantize_weight


# --------------------------------------------------------------------------
# the correction
# --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CorrectedLayer:
    """``node``'s bias ``tensor`` moved by ``-shift``; ``max_shift`` = max |shift|."""

    node: str
    tensor: str
    max_shift: float
    mean_shift: float


@dataclass(frozen=True, kw_only=True)
class BiasCorrectionReport:
    corrected: tuple[CorrectedLayer, ...]
    skipped: tuple[tuple[str, str], ...]  # (node, reason)

    @property
    def modified(self) -> bool:
        return bool(self.corrected)

    def explain(self) -> list[str]:
        lines = [f"{c.node}: bias {c.tensor!r} corrected (max shift {c.max_shift:.3g})" for c in self.corrected]
        return lines + [f"{node}: bias not corrected: {reason}" for node, reason in self.skipped]


def _conv_shift(error: np.ndarray, mean: np.ndarray, group: int) -> np.ndarray:
    outputs, per_group = error.shape[:2]
    summed = error.reshape(outputs, per_group, -1).sum(axis=2)  # [M, C/g]
    per_output = np.repeat(mean.reshape(group, per_group), outputs // group, axis=0)
    return (summed * per_output).sum(axis=1)


def _output_shift(node: ir.Node, error: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``e mu`` per output channel, for the layout of ``node``'s weight."""
    if node.op_type == "Conv":
        return _conv_shift(error, mean, node.attributes.get_int("group", 1))
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        error = error.T
    shift = mean @ error  # [K] @ [K, N]
    return shift * node.attributes.get_float("alpha", 1.0) if node.op_type == "Gemm" else shift


def _expected_inputs(node: ir.Node, weight: np.ndarray) -> int:
    if node.op_type == "Conv":
        return weight.shape[1] * node.attributes.get_int("group", 1)
    transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
    return weight.shape[1] if transposed else weight.shape[0]


def _bias_slot(node: ir.Node) -> tuple[ir.Node, int, float] | str:
    """``(node holding the bias, input index, divisor)`` for the shift, or why there is none."""
    if node.op_type == "Conv":
        return node, 2, 1.0
    if node.op_type == "Gemm":
        beta = node.attributes.get_float("beta", 1.0) if len(node.inputs) > 2 and node.inputs[2] is not None else 1.0
        return (node, 2, beta) if beta != 0.0 else "Gemm has beta = 0"
    output = node.outputs[0]
    readers = eir.consumers(output)
    if output.is_graph_output() or len(readers) != 1 or readers[0].op_type != "Add":
        return "the MatMul output is not read by one Add alone (no bias to correct)"
    add = readers[0]
    index = 1 if add.inputs[0] is output else 0
    if eir.constant_array(add.inputs[index]) is None:
        return "the Add after the MatMul has no constant bias"
    return add, index, 1.0


def _new_bias(holder: ir.Node, index: int, shift: np.ndarray, dtype: np.dtype) -> np.ndarray | str:
    old_value = holder.inputs[index] if len(holder.inputs) > index else None
    old = eir.constant_array(old_value) if old_value is not None else np.zeros(shift.shape, dtype=dtype)
    if old is None:
        return "the bias is not a constant"
    if old.size not in (1, shift.size) and old.shape[-1] != shift.size:
        return f"the bias has shape {list(old.shape)}, not per output channel"
    if holder.op_type == "Conv":
        old = np.broadcast_to(old.reshape(-1), shift.shape)
    elif old.size == 1:
        old = np.broadcast_to(old.reshape(()), shift.shape)
    return (old.astype(np.float64) - shift).astype(old.dtype)


def _correct_layer(graph: ir.Graph, node: ir.Node, mean: np.ndarray | None,
                   quantize_weight: WeightQuantizer) -> CorrectedLayer | str:
    weight = _float_weight(node)
    if weight is None:
        return "the weight is not a float constant"
    if node.op_type != "Conv" and weight.ndim != 2:
        return f"the weight has rank {weight.ndim}, not 2"
    if mean is None:
        return f"no channel means for its input {node.inputs[0].name!r}"
    if mean.size != _expected_inputs(node, weight):
        return f"{mean.size} channel means for {_expected_inputs(node, weight)} input channels"
    slot = _bias_slot(node)
    if isinstance(slot, str):
        return slot
    holder, index, divisor = slot
    error = quantize_weight(weight, node).astype(np.float64)
    error -= weight  # in float64: the weight widens exactly, without a float64 copy of its own
    shift = _output_shift(node, error, np.asarray(mean, dtype=np.float64)) / divisor
    bias = _new_bias(holder, index, shift, weight.dtype)
    if isinstance(bias, str):
        return bias
    old = holder.inputs[index] if len(holder.inputs) > index else None
    hint = old.name if old is not None and old.name else f"{node.inputs[1].name}_bias"
    stored = eir.replace_constant_input(graph, holder, index, bias, hint)
    if holder.op_type == "Gemm":
        holder.attributes["beta"] = ir.AttrFloat32("beta", divisor)
    return CorrectedLayer(node=eir.node_label(node), tensor=stored.name, max_shift=float(np.abs(shift).max()),
                          mean_shift=float(np.abs(shift).mean()))


def _other_axis(node: ir.Node, axes: Mapping[str, int]) -> str | None:
    """Why ``node`` cannot use its input's means: they average another axis (a Conv's channels on axis 1
    and a MatMul's on the last axis of one tensor), else None."""
    value, axis = node.inputs[0], _input_channel_axis(node)
    gathered = axes.get(value.name, axis) if _float_weight(node) is not None else axis  # else: told why below
    rank = len(value.shape) if value.shape is not None else None
    if gathered == axis or (rank is not None and gathered % rank == axis % rank):
        return None
    return f"its input {value.name!r} is averaged on axis {gathered} for another layer, not on its axis {axis}"


def correct_biases(model: ir.Model, input_means: Mapping[str, np.ndarray], *,
                   quantize_weight: WeightQuantizer | None = None,
                   layers: Collection[str] | None = None) -> BiasCorrectionReport:
    """Move each Conv/Gemm/MatMul bias by ``-(W~ - W) E[x]``, in place.

    ``input_means`` maps a layer's input tensor name to its per-channel mean
    (:class:`ChannelMeanHook` of :func:`correction_inputs`: on the axis of the tensor's first
    reader; a layer reading it on another axis is skipped); ``quantize_weight`` gives the dequantized
    weight the quantized model will use (default :func:`round_to_nearest`).
    ``layers`` names the nodes whose weights are quantized (None: every
    Conv/Gemm/MatMul); the others are left alone. The weights are not
    changed. Rewrites the model it is given; a bias read only by its layer
    keeps its name, a Conv/Gemm without bias gets one.
    """
    quantize_weight = quantize_weight or round_to_nearest()
    corrected, skipped = [], []
    axes = correction_inputs(model, layers)  # the axis each input's means were gathered on (its first reader's)
    for node in _corrected_layers(model, layers):
        outcome = _other_axis(node, axes) or _correct_layer(model.graph, node, input_means.get(node.inputs[0].name),
                                                            quantize_weight)
        if isinstance(outcome, str):
            skipped.append((eir.node_label(node), outcome))
        else:
            corrected.append(outcome)
    handled = {node.name for node in _corrected_layers(model, layers)}
    skipped += [(eir.node_label(node), f"a {node.op_type} has no bias correction (Conv, Gemm and MatMul have)")
                for node in model.graph if layers is not None and node.name in layers and node.name not in handled]
    return BiasCorrectionReport(corrected=tuple(corrected), skipped=tuple(skipped))

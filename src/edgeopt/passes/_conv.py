"""Per-output-channel arithmetic on Conv/ConvTranspose/Gemm/MatMul weights.

A per-channel affine map after a linear layer folds into it:
``s * (W x + b) + t = (s W) x + (s b + t)``, with ``s`` scaling output
channel ``o`` of the weight. Where that channel lives depends on the op:

* Conv ``W[M, C/g, k...]``: axis 0.
* ConvTranspose ``W[C, M/g, k...]``: output channel ``o = gi * M/g + j``
  is column ``j`` of group ``gi``'s rows, so ``W`` is viewed as
  ``[g, C/g, M/g, k...]`` and scaled by ``s`` viewed as ``[g, 1, M/g, 1...]``.
* Gemm ``B[K, N]`` (``B[N, K]`` with transB) and MatMul ``B[K, N]``: the
  ``N`` axis.

Math runs in float64 and is cast back to the weight's dtype.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.passes._matching import shape_text

__all__ = [
    "LINEAR_OPS",
    "LinearParts",
    "as_channel_vector",
    "fold_refusal",
    "foldable_parts",
    "linear_parts",
    "store_parts",
    "vector_refusal",
]

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclasses.dataclass
class LinearParts:
    """The node, its constant weight and bias (None when absent) and output-channel count."""

    node: ir.Node
    weight: np.ndarray
    bias: np.ndarray | None
    channels: int

    @property
    def output_rank(self) -> int | None:
        """Rank of the node's output when the op fixes it (Conv/ConvTranspose/Gemm)."""
        if self.node.op_type in ("Conv", "ConvTranspose"):
            return self.weight.ndim
        return 2 if self.node.op_type == "Gemm" else None

    def scaled(self, scale: np.ndarray) -> np.ndarray:
        """The weight with output channel ``o`` multiplied by ``scale[o]`` (a new float64 array, scaled
        in place: a ResNet-18's weights are 94 MB in float64)."""
        weight = self.weight.astype(np.float64)
        op = self.node.op_type
        if op == "Conv":
            weight *= scale.reshape(-1, *[1] * (weight.ndim - 1))
        elif op == "ConvTranspose":
            group = self.node.attributes.get_int("group", 1)
            grouped = weight.reshape(group, weight.shape[0] // group, *weight.shape[1:])
            grouped *= scale.reshape(group, 1, -1, *[1] * (weight.ndim - 2))
        elif op == "Gemm" and self.node.attributes.get_int("transB", 0):
            weight *= scale.reshape(-1, 1)
        else:
            weight *= scale.reshape(1, -1)
        return weight

    def bias_or_zero(self) -> np.ndarray:
        if self.bias is None:
            return np.zeros(self.channels)
        return np.broadcast_to(self.bias.astype(np.float64).reshape(-1), (self.channels,))


def _channels(node: ir.Node, weight: np.ndarray) -> int:
    op = node.op_type
    if op == "Conv":
        return weight.shape[0]
    if op == "ConvTranspose":
        return weight.shape[1] * node.attributes.get_int("group", 1)
    if op == "Gemm" and node.attributes.get_int("transB", 0):
        return weight.shape[0]
    return weight.shape[-1]


def linear_parts(node: ir.Node) -> LinearParts | str:
    """The constant weight and bias of ``node``, or why they are not usable."""
    label = eir.node_label(node)
    weight = eir.constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None:
        return f"{label} weight is not a constant"
    if not np.issubdtype(weight.dtype, np.floating):
        return f"{label} weight is {weight.dtype}, not float"
    if node.op_type in ("Gemm", "MatMul") and weight.ndim != 2:
        return f"{label} weight has rank {weight.ndim}, not 2"
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias = eir.constant_array(bias_value) if bias_value is not None else None
    if bias_value is not None and bias is None:
        return f"{label} bias is not a constant"
    channels = _channels(node, weight)
    if bias is not None and not (bias.size == 1 or (bias.shape[-1] == channels and bias.size == channels)):
        return f"{label} bias has shape {shape_text(bias.shape)}, not per output channel"
    if bias is not None and node.op_type == "Gemm":  # fold beta in; store_parts sets beta = 1
        bias = bias * node.attributes.get_float("beta", 1.0)
    return LinearParts(node=node, weight=weight, bias=bias, channels=channels)


def foldable_parts(node: ir.Node, follower: ir.Node) -> LinearParts | str:
    """``node``'s constant weight and bias when ``follower`` may fold into it, else why not."""
    reason = fold_refusal(node, follower)
    return reason if reason is not None else linear_parts(node)


def fold_refusal(node: ir.Node, follower: ir.Node) -> str | None:
    """Why ``follower`` cannot absorb into ``node``'s output (None when it can)."""
    output = node.outputs[0]
    if output.is_graph_output():
        return f"{node.op_type} output {output.name!r} is a graph output"
    readers = eir.consumers(output)
    if len(readers) != 1:
        return f"{node.op_type} output has {len(readers)} consumers"
    if readers[0] is not follower:
        return f"{node.op_type} output feeds {eir.node_label(readers[0])}"
    return None


def vector_refusal(array: np.ndarray, output_rank: int, channels: int) -> str | None:
    """Why a constant does not broadcast along the channel axis (1) only, or None."""
    if array.size == 1 and array.ndim <= output_rank:
        return None
    shown = shape_text(array.shape)
    if array.ndim > output_rank:
        return f"constant has shape {shown}, of higher rank than the output ({output_rank})"
    padded = (1,) * (output_rank - array.ndim) + tuple(array.shape)
    if padded[1] == channels and all(d == 1 for i, d in enumerate(padded) if i != 1):
        return None
    expected = ",".join(["1", str(channels)] + ["1"] * (output_rank - 2))
    return f"constant has shape {shown}, not per-channel (expected [{expected}] or a scalar)"


def as_channel_vector(array: np.ndarray, channels: int) -> np.ndarray:
    """A per-channel constant (checked by :func:`vector_refusal`) as a float64 vector."""
    return np.broadcast_to(array.astype(np.float64).reshape(-1), (channels,)).copy()


def store_parts(graph: ir.Graph, node: ir.Node, weight: np.ndarray | None, bias: np.ndarray) -> None:
    """Give ``node`` a new bias initializer, and a new weight unless ``weight`` is None.

    Both are cast to the old weight's dtype; the old tensors are not touched.
    """
    dtype = eir.constant_array(node.inputs[1]).dtype
    hint = node.inputs[1].name or f"{eir.node_label(node)}.weight"
    old_weight = node.inputs[1]
    if weight is not None:
        node.replace_input_with(1, eir.add_initializer(graph, weight.astype(dtype), f"{hint}_folded"))
        eir.drop_if_unused(graph, old_weight)
    old_bias = node.inputs[2] if len(node.inputs) > 2 else None
    bias_hint = f"{old_bias.name}_folded" if old_bias is not None and old_bias.name else f"{hint}_bias"
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, eir.add_initializer(graph, bias.astype(dtype), bias_hint))
    eir.drop_if_unused(graph, old_bias)
    if node.op_type == "Gemm":
        node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)

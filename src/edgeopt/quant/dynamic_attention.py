"""Dynamic int8 of ONNX Runtime's fused ``com.microsoft.Attention``: its ``QAttention``.

ONNX Runtime's transformer optimizer packs a layer's Q, K and V projections into one Attention node whose
weight ``[hidden, 3 * hidden]`` is an input: no MatMul is left for dynamic int8 to rewrite. QAttention takes
that weight in int8, one scale per output column (``PerChannel``) or one (``PerTensor``), and the layer's
input as uint8 with its scale and zero point, which a DynamicQuantizeLinear computes as the model runs (shared
with any MatMul reading the same input). The weights use 7 bits (``[-63, 63]``), as ONNX Runtime's own
quantizer writes them for QAttention: its u8 x s8 products are then safe from 16-bit saturation on CPUs
without int8 dot-product instructions. Bias, mask and past carry over with the attributes.

An Attention with ``qkv_hidden_sizes`` (Q, K and V of different sizes) or another attribute QAttention's
schema lacks (``rotary_embedding_dim``: ONNX Runtime refuses to load a QAttention holding it), one reading an
attention bias or a past sequence length (inputs QAttention does not take), or whose weight is not a constant
float32 matrix, stays float with the reason.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.quant.formats import INT8_SYMMETRIC
from edgeopt.quant.int4_lowering import MS_DOMAIN, drop_unread
from edgeopt.quant.primitives import quantize_per_channel
from edgeopt.quant.registry import TensorQuantInfo

__all__ = ["QATTENTION_FORMAT", "AttentionWeights", "attention_refusal", "lower_attention"]

#: QAttention's weights: int8 storage, 7 bits used (ONNX Runtime's reduce_range)
QATTENTION_FORMAT = dataclasses.replace(INT8_SYMMETRIC, name="int7_symmetric", qmin=-63, qmax=63)
#: The attributes of ONNX Runtime's QAttention schema (com.microsoft, version 1), all Attention's too
_QATTENTION_ATTRIBUTES = frozenset({"num_heads", "unidirectional", "mask_filter_value", "scale", "do_rotary",
                                    "past_present_share_buffer"})


def attention_refusal(node: ir.Node) -> str | None:
    """Why the Attention ``node`` cannot become QAttention, or None."""
    if "qkv_hidden_sizes" in node.attributes:
        return "its Q, K and V have different sizes (qkv_hidden_sizes), which QAttention does not take"
    unknown = sorted(set(node.attributes) - _QATTENTION_ATTRIBUTES)
    if unknown:
        return f"it has attribute {', '.join(unknown)}, which QAttention does not take"
    if any(value is not None for value in node.inputs[5:]):
        return "it reads an attention bias or a past sequence length, which QAttention does not take"
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return "it has no bias, which QAttention requires"
    weight = eir.constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None:
        return "its weight is not a constant: dynamic int8 needs constant weights"
    if weight.dtype != np.float32 or weight.ndim != 2:
        return f"its weight is a {weight.ndim}-D {weight.dtype} tensor, not the float32 matrix QAttention takes"
    if not np.isfinite(weight).all():
        return "its weight holds inf or NaN, which no int8 scale can represent"
    source = node.inputs[0]
    if source is None or (source.type is not None and source.type.dtype not in (ir.DataType.FLOAT, None)):
        return "its input is not float32: DynamicQuantizeLinear reads float32"
    return None


class AttentionWeights:
    """The QAttention constants of each Attention weight (int8 values, scales, zero points), made once in
    ``graph`` (the main graph) however many Attention nodes read the weight (ALBERT shares its layers')."""

    def __init__(self, graph: ir.Graph, names, per_channel: bool) -> None:
        self.graph, self.names, self.per_channel = graph, names, per_channel
        self.made: dict[ir.Value, tuple[tuple[ir.Value, ir.Value, ir.Value], TensorQuantInfo]] = {}

    def of(self, weight_value: ir.Value) -> tuple[tuple[ir.Value, ir.Value, ir.Value], TensorQuantInfo, int]:
        """The constants, the weight's report, and the bytes they add (0 when already made)."""
        if weight_value in self.made:
            return (*self.made[weight_value], 0)
        weight = eir.constant_array(weight_value)
        q, scale, _ = quantize_per_channel(weight, 1 if self.per_channel else None, QATTENTION_FORMAT)
        base = weight_value.name or "attention_weight"
        constants = (eir.register_array(self.graph, self.names(f"{base}_quantized"), q),
                     eir.register_array(self.graph, self.names(f"{base}_scale"), scale.astype(np.float32)),
                     eir.register_array(self.graph, self.names(f"{base}_zero_point"), np.zeros(scale.shape, np.int8)))
        info = TensorQuantInfo.symmetric_weight(weight_value.name, "Attention", QATTENTION_FORMAT.name,
                                                (float(weight.min()), float(weight.max())), scale,
                                                1 if self.per_channel else None)
        self.made[weight_value] = (constants, info)
        return constants, info, sum(value.const_value.nbytes for value in constants)


def lower_attention(node: ir.Node, weights: AttentionWeights, quantized_input) -> tuple[TensorQuantInfo, int]:
    """Replace the Attention ``node`` by QAttention reading ``quantized_input(value, graph)``'s outputs
    (DynamicQuantizeLinear's) and its weight's constants from ``weights``. Its weight's report and the bytes
    its constants add."""
    weight_value = node.inputs[1]
    (q_value, scale_value, zero_value), info, added_bytes = weights.of(weight_value)
    x_q, x_scale, x_zero_point = quantized_input(node.inputs[0], node.graph)
    inputs = [x_q, q_value, node.inputs[2], x_scale, scale_value, node.inputs[3] if len(node.inputs) > 3 else None,
              x_zero_point, zero_value, node.inputs[4] if len(node.inputs) > 4 else None]
    while inputs[-1] is None:
        inputs.pop()
    attention = ir.Node(MS_DOMAIN, "QAttention", inputs, list(node.attributes.values()),
                        num_outputs=len(node.outputs), name=weights.names(f"{node.name or 'attention'}_int8"),
                        version=1)
    ir.convenience.replace_nodes_and_values(node.graph, node, [node], [attention], list(node.outputs),
                                            list(attention.outputs))
    drop_unread(weight_value)
    return info, added_bytes

"""Dynamic int8 of LSTM layers: ONNX Runtime's ``com.microsoft.DynamicQuantizeLSTM``.

An LSTM's input and recurrent weights ``W [D, 4H, I]`` and ``R [D, 4H, H]`` (D directions, the four gates'
rows stacked) hold nearly all of a speech or keyword-spotting model's weights. DynamicQuantizeLSTM takes them
in int8, symmetric, one scale per gate row (``PerChannel``) or one per direction (``PerTensor``), stored
transposed (``[D, I, 4H]``, ``[D, H, 4H]``: each row's values along the last axis), with the scales and zero
points ``[D, 4H]`` (or ``[D]``); it quantizes the input and hidden state of every step as it runs, and
computes the gates with integer GEMMs. The LSTM's other inputs (bias, sequence lengths, initial states,
peepholes) and attributes carry over; a batch-first LSTM (``layout = 1``) has no such form and stays float,
as does one whose W or R is not a constant float32 3-D tensor. GRU and RNN have no quantized form in ONNX
Runtime and stay float.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.quant.formats import INT8_SYMMETRIC
from edgeopt.quant.int4_lowering import MS_DOMAIN, drop_unread
from edgeopt.quant.primitives import quantize_per_channel
from edgeopt.quant.registry import TensorQuantInfo

__all__ = ["LoweredLstm", "lower_lstm", "lstm_refusal"]



def lstm_refusal(node: ir.Node) -> str | None:
    """Why ``node`` (an LSTM) cannot become DynamicQuantizeLSTM, or None."""
    if node.attributes.get_int("layout", 0):
        return "layout=1 (batch-first): ONNX Runtime's DynamicQuantizeLSTM takes sequence-first inputs"
    for index, label in ((1, "W"), (2, "R")):
        weight = eir.constant_array(node.inputs[index]) if len(node.inputs) > index else None
        if weight is None:
            return f"its {label} is not a constant: dynamic int8 needs constant weights"
        if weight.dtype != np.float32 or weight.ndim != 3:
            return f"its {label} is a {weight.ndim}-D {weight.dtype} tensor, not the 3-D float32 an LSTM's is"
        if not np.isfinite(weight).all():
            return f"its {label} holds inf or NaN, which no int8 scale can represent"
    return None


class LoweredLstm:
    """What :func:`lower_lstm` stored: how many LSTMs, each distinct weight's report and int8 constants
    (LSTMs sharing a W or R share them), and bytes before and after."""

    def __init__(self) -> None:
        self.count = 0
        self.tensors: list[TensorQuantInfo] = []
        self.stored: dict[ir.Value, tuple[ir.Value, ir.Value, ir.Value]] = {}
        self.float_bytes = 0
        self.int8_bytes = 0


def _quantized(graph: ir.Graph, names, value: ir.Value, per_channel: bool, done: LoweredLstm,
               op_type: str) -> tuple[ir.Value, ir.Value, ir.Value]:
    """``value`` ([D, 4H, K]) as DynamicQuantizeLSTM's int8 ``[D, K, 4H]``, scales and zero points, made once
    however many LSTMs read it."""
    if value in done.stored:
        return done.stored[value]
    weight = eir.constant_array(value)
    directions, rows, _ = weight.shape
    if per_channel:  # one scale per gate row of each direction
        q, scale, _ = quantize_per_channel(weight.reshape(directions * rows, -1), 0, INT8_SYMMETRIC)
        q, scale = q.reshape(weight.shape), scale.reshape(directions, rows)
    else:  # one per direction
        parts = [quantize_per_channel(weight[d], None, INT8_SYMMETRIC) for d in range(directions)]
        q = np.stack([part[0] for part in parts])
        scale = np.array([float(part[1]) for part in parts], np.float32)
    base = value.name or "weight"
    stored = [eir.register_array(graph, names(f"{base}_{suffix}"), array)
              for suffix, array in (("quantized", q.transpose(0, 2, 1)), ("scale", scale.astype(np.float32)),
                                    ("zero_point", np.zeros(scale.shape, np.int8)))]
    done.float_bytes += weight.nbytes
    done.int8_bytes += sum(v.const_value.nbytes for v in stored)
    done.tensors.append(TensorQuantInfo.symmetric_weight(
        value.name, op_type, INT8_SYMMETRIC.name, (float(weight.min()), float(weight.max())), scale,
        1 if per_channel else None))
    done.stored[value] = stored[0], stored[1], stored[2]
    return done.stored[value]


def lower_lstm(graph: ir.Graph, names, node: ir.Node, per_channel: bool, done: LoweredLstm) -> None:
    """Replace the LSTM ``node`` by DynamicQuantizeLSTM; its new constants go to ``graph`` (the main graph)."""
    w, r = node.inputs[1], node.inputs[2]
    w_q, w_scale, w_zero = _quantized(graph, names, w, per_channel, done, node.op_type)
    r_q, r_scale, r_zero = _quantized(graph, names, r, per_channel, done, node.op_type)
    optional = [*node.inputs[3:8], *[None] * (8 - max(len(node.inputs), 3))]
    inputs = [node.inputs[0], w_q, r_q, *optional, w_scale, w_zero, r_scale, r_zero]
    attributes = [attribute for name, attribute in node.attributes.items() if name != "layout"]
    lstm = ir.Node(MS_DOMAIN, "DynamicQuantizeLSTM", inputs, attributes, num_outputs=len(node.outputs),
                   name=names(f"{node.name or 'lstm'}_int8"), version=1)
    ir.convenience.replace_nodes_and_values(node.graph, node, [node], [lstm], list(node.outputs),
                                            list(lstm.outputs))
    for value in (w, r):
        drop_unread(value)
    done.count += 1

"""HardSwish and HardSigmoid in integer on ONNX Runtime, which has no integer kernel for either.

Both are a clamp of an affine function, and a clamp is what quantization does at its ends:

* ``hardsigmoid(x) = clip(alpha * x + beta, 0, 1) = alpha * clip(x + beta / alpha, 0, 1 / alpha)``:
  an ``Add`` of the constant ``beta / alpha`` whose ``QuantizeLinear`` saturates at 0 and ``1 / alpha``,
  read back by a ``DequantizeLinear`` whose scale is the Q's times ``alpha``. Where the HardSigmoid's
  output is already quantized over a range inside [0, 1] (its calibrated range), that Q only changes its scale;
  the rounding is the same.
* ``hardswish(x) = x * hardsigmoid(x; 1/6, 1/2) = x * clip(x + 3, 0, 6) / 6``: the same with a gate
  quantized over exactly [0, 6] (``scale = 6 / (levels - 1)``, zero point at the format's minimum) read back
  over [0, 1], and a ``Mul`` of ``x`` by that gate.

ONNX Runtime fuses the ``DQ -> Add -> Q`` and ``DQ -> Mul -> Q`` of uint8 activations (its x86 kernels' type:
with int8 ones it fuses neither, and the ops stay float) into QLinearAdd and QLinearMul: two passes
over the tensor in integer, where the float op cost a DequantizeLinear, a HardSigmoid, a Mul and a
QuantizeLinear (``benchmarks/hardswish.py``: a MobileNetV3-Large at 224x224 in 3.03 ms instead of 3.23 on one
core). The gate is rounded to 1/255: below the output's own rounding where the input spans 6 or more, and only
there is a HardSwish rewritten (:func:`without_integer_form` tells placement which are not, so they are placed
as ops without a kernel). The Q -> DQ pair of the gate has two scales by design; the microcontroller target
keeps its own HardSwish and HardSigmoid kernels and is not rewritten.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.naming import claim_name
from edgeopt.quant.formats import Format
from edgeopt.quant.ops import is_qdq_op
from edgeopt.quant.registry import FloatNode

__all__ = ["lower_hard_activations", "without_integer_form"]

_TOLERANCE = 1e-6  # relative, on a quantized range's end against the clamp's
_OPS = ("HardSwish", "HardSigmoid")


def _signed_reason(op_type: str) -> str:
    return (f"no integer {op_type} in ONNX Runtime, which (1.32, x86) fuses no QLinearAdd or QLinearMul of int8 "
            "activations to write it with (it does of uint8): computed in float")


def _narrow_reason(span: float) -> str:
    return (f"no integer HardSwish in ONNX Runtime, and its input spans {span:.3g} (< 6), finer than an 8-bit gate "
            "over [0, 6]: computed in float")


def _hardsigmoid_refusal(node: ir.Node) -> str | None:
    alpha, beta = node.attributes.get_float("alpha", 0.2), node.attributes.get_float("beta", 0.5)
    if alpha > 0 and beta != 0:
        return None
    return (f"no integer HardSigmoid in ONNX Runtime, and edgeopt writes none with alpha {alpha:g}, beta {beta:g} "
            "(only for a positive alpha and a non-zero beta): computed in float")


def without_integer_form(model: ir.Model, fmt: Format,
                         ranges: Mapping[str, tuple[float, float]] | None = None) -> dict[str, str]:
    """The HardSwish and HardSigmoid nodes :func:`lower_hard_activations` will not write in integer (name ->
    why), for placement to treat as ops without a kernel: every one with int8 activations, a HardSigmoid of an
    alpha or beta it has no form for and, given the calibrated ``ranges``, each HardSwish whose input spans
    less than 6."""
    found = {}
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in _OPS:
            continue
        if fmt.qmin < 0:
            found[node.name] = _signed_reason(node.op_type)
        elif node.op_type == "HardSigmoid" and (refusal := _hardsigmoid_refusal(node)) is not None:
            found[node.name] = refusal
        elif node.op_type == "HardSwish" and ranges is not None and node.inputs[0].name in ranges:
            low, high = ranges[node.inputs[0].name]
            span = max(high, 0.0) - min(low, 0.0)
            if span < 6.0 * (1 - _TOLERANCE):
                found[node.name] = _narrow_reason(span)
    return found


def _scalar_params(node: ir.Node) -> tuple[float, int] | None:
    """(scale, zero point) of a per-tensor Q/DQ node with constant parameters, else None."""
    scale = eir.constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    zero = eir.constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if scale is None or scale.size != 1 or (zero is not None and zero.size != 1):
        return None
    return float(scale.reshape(())), 0 if zero is None else int(zero.reshape(()))


def _sole_quantizer(value: ir.Value) -> ir.Node | None:
    """The QuantizeLinear that alone reads ``value`` (ONNX Runtime fuses only then)."""
    readers = eir.consumers(value)
    if len(readers) != 1 or value.is_graph_output() or not is_qdq_op(readers[0], "QuantizeLinear"):
        return None
    return readers[0] if _scalar_params(readers[0]) is not None else None


def _quantized_input(node: ir.Node) -> ir.Value | None:
    """``node``'s input when a per-tensor DequantizeLinear of an activation writes it."""
    value = node.inputs[0] if node.inputs else None
    producer = value.producer() if value is not None else None
    if (not is_qdq_op(producer, "DequantizeLinear") or eir.is_constant(producer.inputs[0])
            or _scalar_params(producer) is None):
        return None
    return value


class _Lowering:
    def __init__(self, graph: ir.Graph, fmt: Format) -> None:
        self.graph, self.format = graph, fmt
        self.taken = {v.name for v in graph.inputs if v.name} | set(graph.initializers)
        self.taken |= {v.name for node in graph for v in node.outputs if v.name} | {n.name for n in graph if n.name}
        self.constants: dict[tuple, ir.Value] = {}
        self.offsets: dict[tuple[str, float], ir.Value] = {}

    def constant(self, base: str, array: np.ndarray) -> ir.Value:
        return eir.register_array(self.graph, claim_name(base, self.taken), array)

    def shared(self, name: str, array: np.ndarray) -> ir.Value:
        """One initializer per value for every node rewritten (``name`` the first time it is asked for)."""
        key = (name, array.dtype.str, array.tobytes())
        if key not in self.constants:
            self.constants[key] = self.constant(name, array)
        return self.constants[key]

    def value(self, base: str, like: ir.Value, dtype: ir.DataType) -> ir.Value:
        return ir.Value(name=claim_name(base, self.taken), shape=like.shape, type=ir.TensorType(dtype))

    def node(self, op_type: str, inputs: list[ir.Value], output: ir.Value, name: str) -> ir.Node:
        return ir.node(op_type, inputs, outputs=[output], name=claim_name(name, self.taken))

    def shift(self, base: str, x: ir.Value, offset: float, constants: str) -> list[ir.Node]:
        """``x + offset``, the offset a quantized constant holding it exactly (one step of ``|offset|``): one
        DequantizeLinear, named ``{constants}_offset...``, for every node adding the same offset."""
        dtype = self.format.numpy_dtype
        nodes, key = [], (constants, offset)
        if key not in self.offsets:
            code, zero = (1, 0) if offset > 0 else (0, 1)  # (uint8) -c as (0 - 1) * c
            constant = [self.shared(f"{constants}_offset_quantized", np.array(code, dtype)),
                        self.shared(f"{constants}_offset_scale", np.array(abs(offset), np.float32)),
                        self.shared(f"{constants}_offset_zero_point", np.array(zero, dtype))]
            value = ir.Value(name=claim_name(f"{constants}_offset", self.taken), shape=ir.Shape([]),
                             type=ir.TensorType(ir.DataType.FLOAT))
            nodes.append(self.node("DequantizeLinear", constant, value, f"{constants}_offset_DequantizeLinear"))
            self.offsets[key] = value
        shifted = self.value(f"{base}_shifted", x, ir.DataType.FLOAT)
        return [*nodes, self.node("Add", [x, self.offsets[key]], shifted, f"{base}_shift")]

    def hardswish(self, node: ir.Node, x: ir.Value) -> str | None:
        """``x * gate``, the gate ``clip(x + 3, 0, 6)`` quantized over [0, 6] and read back over [0, 1]; or
        why not: an input quantized finer than the gate's step (its range under 6 wide), which the gate would
        round the product coarser than the input (a MobileNetV3 head's +-0.25: -1.3 dB at the output)."""
        fmt, base = self.format, node.name or f"{node.outputs[0].name}_HardSwish"
        levels = fmt.qmax - fmt.qmin
        input_scale = _scalar_params(x.producer())[0]
        if input_scale * levels < 6.0 * (1 - _TOLERANCE):
            return _narrow_reason(input_scale * levels)
        nodes = self.shift(base, x, 3.0, "hardswish")
        zero = self.shared("hardswish_gate_zero_point", np.array(fmt.qmin, fmt.numpy_dtype))
        quantized = self.value(f"{base}_gate_quantized", x, fmt.onnx_type)
        gate = self.value(f"{base}_gate", x, ir.DataType.FLOAT)
        nodes += [
            self.node("QuantizeLinear", [nodes[-1].outputs[0], self.shared(
                "hardswish_gate_scale", np.array(6.0 / levels, np.float32)), zero], quantized,
                f"{base}_gate_QuantizeLinear"),
            self.node("DequantizeLinear", [quantized, self.shared(
                "hardswish_gate_unit_scale", np.array(1.0 / levels, np.float32)), zero], gate,
                f"{base}_gate_DequantizeLinear")]
        output = node.outputs[0]
        product = self.value(f"{base}_product", output, ir.DataType.FLOAT)
        self.graph.insert_before(node, nodes)
        name = output.name
        eir.replace_value(output, product)
        self.graph.remove(node, safe=True)
        output.name, product.name = None, name  # the tensor keeps its name (compare matches by name)
        # the Mul takes the HardSwish's name: the accuracy search returns it to float by that name
        self.graph.insert_after(nodes[-1], [ir.node("Mul", [x, gate], outputs=[product], name=node.name or None)])
        return None

    def hardsigmoid(self, node: ir.Node, x: ir.Value, quantizer: ir.Node) -> str | None:
        """``x + beta / alpha`` under the output's Q with its scale over ``alpha``, when that Q saturates at
        0 and at or below 1 (the clamp is then the Q's); else why not, and nothing changed."""
        refusal = _hardsigmoid_refusal(node)
        if refusal is not None:
            return refusal
        alpha, beta = node.attributes.get_float("alpha", 0.2), node.attributes.get_float("beta", 0.5)
        scale, zero_point = _scalar_params(quantizer)
        fmt = self.format
        top = (fmt.qmax - zero_point) * scale
        if zero_point != fmt.qmin or top > 1.0 + _TOLERANCE:
            return (f"no integer HardSigmoid in ONNX Runtime, and its output's quantized range "
                    f"[{(fmt.qmin - zero_point) * scale:.3g}, {top:.3g}] (a scale it shares) is not inside the "
                    "clamp's [0, 1]: computed in float between its Q/DQ pairs")
        base = node.name or f"{node.outputs[0].name}_HardSigmoid"
        nodes = self.shift(base, x, beta / alpha, "hardsigmoid")
        output, shifted = node.outputs[0], nodes[-1].outputs[0]
        self.graph.insert_before(node, nodes)
        quantizer.replace_input_with(0, shifted)
        quantizer.replace_input_with(1, self.constant(f"{base}_shifted_scale", np.array(scale / alpha, np.float32)))
        self.graph.remove(node, safe=True)
        # the Add takes the HardSigmoid's names: its Q's DequantizeLinear reads the hardsigmoid by them (compare),
        # and the accuracy search returns it to float by its node's
        output.name, shifted.name, nodes[-1].name = None, output.name, node.name or nodes[-1].name
        return None


def lower_hard_activations(model: ir.Model, fmt: Format, listed: frozenset[str] = frozenset(),
                           ) -> tuple[dict[str, str], list[FloatNode]]:
    """Rewrite each HardSwish and HardSigmoid of the main graph between a DequantizeLinear and a lone
    QuantizeLinear (per tensor) as above, but those in ``listed``, the nodes already reported float (placed as
    ops without a kernel: their neighbours' pairs may surround them all the same). Returns the nodes written
    for them (node name -> the name of the node they stand for, which the Mul or Add computing the result
    keeps), and the others, which compute in float: still correct, not faster."""
    lowering, parts, kept = _Lowering(model.graph, fmt), {}, []
    for node in list(model.graph):
        label = eir.node_label(node)
        if node.domain not in ("", "ai.onnx") or node.op_type not in _OPS or label in listed:
            continue
        x, quantizer = _quantized_input(node), _sole_quantizer(node.outputs[0])
        before = {id(each) for each in model.graph}
        if fmt.qmin < 0:
            reason = _signed_reason(node.op_type)
        elif x is None or quantizer is None:
            reason = (f"no integer {node.op_type} in ONNX Runtime, and its input is not quantized or its output "
                      "is read in float too: computed in float")
        elif node.op_type == "HardSwish":
            reason = lowering.hardswish(node, x)
        else:
            reason = lowering.hardsigmoid(node, x, quantizer)
        if reason is None:
            parts.update((each.name, label) for each in model.graph if id(each) not in before)
        else:
            kept.append(FloatNode(label, node.op_type, reason))
    return parts, kept

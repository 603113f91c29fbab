"""RMSNorm written out op by op, marked as one group (``metadata_props["edgeopt.pattern"] = "rms_norm"``).

Llama, T5 and most LLMs normalize by the root mean square, with no mean subtracted::

    r = Sqrt(Add(ReduceMean(Pow(x, 2) or Mul(x, x), last axis), eps))
    y = Mul(x, Reciprocal(r) or Div(1, r))   or   Div(x, r)
    y = Mul(y, w)                                 (optional; T5 writes Mul(w, x) first)

ONNX has RMSNormalization only from opset 23, so the group is annotated, not fused. The quantizer keeps it
float as one op where the target has no integer kernel for it (ONNX Runtime), with no Q/DQ pair between its
steps: quantized step by step, ``mean(x^2) + eps`` and ``x * r`` were rounded to 8 bits each. And the residual
stream it reads then stays float with it (:mod:`edgeopt.quant.residual_stream`). A KV-cache decoder's static
int8: 26.5 -> 28.5 dB of output SQNR.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.passes._matching import is_op, only_reader, other_input, reduce_axes, scalar, sole_consumer
from edgeopt.passes._rules import Match, Rule, RuleContext
from edgeopt.passes.rules.activations import annotate, is_annotated

__all__ = ["RMS_NORM", "RmsNormRule"]

#: The pattern name the group's nodes carry.
RMS_NORM = "rms_norm"


@dataclasses.dataclass
class _RmsNormMatch(Match):
    x: ir.Value


def _square_of(node: ir.Node | None) -> ir.Value | None:
    """``x`` when ``node`` is ``Pow(x, 2)`` or ``Mul(x, x)``."""
    if is_op(node, "Pow") and scalar(node.inputs[1]) == 2.0:
        return node.inputs[0]
    if is_op(node, "Mul") and node.inputs[0] is node.inputs[1]:
        return node.inputs[0]
    return None



def _scaled(value: ir.Value, x: ir.Value, body: list[ir.Node]) -> bool:
    """``value`` is ``x``, or ``Mul(w, x)`` by a constant read only by the division (T5's ``w * x * r``)."""
    if value is x:
        return True
    node = value.producer()
    if not is_op(node, "Mul") or x not in node.inputs or not eir.is_constant(other_input(node, x)) \
            or sole_consumer(value) is None or value.is_graph_output():
        return False
    body.append(node)
    return True


def _normalized(sqrt: ir.Node, x: ir.Value, body: list[ir.Node]) -> ir.Node | None:
    """The node writing ``x / r`` from ``r = sqrt``'s output, appending the division's nodes to ``body``."""
    division = only_reader(sqrt, "Div", "Reciprocal")
    if division is None:
        return None
    r = sqrt.outputs[0]
    if division.op_type == "Div" and division.inputs[1] is r and scalar(division.inputs[0]) != 1.0:
        body.append(division)
        return division if _scaled(division.inputs[0], x, body) else None
    if division.op_type == "Div" and (division.inputs[1] is not r or scalar(division.inputs[0]) != 1.0):
        return None
    body.append(division)  # 1 / r
    product = only_reader(division, "Mul")
    if product is None:
        return None
    body.append(product)
    return product if _scaled(other_input(product, division.outputs[0]), x, body) else None


class RmsNormRule(Rule):
    """Pow/ReduceMean/Add/Sqrt/(Reciprocal|Div)/Mul[/Mul] -> annotated ``rms_norm``."""

    name = "rms-norm"
    anchor_ops = frozenset({"ReduceMean"})
    verb = "annotated"

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        square = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
        x = _square_of(square)
        if x is None or is_annotated(node) or sole_consumer(square.outputs[0]) is not node \
                or is_op(x.producer(), "Sub"):  # x - mean: a LayerNorm's variance
            return None
        return _RmsNormMatch(nodes=(node, square), x=x)

    def check(self, match: _RmsNormMatch, context: RuleContext) -> str | None:
        mean, square = match.nodes[:2]
        rank = len(match.x.shape) if match.x.shape is not None else None
        if rank is None or mean.attributes.get_int("keepdims", 1) != 1 or \
                reduce_axes(mean) not in ([-1], [rank - 1]):
            return "not a mean over the last axis that keeps it"
        add = only_reader(mean, "Add")
        if add is None or scalar(other_input(add, mean.outputs[0])) is None:
            return "the mean of squares is not followed by + eps"
        sqrt = only_reader(add, "Sqrt")
        body: list[ir.Node] = []
        last = _normalized(sqrt, match.x, body) if sqrt is not None else None
        if last is None:
            return "x is not divided by sqrt(mean(x^2) + eps)"
        gain = only_reader(last, "Mul")
        if gain is not None and eir.is_constant(other_input(gain, last.outputs[0])):
            body.append(gain)
        nodes = (mean, square, add, sqrt, *body)
        if any(map(is_annotated, nodes)):
            return "part of another pattern"
        match.nodes = nodes
        return None

    def rewrite(self, match: _RmsNormMatch, context: RuleContext) -> str:
        annotate(match.nodes, RMS_NORM)
        return f"annotated as {RMS_NORM} ({len(match.nodes)} nodes: ONNX has RMSNormalization from opset 23)"

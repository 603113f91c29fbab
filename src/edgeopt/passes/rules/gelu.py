"""GELU written out op by op -> one ``Gelu`` (opset >= 20), annotated below that.

Exporters write GELU in two forms:

* exact, ``0.5 * x * (1 + erf(x / sqrt(2)))`` (also ``erf(x * 0.7071)``) -> ``Gelu``;
* the tanh approximation (torch's ``GELU(approximate='tanh')``, Keras' ``gelu(approximate=True)``,
  Hugging Face's ``gelu_new``), ``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))`` with
  the cube as ``Pow(x, 3)``, ``x * (x * x)`` or ``(x * x) * x`` -> ``Gelu(approximate="tanh")``.

Constants may stand on either side of a Mul or an Add, and ``0.5 * x * (1 + ...)`` may be associated
any way (:func:`~edgeopt.passes._matching.follow_product`). Below opset 20 the nodes are annotated
(``metadata_props["edgeopt.pattern"]``): ``gelu`` for the erf form, ``gelu_tanh`` for the other, so
the quantizer treats each group as one activation. A tanh form whose constants are not GELU's (a
cubic coefficient of 0.05) is another function and is left, with the reason.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.passes._matching import (
    ProductChain,
    follow_product,
    is_close,
    is_op,
    other_input,
    producer_op,
    scalar,
    sole_consumer,
)
from edgeopt.passes._rules import Match, Rule, RuleContext
from edgeopt.passes.rules.activations import PATTERN_KEY, annotate

__all__ = ["GELU_OPSET", "GeluRule", "TanhGeluRule"]

GELU_OPSET = 20
_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_CUBIC_COEFFICIENT = 0.044715
# written out to 7 or more digits (Keras' 0.7978845608), or computed in float32
_CONSTANT_TOLERANCE = 1e-5


@dataclasses.dataclass
class _GeluMatch(Match):
    anchor: ir.Node  # the Erf or the Tanh
    plus_one: ir.Node
    x: ir.Value
    chain: ProductChain | None = None
    constants: tuple[float, float] = (_SQRT_2_OVER_PI, _CUBIC_COEFFICIENT)  # of the tanh form's argument


def _plus_one(anchor: ir.Node) -> ir.Node | None:
    """The ``1 + anchor`` Add (constant on either side) that alone reads ``anchor``'s output."""
    add = sole_consumer(anchor.outputs[0])
    if not is_op(add, "Add") or not is_close(scalar(other_input(add, anchor.outputs[0])), 1.0):
        return None
    return add


class _GeluRule(Rule):
    """What both forms share: ``0.5 * x * (1 + f(x))`` around the anchor, and the rewrite."""

    #: Gelu's ``approximate`` attribute, and the annotation below opset 20.
    approximate: ClassVar[str] = "none"
    pattern_name: ClassVar[str] = "gelu"

    def check(self, match: _GeluMatch, context: RuleContext) -> str | None:
        match.chain = follow_product(match.plus_one.outputs[0], match.x, 0.5)
        if match.chain is None:
            return f"1 + {match.anchor.op_type.lower()}(...) is not multiplied by 0.5 * x"
        match.nodes = (*match.nodes, *match.chain.nodes)
        return None

    def rewrite(self, match: _GeluMatch, context: RuleContext) -> str:
        if context.opset < GELU_OPSET:
            annotate(match.nodes, self.pattern_name)
            return (f"annotated as {self.pattern_name} (Gelu needs opset >= {GELU_OPSET}, "
                    f"model has {context.opset})")
        attributes = {"approximate": self.approximate} if self.approximate != "none" else None
        new = ir.node("Gelu", [match.x], attributes, name=f"{eir.node_label(match.anchor)}_Gelu")
        eir.replace_nodes(context.graph, match.nodes, match.chain.output, [new])
        return "fused into Gelu" + (f" (approximate={self.approximate!r})" if attributes else "")


def _erf_argument(erf: ir.Node) -> tuple[ir.Node, ir.Value] | None:
    """``erf(x / sqrt(2))`` or ``erf(x * (1 / sqrt(2)))``: (that Div/Mul, x)."""
    scale = producer_op(erf.inputs[0], "Div", "Mul")
    if scale is None or sole_consumer(erf.inputs[0]) is not erf:
        return None
    for x, constant in ((scale.inputs[0], scale.inputs[1]), (scale.inputs[1], scale.inputs[0])):
        number = scalar(constant)
        expected = math.sqrt(2) if scale.op_type == "Div" else 1 / math.sqrt(2)
        if is_close(number, expected, 1e-3) and scalar(x) is None:
            return scale, x
        if scale.op_type == "Div":
            break
    return None


class GeluRule(_GeluRule):
    """``0.5 * x * (1 + erf(x / sqrt(2)))`` -> Gelu (opset >= 20), else annotated ``gelu``."""

    name = "gelu"
    anchor_ops = frozenset({"Erf"})

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        argument = _erf_argument(node)
        add = _plus_one(node)
        if argument is None or PATTERN_KEY in node.metadata_props or add is None:
            return None
        scale, x = argument
        return _GeluMatch(nodes=(scale, node, add), anchor=node, plus_one=add, x=x)


def _scaled(value: ir.Value) -> tuple[ir.Node, float, ir.Value] | None:
    """``value = c * v`` (either order), a scalar constant ``c`` and a computed ``v``, read once: (Mul, c, v)."""
    mul = producer_op(value, "Mul")
    if mul is None or sole_consumer(value) is None:
        return None
    for constant, operand in (mul.inputs, reversed(mul.inputs)):
        number = scalar(constant)
        if number is not None and scalar(operand) is None:
            return mul, number, operand
    return None


def _cube(value: ir.Value, x: ir.Value) -> tuple[ir.Node, ...] | None:
    """The nodes computing ``value = x ** 3``, each read once: ``Pow(x, 3)``, ``x * (x * x)``, ``(x * x) * x``."""
    node = producer_op(value, "Pow", "Mul")
    if node is None or sole_consumer(value) is None:
        return None
    if node.op_type == "Pow":
        return (node,) if node.inputs[0] is x and scalar(node.inputs[1]) == 3.0 else None
    square = other_input(node, x) if x in node.inputs else None
    square_node = producer_op(square, "Mul")
    if square_node is None or sole_consumer(square) is not node or any(v is not x for v in square_node.inputs):
        return None
    return square_node, node


def _tanh_argument(tanh: ir.Node) -> _GeluMatch | None:
    """``tanh(c1 * (x + c2 * x**3))``, any operand order, as a match without its ``1 +`` and product."""
    outer = _scaled(tanh.inputs[0]) if sole_consumer(tanh.inputs[0]) is tanh else None
    inner = producer_op(outer[2], "Add") if outer is not None else None
    if inner is None or sole_consumer(inner.outputs[0]) is not outer[0]:
        return None
    for x, term in (inner.inputs, reversed(inner.inputs)):
        scaled_cube = _scaled(term) if scalar(x) is None else None
        cube = _cube(scaled_cube[2], x) if scaled_cube is not None else None
        if cube is not None:
            nodes = (*cube, scaled_cube[0], inner, outer[0], tanh)
            return _GeluMatch(nodes=nodes, anchor=tanh, plus_one=tanh, x=x, constants=(outer[1], scaled_cube[1]))
    return None


class TanhGeluRule(_GeluRule):
    """``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))`` -> Gelu(approximate="tanh") (opset >= 20),
    else annotated ``gelu_tanh``."""

    name = "gelu-tanh"
    anchor_ops = frozenset({"Tanh"})
    approximate = "tanh"
    pattern_name = "gelu_tanh"

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        add = _plus_one(node)
        match = _tanh_argument(node) if add is not None and PATTERN_KEY not in node.metadata_props else None
        if match is None:
            return None
        match.plus_one, match.nodes = add, (*match.nodes, add)
        return match

    def check(self, match: _GeluMatch, context: RuleContext) -> str | None:
        outer, cubic = match.constants
        if not is_close(outer, _SQRT_2_OVER_PI, _CONSTANT_TOLERANCE):
            return f"tanh's argument is scaled by {outer:g}, not sqrt(2 / pi) = {_SQRT_2_OVER_PI:.7f}: not GELU"
        if not is_close(cubic, _CUBIC_COEFFICIENT, _CONSTANT_TOLERANCE):
            return f"the cube is scaled by {cubic:g}, not {_CUBIC_COEFFICIENT}: not GELU"
        return super().check(match, context)

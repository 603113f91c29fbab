"""Rules that recognize activations exporters write out op by op.

* hardsigmoid ``clip(x + 3, 0, 6) / 6 = HardSigmoid(x; alpha=1/6, beta=1/2)``;
* hardswish ``x * clip(x + 3, 0, 6) / 6 = x * HardSigmoid(x) = HardSwish(x)``
  (opset >= 14; below it ``x * HardSigmoid(x)``, two ops instead of four), in
  any association of the product (``x * relu6(x + 3) * (1/6)``, ``(x / 6) *
  clip(...)``...), see :func:`~edgeopt.passes._matching.follow_product`;
* SiLU ``x * sigmoid(x)``: ONNX has ``Swish`` only from opset 24, so below
  that the nodes are annotated (``metadata_props["edgeopt.pattern"] =
  "silu"``) for the quantizer, not rewritten;
* GELU (:mod:`edgeopt.passes.rules.gelu`);
* clamps written with constants ``Min(Max(x, a), b)`` (either order), ``Max(x,
  a)``, ``Min(x, b)`` (TensorFlow's ``minimum``/``maximum``, ``torch.maximum``):
  ``Clip(x, a, b)``, and ``Max(x, 0)`` ``Relu``, which a quantized Conv applies
  as its output range.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.passes._matching import (
    ProductChain,
    clip_bounds,
    follow_product,
    is_close,
    is_op,
    producer_op,
    scalar,
    sole_consumer,
)
from edgeopt.passes._rules import Match, Rule, RuleContext

__all__ = [
    "PATTERN_KEY",
    "ClampMinMaxRule",
    "ClipHardSigmoidRule",
    "HardSigmoidMulRule",
    "SiluRule",
    "annotate",
    "clip_node",
    "is_annotated",
]

#: Node metadata key naming the activation a group of nodes computes.
PATTERN_KEY = "edgeopt.pattern"

HARDSWISH_OPSET = 14
SWISH_OPSET = 24


def annotate(nodes: tuple[ir.Node, ...], pattern: str) -> None:
    for node in nodes:
        node.metadata_props[PATTERN_KEY] = pattern


def is_annotated(node: ir.Node) -> bool:
    """Whether ``node`` belongs to a pattern a rule annotated already."""
    return PATTERN_KEY in node.metadata_props


def _fuse(context: RuleContext, old_nodes: tuple[ir.Node, ...], chain: ProductChain, new: ir.Node) -> str:
    eir.replace_nodes(context.graph, old_nodes, chain.output, [new])
    return f"fused into {new.op_type}"


@dataclasses.dataclass
class _ClipMatch(Match):
    add: ir.Node
    clip: ir.Node
    x: ir.Value
    op_type: str = ""
    chain: ProductChain | None = None


class ClipHardSigmoidRule(Rule):
    """``clip(x + 3, 0, 6) / 6`` -> HardSigmoid, and ``x * clip(x + 3, 0, 6) / 6`` -> HardSwish."""

    name = "clip-hard-activation"
    anchor_ops = frozenset({"Clip"})

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        add = producer_op(node.inputs[0], "Add")
        if add is None:
            return None
        for x, three in (add.inputs, reversed(add.inputs)):
            if is_close(scalar(three), 3.0) and scalar(x) is None:
                return _ClipMatch(nodes=(add, node), add=add, clip=node, x=x)
        return None

    def check(self, match: _ClipMatch, context: RuleContext) -> str | None:
        bounds = clip_bounds(match.clip)
        if bounds is None:
            return "Clip bounds are not constants"
        if bounds[0] != 0 or not is_close(bounds[1], 6.0):
            return f"Clip bounds are {bounds}, not (0, 6)"
        if sole_consumer(match.add.outputs[0]) is not match.clip:
            return "x + 3 has other readers"
        clipped = match.clip.outputs[0]
        with_x = follow_product(clipped, match.x, 1 / 6)
        alone = follow_product(clipped, None, 1 / 6)
        if with_x is not None:  # below opset 14, x * HardSigmoid(x), as torch exports hardswish there
            match.op_type, match.chain = "HardSwish", with_x
        elif alone is not None:
            match.op_type, match.chain = "HardSigmoid", alone
        else:
            return "the Clip output is not scaled by 1/6 (as in x * clip(x + 3, 0, 6) / 6)"
        match.nodes = (match.add, match.clip, *match.chain.nodes)
        return None

    def rewrite(self, match: _ClipMatch, context: RuleContext) -> str:
        label = eir.node_label(match.chain.nodes[-1])
        if match.op_type == "HardSwish" and context.opset < HARDSWISH_OPSET:
            gate = ir.node("HardSigmoid", [match.x], {"alpha": 1 / 6, "beta": 0.5}, name=f"{label}_HardSigmoid")
            product = ir.node("Mul", [match.x, gate.outputs[0]], name=f"{label}_Mul")
            eir.replace_nodes(context.graph, match.nodes, match.chain.output, [gate, product])
            return (f"fused into x * HardSigmoid(x) (HardSwish needs opset >= {HARDSWISH_OPSET}, "
                    f"model has {context.opset})")
        attributes = {"alpha": 1 / 6, "beta": 0.5} if match.op_type == "HardSigmoid" else None
        new = ir.node(match.op_type, [match.x], attributes, name=f"{label}_{match.op_type}")
        return _fuse(context, match.nodes, match.chain, new)


@dataclasses.dataclass
class _ChainMatch(Match):
    head: ir.Node
    chain: ProductChain


class HardSigmoidMulRule(Rule):
    """``x * HardSigmoid(x; alpha=1/6, beta=1/2)`` -> HardSwish (opset >= 14)."""

    name = "hardsigmoid-mul"
    anchor_ops = frozenset({"HardSigmoid"})

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        alpha = node.attributes.get_float("alpha", 0.2)
        beta = node.attributes.get_float("beta", 0.5)
        if not (is_close(alpha, 1 / 6, 1e-5) and is_close(beta, 0.5)):
            return None
        chain = follow_product(node.outputs[0], node.inputs[0], 1.0)
        return _ChainMatch(nodes=(node, *chain.nodes), head=node, chain=chain) if chain else None

    def check(self, match: _ChainMatch, context: RuleContext) -> str | None:
        if context.opset < HARDSWISH_OPSET:
            return f"HardSwish needs opset >= {HARDSWISH_OPSET} (model has {context.opset})"
        return None

    def rewrite(self, match: _ChainMatch, context: RuleContext) -> str:
        new = ir.node("HardSwish", [match.head.inputs[0]], name=f"{eir.node_label(match.head)}_HardSwish")
        return _fuse(context, match.nodes, match.chain, new)


class SiluRule(Rule):
    """``x * sigmoid(x)`` -> Swish (opset >= 24), else annotated ``silu``."""

    name = "silu"
    anchor_ops = frozenset({"Sigmoid"})

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        if is_annotated(node):
            return None
        chain = follow_product(node.outputs[0], node.inputs[0], 1.0)
        return _ChainMatch(nodes=(node, *chain.nodes), head=node, chain=chain) if chain else None

    def rewrite(self, match: _ChainMatch, context: RuleContext) -> str:
        if context.opset >= SWISH_OPSET:
            new = ir.node("Swish", [match.head.inputs[0]], name=f"{eir.node_label(match.head)}_Swish")
            return _fuse(context, match.nodes, match.chain, new)
        annotate(match.nodes, "silu")
        return f"annotated as silu (Swish needs opset >= {SWISH_OPSET}, model has {context.opset})"


@dataclasses.dataclass
class _ClampMatch(Match):
    x: ir.Value
    low: float = -math.inf
    high: float = math.inf
    bound_dtype: object = None
    shaped_bound: bool = False  # a bound of shape [1], which makes a rank-0 x's output [1]

    @property
    def relu(self) -> bool:
        return self.low == 0.0 and self.high == math.inf


def _constant_operand(node: ir.Node) -> tuple[ir.Value, float, object, int] | None:
    """``(x, c, c's dtype, c's rank)`` for a Min/Max of a tensor ``x`` and a one-element float constant ``c``."""
    if len(node.inputs) != 2 or any(v is None for v in node.inputs):
        return None
    for x, constant in (node.inputs, reversed(node.inputs)):
        array = eir.constant_array(constant)
        if array is not None and array.size == 1 and array.ndim <= 1 and np.issubdtype(array.dtype, np.floating) \
                and not eir.is_constant(x):
            return x, float(array.reshape(())), array.dtype, array.ndim
    return None


class ClampMinMaxRule(Rule):
    """``Min``/``Max`` of a tensor and a constant, one or both in a row -> ``Clip`` (``Max(x, 0)`` -> ``Relu``)."""

    name = "minmax-clamp"
    anchor_ops = frozenset({"Min", "Max"})

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        first = _constant_operand(node)
        if first is None or not math.isfinite(first[1]):
            return None
        x, bound, dtype, rank = first
        match = _ClampMatch(nodes=(node,), x=x, bound_dtype=dtype, shaped_bound=rank > 0)
        match.low, match.high = (bound, math.inf) if node.op_type == "Max" else (-math.inf, bound)
        reader = sole_consumer(node.outputs[0])
        other = "Min" if node.op_type == "Max" else "Max"
        second = _constant_operand(reader) if is_op(reader, other) else None
        if second is not None and second[0] is node.outputs[0] and math.isfinite(second[1]) and second[2] == dtype:
            match.nodes, match.shaped_bound = (node, reader), match.shaped_bound or second[3] > 0
            if other == "Min":
                match.high = second[1]
            else:
                match.low = second[1]
        return match

    def check(self, match: _ClampMatch, context: RuleContext) -> str | None:
        if match.low > match.high:
            return f"the clamp's low bound {match.low:g} is above its high bound {match.high:g}"
        if match.x.shape is not None and len(match.x.shape) == 0:
            return "a scalar operand: the constant's shape decides the output's"
        if match.x.shape is None and match.shaped_bound:
            return "a bound of shape [1] and an operand of unknown rank: the output's rank may be the bound's"
        if context.opset < 11 and not match.relu and np.dtype(match.bound_dtype) not in (np.float32, np.float16):
            # ONNX Runtime implements Clip-6 for float32 and float16 alone
            return f"a {np.dtype(match.bound_dtype).name} clamp: ONNX Runtime runs Clip-6 on float32 and float16 alone"
        return None

    def rewrite(self, match: _ClampMatch, context: RuleContext) -> str:
        last = match.nodes[-1]
        label = eir.node_label(last)
        if match.relu:
            new = ir.node("Relu", [match.x], name=f"{label}_Relu")
        else:
            new = clip_node(context, match.x, (match.low, match.high), dtype=match.bound_dtype, label=label)
        eir.replace_nodes(context.graph, match.nodes, last.outputs[0], [new])
        return f"rewritten as {new.op_type}"


def clip_node(context: RuleContext, x: ir.Value, bounds: tuple[float, float], *, dtype, label: str) -> ir.Node:
    """``Clip(x, low, high)`` named ``{label}_Clip``: bounds as attributes before opset 11, else as ``dtype``
    initializers (both given: an open one as inf, since Clip's default bounds are the type's largest finite
    numbers, which would turn an inf that Min/Max pass through into FLT_MAX)."""
    if context.opset < 11:
        return ir.node("Clip", [x], {"min": bounds[0], "max": bounds[1]}, name=f"{label}_Clip")
    constants = [eir.add_initializer(context.graph, np.array(value, dtype=dtype), f"{label}_{key}")
                 for key, value in zip(("min", "max"), bounds)]
    return ir.node("Clip", [x, *constants], name=f"{label}_Clip")

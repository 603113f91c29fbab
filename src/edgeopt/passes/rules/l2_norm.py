"""L2 normalization written out op by op, marked as one group (``metadata_props["edgeopt.pattern"] = "l2_norm"``).

``torch.nn.functional.normalize(x, dim=d)`` (embeddings, metric learning, cosine classifiers) exports as::

    n = ReduceL2(x, axes=[d], keepdims=1)
    n = Clip(n, eps) or Max(n, eps)
    n = Expand(n, Shape(x))          (TorchScript; dynamo writes the shape as a constant)
    y = Div(x, n)

ONNX's LpNormalization has no epsilon, so the group is annotated, not fused. A target with the kernel
(the MCU's, :data:`edgeopt.quant.ops.ONE_OP_PATTERNS`) quantizes it as one op: a Q/DQ pair on ``x`` and on
``y``, none between its steps (each rounded to 8 bits, the norm would carry a step's error into every
value). Elsewhere the group stays float, as its ops did one by one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import onnx_ir as ir

from edgeopt.passes._matching import clip_bounds, is_op, only_reader, reduce_axes, scalar
from edgeopt.passes._rules import Match, Rule, RuleContext
from edgeopt.passes.rules.activations import annotate, is_annotated

__all__ = ["L2_NORM", "L2NormRule", "norm_floor"]

#: The pattern name the group's nodes carry.
L2_NORM = "l2_norm"


@dataclasses.dataclass
class _L2NormMatch(Match):
    x: ir.Value


def norm_floor(node: ir.Node | None, read: Callable[[ir.Value], float | None] = scalar) -> float | None:
    """The eps of ``Clip(n, eps)`` (no upper bound) or ``Max(n, eps)`` with a constant eps >= 0, else None;
    constants as ``read`` gives them (the reference's QDQ matcher reads dequantized ones too)."""
    if is_op(node, "Clip"):
        bounds = clip_bounds(node, read)
        low = bounds[0] if bounds is not None and bounds[1] == math.inf else None
    elif is_op(node, "Max") and len(node.inputs) == 2:
        low = read(node.inputs[1])
    else:
        return None
    return low if low is not None and math.isfinite(low) and low >= 0 else None


class L2NormRule(Rule):
    """ReduceL2/(Clip|Max)/[Expand]/Div -> annotated ``l2_norm``."""

    name = "l2-norm"
    anchor_ops = frozenset({"ReduceL2"})
    verb = "annotated"

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        if not node.inputs or node.inputs[0] is None or is_annotated(node):
            return None
        return _L2NormMatch(nodes=(node,), x=node.inputs[0])

    def check(self, match: _L2NormMatch, context: RuleContext) -> str | None:
        norm = match.nodes[0]
        if norm.attributes.get_int("keepdims", 1) != 1 or not reduce_axes(norm):
            return "not a norm over constant axes that keeps them"
        floor = only_reader(norm, "Clip", "Max")
        if floor is None or norm_floor(floor) is None:
            return "the norm is not clamped below by a constant eps >= 0"
        body = [floor]
        divisor = only_reader(floor, "Expand", "Div")
        if is_op(divisor, "Expand"):
            body.append(divisor)
            divisor = only_reader(divisor, "Div")
        if divisor is None or divisor.inputs[0] is not match.x or divisor.inputs[1] is not body[-1].outputs[0]:
            return "x is not divided by its clamped norm"
        if match.x.shape is not None and divisor.outputs[0].shape is not None \
                and len(match.x.shape) != len(divisor.outputs[0].shape):
            return "the division broadcasts x to another rank"
        nodes = (norm, *body, divisor)
        if any(map(is_annotated, nodes)):
            return "part of another pattern"
        match.nodes = nodes
        return None

    def rewrite(self, match: _L2NormMatch, context: RuleContext) -> str:
        annotate(match.nodes, L2_NORM)
        return f"annotated as {L2_NORM} ({len(match.nodes)} nodes: ONNX's LpNormalization has no epsilon)"

"""Spelled-out groups a target computes as the one integer op they spell (:data:`~edgeopt.quant.ops.ONE_OP_PATTERNS`).

The float passes annotate a spelled-out erf GELU (below opset 20) and LayerNorm (below opset 17, or over the
channels of NCHW) with ``edgeopt.pattern``. Where the target has the kernel of the op the group spells (the
MCU's Gelu lookup table and LayerNormalization), the group runs in integer as that op: the values entering it
from outside (but constants: gamma, beta, epsilon, sqrt(2) stay float, folded by the lowering) and those
leaving it get a Q/DQ pair, and the values between its steps none, as ONNX Runtime then computes them in
float between one DequantizeLinear and one QuantizeLinear.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.passes import PATTERN_KEY
from edgeopt.quant.ops import ONE_OP_PATTERNS, OpRule

__all__ = ["group_boundary", "quantized_as_one_op", "refuse_partial_groups"]


def quantized_as_one_op(node: ir.Node, rules: Mapping[str, OpRule]) -> bool:
    """Whether ``node`` belongs to a spelled-out group the target (``rules``) computes as the one op it spells."""
    op = ONE_OP_PATTERNS.get(node.metadata_props.get(PATTERN_KEY, ""))
    return op is not None and op in rules


def group_boundary(members: Mapping[str, ir.Node], is_float: Callable[[ir.Value], bool]) -> list[str]:
    """The float values entering the groups of ``members`` (name -> node) from outside, constants aside, and
    those leaving them (read by another node, or graph outputs), in graph order of their readers. A value
    from one group into a group of another pattern (a LayerNorm's output read by a GELU) leaves the first and
    enters the second: each group is one integer op, reading and writing int8."""
    names: dict[str, None] = {}

    def inside(other: ir.Node | None, node: ir.Node) -> bool:
        return other is not None and other.name in members and _pattern(other) == _pattern(node)

    for node in members.values():
        for value in node.inputs:
            if is_float(value) and not eir.is_constant(value) and not inside(value.producer(), node):
                names[value.name] = None
        for value in node.outputs:
            if is_float(value) and (value.is_graph_output() or any(not inside(use.node, node)
                                                                    for use in value.uses())):
                names[value.name] = None
    return list(names)


def _pattern(node: ir.Node) -> str | None:
    return node.metadata_props.get(PATTERN_KEY)


def refuse_partial_groups(grouped: dict[str, ir.Node], refusals: dict[str, str]) -> None:
    """A group one of whose nodes stays float (excluded, or kept float by an accuracy search) stays float whole:
    its other nodes move from ``grouped`` to ``refusals``, group by group through their shared values."""
    pending = list(grouped.values())
    while pending:
        node = pending.pop()
        pattern = node.metadata_props.get(PATTERN_KEY)
        neighbours = [value.producer() for value in node.inputs if value is not None]
        neighbours += [use.node for value in node.outputs for use in value.uses()]
        same = [n for n in neighbours if n is not None and n.metadata_props.get(PATTERN_KEY) == pattern]
        kept = next((n for n in same if n.name in refusals), None)
        if node.name in grouped and kept is not None:
            del grouped[node.name]
            refusals[node.name] = f"part of a spelled-out {pattern} whose {kept.op_type} ({kept.name}) stays float"
            pending.extend(n for n in same if n.name in grouped)

"""The execution order every analysis shares.

A model runs its top-level nodes in graph order (ONNX requires topological
order). ``Constant`` nodes are weights, not work: they get no step. Step ``i``
is the ``i``-th remaining node; cost rows and tensor lifetimes use the same
numbering, so ``CostReport.nodes[i]`` is the node that runs at step ``i``.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.traversal import RecursiveGraphIterator

from edgeopt import ir as eir

__all__ = ["execution_steps", "is_constant_node", "node_label", "step_of_nodes"]


def is_constant_node(node: ir.Node) -> bool:
    return eir.is_op(node, "Constant")


def node_label(node: ir.Node, index: int) -> str:
    """The node's name, or ``{op_type}_{index}`` (index in the graph's node list) when unnamed."""
    return node.name or f"{node.op_type}_{index}"


def execution_steps(graph: ir.Graph) -> list[tuple[str, ir.Node]]:
    """``(label, node)`` for every non-Constant top-level node, in execution order."""
    return [(node_label(node, index), node) for index, node in enumerate(graph)
            if not is_constant_node(node)]


def step_of_nodes(steps: list[tuple[str, ir.Node]]) -> dict[int, int]:
    """Map ``id(node)`` to its step; nodes inside subgraphs map to their owner's step."""
    step_of: dict[int, int] = {}
    for step, (_, node) in enumerate(steps):
        step_of[id(node)] = step
        for graph in eir.subgraphs(node):
            step_of.update((id(inner), step) for inner in RecursiveGraphIterator(graph))
    return step_of

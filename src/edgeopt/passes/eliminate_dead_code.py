"""Remove what computes nothing the model returns.

A node is dead when none of its outputs is a graph output or read by a live
node; walking the graph backwards, removing a dead node can only make its
producers dead, so one reverse sweep finds them all. Initializers no node
reads are dropped too. ``Identity``, inference-mode ``Dropout`` and a ``Cast`` to the type its input
already has are the identity function: their readers are pointed at their input.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.passes._report import PassReport, ReportedPassResult
from edgeopt.passes._rules import Match, Rule, RuleContext, RulePass, run_on_copy

__all__ = ["EliminateDeadCodePass", "eliminate_dead_code"]


@dataclasses.dataclass
class _PassThrough(Match):
    node: ir.Node


class IdentityRule(Rule):
    """``y = Identity(x)``: readers of ``y`` read ``x``."""

    name = "remove-identity"
    anchor_ops = frozenset({"Identity"})
    verb = "removed"

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        return _PassThrough(nodes=(node,), node=node) if node.inputs and node.inputs[0] is not None else None

    def check(self, match: _PassThrough, context: RuleContext) -> str | None:
        return eir.replace_value_refusal(match.node.outputs[0], match.node.inputs[0])

    def rewrite(self, match: _PassThrough, context: RuleContext) -> str:
        return _bypass(match.node, context)


class SameTypeCastRule(Rule):
    """``y = Cast(x, to=T)`` with ``x`` already of type ``T``: readers of ``y`` read ``x``. Hugging Face's
    RMSNorm writes one (``hidden_states.to(torch.float32)`` on a float32 model), which TorchScript exports as a
    Cast that no quantizer kernel takes: a float island before each norm."""

    name = "remove-same-type-cast"
    anchor_ops = frozenset({"Cast"})
    verb = "removed"

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        source = node.inputs[0] if node.inputs else None
        if source is None or source.dtype is None or node.attributes.get_int("to", 0) != source.dtype.value:
            return None
        return _PassThrough(nodes=(node,), node=node)

    def check(self, match: _PassThrough, context: RuleContext) -> str | None:
        return eir.replace_value_refusal(match.node.outputs[0], match.node.inputs[0])

    def rewrite(self, match: _PassThrough, context: RuleContext) -> str:
        return _bypass(match.node, context)


class DropoutRule(Rule):
    """``y = Dropout(x)`` in inference mode with its mask unused: readers of ``y`` read ``x``."""

    name = "remove-dropout"
    anchor_ops = frozenset({"Dropout"})
    verb = "removed"

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        return _PassThrough(nodes=(node,), node=node) if node.inputs and node.inputs[0] is not None else None

    def check(self, match: _PassThrough, context: RuleContext) -> str | None:
        node = match.node
        training = node.inputs[2] if len(node.inputs) > 2 else None
        if training is not None:
            flag = eir.constant_array(training)
            if flag is None or bool(flag.reshape(-1)[0]):
                return "training_mode is not a constant false"
        if node.attributes.get_int("is_test", 1) == 0:
            return "is_test is 0 (training mode)"
        if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
            return "its mask output is used"
        return eir.replace_value_refusal(node.outputs[0], node.inputs[0])

    def rewrite(self, match: _PassThrough, context: RuleContext) -> str:
        return _bypass(match.node, context)


def _bypass(node: ir.Node, context: RuleContext) -> str:
    source = node.inputs[0]
    eir.replace_value(node.outputs[0], source)
    eir.remove_nodes(context.graph, [node])
    return f"readers now read {source.name!r}"


def _is_dead(node: ir.Node) -> bool:
    return not any(v.is_graph_output() or v.uses() for v in node.outputs)


def remove_dead_nodes(graph: ir.Graph) -> int:
    """Remove nodes none of whose outputs is used; returns how many."""
    removed = 0
    for node in reversed(list(graph)):
        if _is_dead(node):
            graph.remove(node, safe=True)
            removed += 1
    return removed


def remove_unused_initializers(graph: ir.Graph) -> int:
    """Drop initializers that no node reads and that are not graph inputs or outputs."""
    unused = [name for name, value in graph.initializers.items()
              if not value.uses() and not value.is_graph_input() and not value.is_graph_output()]
    for name in unused:
        graph.initializers.pop(name)
    return len(unused)


class EliminateDeadCodePass(RulePass):
    """Remove dead nodes, unused initializers, Identity and inference Dropout.

    Rewrites:

    * ``Identity(x)`` -> ``x`` (a graph output keeps its name), and so a ``Cast`` to the type ``x`` has;
    * ``Dropout(x)`` with no training flag (or a constant false) and an unused
      mask -> ``x``;
    * nodes whose outputs nothing reads, walking backwards -> removed;
    * initializers nothing reads (and that are not graph inputs) -> removed.

    Leaves (with a reason): an Identity/Dropout between a graph input or
    initializer and a graph output (both names are part of the interface),
    a Dropout in training mode or whose mask is read. Preconditions: none.
    Rewrites the model it is given (main graph; subgraph readers count).
    """

    name = "eliminate-dead-code"

    def __init__(self) -> None:
        self.rules = (IdentityRule(), SameTypeCastRule(), DropoutRule())

    def call(self, model: ir.Model) -> ReportedPassResult:
        result = super().call(model)
        nodes = remove_dead_nodes(model.graph)
        initializers = remove_unused_initializers(model.graph)
        notes = (f"removed {nodes} unused nodes and {initializers} unused initializers",) \
            if nodes or initializers else ()
        report = PassReport(name=self.name, modified=result.modified or bool(nodes or initializers),
                            outcomes=result.report.outcomes, notes=notes)
        return ReportedPassResult(model=model, modified=report.modified, report=report)


def eliminate_dead_code(model: ir.Model) -> ReportedPassResult:
    """Eliminate dead code on a copy of ``model``; the input is not modified."""
    return run_on_copy(EliminateDeadCodePass(), model)

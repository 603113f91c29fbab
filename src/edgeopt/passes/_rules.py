"""Local rewrite rules and the pass that runs them: pattern, check, rewrite.

A rule looks at one *anchor* node at a time:

1. ``pattern(node, context)`` answers structurally whether the node starts a
   candidate (a BatchNormalization after a Conv, a Clip fed by ``x + 3``). It
   returns a :class:`Match` or None; None is silent, as most nodes are simply
   not candidates.
2. ``check(match, context)`` returns the *reason* a candidate cannot be
   rewritten ("Conv output has 2 consumers"), or None. It may record derived
   values (folded weights, the rest of the pattern's nodes) on the match for
   ``rewrite``.
3. ``rewrite(match, context)`` edits the graph and returns what it did
   ("folded into Conv_12").

:class:`RulePass` sweeps the main graph in order, applying the first rule
that fits each node, until a sweep changes nothing. Refusals come from that
last sweep, so they describe the final graph (int8 quantization notes them).
Subgraphs (If/Loop bodies) are left as they are.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from collections.abc import Sequence
from typing import ClassVar

import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.passes._report import PassReport, ReportedPassResult, RuleOutcome

__all__ = ["Match", "Rule", "RuleContext", "RulePass", "run_on_copy"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RuleContext:
    """What a rule may need beyond its match: the model and its default opset."""

    model: ir.Model
    opset: int

    @property
    def graph(self) -> ir.Graph:
        return self.model.graph


@dataclasses.dataclass
class Match:
    """The nodes a candidate spans (anchor first); rules subclass it with named parts."""

    nodes: tuple[ir.Node, ...]

    def labels(self) -> tuple[str, ...]:
        return tuple(eir.node_label(n) for n in self.nodes)


class Rule(abc.ABC):
    """A local rewrite: ``pattern`` finds candidates, ``check`` says why not, ``rewrite`` acts."""

    #: Short identifier used in reports, e.g. ``"conv-batchnorm"``.
    name: ClassVar[str]
    #: Op types (default domain) that can anchor a match; empty means any.
    anchor_ops: ClassVar[frozenset[str]] = frozenset()
    #: Past participle for messages: "not folded: ...".
    verb: ClassVar[str] = "fused"

    def anchors(self, node: ir.Node) -> bool:
        if node.domain not in eir.ONNX_DOMAINS:
            return False
        return not self.anchor_ops or node.op_type in self.anchor_ops

    @abc.abstractmethod
    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        """A candidate anchored at ``node``, or None when it is not one."""

    def check(self, match: Match, context: RuleContext) -> str | None:
        """Why ``match`` cannot be rewritten, or None when it can."""
        return None

    @abc.abstractmethod
    def rewrite(self, match: Match, context: RuleContext) -> str:
        """Rewrite the graph; return what was done, e.g. ``"folded into Conv_3"``."""


class RulePass(ir.passes.InPlacePass):
    """Apply a list of rules to a fixed point; rewrites the model it is given.

    Subclasses set ``name`` and ``rules``. The pass is in place (onnx_ir
    contract): call it on a model you own, or use the module's function
    facade, which copies first.
    """

    name: ClassVar[str]
    rules: Sequence[Rule] = ()
    #: A sweep that rewrites is followed by another; this bounds pathological chains.
    max_sweeps: ClassVar[int] = 16

    def call(self, model: ir.Model) -> ReportedPassResult:
        context = RuleContext(model=model, opset=eir.default_opset(model))
        applied: list[RuleOutcome] = []
        refused: list[RuleOutcome] = []
        for _ in range(self.max_sweeps):
            refused = []
            sweep_applied = self._sweep(context, refused)
            applied.extend(sweep_applied)
            if not sweep_applied:
                break
        report = PassReport(name=self.name, modified=bool(applied), outcomes=(*applied, *refused))
        logger.info("%s: %d rewrites, %d refusals", self.name, len(applied), len(refused))
        return ReportedPassResult(model=model, modified=report.modified, report=report)

    def _sweep(self, context: RuleContext, refused: list[RuleOutcome]) -> list[RuleOutcome]:
        applied = []
        for node in list(context.graph):
            for rule in self.rules:
                if node.graph is None:  # removed by an earlier rewrite in this sweep
                    break
                outcome = self._try(rule, node, context)
                if outcome is None:
                    continue
                if outcome.applied:
                    applied.append(outcome)
                    break
                refused.append(outcome)
        return applied

    @staticmethod
    def _try(rule: Rule, node: ir.Node, context: RuleContext) -> RuleOutcome | None:
        if not rule.anchors(node):
            return None
        match = rule.pattern(node, context)
        if match is None:
            return None
        reason = rule.check(match, context)
        labels = match.labels()  # after check, which may extend the match
        if reason is not None:
            return RuleOutcome(rule=rule.name, nodes=labels, applied=False, verb=rule.verb, message=reason)
        message = rule.rewrite(match, context)
        return RuleOutcome(rule=rule.name, nodes=labels, applied=True, verb=rule.verb, message=message)


def run_on_copy(pass_: ir.passes.PassBase, model: ir.Model) -> ReportedPassResult:
    """Run an in-place pass on a copy of ``model``; the caller's model is untouched.

    ``Model.clone`` copies the graph and shares the tensors, which is safe
    because rewrites never edit a tensor in place.
    """
    return pass_(model.clone())

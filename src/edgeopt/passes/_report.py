"""What a pass did and did not do, in words a user can act on.

Every rewrite and every refusal of a rule becomes a :class:`RuleOutcome`;
a pass collects them in a :class:`PassReport`. The refusals are what a user
can act on (``Conv_12 + BatchNormalization_13: not folded: Conv output has 2
consumers``): int8 quantization lists them in its notes, which
``edgeopt quantize`` prints and writes to its report.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

__all__ = ["PassReport", "ReportedPassResult", "RuleOutcome"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuleOutcome:
    """One rule at one place: applied (``message`` says what it did) or refused (``message`` says why)."""

    rule: str
    nodes: tuple[str, ...]
    applied: bool
    verb: str
    message: str

    def describe(self) -> str:
        where = " + ".join(self.nodes)
        if self.applied:
            return f"{where}: {self.message}"
        return f"{where}: not {self.verb}: {self.message}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PassReport:
    """The outcome of one pass: did it change the model, what it did and refused."""

    name: str
    modified: bool
    outcomes: tuple[RuleOutcome, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def applied(self) -> tuple[RuleOutcome, ...]:
        return tuple(o for o in self.outcomes if o.applied)

    @property
    def refused(self) -> tuple[RuleOutcome, ...]:
        return tuple(o for o in self.outcomes if not o.applied)

    def explain(self, *, include_applied: bool = False) -> list[str]:
        """One line per refusal; with ``include_applied`` also the notes and every rewrite."""
        if not include_applied:
            return [o.describe() for o in self.refused]
        return [*self.notes, *(o.describe() for o in self.outcomes)]


@dataclasses.dataclass
class ReportedPassResult(ir.passes.PassResult):
    """An ``onnx_ir`` pass result that also carries the pass's report."""

    report: PassReport

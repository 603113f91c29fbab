"""The default float pipeline run before quantization.

Order matters: constants must be initializers before rules can read them,
BatchNormalization must be folded before an exporter's leftover Mul/Add can
join the same Conv (and before MatMul + Add become a Gemm: a BatchNorm after
a MatMul leaves exactly that pair), and the last dead-code sweep drops the
weights folding replaced.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from edgeopt.metrics import count_of
from edgeopt.passes._report import PassReport
from edgeopt.passes._rules import RulePass
from edgeopt.passes.canonicalize import CanonicalizePass
from edgeopt.passes.eliminate_dead_code import EliminateDeadCodePass
from edgeopt.passes.fold_affine import FoldAffinePass
from edgeopt.passes.fold_batchnorm import FoldBatchNormPass
from edgeopt.passes.fold_constants import FoldConstantsPass
from edgeopt.passes.fold_pad import FoldPadPass
from edgeopt.passes.fuse_activations import FuseActivationsPass
from edgeopt.passes.fuse_matmul_add import FuseMatMulAddPass
from edgeopt.passes.split_sequence import SplitSequencePass

__all__ = ["PipelineResult", "default_passes", "optimize_for_quantization"]


def default_passes(*, copy_shared: bool = True, fuse_gemm: bool = True,
                   canonicalize: bool = True, integer_only: bool = False) -> list[RulePass]:
    """The stages of :func:`optimize_for_quantization`, in order.

    The weight-only schemes (fp16/bf16, int4) take ``copy_shared=False``: a tied weight's
    ``Transpose(E)`` is read through rather than folded into a second copy of E;
    ``fuse_gemm=False``: a MatMul + Add becoming a Gemm would only rename what a user excludes; and
    ``canonicalize=False``: they run no integer kernels to rewrite Div, PRelu and Gemm for (int4
    folds a Gemm's alpha and beta into its own MatMulNBits); only an Einsum dense layer becomes a MatMul,
    whose weight int4 holds. ``integer_only``: the microcontroller target's canonicalization (its C runs no
    float node) also makes a BatchNormalization it cannot fold a depthwise Conv or a Mul and an Add, and a Div
    or BatchNormalization scaling a graph input (``(x / 255 - mean) / std``) is rewritten too.
    """
    stages = [
        # Constant nodes and shape arithmetic become initializers, so rules see constants.
        FoldConstantsPass(copy_shared=copy_shared),
        # Identity/Dropout and orphaned nodes go, so "only reader" checks count real readers.
        EliminateDeadCodePass(),
        # A tensor sequence only taken apart again (dynamo's unoptimized torch.split) becomes a Split.
        SplitSequencePass(),
        # A zero Pad before a Conv becomes the Conv's own padding.
        FoldPadPass(),
        # BatchNormalization after Conv/ConvTranspose/Gemm/MatMul becomes part of the weights.
        FoldBatchNormPass(),
        # Per-channel Mul/Add left by exporters that pre-fold BatchNorm folds the same way.
        FoldAffinePass(),
        # MatMul + Add(bias) (an exported Linear, or what BatchNorm folding left) becomes one Gemm.
        FuseMatMulAddPass(),
        # Spelled-out hardswish, GELU, LayerNorm and SiLU become single ops (or are annotated).
        FuseActivationsPass(),
        # Div by a constant, a one-slope PRelu, Gemm's alpha/beta and a spatial mean become the forms
        # integer kernels take.
        CanonicalizePass(integer_only=integer_only, weight_only=not canonicalize),
        # The weights folding replaced, and nodes fusion orphaned, are dropped.
        EliminateDeadCodePass(),
    ]
    return [stage for stage in stages if fuse_gemm or not isinstance(stage, FuseMatMulAddPass)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineResult:
    """The optimized model and one report per stage, in order."""

    model: ir.Model
    modified: bool
    reports: tuple[PassReport, ...]

    def explain(self, *, include_applied: bool = False) -> list[str]:
        """Lines like ``fold-batchnorm: Conv_12 + BN_13: not folded: Conv output has 2 consumers``."""
        return [f"{report.name}: {line}" for report in self.reports
                for line in report.explain(include_applied=include_applied)]

    def refusal_notes(self) -> list[str]:
        """The rewrites a rule matched but refused, for a report's notes: a count, then one indented line
        per pass and reason, naming the first place and how many more (an exporter's pattern met at
        every block is one line: ``  not fused (fuse-activations): A + B and 5 more: HardSwish needs
        opset >= 14 (model has 13)``). None refused: no notes. A refusal whose node a later pass rewrote
        (a BatchNormalization not after a Conv, canonicalized into a Mul and an Add) is not listed."""
        by_reason: dict[tuple[str, str, str], list[tuple[str, ...]]] = {}
        for position, report in enumerate(self.reports):
            rewritten_later = {name for later in self.reports[position + 1:] for outcome in later.applied
                               for name in outcome.nodes}
            for outcome in report.refused:
                if outcome.nodes[-1] in rewritten_later:  # a later pass rewrote it: not as exported after all
                    continue
                by_reason.setdefault((report.name, outcome.verb, outcome.message), []).append(outcome.nodes)
        if not by_reason:
            return []
        total = sum(len(places) for places in by_reason.values())
        notes = [f"float passes: {count_of(total, 'rewrite', 'rewrites')} matched but not applied, so those nodes "
                 "stay as exported:"]
        for (name, verb, message), places in by_reason.items():
            more = f" and {len(places) - 1} more" if len(places) > 1 else ""
            notes.append(f"  not {verb} ({name}): {' + '.join(places[0])}{more}: {message}")
        return notes


def optimize_for_quantization(model: ir.Model, *, in_place: bool = False,
                              integer_only: bool = False) -> PipelineResult:
    """Run the default float passes on a copy of ``model`` (the input is not modified), or on
    ``model`` itself with ``in_place`` (the weights folding replaces are then freed as it goes);
    ``integer_only`` as :func:`default_passes` takes it."""
    working = model if in_place else model.clone()
    reports = []
    for stage in default_passes(integer_only=integer_only):
        reports.append(stage(working).report)
    return PipelineResult(model=working, modified=any(r.modified for r in reports), reports=tuple(reports))

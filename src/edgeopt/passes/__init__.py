"""Float graph passes that run before quantization.

Each pass is an ``onnx_ir`` in-place pass with a name, a docstring listing
its rewrites and preconditions, an honest ``modified`` flag and a report of
what its rules did and refused (:class:`PassReport`). Each has a function
facade (``fold_batchnorm(model)``) that works on a copy and returns the
result; :func:`optimize_for_quantization` runs the default stages in order.
"""

from __future__ import annotations

from edgeopt.passes._pipeline import PipelineResult, default_passes, optimize_for_quantization
from edgeopt.passes._report import PassReport, ReportedPassResult, RuleOutcome
from edgeopt.passes._rules import Match, Rule, RuleContext, RulePass
from edgeopt.passes.canonicalize import CanonicalizePass, canonicalize
from edgeopt.passes.eliminate_dead_code import EliminateDeadCodePass, eliminate_dead_code
from edgeopt.passes.fold_affine import FoldAffinePass, fold_affine
from edgeopt.passes.fold_batchnorm import FoldBatchNormPass, fold_batchnorm
from edgeopt.passes.fold_constants import FoldConstantsPass, fold_constants
from edgeopt.passes.fold_pad import FoldPadPass, fold_pad
from edgeopt.passes.fuse_activations import (
    PATTERN_KEY,
    FuseActivationsPass,
    activation_clamp,
    following_clamp,
    fuse_activations,
    is_relu6,
)
from edgeopt.passes.fuse_matmul_add import FuseMatMulAddPass, fuse_matmul_add
from edgeopt.passes.split_sequence import SplitSequencePass, split_sequence

#: Every pass class, for meta-tests and the CLI's ``passes`` listing.
ALL_PASSES: tuple[type[RulePass], ...] = (
    FoldConstantsPass,
    EliminateDeadCodePass,
    SplitSequencePass,
    FoldPadPass,
    FoldBatchNormPass,
    FoldAffinePass,
    FuseMatMulAddPass,
    FuseActivationsPass,
    CanonicalizePass,
)

__all__ = [
    "ALL_PASSES",
    "PATTERN_KEY",
    "CanonicalizePass",
    "EliminateDeadCodePass",
    "FoldAffinePass",
    "FoldBatchNormPass",
    "FoldConstantsPass",
    "FoldPadPass",
    "FuseActivationsPass",
    "FuseMatMulAddPass",
    "Match",
    "PassReport",
    "PipelineResult",
    "ReportedPassResult",
    "Rule",
    "RuleContext",
    "RuleOutcome",
    "RulePass",
    "SplitSequencePass",
    "activation_clamp",
    "canonicalize",
    "default_passes",
    "eliminate_dead_code",
    "fold_affine",
    "fold_batchnorm",
    "fold_constants",
    "fold_pad",
    "following_clamp",
    "fuse_activations",
    "fuse_matmul_add",
    "is_relu6",
    "optimize_for_quantization",
    "split_sequence",
]

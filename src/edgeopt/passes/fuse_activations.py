"""Fuse activations and normalizations that exporters write out op by op.

Quantization treats an activation as one op with one output range; a
hardswish spelled as five ops would get five ranges and five rounding steps.
This pass turns the spelled-out forms into single ONNX ops where the model's
opset has them (HardSigmoid, HardSwish >= 14, LayerNormalization >= 17,
Gelu >= 20, Swish >= 24) and otherwise annotates the nodes
(``metadata_props["edgeopt.pattern"]``) so later stages can treat the group
as one activation.

Clamping activations need no rewrite: :func:`activation_clamp` tells the
quantizer the range a Relu or a constant Clip (ReLU6 is ``Clip(0, 6)``)
clamps to, which the int8 kernel applies as its output clamp.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from edgeopt.passes._matching import clip_bounds, is_op, sole_consumer
from edgeopt.passes._report import ReportedPassResult
from edgeopt.passes._rules import RulePass, run_on_copy
from edgeopt.passes.rules import (
    PATTERN_KEY,
    ClampMinMaxRule,
    ClipHardSigmoidRule,
    GeluRule,
    HardSigmoidMulRule,
    L2NormRule,
    LayerNormRule,
    RmsNormRule,
    SiluRule,
    TanhGeluRule,
)

__all__ = [
    "PATTERN_KEY",
    "FuseActivationsPass",
    "activation_clamp",
    "following_clamp",
    "fuse_activations",
    "is_relu6",
]


def activation_clamp(node: ir.Node) -> tuple[float, float] | None:
    """The (low, high) range a clamping activation maps onto, or None.

    ``Relu`` -> ``(0, inf)``; ``Clip`` with constant bounds (attributes
    before opset 11, inputs after; a missing bound is infinite) -> its
    bounds. Any other node, or a Clip with computed bounds, -> None.
    """
    if is_op(node, "Relu"):
        return (0.0, math.inf)
    if is_op(node, "Clip"):
        return clip_bounds(node)
    return None


def is_relu6(node: ir.Node) -> bool:
    """True for ``Clip(x, 0, 6)``, which is how exporters write ReLU6."""
    return activation_clamp(node) == (0.0, 6.0)


def following_clamp(node: ir.Node) -> tuple[ir.Node, tuple[float, float]] | None:
    """The clamping activation that alone reads ``node``'s output, and its range.

    This is the clamp a quantized Conv/Gemm can apply itself (fused ReLU/ReLU6).
    """
    reader = sole_consumer(node.outputs[0]) if node.outputs else None
    clamp = activation_clamp(reader) if reader is not None else None
    return (reader, clamp) if clamp is not None else None


class FuseActivationsPass(RulePass):
    """Rewrite spelled-out activations and LayerNorm into single ops (or annotate them).

    Rewrites:

    * ``ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div[/Mul gamma][/Add beta]``
      over trailing axes -> ``LayerNormalization`` (opset >= 17);
    * ``x * rsqrt(mean(x^2) + eps) [* w]`` over the last axis (RMSNorm) -> annotated ``rms_norm``;
    * ``x / max(ReduceL2(x, axes), eps)`` (``F.normalize``) -> annotated ``l2_norm``;
    * ``clip(x + 3, 0, 6) / 6`` -> ``HardSigmoid(alpha=1/6, beta=0.5)``;
    * ``x * clip(x + 3, 0, 6) / 6`` (any association; ReLU6 is a Clip) and
      ``x * HardSigmoid(x)`` -> ``HardSwish`` (opset >= 14; below it the
      first becomes ``x * HardSigmoid(x)``);
    * ``0.5 * x * (1 + erf(x / sqrt(2)))`` -> ``Gelu`` (opset >= 20), else
      annotated ``gelu``; ``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))`` ->
      ``Gelu(approximate="tanh")`` (opset >= 20), else annotated ``gelu_tanh``;
    * ``x * sigmoid(x)`` -> ``Swish`` (opset >= 24), else annotated ``silu``;
    * ``Min(Max(x, a), b)`` (either order, or one alone) with constant bounds -> ``Clip(x, a, b)``,
      ``Max(x, 0)`` -> ``Relu``.

    Preconditions (else left, with the reason): every intermediate has only
    the readers the formula gives it and is not a graph output; constants
    match (3, 0, 6, 1/6, sqrt(2), 0.5, sqrt(2/pi), 0.044715, exponents 2 and 3); LayerNorm axes are the
    trailing ones with static normalized dims. Below the opset an op needs,
    the pattern is left as is and the reason names the opset; the model's
    opset is never raised. Rewrites the model it is given.
    """

    name = "fuse-activations"

    def __init__(self) -> None:
        self.rules = (LayerNormRule(), RmsNormRule(), L2NormRule(), ClampMinMaxRule(), ClipHardSigmoidRule(),
                      HardSigmoidMulRule(), GeluRule(), TanhGeluRule(), SiluRule())


def fuse_activations(model: ir.Model) -> ReportedPassResult:
    """Fuse activations on a copy of ``model``; the input is not modified."""
    return run_on_copy(FuseActivationsPass(), model)

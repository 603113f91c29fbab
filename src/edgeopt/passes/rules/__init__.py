"""Fusion rules that recognize activations and normalizations written out op by op."""

from __future__ import annotations

from edgeopt.passes.rules.activations import (
    PATTERN_KEY,
    ClampMinMaxRule,
    ClipHardSigmoidRule,
    HardSigmoidMulRule,
    SiluRule,
    clip_node,
)
from edgeopt.passes.rules.gelu import GeluRule, TanhGeluRule
from edgeopt.passes.rules.l2_norm import L2_NORM, L2NormRule
from edgeopt.passes.rules.layer_norm import LayerNormRule
from edgeopt.passes.rules.rms_norm import RMS_NORM, RmsNormRule

__all__ = [
    "L2_NORM",
    "PATTERN_KEY",
    "RMS_NORM",
    "ClampMinMaxRule",
    "ClipHardSigmoidRule",
    "GeluRule",
    "HardSigmoidMulRule",
    "L2NormRule",
    "LayerNormRule",
    "RmsNormRule",
    "SiluRule",
    "TanhGeluRule",
    "clip_node",
]

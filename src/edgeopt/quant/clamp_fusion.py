"""Which Relu/Clip is quantized as the clamp of the op before it, and why another stays float.

A Relu or Clip is never quantized alone on the ORT target: after a quantized op whose only reader it is (a
Conv, Gemm, MatMul, Add or Mul, :data:`~edgeopt.quant.ops.FUSING_PRODUCERS`, or an op whose rule
``fuses_clamp``), the producer's output gets no Q/DQ pair, the activation's output does, and the clamp
becomes the quantization range (ONNX Runtime drops the activation). That needs 0 inside the clamp, as every
quantized range holds it. On the MCU target a Relu/Clip no op absorbs runs by itself (its rule is
``standalone``: the C clamps while it requantizes).
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx_ir as ir

from edgeopt.passes import activation_clamp
from edgeopt.quant.ops import FUSING_PRODUCERS, OpRole, OpRule

__all__ = ["clamp_fusions"]


def _clamp_allows_fusion(node: ir.Node) -> bool:
    """Relu/Clip fuse when 0 lies within their clamp (the quantized range always contains 0)."""
    clamp = activation_clamp(node)
    return clamp is not None and clamp[0] <= 0.0 <= clamp[1]


def _unfused_reason(node: ir.Node) -> str:
    """Why a Relu/Clip stays float: it is quantized only as the clamp of the op before it."""
    clamp = activation_clamp(node)
    if clamp is None:
        return f"{node.op_type} with bounds that are not constants cannot fold into a quantization range"
    if not clamp[0] <= 0.0 <= clamp[1]:
        return f"{node.op_type} to [{clamp[0]:g}, {clamp[1]:g}] excludes 0, which every quantized range holds"
    return f"{node.op_type} is quantized only fused after a Conv, Gemm, MatMul, Add or Mul (its only reader)"


def _fused_activation(producer: ir.Node, candidates: Mapping[str, ir.Node],
                      rules: Mapping[str, OpRule]) -> ir.Node | None:
    """The Relu/Clip that alone reads ``producer``'s output and folds into its range, if any."""
    output = producer.outputs[0]
    uses = list(output.uses())
    fuses = producer.op_type in FUSING_PRODUCERS or rules[producer.op_type].fuses_clamp
    if not fuses or len(uses) != 1 or output.is_graph_output():
        return None
    consumer, index = uses[0]
    if index != 0 or consumer.name not in candidates or consumer.op_type not in ("Relu", "Clip"):
        return None
    if not _clamp_allows_fusion(consumer):
        return None
    return consumer


def clamp_fusions(candidates: Mapping[str, ir.Node], refusals: dict[str, str],
                  rules: Mapping[str, OpRule]) -> dict[str, ir.Node]:
    """Each integer producer's fused Relu/Clip (producer name -> activation); an activation fused with
    no producer joins ``refusals`` with the reason."""
    fused_by_producer = {node.name: activation for node in candidates.values()
                         if (activation := _fused_activation(node, candidates, rules)) is not None}
    fused = {activation.name for activation in fused_by_producer.values()}
    for node in candidates.values():
        rule = rules[node.op_type]
        standalone = rule.standalone and _clamp_allows_fusion(node)
        if node.name not in fused and rule.role is OpRole.ACTIVATION and not standalone:
            refusals[node.name] = _unfused_reason(node)
    return fused_by_producer

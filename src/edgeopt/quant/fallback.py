"""``--fallback fp16``: the nodes an int8 model keeps out of int8 compute in float16 instead of float32.

An int8 QDQ model keeps some nodes float: those the user excluded, those the
accuracy search returned, and those without an integer kernel (LayerNorm, a
spelled-out GELU ...). With ``Int8Config(fallback="fp16")`` they compute in
float16, as a mixed int8/fp16 deployment does on a runtime with float16
kernels (GPU, NPU, ARM CPUs with FP16 arithmetic): their weights are stored
at half the size, and a Cast joins each to its int8 neighbours' float32
Q/DQ side. :func:`edgeopt.quant.float16.convert_fp16` does the conversion, with
its checks: a node whose values float16 cannot hold (beyond +-32752, half its
range, on the calibration data, read again for that), or an op float16 does not suit
(:data:`edgeopt.quant.float16.FLOAT32_OPS`), stays float32 and says why. The
int8 nodes, the Q/DQ pairs and the model's inputs and outputs keep their types.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import onnx_ir as ir

from edgeopt.metrics import count_of
from edgeopt.quant.float16 import convert_fp16
from edgeopt.quant.ops import is_float16_cast
from edgeopt.quant.registry import Batch, FloatNode, ProgressCallback

__all__ = ["IN_8_BITS", "IN_FLOAT16", "KEPT_FLOAT32", "fallback_part", "fp16_fallback", "past_fallback_casts"]

#: Appended to the reason of a float node that computes in float16,
IN_FLOAT16 = "computes in float16 (--fallback fp16)"
#: and, followed by why, to that of one float16 does not suit;
KEPT_FLOAT32 = "float32, not float16"
#: int4 weight-only: to that of a layer kept out of int4 whose weight is held in 8 bits (followed by the format).
IN_8_BITS = "weight held in 8 bits"


def fallback_part(reason: str) -> str:
    """What a fallback (:func:`fp16_fallback`, int4's 8 bits) appended to a float node's ``reason`` ("" when
    nothing): a reason written anew (the accuracy search's) keeps it."""
    markers = (IN_FLOAT16, KEPT_FLOAT32, IN_8_BITS)
    at = min((reason.find(f"; {marker}") for marker in markers if f"; {marker}" in reason), default=-1)
    return reason[at:] if at >= 0 else ""


def past_fallback_casts(nodes: Iterable[ir.Node]) -> list[ir.Node]:
    """``nodes`` with each Cast to float16 replaced by its readers: such a Cast in an int8 model joins a
    dequantized activation to the nodes computing in float16, which are the ones that read it (the
    accuracy search returns those to float, not a Cast the float model does not have)."""
    found = []
    for node in nodes:
        if is_float16_cast(node):
            found += [use.node for output in node.outputs for use in output.uses()]
        else:
            found.append(node)
    return found


def fp16_fallback(model: ir.Model, float_nodes: Sequence[FloatNode], data: Iterable[Batch] | None, *,
                  progress: ProgressCallback | None = None) -> tuple[tuple[FloatNode, ...], list[str]]:
    """``float_nodes`` of the int8 ``model`` (rewritten in place) computing in float16 where it holds
    their values; returns the float nodes, each reason saying which type it computes in, and the notes."""
    conversion = convert_fp16(model, (), data, within={entry.node_name for entry in float_nodes}, progress=progress)
    present = {node.name for node in model.graph}  # the crash workaround replaces a Transpose before a MatMul
    low = {node.name for node in conversion.plan.low_nodes}
    kept = {node.name: reason for node, reason in conversion.plan.kept}
    nodes = tuple(entry._replace(reason=f"{entry.reason}; {IN_FLOAT16}") if entry.node_name in low
                  else entry._replace(reason=f"{entry.reason}; {KEPT_FLOAT32}: {kept[entry.node_name]}")
                  if entry.node_name in kept else entry
                  for entry in float_nodes if entry.node_name in present)
    log = conversion.log
    computes = "computes" if len(low) == 1 else "compute"
    notes = [f"--fallback fp16: {len(low)} of {count_of(len(nodes), 'float node', 'float nodes')} {computes} "
             f"in float16 ({count_of(len(log.tensors), 'weight', 'weights')}, {log.bytes_before} -> "
             f"{log.bytes_after} bytes; {count_of(len(conversion.casts.made), 'Cast node', 'Cast nodes')} join "
             "them to the float32 side of the Q/DQ pairs)"]
    if kept:
        notes.append(f"--fallback fp16: {count_of(len(kept), 'float node stays', 'float nodes stay')} float32, "
                     "the reason in float_nodes")
    if log.clamped or log.flushed:
        notes.append(f"--fallback fp16: {count_of(log.clamped, 'weight value', 'weight values')} clamped to "
                     f"+-65504, {count_of(log.flushed, 'weight value', 'weight values')} rounded to 0")
    return nodes, notes + conversion.ranges.notes + conversion.crash_notes

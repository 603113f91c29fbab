"""Attention masks: constants no 8-bit range represents next to the scores they are added to.

An additive mask holds -inf (PyTorch's scaled_dot_product_attention) or a large
negative stand-in (BERT's -10000, Hugging Face's float32 minimum, Swin's -100) where a
position must get no attention. Quantized, -inf clamps to the low end of the
scores' range, and a stand-in stretches that range over the mask so every
score rounds to one value: either way Softmax weights the masked positions.
So the nodes that read or write a masked tensor stay float (placement rule 6).
A tensor is masked when it is such a constant read as an operand, or computed
from one: inf flows to every reader up to a Softmax (whose output is finite);
a large finite value is a mask only on the way to a Softmax (elsewhere,
``x - 20000``, it is an offset like any other).

Position arithmetic done in float (:func:`edgeopt.ir.index_arithmetic_values`: T5's
relative position buckets ``(log(n / 8) / log(16) * 8).long()``, which a Cast truncates,
rotary angles ``inv_freq @ position_ids``, which cos/sin read) stays float too: rounded
to 8 bits, positions would move to other buckets and angles by a radian.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.quant.ops import OpRole, OpRule

__all__ = ["FLOAT_TARGET_MASK_FLOOR", "GRID_REASON", "INDEX_REASON", "MASK_FLOOR", "grid_refusal", "index_refusal",
           "mask_like_values", "mask_refusal"]

#: Additive attention masks hold -inf, or a large negative stand-in: BERT's -10000, float32's minimum.
MASK_FLOOR = -1e4
#: Where the target runs float nodes (ONNX Runtime), Swin's -100 too (exp(-100) is 4e-44: no attention), which
#: stretched the range of the scores it is added to 30x (their Softmax at 20 dB, 38 dB with the Add float). The
#: microcontroller target, whose C has no float node, keeps :data:`MASK_FLOOR` and quantizes it with the
#: scores (the model compiles).
FLOAT_TARGET_MASK_FLOOR = -100.0


def _mask_kind(node: ir.Node, index: int, rules: Mapping[str, OpRule], floor: float) -> str | None:
    """``"inf"`` or ``"large"`` when input ``index`` of ``node`` is a float constant holding inf/NaN or
    values <= ``floor`` that the node would quantize as an operand (or reads in float: its
    output carries them on), not as a weight, a bias or a clamp bound; else None."""
    if eir.is_op(node, *rules):
        rule = rules[node.op_type]
        quantized = rule.activation_inputs is None or index in rule.activation_inputs
        if rule.role in (OpRole.WEIGHTED, OpRole.ACTIVATION) or not quantized:
            return None
    array = eir.constant_array(node.inputs[index])
    if array is None or array.dtype.kind != "f" or array.size == 0:
        return None
    if not bool(np.isfinite(array).all()):
        return "inf"
    return "large" if float(array.min()) <= floor else None


def _softmax_feeders(graph: ir.Graph) -> set[str]:
    """The names of the values some Softmax input is computed from (that input included)."""
    feeders: set[str] = set()
    for node in reversed(list(graph)):
        if eir.is_op(node, "Softmax") or any(output.name in feeders for output in node.outputs):
            feeders.update(value.name for value in node.inputs if value is not None)
    return feeders


def mask_like_values(graph: ir.Graph, rules: Mapping[str, OpRule], floor: float = MASK_FLOOR) -> dict[str, str]:
    """Tensors holding inf, NaN or mask values (at or below ``floor``; rule 6), each mapped to the constant
    it comes from.
    inf flows on to every reader up to a Softmax; a large finite value is a mask only on the way to a
    Softmax (elsewhere, ``x - 20000``, it is an offset like any other)."""
    feeders = _softmax_feeders(graph)
    sources: dict[str, str] = {}
    finite: set[str] = set()  # marked by a large finite constant, not by inf
    for node in graph:
        toward_softmax = any(output.name in feeders for output in node.outputs)
        for index, value in enumerate(node.inputs):
            if value is None:
                continue
            kind = None if value.name in sources else _mask_kind(node, index, rules, floor)
            if kind == "inf" or (kind == "large" and toward_softmax):
                sources[value.name] = value.name
                finite.update([value.name] if kind == "large" else [])
            if value.name not in sources or eir.is_op(node, "Softmax"):
                continue
            for output in node.outputs:
                if output.name not in sources and (value.name not in finite or output.name in feeders):
                    sources[output.name] = sources[value.name]
                    finite.update([output.name] if value.name in finite else [])
    return sources


def mask_refusal(node: ir.Node, sources: Mapping[str, str], floor: float = MASK_FLOOR) -> str | None:
    value = next((v for v in (*node.inputs, *node.outputs) if v is not None and v.name in sources), None)
    if value is None:
        return None
    source = sources[value.name]
    held = f"{value.name!r} holds" if value.name == source else f"{value.name!r} holds, from the constant {source!r},"
    return f"{held} -inf, NaN or values <= {floor:g} (an attention mask?), which no 8-bit range represents"


#: Why a node computing integer arithmetic in float (a position bucket) stays float.
INDEX_REASON = ("computes positions in float for a Cast to an integer or a Sin/Cos (T5's relative position "
                "buckets, rotary angles): 8-bit rounding would move them")


def _touches(node: ir.Node, values: set[ir.Value]) -> bool:
    """Whether ``node`` reads or writes one of ``values``."""
    return any(v in values for v in (*node.inputs, *node.outputs) if v is not None)


def index_refusal(node: ir.Node, values: set[ir.Value]) -> str | None:
    """:data:`INDEX_REASON` when ``node`` reads or writes one of ``values`` (index arithmetic), else None."""
    return INDEX_REASON if _touches(node, values) else None


#: Why a node computing positions from the input's size (a detector's grid, its box centres) stays float.
GRID_REASON = ("computes positions from the input's size (a detector's grid of cells, its boxes in pixels): "
               "their range grows with the image, so a range calibrated on one size clips them on larger ones")


def grid_refusal(node: ir.Node, values: set[ir.Value]) -> str | None:
    """:data:`GRID_REASON` when ``node`` reads or writes one of ``values``
    (:func:`edgeopt.ir.run_time_grid_values`), else None."""
    return GRID_REASON if _touches(node, values) else None

"""Fold a zero ``Pad`` in front of a ``Conv`` into the Conv's own padding.

TensorFlow/Keras exports (``ZeroPadding2D`` before a strided conv, "SAME"
padding that is not symmetric) and hand-written modules put an explicit
``Pad(x, pads, mode="constant", value=0)`` before a ``Conv``. A Conv pads
with zeros itself, by ``pads = [begin_1, ..., begin_n, end_1, ..., end_n]``
over its spatial axes, so ``Conv(Pad(x))`` is ``Conv(x)`` with the Pad's
spatial amounts added to the Conv's: the same values, in the same order.

Quantized, the Pad would stand between a DequantizeLinear and a
QuantizeLinear: ONNX Runtime has no fusion for it (it pads float values
between two conversions) and the microcontroller code copies the tensor once
more; folded, the padding is the integer Conv's.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.passes._matching import is_op, sole_consumer
from edgeopt.passes._report import ReportedPassResult
from edgeopt.passes._rules import Match, Rule, RuleContext, RulePass, run_on_copy

__all__ = ["FoldPadPass", "fold_pad"]

#: Before opset 11, Pad takes its amounts and value as attributes.
PAD_INPUTS_OPSET = 11


@dataclasses.dataclass
class _PadConv(Match):
    pad: ir.Node
    conv: ir.Node
    pads: np.ndarray | None = None  # the Conv's new pads


def _pad_amounts(pad: ir.Node, opset: int) -> tuple[np.ndarray, float] | str:
    """The Pad's amounts over every axis and its fill value, or why they are not constants."""
    if pad.attributes.get_string("mode", "constant") != "constant":
        return f"{pad.attributes.get_string('mode')} padding is not the zeros a Conv pads with"
    if opset < PAD_INPUTS_OPSET:
        return np.asarray(pad.attributes.get_ints("pads", []), np.int64), pad.attributes.get_float("value", 0.0)
    if len(pad.inputs) > 3 and pad.inputs[3] is not None:
        return "the Pad names its axes (an axes input)"
    amounts = eir.constant_array(pad.inputs[1]) if len(pad.inputs) > 1 else None
    if amounts is None:
        return "the pads are not a constant"
    value = eir.constant_array(pad.inputs[2]) if len(pad.inputs) > 2 and pad.inputs[2] is not None else 0.0
    if value is None or np.size(value) != 1:
        return "the padding value is not a one-element constant"
    return amounts.reshape(-1).astype(np.int64), float(np.asarray(value).reshape(()))


def _conv_pads(conv: ir.Node, spatial: int) -> np.ndarray | str:
    if conv.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
        return f"the Conv pads by auto_pad={conv.attributes.get_string('auto_pad')}"
    pads = np.asarray(conv.attributes.get_ints("pads", [0] * (2 * spatial)), np.int64)
    if pads.size != 2 * spatial:
        return f"the Conv has {pads.size // 2} padded axes, the Pad {spatial} spatial ones"
    return pads


class PadIntoConvRule(Rule):
    """Pad(x, zeros over N and C, value 0) -> Conv -> one Conv with the amounts added to its pads."""

    name = "pad-into-conv"
    anchor_ops = frozenset({"Pad"})
    verb = "folded"

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        conv = sole_consumer(node.outputs[0])
        if not is_op(conv, "Conv") or conv.inputs[0] is not node.outputs[0]:
            return None
        return _PadConv(nodes=(node, conv), pad=node, conv=conv)

    def check(self, match: _PadConv, context: RuleContext) -> str | None:
        if match.pad.outputs[0].is_graph_output():
            return "the Pad output is a graph output"
        found = _pad_amounts(match.pad, context.opset)
        if isinstance(found, str):
            return found
        amounts, value = found
        if value != 0.0:
            return f"the Pad fills with {value:g}, not the zeros a Conv pads with"
        rank = amounts.size // 2
        if rank < 3 or amounts.size != 2 * rank:
            return f"the Pad has {amounts.size} amounts, not two for each axis of a Conv input"
        if (amounts < 0).any():
            return "the Pad crops (a negative amount)"
        if amounts[[0, 1, rank, rank + 1]].any():
            return "the Pad pads the batch or channel axis"
        conv_pads = _conv_pads(match.conv, rank - 2)
        if isinstance(conv_pads, str):
            return conv_pads
        match.pads = conv_pads + np.concatenate([amounts[2:rank], amounts[rank + 2:]])
        return None

    def rewrite(self, match: _PadConv, context: RuleContext) -> str:
        match.conv.attributes["pads"] = ir.AttrInt64s("pads", [int(p) for p in match.pads])
        match.conv.replace_input_with(0, match.pad.inputs[0])
        eir.remove_nodes(context.graph, [match.pad])
        return f"folded into {eir.node_label(match.conv)}"


class FoldPadPass(RulePass):
    """Fold a constant zero Pad before a Conv into the Conv's pads.

    Rewrites:

    * ``Conv(Pad(x, pads, mode="constant", value=0))`` -> ``Conv(x)`` with the
      Pad's spatial amounts added to the Conv's ``pads`` (begins to begins,
      ends to ends).

    Preconditions (else left, with the reason): the Conv alone reads the Pad
    (as its input) and the Pad output is not a graph output; the mode is
    constant and the value 0; the amounts are constants, non-negative, zero
    on the batch and channel axes, given for every axis (no ``axes`` input);
    the Conv has no ``auto_pad``. Rewrites the model it is given.
    """

    name = "fold-pad"

    def __init__(self) -> None:
        self.rules = (PadIntoConvRule(),)


def fold_pad(model: ir.Model) -> ReportedPassResult:
    """Fold zero Pads into the Convs after them on a copy of ``model``; the input is not modified."""
    return run_on_copy(FoldPadPass(), model)

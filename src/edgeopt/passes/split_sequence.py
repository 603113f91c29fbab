"""A tensor sequence only taken apart again -> one ``Split``.

``SplitToSequence(x, split, axis)`` cuts ``x`` into parts along ``axis`` and holds them as one
tensor sequence; ``SequenceAt(sequence, i)`` takes part ``i`` out. When every reader of the
sequence is a SequenceAt at a constant position, the two are ``Split(x, split, axis)``, part
``i`` being its output ``i``: the same values, no sequence.

torch's dynamo exporter, unoptimized (``optimize=False``), writes ``torch.split`` and
``Tensor.chunk`` that way (its optimizer, like the TorchScript exporter, writes the Split). The
sequence ops have no integer kernel, so they stayed float between Q/DQ pairs, and a sequence of
parts of unequal sizes (a YOLO head's ``y.split((2, 2, 5), 4)``) gives every part one symbolic
shape, which made ONNX Runtime fail to run the quantized model's fidelity check ("Shape mismatch
attempting to re-use buffer").
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.passes._report import ReportedPassResult
from edgeopt.passes._rules import Match, Rule, RuleContext, RulePass, run_on_copy

__all__ = ["SplitSequencePass", "split_sequence"]

#: From opset 13 Split takes its sizes as an input, before it as an attribute.
SPLIT_INPUT_OPSET = 13


@dataclasses.dataclass
class _SequenceMatch(Match):
    split: ir.Node
    readers: list[ir.Node]
    sizes: np.ndarray | None = None
    positions: list[int] = dataclasses.field(default_factory=list)


def _sizes(node: ir.Node) -> np.ndarray | str:
    """The parts' sizes along the axis, or why they are not known."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return "no split sizes (parts of 1, kept or squeezed by keepdims)"
    split = eir.constant_array(node.inputs[1])
    if split is None:
        return "the split sizes are not a constant"
    if split.ndim == 1:
        return split.astype(np.int64)
    shape = eir.static_shape(node.inputs[0])
    axis = node.attributes.get_int("axis", 0)
    if shape is None:
        return "one chunk size, and the length of the split axis is not known"
    length, chunk = shape[axis % len(shape)], int(split)
    if chunk <= 0:
        return f"a chunk size of {chunk}"
    return np.array([chunk] * (length // chunk) + ([length % chunk] if length % chunk else []), np.int64)


def _position(reader: ir.Node, parts: int) -> int | None:
    position = eir.constant_array(reader.inputs[1]) if len(reader.inputs) > 1 else None
    if position is None or position.size != 1 or not -parts <= int(position.reshape(())) < parts:
        return None
    return int(position.reshape(())) % parts


class SplitSequenceRule(Rule):
    """SplitToSequence(x, split) read only by SequenceAt(., constant i) -> Split(x, split), output i."""

    name = "sequence-to-split"
    anchor_ops = frozenset({"SplitToSequence"})
    verb = "rewritten"

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        readers = eir.consumers(node.outputs[0])
        if not readers or not all(eir.is_op(reader, "SequenceAt") for reader in readers):
            return None
        return _SequenceMatch(nodes=(node, *readers), split=node, readers=readers)

    def check(self, match: _SequenceMatch, context: RuleContext) -> str | None:
        if match.split.outputs[0].is_graph_output():
            return "the sequence is a graph output"
        sizes = _sizes(match.split)
        if isinstance(sizes, str):
            return sizes
        positions = [_position(reader, len(sizes)) for reader in match.readers]
        if None in positions:
            return "a SequenceAt position is not a constant within the parts"
        named = [position for reader, position in zip(match.readers, positions) if reader.outputs[0].is_graph_output()]
        if len(named) != len(set(named)):  # one Split output cannot carry two graph outputs' names
            return "two graph outputs take the same part out"
        match.sizes, match.positions = sizes, positions
        return None

    def rewrite(self, match: _SequenceMatch, context: RuleContext) -> str:
        node, graph = match.split, context.graph
        axis = node.attributes.get_int("axis", 0)
        x = node.inputs[0]
        if context.opset >= SPLIT_INPUT_OPSET:
            sizes = eir.add_initializer(graph, match.sizes, f"{eir.node_label(node)}_sizes")
            split = ir.node("Split", [x, sizes], {"axis": axis}, num_outputs=len(match.sizes), name=node.name)
        else:
            split = ir.node("Split", [x], {"axis": axis, "split": [int(s) for s in match.sizes]},
                            num_outputs=len(match.sizes), name=node.name)
        graph.insert_before(node, split)
        for output, size in zip(split.outputs, match.sizes):
            if x.dtype is not None:
                output.dtype = x.dtype
            if x.shape is not None:
                dims = list(x.shape.dims)
                dims[axis % len(dims)] = int(size)
                output.shape = ir.Shape(dims)
        for reader, position in zip(match.readers, match.positions):
            old, new = reader.outputs[0], split.outputs[position]
            old.shape = None  # the sequence's element shape, one symbol for parts of different sizes
            name = old.name if new.name is None and not old.is_graph_output() else None
            eir.replace_value(old, new)
            if name is not None:
                old.name, new.name = None, name
        eir.remove_nodes(graph, [*match.readers, node])
        return f"rewritten as Split into {len(match.sizes)} parts"


class SplitSequencePass(RulePass):
    """Take a tensor sequence that is only taken apart again out of the graph.

    Rewrites:

    * ``SplitToSequence(x, split, axis)`` whose every reader is ``SequenceAt(sequence, i)`` with a
      constant ``i`` -> ``Split(x, split, axis)``, each SequenceAt's output being Split's output ``i``.

    Preconditions (else left, with the reason): the split sizes are a constant (a list of sizes, or
    one chunk size with the split axis of static length); every position is a constant within the
    parts; the sequence is not a graph output. Rewrites the model it is given.
    """

    name = "split-sequence"

    def __init__(self) -> None:
        self.rules = (SplitSequenceRule(),)


def split_sequence(model: ir.Model) -> ReportedPassResult:
    """Rewrite SplitToSequence -> SequenceAt as Split on a copy of ``model``; the input is not modified."""
    return run_on_copy(SplitSequencePass(), model)

"""SplitSequencePass: SplitToSequence taken apart by SequenceAt becomes one Split, outputs unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from edgeopt import ir as eir
from edgeopt.passes import optimize_for_quantization, split_sequence

from ._helpers import assert_same_outputs, explain, make_model, op_types


def _int64(name: str, value) -> numpy_helper.TensorProto:
    return numpy_helper.from_array(np.array(value, np.int64), name)


def _yolo_split(split, positions, *, opset: int = 18):
    """dynamo's unoptimized ``y.split(...)`` of a YOLO head: x [1, 3, 9] cut along the last axis, the
    parts read back at ``positions`` and joined again in another order."""
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"], name="sigmoid"),
             helper.make_node("SplitToSequence", ["s", "split"], ["parts"], name="split", axis=-1)]
    initializers = [_int64("split", split)]
    for k, position in enumerate(positions):
        initializers.append(_int64(f"at{k}", position))
        nodes.append(helper.make_node("SequenceAt", ["parts", f"at{k}"], [f"p{k}"], name=f"take{k}"))
    nodes.append(helper.make_node("Concat", [f"p{k}" for k in reversed(range(len(positions)))], ["y"],
                                  name="join", axis=-1))
    return make_model(nodes, [("x", [1, 3, 9])], [("y", [1, 3, 9])], initializers, opset=opset)


@pytest.mark.parametrize("split, positions, sizes", [
    ([2, 2, 5], [0, 1, 2], [2, 2, 5]),  # parts of unequal sizes
    (4, [2, 0, -2], [4, 4, 1]),  # one chunk size (Tensor.chunk), a negative position
])
def test_a_sequence_taken_apart_becomes_a_split(split, positions, sizes):
    model = _yolo_split(split, positions)
    result = split_sequence(model)
    assert op_types(result.model) == ["Sigmoid", "Split", "Concat"]
    node = result.model.graph.node(1)
    np.testing.assert_array_equal(eir.constant_array(node.inputs[1]), sizes)
    assert [tuple(output.shape) for output in node.outputs] == [(1, 3, size) for size in sizes]
    assert_same_outputs(model, result.model)


def test_before_opset_13_the_sizes_are_an_attribute():
    model = _yolo_split([2, 2, 5], [2, 1, 0], opset=12)
    result = split_sequence(model)
    assert list(result.model.graph.node(1).attributes.get_ints("split")) == [2, 2, 5]
    assert_same_outputs(model, result.model)


def test_a_computed_position_is_left_with_the_reason():
    nodes = [helper.make_node("SplitToSequence", ["x", "split"], ["parts"], name="split", axis=1),
             helper.make_node("Shape", ["x"], ["shape"], name="shape", start=0, end=1),
             helper.make_node("Squeeze", ["shape"], ["first"], name="squeeze"),
             helper.make_node("SequenceAt", ["parts", "first"], ["y"], name="take")]
    model = make_model(nodes, [("x", [1, 4])], [("y", [1, "part"])], [_int64("split", [1, 3])], opset=18)
    result = split_sequence(model)
    assert explain(result) == ["split + take: not rewritten: a SequenceAt position is not a constant within the parts"]


def test_two_graph_outputs_taking_out_the_same_part_are_left_with_the_reason():
    # one Split output cannot carry both names: rewritten, one output would lose its name
    nodes = [helper.make_node("SplitToSequence", ["x", "split"], ["parts"], name="split", axis=1),
             helper.make_node("SequenceAt", ["parts", "zero"], ["a"], name="take_a"),
             helper.make_node("SequenceAt", ["parts", "zero"], ["b"], name="take_b")]
    model = make_model(nodes, [("x", [1, 4])], [("a", [1, 2]), ("b", [1, 2])],
                       [_int64("split", [2, 2]), _int64("zero", 0)], opset=18)
    result = split_sequence(model)
    assert explain(result) == ["split + take_a + take_b: not rewritten: two graph outputs take the same part out"]
    assert [value.name for value in result.model.graph.outputs] == ["a", "b"]


def test_the_float_passes_leave_no_sequence():
    model = _yolo_split([2, 2, 5], [0, 1, 2])
    assert "SplitToSequence" not in op_types(optimize_for_quantization(model).model)

"""EliminateDeadCodePass: dead nodes, unused initializers, Identity and Dropout go; outputs unchanged."""

from __future__ import annotations

import numpy as np
from onnx import helper

from edgeopt.passes import eliminate_dead_code

from ._helpers import assert_same_outputs, explain, make_model, op_types, random_weight, snapshot, weight


def test_identity_dropout_dead_branch_and_unused_initializer_are_removed():
    nodes = [
        helper.make_node("Identity", ["x"], ["i"], name="identity"),
        helper.make_node("Dropout", ["i"], ["d"], name="dropout"),
        helper.make_node("Conv", ["d", "w"], ["c"], name="conv", kernel_shape=[1, 1]),
        helper.make_node("Sigmoid", ["c"], ["unused"], name="dead_sigmoid"),
        helper.make_node("Mul", ["unused", "s"], ["unused2"], name="dead_mul"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Identity", ["r"], ["y"], name="output_identity"),
    ]
    model = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 2, 4, 4])],
                       [random_weight("w", [2, 3, 1, 1]), weight("s", 2.0), weight("orphan", np.ones(5))])
    before = snapshot(model)
    result = eliminate_dead_code(model)
    assert snapshot(model) == before
    assert result.modified
    assert op_types(result.model) == ["Conv", "Relu"]
    assert sorted(result.model.graph.initializers) == ["w"]
    assert result.model.graph.outputs[0].name == "y"  # the Relu output took the graph output's name
    assert result.report.notes == ("removed 2 unused nodes and 2 unused initializers",)
    assert_same_outputs(model, result.model)


def test_identity_between_graph_input_and_output_stays():
    model = make_model([helper.make_node("Identity", ["x"], ["y"], name="passthrough")],
                       [("x", [2])], [("y", [2])])
    result = eliminate_dead_code(model)
    assert not result.modified
    assert explain(result) == ["passthrough: not removed: 'y' is a graph output and 'x' is a graph input, "
                               "initializer or output"]


def test_dropout_whose_mask_is_used_stays():
    nodes = [helper.make_node("Dropout", ["x"], ["d", "mask"], name="dropout"),
             helper.make_node("Cast", ["mask"], ["m"], name="cast", to=1),
             helper.make_node("Add", ["d", "m"], ["y"], name="add")]
    model = make_model(nodes, [("x", [2])], [("y", [2])])
    result = eliminate_dead_code(model)
    assert explain(result) == ["dropout: not removed: its mask output is used"]
    assert op_types(result.model) == ["Dropout", "Cast", "Add"]


def test_clean_model_is_not_modified():
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [("x", [2])], [("y", [2])])
    assert not eliminate_dead_code(model).modified


def test_a_cast_to_the_type_its_input_has_is_removed_and_a_real_cast_stays():
    # Hugging Face's RMSNorm: hidden_states.to(torch.float32) on a float32 model
    nodes = [helper.make_node("Cast", ["x"], ["same"], name="same_type", to=1),
             helper.make_node("Relu", ["same"], ["r"], name="relu"),
             helper.make_node("Cast", ["r"], ["half"], name="to_half", to=10),
             helper.make_node("Cast", ["half"], ["y"], name="to_float", to=1)]
    model = make_model(nodes, [("x", [2, 3])], [("y", [2, 3])])
    result = eliminate_dead_code(model)
    assert op_types(result.model) == ["Relu", "Cast", "Cast"]
    assert_same_outputs(model, result.model)

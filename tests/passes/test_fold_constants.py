"""FoldConstantsPass: constant-only nodes become initializers, outputs unchanged."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

from edgeopt import ir as eir
from edgeopt.io import load_model
from edgeopt.passes import fold_constants, optimize_for_quantization
from edgeopt.passes._constant_ops import CONSTANT_OPS

from ._helpers import assert_same_outputs, explain, make_model, op_types, random_weight


def _constant(name: str, array) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_const", value=numpy_helper.from_array(array))


def test_constant_nodes_and_shape_arithmetic_fold_to_initializers():
    # Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])) with a weight in a Constant node.
    nodes = [
        _constant("w", np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)),
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[3, 3]),
        helper.make_node("Shape", ["c"], ["shape"], name="shape"),
        _constant("zero", np.array(0, np.int64)),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], name="gather", axis=0),
        _constant("axes", np.array([0], np.int64)),
        helper.make_node("Unsqueeze", ["batch", "axes"], ["batch1"], name="unsqueeze"),
        _constant("minus_one", np.array([-1], np.int64)),
        helper.make_node("Concat", ["batch1", "minus_one"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["c", "target"], ["y"], name="reshape"),
    ]
    model = make_model(nodes, [("x", [2, 3, 5, 5])], [("y", [2, 36])])
    result = fold_constants(model)
    assert result.modified
    assert op_types(result.model) == ["Conv", "Reshape"]
    target = eir.constant_array(result.model.graph.node(1).inputs[1])
    np.testing.assert_array_equal(target, [2, -1])
    assert result.model.graph.node(0).inputs[1].name == "w"
    assert_same_outputs(model, result.model)


def test_torch_shape_arithmetic_with_a_fixed_batch(tmp_path):
    class Flatten(nn.Module):
        def forward(self, x):
            return torch.relu(x).view(x.size(0), -1) * 2.0

    path = tmp_path / "flatten.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Flatten().eval(), (torch.randn(2, 3, 4),), str(path), opset_version=17, dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "N"}}, do_constant_folding=False)
    model = load_model(path, input_shapes={"x": (2, 3, 4)})
    assert {"Shape", "Gather", "Unsqueeze", "Concat"} <= set(op_types(model))
    result = fold_constants(model)
    assert op_types(result.model) == ["Relu", "Reshape", "Mul"]
    assert_same_outputs(model, result.model)


def test_integer_division_truncates_toward_zero_as_onnx_does():
    nodes = [_constant("a", np.array([-7, 7], np.int64)), _constant("b", np.array([2, -2], np.int64)),
             helper.make_node("Div", ["a", "b"], ["q"], name="div"),
             helper.make_node("Cast", ["q"], ["qf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Add", ["x", "qf"], ["y"], name="add")]
    model = make_model(nodes, [("x", [2])], [("y", [2])])
    result = fold_constants(model)
    np.testing.assert_array_equal(eir.constant_array(result.model.graph.node(0).inputs[1]), [-3.0, -3.0])
    assert_same_outputs(model, result.model)


def test_castlike_of_a_constant_folds_and_the_conv_bias_it_builds_becomes_a_constant():
    """torch's dynamo exporter, unoptimized, writes a bias-free Conv's zero bias as
    ``Expand(CastLike(0, x), Expand(Shape(w, end=1), [1]))``: CastLike reads only x's type."""
    nodes = [helper.make_node("Shape", ["w"], ["channels"], name="shape", start=0, end=1),
             _constant("one", np.array([1], np.int64)),
             helper.make_node("Expand", ["channels", "one"], ["bias_shape"], name="expand_shape"),
             _constant("zero", np.array(0.0, np.float64)),
             helper.make_node("CastLike", ["zero", "x"], ["zero_like"], name="castlike"),
             helper.make_node("Expand", ["zero_like", "bias_shape"], ["bias"], name="expand_bias"),
             helper.make_node("Conv", ["x", "w", "bias"], ["y"], name="conv", kernel_shape=[3, 3])]
    model = make_model(nodes, [("x", [1, 3, 5, 5])], [("y", [1, 4, 3, 3])], [random_weight("w", [4, 3, 3, 3])],
                       opset=18)
    result = fold_constants(model)
    assert op_types(result.model) == ["Conv"]
    bias = eir.constant_array(result.model.graph.node(0).inputs[2])
    assert bias.dtype == np.float32 and bias.shape == (4,) and not bias.any()
    assert_same_outputs(model, result.model)


def test_shapes_the_folded_constants_make_inferable_are_inferred():
    """dynamo's unoptimized mean over H and W: ReduceMean's axes come out of a Reshape that shape
    inference does not see through; once folded, the mean and what reads it get their shapes, and the
    pipeline pools it as a GlobalAveragePool."""
    nodes = [_constant("axes_2d", np.array([-1, -2], np.int64)),
             _constant("flat", np.array([-1], np.int64)),
             helper.make_node("Reshape", ["axes_2d", "flat"], ["axes"], name="axes"),
             helper.make_node("ReduceMean", ["x", "axes"], ["mean"], name="mean", keepdims=1),
             helper.make_node("Conv", ["mean", "w"], ["y"], name="conv", kernel_shape=[1, 1])]
    model = make_model(nodes, [("x", [1, 8, 4, 4])], [("y", [1, 4, 1, 1])], [random_weight("w", [4, 8, 1, 1])],
                       opset=18)
    assert model.graph.node(3).outputs[0].shape is None  # inference alone cannot see the axes
    folded = fold_constants(model).model
    mean = next(node for node in folded.graph if node.op_type == "ReduceMean")
    assert mean.outputs[0].shape == ir.Shape([1, 8, 1, 1])
    optimized = optimize_for_quantization(model).model
    assert op_types(optimized) == ["GlobalAveragePool", "Conv"]
    assert_same_outputs(model, optimized)


def test_a_shape_of_a_value_shaped_after_folding_folds_in_turn():
    """dynamo's unoptimized GroupNorm reshapes back to ``Shape(x)`` of a value that has a shape only
    once an earlier fold lets inference through: folding and inference alternate to a fixed point."""
    nodes = [_constant("axes_2d", np.array([-1, -2], np.int64)),
             _constant("flat", np.array([-1], np.int64)),
             helper.make_node("Reshape", ["axes_2d", "flat"], ["axes"], name="axes"),
             helper.make_node("ReduceMean", ["x", "axes"], ["mean"], name="mean", keepdims=1),
             helper.make_node("Conv", ["mean", "w"], ["c"], name="conv", kernel_shape=[1, 1]),
             helper.make_node("Shape", ["c"], ["c_shape"], name="shape"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "c_shape"], ["y"], name="back")]
    model = make_model(nodes, [("x", [1, 8, 4, 4])], [("y", [1, 4, 1, 1])], [random_weight("w", [4, 8, 1, 1])],
                       opset=18)
    result = fold_constants(model)
    assert op_types(result.model) == ["ReduceMean", "Conv", "Relu", "Reshape"]
    assert [line for line in explain(result) if "not folded" in line] == []
    assert_same_outputs(model, result.model)


def test_large_expansions_and_unknown_ops_are_left_with_reasons():
    nodes = [_constant("shape", np.array([64, 64], np.int64)),
             helper.make_node("ConstantOfShape", ["shape"], ["big"], name="fill",
                              value=numpy_helper.from_array(np.ones(1, np.float32))),
             helper.make_node("Sin", ["w"], ["s"], name="sin"),
             helper.make_node("Add", ["x", "big"], ["y0"], name="add"),
             helper.make_node("Mul", ["y0", "s"], ["y"], name="mul")]
    model = make_model(nodes, [("x", [64, 64])], [("y", [64, 64])], [random_weight("w", [64])])
    result = fold_constants(model, max_elements=1000)
    assert sorted(explain(result)) == [
        "fill: not folded: result would have 4096 elements (limit 1000)",
        "sin: not folded: no constant evaluator for Sin",
    ]
    assert op_types(result.model) == ["ConstantOfShape", "Sin", "Add", "Mul"]
    assert_same_outputs(model, result.model)


def test_nothing_to_fold_is_not_modified():
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [("x", [2])], [("y", [2])])
    result = fold_constants(model)
    assert not result.modified and explain(result) == []


_arrays = hnp.arrays(np.int64, hnp.array_shapes(max_dims=3, max_side=4), elements=st.integers(-50, 50))


@settings(max_examples=40, deadline=None)
@given(a=_arrays, data=st.data(), op=st.sampled_from(["Add", "Sub", "Mul", "Div"]))
def test_integer_arithmetic_matches_the_onnx_reference(a, data, op):
    b = data.draw(hnp.arrays(np.int64, a.shape, elements=st.integers(-9, 9).filter(bool)))
    node = helper.make_node(op, ["a", "b"], ["c"])
    expected = ReferenceEvaluator(node).run(None, {"a": a, "b": b})[0]
    actual = CONSTANT_OPS[op](a, b)
    assert actual.dtype == expected.dtype
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("op, arrays, attributes", [
    ("Transpose", [np.arange(6.0, dtype=np.float32).reshape(2, 3)], {"perm": [1, 0]}),
    ("Slice", [np.arange(10, dtype=np.int64), np.array([-4]), np.array([100]), np.array([0]), np.array([2])], {}),
    ("Squeeze", [np.zeros((1, 3, 1), np.float32), np.array([0, 2])], {}),
    ("Expand", [np.array([[1.0], [2.0]], np.float32), np.array([2, 3])], {}),
    ("Range", [np.array(1, np.int64), np.array(9, np.int64), np.array(3, np.int64)], {}),
    ("Flatten", [np.zeros((2, 3, 4), np.float32)], {"axis": 2}),
    # a causal mask of static length: triu(full((S, S), finfo.min), 1), as Hugging Face builds it
    ("Trilu", [np.full((4, 4), np.finfo(np.float32).min, np.float32), np.array(1, np.int64)], {}),
    ("Trilu", [np.ones((2, 3, 5), np.float32), np.array(-1, np.int64)], {"upper": 0}),
    ("Trilu", [np.ones((3, 3), np.int64)], {}),
    # torch's nn.MultiheadAttention export: the Mod of a negative axis by the rank
    ("Mod", [np.array([-1, 7, -9], np.int64), np.array([3, -4, 4], np.int64)], {}),
    ("Mod", [np.array([-1.5, 7.25], np.float32), np.array([1.0, -2.0], np.float32)], {"fmod": 1}),
])
def test_shape_ops_match_the_onnx_reference(op, arrays, attributes):
    names = [f"i{k}" for k in range(len(arrays))]
    node = helper.make_node(op, names, ["out"], **attributes)
    expected = ReferenceEvaluator(node).run(None, dict(zip(names, arrays)))[0]
    np.testing.assert_array_equal(CONSTANT_OPS[op](*arrays, **attributes), expected)


def test_copy_shared_false_leaves_a_copy_of_a_weight_other_nodes_read():
    """A tied weight: one MatMul reads E, another Transpose(E); folding would store E twice."""
    nodes = [helper.make_node("Transpose", ["e"], ["e_t"], name="tie", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "e_t"], ["y"], name="head"),
             helper.make_node("MatMul", ["u", "e"], ["g"], name="embed"),
             helper.make_node("Transpose", ["s"], ["s_t"], name="small_tie", perm=[1, 0]),
             helper.make_node("MatMul", ["v", "s"], ["z0"], name="mm_s"),
             helper.make_node("MatMul", ["v", "s_t"], ["z"], name="mm_s_t")]
    weights = [random_weight("e", [64, 32]), random_weight("s", [8, 8])]
    model = make_model(nodes, [("x", [2, 32]), ("u", [2, 64]), ("v", [2, 8])],
                       [("y", [2, 64]), ("g", [2, 32]), ("z0", [2, 8]), ("z", [2, 8])], weights)
    kept = fold_constants(model, copy_shared=False)
    assert explain(kept) == ["tie: not folded: 'e' has other readers: folding would store a second copy of it"]
    assert op_types(kept.model).count("Transpose") == 1  # a small copy (64 elements) is folded all the same
    assert_same_outputs(model, kept.model)
    assert op_types(fold_constants(model).model).count("Transpose") == 0  # the default folds both

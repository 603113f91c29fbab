"""CanonicalizePass: Div by a constant, a one-slope PRelu, a scaled Gemm and a tanh-GELU's Pow cube in the forms
integer kernels take."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from edgeopt.passes import canonicalize
from edgeopt.passes._rules import run_on_copy
from edgeopt.passes.canonicalize import CanonicalizePass

from ._helpers import assert_same_outputs, explain, make_model, op_types, random_weight, weight


def _unary(op_type: str, constant, *, shape=(1, 4, 3, 3), opset: int = 17):
    """x -> Relu -> op(., constant) -> y (computed by a node, as inside a network)."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node(op_type, ["r", "c"], ["y"], name="op")]
    return make_model(nodes, [("x", list(shape))], [("y", list(shape))], [weight("c", constant)], opset=opset)


@pytest.mark.parametrize("divisor", [8.0, np.sqrt(32.0), [[[0.229]], [[0.224]], [[0.225]], [[0.5]]]],
                         ids=["bert-scores", "sqrt-d", "per-channel-std"])
def test_a_division_by_a_constant_becomes_a_multiplication(divisor):
    model = _unary("Div", divisor)
    result = canonicalize(model)
    assert op_types(result.model) == ["Relu", "Mul"] and result.model.graph.outputs[0].name == "y"
    assert_same_outputs(model, result.model)


def test_a_division_normalizing_the_input_stays_float():
    # (x - mean) / std before the first layer: float there costs no conversion, a quantized Mul rounded
    # the input once more (-0.35 dB on an ImageNet-style normalization)
    nodes = [helper.make_node("Sub", ["x", "mean"], ["centered"], name="sub"),
             helper.make_node("Div", ["centered", "std"], ["y"], name="div")]
    model = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 3, 4, 4])],
                       [weight("mean", np.full((3, 1, 1), 0.45)), weight("std", np.full((3, 1, 1), 0.225))])
    result = canonicalize(model)
    assert not result.modified
    assert explain(result) == ["div: not rewritten: it normalizes a graph input: in float it costs no conversion, "
                               "as a quantized Mul it would round the input once more"]


def test_for_the_microcontroller_the_input_normalization_becomes_integer_ops_too():
    # its C runs no float node: a Div or a BatchNorm on the input was the one float node that kept a model
    # normalizing raw pixels in the graph ((x / 255 - mean) / std) from compiling
    nodes = [helper.make_node("Div", ["x", "full"], ["unit"], name="to_unit"),
             helper.make_node("Sub", ["unit", "mean"], ["centered"], name="sub"),
             helper.make_node("Div", ["centered", "std"], ["scaled"], name="div"),
             helper.make_node("BatchNormalization", ["scaled", "gamma", "beta", "bn_mean", "var"], ["y"], name="bn")]
    model = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 3, 4, 4])],
                       [weight("full", 255.0), weight("mean", np.full((3, 1, 1), 0.45)),
                        weight("std", np.full((3, 1, 1), 0.225)), random_weight("gamma", [3], low=0.5, high=1.5),
                        random_weight("beta", [3]), random_weight("bn_mean", [3]),
                        random_weight("var", [3], low=0.5, high=1.5)])
    assert op_types(canonicalize(model).model) == ["Div", "Sub", "Div", "BatchNormalization"]
    result = run_on_copy(CanonicalizePass(integer_only=True), model)
    assert op_types(result.model) == ["Mul", "Sub", "Mul", "Conv"]
    assert_same_outputs(model, result.model)


@pytest.mark.parametrize("divisor, reason", [
    (0.0, "the divisor is zero, not finite or outside [6.10352e-05, 16384] somewhere"),
    (1e9, "the divisor is zero, not finite or outside [6.10352e-05, 16384] somewhere"),
])
def test_a_divisor_whose_reciprocal_float16_cannot_hold_stays(divisor, reason):
    result = canonicalize(_unary("Div", divisor))
    assert op_types(result.model) == ["Relu", "Div"] and explain(result) == [f"op: not rewritten: {reason}"]


def test_a_division_by_a_computed_tensor_is_not_a_candidate():
    nodes = [helper.make_node("Div", ["x", "x"], ["y"], name="op")]
    model = make_model(nodes, [("x", [1, 4])], [("y", [1, 4])])
    assert not canonicalize(model).modified and explain(canonicalize(model)) == []


@pytest.mark.parametrize("slope", [[0.25], 0.25, [[[0.25]]]], ids=["torch-default", "scalar", "rank-3"])
def test_a_prelu_with_one_slope_becomes_leakyrelu(slope):
    model = _unary("PRelu", slope)
    result = canonicalize(model)
    [_, node] = result.model.graph
    assert node.op_type == "LeakyRelu" and node.attributes.get_float("alpha") == pytest.approx(0.25)
    assert_same_outputs(model, result.model)


def test_a_per_channel_prelu_stays():
    model = _unary("PRelu", np.full((4, 1, 1), 0.1))
    assert not canonicalize(model).modified


@pytest.mark.parametrize("alpha, beta, bias_shape", [
    (0.5, 2.0, [6]), (1.0, 1.0, [1, 6]), (1.0, 3.0, [1]), (2.0, 1.0, None)])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_alpha_beta_and_a_row_bias_fold_into_b_and_a_vector_c(alpha, beta, bias_shape, trans_b):
    inputs, initializers = ["x", "w"], [random_weight("w", [6, 5] if trans_b else [5, 6])]
    if bias_shape is not None:
        inputs.append("c")
        initializers.append(random_weight("c", bias_shape))
    nodes = [helper.make_node("Gemm", inputs, ["y"], name="fc", alpha=alpha, beta=beta, transB=trans_b)]
    model = make_model(nodes, [("x", [3, 5])], [("y", [3, 6])], initializers)
    result = canonicalize(model)
    [gemm] = result.model.graph
    assert gemm.attributes.get_float("alpha") == 1.0 and gemm.attributes.get_float("beta") == 1.0
    if bias_shape is not None:
        assert gemm.inputs[2].const_value.numpy().shape == (6,)
    assert_same_outputs(model, result.model)
    assert not canonicalize(result.model).modified


def test_a_gemm_whose_c_is_a_matrix_stays_with_the_reason():
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", beta=0.5)]
    model = make_model(nodes, [("x", [3, 5])], [("y", [3, 6])],
                       [random_weight("w", [5, 6]), random_weight("c", [3, 6])])
    result = canonicalize(model)
    assert not result.modified
    assert explain(result) == ["fc: not rewritten: fc bias has shape [3,6], not per output channel"]


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("keepdims, axes", [(1, [2, 3]), (0, [-1, -2])])
def test_a_spatial_mean_becomes_global_average_pool(opset, keepdims, axes):
    # torch's x.mean((2, 3)) pooling head: ONNX Runtime has QLinearGlobalAveragePool, no integer ReduceMean
    inputs, initializers, attributes = ["x"], [], {"keepdims": keepdims}
    if opset >= 18:
        inputs.append("axes")
        initializers.append(numpy_helper.from_array(np.array(axes, np.int64), "axes"))
    else:
        attributes["axes"] = axes
    nodes = [helper.make_node("ReduceMean", inputs, ["y"], name="mean", **attributes)]
    shape = [1, 4, 1, 1] if keepdims else [1, 4]
    model = make_model(nodes, [("x", [1, 4, 5, 6])], [("y", shape)], initializers, opset=opset)
    result = canonicalize(model)
    assert op_types(result.model) == ["GlobalAveragePool"] + ([] if keepdims else ["Flatten"])
    assert result.model.graph.outputs[0].name == "y"
    assert_same_outputs(model, result.model)


@pytest.mark.parametrize("shape, axes", [([1, 4, 5, 6], [1, 2]), ([1, 4, 5], [2]), ([1, 4, 5, 6], [2])],
                         ids=["not-spatial", "rank-3", "one-axis"])
def test_other_means_stay(shape, axes):
    nodes = [helper.make_node("ReduceMean", ["x"], ["y"], name="mean", axes=axes)]
    out = [1 if index in axes else dim for index, dim in enumerate(shape)]
    model = make_model(nodes, [("x", shape)], [("y", out)], opset=13)
    assert not canonicalize(model).modified


def test_the_pow_cube_of_a_spelled_out_tanh_gelu_becomes_two_multiplications(tmp_path):
    """Hugging Face's gelu_new below opset 20: fuse-activations annotates the group (no Gelu op before 20), and
    the cube, Pow(x, 3), which has no integer kernel, becomes (x * x) * x, annotated like the rest."""
    import torch

    from edgeopt.io import load_model
    from edgeopt.passes import optimize_for_quantization
    from edgeopt.passes.rules import PATTERN_KEY
    from tests.models import export_onnx, gelu_new_mlp

    model = load_model(export_onnx(gelu_new_mlp(), (torch.zeros(2, 16),), tmp_path / "mlp.onnx", opset=17))
    result = optimize_for_quantization(model)
    nodes = list(result.model.graph)
    assert "Pow" in op_types(model) and "Pow" not in op_types(result.model)
    muls = [node for node in nodes if node.op_type == "Mul" and node.inputs[0] is node.inputs[1]]
    assert len(muls) == 1 and muls[0].metadata_props[PATTERN_KEY] == "gelu_tanh"
    cube = next(use.node for use in muls[0].outputs[0].uses())
    assert cube.op_type == "Mul" and cube.metadata_props[PATTERN_KEY] == "gelu_tanh"
    assert "canonicalize: /1/Pow: rewritten as (x * x) * x" in result.explain(include_applied=True)
    assert_same_outputs(model, result.model)


def test_a_pow_cube_elsewhere_stays():
    """Not a tanh-GELU's: quantizing x * x would round it to 8 bits where the float Pow did not (a spelled-out
    RMSNorm's square, say)."""
    model = _unary("Pow", 3.0)
    assert op_types(canonicalize(model).model) == ["Relu", "Pow"]


def _einsum(equation: str, weight_shape, output_shape):
    """x [2, 8, 32] -> Relu -> Einsum(equation, ., W) -> y: a dense layer as tf2onnx writes Keras' EinsumDense."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Einsum", ["r", "w"], ["y"], name="dense", equation=equation)]
    return make_model(nodes, [("x", [2, 8, 32])], [("y", list(output_shape))],
                      [random_weight("w", weight_shape)], opset=17)


@pytest.mark.parametrize("equation, weight_shape", [
    ("bij,jk->bik", (32, 16)), ("...j,jk->...k", (32, 16)), ("bij, kj -> bik", (16, 32))])
def test_an_einsum_dense_layer_becomes_a_matmul(equation, weight_shape):
    # Einsum has no integer kernel: a model of EinsumDense layers came back from int8 as the float model
    model = _einsum(equation, weight_shape, (2, 8, 16))
    result = canonicalize(model)
    assert op_types(result.model) == ["Relu", "MatMul"] and result.model.graph.outputs[0].name == "y"
    assert_same_outputs(model, result.model)


@pytest.mark.parametrize("equation, output_shape, reason", [
    ("bij,jk->bki", (2, 16, 8), "is not x @ W with the other axes kept in order"),
    ("bij,ik->bjk", (2, 32, 16), "not a weight read along the first's last axis")])
def test_an_einsum_that_is_no_dense_layer_is_left_with_the_reason(equation, output_shape, reason):
    weight_shape = (32, 16) if equation.startswith("bij,jk") else (8, 16)
    result = canonicalize(_einsum(equation, weight_shape, output_shape))
    assert op_types(result.model) == ["Relu", "Einsum"]
    assert any(reason in line for line in explain(result)), explain(result)


@pytest.mark.parametrize("shape, ops", [((1, 4, 5, 5), ["Relu", "Conv"]), ((2, 4, 6), ["Relu", "Mul", "Add"])])
def test_a_batchnorm_with_nothing_to_fold_into_becomes_a_depthwise_conv_for_the_microcontroller(shape, ops):
    # DenseNet's BN-ReLU-Conv after each Concat: as Mul and Add it rounded twice in int8; a 1x1 depthwise Conv
    # rounds once, its one weight per channel exact (a small trained DenseNet: 22.7 -> 26.7 dB on the MCU).
    # Without spatial dims (a BatchNorm1d) it stays Mul and Add
    channels = shape[1]
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("BatchNormalization", ["r", "gamma", "beta", "mean", "var"], ["y"], name="bn")]
    model = make_model(nodes, [("x", list(shape))], [("y", list(shape))],
                       [random_weight("gamma", [channels], low=0.5, high=1.5), random_weight("beta", [channels]),
                        random_weight("mean", [channels]), random_weight("var", [channels], low=0.5, high=1.5)])
    result = run_on_copy(CanonicalizePass(integer_only=True), model)
    assert op_types(result.model) == ops
    conv = next(node for node in result.model.graph if node.op_type in ("Conv", "Add"))
    assert conv.name == "bn" and result.model.graph.outputs[0].name == "y"
    if conv.op_type == "Conv":
        assert conv.attributes.get_int("group") == channels and conv.inputs[1].shape == ir.Shape([channels, 1, 1, 1])
    assert_same_outputs(model, result.model)

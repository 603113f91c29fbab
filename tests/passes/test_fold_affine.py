"""FoldAffinePass: per-channel or scalar Mul/Div/Add/Sub after a layer folds into its weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from edgeopt.passes import activation_clamp, fold_affine

from ._helpers import assert_same_outputs, explain, export_torch, make_model, op_types, random_weight, weight


def conv_then(ops, constants, *, bias: bool = True):
    """x[1,4,5,5] -> Conv(8 channels) -> ops...; ``ops`` are (op_type, constant name, constant first)."""
    conv_inputs = ["x", "w", "b"] if bias else ["x", "w"]
    nodes = [helper.make_node("Conv", conv_inputs, ["t0"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    for index, (op_type, constant, constant_first) in enumerate(ops):
        operands = [constant, f"t{index}"] if constant_first else [f"t{index}", constant]
        output = "y" if index == len(ops) - 1 else f"t{index + 1}"
        nodes.append(helper.make_node(op_type, operands, [output], name=f"{op_type}_{index + 7}"))
    initializers = [random_weight("w", [8, 4, 3, 3]), *([random_weight("b", [8])] if bias else []),
                    *(weight(name, array) for name, array in constants.items())]
    return make_model(nodes, [("x", [1, 4, 5, 5])], [("y", [1, 8, 5, 5])], initializers)


RNG = np.random.default_rng(0)
PER_CHANNEL = RNG.uniform(0.5, 2.0, (1, 8, 1, 1))


@pytest.mark.parametrize("ops, constants", [
    ([("Mul", "s", False), ("Add", "t", False)], {"s": PER_CHANNEL, "t": PER_CHANNEL.reshape(8, 1, 1)}),
    ([("Mul", "s", True), ("Add", "t", True)], {"s": PER_CHANNEL.reshape(8, 1, 1), "t": 0.25}),
    ([("Div", "s", False), ("Sub", "t", False)], {"s": PER_CHANNEL, "t": PER_CHANNEL}),
    ([("Mul", "s", False)], {"s": 1.5}),
], ids=["mul-add", "mul-add-constant-first", "div-sub", "scalar"])
@pytest.mark.parametrize("bias", [True, False])
def test_affine_chain_after_conv_folds_into_weights(ops, constants, bias):
    model = conv_then(ops, constants, bias=bias)
    result = fold_affine(model)
    assert result.modified
    assert op_types(result.model) == ["Conv"]
    assert result.model.graph.outputs[0].name == "y"
    assert_same_outputs(model, result.model)


def test_gemm_then_per_column_mul_and_add():
    nodes = [helper.make_node("Gemm", ["x", "w"], ["g"], name="fc", transB=1),
             helper.make_node("Mul", ["g", "s"], ["m"], name="mul"),
             helper.make_node("Add", ["m", "t"], ["y"], name="add")]
    model = make_model(nodes, [("x", [3, 5])], [("y", [3, 6])],
                       [random_weight("w", [6, 5]), weight("s", RNG.uniform(0.5, 2, (1, 6))),
                        weight("t", RNG.normal(0, 1, 6))])
    result = fold_affine(model)
    assert op_types(result.model) == ["Gemm"]
    assert_same_outputs(model, result.model)


def test_prefolded_batchnorm_from_torch(tmp_path):
    class PrefoldedBN(nn.Module):
        """What exporters that fold BatchNorm themselves leave: conv * scale + shift."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.register_buffer("scale", torch.rand(1, 8, 1, 1) + 0.5)
            self.register_buffer("shift", torch.randn(8, 1, 1))

        def forward(self, x):
            return torch.relu(self.conv(x) * self.scale + self.shift)

    model = export_torch(PrefoldedBN(), (1, 3, 6, 6), tmp_path)
    assert op_types(model) == ["Conv", "Mul", "Add", "Relu"]
    result = fold_affine(model)
    assert op_types(result.model) == ["Conv", "Relu"]
    assert_same_outputs(model, result.model)


def test_refuses_a_constant_that_is_not_per_channel():
    model = conv_then([("Mul", "s", False)], {"s": RNG.uniform(0.5, 2, (1, 1, 5, 5))})
    result = fold_affine(model)
    assert not result.modified
    assert explain(result) == ["conv + Mul_7: not folded: constant has shape [1,1,5,5], "
                               "not per-channel (expected [1,8,1,1] or a scalar)"]


def test_refuses_a_vector_along_the_last_axis():
    # [8] broadcasts over W, not over channels, even though its length equals C.
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[1, 1]),
             helper.make_node("Add", ["c", "t"], ["y"], name="Add_7")]
    model = make_model(nodes, [("x", [1, 4, 8, 8])], [("y", [1, 8, 8, 8])],
                       [random_weight("w", [8, 4, 1, 1]), weight("t", RNG.normal(0, 1, 8))])
    [line] = explain(fold_affine(model))
    assert line.startswith("conv + Add_7: not folded: constant has shape [8], not per-channel")


def test_refuses_when_the_conv_output_has_two_consumers():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[1, 1]),
             helper.make_node("Mul", ["c", "s"], ["y"], name="mul"),
             helper.make_node("Relu", ["c"], ["z"], name="relu")]
    model = make_model(nodes, [("x", [1, 4, 3, 3])], [("y", [1, 8, 3, 3]), ("z", [1, 8, 3, 3])],
                       [random_weight("w", [8, 4, 1, 1]), weight("s", PER_CHANNEL)])
    assert explain(fold_affine(model)) == ["conv + mul: not folded: Conv output has 2 consumers"]


def test_mul_of_two_activations_is_not_a_candidate():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[1, 1]),
             helper.make_node("Sigmoid", ["c"], ["g"], name="gate"),
             helper.make_node("Mul", ["c", "g"], ["y"], name="mul")]
    model = make_model(nodes, [("x", [1, 4, 3, 3])], [("y", [1, 8, 3, 3])], [random_weight("w", [8, 4, 1, 1])])
    result = fold_affine(model)
    assert not result.modified and explain(result) == []


def _clip(name: str, source: str, output: str, low: float, high: float, opset: int) -> tuple[list, list]:
    """A Clip node and its bound initializers (attributes before opset 11)."""
    if opset < 11:
        return [helper.make_node("Clip", [source], [output], name=name, min=low, max=high)], []
    return ([helper.make_node("Clip", [source, f"{name}.low", f"{name}.high"], [output], name=name)],
            [weight(f"{name}.low", low), weight(f"{name}.high", high)])


@pytest.mark.parametrize("opset", [10, 13])
@pytest.mark.parametrize("divide", [True, False], ids=["div-6", "mul-sixth"])
def test_a_hard_sigmoid_spelled_after_a_conv_folds_into_a_clamped_conv(opset, divide):
    # clip(conv + 3, 0, 6) / 6 (an SE gate): the + 3 folds into the bias, then the / 6 through the
    # Clip into the weights; left as a Div it ran in float between int8 layers (and the C refused it)
    clip, bounds = _clip("relu6", "t1", "t2", 0.0, 6.0, opset)
    scale = helper.make_node("Div", ["t2", "six"], ["y"], name="div") if divide else \
        helper.make_node("Mul", ["sixth", "t2"], ["y"], name="mul")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["t0"], name="conv", kernel_shape=[1, 1]),
             helper.make_node("Add", ["t0", "three"], ["t1"], name="add3"), *clip, scale]
    model = make_model(nodes, [("x", [1, 4, 5, 5])], [("y", [1, 8, 5, 5])],
                       [random_weight("w", [8, 4, 1, 1]), random_weight("b", [8]), weight("three", 3.0),
                        weight("six", 6.0), weight("sixth", 1 / 6), *bounds], opset=opset)
    result = fold_affine(model)
    assert op_types(result.model) == ["Conv", "Clip"]
    assert activation_clamp(list(result.model.graph)[1]) == pytest.approx((0.0, 1.0))
    assert result.model.graph.outputs[0].name == "y"
    assert_same_outputs(model, result.model)


def test_a_positive_per_channel_scale_folds_through_a_relu():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "s"], ["y"], name="mul")]
    model = make_model(nodes, [("x", [1, 4, 3, 3])], [("y", [1, 8, 3, 3])],
                       [random_weight("w", [8, 4, 1, 1]), weight("s", PER_CHANNEL)])
    result = fold_affine(model)
    assert op_types(result.model) == ["Conv", "Relu"]
    assert_same_outputs(model, result.model)


@pytest.mark.parametrize("clamp, scale, reason", [
    ("relu", -2.0, "the scale is not positive everywhere (it would turn the clamp over)"),
    ("clip", PER_CHANNEL, "a per-channel scale cannot scale a Clip's scalar bounds"),
])
def test_a_scale_that_does_not_commute_with_the_clamp_stays(clamp, scale, reason):
    clip, bounds = _clip("clamp", "c", "r", 0.0, 6.0, 13)
    relu = [helper.make_node("Relu", ["c"], ["r"], name="clamp")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[1, 1]),
             *(relu if clamp == "relu" else clip), helper.make_node("Mul", ["r", "s"], ["y"], name="mul")]
    model = make_model(nodes, [("x", [1, 4, 3, 3])], [("y", [1, 8, 3, 3])],
                       [random_weight("w", [8, 4, 1, 1]), weight("s", scale), *bounds])
    result = fold_affine(model)
    assert not result.modified
    assert explain(result) == [f"conv + clamp + mul: not folded: {reason}"]


@pytest.mark.parametrize("opset", [10, 13])
@pytest.mark.parametrize("alpha, beta", [(1 / 6, 0.5), (0.2, 0.5), (0.3, -0.1)])
def test_a_hard_sigmoid_after_a_conv_folds_into_a_clamped_conv(opset, alpha, beta):
    # torch's nn.Hardsigmoid SE gate: HardSigmoid(y) = clip(alpha * y + beta, 0, 1) ran in float on ONNX Runtime
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", kernel_shape=[1, 1]),
             helper.make_node("HardSigmoid", ["c"], ["y"], name="gate", alpha=alpha, beta=beta)]
    model = make_model(nodes, [("x", [1, 4, 5, 5])], [("y", [1, 8, 5, 5])],
                       [random_weight("w", [8, 4, 1, 1], low=-3, high=3), random_weight("b", [8])], opset=opset)
    result = fold_affine(model)
    assert op_types(result.model) == ["Conv", "Clip"]
    assert activation_clamp(list(result.model.graph)[1]) == (0.0, 1.0)
    assert result.model.graph.outputs[0].name == "y"
    assert_same_outputs(model, result.model)


def test_a_hard_sigmoid_after_a_gemm_without_bias_folds():
    nodes = [helper.make_node("Gemm", ["x", "w"], ["g"], name="fc", transB=1),
             helper.make_node("HardSigmoid", ["g"], ["y"], name="gate")]
    model = make_model(nodes, [("x", [2, 4])], [("y", [2, 6])], [random_weight("w", [6, 4], low=-4, high=4)])
    result = fold_affine(model)
    assert op_types(result.model) == ["Gemm", "Clip"]
    assert_same_outputs(model, result.model)


def test_a_hard_sigmoid_of_a_conv_read_elsewhere_is_left():
    # x * HardSigmoid(x) (a hardswish below opset 14) is no gate: the conv output must stay as it is
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[1, 1]),
             helper.make_node("HardSigmoid", ["c"], ["h"], name="gate", alpha=1 / 6, beta=0.5),
             helper.make_node("Mul", ["c", "h"], ["y"], name="mul")]
    model = make_model(nodes, [("x", [1, 4, 3, 3])], [("y", [1, 8, 3, 3])], [random_weight("w", [8, 4, 1, 1])],
                       opset=13)
    result = fold_affine(model)
    assert not result.modified and explain(result) == []


def _tf2onnx_conv1d(opset: int, reshape: str = "Squeeze"):
    """tf2onnx's Keras Conv1D: x[1, 4, 1, 9] -> Conv 1 x 3 (no bias) -> Squeeze(axis 2) -> Add(bias [8, 1]) ->
    Relu -> y[1, 8, 9]; with ``reshape="Reshape"`` the Squeeze is a Reshape to [1, 8, 9]."""
    axes = [helper.make_node("Squeeze", ["c", "axes"], ["s"], name="squeeze")] if opset >= 13 else [
        helper.make_node("Squeeze", ["c"], ["s"], name="squeeze", axes=[2])]
    drop = axes if reshape == "Squeeze" else [helper.make_node("Reshape", ["c", "shape"], ["s"], name="reshape")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[1, 3], pads=[0, 1, 0, 1]),
             *drop,
             helper.make_node("Add", ["s", "bias"], ["a"], name="bias_add"),
             helper.make_node("Relu", ["a"], ["y"], name="relu")]
    constants = [random_weight("w", [8, 4, 1, 3]), weight("bias", RNG.normal(0, 1, (8, 1))),
                 numpy_helper.from_array(np.array([2], np.int64), "axes"),
                 numpy_helper.from_array(np.array([1, 8, 9], np.int64), "shape")]
    return make_model(nodes, [("x", [1, 4, 1, 9])], [("y", [1, 8, 9])], constants, opset=opset)


@pytest.mark.parametrize("opset, reshape", [(11, "Squeeze"), (13, "Squeeze"), (17, "Reshape")])
def test_a_bias_and_a_clamp_after_a_squeezed_conv_fold_into_it(opset, reshape):
    """The bias Add moves above the Squeeze (its [8, 1] constant as [8, 1, 1]) and folds into the conv; the Relu
    moves above it too, where the quantizer folds it into the conv's range: Conv -> Relu -> Squeeze."""
    model = _tf2onnx_conv1d(opset, reshape)
    result = fold_affine(model)
    assert op_types(result.model) == ["Conv", "Relu", reshape]
    assert len(result.model.graph.node("conv").inputs) == 3  # the bias, created
    assert_same_outputs(model, result.model)


def test_an_add_after_a_reshape_that_merges_axes_stays():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "shape"], ["s"], name="flatten"),
             helper.make_node("Add", ["s", "bias"], ["y"], name="add")]
    model = make_model(nodes, [("x", [1, 4, 5, 5])], [("y", [1, 200])],
                       [random_weight("w", [8, 4, 3, 3]), weight("bias", RNG.normal(0, 1, 200)),
                        numpy_helper.from_array(np.array([1, 200], np.int64), "shape")])
    result = fold_affine(model)
    assert op_types(result.model) == ["Conv", "Reshape", "Add"]
    assert any("more than add or drop axes of size 1" in line for line in explain(result))

"""FoldAffinePass: per-channel or scalar Mul/Div/Add/Sub after a layer folds into its weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper
from torch import nn

from edgeopt.passes import fold_affine

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

"""FoldBatchNormPass: BatchNormalization disappears into the layer before it, outputs unchanged."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnx import helper
from torch import nn
from torch.nn import functional as F

from edgeopt.passes import FoldBatchNormPass, fold_batchnorm
from edgeopt.passes._conv import LinearParts

from ._helpers import (
    assert_same_outputs,
    batchnorm_params,
    explain,
    export_torch,
    make_model,
    op_types,
    random_weight,
    snapshot,
)

BN_INPUTS = ["bn.scale", "bn.bias", "bn.mean", "bn.var"]


def _bn(source: str, output: str = "y") -> object:
    return helper.make_node("BatchNormalization", [source, *BN_INPUTS], [output], name="bn", epsilon=1e-3)


def conv_bn_model(*, bias: bool = True, group: int = 1):
    inputs = ["x", "w", "b"] if bias else ["x", "w"]
    conv = helper.make_node("Conv", inputs, ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                            group=group)
    weights = [random_weight("w", [8, 4 // group, 3, 3]), *([random_weight("b", [8])] if bias else [])]
    return make_model([conv, _bn("c")], [("x", [1, 4, 6, 6])], [("y", [1, 8, 6, 6])],
                      weights + batchnorm_params("bn", 8))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_conv_batchnorm_folds_into_conv(bias, group):
    model = conv_bn_model(bias=bias, group=group)
    result = fold_batchnorm(model)
    assert result.modified
    assert op_types(result.model) == ["Conv"]
    assert_same_outputs(model, result.model)
    assert result.model.graph.outputs[0].name == "y"


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_batchnorm_scales_the_output_channel_axis(group):
    conv = helper.make_node("ConvTranspose", ["x", "w"], ["c"], name="deconv", kernel_shape=[2, 2],
                            strides=[2, 2], group=group)
    # ConvTranspose weight is [C_in, C_out / group, k, k]: 4 in, 6 out.
    model = make_model([conv, _bn("c")], [("x", [1, 4, 3, 3])], [("y", [1, 6, 6, 6])],
                       [random_weight("w", [4, 6 // group, 2, 2]), *batchnorm_params("bn", 6)])
    result = fold_batchnorm(model)
    assert op_types(result.model) == ["ConvTranspose"]
    assert_same_outputs(model, result.model)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_batchnorm_folds_beta_and_bias(trans_b):
    shape = [6, 5] if trans_b else [5, 6]
    gemm = helper.make_node("Gemm", ["x", "w", "b"], ["g"], name="fc", transB=trans_b, alpha=0.7, beta=0.5)
    model = make_model([gemm, _bn("g")], [("x", [3, 5])], [("y", [3, 6])],
                       [random_weight("w", shape), random_weight("b", [6]), *batchnorm_params("bn", 6)])
    result = fold_batchnorm(model)
    assert op_types(result.model) == ["Gemm"]
    assert_same_outputs(model, result.model)


def test_matmul_batchnorm_becomes_scaled_matmul_plus_shift():
    matmul = helper.make_node("MatMul", ["x", "w"], ["m"], name="matmul")
    model = make_model([matmul, _bn("m")], [("x", [3, 5])], [("y", [3, 6])],
                       [random_weight("w", [5, 6]), *batchnorm_params("bn", 6)])
    result = fold_batchnorm(model)
    assert op_types(result.model) == ["MatMul", "Add"]
    assert_same_outputs(model, result.model)


def test_conv_bn_relu_exported_from_torch(tmp_path):
    class ConvBNReLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            with torch.no_grad():
                self.bn.running_mean.normal_(0, 0.2)
                self.bn.running_var.uniform_(0.5, 1.5)
                self.bn.weight.uniform_(0.5, 1.5)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    model = export_torch(ConvBNReLU(), (1, 3, 8, 8), tmp_path)
    assert "BatchNormalization" in op_types(model)
    result = fold_batchnorm(model)
    assert op_types(result.model) == ["Conv", "Relu"]
    assert_same_outputs(model, result.model)


def test_conv_transpose_bn_exported_from_torch(tmp_path):
    module = nn.Sequential(nn.ConvTranspose2d(4, 6, 2, stride=2), nn.BatchNorm2d(6))
    with torch.no_grad():
        module[1].running_var.uniform_(0.5, 1.5)
        module[1].bias.normal_(0, 0.3)
    model = export_torch(module, (1, 4, 4, 4), tmp_path)
    result = fold_batchnorm(model)
    assert op_types(result.model) == ["ConvTranspose"]
    assert_same_outputs(model, result.model)


def test_refuses_when_the_conv_output_has_two_consumers():
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="Conv_12", kernel_shape=[1, 1])
    bn = helper.make_node("BatchNormalization", ["c", *BN_INPUTS], ["y"], name="BatchNormalization_13")
    relu = helper.make_node("Relu", ["c"], ["z"], name="relu")
    model = make_model([conv, bn, relu], [("x", [1, 4, 3, 3])], [("y", [1, 8, 3, 3]), ("z", [1, 8, 3, 3])],
                       [random_weight("w", [8, 4, 1, 1]), *batchnorm_params("bn", 8)])
    result = fold_batchnorm(model)
    assert not result.modified
    assert explain(result) == ["Conv_12 + BatchNormalization_13: not folded: Conv output has 2 consumers"]


def test_standalone_batchnorm_is_left_with_a_reason():
    relu = helper.make_node("Relu", ["x"], ["r"], name="Relu_3")
    model = make_model([relu, _bn("r")], [("x", [1, 8, 3, 3])], [("y", [1, 8, 3, 3])],
                       batchnorm_params("bn", 8))
    result = fold_batchnorm(model)
    assert not result.modified
    assert op_types(result.model) == ["Relu", "BatchNormalization"]
    assert explain(result) == ["bn: not folded: its input comes from Relu 'Relu_3', "
                               "not a Conv/ConvTranspose/Gemm/MatMul"]


def test_refuses_non_constant_weight_and_rank3_matmul():
    conv = helper.make_node("Conv", ["x", "w_in"], ["c"], name="conv", kernel_shape=[1, 1])
    model = make_model([conv, _bn("c")], [("x", [1, 4, 3, 3]), ("w_in", [8, 4, 1, 1])], [("y", [1, 8, 3, 3])],
                       batchnorm_params("bn", 8))
    assert explain(fold_batchnorm(model)) == ["conv + bn: not folded: conv weight is not a constant"]

    matmul = helper.make_node("MatMul", ["x", "w"], ["m"], name="matmul")
    model = make_model([matmul, _bn("m")], [("x", [2, 6, 5])], [("y", [2, 6, 6])],
                       [random_weight("w", [5, 6]), *batchnorm_params("bn", 6)])
    [line] = explain(fold_batchnorm(model))
    assert "normalizes axis 1 of the rank-3 MatMul output" in line


def test_training_mode_batchnorm_is_left():
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[1, 1])
    bn = helper.make_node("BatchNormalization", ["c", *BN_INPUTS], ["y"], name="bn", training_mode=1)
    model = make_model([conv, bn], [("x", [2, 4, 3, 3])], [("y", [2, 8, 3, 3])],
                       [random_weight("w", [8, 4, 1, 1]), *batchnorm_params("bn", 8)])
    assert "training_mode=1" in explain(fold_batchnorm(model))[0]


def test_batchnorm_exported_in_training_mode_before_opset_14_is_left():
    """torch.onnx.export of a module in train mode (training=PRESERVE) writes BatchNormalization-9 with its
    four statistics outputs, none read: ONNX Runtime normalizes such a node with the batch's statistics.
    Folding its running ones changed the model's outputs, and the fidelity report measured against that."""
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[1, 1])
    statistics = ["mean_out", "var_out", "saved_mean", "saved_var"]
    bn = helper.make_node("BatchNormalization", ["c", *BN_INPUTS], ["y", *statistics], name="bn", momentum=0.9)
    model = make_model([conv, bn], [("x", [1, 4, 3, 3])], [("y", [1, 8, 3, 3])],
                       [random_weight("w", [8, 4, 1, 1]), *batchnorm_params("bn", 8)], opset=13)
    result = fold_batchnorm(model)
    assert op_types(result.model) == ["Conv", "BatchNormalization"]
    assert_same_outputs(model, result.model)
    [line] = explain(result)
    assert "exported in training mode (5 outputs" in line and "eval mode" in line


def test_facade_copies_and_pass_rewrites_in_place():
    model = conv_bn_model()
    before = snapshot(model)
    result = fold_batchnorm(model)
    assert result.model is not model
    assert snapshot(model) == before
    in_place = FoldBatchNormPass()(model)
    assert in_place.model is model and op_types(model) == ["Conv"]


@pytest.mark.parametrize("op_type, attributes, shape, axis", [
    ("Conv", {}, (4, 3, 3, 3), 0),
    ("ConvTranspose", {"group": 2}, (4, 3, 2, 2), None),  # output channels: group x shape[1]
    ("Gemm", {"transB": 1}, (4, 5), 0),
    ("MatMul", {}, (5, 4), 1),
])
def test_scaled_weight_is_the_float64_product_and_leaves_the_weight_alone(op_type, attributes, shape, axis):
    """The weight scaled per output channel equals the float64 product, whatever the weight's dtype;
    the weight the layer holds is not changed (the product is scaled in place on a copy)."""
    node = ir.Node("", op_type, inputs=[], attributes=[ir.AttrInt64(k, v) for k, v in attributes.items()])
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        weight = rng.normal(size=shape).astype(dtype)
        before = weight.copy()
        channels = 6 if op_type == "ConvTranspose" else 4
        scale = rng.uniform(0.5, 2.0, channels)
        if op_type == "ConvTranspose":  # [C_in, C_out / group, k, k], groups along C_in
            factors = scale.reshape(2, 1, 3, 1, 1).repeat(2, axis=1).reshape(4, 3, 1, 1)
        else:
            factors = scale.reshape([-1 if a == axis else 1 for a in range(len(shape))])
        expected = weight.astype(np.float64) * factors
        result = LinearParts(node=node, weight=weight, bias=None, channels=channels).scaled(scale)
        np.testing.assert_array_equal(result, expected)
        assert result.dtype == np.float64 and np.array_equal(weight, before)

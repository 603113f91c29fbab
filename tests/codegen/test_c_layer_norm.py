"""The C LayerNorm (eo_layer_norm_s8) and the spelled-out erf GELU are bit-exact with the reference, every
intermediate tensor compared, with both roundings; and models with them, quantized by edgeopt for the mcu
target, compile."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from onnx import TensorProto, helper

from mcu_flow import assert_compiles_bit_exact, quantize_for_mcu
from edgeopt.codegen.c import compile_c, verify
from tests.runtime.layer_norm_models import constant, layer_norm_op, qdq_graph, spelled_gelu, spelled_layer_norm

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None,
                                reason="needs gcc and make")


def _feeds(shape, count=2, constant_row_axis=None):
    """Normal inputs with a per-row offset; with ``constant_row_axis`` one row along it constant (variance 0)."""
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(count):
        x = rng.standard_normal(shape) * 2 + rng.normal(0, 1)
        if constant_row_axis is not None:
            row = [0] * len(shape)
            row[constant_row_axis] = slice(None)
            x[tuple(row)] = 0.7
        feeds.append({"x": x.astype(np.float32)})
    return feeds


def _bit_exact(model, feeds, out_dir, rounding):
    compile_c(model, out_dir, rounding=rounding)
    result = verify(out_dir, feeds)
    assert result.bit_exact, result.first_mismatch
    assert result.tensors_compared > 0


def _gamma(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1.5, 1.5, shape)  # negative gammas: signed multipliers


@pytest.mark.parametrize("rounding", ["double", "single"])
@pytest.mark.parametrize("case", ["permuted_nhwc", "channels_first", "no_epsilon", "wide_epsilon", "gelu"])
def test_bit_exact(case, rounding, tmp_path):
    if case == "permuted_nhwc":  # logical [N, H, W, C] stored [N, W, C, H]: rows of C with stride H
        model, shape, axis = qdq_graph(*layer_norm_op(_gamma(8), np.full(8, 0.1), epsilon=1e-6), (1, 4, 5, 8)), \
            (1, 4, 5, 8), 3
    elif case == "channels_first":  # NCHW channels, the innermost stored axis; Reciprocal, twin Sub
        body = spelled_layer_norm([1], _gamma((6, 1, 1)), np.full((6, 1, 1), -0.2), divide="Reciprocal", twin=True)
        model, shape, axis = qdq_graph(*body, (1, 6, 3, 4), opset=13), (1, 6, 3, 4), 1
    elif case == "no_epsilon":  # a constant row has variance 0 and no epsilon: the kernel's 1 / sqrt(0) is 0
        body = spelled_layer_norm([-1], _gamma(16), None, epsilon=0.0, square="Mul")
        model, shape, axis = qdq_graph(*body, (5, 16), opset=13), (5, 16), 1
    elif case == "wide_epsilon":  # epsilon far above the variance, a tiny input step: a large epsilon_term
        model, shape, axis = qdq_graph(*layer_norm_op(_gamma(32), None, epsilon=4.0), (3, 32), in_scale=1e-4), \
            (3, 32), 1
    else:
        model, shape, axis = qdq_graph(*spelled_gelu("half_x_first"), (4, 16), opset=13), (4, 16), None
    _bit_exact(model, _feeds(shape, constant_row_axis=axis), tmp_path / "c", rounding)


def _mlp_model(path, opset: int):
    """x [1, 8, 16] -> LayerNorm (the op at opset 17, written out at 13) -> MatMul + bias -> erf GELU written
    out -> MatMul -> y: a transformer MLP as exported below opset 20."""
    rng = np.random.default_rng(1)
    if opset >= 17:
        body, initializers = layer_norm_op(rng.uniform(0.5, 1.5, 16), rng.normal(0, 0.1, 16))
    else:
        body, initializers = spelled_layer_norm([-1], rng.uniform(0.5, 1.5, 16), rng.normal(0, 0.1, 16))
    gelu, gelu_constants = spelled_gelu("half_x_first")
    for node in body:
        node.input[:] = ["x" if name == "xd" else name for name in node.input]
    for node in gelu:
        node.input[:] = ["h" if name == "xd" else name for name in node.input]
        node.output[:] = ["g" if name == "y" else name for name in node.output]
    nodes = [*body, helper.make_node("MatMul", ["y", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["h"]),
             *gelu, helper.make_node("MatMul", ["g", "w2"], ["out"])]
    weights = [constant("w1", rng.normal(0, 0.25, (16, 32))), constant("b1", rng.normal(0, 0.1, 32)),
               constant("w2", rng.normal(0, 0.2, (32, 16)))]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 16])],
                              [*initializers, *gelu_constants, *weights])
    import onnx

    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8), path)
    return path


@pytest.mark.parametrize("opset", [17, 13])
def test_a_layer_norm_gelu_mlp_quantized_for_the_mcu_compiles_bit_exact(opset, tmp_path):
    # the spelled-out GELU (and LayerNorm at opset 13) were float groups: 'cannot become C'
    rng = np.random.default_rng(2)
    samples = [{"x": (rng.standard_normal((1, 8, 16)) * 3 + 1).astype(np.float32)} for _ in range(10)]
    result, model = quantize_for_mcu(_mlp_model(tmp_path / "mlp.onnx", opset), samples[:8], tmp_path / "q.onnx")
    assert result.float_nodes == ()
    compile_c(model, tmp_path / "c", rounding="single")
    assert verify(tmp_path / "c", samples[8:]).bit_exact


def test_convnext_quantized_for_the_mcu_compiles_bit_exact(tmp_path):
    # nn.LayerNorm after permute, the channels-first LayerNorm2d written out, and nn.GELU at opset 17
    from tests.zoo_models import build_zoo

    rng = np.random.default_rng(3)
    samples = [{"input": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(10)]
    result, model = quantize_for_mcu(build_zoo("convnext", tmp_path), samples[:8], tmp_path / "q.onnx")
    assert result.float_nodes == ()
    assert_compiles_bit_exact(model, tmp_path / "c", samples[8:])


def test_a_conformer_block_quantized_for_the_mcu_compiles_bit_exact(tmp_path):
    # four LayerNorms, SiLU, GLU, 1-D depthwise conv and self-attention (q @ k^T and probs @ v multiply two
    # activations: one batch_matmul kernel each)
    from edgeopt.io import load_model, save_model
    from tests.audio_models import audio_samples, build_audio

    fixed = tmp_path / "conformer_t80.onnx"
    save_model(load_model(build_audio("conformer", tmp_path), input_shapes={"input": (1, 80, 40)}), fixed)
    samples = audio_samples("conformer", 10, frames=(80, 80))
    _, model = quantize_for_mcu(fixed, samples[:8], tmp_path / "q.onnx")
    assert_compiles_bit_exact(model, tmp_path / "c", samples[8:])

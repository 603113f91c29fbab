"""PRelu, DepthToSpace/SpaceToDepth and bilinear Resize in C, bit-exact with the reference; and end to end:
models quantized by edgeopt for the MCU target with them compile and verify."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt import api
from edgeopt.codegen.c import compile_c, verify
from edgeopt.quant import Int8Config, Target
from edgeopt.runtime.reference import lower
from qdq_op_models import op_model, random_feeds
from tests.vision_models import build_vision, vision_inputs

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None,
                                reason="needs gcc and make")

_SLOPES = np.array([0.25, -0.5, 0.0, 1.5, 0.01, 0.3], np.float32)


def _assert_bit_exact(model, in_shape, out_dir, rounding="double"):
    compile_c(model, out_dir, rounding=rounding)
    result = verify(out_dir, random_feeds(in_shape, 2, seed=3))
    assert result.bit_exact, result.first_mismatch
    assert result.tensors_compared > 0


@pytest.mark.parametrize("shape, slope, rounding", [((1, 6, 5, 7), _SLOPES.reshape(6, 1, 1), "double"),
                                                    ((1, 6, 5, 7), _SLOPES.reshape(6, 1, 1), "single"),
                                                    ((1, 3, 4, 6), _SLOPES, "double"),
                                                    ((4, 6), _SLOPES, "single")])
def test_prelu(shape, slope, rounding, tmp_path):
    model = op_model("PRelu", shape, shape, inputs=["slope"], constants={"slope": slope},
                     output_quantization=(0.025, -3))
    _assert_bit_exact(model, shape, tmp_path / "c", rounding)


@pytest.mark.parametrize("op, attributes, in_shape, out_shape", [
    ("DepthToSpace", dict(blocksize=3, mode="DCR"), (1, 18, 2, 3), (1, 2, 6, 9)),
    ("DepthToSpace", dict(blocksize=2, mode="CRD"), (2, 12, 4, 3), (2, 3, 8, 6)),
    ("SpaceToDepth", dict(blocksize=2), (1, 3, 6, 4), (1, 12, 3, 2))])
def test_depth_to_space_and_back(op, attributes, in_shape, out_shape, tmp_path):
    _assert_bit_exact(op_model(op, in_shape, out_shape, **attributes), in_shape, tmp_path / "c")


@pytest.mark.parametrize("rounding", ["double", "single"])
@pytest.mark.parametrize("transform", ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"])
@pytest.mark.parametrize("in_shape, out_shape", [((1, 3, 8, 8), (1, 3, 16, 16)), ((1, 2, 16, 12), (1, 2, 24, 18))])
def test_bilinear_resize(in_shape, out_shape, transform, rounding, tmp_path):
    model = op_model("Resize", in_shape, out_shape, inputs=["", "", "sizes"], constants={"sizes": np.int64(out_shape)},
                     mode="linear", coordinate_transformation_mode=transform)
    _assert_bit_exact(model, in_shape, tmp_path / "c", rounding)


def _upsampling_head(path) -> None:
    """Conv -> PRelu (per channel) -> Conv -> DepthToSpace (CRD) -> bilinear Resize x1.5 -> SpaceToDepth -> Conv."""
    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "w2": rng.normal(0, 0.2, (8, 8, 3, 3)),
               "w3": rng.normal(0, 0.2, (4, 8, 1, 1)), "slope": rng.uniform(0.05, 0.4, (8, 1, 1)),
               "sizes": np.array([1, 2, 24, 24])}
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("PRelu", ["c1", "slope"], ["p"], name="prelu"),
             helper.make_node("Conv", ["p", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("DepthToSpace", ["c2"], ["d"], name="to_space", blocksize=2, mode="CRD"),
             helper.make_node("Resize", ["d", "", "", "sizes"], ["r"], name="resize", mode="linear"),
             helper.make_node("SpaceToDepth", ["r"], ["s"], name="to_depth", blocksize=2),
             helper.make_node("Conv", ["s", "w3"], ["output"], name="conv3")]
    initializers = [numpy_helper.from_array(v.astype(np.int64 if k == "sizes" else np.float32), k)
                    for k, v in weights.items()]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 12, 12])],
                              initializer=initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_an_upsampling_head_quantized_for_the_mcu_compiles_bit_exact(tmp_path):
    _upsampling_head(tmp_path / "head.onnx")
    quantized = tmp_path / "head.int8.onnx"
    api.quantize(tmp_path / "head.onnx", Int8Config(target=Target.MCU), random_feeds((1, 3, 8, 8), 8),
                 output=quantized, check_speed=False, check_fidelity=False)
    model = api.load(quantized)
    compile_c(model, tmp_path / "c")
    kinds = [op.kind for op in lower(model).ops]
    assert "prelu" in kinds and "resize_bilinear" in kinds and "requantize" not in kinds  # moves share a scale
    result = verify(tmp_path / "c", random_feeds((1, 3, 8, 8), 2, seed=5))
    assert result.bit_exact, result.first_mismatch


def test_deeplab_quantized_for_the_mcu_compiles_bit_exact(tmp_path):
    """Its bilinear Resizes: the ASPP's pooled branch (half_pixel), the decoder's (align_corners) and the output's."""
    quantized = tmp_path / "deeplab.int8.onnx"
    api.quantize(build_vision("deeplab", tmp_path), Int8Config(target=Target.MCU), vision_inputs("deeplab", 8, 0),
                 output=quantized, check_speed=False, check_fidelity=False)
    api.compile_model(quantized, tmp_path / "c", measure=False, input_shapes={"input": [1, 3, 32, 32]})
    result = verify(tmp_path / "c", vision_inputs("deeplab", 2, seed=1))
    assert result.bit_exact, result.first_mismatch

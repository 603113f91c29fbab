"""InstanceNormalization (and GroupNorm exported through it) compiles to C on the LayerNorm kernel, bit-exact.

On NCHW (stored NHWC) each (n, c) is a row of H x W values with the channel the inner axis, so the
per-channel scale and B vary along it; a GroupNorm exported as Reshape [N, G, -1] -> InstanceNorm (scale 1,
B 0) -> Reshape -> Mul -> Add normalizes rows of a rank-3 tensor. Quantized by edgeopt for the MCU: within
one step of ONNX Runtime on the QDQ model, the generated C bit-exact with the reference.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdq_models as q
from mcu_flow import quantize_for_mcu
from edgeopt import api
from edgeopt.codegen.c import compile_c, verify
from edgeopt.errors import UnsupportedOpError
from edgeopt.quant import Int8Config, Target
from edgeopt.runtime.ort import OrtSession
from edgeopt.runtime.reference import ReferenceModel, lower

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None,
                               reason="needs gcc and make")
SHAPE = (1, 3, 9, 10)


def _model(path, norm_nodes, constants) -> None:
    rng = np.random.default_rng(0)
    weights = {"w": rng.normal(0, 0.4, (6, 3, 3, 3)).astype(np.float32), **constants}
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), *norm_nodes,
             helper.make_node("Relu", ["n"], ["output"], name="relu")]
    graph = helper.make_graph(nodes, path.stem, [helper.make_tensor_value_info("input", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 6, 9, 10])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _instance_norm(path) -> None:
    constants = {"scale": np.float32([0.5, 1.5, -1.0, 2.0, 0.8, 1.0]), "bias": np.float32([0, 0.3, -0.2, 1, 0.1, 0])}
    _model(path, [helper.make_node("InstanceNormalization", ["c", "scale", "bias"], ["n"], name="instance_norm",
                                   epsilon=1e-4)], constants)


def _group_norm(path) -> None:
    """torch's GroupNorm(2, 6) as TorchScript exports it: the affine after the second Reshape."""
    constants = {"groups": np.array([1, 2, -1]), "back": np.array([1, 6, 9, 10]), "ones": np.ones(2, np.float32),
                 "zeros": np.zeros(2, np.float32), "gamma": np.float32([1, 2, 0.5, 1, 1.5, 1]).reshape(6, 1, 1),
                 "beta": np.float32([0, 0.1, 0.2, -0.1, 0, 0.3]).reshape(6, 1, 1)}
    _model(path, [helper.make_node("Reshape", ["c", "groups"], ["g"], name="to_groups"),
                  helper.make_node("InstanceNormalization", ["g", "ones", "zeros"], ["gn"], name="group_norm"),
                  helper.make_node("Reshape", ["gn", "back"], ["b"], name="from_groups"),
                  helper.make_node("Mul", ["b", "gamma"], ["m"], name="gamma"),
                  helper.make_node("Add", ["m", "beta"], ["n"], name="beta")], constants)


def _inputs(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input": (rng.normal(0, 1, SHAPE) + rng.normal(0, 1, (1, 3, 1, 1))).astype(np.float32)}
            for _ in range(count)]


@pytest.fixture(scope="module", params=["instance_norm", "group_norm"])
def quantized(request, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp(request.param)
    {"instance_norm": _instance_norm, "group_norm": _group_norm}[request.param](tmp_path / "float.onnx")
    result, model = quantize_for_mcu(tmp_path / "float.onnx", _inputs(16, seed=0), tmp_path / "int8.onnx")
    assert result.float_nodes == ()
    return model


def test_integer_reference_is_within_a_step_of_onnx_runtime(quantized):
    within, _, worst = q.agreement(ReferenceModel(quantized, rounding="single"), OrtSession(quantized),
                                   _inputs(4, seed=3))
    assert within >= 0.995 and worst <= 1, (within, worst)
    assert [op.kind for op in lower(quantized).ops].count("layer_norm") == 1


@needs_gcc
def test_generated_c_is_bit_exact(quantized, tmp_path):
    compile_c(quantized, tmp_path / "c")
    result = verify(tmp_path / "c", _inputs(2, seed=4))
    assert result.bit_exact, result.first_mismatch


def test_a_per_channel_scale_on_a_rank_3_tensor_is_refused_in_one_line(tmp_path):
    constants = {"groups": np.array([1, 2, -1]), "back": np.array([1, 6, 9, 10]),
                 "two": np.float32([1.0, 2.0]), "zeros": np.zeros(2, np.float32)}
    _model(tmp_path / "float.onnx", [
        helper.make_node("Reshape", ["c", "groups"], ["g"], name="to_groups"),
        helper.make_node("InstanceNormalization", ["g", "two", "zeros"], ["gn"], name="group_norm"),
        helper.make_node("Reshape", ["gn", "back"], ["n"], name="from_groups")], constants)
    _, model = quantize_for_mcu(tmp_path / "float.onnx", _inputs(8, seed=0), tmp_path / "int8.onnx")
    with pytest.raises(UnsupportedOpError, match=r"group_norm.*per channel on NCHW \(rank 4\) only") as error:
        lower(model)
    assert "\n" not in str(error.value)


@needs_gcc
def test_super_resolution_quantized_for_the_mcu_compiles_bit_exact(tmp_path):
    """PRelu, InstanceNorm, the GroupNorm export, ConvTranspose and DepthToSpace in one model."""
    from tests.vision_models import build_vision

    rng = np.random.default_rng(5)
    samples = [{"input": rng.normal(0, 1, (1, 3, 16, 16)).astype(np.float32)} for _ in range(10)]
    api.quantize(build_vision("super_resolution", tmp_path), Int8Config(target=Target.MCU), samples[:8],
                 output=tmp_path / "int8.onnx", check_speed=False, check_fidelity=False)  # dynamic H, W: fixed below
    api.compile_model(tmp_path / "int8.onnx", tmp_path / "c", input_shapes={"input": (1, 3, 16, 16)})
    result = verify(tmp_path / "c", samples[8:])
    assert result.bit_exact, result.first_mismatch

"""Generated C is bit-exact with the reference interpreter, every intermediate tensor included."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qdq_models as q
from edgeopt.codegen.c import compile_c, verify

logging.getLogger("root").setLevel(logging.ERROR)
pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None,
                                reason="needs gcc and make")


def _feeds(model, count=2, seed=0):
    from edgeopt import ir as eir

    spec = eir.model_inputs(model)[0]
    rng = np.random.default_rng(seed)
    return [{spec.name: rng.standard_normal(spec.shape).astype(np.float32)} for _ in range(count)]


def _assert_bit_exact(model, out_dir, rounding):
    compile_c(model, out_dir, rounding=rounding)
    result = verify(out_dir, _feeds(model))
    assert result.bit_exact, result.first_mismatch
    assert result.tensors_compared > 0


@pytest.mark.parametrize("rounding", ["double", "single"])
@pytest.mark.parametrize("name", sorted(q.FLOAT_BUILDERS))
def test_small_models(name, rounding, tmp_path):
    _assert_bit_exact(q.to_ir(q.quantize_with_ort(q.float_model(name))), tmp_path / "c", rounding)


@pytest.mark.parametrize("name", ["mobilenet_v2", pytest.param("mobilenet_v3", marks=pytest.mark.slow),
                                  pytest.param("resnet", marks=pytest.mark.slow)])
def test_torch_architectures(name, tmp_path):
    _assert_bit_exact(q.to_ir(q.torch_qdq_model(name)), tmp_path / "c", "double")


def test_uint8_activation_model_is_bit_exact(tmp_path):
    model = q.to_ir(q.quantize_with_ort(q.float_model("residual_add"), activation="uint8"))
    _assert_bit_exact(model, tmp_path / "c", "single")


@pytest.mark.parametrize("rounding", ["double", "single"])
def test_a_requantize_multiplier_far_above_one_saturates_bit_exactly(rounding, tmp_path):
    # input scale 1 -> output scale 2^-28 (another quantizer's QDQ model): the multiplier's left shift
    # overflowed int64 in the C (undefined behaviour) and its result was cut to int32, so large inputs
    # came out as 0 and negative ones as 127; both sides now saturate, as ONNX Runtime does
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    def constant(name, value, dtype):
        return numpy_helper.from_array(np.array(value, dtype=dtype), name)

    nodes = [helper.make_node("QuantizeLinear", ["x", "s_in", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s_in", "z"], ["xd"]),
             helper.make_node("Relu", ["xd"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "s_out", "z"], ["rq"]),
             helper.make_node("DequantizeLinear", ["rq", "s_out", "z"], ["y"])]
    graph = helper.make_graph(nodes, "extreme", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
                              [constant("s_in", 1.0, np.float32), constant("z", 0, np.int8),
                               constant("s_out", 2.0**-28, np.float32)])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8))
    compile_c(model, tmp_path / "c", rounding=rounding)
    feeds = [{"x": np.linspace(-100, 127, 16, dtype=np.float32)[None]}]
    result = verify(tmp_path / "c", feeds)
    assert result.bit_exact, result.first_mismatch


_BLOCKS = ["conv", "depthwise", "residual", "basic_block", "maxpool", "avgpool", "sigmoid", "concat",
           "hardswish"]


def _random_model(blocks, channels, size, seed):
    b = q._Builder(seed)
    x, c = b.conv("input", channels, channels, k=1), channels  # ORT leaves ops on the raw input in float
    for block in blocks:
        if block == "conv":
            x = b.node("Relu", [b.conv(x, c, c + 2, k=3)])
            c += 2
        elif block == "depthwise":
            x = b.conv(x, c, c, k=3, group=c)
        elif block == "residual":  # the conv reads the shortcut: not fused
            x = b.node("Add", [x, b.conv(x, c, c, k=1)])
        elif block == "basic_block":  # fused into conv2d_add, written over the shortcut
            y = b.conv(b.node("Relu", [b.conv(x, c, c, k=3)]), c, c, k=3)
            x = b.node("Relu", [b.node("Add", [y, x] if seed % 3 else [x, y])])
        elif block == "maxpool":
            x = b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[1, 1], pads=[0, 0, 1, 1])
        elif block == "avgpool":
            x = b.node("AveragePool", [x], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
        elif block == "sigmoid":
            x = b.node("Mul", [x, b.node("Sigmoid", [x])])
        elif block == "hardswish":
            # ORT quantizes HardSwish's output only for a consumer it quantizes
            x = b.conv(b.node("HardSwish", [x]), c, c, k=1)
        elif block == "concat":
            x = b.node("Concat", [x, b.conv(x, c, 3, k=1)], axis=1)
            c += 3
    return b.model(b.conv(x, c, 4, k=1), (1, channels, size, size))


_GRAPHS = dict(blocks=st.lists(st.sampled_from(_BLOCKS), min_size=1, max_size=4),
               channels=st.integers(1, 6), size=st.integers(3, 9), seed=st.integers(0, 1000),
               data_scale=st.floats(0.05, 20.0), rounding=st.sampled_from(["double", "single"]))


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(**_GRAPHS)
def test_random_graphs(blocks, channels, size, seed, data_scale, rounding, tmp_path_factory):
    _check_random_graph(blocks, channels, size, seed, data_scale, rounding, tmp_path_factory)


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(**_GRAPHS)
def test_many_random_graphs(blocks, channels, size, seed, data_scale, rounding, tmp_path_factory):
    _check_random_graph(blocks, channels, size, seed, data_scale, rounding, tmp_path_factory)


def _check_random_graph(blocks, channels, size, seed, data_scale, rounding, tmp_path_factory):
    float_model = _random_model(blocks, channels, size, seed)
    batches = [{k: v * np.float32(data_scale) for k, v in batch.items()}
               for batch in q.calibration_batches(float_model, 4, seed)]
    model = q.to_ir(q.quantize_with_ort(float_model, batches=batches,
                                        activation="uint8" if seed % 2 else "int8"))
    _assert_bit_exact(model, tmp_path_factory.mktemp("c") / "c", rounding)

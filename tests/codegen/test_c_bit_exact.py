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

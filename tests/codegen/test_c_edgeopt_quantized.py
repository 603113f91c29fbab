"""C generated from models quantized by edgeopt itself (MCU target) is bit-exact with the reference.

The demo model and torch-built MobileNet- and ResNet-style networks, each
quantized with ``Int8Config(target=Target.MCU)`` on calibration data, compiled,
built with gcc, run on held-out inputs, and compared tensor by tensor.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgeopt import api
from edgeopt.codegen.c import compile_c, verify
from edgeopt.demo import demo_calibration_path, demo_model_path
from edgeopt.quant import Int8Config, Target
from tests.models import build_onnx

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None,
                                reason="needs gcc and make")


def _smooth_images(count: int, seed: int) -> np.ndarray:
    """Image-like inputs (upsampled noise), [count, 3, 32, 32]."""
    coarse = np.random.default_rng(seed).normal(size=(count, 3, 8, 8)).astype(np.float32)
    return np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3)


def _quantize_compile_verify(float_path, calibration, held_out, tmp_path, rounding="double", tensors_per_input=10):
    quantized = tmp_path / "model.int8.onnx"
    api.quantize(float_path, Int8Config(target=Target.MCU), calibration, output=quantized,
                 check_speed=False, check_fidelity=False)
    compile_c(api.load(quantized), tmp_path / "c", rounding=rounding)
    result = verify(tmp_path / "c", held_out)
    assert result.bit_exact, result.first_mismatch
    assert result.tensors_compared >= tensors_per_input * len(held_out)


@pytest.mark.parametrize("rounding", ["double", "single"])
def test_demo_model(tmp_path, rounding):
    held_out = [{"input": x[np.newaxis]} for x in np.load(demo_calibration_path())[-4:]]
    _quantize_compile_verify(demo_model_path(), demo_calibration_path(), held_out, tmp_path, rounding)


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet", pytest.param("mobilenet_v3", marks=pytest.mark.slow)])
def test_torch_architectures(tmp_path, name):
    np.save(tmp_path / "calib.npy", _smooth_images(24, seed=0))
    held_out = [{"input": x[np.newaxis]} for x in _smooth_images(3, seed=1)]
    _quantize_compile_verify(build_onnx(name, tmp_path), tmp_path / "calib.npy", held_out, tmp_path)


def _mcu_kernel_ops_model(path) -> None:
    """Conv -> HardSwish -> ReduceMean (a mean pool) -> Gemm -> Tanh -> Elu -> Gemm -> Softmax: ops the C kernels
    compute from int8 that ONNX Runtime has no QDQ fusion for."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"conv_w": rng.normal(0, 0.3, (8, 3, 3, 3)), "conv_b": rng.normal(0, 0.1, 8),
               "fc1_w": rng.normal(0, 0.4, (8, 16)), "fc1_b": rng.normal(0, 0.1, 16),
               "fc2_w": rng.normal(0, 0.4, (16, 10)), "fc2_b": rng.normal(0, 0.1, 10)}
    nodes = [helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("HardSwish", ["c"], ["h"], name="hswish"),
             helper.make_node("ReduceMean", ["h"], ["m"], name="mean", axes=[2, 3], keepdims=0),
             helper.make_node("Gemm", ["m", "fc1_w", "fc1_b"], ["f1"], name="fc1"),
             helper.make_node("Tanh", ["f1"], ["t"], name="tanh"),
             helper.make_node("Elu", ["t"], ["e"], name="elu"),
             helper.make_node("Gemm", ["e", "fc2_w", "fc2_b"], ["f2"], name="fc2"),
             helper.make_node("Softmax", ["f2"], ["probabilities"], name="softmax", axis=-1)]
    graph = helper.make_graph(
        nodes, "mcu_ops", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 10])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), path)


def test_ops_only_the_mcu_kernels_run_in_integer_are_quantized_for_mcu(tmp_path):
    """Softmax, Tanh and Elu stay float for ONNX Runtime (no integer kernel there; HardSwish becomes its
    QLinearAdd + QLinearMul) but are quantized for the microcontroller, so a final Softmax compiles; the mean
    pool (a ReduceMean over H and W) becomes a GlobalAveragePool, an integer kernel on both."""
    float_path = tmp_path / "mcu_ops.onnx"
    _mcu_kernel_ops_model(float_path)
    np.save(tmp_path / "calib.npy", _smooth_images(24, seed=0))
    ort = api.quantize(float_path, Int8Config(), tmp_path / "calib.npy", output=tmp_path / "ort.onnx",
                       check_speed=False, check_fidelity=False)
    assert {n.op_type for n in ort.result.float_nodes} == {"Tanh", "Elu", "Softmax"}
    mcu = api.quantize(float_path, Int8Config(target=Target.MCU), tmp_path / "calib.npy",
                       output=tmp_path / "model.int8.onnx", check_speed=False, check_fidelity=False)
    assert not mcu.result.float_nodes
    probabilities = next(t for t in mcu.result.tensors if t.name == "probabilities")
    assert (probabilities.scale, probabilities.zero_point) == ((1 / 256,), (-128,))  # TFLite's fixed Softmax range
    compile_c(api.load(tmp_path / "model.int8.onnx"), tmp_path / "c")
    result = verify(tmp_path / "c", [{"input": x[np.newaxis]} for x in _smooth_images(3, seed=1)])
    assert result.bit_exact, result.first_mismatch


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceMax"])
@pytest.mark.parametrize("axes, keepdims", [([2], 0), ([3], 0), ([2], 1), ([2, 3], 0), ([1], 0)])
def test_a_reduction_without_keepdims_writes_the_outputs_layout(tmp_path, op, axes, keepdims):
    """Reducing H (or W) alone of an NHWC tensor without keepdims leaves [N, W, C], which is no layout of
    the [N, C, W] output: the C once computed right values in the wrong order, and verify, which shares the
    lowering, called it bit-exact; then it was refused. Now a transpose writes the output's layout: the
    integer reference agrees with ONNX Runtime on the QDQ model, and the C with the reference."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgeopt.runtime.ort import OrtSession
    from edgeopt.runtime.reference import ReferenceModel
    from tests.runtime.qdq_models import agreement

    weight = np.random.default_rng(0).normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node(op, ["c"], ["mean"], name="mean", axes=axes, keepdims=keepdims)],
        "mean", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, None)], [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "mean.onnx")
    np.save(tmp_path / "calib.npy", _smooth_images(16, seed=0))
    api.quantize(tmp_path / "mean.onnx", Int8Config(target=Target.MCU), tmp_path / "calib.npy",
                 output=tmp_path / "mean.int8.onnx", check_speed=False, check_fidelity=False)
    model = api.load(tmp_path / "mean.int8.onnx")
    held_out = [{"input": x[np.newaxis]} for x in _smooth_images(2, seed=1)]
    within, _, worst = agreement(ReferenceModel(model), OrtSession(model), held_out)
    assert within >= 0.99 and worst <= 1, (within, worst)
    compile_c(model, tmp_path / "c")
    assert verify(tmp_path / "c", held_out).bit_exact


@pytest.mark.parametrize("opset", [17, 20])
def test_a_tanh_gelu_mlp_compiles(tmp_path, opset):
    """Torch's GELU(approximate='tanh'): written out below opset 20 (int8 Mul, Add and Tanh), one
    Gelu(approximate="tanh") from 20, whose lookup table computes the tanh form (it stayed float)."""
    import torch

    from tests.models import export_onnx, tanh_gelu_mlp

    float_path = export_onnx(tanh_gelu_mlp(), (torch.zeros(1, 16),), tmp_path / "mlp.onnx", opset=opset)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", rng.normal(size=(24, 16)).astype(np.float32))
    held_out = [{"input": x[np.newaxis]} for x in rng.normal(size=(3, 16)).astype(np.float32)]
    _quantize_compile_verify(float_path, tmp_path / "calib.npy", held_out, tmp_path,
                             tensors_per_input=3 if opset >= 20 else 11)


def test_hugging_face_gelu_new_below_opset_20_compiles(tmp_path):
    """gelu_new's cube exported as Pow(x, 3), which has no int8 kernel (the model did not compile): the float
    passes write it x * x * x, as torch writes its own tanh-GELU, and the whole MLP runs in int8."""
    import torch

    from tests.models import export_onnx, gelu_new_mlp

    float_path = export_onnx(gelu_new_mlp(), (torch.zeros(1, 16),), tmp_path / "mlp.onnx", opset=17)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", rng.normal(size=(24, 16)).astype(np.float32))
    held_out = [{"input": x[np.newaxis]} for x in rng.normal(size=(3, 16)).astype(np.float32)]
    _quantize_compile_verify(float_path, tmp_path / "calib.npy", held_out, tmp_path, tensors_per_input=11)


def test_a_hardsigmoid_se_gate_compiles_as_a_clamped_conv(tmp_path):
    """nn.Hardsigmoid after the SE block's conv (opset 17) folds into the conv as its [0, 1] output clamp."""
    import torch

    from tests.models import export_onnx, se_gated_convs

    float_path = export_onnx(se_gated_convs(), (torch.zeros(1, 3, 32, 32),), tmp_path / "se.onnx", opset=17)
    np.save(tmp_path / "calib.npy", _smooth_images(16, seed=0))
    held_out = [{"input": x[np.newaxis]} for x in _smooth_images(2, seed=1)]
    _quantize_compile_verify(float_path, tmp_path / "calib.npy", held_out, tmp_path, tensors_per_input=6)


def test_a_model_quantized_with_a_dynamic_batch_compiles_once_its_shape_is_fixed(tmp_path):
    """``x.view(x.size(0), -1)`` exported with a dynamic batch (and torch.flatten in the dynamo exporter's
    unoptimized graph) keeps ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` through quantization;
    with --input-shape that arithmetic is constant, and compile folds it instead of refusing Shape."""
    import torch
    from torch import nn

    from tests.models import export_onnx

    class ViewHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.Linear(8 * 8 * 8, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).view(x.size(0), -1))

    torch.manual_seed(0)
    float_path = export_onnx(ViewHead(), (torch.randn(1, 3, 32, 32),), tmp_path / "view.onnx", dynamic_batch=True)
    np.save(tmp_path / "calib.npy", _smooth_images(16, seed=0))
    api.quantize(float_path, Int8Config(target=Target.MCU), tmp_path / "calib.npy",
                 output=tmp_path / "view.int8.onnx", check_speed=False, check_fidelity=False)
    api.compile_model(tmp_path / "view.int8.onnx", tmp_path / "c", measure=False,
                      input_shapes={"input": (1, 3, 32, 32)})
    result = verify(tmp_path / "c", [{"input": x[np.newaxis]} for x in _smooth_images(3, seed=1)])
    assert result.bit_exact, result.first_mismatch


def _split_slice_model(path, opset: int) -> None:
    """Conv -> Relu -> Split in channels (uneven [3, 5] by the opset's own spelling: attribute before 13, input
    from 13, ``num_outputs`` from 18 in equal halves) -> a conv on one part, the last 4 channels of the other
    (Slice with a negative start, an end past the dimension) -> Concat -> conv; and a spatial crop of the
    Relu (Slice over H and W with negative ends) -> 1x1 conv, a second output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    sizes = [4, 4] if opset >= 18 else [3, 5]
    init = {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "w2": rng.normal(0, 0.3, (4, sizes[0], 3, 3)),
            "w3": rng.normal(0, 0.3, (6, 8, 1, 1)), "w4": rng.normal(0, 0.3, (5, 8, 1, 1))}
    ints = {"starts": [-4], "ends": [1 << 40], "axes": [1], "crop_starts": [2, 1], "crop_ends": [-1, -3],
            "crop_axes": [2, 3]}
    split = (helper.make_node("Split", ["relu"], ["a", "b"], axis=1, split=sizes) if opset < 13 else
             helper.make_node("Split", ["relu", "sizes"], ["a", "b"], axis=1) if opset < 18 else
             helper.make_node("Split", ["relu"], ["a", "b"], axis=1, num_outputs=2))
    ints["sizes"] = sizes
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["relu"]), split,
             helper.make_node("Conv", ["a", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Slice", ["b", "starts", "ends", "axes"], ["last4"]),
             helper.make_node("Concat", ["c2", "last4"], ["cat"], axis=1),
             helper.make_node("Conv", ["cat", "w3"], ["output"]),
             helper.make_node("Slice", ["relu", "crop_starts", "crop_ends", "crop_axes"], ["crop"]),
             helper.make_node("Conv", ["crop", "w4"], ["crop_output"])]
    graph = helper.make_graph(
        nodes, "split_slice", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("crop_output", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in init.items()]
        + [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in ints.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split_and_slice_compile_bit_exact_and_agree_with_onnx_runtime(tmp_path, opset):
    """Split and Slice (steps of 1) copy int8 blocks in the C, so the MCU target quantizes them (they were
    kept float and compile refused them by name): ONNX Runtime's int8 result, the reference and the C agree."""
    from edgeopt.runtime.ort import OrtSession
    from edgeopt.runtime.reference import ReferenceModel

    float_path = tmp_path / "split_slice.onnx"
    _split_slice_model(float_path, opset)
    np.save(tmp_path / "calib.npy", _smooth_images(16, seed=0))
    held_out = [{"input": x[np.newaxis]} for x in _smooth_images(3, seed=1)]
    _quantize_compile_verify(float_path, tmp_path / "calib.npy", held_out, tmp_path, tensors_per_input=8)
    model = api.load(tmp_path / "model.int8.onnx")
    reference, session = ReferenceModel(model), OrtSession(model)
    for feed in held_out:
        ours, theirs = reference.run_float(feed), session.run(feed)
        for name in ("output", "crop_output"):
            assert ours[name].shape == theirs[name].shape
            assert np.abs(ours[name] - theirs[name]).max() <= 2.01 * reference.output_info(name).scale


@pytest.mark.parametrize("name", ["shufflenet", "ghostnet", "densenet"])
def test_zoo_models_compile(tmp_path, name):
    """ShuffleNetV2 (chunk -> Slice, channel shuffle), GhostNet (Concat -> Slice to the out width) and DenseNet
    (BN-ReLU-Conv after each Concat: the BatchNorm becomes a 1x1 depthwise Conv)."""
    from tests.zoo_models import build_zoo

    np.save(tmp_path / "calib.npy", _smooth_images(16, seed=0))
    held_out = [{"input": x[np.newaxis]} for x in _smooth_images(2, seed=1)]
    _quantize_compile_verify(build_zoo(name, tmp_path, 13), tmp_path / "calib.npy", held_out, tmp_path)

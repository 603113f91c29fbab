"""1-D convolutions and pools (keyword spotting, audio, sensor models) compile to C and match bit for bit.

The lowering lifts them to 2-D over a height of 1 (``edgeopt.runtime.reference.lift_1d``): the
integer reference must agree with ONNX Runtime on the QDQ model, the generated C with the reference,
and the [N, C, L] tensors run channels-innermost without a transpose between layers.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdq_models as q
from edgeopt import api
from edgeopt.codegen.c import compile_c, verify
from edgeopt.quant import Int8Config, Target
from edgeopt.runtime.ort import OrtSession
from edgeopt.runtime.reference import ReferenceModel, lower
from edgeopt.runtime.reference.lift_1d import lift_1d
from tests.audio_models import build_audio

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None,
                               reason="needs gcc and make")
FRAMES = 48


def _signals(count: int, seed: int, channels: int = 40) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    offsets = rng.normal(0, 1, (channels, 1))
    return [{"input": (offsets + rng.normal(0, 1, (1, channels, FRAMES))).astype(np.float32)} for _ in range(count)]


def _quantized(float_path, tmp_path, calibration) -> object:
    output = tmp_path / "model.int8.onnx"
    api.quantize(float_path, Int8Config(target=Target.MCU), calibration, output=output,
                 check_speed=False, check_fidelity=False)
    return api.load(output, input_shapes={"input": (1, calibration[0]["input"].shape[1], FRAMES)})


def _helper_model(path) -> None:
    """Every op the lift rewrites, on [1, 8, 48]: a strided SAME_UPPER conv, a padded strided max pool, a
    depthwise conv, a per-channel Mul of the pool, a time Pad and Slice (a TCN's causal chomp), Concat over channels
    and over time, a strided ConvTranspose, a mean over time, and a rank-3 graph output taken inside the
    region."""
    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(0, 0.4, (16, 8, 3)), "b1": rng.normal(0, 0.1, 16),
               "wd": rng.normal(0, 0.5, (16, 1, 5)), "gain": rng.uniform(0.5, 1.5, (16, 1)),
               "w2": rng.normal(0, 0.3, (8, 32, 1)), "pads": np.array([0, 0, 2, 0, 0, 0]),
               "starts": np.array([0]), "ends": np.array([12]), "axes": np.array([2]),
               "wt": rng.normal(0, 0.3, (8, 8, 3)), "fc": rng.normal(0, 0.3, (8, 4))}
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv_same", strides=[2], auto_pad="SAME_UPPER"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "wd"], ["d"], name="depthwise", group=16, pads=[2, 2], dilations=[1]),
        helper.make_node("MaxPool", ["r1"], ["p"], name="pool", kernel_shape=[3], strides=[1], pads=[1, 1]),
        helper.make_node("Mul", ["p", "gain"], ["g"], name="gain"),
        helper.make_node("Concat", ["d", "g"], ["cat"], name="cat_channels", axis=1),
        helper.make_node("Conv", ["cat", "w2"], ["c2"], name="pointwise"),
        helper.make_node("Pad", ["c2", "pads"], ["padded"], name="causal_pad"),
        helper.make_node("Slice", ["padded", "starts", "ends", "axes"], ["chomped"], name="chomp"),
        helper.make_node("Concat", ["chomped", "chomped"], ["twice"], name="cat_time", axis=-1),
        helper.make_node("Identity", ["twice"], ["features"], name="features"),
        helper.make_node("ConvTranspose", ["twice", "wt"], ["up"], name="upsample", strides=[2], pads=[1, 1],
                         output_padding=[1]),
        helper.make_node("ReduceMean", ["up"], ["mean"], name="mean_time", axes=[2], keepdims=1),
        helper.make_node("Flatten", ["mean"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "fc"], ["logits"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "conv1d_ops", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 8, FRAMES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 8, 24])],
        initializer=[numpy_helper.from_array(v.astype(np.int64 if k in ("pads", "starts", "ends", "axes")
                                                      else np.float32), k) for k, v in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


def _transposes(program) -> int:
    return sum(op.kind == "transpose" for op in program.ops)


@pytest.fixture(scope="module")
def kws_tcn(tmp_path_factory):
    """The keyword-spotting TCN (Conv1d stem, depthwise-separable Conv1d, AvgPool1d, dilated residual
    Conv1d blocks, global pool, Linear) quantized for the MCU."""
    tmp_path = tmp_path_factory.mktemp("kws")
    return _quantized(build_audio("kws_tcn", tmp_path), tmp_path, _signals(12, seed=0))


@pytest.fixture(scope="module")
def kws_tcn_dynamo(tmp_path_factory):
    """The same TCN from torch's dynamo exporter, which writes its 1-D global pool as Unsqueeze ->
    GlobalAveragePool -> Squeeze."""
    tmp_path = tmp_path_factory.mktemp("kws18")
    return _quantized(build_audio("kws_tcn", tmp_path, opset=18), tmp_path, _signals(12, seed=0))


@pytest.fixture(scope="module")
def every_op(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ops")
    _helper_model(tmp_path / "ops.onnx")
    return _quantized(tmp_path / "ops.onnx", tmp_path, _signals(12, seed=0, channels=8))


@pytest.mark.parametrize("name", ["kws_tcn", "kws_tcn_dynamo", "every_op"])
def test_integer_reference_agrees_with_onnx_runtime(name, request):
    model = request.getfixturevalue(name)
    channels = model.graph.inputs[0].shape[1]
    within, _, worst = q.agreement(ReferenceModel(model, rounding="single"), OrtSession(model),
                                   _signals(4, seed=5, channels=channels))
    assert within >= 0.999 and worst <= 1, (within, worst)


@pytest.mark.parametrize("name", ["kws_tcn", "kws_tcn_dynamo", "every_op"])
def test_layers_run_channels_innermost(name, request):
    """No transpose at all: the [N, C, L] input is stored [N, L, C] (its layout says so: the C takes the
    frames of a feature pipeline as they come), the 1-D layers run channels innermost between them, and
    every_op's rank-3 graph output leaves as [N, L, C] too."""
    program = lower(request.getfixturevalue(name))
    assert not any(op.kind == "conv2d" and len(program.tensors[op.inputs[0]].shape) != 4 for op in program.ops)
    assert _transposes(program) == 0
    boundary = [program.tensors[io.tensor] for io in (*program.inputs, *program.outputs)]
    assert [info.layout for info in boundary if len(info.shape) == 3] == [(0, 2, 1)] * (2 if name == "every_op" else 1)


def test_the_given_model_is_left_as_it_was(kws_tcn):
    before = [(node.op_type, [v.name for v in node.inputs if v is not None]) for node in kws_tcn.graph]
    lifted = lift_1d(kws_tcn)
    assert lifted is not kws_tcn
    assert [(node.op_type, [v.name for v in node.inputs if v is not None]) for node in kws_tcn.graph] == before
    assert [v.shape for v in lifted.graph.outputs] == [v.shape for v in kws_tcn.graph.outputs]


def test_a_model_without_1d_layers_is_not_copied():
    model = q.to_ir(q.quantize_with_ort(q.float_model("conv_relu")))
    assert lift_1d(model) is model


@needs_gcc
@pytest.mark.parametrize("name", ["kws_tcn", "every_op"])
def test_generated_c_is_bit_exact(name, request, tmp_path):
    model = request.getfixturevalue(name)
    compile_c(model, tmp_path / "c")
    result = verify(tmp_path / "c", _signals(2, seed=9, channels=model.graph.inputs[0].shape[1]))
    assert result.bit_exact, result.first_mismatch
    assert result.tensors_compared >= 2 * 10


def _normalized_helper_model(path) -> None:
    """Conv1d, a LayerNorm over channels spelled out (as a ConvNeXt-1D or wav2vec2 feature encoder below
    opset 17 writes it), the erf GELU spelled out, a pointwise Conv1d: on [1, 8, 12]."""
    rng = np.random.default_rng(1)
    weights = {"w1": rng.normal(0, 0.4, (8, 8, 3)), "two": np.array(2.0), "eps": np.array(1e-5),
               "gamma": rng.uniform(0.5, 1.5, (8, 1)), "beta": rng.normal(0, 0.1, (8, 1)),
               "sqrt2": np.array(np.sqrt(2.0)), "one": np.array(1.0), "half": np.array(0.5),
               "w2": rng.normal(0, 0.4, (4, 8, 1))}
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c"], name="conv", pads=[1, 1]),
        helper.make_node("ReduceMean", ["c"], ["mean"], name="mean", axes=[1]),
        helper.make_node("Sub", ["c", "mean"], ["centered"], name="center"),
        helper.make_node("Pow", ["centered", "two"], ["squared"], name="square"),
        helper.make_node("ReduceMean", ["squared"], ["variance"], name="variance", axes=[1]),
        helper.make_node("Add", ["variance", "eps"], ["shifted"], name="epsilon"),
        helper.make_node("Sqrt", ["shifted"], ["deviation"], name="sqrt"),
        helper.make_node("Div", ["centered", "deviation"], ["normalized"], name="normalize"),
        helper.make_node("Mul", ["normalized", "gamma"], ["scaled"], name="gamma"),
        helper.make_node("Add", ["scaled", "beta"], ["x"], name="beta"),
        helper.make_node("Div", ["x", "sqrt2"], ["z"], name="gelu_div"),
        helper.make_node("Erf", ["z"], ["e"], name="gelu_erf"),
        helper.make_node("Add", ["e", "one"], ["e1"], name="gelu_add"),
        helper.make_node("Mul", ["x", "e1"], ["xe"], name="gelu_mul"),
        helper.make_node("Mul", ["xe", "half"], ["g"], name="gelu_half"),
        helper.make_node("Conv", ["g", "w2"], ["output"], name="pointwise"),
    ]
    graph = helper.make_graph(
        nodes, "conv1d_norm", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 8, 12])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 12])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


@needs_gcc
def test_spelled_out_layer_norm_and_gelu_after_a_conv1d_compile(tmp_path):
    """The lift kept their Sub/Add/Mul in 2-D with a Squeeze among them: neither group was recognized and
    compile refused them as float islands. They now stay whole at rank 3."""
    _normalized_helper_model(tmp_path / "norm.onnx")
    rng = np.random.default_rng(0)
    batches = [{"input": rng.normal(0, 1, (1, 8, 12)).astype(np.float32)} for _ in range(10)]
    api.quantize(tmp_path / "norm.onnx", Int8Config(target=Target.MCU), batches[:8], output=tmp_path / "q.onnx",
                 check_speed=False, check_fidelity=False)
    model = api.load(tmp_path / "q.onnx")
    assert sorted({op.kind for op in lower(model).ops} - {"reshape", "transpose"}) == ["conv2d", "layer_norm", "lut"]
    within, _, worst = q.agreement(ReferenceModel(model, rounding="single"), OrtSession(model), batches[8:])
    assert within >= 0.999 and worst <= 1, (within, worst)
    compile_c(model, tmp_path / "c")
    result = verify(tmp_path / "c", batches[8:])
    assert result.bit_exact, result.first_mismatch

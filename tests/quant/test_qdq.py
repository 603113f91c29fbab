"""Q/DQ placement on small graphs: what is quantized, which scales are shared, what ORT fuses."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from edgeopt import ir as eir
from edgeopt.errors import ConfigError, ModelError
from edgeopt.quant import Int8Config, PerTensor, Target, quantize
from edgeopt.quant.formats import INT8, UINT8
from edgeopt.runtime.ort import OrtSession

from .int8_models import GraphBuilder, batches, ort_op_counts, sqnr_db

SHAPE = (1, 8, 8, 8)


def _quantize(model: ir.Model, config: Int8Config = Int8Config(), shape=SHAPE):
    return quantize(model, config, batches(shape, 4))


def _nodes(model: ir.Model, op_type: str) -> list[ir.Node]:
    return [node for node in model.graph if node.op_type == op_type]


def _quantized_tensors(model: ir.Model) -> set[str]:
    return {node.inputs[0].name for node in _nodes(model, "QuantizeLinear")}


def _scale_of(model: ir.Model, tensor: str) -> ir.Value:
    return next(n for n in _nodes(model, "QuantizeLinear") if n.inputs[0].name == tensor).inputs[1]


def _initializer(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


# --------------------------------------------------------------------------
# conv nets
# --------------------------------------------------------------------------


def _conv_relu_conv() -> ir.Model:
    b = GraphBuilder(seed=0)
    b.node("Relu", [b.conv("x", 8, 16, "conv1")], "relu1")
    b.conv("relu1", 16, 8, "y")
    return b.model(["y"], SHAPE, [SHAPE])


def test_conv_relu_conv_gets_one_qdq_per_tensor_after_the_relu():
    result = _quantize(_conv_relu_conv())
    model = result.model
    assert _quantized_tensors(model) == {"x", "relu1", "y_float"}  # not conv1: its Relu is fused
    assert [o.name for o in model.graph.outputs] == ["y"]  # the output keeps its name, on the DQ
    assert ort_op_counts(model)["QLinearConv"] == 2
    assert "Conv" not in ort_op_counts(model) and "FusedConv" not in ort_op_counts(model)
    relu = result.tensor("relu1")
    assert relu.zero_point == (0,) and relu.range[0] == 0.0  # the clamp is the range: zero point = qmin
    assert sqnr_db(_conv_relu_conv(), model, batches(SHAPE, 4, seed=9)) > 30


def test_weights_are_int8_per_output_channel_and_bias_int32_at_the_product_scale():
    result = _quantize(_conv_relu_conv())
    model = result.model
    weight = _initializer(model, "conv1.weight_quantized")
    scale = _initializer(model, "conv1.weight_scale")
    assert weight.dtype == np.int8 and weight.min() >= -127 and scale.shape == (16,)
    float_weight = eir.constant_array(_conv_relu_conv().graph.initializers["conv1.weight"])
    np.testing.assert_array_equal(scale, np.abs(float_weight).max(axis=(1, 2, 3)).astype(np.float32) / np.float32(127))
    bias, bias_scale = _initializer(model, "conv1.bias_quantized"), _initializer(model, "conv1.bias_scale")
    input_scale = _initializer(model, "x_scale")
    assert bias.dtype == np.int32
    np.testing.assert_array_equal(bias_scale, input_scale * scale)
    dq = next(n for n in _nodes(model, "DequantizeLinear") if n.inputs[0].name == "conv1.weight_quantized")
    assert dq.attributes.get_int("axis") == 0
    assert "conv1.weight" not in model.graph.initializers  # the float weight is gone
    assert result.tensor("conv1.weight").scale == tuple(float(s) for s in scale)


def test_recorded_scales_and_zero_points_are_python_numbers_of_the_stored_values():
    result = _quantize(_conv_relu_conv())
    for info in result.tensors:
        assert {type(s) for s in info.scale} == {float} and {type(z) for z in info.zero_point} == {int}
    weight = result.tensor("conv1.weight")
    np.testing.assert_array_equal(weight.scale, _initializer(result.model, "conv1.weight_scale"))
    assert weight.zero_point == (0,) * 16


def test_per_tensor_weights_when_asked():
    model = _quantize(_conv_relu_conv(), Int8Config(weight_granularity=PerTensor())).model
    assert _initializer(model, "conv1.weight_scale").shape == ()
    assert ort_op_counts(model)["QLinearConv"] == 2


def test_depthwise_conv_has_one_scale_per_channel():
    b = GraphBuilder(seed=2)
    depthwise = b.conv("x", 8, 8, "dw", group=8)
    b.node("Clip", [depthwise, b.constant("low", 0.0), b.constant("high", 6.0)], "relu6")
    b.conv("relu6", 8, 4, "y", k=1)
    model = _quantize(b.model(["y"], SHAPE)).model
    assert _initializer(model, "dw.weight_scale").shape == (8,)
    assert "dw" not in _quantized_tensors(model)  # ReLU6 (Clip 0..6) fused like Relu
    assert ort_op_counts(model)["QLinearConv"] == 2


def _residual() -> ir.Model:
    b = GraphBuilder(seed=3)
    branch = b.conv(b.node("Relu", [b.conv("x", 8, 8, "conv1")], "relu1"), 8, 8, "conv2")
    b.node("Relu", [b.node("Add", ["x", branch], "add")], "y")
    return b.model(["y"], SHAPE)


def test_residual_add_becomes_qlinearadd_with_its_relu_fused():
    model = _quantize(_residual()).model
    counts = ort_op_counts(model)
    assert counts["QLinearAdd"] == 1 and counts["QLinearConv"] == 2
    assert "add" not in _quantized_tensors(model) and {"x", "conv2"} <= _quantized_tensors(model)


def _concat(second_relu: bool) -> ir.Model:
    b = GraphBuilder(seed=4)
    left = b.node("Relu", [b.conv("x", 8, 8, "left")], "left_relu")
    right = b.conv("x", 8, 8, "right")
    if second_relu:
        right = b.node("Relu", [right], "right_relu")
    b.node("Concat", [left, right], "cat", axis=1)
    b.conv("cat", 16, 4, "y", k=1)
    return b.model(["y"], SHAPE)


def test_concat_inputs_and_output_share_one_scale():
    for target in Target:
        model = _quantize(_concat(second_relu=True), Int8Config(target=target)).model
        scales = {_scale_of(model, t).name for t in ("left_relu", "right_relu", "cat")}
        assert len(scales) == 1, target
    assert ort_op_counts(_quantize(_concat(second_relu=True)).model)["QLinearConv"] == 3


def test_concat_sharing_does_not_undo_a_fused_relu_on_onnx_runtime():
    """A signed concat input would give the Relu output a zero point above qmin: ORT could
    not fold the Relu any more and would run that Conv in float. QLinearConcat requantizes,
    so for ORT the Relu output keeps its own scale; the MCU target (TFLite) shares strictly."""
    ort_model = _quantize(_concat(second_relu=False)).model
    assert _scale_of(ort_model, "left_relu").name != _scale_of(ort_model, "cat").name
    assert _scale_of(ort_model, "right").name == _scale_of(ort_model, "cat").name
    assert ort_op_counts(ort_model)["QLinearConv"] == 3
    mcu_model = _quantize(_concat(second_relu=False), Int8Config(target=Target.MCU)).model
    assert len({_scale_of(mcu_model, t).name for t in ("left_relu", "right", "cat")}) == 1


def _detector_head() -> ir.Model:
    """A detector's output: box coordinates in pixels (sigmoid * 640) beside class scores in [0, 1], concatenated
    along the channels into the model's output."""
    b = GraphBuilder(seed=6)
    features = b.node("Relu", [b.conv("x", 8, 8, "features")], "relu")
    boxes = b.node("Mul", [b.node("Sigmoid", [b.conv(features, 8, 4, "box", k=1)], "box_sigmoid"),
                           b.constant("image_size", 640.0)], "boxes")
    scores = b.node("Sigmoid", [b.conv(features, 8, 8, "cls", k=1)], "scores")
    b.node("Concat", [boxes, scores], "y", axis=1)
    return b.model(["y"], SHAPE, [(1, 12, 8, 8)])


def test_a_concat_writing_the_model_output_keeps_each_parts_scale_on_onnx_runtime():
    """One scale for boxes and scores was 640 / 255 and rounded every score to 0 or 2.5 (0 dB; ONNX Runtime's
    quantize_static does the same). For ONNX Runtime the Concat joins the parts in float, listed float; the MCU's
    output is int8, one scale."""
    model, held_out = _detector_head(), batches(SHAPE, 4, seed=9)
    result = _quantize(model)
    assert _scale_of(result.model, "boxes").name != _scale_of(result.model, "scores").name
    assert "y" not in _quantized_tensors(result.model)
    [concat] = [f for f in result.float_nodes if f.op_type == "Concat"]
    assert concat.reason.startswith("joins (or moves) the parts of a model output in float")
    expected, got = (np.concatenate([OrtSession(m).run(feed)["y"][:, 4:] for feed in held_out])
                     for m in (model, result.model))
    assert 10 * np.log10(np.sum(expected ** 2) / np.sum((expected - got) ** 2)) > 30  # measured 40.9
    assert not any(note.startswith("Concat") for note in result.notes)
    mcu = _quantize(model, Int8Config(target=Target.MCU))
    assert len({_scale_of(mcu.model, t).name for t in ("boxes", "scores", "y_float")}) == 1
    [note] = [note for note in mcu.notes if note.startswith("Concat y shares one scale")]
    assert "'scores' spans [" in note and "keeps less than one of 256 levels" in note
    assert "bring the parts to similar ranges" in note, note


def test_a_yolo_style_head_of_nested_concats_and_reshapes_keeps_each_parts_scale_on_onnx_runtime():
    """Two anchors' [boxes, scores] each concatenated, reshaped, then concatenated into the output (YOLOv5's
    Detect): the outer Concat alone in float left the inner ones one scale each (scores at 0.0 dB); the whole
    chain to the output now joins in float."""
    from onnx import numpy_helper

    b = GraphBuilder(seed=6)
    features = b.node("Relu", [b.conv("x", 8, 8, "features")], "relu")
    flat = []
    for anchor in range(2):
        boxes = b.node("Mul", [b.node("Sigmoid", [b.conv(features, 8, 4, f"box{anchor}", k=1)], f"sig{anchor}"),
                               b.constant(f"size{anchor}", 640.0)], f"boxes{anchor}")
        scores = b.node("Sigmoid", [b.conv(features, 8, 8, f"cls{anchor}", k=1)], f"scores{anchor}")
        b.initializers.append(numpy_helper.from_array(np.array([1, 12, 64], np.int64), f"shape{anchor}"))
        flat.append(b.node("Reshape", [b.node("Concat", [boxes, scores], f"cat{anchor}", axis=1), f"shape{anchor}"],
                           f"flat{anchor}"))
    b.node("Concat", flat, "y", axis=1)
    model, held_out = b.model(["y"], SHAPE, [(1, 24, 64)]), batches(SHAPE, 4, seed=9)
    result = _quantize(model)
    assert {f.node_name for f in result.float_nodes} == {"cat0", "cat1", "flat0", "flat1", "y"}
    assert _scale_of(result.model, "boxes0").name != _scale_of(result.model, "scores0").name
    expected, got = (np.concatenate([OrtSession(m).run(feed)["y"][:, 4:12] for feed in held_out])
                     for m in (model, result.model))
    assert 10 * np.log10(np.sum(expected ** 2) / np.sum((expected - got) ** 2)) > 30  # measured 41.9


def test_a_concat_part_far_narrower_than_the_scale_it_shares_is_noted():
    """Inside the network the Concat's output is one tensor with one scale: a part 78x narrower keeps about
    3 levels, and the note says so, with what to do."""
    b = GraphBuilder(seed=6)
    features = b.node("Relu", [b.conv("x", 8, 8, "features")], "relu")
    loud = b.node("Mul", [b.conv(features, 8, 4, "a", k=1), b.constant("hundred", 100.0)], "loud")
    b.node("Concat", [loud, b.conv(features, 8, 4, "quiet", k=1)], "cat", axis=1)
    b.conv("cat", 8, 4, "y", k=1)
    [note] = [note for note in _quantize(b.model(["y"], SHAPE)).notes if note.startswith("Concat")]
    assert note.startswith("Concat cat shares one scale over its parts: 'quiet' spans [") and "about 3 of 256" in note
    assert "--exclude cat" in note, note


def _conv_pool_transpose_conv(first: str = "conv") -> ir.Model:
    """first -> Relu -> MaxPool (pool) -> Transpose (t) -> Conv (y)."""
    b = GraphBuilder(seed=5)
    relu = b.node("Relu", [b.conv("x", 8, 8, first)], "relu")
    pooled = b.node("MaxPool", [relu], "pool", kernel_shape=[2, 2], strides=[2, 2])
    b.node("Transpose", [pooled], "t", perm=[0, 1, 3, 2])
    b.conv("t", 8, 4, "y")
    return b.model(["y"], SHAPE)


def test_data_movement_ops_share_their_input_scale():
    model = _quantize(_conv_pool_transpose_conv()).model
    assert len({_scale_of(model, t).name for t in ("relu", "pool", "t")}) == 1
    counts = ort_op_counts(model)
    assert counts["QLinearConv"] == 2 and "DequantizeLinear" in counts  # only at the graph output


def _split_slice_concat(opset: int = 17) -> ir.Model:
    """conv -> Split in two -> a conv on one half, a Slice of the other -> Concat -> conv: channel
    splits (ShuffleNet, torch.chunk), YOLO's Focus slices."""
    from onnx import helper, numpy_helper

    b = GraphBuilder(seed=12, opset=opset)
    b.node("Relu", [b.conv("x", 8, 8, "c1")], "relu")
    b.initializers += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
                       (("split", [4, 4]), ("starts", [0]), ("ends", [2]), ("axes", [1]))]
    b.nodes.append(helper.make_node("Split", ["relu", "split"], ["half1", "half2"], name="split", axis=1))
    b.node("Relu", [b.conv("half1", 4, 4, "c2")], "branch")
    sliced = b.node("Slice", ["half2", "starts", "ends", "axes"], "sliced")
    b.conv(b.node("Concat", ["branch", sliced], "cat", axis=1), 6, 4, "y")
    return b.model(["y"], SHAPE)


def test_split_and_slice_share_their_input_scale_and_run_on_uint8():
    # ONNX Runtime drops the Q/DQ around Split and Slice when the scales are equal; calibrated apart,
    # they ran in float between a DQ and two Qs, listed as 'no integer kernel'
    model = _split_slice_concat()
    result = _quantize(model)
    assert result.float_nodes == ()
    assert len({_scale_of(result.model, t).name for t in ("relu", "half1", "half2", "sliced")}) == 1
    counts = ort_op_counts(result.model)
    assert counts["QLinearConv"] == 3 and counts["QLinearConcat"] == 1
    assert counts["QuantizeLinear"] == 1 and counts["DequantizeLinear"] == 1  # the graph input and output
    assert sqnr_db(model, result.model, batches(SHAPE, 4)) > 30


def test_the_mcu_target_quantizes_split_and_slice_and_shares_a_constant_pad():
    # the C copies int8 blocks for Split and Slice (ShuffleNet's chunk, GhostNet's Slice), so they share
    # their input's scale there too; it pads int8 values itself, so the Pad's input and output share one
    # scale there (requantized apart, the Pad was listed float)
    from onnx import helper, numpy_helper

    mcu = _quantize(_split_slice_concat(), Int8Config(target=Target.MCU))
    assert mcu.float_nodes == ()
    assert len({_scale_of(mcu.model, t).name for t in ("relu", "half1", "half2", "sliced")}) == 1
    b = GraphBuilder(seed=13)
    b.initializers.append(numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"))
    padded = b.node("Pad", [b.node("Relu", [b.conv("x", 8, 8, "c1")], "relu"), "pads"], "pad")
    b.node("MaxPool", [padded], "y", kernel_shape=[2, 2], strides=[2, 2])
    result = _quantize(b.model(["y"], SHAPE), Int8Config(target=Target.MCU))
    assert result.float_nodes == ()
    assert _scale_of(result.model, "relu").name == _scale_of(result.model, "pad").name
    # reflect and edge padding copy int8 values too (the C mirrors or repeats them); wrap (opset 19) does not
    b.nodes[-2].attribute.append(helper.make_attribute("mode", "reflect"))
    reflected = _quantize(b.model(["y"], SHAPE), Int8Config(target=Target.MCU))
    assert reflected.float_nodes == ()
    assert _scale_of(reflected.model, "relu").name == _scale_of(reflected.model, "pad").name
    b.nodes[-2].attribute[-1].CopyFrom(helper.make_attribute("mode", "wrap"))
    wrapped = _quantize(b.model(["y"], SHAPE), Int8Config(target=Target.MCU))
    assert [(n.node_name, n.reason) for n in wrapped.float_nodes] == [
        ("pad", "wrap Pad has no integer kernel (constant, edge and reflect padding have)")]


def _spelled_hard_activations(opset: int) -> ir.Model:
    """x * clip(x + 3, 0, 6) / 6 after a conv, then an SE-style gate clip(conv + 3, 0, 6) / 6, as
    TensorFlow and hand-written modules spell them."""
    b = GraphBuilder(seed=14, opset=opset)
    three, six, low = b.constant("three", 3.0), b.constant("six", 6.0), b.constant("low", 0.0)
    conv = b.conv("x", 8, 8, "c1")
    clip = b.node("Clip", [b.node("Add", [conv, three], "add3"), low, six], "relu6")
    swish = b.node("Div", [b.node("Mul", [conv, clip], "mul"), six], "hswish")
    gate_clip = b.node("Clip", [b.node("Add", [b.conv(swish, 8, 8, "c2", k=1), three], "g_add3"), low, six],
                       "g_relu6")
    gated = b.node("Mul", [swish, b.node("Div", [gate_clip, six], "gate")], "gated")
    b.conv(gated, 8, 4, "y")
    return b.model(["y"], SHAPE)


@pytest.mark.parametrize("opset", [13, 17])
def test_spelled_hard_activations_leave_no_float_div(opset):
    # the gate's + 3 folds into its conv's bias, and its / 6 used to stay a float Div (fold-affine ate
    # the pattern's start): now the conv clamps to [0, 1]; below opset 14 hardswish is x * HardSigmoid(x).
    # Neither stays float on ONNX Runtime: each is a QLinearAdd (+ QLinearMul)
    model = _spelled_hard_activations(opset)
    ort = _quantize(model)
    assert ort.float_nodes == ()
    counts = ort_op_counts(ort.model)
    assert counts["HardSwish"] == counts["HardSigmoid"] == counts["Div"] == 0
    assert counts["QLinearAdd"] == 1 and counts["QLinearMul"] == 2  # the hardswish's gate and the SE-like Mul
    mcu = _quantize(model, Int8Config(target=Target.MCU))  # what edgeopt compile lowers: every node int8
    assert mcu.float_nodes == ()
    assert sqnr_db(model, mcu.model, batches(SHAPE, 4)) > 30


def test_a_mean_pooling_head_runs_in_integer():
    # torch's x.mean((2, 3)) is a ReduceMean, which ONNX Runtime has no integer kernel for: it ran in
    # float between the last conv and the classifier; as GlobalAveragePool it is QLinearGlobalAveragePool
    b = GraphBuilder(seed=15)
    pooled = b.node("ReduceMean", [b.node("Relu", [b.conv("x", 8, 16, "c1")], "relu")], "mean", axes=[2, 3],
                    keepdims=0)
    b.node("Gemm", [pooled, b.weight("fc.weight", (10, 16)), b.weight("fc.bias", (10,))], "y", transB=1)
    model = b.model(["y"], SHAPE)
    result = _quantize(model)
    assert result.float_nodes == ()
    counts = ort_op_counts(result.model)
    assert counts["QLinearGlobalAveragePool"] == 1 and "ReduceMean" not in counts
    assert sqnr_db(model, result.model, batches(SHAPE, 4)) > 30


# --------------------------------------------------------------------------
# Gemm and MatMul
# --------------------------------------------------------------------------


@pytest.mark.parametrize("trans_b, axis", [(1, 0), (0, 1)])
def test_gemm_weight_axis_follows_transB(trans_b, axis):
    b = GraphBuilder(seed=6)
    shape = (32, 16) if trans_b else (16, 32)
    b.node("Gemm", ["x", b.weight("fc.weight", shape), b.weight("fc.bias", (32,))], "y", transB=trans_b)
    result = _quantize(b.model(["y"], (2, 16)), shape=(2, 16))
    assert result.tensor("fc.weight").axis == axis and len(result.tensor("fc.weight").scale) == 32
    assert result.tensor("fc.bias").format == "int32"
    assert ort_op_counts(result.model)["QGemm"] == 1


def test_matmul_weight_is_per_column_and_two_activations_quantize_both():
    b = GraphBuilder(seed=7)
    projected = b.node("MatMul", ["x", b.weight("w", (16, 24))], "proj")
    b.node("MatMul", [projected, b.node("Transpose", [projected], "proj_t", perm=[0, 2, 1])], "y")
    result = _quantize(b.model(["y"], (1, 5, 16)), shape=(1, 5, 16))
    assert result.tensor("w").axis == 1 and len(result.tensor("w").scale) == 24
    assert {"x", "proj", "proj_t"} <= _quantized_tensors(result.model)
    assert ort_op_counts(result.model)["QLinearMatMul"] == 2


@pytest.mark.parametrize("shape", [(3, 16), (1, 5, 16)], ids=["rows", "sequence"])
def test_linear_exported_as_matmul_and_add_gets_an_int32_bias(shape):
    # MatMul + Add(bias) is fused into Gemm before planning: the bias is int32 at input x weight
    # scale, not a uint8 constant, and the MatMul output gets no Q/DQ of its own.
    b = GraphBuilder(seed=10)
    b.node("Add", [b.node("MatMul", ["x", b.weight("fc.weight", (16, 24))], "fc"), b.weight("fc.bias", (24,), 0.1)],
           "y")
    result = _quantize(b.model(["y"], shape), shape=shape)
    bias, weight = result.tensor("fc.bias"), result.tensor("fc.weight")
    assert bias.kind == "bias" and bias.format == "int32"
    np.testing.assert_allclose(bias.scale, np.float32(result.tensor("x").scale[0]) * np.float32(weight.scale),
                               rtol=1e-6)
    assert {t.kind for t in result.tensors} == {"activation", "weight", "bias"}
    assert "Add" not in {node.op_type for node in result.model.graph}
    assert ort_op_counts(result.model)["QGemm"] == 1
    assert sqnr_db(b.model(["y"], shape), result.model, batches(shape, 4)) > 35  # 41.4 / 39.7 (unfused 39.4 / 38.4)


def test_conv_transpose_is_per_channel_on_axis_1_only_without_groups():
    b = GraphBuilder(seed=8)
    b.node("ConvTranspose", ["x", b.weight("up.weight", (8, 4, 2, 2)), b.weight("up.bias", (4,))], "up",
           strides=[2, 2])
    b.node("ConvTranspose", ["up", b.weight("up2.weight", (4, 2, 2, 2))], "y", strides=[2, 2], group=2)
    result = _quantize(b.model(["y"], SHAPE), Int8Config(target=Target.MCU))
    assert result.tensor("up.weight").axis == 1 and len(result.tensor("up.weight").scale) == 4
    assert result.tensor("up2.weight").axis is None
    assert len(result.tensor("up.bias").scale) == 4


def test_onnx_runtime_keeps_conv_transpose_float_and_says_so():
    # ONNX Runtime has no integer ConvTranspose on the CPU: quantized, it dequantized the int8 weights
    # on every run and ran the float kernel between a DQ and a Q (slower than float, and rounded)
    b = GraphBuilder(seed=8)
    up = b.node("ConvTranspose", [b.node("Relu", [b.conv("x", 8, 8, "c1")], "r1"), b.weight("up.weight", (8, 4, 2, 2)),
                                  b.weight("up.bias", (4,))], "up", strides=[2, 2])
    b.conv(b.node("Relu", [up], "r2"), 4, 4, "y")
    model = b.model(["y"], SHAPE)
    result = _quantize(model)
    assert [(node.node_name, node.reason) for node in result.float_nodes] == [
        ("up", "no integer kernel for ConvTranspose"),
        ("r2", "Relu is quantized only fused after a Conv, Gemm, MatMul, Add or Mul (its only reader)")]
    counts = ort_op_counts(result.model)
    assert counts["QLinearConv"] == 2 and counts["ConvTranspose"] == 1
    assert "up.weight" not in {info.name for info in result.tensors}  # its weights stay float32
    assert sqnr_db(model, result.model, batches(SHAPE, 4)) > 30


# --------------------------------------------------------------------------
# what stays float, and refusals
# --------------------------------------------------------------------------


def _mixed(op: str = "Tanh", **attributes) -> ir.Model:
    b = GraphBuilder(seed=9)
    conv = b.conv("x", 8, 8, "conv")
    activation = b.node(op, [conv], op.lower(), **attributes)
    b.node("Add", [activation, b.weight("offset", (1, 8, 1, 1))], "y")
    return b.model(["y"], SHAPE)


def test_ops_without_integer_kernels_stay_float_and_are_listed():
    result = _quantize(_mixed())
    assert result.float_nodes == (("tanh", "Tanh", "no integer kernel for Tanh"),)
    assert {"conv", "tanh"} <= _quantized_tensors(result.model)  # inputs of quantized consumers
    assert ort_op_counts(result.model)["Tanh"] == 1  # ONNX Runtime runs it in float indeed
    offset = result.tensor("offset")
    assert offset.kind == "constant" and offset.format == "uint8"


def test_a_softmax_between_quantized_ops_runs_in_integer_and_is_not_listed_float():
    """ONNX Runtime fuses DQ -> Softmax -> Q into QLinearSoftmax: it was listed 'no integer kernel for
    Softmax' (every attention block's), and --exclude did not keep it float. Excluded, it reads float."""
    result = _quantize(_mixed("Softmax", axis=1))
    assert result.float_nodes == () and ort_op_counts(result.model)["QLinearSoftmax"] == 1
    excluded = quantize(_mixed("Softmax", axis=1), Int8Config(exclude=("Softmax",)), batches(SHAPE, 8))
    assert ("softmax", "Softmax", "excluded (--exclude)") in excluded.float_nodes  # with the conv feeding it
    assert ort_op_counts(excluded.model)["Softmax"] == 1 and "QLinearSoftmax" not in ort_op_counts(excluded.model)
    said = "--exclude Softmax: softmax (Softmax) now reads its input in float"
    assert any(note.startswith(said) and note.endswith("quantized for y: exclude those to keep it float")
               for note in excluded.notes)


def test_exclude_by_name_or_op_type_keeps_nodes_float():
    result = _quantize(_conv_relu_conv(), Int8Config(exclude=("y",)))
    assert ("y", "Conv", "excluded (--exclude)") in result.float_nodes
    assert "y.weight_quantized" not in result.model.graph.initializers
    by_type = _quantize(_conv_relu_conv(), Int8Config(exclude=("Conv",)))
    assert {n.node_name for n in by_type.float_nodes} == {"conv1", "y", "relu1"}
    assert not _nodes(by_type.model, "QuantizeLinear")


def test_data_movement_between_float_nodes_stays_float():
    # conv1 -> Relu -> MaxPool -> Transpose -> y, both convs excluded: no integer kernel touches the
    # MaxPool and the Transpose, so they get no Q/DQ (it would only round values) and say why
    model = _conv_pool_transpose_conv("conv1")
    result = _quantize(model, Int8Config(exclude=("Conv",)))
    assert not _nodes(result.model, "QuantizeLinear")
    reasons = {node.node_name: node.reason for node in result.float_nodes}
    assert reasons["pool"] == reasons["t"] == ("moves data between float nodes only: no integer kernel reads "
                                               "or writes it")
    # one integer neighbour through the chain is enough: y quantized, so the MaxPool and Transpose are too
    partly = _quantize(model, Int8Config(exclude=("conv1",)))
    assert {"pool", "t"} <= _quantized_tensors(partly.model)
    assert "pool" not in {n.node_name for n in partly.float_nodes}


def test_unknown_exclude_names_it_and_suggests_similar_nodes():
    with pytest.raises(ConfigError) as error:
        _quantize(_conv_relu_conv(), Int8Config(exclude=("conv_1",)))
    message = str(error.value)
    assert "'conv_1'" in message and "conv1" in message


def test_an_already_quantized_model_is_refused():
    quantized = _quantize(_conv_relu_conv()).model
    with pytest.raises(ModelError, match="already quantized"):
        _quantize(quantized)


def test_mcu_target_quantizes_activations_to_int8():
    result = _quantize(_conv_relu_conv(), Int8Config(target=Target.MCU))
    assert result.tensor("relu1").format == "int8" and result.tensor("relu1").zero_point == (-128,)
    assert _initializer(result.model, "x_zero_point").dtype == np.int8
    assert result.details["activation_format"] == INT8.name
    assert "target mcu: activations int8" in result.notes[0]
    assert _quantize(_conv_relu_conv()).details["activation_format"] == UINT8.name


def test_unary_ops_and_resize_run_in_integer():
    b = GraphBuilder(seed=10)
    sigmoid = b.node("Sigmoid", [b.conv("x", 8, 8, "c1")], "sigmoid")
    leaky = b.node("LeakyRelu", [b.conv(sigmoid, 8, 8, "c2")], "leaky", alpha=0.1)
    pooled = b.node("AveragePool", [leaky], "avg", kernel_shape=[2, 2], strides=[2, 2])
    upsampled = b.node("Resize", [pooled, "", b.constant("scales", [1, 1, 2, 2])], "up", mode="nearest")
    b.conv(upsampled, 8, 4, "y")
    result = _quantize(b.model(["y"], SHAPE))
    counts = ort_op_counts(result.model)
    for op_type in ("QLinearSigmoid", "QLinearLeakyRelu", "QLinearAveragePool"):
        assert counts[op_type] == 1, op_type
    assert counts["QLinearConv"] == 3 and counts["DequantizeLinear"] == 1  # Resize runs on uint8
    assert _scale_of(result.model, "up").name == _scale_of(result.model, "avg").name
    assert result.float_nodes == ()


@pytest.mark.parametrize("scheme", ["int8", "fp16", "bf16", "int4"])
def test_a_float64_model_is_refused_by_every_scheme(scheme):
    # every scheme converts float32 values: a float64 model came back unchanged, with exit 0
    from onnx import TensorProto, helper, numpy_helper

    from edgeopt import Bf16Config, Fp16Config, Int4WeightConfig

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 8)), "w")  # float64
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "f64",
                              [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [1, 8])], [weight])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    config = {"int8": Int8Config(), "fp16": Fp16Config(), "bf16": Bf16Config(), "int4": Int4WeightConfig()}[scheme]
    data = [{"x": np.zeros((1, 16))}]
    with pytest.raises(ModelError, match="model computes in float64.*export it in float32"):
        quantize(model, config, data if scheme == "int8" else None)


def test_a_pad_with_an_axes_input_is_quantized_and_runs():
    # opset 18's Pad(data, pads, value, axes): between Q/DQ pairs ONNX Runtime's optimizer failed on
    # it ("Gather ... idx=4 must be within [-4,3]"); the same padding over every axis runs
    from onnx import numpy_helper

    b = GraphBuilder(seed=7, opset=18)
    b.initializers += [numpy_helper.from_array(np.array([1, 2, 1, 2], np.int64), "pads"),
                       numpy_helper.from_array(np.array([2, -1], np.int64), "axes")]
    padded = b.node("Pad", [b.conv("x", 8, 8, "conv1"), "pads", "", "axes"], "pad", mode="edge")
    b.conv(padded, 8, 4, "y", k=1)
    model = b.model(["y"], SHAPE, [(1, 4, 10, 12)])
    result = _quantize(model)
    pad = _nodes(result.model, "Pad")[0]
    assert len(pad.inputs) == 3 and list(pad.inputs[1].const_value.numpy()) == [0, 0, 1, 2, 0, 0, 1, 2]
    assert sqnr_db(model, result.model, batches(SHAPE, 4, seed=1)) > 30


def test_float32_models_with_float64_constants_are_not_float64_models():
    # a float32 input, or float32 weights held in Constant nodes, make a float32 model
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((512, 16)), "table")  # float64, cast before use
    weight = helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(
        rng.standard_normal((16, 8)).astype(np.float32), "w_value"))
    nodes = [weight, helper.make_node("Cast", ["table"], ["table32"], to=TensorProto.FLOAT),
             helper.make_node("Gather", ["table32", "ids"], ["rows"], axis=0),
             helper.make_node("MatMul", ["rows", "w"], ["y"])]
    graph = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("ids", TensorProto.INT64, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], [table])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(ModelError, match="float64"):  # most weights are float64 and no input is float32
        quantize(model, Int8Config(), [{"ids": np.arange(4)}])
    graph.initializer[0].CopyFrom(numpy_helper.from_array(rng.standard_normal((4, 16)), "table"))
    small = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert quantize(small, Int8Config(), [{"ids": np.arange(4)}]).tensors


@pytest.mark.parametrize("scheme", ["int8", "fp16", "int4"])
def test_a_float64_input_cast_to_float32_before_float32_weights_is_a_float32_model(scheme):
    # a graph fed float64 (a TensorFlow placeholder, a pipeline's input) that casts it to float32 computes
    # in float32: it was refused as "model computes in float64" although every weight is float32
    from onnx import TensorProto, helper, numpy_helper

    from edgeopt import Fp16Config, Int4WeightConfig

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("w1", (16, 32)), ("w2", (32, 8)))]
    nodes = [helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("MatMul", ["x32", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "f64_in", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], weights)
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    config = {"int8": Int8Config(), "fp16": Fp16Config(), "int4": Int4WeightConfig()}[scheme]
    data = [{"x": rng.standard_normal((4, 16))} for _ in range(4)]
    result = quantize(model, config, data if scheme == "int8" else None)
    low = {"int8": "QuantizeLinear", "fp16": "Cast", "int4": "MatMulNBits"}[scheme]
    assert low in {node.op_type for node in result.model.graph}
    assert result.model.graph.inputs[0].dtype == ir.DataType.DOUBLE


def test_a_branch_of_data_movement_only_is_quantized_for_the_mcu_target():
    # x -> Conv -> y, and x -> MaxPool -> Flatten -> z: the C kernels need every output int8, so the
    # MaxPool and Flatten are quantized there (left float they made a model compile refuses)
    b = GraphBuilder(seed=8)
    b.conv("x", 8, 4, "y")
    b.node("Flatten", [b.node("MaxPool", ["x"], "pool", kernel_shape=[2, 2], strides=[2, 2])], "z")
    model = b.model(["y", "z"], SHAPE)
    mcu = _quantize(model, Int8Config(target=Target.MCU))
    assert not mcu.float_nodes and {"pool", "z"} <= _quantized_tensors(mcu.model) | {
        node.outputs[0].name for node in _nodes(mcu.model, "DequantizeLinear")}
    ort = _quantize(model)  # ONNX Runtime: a float MaxPool of a float input needs no Q/DQ
    assert {node.node_name for node in ort.float_nodes} == {"pool", "z"}


def test_long_chains_of_data_movement_are_planned_without_recursion():
    # 1,500 Transposes between a Softmax over 300 values and a MatMul (the wide-Softmax note and the
    # isolated-mover check walk the chain)
    from onnx import numpy_helper

    b = GraphBuilder(seed=9)
    x = b.node("Softmax", ["x"], "softmax", axis=-1)
    for index in range(1500):
        x = b.node("Transpose", [x], f"t{index}", perm=[0, 2, 1])
    b.initializers.append(numpy_helper.from_array(np.ones((300, 4), np.float32), "w"))
    b.node("MatMul", [x, "w"], "y")
    result = quantize(b.model(["y"], (1, 300, 300)), Int8Config(), batches((1, 300, 300), 1))
    assert any(note.startswith("Softmax softmax normalizes over 300 values") for note in result.notes)


def _causal_attention(mask_value: float) -> ir.Model:
    """One head of causal self-attention over 8 tokens: softmax(q k^T / 4 + mask) v, mask above the diagonal."""
    b = GraphBuilder(seed=5)
    q, k, v = (b.node("MatMul", ["x", b.weight(f"w{n}", (16, 16))], n) for n in "qkv")
    scores = b.node("Mul", [b.node("MatMul", [q, b.node("Transpose", [k], "kt", perm=[0, 2, 1])], "qk"),
                            b.constant("quarter", 0.25)], "scaled")
    mask = np.triu(np.full((8, 8), mask_value, np.float32), 1)
    probabilities = b.node("Softmax", [b.node("Add", [scores, b.constant("mask", mask)], "masked")], "softmax",
                           axis=-1)
    b.node("MatMul", [b.node("MatMul", [probabilities, v], "attended"), b.weight("wo", (16, 16))], "y")
    return b.model(["y"], [1, 8, 16])


@pytest.mark.parametrize("target", [Target.ORT, Target.MCU])
@pytest.mark.parametrize("mask_value", [-np.inf, -1e4, float(np.finfo(np.float32).min)])
def test_an_attention_mask_stays_float(target, mask_value):
    """-inf has no 8-bit code: quantized, the masked scores clamped to the range's low end and Softmax gave
    future tokens weight (1.5 dB on both targets); BERT's -10000 and the float32 minimum stretched the range
    over the mask, rounding the scores (4.7 dB). The Add applying the mask and, on the MCU, the Softmax
    reading its output stay float, saying why; the model is as faithful as without a mask (24 dB)."""
    data = batches((1, 8, 16), 8, seed=2)
    result = _quantize(_causal_attention(mask_value), Int8Config(target=target), shape=(1, 8, 16))
    float_nodes = {node.node_name: node.reason for node in result.float_nodes}
    floor = "-100" if target is Target.ORT else "-10000"  # ONNX Runtime takes Swin's -100 for a mask too
    assert f"'mask' holds -inf, NaN or values <= {floor} (" in float_nodes["masked"]
    assert sqnr_db(_causal_attention(mask_value), result.model, data) > 20


def test_swins_minus_100_mask_stays_float_on_onnx_runtime_and_is_quantized_for_the_microcontroller():
    """Swin's shifted-window mask is -100, not -10000: quantized with the scores it stretched their range
    (21.9 dB here; a Swin's masked Softmax at 20 dB, 38 dB with the Add float). ONNX Runtime runs the Add
    in float at no cost; the microcontroller's C has no float node, so there it stays quantized (the model
    compiles)."""
    data = batches((1, 8, 16), 8, seed=2)
    ort = _quantize(_causal_attention(-100.0), Int8Config(), shape=(1, 8, 16))
    reasons = {node.node_name: node.reason for node in ort.float_nodes}
    assert "'mask' holds -inf, NaN or values <= -100 (an attention mask?)" in reasons["masked"]
    assert sqnr_db(_causal_attention(-100.0), ort.model, data) > 24.0
    mcu = _quantize(_causal_attention(-100.0), Int8Config(target=Target.MCU), shape=(1, 8, 16))
    assert not mcu.float_nodes


@pytest.mark.parametrize("target", [Target.ORT, Target.MCU])
def test_an_output_listed_twice_keeps_its_name_in_both_places(target):
    """ONNX lets a graph list one tensor twice as an output (ONNX Runtime returns it twice); the second
    place kept the float value, renamed 'y_float', so the quantized model's interface changed."""
    b = GraphBuilder(seed=3)
    b.conv(b.node("Relu", [b.conv("x", SHAPE[1], 8, "c1")], "r1"), 8, 4, "y")
    result = _quantize(b.model(["y", "y"], SHAPE), Int8Config(target=target))
    outputs = result.model.graph.outputs
    assert [value.name for value in outputs] == ["y", "y"] and outputs[0] is outputs[1]
    assert outputs[0].producer().op_type == "DequantizeLinear"


def test_a_large_negative_constant_that_reaches_no_softmax_is_no_mask():
    """Only on its way to a Softmax is a value <= -10000 a mask: an input offset (x - 20000 for a raw
    sensor reading) is quantized like any constant operand, and the layers after it too."""
    b = GraphBuilder(seed=4)
    b.conv(b.node("Relu", [b.conv(b.node("Add", ["x", b.constant("offset", -20000.0)], "centered"), 8, 8, "c1")],
                  "r1"), 8, 4, "y")
    data = [{"x": batch["x"] + 20000} for batch in batches(SHAPE, 4)]
    result = quantize(b.model(["y"], SHAPE), Int8Config(), data)
    assert not result.float_nodes


def test_ops_of_onnx_runtimes_optimizer_stay_float_saying_to_quantize_the_exported_model(tmp_path):
    # a model saved by ONNX Runtime after its optimizations (optimized_model_filepath): its convs are FusedConv or
    # com.microsoft.nchwc Conv, listed float as "no integer kernel for Conv", which says nothing of what to do
    import onnxruntime as ort

    b = GraphBuilder(seed=11)
    b.conv(b.node("Relu", [b.conv("x", 8, 8, "c1")], "relu"), 8, 4, "y")
    source = tmp_path / "model.onnx"
    source.write_bytes(ir.to_proto(b.model(["y"], SHAPE)).SerializeToString())
    reasons = {}
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level, options.optimized_model_filepath = level, str(tmp_path / "opt.onnx")
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        result = quantize(ir.load(tmp_path / "opt.onnx"), Int8Config(), batches(SHAPE, 4))
        reasons.update({node.op_type: node.reason for node in result.float_nodes})
    assert "FusedConv" in reasons  # (and at ORT_ENABLE_ALL, on a CPU with AVX2, com.microsoft.nchwc's Conv)
    assert all(reason.endswith("quantize the model as exported instead") for reason in reasons.values()), reasons


def test_an_if_says_the_convs_of_its_branches_stay_float_with_it():
    # torch.jit.script's `if x.mean() > 0: relu(conv_a(x)) else: relu(conv_b(x))`: the If was listed float as "no
    # integer kernel for If", saying nothing of the two convs in its branches, which int8 leaves float too
    from onnx import TensorProto, helper

    b = GraphBuilder(seed=12)
    branches = {}
    for side in ("then", "else"):
        node_count = len(b.nodes)
        b.conv("x", 8, 8, f"{side}_conv")
        branches[side] = helper.make_graph(b.nodes[node_count:], side, [], [
            helper.make_tensor_value_info(f"{side}_conv", TensorProto.FLOAT, [1, 8, 8, 8])])
        del b.nodes[node_count:]  # the branch reads the main graph's weights
    b.node("ReduceMean", ["x"], "mean", keepdims=0)
    b.node("Greater", ["mean", b.constant("zero", 0.0)], "positive")
    b.node("If", ["positive"], "branch", then_branch=branches["then"], else_branch=branches["else"])
    b.conv("branch", 8, 4, "y")
    result = _quantize(b.model(["y"], SHAPE))
    reasons = {node.node_name: node.reason for node in result.float_nodes}
    assert reasons["branch"].startswith("control flow: int8 quantizes the main graph, so the 2 Conv/Gemm/MatMul")
    assert _nodes(result.model, "QuantizeLinear")  # the main graph's convs are int8


def test_an_exclude_naming_a_node_of_a_scan_body_says_int8_leaves_it_float_anyway():
    # it was "--exclude 'b_mm1' is neither a node name nor an op type of the model": it is one, in the Scan's body
    from tests.control_flow_models import scan_rnn, scan_rnn_data

    model = ir.from_proto(scan_rnn())
    with pytest.raises(ConfigError, match="'b_mm1' is neither .* of the model's main graph: it is inside an If branch "
                                          "or a Loop/Scan body, which this scheme leaves float anyway: drop it"):
        quantize(model, Int8Config(exclude=("b_mm1",)), scan_rnn_data(2))
    with pytest.raises(ConfigError, match="'b_mm9' is neither a node name nor an op type of the model; its op types"):
        quantize(model, Int8Config(exclude=("b_mm9",)), scan_rnn_data(2))


@pytest.mark.parametrize("per_group, slow", [(1, False), (2, True), (4, True), (8, False)])
def test_a_grouped_conv_with_2_to_4_channels_per_group_stays_float_for_ort_only(per_group, slow):
    # ONNX Runtime's int8 QLinearConv runs ResNeXt's groups of 4 channels slower than its float Conv (a small
    # ResNeXt at 128x128: 1.44 ms int8 against 0.76 ms float; 0.91 ms with those convs float). Kept float, the
    # conv reads its input before the Q/DQ pair (between them ONNX Runtime would quantize its weights and fuse
    # it into QLinearConv again); depthwise convs, groups of 8 and the MCU's kernels stay int8
    channels = 16
    b = GraphBuilder(seed=21)
    relu = b.node("Relu", [b.conv("x", 8, channels, "c1", k=1)], "relu1")
    grouped = b.node("Relu", [b.conv(relu, channels, channels, "grouped", group=channels // per_group)], "relu2")
    b.conv(grouped, channels, 8, "y", k=1)
    model = b.model(["y"], SHAPE)
    result = _quantize(model)
    reasons = {node.node_name: node.reason for node in result.float_nodes}
    assert ("grouped" in reasons) == slow
    if slow:
        assert reasons["grouped"].startswith(f"a grouped Conv with {per_group} input channels per group")
        assert ort_op_counts(result.model)["QLinearConv"] == 1  # the last 1x1; c1 is computed in float for it
        assert sqnr_db(model, result.model, batches(SHAPE, 4, seed=5)) > 30
    else:
        assert ort_op_counts(result.model)["QLinearConv"] == 3
    assert _quantize(model, Int8Config(target=Target.MCU)).float_nodes == ()


def _dense_concats() -> ir.Model:
    """DenseNet's pattern: each layer reads ``Concat(features so far)``; the first Concat holds the block input
    alone (range [0, ~2]), a later feature is 8 times wider."""
    b = GraphBuilder(seed=22)
    stem = b.node("Relu", [b.conv("x", 8, 8, "stem")], "stem_relu")
    first = b.node("Concat", [stem], "cat0", axis=1)
    wide = b.node("Mul", [b.conv(first, 8, 8, "c1"), b.constant("eight", 8.0)], "wide")
    both = b.node("Concat", [stem, wide], "cat1", axis=1)
    b.conv(b.node("Add", [b.conv(first, 8, 16, "c2", k=1), b.conv(both, 16, 16, "c3", k=1)], "sum"), 16, 8, "y")
    return b.model(["y"], SHAPE)


def test_a_concat_of_a_narrow_block_input_keeps_its_own_scale_for_ort():
    # Concats sharing inputs join into one scale, the widest Concat's; the first one (the block input alone)
    # then rounded the input at 4x its step (a small trained DenseNet: 27.7 dB -> 33.2 dB, ORT's MinMax 33.0).
    # The MCU's Concat kernel copies int8 values: there they still share one scale
    model = _dense_concats()
    ort = _quantize(model)
    assert _scale_of(ort.model, "cat0").name != _scale_of(ort.model, "cat1").name
    step = {t.name: t.scale[0] for t in ort.tensors}
    assert step["cat0"] == step["stem_relu"] < 0.5 * step["cat1"]
    assert sqnr_db(model, ort.model, batches(SHAPE, 8, seed=6)) > 25  # 18.6 dB under one scale
    mcu = _quantize(model, Int8Config(target=Target.MCU))
    mcu_step = {t.name: t.scale[0] for t in mcu.tensors}
    assert mcu_step["stem_relu"] == mcu_step["cat0"] == mcu_step["cat1"]

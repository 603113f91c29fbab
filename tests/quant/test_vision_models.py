"""Detection, segmentation and super-resolution models (``tests/vision_models.py``) quantize to int8 that holds
on the image sizes they run at, not only the size they were calibrated at."""

from __future__ import annotations

import numpy as np

from edgeopt.io import load_model
from edgeopt.passes import optimize_for_quantization
from edgeopt.quant import Int8Config, Target, quantize
from edgeopt.quant.masks import GRID_REASON
from edgeopt.runtime.ort import OrtSession, optimized_model
from tests.passes._helpers import assert_same_outputs
from tests.vision_models import build_vision, vision_inputs


def _sqnr_db(expected: np.ndarray, got: np.ndarray) -> float:
    expected = expected.astype(np.float64)
    return float(10.0 * np.log10(np.sum(expected ** 2) / np.sum((expected - got) ** 2)))


def test_a_detectors_box_centres_hold_on_images_larger_than_the_calibration_images(tmp_path):
    """YOLO decodes box centres in the graph: ``(sigmoid(p) * 2 - 0.5 + grid) * stride``, the grid a Range
    over the feature map's run-time width and height. Calibrated on 64x64 images, the grid and the centres
    were quantized to the ranges seen there (a grid of 0..1 at stride 32): on 128x128 images they clipped,
    centres off by up to 64 pixels (8 dB). They stay float; the convs and the scores are int8."""
    float_model = load_model(build_vision("yolo", tmp_path, 17), require_static=False)
    result = quantize(float_model, Int8Config(), vision_inputs("yolo", 16, seed=0))
    assert any(node.reason == GRID_REASON for node in result.float_nodes)
    want, have = OrtSession(float_model), OrtSession(result.model)
    for feed in vision_inputs("yolo", 2, seed=1, size=(128, 128)):
        expected, got = want.run(feed)["output"], have.run(feed)["output"]
        assert _sqnr_db(expected[:, :2], got[:, :2]) > 40.0  # box centres, in pixels
        assert _sqnr_db(expected[:, 4:], got[:, 4:]) > 40.0  # objectness and class scores


def _shapes_of_dequantized(graph) -> list[str]:
    return [node.name for node in graph if node.op_type == "Shape" and node.inputs[0].producer() is not None
            and node.inputs[0].producer().op_type == "DequantizeLinear"]


def test_a_shape_of_a_quantized_activation_reads_the_int8_tensor(tmp_path):
    """DeepLab resizes to sizes taken from the feature maps' Shape at run time. Each Shape read the
    DequantizeLinear of a quantized activation, which ONNX Runtime then kept (a float copy of the whole
    tensor, for its shape alone): 10 DequantizeLinear nodes ran, 1.72x faster than float at 256x256. A Shape
    reads the QuantizeLinear's int8 output, of the same shape: 3 DequantizeLinear nodes, 1.86x."""
    float_model = load_model(build_vision("deeplab", tmp_path, 17), require_static=False)
    result = quantize(float_model, Int8Config(), vision_inputs("deeplab", 16, seed=0))
    assert _shapes_of_dequantized(result.model.graph) == []
    assert _shapes_of_dequantized(optimized_model(result.model).graph) == []
    want, have = OrtSession(float_model), OrtSession(result.model)
    for feed in vision_inputs("deeplab", 2, seed=1, size=(48, 40)):
        assert _sqnr_db(want.run(feed)["output"], have.run(feed)["output"]) > 40.0


def test_a_batchnorm_after_an_add_is_an_int8_mul_and_add_on_the_microcontroller(tmp_path):
    """tf2onnx writes a BatchNormalization after a residual Add: there is no Conv to fold it into, and the
    C kernels have none, so the microcontroller model kept it (and the Relu after it) float and could not
    be compiled; the notes said it stayed as exported. For the microcontroller it becomes a Mul and an Add
    by per-channel constants (the Relu fuses into the Add); ONNX Runtime keeps it float (two int8 roundings
    cost 1.5 dB there)."""
    float_model = load_model(build_vision("tf_detector", tmp_path, 13))
    calibration = vision_inputs("tf_detector", 16, seed=0)
    mcu = quantize(float_model, Int8Config(target=Target.MCU), calibration)
    assert mcu.float_nodes == ()
    assert "BatchNormalization" not in [node.op_type for node in mcu.model.graph]
    assert not [note for note in mcu.notes if "fold-batchnorm" in note]
    want, have = OrtSession(float_model), OrtSession(mcu.model)
    for feed in vision_inputs("tf_detector", 2, seed=1):
        expected, got = want.run(feed), have.run(feed)
        assert _sqnr_db(expected["seg"], got["seg"]) > 28.0 and _sqnr_db(expected["scores"], got["scores"]) > 35.0
    ort = quantize(float_model, Int8Config(), calibration)
    assert "BatchNormalization" in [node.op_type for node in ort.float_nodes]


def test_the_microcontrollers_batchnorm_rewrite_keeps_the_float_outputs(tmp_path):
    model = load_model(build_vision("tf_detector", tmp_path, 21))
    result = optimize_for_quantization(model, integer_only=True)
    assert "BatchNormalization" not in [node.op_type for node in result.model.graph]
    assert_same_outputs(model, result.model)


def test_coordinates_normalized_by_the_run_time_size_are_quantized_with_the_features(tmp_path):
    """CoordConv divides its Range by the feature map's size: the coordinates stay in [-1, 1] whatever the
    image, so the Conv reading them with the features stays int8 (only the Range arithmetic is float)."""
    float_model = load_model(build_vision("coordconv", tmp_path, 17), require_static=False)
    result = quantize(float_model, Int8Config(), vision_inputs("coordconv", 16, seed=0))
    assert "Conv" not in [node.op_type for node in result.float_nodes]
    want, have = OrtSession(float_model), OrtSession(result.model)
    for feed in vision_inputs("coordconv", 2, seed=1, size=(32, 24)):
        assert _sqnr_db(want.run(feed)["output"], have.run(feed)["output"]) > 30.0


def _length_masked_model():
    """``h = (x @ w1) * (arange(T) < lengths)``, ``y = reshape(h @ w2 + h, [-1, T, 8])``: a speech or text
    model's padding mask, its positions compared with each sample's length; T also reshapes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    constants = [numpy_helper.from_array(array, name) for name, array in (
        ("w1", rng.standard_normal((8, 8)).astype(np.float32)), ("w2", rng.standard_normal((8, 8)).astype(np.float32)),
        ("one", np.array([1], np.int64)), ("zero", np.array(0, np.int64)), ("step", np.array(1, np.int64)),
        ("minus_one", np.array([-1], np.int64)), ("eight", np.array([8], np.int64)),
        ("axis0", np.array([0], np.int64)), ("axis1", np.array([1], np.int64)), ("axis2", np.array([2], np.int64)))]
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Gather", ["shape", "step"], ["time"]),
             helper.make_node("Range", ["zero", "time", "step"], ["t"]),
             helper.make_node("Unsqueeze", ["t", "axis0"], ["t_row"]),
             helper.make_node("Unsqueeze", ["lengths", "axis1"], ["length_column"]),
             helper.make_node("Less", ["t_row", "length_column"], ["valid"]),
             helper.make_node("Cast", ["valid"], ["valid_float"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["valid_float", "axis2"], ["mask"]),
             helper.make_node("MatMul", ["x", "w1"], ["h0"], name="first"),
             helper.make_node("Mul", ["h0", "mask"], ["h"], name="masked"),
             helper.make_node("MatMul", ["h", "w2"], ["h1"], name="second"),
             helper.make_node("Add", ["h1", "h"], ["h2"], name="residual"),
             helper.make_node("Shape", ["t"], ["t_shape"]),
             helper.make_node("Concat", ["minus_one", "t_shape", "eight"], ["new_shape"], axis=0),
             helper.make_node("Reshape", ["h2", "new_shape"], ["y"], name="reshape")]
    graph = helper.make_graph(nodes, "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 8]),
                                                helper.make_tensor_value_info("lengths", TensorProto.INT64, ["N"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", 8])], constants)
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_length_mask_and_a_shape_from_positions_are_no_grid(tmp_path):
    """Positions compared with the lengths make a mask of 0 and 1, not positions: the rule for a detector's
    grid took the masked activations, and everything an Add or Mul carried them into, for positions
    (both MatMuls and the residual Add kept float, 'computes positions from the input's size'); so did
    a Reshape whose shape holds T."""
    import onnx

    from edgeopt import ir as eir

    path = tmp_path / "masked.onnx"
    onnx.save(_length_masked_model(), path)
    model = load_model(path, require_static=False)
    assert {value.name for value in eir.run_time_grid_values(model.graph)} == set()
    rng = np.random.default_rng(1)
    data = [{"x": rng.standard_normal((1, frames, 8)).astype(np.float32), "lengths": np.array([frames - 3])}
            for frames in (20, 30, 40, 50)]
    result = quantize(model, Int8Config(), data)
    assert not any(node.reason == GRID_REASON for node in result.float_nodes)
    assert not {"first", "masked", "second", "residual"} & {node.node_name for node in result.float_nodes}

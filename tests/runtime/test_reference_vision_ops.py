"""PRelu, DepthToSpace/SpaceToDepth and linear Resize in the reference interpreter, against ONNX Runtime.

ONNX Runtime computes each of these ops in float between its DequantizeLinear and QuantizeLinear; the
reference is within one step of that everywhere, bit-exact for the data movement, and within the error
its docstring states (:mod:`edgeopt.runtime.reference.vision_ops`) of the op's float result itself.
"""

from __future__ import annotations

import numpy as np
import pytest

import qdq_models as q
from edgeopt.errors import UnsupportedOpError
from edgeopt.runtime.ort import OrtSession
from edgeopt.runtime.reference import ReferenceModel
from qdq_op_models import float_twin, op_model, random_feeds

ROUNDINGS = ["double", "single"]


def _steps_from_float(model, feeds, rounding) -> float:
    """The largest distance, in output steps, of the reference from the op computed in float by ONNX Runtime
    (clamped to the output's int8 range)."""
    reference, session = ReferenceModel(model, rounding=rounding), OrtSession(float_twin(model))
    info = reference.output_info("output")
    low, high = (-128 - info.zero_point) * info.scale, (127 - info.zero_point) * info.scale
    return max(float(np.abs(reference.run_float(feed)["output"] - np.clip(session.run(feed)["output"], low, high))
                     .max()) / info.scale for feed in feeds)


def _agreement(model, feeds, rounding):
    return q.agreement(ReferenceModel(model, rounding=rounding), OrtSession(model), feeds)


# -- PRelu ------------------------------------------------------------------------------------------------

_SLOPES = np.array([0.25, -0.5, 0.0, 1.5, 0.01, 0.3], np.float32)


@pytest.mark.parametrize("rounding, bound", [("single", 0.5), ("double", 0.75)])
@pytest.mark.parametrize("shape, slope", [((1, 6, 5, 7), _SLOPES.reshape(6, 1, 1)),  # per channel, NCHW
                                          ((1, 3, 4, 6), _SLOPES),  # along W
                                          ((4, 6), _SLOPES)])  # per feature of a matrix
def test_prelu_with_a_slope_per_channel_is_within_a_rounding_of_float(shape, slope, rounding, bound):
    # single rounding: one rounding of the exact product; double (TFLite's): the high multiply first rounds to
    # 2**shift of a step, a quarter step at most (a slope multiplier in [0.25, 0.5))
    model = op_model("PRelu", shape, shape, inputs=["slope"], constants={"slope": slope},
                     output_quantization=(0.025, -3))
    assert {op.kind for op in ReferenceModel(model).program.ops} >= {"prelu"}
    feeds = random_feeds(shape, 3)
    within, _, worst = _agreement(model, feeds, rounding)
    assert within == 1.0 and worst <= 1
    assert _steps_from_float(model, feeds, rounding) <= bound + 1e-6


def test_prelu_with_one_slope_is_a_lookup_table_as_exact_as_ort():
    shape = (1, 4, 6, 6)
    model = op_model("PRelu", shape, shape, inputs=["slope"], constants={"slope": np.float32([0.2])},
                     output_quantization=(0.02, -40))
    assert [op.kind for op in ReferenceModel(model).program.ops] == ["lut"]
    within, exact, worst = _agreement(model, random_feeds(shape, 2), "double")
    assert within == 1.0 and exact >= 0.999, (exact, worst)


def test_prelu_with_a_slope_computed_at_run_time_is_refused():
    with pytest.raises(UnsupportedOpError, match=r"PRelu \(the_prelu\): its slope must be a constant"):
        ReferenceModel(op_model("PRelu", (1, 2, 3, 3), (1, 2, 3, 3), inputs=["x"]))


# -- DepthToSpace / SpaceToDepth -----------------------------------------------------------------------------


@pytest.mark.parametrize("op, mode, block, in_shape, out_shape", [
    ("DepthToSpace", "DCR", 2, (1, 8, 3, 5), (1, 2, 6, 10)),
    ("DepthToSpace", "CRD", 2, (2, 12, 4, 3), (2, 3, 8, 6)),
    ("DepthToSpace", "DCR", 3, (1, 18, 2, 3), (1, 2, 6, 9)),
    ("DepthToSpace", "CRD", 3, (1, 9, 3, 2), (1, 1, 9, 6)),
    ("SpaceToDepth", None, 2, (1, 3, 6, 4), (1, 12, 3, 2)),
    ("SpaceToDepth", None, 3, (1, 2, 6, 9), (1, 18, 2, 3))])
def test_depth_to_space_and_back_move_int8_values_exactly(op, mode, block, in_shape, out_shape):
    attributes = {"blocksize": block} | ({"mode": mode} if mode else {})
    model = op_model(op, in_shape, out_shape, **attributes)
    _, exact, _ = _agreement(model, random_feeds(in_shape, 2), "double")
    assert exact == 1.0


# -- Resize, mode linear ---------------------------------------------------------------------------------------

_TRANSFORMS = ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"]


def _resize(in_shape, out_shape, transform, *, scales=None, **attributes):
    if scales is not None:
        inputs, constants = ["", "scales"], {"scales": np.float32(scales)}
    else:
        inputs, constants = ["", "", "sizes"], {"sizes": np.int64(out_shape)}
    return op_model("Resize", in_shape, out_shape, inputs=inputs, constants=constants, mode="linear",
                    coordinate_transformation_mode=transform, **attributes)


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("transform", _TRANSFORMS)
@pytest.mark.parametrize("in_shape, out_shape, scales", [((1, 3, 8, 8), (1, 3, 16, 16), (1, 1, 2, 2)),  # x2
                                                         ((1, 2, 16, 12), (1, 2, 24, 18), None),  # x1.5, sizes
                                                         ((1, 2, 7, 9), (1, 2, 5, 13), None)])  # shrink H
def test_bilinear_resize_is_within_one_step_of_ort(in_shape, out_shape, scales, transform, rounding):
    model = _resize(in_shape, out_shape, transform, scales=scales)
    feeds = random_feeds(in_shape, 2)
    within, _, worst = _agreement(model, feeds, rounding)
    assert within == 1.0 and worst <= 1
    assert _steps_from_float(model, feeds, rounding) <= 0.75  # Q10 weights: 0.5 + 2 * 255 / 2048


def test_antialias_changes_nothing_when_the_resize_enlarges():
    model = _resize((1, 2, 16, 12), (1, 2, 24, 18), "half_pixel", antialias=1)
    feeds = random_feeds((1, 2, 16, 12), 2)
    within, _, worst = _agreement(model, feeds, "double")
    assert within == 1.0 and worst <= 1
    assert _steps_from_float(model, feeds, "double") <= 0.75


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_scales_given_for_the_axes_attribute_of_opset_18(mode):
    """Scales for H and W only, with ``axes=[2, 3]`` (the nearest path read scales[2] of a 2-element array)."""
    model = op_model("Resize", (1, 2, 4, 5), (1, 2, 8, 10), inputs=["", "scales"],
                     constants={"scales": np.float32([2, 2])}, opset=18, mode=mode, axes=[2, 3])
    within, _, worst = _agreement(model, random_feeds((1, 2, 4, 5), 2), "double")
    assert within == 1.0 and worst <= 1


def test_resize_10_interpolates_from_the_asymmetric_coordinate():
    model = op_model("Resize", (1, 2, 4, 4), (1, 2, 8, 12), inputs=["scales"],
                     constants={"scales": np.float32([1, 1, 2, 3])}, opset=10, mode="linear")
    feeds = random_feeds((1, 2, 4, 4), 2)
    within, _, worst = _agreement(model, feeds, "double")
    assert within == 1.0 and worst <= 1
    assert _steps_from_float(model, feeds, "double") <= 0.75


@pytest.mark.parametrize("attributes, message", [
    (dict(mode="cubic"), r"Resize mode=cubic is not supported"),
    (dict(mode="linear", antialias=1), r"antialias=1 that shrinks is not supported"),
    (dict(mode="linear", coordinate_transformation_mode="tf_crop_and_resize"),
     r"Resize \(the_resize\): Resize coordinate_transformation_mode=tf_crop_and_resize")])
def test_resizes_without_an_integer_kernel_are_refused(attributes, message):
    model = op_model("Resize", (1, 2, 8, 8), (1, 2, 4, 4), inputs=["", "", "sizes"],
                     constants={"sizes": np.int64([1, 2, 4, 4])}, **attributes)
    with pytest.raises(UnsupportedOpError, match=message):
        ReferenceModel(model)

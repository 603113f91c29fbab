"""The numpy spec of int8 arithmetic: properties, known values, and agreement with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from edgeopt.quant.formats import FORMATS, INT8, INT8_SYMMETRIC, INT32, UINT8
from edgeopt.quant.primitives import (
    choose_qparams,
    dequantize,
    multiply_by_quantized_multiplier,
    quantize,
    quantize_bias,
    quantize_multiplier,
    quantize_per_channel,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)
from edgeopt.runtime.ort import OrtSession

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
finite = st.floats(-1e4, 1e4, allow_nan=False, allow_subnormal=False, width=32)
ranges = st.tuples(finite, finite).map(sorted)
activation_formats = st.sampled_from([UINT8, INT8])
int32s = st.integers(INT32_MIN, INT32_MAX)


# --------------------------------------------------------------------------
# the formats table
# --------------------------------------------------------------------------


def test_formats_table_holds_the_contract_ranges():
    assert (INT8_SYMMETRIC.qmin, INT8_SYMMETRIC.qmax, INT8_SYMMETRIC.symmetric) == (-127, 127, True)
    assert (INT8.qmin, INT8.qmax, INT8.symmetric) == (-128, 127, False)
    assert (UINT8.qmin, UINT8.qmax) == (0, 255)
    assert INT32.numpy_dtype == np.int32 and INT32.symmetric
    for fmt in FORMATS.values():
        if fmt.is_integer:
            info = np.iinfo(fmt.numpy_dtype)
            assert info.min <= fmt.qmin < fmt.qmax <= info.max, fmt.name
        assert isinstance(fmt.onnx_type, ir.DataType)


# --------------------------------------------------------------------------
# affine parameters, quantize, dequantize
# --------------------------------------------------------------------------


@given(ranges, activation_formats)
def test_zero_is_exactly_representable(bounds, fmt):
    scale, zero_point = choose_qparams(*bounds, fmt)
    assert fmt.qmin <= zero_point <= fmt.qmax
    assert dequantize(quantize(np.float32(0.0), scale, zero_point, fmt), scale, zero_point) == 0.0


@given(ranges, activation_formats, st.floats(0, 1))
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(bounds, fmt, position):
    low, high = min(bounds[0], 0.0), max(bounds[1], 0.0)
    scale, zero_point = choose_qparams(low, high, fmt)
    x = np.float32(low + position * (high - low))
    error = abs(float(dequantize(quantize(x, scale, zero_point, fmt), scale, zero_point)) - float(x))
    # half a step, plus the zero point's rounding (<= half a step) at the range ends
    assert error <= float(scale) * (1.0 + 1e-3) + 1e-6


@given(ranges)
def test_symmetric_scale_is_absmax_over_qmax_with_zero_point_0(bounds):
    scale, zero_point = choose_qparams(*bounds, INT8_SYMMETRIC)
    absmax = max(abs(bounds[0]), abs(bounds[1]))
    expected = np.float32(absmax / 127)
    if expected < np.finfo(np.float32).tiny:  # an empty range (or a denormal scale) gets scale 1
        expected = np.float32(1.0)
    assert zero_point == 0 and scale == expected


def test_asymmetric_parameters_by_hand():
    scale, zero_point = choose_qparams(-1.0, 3.0, UINT8)
    assert scale == np.float32(4.0 / 255) and zero_point == 64  # round(0 - (-1) / (4/255)) = round(63.75)
    scale, zero_point = choose_qparams(0.5, 2.0, INT8)  # widened to [0, 2]
    assert scale == np.float32(2.0 / 255) and zero_point == -128
    scale, zero_point = choose_qparams(0.0, 0.0, UINT8)
    assert scale == 1.0 and zero_point == 0


def test_quantize_rounds_half_to_even_and_saturates():
    q = quantize(np.array([0.5, 1.5, 2.5, -0.5, -2.5, 1e9, -1e9, np.inf], np.float32), 1.0, 0, INT8)
    np.testing.assert_array_equal(q, [0, 2, 2, 0, -2, 127, -128, 127])
    assert q.dtype == np.int8


def test_per_channel_quantize_uses_one_scale_per_slice():
    weights = np.array([[1.0, -2.0], [0.5, 0.25]], np.float32)
    q, scale, zero_point = quantize_per_channel(weights, axis=0)
    np.testing.assert_array_equal(scale, np.float32([2.0 / 127, 0.5 / 127]))
    np.testing.assert_array_equal(q, [[64, -127], [127, 64]])
    assert (zero_point == 0).all() and q.dtype == np.int8
    q, scale, _ = quantize_per_channel(weights, axis=None)
    assert scale.shape == () and q[0, 1] == -127


@given(st.lists(finite, min_size=4, max_size=4), st.floats(1e-3, 10), st.lists(st.floats(1e-4, 1), min_size=2,
                                                                               max_size=2))
def test_bias_scale_is_the_float32_product_and_zero_point_0(bias, input_scale, weight_scales):
    q, scale = quantize_bias(np.array(bias, np.float32).reshape(2, 2)[:, 0], input_scale, weight_scales)
    expected = np.float32(input_scale) * np.array(weight_scales, np.float32)
    np.testing.assert_array_equal(scale, expected)
    assert q.dtype == np.int32


def _run_single_op(op_type: str, x: np.ndarray, scale, zero_point, axis: int | None) -> np.ndarray:
    attributes = {"axis": axis} if axis is not None else {}
    node = helper.make_node(op_type, ["x", "scale", "zero_point"], ["y"], **attributes)
    out_type = TensorProto.FLOAT if op_type == "DequantizeLinear" else helper.np_dtype_to_tensor_dtype(
        np.asarray(zero_point).dtype)
    graph = helper.make_graph(
        [node], "one", [helper.make_tensor_value_info("x", helper.np_dtype_to_tensor_dtype(x.dtype), x.shape)],
        [helper.make_tensor_value_info("y", out_type, None)],
        initializer=[numpy_helper.from_array(np.asarray(scale, np.float32), "scale"),
                     numpy_helper.from_array(np.asarray(zero_point), "zero_point")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    return OrtSession(ir.from_proto(model), optimize=False).run({"x": x})["y"]


@pytest.mark.parametrize("fmt", [UINT8, INT8], ids=lambda f: f.name)
def test_quantize_and_dequantize_match_onnx_runtime_bit_for_bit(fmt):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 3, 5, 5)) * 3).astype(np.float32)
    x.flat[:50] = (np.arange(50) - 25 + 0.5) * np.float32(0.05)  # exact ties at scale 0.05
    scale, zero_point = choose_qparams(-4.0, 5.0, fmt)
    ours = quantize(x, scale, zero_point, fmt)
    theirs = _run_single_op("QuantizeLinear", x, scale, zero_point.astype(fmt.numpy_dtype), None)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(dequantize(ours, scale, zero_point),
                                  _run_single_op("DequantizeLinear", ours, scale,
                                                 zero_point.astype(fmt.numpy_dtype), None))
    channel_scale = np.float32([0.01, 0.02, 0.05])
    channel_zero = np.array([3, 0, 9], dtype=fmt.numpy_dtype)
    ours = quantize(x, channel_scale, channel_zero, fmt, axis=1)
    np.testing.assert_array_equal(ours, _run_single_op("QuantizeLinear", x, channel_scale, channel_zero, 1))
    np.testing.assert_array_equal(dequantize(ours, channel_scale, channel_zero, axis=1),
                                  _run_single_op("DequantizeLinear", ours, channel_scale, channel_zero, 1))


def test_blocked_parameters_repeat_along_the_axis():
    x = np.arange(10, dtype=np.float32).reshape(1, 10)
    scale = np.float32([[1.0, 2.0, 4.0]])  # blocks of 4 along axis 1, the last one short
    q = quantize(x, scale, np.zeros((1, 3), np.int64), INT8, axis=1, block_size=4)
    np.testing.assert_array_equal(q, [[0, 1, 2, 3, 2, 2, 3, 4, 2, 2]])


# --------------------------------------------------------------------------
# fixed-point requantization (gemmlowp / TFLite / CMSIS-NN)
# --------------------------------------------------------------------------


def _srdhm_reference(a: int, b: int) -> int:
    """gemmlowp's SaturatingRoundingDoublingHighMul, transcribed with Python integers."""
    if a == b == INT32_MIN:
        return INT32_MAX
    product = a * b
    nudge = (1 << 30) if product >= 0 else 1 - (1 << 30)
    total = product + nudge
    quotient = abs(total) // (1 << 31)
    return quotient if total >= 0 else -quotient  # C division truncates toward zero


def _rdbpot_reference(x: int, exponent: int) -> int:
    """gemmlowp's RoundingDivideByPOT: the quotient rounded half away from zero."""
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


@given(int32s, int32s)
def test_srdhm_matches_the_gemmlowp_definition(a, b):
    assert saturating_rounding_doubling_high_mul(a, b) == _srdhm_reference(a, b)


@given(int32s, st.integers(0, 31))
def test_rounding_divide_by_pot_matches_the_gemmlowp_definition(x, exponent):
    assert rounding_divide_by_pot(x, exponent) == _rdbpot_reference(x, exponent)


def test_fixed_point_known_values():
    assert saturating_rounding_doubling_high_mul(INT32_MIN, INT32_MIN) == INT32_MAX
    assert saturating_rounding_doubling_high_mul(3, 1 << 30) == 2  # ties round up: 1.5 -> 2
    assert saturating_rounding_doubling_high_mul(-3, 1 << 30) == -1  # -1.5 -> -1
    assert saturating_rounding_doubling_high_mul(-5, 1 << 30) == -2  # -2.5 -> -2
    assert saturating_rounding_doubling_high_mul(-7, 1 << 29) == -2  # -1.75 -> -2
    np.testing.assert_array_equal(rounding_divide_by_pot([5, -5, 3, -3, 4, 7], 1), [3, -3, 2, -2, 2, 4])


@given(st.floats(1e-6, 1e3))
def test_quantize_multiplier_is_q31_with_a_shift(real):
    multiplier, shift = quantize_multiplier(real)
    assert 2**30 <= multiplier < 2**31 and -31 <= shift <= 30
    assert abs(int(multiplier) * 2.0 ** (int(shift) - 31) - real) <= real * 2.0**-30


def test_quantize_multiplier_edge_cases():
    assert tuple(map(int, quantize_multiplier(0.0))) == (0, 0)
    assert tuple(map(int, quantize_multiplier(0.5))) == (2**30, 0)
    assert tuple(map(int, quantize_multiplier(1.0))) == (2**30, 1)
    assert tuple(map(int, quantize_multiplier(2.0**-40))) == (0, 0)  # below 2**-32 flushes to zero
    multiplier, shift = quantize_multiplier(np.array([0.25, 0.75]))
    np.testing.assert_array_equal(shift, [-1, 0])
    with pytest.raises(ValueError):
        quantize_multiplier(-1.0)


@settings(max_examples=300)
@given(st.integers(-(2**24), 2**24), st.floats(1e-5, 0.999), st.sampled_from(["double", "single"]))
def test_requantization_is_round_of_x_times_r_within_one(x, real, rounding):
    multiplier, shift = quantize_multiplier(real)
    result = int(multiply_by_quantized_multiplier(x, multiplier, shift, rounding))
    assert abs(result - round(x * real)) <= 1


def test_single_and_double_rounding_differ_where_two_roundings_compound():
    multiplier, shift = quantize_multiplier(0.25)  # 2**30 * 2**(-1 - 31): one right shift
    x = np.array([5, -6, 6, -5])  # exact: 1.25, -1.5, 1.5, -1.25
    # double: SRDHM rounds x / 2 (ties up), then RDBPOT rounds the half away from zero
    np.testing.assert_array_equal(multiply_by_quantized_multiplier(x, multiplier, shift, "double"), [2, -2, 2, -1])
    # single: one rounding of the exact product, ties up
    np.testing.assert_array_equal(multiply_by_quantized_multiplier(x, multiplier, shift, "single"), [1, -1, 2, -1])


def test_requantization_is_vectorized_per_channel():
    multiplier, shift = quantize_multiplier(np.array([0.5, 0.125, 2.0]))
    accumulators = np.array([[100, 100, 100], [-7, -7, -7]])
    np.testing.assert_array_equal(multiply_by_quantized_multiplier(accumulators, multiplier, shift),
                                  [[50, 13, 200], [-3, -1, -14]])
    with pytest.raises(ValueError):
        multiply_by_quantized_multiplier(1, multiplier, shift, "triple")

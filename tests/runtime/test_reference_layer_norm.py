"""The integer LayerNorm (``layer_norm``) against float LayerNorm, and the lowering of LayerNorm and erf GELU.

The integer kernel's only real error should be the output's rounding to int8: its SQNR against float
LayerNorm (of the dequantized input) is that of float LayerNorm rounded to the output's scale, within
0.05 dB, and no value is more than one output step from it.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeopt.errors import UnsupportedOpError
from edgeopt.metrics import sqnr_db
from edgeopt.runtime.reference import ReferenceModel, lower
from edgeopt.runtime.reference.lower import OutputPlan, QParams
from edgeopt.runtime.reference.normalization import layer_norm_params
from edgeopt.runtime.reference.ops import layer_norm
from layer_norm_models import layer_norm_op, qdq_graph, spelled_gelu, spelled_layer_norm


def _qparams(values: np.ndarray) -> QParams:
    low, high = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    scale = (high - low) / 255.0
    return QParams(scale, int(np.clip(round(-128 - low / scale), -128, 127)))


def _float_layer_norm(x, gamma, beta, epsilon, axis=-1):
    mean = x.mean(axis=axis, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=axis, keepdims=True) + epsilon) * gamma + beta


def _integer_against_float(x, gamma, beta, epsilon=1e-5, rounding="double"):
    """(integer output, float LayerNorm of the dequantized input, that rounded to the output's int8, scale)."""
    source = _qparams(x)
    q = np.clip(np.rint(x / source.scale) + source.zero_point, -128, 127).astype(np.int8)
    with np.errstate(invalid="ignore"):
        expected = _float_layer_norm((q.astype(np.float64) - source.zero_point) * source.scale, gamma, beta, epsilon)
    expected = np.where(np.isnan(expected), beta, expected)  # a constant row without epsilon: 0 / 0, its limit beta
    target = _qparams(expected)
    params = layer_norm_params((x.shape[0], x.shape[1], 1), source, OutputPlan(None, target, -128, 127, ()),
                               epsilon, gamma, beta)
    ours = (layer_norm(q, params=params, rounding=rounding).astype(np.float64) - target.zero_point) * target.scale
    rounded = np.clip(np.rint(expected / target.scale), -128 - target.zero_point, 127 - target.zero_point)
    return ours, expected, rounded * target.scale, target.scale


def _inputs(kind: str, rows: int, depth: int, rng) -> np.ndarray:
    if kind == "gaussian":
        return rng.standard_normal((rows, depth))
    if kind == "offset_rows":  # each row its own mean and spread, as a residual stream
        return rng.standard_normal((rows, depth)) * rng.uniform(0.05, 3, (rows, 1)) + rng.normal(0, 4, (rows, 1))
    if kind == "skewed":
        return rng.exponential(1.0, (rows, depth)) ** 2
    return rng.standard_normal((rows, depth)) * np.where(np.arange(depth) == 3, 20.0, 1.0)  # one outlier channel


@pytest.mark.parametrize("rounding", ["double", "single"])
@pytest.mark.parametrize("kind, depth, min_db", [("gaussian", 16, 40), ("gaussian", 384, 36), ("offset_rows", 64, 36),
                                                 ("skewed", 64, 30), ("outlier", 64, 30)])
def test_integer_layer_norm_is_float_layer_norm_rounded_to_int8(kind, depth, min_db, rounding):
    rng = np.random.default_rng(depth)
    gamma, beta = rng.uniform(-1.5, 1.5, depth), rng.normal(0, 0.2, depth)  # negative gammas too
    ours, expected, rounded, step = _integer_against_float(_inputs(kind, 128, depth, rng), gamma, beta,
                                                           rounding=rounding)
    assert sqnr_db(expected, ours) > min_db
    assert sqnr_db(expected, ours) > sqnr_db(expected, rounded) - 0.05
    assert np.abs(ours - rounded).max() <= step * 1.001


@pytest.mark.parametrize("epsilon", [1e-5, 0.0])
def test_a_constant_row_comes_out_as_beta(epsilon):
    # variance 0: with epsilon the quotient is 0 / sqrt(eps); without it the kernel takes 1 / sqrt(0) as 0
    rng = np.random.default_rng(1)
    x = np.vstack([np.full((1, 8), 1.25), rng.standard_normal((3, 8))])
    beta = rng.normal(0, 0.5, 8)
    ours, expected, rounded, _ = _integer_against_float(x, rng.uniform(0.5, 1.5, 8), beta, epsilon)
    np.testing.assert_allclose(ours[0], rounded[0])
    np.testing.assert_allclose(expected[0], beta, atol=1e-9)


def test_epsilon_larger_than_the_variance_damps_the_output():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 32)) * 0.01
    ours, expected, rounded, step = _integer_against_float(x, np.ones(32), np.zeros(32), epsilon=1.0)
    assert np.abs(expected).max() < 0.05 and np.abs(ours - rounded).max() <= step * 1.001


def _run(model, x):
    return ReferenceModel(model).run_float({"x": x.astype(np.float32)})["out"]


def _kinds(model) -> list[str]:
    return [op.kind for op in lower(model).ops]


def test_layer_normalization_over_the_last_axis_of_a_permuted_nhwc_tensor():
    # ConvNeXt's nn.LayerNorm after permute(0, 2, 3, 1): logical [N, H, W, C] is stored [N, W, C, H], so C is
    # a middle stored axis (rows of C values with stride H)
    rng = np.random.default_rng(3)
    gamma, beta = rng.uniform(0.5, 1.5, 8), rng.normal(0, 0.1, 8)
    model = qdq_graph(*layer_norm_op(gamma, beta, epsilon=1e-6), (1, 4, 5, 8))
    assert _kinds(model) == ["layer_norm"]
    x = rng.standard_normal((1, 4, 5, 8)) * 2
    assert sqnr_db(_float_layer_norm(x, gamma, beta, 1e-6), _run(model, x)) > 25


@pytest.mark.parametrize("square, divide, twin", [("Pow", "Div", False), ("Mul", "Reciprocal", False),
                                                  ("Pow", "Div", True)])
def test_a_channels_first_layer_norm_written_out_is_one_op(square, divide, twin):
    # ConvNeXt's LayerNorm2d: mean and variance over axis 1 of NCHW, the innermost stored axis
    rng = np.random.default_rng(4)
    gamma, beta = rng.uniform(-1.5, 1.5, (6, 1, 1)), rng.normal(0, 0.2, (6, 1, 1))
    body = spelled_layer_norm([1], gamma, beta, square=square, divide=divide, twin=twin)
    model = qdq_graph(*body, (2, 6, 3, 4), opset=13)
    assert _kinds(model) == ["layer_norm"]
    x = rng.standard_normal((2, 6, 3, 4)) + rng.normal(0, 1, (2, 1, 3, 4))
    assert sqnr_db(_float_layer_norm(x, gamma, beta, 1e-5, axis=1), _run(model, x)) > 25


def test_a_layer_norm_written_out_without_gamma_and_beta():
    model = qdq_graph(*spelled_layer_norm([-1]), (3, 16), opset=13, out_scale=0.02)
    x = np.random.default_rng(5).standard_normal((3, 16))
    assert _kinds(model) == ["layer_norm"]
    assert sqnr_db(_float_layer_norm(x, 1.0, 0.0, 1e-5), _run(model, x)) > 25


def test_a_layer_norm_over_axes_apart_in_the_stored_layout_is_refused():
    # C and H of NCHW are stored 3rd and 1st of NHWC: no (outer, D, inner) view holds them
    model = qdq_graph(*spelled_layer_norm([1, 2]), (1, 4, 3, 3), opset=13)
    with pytest.raises(UnsupportedOpError, match="normalized axes must be neighbours in the stored layout"):
        lower(model)


@pytest.mark.parametrize("variant", ["half_x_first", "half_last", "half_first", "mul_inverse"])
def test_a_spelled_out_gelu_is_one_lookup_table_as_the_gelu_op(variant):
    from onnx import helper

    spelled = qdq_graph(*spelled_gelu(variant), (2, 16), opset=13, in_scale=0.04, out_scale=0.02)
    native = qdq_graph([helper.make_node("Gelu", ["xd"], ["y"])], [], (2, 16), opset=20, in_scale=0.04,
                       out_scale=0.02)
    ours, theirs = lower(spelled).ops, lower(native).ops
    assert [op.kind for op in ours] == ["lut"]
    assert np.abs(ours[0].params.table.astype(int) - theirs[0].params.table).max() <= 1  # float32 ulps apart


def test_an_erf_gelu_with_a_quantize_between_its_steps_is_refused_naming_its_float_steps():
    """The Erf is a table of its own once quantized on both sides, but the steps after it, quantized by no one,
    are a float island: each is named, with what to do said once."""
    from onnx import helper

    body, initializers = spelled_gelu("half_last")
    body[1:2] = [helper.make_node("QuantizeLinear", ["a", "s_in", "z_in"], ["aq"]),
                 helper.make_node("DequantizeLinear", ["aq", "s_in", "z_in"], ["ad"]),
                 helper.make_node("Erf", ["ad"], ["e"])]
    with pytest.raises(UnsupportedOpError, match=r"Add \(unnamed\): its output is not quantized .*Mul \(unnamed\)"
                                                 r".*every op output must reach a QuantizeLinear"):
        lower(qdq_graph(body, initializers, (2, 16), opset=13))

"""Tables computed at lowering time: activation lookup tables, softmax exp table, resize indices.

These are data, computed once in float from the scales (as TFLite does for its
LUT activations); the runtime that reads them is integer only.

* LUT: ``table[q + 128] = clamp(round_half_even(f(s_in * (q - zp_in)) / s_out) + zp_out)``
  for all 256 int8 inputs, evaluated in float32 like ONNX Runtime's
  DequantizeLinear -> f -> QuantizeLinear.
* Softmax: ``exp_table[d + 255] = round(2**16 * exp(s_in * d))`` for ``d = x - max`` in [-255, 0].
* Resize (nearest): the source row/column of every output row/column, from ONNX's
  ``coordinate_transformation_mode`` and ``nearest_mode``.
* Resize (linear): the two source rows/columns of every output row/column and the Q10 weight of the
  second, ``round(2**10 * (u - floor(u)))`` for the source coordinate ``u``.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from edgeopt.errors import UnsupportedOpError
from edgeopt.runtime.reference.program import BILINEAR_FRACTION_BITS, LutParams, SoftmaxParams

__all__ = ["erf", "linear_weights", "lut_params", "lut_table", "nearest_indices", "softmax_params"]

#: The error function, elementwise, in float64 (numpy has none of its own).
erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(x: np.ndarray, node: ir.Node) -> np.ndarray:
    """Gelu, exact or (``approximate="tanh"``) ``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))``."""
    wide = x.astype(np.float64)
    if node.attributes.get_string("approximate", "none") == "tanh":
        gate = np.tanh(math.sqrt(2.0 / math.pi) * (wide + 0.044715 * wide ** 3))
    else:
        gate = erf(wide / math.sqrt(2.0))
    return (0.5 * wide * (1.0 + gate)).astype(np.float32)


def _unary(node: ir.Node, x: np.ndarray) -> np.ndarray:
    from edgeopt.runtime.reference.lower import attribute

    one, zero = np.float32(1), np.float32(0)
    match node.op_type:
        case "Sigmoid":
            return one / (one + np.exp(-x))
        case "Tanh":
            return np.tanh(x)
        case "HardSigmoid":
            alpha, beta = np.float32(attribute(node, "alpha", 0.2)), np.float32(attribute(node, "beta", 0.5))
            return np.clip(alpha * x + beta, zero, one)
        case "HardSwish":
            return x * np.clip(x * np.float32(1 / 6) + np.float32(0.5), zero, one)
        case "LeakyRelu":
            return np.where(x >= 0, x, x * np.float32(attribute(node, "alpha", 0.01)))
        case "Elu":
            return np.where(x >= 0, x, np.float32(attribute(node, "alpha", 1.0)) * (np.exp(x) - one))
        case "Gelu":
            return _gelu(x, node)
        case "Softplus":
            return np.logaddexp(zero, x)
        case "Softsign":
            return x / (one + np.abs(x))
        case "Mish":
            return x * np.tanh(np.logaddexp(zero, x))
        case "Abs":
            return np.abs(x)
        case "Neg":
            return -x
        case "Exp":
            return np.exp(x)
        case "Erf":
            return erf(x).astype(np.float32)
        case "Selu":
            alpha = np.float32(attribute(node, "alpha", 1.67326319217681884765625))
            gamma = np.float32(attribute(node, "gamma", 1.05070102214813232421875))
            return gamma * np.where(x > 0, x, alpha * (np.exp(x) - one))
        case "Celu":
            alpha = np.float32(attribute(node, "alpha", 1.0))
            return np.maximum(zero, x) + np.minimum(zero, alpha * (np.exp(x / alpha) - one))
        case "ThresholdedRelu":
            return np.where(x > np.float32(attribute(node, "alpha", 1.0)), x, zero)
    raise UnsupportedOpError(f"{node.op_type} ({node.name}): no lookup table")


def lut_table(function, source, plan) -> np.ndarray:
    """The int8 table of ``function`` (float32 in, float32 out) from ``source``'s quantization to ``plan``'s."""
    q = np.arange(-128, 128, dtype=np.int32)
    x = (q - source.zero_point).astype(np.float32) * np.float32(source.scale)
    with np.errstate(over="ignore"):
        y = function(x).astype(np.float32)
    out = np.rint(y / np.float32(plan.qparams.scale)) + plan.qparams.zero_point
    return np.clip(out, plan.act_min, plan.act_max).astype(np.int8)


def lut_params(node: ir.Node, source, plan) -> LutParams:
    return LutParams(table=lut_table(lambda x: _unary(node, x), source, plan))


def softmax_params(source, target) -> SoftmaxParams:
    d = np.arange(-255, 1, dtype=np.float64)
    exp_table = np.rint(np.exp(source.scale * d) * 65536.0).astype(np.int32)
    return SoftmaxParams(exp_table=exp_table, inverse_scale=int(round(65536.0 / target.scale)),
                         output_zero_point=target.zero_point)


def _source_coordinate(mode: str, x: np.ndarray, scale: float, size_in: int, size_out: int) -> np.ndarray:
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if size_out > 1 else np.zeros_like(x)
    if mode == "asymmetric":
        return x / scale
    if mode == "align_corners":
        return x * (size_in - 1) / (size_out - 1) if size_out > 1 else np.zeros_like(x)
    if mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / scale
    raise UnsupportedOpError(f"Resize coordinate_transformation_mode={mode} is not supported")


def _round_nearest(mode: str, x: np.ndarray) -> np.ndarray:
    if mode == "round_prefer_floor":
        return np.ceil(x - 0.5)
    if mode == "round_prefer_ceil":
        return np.floor(x + 0.5)
    if mode == "floor":
        return np.floor(x)
    if mode == "ceil":
        return np.ceil(x)
    raise UnsupportedOpError(f"Resize nearest_mode={mode} is not supported")


def _source_coordinates(node: ir.Node, opset: int, size_in: int, size_out: int, scale: float | None) -> np.ndarray:
    """Where every output position along one axis reads the input (ONNX Resize's coordinate_transformation_mode;
    asymmetric for Upsample and Resize-10)."""
    from edgeopt.runtime.reference.lower import text_attribute

    old = opset < 11 or node.op_type == "Upsample"
    transform = "asymmetric" if old else text_attribute(node, "coordinate_transformation_mode", "half_pixel")
    scale = scale if scale else size_out / size_in
    return _source_coordinate(transform, np.arange(size_out, dtype=np.float64), scale, size_in, size_out)


def nearest_indices(node: ir.Node, opset: int, size_in: int, size_out: int, scale: float | None) -> np.ndarray:
    """Source index of every output position along one axis (ONNX Resize, mode=nearest)."""
    from edgeopt.runtime.reference.lower import text_attribute

    old = opset < 11 or node.op_type == "Upsample"
    rounding = "floor" if old else text_attribute(node, "nearest_mode", "round_prefer_floor")
    index = _round_nearest(rounding, _source_coordinates(node, opset, size_in, size_out, scale))
    return np.clip(index, 0, size_in - 1).astype(np.int32)


def linear_weights(node: ir.Node, opset: int, size_in: int, size_out: int,
                   scale: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower neighbour, upper neighbour, Q10 weight of the upper one) of every output position along one axis
    (ONNX Resize, mode=linear): the source coordinate ``u`` clamped to [0, size_in - 1] as ONNX Runtime does,
    neighbours ``floor(u)`` and ``min(floor(u) + 1, size_in - 1)``, weight ``round((u - floor(u)) * 2**10)``."""
    source = np.clip(_source_coordinates(node, opset, size_in, size_out, scale), 0, size_in - 1)
    low = np.floor(source)
    fraction = np.rint((source - low) * (1 << BILINEAR_FRACTION_BITS))
    high = np.minimum(low + 1, size_in - 1)
    return low.astype(np.int32), high.astype(np.int32), fraction.astype(np.int32)

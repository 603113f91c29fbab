"""The numeric spec of integer quantization, in small numpy functions.

Affine quantization (ONNX QuantizeLinear/DequantizeLinear, TFLite)::

    q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)
    x' = (q - zero_point) * scale

with the division and product in float32, as ONNX Runtime computes them.

Parameters from a range ``[min, max]`` (:func:`choose_qparams`):

* asymmetric: the range is widened to include 0, ``scale = (max - min) /
  (qmax - qmin)``, ``zero_point = round(qmin - min / scale)`` clamped to
  ``[qmin, qmax]``, so 0.0 is exactly ``q = zero_point``;
* symmetric: ``scale = max(|min|, |max|) / qmax``, ``zero_point = 0``;
* an empty range (max == min == 0) gets ``scale = 1``.

Requantization in integer arithmetic (TFLite / gemmlowp / CMSIS-NN): a real
multiplier ``0 <= r`` is ``m * 2**(shift - 31)`` with ``m`` an int32 in
``[2**30, 2**31)`` (Q31, :func:`quantize_multiplier`);
``x * r`` is computed as

* ``"double"`` rounding (TFLite's reference and CMSIS-NN's default):
  ``rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x << left, m), right)``
  with ``left = max(shift, 0)``, ``right = max(-shift, 0)``;
* ``"single"`` rounding (TFLITE_SINGLE_ROUNDING, CMSIS_NN_USE_SINGLE_ROUNDING):
  ``(x * m + 2**(total - 1)) >> total`` with ``total = 31 - shift``, one
  rounding of the exact 64-bit product (half rounds up).

All integer functions take and return int64 arrays and are exact.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from edgeopt.quant.formats import INT8_SYMMETRIC, INT32, Format

__all__ = [
    "choose_qparams",
    "dequantize",
    "multiply_by_quantized_multiplier",
    "quantize",
    "quantize_bias",
    "quantize_multiplier",
    "quantize_per_channel",
    "rounding_divide_by_pot",
    "saturating_rounding_doubling_high_mul",
]

_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1
# Ranges narrower than this are treated as empty: their scale would be a
# denormal float32 that the division x / scale overflows.
_TINY_SCALE = float(np.finfo(np.float32).tiny)


def choose_qparams(minimum, maximum, fmt: Format) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (int64) covering ``[minimum, maximum]`` in ``fmt``.

    Vectorized: per-channel ranges give per-channel parameters.
    """
    lo = np.minimum(np.asarray(minimum, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(maximum, dtype=np.float64), 0.0)
    if fmt.symmetric:
        scale = np.maximum(-lo, hi) / fmt.qmax
    else:
        scale = (hi - lo) / (fmt.qmax - fmt.qmin)
    scale = np.where(scale < _TINY_SCALE, 1.0, scale).astype(np.float32)
    if fmt.symmetric:
        return scale, np.zeros(scale.shape, dtype=np.int64)
    zero_point = np.rint(fmt.qmin - lo / scale.astype(np.float64))
    return scale, np.clip(zero_point, fmt.qmin, fmt.qmax).astype(np.int64)


def _along_axis(param, ndim: int, axis: int | None, block_size: int | None, length: int) -> np.ndarray:
    """Shape a per-tensor/per-channel/per-block parameter to broadcast against x."""
    param = np.asarray(param)
    if axis is None or param.ndim == 0:
        return param
    axis = axis % ndim
    if block_size is not None:
        # ONNX blocked quantization: param has the shape of x with dim `axis`
        # divided (rounding up) by block_size; each entry covers block_size items.
        return np.repeat(param, block_size, axis=axis).take(np.arange(length), axis=axis)
    shape = [1] * ndim
    shape[axis] = -1
    return param.reshape(shape)


def quantize(x, scale, zero_point, fmt: Format, axis: int | None = None,
             block_size: int | None = None) -> np.ndarray:
    """ONNX QuantizeLinear: ``clamp(rint(x / scale) + zero_point, qmin, qmax)`` as ``fmt``'s dtype."""
    x = np.asarray(x, dtype=np.float32)
    length = x.shape[axis] if axis is not None else 0
    scale = _along_axis(np.asarray(scale, dtype=np.float32), x.ndim, axis, block_size, length)
    zero_point = _along_axis(np.asarray(zero_point, dtype=np.int64), x.ndim, axis, block_size, length)
    # Integers up to 2**24 are exact in float32: adding the zero point and clamping there is exact
    # for 8- and 16-bit formats (anything larger saturates either way); wider formats use float64.
    work = np.float32 if max(abs(fmt.qmin), abs(fmt.qmax)) < 2**24 else np.float64
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = np.asarray(np.divide(x, scale), dtype=work)
        np.rint(scaled, out=scaled)
    nan = np.isnan(scaled)
    if nan.any():  # NaN quantizes as 0.0 would, to the zero point; +-inf saturate in the clamp
        scaled[nan] = 0.0
    if zero_point.any():
        scaled += zero_point.astype(work)
    return np.clip(scaled, fmt.qmin, fmt.qmax, out=scaled).astype(fmt.numpy_dtype)


def dequantize(q, scale, zero_point=0, axis: int | None = None, block_size: int | None = None) -> np.ndarray:
    """ONNX DequantizeLinear: ``(q - zero_point) * scale`` in float32."""
    q = np.asarray(q)
    length = q.shape[axis] if axis is not None else 0
    scale = _along_axis(np.asarray(scale, dtype=np.float32), q.ndim, axis, block_size, length)
    zero_point = _along_axis(np.asarray(zero_point, dtype=np.int64), q.ndim, axis, block_size, length)
    if q.dtype.kind in "iub" and q.dtype.itemsize <= 2 and np.abs(zero_point).max(initial=0) < 2**16:
        # codes and zero points of up to 16 bits and their difference are exact in float32: the same
        # values as through int64, without an int64 copy of the weight (4x faster on a 1000x1280 one)
        codes = q.astype(np.float32)
        if zero_point.any():
            codes -= zero_point.astype(np.float32)
        return codes * scale
    return (q.astype(np.int64) - zero_point).astype(np.float32) * scale


def quantize_per_channel(weights, axis: int | None,
                         fmt: Format = INT8_SYMMETRIC) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Min/max weight quantization: ``(q, scale, zero_point)``, one scale per slice along ``axis``.

    ``axis=None`` quantizes the whole tensor with one scale (per-tensor).
    """
    weights = np.asarray(weights, dtype=np.float32)
    if axis is None:
        minimum, maximum = weights.min(initial=0.0), weights.max(initial=0.0)
    else:
        axis = axis % weights.ndim
        others = tuple(a for a in range(weights.ndim) if a != axis)
        minimum, maximum = weights.min(axis=others, initial=0.0), weights.max(axis=others, initial=0.0)
    scale, zero_point = choose_qparams(minimum, maximum, fmt)
    return quantize(weights, scale, zero_point, fmt, axis=axis), scale, zero_point


def quantize_bias(bias, input_scale, weight_scale) -> tuple[np.ndarray, np.ndarray]:
    """Bias as int32 at ``scale = input_scale * weight_scale`` (float32 product), zero point 0.

    Returns ``(q, scale)``; values beyond int32 saturate.
    """
    scale = (np.float32(input_scale) * np.asarray(weight_scale, dtype=np.float32)).astype(np.float32)
    scale = np.where(scale < _TINY_SCALE, np.float32(1.0), scale).astype(np.float32)
    scaled = np.rint(np.asarray(bias, dtype=np.float64) / scale.astype(np.float64))
    return np.clip(scaled, INT32.qmin, INT32.qmax).astype(np.int32), scale


def _round_half_away(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def quantize_multiplier(real) -> tuple[np.ndarray, np.ndarray]:
    """TFLite QuantizeMultiplier: ``real = multiplier * 2**(shift - 31)``, multiplier a Q31 int32.

    ``real`` must be >= 0. Returns int64 arrays ``(multiplier, shift)``:
    multiplier in ``[2**30, 2**31)`` (0 for real == 0), shift in [-31, 30]
    (positive = left shift). Reals below ``2**-32`` become 0; above
    ``2**30`` saturate.
    """
    real = np.asarray(real, dtype=np.float64)
    if np.any(real < 0) or not np.all(np.isfinite(real)):
        raise ValueError("quantize_multiplier takes finite non-negative reals")
    fraction, shift = np.frexp(real)  # real = fraction * 2**shift, fraction in [0.5, 1)
    multiplier = _round_half_away(fraction * 2.0**31).astype(np.int64)
    shift = shift.astype(np.int64)
    carry = multiplier == 2**31
    multiplier = np.where(carry, multiplier // 2, multiplier)
    shift = np.where(carry, shift + 1, shift)
    underflow = (shift < -31) | (real == 0)
    multiplier = np.where(underflow, 0, multiplier)
    shift = np.where(underflow, 0, shift)
    overflow = shift > 30
    multiplier = np.where(overflow, _INT32_MAX, multiplier)
    shift = np.where(overflow, 30, shift)
    return multiplier, shift


def saturating_rounding_doubling_high_mul(a, b) -> np.ndarray:
    """gemmlowp SaturatingRoundingDoublingHighMul: ``a * b / 2**31`` rounded, int32 in and out.

    The nudge (``2**30``, or ``1 - 2**30`` for a negative product) and C's
    truncating division round to nearest with ties toward +infinity
    (1.5 -> 2, -1.5 -> -1); ``INT32_MIN * INT32_MIN`` saturates to INT32_MAX.
    """
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    product = a * b
    nudge = np.where(product >= 0, 1 << 30, 1 - (1 << 30))
    total = product + nudge
    high = np.sign(total) * (np.abs(total) >> 31)  # C division truncates toward zero
    overflow = (a == _INT32_MIN) & (b == _INT32_MIN)
    return np.where(overflow, _INT32_MAX, high).astype(np.int64)


def rounding_divide_by_pot(x, exponent) -> np.ndarray:
    """gemmlowp RoundingDivideByPOT: ``x / 2**exponent`` rounded half away from zero."""
    x = np.asarray(x, dtype=np.int64)
    exponent = np.asarray(exponent, dtype=np.int64)
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def multiply_by_quantized_multiplier(x, multiplier, shift,
                                     rounding: Literal["double", "single"] = "double") -> np.ndarray:
    """``x * multiplier * 2**(shift - 31)`` rounded, as TFLite/CMSIS-NN requantize.

    ``x`` is an int32 accumulator (as int64); ``multiplier, shift`` come from
    :func:`quantize_multiplier`. Results saturate to int32, as the C kernels
    do (with ``"double"`` rounding ``x << left`` saturates first): only a
    multiplier far above 1 gets there, and its result is far past int8 anyway.
    """
    x = np.asarray(x, dtype=np.int64)
    multiplier = np.asarray(multiplier, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    if rounding == "double":
        left = np.maximum(shift, 0)
        right = np.maximum(-shift, 0)
        shifted = np.clip(x << left, _INT32_MIN, _INT32_MAX)
        return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, multiplier), right)
    if rounding == "single":
        total = 31 - shift
        return np.clip((x * multiplier + (np.int64(1) << (total - 1))) >> total, _INT32_MIN, _INT32_MAX)
    raise ValueError(f"rounding must be 'double' or 'single', got {rounding!r}")

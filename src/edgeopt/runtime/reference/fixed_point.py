"""Fixed-point requantization used by every integer op (gemmlowp / TFLite / CMSIS-NN).

``quantize_multiplier(real) -> (multiplier, shift)`` with ``real ~= multiplier * 2**(shift - 31)``
and ``multiplier`` a Q31 int32 in ``[2**30, 2**31)``.

Rounding variants of ``x * real``:

* ``"double"`` (TFLite default): ``RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(
  x << max(shift, 0), multiplier), max(-shift, 0))`` -- two roundings, half away from zero;
* ``"single"`` (CMSIS-NN ``CMSIS_NN_USE_SINGLE_ROUNDING``): one 64-bit product shifted by
  ``31 - shift`` with round half up.

The numbers come from :mod:`edgeopt.quant.primitives` (the project-wide spec) when it
is importable; this module re-exports them under the names the ops table uses.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["ROUNDINGS", "multiply_by_quantized_multiplier", "quantize_multiplier"]

ROUNDINGS = ("double", "single")

try:  # the project-wide spec, written alongside the quantizer
    from edgeopt.quant.primitives import multiply_by_quantized_multiplier as _mbqm
    from edgeopt.quant.primitives import quantize_multiplier as _quantize_multiplier
except ImportError:  # pragma: no cover - until quant/primitives.py lands
    _mbqm = None
    _quantize_multiplier = None


def _local_quantize_multiplier(real: float) -> tuple[int, int]:
    if real <= 0.0:
        return 0, 0
    mantissa, exponent = math.frexp(real)
    q = int(math.floor(mantissa * (1 << 31) + 0.5))
    if q == 1 << 31:
        q //= 2
        exponent += 1
    if exponent < -31:
        return 0, 0
    return q, min(exponent, 30)


def _srdhm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    product = a * b
    nudge = np.where(product >= 0, 1 << 30, 1 - (1 << 30))
    total = product + nudge
    high = np.where(total >= 0, total >> 31, -((-total) >> 31))
    overflow = (a == -(1 << 31)) & (b == -(1 << 31))
    return np.where(overflow, (1 << 31) - 1, high)


def _rdbpot(x: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def _local_mbqm(x, multiplier, shift, rounding: str = "double") -> np.ndarray:
    x = np.asarray(x, dtype=np.int64)
    multiplier = np.asarray(multiplier, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    if rounding == "single":
        total_shift = 31 - shift
        value = (x * multiplier) >> (total_shift - 1)
        return ((value + 1) >> 1).astype(np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    shifted = (x << left).astype(np.int32).astype(np.int64)
    return _rdbpot(_srdhm(shifted, multiplier), right).astype(np.int64)


def quantize_multiplier(real: float) -> tuple[int, int]:
    """Q31 multiplier and power-of-two exponent of a positive real scale."""
    if _quantize_multiplier is not None:
        multiplier, shift = _quantize_multiplier(float(real))
        return int(multiplier), int(shift)
    return _local_quantize_multiplier(float(real))


def multiply_by_quantized_multiplier(x, multiplier, shift, rounding: str = "double") -> np.ndarray:
    """``x * multiplier * 2**(shift - 31)`` rounded as ``rounding`` says, as int64."""
    if _mbqm is not None:
        return np.asarray(_mbqm(np.asarray(x), multiplier, shift, rounding=rounding), dtype=np.int64)
    return _local_mbqm(x, multiplier, shift, rounding)

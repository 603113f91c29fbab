"""Fixed-point requantization for the integer ops, from :mod:`edgeopt.quant.primitives` (the spec).

``quantize_multiplier(real) -> (multiplier, shift)`` with ``real ~= multiplier * 2**(shift - 31)``.
``multiply_by_quantized_multiplier(x, multiplier, shift, rounding)`` computes ``x * real``:

* ``"double"`` (TFLite default, gemmlowp): SaturatingRoundingDoublingHighMul then
  RoundingDivideByPOT -- two roundings, each half away from zero;
* ``"single"`` (CMSIS-NN ``CMSIS_NN_USE_SINGLE_ROUNDING``): one rounding (half up)
  of the 64-bit product shifted by ``31 - shift``.
"""

from __future__ import annotations

import numpy as np

from edgeopt.quant import primitives

__all__ = ["ROUNDINGS", "multiply_by_quantized_multiplier", "quantize_multiplier"]

ROUNDINGS = ("double", "single")


def quantize_multiplier(real: float) -> tuple[int, int]:
    """Q31 multiplier and power-of-two exponent of one non-negative real scale."""
    multiplier, shift = primitives.quantize_multiplier(float(real))
    return int(multiplier), int(shift)


def multiply_by_quantized_multiplier(x, multiplier, shift, rounding: str = "double") -> np.ndarray:
    """``x * multiplier * 2**(shift - 31)`` rounded as ``rounding`` says, as int64."""
    return primitives.multiply_by_quantized_multiplier(x, multiplier, shift, rounding=rounding)

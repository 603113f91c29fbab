"""GPTQ rounding of a block-quantized 4-bit weight: rows rounded in order, each error fed forward.

For ``y = x @ W``, ``W [K, N]``, rounded to ``W~``, the output error of
column n over the calibration data is ``e^T H e`` with ``e = W[:, n] -
W~[:, n]`` and ``H = E[x x^T]`` (:mod:`edgeopt.quant.int4_importance`).
GPTQ (Frantar et al. 2022; the int8 form is :mod:`edgeopt.quant.gptq`)
rounds input rows ``k = 0 .. K-1`` in turn and lets the rows not yet rounded
absorb each row's error, through ``U``, the upper Cholesky factor of
``(H' + 1% mean(diag H) I)^-1``::

    q_k = clamp(rint(w_k / s) + z),  d = (w_k - (q_k - z) s) / U_kk,  w_j -= d U_kj  for j > k

``H'`` is ``H`` with its off-diagonal shrunk toward 0 by the share of it
that is sampling noise (:func:`~edgeopt.quant.gptq.shrunk_gram`):
from fewer rows than inputs GPTQ would otherwise fit the noise of the
calibration sample. On the benchmark MLP (K = 2048 read from 256 rows) that
made GPTQ worse on held-out inputs than the clip search alone (BENCHMARKS.md).

Block scales need contiguous blocks, so the rows go in natural order (no
act-order). At the first row of each block of ``b`` rows, the block's scale
and zero point per column are chosen from the *current* weights (already
corrected by the errors of the rows before) with the same clipping search as
without GPTQ (:func:`~edgeopt.quant.int4_blocks.block_scales`, importance
``E[x_k**2]``); then its rows are rounded one by one. The corrections reach
the rows of the current batch of :data:`LAZY_ROWS` (a whole number of
blocks) row by row and the later rows once per batch, in one matrix product.

Per column, the result keeps whichever of the GPTQ and the plain rounding
(the clipping search alone) has the smaller ``e^T H e``: a column is never
worse on the calibration data than without GPTQ. Deterministic: the same
weight and ``H`` give the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeopt.quant import gptq
from edgeopt.quant.formats import Format
from edgeopt.quant.int4_blocks import BlockQuantizedWeight, block_scales, quantize_blocks
from edgeopt.quant.int4_importance import LayerInputStatistics

__all__ = ["LAZY_ROWS", "GptqBlocks", "gptq_blocks", "output_error"]

#: Rows rounded between two matrix-product updates of the rows after them (rounded up to whole blocks).
LAZY_ROWS = 128


@dataclass(frozen=True, kw_only=True)
class GptqBlocks:
    """A GPTQ-rounded weight and how many of its ``columns`` kept GPTQ's rounding (the rest the plain one)."""

    weight: BlockQuantizedWeight
    gptq_columns: int
    columns: int


def output_error(weight: np.ndarray, restored: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """Per column ``n`` of ``weight [K, N]``, ``e^T H e`` with ``e = weight[:, n] - restored[:, n]``."""
    return gptq.output_error((weight.astype(np.float64) - restored.astype(np.float64)).T, gram)


def _round_block(rows: np.ndarray, factor: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
                 fmt: Format, codes: np.ndarray) -> np.ndarray:
    """Round the first ``len(codes)`` rows of ``rows`` (the current batch, updated in place) into ``codes``,
    each error fed to the rows after it through ``factor`` (the batch's rows of ``U``, its columns from the
    batch's first row); returns the scaled errors ``d``, one row per rounded row."""
    errors = np.empty((len(codes), rows.shape[1]))
    for j in range(len(codes)):
        codes[j] = np.clip(np.rint(rows[j] / scale) + zero_point, fmt.qmin, fmt.qmax)
        errors[j] = (rows[j] - (codes[j] - zero_point) * scale) / factor[j, j]
        rows[j + 1:] -= np.outer(factor[j, j + 1:], errors[j])
    return errors


def _sweep(weight: np.ndarray, factor: np.ndarray, block_size: int, fmt: Format,
           importance: np.ndarray) -> BlockQuantizedWeight:
    """GPTQ over the rows of ``weight [K, N]`` in order, block scales searched on the current rows."""
    k, n = weight.shape
    current = weight.astype(np.float64)
    codes = np.empty((k, n))
    scales, zero_points = [], []
    lazy = -(-max(LAZY_ROWS, block_size) // block_size) * block_size
    for start in range(0, k, lazy):
        end = min(start + lazy, k)
        rows, errors = current[start:end], np.empty((end - start, n))
        for first in range(0, end - start, block_size):
            last = min(first + block_size, end - start)
            scale, zero_point = block_scales(rows[first:last], block_size, fmt, importance[start + first:start + last])
            scales.append(scale)
            zero_points.append(zero_point)
            errors[first:last] = _round_block(rows[first:], factor[start + first:end, start + first:end],
                                              scale.astype(np.float64), zero_point.astype(np.float64), fmt,
                                              codes[start + first:start + last])
        current[end:] -= factor[start:end, end:].T @ errors
    return BlockQuantizedWeight(q=codes.astype(fmt.numpy_dtype), scale=np.concatenate(scales),
                                zero_point=np.concatenate(zero_points), block_size=block_size, format=fmt)


def _per_column(keep: np.ndarray, chosen: BlockQuantizedWeight, other: BlockQuantizedWeight) -> BlockQuantizedWeight:
    """``chosen``'s columns where ``keep``, ``other``'s elsewhere."""
    return BlockQuantizedWeight(q=np.where(keep, chosen.q, other.q), scale=np.where(keep, chosen.scale, other.scale),
                                zero_point=np.where(keep, chosen.zero_point, other.zero_point),
                                block_size=chosen.block_size, format=chosen.format)


def gptq_blocks(weight: np.ndarray, statistics: LayerInputStatistics, block_size: int, fmt: Format) -> GptqBlocks:
    """GPTQ block quantization of ``weight [K, N]`` (float32) for a layer input of ``statistics`` (with its
    ``gram``); the blocks, scales and zero points are laid out as :func:`quantize_blocks` gives them."""
    weight = np.asarray(weight, dtype=np.float32)
    solved = _sweep(weight, statistics.inverse_factor, block_size, fmt, statistics.mean_square)
    plain = quantize_blocks(weight, block_size, fmt, importance=statistics.mean_square)
    gram = statistics.gram
    keep = output_error(weight, solved.dequantize(), gram) < output_error(weight, plain.dequantize(), gram)
    return GptqBlocks(weight=_per_column(keep, solved, plain), gptq_columns=int(keep.sum()), columns=keep.size)

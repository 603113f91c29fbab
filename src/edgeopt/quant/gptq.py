"""GPTQ rounding: round a layer's weights one input at a time, feeding each error forward.

Rounding every weight to nearest minimizes each weight's own error, not the
layer's output error ``|| (W - W~) X ||^2`` over its inputs ``X``. GPTQ
(Frantar et al. 2022, after Optimal Brain Quantization) keeps the scales and
rounds the weights of one input ``k`` at a time; the rounding error of input
``k`` is then compensated by the inputs not yet rounded, through the
inverse of the input correlation ``H = X^T X / S``::

    q_k = clamp(rint(w_k)),  delta = (w_k - q_k) / U_kk,  w_j -= delta * U_kj  for j > k

with ``U`` the upper Cholesky factor of ``H^-1`` (rows of the not yet rounded
inputs' inverse, all at once), in units of each output channel's step.
Inputs are taken in order of decreasing ``H_kk`` (the loudest first, the
"act-order" of the paper: their errors have the most inputs left to absorb
them), and in blocks of :data:`BLOCK` so that most of the work is one matrix
product. ``H`` is first shrunk toward its diagonal by the share of its
off-diagonal that is sampling noise (:func:`shrunk_gram`; the sample of a
layer's inputs is not much larger than the layer is wide), then gets
``damping x mean(diag H)`` on its diagonal (the paper's 1 %); an input that
is always zero keeps its nearest rounding and passes no error on.

It minimizes AdaRound's objective (:mod:`edgeopt.quant.adaround_solver`)
greedily, in one sweep instead of thousands of gradient steps: on the eight models of
``benchmarks/rounding.py`` its output SQNR is within 0.35 dB of AdaRound's,
3.8x to 23x faster (MobileNetV2 at 224x224: 18.2 dB in 7.0 s, AdaRound 18.1
dB in 100 s, nearest 14.9 dB; BENCHMARKS.md). As there, each output channel keeps whichever of the GPTQ
and the nearest rounding has the smaller output error on the samples, so a
layer is never worse than round-to-nearest on its calibration sample.

Layout and scales are AdaRound's: ``G`` independent problems ``W[G, N, K]``
with samples ``X[G, S, K]`` and one scale per output channel ``[G, N]``.
"""

from __future__ import annotations

import numpy as np

from edgeopt.quant.adaround_solver import channel_scales, check_layout
from edgeopt.quant.formats import INT8_SYMMETRIC

__all__ = ["BLOCK", "DAMPING", "gptq_factor", "gptq_from_gram", "gptq_layer", "inverse_factor", "output_error",
           "shrunk_gram", "sweep"]

#: Inputs rounded between two matrix-product updates of the rest.
BLOCK = 128
#: Diagonal loading of the input correlation, as a fraction of its mean diagonal.
DAMPING = 0.01

_QMIN, _QMAX = INT8_SYMMETRIC.qmin, INT8_SYMMETRIC.qmax


def shrunk_gram(gram: np.ndarray, rows) -> np.ndarray:
    """``(1 - a) H + a diag(H)`` for each ``H = E[x x^T]`` of ``gram [..., K, K]``, a mean over ``rows``
    samples (one count, or one per ``H``): its off-diagonal shrunk toward 0 by ``a``, the share of it that
    is sampling noise (Ledoit-Wolf shrinkage toward the diagonal, Schafer and Strimmer's "target D"):
    ``a = sum_{k != l} Var(H_kl) / sum_{k != l} H_kl**2`` (at most 1), the variance of a mean of
    ``rows`` products ``x_k x_l`` taken as for Gaussian inputs, ``(H_kk H_ll + H_kl**2) / rows``. Many
    rows, or strongly correlated inputs: about ``H``; few rows of independent inputs: about ``diag(H)``,
    where GPTQ rounds each weight as it would alone. Without it GPTQ fits the noise of a sample not much
    larger than the layer is wide, and the guard against nearest, judged on the same sample, cannot tell."""
    diagonal = np.einsum("...kk->...k", gram)
    diagonal_square = np.sum(diagonal * diagonal, axis=-1)
    off_square = np.sum(gram * gram, axis=(-2, -1)) - diagonal_square
    noise = (np.sum(diagonal, axis=-1) ** 2 - diagonal_square + off_square) / np.maximum(rows, 1)
    shrink = np.minimum(1.0, noise / np.where(off_square > 0, off_square, 1.0))
    shrink = np.where(off_square > 0, shrink, 1.0)[..., None, None]
    return (1.0 - shrink) * gram + shrink * (diagonal[..., None] * np.eye(gram.shape[-1]))


def _dead_inputs_solvable(gram: np.ndarray) -> np.ndarray:
    """``gram [G, K, K]`` with the mean diagonal of its live inputs on the diagonal of each input that is
    always zero (a zero row and column): it keeps its nearest rounding and passes no error on, and the
    damping stays relative to the live inputs' scale (a unit diagonal there made GPTQ round to nearest
    when the activations were small)."""
    diagonal = np.einsum("gkk->gk", gram)
    live = diagonal > 0
    mean = diagonal.sum(axis=1) / np.maximum(live.sum(axis=1), 1)
    fill = np.where(live, 0.0, np.where(mean > 0, mean, 1.0)[:, None])
    return gram + fill[:, :, None] * np.eye(gram.shape[-1])


def inverse_factor(gram: np.ndarray, damping: float = DAMPING) -> np.ndarray:
    """Upper ``U`` with ``U^T U = (gram + damping)^-1``, batched; more loading if rounding breaks it."""
    eye = np.eye(gram.shape[-1])
    mean = np.einsum("gkk->gk", gram).mean(axis=1)[:, None, None]
    load = damping
    # (LAPACK's also for a NaN or an infinity, which it carries into the factor where the loop would raise
    # for ever)
    small = gram.shape[-1] <= _SMALL and bool(np.isfinite(gram).all())
    factor = _small_inverse_factor if small else _lapack_inverse_factor
    while True:
        loaded = gram + (load * np.where(mean > 0, mean, 1.0)) * eye
        try:
            return factor(loaded)
        except np.linalg.LinAlgError:
            load *= 10.0


#: Up to this many inputs, :func:`inverse_factor` loops over them with numpy's arithmetic batched over the
#: matrices: on 21,000 9 x 9 matrices (a 224x224 MobileNetV2's depthwise channels, three times) 34 ms against
#: LAPACK's 57-128 ms; past 16 inputs LAPACK is faster (25: 54 against 95 ms on 3,000).
_SMALL = 16


def _lapack_inverse_factor(loaded: np.ndarray) -> np.ndarray:
    return np.linalg.cholesky(np.linalg.inv(loaded)).transpose(0, 2, 1)


def _small_inverse_factor(loaded: np.ndarray) -> np.ndarray:
    """:func:`_lapack_inverse_factor` without LAPACK: with ``P`` the order reversed and ``P A P = R R^T``
    (Cholesky), ``U = P R^-1 P`` is upper with ``U^T U = A^-1``: the factor of the inverse, unique.
    Computed with the batch as the last axis, so each step is one vector operation over all matrices."""
    matrices = np.ascontiguousarray(loaded.transpose(1, 2, 0)[::-1, ::-1])  # P A P, [K, K, G]
    size = loaded.shape[-1]
    lower = np.zeros_like(matrices)
    for j in range(size):  # Cholesky, column by column
        pivot = matrices[j, j] - np.square(lower[j, :j]).sum(axis=0)
        if not np.all(np.isfinite(pivot) & (pivot > 0)):
            raise np.linalg.LinAlgError("not positive definite")
        lower[j, j] = np.sqrt(pivot)
        lower[j + 1:, j] = (matrices[j + 1:, j] - (lower[j + 1:, :j] * lower[j, :j]).sum(axis=1)) / lower[j, j]
    inverse = np.zeros_like(matrices)
    for i in range(size):  # its inverse, row by row (lower too)
        inverse[i, i] = 1.0 / lower[i, i]
        inverse[i, :i] = -(lower[i, :i, None] * inverse[:i, :i]).sum(axis=0) * inverse[i, i]
    return np.ascontiguousarray(inverse[::-1, ::-1].transpose(2, 0, 1))


def gptq_factor(gram: np.ndarray, rows, damping: float = DAMPING) -> np.ndarray:
    """GPTQ's ``U`` for each input correlation of ``gram [G, K, K]`` (a mean over ``rows`` samples):
    shrunk by its sampling noise, dead inputs made solvable, loaded by ``damping``."""
    return inverse_factor(_dead_inputs_solvable(shrunk_gram(gram, rows)), damping)


def sweep(steps: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Integers for ``steps[G, N, K]`` (weights over scales), inputs in order, errors fed forward."""
    width = steps.shape[2]
    ints = np.empty_like(steps)
    for start in range(0, width, BLOCK):
        end = min(start + BLOCK, width)
        block = steps[:, :, start:end].copy()
        errors = np.empty_like(block)
        for j in range(end - start):
            column = start + j
            ints[:, :, column] = np.clip(np.rint(block[:, :, j]), _QMIN, _QMAX)
            errors[:, :, j] = (block[:, :, j] - ints[:, :, column]) / factor[:, column, column][:, None]
            block[:, :, j + 1:] -= errors[:, :, j, None] * factor[:, None, column, column + 1:end]
        steps[:, :, end:] -= errors @ factor[:, start:end, end:]
    return ints


def output_error(error: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """Per output channel, ``e H e^T`` for each row ``e`` of ``error [..., N, K]`` (a weight's rounding
    error, one row per output channel) and ``H = gram [..., K, K]``: ``[..., N]``."""
    return ((error @ gram) * error).sum(axis=-1)


def gptq_layer(weight: np.ndarray, inputs: np.ndarray, scale, *, damping: float = DAMPING) -> np.ndarray:
    """Int8 weights ``q`` (``weight ~ q * scale``) rounded by GPTQ on ``inputs``.

    The contract of :func:`edgeopt.quant.adaround_solver.adaround_layer`:
    ``weight`` ``[N, K]`` or ``[G, N, K]``, ``inputs`` ``[S, K]`` or
    ``[G, S, K]``, ``scale`` a scalar, ``[N]`` or ``[G, N]``; returns int8 in
    ``weight``'s shape, in ``[-127, 127]``. Deterministic.
    """
    grouped, samples = check_layout(weight, inputs)
    steps = grouped.astype(np.float64) / channel_scales(scale, grouped)[..., None]
    samples = samples.astype(np.float64)
    gram = samples.transpose(0, 2, 1) @ samples / samples.shape[1]
    return gptq_from_gram(steps, gram, samples.shape[1], damping=damping).reshape(np.shape(weight))


def gptq_from_gram(steps: np.ndarray, gram: np.ndarray, rows, *, damping: float = DAMPING) -> np.ndarray:
    """Int8 ``[G, N, K]`` for ``steps[G, N, K]`` (weights over their scales), rounded by GPTQ on the input
    correlations ``gram[G, K, K]``, each a mean over ``rows`` samples (one count, or ``[G]``); per output
    channel, whichever of GPTQ's and the nearest rounding has the smaller output error ``e H e^T``."""
    order = np.argsort(-np.einsum("gkk->gk", gram), axis=1, kind="stable")
    ordered_gram = np.take_along_axis(np.take_along_axis(gram, order[:, :, None], 1), order[:, None, :], 2)
    ordered = np.take_along_axis(steps, order[:, None, :], 2)
    ints = np.take_along_axis(sweep(ordered, gptq_factor(ordered_gram, rows, damping)),
                              np.argsort(order, axis=1)[:, None, :], 2)
    nearest = np.clip(np.rint(steps), _QMIN, _QMAX)
    keep_nearest = output_error(steps - nearest, gram) <= output_error(steps - ints, gram)
    return np.where(keep_nearest[..., None], nearest, ints).astype(np.int8)

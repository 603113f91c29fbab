"""The table of integer op semantics: the spec the interpreter runs and the C emitter follows.

Each entry maps an op kind of the lowered program to a plain numpy function
``f(*inputs, params=..., rounding=...) -> array`` over int8 inputs (stored
layout, NHWC for rank 4) and to the name of the C kernel that implements the
same arithmetic. All arithmetic is integer: accumulators are exact (int64, or
float64 sums that stay far below 2**53 and so are exact integers), requantization
is :func:`multiply_by_quantized_multiplier`, and the result is clamped to int8.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgeopt.runtime.reference.fixed_point import multiply_by_quantized_multiplier as mbqm
from edgeopt.runtime.reference.rnn import recurrent
from edgeopt.runtime.reference.program import (
    BILINEAR_FRACTION_BITS,
    AddParams,
    AvgPoolParams,
    BatchMatMulParams,
    ConcatParams,
    Conv2dAddParams,
    Conv2dParams,
    ConvTranspose2dParams,
    FullyConnectedParams,
    LayerNormParams,
    LutParams,
    MaxPoolParams,
    MeanParams,
    MulParams,
    PadParams,
    PReluParams,
    RecurrentParams,
    RequantizeParams,
    ReshapeParams,
    ResizeBilinearParams,
    ResizeNearestParams,
    SliceParams,
    SoftmaxParams,
    TransposeParams,
)

__all__ = ["OPS", "OpSpec"]


@dataclass(frozen=True, kw_only=True)
class OpSpec:
    """One op kind: its numpy semantics, parameter type and C kernel name.

    ``in_place``: positions of the inputs the C kernel may write its output
    over (when of the output's size), because it reads element ``i`` of such an
    input only before it writes element ``i`` of the output; the planner may
    then alias the two. An input read across a window (a conv's input) is never
    listed.
    """

    kind: str
    reference: Callable[..., np.ndarray]
    params_type: type
    c_kernel: str
    in_place: tuple[int, ...] = ()


def _finish(acc: np.ndarray, multiplier, shift, zero_point: int, act_min: int, act_max: int,
            rounding: str) -> np.ndarray:
    """Requantize an int32 accumulator, add the output zero point and clamp to the act range."""
    out = mbqm(acc, multiplier, shift, rounding) + zero_point
    return np.clip(out, act_min, act_max).astype(np.int8)


def _centered(x: np.ndarray, zero_point: int) -> np.ndarray:
    return x.astype(np.int64) - zero_point


def conv2d(x: np.ndarray, *, params: Conv2dParams, rounding: str) -> np.ndarray:
    p = params
    n, h, w, _ = x.shape
    out_channels, kh, kw, group_channels = p.weight.shape
    top, left, bottom, right = p.pads
    padded = np.pad(_centered(x, p.input_zero_point).astype(np.float64),
                    ((0, 0), (top, bottom), (left, right), (0, 0)))
    (sh, sw), (dh, dw) = p.strides, p.dilations
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    groups, per_group = p.group, out_channels // p.group
    weight = p.weight.astype(np.float64).reshape(groups, per_group, kh, kw, group_channels)
    acc = np.zeros((groups, n * oh * ow, per_group))
    for i in range(kh):
        for j in range(kw):
            patch = padded[:, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
            patch = patch.reshape(n * oh * ow, groups, group_channels).transpose(1, 0, 2)
            acc += patch @ weight[:, :, i, j, :].transpose(0, 2, 1)
    acc = acc.transpose(1, 0, 2).reshape(n, oh, ow, out_channels).astype(np.int64) + p.bias
    return _finish(acc, p.multiplier, p.shift, p.output_zero_point, p.act_min, p.act_max, rounding)


def fully_connected(x: np.ndarray, *, params: FullyConnectedParams, rounding: str) -> np.ndarray:
    p = params
    acc = _centered(x, p.input_zero_point).astype(np.float64) @ p.weight.astype(np.float64).T
    acc = acc.astype(np.int64) + p.bias
    return _finish(acc, p.multiplier, p.shift, p.output_zero_point, p.act_min, p.act_max, rounding)


def batch_matmul(a: np.ndarray, b: np.ndarray, *, params: BatchMatMulParams, rounding: str) -> np.ndarray:
    p = params
    left = _centered(a, p.a_zero_point).reshape(p.batch, p.rows, p.depth).astype(np.float64)
    right = _centered(b, p.b_zero_point).reshape(p.batch, p.depth, p.columns).astype(np.float64)
    acc = (left @ right).astype(np.int64)  # exact: far below 2**53
    return _finish(acc, p.multiplier, p.shift, p.output_zero_point, p.act_min, p.act_max, rounding)


def add(a: np.ndarray, b: np.ndarray, *, params: AddParams, rounding: str) -> np.ndarray:
    p = params
    scaled = [mbqm(_centered(x, zp) << p.left_shift, m, s, rounding)
              for x, zp, m, s in zip((a, b), p.input_zero_points, p.input_multipliers, p.input_shifts)]
    return _finish(scaled[0] + scaled[1], p.output_multiplier, p.output_shift, p.output_zero_point,
                   p.act_min, p.act_max, rounding)


def conv2d_add(x: np.ndarray, shortcut: np.ndarray, *, params: Conv2dAddParams, rounding: str) -> np.ndarray:
    """The unfused pair, by definition: the conv's int8 result (rounded and clamped) added to ``shortcut``."""
    return add(conv2d(x, params=params.conv, rounding=rounding), shortcut, params=params.add, rounding=rounding)


def conv_transpose2d(x: np.ndarray, *, params: ConvTranspose2dParams, rounding: str) -> np.ndarray:
    """Scatter form: tap (ky, kx) of input pixel (iy, ix) lands on uncropped output pixel
    (iy * stride + ky * dilation) per axis; the output is that canvas from ``pads`` on, ``output_hw`` big."""
    p = params
    n, h, w, _ = x.shape
    out_channels, kh, kw, group_channels = p.weight.shape
    (sh, sw), (dh, dw), (top, left), (oh, ow) = p.strides, p.dilations, p.pads, p.output_hw
    groups = p.group
    centered = _centered(x, p.input_zero_point).astype(np.float64).reshape(n, h, w, groups, group_channels)
    weight = p.weight.astype(np.float64).reshape(groups, out_channels // groups, kh, kw, group_channels)
    origin_h, origin_w = max(0, -top), max(0, -left)  # canvas index of uncropped row / column 0
    canvas = np.zeros((n, origin_h + max(sh * (h - 1) + dh * (kh - 1) + 1, top + oh),
                       origin_w + max(sw * (w - 1) + dw * (kw - 1) + 1, left + ow), out_channels))
    for i in range(kh):
        for j in range(kw):
            tap = np.einsum("nhwgc,goc->nhwgo", centered, weight[:, :, i, j, :]).reshape(n, h, w, out_channels)
            y0, x0 = origin_h + i * dh, origin_w + j * dw
            canvas[:, y0: y0 + sh * (h - 1) + 1: sh, x0: x0 + sw * (w - 1) + 1: sw] += tap
    acc = canvas[:, origin_h + top: origin_h + top + oh, origin_w + left: origin_w + left + ow]
    acc = acc.astype(np.int64) + p.bias
    return _finish(acc, p.multiplier, p.shift, p.output_zero_point, p.act_min, p.act_max, rounding)


def mul(a: np.ndarray, b: np.ndarray, *, params: MulParams, rounding: str) -> np.ndarray:
    p = params
    product = _centered(a, p.input_zero_points[0]) * _centered(b, p.input_zero_points[1])
    return _finish(product, p.output_multiplier, p.output_shift, p.output_zero_point,
                   p.act_min, p.act_max, rounding)


def _windows(padded: np.ndarray, kernel, strides, out_hw):
    """Yield the (N, OH, OW, C) slice of every kernel tap."""
    (kh, kw), (sh, sw), (oh, ow) = kernel, strides, out_hw
    for i in range(kh):
        for j in range(kw):
            yield padded[:, i: i + sh * (oh - 1) + 1: sh, j: j + sw * (ow - 1) + 1: sw]


def _pool_out_hw(x: np.ndarray, kernel, strides, pads) -> tuple[int, int]:
    top, left, bottom, right = pads
    return ((x.shape[1] + top + bottom - kernel[0]) // strides[0] + 1,
            (x.shape[2] + left + right - kernel[1]) // strides[1] + 1)


def _pad_hw(x: np.ndarray, pads, value) -> np.ndarray:
    top, left, bottom, right = pads
    return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=value)


def max_pool(x: np.ndarray, *, params: MaxPoolParams, rounding: str) -> np.ndarray:
    p = params
    out_hw = _pool_out_hw(x, p.kernel, p.strides, p.pads)
    padded = _pad_hw(x.astype(np.int32), p.pads, -(1 << 20))
    out = np.maximum.reduce(list(_windows(padded, p.kernel, p.strides, out_hw)))
    return np.clip(out, p.act_min, p.act_max).astype(np.int8)


def avg_pool(x: np.ndarray, *, params: AvgPoolParams, rounding: str) -> np.ndarray:
    p = params
    out_hw = _pool_out_hw(x, p.kernel, p.strides, p.pads)
    total = sum(_windows(_pad_hw(_centered(x, p.input_zero_point), p.pads, 0), p.kernel, p.strides, out_hw))
    if p.count_include_pad:
        count = np.full(total.shape, p.kernel[0] * p.kernel[1], dtype=np.int64)
    else:
        ones = _pad_hw(np.ones(x.shape, dtype=np.int64), p.pads, 0)
        count = sum(_windows(ones, p.kernel, p.strides, out_hw))
    return _finish(total, p.multiplier[count], p.shift[count], p.output_zero_point,
                   p.act_min, p.act_max, rounding)


def mean(x: np.ndarray, *, params: MeanParams, rounding: str) -> np.ndarray:
    p = params
    total = _centered(x, p.input_zero_point).reshape(p.outer, p.reduce, p.inner).sum(axis=1)
    return _finish(total, p.multiplier, p.shift, p.output_zero_point, -128, 127, rounding)


def requantize(x: np.ndarray, *, params: RequantizeParams, rounding: str) -> np.ndarray:
    p = params
    return _finish(_centered(x, p.input_zero_point), p.multiplier, p.shift, p.output_zero_point,
                   p.act_min, p.act_max, rounding)


def lut(x: np.ndarray, *, params: LutParams, rounding: str) -> np.ndarray:
    return params.table[x.astype(np.int64) + 128]


def softmax(x: np.ndarray, *, params: SoftmaxParams, rounding: str) -> np.ndarray:
    p = params
    x = x.astype(np.int64)
    e = p.exp_table[x - x.max(axis=-1, keepdims=True) + 255].astype(np.int64)
    denominator = e.sum(axis=-1, keepdims=True) << 16
    out = (e * p.inverse_scale + (denominator >> 1)) // denominator + p.output_zero_point
    return np.clip(out, -128, 127).astype(np.int8)


def pad(x: np.ndarray, *, params: PadParams, rounding: str) -> np.ndarray:
    if params.mode != "constant":
        return np.pad(x, params.pads, mode=params.mode)  # ONNX's reflect and edge are numpy's
    return np.pad(x, params.pads, constant_values=params.value)


def resize_nearest(x: np.ndarray, *, params: ResizeNearestParams, rounding: str) -> np.ndarray:
    return x[:, params.row_index][:, :, params.col_index]


def transpose(x: np.ndarray, *, params: TransposeParams, rounding: str) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(params.perm))


def reshape(x: np.ndarray, *, params: ReshapeParams, rounding: str) -> np.ndarray:
    return x.reshape(params.shape)


def concat(*xs: np.ndarray, params: ConcatParams, rounding: str) -> np.ndarray:
    return np.concatenate(xs, axis=params.axis)


def slice_(x: np.ndarray, *, params: SliceParams, rounding: str) -> np.ndarray:
    taken = [slice(None)] * x.ndim
    taken[params.axis] = slice(params.start, params.start + params.size)
    return np.ascontiguousarray(x[tuple(taken)])


def prelu(x: np.ndarray, *, params: PReluParams, rounding: str) -> np.ndarray:
    """Two requantizations, TFLite's int8 PRelu: the identity scale where x >= zp_in, the slope's per channel
    below (the slope folded into the multiplier, its sign applied to the input first)."""
    p = params
    along = [1] * x.ndim
    along[p.axis] = -1
    centered = _centered(x, p.input_zero_point)
    negative = mbqm(centered * p.negative_sign.astype(np.int64).reshape(along), p.negative_multiplier.reshape(along),
                    p.negative_shift.reshape(along), rounding)
    out = np.where(centered >= 0, mbqm(centered, p.positive_multiplier, p.positive_shift, rounding), negative)
    return np.clip(out + p.output_zero_point, p.act_min, p.act_max).astype(np.int8)


def resize_bilinear(x: np.ndarray, *, params: ResizeBilinearParams, rounding: str) -> np.ndarray:
    """Q10 row weights, then Q10 column weights: a Q20 sum (at most 2**27 in magnitude: exact in int32), rounded
    once: half away from zero (``"double"``, TFLite's default build) or half up (``"single"``)."""
    p, one = params, 1 << BILINEAR_FRACTION_BITS
    x = x.astype(np.int64)
    row_weight = p.row_fraction.astype(np.int64)[None, :, None, None]
    rows = x[:, p.row_low] * (one - row_weight) + x[:, p.row_high] * row_weight
    col_weight = p.col_fraction.astype(np.int64)[None, None, :, None]
    total = rows[:, :, p.col_low] * (one - col_weight) + rows[:, :, p.col_high] * col_weight
    bits, half = 2 * BILINEAR_FRACTION_BITS, 1 << (2 * BILINEAR_FRACTION_BITS - 1)
    if rounding == "single":
        out = (total + half) >> bits
    else:
        out = np.sign(total) * ((np.abs(total) + half) >> bits)
    return np.clip(out, -128, 127).astype(np.int8)


def _inverse_sqrt(variance: int) -> tuple[int, int]:
    """``(inverse, k)`` with ``1 / sqrt(variance) ~= inverse * 2**(k - 61)``: ``variance * 4**k`` lies in
    [2**60, 2**62), its floor square root ``r`` in [2**30, 2**31), ``inverse = round(2**61 / r)``
    (at most 2**31); (0, 0) for a variance of 0."""
    if variance == 0:
        return 0, 0
    k = max(0, (62 - variance.bit_length()) // 2)
    root = math.isqrt(variance << (2 * k))
    return ((1 << 61) + (root >> 1)) // root, k


def layer_norm(x: np.ndarray, *, params: LayerNormParams, rounding: str) -> np.ndarray:
    """LayerNorm of each (outer, inner) row over the middle axis, in integers (see LayerNormParams)."""
    p = params
    rows = (x.astype(np.int64) - p.input_zero_point).reshape(p.outer, p.reduce, p.inner).transpose(0, 2, 1)
    total = rows.sum(axis=-1, keepdims=True) if p.centered else np.zeros((*rows.shape[:-1], 1), np.int64)
    variance = p.reduce * (rows * rows).sum(axis=-1, keepdims=True) - total * total + p.epsilon_term
    pairs = [_inverse_sqrt(int(v)) for v in variance.reshape(-1)]
    inverse = np.array([pair[0] for pair in pairs], dtype=np.int64).reshape(variance.shape)
    exponent = 61 - p.fraction_bits - np.array([pair[1] for pair in pairs], dtype=np.int64).reshape(variance.shape)
    normalized = ((p.reduce * rows - total) * inverse + (np.int64(1) << (exponent - 1))) >> exponent
    along = (-1, 1) if p.affine_inner else (1, -1)  # rows are (outer, inner, D)
    scaled = (mbqm(normalized, p.multiplier.reshape(along), p.shift.reshape(along), rounding)
              + p.bias.reshape(along))
    out = ((scaled + (1 << (p.bias_bits - 1))) >> p.bias_bits) + p.output_zero_point
    out = np.clip(out, p.act_min, p.act_max).astype(np.int8)
    return np.ascontiguousarray(out.transpose(0, 2, 1)).reshape(x.shape)


def _spec(kind, reference, params_type, c_kernel, in_place=()) -> tuple[str, OpSpec]:
    return kind, OpSpec(kind=kind, reference=reference, params_type=params_type, c_kernel=c_kernel,
                        in_place=in_place)


OPS: dict[str, OpSpec] = dict([
    _spec("conv2d", conv2d, Conv2dParams, "eo_conv2d_s8"),
    _spec("fully_connected", fully_connected, FullyConnectedParams, "eo_fully_connected_s8"),
    _spec("batch_matmul", batch_matmul, BatchMatMulParams, "eo_batch_matmul_s8"),
    _spec("conv2d_add", conv2d_add, Conv2dAddParams, "eo_conv2d_add_s8", in_place=(1,)),
    _spec("conv_transpose2d", conv_transpose2d, ConvTranspose2dParams, "eo_conv_transpose2d_s8"),
    _spec("add", add, AddParams, "eo_add_s8", in_place=(0, 1)),
    _spec("mul", mul, MulParams, "eo_mul_s8", in_place=(0, 1)),
    _spec("max_pool", max_pool, MaxPoolParams, "eo_max_pool_s8"),
    _spec("avg_pool", avg_pool, AvgPoolParams, "eo_avg_pool_s8"),
    _spec("mean", mean, MeanParams, "eo_mean_s8"),
    _spec("requantize", requantize, RequantizeParams, "eo_requantize_s8", in_place=(0,)),
    _spec("lut", lut, LutParams, "eo_lut_s8", in_place=(0,)),
    _spec("softmax", softmax, SoftmaxParams, "eo_softmax_s8", in_place=(0,)),
    _spec("pad", pad, PadParams, "eo_pad_s8"),
    _spec("resize_nearest", resize_nearest, ResizeNearestParams, "eo_resize_nearest_s8"),
    _spec("transpose", transpose, TransposeParams, "eo_transpose_s8"),
    _spec("reshape", reshape, ReshapeParams, "eo_copy_s8", in_place=(0,)),
    _spec("concat", concat, ConcatParams, "eo_concat_s8"),
    _spec("slice", slice_, SliceParams, "eo_slice_s8"),
    _spec("prelu", prelu, PReluParams, "eo_prelu_s8", in_place=(0,)),
    _spec("resize_bilinear", resize_bilinear, ResizeBilinearParams, "eo_resize_bilinear_s8"),
    _spec("layer_norm", layer_norm, LayerNormParams, "eo_layer_norm_s8", in_place=(0,)),
    _spec("rnn", recurrent, RecurrentParams, "eo_rnn_s8"),
    _spec("gru", recurrent, RecurrentParams, "eo_gru_s8"),
    _spec("lstm", recurrent, RecurrentParams, "eo_lstm_s8"),
])

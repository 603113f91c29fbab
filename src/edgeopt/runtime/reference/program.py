"""The integer program a QDQ model lowers to: tensors, constants and a schedule of ops.

Every activation is an int8 tensor with one scale and zero point (real value
``scale * (q - zero_point)``). Rank-4 activations are stored NHWC (ONNX's
NCHW is the *logical* layout); ``TensorInfo.layout`` is the permutation from
logical to stored axes, so ``stored = logical.transpose(layout)``.

An :class:`IntOp` names its kind (a key of the ops table in ``ops.py``), its
input and output tensors, and a frozen parameter object in which every
quantization detail (int8 weights in the kernel's layout, int32 bias,
fixed-point multipliers and shifts, zero points, clamp range, lookup tables)
was folded at lowering time. Nothing in a program is float except the scales
kept for quantizing inputs and dequantizing outputs at the boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "BILINEAR_FRACTION_BITS",
    "AddParams",
    "AvgPoolParams",
    "BatchMatMulParams",
    "ConcatParams",
    "Conv2dAddParams",
    "Conv2dParams",
    "ConvTranspose2dParams",
    "FullyConnectedParams",
        "IntOp",
    "LayerNormParams",
    "LutParams",
    "MaxPoolParams",
    "MeanParams",
    "MulParams",
    "PReluParams",
    "PadParams",
    "RecurrentParams",
    "Program",
    "ProgramIO",
    "RequantizeParams",
    "ReshapeParams",
    "ResizeBilinearParams",
    "ResizeNearestParams",
    "SliceParams",
    "SoftmaxParams",
    "TensorInfo",
    "TransposeParams",
    "stored_layout",
]

_NHWC = (0, 2, 3, 1)


def stored_layout(rank: int) -> tuple[int, ...]:
    """Logical-to-stored axis permutation: NCHW -> NHWC for rank 4, identity otherwise."""
    return _NHWC if rank == 4 else tuple(range(rank))


@dataclass(frozen=True, kw_only=True)
class TensorInfo:
    """An int8 tensor: stored shape, quantization, and its logical (ONNX) layout."""

    name: str
    shape: tuple[int, ...]
    scale: float
    zero_point: int
    layout: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def logical_shape(self) -> tuple[int, ...]:
        inverse = np.argsort(self.layout)
        return tuple(self.shape[i] for i in inverse)


@dataclass(frozen=True, kw_only=True, eq=False)
class _ConvFields:
    """What a conv and a transposed conv both hold: OHWI int8 weights (I = input channels / group), per
    output channel int32 bias and requantization, zero points, strides, dilations, groups, clamp."""

    weight: np.ndarray  # int8 (O, KH, KW, I/group)
    bias: np.ndarray  # int32 (O,)
    multiplier: np.ndarray  # int32 (O,) Q31
    shift: np.ndarray  # int8 (O,): in [-31, 30]
    input_zero_point: int
    output_zero_point: int
    strides: tuple[int, int]
    dilations: tuple[int, int]
    group: int
    act_min: int
    act_max: int


@dataclass(frozen=True, kw_only=True, eq=False)
class Conv2dParams(_ConvFields):
    """NHWC conv; weight is OHWI with I = input channels / group (depthwise: group = C_in)."""

    pads: tuple[int, int, int, int]  # top, left, bottom, right


@dataclass(frozen=True, kw_only=True, eq=False)
class ConvTranspose2dParams(_ConvFields):
    """NHWC transposed conv, read in gather form with the weight in OHWI (I = input channels / group).

    y[n, oy, ox, o] = requant(bias[o] + sum of (x[n, iy, ix, i] - zp_in) * weight[o, ky, kx, i] over the
    taps with ``iy * stride_h + ky * dilation_h = oy + pad_top`` and ``ix * stride_w + kx * dilation_w =
    ox + pad_left`` inside the input, and the channels i of o's group): the scatter of every input pixel
    through the kernel, cropped by ``pads`` at the start and to ``output_hw`` (ONNX's output_padding and
    output_shape only move the end).
    """

    pads: tuple[int, int]  # top, left
    output_hw: tuple[int, int]


@dataclass(frozen=True, kw_only=True, eq=False)
class FullyConnectedParams:
    """y[..., o] = requant(sum_k (x[..., k] - zp_in) * weight[o, k] + bias[o])."""

    weight: np.ndarray  # int8 (O, K)
    bias: np.ndarray  # int32 (O,)
    multiplier: np.ndarray  # int32 (O,)
    shift: np.ndarray  # int8 (O,): in [-31, 30]
    input_zero_point: int
    output_zero_point: int
    act_min: int
    act_max: int


@dataclass(frozen=True, kw_only=True)
class BatchMatMulParams:
    """y[b, m, n] = requant(sum_k (a[b, m, k] - a_zp)(b[b, k, n] - b_zp)), both operands activations in
    logical (row-major) order, one multiplier."""

    batch: int
    rows: int
    depth: int
    columns: int
    a_zero_point: int
    b_zero_point: int
    output_zero_point: int
    multiplier: int
    shift: int
    act_min: int
    act_max: int


@dataclass(frozen=True, kw_only=True)
class AddParams:
    """TFLite's quantized add: both inputs moved to a common scale with ``left_shift`` headroom."""

    input_zero_points: tuple[int, int]
    input_multipliers: tuple[int, int]
    input_shifts: tuple[int, int]
    output_multiplier: int
    output_shift: int
    output_zero_point: int
    left_shift: int
    act_min: int
    act_max: int


@dataclass(frozen=True, kw_only=True, eq=False)
class Conv2dAddParams:
    """A conv whose int8 output feeds only an Add with a same-shape tensor: ``add(conv(x), shortcut)``.

    ``conv`` requantizes to the intermediate int8 tensor (its clamp included) exactly as the
    unfused conv does; ``add`` is oriented so that its operand 0 is that intermediate and
    operand 1 the shortcut (TFLite's add is symmetric in its operands, so the orientation
    does not change a bit).
    """

    conv: Conv2dParams
    add: AddParams


@dataclass(frozen=True, kw_only=True)
class MulParams:
    """y = requant((a - zp_a) * (b - zp_b)) with multiplier s_a * s_b / s_y."""

    input_zero_points: tuple[int, int]
    output_multiplier: int
    output_shift: int
    output_zero_point: int
    act_min: int
    act_max: int


@dataclass(frozen=True, kw_only=True)
class MaxPoolParams:
    """NHWC max pool over the valid part of each window; same quantization in and out."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    act_min: int
    act_max: int


@dataclass(frozen=True, kw_only=True, eq=False)
class AvgPoolParams:
    """y = requant(sum(x - zp_in)) with multiplier ``s_in / (count * s_out)`` picked by window count."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    count_include_pad: bool
    input_zero_point: int
    output_zero_point: int
    multiplier: np.ndarray  # int32 (KH*KW + 1,), indexed by count
    shift: np.ndarray  # int8 (KH*KW + 1,)
    act_min: int
    act_max: int


@dataclass(frozen=True, kw_only=True)
class MeanParams:
    """Mean over the middle axis of a stored tensor viewed as (outer, reduce, inner)."""

    outer: int
    reduce: int
    inner: int
    input_zero_point: int
    output_zero_point: int
    multiplier: int  # s_in / (reduce * s_out)
    shift: int


@dataclass(frozen=True, kw_only=True)
class RequantizeParams:
    """y = clamp(requant(x - zp_in) + zp_out): rescale, or a clamp (Relu/Clip) when scales match."""

    input_zero_point: int
    output_zero_point: int
    multiplier: int
    shift: int
    act_min: int
    act_max: int


@dataclass(frozen=True, kw_only=True, eq=False)
class LutParams:
    """y = table[x + 128]; the table was computed at lowering time from the scales."""

    table: np.ndarray  # int8 (256,)


@dataclass(frozen=True, kw_only=True, eq=False)
class SoftmaxParams:
    """Softmax over the last stored axis in fixed point.

    e = exp_table[x - max + 255] (Q16 of exp(s_in * (x - max))), then
    y = zp_out + floor((e * inverse_scale + sum / 2) / sum) with
    inverse_scale = round(2**16 / s_out) and sum = sum(e) << 16 (int64).
    """

    exp_table: np.ndarray  # int32 (256,)
    inverse_scale: int
    output_zero_point: int


@dataclass(frozen=True, kw_only=True)
class PadParams:
    """Padding of the stored tensor, ``pads[axis] = (before, after)``: with ``value`` (``mode`` "constant"),
    or the values mirrored about the edge ("reflect", the edge itself not repeated) or repeating it ("edge")."""

    pads: tuple[tuple[int, int], ...]
    value: int
    mode: str = "constant"


@dataclass(frozen=True, kw_only=True, eq=False)
class ResizeNearestParams:
    """NHWC nearest resize: y[n, i, j, c] = x[n, row_index[i], col_index[j], c]."""

    row_index: np.ndarray  # int32 (OH,)
    col_index: np.ndarray  # int32 (OW,)


@dataclass(frozen=True, kw_only=True)
class TransposeParams:
    perm: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class ReshapeParams:
    """Same bytes, new shape (a copy, or nothing when the planner aliases it)."""

    shape: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class ConcatParams:
    """Concatenation along a stored axis; inputs already share the output's quantization."""

    axis: int


@dataclass(frozen=True, kw_only=True)
class SliceParams:
    """``y = x[..., start:start + size, ...]`` along one stored axis (step 1): Slice, and each output of Split."""

    axis: int
    start: int
    size: int


@dataclass(frozen=True, kw_only=True, eq=False)
class PReluParams:
    """y = zp_out + requant(x - zp_in) with ``s_in / s_out`` where x >= zp_in, else
    ``zp_out + requant((x - zp_in) * negative_sign[c], negative_multiplier[c], negative_shift[c])`` with
    ``|slope[c]| * s_in / s_out``: the slope varies along the stored ``axis`` (one value: any size-1 array)."""

    axis: int
    input_zero_point: int
    output_zero_point: int
    positive_multiplier: int
    positive_shift: int
    negative_multiplier: np.ndarray  # int32 (C,)
    negative_shift: np.ndarray  # int8 (C,)
    negative_sign: np.ndarray  # int8 (C,): the sign of the slope, -1, 0 or 1
    act_min: int
    act_max: int


@dataclass(frozen=True, kw_only=True, eq=False)
class RecurrentParams:
    """An ONNX RNN, GRU or LSTM (``cell``) in integers (:mod:`edgeopt.runtime.reference.rnn` has the arithmetic).

    ``x`` is read at ``t * x_strides[0] + b * x_strides[1] + i``; the output (``output`` 0: Y, 1: Y_h, 2:
    an LSTM's Y_c) is written at ``t * st + d * sd + b * sb + j * sh`` for ``y_strides = (st, sd, sb, sh)``
    (t = 0 for Y_h and Y_c). Direction 1 of two, or the one direction when ``reverse``, runs from the last
    step back. G gates: 1 (RNN), 3 (GRU: z, r, n) or 4 (LSTM: i, o, f, c). A streaming model's initial states
    (``state_inputs``) are op inputs after ``x``, int8 ``[D, B, H]``, moved to Q15.
    """

    cell: str  # "rnn", "gru" or "lstm"
    output: int
    steps: int
    batch: int
    input_size: int
    hidden: int
    directions: int
    reverse: bool
    linear_before_reset: bool  # GRU only
    output_size: int
    x_strides: tuple[int, int]
    y_strides: tuple[int, int, int, int]
    input_zero_point: int
    w: np.ndarray  # int8 (D, G*H, I)
    r: np.ndarray  # int8 (D, G*H, H)
    # one int16 multiplier per row and one shift per matrix (rnn.scale_rows): W's product to Q12 steps is
    # s_x * s_w[row] = w_multiplier[row] / 2**w_shift; R's from Q15 to Q12 s_r[row] = r_multiplier[row] / 2**r_shift
    w_multiplier: np.ndarray  # int16 (G*H,)
    w_shift: int
    r_multiplier: np.ndarray  # int16 (G*H,)
    r_shift: int
    w_bias: np.ndarray  # int16 (D, G*H): Q12 over 2**-bias_shift
    r_bias: np.ndarray  # int16 (D, G*H): Q12 over 2**-bias_shift
    bias_shift: int  # 0 unless a bias reaches 8 (32,768 Q12 steps)
    initial: np.ndarray  # int16 (D, B, H), Q15: the constant initial state
    initial_cell: np.ndarray  # int32 (D, B, H), Q15 (zeros for a GRU)
    # initial states read from input tensors instead, in the op's inputs after x (int8 [D, B, H]): for each,
    # (0 for h or 1 for c, its zero point, the multiplier and shift of its scale to Q15)
    state_inputs: tuple[tuple[int, int, int, int], ...] = ()
    output_multiplier: int  # 2**-15 / s_out
    output_shift: int
    output_zero_point: int
    act_min: int
    act_max: int


@dataclass(frozen=True, kw_only=True, eq=False)
class LayerNormParams:
    """LayerNorm over the middle axis of a stored tensor viewed as (outer, reduce, inner), in integers.

    Per row of ``D = reduce`` values: ``S1 = sum(x)``, ``S2 = sum(x * x)`` (int64), ``d = D * x - S1`` and
    ``V = D * S2 - S1**2 + epsilon_term`` (``D**2 * (var + eps)`` in input steps squared), so that
    ``(x - mean) / sqrt(var + eps) = d / sqrt(V)``. ``1 / sqrt(V) = inverse * 2**(k - 61)`` (integer
    square root, one division per row); ``n = d * inverse`` rounded to ``fraction_bits`` bits; then per
    position ``c`` of the row ``y = requant(n, multiplier[c], shift[c]) + bias[c]`` (``gamma / s_out`` and
    ``beta / s_out``, with ``bias_bits`` extra bits), rounded down by ``bias_bits``, plus the zero point.
    Not ``centered`` (RMSNorm, L2 norm): ``x`` is ``q - input_zero_point`` and ``S1`` is 0.
    """

    outer: int
    reduce: int
    inner: int
    epsilon_term: int  # round(D**2 * eps / s_in**2)
    fraction_bits: int
    bias_bits: int
    multiplier: np.ndarray  # int32 (D,), negative where gamma is
    shift: np.ndarray  # int8 (D,)
    bias: np.ndarray  # int32 (D,)
    output_zero_point: int
    act_min: int
    act_max: int
    #: InstanceNorm: multiplier, shift and bias per inner position (the channel of NHWC), not per row position
    affine_inner: bool = False
    centered: bool = True
    input_zero_point: int = 0  # subtracted when not centered (a centered row is shift-invariant)


BILINEAR_FRACTION_BITS = 10  # of a bilinear weight: 1.0 is 1024, as in TFLite (and EO_BILINEAR_BITS in the C)


@dataclass(frozen=True, kw_only=True, eq=False)
class ResizeBilinearParams:
    """NHWC bilinear resize with Q10 weights (TFLite's int8 ResizeBilinear), same quantization in and out:
    ``y[n, i, j, c] = round(sum of x[n, r, k, c] * wr * wk / 2**20)`` over rows ``r`` in (row_low[i], row_high[i])
    with weights (1024 - row_fraction[i], row_fraction[i]), columns ``k`` alike."""

    row_low: np.ndarray  # int32 (OH,)
    row_high: np.ndarray
    row_fraction: np.ndarray  # int32 (OH,) in [0, 1024]
    col_low: np.ndarray  # int32 (OW,)
    col_high: np.ndarray
    col_fraction: np.ndarray


@dataclass(frozen=True, kw_only=True)
class IntOp:
    """One scheduled integer op; ``node`` is the ONNX node it came from (for messages)."""

    kind: str
    inputs: tuple[str, ...]
    output: str
    params: object
    node: str
    scratch: str | None = None  # an arena tensor the C kernel works in during this op only (a GRU's state)


@dataclass(frozen=True, kw_only=True)
class ProgramIO:
    """A model input or output: the ONNX value name and the program tensor behind it."""

    name: str
    tensor: str
    is_float: bool


@dataclass(frozen=True, kw_only=True, eq=False)
class Program:
    """Tensors, int8 constants and the op schedule of a lowered model."""

    tensors: dict[str, TensorInfo]
    constants: dict[str, np.ndarray] = field(default_factory=dict)  # int8, stored layout
    ops: tuple[IntOp, ...]
    inputs: tuple[ProgramIO, ...]
    outputs: tuple[ProgramIO, ...]

"""C parameter packing, one function per op kind of the ops table.

``PACKERS[kind](op, context)`` returns the C declarations the op needs (its
``const`` weight/table arrays and its parameter struct) and the kernel call.
The kernel name comes from the ops table (``OPS[kind].c_kernel``), so the
reference semantics and the C code are looked up from one place; a depthwise
``conv2d`` calls ``eo_depthwise_conv2d_s8`` (the same arithmetic, its weight
laid out HWC), so a model without one does not link it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgeopt.errors import CodegenError, UnsupportedOpError
from edgeopt.runtime.reference.rnn import TANH_TABLE
from edgeopt.runtime.reference.ops import OPS
from edgeopt.runtime.reference.program import IntOp, Program

__all__ = ["C_TYPE_BYTES", "PACKERS", "PackContext", "c_array"]

_C_TYPES = {np.dtype(np.int8): "int8_t", np.dtype(np.int16): "int16_t", np.dtype(np.int32): "int32_t"}
#: The bytes of an element of each C type :func:`c_array` declares.
C_TYPE_BYTES = {c_type: dtype.itemsize for dtype, c_type in _C_TYPES.items()}


def c_array(name: str, array: np.ndarray) -> str:
    """``static const <type> name[n] = {...};`` (flash) for an int8/int16/int32 array."""
    flat = np.ascontiguousarray(array).reshape(-1)
    c_type = _C_TYPES[flat.dtype]
    rows = [", ".join(str(int(v)) for v in flat[i:i + 24]) for i in range(0, max(len(flat), 1), 24)]
    body = ",\n    ".join(row for row in rows if row) or "0"
    return f"static const {c_type} {name}[{max(len(flat), 1)}] = {{\n    {body}\n}};"


@dataclass(frozen=True)
class PackContext:
    """What a packer needs besides the op: the program and C expressions of tensor pointers."""

    program: Program
    pointer: Callable[[str], str]
    index: int

    def shape(self, tensor: str) -> tuple[int, ...]:
        return self.program.tensors[tensor].shape

    def size(self, tensor: str) -> int:
        return self.program.tensors[tensor].size


def _struct(c_type: str, name: str, fields: dict[str, object]) -> str:
    return f"static const {c_type} {name} = {_c_value(fields)};"


def _c_value(value) -> str:
    """A C initializer: dicts are structs (designated fields), lists and tuples arrays."""
    if isinstance(value, dict):
        return "{" + ", ".join(f".{key} = {_c_value(field)}" for key, field in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "{" + ", ".join(_c_value(v) for v in value) + "}"
    return str(int(value)) if not isinstance(value, str) else value


def _call(op: IntOp, ctx: PackContext, params: str, inputs=None, kernel: str | None = None) -> str:
    args = ", ".join(ctx.pointer(name) for name in (inputs or op.inputs))
    return f"{kernel or OPS[op.kind].c_kernel}(&{params}, {args}, {ctx.pointer(op.output)});"


def _shifts(shift: np.ndarray) -> np.ndarray:
    """Per-channel shifts as the C stores them: int8 (they lie in [-31, 30]), a byte a channel instead of four."""
    shift = np.asarray(shift)
    if shift.size and (shift.min() < -128 or shift.max() > 127):
        raise CodegenError("a per-channel shift lies outside int8")
    return shift.astype(np.int8)


def _requant_arrays(prefix: str, p, bias: np.ndarray | None = None) -> list[str]:
    return [c_array(f"{prefix}_bias", p.bias if bias is None else bias), c_array(f"{prefix}_multiplier", p.multiplier),
            c_array(f"{prefix}_shift", _shifts(p.shift))]


def _zero_point_sums(p) -> np.ndarray:
    """``zp_in * sum(weight[o])`` per output channel: ``sum((x - zp) w) = sum(x w) - zp sum(w)``, so a kernel's
    inner loop multiplies the int8 values alone (one subtraction less per multiply-accumulate). Read after
    :func:`_check_accumulator`, whose bound also keeps ``bias - zp_in * sum(w)`` within int32."""
    return (p.input_zero_point * p.weight.reshape(len(p.bias), -1).astype(np.int64).sum(1)).astype(np.int32)


def _check_accumulator(p, node: str) -> None:
    """Refuse a layer whose int32 accumulator could overflow: the C sums in int32 (the reference in int64,
    saturating), so ``|bias| + (128 + |zp|) sum|w|`` per output channel must stay below 2**31. A bias that
    large (a layer of tiny weights, its bias clipped to int32's limit) leaves no room for the products."""
    magnitudes = np.abs(p.weight.reshape(len(p.bias), -1).astype(np.int64)).sum(1)
    worst = np.abs(np.asarray(p.bias, np.int64)) + (128 + abs(int(p.input_zero_point))) * magnitudes
    if worst.max(initial=0) >= 2**31:
        raise CodegenError(f"{node}: its int32 bias ({int(np.abs(p.bias).max())} at most) leaves no room in the C's "
                           "int32 accumulator for the sum of its products: its weights are tiny next to its bias "
                           "(check the layer's float weights and bias, or keep it out of this model)")


def _conv_fields(p, name: str, in_shape, out_shape, node: str, *, zero_point_sums: bool = True,
                 weight: np.ndarray | None = None) -> tuple[list[str], dict[str, object]]:
    """The const arrays and the ``eo_conv2d_params`` fields of conv params ``p`` (arrays named ``name_*``);
    ``zero_point_sums``: with :func:`_zero_point_sums` (conv2d; the transposed conv's gather does not read it);
    ``weight``: the weight in another layout than ``p``'s OHWI (a depthwise conv's HWC)."""
    n, h, w, c = in_shape
    _, out_h, out_w, out_c = out_shape
    _check_accumulator(p, node)
    decls = [c_array(f"{name}_weight", p.weight if weight is None else weight), *_requant_arrays(name, p)]
    if zero_point_sums:
        decls.append(c_array(f"{name}_zero_point_sums", _zero_point_sums(p)))
    fields = dict(
        n=n, h=h, w=w, c=c, out_h=out_h, out_w=out_w, out_c=out_c, kernel_h=p.weight.shape[1],
        kernel_w=p.weight.shape[2], group=p.group, stride_h=p.strides[0], stride_w=p.strides[1],
        dilation_h=p.dilations[0], dilation_w=p.dilations[1], pad_top=p.pads[0], pad_left=p.pads[1],
        input_zero_point=p.input_zero_point, output_zero_point=p.output_zero_point, act_min=p.act_min,
        act_max=p.act_max, weight=f"{name}_weight", bias=f"{name}_bias", multiplier=f"{name}_multiplier",
        shift=f"{name}_shift", zero_point_sums=f"{name}_zero_point_sums" if zero_point_sums else "0")
    return decls, fields


def _depthwise_hwc(p, in_shape, out_shape) -> np.ndarray | None:
    """A depthwise conv's weight HWC ``[kh, kw, C]``, as ``eo_depthwise_conv2d_s8`` reads it (its channels
    contiguous per tap); None for other convs (OHWI, ``eo_conv2d_s8``)."""
    if not (p.group > 1 and p.group == in_shape[3] == out_shape[3]):
        return None
    return np.ascontiguousarray(p.weight[:, :, :, 0].transpose(1, 2, 0))


def pack_conv2d(op: IntOp, ctx: PackContext):
    name = f"op{ctx.index}"
    in_shape, out_shape = ctx.shape(op.inputs[0]), ctx.shape(op.output)
    depthwise = _depthwise_hwc(op.params, in_shape, out_shape)
    decls, fields = _conv_fields(op.params, name, in_shape, out_shape, op.node, weight=depthwise)
    decls.append(_struct("eo_conv2d_params", f"{name}_params", fields))
    return decls, _call(op, ctx, f"{name}_params", kernel=None if depthwise is None else "eo_depthwise_conv2d_s8")


def pack_conv2d_add(op: IntOp, ctx: PackContext):
    name = f"op{ctx.index}"
    decls, conv = _conv_fields(op.params.conv, name, ctx.shape(op.inputs[0]), ctx.shape(op.output), op.node)
    decls.append(_struct("eo_conv2d_add_params", f"{name}_params", dict(conv=conv, add=_add_fields(op.params.add))))
    return decls, _call(op, ctx, f"{name}_params")


def pack_conv_transpose2d(op: IntOp, ctx: PackContext):
    """A conv's fields: pad_top/pad_left are where the output starts in the uncropped transposed output."""
    name = f"op{ctx.index}"
    decls, fields = _conv_fields(op.params, name, ctx.shape(op.inputs[0]), ctx.shape(op.output), op.node,
                                 zero_point_sums=False)
    decls.append(_struct("eo_conv_transpose2d_params", f"{name}_params", fields))
    return decls, _call(op, ctx, f"{name}_params")


def pack_fully_connected(op: IntOp, ctx: PackContext):
    p, name = op.params, f"op{ctx.index}"
    out_features, depth = p.weight.shape
    _check_accumulator(p, op.node)
    decls = [c_array(f"{name}_weight", p.weight), *_requant_arrays(name, p, p.bias - _zero_point_sums(p))]
    decls.append(_struct("eo_fully_connected_params", f"{name}_params", dict(
        rows=ctx.size(op.inputs[0]) // depth, depth=depth, out_features=out_features,
        input_zero_point=p.input_zero_point, output_zero_point=p.output_zero_point, act_min=p.act_min,
        act_max=p.act_max, weight=f"{name}_weight", bias=f"{name}_bias", multiplier=f"{name}_multiplier",
        shift=f"{name}_shift")))
    return decls, _call(op, ctx, f"{name}_params")


def _broadcast_strides(in_shape, out_shape) -> list[int]:
    shape = (1,) * (4 - len(in_shape)) + tuple(in_shape)
    contiguous = [int(np.prod(shape[d + 1:], dtype=np.int64)) for d in range(4)]
    return [0 if shape[d] == 1 and out_shape[d] != 1 else contiguous[d] for d in range(4)]


def _collapsed(a_shape, b_shape, out) -> tuple[tuple[int, ...], ...]:
    """The same broadcast over fewer axes: unit output axes dropped, and neighbouring axes merged where
    each input either spans both or is broadcast along both (Swin's window-mask Add, [1, nW, 1, N, N] to
    [B, nW, heads, N, N], is a rank-3 broadcast)."""
    a_full = (1,) * (len(out) - len(a_shape)) + tuple(a_shape)
    b_full = (1,) * (len(out) - len(b_shape)) + tuple(b_shape)
    merged: list[list[int]] = []  # [size, a spans it, b spans it]
    for size, a, b in zip(out, a_full, b_full):
        if size == 1:
            continue
        kind = [a == size, b == size]
        if merged and merged[-1][1:] == kind:
            merged[-1][0] *= size
        else:
            merged.append([size, *kind])
    merged = merged or [[1, True, True]]
    return (tuple(m[0] for m in merged), tuple(m[0] if m[1] else 1 for m in merged),
            tuple(m[0] if m[2] else 1 for m in merged))


def _binary_geometry(op: IntOp, ctx: PackContext) -> dict[str, object]:
    out, a_shape, b_shape = ctx.shape(op.output), ctx.shape(op.inputs[0]), ctx.shape(op.inputs[1])
    if len(out) > 4:
        out, a_shape, b_shape = _collapsed(a_shape, b_shape, out)
        if len(out) > 4:
            raise UnsupportedOpError(f"{op.node}: a broadcast over {len(out)} axes that cannot be merged into 4 "
                                     "(the C kernels' limit)")
    out4 = (1,) * (4 - len(out)) + tuple(out)
    return dict(shape=out4, a_stride=_broadcast_strides(a_shape, out4), b_stride=_broadcast_strides(b_shape, out4))


def _add_fields(p) -> dict[str, object]:
    """The quantization fields of ``eo_add_params`` (the geometry is the caller's)."""
    return dict(a_zero_point=p.input_zero_points[0], b_zero_point=p.input_zero_points[1],
                a_multiplier=p.input_multipliers[0], b_multiplier=p.input_multipliers[1],
                a_shift=p.input_shifts[0], b_shift=p.input_shifts[1], output_multiplier=p.output_multiplier,
                output_shift=p.output_shift, output_zero_point=p.output_zero_point, left_shift=p.left_shift,
                act_min=p.act_min, act_max=p.act_max)


def pack_add(op: IntOp, ctx: PackContext):
    name = f"op{ctx.index}_params"
    fields = _binary_geometry(op, ctx) | _add_fields(op.params)
    return [_struct("eo_add_params", name, fields)], _call(op, ctx, name)


def pack_mul(op: IntOp, ctx: PackContext):
    p, name = op.params, f"op{ctx.index}_params"
    fields = _binary_geometry(op, ctx) | dict(
        a_zero_point=p.input_zero_points[0], b_zero_point=p.input_zero_points[1],
        output_multiplier=p.output_multiplier, output_shift=p.output_shift,
        output_zero_point=p.output_zero_point, act_min=p.act_min, act_max=p.act_max)
    return [_struct("eo_mul_params", name, fields)], _call(op, ctx, name)


def _pool_fields(op: IntOp, ctx: PackContext) -> dict[str, object]:
    p = op.params
    n, h, w, c = ctx.shape(op.inputs[0])
    _, out_h, out_w, _ = ctx.shape(op.output)
    return dict(n=n, h=h, w=w, c=c, out_h=out_h, out_w=out_w, kernel_h=p.kernel[0], kernel_w=p.kernel[1],
                stride_h=p.strides[0], stride_w=p.strides[1], pad_top=p.pads[0], pad_left=p.pads[1])


def pack_max_pool(op: IntOp, ctx: PackContext):
    name = f"op{ctx.index}_params"
    fields = _pool_fields(op, ctx) | dict(act_min=op.params.act_min, act_max=op.params.act_max)
    return [_struct("eo_max_pool_params", name, fields)], _call(op, ctx, name)


def pack_avg_pool(op: IntOp, ctx: PackContext):
    p, prefix = op.params, f"op{ctx.index}"
    decls = [c_array(f"{prefix}_multiplier", p.multiplier), c_array(f"{prefix}_shift", _shifts(p.shift))]
    fields = _pool_fields(op, ctx) | dict(
        pad_bottom=p.pads[2], pad_right=p.pads[3], count_include_pad=int(p.count_include_pad),
        input_zero_point=p.input_zero_point, output_zero_point=p.output_zero_point, act_min=p.act_min,
        act_max=p.act_max, multiplier=f"{prefix}_multiplier", shift=f"{prefix}_shift")
    decls.append(_struct("eo_avg_pool_params", f"{prefix}_params", fields))
    return decls, _call(op, ctx, f"{prefix}_params")


def pack_mean(op: IntOp, ctx: PackContext):
    p, name = op.params, f"op{ctx.index}_params"
    fields = dict(outer=p.outer, reduce=p.reduce, inner=p.inner, input_zero_point=p.input_zero_point,
                  output_zero_point=p.output_zero_point, multiplier=p.multiplier, shift=p.shift)
    return [_struct("eo_mean_params", name, fields)], _call(op, ctx, name)


def pack_batch_matmul(op: IntOp, ctx: PackContext):
    p, name = op.params, f"op{ctx.index}_params"
    fields = {field: getattr(p, field) for field in (
        "batch", "rows", "depth", "columns", "a_zero_point", "b_zero_point", "output_zero_point", "multiplier",
        "shift", "act_min", "act_max")}
    return [_struct("eo_batch_matmul_params", name, fields)], _call(op, ctx, name)


def pack_requantize(op: IntOp, ctx: PackContext):
    p, name = op.params, f"op{ctx.index}_params"
    fields = dict(size=ctx.size(op.output), input_zero_point=p.input_zero_point,
                  output_zero_point=p.output_zero_point, multiplier=p.multiplier, shift=p.shift,
                  act_min=p.act_min, act_max=p.act_max)
    return [_struct("eo_requantize_params", name, fields)], _call(op, ctx, name)


def pack_lut(op: IntOp, ctx: PackContext):
    prefix = f"op{ctx.index}"
    decls = [c_array(f"{prefix}_table", op.params.table),
             _struct("eo_lut_params", f"{prefix}_params", dict(size=ctx.size(op.output), table=f"{prefix}_table"))]
    return decls, _call(op, ctx, f"{prefix}_params")


def pack_softmax(op: IntOp, ctx: PackContext):
    p, prefix = op.params, f"op{ctx.index}"
    depth = ctx.shape(op.output)[-1]
    decls = [c_array(f"{prefix}_exp", p.exp_table),
             _struct("eo_softmax_params", f"{prefix}_params", dict(
                 rows=ctx.size(op.output) // depth, depth=depth, exp_table=f"{prefix}_exp",
                 inverse_scale=f"(int64_t){p.inverse_scale}", output_zero_point=p.output_zero_point))]
    return decls, _call(op, ctx, f"{prefix}_params")


#: eo_pad_params.mode for each PadParams.mode.
_PAD_MODES = {"constant": 0, "reflect": 1, "edge": 2}


def pack_pad(op: IntOp, ctx: PackContext):
    p, name = op.params, f"op{ctx.index}_params"
    shape = ctx.shape(op.inputs[0])
    if len(shape) > 4:
        raise UnsupportedOpError(f"{op.node}: the C pads tensors of rank <= 4 (this one has rank {len(shape)})")
    fill = 4 - len(shape)
    fields = dict(in_shape=(1,) * fill + tuple(shape), before=(0,) * fill + tuple(b for b, _ in p.pads),
                  after=(0,) * fill + tuple(a for _, a in p.pads), value=p.value, mode=_PAD_MODES[p.mode])
    return [_struct("eo_pad_params", name, fields)], _call(op, ctx, name)


def pack_resize_nearest(op: IntOp, ctx: PackContext):
    p, prefix = op.params, f"op{ctx.index}"
    n, h, w, c = ctx.shape(op.inputs[0])
    _, out_h, out_w, _ = ctx.shape(op.output)
    decls = [c_array(f"{prefix}_rows", p.row_index.astype(np.int32)),
             c_array(f"{prefix}_cols", p.col_index.astype(np.int32)),
             _struct("eo_resize_nearest_params", f"{prefix}_params", dict(
                 n=n, h=h, w=w, c=c, out_h=out_h, out_w=out_w, row_index=f"{prefix}_rows",
                 col_index=f"{prefix}_cols"))]
    return decls, _call(op, ctx, f"{prefix}_params")


def pack_transpose(op: IntOp, ctx: PackContext):
    shape, perm = ctx.shape(op.inputs[0]), op.params.perm
    if len(shape) > 6:
        raise UnsupportedOpError(f"{op.node}: the C transposes tensors of rank <= 6 (this one has rank {len(shape)})")
    pad = 6 - len(shape)
    fields = dict(rank=len(shape), in_shape=tuple(shape) + (1,) * pad, perm=tuple(perm) + (0,) * pad)
    name = f"op{ctx.index}_params"
    return [_struct("eo_transpose_params", name, fields)], _call(op, ctx, name)


def pack_reshape(op: IntOp, ctx: PackContext):
    if ctx.pointer(op.inputs[0]) == ctx.pointer(op.output):  # written in place: the bytes are already there
        return [], "/* in place: same bytes, new shape */"
    name = f"op{ctx.index}_params"
    return [_struct("eo_copy_params", name, dict(size=ctx.size(op.output)))], _call(op, ctx, name)


def pack_concat(op: IntOp, ctx: PackContext):
    axis, out_shape = op.params.axis, ctx.shape(op.output)
    outer = int(np.prod(out_shape[:axis], dtype=np.int64))
    out_block = int(np.prod(out_shape[axis:], dtype=np.int64))
    decls, calls, offset = [], [], 0
    for position, tensor in enumerate(op.inputs):
        in_block = int(np.prod(ctx.shape(tensor)[axis:], dtype=np.int64))
        name = f"op{ctx.index}_in{position}_params"
        decls.append(_struct("eo_concat_params", name, dict(outer=outer, in_block=in_block,
                                                             out_block=out_block, offset=offset)))
        calls.append(_call(op, ctx, name, inputs=[tensor]))
        offset += in_block
    return decls, "\n    ".join(calls)


def pack_slice(op: IntOp, ctx: PackContext):
    axis, in_shape = op.params.axis, ctx.shape(op.inputs[0])
    inner = int(np.prod(in_shape[axis + 1:], dtype=np.int64))
    fields = dict(outer=int(np.prod(in_shape[:axis], dtype=np.int64)), in_block=int(in_shape[axis]) * inner,
                  out_block=op.params.size * inner, offset=op.params.start * inner)
    name = f"op{ctx.index}_params"
    return [_struct("eo_slice_params", name, fields)], _call(op, ctx, name)


def pack_prelu(op: IntOp, ctx: PackContext):
    p, prefix = op.params, f"op{ctx.index}"
    shape = ctx.shape(op.inputs[0])
    decls = [c_array(f"{prefix}_multiplier", p.negative_multiplier.astype(np.int32)),
             c_array(f"{prefix}_shift", _shifts(p.negative_shift)),
             c_array(f"{prefix}_sign", p.negative_sign.astype(np.int8)),
             _struct("eo_prelu_params", f"{prefix}_params", dict(
                 outer=int(np.prod(shape[:p.axis], dtype=np.int64)), channels=shape[p.axis],
                 inner=int(np.prod(shape[p.axis + 1:], dtype=np.int64)), input_zero_point=p.input_zero_point,
                 output_zero_point=p.output_zero_point, positive_multiplier=p.positive_multiplier,
                 positive_shift=p.positive_shift, act_min=p.act_min, act_max=p.act_max,
                 negative_multiplier=f"{prefix}_multiplier", negative_shift=f"{prefix}_shift",
                 negative_sign=f"{prefix}_sign"))]
    return decls, _call(op, ctx, f"{prefix}_params")


def pack_resize_bilinear(op: IntOp, ctx: PackContext):
    p, prefix = op.params, f"op{ctx.index}"
    n, h, w, c = ctx.shape(op.inputs[0])
    _, out_h, out_w, _ = ctx.shape(op.output)
    tables = ("row_low", "row_high", "row_fraction", "col_low", "col_high", "col_fraction")
    decls = [c_array(f"{prefix}_{table}", getattr(p, table).astype(np.int32)) for table in tables]
    decls.append(_struct("eo_resize_bilinear_params", f"{prefix}_params", dict(
        n=n, h=h, w=w, c=c, out_h=out_h, out_w=out_w, **{table: f"{prefix}_{table}" for table in tables})))
    return decls, _call(op, ctx, f"{prefix}_params")


def pack_layer_norm(op: IntOp, ctx: PackContext):
    p, prefix = op.params, f"op{ctx.index}"
    decls = [c_array(f"{prefix}_multiplier", p.multiplier), c_array(f"{prefix}_shift", _shifts(p.shift)),
             c_array(f"{prefix}_bias", p.bias),
             _struct("eo_layer_norm_params", f"{prefix}_params", dict(
                 outer=p.outer, reduce=p.reduce, inner=p.inner, affine_inner=int(p.affine_inner),
                 centered=int(p.centered), input_zero_point=p.input_zero_point,
                 epsilon_term=f"(int64_t){p.epsilon_term}LL",
                 fraction_bits=p.fraction_bits, bias_bits=p.bias_bits, output_zero_point=p.output_zero_point,
                 act_min=p.act_min, act_max=p.act_max, multiplier=f"{prefix}_multiplier", shift=f"{prefix}_shift",
                 bias=f"{prefix}_bias"))]
    return decls, _call(op, ctx, f"{prefix}_params")


def _recurrent_arrays(p) -> dict[str, np.ndarray | None]:
    """The arrays a recurrent cell's C stores, by field (None: an all-zero bias or initial state, which the
    kernel reads as a null pointer)."""
    arrays = {"w": p.w, "r": p.r, "w_multiplier": p.w_multiplier, "r_multiplier": p.r_multiplier, "w_bias": p.w_bias,
              "r_bias": p.r_bias, "initial": p.initial, "initial_cell": p.initial_cell}
    optional = ("w_bias", "r_bias", "initial", "initial_cell")
    return {field: None if field in optional and not np.any(array) else array for field, array in arrays.items()}


def pack_recurrent(op: IntOp, ctx: PackContext):
    """A recurrent cell's arrays (none for an all-zero bias or initial state: the kernel reads a null pointer as
    zeros); the tanh table has one name in every model (the emitter declares it once)."""
    p, prefix = op.params, f"op{ctx.index}"
    arrays = _recurrent_arrays(p)
    stored = {field: array for field, array in arrays.items() if array is not None}
    decls = [c_array("eo_rnn_tanh_table", TANH_TABLE)]
    decls += [c_array(f"{prefix}_{field}", array) for field, array in stored.items()]
    x_t, x_b = p.x_strides
    y_t, y_d, y_b, y_h = p.y_strides
    decls.append(_struct("eo_recurrent_params", f"{prefix}_params", dict(
        output=p.output, steps=p.steps, batch=p.batch, input_size=p.input_size, hidden=p.hidden,
        directions=p.directions, reverse=int(p.reverse), linear_before_reset=int(p.linear_before_reset),
        x_stride_t=x_t, x_stride_b=x_b, y_stride_t=y_t, y_stride_d=y_d, y_stride_b=y_b, y_stride_h=y_h,
        input_zero_point=p.input_zero_point, output_multiplier=p.output_multiplier, output_shift=p.output_shift,
        output_zero_point=p.output_zero_point, act_min=p.act_min, act_max=p.act_max, w_shift=p.w_shift,
        r_shift=p.r_shift, bias_shift=p.bias_shift,
        **{field: f"{prefix}_{field}" if field in stored else "0" for field in arrays}, tanh="eo_rnn_tanh_table",
        state_inputs="eo_rnn_state_inputs" if p.state_inputs else "0", state_count=len(p.state_inputs),
        **_state_fields(p.state_inputs))))
    states = [ctx.pointer(name) for name in op.inputs[1:]] + ["0"] * (3 - len(op.inputs))
    call = (f"{OPS[op.kind].c_kernel}(&{prefix}_params, {ctx.pointer(op.inputs[0])}, {', '.join(states)}, "
            f"{ctx.pointer(op.output)}, (int16_t *){ctx.pointer(op.scratch)});")
    return decls, call


def _state_fields(moves) -> dict:
    """The C initializers of the state inputs' (which, zero point, multiplier, shift), two slots each."""
    padded = list(moves) + [(0, 0, 0, 0)] * (2 - len(moves))
    return {field: [move[k] for move in padded] for k, field in
            enumerate(("state_which", "state_zero_point", "state_multiplier", "state_shift"))}


PACKERS = {
    "conv2d": pack_conv2d,
    "conv2d_add": pack_conv2d_add,
    "conv_transpose2d": pack_conv_transpose2d,
    "fully_connected": pack_fully_connected,
    "batch_matmul": pack_batch_matmul,
    "add": pack_add,
    "mul": pack_mul,
    "max_pool": pack_max_pool,
    "avg_pool": pack_avg_pool,
    "mean": pack_mean,
    "requantize": pack_requantize,
    "lut": pack_lut,
    "softmax": pack_softmax,
    "pad": pack_pad,
    "resize_nearest": pack_resize_nearest,
    "transpose": pack_transpose,
    "reshape": pack_reshape,
    "concat": pack_concat,
    "slice": pack_slice,
    "prelu": pack_prelu,
    "resize_bilinear": pack_resize_bilinear,
    "layer_norm": pack_layer_norm,
    "rnn": pack_recurrent,
    "gru": pack_recurrent,
    "lstm": pack_recurrent,
}

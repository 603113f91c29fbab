"""Lowering of the ops that keep their input's quantization: pools, means, data movement.

Max pooling, reshapes, transposes, concatenation, slicing and splitting (step 1),
padding and nearest resize copy or select quantized values, so their output shares the input's scale and
zero point (the QDQ plan puts them in one scale group); average pooling and
means requantize once. Rank-4 activations are NHWC in the program, so axes
are mapped through the tensor's layout. The handlers are registered in
:data:`edgeopt.runtime.reference.handlers.HANDLERS`.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.errors import UnsupportedOpError
from edgeopt.runtime.reference.lower import (
    Lowering,
    attribute,
    clamp_range,
    conv_pads,
    node_label,
    real_multiplier,
    text_attribute,
)
from edgeopt.runtime.reference.program import (
    AvgPoolParams,
    ConcatParams,
    MaxPoolParams,
    MeanParams,
    PadParams,
    ReshapeParams,
    ResizeNearestParams,
    SliceParams,
    TransposeParams,
    stored_layout,
)
from edgeopt.runtime.reference.tables import nearest_indices

__all__ = [
    "lower_average_pool",
    "lower_concat",
    "lower_gather",
    "lower_global_average_pool",
    "lower_global_max_pool",
    "lower_max_pool",
    "lower_movement",
    "lower_pad",
    "lower_reduce_max",
    "lower_reduce_mean",
    "lower_reduce_sum",
    "lower_resize",
    "lower_slice",
    "lower_split",
    "rank4_input",
    "resize_scales",
]


def _same_params(lo: Lowering, kind: str, inputs, node: ir.Node, params, out_shape=None) -> None:
    """Emit an op that keeps its input's quantization, then requantize if the output's differs."""
    value = node.outputs[0]
    source = lo.params_of(inputs[0])
    plan = lo.output_plan(node) if kind in ("max_pool",) else None
    target = plan.qparams if plan is not None else source
    logical = lo.logical_shape(value)
    if target == source:
        name = lo.add_tensor(value.name, logical, source)
        lo.emit(kind, inputs, name, params, node)
    else:
        temp = lo.add_tensor(value.name + "__pre", logical, source)
        lo.emit(kind, inputs, temp, params, node)
        name = lo.requantize(temp, target, value.name, node)
    lo.bind(value, name)
    for clamp in plan.absorbed if plan is not None else ():
        lo.absorbed.add(id(clamp))
        lo.bind(clamp.outputs[0], name)


def _pool_geometry(lo: Lowering, node: ir.Node, x: str, kernel) -> tuple[tuple[int, int], tuple[int, ...]]:
    strides = tuple(attribute(node, "strides", [1, 1]))
    if any(d != 1 for d in attribute(node, "dilations", [1, 1])):
        raise UnsupportedOpError(f"{node_label(node)}: dilated pooling is not supported")
    _, h, w, _ = lo.tensors[x].shape
    top, left, bottom, right = conv_pads(node, (h, w), kernel, strides, (1, 1))
    out_h, out_w = lo.logical_shape(node.outputs[0])[2:]
    bottom += max(0, (out_h - 1) * strides[0] + kernel[0] - (h + top + bottom))  # ceil_mode
    right += max(0, (out_w - 1) * strides[1] + kernel[1] - (w + left + right))
    return strides, (top, left, bottom, right)


_POOLING = "only 1-D and 2-D (NCL, NCHW) pooling is supported"


def rank4_input(lo: Lowering, node: ir.Node, refusal: str = _POOLING) -> str:
    """The program tensor of ``node``'s input 0, which must be rank 4 (else ``refusal``)."""
    x = lo.activation(node.inputs[0], node)
    if len(lo.tensors[x].shape) != 4:
        raise UnsupportedOpError(f"{node_label(node)}: {refusal}")
    return x


def lower_max_pool(lo: Lowering, node: ir.Node) -> None:
    x = rank4_input(lo, node)
    if len(node.outputs) > 1 and node.outputs[1].name:
        raise UnsupportedOpError(f"{node_label(node)}: MaxPool indices output is not supported")
    kernel = tuple(attribute(node, "kernel_shape"))
    strides, pads = _pool_geometry(lo, node, x, kernel)
    plan = lo.output_plan(node)
    act_min, act_max = clamp_range(lo.params_of(x), -math.inf, math.inf)
    if plan.qparams == lo.params_of(x):
        act_min, act_max = plan.act_min, plan.act_max
    params = MaxPoolParams(kernel=kernel, strides=strides, pads=pads, act_min=act_min, act_max=act_max)
    _same_params(lo, "max_pool", [x], node, params)


def lower_global_max_pool(lo: Lowering, node: ir.Node) -> None:
    x = rank4_input(lo, node)
    kernel = tuple(lo.tensors[x].shape[1:3])
    params = MaxPoolParams(kernel=kernel, strides=(1, 1), pads=(0, 0, 0, 0), act_min=-128, act_max=127)
    _same_params(lo, "max_pool", [x], node, params)


def _average(lo: Lowering, node: ir.Node, x: str, kernel, strides, pads, include_pad: bool) -> None:
    plan, source = lo.output_plan(node), lo.params_of(x)
    counts = range(kernel[0] * kernel[1] + 1)
    pairs = [real_multiplier(source.scale / (c * plan.qparams.scale)) if c else (0, 0) for c in counts]
    params = AvgPoolParams(kernel=kernel, strides=strides, pads=pads, count_include_pad=include_pad,
                           input_zero_point=source.zero_point, output_zero_point=plan.qparams.zero_point,
                           multiplier=np.array([m for m, _ in pairs], np.int32),
                           shift=np.array([s for _, s in pairs], np.int8),
                           act_min=plan.act_min, act_max=plan.act_max)
    lo.finish("avg_pool", [x], plan, params, node)


def lower_average_pool(lo: Lowering, node: ir.Node) -> None:
    x = rank4_input(lo, node)
    kernel = tuple(attribute(node, "kernel_shape"))
    strides, pads = _pool_geometry(lo, node, x, kernel)
    _average(lo, node, x, kernel, strides, pads, bool(attribute(node, "count_include_pad", 0)))


def _rows_of(lo: Lowering, node: ir.Node, x: str, stored_axes: list[int]) -> tuple[int, int, int]:
    """(outer, reduce, inner) of ``x`` reduced over ``stored_axes``, which must be adjacent."""
    shape = lo.tensors[x].shape
    stored_axes = sorted(stored_axes)
    if stored_axes != list(range(stored_axes[0], stored_axes[-1] + 1)):
        raise UnsupportedOpError(f"{node_label(node)}: reducing non-adjacent axes (in NHWC) is not supported")
    return (int(np.prod(shape[:stored_axes[0]], dtype=np.int64)),
            int(np.prod(shape[stored_axes[0]:stored_axes[-1] + 1], dtype=np.int64)),
            int(np.prod(shape[stored_axes[-1] + 1:], dtype=np.int64)))


def _mean(lo: Lowering, node: ir.Node, x: str, stored_axes: list[int], *, averaged: bool = True) -> None:
    """The mean (or, not ``averaged``, the sum) over ``stored_axes``: the kernel sums the centred int8 values
    in int32, then requantizes by the scales' ratio (over the count for a mean). Without keepdims, axes kept
    in an order that is not the output's stored layout (SKNet's sum over the branches of [N, B, C, H, W]
    leaves [N, C, H, W] in NCHW order) are transposed into it."""
    outer, reduce, inner = _rows_of(lo, node, x, stored_axes)
    plan, source = lo.output_plan(node), lo.params_of(x)
    multiplier, shift = real_multiplier(source.scale / ((reduce if averaged else 1) * plan.qparams.scale))
    params = MeanParams(outer=outer, reduce=reduce, inner=inner, input_zero_point=source.zero_point,
                        output_zero_point=plan.qparams.zero_point, multiplier=multiplier, shift=shift)
    temp = _in_kept_order(lo, node, plan, x, stored_axes)
    if temp is None:
        lo.finish("mean", [x], plan, params, node)
        return
    lo.emit("mean", [x], temp, params, node)
    _transpose_into_output(lo, node, plan, temp)


def _in_kept_order(lo: Lowering, node: ir.Node, plan, x: str, stored_axes: list[int]) -> str | None:
    """Without keepdims, when the axes kept are not in the output's stored order, a tensor holding the reduced
    values in the order they are kept (for :func:`_transpose_into_output`); else None."""
    layout = lo.tensors[x].layout
    kept = [layout[p] for p in range(len(layout)) if p not in stored_axes]
    kept = tuple(sorted(kept).index(a) for a in kept)  # the logical axes kept, renumbered, in stored order
    if int(attribute(node, "keepdims", 1)) or kept == tuple(stored_layout(len(kept))):
        return None
    shape = [lo.tensors[x].shape[p] for p in range(len(layout)) if p not in stored_axes]
    return lo.add_stored_tensor(f"{plan.value.name}__kept_order", shape, plan.qparams, kept)


def _transpose_into_output(lo: Lowering, node: ir.Node, plan, temp: str) -> None:
    kept = lo.tensors[temp].layout
    perm = tuple(kept.index(axis) for axis in stored_layout(len(kept)))
    lo.finish("transpose", [temp], plan, TransposeParams(perm=perm), node)


def lower_global_average_pool(lo: Lowering, node: ir.Node) -> None:
    _mean(lo, node, rank4_input(lo, node), [1, 2])


def _reduced(lo: Lowering, node: ir.Node) -> tuple[str, list[int]]:
    """A ReduceMean's, ReduceSum's or ReduceMax's input and the stored axes it reduces (checked to keep the
    layout)."""
    x = lo.activation(node.inputs[0], node)
    info = lo.tensors[x]
    rank = len(info.shape)
    axes = attribute(node, "axes", None)
    if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].name:
        axes = eir.constant_array(node.inputs[1])
        if axes is None:
            raise UnsupportedOpError(f"{node_label(node)}: its axes must be a constant")
    if (axes is None or len(axes) == 0) and int(attribute(node, "noop_with_empty_axes", 0)):
        raise UnsupportedOpError(f"{node_label(node)}: noop_with_empty_axes without axes (an identity) is not "
                                 "supported")
    axes = list(range(rank)) if axes is None or len(axes) == 0 else [int(a) % rank for a in axes]
    return x, [info.layout.index(a) for a in axes]


def lower_reduce_mean(lo: Lowering, node: ir.Node) -> None:
    _mean(lo, node, *_reduced(lo, node))


def lower_reduce_sum(lo: Lowering, node: ir.Node) -> None:
    """SKNet's sum over its branches, an attention pooling's weighted sum: the mean kernel without the count."""
    _mean(lo, node, *_reduced(lo, node), averaged=False)


def lower_reduce_max(lo: Lowering, node: ir.Node) -> None:
    """ReduceMax over adjacent stored axes: a max pool over the rows of the [outer, reduce, 1, inner] view
    (reshapes in place on either side), at the input's quantization."""
    x, stored_axes = _reduced(lo, node)
    outer, reduce, inner = _rows_of(lo, node, x, stored_axes)
    source, plan, value = lo.params_of(x), lo.output_plan(node), node.outputs[0]
    view = lo.add_stored_tensor(f"{value.name}__rows", (outer, reduce, 1, inner), source, (0, 1, 2, 3))
    lo.emit("reshape", [x], view, ReshapeParams(shape=(outer, reduce, 1, inner)), node)
    act_min, act_max = clamp_range(source, -math.inf, math.inf)
    if plan.qparams == source:
        act_min, act_max = plan.act_min, plan.act_max
    pooled = lo.add_stored_tensor(f"{value.name}__max", (outer, 1, 1, inner), source, (0, 1, 2, 3))
    lo.emit("max_pool", [view], pooled, MaxPoolParams(kernel=(reduce, 1), strides=(1, 1), pads=(0, 0, 0, 0),
                                                     act_min=act_min, act_max=act_max), node)
    if plan.qparams != source:
        pooled = lo.requantize(pooled, plan.qparams, f"{value.name}__requantized", node,
                               (plan.act_min, plan.act_max))
    temp = _in_kept_order(lo, node, plan, x, stored_axes)
    if temp is None:
        lo.finish_as_reshape(pooled, plan, node)
        return
    lo.emit("reshape", [pooled], temp, ReshapeParams(shape=lo.tensors[temp].shape), node)
    _transpose_into_output(lo, node, plan, temp)


def lower_concat(lo: Lowering, node: ir.Node) -> None:
    plan = lo.output_plan(node)
    inputs = []
    for index, value in enumerate(node.inputs):
        tensor = lo.activation(value, node)
        if lo.params_of(tensor) != plan.qparams:
            tensor = lo.requantize(tensor, plan.qparams, f"{plan.value.name}__in{index}", node)
        inputs.append(tensor)
    rank = len(lo.logical_shape(plan.value))
    axis = int(attribute(node, "axis")) % rank
    lo.finish("concat", inputs, plan, ConcatParams(axis=stored_layout(rank).index(axis)), node)


def _constant_ints(node: ir.Node, index: int | None, name: str) -> list[int] | None:
    """Constant integer input ``index`` of ``node``, or its attribute ``name`` (older opsets: ``index`` None);
    None when absent."""
    if index is not None and index < len(node.inputs) and node.inputs[index] is not None and node.inputs[index].name:
        array = eir.constant_array(node.inputs[index])
        if array is None:
            raise UnsupportedOpError(f"{node_label(node)}: its {name} must be constants")
        return [int(v) for v in array.reshape(-1)]
    value = attribute(node, name, None)
    return None if value is None else [int(v) for v in value]


def _emit_slices(lo: Lowering, node: ir.Node, x: str, value: ir.Value, cuts: dict[int, tuple[int, int]]) -> None:
    """Bind ``value`` to ``x`` cut to ``cuts`` (logical axis -> (start, size)): one copy per cut axis."""
    info, qparams = lo.tensors[x], lo.params_of(x)
    shape = list(info.logical_shape)
    cuts = {axis: cut for axis, cut in cuts.items() if cut != (0, shape[axis])}
    if not cuts:
        name = lo.add_tensor(value.name, tuple(shape), qparams)
        lo.bind(value, lo.emit("reshape", [x], name, ReshapeParams(shape=lo.tensors[name].shape), node))
        return
    for position, (axis, (start, size)) in enumerate(sorted(cuts.items())):
        shape[axis] = size
        name = value.name if position == len(cuts) - 1 else f"{value.name}__slice{position}"
        lo.add_tensor(name, tuple(shape), qparams)
        x = lo.emit("slice", [x], name, SliceParams(axis=info.layout.index(axis), start=start, size=size), node)
    lo.bind(value, x)


def lower_slice(lo: Lowering, node: ir.Node) -> None:
    """Slice with constant starts/ends/axes and steps of 1 (ONNX's clamping of out-of-range bounds)."""
    x = lo.activation(node.inputs[0], node)
    shape = lo.tensors[x].logical_shape
    rank, new_inputs = len(shape), lo.opset >= 10
    starts, ends, axes, steps = (_constant_ints(node, index if new_inputs else None, name)
                                 for index, name in enumerate(("starts", "ends", "axes", "steps"), 1))
    if starts is None or ends is None:
        raise UnsupportedOpError(f"{node_label(node)}: Slice needs its starts and ends")
    axes = axes or list(range(len(starts)))
    if any(step != 1 for step in steps or ()):
        raise UnsupportedOpError(f"{node_label(node)}: Slice with steps {steps} is not supported (steps of 1 are)")
    cuts = {}
    for axis, start, end in zip(axes, starts, ends):
        axis, dim = axis % rank, shape[axis % rank]
        start, end = (min(max(v + dim if v < 0 else v, 0), dim) for v in (start, end))
        cuts[axis] = (start, max(end - start, 0))
    _emit_slices(lo, node, x, node.outputs[0], cuts)


def lower_split(lo: Lowering, node: ir.Node) -> None:
    """Split along one axis into the sizes given (input 1 from opset 13, else attribute ``split``) or equal parts."""
    x = lo.activation(node.inputs[0], node)
    shape = lo.tensors[x].logical_shape
    axis = int(attribute(node, "axis", 0)) % len(shape)
    sizes = _constant_ints(node, 1 if lo.opset >= 13 else None, "split")
    if sizes is None:
        sizes = [lo.logical_shape(value)[axis] for value in node.outputs]
    start = 0
    for value, size in zip(node.outputs, sizes):
        if value.uses() or value.is_graph_output():
            _emit_slices(lo, node, x, value, {axis: (start, size)})
        start += size


def lower_gather(lo: Lowering, node: ir.Node) -> None:
    """Gather of an activation at constant indices: one slice per run of consecutive indices (joined by a
    concat when there are several); a scalar index then drops its axis (a reshape), as attention's
    ``q, k, v = qkv[0], qkv[1], qkv[2]`` does."""
    x = lo.activation(node.inputs[0], node)
    indices = eir.constant_array(node.inputs[1])
    if indices is None or indices.ndim > 1:
        raise UnsupportedOpError(f"{node_label(node)}: Gather needs constant indices (a scalar or a list); a "
                                 "lookup by run-time indices, such as an embedding of token ids, has no C kernel")
    if indices.size == 0:
        raise UnsupportedOpError(f"{node_label(node)}: Gather with no indices makes an empty tensor, which the C "
                                 "does not hold: remove it from the model")
    shape = lo.tensors[x].logical_shape
    axis = int(attribute(node, "axis", 0)) % len(shape)
    positions = [int(i) % shape[axis] for i in indices.reshape(-1)]
    value = node.outputs[0]
    gathered = _gathered(lo, node, x, axis, positions, value.name if indices.ndim else f"{value.name}__kept")
    lo.bind(value, gathered if indices.ndim else _reshaped(lo, node, gathered, lo.logical_shape(value)))


def _gathered(lo: Lowering, node: ir.Node, x: str, axis: int, positions: list[int], name: str) -> str:
    info, qparams = lo.tensors[x], lo.params_of(x)
    runs = []
    for position in positions:
        if runs and position == runs[-1][0] + runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([position, 1])
    parts = []
    for index, (start, size) in enumerate(runs):
        shape = list(info.logical_shape)
        shape[axis] = size
        part = name if len(runs) == 1 else f"{name}__part{index}"
        lo.add_tensor(part, tuple(shape), qparams)
        parts.append(lo.emit("slice", [x], part, SliceParams(axis=info.layout.index(axis), start=start, size=size),
                             node))
    if len(runs) == 1:
        return parts[0]
    shape = list(info.logical_shape)
    shape[axis] = len(positions)
    lo.add_tensor(name, tuple(shape), qparams)
    return lo.emit("concat", parts, name, ConcatParams(axis=info.layout.index(axis)), node)


def lower_movement(lo: Lowering, node: ir.Node) -> None:
    """Reshape/Flatten/Squeeze/Unsqueeze/Transpose/Identity as int8 data movement in stored layout."""
    x = lo.activation(node.inputs[0], node)
    info, value = lo.tensors[x], node.outputs[0]
    out_logical = lo.logical_shape(value)
    out_layout = stored_layout(len(out_logical))
    to_logical = tuple(int(a) for a in np.argsort(info.layout))
    qparams = lo.params_of(x)
    if node.op_type == "Transpose":
        perm = attribute(node, "perm", list(range(len(info.shape)))[::-1])
        total = tuple(int(to_logical[p]) for p in (perm[a] for a in out_layout))
        name = lo.add_tensor(value.name, out_logical, qparams)
        lo.emit("transpose", [x], name, TransposeParams(perm=total), node)
    else:
        name = _reshaped(lo, node, x, out_logical)
    lo.bind(value, name)


def _reshaped(lo: Lowering, node: ir.Node, x: str, out_logical) -> str:
    """``x`` reshaped to ``out_logical`` (as the tensor of ``node``'s output): a copy when the stored order
    allows, else through the logical order."""
    info, out_layout = lo.tensors[x], stored_layout(len(out_logical))
    if _same_order(info, out_logical, out_layout):
        name = lo.add_tensor(node.outputs[0].name, out_logical, lo.params_of(x))
        return lo.emit("reshape", [x], name, ReshapeParams(shape=lo.tensors[name].shape), node)
    to_logical = tuple(int(a) for a in np.argsort(info.layout))
    return _reshape_through_logical(lo, node, x, to_logical, out_logical, out_layout)


def _same_order(info, out_logical, out_layout) -> bool:
    index = np.arange(info.size).reshape(info.shape).transpose(np.argsort(info.layout))
    return bool((index.reshape(out_logical).transpose(out_layout).ravel() == np.arange(info.size)).all())


def _reshape_through_logical(lo: Lowering, node, x, to_logical, out_logical, out_layout) -> str:
    value, qparams = node.outputs[0], lo.params_of(x)
    identity_out = tuple(out_layout) == tuple(range(len(out_layout)))
    temp = value.name if identity_out else value.name + "__logical"
    lo.add_stored_tensor(temp, out_logical, qparams, range(len(out_logical)))
    if tuple(to_logical) == tuple(range(len(to_logical))):  # stored as logical already: a copy, often in place
        lo.emit("reshape", [x], temp, ReshapeParams(shape=tuple(out_logical)), node)
    else:
        lo.emit("transpose", [x], temp, TransposeParams(perm=to_logical), node)
    if identity_out:
        return temp
    name = lo.add_tensor(value.name, out_logical, qparams)
    return lo.emit("transpose", [temp], name, TransposeParams(perm=tuple(out_layout)), node)


def lower_pad(lo: Lowering, node: ir.Node) -> None:
    x = lo.activation(node.inputs[0], node)
    mode = text_attribute(node, "mode", "constant")
    if mode not in ("constant", "reflect", "edge"):
        raise UnsupportedOpError(f"{node_label(node)}: {mode} padding is not supported (constant, reflect and "
                                 "edge are)")
    pads = attribute(node, "pads") if lo.opset < 11 else eir.constant_array(node.inputs[1])
    value = 0.0
    if lo.opset < 11:
        value = float(attribute(node, "value", 0.0))
    elif len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
        value = float(lo.real_constant(node.inputs[2], node).reshape(()))
    info, source = lo.tensors[x], lo.params_of(x)
    rank = len(info.shape)
    if pads is None or len(pads) != 2 * rank or min(pads) < 0 or (len(node.inputs) > 3 and node.inputs[3]):
        raise UnsupportedOpError(f"{node_label(node)}: needs constant non-negative pads over all axes")
    stored = tuple((int(pads[a]), int(pads[a + rank])) for a in info.layout)
    stored_shape = [info.shape[a] for a in info.layout]
    if mode == "reflect" and any(max(amounts) >= size for amounts, size in zip(stored, stored_shape)
                                 if max(amounts) > 0):
        raise UnsupportedOpError(f"{node_label(node)}: reflect padding by as much as the axis is long")
    fill = int(np.clip(source.zero_point + np.rint(value / source.scale), -128, 127))
    _same_params(lo, "pad", [x], node, PadParams(pads=stored, value=fill, mode=mode))


def resize_scales(lo: Lowering, node: ir.Node, rank: int) -> list[float] | None:
    """The constant scales of every axis (its ``axes`` attribute spread), or None when sizes are given."""
    index = 1 if node.op_type == "Upsample" or lo.opset < 11 else 2
    value = node.inputs[index] if len(node.inputs) > index else None
    scales = eir.constant_array(value) if value is not None and value.name else None
    if scales is None or scales.size == 0:
        return None
    axes = attribute(node, "axes", None) or range(rank)
    full = [1.0] * rank
    for axis, scale in zip(axes, scales.reshape(-1)):
        full[int(axis) % rank] = float(scale)
    return full


def lower_resize(lo: Lowering, node: ir.Node) -> None:
    x = rank4_input(lo, node)
    mode = text_attribute(node, "mode", "nearest")
    if mode != "nearest":
        raise UnsupportedOpError(f"{node_label(node)}: only nearest Resize is supported (mode={mode})")
    in_shape, out_shape = lo.tensors[x].logical_shape, lo.logical_shape(node.outputs[0])
    if in_shape[:2] != out_shape[:2]:
        raise UnsupportedOpError(f"{node_label(node)}: Resize may only scale H and W")
    scales = resize_scales(lo, node, 4)
    rows, cols = (nearest_indices(node, lo.opset, in_shape[a], out_shape[a], None if scales is None else scales[a])
                  for a in (2, 3))
    _same_params(lo, "resize_nearest", [x], node, ResizeNearestParams(row_index=rows, col_index=cols))

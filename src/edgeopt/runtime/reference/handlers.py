"""One lowering function per ONNX op type: QDQ node -> integer op(s) of the program.

Each handler reads the node's quantized inputs from the :class:`Lowering`,
folds scales into fixed-point multipliers and emits ops of the table in
``ops.py``. Rank-4 activations are NHWC in the program, so axis attributes
are mapped through the tensor's layout.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.errors import UnsupportedOpError
from edgeopt.runtime.reference.lower import (
    Lowering,
    QParams,
    attribute,
    clamp_range,
    node_label,
    real_multiplier,
)
from edgeopt.runtime.reference.program import (
    AddParams,
    AvgPoolParams,
    ConcatParams,
    Conv2dParams,
    FullyConnectedParams,
    MaxPoolParams,
    MeanParams,
    MulParams,
    PadParams,
    ReshapeParams,
    ResizeNearestParams,
    TransposeParams,
    stored_layout,
)
from edgeopt.runtime.reference.tables import lut_params, nearest_indices, softmax_params

__all__ = ["HANDLERS"]

_ADD_LEFT_SHIFT = 20


# -- QuantizeLinear / DequantizeLinear --------------------------------------------------


def lower_quantize(lo: Lowering, node: ir.Node) -> None:
    source, output = node.inputs[0], node.outputs[0]
    target = lo.qdq_params(node)
    if source.name not in lo.tensor_of and source.is_graph_input():
        lo.model_input(source, target, is_float=True)
    tensor = lo.activation(source, node)
    if lo.params_of(tensor) == target:
        lo.bind(output, tensor)
    else:
        lo.bind(output, lo.requantize(tensor, target, output.name, node))


def lower_dequantize(lo: Lowering, node: ir.Node) -> None:
    source = node.inputs[0]
    if eir.is_constant(source):
        return  # weights, biases and constant operands are read by their consumer
    if source.name not in lo.tensor_of and source.is_graph_input():
        lo.model_input(source, lo.qdq_params(node), is_float=False)
    lo.bind(node.outputs[0], lo.activation(source, node))


# -- conv and fully connected -------------------------------------------------------------


def _conv_pads(node: ir.Node, in_hw, kernel, strides, dilations) -> tuple[int, int, int, int]:
    auto_pad = attribute(node, "auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("NOTSET", "VALID"):
        pads = list(attribute(node, "pads", [0, 0, 0, 0])) if auto_pad == "NOTSET" else [0, 0, 0, 0]
        return pads[0], pads[1], pads[2], pads[3]
    begin, end = [], []
    for size, k, s, d in zip(in_hw, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return begin[0], begin[1], end[0], end[1]


def lower_conv(lo: Lowering, node: ir.Node) -> None:
    x = lo.activation(node.inputs[0], node)
    weight, weight_scale = lo.weight(node.inputs[1], node, channel_axis=0)
    if weight.ndim != 4:
        raise UnsupportedOpError(f"{node_label(node)}: only 2-D convolution is supported")
    plan, source = lo.output_plan(node), lo.params_of(x)
    bias = lo.bias(node.inputs[2] if len(node.inputs) > 2 else None, node, source.scale * weight_scale)
    multiplier, shift = lo.per_channel_multipliers(source.scale * weight_scale / plan.qparams.scale)
    strides = tuple(attribute(node, "strides", [1, 1]))
    dilations = tuple(attribute(node, "dilations", [1, 1]))
    in_hw = lo.tensors[x].shape[1:3]
    params = Conv2dParams(
        weight=np.ascontiguousarray(weight.transpose(0, 2, 3, 1)), bias=bias, multiplier=multiplier, shift=shift,
        input_zero_point=source.zero_point, output_zero_point=plan.qparams.zero_point,
        strides=strides, dilations=dilations, pads=_conv_pads(node, in_hw, weight.shape[2:], strides, dilations),
        group=int(attribute(node, "group", 1)), act_min=plan.act_min, act_max=plan.act_max)
    lo.finish("conv2d", [x], plan, params, node)


def _fully_connected(lo: Lowering, node: ir.Node, x: str, weight: np.ndarray, weight_scale: np.ndarray,
                     bias_value: ir.Value | None, alpha: float = 1.0, beta: float = 1.0) -> None:
    if len(lo.tensors[x].shape) == 4:
        raise UnsupportedOpError(f"{node_label(node)}: fully connected on a rank-4 activation is not supported")
    plan, source = lo.output_plan(node), lo.params_of(x)
    bias_scale = source.scale * weight_scale
    bias = lo.bias(bias_value, node, bias_scale / beta) if beta != 0 else lo.bias(None, node, bias_scale)
    multiplier, shift = lo.per_channel_multipliers(alpha * bias_scale / plan.qparams.scale)
    if alpha != 1.0:
        bias = np.clip(np.rint(bias / alpha), -(2**31), 2**31 - 1).astype(np.int32)
    params = FullyConnectedParams(
        weight=np.ascontiguousarray(weight), bias=bias, multiplier=multiplier, shift=shift,
        input_zero_point=source.zero_point, output_zero_point=plan.qparams.zero_point,
        act_min=plan.act_min, act_max=plan.act_max)
    lo.finish("fully_connected", [x], plan, params, node)


def lower_gemm(lo: Lowering, node: ir.Node) -> None:
    if attribute(node, "transA", 0):
        raise UnsupportedOpError(f"{node_label(node)}: Gemm with transA=1 is not supported")
    x = lo.activation(node.inputs[0], node)
    trans_b = bool(attribute(node, "transB", 0))
    weight, scale = lo.weight(node.inputs[1], node, channel_axis=0 if trans_b else 1)
    weight = weight if trans_b else weight.T
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    _fully_connected(lo, node, x, weight, scale, bias, float(attribute(node, "alpha", 1.0)),
                     float(attribute(node, "beta", 1.0)))


def lower_matmul(lo: Lowering, node: ir.Node) -> None:
    x = lo.activation(node.inputs[0], node)
    weight, scale = lo.weight(node.inputs[1], node, channel_axis=1)
    if weight.ndim != 2:
        raise UnsupportedOpError(f"{node_label(node)}: MatMul needs a constant 2-D weight")
    _fully_connected(lo, node, x, weight.T, scale, None)


# -- elementwise binary ---------------------------------------------------------------------


def _operand(lo: Lowering, value: ir.Value, node: ir.Node, out_rank: int) -> str:
    """An activation input, or a constant operand stored broadcast-ready in the output's layout."""
    producer = value.producer()
    is_constant = (producer is not None and producer.op_type == "DequantizeLinear"
                   and eir.is_constant(producer.inputs[0]))
    if value.name in lo.tensor_of or not is_constant:
        tensor = lo.activation(value, node)
        if len(lo.tensors[tensor].shape) != out_rank:
            raise UnsupportedOpError(f"{node_label(node)}: broadcasting activations of different rank")
        return tensor
    data, scale, zero_point, _ = lo.dequantize_constant(value, node)
    if scale.size != 1:
        raise UnsupportedOpError(f"{node_label(node)}: per-axis quantized constant operand")
    logical = data.reshape((1,) * (out_rank - data.ndim) + data.shape)
    name = f"{value.name}__const"
    layout = stored_layout(out_rank)
    lo.constants[name] = np.ascontiguousarray(logical.transpose(layout)).astype(np.int8)
    return lo.add_stored_tensor(name, lo.constants[name].shape,
                                QParams(float(scale.reshape(())), int(zero_point.reshape(()))), layout)


def _binary_inputs(lo: Lowering, node: ir.Node):
    plan = lo.output_plan(node)
    rank = len(lo.logical_shape(plan.value))
    a, b = (_operand(lo, value, node, rank) for value in node.inputs[:2])
    return plan, a, b, lo.params_of(a), lo.params_of(b)


def lower_add(lo: Lowering, node: ir.Node) -> None:
    plan, a, b, qa, qb = _binary_inputs(lo, node)
    twice_max = 2.0 * max(qa.scale, qb.scale)
    (ma, sa), (mb, sb) = real_multiplier(qa.scale / twice_max), real_multiplier(qb.scale / twice_max)
    mo, so = real_multiplier(twice_max / ((1 << _ADD_LEFT_SHIFT) * plan.qparams.scale))
    params = AddParams(input_zero_points=(qa.zero_point, qb.zero_point), input_multipliers=(ma, mb),
                       input_shifts=(sa, sb), output_multiplier=mo, output_shift=so,
                       output_zero_point=plan.qparams.zero_point, left_shift=_ADD_LEFT_SHIFT,
                       act_min=plan.act_min, act_max=plan.act_max)
    lo.finish("add", [a, b], plan, params, node)


def lower_mul(lo: Lowering, node: ir.Node) -> None:
    plan, a, b, qa, qb = _binary_inputs(lo, node)
    multiplier, shift = real_multiplier(qa.scale * qb.scale / plan.qparams.scale)
    params = MulParams(input_zero_points=(qa.zero_point, qb.zero_point), output_multiplier=multiplier,
                       output_shift=shift, output_zero_point=plan.qparams.zero_point,
                       act_min=plan.act_min, act_max=plan.act_max)
    lo.finish("mul", [a, b], plan, params, node)


# -- same-quantization ops: pools, data movement ------------------------------------------------


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
    top, left, bottom, right = _conv_pads(node, (h, w), kernel, strides, (1, 1))
    out_h, out_w = lo.logical_shape(node.outputs[0])[2:]
    bottom += max(0, (out_h - 1) * strides[0] + kernel[0] - (h + top + bottom))  # ceil_mode
    right += max(0, (out_w - 1) * strides[1] + kernel[1] - (w + left + right))
    return strides, (top, left, bottom, right)


def _rank4(lo: Lowering, node: ir.Node) -> str:
    x = lo.activation(node.inputs[0], node)
    if len(lo.tensors[x].shape) != 4:
        raise UnsupportedOpError(f"{node_label(node)}: only 2-D (NCHW) pooling is supported")
    return x


def lower_max_pool(lo: Lowering, node: ir.Node) -> None:
    x = _rank4(lo, node)
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
    x = _rank4(lo, node)
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
                           shift=np.array([s for _, s in pairs], np.int32),
                           act_min=plan.act_min, act_max=plan.act_max)
    lo.finish("avg_pool", [x], plan, params, node)


def lower_average_pool(lo: Lowering, node: ir.Node) -> None:
    x = _rank4(lo, node)
    kernel = tuple(attribute(node, "kernel_shape"))
    strides, pads = _pool_geometry(lo, node, x, kernel)
    _average(lo, node, x, kernel, strides, pads, bool(attribute(node, "count_include_pad", 0)))


def _mean(lo: Lowering, node: ir.Node, x: str, stored_axes: list[int]) -> None:
    shape = lo.tensors[x].shape
    stored_axes = sorted(stored_axes)
    if stored_axes != list(range(stored_axes[0], stored_axes[-1] + 1)):
        raise UnsupportedOpError(f"{node_label(node)}: reducing non-adjacent axes (in NHWC) is not supported")
    plan, source = lo.output_plan(node), lo.params_of(x)
    outer = int(np.prod(shape[:stored_axes[0]], dtype=np.int64))
    reduce = int(np.prod(shape[stored_axes[0]:stored_axes[-1] + 1], dtype=np.int64))
    inner = int(np.prod(shape[stored_axes[-1] + 1:], dtype=np.int64))
    multiplier, shift = real_multiplier(source.scale / (reduce * plan.qparams.scale))
    params = MeanParams(outer=outer, reduce=reduce, inner=inner, input_zero_point=source.zero_point,
                        output_zero_point=plan.qparams.zero_point, multiplier=multiplier, shift=shift)
    lo.finish("mean", [x], plan, params, node)


def lower_global_average_pool(lo: Lowering, node: ir.Node) -> None:
    _mean(lo, node, _rank4(lo, node), [1, 2])


def lower_reduce_mean(lo: Lowering, node: ir.Node) -> None:
    x = lo.activation(node.inputs[0], node)
    info = lo.tensors[x]
    rank = len(info.shape)
    axes = attribute(node, "axes", None)
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = eir.constant_array(node.inputs[1])
    axes = list(range(rank)) if axes is None or len(axes) == 0 else [int(a) % rank for a in axes]
    _mean(lo, node, x, [info.layout.index(a) for a in axes])


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
    elif _same_order(info, out_logical, out_layout):
        name = lo.add_tensor(value.name, out_logical, qparams)
        lo.emit("reshape", [x], name, ReshapeParams(shape=lo.tensors[name].shape), node)
    else:
        name = _reshape_through_logical(lo, node, x, to_logical, out_logical, out_layout)
    lo.bind(value, name)


def _same_order(info, out_logical, out_layout) -> bool:
    index = np.arange(info.size).reshape(info.shape).transpose(np.argsort(info.layout))
    return bool((index.reshape(out_logical).transpose(out_layout).ravel() == np.arange(info.size)).all())


def _reshape_through_logical(lo: Lowering, node, x, to_logical, out_logical, out_layout) -> str:
    value, qparams = node.outputs[0], lo.params_of(x)
    identity_out = tuple(out_layout) == tuple(range(len(out_layout)))
    temp = value.name if identity_out else value.name + "__logical"
    lo.add_stored_tensor(temp, out_logical, qparams, range(len(out_logical)))
    lo.emit("transpose", [x], temp, TransposeParams(perm=to_logical), node)
    if identity_out:
        return temp
    name = lo.add_tensor(value.name, out_logical, qparams)
    return lo.emit("transpose", [temp], name, TransposeParams(perm=tuple(out_layout)), node)


def lower_pad(lo: Lowering, node: ir.Node) -> None:
    x = lo.activation(node.inputs[0], node)
    mode = attribute(node, "mode", "constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        raise UnsupportedOpError(f"{node_label(node)}: only constant padding is supported")
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
    fill = int(np.clip(source.zero_point + np.rint(value / source.scale), -128, 127))
    _same_params(lo, "pad", [x], node, PadParams(pads=stored, value=fill))


def lower_resize(lo: Lowering, node: ir.Node) -> None:
    x = _rank4(lo, node)
    mode = attribute(node, "mode", "nearest")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "nearest":
        raise UnsupportedOpError(f"{node_label(node)}: only nearest Resize is supported (mode={mode})")
    in_shape, out_shape = lo.tensors[x].logical_shape, lo.logical_shape(node.outputs[0])
    if in_shape[:2] != out_shape[:2]:
        raise UnsupportedOpError(f"{node_label(node)}: Resize may only scale H and W")
    scale_index = 1 if node.op_type == "Upsample" or lo.opset < 11 else 2
    scales_value = node.inputs[scale_index] if len(node.inputs) > scale_index else None
    scales = eir.constant_array(scales_value) if scales_value is not None and scales_value.name else None
    rows, cols = (nearest_indices(node, lo.opset, in_shape[a], out_shape[a],
                                  None if scales is None or scales.size == 0 else float(scales[a]))
                  for a in (2, 3))
    _same_params(lo, "resize_nearest", [x], node, ResizeNearestParams(row_index=rows, col_index=cols))


# -- activations ----------------------------------------------------------------------------


def lower_clamp(lo: Lowering, node: ir.Node) -> None:
    x = lo.activation(node.inputs[0], node)
    plan = lo.output_plan(node)
    low, high = lo.clip_bounds(node)
    own_min, own_max = clamp_range(plan.qparams, low, high)
    act_range = (max(own_min, plan.act_min), min(own_max, plan.act_max))
    name = lo.requantize(x, plan.qparams, plan.value.name, node, act_range)
    lo.bind(plan.value, name)
    for clamp in plan.absorbed:
        lo.absorbed.add(id(clamp))
        lo.bind(clamp.outputs[0], name)


def lower_lut(lo: Lowering, node: ir.Node) -> None:
    x = lo.activation(node.inputs[0], node)
    plan = lo.output_plan(node)
    lo.finish("lut", [x], plan, lut_params(node, lo.params_of(x), plan), node)


def lower_softmax(lo: Lowering, node: ir.Node) -> None:
    x = lo.activation(node.inputs[0], node)
    info = lo.tensors[x]
    rank = len(info.shape)
    axis = int(attribute(node, "axis", -1 if lo.opset >= 13 else 1)) % rank
    if info.layout.index(axis) != rank - 1 or (lo.opset < 13 and axis != rank - 1):
        raise UnsupportedOpError(f"{node_label(node)}: Softmax is supported over the channel/last axis only")
    plan = lo.output_plan(node)
    lo.finish("softmax", [x], plan, softmax_params(lo.params_of(x), plan.qparams), node)


HANDLERS = {
    "QuantizeLinear": lower_quantize,
    "DequantizeLinear": lower_dequantize,
    "Conv": lower_conv,
    "Gemm": lower_gemm,
    "MatMul": lower_matmul,
    "Add": lower_add,
    "Mul": lower_mul,
    "MaxPool": lower_max_pool,
    "GlobalMaxPool": lower_global_max_pool,
    "AveragePool": lower_average_pool,
    "GlobalAveragePool": lower_global_average_pool,
    "ReduceMean": lower_reduce_mean,
    "Concat": lower_concat,
    "Pad": lower_pad,
    "Resize": lower_resize,
    "Upsample": lower_resize,
    "Relu": lower_clamp,
    "Clip": lower_clamp,
    "Softmax": lower_softmax,
    **{op: lower_movement for op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity")},
    **{op: lower_lut for op in ("Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Gelu")},
}

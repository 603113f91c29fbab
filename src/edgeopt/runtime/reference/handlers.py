"""One lowering function per ONNX op type: QDQ node -> integer op(s) of the program.

Each handler reads the node's quantized inputs from the :class:`Lowering`,
folds scales into fixed-point multipliers and emits ops of the table in
``ops.py``. Rank-4 activations are NHWC in the program, so axis attributes
are mapped through the tensor's layout. Here: Q/DQ, conv and fully connected
layers, elementwise Add/Mul and activations; the ops that keep their input's
quantization (pools, means, data movement) are in ``same_scale.py``; PRelu,
DepthToSpace/SpaceToDepth and Resize (nearest or linear) in ``vision_ops.py``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.errors import UnsupportedOpError
from edgeopt.quant.ops import TABLE_OPS
from edgeopt.runtime.reference.conv_transpose import lower_conv_transpose
from edgeopt.runtime.reference.lower import (
    Lowering,
    QParams,
    attribute,
    clamp_range,
    conv_pads,
    node_label,
    real_multiplier,
)
from edgeopt.runtime.reference.normalization import (
    claim_spelled_out,
    lower_instance_normalization,
    lower_layer_normalization,
    lower_lp_normalization,
    lower_rms_normalization,
)
from edgeopt.runtime.reference.program import (
    AddParams,
    Conv2dParams,
    FullyConnectedParams,
    MulParams,
    ReshapeParams,
    stored_layout,
)
from edgeopt.runtime.reference.attention import lower_activation_matmul, lower_softmax
from edgeopt.runtime.reference.recurrent import lower_recurrent
from edgeopt.runtime.reference.same_scale import (
    lower_average_pool,
    lower_concat,
    lower_gather,
    lower_global_average_pool,
    lower_global_max_pool,
    lower_max_pool,
    lower_movement,
    lower_pad,
    lower_reduce_max,
    lower_reduce_mean,
    lower_reduce_sum,
    lower_slice,
    lower_split,
)
from edgeopt.runtime.reference.tables import lut_params
from edgeopt.runtime.reference.vision_ops import lower_depth_to_space, lower_prelu, lower_resize

__all__ = ["HANDLERS", "PATTERNS"]

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
    params = lo.qdq_params(node)
    if source.name not in lo.tensor_of and source.is_graph_input():
        lo.model_input(source, params, is_float=False)
    tensor = lo.activation(source, node)
    if lo.params_of(tensor) != params:  # its Q's integers read at another scale (a HardSwish gate on ORT)
        tensor = lo.reinterpret(tensor, params, node.outputs[0].name, node)
    lo.bind(node.outputs[0], tensor)


# -- conv and fully connected -------------------------------------------------------------


def lower_conv(lo: Lowering, node: ir.Node) -> None:
    x = lo.activation(node.inputs[0], node)
    weight, weight_scale = lo.weight(node.inputs[1], node, channel_axis=0)
    if weight.ndim != 4:
        raise UnsupportedOpError(f"{node_label(node)}: only 1-D and 2-D convolutions with a constant weight are "
                                 f"supported (this one has a {weight.ndim - 2}-D kernel)")
    plan, source = lo.output_plan(node), lo.params_of(x)
    bias = lo.bias(node.inputs[2] if len(node.inputs) > 2 else None, node, source.scale * weight_scale)
    multiplier, shift = lo.per_channel_multipliers(source.scale * weight_scale / plan.qparams.scale)
    strides = tuple(attribute(node, "strides", [1, 1]))
    dilations = tuple(attribute(node, "dilations", [1, 1]))
    in_hw = lo.tensors[x].shape[1:3]
    params = Conv2dParams(
        weight=np.ascontiguousarray(weight.transpose(0, 2, 3, 1)), bias=bias, multiplier=multiplier, shift=shift,
        input_zero_point=source.zero_point, output_zero_point=plan.qparams.zero_point,
        strides=strides, dilations=dilations, pads=conv_pads(node, in_hw, weight.shape[2:], strides, dilations),
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
    if not eir.is_quantized_constant(node.inputs[1]):
        lower_activation_matmul(lo, node)
        return
    x = lo.activation(node.inputs[0], node)
    weight, scale = lo.weight(node.inputs[1], node, channel_axis=1)
    if weight.ndim != 2:
        raise UnsupportedOpError(f"{node_label(node)}: MatMul needs a constant 2-D weight")
    _fully_connected(lo, node, x, weight.T, scale, None)


# -- elementwise binary ---------------------------------------------------------------------


def _operand(lo: Lowering, value: ir.Value, node: ir.Node, out_rank: int) -> str:
    """An activation input, or a constant operand stored broadcast-ready in the output's layout."""
    if value.name in lo.tensor_of or not eir.is_quantized_constant(value):
        tensor = lo.activation(value, node)
        return tensor if len(lo.tensors[tensor].shape) == out_rank else _in_rank(lo, tensor, out_rank, node)
    data, scale, zero_point, _ = lo.dequantize_constant(value, node)
    if scale.size != 1:
        raise UnsupportedOpError(f"{node_label(node)}: per-axis quantized constant operand")
    logical = data.reshape((1,) * (out_rank - data.ndim) + data.shape)
    name = f"{value.name}__const"
    layout = stored_layout(out_rank)
    lo.constants[name] = np.ascontiguousarray(logical.transpose(layout)).astype(np.int8)
    return lo.add_stored_tensor(name, lo.constants[name].shape,
                                QParams(float(scale.reshape(())), int(zero_point.reshape(()))), layout)


def _in_rank(lo: Lowering, tensor: str, rank: int, node: ir.Node) -> str:
    """An activation of lower rank, broadcast by ONNX's rules (axes of size 1 in front), as a tensor of ``rank``:
    a reshape, when its bytes stay in order in the new rank's stored layout (a [16] bias-like row under a
    [1, 16] one; tf2onnx's unrolled RNN cell adds such), else refused."""
    info = lo.tensors[tensor]
    extra = rank - len(info.shape)
    layout = stored_layout(rank)
    logical = (1,) * max(extra, 0) + info.logical_shape
    # the original logical axis of each stored axis of size above 1, before and after
    kept_before = [axis for axis, size in zip(info.layout, info.shape) if size != 1]
    kept_after = [axis - extra for axis in layout if axis >= extra and logical[axis] != 1]
    if extra < 0 or kept_before != kept_after:
        raise UnsupportedOpError(f"{node_label(node)}: broadcasting an activation of rank {len(info.shape)} over "
                                 f"rank {rank} would reorder its values in the C's layout")
    shape = tuple(logical[axis] for axis in layout)
    name = lo.add_stored_tensor(f"{tensor}__rank{rank}", shape, lo.params_of(tensor), layout)
    return lo.emit("reshape", [tensor], name, ReshapeParams(shape=shape), node)


def _binary_inputs(lo: Lowering, node: ir.Node):
    plan = lo.output_plan(node)
    rank = len(lo.logical_shape(plan.value))
    a, b = (_operand(lo, value, node, rank) for value in node.inputs[:2])
    return plan, a, b, lo.params_of(a), lo.params_of(b)


def lower_add(lo: Lowering, node: ir.Node) -> None:
    """TFLite's int8 Add; a Sub is the same op with the second input's multiplier negated (as TFLite's SUB)."""
    plan, a, b, qa, qb = _binary_inputs(lo, node)
    twice_max = 2.0 * max(qa.scale, qb.scale)
    (ma, sa), (mb, sb) = real_multiplier(qa.scale / twice_max), real_multiplier(qb.scale / twice_max)
    mb = -mb if node.op_type == "Sub" else mb
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


HANDLERS = {
    "QuantizeLinear": lower_quantize,
    "DequantizeLinear": lower_dequantize,
    "Conv": lower_conv,
    "ConvTranspose": lower_conv_transpose,
    "Gemm": lower_gemm,
    "MatMul": lower_matmul,
    "Add": lower_add,
    "Sub": lower_add,
    "Mul": lower_mul,
    "MaxPool": lower_max_pool,
    "GlobalMaxPool": lower_global_max_pool,
    "AveragePool": lower_average_pool,
    "GlobalAveragePool": lower_global_average_pool,
    "ReduceMean": lower_reduce_mean,
    "ReduceSum": lower_reduce_sum,
    "ReduceMax": lower_reduce_max,
    "Concat": lower_concat,
    "Gather": lower_gather,
    "Pad": lower_pad,
    "Resize": lower_resize,
    "Upsample": lower_resize,
    "Relu": lower_clamp,
    "Clip": lower_clamp,
    "Softmax": lower_softmax,
    "Slice": lower_slice,
    "Split": lower_split,
    **{op: lower_movement for op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity")},
    **dict.fromkeys(TABLE_OPS, lower_lut),
    "PRelu": lower_prelu,
    "DepthToSpace": lower_depth_to_space,
    "SpaceToDepth": lower_depth_to_space,
    "LayerNormalization": lower_layer_normalization,
    "RMSNormalization": lower_rms_normalization,
    "LpNormalization": lower_lp_normalization,
    "GRU": lower_recurrent,
    "LSTM": lower_recurrent,
    "RNN": lower_recurrent,
    "InstanceNormalization": lower_instance_normalization,
}

# Spelled-out groups lowered as one op (a LayerNorm, an erf GELU), claimed before the graph walk.
PATTERNS = (claim_spelled_out,)

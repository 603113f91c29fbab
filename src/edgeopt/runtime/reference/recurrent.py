"""Lowering of ONNX GRU to the integer ``gru`` op (:mod:`edgeopt.runtime.reference.gru`).

The QDQ model (``edgeopt quantize --target mcu``) quantizes X, W and R (int8, one scale per gate row) and
the outputs that are read; B and the initial state stay float constants and are folded here. Each of Y
and Y_h that is read becomes one ``gru`` op writing it (both read: the recurrence runs twice, each op
writing its own output at its own scale). A state computed from the input's shape (PyTorch's zeros) is a
constant once `edgeopt compile --input-shape` fixes the shapes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.errors import UnsupportedOpError
from edgeopt.quant.ops import gru_refusal
from edgeopt.runtime.reference.gru import GATE_FRACTION_BITS, STATE_FRACTION_BITS, scratch_bytes
from edgeopt.runtime.reference.lower import Lowering, QParams, attribute, node_label, real_multiplier, text_attribute
from edgeopt.runtime.reference.program import GruParams, TensorInfo

__all__ = ["lower_gru"]

#: The widest input the int32 sum of int8 weights by centred int8 inputs (at most 127 x 255 each) holds.
_MAX_INPUT = (2**31 - 1) // (127 * 255)


def _strides(info: TensorInfo, axes: tuple[int, ...]) -> tuple[int, ...]:
    """The stored-buffer stride of each logical axis in ``axes``."""
    stored = [int(np.prod(info.shape[position + 1:], dtype=np.int64)) for position in range(len(info.shape))]
    return tuple(stored[info.layout.index(axis)] for axis in axes)


def _biases(lo: Lowering, node: ir.Node, directions: int, hidden: int) -> tuple[np.ndarray, np.ndarray]:
    """(Wb, Rb) in Q12, each [D, 3H]."""
    value = node.inputs[3] if len(node.inputs) > 3 else None
    if value is None or not value.name:
        return (np.zeros((directions, 3 * hidden), np.int32),) * 2
    real = lo.real_constant(value, node).reshape(directions, 6 * hidden) * 2.0**GATE_FRACTION_BITS
    q = np.clip(np.rint(real), -(2**31), 2**31 - 1).astype(np.int32)
    return q[:, :3 * hidden], q[:, 3 * hidden:]


def _initial_state(node: ir.Node, shape: tuple[int, int, int]) -> np.ndarray:
    value = node.inputs[5] if len(node.inputs) > 5 else None
    if value is None or not value.name:
        return np.zeros(shape, np.int16)
    array = eir.constant_array(value)
    if array is None:
        raise UnsupportedOpError(f"{node_label(node)}: initial_h is computed at run time: the C kernel takes a "
                                 "constant initial state (compile with --input-shape, which folds a zeros state "
                                 "computed from the input's shape)")
    real = np.broadcast_to(array.astype(np.float64), shape)
    if not np.all(np.abs(real) <= 1.0):
        raise UnsupportedOpError(f"{node_label(node)}: initial_h holds values outside [-1, 1]; the integer state "
                                 "is a Q15 number in that range")
    one = 1 << STATE_FRACTION_BITS
    return np.clip(np.rint(real * one), -(one - 1), one - 1).astype(np.int16)


def lower_gru(lo: Lowering, node: ir.Node) -> None:
    reason = gru_refusal(node, float_weights=False)  # W and R: lo.weight() checks them
    if reason is not None:
        raise UnsupportedOpError(f"{node_label(node)}: {reason}")
    direction = text_attribute(node, "direction", "forward")
    x = lo.activation(node.inputs[0], node)
    x_info = lo.tensors[x]
    steps, batch, input_size = x_info.shape  # [T, B, I] (layout 0; gru_refusal refuses 1)
    if input_size > _MAX_INPUT:
        raise UnsupportedOpError(f"{node_label(node)}: input size {input_size}; the C kernel takes at most "
                                 f"{_MAX_INPUT}")
    w, w_scale = lo.weight(node.inputs[1], node, 1)
    r, r_scale = lo.weight(node.inputs[2], node, 1)
    directions, rows = w.shape[0], w.shape[1]
    hidden = rows // 3
    source = lo.params_of(x)
    w_multiplier, w_shift = lo.per_channel_multipliers(source.scale * w_scale * 2.0**GATE_FRACTION_BITS)
    r_multiplier, r_shift = lo.per_channel_multipliers(r_scale * 2.0**(GATE_FRACTION_BITS - STATE_FRACTION_BITS))
    w_bias, r_bias = _biases(lo, node, directions, hidden)
    x_strides = (batch * input_size, input_size)
    common = dict(steps=steps, batch=batch, input_size=input_size, hidden=hidden, directions=directions,
                  reverse=direction == "reverse", linear_before_reset=bool(attribute(node, "linear_before_reset", 0)),
                  x_strides=x_strides, input_zero_point=source.zero_point, w=w.reshape(directions, rows, -1),
                  r=r.reshape(directions, rows, hidden), w_multiplier=w_multiplier, w_shift=w_shift,
                  r_multiplier=r_multiplier, r_shift=r_shift, w_bias=w_bias, r_bias=r_bias,
                  initial=_initial_state(node, (directions, batch, hidden)))
    read = [(index, value) for index, value in enumerate(node.outputs[:2])
            if value is not None and value.name and (value.uses() or value.is_graph_output())]
    for index, value in read:
        _emit(lo, node, x, value, final_only=index == 1, common=common)


def _emit(lo: Lowering, node: ir.Node, x: str, value: ir.Value, *, final_only: bool, common: dict) -> None:
    plan = lo.output_plan(node, value)
    target: QParams = plan.qparams
    multiplier, shift = real_multiplier(2.0**-STATE_FRACTION_BITS / target.scale)
    info = lo.tensors[lo.add_tensor(value.name, lo.logical_shape(value), target)]  # as finish() adds it
    # Y_h [D, B, H] (no step axis), Y [T, D, B, H]: rank 4, stored NHWC as [T, B, H, D]
    strides = (0, *_strides(info, (0, 1, 2))) if final_only else _strides(info, (0, 1, 2, 3))
    scratch = lo.add_stored_tensor(f"{value.name}#scratch", (scratch_bytes(common["hidden"]),), QParams(1.0, 0),
                                   (0,))
    params = GruParams(**common, final_only=final_only, output_size=info.size, y_strides=strides,
                       output_multiplier=multiplier, output_shift=shift, output_zero_point=target.zero_point,
                       act_min=plan.act_min, act_max=plan.act_max)
    lo.finish("gru", [x], plan, params, node, scratch)

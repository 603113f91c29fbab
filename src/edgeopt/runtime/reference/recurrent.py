"""Lowering of ONNX RNN, GRU and LSTM to the integer ``rnn``, ``gru`` and ``lstm`` ops (:mod:`.rnn`).

The QDQ model (``edgeopt quantize --target mcu``) quantizes X, W and R (int8, one scale per gate row) and
the outputs that are read; B and the initial states stay float constants and are folded here. Each of Y,
Y_h and Y_c that is read becomes one op writing it (two read: the recurrence runs twice, each op writing
its own output at its own scale), but for Y_h beside Y of a one-direction cell at one quantization (the MCU
quantizer gives them one scale): Y's last step, sliced out of Y. A state computed from the input's shape
(PyTorch's zeros) is a constant once `edgeopt compile --input-shape` fixes the shapes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.errors import UnsupportedOpError
from edgeopt.quant.ops import recurrent_refusal
from edgeopt.runtime.reference.lower import Lowering, QParams, attribute, node_label, real_multiplier, text_attribute
from edgeopt.runtime.reference.program import RecurrentParams, SliceParams, TensorInfo
from edgeopt.runtime.reference.rnn import (
    GATE_FRACTION_BITS,
    GATES,
    STATE_FRACTION_BITS,
    row_multipliers,
    scratch_bytes,
)

__all__ = ["lower_recurrent"]

#: The widest input the int32 sum of int8 weights by centred int8 inputs (at most 127 x 255 each) holds.
_MAX_INPUT = (2**31 - 1) // (127 * 255)
_ONE = 1 << STATE_FRACTION_BITS


def _strides(info: TensorInfo, axes: tuple[int, ...]) -> tuple[int, ...]:
    """The stored-buffer stride of each logical axis in ``axes``."""
    stored = [int(np.prod(info.shape[position + 1:], dtype=np.int64)) for position in range(len(info.shape))]
    return tuple(stored[info.layout.index(axis)] for axis in axes)


def _biases(lo: Lowering, node: ir.Node, directions: int, rows: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(Wb, Rb, shift): int16 Q12 values over ``2**-shift``, each [D, G*H], ``shift`` 0 unless a bias
    reaches 8 (then the fewest coarser steps that hold it). Both are added to a gate's input, so Rb is folded
    into Wb (before rounding), except a GRU's Rb_n with linear_before_reset, which the reset gate scales:
    Rb is zeros elsewhere (and the C stores no array for zeros)."""
    value = node.inputs[3] if len(node.inputs) > 3 else None
    if value is None or not value.name:
        return np.zeros((directions, rows), np.int16), np.zeros((directions, rows), np.int16), 0
    real = lo.real_constant(value, node).reshape(directions, 2 * rows) * 2.0**GATE_FRACTION_BITS
    w_bias, r_bias = real[:, :rows].copy(), real[:, rows:].copy()
    kept = (node.op_type == "GRU" and bool(attribute(node, "linear_before_reset", 0))) * (rows // 3)
    w_bias[:, :rows - kept] += r_bias[:, :rows - kept]
    r_bias[:, :rows - kept] = 0.0
    shift = 0
    while max(np.abs(np.rint(b / 2.0**shift)).max(initial=0) for b in (w_bias, r_bias)) > 2**15 - 1:
        shift += 1
    return np.rint(w_bias / 2.0**shift).astype(np.int16), np.rint(r_bias / 2.0**shift).astype(np.int16), shift


def _initial(node: ir.Node, index: int, shape: tuple[int, int, int], label: str, bound: float) -> np.ndarray:
    """The constant initial state of input ``index`` in Q15 (zeros when absent or read from a tensor), within
    ``bound``."""
    value = node.inputs[index] if len(node.inputs) > index else None
    array = eir.constant_array(value) if value is not None and value.name else None
    if array is None:
        return np.zeros(shape, np.int64)
    real = np.broadcast_to(array.astype(np.float64), shape)
    if not np.all(np.abs(real) <= bound):
        raise UnsupportedOpError(f"{node_label(node)}: {label} holds values outside [-{bound:g}, {bound:g}], the "
                                 "range of the integer state")
    return np.rint(real * _ONE).astype(np.int64)


def _state_inputs(lo: Lowering, node: ir.Node, shape: tuple[int, int, int]) -> tuple[list[str], tuple]:
    """The initial states read from tensors (a streaming model's state inputs): their program tensors and,
    for each, (0 for h or 1 for c, zero point, multiplier and shift to Q15)."""
    tensors, moves = [], []
    for which, index in enumerate((5, 6) if node.op_type == "LSTM" else (5,)):
        value = node.inputs[index] if len(node.inputs) > index else None
        if value is None or not value.name or eir.constant_array(value) is not None:
            continue
        tensor = lo.activation(value, node)  # a state computed from the input's shape: folded by --input-shape
        if lo.tensors[tensor].layout != tuple(range(len(lo.tensors[tensor].shape))):
            raise UnsupportedOpError(f"{node_label(node)}: its initial state {value.name!r} is stored permuted; "
                                     "the C kernel reads [D, B, H] in order")
        if lo.tensors[tensor].size != int(np.prod(shape)):
            raise UnsupportedOpError(f"{node_label(node)}: its initial state {value.name!r} has "
                                     f"{lo.tensors[tensor].size} values, not D x B x H = {int(np.prod(shape))}")
        source = lo.params_of(tensor)
        multiplier, shift = real_multiplier(source.scale * _ONE)
        tensors.append(tensor)
        moves.append((which, source.zero_point, multiplier, shift))
    return tensors, tuple(moves)


def lower_recurrent(lo: Lowering, node: ir.Node) -> None:
    """An RNN, GRU or LSTM: one op for each of its outputs that is read."""
    reason = recurrent_refusal(node, float_weights=False)  # W and R: lo.weight() checks them
    if reason is not None:
        raise UnsupportedOpError(f"{node_label(node)}: {reason}")
    cell = node.op_type.lower()
    x = lo.activation(node.inputs[0], node)
    steps, batch, input_size = lo.tensors[x].logical_shape  # [T, B, I] (layout 0; recurrent_refusal refuses 1)
    x_strides = _strides(lo.tensors[x], (0, 1, 2))
    if x_strides[2] != 1:
        raise UnsupportedOpError(f"{node_label(node)}: its input is stored with the features of a step apart "
                                 f"(strides {list(x_strides)}); the C kernel reads each step's features in a row")
    if input_size > _MAX_INPUT:
        raise UnsupportedOpError(f"{node_label(node)}: input size {input_size}; the C kernel takes at most "
                                 f"{_MAX_INPUT}")
    w, w_scale = lo.weight(node.inputs[1], node, 1)
    r, r_scale = lo.weight(node.inputs[2], node, 1)
    directions, rows = w.shape[0], w.shape[1]
    hidden = rows // GATES[cell]
    source = lo.params_of(x)
    try:
        w_multiplier, w_shift = row_multipliers(source.scale * w_scale * 2.0**GATE_FRACTION_BITS, "W")
        r_multiplier, r_shift = row_multipliers(r_scale * 2.0**(GATE_FRACTION_BITS - STATE_FRACTION_BITS), "R")
    except ValueError as error:
        raise UnsupportedOpError(f"{node_label(node)}: {error}") from None
    w_bias, r_bias, bias_shift = _biases(lo, node, directions, rows)
    state = (directions, batch, hidden)
    initial = np.clip(_initial(node, 5, state, "initial_h", 1.0), 1 - _ONE, _ONE - 1).astype(np.int16)
    cell_state = (_initial(node, 6, state, "initial_c", 2.0**16 - 1) if cell == "lstm"
                  else np.zeros(state, np.int64)).astype(np.int32)
    common = dict(cell=cell, steps=steps, batch=batch, input_size=input_size, hidden=hidden, directions=directions,
                  reverse=text_attribute(node, "direction", "forward") == "reverse",
                  linear_before_reset=bool(attribute(node, "linear_before_reset", 0)),
                  x_strides=x_strides[:2], input_zero_point=source.zero_point,
                  w=w.reshape(directions, rows, -1), r=r.reshape(directions, rows, hidden), w_multiplier=w_multiplier,
                  w_shift=w_shift, r_multiplier=r_multiplier, r_shift=r_shift, w_bias=w_bias, r_bias=r_bias,
                  bias_shift=bias_shift, initial=initial, initial_cell=cell_state)
    states, common["state_inputs"] = _state_inputs(lo, node, state)
    read = [output for output, value in enumerate(node.outputs[:3])
            if value is not None and value.name and (value.uses() or value.is_graph_output())]
    for output in read:
        if output == 1 and 0 in read and _same_plan(lo, node) and directions == 1:
            _last_step(lo, node, common["reverse"])
        else:
            _emit(lo, node, [x, *states], node.outputs[output], output, common)


def _same_plan(lo: Lowering, node: ir.Node) -> bool:
    """Whether Y and Y_h are quantized (and clamped) alike, as `quantize --target mcu` makes them."""
    y, last = lo.output_plan(node, node.outputs[0]), lo.output_plan(node, node.outputs[1])
    return (y.qparams, y.act_min, y.act_max) == (last.qparams, last.act_min, last.act_max)


def _last_step(lo: Lowering, node: ir.Node, reverse: bool) -> None:
    """Y_h of a one-direction cell whose Y is read at the same quantization: Y's last step (its first, when it
    runs in reverse), sliced out of Y (stored [T, B, H, 1]) instead of a second run of the recurrence."""
    y, value = lo.tensor_of[node.outputs[0].name], node.outputs[1]
    info = lo.tensors[y]
    step = lo.add_stored_tensor(f"{value.name}__step", (1, *info.shape[1:]), lo.params_of(y), info.layout)
    lo.emit("slice", [y], step, SliceParams(axis=0, start=0 if reverse else info.shape[0] - 1, size=1), node)
    lo.finish_as_reshape(step, lo.output_plan(node, value), node)


def _emit(lo: Lowering, node: ir.Node, inputs: list[str], value: ir.Value, output: int, common: dict) -> None:
    plan = lo.output_plan(node, value)
    target: QParams = plan.qparams
    multiplier, shift = real_multiplier(2.0**-STATE_FRACTION_BITS / target.scale)
    info = lo.tensors[lo.add_tensor(value.name, lo.logical_shape(value), target)]  # as finish() adds it
    # Y_h, Y_c [D, B, H] (no step axis), Y [T, D, B, H]: rank 4, stored NHWC as [T, B, H, D]
    strides = (0, *_strides(info, (0, 1, 2))) if output else _strides(info, (0, 1, 2, 3))
    scratch = lo.add_stored_tensor(f"{value.name}#scratch", (scratch_bytes(common["cell"], common["hidden"]),),
                                   QParams(1.0, 0), (0,))
    params = RecurrentParams(**common, output=output, output_size=info.size, y_strides=strides,
                             output_multiplier=multiplier, output_shift=shift, output_zero_point=target.zero_point,
                             act_min=plan.act_min, act_max=plan.act_max)
    lo.finish(common["cell"], inputs, plan, params, node, scratch)

"""The integer GRU: ONNX's GRU over an int8 sequence, its state kept in int16 between steps.

Per step, for each direction and batch row, with gates z, r, n stacked in W and R as ONNX stacks them::

    z = sigmoid(W_z x + R_z h + Wb_z + Rb_z)        r = sigmoid(W_r x + R_r h + Wb_r + Rb_r)
    n = tanh(W_n x + Wb_n + r * (R_n h + Rb_n))     (linear_before_reset = 1, PyTorch's)
    n = tanh(W_n x + Wb_n + R_n (r * h) + Rb_n)     (linear_before_reset = 0, ONNX's default)
    h = (1 - z) * n + z * h

In integers: ``x`` is int8 at its scale; W and R are int8 with one scale per gate row. ``h`` lives in
Q15 (int16, ``h = q / 2**15``): it is a mix of a tanh and the previous state, so it stays in [-1, 1]
from a state there. Each matrix product is an exact int32 sum, moved by one fixed-point multiplier per
row to Q12 (``2**-12`` steps), where both biases are added; a gate's input is clamped to [-8, 8) and
read from a 513-entry Q15 table of sigmoid or tanh over that range, linearly interpolated between
entries ``1/32`` apart (within 4 Q15 steps of the function: 3.7 for tanh, where it bends most). The
output (Y, or Y_h: the last state of each direction) is ``h`` requantized to int8 at the output's scale.

The C kernel ``eo_gru_s8`` does the same arithmetic row by row, with an int16 scratch of 4 x hidden
values (the state, the next state, ``r * h`` and ``z``) in the arena.
"""

from __future__ import annotations

import math

import numpy as np

from edgeopt.runtime.reference.fixed_point import multiply_by_quantized_multiplier as mbqm
from edgeopt.runtime.reference.program import GruParams

__all__ = ["GATE_FRACTION_BITS", "SIGMOID_TABLE", "STATE_FRACTION_BITS", "TANH_TABLE", "gate_activation", "gru",
           "scratch_bytes"]

#: The state's and the gates' fixed point: Q15 (int16).
STATE_FRACTION_BITS = 15
#: The gates' inputs: Q12 in int64 sums, clamped to [-8, 8) before the table.
GATE_FRACTION_BITS = 12
_TABLE_STEP_BITS = 7  # Q12 units between table entries: 2**7 / 2**12 = 1/32
_ONE = 1 << STATE_FRACTION_BITS
_HALF = 1 << (STATE_FRACTION_BITS - 1)


def _table(function) -> np.ndarray:
    points = [-8.0 + k / 32.0 for k in range(513)]
    return np.array([min(max(round(function(v) * _ONE), -(_ONE - 1)), _ONE - 1) for v in points], dtype=np.int16)


SIGMOID_TABLE = _table(lambda v: 1.0 / (1.0 + math.exp(-v)))
TANH_TABLE = _table(math.tanh)


def gate_activation(q12: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``table``'s function of Q12 values, in Q15: clamp to [-8, 8), interpolate between two entries."""
    u = np.clip(np.asarray(q12, dtype=np.int64), -(1 << 15), (1 << 15) - 1) + (1 << 15)
    index, fraction = u >> _TABLE_STEP_BITS, u & ((1 << _TABLE_STEP_BITS) - 1)
    low = table.astype(np.int64)[index]
    high = table.astype(np.int64)[index + 1]
    return low + (((high - low) * fraction + (1 << (_TABLE_STEP_BITS - 1))) >> _TABLE_STEP_BITS)


def scratch_bytes(hidden: int) -> int:
    """The C kernel's int16 scratch: state, next state, ``r * h`` and ``z``."""
    return 4 * hidden * 2


def _step(p: GruParams, d: int, x: np.ndarray, h: np.ndarray, rounding: str) -> np.ndarray:
    """One step of direction ``d`` for every batch row: ``x`` [B, I] int8, ``h`` [B, H] Q15 -> next ``h``."""
    hidden = p.hidden
    w, r = p.w[d].astype(np.int64), p.r[d].astype(np.int64)
    gx = mbqm((x.astype(np.int64) - p.input_zero_point) @ w.T, p.w_multiplier, p.w_shift, rounding) + p.w_bias[d]
    gates = 2 * hidden if not p.linear_before_reset else 3 * hidden
    gh = mbqm(h @ r[:gates].T, p.r_multiplier[:gates], p.r_shift[:gates], rounding) + p.r_bias[d, :gates]
    z = gate_activation(gx[:, :hidden] + gh[:, :hidden], SIGMOID_TABLE)
    reset = gate_activation(gx[:, hidden:2 * hidden] + gh[:, hidden:2 * hidden], SIGMOID_TABLE)
    if p.linear_before_reset:
        candidate = gx[:, 2 * hidden:] + ((reset * gh[:, 2 * hidden:] + _HALF) >> STATE_FRACTION_BITS)
    else:
        gated = (reset * h + _HALF) >> STATE_FRACTION_BITS
        candidate = gx[:, 2 * hidden:] + p.r_bias[d, 2 * hidden:] + mbqm(
            gated @ r[2 * hidden:].T, p.r_multiplier[2 * hidden:], p.r_shift[2 * hidden:], rounding)
    n = gate_activation(candidate, TANH_TABLE)
    return ((_ONE - z) * n + z * h + _HALF) >> STATE_FRACTION_BITS


def _write(p: GruParams, out: np.ndarray, t: int, d: int, h: np.ndarray, rounding: str) -> None:
    values = np.clip(mbqm(h, p.output_multiplier, p.output_shift, rounding) + p.output_zero_point,
                     p.act_min, p.act_max)
    st, sd, sb, sh = p.y_strides
    positions = (t * st + d * sd + np.arange(p.batch)[:, None] * sb + np.arange(p.hidden)[None, :] * sh)
    out[positions] = values


def gru(x: np.ndarray, *, params: GruParams, rounding: str) -> np.ndarray:
    p = params
    flat = x.reshape(-1)
    out = np.zeros(p.output_size, dtype=np.int8)
    xt, xb = p.x_strides
    rows = np.arange(p.batch)[:, None] * xb + np.arange(p.input_size)[None, :]
    for d in range(p.directions):
        h = p.initial[d].astype(np.int64)
        backward = p.reverse or d == 1
        for step in range(p.steps):
            t = p.steps - 1 - step if backward else step
            h = _step(p, d, flat[t * xt + rows], h, rounding)
            if not p.final_only:
                _write(p, out, t, d, h, rounding)
        if p.final_only:
            _write(p, out, 0, d, h, rounding)
    return out

"""The integer RNN, GRU and LSTM: ONNX's recurrent ops over an int8 sequence, their state in Q15 between steps.

Per step, for each direction and batch row, with the gates stacked in W and R as ONNX stacks them (GRU:
z, r, n; LSTM: i, o, f, c)::

    RNN   h = tanh(W x + R h + Wb + Rb)
    GRU   z = sigmoid(W_z x + R_z h + Wb_z + Rb_z)        r = sigmoid(W_r x + R_r h + Wb_r + Rb_r)
          n = tanh(W_n x + Wb_n + r * (R_n h + Rb_n))     (linear_before_reset = 1, PyTorch's)
          n = tanh(W_n x + Wb_n + R_n (r * h) + Rb_n)     (linear_before_reset = 0, ONNX's default)
          h = (1 - z) * n + z * h
    LSTM  i, o, f = sigmoid(W_g x + R_g h + Wb_g + Rb_g)  c~ = tanh(W_c x + R_c h + Wb_c + Rb_c)
          C = f * C + i * c~                               h = o * tanh(C)

In integers: ``x`` is int8 at its scale; W and R are int8 with one scale per gate row. ``h`` lives in
Q15 (int16, ``h = q / 2**15``): an RNN's is a tanh, a GRU's a mix of a tanh and the previous state, an
LSTM's a sigmoid times a tanh, so it stays in [-1, 1] from a state there. An LSTM's cell ``C`` is not
bounded (it may grow by 1 a step): it is Q15 in int32 (up to 65,536), saturated there.

Each matrix product is an exact int32 sum, moved to Q12 (``2**-12`` steps) by one int16 multiplier per
row over a power of two per matrix (:func:`scale_rows`), where both biases are added (int16, Q12 unless
one reaches 8: then ``bias_shift`` coarser steps). tanh clamps its input's magnitude below 8 and reads a
257-entry Q15 table over [0, 8], linearly interpolated between entries ``1/32`` apart, negated for a
negative input (within 4 Q15 steps: 3.7 where it bends most); sigmoid is ``(1 + tanh(x / 2)) / 2`` from
the same table (within 2.5 steps); ``tanh(C)`` reads ``C`` in Q12 (``C >> 3``). The output (Y; Y_h, the
last state of each direction; an LSTM's Y_c, its last cell) is requantized to int8 at the output's scale.

The C kernels ``eo_rnn_s8``, ``eo_gru_s8`` and ``eo_lstm_s8`` do the same arithmetic row by row, in a
scratch of :func:`scratch_bytes` in the arena.
"""

from __future__ import annotations

import math

import numpy as np

from edgeopt.runtime.reference.fixed_point import multiply_by_quantized_multiplier as mbqm
from edgeopt.runtime.reference.program import RecurrentParams

__all__ = ["GATE_FRACTION_BITS", "GATES", "STATE_FRACTION_BITS", "TANH_TABLE", "recurrent", "row_multipliers",
           "scale_rows", "scratch_bytes", "sigmoid", "tanh"]

#: The state's and the gates' fixed point: Q15 (int16; an LSTM's cell int32).
STATE_FRACTION_BITS = 15
#: The gates' inputs: Q12 in int64 sums, their magnitude clamped below 8 before the table.
GATE_FRACTION_BITS = 12
#: Gates per cell, stacked in W, R and B in this order.
GATES = {"rnn": 1, "gru": 3, "lstm": 4}
_TABLE_STEP_BITS_BELOW_ONE = 5  # table entries 2**-5 = 1/32 apart
_ONE = 1 << STATE_FRACTION_BITS
_HALF = 1 << (STATE_FRACTION_BITS - 1)
_INT32 = (-(2**31), 2**31 - 1)


#: tanh over [0, 8] in Q15, 257 entries ``1/32`` apart (tanh is odd: negative inputs read it mirrored).
TANH_TABLE = np.array([min(round(math.tanh(k / 32.0) * _ONE), _ONE - 1) for k in range(257)], dtype=np.int16)


def _tanh_fixed(value: np.ndarray, fraction_bits: int) -> np.ndarray:
    """tanh of fixed-point values with ``fraction_bits`` bits, in Q15: ``|value|`` clamped below 8, interpolated
    between two entries of :data:`TANH_TABLE` (``1/32`` apart) by the bits below an entry, negated for a
    negative value (exactly odd)."""
    shift, limit = fraction_bits - _TABLE_STEP_BITS_BELOW_ONE, 8 << fraction_bits
    value = np.asarray(value, dtype=np.int64)
    u = np.minimum(np.abs(value), limit - 1)
    index, fraction = u >> shift, u & ((1 << shift) - 1)
    low = TANH_TABLE.astype(np.int64)[index]
    high = TANH_TABLE.astype(np.int64)[index + 1]
    magnitude = low + (((high - low) * fraction + (1 << (shift - 1))) >> shift)
    return np.where(value < 0, -magnitude, magnitude)


def tanh(q12: np.ndarray) -> np.ndarray:
    """tanh of Q12 values, in Q15 (within 4 steps: 3.7 where it bends most)."""
    return _tanh_fixed(q12, GATE_FRACTION_BITS)


def sigmoid(q12: np.ndarray) -> np.ndarray:
    """sigmoid of Q12 values, in Q15, as ``(1 + tanh(x / 2)) / 2``: the Q12 value read as Q13 is ``x / 2``, so
    one table serves both (1 KB of flash less) and sigmoid is within 2.5 steps."""
    return (_ONE + _tanh_fixed(q12, GATE_FRACTION_BITS + 1)) >> 1


def scratch_bytes(cell: str, hidden: int) -> int:
    """The C kernels' scratch: int16 rows of ``hidden``, two for an RNN (state, next state), four for a GRU
    (state, next state, ``r * h``, ``z``) and an LSTM (state, next state and the int32 cell)."""
    return (2 if cell == "rnn" else 4) * hidden * 2


#: The largest row multiplier: int16.
_MAX_ROW_MULTIPLIER = (1 << 15) - 1


def row_multipliers(real: np.ndarray, what: str) -> tuple[np.ndarray, int]:
    """Real per-row factors as int16 multipliers over one ``2**shift`` (:func:`scale_rows`): the largest
    shift, at most 62, that keeps every multiplier within int16. ValueError (naming ``what``) when that
    shift would be below 1 (a factor near 2**14: one step of the product far beyond the gates' range)."""
    real = np.asarray(real, dtype=np.float64)
    largest = float(real.max(initial=0.0))
    shift = 62 if largest <= 0 else min(62, 14 - math.floor(math.log2(largest)))
    while shift >= 1 and np.rint(largest * 2.0**shift) > _MAX_ROW_MULTIPLIER:
        shift -= 1
    if shift < 1:
        raise ValueError(f"{what}: a scale of {largest:.3g} Q12 steps per unit of the product is too coarse for the "
                         "gates' fixed point")
    return np.rint(real * 2.0**shift).astype(np.int16), shift


def scale_rows(product: np.ndarray, multiplier: np.ndarray, shift: int) -> np.ndarray:
    """Exact int32 sums [..., rows] times each row's int16 ``multiplier`` over ``2**shift``, rounded half up:
    one shift per matrix keeps every row's error within half a step of the matrix's largest (2 bytes a row)."""
    return (product * multiplier.astype(np.int64) + (1 << (shift - 1))) >> shift


def _rows(p: RecurrentParams, d: int, vector: np.ndarray, rows: slice) -> np.ndarray:
    """R's ``rows`` times the Q15 ``vector`` [B, H], in Q12 with Rb."""
    product = vector @ p.r[d, rows].astype(np.int64).T
    return scale_rows(product, p.r_multiplier[rows], p.r_shift) + (p.r_bias[d, rows].astype(np.int64) << p.bias_shift)


def _rnn_step(p: RecurrentParams, d: int, gx: np.ndarray, h: np.ndarray, c):
    return tanh(gx + _rows(p, d, h, slice(0, p.hidden))), c


def _gru_step(p: RecurrentParams, d: int, gx: np.ndarray, h: np.ndarray, c):
    hidden = p.hidden
    gates = slice(0, 3 * hidden) if p.linear_before_reset else slice(0, 2 * hidden)
    gh = _rows(p, d, h, gates)
    z = sigmoid(gx[:, :hidden] + gh[:, :hidden])
    reset = sigmoid(gx[:, hidden:2 * hidden] + gh[:, hidden:2 * hidden])
    if p.linear_before_reset:
        candidate = gx[:, 2 * hidden:] + ((reset * gh[:, 2 * hidden:] + _HALF) >> STATE_FRACTION_BITS)
    else:
        gated = (reset * h + _HALF) >> STATE_FRACTION_BITS
        candidate = gx[:, 2 * hidden:] + _rows(p, d, gated, slice(2 * hidden, 3 * hidden))
    n = tanh(candidate)
    return ((_ONE - z) * n + z * h + _HALF) >> STATE_FRACTION_BITS, c


def _lstm_step(p: RecurrentParams, d: int, gx: np.ndarray, h: np.ndarray, c: np.ndarray):
    hidden = p.hidden
    g = gx + _rows(p, d, h, slice(0, 4 * hidden))
    i, o, f = (sigmoid(g[:, k * hidden:(k + 1) * hidden]) for k in range(3))
    candidate = tanh(g[:, 3 * hidden:])
    c = np.clip((f * c + i * candidate + _HALF) >> STATE_FRACTION_BITS, *_INT32)
    squashed = tanh(c >> (STATE_FRACTION_BITS - GATE_FRACTION_BITS))
    return (o * squashed + _HALF) >> STATE_FRACTION_BITS, c


def _write(p: RecurrentParams, out: np.ndarray, t: int, d: int, q15: np.ndarray, rounding: str) -> None:
    values = np.clip(mbqm(q15, p.output_multiplier, p.output_shift, rounding) + p.output_zero_point,
                     p.act_min, p.act_max)
    st, sd, sb, sh = p.y_strides
    out[t * st + d * sd + np.arange(p.batch)[:, None] * sb + np.arange(p.hidden)[None, :] * sh] = values


def _states(p: RecurrentParams, inputs: tuple[np.ndarray, ...], rounding: str) -> list[np.ndarray]:
    """The initial [h, c] in Q15, each [D, B, H]: the constants, or the int8 state inputs moved to Q15."""
    states = [p.initial.astype(np.int64), p.initial_cell.astype(np.int64)]
    for tensor, (which, zero_point, multiplier, shift) in zip(inputs, p.state_inputs):
        moved = mbqm(tensor.astype(np.int64).reshape(states[which].shape) - zero_point, multiplier, shift, rounding)
        states[which] = np.clip(moved, 1 - _ONE, _ONE - 1) if which == 0 else moved  # h within int16
    return states


def recurrent(x: np.ndarray, *states: np.ndarray, params: RecurrentParams, rounding: str) -> np.ndarray:
    """An RNN, a GRU or an LSTM (``params.cell``) writing Y, Y_h or Y_c (``params.output``: 0, 1, 2); ``states``: the
    initial states read from tensors (``params.state_inputs``)."""
    p = params
    initial_h, initial_c = _states(p, states, rounding)
    step_function = {"rnn": _rnn_step, "gru": _gru_step, "lstm": _lstm_step}[p.cell]
    flat = x.reshape(-1)
    out = np.zeros(p.output_size, dtype=np.int8)
    xt, xb = p.x_strides
    rows = np.arange(p.batch)[:, None] * xb + np.arange(p.input_size)[None, :]
    for d in range(p.directions):
        w, w_bias = p.w[d].astype(np.int64), p.w_bias[d].astype(np.int64) << p.bias_shift
        h, c = initial_h[d], initial_c[d]
        backward = p.reverse or d == 1
        for step in range(p.steps):
            t = p.steps - 1 - step if backward else step
            centered = flat[t * xt + rows].astype(np.int64) - p.input_zero_point
            gx = scale_rows(centered @ w.T, p.w_multiplier, p.w_shift) + w_bias
            h, c = step_function(p, d, gx, h, c)
            if p.output == 0:
                _write(p, out, t, d, h, rounding)
        if p.output:
            _write(p, out, 0, d, h if p.output == 1 else c, rounding)
    return out

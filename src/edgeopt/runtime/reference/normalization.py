"""Lowering of LayerNorm, RMSNorm and L2 normalization (the ONNX ops, and spelled out) to ``layer_norm``, and of
a spelled-out GELU to a ``lut``.

LayerNorm ``y = (x - mean) / sqrt(var + eps) * gamma + beta`` over the normalized axes, with
``x = s_in * (q - zp_in)``: mean and variance are shift- and scale-invariant, so in the input's integer
steps ``(x - mean) / sqrt(var + eps) = d / sqrt(V)`` with ``d = D * q - sum(q)`` and
``V = D * sum(q * q) - sum(q)**2 + D**2 * eps / s_in**2`` (D values per row; ``eps / s_in**2`` is epsilon
in input steps squared, rounded once into ``epsilon_term``). ``1 / sqrt(V)`` is found at run time in
integers (:func:`edgeopt.runtime.reference.ops.layer_norm`); per position ``c`` of the row,
``gamma[c] / s_out`` becomes a fixed-point multiplier (signed: gamma may be negative) and ``beta[c] / s_out``
an int32 offset, both with ``BIAS_BITS`` bits below the output step, rounded away once at the end.

RMSNorm ``y = x / sqrt(mean(x^2) + eps) * gamma`` subtracts no mean: the same kernel, not centered, on
``q - zp_in`` (``d = D * (q - zp_in)``, ``V = D * sum((q - zp_in)**2) + D**2 * eps / s_in**2``). An L2
normalization ``y = x / max(||x||, eps)`` (LpNormalization with p = 2, ``F.normalize``) is an RMSNorm with
gamma ``1 / sqrt(D)`` and ``eps**2 / D`` for its epsilon: ``x / sqrt(||x||**2 + eps**2)``, which differs from
``max(||x||, eps)`` only for a norm near eps (by at most sqrt(2), at a norm of eps itself).

The normalized axes must be contiguous in the stored layout (NHWC for rank 4), in any order there: the
kernel views the tensor as (outer, D, inner). So a LayerNorm over the channels of an NCHW tensor
(ConvNeXt's channels-first LayerNorm2d, spelled out) reduces the innermost stored axis, and one over the
last axis of a permuted [N, H, W, C] tensor a middle one.

A spelled-out group (:mod:`edgeopt.runtime.reference.patterns`) is claimed before the graph walk: its
first node (graph order) lowers the whole group, the others are skipped.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.errors import UnsupportedOpError
from edgeopt.runtime.reference.fixed_point import quantize_multiplier
from edgeopt.runtime.reference.lower import Lowering, OutputPlan, QParams, attribute, node_label
from edgeopt.runtime.reference.patterns import (
    SpelledGelu,
    SpelledLayerNorm,
    constant_operand,
    match_spelled_out,
)
from edgeopt.runtime.reference.program import LayerNormParams, LutParams
from edgeopt.runtime.reference.tables import erf, lut_table

__all__ = ["BIAS_BITS", "claim_spelled_out", "layer_norm_params", "lower_instance_normalization",
           "lower_layer_normalization", "lower_lp_normalization", "lower_rms_normalization"]

#: Bits below the output step kept through gamma's multiply and beta's add, dropped by one rounding at the end.
BIAS_BITS = 8
#: The longest row: sums stay exact (``D * sum(q * q) < 2**60``) and ``d`` fits int32.
MAX_ROW = 1 << 23
#: Not centered, ``|q - zp_in|`` reaches 255, not 128: half the row for the same bound.
MAX_UNCENTERED_ROW = 1 << 22
_MAX_EPSILON_TERM = 1 << 61  # with D * sum(q * q) < 2**60, V < 2**62: its square root fits int32


def _signed_multipliers(reals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q31 multipliers and shifts of ``|real|``, each multiplier negated where ``real`` is negative."""
    pairs = [quantize_multiplier(abs(float(r))) if r != 0 else (0, 0) for r in reals]
    multiplier = np.array([int(math.copysign(m, r)) for (m, _), r in zip(pairs, reals)], dtype=np.int32)
    return multiplier, np.array([s for _, s in pairs], dtype=np.int8)


def layer_norm_params(geometry: tuple[int, int, int], source: QParams, plan: OutputPlan, epsilon: float,
                      gamma: np.ndarray, beta: np.ndarray, *, affine_inner: bool = False,
                      centered: bool = True) -> LayerNormParams:
    """The integer parameters of a LayerNorm over the middle axis of ``geometry`` = (outer, D, inner);
    ``gamma``, ``beta``: one real per position of a row, in stored order (``affine_inner``: per inner
    position, InstanceNorm's channels). ``centered`` False: an RMSNorm (no mean subtracted)."""
    outer, reduce, inner = geometry
    # |normalized| <= sqrt(D - 1), not centered sqrt(D): at most 2**(30 - fraction), whatever D
    fraction_bits = 30 - ((reduce - 1).bit_length() + 1) // 2
    target = plan.qparams
    multiplier, shift = _signed_multipliers(gamma / target.scale * 2.0 ** (BIAS_BITS - fraction_bits))
    bias = np.clip(np.rint(beta / target.scale * 2.0 ** BIAS_BITS), -(2**31), 2**31 - 1).astype(np.int32)
    epsilon_term = min(float(reduce) ** 2 * epsilon / source.scale ** 2, float(_MAX_EPSILON_TERM))
    return LayerNormParams(outer=outer, reduce=reduce, inner=inner, epsilon_term=int(round(epsilon_term)),
                           fraction_bits=fraction_bits, bias_bits=BIAS_BITS, multiplier=multiplier, shift=shift,
                           bias=bias, output_zero_point=target.zero_point, act_min=plan.act_min,
                           act_max=plan.act_max, affine_inner=affine_inner, centered=centered,
                           input_zero_point=0 if centered else source.zero_point)


def _geometry(lo: Lowering, x: str, axes, node: ir.Node, *, centered: bool = True) -> tuple[int, int, int]:
    """(outer, D, inner) of the stored tensor ``x`` normalized over the logical ``axes``."""
    info = lo.tensors[x]
    positions = sorted(info.layout.index(a) for a in axes)
    if positions != list(range(positions[0], positions[-1] + 1)):
        raise UnsupportedOpError(f"{node_label(node)}: LayerNorm over axes {list(axes)} of a rank-{len(info.shape)} "
                                 "tensor is not supported: the normalized axes must be neighbours in the stored "
                                 "layout (NHWC for rank 4; the last axis, or the channels of NCHW, always are)")
    shape = info.shape
    reduce = int(np.prod(shape[positions[0]:positions[-1] + 1], dtype=np.int64))
    longest = MAX_ROW if centered else MAX_UNCENTERED_ROW
    if reduce > longest:
        raise UnsupportedOpError(f"{node_label(node)}: {'LayerNorm' if centered else 'RMS or L2 norm'} over {reduce} "
                                 f"values; the kernel takes at most {longest}")
    return (int(np.prod(shape[:positions[0]], dtype=np.int64)), reduce,
            int(np.prod(shape[positions[-1] + 1:], dtype=np.int64)))


def _along_row(lo: Lowering, x: str, axes, array: np.ndarray, what: str, node: ir.Node) -> np.ndarray:
    """``array`` (broadcasting to ``x``'s logical shape, varying only along ``axes``) as one value per position
    of a row, in stored order."""
    info = lo.tensors[x]
    logical, rank = info.logical_shape, len(info.shape)
    padded = np.asarray(array, dtype=np.float64)
    padded = padded.reshape((1,) * (rank - padded.ndim) + padded.shape) if padded.ndim <= rank else None
    target = tuple(logical[a] if a in axes else 1 for a in range(rank))
    try:
        full = np.broadcast_to(padded, target) if padded is not None else None
    except ValueError:
        full = None
    if full is None:
        raise UnsupportedOpError(f"{node_label(node)}: LayerNorm {what} of shape {list(np.shape(array))} does not "
                                 f"broadcast along the normalized axes {list(axes)} of {list(logical)}")
    return np.ascontiguousarray(full.transpose(info.layout)).reshape(-1)


def _emit_layer_norm(lo: Lowering, anchor: ir.Node, last: ir.Node, x: str, axes, epsilon: float,
                     gamma: np.ndarray, beta: np.ndarray, *, centered: bool = True) -> None:
    if not math.isfinite(epsilon) or epsilon < 0:
        raise UnsupportedOpError(f"{node_label(anchor)}: epsilon {epsilon} is not a non-negative number")
    geometry = _geometry(lo, x, axes, anchor, centered=centered)
    plan = lo.output_plan(last)
    params = layer_norm_params(geometry, lo.params_of(x), plan, epsilon, _along_row(lo, x, axes, gamma, "scale",
                               anchor), _along_row(lo, x, axes, beta, "bias", anchor), centered=centered)
    lo.finish("layer_norm", [x], plan, params, anchor)


def lower_layer_normalization(lo: Lowering, node: ir.Node) -> None:
    """ONNX LayerNormalization (opset 17): normalized over ``x.shape[axis:]``, Scale and B constants."""
    if any(output is not None and (output.uses() or output.is_graph_output()) for output in node.outputs[1:]):
        raise UnsupportedOpError(f"{node_label(node)}: LayerNormalization's Mean and InvStdDev outputs have no "
                                 "int8 kernel")
    x = lo.activation(node.inputs[0], node)
    rank = len(lo.tensors[x].shape)
    axis = int(attribute(node, "axis", -1)) % rank
    scale = lo.real_constant(node.inputs[1], node)
    bias_value = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None else None
    bias = lo.real_constant(bias_value, node) if bias_value is not None and bias_value.name else np.zeros(1)
    _emit_layer_norm(lo, node, node, x, tuple(range(axis, rank)), float(attribute(node, "epsilon", 1e-5)),
                     scale, bias)


def lower_rms_normalization(lo: Lowering, node: ir.Node) -> None:
    """ONNX RMSNormalization (opset 23): normalized over ``x.shape[axis:]``, Scale constant."""
    x = lo.activation(node.inputs[0], node)
    rank = len(lo.tensors[x].shape)
    axis = int(attribute(node, "axis", -1)) % rank
    _emit_layer_norm(lo, node, node, x, tuple(range(axis, rank)), float(attribute(node, "epsilon", 1e-5)),
                     lo.real_constant(node.inputs[1], node), np.zeros(1), centered=False)


def lower_lp_normalization(lo: Lowering, node: ir.Node) -> None:
    """ONNX LpNormalization with p = 2: ``x / ||x||`` along ``axis`` (an RMSNorm with gamma 1 / sqrt(D))."""
    if int(attribute(node, "p", 2)) != 2:
        raise UnsupportedOpError(f"{node_label(node)}: LpNormalization with p = {attribute(node, 'p', 2)}: the C "
                                 "kernel normalizes by the L2 norm (p = 2) only")
    x = lo.activation(node.inputs[0], node)
    info = lo.tensors[x]
    axis = int(attribute(node, "axis", -1)) % len(info.shape)
    count = int(info.logical_shape[axis])
    _emit_layer_norm(lo, node, node, x, (axis,), 0.0, np.full(1, 1.0 / math.sqrt(count)), np.zeros(1),
                     centered=False)


def lower_instance_normalization(lo: Lowering, node: ir.Node) -> None:
    """ONNX InstanceNormalization: each (n, c) normalized over the spatial axes, then ``scale[c]``, ``B[c]``.
    On an NHWC tensor the rows are (n, channel) of H x W values, the channel the inner axis: the affine
    varies along it (``affine_inner``). On another layout (a GroupNorm exported as a reshape to [N, G, -1]
    around it) the channel is an outer axis: only a scale and B alike for every channel are folded."""
    x = lo.activation(node.inputs[0], node)
    info = lo.tensors[x]
    rank = len(info.shape)
    if rank < 3:
        raise UnsupportedOpError(f"{node_label(node)}: InstanceNormalization needs a rank >= 3 input")
    scale, bias = (lo.real_constant(value, node).reshape(-1) for value in node.inputs[1:3])
    epsilon = float(attribute(node, "epsilon", 1e-5))
    if not math.isfinite(epsilon) or epsilon < 0:
        raise UnsupportedOpError(f"{node_label(node)}: epsilon {epsilon} is not a non-negative number")
    outer, reduce, inner = _geometry(lo, x, tuple(range(2, rank)), node)
    plan = lo.output_plan(node)
    if info.layout[-1] == 1 and inner == scale.size == bias.size:
        params = layer_norm_params((outer, reduce, inner), lo.params_of(x), plan, epsilon, scale, bias,
                                   affine_inner=True)
    elif np.ptp(scale) == 0 and np.ptp(bias) == 0:
        params = layer_norm_params((outer, reduce, inner), lo.params_of(x), plan, epsilon,
                                   np.full(reduce, scale[0]), np.full(reduce, bias[0]))
    else:
        raise UnsupportedOpError(f"{node_label(node)}: InstanceNormalization of a rank-{rank} tensor with a scale "
                                 "or B per channel: the C kernel takes those per channel on NCHW (rank 4) only")
    lo.finish("layer_norm", [x], plan, params, node)


def _lower_spelled_layer_norm(lo: Lowering, node: ir.Node, match: SpelledLayerNorm) -> None:
    x = lo.activation(match.x, node)
    scale = match.scale if match.scale is not None else np.ones(1)
    bias = match.bias if match.bias is not None else np.zeros(1)
    _emit_layer_norm(lo, match.nodes[0], match.last, x, match.axes, match.epsilon, scale, bias,
                     centered=match.centered)


_FLOAT_OPS = {"Div": np.divide, "Mul": np.multiply, "Add": np.add, "Erf": erf}


def _evaluate(match: SpelledGelu, x: np.ndarray) -> np.ndarray:
    """The group's float ops on ``x``, each rounded to float32 as ONNX Runtime computes them."""
    values = {match.x.name: x}
    for node in match.nodes:
        args = [values[v.name] if v.name in values else constant_operand(v).astype(np.float32)
                for v in node.inputs]
        values[node.outputs[0].name] = _FLOAT_OPS[node.op_type](*args).astype(np.float32)
    return values[match.last.outputs[0].name]


def _lower_spelled_gelu(lo: Lowering, node: ir.Node, match: SpelledGelu) -> None:
    """The group's own float ops, evaluated on the 256 int8 inputs, as one lookup table (tables.lut_table)."""
    x = lo.activation(match.x, node)
    plan = lo.output_plan(match.last)
    table = lut_table(lambda values: _evaluate(match, values), lo.params_of(x), plan)
    lo.finish("lut", [x], plan, LutParams(table=table), match.nodes[1])  # named after the Erf


def _lower_group(lo: Lowering, node: ir.Node, *, match, lower) -> None:
    """Lower a claimed group at its first node; on failure its every value counts as failed (reported once)."""
    done = False
    try:
        lower(lo, node, match)
        done = True
    finally:
        if not done:
            lo.failed.update(value.name for member in match.nodes for value in member.outputs)


def claim_spelled_out(lo: Lowering) -> None:
    """Find the spelled-out LayerNorms, RMSNorms, L2 norms and GELUs of ``lo``'s graph and claim them: the
    group's first node (graph order) lowers it, the rest are skipped."""
    order = {id(node): position for position, node in enumerate(lo.model.graph)}
    for node in lo.model.graph:
        match = match_spelled_out(node)
        if match is None or any(id(member) in lo.absorbed or id(member) in lo.claimed for member in match.nodes):
            continue
        lower = _lower_spelled_layer_norm if isinstance(match, SpelledLayerNorm) else _lower_spelled_gelu
        first = min(match.nodes, key=lambda member: order[id(member)])
        lo.absorbed.update(id(member) for member in match.nodes if member is not first)
        lo.claimed[id(first)] = functools.partial(_lower_group, match=match, lower=lower)

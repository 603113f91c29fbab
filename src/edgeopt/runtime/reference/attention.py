"""Lowering of attention's integer ops: a MatMul of two activations, and Softmax over any axis.

``MatMul(A, B)`` with both operands int8 activations (``Q K^T`` and ``P V`` of
self-attention) is one ``batch_matmul`` op over their logical order::

    y[b, m, n] = requant(sum_k (A[b, m, k] - za) (B[b, k, n] - zb), sa sb / sy) + zy

with one fixed-point multiplier (both operands are per-tensor), the int32
accumulator exact (``|term| <= 255**2``, so ``k`` up to 33,000; a longer inner axis, at the
actual zero points, is refused). The batch
axes (heads, ...) must agree; an operand broadcast over them is refused. The
kernel reads and writes logical (row-major) order: a rank-4 operand, stored
NHWC in the program, is transposed to it first, and a rank-4 result back.

Softmax reduces the innermost stored axis; over another axis (the key axis of
a rank-4 ``[N, heads, T, T]`` score tensor, stored ``[N, T, T, heads]``) it
runs between two transposes that bring that axis innermost and back.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgeopt.errors import UnsupportedOpError
from edgeopt.runtime.reference.lower import Lowering, attribute, node_label, real_multiplier
from edgeopt.runtime.reference.program import BatchMatMulParams, TransposeParams, stored_layout
from edgeopt.runtime.reference.tables import softmax_params

__all__ = ["lower_activation_matmul", "lower_softmax"]


def _identity(rank: int) -> tuple[int, ...]:
    return tuple(range(rank))


def _in_logical_order(lo: Lowering, tensor: str, node: ir.Node) -> str:
    """``tensor`` stored in its logical order: itself, or a transposed copy."""
    info = lo.tensors[tensor]
    if info.layout == _identity(len(info.layout)):
        return tensor
    name = lo.add_stored_tensor(f"{tensor}__logical", info.logical_shape, lo.params_of(tensor),
                                _identity(len(info.layout)))
    return lo.emit("transpose", [tensor], name, TransposeParams(perm=tuple(int(a) for a in np.argsort(info.layout))),
                   node)


def lower_activation_matmul(lo: Lowering, node: ir.Node) -> None:
    a, b = (lo.activation(value, node) for value in node.inputs[:2])
    a_shape, b_shape = lo.tensors[a].logical_shape, lo.tensors[b].logical_shape
    if len(a_shape) < 2 or len(b_shape) < 2 or a_shape[:-2] != b_shape[:-2] or a_shape[-1] != b_shape[-2]:
        raise UnsupportedOpError(f"{node_label(node)}: MatMul of two activations needs [..., M, K] x [..., K, N] "
                                 f"with the same batch axes (got {list(a_shape)} and {list(b_shape)})")
    plan, sa, sb = lo.output_plan(node), lo.params_of(a), lo.params_of(b)
    _check_accumulator(node, a_shape[-1], sa.zero_point, sb.zero_point)
    multiplier, shift = real_multiplier(sa.scale * sb.scale / plan.qparams.scale)
    params = BatchMatMulParams(
        batch=int(np.prod(a_shape[:-2], dtype=np.int64)), rows=a_shape[-2], depth=a_shape[-1], columns=b_shape[-1],
        a_zero_point=sa.zero_point, b_zero_point=sb.zero_point, output_zero_point=plan.qparams.zero_point,
        multiplier=multiplier, shift=shift, act_min=plan.act_min, act_max=plan.act_max)
    inputs = [_in_logical_order(lo, a, node), _in_logical_order(lo, b, node)]
    out_shape = (*a_shape[:-2], a_shape[-2], b_shape[-1])
    if stored_layout(len(out_shape)) == _identity(len(out_shape)):
        lo.finish("batch_matmul", inputs, plan, params, node)
        return
    product = lo.add_stored_tensor(f"{plan.value.name}__logical", out_shape, plan.qparams, _identity(len(out_shape)))
    lo.emit("batch_matmul", inputs, product, params, node)
    lo.finish("transpose", [product], plan, TransposeParams(perm=stored_layout(len(out_shape))), node)


def _check_accumulator(node: ir.Node, depth: int, a_zero_point: int, b_zero_point: int) -> None:
    """Refuse a depth whose sum of products may leave the C kernel's int32 accumulator."""
    largest = (max(127 - a_zero_point, a_zero_point + 128) * max(127 - b_zero_point, b_zero_point + 128))
    if depth * largest > 2**31 - 1:
        raise UnsupportedOpError(f"{node_label(node)}: MatMul of two activations over {depth} products may "
                                 f"overflow the kernel's int32 accumulator (at most {(2**31 - 1) // largest} at "
                                 "these zero points): split the inner axis in parts and add them")


def lower_softmax(lo: Lowering, node: ir.Node) -> None:
    x = lo.activation(node.inputs[0], node)
    info = lo.tensors[x]
    rank = len(info.shape)
    axis = int(attribute(node, "axis", -1 if lo.opset >= 13 else 1)) % rank
    if lo.opset < 13 and axis != rank - 1:
        raise UnsupportedOpError(f"{node_label(node)}: Softmax below opset 13 over axis {axis} of a rank-{rank} "
                                 "tensor normalizes the flattened axes after it: only the last axis is supported")
    plan = lo.output_plan(node)
    params = softmax_params(lo.params_of(x), plan.qparams)
    stored_axis = info.layout.index(axis)
    if stored_axis == rank - 1:
        lo.finish("softmax", [x], plan, params, node)
        return
    # bring the axis innermost (swap it with the last stored axis), reduce, swap back
    swap = list(range(rank))
    swap[stored_axis], swap[-1] = swap[-1], swap[stored_axis]
    swapped_shape = tuple(info.shape[a] for a in swap)
    moved = lo.add_stored_tensor(f"{x}__axis_last", swapped_shape, lo.params_of(x), tuple(info.layout[a] for a in swap))
    lo.emit("transpose", [x], moved, TransposeParams(perm=tuple(swap)), node)
    reduced = lo.add_stored_tensor(f"{plan.value.name}__axis_last", swapped_shape, plan.qparams,
                                   lo.tensors[moved].layout)
    lo.emit("softmax", [moved], reduced, params, node)
    lo.finish("transpose", [reduced], plan, TransposeParams(perm=tuple(swap)), node)

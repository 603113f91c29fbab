"""Compose back-to-back transposes of a lowered program into one, and drop those that keep the bytes in order.

Rank-4 tensors are stored NHWC and the others in logical order, so a reshape
that changes rank, and the per-head Reshape/Transpose pairs of attention, lower
to chains of transposes. ``t = transpose(x, p1)`` then ``y = transpose(t, p2)``
is ``y = transpose(x, [p1[i] for i in p2])``: one pass over the data instead of
two, and ``t`` no longer exists. Applied only when ``t`` is read by the second
transpose alone, is not a model output and is ``x`` permuted (a transpose op
may also reshape: the second half of a rank-changing reshape).

A transpose that leaves the bytes in order (the identity, or one that moves
only axes of size 1, as Keras' ``[1, T, F]`` read as an ONNX cell's
``[T, 1, F]``) becomes a copy (``reshape``, which the planner may write in
place). Both are bit-identical.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from edgeopt.runtime.reference.program import IntOp, Program, ReshapeParams, TransposeParams

__all__ = ["compose_transposes"]


def compose_transposes(program: Program) -> Program:
    """``program`` with each transpose of a transpose's single-use output composed into one op."""
    readers = Counter(name for op in program.ops for name in op.inputs)
    outputs = {io.tensor for io in program.outputs}
    ops: list[IntOp | None] = []
    position: dict[str, int] = {}
    gone: set[str] = set()
    for op in program.ops:
        source = op.inputs[0] if op.inputs else None
        first = ops[position[source]] if op.kind == "transpose" and source in position else None
        if (first is not None and first.kind == "transpose" and readers[source] == 1 and source not in outputs
                and _keeps_shape(first, program)):
            perm = tuple(first.params.perm[axis] for axis in op.params.perm)
            op = IntOp(kind="transpose", inputs=first.inputs, output=op.output, params=TransposeParams(perm=perm),
                       node=op.node)
            ops[position.pop(source)] = None
            gone.add(source)
        position[op.output] = len(ops)
        ops.append(op)
    kept = tuple(_as_copy(op, program) for op in ops if op is not None)
    if not gone and kept == program.ops:
        return program
    tensors = {name: info for name, info in program.tensors.items() if name not in gone}
    return replace(program, tensors=tensors, ops=kept)


def _keeps_shape(op: IntOp, program: Program) -> bool:
    """Whether a transpose's output is its input permuted, without the reshape a transpose op may add
    (a rank-changing reshape lowers to transposes whose output tensor has another shape)."""
    source = program.tensors[op.inputs[0]].shape
    return program.tensors[op.output].shape == tuple(source[axis] for axis in op.params.perm)


def _as_copy(op: IntOp, program: Program) -> IntOp:
    """A transpose that keeps the bytes in order as a ``reshape``: the identity, or one that moves only axes of
    size 1 (Keras' ``[1, T, F]`` read as an ONNX cell's ``[T, 1, F]``)."""
    if op.kind != "transpose":
        return op
    shape = program.tensors[op.inputs[0]].shape
    moved = [axis for axis in op.params.perm if shape[axis] != 1]
    if moved != sorted(moved):
        return op
    return replace(op, kind="reshape", params=ReshapeParams(shape=program.tensors[op.output].shape))

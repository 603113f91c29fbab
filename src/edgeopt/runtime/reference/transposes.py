"""Transposes of a lowered program: composed, moved below the ops that commute with them, dropped at the ends.

Rank-4 tensors are stored NHWC and the others in logical order, so a reshape
that changes rank, and the per-head Reshape/Transpose pairs of attention, lower
to chains of transposes. ``t = transpose(x, p1)`` then ``y = transpose(t, p2)``
is ``y = transpose(x, [p1[i] for i in p2])``: one pass over the data instead of
two, and ``t`` no longer exists. Applied when ``t`` is read by the second
transpose alone, is not a model output and is ``x`` permuted up to axes of size
1 (a transpose op may also reshape: the second half of a rank-changing reshape,
as a 1-D conv's NHWC output read back as [N, C, L]); axes of size 1 are left
out of the composition, since they do not move any byte. A reshape that only
adds or drops axes of size 1 composes the same way (the lift of a 1-D conv's
``[N, C, L]`` input to ``[N, C, 1, L]`` before its transpose to NHWC).

A transposition moves below the ops that commute with it (:func:`sink_transposes`)
to meet the next one; one that leaves the bytes in order (the identity, or one
that moves only axes of size 1, as Keras' ``[1, T, F]`` read as an ONNX cell's
``[T, 1, F]``) becomes a copy (``reshape``, which the planner may write in
place); and one right after a model input or right before a model output is
dropped by storing that input or output in the order on its other side
(:func:`boundary_layouts`). All are bit-identical.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from edgeopt.runtime.reference.program import IntOp, Program, ReshapeParams, TensorInfo, TransposeParams

__all__ = ["boundary_layouts", "compose_transposes", "sink_transposes"]


def compose_transposes(program: Program) -> Program:
    """``program`` with each transpose of a transpose's single-use output composed into one op, moving
    transposes below the ops that commute with them (:func:`sink_transposes`) until none meets another."""
    while True:
        composed = _compose_once(sink_transposes(program))
        if composed.ops == program.ops:
            return boundary_layouts(composed)
        program = composed


def boundary_layouts(program: Program) -> Program:
    """``program`` with a model input read by one transpose alone stored as that transpose writes it, and a
    model output a transpose writes (read by no op) stored as the transpose reads it: the transpose becomes a
    copy (a reshape, written in place), and the caller's buffer takes the order the model's first or last
    layer works in. A channels-last model (tf2onnx, Keras: NHWC input, Transpose to NCHW, ..., Transpose
    back) then reads and writes its own NHWC order, with no transpose at either end. Each boundary tensor's
    ``layout`` says how its stored axes map to the ONNX value's."""
    readers = Counter(name for op in program.ops for name in op.inputs)
    inputs, outputs = {io.tensor for io in program.inputs}, {io.tensor for io in program.outputs}
    tensors, ops = dict(program.tensors), list(program.ops)
    for index, op in enumerate(ops):
        if op.kind != "transpose":
            continue
        source, perm = op.inputs[0], op.params.perm
        if source in inputs and readers[source] == 1 and source not in outputs:
            info = tensors[source]
            tensors[source] = replace(info, shape=tuple(info.shape[axis] for axis in perm),
                                      layout=tuple(info.layout[axis] for axis in perm))
        elif op.output in outputs and not readers[op.output] and _order(op, tensors) is not None:
            tensors[op.output] = _stored_as_source(op, tensors)
        else:
            continue
        ops[index] = replace(op, kind="reshape", params=ReshapeParams(shape=tensors[op.output].shape))
    kept = tuple(ops)
    return program if kept == program.ops else replace(program, tensors=tensors, ops=kept)


def _compose_once(program: Program) -> Program:
    readers = Counter(name for op in program.ops for name in op.inputs)
    outputs = {io.tensor for io in program.outputs}
    ops: list[IntOp | None] = []
    position: dict[str, int] = {}
    gone: set[str] = set()
    for op in program.ops:
        source = op.inputs[0] if op.inputs else None
        first = ops[position[source]] if op.kind in ("transpose", "reshape") and source in position else None
        # a transpose after a transpose or a unit-axis reshape, or a reshape after a transpose
        pair = first is not None and ({first.kind, op.kind} == {"transpose", "reshape"} or first.kind == op.kind
                                      == "transpose")
        if pair and readers[source] == 1 and source not in outputs and _order(first, program.tensors) is not None:
            op = IntOp(kind="transpose", inputs=first.inputs, output=op.output,
                       params=TransposeParams(perm=_composed(first, op, program.tensors)), node=op.node)
            ops[position.pop(source)] = None
            gone.add(source)
        position[op.output] = len(ops)
        ops.append(op)
    kept = tuple(_as_copy(op, program) for op in ops if op is not None)
    if not gone and kept == program.ops:
        return program
    tensors = {name: info for name, info in program.tensors.items() if name not in gone}
    return replace(program, tensors=tensors, ops=kept)


def sink_transposes(program: Program) -> Program:
    """``program`` with each transpose whose single-use output an op reads that commutes with it moved below
    that op: ``f(transpose(x, p))`` is ``transpose(f(x), p)`` for an elementwise ``f`` (a table, a
    requantize, a Mul or Add by one value) and for a Softmax when ``p`` keeps the innermost axis innermost.
    The transpose then meets the next one (a rank-4 attention score goes back to logical order after its
    scale and Softmax), and :func:`compose_transposes` merges them."""
    readers = Counter(name for op in program.ops for name in op.inputs)
    outputs = {io.tensor for io in program.outputs}
    tensors = dict(program.tensors)
    ops: list[IntOp | None] = []
    position: dict[str, int] = {}
    for op in program.ops:
        source = next((name for name in op.inputs if name in position), None)
        moved = ops[position[source]] if source is not None else None
        if (moved is not None and moved.kind == "transpose" and readers[source] == 1 and source not in outputs
                and (op.kind in _UNARY or _keeps_shape(moved, tensors)) and _commutes(op, source, moved, tensors)):
            x = moved.inputs[0]
            before = f"{op.output}__unpermuted"  # op of x: x's shape and layout, op's quantization
            tensors[before] = replace(tensors[op.output], name=before, shape=tensors[x].shape,
                                      layout=tensors[x].layout)
            ops[position.pop(source)] = None
            del tensors[source]
            ops.append(replace(op, inputs=tuple(x if name == source else name for name in op.inputs), output=before))
            op = IntOp(kind="transpose", inputs=(before,), output=op.output, params=moved.params, node=moved.node)
        if op.kind == "transpose":
            position[op.output] = len(ops)
        ops.append(op)
    kept = tuple(op for op in ops if op is not None)
    return program if kept == program.ops else replace(program, tensors=tensors, ops=kept)


#: Elementwise ops of one input: they commute with any transpose, one that also reshapes included.
_UNARY = ("lut", "requantize")


def _commutes(op: IntOp, source: str, transpose: IntOp, tensors) -> bool:
    """Whether ``op`` reading the transposed ``source`` gives its output transposed when it reads the
    transpose's input instead."""
    if op.kind in _UNARY:
        return True
    if op.kind in ("mul", "add"):
        others = [name for name in op.inputs if name != source]
        return len(others) == 1 and tensors[others[0]].size == 1
    if op.kind == "softmax":  # it reduces the innermost stored axis
        return transpose.params.perm[-1] == len(transpose.params.perm) - 1
    return False


def _stored_as_source(op: IntOp, tensors) -> TensorInfo:
    """A transpose's output stored in its input's byte order: its axes of size 1 first, then the others as
    the input holds them (``layout``: the output's logical axis each stored axis is)."""
    info, moved = tensors[op.output], _order(op, tensors)
    source = tensors[op.inputs[0]].shape
    logical = info.logical_shape
    stored_kept = [info.layout[axis] for axis, size in enumerate(info.shape) if size != 1]  # in `moved` order
    kept = [stored_kept[moved.index(axis)] for axis, size in enumerate(source) if size != 1]
    layout = (*[axis for axis, size in enumerate(logical) if size == 1], *kept)
    return replace(info, shape=tuple(logical[axis] for axis in layout), layout=layout)


def _keeps_shape(op: IntOp, tensors) -> bool:
    """Whether a transpose's output is its input permuted, without the reshape a transpose op may add."""
    source = tensors[op.inputs[0]].shape
    return tensors[op.output].shape == tuple(source[axis] for axis in op.params.perm)


def _order(op: IntOp, tensors) -> list[int] | None:
    """The input axes of size above 1 in the order a transpose (or a reshape: in order) writes them, or None
    when its output is not its input permuted up to axes of size 1 (a reshape that merges or splits axes)."""
    source = tensors[op.inputs[0]].shape
    moved = [axis for axis in _perm(op, len(source)) if source[axis] != 1]
    if [source[axis] for axis in moved] != [size for size in tensors[op.output].shape if size != 1]:
        return None
    return moved


def _perm(op: IntOp, rank: int):
    """The axis order a transpose writes its input in; a reshape's (of axes of size 1 only) keeps it."""
    return op.params.perm if op.kind == "transpose" else range(rank)


def _composed(first: IntOp, second: IntOp, tensors) -> tuple[int, ...]:
    """The perm over ``first``'s input of ``second`` after ``first`` (either may be a reshape of axes of size 1,
    which keeps the order): its axes of size 1 first, then the others in the order the two write them
    (``t``'s axes of size above 1 are ``x``'s in ``first``'s order)."""
    source, middle = tensors[first.inputs[0]].shape, tensors[second.inputs[0]].shape
    written = dict(zip([axis for axis, size in enumerate(middle) if size != 1], _order(first, tensors)))
    order = [written[axis] for axis in _perm(second, len(middle)) if middle[axis] != 1]
    return (*[axis for axis, size in enumerate(source) if size == 1], *order)


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

"""Fuse a residual ``Add`` into the conv that produces one of its operands: ``conv2d_add``.

Pattern (on the lowered program): ``t = conv2d(x)`` (its clamp included) and
``y = add(t, s)`` or ``add(s, t)`` (the Add's own requantization and clamp, i.e.
a following Relu/Clip, included). Rewrite: one op ``y = conv2d_add(x, s)`` at
the Add's place in the schedule; ``t`` no longer exists.

Semantics are unchanged bit for bit: the fused op still rounds and clamps the
conv's accumulator to the int8 tensor ``t`` (the QDQ graph quantizes the conv
output before the Add reads it) and then applies TFLite's add to that int8
value and ``s`` (see :func:`edgeopt.runtime.reference.ops.conv2d_add`).

Why: the fused kernel writes ``y`` over ``s`` (``OPS["conv2d_add"].in_place``):
output element ``(n, h, w, c)`` reads ``s`` at that element only, and the conv
reads ``x``, another buffer. So a residual block holds two activations at
once (the conv's input and ``s``/``y``) instead of three. The planner decides
the alias: only when ``s`` dies at this op (its last reader) and is not a model
output; otherwise the fused op still saves the intermediate ``t``.

Checks (the reason a match is refused is logged at debug level):

* ``t`` is read by this Add only and is not a model output;
* ``s`` is an activation (not a constant), with the shape and layout of ``t``
  and ``y`` (no broadcasting);
* ``s`` is not the conv's input ``x``: the conv reads ``x`` across its window,
  so ``y`` could not be written over it, and the op would read it twice.

Tracing: the fused op's output is the Add's output tensor and its node is named
``"<conv node>+<add node>"``; ``edgeopt verify`` compares that tensor. The conv's
intermediate is not a tensor of the fused program (``lower(model, fuse=False)``
has it).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from edgeopt.runtime.reference.program import AddParams, Conv2dAddParams, IntOp, Program

__all__ = ["fuse_conv_add"]

logger = logging.getLogger(__name__)


def _swap_operands(params: AddParams) -> AddParams:
    """The same add with its operands exchanged (integer addition commutes, so bit-identical)."""
    return replace(params, input_zero_points=params.input_zero_points[::-1],
                   input_multipliers=params.input_multipliers[::-1], input_shifts=params.input_shifts[::-1])


def check(program: Program, conv: IntOp, add: IntOp, readers: dict[str, int]) -> str | None:
    """Why ``conv`` cannot be fused into ``add`` (None: it can)."""
    t = conv.output
    shortcut = add.inputs[1] if add.inputs[0] == t else add.inputs[0]
    tensors = program.tensors
    if t in {io.tensor for io in program.outputs}:
        return f"the conv output {t!r} is a model output"
    if readers.get(t, 0) != 1 or add.inputs[0] == add.inputs[1]:
        return f"the conv output {t!r} is read by other ops too"
    if shortcut in program.constants:
        return f"the other operand {shortcut!r} is a constant"
    if not tensors[shortcut].shape == tensors[t].shape == tensors[add.output].shape:
        return f"the other operand {shortcut!r} is broadcast (shape {list(tensors[shortcut].shape)})"
    if tensors[shortcut].layout != tensors[t].layout:
        return f"the other operand {shortcut!r} has another layout"
    if shortcut == conv.inputs[0]:
        return f"the other operand {shortcut!r} is the conv's own input"
    return None


def fuse_conv_add(program: Program) -> Program:
    """``program`` with every fusable conv2d -> add pair replaced by one ``conv2d_add`` op (see the module doc)."""
    producer = {op.output: index for index, op in enumerate(program.ops)}
    readers: dict[str, int] = {}
    for op in program.ops:
        for name in op.inputs:
            readers[name] = readers.get(name, 0) + 1
    ops, removed, intermediates = list(program.ops), set(), set()
    for index, add in enumerate(program.ops):
        if add.kind != "add":
            continue
        candidates = sorted((producer[name] for name in set(add.inputs)
                             if name in producer and program.ops[producer[name]].kind == "conv2d"), reverse=True)
        for conv_index in candidates:  # the conv run closest to the Add first
            conv = program.ops[conv_index]
            reason = check(program, conv, add, readers)
            if reason is not None:
                logger.debug("%s not fused into %s: %s", conv.node, add.node, reason)
                continue
            ops[index] = _fused(conv, add)
            removed.add(conv_index)
            intermediates.add(conv.output)
            break
    if not removed:
        return program
    tensors = {name: info for name, info in program.tensors.items() if name not in intermediates}
    return replace(program, tensors=tensors, ops=tuple(op for i, op in enumerate(ops) if i not in removed))


def _fused(conv: IntOp, add: IntOp) -> IntOp:
    conv_first = add.inputs[0] == conv.output
    shortcut = add.inputs[1] if conv_first else add.inputs[0]
    add_params = add.params if conv_first else _swap_operands(add.params)
    return IntOp(kind="conv2d_add", inputs=(conv.inputs[0], shortcut), output=add.output,
                 params=Conv2dAddParams(conv=conv.params, add=add_params), node=f"{conv.node}+{add.node}")

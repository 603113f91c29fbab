"""Small structural queries the rules share: op tests, scalar constants, chains.

The one algorithm here is :func:`follow_product`. Exporters write a scaled
product like ``x * clip(x + 3, 0, 6) / 6`` in any association and order
(``(x * c) / 6``, ``x * (c * (1/6))``, ``(x / 6) * c``...). Starting from
``c``, it walks the chain of single-consumer Mul/Div nodes, collecting scalar
factors and (at most once) ``x`` or ``x`` times a scalar, and stops as soon
as the collected product is ``target * x * c``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir

__all__ = [
    "ProductChain",
    "clip_bounds",
    "follow_product",
    "is_close",
    "is_op",
    "only_reader",
    "other_input",
    "producer_and_constant",
    "producer_op",
    "reduce_axes",
    "scalar",
    "shape_text",
    "sole_consumer",
]

is_op = eir.is_op
other_input = eir.other_input
reduce_axes = eir.reduce_axes
sole_consumer = eir.sole_consumer


def producer_and_constant(node: ir.Node, op_types: tuple[str, ...], *,
                          commutative: bool) -> tuple[ir.Node, ir.Value] | None:
    """For a binary ``node``: the producer of its first input if it is one of ``op_types`` and the other
    input is a constant (with ``commutative``, also the other way round), else None."""
    if len(node.inputs) != 2:
        return None
    for producer_index in ((0, 1) if commutative else (0,)):
        producer = producer_op(node.inputs[producer_index], *op_types)
        constant = node.inputs[1 - producer_index]
        if producer is not None and eir.is_constant(constant):
            return producer, constant
    return None


def only_reader(node: ir.Node, *op_types: str) -> ir.Node | None:
    """The one node reading ``node``'s first output if it is one of ``op_types`` (and that output is no graph
    output), else None."""
    reader = sole_consumer(node.outputs[0]) if not node.outputs[0].is_graph_output() else None
    return reader if is_op(reader, *op_types) else None


def producer_op(value: ir.Value | None, *op_types: str) -> ir.Node | None:
    """The producer of ``value`` if it is one of ``op_types``, else None."""
    producer = value.producer() if value is not None else None
    return producer if is_op(producer, *op_types) else None


def is_close(number: float | None, expected: float, rel_tol: float = 1e-6) -> bool:
    """True when ``number`` (a :func:`scalar`, None when not a constant) is ``expected`` within ``rel_tol``."""
    return number is not None and math.isclose(number, expected, rel_tol=rel_tol)


def scalar(value: ir.Value | None) -> float | None:
    """The number behind a one-element constant, else None."""
    array = eir.constant_array(value)
    if array is None or array.size != 1 or not np.issubdtype(array.dtype, np.number):
        return None
    return float(array.reshape(()))


def shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def clip_bounds(node: ir.Node, read: Callable[[ir.Value], float | None] | None = None
                ) -> tuple[float, float] | None:
    """The constant (min, max) of a Clip: attributes before opset 11, inputs after, each input's number as
    ``read`` gives it (:func:`scalar`; a QDQ graph's matcher reads dequantized constants too)."""
    read = scalar if read is None else read
    low, high = -math.inf, math.inf
    if "min" in node.attributes or "max" in node.attributes:
        return (node.attributes.get_float("min", low), node.attributes.get_float("max", high))
    for position in (1, 2):
        bound = node.inputs[position] if len(node.inputs) > position else None
        if bound is None:
            continue
        number = read(bound)
        if number is None:
            return None
        if position == 1:
            low = number
        else:
            high = number
    return (low, high)


@dataclasses.dataclass(frozen=True)
class ProductChain:
    """Mul/Div nodes from a start value to ``output``, which equals ``scale * [x *] start``."""

    nodes: tuple[ir.Node, ...]
    output: ir.Value


def _scaled_copy(value: ir.Value, x: ir.Value) -> tuple[ir.Node, float] | None:
    """``value = x * s`` or ``x / s`` with scalar ``s``, read only once: (node, factor)."""
    node = producer_op(value, "Mul", "Div")
    if node is None or sole_consumer(value) is None:
        return None
    if node.inputs[0] is x or (node.op_type == "Mul" and node.inputs[1] is x):
        number = scalar(other_input(node, x))
        if number is None or number == 0:
            return None
        return node, (1.0 / number if node.op_type == "Div" else number)
    return None


def _step(node: ir.Node, current: ir.Value, x: ir.Value | None) -> tuple[float, ir.Node | None, bool] | None:
    """One link of the chain: (scalar factor, extra node absorbed, whether it brought x)."""
    other = other_input(node, current)
    if other is None:
        return None
    number = scalar(other)
    if node.op_type == "Div":
        if node.inputs[0] is not current or number is None or number == 0:
            return None
        return 1.0 / number, None, False
    if number is not None:
        return number, None, False
    if x is not None and other is x:
        return 1.0, None, True
    scaled = _scaled_copy(other, x) if x is not None else None
    if scaled is not None:
        return scaled[1], scaled[0], True
    return None


def follow_product(start: ir.Value, x: ir.Value | None, target: float, *,
                   rel_tol: float = 1e-4, max_links: int = 4) -> ProductChain | None:
    """The shortest chain from ``start`` to ``target * [x *] start``; None if there is none.

    With ``x`` None the chain may only scale by constants; otherwise ``x`` must
    be multiplied in exactly once.
    """
    current, nodes, factor, has_x = start, [], 1.0, x is None
    for _ in range(max_links):
        node = sole_consumer(current)
        if not is_op(node, "Mul", "Div"):
            return None
        step = _step(node, current, None if has_x else x)
        if step is None:
            return None
        number, extra, brings_x = step
        factor *= number
        has_x = has_x or brings_x
        nodes.extend(n for n in (extra, node) if n is not None)
        current = node.outputs[0]
        if has_x and math.isclose(factor, target, rel_tol=rel_tol):
            return ProductChain(nodes=tuple(nodes), output=current)
    return None

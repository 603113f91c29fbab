"""Shapes behind a Reshape whose target shape the model computes: what ONNX's inference leaves unknown.

Exporters write ``x.view(B, T, heads, -1)`` with dynamic axes as a shape computed at run time:
``Concat(Unsqueeze(Gather(Shape(x), 0)), ..., [4, 16])``. ONNX's shape inference (1.23, with data
propagation) often gives such a Reshape no shape at all, not even a rank (a ``Slice`` of the ``Shape``, as
torch writes it before opset 15, stops it), and with it every value after it: the float passes then cannot
see a spelled-out LayerNorm's normalized dims or a MatMul's rank, and a transformer exported at opset 13
with a dynamic batch lost 6-11 dB of int8 output SQNR against the same model with static shapes.

Here the shape tensors themselves are followed, element by element, through the ops exporters build them
with (Shape, Gather, Slice, Concat, Unsqueeze, Squeeze, Cast, Identity, constants; integer arithmetic on
known elements). An element is an ``int``, a dim name (``"B"``) or ``None`` (unknown). A Reshape whose
output has no shape gets one: its rank always, and each dim that is known (a ``0`` copies the input's dim,
a ``-1`` is solved when the input's dims, names cancelled, leave only numbers). ONNX's inference then runs
again from there; rounds repeat while they add shapes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from edgeopt.io.shapes import value_dims

__all__ = ["complete_reshape_shapes"]

logger = logging.getLogger(__name__)

Element = int | str | None
#: A shape tensor's value: its elements, and whether it is a scalar (a Gather of one index).
Value = tuple[list[Element], bool]

_ROUNDS = 4
_ARITHMETIC: dict[str, Callable[[int, int], int | None]] = {
    "Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b,
    "Div": lambda a, b: a // b if b and a % b == 0 else None,
}


def complete_reshape_shapes(proto: onnx.ModelProto, infer: Callable[[onnx.ModelProto], onnx.ModelProto]
                            ) -> onnx.ModelProto:
    """``proto`` (already through ``infer``, ONNX's inference) with the shapes of Reshape outputs it
    left unknown filled in, and ``infer`` run again after each round that added some."""
    for _ in range(_ROUNDS):
        added = _shape_reshapes(proto.graph)
        if not added:
            break
        logger.info("shapes of %d Reshape outputs from their computed target shapes", added)
        try:
            proto = infer(proto)
        except Exception as error:  # best effort, as the first inference: keep what is known
            logger.info("shape inference after the Reshape shapes failed (%s)", error)
            break
    return proto


def _known_shapes(graph: onnx.GraphProto) -> dict[str, list[Element]]:
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    for info in (*graph.input, *graph.value_info, *graph.output):
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):  # else no rank known
            shapes[info.name] = value_dims(info)
    return shapes


def _constants(graph: onnx.GraphProto) -> dict[str, Value]:
    """Small integer constants (initializers, Constant nodes) as shape values."""
    values = {}
    tensors = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.attribute:
            attribute = node.attribute[0]
            if attribute.name == "value":
                tensors[node.output[0]] = attribute.t
            elif attribute.name in ("value_int", "value_ints"):
                values[node.output[0]] = ([attribute.i], True) if attribute.name == "value_int" \
                    else (list(attribute.ints), False)
    for name, tensor in tensors.items():
        if tensor.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and len(tensor.dims) <= 1:
            array = numpy_helper.to_array(tensor)
            values[name] = ([int(v) for v in np.ravel(array)], array.ndim == 0)
    return values


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _shape_of(node: onnx.NodeProto, shapes: dict[str, list[Element]]) -> Value | None:
    dims = shapes.get(node.input[0])
    if dims is None:
        return None
    start, end = _attribute(node, "start", 0), _attribute(node, "end", None)
    return list(dims[slice(start, end)]), False


def _slice(node: onnx.NodeProto, values: dict[str, Value]) -> Value | None:
    data = values.get(node.input[0])
    if data is None:
        return None
    if len(node.input) > 1:  # opset 10+: starts, ends, axes, steps as inputs
        bounds = [values.get(name) if name else None for name in node.input[1:5]]
        if bounds[0] is None or bounds[1] is None:
            return None
        starts, ends = bounds[0][0], bounds[1][0]
        axes = bounds[2][0] if len(bounds) > 2 and bounds[2] is not None else [0]
        steps = bounds[3][0] if len(bounds) > 3 and bounds[3] is not None else [1]
    else:
        starts, ends = _attribute(node, "starts", []), _attribute(node, "ends", [])
        axes, steps = _attribute(node, "axes", [0]), [1]
    # one axis, step 1 (a negative step clamps its bounds otherwise than Python's slices)
    if len(starts) != 1 or list(axes) not in ([0], [-1]) or list(steps) != [1] \
            or any(not isinstance(v, int) for v in (*starts, *ends)):
        return None
    return data[0][slice(starts[0], ends[0])], False


def _gather(node: onnx.NodeProto, values: dict[str, Value]) -> Value | None:
    data, indices = values.get(node.input[0]), values.get(node.input[1])
    if data is None or indices is None or _attribute(node, "axis", 0) != 0 or data[1]:
        return None
    elements, size = data[0], len(data[0])
    if any(not isinstance(i, int) or not -size <= i < size for i in indices[0]):
        return None
    return [elements[i] for i in indices[0]], indices[1]


def _arithmetic(node: onnx.NodeProto, values: dict[str, Value]) -> Value | None:
    left, right = values.get(node.input[0]), values.get(node.input[1])
    if left is None or right is None:
        return None
    a, b = left[0], right[0]
    if len(a) != len(b) and 1 not in (len(a), len(b)):
        return None
    size = max(len(a), len(b))
    a, b = (a * size if len(a) == 1 else a), (b * size if len(b) == 1 else b)
    combine = _ARITHMETIC[node.op_type]
    elements = [combine(x, y) if isinstance(x, int) and isinstance(y, int) else None for x, y in zip(a, b)]
    return elements, left[1] and right[1]


def _value(node: onnx.NodeProto, values: dict[str, Value], shapes: dict[str, list[Element]]) -> Value | None:
    """The shape value ``node`` computes, when it is one this module follows."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or not node.input or not node.input[0]:
        return None
    if op == "Shape":
        return _shape_of(node, shapes)
    if op in ("Cast", "Identity"):
        return values.get(node.input[0])
    if op == "Unsqueeze":
        value = values.get(node.input[0])
        return (list(value[0]), False) if value is not None and value[1] else None
    if op == "Squeeze":
        value = values.get(node.input[0])
        return (list(value[0]), True) if value is not None and not value[1] and len(value[0]) == 1 else None
    if op == "Concat":
        parts = [values.get(name) for name in node.input]
        if any(part is None for part in parts) or _attribute(node, "axis", 0) not in (0, -1):
            return None
        return [element for part in parts for element in part[0]], False
    if op == "Slice":
        return _slice(node, values)
    if op == "Gather":
        return _gather(node, values)
    if op in _ARITHMETIC and len(node.input) == 2:
        return _arithmetic(node, values)
    return None


def _reshaped(source: list[Element] | None, target: list[Element], allow_zero: bool) -> list[Element]:
    """The output dims of a Reshape of ``source`` dims to the ``target`` shape value."""
    dims = []
    for index, element in enumerate(target):
        if element == 0 and not allow_zero:
            dims.append(source[index] if source is not None and index < len(source) else None)
        elif isinstance(element, int) and element < 0:
            dims.append(-1)
        else:
            dims.append(element)
    if -1 in dims:
        dims[dims.index(-1)] = _solved(source, [d for d in dims if d != -1])
    return dims


def _solved(source: list[Element] | None, others: list[Element]) -> int | None:
    """The ``-1`` of a Reshape: the input's size over the other output dims, names cancelled."""
    if source is None or None in source or None in others:
        return None
    remaining = list(source)
    for dim in others:
        if isinstance(dim, str):
            if dim not in remaining:
                return None
            remaining.remove(dim)
    if any(isinstance(dim, str) for dim in remaining):
        return None
    known = math.prod(d for d in others if isinstance(d, int))
    total = math.prod(remaining)
    return total // known if known and total % known == 0 else None


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {init.name: init.data_type for init in graph.initializer}
    for info in (*graph.input, *graph.value_info, *graph.output):
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    return types


def _set_shape(graph: onnx.GraphProto, name: str, dims: list[Element], elem_type: int) -> None:
    info = next((v for v in (*graph.output, *graph.value_info) if v.name == name), None)
    if info is None:
        info = graph.value_info.add()
        info.name = name
    tensor = info.type.tensor_type
    if elem_type and not tensor.elem_type:
        tensor.elem_type = elem_type
    tensor.shape.Clear()
    for dim in dims:
        entry = tensor.shape.dim.add()
        if isinstance(dim, int):
            entry.dim_value = dim
        elif isinstance(dim, str):
            entry.dim_param = dim


def _shape_reshapes(graph: onnx.GraphProto) -> int:
    """Give each Reshape output of ``graph`` without a shape the one its target shape value says;
    return how many got one."""
    shapes, values, types = _known_shapes(graph), _constants(graph), _elem_types(graph)
    added = 0
    for node in graph.node:
        if node.op_type == "Reshape" and node.domain in ("", "ai.onnx") and len(node.input) == 2:
            target = values.get(node.input[1])
            if target is not None and not target[1] and node.output[0] not in shapes:
                dims = _reshaped(shapes.get(node.input[0]), target[0], bool(_attribute(node, "allowzero", 0)))
                _set_shape(graph, node.output[0], dims, types.get(node.input[0], 0))
                shapes[node.output[0]] = dims
                added += 1
            continue
        value = _value(node, values, shapes)
        if value is not None and node.output:
            values[node.output[0]] = value
    return added

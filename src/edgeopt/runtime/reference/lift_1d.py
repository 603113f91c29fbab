"""Lift 1-D convolutions and pools to 2-D before lowering, so the NHWC C kernels run them.

A 1-D ``Conv`` over ``x[N, C, L]`` with kernel ``w[O, C/g, k]`` equals the 2-D
``Conv`` over ``x[N, C, 1, L]`` with kernel ``w[O, C/g, 1, k]``, strides
``(1, s)``, dilations ``(1, d)`` and pads ``(0, b, 0, e)``: the height axis
of size 1 is never windowed. The same holds for ``ConvTranspose`` (weight
``[C, O/g, 1, k]``, ``output_padding (0, p)``), ``AveragePool``/``MaxPool``
(kernel ``(1, k)``) and for ``GlobalAveragePool``/``GlobalMaxPool``. The
program stores rank-4 tensors NHWC, so ``[N, C, 1, L]`` is stored
``[N, 1, L, C]``: channels innermost, as keyword-spotting, audio and sensor
models want their 1-D convolutions.

The lift works on a copy of the model and grows a *region* from each 1-D conv
or pool: through every node whose meaning does not change when an axis of size
1 is inserted at position 2 of its rank-3 tensors (Q/DQ, elementwise
activations, Add/Mul with constant or lifted operands, Concat/Split/Slice/Pad
and ReduceMean with keepdims over mapped axes). Inside it every rank-3
activation becomes rank 4; a constant operand of rank >= 2 gets the axis
before its last one (``[C, 1] -> [C, 1, 1]``), as broadcasting aligns
trailing axes. Where the region reads a value from outside, an ``Unsqueeze``
(axis 2) is inserted; where the outside reads a lifted value, or it is a graph
output, a ``Squeeze`` (axis 2) gives back the original value, name and shape.
Results are bit-identical: only shapes and attributes change, no arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.runtime.reference.patterns import match_spelled_out

__all__ = ["lift_1d"]

_SPATIAL = frozenset({"Conv", "ConvTranspose", "AveragePool", "MaxPool"})
_WEIGHTED = frozenset({"Conv", "ConvTranspose"})
_GLOBAL = frozenset({"GlobalAveragePool", "GlobalMaxPool"})
_ELEMENTWISE = frozenset({"QuantizeLinear", "DequantizeLinear", "Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh",
                          "HardSigmoid", "HardSwish", "Elu", "Gelu", "Identity", "Add", "Mul", "Sub", "Div",
                          "PRelu"})
_AXIS_OPS = frozenset({"Concat", "Split"})
_LIFTABLE = _SPATIAL | _GLOBAL | _ELEMENTWISE | _AXIS_OPS | {"Pad", "Slice", "ReduceMean", "ReduceSum"}
_HEIGHT = 2  # the axis inserted: [N, C, L] -> [N, C, 1, L]


def _lifted_axis(axis: int, rank: int = 3) -> int:
    """Axis ``axis`` of a rank-``rank`` tensor in the lifted tensor (the new axis sits before the last)."""
    axis %= rank
    return axis if axis < rank - 1 else axis + 1


def _lifted_shape(shape: Iterable) -> tuple:
    shape = tuple(shape)
    return shape if len(shape) < 2 else (*shape[:-1], 1, shape[-1])


def _rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def _constant_chain(value: ir.Value | None) -> bool:
    """A constant, or a DequantizeLinear of one (a weight, a bias, a quantized constant operand)."""
    return value is None or eir.is_constant(value) or eir.is_quantized_constant(value)


def _activations(node: ir.Node) -> list[ir.Value]:
    return [v for v in node.inputs if v is not None and v.name and not _constant_chain(v)]


def _is_seed(node: ir.Node) -> bool:
    if node.domain not in eir.ONNX_DOMAINS or not node.inputs or _rank(node.inputs[0]) != 3:
        return False
    if node.op_type in _GLOBAL:
        return True
    if node.op_type in _WEIGHTED:
        return len(node.inputs) > 1 and _constant_chain(node.inputs[1]) and _rank(node.inputs[1]) == 3
    return node.op_type in _SPATIAL


def _liftable(node: ir.Node) -> bool:
    """Whether ``node`` means the same on its rank-3 tensors with an axis of size 1 inserted at 2."""
    if node.domain not in eir.ONNX_DOMAINS or node.op_type not in _LIFTABLE or eir.subgraphs(node):
        return False
    activations = _activations(node)
    outputs = [v for v in node.outputs if v.name]
    if not activations or any(_rank(v) != 3 for v in (*activations, *outputs)):
        return False
    if node.op_type in _SPATIAL or node.op_type in _GLOBAL:
        return _is_seed(node)
    if node.op_type in ("ReduceMean", "ReduceSum"):
        return bool(node.attributes.get_int("keepdims", 1))
    if node.op_type in ("Pad", "Slice"):
        return all(eir.is_constant(v) for v in node.inputs[1:] if v is not None and v.name)
    return True


def _spelled_out(graph: ir.Graph) -> set[ir.Node]:
    """The nodes of spelled-out LayerNorms, RMSNorms, L2 norms and erf-GELUs: lowered as one op each, they must
    keep their rank (a lifted Sub or Mul among them, and the Squeeze back, would hide the group from its
    matcher)."""
    groups = [match_spelled_out(node) for node in graph]
    return {member for group in groups if group is not None for member in group.nodes}


def _region(graph: ir.Graph) -> set[ir.Node]:
    """The nodes reached from a 1-D conv or pool through liftable nodes over rank-3 activations (the
    members of a spelled-out LayerNorm or GELU excepted)."""
    region = {node for node in graph if _is_seed(node)}
    kept = _spelled_out(graph)
    frontier = list(region)
    while frontier:
        node = frontier.pop()
        for value in (*_activations(node), *node.outputs):
            neighbours = [use.node for use in value.uses()]
            if value.producer() is not None:
                neighbours.append(value.producer())
            for other in neighbours:
                if other not in region and other not in kept and other.graph is graph and _liftable(other):
                    region.add(other)
                    frontier.append(other)
    return _trimmed(region)


def _trimmed(region: set[ir.Node]) -> set[ir.Node]:
    """``region`` less the nodes that would read a lifted copy of a value that is not int8-exact: an
    ``Unsqueeze`` is data movement of quantized values, so a value entering the region must come from a
    DequantizeLinear (a graph input's QuantizeLinear, and what it feeds, stay outside)."""
    changed = True
    while changed:
        changed = False
        for node in list(region):
            entering = [v.producer() for v in _activations(node) if v.producer() not in region]
            if any(producer is None or producer.op_type != "DequantizeLinear" for producer in entering):
                region.discard(node)
                changed = True
    return region


def _unsqueezes_height(node: ir.Node, opset: int) -> bool:
    """An ``Unsqueeze`` of a rank-3 tensor at axis 2 (of its rank-4 output): what the lift does."""
    if node.op_type != "Unsqueeze" or node.domain not in eir.ONNX_DOMAINS or _rank(node.inputs[0]) != 3:
        return False
    if opset >= 13:
        axes = eir.constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    else:
        axes = node.attributes.get_ints("axes", None)
    return axes is not None and [int(a) % 4 for a in np.ravel(axes)] == [_HEIGHT]


class _Lifter:
    """Rewrites the region's nodes in graph order; see the module docstring."""

    def __init__(self, model: ir.Model, region: set[ir.Node]) -> None:
        self.model, self.graph, self.region = model, model.graph, region
        self.opset = eir.default_opset(model)
        self.lifted: dict[ir.Value, ir.Value] = {}  # a value made outside -> its Unsqueeze'd twin

    # -- boundary ---------------------------------------------------------------------

    def _axes(self, node_inputs: list, attributes: list, name: str) -> tuple[list, list]:
        if self.opset >= 13:
            axes = eir.add_initializer(self.graph, np.array([_HEIGHT], dtype=np.int64), f"{name}_axes")
            return [*node_inputs, axes], attributes
        return node_inputs, [*attributes, ir.AttrInt64s("axes", [_HEIGHT])]

    def unsqueezed(self, value: ir.Value) -> ir.Value:
        """``value`` (rank 3, made outside the region) with the height axis, made once."""
        if value not in self.lifted:
            name = eir.unique_value_name(self.graph, f"{value.name}__2d")
            inputs, attributes = self._axes([value], [], name)
            out = ir.Value(name=name, shape=ir.Shape(_lifted_shape(value.shape)), type=value.type)
            node = ir.Node("", "Unsqueeze", inputs, attributes, outputs=[out], name=name)
            producer = value.producer()
            if producer is None:
                self.graph.insert_before(next(iter(self.graph)), node)
            else:
                self.graph.insert_after(producer, node)
            self.lifted[value] = out
        return self.lifted[value]

    def squeeze_back(self, value: ir.Value, node: ir.Node) -> None:
        """Give readers outside the region (and the graph output) ``value`` at rank 3 again."""
        lifted_readers = self._bypass_unsqueezes(value)
        outside = [(use.node, use.idx) for use in value.uses()
                   if use.node not in self.region and use.node not in lifted_readers]
        is_output = value.is_graph_output()
        if not outside and not is_output:
            return
        original_name, original_shape = value.name, value.shape
        value.name = eir.unique_value_name(self.graph, f"{original_name}__2d")
        value.shape = ir.Shape(_lifted_shape(original_shape))
        inputs, attributes = self._axes([value], [], value.name)
        back = ir.Value(name=original_name, shape=original_shape, type=value.type)
        squeeze = ir.Node("", "Squeeze", inputs, attributes, outputs=[back], name=f"{original_name}__1d")
        self.graph.insert_after(node, squeeze)
        for reader, index in outside:
            reader.replace_input_with(index, back)
        if is_output:
            outputs = self.graph.outputs
            outputs[outputs.index(value)] = back

    def _bypass_unsqueezes(self, value: ir.Value) -> set[ir.Node]:
        """Readers of ``value`` that an ``Unsqueeze`` at axis 2 outside the region fed (the model's own
        lift, as a dynamo export writes a 1-D adaptive pool): they read the lifted value itself now, and
        the Unsqueeze goes. The readers of the value at rank 4, returned."""
        readers = set()
        for use in list(value.uses()):
            unsqueeze = use.node
            if unsqueeze in self.region or not _unsqueezes_height(unsqueeze, self.opset):
                continue
            out = unsqueeze.outputs[0]
            if out.is_graph_output():
                continue
            readers.update(reader.node for reader in out.uses())
            out.replace_all_uses_with(value)
            self.graph.remove(unsqueeze, safe=True)
        return readers

    # -- the region's nodes -----------------------------------------------------------

    def constant_operand(self, value: ir.Value, node: ir.Node) -> ir.Value:
        """A constant (or DequantizeLinear of one) of rank >= 2, re-made with the height axis."""
        if eir.is_constant(value):
            array = eir.constant_array(value)
            return eir.add_initializer(self.graph, array.reshape(_lifted_shape(array.shape)), f"{value.name}__2d")
        dequantize = value.producer()
        data = dequantize.inputs[0]
        array = eir.constant_array(data)
        lifted = eir.add_initializer(self.graph, array.reshape(_lifted_shape(array.shape)), f"{data.name}__2d")
        attributes = [ir.Attr(a.name, a.type, a.value) for a in dequantize.attributes.values()]
        scale = eir.constant_array(dequantize.inputs[1])
        if scale is not None and scale.size > 1 and array.ndim >= 2:
            axis = _lifted_axis(dequantize.attributes.get_int("axis", 1), array.ndim)
            attributes = [a for a in attributes if a.name != "axis"] + [ir.AttrInt64("axis", axis)]
        name = eir.unique_value_name(self.graph, f"{value.name}__2d")
        out = ir.Value(name=name, shape=ir.Shape(_lifted_shape(array.shape)), type=value.type)
        twin = ir.Node(dequantize.domain, "DequantizeLinear", [lifted, *dequantize.inputs[1:]], attributes,
                       outputs=[out], name=name)
        self.graph.insert_before(node, twin)
        return out

    def lift(self, node: ir.Node) -> None:
        for index, value in enumerate(node.inputs):
            if value is None or not value.name:
                continue
            if not _constant_chain(value):
                if value.producer() not in self.region:
                    node.replace_input_with(index, self.unsqueezed(value))
            elif _reads_lifted_constant(node, index) and (_rank(value) or 0) >= 2:
                node.replace_input_with(index, self.constant_operand(value, node))
        _ATTRIBUTE_RULES.get(node.op_type, _keep)(self, node)
        for value in node.outputs:
            if value.name:
                self.squeeze_back(value, node)
                value.shape = ir.Shape(_lifted_shape(value.shape)) if len(value.shape) == 3 else value.shape

    def constant_input(self, node: ir.Node, index: int, array: np.ndarray) -> None:
        node.replace_input_with(index, eir.add_initializer(self.graph, array, f"{node.name or node.op_type}_lifted"))


_BINARY = frozenset({"Add", "Mul", "Sub", "Div", "PRelu"})


def _reads_lifted_constant(node: ir.Node, index: int) -> bool:
    """Whether constant input ``index`` of a lifted ``node`` lines up with its activations' axes (an
    operand broadcast against them, a tensor concatenated to them, a conv's weight) rather than
    being a parameter (scales, pads, axes, a bias)."""
    return node.op_type in _BINARY or node.op_type == "Concat" or (node.op_type in _WEIGHTED and index == 1)


def _keep(lifter: _Lifter, node: ir.Node) -> None:
    del lifter, node


def _windows(lifter: _Lifter, node: ir.Node) -> None:
    for name in ("kernel_shape", "strides", "dilations"):
        if name in node.attributes:
            node.attributes[name] = ir.AttrInt64s(name, [1, *node.attributes.get_ints(name)])
    if "pads" in node.attributes:
        begin, end = node.attributes.get_ints("pads")
        node.attributes["pads"] = ir.AttrInt64s("pads", [0, begin, 0, end])
    if "output_padding" in node.attributes:  # ConvTranspose
        node.attributes["output_padding"] = ir.AttrInt64s("output_padding",
                                                          [0, *node.attributes.get_ints("output_padding")])
    if "output_shape" in node.attributes:
        node.attributes["output_shape"] = ir.AttrInt64s("output_shape", [1, *node.attributes.get_ints("output_shape")])


def _axis(lifter: _Lifter, node: ir.Node) -> None:
    default = 0 if node.op_type == "Split" else None
    axis = node.attributes.get_int("axis", default)
    node.attributes["axis"] = ir.AttrInt64("axis", _lifted_axis(axis))


def _quantize_axis(lifter: _Lifter, node: ir.Node) -> None:
    scale = eir.constant_array(node.inputs[1])
    if scale is not None and scale.size > 1:
        node.attributes["axis"] = ir.AttrInt64("axis", _lifted_axis(node.attributes.get_int("axis", 1)))


def _reduce_axes(lifter: _Lifter, node: ir.Node) -> None:
    if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].name:
        axes = eir.constant_array(node.inputs[1])
        lifter.constant_input(node, 1, np.array([_lifted_axis(int(a)) for a in axes], dtype=np.int64))
    elif "axes" in node.attributes:
        node.attributes["axes"] = ir.AttrInt64s("axes", [_lifted_axis(a) for a in node.attributes.get_ints("axes")])
    # no axes: every axis is reduced, the inserted one of size 1 included


def _pad(lifter: _Lifter, node: ir.Node) -> None:
    if len(node.inputs) > 3 and node.inputs[3] is not None and node.inputs[3].name:  # opset 18 axes
        axes = eir.constant_array(node.inputs[3])
        lifter.constant_input(node, 3, np.array([_lifted_axis(int(a)) for a in axes], dtype=np.int64))
        return
    def lifted(pads):
        pads = [int(p) for p in pads]
        return [pads[0], pads[1], 0, pads[2], pads[3], pads[4], 0, pads[5]]
    if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].name:
        lifter.constant_input(node, 1, np.array(lifted(eir.constant_array(node.inputs[1])), dtype=np.int64))
    elif "pads" in node.attributes:
        node.attributes["pads"] = ir.AttrInt64s("pads", lifted(node.attributes.get_ints("pads")))


def _slice(lifter: _Lifter, node: ir.Node) -> None:
    if lifter.opset < 10:
        starts = node.attributes.get_ints("starts")
        axes = node.attributes.get_ints("axes", list(range(len(starts))))
        node.attributes["axes"] = ir.AttrInt64s("axes", [_lifted_axis(a) for a in axes])
        return
    starts = eir.constant_array(node.inputs[1])
    has_axes = len(node.inputs) > 3 and node.inputs[3] is not None and node.inputs[3].name
    axes = eir.constant_array(node.inputs[3]) if has_axes else np.arange(starts.size)
    if len(node.inputs) < 4:
        node.resize_inputs(4)
    lifter.constant_input(node, 3, np.array([_lifted_axis(int(a)) for a in axes], dtype=np.int64))


_ATTRIBUTE_RULES: dict[str, Callable[[_Lifter, ir.Node], None]] = {
    **dict.fromkeys(_SPATIAL, _windows), **dict.fromkeys(_AXIS_OPS, _axis),
    "QuantizeLinear": _quantize_axis, "DequantizeLinear": _quantize_axis,
    "ReduceMean": _reduce_axes, "ReduceSum": _reduce_axes, "Pad": _pad, "Slice": _slice,
}


def lift_1d(model: ir.Model) -> ir.Model:
    """``model`` itself when it has no 1-D conv or pool, else a copy with them (and their region) in 2-D."""
    if not any(_is_seed(node) for node in model.graph):
        return model
    model = model.clone()
    region = _region(model.graph)
    lifter = _Lifter(model, region)
    for node in [node for node in model.graph if node in region]:
        lifter.lift(node)
    return model

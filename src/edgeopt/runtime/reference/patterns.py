"""Spelled-out LayerNorm, RMSNorm, L2 norm and erf-GELU in a QDQ graph: node groups that are one function of
one int8 tensor.

Exporters below opset 17 (no LayerNormalization) or 20 (no Gelu), and any exporter for ConvNeXt's
channels-first LayerNorm (over axis 1 of NCHW, which no LayerNormalization expresses), write::

    LayerNorm  mean = ReduceMean(x, axes)   d = Sub(x, mean)   (computed once, or twice)
               var = ReduceMean(Pow(d, 2) or Mul(d, d), axes)
               n = Div(d, Sqrt(Add(var, eps)))   or   Mul(d, Reciprocal(Sqrt(Add(var, eps))))
               y = [Add(] [Mul(] n [, gamma)] [, beta)]     gamma and beta constant along the axes
    RMSNorm    r = Sqrt(Add(ReduceMean(Pow(x, 2) or Mul(x, x), axes), eps))
               y = [Mul(] Div(x, r) or Mul(x, Reciprocal(r)) or Mul(x, Div(1, r)) [, gamma)]
               (T5 scales first: Mul(gamma, x) in place of x)
    L2 norm    n = Clip(ReduceL2(x, axes), eps) or Max(ReduceL2(x, axes), eps)
               y = Div(x, n or Expand(n, Shape(x) or a constant))      (F.normalize)
    GELU       e = Erf(Div(x, sqrt(2)) or Mul(x, 1 / sqrt(2)))
               y = (e + 1) times x and 0.5, in any association (x * 0.5 * (1 + e), (x * (1 + e)) * 0.5 ...)

Every intermediate is read by the next step alone and is no graph output; both ReduceMeans keep dims and
reduce the same constant axes. Then ``y`` depends on ``x`` alone: with ``x`` an int8 tensor and ``y``
reaching a QuantizeLinear, the group lowers to one integer op (``layer_norm``, centered or not, or a ``lut``
of 256 entries) and no float value is left between. The same structural rules as the float pass that fuses
or annotates these groups (:mod:`edgeopt.passes.rules.layer_norm`, ``rms_norm``, ``l2_norm``, ``gelu``),
re-stated here for QDQ graphs, whose producer need not be edgeopt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.passes.rules.l2_norm import norm_floor

__all__ = ["SpelledGelu", "SpelledLayerNorm", "constant_operand", "match_erf_gelu", "match_l2_norm",
           "match_layer_norm", "match_rms_norm", "match_spelled_out"]

_GELU_LINKS = 3  # (1 + e) * x * 0.5 takes at most three Mul/Div nodes after the Add


@dataclass(frozen=True, eq=False)
class SpelledLayerNorm:
    """``nodes`` (in graph order) compute ``y = (x - mean) / sqrt(var + epsilon) * scale + bias``
    over ``axes`` (logical, non-negative); ``scale``/``bias`` are None when the group has no Mul/Add.
    ``centered`` False: no mean subtracted, ``y = x / sqrt(mean(x^2) + epsilon) * scale`` (an RMSNorm; an L2
    norm is one with ``scale`` 1 / sqrt(D) and ``epsilon`` eps^2 / D, D values normalized together)."""

    nodes: tuple[ir.Node, ...]
    x: ir.Value
    axes: tuple[int, ...]
    epsilon: float
    scale: np.ndarray | None
    bias: np.ndarray | None
    centered: bool = True

    @property
    def last(self) -> ir.Node:
        return self.nodes[-1]


@dataclass(frozen=True, eq=False)
class SpelledGelu:
    """``nodes`` (in an order that evaluates them) compute ``0.5 * x * (1 + erf(x / sqrt(2)))``."""

    nodes: tuple[ir.Node, ...]
    x: ir.Value

    @property
    def last(self) -> ir.Node:
        return self.nodes[-1]


def constant_operand(value: ir.Value | None) -> np.ndarray | None:
    """A constant operand as the float op reads it: the constant itself, or the float32 ``(q - zp) * scale``
    of a DequantizeLinear of constants. Exporters share one scalar initializer among nodes (dynamo's 0.5 is
    GELU's and attention's); when the quantizer stores it int8 for a quantized reader, the group's float
    node reads the same DequantizeLinear."""
    array = eir.constant_array(value)
    producer = value.producer() if value is not None and array is None else None
    if not eir.is_op(producer, "DequantizeLinear") or len(producer.inputs) < 2:
        return array
    data, scale = eir.constant_array(producer.inputs[0]), eir.constant_array(producer.inputs[1])
    zero_point = eir.constant_array(producer.inputs[2]) if len(producer.inputs) > 2 else None
    if data is None or scale is None or (zero_point is None and len(producer.inputs) > 2
                                         and producer.inputs[2] is not None):
        return None
    shape = [1] * data.ndim
    if scale.size > 1:
        shape[producer.attributes.get_int("axis", 1) % data.ndim] = scale.size
    zero_point = np.zeros(1, np.int64) if zero_point is None else zero_point.astype(np.int64)
    return ((data.astype(np.int64) - zero_point.reshape(shape)).astype(np.float32)
            * scale.astype(np.float32).reshape(shape))


def _scalar(value: ir.Value | None) -> float | None:
    array = constant_operand(value) if value is not None else None
    if array is None or array.size != 1 or not np.issubdtype(array.dtype, np.number):
        return None
    return float(array.reshape(()))


def _next(value: ir.Value, *op_types: str) -> ir.Node | None:
    node = eir.sole_consumer(value)
    return node if eir.is_op(node, *op_types) else None


def _axes(node: ir.Node, rank: int) -> tuple[int, ...] | None:
    """The constant, non-negative, sorted axes of a reduction that keeps dims (all axes when none are given)."""
    if node.attributes.get_int("keepdims", 1) != 1:
        return None
    axes = eir.reduce_axes(node)
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        return None  # axes computed at run time
    if not axes:
        return None if node.attributes.get_int("noop_with_empty_axes", 0) else tuple(range(rank))
    return tuple(sorted(a % rank for a in axes))


# -- LayerNorm ------------------------------------------------------------------------------------------


def _squares(node: ir.Node, d: ir.Value) -> bool:
    if eir.is_op(node, "Pow"):
        return node.inputs[0] is d and _scalar(node.inputs[1]) == 2.0
    return eir.is_op(node, "Mul") and node.inputs[0] is d and node.inputs[1] is d


def _variance(square: ir.Node, axes, rank: int) -> tuple[list[ir.Node], float] | None:
    """``Sqrt(Add(ReduceMean(square, axes), eps))``: its nodes (square first) and eps."""
    variance = _next(square.outputs[0], "ReduceMean")
    add = _next(variance.outputs[0], "Add") if variance is not None and _axes(variance, rank) == axes else None
    epsilon = _scalar(eir.other_input(add, variance.outputs[0])) if add is not None else None
    sqrt = _next(add.outputs[0], "Sqrt") if epsilon is not None else None
    return ([square, variance, add, sqrt], epsilon) if sqrt is not None and epsilon >= 0 else None


def _divides(normalize: ir.Node, d: ir.Value, sqrt: ir.Node) -> list[ir.Node] | None:
    """The nodes dividing ``d`` by ``sqrt``'s output: ``[normalize]`` or ``[reciprocal, normalize]``."""
    std = sqrt.outputs[0]
    if eir.is_op(normalize, "Div"):
        ok = normalize.inputs[0] is d and normalize.inputs[1] is std and eir.sole_consumer(std) is normalize
        return [normalize] if ok else None
    reciprocal = _next(std, "Reciprocal")
    if (eir.is_op(normalize, "Mul") and reciprocal is not None
            and eir.other_input(normalize, d) is reciprocal.outputs[0]
            and eir.sole_consumer(reciprocal.outputs[0]) is normalize):
        return [reciprocal, normalize]
    return None


def _affine(node: ir.Node, op_type: str, axes, rank: int) -> tuple[ir.Node, np.ndarray] | None:
    """The Mul (gamma) or Add (beta) alone reading ``node``'s output by a constant varying only along ``axes``."""
    following = _next(node.outputs[0], op_type)
    other = eir.other_input(following, node.outputs[0]) if following is not None else None
    constant = constant_operand(other) if other is not None else None
    if constant is None or not np.issubdtype(constant.dtype, np.floating) or not _along(constant, axes, rank):
        return None
    return following, constant.astype(np.float64)


def _along(constant: np.ndarray, axes, rank: int) -> bool:
    """Whether ``constant`` broadcasts to rank ``rank`` varying only along ``axes``."""
    if constant.ndim > rank:
        return False
    padded = (1,) * (rank - constant.ndim) + constant.shape
    return all(size == 1 or axis in axes for axis, size in enumerate(padded))


def match_layer_norm(mean: ir.Node) -> SpelledLayerNorm | None:
    """The spelled-out LayerNorm whose first ReduceMean is ``mean``, or None."""
    x = mean.inputs[0] if eir.is_op(mean, "ReduceMean") and mean.inputs else None
    rank = len(x.shape) if x is not None and x.shape is not None else None
    axes = _axes(mean, rank) if rank else None
    subs = eir.consumers(mean.outputs[0]) if axes is not None and not mean.outputs[0].is_graph_output() else []
    if not 1 <= len(subs) <= 2 or not all(eir.is_op(s, "Sub") and s.inputs[0] is x and s.inputs[1] is mean.outputs[0]
                                          and not s.outputs[0].is_graph_output() for s in subs):
        return None
    uses = [(sub, reader) for sub in subs for reader in eir.consumers(sub.outputs[0])]
    if len(uses) != 2 or (len(subs) == 2 and uses[0][0] is uses[1][0]):
        return None
    for (square_sub, square), (divided_sub, normalize) in (uses, uses[::-1]):
        found = _variance(square, axes, rank) if _squares(square, square_sub.outputs[0]) else None
        division = _divides(normalize, divided_sub.outputs[0], found[0][-1]) if found else None
        if division is not None:
            return _with_affine([mean, *subs, *found[0], *division], x, axes, found[1], rank)
    return None


def _with_affine(nodes: list[ir.Node], x: ir.Value, axes, epsilon: float, rank: int) -> SpelledLayerNorm:
    scale = _affine(nodes[-1], "Mul", axes, rank)
    if scale is not None:
        nodes.append(scale[0])
    bias = _affine(nodes[-1], "Add", axes, rank)
    if bias is not None:
        nodes.append(bias[0])
    return SpelledLayerNorm(nodes=tuple(nodes), x=x, axes=axes, epsilon=epsilon,
                            scale=scale[1] if scale else None, bias=bias[1] if bias else None)


# -- RMSNorm and L2 norm ---------------------------------------------------------------------------------


def _scaled_x(value: ir.Value, x: ir.Value, reader: ir.Node) -> tuple[list[ir.Node], np.ndarray | None] | None:
    """``value`` is ``x`` (no node, no scale), or ``Mul(gamma, x)`` read by ``reader`` alone with a constant
    ``gamma`` (T5's): ([that Mul], gamma)."""
    if value is x:
        return [], None
    node = value.producer()
    other = eir.other_input(node, x) if eir.is_op(node, "Mul") and x in node.inputs else None
    gamma = constant_operand(other) if other is not None else None
    if gamma is None or not np.issubdtype(gamma.dtype, np.floating) or eir.sole_consumer(value) is not reader \
            or value.is_graph_output():
        return None
    return [node], gamma.astype(np.float64)


def _rms_division(sqrt: ir.Node, x: ir.Value) -> tuple[list[ir.Node], np.ndarray | None] | None:
    """The nodes dividing ``x`` (or ``gamma * x``) by ``sqrt``'s output, in graph order, and that gamma."""
    root = sqrt.outputs[0]
    reader = _next(root, "Div", "Reciprocal")
    if eir.is_op(reader, "Div") and reader.inputs[1] is root and _scalar(reader.inputs[0]) != 1.0:
        scaled = _scaled_x(reader.inputs[0], x, reader)
        return (scaled[0] + [reader], scaled[1]) if scaled is not None else None
    if eir.is_op(reader, "Div") and (reader.inputs[1] is not root or _scalar(reader.inputs[0]) != 1.0):
        return None
    product = _next(reader.outputs[0], "Mul") if reader is not None else None
    scaled = _scaled_x(eir.other_input(product, reader.outputs[0]), x, product) if product is not None else None
    return (scaled[0] + [reader, product], scaled[1]) if scaled is not None else None


def match_rms_norm(mean: ir.Node) -> SpelledLayerNorm | None:
    """The spelled-out RMSNorm whose ReduceMean (of ``x`` squared) is ``mean``, or None."""
    square = mean.inputs[0].producer() if eir.is_op(mean, "ReduceMean") and mean.inputs else None
    x = square.inputs[0] if eir.is_op(square, "Pow", "Mul") and square.inputs else None
    rank = len(x.shape) if x is not None and x.shape is not None else None
    if not rank or not _squares(square, x) or eir.sole_consumer(square.outputs[0]) is not mean \
            or square.outputs[0].is_graph_output() or eir.is_op(x.producer(), "Sub"):  # a LayerNorm's variance
        return None
    axes = _axes(mean, rank)
    found = _variance(square, axes, rank) if axes is not None else None
    division = _rms_division(found[0][-1], x) if found is not None else None
    if division is None or (division[1] is not None and not _along(division[1], axes, rank)):
        return None
    nodes, scale = [*found[0], *division[0]], division[1]
    gain = _affine(nodes[-1], "Mul", axes, rank)
    if gain is not None:
        nodes.append(gain[0])
        scale = gain[1] if scale is None else scale * gain[1]
    return SpelledLayerNorm(nodes=tuple(nodes), x=x, axes=axes, epsilon=found[1], scale=scale, bias=None,
                            centered=False)


def match_l2_norm(norm: ir.Node) -> SpelledLayerNorm | None:
    """The spelled-out L2 normalization (``F.normalize``) whose ReduceL2 is ``norm``, or None."""
    x = norm.inputs[0] if eir.is_op(norm, "ReduceL2") and norm.inputs else None
    rank = len(x.shape) if x is not None and x.shape is not None else None
    axes = _axes(norm, rank) if rank else None
    floor = _next(norm.outputs[0], "Clip", "Max") if axes is not None and not norm.outputs[0].is_graph_output() \
        else None
    epsilon = norm_floor(floor, _scalar)
    nodes = [norm, floor]
    divisor = _next(floor.outputs[0], "Expand", "Div") if epsilon is not None else None
    if eir.is_op(divisor, "Expand"):
        shape = divisor.inputs[1].producer()  # TorchScript's Shape(x): part of the group
        if eir.is_op(shape, "Shape") and shape.inputs[0] is x and eir.sole_consumer(shape.outputs[0]) is divisor:
            nodes.append(shape)
        nodes.append(divisor)
        divisor = _next(divisor.outputs[0], "Div")
    if divisor is None or divisor.inputs[0] is not x or divisor.inputs[1] is not nodes[-1].outputs[0]:
        return None
    if any(not isinstance(x.shape[a], int) for a in axes):
        return None
    count = int(np.prod([x.shape[a] for a in axes]))
    return SpelledLayerNorm(nodes=(*nodes, divisor), x=x, axes=axes, epsilon=epsilon * epsilon / count,
                            scale=np.full(1, 1.0 / math.sqrt(count)), bias=None, centered=False)


def match_spelled_out(node: ir.Node) -> SpelledLayerNorm | SpelledGelu | None:
    """The spelled-out group ``node`` anchors (a LayerNorm's first ReduceMean, an RMSNorm's ReduceMean, an L2
    norm's ReduceL2, a GELU's Erf), or None."""
    if node.op_type == "ReduceMean":
        return match_layer_norm(node) or match_rms_norm(node)
    if node.op_type == "ReduceL2":
        return match_l2_norm(node)
    return match_erf_gelu(node) if node.op_type == "Erf" else None


# -- GELU ------------------------------------------------------------------------------------------------


def _erf_argument(erf: ir.Node) -> tuple[ir.Node, ir.Value] | None:
    """``x / sqrt(2)`` or ``x * (1 / sqrt(2))`` read by ``erf`` alone: (that node, x)."""
    scale = erf.inputs[0].producer() if erf.inputs and erf.inputs[0] is not None else None
    if not eir.is_op(scale, "Div", "Mul") or eir.sole_consumer(erf.inputs[0]) is not erf:
        return None
    if scale.op_type == "Div":
        x, number, expected = scale.inputs[0], _scalar(scale.inputs[1]), math.sqrt(2.0)
    else:
        constant = 1 if _scalar(scale.inputs[1]) is not None else 0
        x, number, expected = scale.inputs[1 - constant], _scalar(scale.inputs[constant]), 1 / math.sqrt(2.0)
    if number is None or _scalar(x) is not None or not math.isclose(number, expected, rel_tol=1e-3):
        return None
    return scale, x


def _times_x(value: ir.Value, x: ir.Value, node: ir.Node) -> tuple[ir.Node | None, float] | None:
    """``value`` is ``x`` itself, or ``x * c`` / ``x / c`` read by ``node`` alone: (that node or None, c)."""
    if value is x:
        return None, 1.0
    scaled = value.producer()
    if not eir.is_op(scaled, "Mul", "Div") or eir.sole_consumer(value) is not node or x not in scaled.inputs:
        return None
    number = _scalar(eir.other_input(scaled, x))
    if number is None or number == 0 or (scaled.op_type == "Div" and scaled.inputs[0] is not x):
        return None
    return scaled, (1 / number if scaled.op_type == "Div" else number)


def _product(start: ir.Value, x: ir.Value) -> list[ir.Node] | None:
    """The Mul/Div chain from ``start`` to ``0.5 * x * start`` (x brought in once), each link read alone."""
    current, nodes, factor, has_x = start, [], 1.0, False
    for _ in range(_GELU_LINKS):
        node = _next(current, "Mul", "Div")
        other = eir.other_input(node, current) if node is not None else None
        number = _scalar(other)
        if other is None or (node.op_type == "Div" and (node.inputs[0] is not current or not number)):
            return None
        if number is not None:
            factor = factor / number if node.op_type == "Div" else factor * number
        else:
            brought = _times_x(other, x, node) if not has_x else None
            if brought is None:
                return None
            nodes += [brought[0]] if brought[0] is not None else []
            factor, has_x = factor * brought[1], True
        nodes.append(node)
        current = node.outputs[0]
        if has_x and math.isclose(factor, 0.5, rel_tol=1e-4):
            return nodes
    return None


def match_erf_gelu(erf: ir.Node) -> SpelledGelu | None:
    """The spelled-out exact GELU around ``erf``, or None."""
    argument = _erf_argument(erf) if eir.is_op(erf, "Erf") else None
    plus = _next(erf.outputs[0], "Add") if argument is not None else None
    if plus is None or not math.isclose(_scalar(eir.other_input(plus, erf.outputs[0])) or 0.0, 1.0, rel_tol=1e-6):
        return None
    chain = _product(plus.outputs[0], argument[1])
    return SpelledGelu(nodes=(argument[0], erf, plus, *chain), x=argument[1]) if chain else None

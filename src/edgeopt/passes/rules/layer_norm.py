"""LayerNorm written out op by op -> one LayerNormalization (opset >= 17).

Exporters (and hand-written modules) spell ``(x - mean) / sqrt(var + eps) *
gamma + beta`` over the trailing axes as::

    mean = ReduceMean(x, axes)          d = Sub(x, mean)
    var  = ReduceMean(Pow(d, 2), axes)  (or Mul(d, d))
    n    = Div(d, Sqrt(Add(var, eps)))  (or Mul(d, Reciprocal(...)))
    y    = Add(Mul(n, gamma), beta)     (gamma and beta optional)

``x - mean`` may be computed twice, once for the square and once for the
division (torch's dynamo exporter writes it so with ``optimize=False``).
The reduced axes must be the trailing ones (``LayerNormalization`` normalizes
``x.shape[axis:]``), both ReduceMeans keep dims, and every intermediate has
exactly the readers the formula gives it. gamma and beta are absorbed when
they are constants that broadcast to the normalized shape. Below opset 17 the
nodes are annotated ``layer_norm`` instead (``metadata_props["edgeopt.pattern"]``),
so the quantizer keeps the group float as one op, as it keeps a
LayerNormalization (no integer kernel), and puts no Q/DQ pair between its steps.
So are the nodes of a LayerNorm over leading axes, which no LayerNormalization
expresses: ConvNeXt's channels-first LayerNorm (``x.mean(1, keepdim=True)`` of an
NCHW tensor, then ``weight[:, None, None] * x + bias[:, None, None]``), quantized
step by step it rounded its variance, quotient and affine to 8 bits each (-1.3 dB
at a small ConvNeXt's output).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.passes._matching import is_op, other_input, reduce_axes, scalar, sole_consumer
from edgeopt.passes._rules import Match, Rule, RuleContext
from edgeopt.passes.rules.activations import PATTERN_KEY, annotate

__all__ = ["LayerNormRule"]

LAYER_NORM_OPSET = 17


@dataclasses.dataclass
class _LayerNormMatch(Match):
    mean: ir.Node
    sub: ir.Node
    x: ir.Value
    body: list[ir.Node] = dataclasses.field(default_factory=list)
    axis: int = -1
    epsilon: float = 1e-5
    scale: np.ndarray | None = None
    bias: np.ndarray | None = None
    annotate_only: str | None = None  # why the group is marked, not fused (below opset 17, leading axes)
    twin: ir.Node | None = None  # a second Sub(x, mean), the one the square reads (the division reads ``sub``)

    @property
    def head(self) -> tuple[ir.Node, ...]:
        return (self.mean, self.sub) if self.twin is None else (self.mean, self.sub, self.twin)


def _trailing_axis(axes: list[int] | None, rank: int | None) -> int | str:
    if axes is None:
        return "ReduceMean axes are not constant"
    if rank is None:
        if all(a < 0 for a in axes) and sorted(axes) == list(range(-len(axes), 0)):
            return -len(axes)
        return "the rank of x is unknown"
    normalized = sorted(a + rank if a < 0 else a for a in axes)
    if normalized != list(range(rank - len(axes), rank)):
        return f"ReduceMean axes {axes} are not the trailing axes of a rank-{rank} input"
    return normalized[0] - rank


def _leading_axes(match: _LayerNormMatch) -> list[int] | None:
    """The reduced axes, sorted and non-negative, when they are constant and x's rank is known (trailing or not)."""
    axes = reduce_axes(match.mean)
    if axes is None or match.x.shape is None:
        return None
    rank = len(match.x.shape)
    return sorted(a + rank if a < 0 else a for a in axes)


def _normalized_dims(match: _LayerNormMatch) -> tuple[int, tuple[int, ...]] | str:
    """(axis, static normalized dims) of the reduction, or why there are none."""
    rank = len(match.x.shape) if match.x.shape is not None else None
    axis = _trailing_axis(reduce_axes(match.mean), rank)
    if isinstance(axis, str):
        return axis
    dims = tuple(match.x.shape.dims[axis:]) if match.x.shape is not None else ()
    if not dims or not all(isinstance(d, int) for d in dims):
        return "the normalized dims of x are not static"
    return axis, dims


def _split_d_readers(match: _LayerNormMatch) -> tuple[ir.Node, ir.Node] | str:
    """(square, normalize) among the two readers of ``d = x - mean`` (of the two Subs, one reader each, when
    it is computed twice: then ``match.sub`` becomes the one the division reads)."""
    subs = match.head[1:]
    readers = [reader for sub in subs for reader in eir.consumers(sub.outputs[0])]
    if any(sub.outputs[0].is_graph_output() for sub in subs) or len(readers) != 2 or \
            (len(subs) == 2 and any(len(eir.consumers(sub.outputs[0])) != 1 for sub in subs)):
        return f"x - mean has {len(readers)} readers (expected its square and the division)"
    for square, normalize in (readers, readers[::-1]):
        d = square.inputs[0]
        squares = (is_op(square, "Pow") and scalar(square.inputs[1]) == 2.0) \
            or (is_op(square, "Mul") and square.inputs[1] is d)
        if squares and d.producer() in subs and is_op(normalize, "Div", "Mul"):
            if match.twin is not None:
                match.twin = d.producer()
                match.sub = subs[0] if match.twin is subs[1] else subs[1]
            return square, normalize
    return "x - mean is not squared (Pow 2 or Mul) and divided"


def _follow(value: ir.Value, op_type: str) -> ir.Node | None:
    reader = sole_consumer(value)
    return reader if is_op(reader, op_type) else None


def _variance_chain(match: _LayerNormMatch, square: ir.Node, normalize: ir.Node) -> str | None:
    variance = _follow(square.outputs[0], "ReduceMean")
    if variance is None or reduce_axes(variance) != reduce_axes(match.mean):
        return "the square is not averaged over the same axes"
    if variance.attributes.get_int("keepdims", 1) != 1 or match.mean.attributes.get_int("keepdims", 1) != 1:
        return "a ReduceMean drops the reduced axes (keepdims=0)"
    add = _follow(variance.outputs[0], "Add")
    epsilon = scalar(other_input(add, variance.outputs[0])) if add is not None else None
    sqrt = _follow(add.outputs[0], "Sqrt") if add is not None else None
    if epsilon is None or sqrt is None:
        return "the variance is not followed by Add(epsilon) -> Sqrt"
    steps = [square, variance, add, sqrt]
    if normalize.op_type == "Mul":
        reciprocal = _follow(sqrt.outputs[0], "Reciprocal")
        if reciprocal is None or other_input(normalize, match.sub.outputs[0]) is not reciprocal.outputs[0]:
            return "x - mean is not divided by the standard deviation"
        steps.append(reciprocal)
    elif normalize.inputs[0] is not match.sub.outputs[0] or normalize.inputs[1] is not sqrt.outputs[0] \
            or sole_consumer(sqrt.outputs[0]) is not normalize:
        return "x - mean is not divided by the standard deviation"
    match.body, match.epsilon = [*steps, normalize], epsilon
    return None


def _fit(array: np.ndarray, normalized: tuple[int, ...], rank: int) -> np.ndarray | None:
    """``array`` broadcast to the normalized shape, if it broadcasts only there."""
    if array.ndim > rank:
        return None
    while array.ndim > len(normalized) and array.shape[0] == 1:
        array = array.reshape(array.shape[1:])
    if array.ndim > len(normalized) or np.broadcast_shapes(array.shape, normalized) != normalized:
        return None
    return np.broadcast_to(array, normalized).copy()


def _absorb_annotated(match: _LayerNormMatch, op_type: str, axes: list[int], rank: int) -> None:
    """Take a following Mul (gamma) or Add (beta) into an annotated group when its constant varies only
    along the reduced ``axes`` (a per-channel affine)."""
    output = match.body[-1].outputs[0]
    node = _follow(output, op_type)
    constant = eir.constant_array(other_input(node, output)) if node is not None else None
    if constant is None or constant.ndim > rank:
        return
    padded = (1,) * (rank - constant.ndim) + constant.shape
    if all(size == 1 or axis in axes for axis, size in enumerate(padded)):
        match.body.append(node)


def _absorb(match: _LayerNormMatch, op_type: str, normalized: tuple[int, ...], rank: int) -> np.ndarray | None:
    """Take the constant of a following Mul (gamma) or Add (beta) into the match."""
    output = match.body[-1].outputs[0]
    node = _follow(output, op_type)
    constant = eir.constant_array(other_input(node, output)) if node is not None else None
    fitted = _fit(constant, normalized, rank) if constant is not None else None
    if fitted is not None:
        match.body.append(node)
    return fitted


class LayerNormRule(Rule):
    """ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div[/Mul/Add] -> LayerNormalization."""

    name = "layer-norm"
    anchor_ops = frozenset({"ReduceMean"})

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        if PATTERN_KEY in node.metadata_props:  # marked already (below opset 17)
            return None
        x, subs = node.inputs[0], eir.consumers(node.outputs[0])
        if node.outputs[0].is_graph_output() or not 1 <= len(subs) <= 2 or not all(
                is_op(sub, "Sub") and sub.inputs[0] is x and sub.inputs[1] is node.outputs[0] for sub in subs):
            return None
        return _LayerNormMatch(nodes=(node, *subs), mean=node, sub=subs[0], x=x,
                               twin=subs[1] if len(subs) == 2 else None)

    def check(self, match: _LayerNormMatch, context: RuleContext) -> str | None:
        if context.opset < LAYER_NORM_OPSET:
            match.annotate_only = f"LayerNormalization needs opset >= {LAYER_NORM_OPSET}, model has {context.opset}"
        readers = _split_d_readers(match)
        if isinstance(readers, str):
            return readers
        reason = _variance_chain(match, *readers)
        if reason is not None:
            return reason
        axes = _leading_axes(match)
        if axes is not None and axes != list(range(len(match.x.shape) - len(axes), len(match.x.shape))):
            match.annotate_only = f"axes {axes} are not trailing: no LayerNormalization normalizes them"
            for op_type in ("Mul", "Add"):
                _absorb_annotated(match, op_type, axes, len(match.x.shape))
            return None
        normalized = _normalized_dims(match)
        if isinstance(normalized, str):
            return normalized
        match.axis, dims = normalized
        rank = len(match.x.shape)
        match.scale = _absorb(match, "Mul", dims, rank)
        match.bias = _absorb(match, "Add", dims, rank)
        if match.scale is None:
            match.scale = np.ones(dims)
        return None

    def rewrite(self, match: _LayerNormMatch, context: RuleContext) -> str:
        if match.annotate_only:
            annotate((*match.head, *match.body), "layer_norm")
            return f"annotated as layer_norm ({match.annotate_only})"
        graph = context.graph
        dtype = eir.numpy_dtype(match.x) or np.dtype(np.float32)
        name = eir.node_label(match.mean)
        inputs = [match.x, eir.add_initializer(graph, match.scale.astype(dtype), f"{name}.scale")]
        if match.bias is not None:
            inputs.append(eir.add_initializer(graph, match.bias.astype(dtype), f"{name}.bias"))
        new = ir.node("LayerNormalization", inputs, {"axis": match.axis, "epsilon": match.epsilon},
                      name=f"{name}_LayerNormalization")
        old = [*match.head, *match.body]
        eir.replace_nodes(graph, old, match.body[-1].outputs[0], [new])
        return f"fused into LayerNormalization (axis={match.axis})"

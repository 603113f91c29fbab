"""Fold a constant per-channel (or scalar) Mul/Div/Add/Sub after a layer into it.

Exporters that fold BatchNormalization themselves (TensorFlow, Keras, some
PyTorch paths) leave ``Conv -> Mul(s) -> Add(t)`` behind, with ``s`` and
``t`` shaped ``[C,1,1]``, ``[1,C,1,1]`` or scalars. Since
``s * (W x + b) = (s W) x + s b`` and ``(W x + b) + t = W x + (b + t)``, each
op folds into the weight and bias, one at a time (a Mul then an Add is two
folds). The constant must vary only along the channel axis (axis 1):
anything else would change different pixels differently, which no weight
can express.

A positive scale also folds through a clamp between the layer and it:
``s * relu(y) = relu(s * y)`` per channel, and ``s * clip(y, lo, hi) =
clip(s * y, s * lo, s * hi)`` for one ``s`` (a Clip's bounds are scalars).
That is what is left of a hard sigmoid spelled ``clip(conv + 3, 0, 6) / 6``
once the ``+ 3`` has folded into the conv's bias: the conv takes the ``/ 6``
and clamps to ``[0, 1]``, one integer kernel instead of a float Div after it.

A native ``HardSigmoid(y) = clip(alpha * y + beta, 0, 1)`` after a layer (torch's ``nn.Hardsigmoid``
SE gate) folds the same way: the layer computes ``alpha * y + beta`` (weight scaled by alpha, bias
``alpha * b + beta``) and a ``Clip(0, 1)`` follows, which the quantized layer applies as its output
range. ONNX Runtime has no integer HardSigmoid: it ran in float between the conv and the gating Mul.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.passes._conv import (
    LinearParts,
    as_channel_vector,
    fold_refusal,
    foldable_parts,
    store_parts,
    vector_refusal,
)
from edgeopt.passes._matching import clip_bounds, is_op, producer_and_constant, producer_op, sole_consumer
from edgeopt.passes._report import ReportedPassResult
from edgeopt.passes._rules import Match, Rule, RuleContext, RulePass, run_on_copy
from edgeopt.passes.rules import clip_node

__all__ = ["FoldAffinePass", "fold_affine"]

_LAYER_OPS = ("Conv", "ConvTranspose", "Gemm")


@dataclasses.dataclass
class _LayerAffine(Match):
    layer: ir.Node
    op: ir.Node
    constant: ir.Value
    parts: LinearParts | None = None
    vector: np.ndarray | None = None


def _find_layer_and_constant(node: ir.Node, commutative: bool) -> _LayerAffine | None:
    found = producer_and_constant(node, _LAYER_OPS, commutative=commutative)
    if found is None:
        return None
    layer, constant = found
    return _LayerAffine(nodes=(layer, node), layer=layer, op=node, constant=constant)


def _check(match: _LayerAffine) -> str | None:
    parts = foldable_parts(match.layer, match.op)
    if isinstance(parts, str):
        return parts
    array = eir.constant_array(match.constant)
    if not np.issubdtype(array.dtype, np.floating):
        return f"constant is {array.dtype}, not float"
    reason = vector_refusal(array, parts.output_rank, parts.channels)
    if reason is not None:
        return reason
    match.parts, match.vector = parts, as_channel_vector(array, parts.channels)
    return None


def _finish(match: _LayerAffine, context: RuleContext) -> str:
    eir.replace_value(match.op.outputs[0], match.layer.outputs[0])
    eir.remove_nodes(context.graph, [match.op])
    return f"folded into {eir.node_label(match.layer)}"


class ScaleIntoLayerRule(Rule):
    """Layer -> Mul(constant) or Div(constant): scale the weight and bias per channel."""

    name = "scale-into-layer"
    anchor_ops = frozenset({"Mul", "Div"})
    verb = "folded"

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        return _find_layer_and_constant(node, commutative=node.op_type == "Mul")

    def check(self, match: _LayerAffine, context: RuleContext) -> str | None:
        reason = _check(match)
        if reason is None and match.op.op_type == "Div" and not np.all(match.vector):
            return "divides by zero in some channel"
        return reason

    def rewrite(self, match: _LayerAffine, context: RuleContext) -> str:
        scale = 1.0 / match.vector if match.op.op_type == "Div" else match.vector
        parts = match.parts
        store_parts(context.graph, parts.node, parts.scaled(scale), parts.bias_or_zero() * scale)
        return _finish(match, context)


class ShiftIntoLayerRule(Rule):
    """Layer -> Add(constant) or Sub(constant): add the shift to the bias."""

    name = "shift-into-layer"
    anchor_ops = frozenset({"Add", "Sub"})
    verb = "folded"

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        return _find_layer_and_constant(node, commutative=node.op_type == "Add")

    def check(self, match: _LayerAffine, context: RuleContext) -> str | None:
        return _check(match)

    def rewrite(self, match: _LayerAffine, context: RuleContext) -> str:
        shift = -match.vector if match.op.op_type == "Sub" else match.vector
        parts = match.parts
        store_parts(context.graph, parts.node, None, parts.bias_or_zero() + shift)
        return _finish(match, context)


@dataclasses.dataclass
class _ClampedScale(Match):
    layer: ir.Node
    clamp: ir.Node
    op: ir.Node
    constant: ir.Value
    parts: LinearParts | None = None
    scale: np.ndarray | None = None  # per output channel, already inverted for a Div


def _clamp_refusal(clamp: ir.Node, scale: np.ndarray) -> str | None:
    if not (scale > 0).all():
        return "the scale is not positive everywhere (it would turn the clamp over)"
    if is_op(clamp, "Clip") and clip_bounds(clamp) is None:
        return "the Clip's bounds are not constants"
    if is_op(clamp, "Clip") and not np.all(scale == scale[0]):
        return "a per-channel scale cannot scale a Clip's scalar bounds"
    return None


def _scale_clip_bounds(graph: ir.Graph, clip: ir.Node, factor: float) -> None:
    """Multiply a Clip's bounds by ``factor`` (attributes before opset 11, inputs after)."""
    if "min" in clip.attributes or "max" in clip.attributes:
        for key in ("min", "max"):
            if key in clip.attributes:
                clip.attributes[key] = ir.AttrFloat32(key, clip.attributes.get_float(key) * factor)
        return
    for index in (1, 2):
        bound = clip.inputs[index] if len(clip.inputs) > index else None
        if bound is not None:
            array = eir.constant_array(bound)
            eir.replace_constant_input(graph, clip, index, (array.astype(np.float64) * factor).astype(array.dtype),
                                       f"{eir.node_label(clip)}_bound")


class ScaleThroughClampRule(Rule):
    """Layer -> Relu/Clip -> Mul/Div(positive constant): scale the layer and the clamp's bounds."""

    name = "scale-through-clamp"
    anchor_ops = frozenset({"Mul", "Div"})
    verb = "folded"

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        found = producer_and_constant(node, ("Relu", "Clip"), commutative=node.op_type == "Mul")
        layer = found[0].inputs[0].producer() if found is not None and found[0].inputs[0] is not None else None
        if layer is None or not is_op(layer, *_LAYER_OPS):
            return None
        clamp, constant = found
        return _ClampedScale(nodes=(layer, clamp, node), layer=layer, clamp=clamp, op=node, constant=constant)

    def check(self, match: _ClampedScale, context: RuleContext) -> str | None:
        reason = fold_refusal(match.clamp, match.op)
        affine = _LayerAffine(nodes=match.nodes, layer=match.layer, op=match.clamp, constant=match.constant)
        reason = reason or _check(affine)
        if reason is not None:
            return reason
        if match.op.op_type == "Div" and not np.all(affine.vector):
            return "divides by zero in some channel"
        match.parts = affine.parts
        match.scale = 1.0 / affine.vector if match.op.op_type == "Div" else affine.vector
        return _clamp_refusal(match.clamp, match.scale)

    def rewrite(self, match: _ClampedScale, context: RuleContext) -> str:
        parts, scale = match.parts, match.scale
        store_parts(context.graph, parts.node, parts.scaled(scale), parts.bias_or_zero() * scale)
        if is_op(match.clamp, "Clip"):
            _scale_clip_bounds(context.graph, match.clamp, float(scale[0]))
        eir.replace_value(match.op.outputs[0], match.clamp.outputs[0])
        eir.remove_nodes(context.graph, [match.op])
        return f"folded into {eir.node_label(match.layer)} and its {match.clamp.op_type}"


@dataclasses.dataclass
class _HardSigmoidMatch(Match):
    layer: ir.Node
    gate: ir.Node
    parts: LinearParts | None = None


class HardSigmoidIntoLayerRule(Rule):
    """Layer -> HardSigmoid(alpha, beta): the layer computes ``alpha * y + beta``, then ``Clip(0, 1)``."""

    name = "hardsigmoid-into-layer"
    anchor_ops = frozenset({"HardSigmoid"})
    verb = "folded"

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        layer = producer_op(node.inputs[0], *_LAYER_OPS)
        if layer is None or sole_consumer(node.inputs[0]) is not node:  # x * HardSigmoid(x) is no gate
            return None
        return _HardSigmoidMatch(nodes=(layer, node), layer=layer, gate=node)

    def check(self, match: _HardSigmoidMatch, context: RuleContext) -> str | None:
        parts = foldable_parts(match.layer, match.gate)
        if isinstance(parts, str):
            return parts
        match.parts = parts
        return None

    def rewrite(self, match: _HardSigmoidMatch, context: RuleContext) -> str:
        alpha = match.gate.attributes.get_float("alpha", 0.2)
        beta = match.gate.attributes.get_float("beta", 0.5)
        parts = match.parts
        scale = np.full(parts.channels, alpha, dtype=np.float64)
        store_parts(context.graph, parts.node, parts.scaled(scale), parts.bias_or_zero() * alpha + beta)
        clip = clip_node(context, match.layer.outputs[0], (0.0, 1.0), dtype=parts.weight.dtype,
                         label=eir.node_label(match.gate))
        eir.replace_nodes(context.graph, [match.gate], match.gate.outputs[0], [clip])
        return f"folded into {eir.node_label(match.layer)}, clamped to [0, 1]"


@dataclasses.dataclass
class _Reshaped(Match):
    layer: ir.Node
    reshape: ir.Node
    op: ir.Node
    constant: ir.Value | None  # a Mul/Div/Add/Sub's (a clamp has none)
    moved: np.ndarray | None = None  # that constant in the layer output's rank


_UNIT_RESHAPES = ("Squeeze", "Unsqueeze", "Reshape", "Flatten")
_CLAMPS = ("Relu", "Clip")


def _in_rank_of(array: np.ndarray, before: tuple[int, ...], after: tuple[int, ...]) -> np.ndarray | None:
    """``array``, broadcast over ``after``, written over ``before`` when ``after`` is ``before`` with axes of size 1
    added or dropped (the other axes keep their order, so the values do too); None otherwise."""
    if array.ndim > len(after):
        return None
    full = array.reshape((1,) * (len(after) - array.ndim) + array.shape)
    if any(size != 1 for size, extent in zip(full.shape, after) if extent == 1):
        return None
    sizes = iter(size for size, extent in zip(full.shape, after) if extent != 1)
    return full.reshape(tuple(1 if extent == 1 else next(sizes) for extent in before))


class AboveUnitReshapeRule(Rule):
    """Conv -> Squeeze/Unsqueeze/Reshape of axes of size 1 -> Mul/Div/Add/Sub(per-channel constant) or
    Relu/Clip: the op moves above the reshape (a constant in the conv's rank), so that the rules above fold
    it, or the quantizer folds the clamp into the conv. tf2onnx writes a Keras Conv1D so: Unsqueeze, Conv 1 x k,
    Squeeze, then its bias as an Add of a [C, 1] constant, then its activation. (A Gemm's reshape is the
    unflatten fuse-matmul-add writes after this pass: left alone, so that running the passes twice changes
    nothing.)"""

    name = "above-unit-reshape"
    anchor_ops = frozenset({"Mul", "Div", "Add", "Sub", *_CLAMPS})
    verb = "moved"

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        if node.op_type in _CLAMPS:
            reshape, constant = producer_op(node.inputs[0], *_UNIT_RESHAPES), None
        else:
            found = producer_and_constant(node, _UNIT_RESHAPES, commutative=node.op_type in ("Mul", "Add"))
            reshape, constant = found if found is not None else (None, None)
        layer = producer_op(reshape.inputs[0], "Conv", "ConvTranspose") if reshape is not None else None
        if layer is None:
            return None
        return _Reshaped(nodes=(layer, reshape, node), layer=layer, reshape=reshape, op=node, constant=constant)

    def check(self, match: _Reshaped, context: RuleContext) -> str | None:
        before, after = eir.static_shape(match.reshape.inputs[0]), eir.static_shape(match.reshape.outputs[0])
        if sole_consumer(match.layer.outputs[0]) is not match.reshape or sole_consumer(match.reshape.outputs[0]) \
                is not match.op:
            return "the layer or the reshape has another reader"
        if before is None or after is None or [n for n in before if n != 1] != [n for n in after if n != 1]:
            return "the reshape does more than add or drop axes of size 1"
        if match.constant is not None:
            array = eir.constant_array(match.constant)
            match.moved = _in_rank_of(array, before, after) if np.issubdtype(array.dtype, np.floating) else None
            if match.moved is None:
                return "the constant is no float broadcast over the reshape's output"
            parts = foldable_parts(match.layer, match.reshape)  # moved only to fold: a per-channel constant
            reason = parts if isinstance(parts, str) else vector_refusal(match.moved, parts.output_rank, parts.channels)
            if reason is not None:
                return reason
        return eir.replace_value_refusal(match.op.outputs[0], match.reshape.outputs[0])

    def rewrite(self, match: _Reshaped, context: RuleContext) -> str:
        op, reshape, output = match.op, match.reshape, match.reshape.outputs[0]
        inputs = [match.layer.outputs[0] if value is output else value for value in op.inputs]
        if match.constant is not None:
            constant = eir.add_initializer(context.graph, match.moved, f"{eir.node_label(op)}_constant")
            inputs = [value if value is match.layer.outputs[0] else constant for value in inputs]
        moved = ir.node(op.op_type, inputs, dict(op.attributes.items()), name=f"{eir.node_label(op)}_before_reshape")
        again = ir.node(reshape.op_type, [moved.outputs[0], *reshape.inputs[1:]], dict(reshape.attributes.items()),
                        name=f"{eir.node_label(reshape)}_after")
        eir.replace_nodes(context.graph, [op, reshape], op.outputs[0], [moved, again])
        return f"moved above {eir.node_label(reshape)}"


class FoldAffinePass(RulePass):
    """Fold constant per-channel or scalar Mul/Div/Add/Sub, and HardSigmoid, after a Conv, ConvTranspose or Gemm.

    Rewrites (repeatedly, so ``Conv -> Mul -> Add`` folds completely):

    * ``Mul(layer, s)`` / ``Mul(s, layer)`` / ``Div(layer, s)`` -> weight and
      bias scaled per output channel;
    * ``Add(layer, t)`` / ``Add(t, layer)`` / ``Sub(layer, t)`` -> ``t`` added
      to the bias (created when absent);
    * ``Mul(clamp(layer), s)`` / ``Div(clamp(layer), s)`` with ``s > 0``, the
      clamp a Relu or a Clip with constant bounds -> weight and bias scaled,
      the Clip's bounds too (``clip(conv + 3, 0, 6) / 6`` -> a conv clamped to
      ``[0, 1]``);
    * ``HardSigmoid(layer; alpha, beta)`` -> weight scaled by ``alpha``, bias
      ``alpha * b + beta``, then ``Clip(0, 1)``;
    * ``op(reshape(conv), c)`` for those ops, and a Relu or Clip of
      ``reshape(conv)``, the reshape adding or dropping axes of size 1 only
      (tf2onnx's Conv1D: a Squeeze, then the bias Add and the activation) ->
      ``reshape(op(layer, c'))``, ``c'`` the constant in the layer's rank,
      which the rules above then fold (a clamp, the quantizer).

    ``s`` and ``t`` are float constants shaped ``[C,1,1]``, ``[1,C,1,1]``,
    ``[1,C]`` (Gemm) or one element. Preconditions (else left, with the
    reason): the layer's output is read only by that op and is not a graph
    output; weight and bias are float constants; the constant varies only
    along the channel axis ("constant has shape [1,1,4,4], not
    per-channel"); no division by zero; through a clamp, the clamp alone reads
    the layer and the Mul/Div alone reads the clamp, the scale is positive,
    and one value for a Clip. ``Sub(t, layer)`` is not matched.
    Rewrites the model it is given.
    """

    name = "fold-affine"

    def __init__(self) -> None:
        self.rules = (ScaleIntoLayerRule(), ShiftIntoLayerRule(), ScaleThroughClampRule(), HardSigmoidIntoLayerRule(),
                      AboveUnitReshapeRule())


def fold_affine(model: ir.Model) -> ReportedPassResult:
    """Fold per-channel affine ops into layers on a copy of ``model``; the input is not modified."""
    return run_on_copy(FoldAffinePass(), model)

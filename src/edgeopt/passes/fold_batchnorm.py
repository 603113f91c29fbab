"""Fold inference BatchNormalization into the linear layer before it.

In inference BatchNormalization is a per-channel affine map,
``y = s * x + t`` with ``s = gamma / sqrt(var + eps)`` and
``t = beta - mean * s``. After ``x = W * input + b`` it folds into the layer:
``W' = s W`` (per output channel, see :mod:`edgeopt.passes._conv`) and
``b' = s b + t``. The BatchNormalization node disappears; quantization then
sees one Conv with one weight range per channel instead of two ops.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.passes._conv import LINEAR_OPS, LinearParts, foldable_parts, store_parts
from edgeopt.passes._matching import producer_op
from edgeopt.passes._report import ReportedPassResult
from edgeopt.passes._rules import Match, Rule, RuleContext, RulePass, run_on_copy

__all__ = ["FoldBatchNormPass", "batchnorm_affine", "fold_batchnorm"]

_PARAMETERS = ("scale", "bias", "mean", "var")


def batchnorm_affine(bn: ir.Node, channels: int) -> tuple[np.ndarray, np.ndarray] | str:
    """The (s, t) of an inference BatchNormalization as float64 vectors, or why there is none."""
    if bn.attributes.get_int("training_mode", 0):
        return "training_mode=1 (batch statistics, not running ones)"
    if bn.attributes.get_int("spatial", 1) == 0:
        return "spatial=0 (per-activation statistics)"
    if any(value.name for value in bn.outputs[1:]):  # before opset 14 these outputs are what makes it training mode
        return (f"exported in training mode ({len(bn.outputs)} outputs: ONNX Runtime normalizes with each batch's "
                "statistics, not the running ones): export the model in eval mode (model.eval(), "
                "training=TrainingMode.EVAL)")
    arrays = []
    for name, value in zip(_PARAMETERS, bn.inputs[1:5]):
        array = eir.constant_array(value)
        if array is None:
            return f"BatchNormalization {name} is not a constant"
        if array.size not in (1, channels):
            return f"BatchNormalization {name} has {array.size} values for {channels} channels"
        arrays.append(np.broadcast_to(array.astype(np.float64).reshape(-1), (channels,)))
    gamma, beta, mean, var = arrays
    scale = gamma / np.sqrt(var + bn.attributes.get_float("epsilon", 1e-5))
    return scale, beta - mean * scale


@dataclasses.dataclass
class _LinearBatchNorm(Match):
    linear: ir.Node
    bn: ir.Node
    parts: LinearParts | None = None
    affine: tuple[np.ndarray, np.ndarray] | None = None


def _check_linear_batchnorm(match: _LinearBatchNorm) -> str | None:
    parts = foldable_parts(match.linear, match.bn)
    if isinstance(parts, str):
        return parts
    affine = batchnorm_affine(match.bn, parts.channels)
    if isinstance(affine, str):
        return affine
    match.parts, match.affine = parts, affine
    return None


def _drop_batchnorm(match: _LinearBatchNorm, context: RuleContext, replacement: ir.Value) -> str:
    eir.replace_value(match.bn.outputs[0], replacement)
    eir.remove_nodes(context.graph, [match.bn])
    return f"folded into {eir.node_label(match.linear)}"


class BatchNormIntoLayerRule(Rule):
    """Conv/ConvTranspose/Gemm -> BatchNormalization: scale the weight, fold the shift into the bias."""

    name = "batchnorm-into-layer"
    anchor_ops = frozenset({"BatchNormalization"})
    verb = "folded"

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        linear = producer_op(node.inputs[0], "Conv", "ConvTranspose", "Gemm")
        return _LinearBatchNorm(nodes=(linear, node), linear=linear, bn=node) if linear else None

    def check(self, match: _LinearBatchNorm, context: RuleContext) -> str | None:
        return _check_linear_batchnorm(match)

    def rewrite(self, match: _LinearBatchNorm, context: RuleContext) -> str:
        scale, shift = match.affine
        parts = match.parts
        store_parts(context.graph, parts.node, parts.scaled(scale), parts.bias_or_zero() * scale + shift)
        return _drop_batchnorm(match, context, parts.node.outputs[0])


class BatchNormIntoMatMulRule(Rule):
    """MatMul(A[M,K], B[K,N]) -> BatchNormalization: scale B's columns, add the shift."""

    name = "batchnorm-into-matmul"
    anchor_ops = frozenset({"BatchNormalization"})
    verb = "folded"

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        matmul = producer_op(node.inputs[0], "MatMul")
        return _LinearBatchNorm(nodes=(matmul, node), linear=matmul, bn=node) if matmul else None

    def check(self, match: _LinearBatchNorm, context: RuleContext) -> str | None:
        left = match.linear.inputs[0]
        rank = len(left.shape) if left.shape is not None else None
        if rank is None:
            return "the rank of the MatMul input is unknown"
        if rank != 2:
            return (f"BatchNormalization normalizes axis 1 of the rank-{rank} MatMul output, "
                    "not the weight's output features")
        return _check_linear_batchnorm(match)

    def rewrite(self, match: _LinearBatchNorm, context: RuleContext) -> str:
        scale, shift = match.affine
        parts, graph = match.parts, context.graph
        dtype = parts.weight.dtype
        weight_name = f"{match.linear.inputs[1].name or 'matmul.weight'}_folded"
        match.linear.replace_input_with(1, eir.add_initializer(graph, parts.scaled(scale).astype(dtype),
                                                                 weight_name))
        shift_value = eir.add_initializer(graph, shift.astype(dtype), f"{weight_name}_bias")
        add = ir.node("Add", [match.linear.outputs[0], shift_value], name=f"{eir.node_label(match.bn)}_shift")
        graph.insert_after(match.linear, add)
        return _drop_batchnorm(match, context, add.outputs[0])


class StandaloneBatchNormRule(Rule):
    """A BatchNormalization with no linear layer before it: reported, left as is."""

    name = "batchnorm-standalone"
    anchor_ops = frozenset({"BatchNormalization"})
    verb = "folded"

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        return None if producer_op(node.inputs[0], *LINEAR_OPS) else Match(nodes=(node,))

    def check(self, match: Match, context: RuleContext) -> str | None:
        producer = match.nodes[0].inputs[0].producer()
        source = f"{producer.op_type} {eir.node_label(producer)!r}" if producer else "a graph input"
        return f"its input comes from {source}, not a Conv/ConvTranspose/Gemm/MatMul"

    def rewrite(self, match: Match, context: RuleContext) -> str:  # check always refuses
        raise NotImplementedError


class FoldBatchNormPass(RulePass):
    """Fold inference BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul before it.

    Rewrites:

    * ``Conv`` / ``ConvTranspose`` (any group, with or without bias) ->
      ``BatchNormalization`` -> one layer with scaled weight and new bias;
    * ``Gemm`` (transB 0 or 1, bias absent, scalar or per-column; beta is
      folded in) -> ``BatchNormalization`` -> one Gemm;
    * ``MatMul`` with a 2-D input and constant ``[K, N]`` weight ->
      ``BatchNormalization`` -> MatMul with scaled weight + ``Add(shift)``.

    Preconditions (else left, with the reason): the layer's output has that
    BatchNormalization as its only reader and is not a graph output; weight,
    bias and the four BatchNormalization parameters are float constants;
    ``training_mode`` is 0 and there are no statistics outputs (before opset
    14 they mark a training-mode node, which ONNX Runtime runs on batch
    statistics even when nothing reads them). A
    BatchNormalization after any other op is left and reported. Old weights
    stay as initializers for other readers until dead-code elimination.
    Rewrites the model it is given.
    """

    name = "fold-batchnorm"

    def __init__(self) -> None:
        self.rules = (BatchNormIntoLayerRule(), BatchNormIntoMatMulRule(), StandaloneBatchNormRule())


def fold_batchnorm(model: ir.Model) -> ReportedPassResult:
    """Fold BatchNormalization on a copy of ``model``; the input is not modified."""
    return run_on_copy(FoldBatchNormPass(), model)

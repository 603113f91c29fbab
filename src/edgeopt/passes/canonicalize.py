"""Rewrite ops that have an integer kernel under another name into that name.

Exporters write the same function several ways; integer kernels exist for
one of them. Each rewrite computes the same function (up to float rounding
where a constant is inverted or multiplied through):

* ``Div(x, c)`` for a constant ``c`` is ``Mul(x, 1 / c)``: ONNX Runtime has
  QLinearMul and no QLinearDiv, the microcontroller kernels a Mul and no Div.
  Attention's ``scores / sqrt(d)`` (Hugging Face's BERT) ran in float between
  the integer MatMul and Softmax, and a model holding it did not compile. A
  Div normalizing a graph input stays: float before the first quantized
  layer costs no conversion, and a quantized Mul would round the input once
  more (-0.35 dB on an ImageNet-style ``(x - mean) / std``);
* ``PRelu(x, slope)`` with one slope for every channel (``torch.nn.PReLU()``'s
  default) is ``LeakyRelu(x, alpha=slope)``, which has integer kernels
  (QLinearLeakyRelu, the C's LeakyRelu); PRelu has none;
* ``Gemm(A, B, C; alpha, beta)`` with constant ``B`` and ``C`` is
  ``Gemm(A, alpha * B, beta * C)``, and a ``C`` of shape ``[1, N]`` or one
  element broadcasts as the ``[N]`` bias a quantized Gemm takes (int32, added
  in the accumulator): alpha, beta and such a C kept the layer float;
* ``ReduceMean`` of an image over H and W (torch's ``x.mean((2, 3))``
  pooling head) is ``GlobalAveragePool`` (then ``Flatten`` where the mean drops
  the axes): ONNX Runtime runs it as QLinearGlobalAveragePool and has no
  integer ReduceMean;
* ``Pow(x, 3)`` in a spelled-out tanh-GELU below opset 20 (Hugging Face's
  ``gelu_new``) is ``Mul(Mul(x, x), x)``, as torch writes the cube: Pow has
  no integer kernel, so on the microcontroller, where the group's other ops
  run in int8, the model did not compile. Only there: a Pow squaring the
  input of a spelled-out RMSNorm, say, would round ``x * x`` to 8 bits;
* ``Einsum("...ij,jk->...ik", x, W)`` with a constant 2-D ``W`` (a dense layer as tf2onnx writes Keras'
  ``EinsumDense`` and JAX exports write theirs; ``...ij,kj->...ik`` takes ``W`` transposed) is
  ``MatMul(x, W)``: Einsum has no integer kernel, so the layer stayed float (a model of such layers
  came back as the float model).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.passes._conv import LinearParts, linear_parts
from edgeopt.passes._matching import reduce_axes, shape_text
from edgeopt.passes._report import ReportedPassResult
from edgeopt.passes._rules import Match, Rule, RuleContext, RulePass, run_on_copy
from edgeopt.passes.rules import PATTERN_KEY

__all__ = ["CanonicalizePass", "canonicalize"]

# 1 / c stays a normal number in float16 (whose smallest is 2**-14) and within its range: the fp16
# scheme stores the reciprocal in half precision
_RECIPROCAL_BOUNDS = (2.0 ** -14, 2.0 ** 14)


@dataclasses.dataclass
class _ConstantOperand(Match):
    node: ir.Node
    array: np.ndarray


class DivToMulRule(Rule):
    """Div(x, constant c) -> Mul(x, 1 / c). ``integer_only`` (the microcontroller, whose C runs no float node):
    a Div scaling a graph input too, which would otherwise be the one float node that keeps it from compiling."""

    name = "div-to-mul"
    anchor_ops = frozenset({"Div"})
    verb = "rewritten"

    def __init__(self, *, integer_only: bool = False) -> None:
        self.integer_only = integer_only

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        array = eir.constant_array(node.inputs[1]) if len(node.inputs) == 2 else None
        if array is None or eir.is_constant(node.inputs[0]) or not np.issubdtype(array.dtype, np.floating):
            return None
        return _ConstantOperand(nodes=(node,), node=node, array=array)

    def check(self, match: _ConstantOperand, context: RuleContext) -> str | None:
        if PATTERN_KEY in match.node.metadata_props:  # a spelled-out GELU's x / sqrt(2): float as one group
            return f"part of a spelled-out {match.node.metadata_props[PATTERN_KEY]}, kept float as one op"
        if not self.integer_only and _scales_an_input(match.node.inputs[0]):
            return ("it normalizes a graph input: in float it costs no conversion, as a quantized Mul it "
                    "would round the input once more")
        magnitude = np.abs(match.array.astype(np.float64))
        low, high = _RECIPROCAL_BOUNDS
        if not (np.isfinite(magnitude).all() and (magnitude >= low).all() and (magnitude <= high).all()):
            return f"the divisor is zero, not finite or outside [{low:g}, {high:g}] somewhere"
        return None

    def rewrite(self, match: _ConstantOperand, context: RuleContext) -> str:
        node = match.node
        reciprocal = (1.0 / match.array.astype(np.float64)).astype(match.array.dtype)
        constant = eir.add_initializer(context.graph, reciprocal,
                                       f"{node.inputs[1].name or eir.node_label(node)}_reciprocal")
        mul = ir.node("Mul", [node.inputs[0], constant], name=node.name)
        eir.replace_nodes(context.graph, [node], node.outputs[0], [mul])
        return "rewritten as Mul by the reciprocal"


_ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Cast")


def _scales_an_input(value: ir.Value | None) -> bool:
    """True when ``value`` is a graph input, or computed from one alone by elementwise ops with constants
    (``(x - mean) / std`` preprocessing): nothing quantized comes before it."""
    while value is not None and not value.is_graph_input():
        producer = value.producer()
        if not eir.is_op(producer, *_ELEMENTWISE):
            return False
        computed = [v for v in producer.inputs if v is not None and not eir.is_constant(v)]
        if len(computed) != 1:
            return False
        value = computed[0]
    return value is not None


class PReluToLeakyReluRule(Rule):
    """PRelu(x, one-element slope) -> LeakyRelu(x, alpha=slope)."""

    name = "prelu-to-leakyrelu"
    anchor_ops = frozenset({"PRelu"})
    verb = "rewritten"

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        array = eir.constant_array(node.inputs[1]) if len(node.inputs) == 2 else None
        if array is None or array.size != 1 or not np.issubdtype(array.dtype, np.floating):
            return None
        return _ConstantOperand(nodes=(node,), node=node, array=array)

    def check(self, match: _ConstantOperand, context: RuleContext) -> str | None:
        x = match.node.inputs[0]
        if match.array.ndim > 1 and (x.shape is None or len(x.shape) < match.array.ndim):
            return f"the slope's shape {shape_text(match.array.shape)} may raise the output's rank"
        if x.shape is not None and len(x.shape) == 0 and match.array.ndim:
            return "a scalar input: the slope's shape decides the output's"
        return None

    def rewrite(self, match: _ConstantOperand, context: RuleContext) -> str:
        node = match.node
        alpha = float(match.array.reshape(()))
        leaky = ir.node("LeakyRelu", [node.inputs[0]], {"alpha": alpha}, name=node.name)
        eir.replace_nodes(context.graph, [node], node.outputs[0], [leaky])
        return f"rewritten as LeakyRelu (alpha {alpha:g})"


@dataclasses.dataclass
class _GemmMatch(Match):
    gemm: ir.Node
    parts: LinearParts | str  # its constant weight and bias, or why they are not usable
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None


class GemmScalesRule(Rule):
    """Gemm(A, B, C; alpha, beta) -> Gemm(A, alpha * B, beta * C as [N])."""

    name = "gemm-scales"
    anchor_ops = frozenset({"Gemm"})
    verb = "rewritten"

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        alpha, beta = node.attributes.get_float("alpha", 1.0), node.attributes.get_float("beta", 1.0)
        bias = eir.constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        parts = linear_parts(node)
        vector = bias is not None and not isinstance(parts, str) and bias.shape == (parts.channels,)
        if alpha == 1.0 and (bias is None or (beta == 1.0 and vector)):
            return None  # nothing to fold (a computed C is left as it is)
        return _GemmMatch(nodes=(node,), gemm=node, parts=parts)

    def check(self, match: _GemmMatch, context: RuleContext) -> str | None:
        if match.gemm.attributes.get_int("transA", 0):
            return "A is transposed (transA)"
        parts = match.parts  # its bias is C times beta, one value or one per output
        if isinstance(parts, str):
            return parts
        alpha = match.gemm.attributes.get_float("alpha", 1.0)
        match.weight = (parts.weight.astype(np.float64) * alpha).astype(parts.weight.dtype)
        if parts.bias is not None:
            match.bias = np.broadcast_to(parts.bias.reshape(-1), (parts.channels,)).astype(parts.weight.dtype)
        return None

    def rewrite(self, match: _GemmMatch, context: RuleContext) -> str:
        gemm, graph = match.gemm, context.graph
        hint = gemm.inputs[1].name or f"{eir.node_label(gemm)}.weight"
        if gemm.attributes.get_float("alpha", 1.0) != 1.0:
            old = gemm.inputs[1]
            gemm.replace_input_with(1, eir.add_initializer(graph, match.weight, f"{hint}_scaled"))
            eir.drop_if_unused(graph, old)
        if match.bias is not None:
            old = gemm.inputs[2]
            gemm.replace_input_with(2, eir.add_initializer(graph, match.bias, f"{old.name or hint}_vector"))
            eir.drop_if_unused(graph, old)
        gemm.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
        gemm.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        return "alpha and beta folded into B and C, C a vector"


@dataclasses.dataclass
class _MeanMatch(Match):
    mean: ir.Node


# images only: the microcontroller code pools rank-4 tensors, and reduces other ranks as ReduceMean
_IMAGE_RANK = 4


class SpatialMeanRule(Rule):
    """ReduceMean of an NCHW tensor over H and W -> GlobalAveragePool (then Flatten without keepdims)."""

    name = "mean-to-global-average-pool"
    anchor_ops = frozenset({"ReduceMean"})
    verb = "rewritten"

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        x = node.inputs[0]
        if x is None or x.shape is None or len(x.shape) != _IMAGE_RANK:
            return None
        axes = reduce_axes(node)
        if axes is None or sorted(a % _IMAGE_RANK for a in axes) != [2, 3]:
            return None
        return _MeanMatch(nodes=(node,), mean=node)

    def rewrite(self, match: _MeanMatch, context: RuleContext) -> str:
        mean = match.mean
        pool = ir.node("GlobalAveragePool", [mean.inputs[0]], name=f"{eir.node_label(mean)}_GlobalAveragePool")
        nodes = [pool]
        if not mean.attributes.get_int("keepdims", 1):
            nodes.append(ir.node("Flatten", [pool.outputs[0]], {"axis": 1}, name=f"{eir.node_label(mean)}_Flatten"))
        eir.replace_nodes(context.graph, [mean], mean.outputs[0], nodes)
        return f"rewritten as {' + '.join(n.op_type for n in nodes)}"


class GeluCubeToMulRule(Rule):
    """Pow(x, 3) annotated as part of a tanh-GELU -> Mul(Mul(x, x), x), the nodes keeping the annotation."""

    name = "gelu-cube-to-mul"
    anchor_ops = frozenset({"Pow"})
    verb = "rewritten"

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        array = eir.constant_array(node.inputs[1]) if len(node.inputs) == 2 else None
        if array is None or array.size != 1 or node.metadata_props.get(PATTERN_KEY) != "gelu_tanh":
            return None
        return _ConstantOperand(nodes=(node,), node=node, array=array) if float(array.reshape(())) == 3.0 else None

    def rewrite(self, match: _ConstantOperand, context: RuleContext) -> str:
        node, x = match.node, match.node.inputs[0]
        label, annotation = eir.node_label(node), {PATTERN_KEY: "gelu_tanh"}
        square = ir.node("Mul", [x, x], name=f"{label}_square", metadata_props=dict(annotation))
        cube = ir.node("Mul", [square.outputs[0], x], name=node.name, metadata_props=dict(annotation))
        eir.replace_nodes(context.graph, [node], node.outputs[0], [square, cube])
        return "rewritten as (x * x) * x"


@dataclasses.dataclass
class _EinsumMatch(Match):
    einsum: ir.Node
    weight: np.ndarray
    transposed: bool = False


def _dense_einsum(equation: str) -> bool | str:
    """Whether ``equation`` multiplies its first operand's last axis by a [K, N] weight (False) or by a
    [N, K] one (True), keeping every other axis in place; else why not."""
    terms, arrow, output = equation.replace(" ", "").partition("->")
    operands = terms.split(",")
    if not arrow or len(operands) != 2 or len(operands[1]) != 2 or not operands[0]:
        return "not two operands and a 2-D second one with an explicit output"
    x, (first, second) = operands[0], operands[1]
    letters = x.replace("...", "")
    if len(set(letters)) != len(letters) or first == second or x[-1] not in (first, second):
        return "its second operand is not a weight read along the first's last axis"
    other = second if x[-1] == first else first
    if other in letters or output != x[:-1] + other:
        return f"{equation!r} is not x @ W with the other axes kept in order"
    return x[-1] == second


class EinsumToMatMulRule(Rule):
    """Einsum("...ij,jk->...ik", x, constant W) -> MatMul(x, W); "...ij,kj->...ik" -> MatMul(x, W.T)."""

    name = "einsum-to-matmul"
    anchor_ops = frozenset({"Einsum"})
    verb = "rewritten"

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        weight = eir.constant_array(node.inputs[1]) if len(node.inputs) == 2 else None
        if weight is None or weight.ndim != 2 or not np.issubdtype(weight.dtype, np.floating):
            return None
        return _EinsumMatch(nodes=(node,), einsum=node, weight=weight)

    def check(self, match: _EinsumMatch, context: RuleContext) -> str | None:
        transposed = _dense_einsum(match.einsum.attributes.get_string("equation", ""))
        if isinstance(transposed, str):
            return transposed
        match.transposed = transposed
        return None

    def rewrite(self, match: _EinsumMatch, context: RuleContext) -> str:
        node, graph = match.einsum, context.graph
        old = node.inputs[1]
        weight = old if not match.transposed else eir.add_initializer(
            graph, np.ascontiguousarray(match.weight.T), f"{old.name or eir.node_label(node)}_transposed")
        matmul = ir.node("MatMul", [node.inputs[0], weight], name=node.name)
        eir.replace_nodes(graph, [node], node.outputs[0], [matmul])
        eir.drop_if_unused(graph, old)
        return "rewritten as MatMul"


@dataclasses.dataclass
class _NormMatch(Match):
    node: ir.Node
    scale: np.ndarray  # gamma / sqrt(var + epsilon), shaped to broadcast over x's channel axis 1
    shift: np.ndarray  # beta - mean * scale, the same shape


# The producers fold-batchnorm folds a BatchNormalization into (when it may): one it left after them stays
_FOLDS_BATCHNORM = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class BatchNormToAffineRule(Rule):
    """BatchNormalization(x) after no Conv/Gemm (after an Add, a Concat, a pooling) -> a 1x1 depthwise Conv
    (weight s, bias b per channel) for an NCHW x, else Mul(x, s) then Add(b).

    The Conv is one int8 op, its weights exact (one value per channel: +-127 at its own scale), where Mul and
    Add round twice: a small DenseNet (BN-ReLU-Conv after each Concat) on the microcontroller: 22.7 -> 26.1 dB.
    """

    name = "batchnorm-to-affine"
    anchor_ops = frozenset({"BatchNormalization"})
    verb = "rewritten"

    def __init__(self, *, integer_only: bool = False) -> None:
        self.integer_only = integer_only

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        if eir.is_op(node.inputs[0].producer(), *_FOLDS_BATCHNORM):  # refused folding: its reason stands
            return None
        params = [eir.constant_array(v) if v is not None else None for v in node.inputs[1:5]]
        if len(node.outputs) != 1 or len(params) != 4 or any(p is None or p.ndim != 1 for p in params):
            return None
        if node.attributes.get_int("training_mode", 0) or not np.issubdtype(params[0].dtype, np.floating):
            return None
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        scale = gamma / np.sqrt(var + node.attributes.get_float("epsilon", 1e-5))
        return _NormMatch(nodes=(node,), node=node, scale=scale, shift=beta - mean * scale)

    def check(self, match: _NormMatch, context: RuleContext) -> str | None:
        x = match.node.inputs[0]
        if x.shape is None or len(x.shape) < 2:
            return "the input's rank is unknown: the per-channel constants need it"
        if not self.integer_only and _scales_an_input(x):
            return ("it normalizes a graph input: in float it costs no conversion, as a quantized Mul and Add it "
                    "would round the input twice more")
        return None

    def rewrite(self, match: _NormMatch, context: RuleContext) -> str:
        node, graph = match.node, context.graph
        x, label = node.inputs[0], eir.node_label(node)
        shape = (-1,) + (1,) * (len(x.shape) - 2)
        dtype = eir.constant_array(node.inputs[1]).dtype
        if len(x.shape) == 4:
            channels = len(match.scale)
            weight = eir.add_initializer(graph, match.scale.astype(dtype).reshape(channels, 1, 1, 1), f"{label}_scale")
            bias = eir.add_initializer(graph, match.shift.astype(dtype), f"{label}_shift")
            conv = ir.node("Conv", [x, weight, bias], {"group": channels, "kernel_shape": [1, 1]}, name=node.name)
            eir.replace_nodes(graph, [node], node.outputs[0], [conv])
            return "rewritten as a 1x1 depthwise Conv by per-channel constants"
        scale = eir.add_initializer(graph, match.scale.astype(dtype).reshape(shape), f"{label}_scale")
        shift = eir.add_initializer(graph, match.shift.astype(dtype).reshape(shape), f"{label}_shift")
        mul = ir.node("Mul", [x, scale], name=f"{label}_scale")
        add = ir.node("Add", [mul.outputs[0], shift], name=node.name)
        eir.replace_nodes(graph, [node], node.outputs[0], [mul, add])
        return "rewritten as Mul and Add by per-channel constants"


class CanonicalizePass(RulePass):
    """Rewrite Div by a constant, a one-slope PRelu, a scaled Gemm, a spatial mean and a tanh-GELU's Pow cube
    into the forms integer kernels take.

    Rewrites:

    * ``Div(x, c)``, ``c`` a float constant -> ``Mul(x, 1 / c)``;
    * ``PRelu(x, s)``, ``s`` one float constant -> ``LeakyRelu(x, alpha=s)``;
    * ``Gemm(A, B, C; alpha, beta)`` -> ``Gemm(A, alpha * B, beta * C)`` with
      ``alpha = beta = 1`` and ``C`` as ``[N]``;
    * ``ReduceMean(x, axes=[2, 3])`` of a rank-4 ``x`` -> ``GlobalAveragePool(x)``,
      then ``Flatten(axis=1)`` when ``keepdims=0``;
    * ``Pow(x, 3)`` that fuse-activations annotated as part of a tanh-GELU ->
      ``Mul(Mul(x, x), x)``, annotated the same;
    * ``Einsum("...ij,jk->...ik", x, W)``, ``W`` a 2-D float constant -> ``MatMul(x, W)`` (``W.T`` for
      ``...ij,kj->...ik``);
    * with ``integer_only`` (the microcontroller, whose C runs no float node and has no BatchNormalization), a
      BatchNormalization not after a Conv/ConvTranspose/Gemm/MatMul (after an Add, a Concat: nothing to
      fold it into) -> a 1x1 depthwise ``Conv(x, s, b)`` (NCHW), else ``Add(Mul(x, s), b)``, ``s`` and ``b``
      per channel. Not for ONNX Runtime: in float
      between int8 layers it costs a conversion, as two int8 ops two roundings (-1.5 dB on a tf2onnx-style
      segmenter's output).

    Preconditions (else left, with the reason): the divisor is finite with
    every magnitude in [2**-14, 2**14] (its reciprocal then fits float16), x
    is not a constant (constant folding's business) nor a graph input scaled
    by elementwise ops with constants (``(x - mean) / std`` preprocessing, float
    before the first quantized layer; with ``integer_only`` it is rewritten too: the C has no float node),
    and the Div is not part of a pattern fuse-activations annotated (a GELU below opset 20, kept float);
    the slope's rank does not exceed x's; the Gemm's ``B`` and ``C`` are float constants, ``C`` one
    value per output (``[N]``, ``[1, N]`` or one element), no ``transA``; the
    mean's input has a known rank of 4 and constant axes; the Einsum contracts its first operand's last
    axis alone, keeping the others in order, with no repeated index; the BatchNormalization's input has a known
    rank and is not a graph input (scaled by constants alone). ``weight_only`` (the fp16/bf16 and int4
    pipelines) rewrites the Einsum alone. Rewrites the model it is given.
    """

    name = "canonicalize"

    def __init__(self, *, integer_only: bool = False, weight_only: bool = False) -> None:
        if weight_only:  # (fp16/bf16, int4: no integer kernel to suit, but int4 holds MatMul weights only)
            self.rules = (EinsumToMatMulRule(),)
            return
        self.rules = (DivToMulRule(integer_only=integer_only), PReluToLeakyReluRule(), GemmScalesRule(),
                      SpatialMeanRule(), GeluCubeToMulRule(), EinsumToMatMulRule(),
                      *([BatchNormToAffineRule(integer_only=True)] if integer_only else []))


def canonicalize(model: ir.Model) -> ReportedPassResult:
    """Canonicalize Div, PRelu and Gemm on a copy of ``model``; the input is not modified."""
    return run_on_copy(CanonicalizePass(), model)

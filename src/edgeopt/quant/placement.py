"""Where QuantizeLinear/DequantizeLinear go: a plan computed before calibration.

The plan says which nodes run in integer (by the op table in
:mod:`edgeopt.quant.ops`), which float tensors get a Q -> DQ pair (and so
must be calibrated), which constants are quantized as weights (per output
channel), biases (int32) or constant operands (like activations), which
tensors share one scale, and which nodes stay float and why.

Rules, in order:

1. A node is a candidate when its op is in the table, it computes on float32
   tensors, it is not excluded (by node name or op type) or kept float, and
   its own preconditions hold (constant weight and bias, Gemm alpha = beta
   = 1, Resize not cubic ...). Nodes the float passes annotated as one
   spelled-out activation or LayerNorm (``edgeopt.pattern``: gelu, gelu_tanh, layer_norm, rms_norm) stay float
   together, one activation, one output range, unless the target has an integer kernel for each of
   their ops (SiLU; tanh-GELU on the MCU, its cube ``Pow(x, 3)`` written ``x * x * x`` by the float passes)
   or for the one op they spell (:data:`~edgeopt.quant.ops.ONE_OP_PATTERNS`: the erf GELU and LayerNorm on
   the MCU): then the group runs in integer as that op, with a Q/DQ pair on what enters and what leaves it.
2. Relu/Clip (0 within the clamp) after a candidate Conv/ConvTranspose/Gemm/MatMul/Add/Mul that
   has it as its only consumer is fused: the producer's output gets no Q/DQ,
   the activation's output does (its clamp becomes the quantization range).
3. Every float input (non-constant: Q -> DQ, constant: quantized
   initializer -> DQ) and the output of a candidate is quantized; one Q/DQ per
   tensor, read by every consumer.
4. Data-movement ops (MaxPool, Reshape, Transpose, Resize ...) join their
   input and output into one scale group (``groups``: the integer kernel
   copies values, ONNX Runtime drops their Q/DQ only when the scales are
   equal). Concat joins its inputs and output too (``concat_groups``), which
   the TFLite kernel requires; the builder may relax it for ONNX Runtime,
   whose QLinearConcat requantizes (see :func:`edgeopt.quant.qdq.activation_qparams`).
5. A node kept float that has an integer kernel (``--exclude``, the
   accuracy search) reads its inputs before their Q/DQ pairs
   (``kept_float``); its producers then write a float edge too. Between a
   DequantizeLinear and a QuantizeLinear, ONNX Runtime would fuse it into its
   integer kernel again. ONNX Runtime fuses a node into its integer kernel
   only when a QuantizeLinear alone reads its output (a Gemm or a
   constant-weight MatMul read in float alone runs as QGemm /
   MatMulIntegerToFloat with a float output): the other producers, and
   their fused activations, compute in float from int8 inputs and are
   listed among the float nodes (:data:`READ_IN_FLOAT`), though they stay
   in ``nodes``.
6. A node that reads or writes an attention mask stays float: a constant
   holding -inf, NaN or values at or below -10000 (-100 on ONNX Runtime: Swin's) and what is
   computed from it, up to a Softmax (:mod:`edgeopt.quant.masks` says when a large finite
   value is a mask). No 8-bit range holds them next to the scores: Softmax
   would weight the masked positions (a causal model would read future tokens).
   So does position arithmetic done in float for a Cast to an integer or a Sin/Cos
   (T5's buckets, rotary angles): rounded to 8 bits, positions would move. And positions a Range
   computes from the input's size (a detector's grid, its box centres in pixels): no range calibrated
   on one image size holds them on a larger one; and what computes a Log's input
   (:mod:`edgeopt.quant.log_inputs`: a log-mel front end).
7. On a target whose LayerNorm is float (ONNX Runtime), the Adds of a residual stream that it reads stay
   float (:mod:`edgeopt.quant.residual_stream`): a transformer's stream keeps its precision.
8. A Softmax output that gets a Q/DQ (a quantized MatMul reads the attention
   probabilities) is listed in ``probabilities``: its range is fixed to
   ``[0, 1)`` with scale ``1 / 256``, as TFLite and ONNX Runtime's quantizer
   fix it, not calibrated. A calibrated range misses the peaks of shorter
   sequences, and ONNX Runtime's fused QLinearSoftmax (before 1.32) wraps a
   probability above the range to 0 instead of clamping it.

The plan is a frozen value: calibration reads ``activations``, the builder
(:mod:`edgeopt.quant.qdq`) reads the rest; accuracy tools re-plan with
``keep_float`` to leave chosen nodes in float.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.passes import PATTERN_KEY, activation_clamp
from edgeopt.quant.clamp_fusion import clamp_fusions
from edgeopt.quant.config import is_excluded
from edgeopt.quant.log_inputs import log_input_nodes, log_input_refusal
from edgeopt.quant.masks import MASK_FLOOR, grid_refusal, index_refusal, mask_like_values, mask_refusal
from edgeopt.quant.ops import (DATA_MOVEMENT_OPS, FUSED_BETWEEN_PAIRS, OP_RULES, RECURRENT_OPS, OpRole, OpRule,
                               float_op_reason, gather_refusal, is_qdq_op, pad_refusal, prelu_refusal,
                               recurrent_refusal, resize_refusal, slow_group_refusal, weight_axis)
from edgeopt.quant.one_op_groups import group_boundary, quantized_as_one_op, refuse_partial_groups
from edgeopt.quant.registry import FloatNode
from edgeopt.quant.residual_stream import residual_adds
from edgeopt.quant.union_find import UnionFind

__all__ = ["DATA_MOVEMENT_OPS", "EXCLUDED", "MOVES_FOR_KEPT", "READ_IN_FLOAT", "BiasUse", "QdqPlan",
           "WeightUse", "plan_qdq", "readers_behind_qdq", "readers_past_data_movement"]

#: The reason a node the user's --exclude names stays float.
EXCLUDED = "excluded (--exclude)"
_KEPT_ON_REQUEST = "kept float on request"  # plan_qdq(keep_float=...)
#: How the reason starts for a node that reads int8 but computes in float: a node kept float reads its output.
READ_IN_FLOAT = "its output is read in float"
#: How the reason starts for a data-movement op kept float because only a node kept float reads it.
MOVES_FOR_KEPT = "moves data only for"


@dataclass(frozen=True, kw_only=True)
class WeightUse:
    """Input 1 of ``node`` is the constant ``tensor``, quantized per channel along ``axis``."""

    node: str
    tensor: str
    axis: int | None


@dataclass(frozen=True, kw_only=True)
class BiasUse:
    """Input 2 of ``node`` is the constant ``tensor``: int32 at scale(``input``) x scale(``weight``)."""

    node: str
    tensor: str
    input: str
    weight: str


@dataclass(frozen=True, kw_only=True)
class QdqPlan:
    """Everything the builder needs; tensors are listed in graph order."""

    nodes: tuple[str, ...]
    fused: tuple[tuple[str, str], ...]  # (activation node, producer node)
    activations: tuple[str, ...]  # computed tensors that get Q -> DQ: calibrate these
    constants: tuple[str, ...]  # constant operands quantized like activations
    weights: tuple[WeightUse, ...]
    biases: tuple[BiasUse, ...]
    groups: tuple[tuple[str, ...], ...]  # tensors that must share one scale (two or more each)
    concat_groups: tuple[tuple[str, ...], ...]  # tensors joined by Concat (share unless relaxed)
    clamped: tuple[str, ...]  # outputs of fused activations that clamp at 0 (never negative)
    float_nodes: tuple[FloatNode, ...]
    probabilities: tuple[str, ...] = ()  # Softmax outputs: fixed range [0, 1), not calibrated
    kept_float: tuple[str, ...] = ()  # excluded nodes ONNX Runtime could fuse: they read float inputs
    sums: tuple[str, ...] = ()  # float Adds written as Sum (edgeopt.quant.residual_stream)


def _is_float(value: ir.Value | None, non_float: Collection[str]) -> bool:
    if value is None or value.name in non_float:
        return False
    return value.dtype is None or value.dtype == ir.DataType.FLOAT


def _weighted_refusal(node: ir.Node) -> str | None:
    inputs = node.inputs
    weight_is_constant = len(inputs) > 1 and eir.is_constant(inputs[1])
    if node.op_type in ("Conv", "ConvTranspose") and not weight_is_constant:
        return "its weight is not a constant"
    if len(inputs) > 2 and inputs[2] is not None:
        if not eir.is_constant(inputs[2]):
            return "its bias is not a constant"
        if node.op_type == "Gemm" and len(eir.constant_array(inputs[2]).shape) != 1:
            return "its bias C is not 1-D (a [1, N] row or a scalar C is not fused as a bias)"
    if node.op_type == "Gemm":
        if node.attributes.get_float("alpha", 1.0) != 1.0 or node.attributes.get_float("beta", 1.0) != 1.0:
            return "Gemm with alpha or beta != 1"
    return None


# Spelled-out activations quantized op by op where the target has an integer kernel for each of their ops:
# SiLU = x * sigmoid(x) quantizes well as its two ops. Tanh-GELU's eight steps in int8 around ONNX Runtime's float
# Tanh measured 0.05 to 0.8 dB below one float group on transformer MLPs, and slower (2.17 against 1.98 ms for
# 256 -> 1024 -> 256 on 128 tokens); on the MCU a float group would not compile, so there it runs as int8 Mul,
# Add and Tanh. GELU's Erf chain and LayerNorm have no integer kernel for every op: one op (float, or on the
# MCU the integer op they spell, ONE_OP_PATTERNS).
_OP_BY_OP_PATTERNS = {"silu": {"Sigmoid", "Mul"}, "gelu_tanh": {"Mul", "Add", "Tanh"}}


def _quantized_op_by_op(pattern: str, rules: Mapping[str, OpRule]) -> bool:
    ops = _OP_BY_OP_PATTERNS.get(pattern)
    return ops is not None and ops <= rules.keys()


def _refusal(node: ir.Node, exclude: Collection[str], keep_float: Collection[str],
             rules: Mapping[str, OpRule], no_kernel: Mapping[str, str]) -> str | None:
    """Why ``node`` stays float, or None when it can run in integer. A node excluded or kept float is so
    whatever its op: one without a rule of its own may still be fused by ONNX Runtime between the Q/DQ
    pairs of its neighbours (an attention Softmax, as QLinearSoftmax), unless it reads float."""
    if is_excluded(node, exclude):
        return EXCLUDED
    if node.name in keep_float:
        return _KEPT_ON_REQUEST
    if node.name in no_kernel:
        return no_kernel[node.name]
    pattern = node.metadata_props.get(PATTERN_KEY)
    if pattern is not None and not _quantized_op_by_op(pattern, rules):  # each of its ops told so, kernel or not
        return None if quantized_as_one_op(node, rules) else f"part of a spelled-out {pattern} (kept as one float op)"
    if not eir.is_op(node, *rules):
        return float_op_reason(node) or _no_kernel(node.op_type)
    if rules[node.op_type].role is OpRole.WEIGHTED:
        return _weighted_refusal(node) or slow_group_refusal(node, rules[node.op_type])
    if node.op_type == "Resize":
        return resize_refusal(node, rules["Resize"])
    if node.op_type == "MaxPool" and len(node.outputs) > 1 and node.outputs[1].uses():
        return "MaxPool indices output is used"
    if node.op_type == "Pad":
        return pad_refusal(node, rules["Pad"])
    if node.op_type == "Gather":
        return gather_refusal(node, rules["Gather"])
    if node.op_type == "PRelu":
        return prelu_refusal(node)
    if node.op_type in RECURRENT_OPS:
        return recurrent_refusal(node)
    return None


def _computes_float(node: ir.Node, non_float: Collection[str]) -> bool:
    """Whether ``node`` writes a float value: its first output, or, for control flow, any (tf2onnx's RNN Loop
    writes its trip count first)."""
    outputs = node.outputs if node.op_type in ("If", "Loop", "Scan") else node.outputs[:1]
    return any(_is_float(value, non_float) for value in outputs) and node.op_type != "Constant"


class _Planner:
    def __init__(self, graph: ir.Graph, non_float: Collection[str], rules: Mapping[str, OpRule], *,
                 quantize_outputs: bool = True, float_chain: Collection[str] = (),
                 shape_derived: Collection[str] = ()) -> None:
        self.graph, self.rules, self.non_float = graph, rules, non_float
        self.quantize_outputs = quantize_outputs
        self.activations: dict[str, None] = {}
        self.constants: dict[str, None] = {}
        self.weights: list[WeightUse] = []
        self.biases: list[BiasUse] = []
        self.groups = UnionFind()
        self.concat_groups = UnionFind()
        self.float_chain = float_chain  # Concats (and movers) joining in float parts no integer kernel reads
        self.shape_derived = shape_derived  # a zeros state from the input's shape: folded later

    def add_node(self, node: ir.Node, output: ir.Value) -> None:
        if node.name in self.float_chain:  # joins its parts in float: each keeps its own scale
            self.activations.update((v.name, None) for v in node.inputs if _is_float(v, self.non_float)
                                    and not eir.is_constant(v)
                                    and (v.producer() is None or v.producer().name not in self.float_chain))
            return
        rule = self.rules[node.op_type]
        indices = rule.activation_inputs if rule.activation_inputs is not None else range(len(node.inputs))
        if rule.weight_inputs:  # a GRU/LSTM: its initial states too when read from data (a streaming model's)
            indices = (*indices, *data_state_inputs(node, self.shape_derived))
        # input 1 of a Conv/Gemm/MatMul is its weight when constant; a MatMul's computed input 1 (the V
        # of attention's probs @ V) is an activation like input 0
        weight = node.inputs[1] if rule.role is OpRole.WEIGHTED and eir.is_constant(node.inputs[1]) else None
        weights = [weight] if weight is not None else []
        weights += [node.inputs[i] for i in rule.weight_inputs
                    if i < len(node.inputs) and eir.is_constant(node.inputs[i])]
        for value in weights:
            self.weights.append(WeightUse(node=node.name, tensor=value.name,
                                          axis=weight_axis(node, eir.constant_array(value).ndim)))
        shared = []
        for index in indices:
            value = node.inputs[index] if index < len(node.inputs) else None
            if value in weights or not _is_float(value, self.non_float):
                continue
            (self.constants if eir.is_constant(value) else self.activations)[value.name] = None
            shared.append(value.name)
        outputs = [output.name]
        if rule.all_outputs:  # Split: every output read by something; a GRU/LSTM: those of Y, Y_h, Y_c read
            outputs += [v.name for v in node.outputs[1:] if _is_float(v, self.non_float) and v.uses()]
            if rule.weight_inputs and not (output.uses() or output.is_graph_output()):
                outputs = outputs[1:]
            elif rule.weight_inputs and len(node.outputs) > 1 and node.outputs[1].name in outputs \
                    and node.attributes.get_string("direction", "forward") != "bidirectional":
                # Y_h is Y's last step: one scale for both, so that the C slices it out of Y (one recurrence)
                self.groups.union([output.name, node.outputs[1].name])
        if self.quantize_outputs or not _float_output_fuses(node, output, weight):
            self.activations.update(dict.fromkeys(outputs))
        if node.op_type == "Concat":
            self.concat_groups.union([*shared, *outputs])
        elif rule.role is OpRole.SHARED:
            self.groups.union([*shared, *outputs])
        if weight is not None and len(node.inputs) > 2 and node.inputs[2] is not None:
            self.biases.append(BiasUse(node=node.name, tensor=node.inputs[2].name,
                                       input=node.inputs[0].name, weight=node.inputs[1].name))

    def ordered(self, names: dict[str, None]) -> tuple[str, ...]:
        order = {v.name: i for i, v in enumerate(self.graph.inputs)}
        for node in self.graph:
            for value in node.outputs:
                order.setdefault(value.name, len(order))
        return tuple(sorted(names, key=lambda n: (order.get(n, -1), n)))


_OWN_SCALES = "each quantized with its own scale: one scale for all would round the narrow ones coarsely"
_FLOAT_CONCAT = (f"joins (or moves) the parts of a model output in float, {_OWN_SCALES} (a detector's scores "
                 "beside its box coordinates)")
_FLOAT_READ_CONCAT = (f"joins (or moves) in float parts that only float nodes read, {_OWN_SCALES} (a class token "
                      "beside patches)")


def _float_output_chains(graph: ir.Graph, candidates: Mapping[str, ir.Node], refusals: Mapping[str, str],
                         rules: Mapping[str, OpRule]) -> dict[str, str]:
    """The Concats, and the movers around them, through which parts reach a graph output nothing else reads
    (YOLO's head: per-anchor Concats, reshaped, concatenated), or a value only float nodes read (a ViT's class
    token concatenated to its patches, read by the position Add of a float residual stream), each read by the
    chain alone, name -> reason: with ``quantize_outputs`` off they join the parts in float, each at its own
    scale (one of 640 / 255 rounded scores beside pixels to 0; the class token, 50 times narrower than the
    patches, to 10.8 dB). An integer Concat whose output is only dequantized again would buy nothing for it."""
    def movable(node: ir.Node | None) -> bool:
        return _moves(node, candidates, refusals, rules) and len(node.outputs) == 1

    def only_float_readers(value: ir.Value) -> bool:
        readers = [r for r in eir.consumers(value) if r.op_type not in ("Shape", "Size")]
        return bool(readers) and all(r.name in refusals for r in readers) and not value.is_graph_output()

    chains: dict[str, str] = {}
    ends = [(v, _FLOAT_CONCAT) for v in graph.outputs if not v.uses()]
    ends += [(node.outputs[0], _FLOAT_READ_CONCAT) for node in graph if node.op_type == "Concat" and movable(node)
             and only_float_readers(node.outputs[0])]
    for output, reason in ends:
        if not movable(output.producer()) or output.producer().name in chains:
            continue
        chain, stack = [], [output.producer()]
        while stack:
            node = stack.pop()
            chain.append(node)
            stack += [v.producer() for v in node.inputs if v is not None and movable(v.producer())
                      and all(use.node is node for use in v.uses()) and not v.is_graph_output()]
        if any(node.op_type == "Concat" for node in chain):
            chains.update((node.name, reason) for node in chain)
    return chains


def _float_output_fuses(node: ir.Node, output: ir.Value, weight: ir.Value | None) -> bool:
    """A graph output that only a Gemm or a constant-weight MatMul writes, and nothing else reads:
    ONNX Runtime fuses DQ -> Gemm/MatMul with no Q after it into an integer kernel with a float output."""
    return (node.op_type in ("Gemm", "MatMul") and output is node.outputs[0] and output.is_graph_output()
            and not output.uses() and weight is not None and eir.is_constant(weight))


def _triage(graph: ir.Graph, exclude: Collection[str], keep_float: Collection[str], non_float: Collection[str],
            rules: Mapping[str, OpRule], no_kernel: Mapping[str, str], mask_floor: float
            ) -> tuple[dict[str, ir.Node], dict[str, str], dict[str, ir.Node]]:
    """Float-computing nodes split into integer candidates, refusals (name -> reason) and the members of
    spelled-out groups computed as one integer op."""
    candidates: dict[str, ir.Node] = {}
    grouped: dict[str, ir.Node] = {}
    refusals: dict[str, str] = {}
    masked, indices = mask_like_values(graph, rules, mask_floor), eir.index_arithmetic_values(graph)
    logs = log_input_nodes(graph)
    grid = eir.run_time_grid_values(graph)
    for node in graph:
        if not _computes_float(node, non_float):
            continue
        reason = (_refusal(node, exclude, keep_float, rules, no_kernel) or mask_refusal(node, masked, mask_floor)
                  or index_refusal(node, indices) or grid_refusal(node, grid) or log_input_refusal(node, logs))
        if reason is None:
            (grouped if quantized_as_one_op(node, rules) else candidates)[node.name] = node
        else:
            refusals[node.name] = reason
    refuse_partial_groups(grouped, refusals)
    return candidates, refusals, grouped


def plan_qdq(model: ir.Model, *, exclude: Collection[str] = (), keep_float: Collection[str] = (),
             non_float: Collection[str] = (), quantize_outputs: bool = True,
             rules: Mapping[str, OpRule] = OP_RULES, no_kernel: Mapping[str, str] = MappingProxyType({}),
             mask_floor: float = MASK_FLOOR) -> QdqPlan:
    """Plan Q/DQ placement on ``model`` (not modified).

    ``exclude``: node names or op types that stay float (the user's
    ``--exclude``); ``keep_float``: node names that stay float (accuracy
    tools); ``non_float``: tensors found not to be float32 whose dtype the
    graph does not record. Node names must be unique (NameFixPass).
    ``quantize_outputs`` False: a graph output written by a Gemm or a MatMul
    with a constant weight (and read by nothing else) stays float; ONNX
    Runtime runs such a pair as QGemm / MatMulIntegerToFloat with a float output.
    ``rules``: the ops that run in integer and how (:data:`~edgeopt.quant.ops.OP_RULES`, or
    :data:`~edgeopt.quant.ops.MCU_OP_RULES` for the microcontroller kernels); ``no_kernel``: nodes whose op
    has a rule but that have no integer form here (name -> why), float between their neighbours' pairs.
    ``mask_floor``: a constant at or below it on the way to a Softmax is an attention mask (rule 6).
    """
    graph = model.graph
    names = [node.name for node in graph]
    if not all(names) or len(set(names)) != len(names):
        raise ValueError("plan_qdq needs unique node names: run onnx_ir's NameFixPass on the model first")
    candidates, refusals, grouped = _triage(graph, exclude, keep_float, non_float, rules, no_kernel, mask_floor)
    residual = residual_adds(graph, candidates, refusals)
    refusals.update((name, add.reason) for name, add in residual.items())
    fused_by_producer = clamp_fusions(candidates, refusals, rules)
    fused = {activation.name: producer for producer, activation in fused_by_producer.items()}
    shape_derived = eir.shape_derived_values(graph)
    _refuse_isolated_movers(candidates, refusals, rules, outputs_quantized=quantize_outputs, grouped=grouped,
                            shape_derived=shape_derived)
    float_chain = {} if quantize_outputs else _float_output_chains(graph, candidates, refusals, rules)
    planner = _Planner(graph, non_float, rules, quantize_outputs=quantize_outputs, float_chain=float_chain,
                       shape_derived=shape_derived)
    for node in candidates.values():
        if node.name not in fused and node.name not in refusals:
            planner.add_node(node, fused_by_producer.get(node.name, node).outputs[0])
    planner.activations.update(dict.fromkeys(group_boundary(grouped, lambda v: _is_float(v, non_float))))
    clamped = [a.outputs[0].name for a in fused_by_producer.values() if activation_clamp(a)[0] == 0.0]
    softmax_outputs = {node.outputs[0].name for node in graph if eir.is_op(node, "Softmax")}
    activations = planner.ordered(planner.activations)
    unquantized = {name for name, add in residual.items() if add.reads_unquantized}
    kept = _kept_float_closure(graph, refusals, rules, unquantized)
    read_in_float = _read_in_float(candidates, refusals, fused_by_producer, kept, rules)
    read_in_float.update(float_chain)
    fused_by_ort = _fused_between_pairs(graph, refusals, set(activations), rules)
    return QdqPlan(
        nodes=tuple(name for name in candidates if name not in refusals) + tuple(grouped),
        fused=tuple(fused.items()),
        activations=activations,
        constants=planner.ordered(planner.constants),
        weights=tuple(planner.weights),
        biases=tuple(planner.biases),
        groups=planner.groups.groups(),
        concat_groups=planner.concat_groups.groups(),
        clamped=tuple(clamped),
        float_nodes=_float_nodes(graph, refusals, read_in_float, fused_by_ort),
        probabilities=tuple(name for name in activations if name in softmax_outputs),
        kept_float=tuple(node.name for node in graph if node.name in kept),
        sums=tuple(name for name, add in residual.items() if add.as_sum),
    )


def _float_nodes(graph: ir.Graph, refusals: Mapping[str, str], read_in_float: Mapping[str, str],
                 fused_by_ort: Collection[str]) -> tuple[FloatNode, ...]:
    """The nodes that compute in float, in graph order, with why: refused (but for the Softmaxes ONNX
    Runtime fuses), or reading int8 for a node kept float."""
    return tuple(FloatNode(n.name, n.op_type, refusals.get(n.name) or read_in_float[n.name]) for n in graph
                 if (n.name in refusals and n.name not in fused_by_ort) or n.name in read_in_float)


def _fused_between_pairs(graph: ir.Graph, refusals: Mapping[str, str], activations: Collection[str],
                         rules: Mapping[str, OpRule]) -> set[str]:
    """The nodes of :data:`~edgeopt.quant.ops.FUSED_BETWEEN_PAIRS` ops without a rule of their own (the ORT
    target's Softmax) whose input and output both get a Q/DQ pair, for the quantized MatMuls of an attention:
    ONNX Runtime runs each as an integer kernel, so they are not listed float. One excluded or kept float
    reads its input before the pair instead."""
    return {node.name for node in graph
            if node.op_type in FUSED_BETWEEN_PAIRS and node.op_type not in rules
            and refusals.get(node.name) == _no_kernel(node.op_type)
            and node.inputs[0] is not None and node.inputs[0].name in activations
            and node.outputs[0].name in activations}


def _no_kernel(op_type: str) -> str:
    return f"no integer kernel for {op_type}"


def _read_in_float(candidates: Mapping[str, ir.Node], refusals: Mapping[str, str],
                   fused_by_producer: Mapping[str, ir.Node], kept: Collection[str],
                   rules: Mapping[str, OpRule]) -> dict[str, str]:
    """The integer candidates (and their fused activations) whose output a node kept float reads: ONNX
    Runtime computes them in float from their int8 inputs (rule 5), name -> reason."""
    fused = {activation.name for activation in fused_by_producer.values()}
    found: dict[str, str] = {}
    for node in candidates.values():
        if node.name in refusals or node.name in fused or rules[node.op_type].role is OpRole.SHARED:
            continue
        activation = fused_by_producer.get(node.name)
        output = (activation or node).outputs[0]
        readers = list({use.node.name: use.node for use in output.uses()}.values())
        floats = [reader for reader in readers if reader.name in kept]
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        if not floats or (len(floats) == len(readers) and activation is None and not output.is_graph_output()
                          and node.op_type in ("Gemm", "MatMul") and eir.is_constant(weight)):
            continue  # QGemm / MatMulIntegerToFloat: an integer kernel with a float output
        computed = node.op_type + (f" + {activation.op_type}" if activation is not None else "")
        more = f" and {len(floats) - 1} more" if len(floats) > 1 else ""
        reason = (f"{READ_IN_FLOAT} by {eir.node_label(floats[0])!r}{more}, kept float: ONNX Runtime computes this "
                  f"{computed} in float from its int8 inputs (its integer kernel needs a QuantizeLinear alone to "
                  "read the output)")
        found.update((member.name, reason) for member in (node, activation) if member is not None)
    return found


def _moves(node: ir.Node | None, candidates: Mapping[str, ir.Node], refusals: Mapping[str, str],
           rules: Mapping[str, OpRule]) -> bool:
    """``node`` is an integer candidate, not refused, that moves data (Reshape, Transpose, Concat ...)."""
    return (node is not None and node.name in candidates and node.name not in refusals
            and rules[node.op_type].role is OpRole.SHARED)


#: An RNN's or GRU's initial_h, an LSTM's initial_h and initial_c.
RECURRENT_STATE_INPUTS = (5, 6)


def data_state_inputs(node: ir.Node, shape_derived: Collection[str]) -> tuple[int, ...]:
    """The initial-state inputs of a GRU/LSTM that come from data (a streaming model's state inputs): quantized
    like its X. A constant state, or one computed from the input's shape alone, stays float and is folded."""
    return tuple(index for index in RECURRENT_STATE_INPUTS if index < len(node.inputs)
                 and node.inputs[index] is not None and node.inputs[index].name
                 and not eir.is_constant(node.inputs[index]) and node.inputs[index].name not in shape_derived)


def _read_as_activation(use, rules: Mapping[str, OpRule], shape_derived: Collection[str]) -> bool:
    """Whether ``use`` is an input its node may read as int8: not a GRU's or LSTM's initial state (inputs 5
    and 6) unless it comes from data."""
    rule = rules.get(use.node.op_type)
    if rule is None or not rule.weight_inputs or rule.activation_inputs is None or use.idx in rule.activation_inputs:
        return True
    return use.idx in data_state_inputs(use.node, shape_derived)


def _refuse_isolated_movers(candidates: Mapping[str, ir.Node], refusals: dict[str, str],
                            rules: Mapping[str, OpRule], *, outputs_quantized: bool,
                            grouped: Collection[str] = (), shape_derived: Collection[str] = ()) -> None:
    """Refuse the data-movement ops (Reshape, Transpose, Concat, MaxPool ...) that no integer kernel
    reads or writes, through other such ops: between float nodes their Q/DQ pairs would only round
    values (an excluded Gemm -> Reshape -> Relu). With ``outputs_quantized`` (the MCU target, whose
    kernels need every tensor int8) a graph output counts as such a reader; so does a spelled-out group
    computed as one integer op (``grouped``)."""
    moves = functools.partial(_moves, candidates=candidates, refusals=refusals, rules=rules)  # refusals as they grow

    def computes(node: ir.Node | None) -> bool:  # a fused activation too: it computes with its producer
        return node is not None and (node.name in grouped or (node.name in candidates and node.name not in refusals
                                                             and not moves(node)))

    seen: set[str] = set()
    for start in [node for node in candidates.values() if moves(node)]:
        if start.name in seen:
            continue
        seen.add(start.name)
        group, stack, anchored = [start], [start], False  # the movers connected to start, each visited once
        while stack:
            node = stack.pop()
            neighbours = [v.producer() for v in node.inputs if v is not None]
            neighbours += [use.node for v in node.outputs for use in v.uses()
                           if _read_as_activation(use, rules, shape_derived)]
            anchored = anchored or any(computes(n) for n in neighbours) or (
                outputs_quantized and any(v.is_graph_output() for v in node.outputs))
            for n in neighbours:
                if moves(n) and n.name not in seen:
                    seen.add(n.name)
                    group.append(n)
                    stack.append(n)
        if not anchored:
            refusals.update((node.name, "moves data between float nodes only: no integer kernel reads or writes it")
                            for node in group)


def readers_behind_qdq(quantize_node: ir.Node) -> list[ir.Node]:
    """The nodes reading the DequantizeLinear outputs that follow ``quantize_node``."""
    return [use.node for dequantize_use in quantize_node.outputs[0].uses()
            if is_qdq_op(dequantize_use.node, "DequantizeLinear")
            for use in dequantize_use.node.outputs[0].uses()]


def readers_past_data_movement(readers: Iterable[ir.Node]) -> list[ir.Node]:
    """The nodes computing with what ``readers`` read: a data-movement reader (:data:`DATA_MOVEMENT_OPS`,
    which ONNX Runtime moves a DequantizeLinear past) is looked through to its own readers, directly or
    behind a QuantizeLinear -> DequantizeLinear pair. Keeping those float keeps the value float for
    them (:func:`_kept_float_closure` keeps the movers between float too)."""
    found, stack, seen = [], list(readers), set()
    while stack:
        reader = stack.pop()
        if id(reader) in seen:
            continue
        seen.add(id(reader))
        if not eir.is_op(reader, *DATA_MOVEMENT_OPS):
            found.append(reader)
            continue
        for output in reader.outputs:
            for use in output.uses():
                stack.extend(readers_behind_qdq(use.node) if is_qdq_op(use.node, "QuantizeLinear") else [use.node])
    return found


def _kept_float_closure(graph: ir.Graph, refusals: dict[str, str], rules: Mapping[str, OpRule],
                        also: Collection[str] = ()) -> set[str]:
    """The nodes kept float (:func:`_kept_float`, and ``also``), plus the data-movement ops (Transpose, Reshape,
    Slice ...) read only by them, transitively: ONNX Runtime moves a DequantizeLinear past such an
    op, which would put the kept node between a DQ and a Q again. Those not already float join
    ``refusals`` with the reason."""
    kept = {node.name for node in graph if node.name in also or _kept_float(node, refusals.get(node.name), rules)}
    stack = [node for node in graph if node.name in kept]
    while stack:
        reader = stack.pop()
        for value in reader.inputs:
            mover = value.producer() if value is not None else None
            if (mover is None or mover.name in kept or not eir.is_op(mover, *DATA_MOVEMENT_OPS)
                    or value.is_graph_output() or any(use.name not in kept for use in eir.consumers(value))):
                continue
            kept.add(mover.name)
            refusals.setdefault(mover.name, f"{MOVES_FOR_KEPT} {eir.node_label(reader)!r}, which is kept float")
            stack.append(mover)
    return kept


def _kept_float(node: ir.Node, refusal: str | None, rules: Mapping[str, OpRule]) -> bool:
    """An op with an integer kernel that the user (or an accuracy tool) keeps float, or a grouped Conv slower
    in int8 (its refusal says so). It reads its inputs before their Q/DQ pairs: between a DequantizeLinear and
    a QuantizeLinear ONNX Runtime would fuse it into that kernel again (QLinearAdd, QLinearConv with weights it
    quantizes itself), and the node would not be float at all. Relu/Clip are not fused by
    themselves, so they read DQ."""
    rule = rules.get(node.op_type)
    kept = refusal in (EXCLUDED, _KEPT_ON_REQUEST) or (rule and refusal and refusal == slow_group_refusal(node, rule))
    return kept and (rule is None or rule.role is not OpRole.ACTIVATION)

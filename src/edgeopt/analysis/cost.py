"""Per-node compute cost and parameter count of a model.

MACs (multiply-accumulates) follow the papers / model-zoo convention; ``out``
is the number of elements of the node's first output, ``in`` of its first input:

* Conv (any spatial rank, weight ``[C_out, C_in/g, k...]``):
  ``N * C_out * prod(out_spatial) * (C_in/g) * prod(k)`` = ``out * prod(weight[1:])``.
  Depthwise is ``g == C_in``. QLinearConv and ConvInteger use the same formula.
* ConvTranspose (weight ``[C_in, C_out/g, k...]``): every input pixel scatters
  a kernel, ``N * C_in * prod(in_spatial) * (C_out/g) * prod(k)`` = ``in * prod(weight[1:])``.
* Gemm: ``M * N * K`` with ``K = A.shape[0] if transA else A.shape[1]``; the same for QGemm. ONNX Runtime's
  other QOperator ops (QLinearAdd, QLinearGlobalAveragePool ...) cost what their float op does.
* MatMul (numpy broadcasting, 1-D operands promoted and squeezed):
  ``prod(batch) * M * N * K`` = ``out * A.shape[-1]``. Same for QLinearMatMul,
  MatMulInteger, and MatMulNBits (``K`` from its attribute).
* com.microsoft Attention (input ``[B, S, D]``, packed QKV weight ``[D, Q + K + V]``, ``num_heads``):
  the projection ``B * S * D * (Q + K + V)`` plus scores and context over the ``L`` keys (``S``, plus
  the past's ``P`` when it reads a past ``[2, B, heads, P, h]``), ``B * S * L * (Q + V)``, and so its
  QAttention (int8 weight and input); MultiHeadAttention and ONNX's Attention (query ``[B, S, Q]``, key
  ``[B, L, K]``, output ``[B, S, V]``, or 4-D per head): ``B * S * L * (Q + V)``. Their packed and
  cached layouts (past keys) have no rule: those nodes are listed as unknown.
* RNN/GRU/LSTM (X ``[T, N, I]``, or ``[N, T, I]`` with ``layout=1``; W ``[D, G*H, I]``,
  R ``[D, G*H, H]`` with G = 1/3/4 gates): every one of the ``T * N`` steps multiplies the input
  by W and the previous hidden state by R in each of the D directions, ``T * N * (|W| + |R|)``;
  ONNX Runtime's DynamicQuantizeLSTM too (int8 W ``[D, I, 4H]`` and R ``[D, H, 4H]``, stored transposed).

``other_flops`` counts the remaining arithmetic:

* bias adds of Conv/ConvTranspose/Gemm/MatMulNBits: ``out``;
* elementwise ops (Add, Mul, Relu, Clip, Sigmoid, Erf, HardSwish, Exp, Pow,
  comparisons...): one per output element, ``out``;
* MaxPool/AveragePool/LpPool: ``out * prod(kernel_shape)``;
* GlobalAveragePool/GlobalMaxPool, Reduce*, ArgMax/ArgMin: ``in``;
* Softmax/LogSoftmax: ``3 * in`` (exp, sum, divide);
* BatchNormalization: ``2 * out`` (scale and shift once folded);
* LayerNormalization/InstanceNormalization/GroupNormalization: ``7 * in``
  (mean, centre, square, variance, normalize, scale, shift); com.microsoft's
  SkipLayerNormalization ``9 * in`` (the skip and bias adds first), EmbedLayerNormalization
  ``9 * out`` (the word, position and segment rows summed first);
* Attention/MultiHeadAttention: the bias adds (``B * S * (Q + K + V)``) and a softmax over each
  head's scores, ``3 * B * heads * S * L``;
* RNN/GRU/LSTM, per step and direction: ``G * H`` sums of the two products and ``G * H`` gate
  activations, ``2 * G * H`` bias adds when B is given, and the state update: GRU ``4 * H``
  (``(1 - z) n + z h`` and ``r`` times the recurrent term), LSTM ``5 * H`` (``f c + i g``,
  ``tanh(c)``, times ``o``), RNN none;
* Resize: nearest ``0``, linear ``4 * out``, cubic ``16 * out`` (2-D taps);
* data movement and format conversion (Reshape, Transpose, Concat, Gather,
  Slice, Pad, Cast, QuantizeLinear/DequantizeLinear...): ``0``.

Ops with no rule cost 0 and are listed in ``CostReport.uncounted_ops``; nodes
whose needed shapes are unknown cost 0 and are listed in ``unknown_nodes``.
Nodes inside If/Loop/Scan bodies are not counted (``subgraph_nodes`` says how
many were skipped): how often a body runs is known at run time only. Their weights are: see below.

Parameters: a constant input (initializer or Constant output) with more than
one element is a *weight* when its dtype is floating point, an integer of at
most 8 bits (quantized weights), or int32 fed to DequantizeLinear or as the
QLinearConv or QGemm bias (quantized bias). MatMulNBits' packed B counts its ``K * N``
weights and GatherBlockQuantized's table its values, not their bytes. Scales and zero points of quantization ops
and int64 shape/index tensors are not weights. Each weight is counted once,
on the first node (in execution order) that consumes it; a weight read inside an If branch or a Loop/Scan
body (its own, or one of the outer graph) counts on the If/Loop/Scan node. ``params`` counts its
elements, ``weight_bytes`` its stored bytes; ``param_bytes_fp32/fp16/int8``
are ``params * 4/2/1``. Every total of :class:`CostReport` is the sum of its rows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial

import onnx_ir as ir

from edgeopt.analysis._graph import execution_steps, is_constant_node
from edgeopt.ir import constant_array, numpy_dtype, static_shape, subgraphs, value_bytes

__all__ = ["CostReport", "NodeCost", "analyze_cost", "sample_shape"]

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class NodeCost:
    """The cost of one node; ``output_shapes`` entries are None when unknown."""

    name: str
    op_type: str
    output_shapes: tuple[Shape | None, ...]
    output_dtype: str
    params: int
    weight_bytes: int
    macs: int
    other_flops: int
    activation_bytes: int


@dataclass(frozen=True, kw_only=True)
class CostReport:
    """Per-node rows (in execution order) and their totals."""

    nodes: tuple[NodeCost, ...]
    macs: int
    other_flops: int
    params: int
    weight_bytes: int
    activation_bytes: int
    param_bytes_fp32: int
    param_bytes_fp16: int
    param_bytes_int8: int
    unknown_nodes: tuple[str, ...]
    uncounted_ops: tuple[str, ...]
    subgraph_nodes: int

    @property
    def flops(self) -> int:
        """Total floating point operations: two per MAC plus the others."""
        return 2 * self.macs + self.other_flops


class _UnknownShape(Exception):
    """A shape a cost rule needs is not statically known."""


# ---------------------------------------------------------------- shapes


# Set by analyze_cost(free_batch_as_one=True): shapes are read by sample_shape instead of static_shape.
_FREE_BATCH_AS_ONE: ContextVar[bool] = ContextVar("free_batch_as_one", default=False)


def sample_shape(value: ir.Value | None) -> Shape | None:
    """The static shape of ``value``, a leading dim that is not a number (a free batch) taken as 1; None
    when another dim is unknown."""
    shape = static_shape(value)
    if shape is not None or value is None or value.shape is None:
        return shape
    dims = list(value.shape.dims)
    if dims and not isinstance(dims[0], int) and all(isinstance(dim, int) for dim in dims[1:]):
        return (1, *dims[1:])
    return None


def _static_shape(value: ir.Value | None) -> Shape | None:
    return sample_shape(value) if _FREE_BATCH_AS_ONE.get() else static_shape(value)


def _shape(value: ir.Value | None) -> Shape:
    shape = _static_shape(value)
    if shape is None:
        raise _UnknownShape
    return shape


def _elements(value: ir.Value | None) -> int:
    return math.prod(_shape(value))


def _input(node: ir.Node, position: int) -> ir.Value | None:
    return node.inputs[position] if position < len(node.inputs) else None


def _has_input(node: ir.Node, position: int) -> bool:
    return _input(node, position) is not None


def _attribute(node: ir.Node, name: str, default: object) -> object:
    attribute = node.attributes.get(name)
    return default if attribute is None else attribute.value


# ---------------------------------------------------------------- cost rules
# Each rule returns (macs, other_flops) or raises _UnknownShape.

Cost = tuple[int, int]


def _conv(node: ir.Node, weight: int = 1, bias: int | None = 2) -> Cost:
    out = _elements(node.outputs[0])
    macs = out * math.prod(_shape(_input(node, weight))[1:])
    return macs, out if bias is not None and _has_input(node, bias) else 0


def _conv_transpose(node: ir.Node) -> Cost:
    macs = _elements(node.inputs[0]) * math.prod(_shape(_input(node, 1))[1:])
    return macs, _elements(node.outputs[0]) if _has_input(node, 2) else 0


def _gemm(node: ir.Node, bias: int = 2) -> Cost:
    a_shape = _shape(node.inputs[0])
    k = a_shape[0] if _attribute(node, "transA", 0) else a_shape[1]
    out = _elements(node.outputs[0])
    return out * k, out if _has_input(node, bias) else 0


def _matmul(node: ir.Node, a: int = 0) -> Cost:
    return _elements(node.outputs[0]) * _shape(node.inputs[a])[-1], 0


def _matmul_nbits(node: ir.Node) -> Cost:
    out = _elements(node.outputs[0])
    return out * int(_attribute(node, "K", 0)), out if _has_input(node, 5) else 0


def _attention(node: ir.Node) -> Cost:
    """com.microsoft Attention (and QAttention): the packed QKV projection, then scores and context over the
    new tokens and the past ones (module doc)."""
    if node.domain in ("", "ai.onnx"):  # ONNX's Attention (opset 23) reads Q, K and V, as MultiHeadAttention
        return _multi_head_attention(node)
    batch, tokens, width = _shape(node.inputs[0])
    projected = _shape(_input(node, 1))[-1]
    sizes = tuple(_attribute(node, "qkv_hidden_sizes", ())) or (projected // 3,) * 3
    heads = int(_attribute(node, "num_heads", 1))
    past = 8 if node.op_type == "QAttention" else 4  # past [2, B, heads, past_length, head_size]: more keys
    keys = tokens + (_shape(_input(node, past))[3] if _has_input(node, past) else 0)
    attend = batch * tokens * keys * (sizes[0] + sizes[2])
    bias = batch * tokens * projected if _has_input(node, 2) else 0
    return batch * tokens * width * projected + attend, bias + 3 * batch * heads * tokens * keys


def _multi_head_attention(node: ir.Node) -> Cost:
    """Attention over separate query, key and value, 3-D ``[B, S, heads * h]`` or 4-D ``[B, heads, S, h]``
    (module doc); packed or cached layouts have no rule."""
    query, key, output = _shape(node.inputs[0]), _shape(_input(node, 1)), _shape(node.outputs[0])
    if len(query) != len(key) or len(query) not in (3, 4) or len(output) != len(query):
        raise _UnknownShape
    if len(query) == 3:
        heads = int(_attribute(node, "num_heads", _attribute(node, "q_num_heads", 1)))
        (batch, tokens, query_width), keys, value_width = query, key[1], output[-1]
    else:
        (batch, heads, tokens, query_width), keys = query, key[2]
        query_width, value_width = heads * query_width, heads * output[-1]
    return batch * tokens * keys * (query_width + value_width), 3 * batch * heads * tokens * keys


_STATE_UPDATE_FLOPS = {"RNN": 0, "GRU": 4, "LSTM": 5}  # per hidden unit, step and direction (module doc)


def _recurrent(node: ir.Node, *, transposed: bool = False) -> Cost:
    """An RNN, GRU or LSTM; ``transposed``: ONNX Runtime's DynamicQuantizeLSTM, its W and R stored
    ``[D, I, 4H]`` and ``[D, H, 4H]``."""
    x, w, r = _shape(node.inputs[0]), _shape(_input(node, 1)), _shape(_input(node, 2))
    steps, (directions, gate_units, hidden) = x[0] * x[1], (r[0], r[2], r[1]) if transposed else r
    biases = 2 * gate_units if _has_input(node, 3) else 0
    state_update = _STATE_UPDATE_FLOPS["LSTM" if transposed else node.op_type]
    other = directions * (2 * gate_units + biases + state_update * hidden)
    return steps * (math.prod(w) + math.prod(r)), steps * other


def _per_output(node: ir.Node, factor: int = 1) -> Cost:
    return 0, factor * _elements(node.outputs[0])


def _per_input(node: ir.Node, factor: int = 1) -> Cost:
    return 0, factor * _elements(node.inputs[0])


def _pool(node: ir.Node) -> Cost:
    kernel = _attribute(node, "kernel_shape", ())
    return 0, _elements(node.outputs[0]) * math.prod(kernel)


def _resize(node: ir.Node) -> Cost:
    mode = _attribute(node, "mode", "nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    taps = {"linear": 4, "cubic": 16}.get(mode, 0)
    return 0, taps * _elements(node.outputs[0]) if taps else 0


def _free(node: ir.Node) -> Cost:
    return 0, 0


_ELEMENTWISE = """
    Add Sub Mul Div Pow Mod Max Min Sum Mean Relu LeakyRelu PRelu Elu Selu Celu
    ThresholdedRelu Clip Sigmoid HardSigmoid HardSwish Tanh Erf Gelu FastGelu
    BiasGelu QuickGelu Mish Softplus Softsign Exp Log Sqrt Reciprocal Neg Abs
    Sign Floor Ceil Round Sin Cos Tan Asin Acos Atan Sinh Cosh Asinh Acosh Atanh
    Equal Less LessOrEqual Greater GreaterOrEqual And Or Xor Not Where IsNaN
    IsInf BitShift BitwiseAnd BitwiseOr BitwiseXor BitwiseNot
""".split()

_REDUCTIONS = """
    GlobalAveragePool GlobalMaxPool GlobalLpPool ReduceMean ReduceSum ReduceMax
    ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceSumSquare ReduceLogSum
    ReduceLogSumExp ArgMax ArgMin
""".split()

_DATA_MOVEMENT = """
    Reshape Transpose Concat Gather GatherElements GatherND Slice Split
    SplitToSequence Squeeze Unsqueeze Flatten Identity Pad Tile Expand Shape
    Size Cast CastLike DepthToSpace SpaceToDepth Scatter ScatterND
    ScatterElements Dropout QuantizeLinear DequantizeLinear DynamicQuantizeLinear
    ConstantOfShape Range NonZero OneHot ReverseSequence Trilu EyeLike Compress
    Optional OptionalGetElement OptionalHasElement GatherBlockQuantized
""".split()

_CONTROL_FLOW = ("If", "Loop", "Scan")

_RULES: dict[str, Callable[[ir.Node], Cost]] = {
    "Conv": _conv,
    "QLinearConv": partial(_conv, weight=3, bias=8),
    "ConvInteger": partial(_conv, weight=1, bias=None),
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "QGemm": partial(_gemm, bias=6),
    "MatMul": _matmul,
    "MatMulInteger": _matmul,
    "QLinearMatMul": _matmul,
    "MatMulNBits": _matmul_nbits,
    **{op: _recurrent for op in _STATE_UPDATE_FLOPS},
    "DynamicQuantizeLSTM": partial(_recurrent, transposed=True),
    "MaxPool": _pool,
    "AveragePool": _pool,
    "LpPool": _pool,
    "Softmax": partial(_per_input, factor=3),
    "LogSoftmax": partial(_per_input, factor=3),
    "BatchNormalization": partial(_per_output, factor=2),
    "LayerNormalization": partial(_per_input, factor=7),
    "SkipLayerNormalization": partial(_per_input, factor=9),
    "EmbedLayerNormalization": partial(_per_output, factor=9),
    "Attention": _attention,
    "QAttention": _attention,
    "MultiHeadAttention": _multi_head_attention,
    "InstanceNormalization": partial(_per_input, factor=7),
    "GroupNormalization": partial(_per_input, factor=7),
    "Resize": _resize,
    "Upsample": _resize,
    **{op: _per_output for op in _ELEMENTWISE},
    **{op: _per_input for op in _REDUCTIONS},
    **{f"QLinear{op}": _per_output for op in ("Add", "Mul", "Sigmoid", "LeakyRelu")},
    "QLinearSoftmax": partial(_per_input, factor=3), "QLinearAveragePool": _pool,
    "QLinearGlobalAveragePool": _per_input, "QLinearConcat": _free,
    **{op: _free for op in (*_DATA_MOVEMENT, *_CONTROL_FLOW)},
}


# ---------------------------------------------------------------- weights

# Input positions that hold scales and zero points, not weights.
_QUANTIZATION_PARAMETERS: dict[str, frozenset[int]] = {
    "QuantizeLinear": frozenset({1, 2}),
    "DequantizeLinear": frozenset({1, 2}),
    "QLinearConv": frozenset({1, 2, 4, 5, 6, 7}),
    "QLinearMatMul": frozenset({1, 2, 4, 5, 6, 7}),
    "QGemm": frozenset({1, 2, 4, 5, 7, 8}),
    "ConvInteger": frozenset({2, 3}),
    "MatMulInteger": frozenset({2, 3}),
    "MatMulNBits": frozenset({2, 3, 4}),
    "DynamicQuantizeLSTM": frozenset({8, 9, 10, 11}),
    "QAttention": frozenset({3, 4, 6, 7}),
    "GatherBlockQuantized": frozenset({2, 3}),
}

# (op_type, position) where an int32 constant is a quantized bias.
_INT32_WEIGHTS = frozenset({("DequantizeLinear", 0), ("QLinearConv", 8), ("QGemm", 6)})


def _constant_tensor(value: ir.Value) -> ir.TensorProtocol | None:
    if value.const_value is not None and not value.is_graph_input():
        return value.const_value
    producer = value.producer()
    if producer is None or not is_constant_node(producer):
        return None
    if "value" in producer.attributes:
        return producer.attributes["value"].as_tensor()
    array = constant_array(value)
    return ir.tensor(array) if array is not None else None


def _is_weight_dtype(dtype: ir.DataType, op_type: str, position: int) -> bool:
    if dtype.is_floating_point():
        return True
    if dtype.is_integer() and dtype.bitwidth <= 8:
        return True
    return dtype == ir.DataType.INT32 and (op_type, position) in _INT32_WEIGHTS


def _dynamic_scales(node: ir.Node) -> frozenset[int]:
    """The inputs of a dynamic int8 model's node that are weight scales: a Mul by the scale a
    DynamicQuantizeLinear computes (``x_scale * w_scale``), a Gather of an int8 table's row scales."""
    if node.op_type == "Mul":
        producers = [value.producer() if value is not None else None for value in node.inputs]
        if any(p is not None and p.op_type == "DynamicQuantizeLinear" for p in producers):
            return frozenset(i for i, p in enumerate(producers) if p is None or is_constant_node(p))
    if node.op_type == "Gather" and node.outputs[0].uses():
        rescale = next(iter(node.outputs[0].uses())).node
        cast = next((v.producer() for v in rescale.inputs if v is not None and v.producer() is not None
                     and v.producer().op_type == "Cast"), None) if rescale.op_type == "Mul" else None
        rows = cast.inputs[0].producer() if cast is not None and cast.inputs[0] is not None else None
        table = _constant_tensor(rows.inputs[0]) if rows is not None and rows.op_type == "Gather" else None
        if table is not None and table.dtype == ir.DataType.INT8:
            return frozenset({0})
    return frozenset()


def _node_weights(node: ir.Node, seen: set[int]) -> tuple[int, int]:
    """(elements, stored bytes) of the weights first consumed by ``node`` or by the nodes of its
    subgraphs (an If, a Loop or a Scan holds what its bodies read); updates ``seen``."""
    params = stored_bytes = 0
    for reader in (node, *(inner for graph in subgraphs(node) for inner in graph.all_nodes())):
        skipped = _QUANTIZATION_PARAMETERS.get(reader.op_type, frozenset()) | _dynamic_scales(reader)
        for position, value in enumerate(reader.inputs):
            if value is None or id(value) in seen:
                continue
            if position in skipped:  # scales and zero points: stored, but no parameters of the network
                quantization = _constant_tensor(value)
                if quantization is not None:
                    seen.add(id(value))
                    stored_bytes += quantization.nbytes
                continue
            tensor = _constant_tensor(value)
            if tensor is None or tensor.size <= 1 or not _is_weight_dtype(tensor.dtype, reader.op_type, position):
                continue
            seen.add(id(value))
            params += _packed_weights(reader, tensor) if (reader.op_type, position) in _PACKED else tensor.size
            stored_bytes += tensor.nbytes
    return params, stored_bytes


_PACKED = frozenset({("MatMulNBits", 1), ("GatherBlockQuantized", 0)})  # uint8 bytes holding 4- or 8-bit weights


def _packed_weights(node: ir.Node, tensor: ir.TensorProtocol) -> int:
    """The weights a packed input holds, however many bits each: MatMulNBits' B ``K * N`` (its bytes are two
    per byte at 4 bits, K padded to whole blocks), GatherBlockQuantized's uint8 table ``8 / bits`` per byte; an
    INT4/UINT4 table (as ONNX Runtime's quantizer writes it) holds one a value already."""
    if node.op_type == "MatMulNBits":
        return node.attributes.get_int("K", 0) * node.attributes.get_int("N", 0)
    if tensor.dtype != ir.DataType.UINT8:
        return tensor.size
    return tensor.size * 8 // node.attributes.get_int("bits", 4)


# ---------------------------------------------------------------- rows


def _output_dtype(node: ir.Node) -> str:
    dtype = numpy_dtype(node.outputs[0]) if node.outputs else None
    return dtype.name if dtype is not None else "unknown"


def _activation_bytes(node: ir.Node) -> int | None:
    """Bytes of the node's outputs, or None when a size is unknown."""
    sizes = [_value_bytes(value) for value in node.outputs if value.name]
    return None if None in sizes else sum(sizes)


def _value_bytes(value: ir.Value) -> int | None:
    if not _FREE_BATCH_AS_ONE.get():
        return value_bytes(value)
    shape, dtype = sample_shape(value), numpy_dtype(value)
    return None if shape is None or dtype is None else math.prod(shape) * dtype.itemsize


def _compute_cost(node: ir.Node) -> Cost | None:
    rule = _RULES.get(node.op_type)
    if rule is None:
        return 0, 0
    try:
        return rule(node)
    except (_UnknownShape, IndexError):
        return None


def _node_cost(name: str, node: ir.Node, seen: set[int]) -> tuple[NodeCost, bool]:
    """The row for ``node`` and whether some shape it needed was unknown."""
    cost = _compute_cost(node)
    activation_bytes = _activation_bytes(node)
    params, weight_bytes = _node_weights(node, seen)
    row = NodeCost(
        name=name, op_type=node.op_type, output_dtype=_output_dtype(node),
        output_shapes=tuple(_static_shape(v) for v in node.outputs if v.name),
        params=params, weight_bytes=weight_bytes,
        macs=cost[0] if cost else 0, other_flops=cost[1] if cost else 0,
        activation_bytes=activation_bytes or 0,
    )
    return row, cost is None or activation_bytes is None


def _count_subgraph_nodes(nodes: list[ir.Node]) -> int:
    count = 0
    for node in nodes:
        for graph in subgraphs(node):
            count += sum(1 for _ in graph.all_nodes())
    if count:
        logger.info("%d nodes inside If/Loop/Scan bodies are not counted in the cost", count)
    return count


def _report(rows: list[NodeCost], unknown: list[str], nodes: list[ir.Node]) -> CostReport:
    params = sum(row.params for row in rows)
    return CostReport(
        nodes=tuple(rows),
        macs=sum(row.macs for row in rows),
        other_flops=sum(row.other_flops for row in rows),
        params=params,
        weight_bytes=sum(row.weight_bytes for row in rows),
        activation_bytes=sum(row.activation_bytes for row in rows),
        param_bytes_fp32=4 * params, param_bytes_fp16=2 * params, param_bytes_int8=params,
        unknown_nodes=tuple(unknown),
        uncounted_ops=tuple(sorted({n.op_type for n in nodes if n.op_type not in _RULES})),
        subgraph_nodes=_count_subgraph_nodes(nodes),
    )


def analyze_cost(model: ir.Model, *, free_batch_as_one: bool = False) -> CostReport:
    """MACs, other FLOPs, parameters and activation bytes of every node (see module doc).

    ``free_batch_as_one``: a tensor whose leading dim is not a number (a free batch) and whose other dims
    are counts as one sample (:func:`sample_shape`), so a model exported with a dynamic batch has a cost
    per sample instead of an unknown one (a free time axis leading a recurrent input counts as one step).
    """
    seen: set[int] = set()
    rows, unknown = [], []
    steps = execution_steps(model.graph)
    token = _FREE_BATCH_AS_ONE.set(free_batch_as_one)
    try:
        for name, node in steps:
            row, is_unknown = _node_cost(name, node, seen)
            rows.append(row)
            if is_unknown:
                unknown.append(name)
    finally:
        _FREE_BATCH_AS_ONE.reset(token)
    if unknown:
        logger.info("cost of %d nodes is partly unknown (unknown shapes): %s", len(unknown), ", ".join(unknown[:5]))
    return _report(rows, unknown, [node for _, node in steps])

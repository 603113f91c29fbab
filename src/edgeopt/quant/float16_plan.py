"""Half-precision planning: which nodes compute in the low type, and which type each float32 value lives in.

A node may compute in the low type (float16, or bfloat16 for weight
storage) unless, checked in this order: the config excludes it by name or op
type; its op is outside the ONNX domain; it carries subgraphs; the
``numeric_ops`` table (:data:`FLOAT32_OPS` under fp16) names its op, with
the reason; it reads or writes a value the caller keeps float32 (beyond the
float16 range); a tensor it touches is untyped; its op has no ONNX schema at
the model's opset; or it reads float32 but its schema admits float16 at no
input. Planning weights only (bf16, compute stays float32), untyped tensors
do not matter, an op outside the ONNX domain is planned by ONNX
Runtime's schema of it when there is one, and the nodes inside subgraphs
are planned too (a weight they read may be stored low and cast back).
Nodes kept float32 that touch float32 tensors are listed with that reason;
Constant nodes are not planned (their values are constants, like
initializers).

Only positions whose schema type constraint admits float16 carry the low
type (inputs past a variadic formal share its constraint); the others keep
float32 (Resize ``scales``, LayerNorm ``Mean``/``InvStdDev``). A use of a
float32 value *wants* the low type at such an input of a low node, float32
anywhere else, and a graph output wants the I/O type. Each value's *home*,
the type it is stored in, is then: the I/O type for a graph input; for a
constant, the low type when every use wants it and float32 otherwise; for
any other value, the low type when a low node writes it at a position that
admits float16. The rewrite (:mod:`edgeopt.quant.float16`) casts wherever a
use wants another type than the value's home.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

import onnx
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.quant.config import is_excluded

__all__ = ["FLOAT32_OPS", "INDEX_ARITHMETIC_REASON", "HalfPrecisionPlan", "all_float_values", "float_values",
           "graphs_within", "index_arithmetic", "is_constant", "plan_half_precision"]

_FLOAT = ir.DataType.FLOAT
_FLOAT16 = ir.DataType.FLOAT16


_SUM_OVERFLOWS = "sums over many elements can exceed the float16 range (65504)"
_DTYPE_ATTRIBUTE = "its output type comes from a dtype attribute; it samples in float32"

#: Default-domain ops kept in float32 under fp16, and why. Ops whose schema
#: has no float16 (Range, NonMaxSuppression ...) need no entry: the schema
#: check keeps them float32 and says so.
FLOAT32_OPS: Mapping[str, str] = {
    "CumSum": "running sums lose precision and overflow in float16",
    "ReduceSum": _SUM_OVERFLOWS,
    "ReduceSumSquare": _SUM_OVERFLOWS,
    "ReduceL1": _SUM_OVERFLOWS,
    "ReduceL2": _SUM_OVERFLOWS,
    "ReduceLogSumExp": "exp overflows float16 above 11",
    "ReduceProd": "products overflow float16",
    "RoiAlign": "box coordinates need float32 precision",
    "RandomNormal": _DTYPE_ATTRIBUTE,
    "RandomUniform": _DTYPE_ATTRIBUTE,
    "RandomNormalLike": _DTYPE_ATTRIBUTE,
    "RandomUniformLike": _DTYPE_ATTRIBUTE,
    "Bernoulli": _DTYPE_ATTRIBUTE,
    "Multinomial": _DTYPE_ATTRIBUTE,
    "EyeLike": _DTYPE_ATTRIBUTE,
}


INDEX_ARITHMETIC_REASON = ("computes positions in float for a Cast to an integer or a Sin/Cos (T5's relative "
                           "position buckets, rotary angles): float16 rounding would move them")


def index_arithmetic(graph: ir.Graph) -> dict[ir.Value, str]:
    """:func:`edgeopt.ir.index_arithmetic_values`, each with :data:`INDEX_ARITHMETIC_REASON`: computed in
    float16, the truncation turns a rounding error into a whole step, so they stay float32."""
    return dict.fromkeys(eir.index_arithmetic_values(graph), INDEX_ARITHMETIC_REASON)


# ---------------------------------------------------------------------------
# which positions of a node carry "the" float type
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Positions:
    """Input and output indices whose type constraint admits float16."""

    inputs: frozenset[int]
    outputs: frozenset[int]
    variadic_from: int | None  # inputs at or past this index share the last formal input
    variadic_outputs_from: int | None  # the same for outputs (Split's outputs 1..n)

    def admits_input(self, index: int) -> bool:
        return _at(self.inputs, self.variadic_from, index)

    def admits_output(self, index: int) -> bool:
        return _at(self.outputs, self.variadic_outputs_from, index)


def _at(admitted: frozenset[int], variadic_from: int | None, index: int) -> bool:
    """Whether position ``index`` admits float16, a variadic tail counting as its formal parameter."""
    if variadic_from is not None and index > variadic_from:
        index = variadic_from
    return index in admitted


@functools.cache
def _positions(op_type: str, opset: int, domain: str = "") -> _Positions | None:
    if domain not in eir.ONNX_DOMAINS:
        return _runtime_positions(domain, op_type)
    try:
        schema = onnx.defs.get_schema(op_type, max_inclusive_version=opset, domain="")
    except onnx.defs.SchemaError:
        return None
    signature = ir.schemas.OpSignature.from_op_schema(schema)
    half = ir.TensorType(_FLOAT16)

    def admits(params) -> frozenset[int]:
        return frozenset(i for i, p in enumerate(params) if half in p.type_constraint.allowed_types)

    def variadic_from(params) -> int | None:
        return len(params) - 1 if params and params[-1].variadic else None

    inputs, outputs = signature.inputs, signature.outputs
    return _Positions(inputs=admits(inputs), outputs=admits(outputs), variadic_from=variadic_from(inputs),
                      variadic_outputs_from=variadic_from(outputs))


def _runtime_positions(domain: str, op_type: str) -> _Positions | None:
    """Positions of an op outside the ONNX domain (com.microsoft ...) from ONNX Runtime's newest schema of it."""
    from edgeopt.runtime.ort import op_types

    types = op_types(domain, op_type)
    if types is None:
        return None
    half = "tensor(float16)"

    def admits(params) -> frozenset[int]:
        return frozenset(i for i, allowed in enumerate(params) if half in allowed)

    return _Positions(inputs=admits(types.inputs), outputs=admits(types.outputs),
                      variadic_from=len(types.inputs) - 1 if types.variadic_inputs else None,
                      variadic_outputs_from=len(types.outputs) - 1 if types.variadic_outputs else None)


def float_values(values: Iterable[ir.Value | None]) -> list[ir.Value]:
    """The float32 ones of ``values`` (absent optional inputs skipped)."""
    return [v for v in values if v is not None and v.dtype == _FLOAT]


# ---------------------------------------------------------------------------
# planning: which nodes go low, which values are constants
# ---------------------------------------------------------------------------


def _is_constant_node(node: ir.Node) -> bool:
    return eir.is_op(node, "Constant")


def _keep_float32_reason(node: ir.Node, exclude: tuple[str, ...], opset: int, *, numeric_ops: Mapping[str, str],
                         float32_values: Mapping[ir.Value, str], weights_only: bool) -> str | None:
    """Why ``node`` must stay float32, or None when it may compute in half precision."""
    if is_excluded(node, exclude):
        return "excluded by config"
    if node.domain not in eir.ONNX_DOMAINS and not (weights_only and _positions(node.op_type, opset, node.domain)):
        return f"op of domain {node.domain!r}: " + ("no ONNX Runtime schema to check" if weights_only
                                                      else "fp16 computes ONNX-domain ops only")
    if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
        return "control flow: its subgraphs are kept float32"
    if any(isinstance(v.type, ir.SequenceType) for v in float_values([*node.inputs, *node.outputs])):
        # SplitToSequence computed float16 into a sequence still typed float32: ONNX Runtime refused the model
        return "it reads or writes a tensor sequence (kept float32)"
    if node.op_type in numeric_ops:
        return numeric_ops[node.op_type]
    forced = next((float32_values[v] for v in (*node.inputs, *node.outputs) if v in float32_values), None)
    if forced is not None:
        return forced
    # an omitted optional output (an LSTM's Y as '' when only Y_h is read) has a name of '' and no type
    if not weights_only and any(v is not None and v.name and v.dtype is None for v in (*node.inputs, *node.outputs)):
        return "tensor types unknown (shape inference could not type it)"
    positions = _positions(node.op_type, opset, node.domain)
    if positions is None:
        return f"no ONNX schema for {node.op_type} at opset {opset}"
    if float_values(node.inputs) and not positions.inputs:
        return "the ONNX schema has no float16 for this op"
    return None


@dataclass
class HalfPrecisionPlan:
    """Which nodes compute in the low type, and the type each float32 use wants."""

    graph: ir.Graph
    opset: int
    low: ir.DataType
    io_dtype: ir.DataType
    low_nodes: set[ir.Node] = field(default_factory=set)
    kept: list[tuple[ir.Node, str]] = field(default_factory=list)

    def wanted(self, node: ir.Node, index: int) -> ir.DataType:
        """The type input ``index`` of ``node`` reads a float32 value in."""
        if node not in self.low_nodes:  # (subgraph nodes are planned only for weights)
            return _FLOAT
        positions = _positions(node.op_type, self.opset, node.domain)
        return self.low if positions is not None and positions.admits_input(index) else _FLOAT

    def wants(self, value: ir.Value) -> set[ir.DataType]:
        wanted = {self.wanted(use.node, use.idx) for use in value.uses()}
        if value.is_graph_output():
            wanted.add(self.io_dtype)
        return wanted

    def produces_low(self, value: ir.Value) -> bool:
        node = value.producer()
        if node is None or node not in self.low_nodes:
            return False
        positions = _positions(node.op_type, self.opset, node.domain)
        return positions is not None and positions.admits_output(value.index())

    def home(self, value: ir.Value) -> ir.DataType:
        """The type ``value`` is stored in after conversion."""
        if value.is_graph_input():
            return self.io_dtype
        if is_constant(value):
            return self.low if self.wants(value) == {self.low} else _FLOAT
        return self.low if self.produces_low(value) else _FLOAT


def plan_half_precision(graph: ir.Graph, exclude: tuple[str, ...], opset: int, low: ir.DataType, *,
                        numeric_ops: Mapping[str, str], io_dtype: ir.DataType,
                        float32_values: Mapping[ir.Value, str] | None = None,
                        weights_only: bool = False, within: Collection[str] | None = None) -> HalfPrecisionPlan:
    """The nodes of ``graph`` that compute in ``low``, and those kept float32 with the reason.

    ``float32_values``: values that must stay float32 (out of the low type's range), each with the
    reason given to every node that reads or writes it. ``weights_only`` (bf16: weights stored low,
    compute float32) plans only where constants may be stored low: activation types do not matter,
    and an op outside the ONNX domain whose schema ONNX Runtime has is planned by that schema.
    ``within``: only the nodes of these names are planned; the others keep their types and are not listed.
    """
    plan = HalfPrecisionPlan(graph=graph, opset=opset, low=low, io_dtype=io_dtype)
    # Weights only, the nodes of subgraphs (If branches, Loop bodies) may read low weights through a Cast too
    for node in graph.all_nodes() if weights_only else graph:
        if _is_constant_node(node) or (within is not None and node.name not in within):
            continue
        reason = _keep_float32_reason(node, exclude, opset, numeric_ops=numeric_ops,
                                      float32_values=float32_values or {}, weights_only=weights_only)
        if reason is None:
            plan.low_nodes.add(node)
        elif float_values([*node.inputs, *node.outputs]):
            plan.kept.append((node, reason))
    return plan


def is_constant(value: ir.Value) -> bool:
    """An initializer that is not a graph input, or the output of a Constant node."""
    producer = value.producer()
    return (value.is_initializer() and not value.is_graph_input()) or (
        producer is not None and _is_constant_node(producer))


def graphs_within(graph: ir.Graph) -> list[ir.Graph]:
    """``graph`` and every subgraph nested in it."""
    return [graph, *(each for node in graph.all_nodes() for each in eir.subgraphs(node))]


def all_float_values(graph: ir.Graph) -> list[ir.Value]:
    """Every float32 value of ``graph``: inputs, initializers, node outputs (not subgraphs)."""
    values = [v for v in graph.inputs if v.dtype == _FLOAT]
    values += [v for v in graph.initializers.values() if v.dtype == _FLOAT and not v.is_graph_input()]
    for node in graph:
        values += float_values(node.outputs)
    return values

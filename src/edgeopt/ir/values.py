"""Queries on values of an ``onnx_ir`` graph: constants, shapes, dtypes, inputs, op tests.

A value is *constant* when it is an initializer that is not also a graph input,
or the output of a ``Constant`` node. Shapes are *static* when every dimension
is a known integer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

__all__ = [
    "ONNX_DOMAINS",
    "InputSpec",
    "constant_array",
    "default_opset",
    "index_arithmetic_values",
    "index_limits",
    "is_constant",
    "is_op",
    "model_inputs",
    "outer_reads",
    "numpy_dtype",
    "run_time_grid_values",
    "shape_derived_values",
    "static_shape",
    "subgraphs",
    "value_bytes",
    "values_by_name",
]

Dim = int | str | None

#: The names of the default ONNX operator domain.
ONNX_DOMAINS = ("", "ai.onnx")


def is_op(node: ir.Node | None, *op_types: str) -> bool:
    """True when ``node`` is one of ``op_types`` in the default ONNX domain."""
    return node is not None and node.domain in ONNX_DOMAINS and node.op_type in op_types


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    """Name, shape and dtype of one model input; a dim is an int, a symbol or None."""

    name: str
    shape: tuple[Dim, ...]
    dtype: np.dtype
    rank_known: bool = True

    @property
    def is_static(self) -> bool:
        return self.rank_known and all(isinstance(d, int) for d in self.shape)

    def shape_text(self) -> str:
        return "x".join(str(d) if d is not None else "?" for d in self.shape)


def _constant_node_array(node: ir.Node) -> np.ndarray | None:
    attrs = node.attributes
    if "value" in attrs:
        return np.asarray(attrs["value"].as_tensor().numpy())
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key].value, dtype=dtype)
    return None


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy array behind ``value`` if it is a constant, else None."""
    if value is None:
        return None
    if value.const_value is not None and not value.is_graph_input():
        return np.asarray(value.const_value.numpy())
    producer = value.producer()
    if is_op(producer, "Constant"):
        return _constant_node_array(producer)
    return None


def is_constant(value: ir.Value | None) -> bool:
    """True for initializers (that are not graph inputs) and Constant outputs."""
    if value is None:
        return False
    if value.const_value is not None and not value.is_graph_input():
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def is_quantized_constant(value: ir.Value | None) -> bool:
    """Whether ``value`` is a DequantizeLinear of a constant: a quantized weight or constant operand."""
    producer = value.producer() if value is not None else None
    return is_op(producer, "DequantizeLinear") and bool(producer.inputs) and is_constant(producer.inputs[0])


def reduce_axes(node: ir.Node) -> list[int] | None:
    """The constant axes of a ReduceMean (attribute before opset 18, input after); None when absent."""
    if "axes" in node.attributes:
        return list(node.attributes.get_ints("axes"))
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = constant_array(node.inputs[1])
        return [int(a) for a in axes.reshape(-1)] if axes is not None else None
    return None


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The shape of ``value`` as ints, or None when unknown or dynamic."""
    if value is None:
        return None
    if value.shape is None:
        array = constant_array(value)
        return tuple(array.shape) if array is not None else None
    dims = []
    for dim in value.shape.dims:
        if not isinstance(dim, int):
            return None
        dims.append(dim)
    return tuple(dims)


def numpy_dtype(value: ir.Value) -> np.dtype | None:
    """The numpy dtype of ``value``, or None when its type is unknown."""
    if value.dtype is None:
        array = constant_array(value)
        return array.dtype if array is not None else None
    try:
        return np.dtype(value.dtype.numpy())
    except (TypeError, ValueError, AttributeError):
        return None


def value_bytes(value: ir.Value) -> int | None:
    """Bytes the tensor occupies (static shape x itemsize), or None if unknown."""
    shape = static_shape(value)
    dtype = numpy_dtype(value)
    if shape is None or dtype is None:
        return None
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def values_by_name(model: ir.Model) -> dict[str, ir.Value]:
    """The graph's inputs and its nodes' outputs (top-level graph), by name."""
    values = {value.name: value for node in model.graph for value in node.outputs}
    values.update((value.name, value) for value in model.graph.inputs)
    return values


def model_inputs(model: ir.Model) -> list[InputSpec]:
    """The inputs a caller must feed: graph inputs that are not initializers."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        dims = tuple(value.shape.dims) if value.shape is not None else ()
        shape = tuple(d if isinstance(d, int) else (d.value if d.value else None) for d in dims)
        dtype = numpy_dtype(value) or np.dtype(np.float32)
        specs.append(InputSpec(name=value.name, shape=shape, dtype=dtype, rank_known=value.shape is not None))
    return specs


#: Ops whose output holds (some of) their first input's values, so indices flow through them unchanged.
_INDEX_CARRIERS = ("Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Expand", "Flatten", "Transpose",
                   "Slice", "Tile", "Concat")


#: com.microsoft's EmbedLayerNormalization (ONNX Runtime's fused BERT embeddings): which table each of
#: its index inputs picks rows of (input_ids -> word, segment_ids -> segment, position_ids -> position).
_EMBED_LAYER_NORM_TABLES = {0: 2, 1: 4, 8: 3}


def _table_rows(node: ir.Node, index: int) -> int | None:
    """How many entries ``node``'s input ``index`` may pick among, when it is a Gather's indices (or an
    EmbedLayerNormalization's ids)."""
    if node.op_type == "EmbedLayerNormalization" and node.domain == "com.microsoft":
        table = _EMBED_LAYER_NORM_TABLES.get(index)
        shape = static_shape(node.inputs[table]) if table is not None and table < len(node.inputs) else None
        return shape[0] if shape else None
    if node.op_type not in ("Gather", "GatherElements") or index != 1 or node.domain not in ONNX_DOMAINS:
        return None
    shape = static_shape(node.inputs[0])
    axis = node.attributes.get_int("axis", 0)
    return shape[axis] if shape is not None and -len(shape) <= axis < len(shape) else None


def index_limits(model: ir.Model) -> dict[str, int]:
    """For each integer graph input that indexes a table (token ids -> an embedding's Gather, reached
    directly or through Cast, Unsqueeze, Reshape ...), the number of rows of its smallest such table:
    the ids a random input may hold are below it."""
    limits = {}
    for value in model.graph.inputs:
        dtype = numpy_dtype(value)
        if dtype is None or not np.issubdtype(dtype, np.integer):
            continue
        rows, pending, seen = [], [value], set()
        while pending:
            current = pending.pop()
            for usage in current.uses():
                node = usage.node
                rows.append(_table_rows(node, usage.idx))
                if node.op_type in _INDEX_CARRIERS and usage.idx == 0 or node.op_type == "Concat":
                    pending.extend(v for v in node.outputs if id(v) not in seen)
                    seen.update(id(v) for v in node.outputs)
        known = [count for count in rows if count]
        if known:
            limits[value.name] = min(known)
    return limits


def _is_integer(value: ir.Value) -> bool:
    return value.dtype is not None and (value.dtype.is_integer() or value.dtype == ir.DataType.BOOL)


def _position_sink(node: ir.Node) -> bool:
    """A Cast to an integer type (it truncates) or a Sin/Cos (it reads absolute angles)."""
    if is_op(node, "Sin", "Cos"):
        return True
    return is_op(node, "Cast") and ir.DataType(node.attributes.get_int("to", 0)).is_integer()


def index_arithmetic_values(graph: ir.Graph) -> set[ir.Value]:
    """The float values computed from integer tensors (through a Cast) and constants alone that a Cast
    to an integer type or a Sin/Cos reads, directly or through others of them: position arithmetic done
    in float. T5's relative position buckets ``(log(n / 8) / log(16) * 8).long()`` (the truncation
    turns any rounding into a whole step: float16 gives 1 for 2 at n = 16), rotary embeddings'
    angles ``inv_freq @ position_ids`` before cos/sin (hundreds of radians: 8-bit steps of 1 rad,
    float16 ones of 2 rad past 2048; Hugging Face computes them in float32 whatever the model's
    type). They must be computed exactly."""
    derived: set[ir.Value] = set()
    for node in graph:
        inputs = [v for v in node.inputs if v is not None]
        if is_op(node, "DequantizeLinear"):  # an int8 model's activation (--fallback fp16), not a position
            continue
        # (constants alone too: at static shapes T5's relative positions are an initializer, and the Log of it,
        # which the float passes do not fold, computed the buckets in float16)
        if inputs and all(_is_integer(v) or is_constant(v) or v in derived for v in inputs):
            derived.update(v for v in node.outputs if v.dtype == ir.DataType.FLOAT)
    reached: set[ir.Value] = set()
    pending = [node.inputs[0] for node in graph if _position_sink(node) and node.inputs and node.inputs[0] in derived]
    while pending:
        value = pending.pop()
        if value in reached:
            continue
        reached.add(value)
        producer = value.producer()
        pending.extend(v for v in (producer.inputs if producer is not None else ()) if v in derived)
    return reached


# Ops through which a float position stays a position (its magnitude still grows with the input's size):
# casts and data movement; an offset added to it; a scale applied to it (a Div by a constant: divided by the
# image's size, CoordConv's ``arange(w) / (w - 1)``, it is a fraction); a Gather of positions (its input 0).
_GRID_CARRIERS = ("Cast", "Range", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Expand", "Tile", "Flatten",
                  "Transpose", "Concat", "Slice", "Split", "Add", "Sub", "Mul", "Neg")
_GATHERS = ("Gather", "GatherElements", "GatherND")
# Moves whose inputs after the first are a shape, axes, starts or repeats: read there, a position moves no position
_SHAPED_MOVES = ("Reshape", "Expand", "Tile", "Slice", "Split", "Squeeze", "Unsqueeze")


def _carries_grid(node: ir.Node, read: list[int]) -> bool:
    """Whether ``node``, reading positions at its inputs ``read``, writes positions: integer arithmetic
    on them does, a comparison does not (``arange(T) < lengths``: a mask of 0 and 1, whatever T)."""
    if is_op(node, *_SHAPED_MOVES) and 0 not in read:
        return False
    if node.outputs and _is_integer(node.outputs[0]):
        return node.outputs[0].dtype != ir.DataType.BOOL
    if is_op(node, "Div"):
        return read == [0] and is_constant(node.inputs[1])
    return is_op(node, *_GRID_CARRIERS) or is_op(node, *_GATHERS) and 0 in read


def run_time_grid_values(graph: ir.Graph) -> set[ir.Value]:
    """The float values that hold positions a Range computes at run time (from the input's size), and what
    offsets, scales, moves or joins them: a detector's grid of cell coordinates, its box centres in
    pixels (``(sigmoid(p) * 2 - 0.5 + grid) * stride``) and the outputs they are concatenated into. Their
    range grows with the input's height and width, so no range calibrated on images of one size holds
    them on larger ones. A Range of constants is folded before this is asked; a Gather that looks rows up
    by positions (a position embedding) reads them as indices and holds the table's values; a length mask
    (``x * (arange(T) < lengths)``) compares them and holds 0 and 1."""
    positions: set[ir.Value] = set()
    for node in graph:
        read = [index for index, value in enumerate(node.inputs) if value is not None and value in positions]
        if is_op(node, "Range") or (read and _carries_grid(node, read)):
            positions.update(node.outputs)
    return {value for value in positions if value.dtype == ir.DataType.FLOAT}


def shape_derived_values(graph: ir.Graph) -> set[str]:
    """Names of the values that follow from constants and tensor shapes alone, not from any input's values:
    PyTorch's zeros initial state of a GRU/LSTM (Shape -> Gather -> Concat -> ConstantOfShape). Once the
    input shapes are fixed, constant folding turns them into constants."""
    known: set[str] = set()
    for node in graph:
        inputs = [value for value in (*node.inputs, *outer_reads(node)) if value is not None and value.name]
        if is_op(node, "Shape", "Size") or all(value.name in known or is_constant(value) for value in inputs):
            known.update(value.name for value in node.outputs)
    return known


def outer_reads(node: ir.Node) -> list[ir.Value]:
    """The values the subgraphs of ``node`` (If branches, Loop and Scan bodies, nested ones included) read from
    the graphs around it without listing them as inputs (tf2onnx's RNN loops read the model input so)."""
    reads: list[ir.Value] = []
    for graph in subgraphs(node):
        inner = list(graph.all_nodes())
        defined = {id(value) for value in (*graph.inputs, *graph.initializers.values())}
        defined.update(id(value) for each in inner for value in each.outputs)
        for each in inner:
            defined.update(id(value) for nested in subgraphs(each)
                           for value in (*nested.inputs, *nested.initializers.values()))
        reads += [value for each in inner for value in each.inputs
                  if value is not None and id(value) not in defined]
    return reads


def default_opset(model: ir.Model) -> int:
    """The version of the default ONNX domain the model imports."""
    opsets = model.opset_imports
    return int(opsets.get("", opsets.get("ai.onnx", 0)))


def subgraphs(node: ir.Node) -> list[ir.Graph]:
    """The graphs ``node``'s attributes hold (If branches, Loop and Scan bodies)."""
    graphs = []
    for attribute in node.attributes.values():
        if attribute.type == ir.AttributeType.GRAPH:
            graphs.append(attribute.as_graph())
        elif attribute.type == ir.AttributeType.GRAPHS:
            graphs.extend(attribute.as_graphs())
    return graphs


def infer_shapes(model: ir.Model) -> None:
    """ONNX shape inference over ``model`` in place, best effort as at loading: types and shapes, with data
    propagation through shape arithmetic, and no error for what it cannot infer."""
    from onnx_ir.passes.common import ShapeInferencePass

    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)

"""Half-precision conversion: float16 weights and compute, or bfloat16 weight storage.

**fp16** (:class:`Fp16Config`). Every float32 tensor a node reads or writes
becomes float16 where the op's ONNX schema allows float16 at that input or
output; positions the schema fixes to float32 (Resize ``scales``, LayerNorm
``Mean``/``InvStdDev``) keep float32. Constants are rounded to nearest
even, values below the smallest subnormal (2**-24) flush to 0 and are
counted. A node stays float32 when the user excludes it, when it is
outside the ONNX domain or carries subgraphs, when :data:`FLOAT32_OPS`
names it for a numeric reason, or when it reads a weight beyond ±65504 or
(given data) reads or writes an activation beyond half of that
(:mod:`edgeopt.quant.float16_ranges`, which also types what ONNX shape
inference could not); Cast nodes join the float32 and float16 parts
(one Cast per value and target type). With ``keep_io_float32`` the model
still takes and returns float32. Attributes that carry a float type follow
their node: ``Cast.to``, ``ConstantOfShape.value``, ``Constant.value``.
ONNX Runtime's CPU provider has float16 kernels for some ops (Conv, MatMul,
LayerNorm ...) and runs the others in float32 through casts it inserts when
the session is built, so an fp16 model runs everywhere, though on x86 CPU it
is mainly a size win.

**bf16** (:class:`Bf16Config`). ONNX Runtime's CPU provider has almost no
bfloat16 kernels, so bf16 here means *weights stored in bfloat16, compute
float32*: each float32 constant (with more than one element) that is read at
a data position becomes a bfloat16 tensor followed by ``Cast(to=FLOAT)``.
The file is about half the size and runs on every runtime; ONNX Runtime
folds the casts when it loads the model. bfloat16 keeps float32's exponent
and 8 significant bits (relative error <= 2**-9), but its largest value is
3.39e38: float32's ``finfo.min``/``max`` (3.40e38), with which Hugging Face
fills attention masks, would round to -inf/inf, and ``0 * -inf`` or an
``== finfo.min`` test then changes the output; a constant holding such a
value stays float32 (exact) and is noted.

Both first run the float-exact passes int8 runs (BatchNorm and affine
folding, activation fusion; not MatMul + Add -> Gemm, which only helps int8
biases): fewer ops round in half precision, and a folded BatchNorm does not
compute ``1 / sqrt(var + eps)`` in float16. ``exclude`` names nodes or op
types of the given model; an unknown one is an error.

Which nodes compute in the low type and which type each value is stored in
is planned by :mod:`edgeopt.quant.float16_plan`; this module converts the
constants, inserts the Casts and reports.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt._scalars import plain_fields
from edgeopt.metrics import count_of
from edgeopt.naming import claim_name
from edgeopt.quant.config import check_exclude_names, require_bools
from edgeopt.quant.float16_plan import (
    FLOAT32_OPS,
    HalfPrecisionPlan,
    all_float_values,
    float_values,
    graphs_within,
    index_arithmetic,
    is_constant,
    plan_half_precision,
)
from edgeopt.quant.float16_ranges import FLOAT16_MAX, RangeCheck, check_fp16_ranges
from edgeopt.quant.formats import BFLOAT16, FLOAT16, Format
from edgeopt.quant.opset import check_conversion, convert_opset
from edgeopt.quant.model_checks import NodeIndex, check_exclude, vanished_excludes
from edgeopt.quant.registry import Batch, FloatNode, ProgressCallback, QuantResult, TensorQuantInfo, register_scheme

__all__ = ["FLOAT32_OPS", "FLOAT_PASSES", "Bf16Config", "Fp16Config", "Fp16Conversion", "HalfArray", "UniqueNames",
           "convert_fp16", "quantize_bf16", "quantize_fp16", "to_float16", "weight_only_float_passes"]

logger = logging.getLogger(__name__)

#: How the note of the weight-only schemes' float passes starts.
FLOAT_PASSES = "float passes first"

_FLOAT = ir.DataType.FLOAT
_FLOAT16 = ir.DataType.FLOAT16
_BFLOAT16 = ir.DataType.BFLOAT16


@dataclass(frozen=True, kw_only=True)
class Fp16Config:
    """Float16 weights and compute.

    ``keep_io_float32``: the model still takes and returns float32 (Casts at
    the boundary). ``exclude``: node names or op types to keep in float32, on
    top of :data:`FLOAT32_OPS`. ``float_passes``: fold BatchNorm and affine
    ops and fuse activations first (False: convert the graph as it is).
    """

    keep_io_float32: bool = True
    exclude: tuple[str, ...] = ()
    float_passes: bool = True

    def __post_init__(self) -> None:
        plain_fields(self)
        require_bools(self, "keep_io_float32", "float_passes")
        object.__setattr__(self, "exclude", check_exclude_names(self.exclude))  # a list becomes a tuple


@dataclass(frozen=True, kw_only=True)
class Bf16Config:
    """Bfloat16 weight storage, float32 compute.

    ``exclude``: node names or op types whose weights stay float32.
    ``float_passes``: as for :class:`Fp16Config`.
    """

    exclude: tuple[str, ...] = ()
    float_passes: bool = True
    fits_data: ClassVar[bool] = False  # bfloat16's range is float32's: data decides nothing, it is only measured on

    def __post_init__(self) -> None:
        plain_fields(self)
        require_bools(self, "float_passes")
        object.__setattr__(self, "exclude", check_exclude_names(self.exclude))  # a list becomes a tuple


# ---------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class HalfArray:
    """A float32 array rounded to float16, with what the rounding lost."""

    array: np.ndarray
    clamped: int
    flushed: int


def to_float16(array: np.ndarray) -> HalfArray:
    """Round to nearest float16, clamping |x| > 65504 to ±65504 (NaN and inf pass through)."""
    finite = np.isfinite(array)
    clamped = int(np.count_nonzero(finite & (np.abs(array) > FLOAT16_MAX)))
    clipped = np.where(finite, np.clip(array, -FLOAT16_MAX, FLOAT16_MAX), array).astype(np.float16)
    # at most 2**-25 (half the smallest subnormal, ties to even) rounds to zero: counted from the result
    flushed = int(np.count_nonzero((array != 0) & (clipped == 0)))
    return HalfArray(array=clipped, clamped=clamped, flushed=flushed)


# ---------------------------------------------------------------------------
# graph edits
# ---------------------------------------------------------------------------


def _all_values(graph: ir.Graph) -> Iterable[ir.Value]:
    for each in graphs_within(graph):
        yield from each.inputs
        yield from each.initializers.values()
    for node in graph.all_nodes():
        yield from node.outputs


class UniqueNames:
    """Fresh value and node names that collide with nothing in the graph."""

    def __init__(self, graph: ir.Graph) -> None:
        self._taken = {v.name for v in _all_values(graph) if v.name}
        self._taken |= {n.name for n in graph.all_nodes() if n.name}

    def __call__(self, base: str) -> str:
        return claim_name(base, self._taken)


_SUFFIX = {_FLOAT: "float32", _FLOAT16: "float16", _BFLOAT16: "bfloat16"}


class _Casts:
    """One Cast per (value, target type), shared by all uses that need it."""

    def __init__(self, graph: ir.Graph, namer: UniqueNames) -> None:
        self._graph, self._namer = graph, namer
        self._shared: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}
        self.made: list[ir.Node] = []

    def get(self, value: ir.Value, dtype: ir.DataType) -> ir.Value:
        key = (value, dtype)
        if key not in self._shared:
            self._shared[key] = self.make(value, dtype, self._namer(f"{value.name}_{_SUFFIX[dtype]}"))
        return self._shared[key]

    def make(self, value: ir.Value, dtype: ir.DataType, output_name: str) -> ir.Value:
        """A new Cast of ``value`` to ``dtype`` whose output is called ``output_name``."""
        node = ir.Node("", "Cast", [value], [ir.AttrInt64("to", dtype)], num_outputs=1,
                       name=self._namer(f"{output_name}_cast"))
        output = node.outputs[0]
        output.name = output_name
        output.type = ir.TensorType(dtype)
        output.shape = value.shape.copy() if value.shape is not None else None
        self._graph.append(node)
        self.made.append(node)
        return output

    def at_boundary(self) -> int:
        """How many Casts read a graph input or write a graph output."""
        return sum(1 for node in self.made if node.inputs[0].is_graph_input() or node.outputs[0].is_graph_output())


@dataclass
class _WeightLog:
    """Constants converted, and what rounding did to them."""

    tensors: list[TensorQuantInfo] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    clamped: int = 0
    flushed: int = 0


def _store_constant(value: ir.Value, array: np.ndarray) -> None:
    """Replace the tensor behind constant ``value`` (initializer or Constant node)."""
    tensor = ir.Tensor(array, name=value.name)
    producer = value.producer()
    if producer is None:
        value.const_value = tensor
    else:
        producer.attributes.clear()
        producer.attributes["value"] = ir.AttrTensor("value", tensor)
    value.type = ir.TensorType(tensor.dtype)


def _convert_constant(value: ir.Value, low_format: Format, log: _WeightLog) -> None:
    array = np.asarray(eir.constant_array(value), dtype=np.float32)
    if low_format is FLOAT16:
        half = to_float16(array)
        low, log.clamped, log.flushed = half.array, log.clamped + half.clamped, log.flushed + half.flushed
    else:
        low = array.astype(low_format.numpy_dtype)
    _store_constant(value, low)
    log.bytes_before += array.nbytes
    log.bytes_after += low.nbytes
    consumer = next(iter(value.consumers()), None)
    value_range = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    log.tensors.append(TensorQuantInfo(
        name=value.name, kind="weight", op_type=consumer.op_type if consumer else "", format=low_format.name,
        range=value_range, scale=(), zero_point=(), method="round-to-nearest"))


def _retype_node_attributes(node: ir.Node, low: ir.DataType) -> None:
    """Attributes that name the output's float type follow the node into ``low``."""
    if node.op_type == "Cast" and node.attributes.get_int("to") == _FLOAT:
        node.attributes["to"] = ir.AttrInt64("to", low)
    elif node.op_type == "ConstantOfShape":
        fill = node.attributes.get_tensor("value")
        scalar = fill.numpy() if fill is not None else np.zeros(1, np.float32)
        node.attributes["value"] = ir.AttrTensor("value", ir.Tensor(to_float16(scalar).array))


def weight_only_float_passes(model: ir.Model, exclude: Iterable[str], *, run: bool, subgraphs: bool) -> list[str]:
    """For the weight-only schemes (fp16/bf16, int4): check ``exclude`` against the given model (with
    ``subgraphs``, its If/Loop bodies' nodes too), then, when ``run``, the float passes in place: a tied
    weight is stored once (``copy_shared=False``), a MatMul + Add stays as the user named it, and nothing
    is canonicalized for integer kernels. Their notes."""
    from edgeopt.passes import default_passes

    exclude = tuple(exclude)
    check_exclude([NodeIndex.of(model, subgraphs=subgraphs)], exclude)
    if not run:
        return []
    before = sum(1 for _ in model.graph)
    modified = False
    for stage in default_passes(copy_shared=False, fuse_gemm=False, canonicalize=False):
        modified |= stage(model).report.modified
    after = sum(1 for _ in model.graph)
    notes = [f"{FLOAT_PASSES} (constant, BatchNorm and affine folding, activation fusion, dead-code "
             f"elimination): {before} -> {after} nodes" if modified else f"{FLOAT_PASSES}: nothing to fold or fuse"]
    return notes + vanished_excludes(model, exclude, subgraphs=subgraphs)


def _float_passes(model: ir.Model, config: Fp16Config | Bf16Config) -> list[str]:
    """Check ``exclude`` against the given model, then run the float passes in place; notes (bf16 stores
    subgraphs' weights low too)."""
    return weight_only_float_passes(model, config.exclude, run=config.float_passes,
                                    subgraphs=isinstance(config, Bf16Config))


def _float_nodes(kept: Iterable[tuple[ir.Node, str]]) -> tuple[FloatNode, ...]:
    return tuple(FloatNode(node.name or node.op_type, node.op_type, reason) for node, reason in kept)


def _kept_note(float_nodes: Iterable[FloatNode]) -> str | None:
    groups = Counter((node.op_type, node.reason) for node in float_nodes)
    if not groups:
        return None
    parts = [f"{op} x{count} ({reason})" for (op, reason), count in sorted(groups.items())]
    return "kept in float32: " + "; ".join(parts)


def _float32_constants(graph: ir.Graph) -> list[ir.Value]:
    """The float32 constants of ``graph`` and of its subgraphs."""
    return [value for each in graphs_within(graph) for value in all_float_values(each) if is_constant(value)]


def _float32_weight_bytes(graph: ir.Graph, *, min_size: int = 1) -> int:
    """Bytes of the float32 constants of at least ``min_size`` elements (what a conversion could halve),
    subgraphs' included."""
    arrays = (eir.constant_array(v) for v in _float32_constants(graph))
    return sum(array.nbytes for array in arrays if array.size >= min_size)


def _read_by(node: ir.Node) -> list[ir.Value]:
    """The float32 values ``node`` reads: its inputs, and what the nodes of its subgraphs read."""
    inner = (value for graph in eir.subgraphs(node) for each in graph.all_nodes() for value in each.inputs)
    return float_values([*node.inputs, *inner])


_MOSTLY_CONVERTED = 0.5  # below this share of the weight bytes converted, the result is not what was asked for


#: Why a constant that is itself a graph output keeps float32 (outputs keep the I/O type).
_OUTPUT_CONSTANT = "they are graph outputs themselves, which keep float32"


def _warn_mostly_float32(scheme: str, weight_bytes: int, log: _WeightLog,
                         kept: Iterable[tuple[ir.Node, str]], outputs: Iterable[ir.Value]) -> None:
    """A warning when most float32 weight bytes stay float32, with the reasons holding the most bytes
    (the nodes kept float32 that read them, or ``outputs``, the graph's, that are such constants)."""
    if not weight_bytes or log.bytes_before >= weight_bytes * _MOSTLY_CONVERTED:
        return
    held: Counter[str] = Counter()
    counted: set[ir.Value] = set()
    for node, reason in kept:
        for value in _read_by(node):  # an If or a Loop holds the weights its subgraphs read
            if is_constant(value) and value not in counted:
                counted.add(value)
                held[reason] += eir.constant_array(value).nbytes
    for value in outputs:
        if is_constant(value) and value.dtype == ir.DataType.FLOAT and value not in counted:
            counted.add(value)
            held[_OUTPUT_CONSTANT] += eir.constant_array(value).nbytes
    reasons = "; ".join(f"{reason} ({size} bytes)" for reason, size in held.most_common(2))
    logger.warning("%s converted only %d of %d float32 weight bytes (%.0f%%): the others stay float32 (the nodes "
                   "kept float32 are listed in the notes), mostly because: %s", scheme, log.bytes_before, weight_bytes,
                   100 * log.bytes_before / weight_bytes, reasons or "no node reads them")


# ---------------------------------------------------------------------------
# fp16
# ---------------------------------------------------------------------------


def _convert_fp16(plan: HalfPrecisionPlan, log: _WeightLog) -> dict[ir.Value, ir.DataType]:
    """Give every float32 value its home type; returns the homes."""
    homes = {value: plan.home(value) for value in all_float_values(plan.graph)}
    for value, home in homes.items():
        if home == _FLOAT16 and is_constant(value):
            _convert_constant(value, FLOAT16, log)
        elif home == _FLOAT16:
            value.type = ir.TensorType(_FLOAT16)
    for node in plan.low_nodes:
        if any(homes.get(v) == _FLOAT16 for v in node.outputs):
            _retype_node_attributes(node, _FLOAT16)
    return homes


def _rewire(plan: HalfPrecisionPlan, homes: Mapping[ir.Value, ir.DataType], casts: _Casts) -> None:
    """Uses that read a value in another type than it is stored in read a Cast of it."""
    for value, home in homes.items():
        for use in list(value.uses()):
            wanted = plan.wanted(use.node, use.idx)
            if wanted != home:
                use.node.replace_input_with(use.idx, casts.get(value, wanted))


def _fix_outputs(graph: ir.Graph, homes: Mapping[ir.Value, ir.DataType], io_dtype: ir.DataType,
                 casts: _Casts, namer: UniqueNames) -> None:
    """Graph outputs keep their names and ``io_dtype``: a Cast takes over the name (one Cast for a value
    the graph lists twice as an output)."""
    made: dict[ir.Value, ir.Value] = {}
    for position, value in enumerate(list(graph.outputs)):
        if value not in made and homes.get(value, io_dtype) != io_dtype:
            name = value.name
            value.name = namer(f"{name}_{_SUFFIX[homes[value]]}")
            made[value] = casts.make(value, io_dtype, name)
        graph.outputs[position] = made.get(value, value)


@dataclass(frozen=True, kw_only=True)
class Fp16Conversion:
    """What :func:`convert_fp16` did: the plan (the nodes computing in float16, those kept float32 and
    why), the constants converted, the Casts made, and the range check and crash workaround's notes."""

    plan: HalfPrecisionPlan
    log: _WeightLog
    casts: _Casts
    ranges: RangeCheck
    crash_notes: list[str]


def convert_fp16(model: ir.Model, exclude: tuple[str, ...], data: Iterable[Batch] | None, *,
                 io_dtype: ir.DataType = _FLOAT, within: Collection[str] | None = None,
                 progress: ProgressCallback | None = None) -> Fp16Conversion:
    """Float16 weights and compute for the nodes of ``model`` that float16 suits (in place; see the module
    docstring), graph inputs and outputs in ``io_dtype``. ``within``: only the nodes of these names may
    compute in float16 (the float nodes of an int8 model: by name, as the float16 crash workaround replaces
    a MatMul by one of the same name); the others keep their types and are not listed as kept."""
    eir.infer_shapes(model)
    crash_notes = _avoid_ort_fp16_crashes(model)
    ranges = check_fp16_ranges(model, data, progress=progress)
    graph, opset = model.graph, eir.default_opset(model)
    plan = plan_half_precision(graph, exclude, opset, _FLOAT16, numeric_ops=FLOAT32_OPS, io_dtype=io_dtype,
                               float32_values={**index_arithmetic(graph), **ranges.float32_values}, within=within)
    log = _WeightLog()
    homes = _convert_fp16(plan, log)
    namer = UniqueNames(graph)
    casts = _Casts(graph, namer)
    _rewire(plan, homes, casts)
    _fix_outputs(graph, homes, io_dtype, casts, namer)
    graph.sort()
    return Fp16Conversion(plan=plan, log=log, casts=casts, ranges=ranges, crash_notes=crash_notes)


@register_scheme(Fp16Config)
def quantize_fp16(model: ir.Model, config: Fp16Config, data: Iterable[Batch] | None = None, *,
                  progress: ProgressCallback | None = None) -> QuantResult:
    """Float16 weights and compute; see the module docstring. ``data``, when given, is read once to
    observe the activations' ranges (:mod:`edgeopt.quant.float16_ranges`)."""
    passes = _float_passes(model, config)
    weight_bytes = _float32_weight_bytes(model.graph)
    io_dtype = _FLOAT if config.keep_io_float32 else _FLOAT16
    conversion = convert_fp16(model, config.exclude, data, io_dtype=io_dtype, progress=progress)
    plan, log, casts, ranges = conversion.plan, conversion.log, conversion.casts, conversion.ranges
    float_nodes = _float_nodes(plan.kept)
    notes = [
        f"float16 weights and compute: {count_of(len(log.tensors), 'float32 constant', 'float32 constants')} "
        "converted, "
        f"{log.bytes_before} -> {log.bytes_after} bytes",
        (f"{count_of(log.clamped, 'weight value', 'weight values')} beyond ±65504 clamped to the float16 range, "
         if log.clamped else "")
        + f"{count_of(log.flushed, 'weight value', 'weight values')} of magnitude 2**-25 or less rounded to 0",
        (f"inputs and outputs stay float32: {count_of(casts.at_boundary(), 'Cast node', 'Cast nodes')} at the "
         "graph boundary"
         if config.keep_io_float32 else "inputs and outputs are float16"),
        f"{count_of(len(casts.made), 'Cast node', 'Cast nodes')} in all join the float32 and float16 parts",
        "ONNX Runtime's CPU provider runs ops without a float16 kernel in float32 through casts it "
        "inserts: on x86 CPU expect a size win, not a speed win",
        *passes,
        *ranges.notes,
        *conversion.crash_notes,
    ]
    kept = _kept_note(float_nodes)
    notes += [kept] if kept else []
    logger.info("fp16: %s", notes[0])
    _warn_mostly_float32("fp16", weight_bytes, log, plan.kept, model.graph.outputs)
    details = {"weights_converted": len(log.tensors), "weight_bytes_before": log.bytes_before,
               "weight_bytes_after": log.bytes_after, "clamped_values": log.clamped,
               "flushed_values": log.flushed, "casts_inserted": len(casts.made), **ranges.details}
    return QuantResult(model=model, scheme="fp16", tensors=tuple(log.tensors), float_nodes=float_nodes,
                       notes=tuple(notes), config=config, details=details)


def _avoid_ort_fp16_crashes(model: ir.Model) -> list[str]:
    """Rewrite the float16 patterns ONNX Runtime cannot load (:func:`_transpose_after_matmul`), with types
    inferred again; the note saying how many."""
    swapped = _transpose_after_matmul(model.graph)
    if not swapped:
        return []
    eir.infer_shapes(model)
    return [f"{count_of(swapped, 'MatMul', 'MatMuls')} of a Transpose(perm=[1, 0, 2]) by a 2-D weight computed "
            "before the Transpose instead (the same values): ONNX Runtime 1.32 crashes creating a session for "
            "that float16 pattern"]


def _transpose_after_matmul(graph: ir.Graph) -> int:
    """``MatMul(Transpose(x, perm=[1, 0, 2]), W)`` with a 3-D ``x`` and a 2-D ``W`` (a sequence-first
    transformer's projection, torch's ``x.transpose(0, 1) @ W``) becomes ``Transpose(MatMul(x, W))``: the
    same values, as a MatMul by a 2-D ``W`` treats the two leading axes alike. ONNX Runtime 1.32's CPU
    provider fuses the float16 form into a FusedMatMul with a transposed batch and crashes (a segmentation
    fault) creating the session. The MatMul keeps its name, so ``exclude`` and the report still find it. How
    many were rewritten."""
    namer = UniqueNames(graph)
    swapped = 0
    for node in list(graph):
        transpose = node.inputs[0].producer() if node.op_type == "MatMul" and node.domain == "" else None
        if transpose is None or transpose.op_type != "Transpose" or transpose.domain != "":
            continue
        perm = transpose.attributes.get("perm")
        x, weight = transpose.inputs[0], node.inputs[1]
        # perm [1, 0, 2] makes x 3-D: its shape may be unknown (the output of a com.microsoft op), not its rank
        if perm is None or list(perm.as_ints()) != [1, 0, 2] or weight.shape is None or len(weight.shape) != 2:
            continue
        label = eir.node_label(node)
        product = ir.node("MatMul", [x, weight], name=node.name)  # the old node goes: its name is free
        product.outputs[0].name = namer(f"{node.outputs[0].name}_before_transpose")
        moved = ir.node("Transpose", [product.outputs[0]], {"perm": [1, 0, 2]}, name=namer(f"{label}_Transpose"))
        moved.outputs[0].name = namer(f"{node.outputs[0].name}_transposed")
        eir.replace_nodes(graph, [node], node.outputs[0], [product, moved])
        if not transpose.outputs[0].uses() and not transpose.outputs[0].is_graph_output():
            eir.remove_nodes(graph, [transpose])
        swapped += 1
    return swapped


# ---------------------------------------------------------------------------
# bf16: weights stored low, compute float32
# ---------------------------------------------------------------------------


_BF16_CAST_OPSET = 13  # Cast to and from bfloat16 is in the ONNX standard from opset 13


def _reads_constant(node: ir.Node) -> bool:
    return any(is_constant(v) for v in float_values(node.inputs))


@register_scheme(Bf16Config)
def quantize_bf16(model: ir.Model, config: Bf16Config, data: Iterable[Batch] | None = None, *,
                  progress: ProgressCallback | None = None) -> QuantResult:
    """Bfloat16 weight storage with float32 compute; see the module docstring. ``data`` is not used."""
    model, opset_notes = _bf16_opset(model, config, data)
    passes = _float_passes(model, config)
    eir.infer_shapes(model)
    graph, opset = model.graph, eir.default_opset(model)
    plan = plan_half_precision(graph, config.exclude, opset, _BFLOAT16, numeric_ops={}, io_dtype=_FLOAT,
                               weights_only=True)
    log = _WeightLog()
    weight_bytes = _float32_weight_bytes(graph, min_size=2)
    beyond: list[str] = []
    scalars, casts_inserted = _store_weights_bf16(graph, plan, log, beyond)
    float_nodes = _float_nodes((node, reason) for node, reason in plan.kept if _reads_constant(node))
    notes = [
        "weights stored in bf16, compute float32: each converted weight is cast back to float32 "
        "before use (ONNX Runtime folds these casts at load), so the model runs on any runtime",
        f"{count_of(len(log.tensors), 'float32 constant', 'float32 constants')} stored as bfloat16, "
        f"{log.bytes_before} -> {log.bytes_after} bytes",
        f"{count_of(scalars, 'scalar constant', 'scalar constants')} left float32 (no size to win)",
        *opset_notes,
        *passes,
    ]
    if beyond:
        notes.append(f"{count_of(len(beyond), 'constant', 'constants')} kept float32: finite values beyond "
                     f"bfloat16's ±3.39e38 (float32's finfo.min/max, as attention masks hold) would round to "
                     f"±inf: {', '.join(beyond[:3])}{' ...' if len(beyond) > 3 else ''}")
    kept = _kept_note(float_nodes)
    notes += [kept.replace("kept in float32", "weights kept in float32")] if kept else []
    logger.info("bf16: %s", notes[1])
    _warn_mostly_float32("bf16", weight_bytes, log, plan.kept, model.graph.outputs)
    details = {"weights_converted": len(log.tensors), "weight_bytes_before": log.bytes_before,
               "weight_bytes_after": log.bytes_after, "casts_inserted": casts_inserted}
    return QuantResult(model=model, scheme="bf16", tensors=tuple(log.tensors), float_nodes=float_nodes,
                       notes=tuple(notes), config=config, details=details)


def _bf16_opset(model: ir.Model, config: Bf16Config, data: Iterable[Batch] | None) -> tuple[ir.Model, list[str]]:
    """``model`` converted to the opset where Cast from bfloat16 exists when it is older, checked against
    the original on ``data`` (ModelError when the converter changed it), with the note saying so."""
    if eir.default_opset(model) >= _BF16_CAST_OPSET:
        return model, []
    check_exclude([NodeIndex.of(model, subgraphs=True)], config.exclude)  # of the model given, before conversion
    converted = convert_opset(model, _BF16_CAST_OPSET)
    checked = check_conversion(model, converted, data)
    why = "Cast from bfloat16, which restores each weight, exists from opset 13"
    if checked is not None:
        return converted, [checked.note(why, calibration=False)]
    return converted, [f"converted opset {eir.default_opset(model)} -> {_BF16_CAST_OPSET} ({why}); not checked: "
                       "without --data it runs on random inputs, which this model's dynamic or index inputs "
                       "cannot take"]


def _rounds_to_inf(array: np.ndarray) -> bool:
    """Whether a finite value of ``array`` is beyond bfloat16's largest, so that storing it gives ±inf."""
    return bool(np.any(np.isinf(array.astype(BFLOAT16.numpy_dtype)) & np.isfinite(array)))


def _store_weights_bf16(graph: ir.Graph, plan: HalfPrecisionPlan, log: _WeightLog,
                        beyond: list[str]) -> tuple[int, int]:
    """Store each weight ``plan`` gives to bf16 as bfloat16, read through a Cast back to float32 (one per
    weight and graph: a subgraph's own weight is cast back inside that subgraph). Scalars stay float32:
    no size to win, and epsilons and math constants stay exact; so do weights that would round to ±inf,
    named in ``beyond``. The number of scalars and of casts."""
    namer = UniqueNames(graph)
    casts: dict[ir.Graph, _Casts] = {}
    scalars = 0
    for value in [v for v in _float32_constants(graph) if plan.wants(v) == {_BFLOAT16}]:
        array = eir.constant_array(value)
        if array.size <= 1:
            scalars += 1
            continue
        if _rounds_to_inf(array):
            beyond.append(value.name)
            continue
        uses = list(value.uses())
        _convert_constant(value, BFLOAT16, log)
        restored = casts.setdefault(value.graph, _Casts(value.graph, namer)).get(value, _FLOAT)
        for use in uses:
            use.node.replace_input_with(use.idx, restored)
    graph.sort()
    return scalars, sum(len(c.made) for c in casts.values())

"""Int4 weight-only, block-wise quantization of MatMul and Gemm weights.

For ``y = x @ W`` with a constant weight ``W`` of shape ``[..., K, N]``, each block of ``b`` values along K
(the reduction axis) of each column gets its own scale (and, for uint4, zero point), its clipping searched for
the least squared error -- weighted, when calibration data is given, by the mean square of the layer's input
channels (:mod:`edgeopt.quant.int4_importance`) -- and ``w' = (q - zero_point) * scale``; the math, the nibble
packing and the MatMulNBits layout are in :mod:`edgeopt.quant.int4_blocks`. With ``gptq`` (and data) a 2-D
weight is rounded by GPTQ against its layer's input correlation instead (:mod:`edgeopt.quant.int4_gptq`). This
module is the scheme: which nodes, and how each is rewritten (the graph edits: :mod:`edgeopt.quant.int4_lowering`;
each weight's rounding and what an accuracy search's rounds share: :mod:`edgeopt.quant.int4_rounding`).
With ``fallback="int8"`` the layers kept out of int4 (``exclude``, which the accuracy search extends) are
quantized the same way in 8 bits (``int8_block`` or ``uint8``: MatMulNBits bits = 8) instead of staying float.

Lowering, per node:

* MatMul with a 2-D constant weight, and Gemm (``transA = 0``; ``alpha`` and ``transB`` folded into the
  weight, ``beta * C`` into the bias) become ONNX Runtime's ``com.microsoft.MatMulNBits`` (bits = 4), the
  weight encoded by :func:`~edgeopt.quant.int4_blocks.encode_matmul_nbits` (int4: no zero-points input;
  uint4: packed zero points). A constant bias that broadcasts over rows rides in MatMulNBits' bias input;
  any other C is added by an Add node.
* MatMul with a constant weight of rank > 2 becomes the standard ONNX path, ``DequantizeLinear(INT4/UINT4
  weight, scale, axis = rank - 2, block_size = b)`` feeding the MatMul, when the model's opset is >= 21
  (blocked quantization); at a lower opset it stays float (no silent opset upgrade).
* Everything else stays float and is listed with the reason, among it a weight holding inf or NaN (its
  block's scale would be inf), and one whose K is so far below the block size that its padded blocks take no
  fewer bytes than its float32 values (K <= 5 at b = 32).

The MatMul/Gemm nodes of control-flow subgraphs (If branches, Loop and Scan bodies: a merged decoder holds its
layers there) are quantized the same way; every new constant is stored in the main graph, which subgraphs
read.

First, unless ``float_passes`` is off, the float-exact passes fp16 runs (constant folding, dead-code
elimination, BatchNorm/affine folding, activation fusion; not MatMul + Add -> Gemm): an exporter's
``Identity(W)`` and ``Transpose(W)`` of a weight become plain constants the rewrite can quantize, and dead
branches are not quantized and stored. A Transpose of a weight other nodes read too (a tied embedding, read by
a Gather and, as ``Transpose(E)``, by the LM head) is not folded, which would store a second float copy: the
head's weight is read through the Transpose, and only its packed form is added. Likewise a table that stays
float32 for another reader (a tied head kept float, a graph output) is no GatherBlockQuantized copy: the Gather
reads it in float.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt._scalars import is_integer, plain_fields
from edgeopt.errors import ConfigError, ModelError
from edgeopt.metrics import count_of
from edgeopt.quant.config import (PerBlock, check_exclude_names, is_excluded, require_bools, require_enum,
                                  require_format)
from edgeopt.quant.fallback import IN_8_BITS
from edgeopt.quant.float16 import UniqueNames, weight_only_float_passes
from edgeopt.quant.formats import INT4, INT8_BLOCK, UINT4, UINT8, Format
from edgeopt.quant.int4_blocks import BlockQuantizedWeight
from edgeopt.quant.int4_importance import GRAM_BUDGET_BYTES
from edgeopt.quant.int4_lowering import (MS_DOMAIN, EncodedWeight, Lowering, WeightTarget, block_bytes,
                                         dequantize_linear_constants, drop_unread, gather_block_quantized_constants,
                                         gemm_as_matmul,
                                         lower_dequantize_linear, lower_gather_block_quantized, lower_matmul_nbits,
                                         matmul_nbits_constants, read_constant, uncovered_weights_note)
from edgeopt.quant.int4_rounding import Int4Memo, LayerStatistics, Rounded, layer_statistics, reader_inputs, rounded
from edgeopt.quant.registry import Batch, FloatNode, ProgressCallback, QuantResult, TensorQuantInfo, register_scheme

__all__ = [
    "AccuracyLevel",
    "Embeddings",
    "Int4WeightConfig",
    "WeightFallback",
    "quantize_int4",
]

logger = logging.getLogger(__name__)

_BLOCKED_DQ_OPSET = 21  # DequantizeLinear gained block_size (and INT4) in opset 21


class AccuracyLevel(enum.IntEnum):
    """The least precision MatMulNBits may compute the float input in (ONNX Runtime's ``accuracy_level``)."""

    UNSET = 0
    FLOAT32 = 1
    FLOAT16 = 2
    BFLOAT16 = 3
    INT8 = 4  # the input is quantized to int8 per block: fastest on CPU, least accurate


class WeightFallback(enum.Enum):
    """What the MatMul/Gemm layers kept out of int4 (excluded, or returned by the accuracy search) hold their
    weights in."""

    FLOAT = "float"  # float32, as in the float model
    INT8 = "int8"  # 8 bits in the same blocks (MatMulNBits bits = 8): a quarter of float32's bytes


class Embeddings(enum.Enum):
    """What the embedding tables Gather nodes read are held in (GatherBlockQuantized, rows in blocks)."""

    INT8 = "int8"  # 8 bits (the fallback's format): a quarter of float32's bytes at about 46 dB, as NNCF keeps them
    INT4 = "int4"  # the weights' format
    FLOAT = "float"  # float32, left as they are


_WEIGHT_FORMATS = (INT4, UINT4)
_FALLBACK_FORMATS = {INT4: INT8_BLOCK, UINT4: UINT8}  # the 8-bit format of each, symmetric or not alike


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int4WeightConfig:
    """Int4 weight-only quantization of MatMul/Gemm weights.

    ``granularity``: blocks of ``size`` values along K (16, 32, 64, 128 or 256).
    ``weight_format``: ``UINT4`` (asymmetric, per-block zero points: the
    default, about 1 dB more weight SQNR than int4 for 2.5% more bytes at
    b = 32) or ``INT4`` (symmetric, no zero points). ``accuracy_level``: written to
    MatMulNBits when set; None leaves ONNX Runtime's default (float input
    not downcast). ``exclude``: node names or op types to leave float.
    ``float_passes``: fold constants and BatchNorm, drop dead nodes first
    (False: quantize the graph as it is). ``gptq``: round each 2-D weight by
    GPTQ against its layer's input correlation on the calibration data
    (:mod:`edgeopt.quant.int4_gptq`); needs data. ``fallback``: what the
    layers kept out of int4 by ``exclude`` (which the accuracy search extends)
    hold their weights in: float32, or 8 bits in the same blocks
    (``WeightFallback.INT8``, ``"int8"``: ``int8_block`` for int4, ``uint8``
    for uint4), about 0.3 of float32's bytes and some 24 dB more weight SQNR
    than 4 bits. ``embeddings``: what the tables Gather nodes read (an
    embedding ``[rows, D]``, D a multiple of the block size) are held in, as
    ONNX Runtime's GatherBlockQuantized: 8 bits by default (an embedding's rows
    feed the whole model: in 4 bits the test GPT loses 1.25 dB of output SQNR,
    in 8 bits 0.01 dB), int4, or float.
    """

    granularity: PerBlock = PerBlock(size=32)
    weight_format: Format = UINT4
    accuracy_level: AccuracyLevel | None = None
    exclude: tuple[str, ...] = ()
    float_passes: bool = True
    gptq: bool = False
    fallback: WeightFallback = WeightFallback.FLOAT
    embeddings: Embeddings = Embeddings.INT8

    def __post_init__(self) -> None:
        plain_fields(self)
        require_enum(self, "fallback", WeightFallback, "fallback")
        require_enum(self, "embeddings", Embeddings, "embeddings")
        require_bools(self, "float_passes", "gptq")
        if not isinstance(self.granularity, PerBlock):
            raise ConfigError(f"granularity of int4 must be PerBlock(size=...), got {self.granularity!r}")
        if self.weight_format is None:
            raise ConfigError("weight_format of int4 must be UINT4 or INT4, got None")
        require_format(self, "weight_format", _WEIGHT_FORMATS, "weight_format of int4")
        self._check_accuracy_level()
        object.__setattr__(self, "exclude", check_exclude_names(self.exclude))  # a list becomes a tuple

    def _check_accuracy_level(self) -> None:
        """``accuracy_level`` as an AccuracyLevel; its name (``"int8"``) or ONNX Runtime's number (4) becomes one."""
        level = self.accuracy_level
        if isinstance(level, str):
            level = AccuracyLevel.__members__.get(level.upper(), level)
        elif is_integer(level) and not isinstance(level, AccuracyLevel) and level in set(AccuracyLevel):
            level = AccuracyLevel(level)
        object.__setattr__(self, "accuracy_level", level)
        if level is not None and not isinstance(level, AccuracyLevel):
            allowed = ", ".join(f"AccuracyLevel.{m.name} ({m.name.lower()!r}, {m.value})" for m in AccuracyLevel)
            raise ConfigError(f"accuracy_level must be None or one of {allowed}, got {level!r}")

    @property
    def block_size(self) -> int:
        return self.granularity.size

    @property
    def fallback_format(self) -> Format | None:
        """The format of the layers kept out of int4, None when they stay float."""
        return _FALLBACK_FORMATS[self.weight_format] if self.fallback is WeightFallback.INT8 else None

    @property
    def table_format(self) -> Format | None:
        """The format of the embedding tables, None when they stay float."""
        return {Embeddings.INT8: _FALLBACK_FORMATS[self.weight_format], Embeddings.INT4: self.weight_format,
                Embeddings.FLOAT: None}[self.embeddings]


# ---------------------------------------------------------------------------
# which nodes, and how
# ---------------------------------------------------------------------------


def _match(node: ir.Node, config: Int4WeightConfig, opset: int) -> WeightTarget | str:
    """How to quantize ``node``'s weight (in int4, or in 8 bits when excluded and the fallback is int8), or
    why it stays float."""
    excluded = is_excluded(node, config.exclude)
    if node.op_type == "Gather" and config.table_format is None:  # excluded too: the fallback holds no float table
        return "an embedding table, kept float by config (--embeddings float)"
    fmt = config.fallback_format if excluded else config.table_format if node.op_type == "Gather" \
        else config.weight_format
    if fmt is None:
        return "excluded by config"
    found = _match_table(node, config, fmt) if node.op_type == "Gather" else _match_format(node, config, opset, fmt)
    return f"excluded by config, and not held in {fmt.name} either: {found}" if excluded and isinstance(found, str) \
        else found


def _table(node: ir.Node) -> np.ndarray | None:
    """A Gather's constant floating-point table (an embedding), or None: a Gather of shapes or indices is no
    weight."""
    table = eir.constant_array(node.inputs[0]) if node.inputs and node.inputs[0] is not None else None
    return table if table is not None and np.issubdtype(table.dtype, np.floating) and table.ndim >= 2 else None


def _match_table(node: ir.Node, config: Int4WeightConfig, fmt: Format) -> WeightTarget | str:
    """A Gather's embedding table ``E [rows, D]`` as the ``[D, rows]`` weight ``E^T`` whose blocks along D are
    GatherBlockQuantized's, or why it stays float."""
    table = _table(node)
    axis = node.attributes.get_int("axis", 0)
    if table.dtype != np.float32:
        return f"its table is {table.dtype}, not float32"
    if table.ndim != 2 or axis not in (0, -2):
        return (f"it gathers along axis {axis} of a {table.ndim}-D table: GatherBlockQuantized is written here "
                "for the rows of a 2-D table")
    if table.shape[1] % config.block_size:
        return (f"its rows hold D = {table.shape[1]} values, not a multiple of the block size {config.block_size}: "
                "GatherBlockQuantized blocks whole rows")
    if not np.isfinite(table).all():
        return f"its table holds inf or NaN, which no {fmt.name} block scale can represent"
    return WeightTarget(node=node, weight_value=node.inputs[0], weight=np.ascontiguousarray(table.T), weight_axis=1,
                        lowering=Lowering.GATHER_BLOCK_QUANTIZED, weight_format=fmt)


def _match_format(node: ir.Node, config: Int4WeightConfig, opset: int, fmt: Format) -> WeightTarget | str:
    source = read_constant(node.inputs[1] if len(node.inputs) > 1 else None)
    if source is None:
        return "its right-hand input is not a constant: weight-only quantization needs one"
    target = _match_weight(node, source.value, source.array, opset)
    if isinstance(target, str):
        return target
    if not np.isfinite(target.weight).all():  # one inf makes its block's scale inf: every value of it NaN
        return f"its weight holds inf or NaN, which no {fmt.name} block scale can represent"
    k = target.weight.shape[-2]
    nbytes = block_bytes(target.weight.shape, config.block_size, fmt, target.lowering)
    if nbytes >= target.weight.nbytes:
        return (f"K = {k} is below the block size {config.block_size}: padded to whole blocks its {fmt.name} form "
                f"takes {nbytes} bytes, no fewer than its {target.weight.nbytes} float32 bytes")
    return dataclasses.replace(target, weight_axis=source.axes[target.weight_axis], weight_format=fmt)


def _match_weight(node: ir.Node, weight_value: ir.Value, weight: np.ndarray, opset: int) -> WeightTarget | str:
    """:func:`_match` for ``weight`` as the node reads it (``weight_axis`` in its axes)."""
    if weight.dtype != np.float32:
        return f"its weight is {weight.dtype}, not float32"
    if node.op_type == "Gemm":
        return _match_gemm(node, weight_value, weight)
    if weight.ndim < 2:
        return "its weight is a vector: there is no K x N matrix to block"
    if weight.ndim == 2:
        if _rank(node.inputs[0]) == 1:
            return "its input is 1-D: MatMulNBits needs a matrix input"
        return WeightTarget(node=node, weight_value=weight_value, weight=weight, weight_axis=0,
                            lowering=Lowering.MATMUL_NBITS)
    if opset < _BLOCKED_DQ_OPSET:
        return (f"its weight is {weight.ndim}-D: that needs DequantizeLinear with block_size "
                f"(opset {_BLOCKED_DQ_OPSET}), and the model has opset {opset}")
    return WeightTarget(node=node, weight_value=weight_value, weight=weight, weight_axis=weight.ndim - 2,
                        lowering=Lowering.DEQUANTIZE_LINEAR)


def _rank(value: ir.Value | None) -> int | None:
    return len(value.shape) if value is not None and value.shape is not None else None


def _match_gemm(node: ir.Node, weight_value: ir.Value, weight: np.ndarray) -> WeightTarget | str:
    gemm = gemm_as_matmul(node, weight)
    if isinstance(gemm, str):
        return gemm
    return WeightTarget(node=node, weight_value=weight_value, weight=gemm.weight, weight_axis=gemm.k_axis,
                        lowering=Lowering.MATMUL_NBITS, bias=gemm.bias, addend=gemm.addend)


def _float_passes(model: ir.Model, config: Int4WeightConfig) -> list[str]:
    """Check ``exclude`` against the given model, then run the float passes in place; notes (int4 quantizes
    subgraphs' nodes too)."""
    return weight_only_float_passes(model, config.exclude, run=config.float_passes, subgraphs=True)


def _by_weight(targets: Iterable[WeightTarget]) -> dict[tuple, list[WeightTarget]]:
    """Targets grouped by the weight they quantize (its lowering, shape and bytes), in graph order."""
    groups: dict[tuple, list[WeightTarget]] = {}
    for target in targets:
        digest = hashlib.sha256(target.weight.tobytes()).hexdigest()
        groups.setdefault((target.lowering, target.weight_format.name, target.weight.shape, digest), []).append(target)
    return groups


_ENCODERS = {Lowering.MATMUL_NBITS: matmul_nbits_constants, Lowering.DEQUANTIZE_LINEAR: dequantize_linear_constants,
             Lowering.GATHER_BLOCK_QUANTIZED: gather_block_quantized_constants}


def _tensor_info(target: WeightTarget, quantized: BlockQuantizedWeight, method: str) -> TensorQuantInfo:
    return TensorQuantInfo(
        name=target.weight_value.name, kind="weight", op_type=target.node.op_type, format=quantized.format.name,
        range=(float(target.weight.min()), float(target.weight.max())),
        scale=tuple(quantized.scale.ravel().tolist()), zero_point=tuple(quantized.zero_point.ravel().tolist()),
        method=method, axis=target.weight_axis)


def _kept_note(float_nodes: Iterable[FloatNode]) -> list[str]:
    """The layers left float, by op and reason, and those held in 8 bits (the fallback), by op."""
    marker = f"; {IN_8_BITS} "
    groups = Counter((node.op_type, node.reason) for node in float_nodes if marker not in node.reason)
    low = [node for node in float_nodes if marker in node.reason]
    notes = ["left float: " + "; ".join(f"{op} x{count} ({reason})" for (op, reason), count in sorted(groups.items()))
             ] if groups else []
    if low:
        held = low[0].reason[low[0].reason.index(marker) + 2:]  # "weight held in 8 bits (uint8, --fallback int8)"
        notes.append(f"kept out of int4, {held}: "
                     + ", ".join(f"{op} x{count}" for op, count in sorted(Counter(n.op_type for n in low).items())))
    return notes


def _still_float_note(graph: ir.Graph, weights: Iterable[ir.Value]) -> list[str]:
    """Quantized weights other nodes (or the graph's outputs) still read in float32: their bytes remain."""
    kept = [value for value in weights if value.uses() or value.is_graph_output()]
    if not kept:
        return []
    readers = sorted({use.node.op_type for value in kept for use in value.uses()}
                     | ({"graph output"} if any(value.is_graph_output() for value in kept) else set()))
    nbytes = sum(value.const_value.nbytes for value in kept if value.const_value is not None)
    return [f"{count_of(len(kept), 'quantized weight stays', 'quantized weights stay')} in the model in float32 "
            f"too, {nbytes} bytes, because other nodes read them ({', '.join(readers)}; e.g. {kept[0].name!r}): "
            "those bytes remain in the file"]


@dataclasses.dataclass
class _Lowered:
    """What the rewrite did, for the notes and the report."""

    tensors: list[TensorQuantInfo] = dataclasses.field(default_factory=list)
    counts: Counter = dataclasses.field(default_factory=Counter)
    encodings: dict[tuple, EncodedWeight] = dataclasses.field(default_factory=dict)
    weights: dict[ir.Value, int] = dataclasses.field(default_factory=dict)  # float32 bytes of each weight read
    heads: list[tuple[str, str, int]] = dataclasses.field(default_factory=list)
    short: int = 0  # layers whose K is below the block size
    in_8_bits: int = 0  # layers held in the 8-bit fallback format
    unweighted: int = 0  # weights whose readers' inputs the calibration run did not observe
    gptq: Counter = dataclasses.field(default_factory=Counter)  # weights, columns, of which GPTQ's kept; not_2d
    passes: int = 0  # over the calibration data


def _find_targets(graph: ir.Graph, config: Int4WeightConfig, opset: int) -> tuple[list[WeightTarget], list[FloatNode]]:
    """The MatMul/Gemm nodes of ``graph`` and of its subgraphs (If branches, Loop and Scan bodies) to
    quantize, and those left float with the reason."""
    matched = {node: _match(node, config, opset) for node in graph.all_nodes() if eir.is_op(node, "MatMul", "Gemm")
               or (eir.is_op(node, "Gather") and _table(node) is not None)}
    _keep_read_tables_float(matched)
    targets, float_nodes = [], []
    for node, target in matched.items():
        if isinstance(target, str):
            float_nodes.append(FloatNode(node.name or node.op_type, node.op_type, target))
            continue
        targets.append(target)
        if is_excluded(node, config.exclude):  # kept out of int4, in 8 bits: with why
            float_nodes.append(FloatNode(node.name or node.op_type, node.op_type,
                                         f"excluded by config; {IN_8_BITS} ({target.weight_format.name}, "
                                         "--fallback int8)"))
    return targets, float_nodes


def _keep_read_tables_float(matched: dict[ir.Node, WeightTarget | str]) -> None:
    """Leave float the tables whose float32 values stay in the model anyway (another node reads them in float,
    a tied head kept float; or they are a graph output): a quantized copy beside them adds bytes and error."""
    changed = True
    while changed:
        changed = False
        reading = {(t.node, 0 if t.lowering is Lowering.GATHER_BLOCK_QUANTIZED else 1)
                   for t in matched.values() if isinstance(t, WeightTarget)}
        for node, target in matched.items():
            reader = (_float_reader(target.weight_value, reading) if isinstance(target, WeightTarget)
                      and target.lowering is Lowering.GATHER_BLOCK_QUANTIZED else None)
            if reader is not None:
                matched[node], changed = (f"its table stays in the model in float32 for {reader}: a "
                                          "GatherBlockQuantized copy beside it would add bytes, not save them"), True


def _float_reader(value: ir.Value, quantized: set[tuple[ir.Node, int]]) -> str | None:
    """What reads ``value`` in float once the ``quantized`` (node, input) pairs read it quantized, looking
    through Transpose/Identity; None when nothing does."""
    if value.is_graph_output():
        return f"the graph output {value.name!r}"
    for node, index in value.uses():
        if eir.is_op(node, "Transpose", "Identity"):
            found = _float_reader(node.outputs[0], quantized)
        else:
            found = None if (node, index) in quantized else f"{node.name or node.op_type} ({node.op_type})"
        if found is not None:
            return found
    return None


def _quantize_all(groups: Mapping[tuple, list[WeightTarget]], config: Int4WeightConfig, statistics: LayerStatistics,
                  done: _Lowered, memo: Int4Memo | None) -> dict[tuple, Rounded]:
    """Each distinct weight quantized (or found in ``memo``), and how, before the graph changes: the calibration
    passes that :meth:`StreamedStatistics.get` runs read the float model. An input's statistics go when done
    with."""
    unread = Counter(name for readers in groups.values() for name in reader_inputs(readers))
    quantized = {}
    for key, readers in groups.items():
        found = memo.weights.get((key, reader_inputs(readers))) if memo is not None else None
        quantized[key] = found or rounded(readers, config.block_size, config.gptq, statistics)
        if memo is not None:
            memo.weights[key, reader_inputs(readers)] = quantized[key]
        counts = quantized[key].counts
        done.unweighted += counts["unweighted"]
        done.gptq += Counter({name: counts[name] for name in ("weights", "columns", "kept", "not_2d")})
        unread.subtract(reader_inputs(readers))
        for name in {name for name in reader_inputs(readers) if unread[name] <= 0}:
            statistics.release(name)
    return quantized


def _lower_all(graph: ir.Graph, groups: Mapping[tuple, list[WeightTarget]], config: Int4WeightConfig,
               statistics: LayerStatistics, memo: Int4Memo | None) -> _Lowered:
    """Quantize each distinct weight once (``groups``: :func:`_by_weight`) and rewrite every node reading
    it; the new constants go to the main graph, which the subgraphs' nodes read too."""
    names, done = UniqueNames(graph), _Lowered(passes=len(statistics.streamed.passes))
    weights = _quantize_all(groups, config, statistics, done, memo)
    for key, readers in groups.items():  # a weight read by several nodes (tied embeddings) is stored once
        found = weights.pop(key)
        quantized, method = found.weight, found.method
        done.encodings[key] = _ENCODERS[key[0]](graph, names, readers[0].weight_value.name, quantized)
        for target in readers:
            node = target.node
            layer = target.activation is not None  # (read before the rewrite detaches the node's inputs)
            int4 = target.weight_format is config.weight_format and layer
            done.in_8_bits += target.weight_format is not config.weight_format and layer
            if int4 and node.graph is graph and node.outputs[0].is_graph_output():  # the head (a classifier, LM)
                done.heads.append((node.name or node.op_type, node.outputs[0].name, target.weight.nbytes))
            done.short += target.weight.shape[-2] < config.block_size  # K of the [..., K, N] weight
            # the weight (maybe via a Transpose), C; a Gather's table
            read = [v for v in (node.inputs[1:] if layer else node.inputs[:1]) if v is not None]
            if target.lowering is Lowering.MATMUL_NBITS:
                level = None if config.accuracy_level is None else int(config.accuracy_level)
                lower_matmul_nbits(graph, names, target, level, done.encodings[key])
            elif target.lowering is Lowering.GATHER_BLOCK_QUANTIZED:
                lower_gather_block_quantized(graph, names, target, done.encodings[key])
            else:
                lower_dequantize_linear(names, target, quantized, done.encodings[key])
            for value in read:  # the old weight, and a Gemm's bias moved into MatMulNBits' bias input
                drop_unread(value)
            done.counts[target.lowering] += 1
            done.tensors.append(_tensor_info(target, quantized, method))
            done.weights[target.weight_value] = target.weight.nbytes
    return done


@register_scheme(Int4WeightConfig)
def quantize_int4(model: ir.Model, config: Int4WeightConfig, data: Iterable[Batch] | None = None, *,
                  progress: ProgressCallback | None = None, memo: Int4Memo | None = None) -> QuantResult:
    """Int4 weight-only block quantization of MatMul/Gemm; see the module docstring. ``data``, when
    given, weighs each block's clipping search by the layer's input channels (:mod:`.int4_importance`),
    and GPTQ rounds against them (``config.gptq``, which needs it). ``memo``: what earlier quantizations of
    the same float model with the same data left (:class:`Int4Memo`; the accuracy search's rounds)."""
    if config.gptq and data is None:
        raise ConfigError("GPTQ (--gptq) rounds each weight against its layer's inputs on calibration data: "
                          "give --data (a folder of .npy, images, or module:function), or drop --gptq")
    passes = _float_passes(model, config)
    graph, opset = model.graph, eir.default_opset(model)
    targets, float_nodes = _find_targets(graph, config, opset)
    if not targets:
        reasons = "; ".join(f"{f.node_name}: {f.reason}" for f in float_nodes[:3]) or "the model has none"
        raise ModelError(f"no MatMul/Gemm weight to quantize ({reasons}): int4-weight quantizes the constant "
                         "weights of MatMul/Gemm only; use int8 or fp16 for this model")
    inside = sum(1 for target in targets if target.node.graph is not graph)  # before the rewrite removes them
    groups = _by_weight(targets)
    done = _lower_all(graph, groups, config, layer_statistics(model, groups, data, config.gptq, progress, memo), memo)
    if done.counts[Lowering.MATMUL_NBITS] or done.counts[Lowering.GATHER_BLOCK_QUANTIZED]:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    bytes_before = sum(done.weights.values())  # each float32 weight once, however many nodes read it
    bytes_after = sum(encoded.nbytes for encoded in done.encodings.values())
    notes = [*_summary_notes(config, done, bytes_before, bytes_after, weighted=data is not None),
             *_gptq_note(done), *_subgraph_note(inside), *passes, *_kept_note(float_nodes),
             *_still_float_note(graph, done.weights), *uncovered_weights_note(graph),
             *_head_and_block_notes(config, done)]
    logger.info("int4: %s", notes[0])
    details = {"matmul_nbits": done.counts[Lowering.MATMUL_NBITS],
               "dequantize_linear": done.counts[Lowering.DEQUANTIZE_LINEAR],
               "gather_block_quantized": done.counts[Lowering.GATHER_BLOCK_QUANTIZED],
               "weight_bytes_before": bytes_before, "weight_bytes_after": bytes_after}
    return QuantResult(model=model, scheme="int4", tensors=tuple(done.tensors), float_nodes=tuple(float_nodes),
                       notes=tuple(notes), config=config, details=details)


def _summary_notes(config: Int4WeightConfig, done: _Lowered, bytes_before: int, bytes_after: int, *,
                   weighted: bool) -> list[str]:
    fmt, counts = config.weight_format, done.counts
    tables = counts[Lowering.GATHER_BLOCK_QUANTIZED]
    layers = sum(key[0] is not Lowering.GATHER_BLOCK_QUANTIZED for key in done.encodings)
    if not layers:
        search = ""
    elif not weighted:
        search = " (--data would weigh it by each layer's input channels)"
    elif done.unweighted == layers:
        search = (" (not weighted: every layer reads an input computed inside a subgraph, which the calibration "
                  "run does not observe)")
    elif done.unweighted:
        search = (f", weighted by each layer's input channels on the calibration data, except for "
                  f"{count_of(done.unweighted, 'weight', 'weights')} whose readers' inputs the calibration run "
                  "does not observe (inside subgraphs)")
    else:
        search = ", weighted by each layer's input channels on the calibration data"
    in_8_bits = (f"; {done.in_8_bits} of these, kept out of int4, in 8 bits ({config.fallback_format.name}, "
                 "--fallback int8)" if done.in_8_bits else "")
    return [
        f"int4 weight-only ({fmt.name}, {'symmetric' if fmt.symmetric else 'asymmetric with zero points'}, "
        f"blocks of {config.block_size} along K): {counts[Lowering.MATMUL_NBITS]} MatMul/Gemm -> "
        f"MatMulNBits (ONNX Runtime com.microsoft), {counts[Lowering.DEQUANTIZE_LINEAR]} -> "
        f"DequantizeLinear + MatMul"
        + (f", {count_of(tables, 'Gather', 'Gathers')} of embedding tables -> GatherBlockQuantized, each row "
           f"in blocks ({_table_formats(done)})" if tables else "")
        + f"{in_8_bits}; weights {bytes_before} -> {bytes_after} bytes with scales",
        "block scales: clipping searched per block for the least weight error" + search
        + ("; a table's rows unweighted: they are looked up, not multiplied" if tables else ""),
        "activations and compute stay float32" + (
            "" if config.accuracy_level is None
            else f"; MatMulNBits accuracy_level={int(config.accuracy_level)} ({config.accuracy_level.name})"),
    ]


def _table_formats(done: _Lowered) -> str:
    """The formats the embedding tables are held in, and how to change them."""
    formats = sorted({info.format for info in done.tensors if info.op_type == "Gather"})
    return f"{', '.join(formats)}; --embeddings int8, int4 or float"


def _gptq_note(done: _Lowered) -> list[str]:
    gptq = done.gptq
    if not gptq:
        return []
    kept = (f" ({gptq['kept']} of {gptq['columns']} columns; the others kept the clip search's rounding, whose "
            "output error on the calibration data was smaller)")
    skipped = (f"; the clip search's rounding for {count_of(gptq['not_2d'], 'weight', 'weights')} of rank > 2 "
               "(DequantizeLinear)" if gptq["not_2d"] else "")
    passes = (f"; the input correlations took {done.passes} passes over the calibration data, to hold at most "
              f"{GRAM_BUDGET_BYTES / 2**30:g} GiB of them at a time" if done.passes > 1 else "")
    return [f"GPTQ rounding: {count_of(gptq['weights'], 'weight', 'weights')}{kept if gptq['weights'] else ''}"
            f"{skipped}{passes}"]


def _subgraph_note(inside: int) -> list[str]:
    return [f"{inside} of the quantized MatMul/Gemm are inside control-flow subgraphs (If branches, Loop/Scan "
            "bodies); their int4 weights are stored in the main graph, which the subgraphs read"] if inside else []


def _head_and_block_notes(config: Int4WeightConfig, done: _Lowered) -> list[str]:
    return [
        *[f"{name} writes the model output {output!r} with int4 weights: the last layer is often where int4 costs "
          f"the most accuracy; --exclude {name} keeps it float ({nbytes:,} bytes of float32 weights)"
          for name, output, nbytes in done.heads],
        *([f"{count_of(done.short, 'layer has', 'layers have')} K below the block size {config.block_size}: "
           "each of their columns is one block padded to full size, so a smaller --block-size stores them in "
           "fewer bytes"] if done.short else []),
    ]

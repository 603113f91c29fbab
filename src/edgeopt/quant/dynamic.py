"""Dynamic int8: weights quantized ahead of time, each activation when it is computed.

For ``y = x @ W`` with a constant ``W [K, N]`` (a MatMul, or a Gemm with ``transA = 0``: ``alpha`` and
``transB`` folded into W, ``beta * C`` into a bias), W is stored in int8, symmetric, one scale per output
column (``PerChannel``, the default) or one for the whole weight (``PerTensor``), in ``[-127, 127]``. At run
time the input is quantized to uint8 over its own range, per tensor and per run::

    x_q, x_scale, x_zp = DynamicQuantizeLinear(x)
    y = Cast(MatMulInteger(x_q, W_q, x_zp, 0), float) * (x_scale * w_scale) [+ bias]

which ONNX Runtime fuses into one ``DynamicQuantizeMatMul`` (u8 x s8 integer kernels, VNNI where the CPU
has it). MatMuls reading the same input share one DynamicQuantizeLinear. No calibration data is needed: a
range is measured on each input as it runs, so there is no clipping to choose and nothing to go stale when
the inputs change (sequence lengths, prompts). That is what suits transformers, whose activations swing
from one input to the next; convolutions are left float (integer convolution without fused requantization
is slower than float in ONNX Runtime): quantize those statically (``Int8Config``, with data).

ONNX Runtime's fused ``Attention`` (its transformer optimizer's) becomes its ``QAttention``
(:mod:`edgeopt.quant.dynamic_attention`). LSTM layers become ONNX Runtime's ``DynamicQuantizeLSTM``
(:mod:`edgeopt.quant.dynamic_lstm`): int8 weights, each step's input and hidden state quantized as it runs;
GRU and RNN have no such form and stay float.

Embedding tables (a Gather of the rows of a constant 2-D float table, when nothing else reads the table in
float) are stored in int8 with one scale per row: ``Gather(E_q) -> Cast -> Mul(Gather(row scales))``.

With ``smoothquant_alpha`` (and calibration data), SmoothQuant first moves the outlier channels of the
MatMul/Gemm inputs into the weights (:mod:`edgeopt.quant.smoothquant`): a per-tensor run-time scale is set by
its largest channel, so a few 50x channels leave the others a handful of levels. Where ``X / s`` cannot be
folded into the op computing X (a post-norm LayerNorm whose output the residual reads too), a ``Mul`` by
``1 / s`` is inserted before the layers: DynamicQuantizeLinear reads its output, so the smoothing holds
(in a static QDQ model that Mul's input would be quantized as it is, which is why int8 does not insert it).

The MatMul/Gemm nodes of control-flow subgraphs (If branches, Loop and Scan bodies: a merged decoder's
layers) are rewritten the same way, their int8 weights stored in the main graph, which subgraphs read.
Everything else stays float and is listed with the reason: MatMuls of two activations (attention's scores),
weights not float32, and excluded nodes. A MatMul's weight may be a vector ``[K]`` (one scale) or a stack
``[..., K, N]`` (one scale per column of each matrix).
The float-exact passes of the weight-only schemes run first (constant folding, BatchNorm folding, dead-code
elimination), so an exporter's ``Transpose(W)`` becomes a constant the rewrite can quantize.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import Counter
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt._scalars import plain_fields
from edgeopt.errors import ConfigError, ModelError
from edgeopt.metrics import count_of
from edgeopt.quant.calibrate import calibrate
from edgeopt.quant.config import (CalibrationConfig, PerChannel, PerTensor, check_exclude_names,
                                  check_smoothquant_alpha, is_excluded, require_bools)
from edgeopt.quant.dynamic_attention import AttentionWeights, attention_refusal, lower_attention
from edgeopt.quant.dynamic_lstm import LoweredLstm, lower_lstm, lstm_refusal
from edgeopt.quant.float16 import UniqueNames, weight_only_float_passes
from edgeopt.quant.formats import INT8_SYMMETRIC, UINT8
from edgeopt.quant.int4_lowering import MS_DOMAIN, drop_unread, gemm_as_matmul, read_constant, uncovered_weights_note
from edgeopt.quant.primitives import quantize_per_channel
from edgeopt.quant.rescaled import record_rescaled
from edgeopt.quant.registry import Batch, FloatNode, ProgressCallback, QuantResult, TensorQuantInfo, register_scheme
from edgeopt.quant.smoothquant import ChannelAbsMaxHook, smooth, smoothing_inputs

__all__ = ["DynamicInt8Config", "quantize_dynamic_int8", "warn_mostly_float"]

logger = logging.getLogger(__name__)

SCHEME = "int8-dynamic"
_OPSET = 11  # DynamicQuantizeLinear
_EINSUM_REASON = ("an Einsum with a constant operand that is no dense layer x @ W (the float passes make those "
                  "MatMuls): dynamic int8 has no Einsum form")


_EMBEDDING_WORDS = {"int8": True, "float": False}  # the CLI's words for the embeddings flag


@dataclasses.dataclass(frozen=True, kw_only=True)
class DynamicInt8Config:
    """Dynamic int8 quantization of MatMul/Gemm (and embedding tables); see the module docstring.

    ``weight_granularity``: ``PerChannel()`` (one scale per output column) or ``PerTensor()``.
    ``exclude``: node names or op types to leave float. ``embeddings``: store the tables Gather nodes read
    in int8 (per row; True or ``"int8"``, False or ``"float"`` as ``--embeddings`` says).
    ``smoothquant_alpha``: migrate activation outliers into the weights first (needs
    calibration data; 0.5 is the paper's). ``float_passes``: fold constants and BatchNorm, drop dead nodes
    first (False: quantize the graph as it is).
    """

    weight_granularity: PerChannel | PerTensor = PerChannel()
    exclude: tuple[str, ...] = ()
    embeddings: bool = True
    smoothquant_alpha: float | None = None
    float_passes: bool = True

    def __post_init__(self) -> None:
        plain_fields(self)
        if not isinstance(self.weight_granularity, (PerChannel, PerTensor)) or (
                isinstance(self.weight_granularity, PerChannel) and self.weight_granularity.axis is not None):
            raise ConfigError("weight_granularity of int8-dynamic must be PerChannel() (one scale per output "
                              f"column) or PerTensor(), got {self.weight_granularity!r}")
        if isinstance(self.embeddings, str) and self.embeddings.lower() in _EMBEDDING_WORDS:  # --embeddings int8|float
            object.__setattr__(self, "embeddings", _EMBEDDING_WORDS[self.embeddings.lower()])
        require_bools(self, "embeddings", "float_passes")
        check_smoothquant_alpha(self.smoothquant_alpha)
        object.__setattr__(self, "exclude", check_exclude_names(self.exclude))

    @property
    def fits_data(self) -> bool:
        """Whether the calibration data shapes the model (SmoothQuant's scales); else it only checks it."""
        return self.smoothquant_alpha is not None

    @property
    def per_channel(self) -> bool:
        return isinstance(self.weight_granularity, PerChannel)


# ---------------------------------------------------------------------------
# which nodes
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Layer:
    """A MatMul/Gemm to rewrite: its ``[K, N]`` weight as it multiplies, and what is added after."""

    node: ir.Node
    weight_value: ir.Value  # the constant as stored
    weight: np.ndarray  # [K, N]
    n_axis: int  # the N axis of the stored constant (for the report)
    bias: np.ndarray | None = None
    addend: ir.Value | np.ndarray | None = None


def _float_input(node: ir.Node) -> str | None:
    value = node.inputs[0] if node.inputs else None
    if value is None:
        return "it has no input"
    if value.type is not None and value.type.dtype not in (ir.DataType.FLOAT, None):
        return f"its input is {value.type.dtype.name}, not float32: DynamicQuantizeLinear reads float32"
    return None  # a vector input too: MatMulInteger takes MatMul's shapes, and ONNX Runtime fuses it all the same


def _match(node: ir.Node, config: DynamicInt8Config) -> _Layer | str:
    if is_excluded(node, config.exclude):
        return "excluded by config"
    source = read_constant(node.inputs[1] if len(node.inputs) > 1 else None)
    if source is None and read_constant(node.inputs[0] if node.inputs else None) is not None:
        return "its constant is the left-hand input (W @ x): dynamic int8 is written for x @ W"
    if source is None:
        return ("both of its inputs are computed (attention's scores and context): dynamic int8 needs a "
                "constant weight")
    refusal = _float_input(node)
    if refusal is not None:
        return refusal
    weight = source.array
    if weight.dtype != np.float32:
        return f"its weight is {weight.dtype}, not float32"
    if node.op_type == "Gemm":
        gemm = gemm_as_matmul(node, weight)
        if isinstance(gemm, str):
            return gemm
        n_axis = source.axes[1 - gemm.k_axis]
        layer = _Layer(node=node, weight_value=source.value, weight=gemm.weight, n_axis=n_axis, bias=gemm.bias,
                       addend=gemm.addend)
    else:  # [K, N]; [K] (one column) or [..., K, N] (a stack of matrices) too
        layer = _Layer(node=node, weight_value=source.value, weight=weight, n_axis=source.axes[-1])
    if not np.isfinite(layer.weight).all():
        return "its weight holds inf or NaN, which no int8 scale can represent"
    return layer


def _table(node: ir.Node) -> np.ndarray | None:
    """A Gather's constant float32 2-D table read along axis 0 (an embedding), or None."""
    table = eir.constant_array(node.inputs[0]) if node.inputs and node.inputs[0] is not None else None
    if table is None or table.dtype != np.float32 or table.ndim != 2:
        return None
    return table if node.attributes.get_int("axis", 0) in (0, -2) else None


def _table_refusal(node: ir.Node, table: np.ndarray, config: DynamicInt8Config) -> str | None:
    if not config.embeddings:
        return "an embedding table, kept float by config (--embeddings float)"
    if is_excluded(node, config.exclude):
        return "excluded by config"
    if not np.isfinite(table).all():
        return "its table holds inf or NaN, which no int8 scale can represent"
    if table.shape[1] < 2:
        return "its rows hold one value each: an int8 value and its row's scale take more bytes than float32"
    value = node.inputs[0]
    if value.is_graph_output():
        return f"its table is the graph output {value.name!r} too: an int8 copy beside it would add bytes"
    other = next((use.node for use in value.uses() if not _is_table_read(use.node)), None)
    if other is not None:
        return (f"its table stays in the model in float32 for {other.name or other.op_type} ({other.op_type}): "
                "an int8 copy beside it would add bytes, not save them")
    return None


def _is_table_read(node: ir.Node) -> bool:
    return eir.is_op(node, "Gather") and _table(node) is not None


# ---------------------------------------------------------------------------
# the rewrite
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Weight:
    """A weight's int8 constants (shared by every node reading the same weight): symmetric, so no zero point
    (MatMulInteger's is 0 when left out)."""

    q: ir.Value
    scale: ir.Value
    nbytes: int
    scales: np.ndarray  # for the report
    value_range: tuple[float, float]  # of the float weight (not kept: a large model's would double its memory)


class _Rewriter:
    def __init__(self, graph: ir.Graph, config: DynamicInt8Config) -> None:
        self.graph, self.config, self.names = graph, config, UniqueNames(graph)
        # per graph: an If's two branches each quantize an outer value they read
        self.quantized_inputs: dict[tuple[ir.Graph, ir.Value], tuple[ir.Value, ir.Value, ir.Value]] = {}
        self.weights: dict[tuple, _Weight] = {}
        self.float_bytes: dict[ir.Value, int] = {}  # each float weight read, once
        self.tensors: list[TensorQuantInfo] = []
        self.counts: Counter = Counter()

    def weight(self, layer: _Layer) -> _Weight:
        """The int8 constants of ``layer``'s weight, made once per distinct weight."""
        key = (layer.weight.shape, hashlib.sha256(layer.weight.tobytes()).hexdigest())
        found = self.weights.get(key)
        if found is None:
            q, scale = _quantized_weight(layer.weight, self.config.per_channel)
            base = layer.weight_value.name or "weight"
            values = (eir.register_array(self.graph, self.names(f"{base}_quantized"), q),
                      eir.register_array(self.graph, self.names(f"{base}_scale"), scale.astype(np.float32)))
            nbytes = sum(value.const_value.nbytes for value in values)
            found = self.weights[key] = _Weight(*values, nbytes=nbytes, scales=scale,
                                                value_range=(float(layer.weight.min()), float(layer.weight.max())))
        self.float_bytes[layer.weight_value] = layer.weight_value.const_value.nbytes
        return found

    def quantized_input(self, value: ir.Value, graph: ir.Graph) -> tuple[ir.Value, ir.Value, ir.Value]:
        """``DynamicQuantizeLinear(value)``'s outputs, one node per input (in each graph that reads it) however
        many layers read it."""
        found = self.quantized_inputs.get((graph, value))
        if found is None:
            base = value.name or "input"
            node = ir.Node("", "DynamicQuantizeLinear", [value], num_outputs=3,
                           name=self.names(f"{base}_DynamicQuantizeLinear"))
            for output, suffix in zip(node.outputs, ("quantized", "scale", "zero_point")):
                output.name = self.names(f"{base}_{suffix}")
            _insert_after_producer(graph, value, node)
            found = self.quantized_inputs[graph, value] = tuple(node.outputs)
            self.counts["DynamicQuantizeLinear"] += 1
        return found

    def rewrite(self, layer: _Layer) -> None:
        node, graph = layer.node, layer.node.graph
        weight = self.weight(layer)
        x_q, x_scale, x_zero_point = self.quantized_input(node.inputs[0], graph)
        label = node.name or node.op_type
        product = ir.Node("", "MatMulInteger", [x_q, weight.q, x_zero_point], num_outputs=1,
                          name=self.names(f"{label}_MatMulInteger"))
        cast = ir.Node("", "Cast", [product.outputs[0]], [ir.AttrInt64("to", ir.DataType.FLOAT)], num_outputs=1,
                       name=self.names(f"{label}_Cast"))
        scales = ir.Node("", "Mul", [x_scale, weight.scale], num_outputs=1, name=self.names(f"{label}_scales"))
        scaled = ir.Node("", "Mul", [cast.outputs[0], scales.outputs[0]], num_outputs=1,
                         name=self.names(f"{label}_rescale"))
        new_nodes = [product, cast, scales, scaled]
        for new, suffix in ((product, "int32"), (cast, "int32_float"), (scales, "scales")):
            new.outputs[0].name = self.names(f"{node.outputs[0].name}_{suffix}")
        addend = layer.bias if layer.bias is not None else layer.addend
        if isinstance(addend, np.ndarray):
            addend = eir.register_array(self.graph, self.names(f"{label}_bias"), addend)
        if addend is not None:
            scaled.outputs[0].name = self.names(f"{node.outputs[0].name}_product")
            new_nodes.append(ir.Node("", "Add", [scaled.outputs[0], addend], num_outputs=1,
                                     name=self.names(f"{label}_bias_add")))
        read = [v for v in node.inputs[1:] if v is not None]
        ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [node.outputs[0]],
                                                [new_nodes[-1].outputs[0]])
        for value in read:
            drop_unread(value)
        self.counts[node.op_type] += 1
        self.tensors.append(TensorQuantInfo.symmetric_weight(
            layer.weight_value.name, node.op_type, INT8_SYMMETRIC.name, weight.value_range, weight.scales,
            layer.n_axis if self.config.per_channel else None))

    def rewrite_table(self, node: ir.Node, table: np.ndarray) -> None:
        """``Gather(E, ids)`` as ``Cast(Gather(E_q, ids)) * Gather(row scales, ids)``, E_q int8 per row."""
        table_value = node.inputs[0]
        key = ("table", table.shape, hashlib.sha256(table.tobytes()).hexdigest())
        found = self.weights.get(key)
        if found is None:
            q, scale, _ = quantize_per_channel(table, 0, INT8_SYMMETRIC)
            base = table_value.name or "table"
            values = (eir.register_array(self.graph, self.names(f"{base}_quantized"), q),
                      eir.register_array(self.graph, self.names(f"{base}_row_scale"), scale.reshape(-1, 1)))
            found = self.weights[key] = _Weight(*values, nbytes=q.nbytes + scale.nbytes, scales=scale,
                                                value_range=(float(table.min()), float(table.max())))
        self.float_bytes[table_value] = table_value.const_value.nbytes
        label, output = node.name or "Gather", node.outputs[0].name
        axis = [ir.AttrInt64("axis", 0)]
        rows = ir.Node("", "Gather", [found.q, node.inputs[1]], axis, num_outputs=1, name=self.names(f"{label}_int8"))
        cast = ir.Node("", "Cast", [rows.outputs[0]], [ir.AttrInt64("to", ir.DataType.FLOAT)], num_outputs=1,
                       name=self.names(f"{label}_Cast"))
        scales = ir.Node("", "Gather", [found.scale, node.inputs[1]], axis, num_outputs=1,
                         name=self.names(f"{label}_scales"))
        scaled = ir.Node("", "Mul", [cast.outputs[0], scales.outputs[0]], num_outputs=1,
                         name=self.names(f"{label}_rescale"))
        for new, suffix in ((rows, "int8"), (cast, "int8_float"), (scales, "row_scales")):
            new.outputs[0].name = self.names(f"{output}_{suffix}")
        ir.convenience.replace_nodes_and_values(node.graph, node, [node], [rows, cast, scales, scaled],
                                                [node.outputs[0]], [scaled.outputs[0]])
        drop_unread(table_value)
        self.counts["table"] += 1
        self.tensors.append(TensorQuantInfo.symmetric_weight(
            table_value.name, "Gather", INT8_SYMMETRIC.name, found.value_range, found.scales, 0))


def _quantized_weight(weight: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes and scales of a ``[K, N]`` weight: one scale per output column (``[N]``) or one in all. A
    vector ``[K]`` is one column (a scalar scale); a stack ``[..., K, N]`` has one per column of each matrix, shaped
    ``[..., 1, N]`` to broadcast over the product (ONNX Runtime's DynamicQuantizeMatMul takes that shape)."""
    if not per_channel or weight.ndim == 1:
        q, scale, _ = quantize_per_channel(weight, None, INT8_SYMMETRIC)
        return q, scale.reshape(())  # [K] @ [K] is a scalar: so stays its product
    if weight.ndim == 2:
        q, scale, _ = quantize_per_channel(weight, 1, INT8_SYMMETRIC)
        return q, scale
    columns = np.swapaxes(weight, -1, -2)  # [..., N, K]
    q, scale, _ = quantize_per_channel(columns.reshape(-1, weight.shape[-2]), 0, INT8_SYMMETRIC)
    return np.swapaxes(q.reshape(columns.shape), -1, -2), scale.reshape(*weight.shape[:-2], 1, weight.shape[-1])


def _insert_after_producer(graph: ir.Graph, value: ir.Value, node: ir.Node) -> None:
    """Put ``node`` (reading ``value``) right after the node that computes ``value``, or first."""
    producer = value.producer()
    if producer is not None and producer.graph is graph:
        graph.insert_after(producer, node)
    elif len(graph):
        graph.insert_before(next(iter(graph)), node)
    else:
        graph.append(node)


# ---------------------------------------------------------------------------
# the scheme
# ---------------------------------------------------------------------------


def _smoothed(model: ir.Model, config: DynamicInt8Config, data: Iterable[Batch] | None,
              progress: ProgressCallback | None) -> list[str]:
    if config.smoothquant_alpha is None:
        return []
    if data is None:
        raise ConfigError("SmoothQuant (--smoothquant) measures each channel's range on calibration data: give "
                          "--data (a folder of .npy, images, or module:function), or drop --smoothquant")
    hook = ChannelAbsMaxHook(smoothing_inputs(model))
    if not hook.tensors:
        return ["SmoothQuant: no MatMul/Gemm with a constant weight reads an activation: nothing to smooth"]
    calibrate(model, data, list(hook.tensors), CalibrationConfig(), hooks=[hook], progress=progress)
    # where X / s cannot be folded into X's producer (a post-norm LayerNorm whose output the residual reads
    # too), a Mul by 1 / s: its output is what DynamicQuantizeLinear reads, so the smoothing holds
    report = smooth(model, hook.result(), alpha=config.smoothquant_alpha, insert_mul=True)
    record_rescaled(model, report.rescaled)  # the tensors now divided by s, for compare to undo
    notes = [f"SmoothQuant (alpha {config.smoothquant_alpha:g}): "
             f"{count_of(len(report.smoothed), 'input', 'inputs')} smoothed, {len(report.skipped)} skipped"]
    return notes + [f"not smoothed: {reason}" for _, reason in report.skipped[:5]]


def _lower_attention(graph: ir.Graph, config: DynamicInt8Config, rewriter: _Rewriter,
                     float_nodes: list[FloatNode]) -> list[tuple[TensorQuantInfo, int]]:
    """Each of ONNX Runtime's fused Attention nodes as QAttention (:mod:`edgeopt.quant.dynamic_attention`), its
    input quantized by the DynamicQuantizeLinear the layers share; the others listed float with why. Each
    weight's report and the bytes its int8 constants add (a weight several read, once)."""
    done, weights = [], AttentionWeights(graph, rewriter.names, config.per_channel)
    for node in list(graph.all_nodes()):
        if node.op_type != "Attention" or node.domain != MS_DOMAIN:
            continue
        refusal = "excluded by config" if is_excluded(node, config.exclude) else attention_refusal(node)
        if refusal is not None:
            float_nodes.append(FloatNode(node.name or node.op_type, node.op_type, refusal))
            continue
        weight = node.inputs[1]
        rewriter.float_bytes[weight] = weight.const_value.nbytes
        rewriter.counts["attention_inside"] += node.graph is not graph  # (before the rewrite detaches it)
        done.append(lower_attention(node, weights, rewriter.quantized_input))
    return done


def _lower_recurrent(graph: ir.Graph, config: DynamicInt8Config, names: UniqueNames,
                     float_nodes: list[FloatNode]) -> LoweredLstm:
    """Each LSTM as DynamicQuantizeLSTM (:mod:`edgeopt.quant.dynamic_lstm`); a GRU or RNN, or an LSTM that
    cannot be, listed float with why."""
    done = LoweredLstm()
    for node in list(graph.all_nodes()):
        if not eir.is_op(node, "LSTM", "GRU", "RNN"):
            continue
        refusal = ("excluded by config" if is_excluded(node, config.exclude)
                   else lstm_refusal(node) if node.op_type == "LSTM"
                   else f"ONNX Runtime has no quantized {node.op_type} (DynamicQuantizeLSTM is the LSTM's)")
        if refusal is None:
            lower_lstm(graph, names, node, config.per_channel, done)
        else:
            float_nodes.append(FloatNode(node.name or node.op_type, node.op_type, refusal))
    return done


def warn_mostly_float(result: QuantResult) -> None:
    """A warning (in the report) when more float32 weight bytes stay in ``result`` (a dynamic int8 one) than
    were quantized: a convolutional model, whose Conv weights dynamic int8 leaves alone (static int8
    quantizes them), or a GRU's (no int8 scheme quantizes those: static int8 is no advice there)."""
    quantized_bytes = result.details.get("weight_bytes_before")
    if quantized_bytes is None:  # (the accuracy search's round with every layer back in float)
        return
    # (a DynamicQuantizeLSTM's float matrices are its weights' scales and its bias, [D, 4H] and [D, 8H])
    kept = [value for value in result.model.graph.initializers.values()
            if value.const_value is not None and value.dtype == ir.DataType.FLOAT and len(value.shape or ()) >= 2
            and not any(use.node.op_type == "DynamicQuantizeLSTM" for use in value.uses())]
    kept_bytes = sum(value.const_value.nbytes for value in kept)
    if kept_bytes <= quantized_bytes:
        return
    readers = sorted({use.node.op_type for value in kept for use in value.uses()})
    advice = ("--scheme int8 with --data quantizes convolutions too" if {"Conv", "ConvTranspose"} & set(readers)
              else f"those {', '.join(readers)} reads stay float (the notes say why): --scheme fp16 halves them")
    logger.warning("most of the weights stay float32 (%s of %s bytes, listed in the notes): %s quantizes "
                   "MatMul/Gemm layers; %s", f"{kept_bytes:,}", f"{kept_bytes + quantized_bytes:,}", SCHEME, advice)


def _kept_note(float_nodes: Iterable[FloatNode]) -> list[str]:
    groups = Counter((node.op_type, node.reason) for node in float_nodes)
    return ["left float: " + "; ".join(f"{op} x{count} ({reason})" for (op, reason), count in sorted(groups.items()))
            ] if groups else []


@register_scheme(DynamicInt8Config)
def quantize_dynamic_int8(model: ir.Model, config: DynamicInt8Config, data: Iterable[Batch] | None = None, *,
                          progress: ProgressCallback | None = None, warn: bool = True) -> QuantResult:
    """Dynamic int8 of MatMul/Gemm weights and embedding tables; see the module docstring. ``data`` is
    needed only for SmoothQuant (``config.smoothquant_alpha``). ``warn``: log :func:`warn_mostly_float`'s
    warning (the accuracy search says it of the model it keeps only, not of every round)."""
    opset = eir.default_opset(model)
    if opset < _OPSET:
        raise ModelError(f"the model has opset {opset}; {SCHEME} writes DynamicQuantizeLinear, which needs opset "
                         f"{_OPSET}: export the model at opset {_OPSET} or later")
    notes = weight_only_float_passes(model, config.exclude, run=config.float_passes, subgraphs=True)
    notes += _smoothed(model, config, data, progress)
    graph = model.graph
    layers, float_nodes = [], []
    for node in list(graph.all_nodes()):
        if eir.is_op(node, "MatMul", "Gemm"):
            found = _match(node, config)
            if isinstance(found, str):
                float_nodes.append(FloatNode(node.name or node.op_type, node.op_type, found))
            else:
                layers.append(found)
        elif eir.is_op(node, "Einsum") and any(eir.is_constant(value) for value in node.inputs if value is not None):
            float_nodes.append(FloatNode(node.name or node.op_type, node.op_type, _EINSUM_REASON))
    inside = sum(layer.node.graph is not graph for layer in layers)  # before the rewrite detaches them
    rewriter = _Rewriter(graph, config)
    for layer in layers:
        rewriter.rewrite(layer)
    attention = _lower_attention(graph, config, rewriter, float_nodes)
    lstms = _lower_recurrent(graph, config, rewriter.names, float_nodes)
    tables = [node for node in list(graph.all_nodes()) if _is_table_read(node)]
    for node in tables:  # after the layers: a tied head quantized above no longer reads its table in float
        refusal = _table_refusal(node, _table(node), config)
        if refusal is None:
            rewriter.rewrite_table(node, _table(node))
        else:
            float_nodes.append(FloatNode(node.name or node.op_type, node.op_type, refusal))
    if not layers and not lstms.tensors and not attention:
        reasons = "; ".join(f"{f.node_name}: {f.reason}" for f in float_nodes[:3]) or "the model has none"
        convolutions = any(eir.is_op(node, "Conv", "ConvTranspose") for node in graph.all_nodes())
        raise ModelError(f"no MatMul/Gemm with a constant weight to quantize ({reasons}): {SCHEME} quantizes the "
                         "weights of MatMul/Gemm layers; "
                         + ("for convolutions use --scheme int8 with --data" if convolutions
                            else "use --scheme int8 with --data, or fp16, for this model"))
    counts = rewriter.counts
    bytes_before = sum(rewriter.float_bytes.values()) + lstms.float_bytes
    bytes_after = (sum(weight.nbytes for weight in rewriter.weights.values()) + lstms.int8_bytes
                   + sum(added_bytes for _, added_bytes in attention))
    if lstms.tensors or attention:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    granularity = "per output column" if config.per_channel else "per tensor"
    notes = [
        f"dynamic int8: {counts['MatMul']} MatMul and {counts['Gemm']} Gemm -> DynamicQuantizeLinear + "
        f"MatMulInteger (ONNX Runtime fuses them into DynamicQuantizeMatMul), "
        f"{count_of(counts['DynamicQuantizeLinear'], 'input', 'inputs')} quantized at run time"
        + (f", {count_of(counts['table'], 'embedding table', 'embedding tables')} in int8 per row"
           if counts["table"] else "")
        + (f", {count_of(len(attention), 'Attention', 'Attentions')} -> QAttention (com.microsoft; 7-bit "
           "weights, as ONNX Runtime writes them)" if attention else "")
        + (f", {count_of(lstms.count, 'LSTM', 'LSTMs')} -> DynamicQuantizeLSTM (com.microsoft)"
           if lstms.tensors else "") + f"; weights {bytes_before} -> {bytes_after} bytes with scales",
        f"weights int8 symmetric {granularity}; activations {UINT8.name} asymmetric per tensor, each range "
        "measured as the model runs (no calibration)",
        *([f"{inside} of them inside control-flow subgraphs (If branches, Loop/Scan bodies), each quantizing its "
            "inputs there; their int8 weights are stored in the main graph"] if inside else []),
        *([f"{count_of(counts['attention_inside'], 'Attention', 'Attentions')} inside control-flow subgraphs, "
           "their int8 weights stored in the main graph"] if counts["attention_inside"] else []),
        *notes, *_kept_note(float_nodes), *uncovered_weights_note(graph, SCHEME)]
    logger.info("%s: %s", SCHEME, notes[0])
    details = {"matmul": counts["MatMul"], "gemm": counts["Gemm"], "tables": counts["table"],
               "lstm": lstms.count, "attention": len(attention), "dynamic_inputs": counts["DynamicQuantizeLinear"],
               "weight_bytes_before": bytes_before, "weight_bytes_after": bytes_after}
    result = QuantResult(model=model, scheme=SCHEME,
                         tensors=(*rewriter.tensors, *(info for info, _ in attention), *lstms.tensors),
                         float_nodes=tuple(float_nodes), notes=tuple(notes), config=config, details=details)
    if warn:
        warn_mostly_float(result)
    return result

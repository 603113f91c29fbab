"""SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights.

For ``Y = X W`` (``X[..., K]``, ``W[K, N]``) and any ``s > 0`` per input
channel ``j``::

    Y = (X diag(s)^-1) (diag(s) W)

Transformer activations carry a few channels whose magnitude is 10-100x the
rest; a per-tensor activation scale is set by them and the other channels
get a handful of levels. With ``m_j = max |X_j|`` (calibration) and
``w_j = max_n |W_jn|`` (over every layer reading ``X``)::

    s_j = m_j ** alpha / w_j ** (1 - alpha)

channel ``j`` of ``X / s`` peaks at ``m_j^(1-alpha) w_j^(1-alpha)`` and row
``j`` of ``diag(s) W`` at ``m_j^alpha w_j^alpha`` (equal for ``alpha = 0.5``):
the outliers' range moves into the weights, which are quantized per output
channel and absorb it better. A channel with ``m_j = 0`` or ``w_j = 0`` keeps
``s_j = 1``.

``X / s`` costs nothing when folded into the op that produces ``X``, provided
``X`` is read only by the smoothed layers (else the other readers would see
``X / s``). Reshapes and Transposes that keep the last axis are looked through
(a Linear on ``[B, S, K]`` runs as a Gemm on rows ``Reshape(X, [-1, K])``;
``nn.TransformerEncoderLayer`` transposes to ``[S, B, K]`` for its attention). The producer:

* ``LayerNormalization`` over the last axis (the standard case, pre-norm
  attention and MLP blocks): ``gamma' = gamma / s``, ``beta' = beta / s``;
* a Mul by a constant per-channel vector, RMSNorm's weight
  (``x * rsqrt(mean(x^2) + eps) * w``, Llama's pre-norm blocks): ``w' = w / s``
  (not a scalar: GELU's ``* 0.5``, part of an activation kept whole);
* a MatMul/Gemm with a constant weight, optionally followed by an Add of a
  constant bias (an exported Linear): its output columns and bias ``/ s``.

Otherwise ``X`` is left alone and reported, or, with ``insert_mul=True``, a
``Mul(X, 1 / s)`` is inserted for the smoothed layers. That Mul's input is
quantized too in a QDQ model, so it helps only where that input stays float
or is quantized per channel; hence off by default.

Smoothed layers are MatMul with a constant 2-D weight and Gemm (``transA =
0``) with a constant ``B``, reading ``X`` as input 0. Every MatMul/Gemm
reading ``X`` shares one ``s`` (q, k and v after one LayerNorm). The float
function is unchanged up to rounding. Run before calibration; the channel
maxima come from a calibration pass of their own (:class:`ChannelAbsMaxHook`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.errors import ConfigError
from edgeopt.passes import PATTERN_KEY
from edgeopt.passes.rules import RMS_NORM
from edgeopt.quant.channel_stats import ChannelAbsMax, ChannelAbsMaxHook, ChannelAbsMaxObserver
from edgeopt.quant.rescaled import Rescaled

__all__ = [
    "ChannelAbsMax",
    "ChannelAbsMaxHook",
    "ChannelAbsMaxObserver",
    "SmoothReport",
    "SmoothedTensor",
    "smooth",
    "smoothing_inputs",
]

_SCALE_BOUNDS = (1e-5, 1e5)


# --------------------------------------------------------------------------
# which layers, and where X / s goes
# --------------------------------------------------------------------------


def _row_weight(node: ir.Node) -> np.ndarray | None:
    """The constant weight of a smoothable layer as ``[K, N]`` (K = input channels), else None."""
    if not eir.is_op(node, "MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return None
    weight = eir.constant_array(node.inputs[1])
    if weight is None or weight.ndim != 2 or not np.issubdtype(weight.dtype, np.floating):
        return None
    return weight.T if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else weight


def _targets(value: ir.Value) -> list[ir.Node]:
    return [node for node in eir.consumers(value) if node.inputs[0] is value and _row_weight(node) is not None]


def smoothing_inputs(model: ir.Model) -> dict[str, int]:
    """The activations SmoothQuant needs channel maxima of: tensor name -> channel axis (-1)."""
    tensors: dict[str, int] = {}
    for node in model.graph:
        if _row_weight(node) is not None and node.inputs[0] is not None and node.inputs[0].name:
            tensors.setdefault(node.inputs[0].name, -1)
    return tensors


@dataclass(frozen=True)
class _Site:
    """Where ``X / s`` is folded: ``kind`` is "LayerNormalization", "scale" (a Mul by a constant), "linear"
    or "Mul" (one inserted)."""

    kind: str
    node: ir.Node | None = None
    bias_add: ir.Node | None = None


def _layer_norm_refusal(node: ir.Node, channels: int) -> str | None:
    axis = node.attributes.get_int("axis", -1)
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    if axis != -1 and (rank is None or axis != rank - 1):
        return f"LayerNormalization {eir.node_label(node)!r} normalizes more than the last axis"
    for position in (1, 2):
        value = node.inputs[position] if len(node.inputs) > position else None
        array = eir.constant_array(value) if value is not None else np.zeros(1)
        if array is None or array.size not in (1, channels):
            return f"LayerNormalization {eir.node_label(node)!r} has a non-constant or non-vector scale/bias"
    return None


def _scale_index(node: ir.Node | None, channels: int) -> int | None:
    """The input of a Mul ``node`` holding a constant that ``1 / s`` can multiply: a vector along the last
    axis, no wider than the other input, which is not constant (RMSNorm's weight). Not a node of a
    fused activation's pattern; an annotated RMSNorm's gain may take it (the group stays float)."""
    pattern = node.metadata_props.get(PATTERN_KEY, RMS_NORM) if node is not None else None
    if not eir.is_op(node, "Mul") or len(node.inputs) != 2 or pattern != RMS_NORM:
        return None
    arrays = [eir.constant_array(v) if v is not None else None for v in node.inputs]
    if sum(array is not None for array in arrays) != 1:
        return None
    index = 0 if arrays[0] is not None else 1
    array, other = arrays[index], node.inputs[1 - index]
    if other is None or other.shape is None or array.ndim > len(other.shape):
        return None
    return index if channels > 1 and array.size == channels and array.shape[-1] == channels else None


def _linear_site(value: ir.Value, channels: int) -> _Site | None:
    """A MatMul/Gemm [+ Add(constant)] producing ``value`` whose output columns can take ``1 / s``."""
    producer, bias_add = value.producer(), None
    if eir.is_op(producer, "Add"):
        constants = [v for v in producer.inputs if eir.constant_array(v) is not None]
        others = [v for v in producer.inputs if eir.constant_array(v) is None]
        if len(constants) != 1 or len(others) != 1 or eir.constant_array(constants[0]).size not in (1, channels):
            return None
        if len(eir.consumers(others[0])) != 1 or others[0].is_graph_output():
            return None
        producer, bias_add = others[0].producer(), producer
    weight = _row_weight(producer) if producer is not None else None
    if weight is None or weight.shape[1] != channels:
        return None
    addend = producer.inputs[2] if producer.op_type == "Gemm" and len(producer.inputs) > 2 else None
    if addend is not None and eir.constant_array(addend) is None:  # a computed C cannot take 1 / s
        return None
    return _Site(kind="linear", node=producer, bias_add=bias_add)


def _value_readers(value: ir.Value) -> list[ir.Node]:
    """The nodes reading ``value``'s values: Shape and Size read only its shape, which scaling channels
    keeps (dynamic attention reshapes, GPT-2's Conv1D ``x.view(-1, x.size(-1))`` with ``x.size()[:-1]``)."""
    return [reader for reader in eir.consumers(value) if not eir.is_op(reader, "Shape", "Size")]


def _keeps_last_axis(source: ir.Value, value: ir.Value) -> bool:
    dims = [v.shape.dims[-1] if v.shape is not None and len(v.shape) else None for v in (source, value)]
    return isinstance(dims[0], int) and dims[0] == dims[1]


def _through_reshapes(value: ir.Value) -> ir.Value:
    """The tensor ``value`` is a reshaped copy of, through Reshapes and Transposes that keep the last axis
    (a Gemm's rows ``[-1, K]`` of ``[B, S, K]``; PyTorch's ``nn.MultiheadAttention`` taking ``[S, B, K]``
    from a batch-first encoder, perm ``[1, 0, 2]``) and whose input they alone read: channel ``j`` is the
    same channel in both, so dividing it at the source divides it in ``value``."""
    while eir.is_op(producer := value.producer(), "Reshape", "Transpose"):
        source = producer.inputs[0]
        if (source is None or source.is_graph_output() or len(_value_readers(source)) != 1
                or not _keeps_last_axis(source, value) or not _last_axis_stays(producer)):
            break
        value = source
    return value


def _last_axis_stays(node: ir.Node) -> bool:
    """A Reshape (its last axis checked by the shapes), or a Transpose whose perm leaves the last axis last."""
    if node.op_type != "Transpose":
        return True
    perm = node.attributes.get("perm")
    return perm is not None and list(perm.value)[-1] == len(perm.value) - 1


def _site(value: ir.Value, targets: list[ir.Node], channels: int, insert_mul: bool) -> _Site | str:
    origin = _through_reshapes(value)
    producer = origin.producer()
    readers = _value_readers(value)
    exclusive = len(readers) == len(targets) and not value.is_graph_output()
    reason = f"{value.name!r} is also read by nodes that are not smoothed" if not exclusive else None
    if exclusive and eir.is_op(producer, "LayerNormalization"):
        reason = _layer_norm_refusal(producer, channels)
        if reason is None:
            return _Site(kind="LayerNormalization", node=producer)
    elif exclusive and _scale_index(producer, channels) is not None:
        return _Site(kind="scale", node=producer)
    elif exclusive:
        site = _linear_site(origin, channels)
        if site is not None:
            return site
        source = f"{producer.op_type} {eir.node_label(producer)!r}" if producer is not None else "a graph input"
        reason = f"{value.name!r} comes from {source}, which cannot absorb 1/s"
        behind = producer.inputs[0] if eir.is_op(producer, "Reshape") and producer.inputs else None
        others = [r for r in _value_readers(behind) if r is not producer] if behind is not None else []
        if others:  # a Reshape edgeopt put before a Gemm, of a tensor others read too (a post-LN residual)
            reason = (f"{behind.name!r} is also read by {others[0].op_type} {eir.node_label(others[0])!r}, "
                      "which dividing it by s would change")
    return _Site(kind="Mul") if insert_mul else reason


# --------------------------------------------------------------------------
# the rewrite
# --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SmoothedTensor:
    """``tensor`` divided by s (folded into ``folded_into``) for ``layers``.

    Outlier ratio: ``max_j m_j / mean_j m_j`` of the channel maxima, before
    and after smoothing.
    """

    tensor: str
    layers: tuple[str, ...]
    folded_into: str
    outlier_ratio_before: float
    outlier_ratio_after: float


@dataclass(frozen=True, kw_only=True)
class SmoothReport:
    smoothed: tuple[SmoothedTensor, ...]
    skipped: tuple[tuple[str, str], ...]  # (tensor, reason)
    # the tensors divided by s per channel, from the folding site to the layers (see edgeopt.quant.rescaled)
    rescaled: Mapping[str, Rescaled] = field(default_factory=dict)

    @property
    def modified(self) -> bool:
        return bool(self.smoothed)

    def explain(self) -> list[str]:
        lines = [f"{s.tensor}: smoothed for {', '.join(s.layers)} into {s.folded_into} (outlier ratio "
                 f"{s.outlier_ratio_before:.1f} -> {s.outlier_ratio_after:.1f})" for s in self.smoothed]
        return lines + [f"{tensor}: not smoothed: {reason}" for tensor, reason in self.skipped]


def _scale_vector(scale: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``like`` (a per-channel or scalar constant) multiplied by ``scale`` along its last axis."""
    if like.size == 1:
        like = np.broadcast_to(like.reshape(()), scale.shape)
    return (like.astype(np.float64) * scale).astype(like.dtype)


def _scale_input(graph: ir.Graph, node: ir.Node, index: int, factors: np.ndarray, *, rows: bool) -> None:
    """Multiply constant input ``index`` of ``node`` by ``factors`` along rows or its last axis."""
    array = eir.constant_array(node.inputs[index])
    if rows:
        scaled = (array.astype(np.float64) * factors.reshape(-1, 1)).astype(array.dtype)
    else:
        scaled = _scale_vector(factors, array)
    eir.replace_constant_input(graph, node, index, scaled, node.inputs[index].name or eir.node_label(node))


def _scale_weight_rows(graph: ir.Graph, node: ir.Node, factors: np.ndarray) -> None:
    """``diag(factors) W`` for input channels: rows of ``[K, N]``, columns of Gemm's transposed ``B``."""
    transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
    array = eir.constant_array(node.inputs[1]).astype(np.float64)
    scaled = array * (factors.reshape(1, -1) if transposed else factors.reshape(-1, 1))
    eir.replace_constant_input(graph, node, 1, scaled.astype(eir.constant_array(node.inputs[1]).dtype),
                           node.inputs[1].name)


def _scale_output_columns(graph: ir.Graph, site: _Site, factors: np.ndarray) -> None:
    node = site.node
    transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
    _scale_input(graph, node, 1, factors, rows=bool(transposed))
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        _scale_input(graph, node, 2, factors, rows=False)
    if site.bias_add is not None:
        index = next(i for i, v in enumerate(site.bias_add.inputs) if eir.constant_array(v) is not None)
        _scale_input(graph, site.bias_add, index, factors, rows=False)


def _insert_mul(graph: ir.Graph, value: ir.Value, targets: list[ir.Node], factors: np.ndarray) -> str:
    constant = eir.add_initializer(graph, factors.astype(np.float32), f"{value.name}_smooth_scale")
    mul = ir.node("Mul", [value, constant], name=eir.unique_value_name(graph, f"{value.name}_smooth"))
    mul.outputs[0].name = eir.unique_value_name(graph, f"{value.name}_smoothed")
    first = min(targets, key=list(graph).index)
    graph.insert_before(first, [mul])
    for target in targets:
        target.replace_input_with(0, mul.outputs[0])
    return eir.node_label(mul)


def _apply(graph: ir.Graph, value: ir.Value, site: _Site, targets: list[ir.Node], scale: np.ndarray) -> str:
    """Rewrite the graph for ``X / s`` and ``diag(s) W``; return where ``1 / s`` went."""
    for target in targets:
        _scale_weight_rows(graph, target, scale)
    if site.kind == "LayerNormalization":
        for index in (1, 2):
            if len(site.node.inputs) > index and site.node.inputs[index] is not None:
                _scale_input(graph, site.node, index, 1.0 / scale, rows=False)
        return eir.node_label(site.node)
    if site.kind == "scale":
        _scale_input(graph, site.node, _scale_index(site.node, scale.size), 1.0 / scale, rows=False)
        return eir.node_label(site.node)
    if site.kind == "linear":
        _scale_output_columns(graph, site, 1.0 / scale)
        return eir.node_label(site.node)
    return _insert_mul(graph, value, targets, 1.0 / scale)


def _smoothing_scale(abs_max: np.ndarray, targets: list[ir.Node], alpha: float) -> np.ndarray:
    weight_max = np.max([np.abs(_row_weight(t)).max(axis=1) for t in targets], axis=0).astype(np.float64)
    live = (abs_max > 0) & (weight_max > 0)
    scale = np.ones_like(weight_max)
    scale[live] = np.clip(abs_max[live] ** alpha / weight_max[live] ** (1 - alpha), *_SCALE_BOUNDS)
    return scale


def _outlier_ratio(abs_max: np.ndarray) -> float:
    mean = float(np.mean(abs_max))
    return float(np.max(abs_max)) / mean if mean > 0 else 1.0


def _divided(value: ir.Value, site: _Site) -> list[str]:
    """The tensors that carry ``X / s`` once ``site`` absorbed ``1 / s``: ``value``, the tensors its
    Reshapes copy, up to the site's output (and before a linear site's bias Add). An inserted Mul
    writes a new tensor: the user's keep their scale."""
    if site.kind == "Mul":
        return []
    names = [value.name]
    origin = _through_reshapes(value)
    while value is not origin:
        value = value.producer().inputs[0]
        names.append(value.name)
    if site.bias_add is not None:
        names.append(site.node.outputs[0].name)
    return names


def _smooth_tensor(graph: ir.Graph, value: ir.Value, abs_max: np.ndarray | None, alpha: float,
                   insert_mul: bool, rescaled: dict[str, Rescaled]) -> SmoothedTensor | str:
    targets = _targets(value)
    channels = _row_weight(targets[0]).shape[0]
    if abs_max is None:
        return "no channel maxima for it"
    abs_max = np.asarray(abs_max, dtype=np.float64).reshape(-1)
    if abs_max.size != channels:
        return f"{abs_max.size} channel maxima for {channels} channels"
    site = _site(value, targets, channels, insert_mul)
    if isinstance(site, str):
        return site
    scale = _smoothing_scale(abs_max, targets, alpha)
    rescaled.update((name, Rescaled(-1, (1.0 / scale).astype(np.float32))) for name in _divided(value, site))
    folded_into = _apply(graph, value, site, targets, scale)
    return SmoothedTensor(tensor=value.name, layers=tuple(eir.node_label(t) for t in targets),
                          folded_into=folded_into, outlier_ratio_before=_outlier_ratio(abs_max),
                          outlier_ratio_after=_outlier_ratio(abs_max / scale))


def smooth(model: ir.Model, channel_abs_max: Mapping[str, np.ndarray], *, alpha: float = 0.5,
           insert_mul: bool = False) -> SmoothReport:
    """Migrate activation outliers of MatMul/Gemm inputs into their weights, in place.

    ``channel_abs_max`` maps an input tensor name to ``max |x|`` per channel
    (last axis), from :class:`ChannelAbsMaxHook` over :func:`smoothing_inputs`.
    Rewrites the model it is given (a copy the caller owns); the float
    function is unchanged up to rounding.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"SmoothQuant alpha must be in [0, 1], got {alpha!r}")
    values = {}
    for node in model.graph:
        if _row_weight(node) is not None and node.inputs[0] is not None:
            values.setdefault(id(node.inputs[0]), node.inputs[0])
    smoothed, skipped, rescaled = [], [], {}
    for value in values.values():
        outcome = _smooth_tensor(model.graph, value, channel_abs_max.get(value.name), alpha, insert_mul, rescaled)
        if isinstance(outcome, str):
            skipped.append((value.name, outcome))
        else:
            smoothed.append(outcome)
    return SmoothReport(smoothed=tuple(smoothed), skipped=tuple(skipped), rescaled=rescaled)

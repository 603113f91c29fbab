"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization").

Two linear layers with a positive-homogeneous activation ``f`` between them
(``f(x / s) = f(x) / s`` for ``s > 0``: ReLU, LeakyReLU, no activation)
compute the same function after a per-channel rescaling ``S = diag(s)``::

    W2 f(W1 x + b1) + b2 = (W2 S) f(S^-1 W1 x + S^-1 b1) + b2

Output channel ``i`` of the first layer is divided by ``s_i``, input channel
``i`` of the second multiplied by it. With ``r1_i = max|W1[i, ...]|`` and
``r2_i = max|W2[:, i, ...]|``::

    s_i = sqrt(r1_i * r2_i) / r2_i = sqrt(r1_i / r2_i)

makes both ranges ``sqrt(r1_i * r2_i)``: the per-channel weight ranges of
both layers become as uniform as one scale per channel allows, which is what
per-tensor (and, for depthwise layers, per-channel) int8 weights need. A
layer in the middle of a chain (pointwise -> depthwise -> pointwise, the
MobileNet block) takes part in two pairs; the pairs are equalized in turn,
round after round, until no scale moves by more than ``tolerance`` (or
``iterations`` rounds). A channel whose range is 0 in either layer keeps
``s_i = 1``.

Channels and groups: output channel ``i`` of a Conv is ``W[i]`` whatever its
``group``. Input channel ``i`` of a Conv with ``g`` groups and weight
``W[M, C/g, k...]`` is column ``i mod C/g`` of the ``M/g`` rows of group
``i // (C/g)``; for a depthwise Conv (``C/g = 1``) those are its own output
channels. Gemm ``B[K, N]`` (``B[N, K]`` with ``transB``) and MatMul ``B[K, N]``
have output channel ``j`` in column ``j`` and input channel ``k`` in row ``k``.

Pairs: Conv -> [act] -> Conv, or Gemm/MatMul -> [act] -> Gemm/MatMul, each
with a constant float weight (and bias), where every intermediate tensor has
exactly one reader and is not a graph output. ReLU6 (``Clip(0, 6)``) is not
positive homogeneous: rescaling moves its clip point per channel, which one
scalar ``Clip`` cannot express. Such pairs are skipped and reported, unless
``replace_relu6=True``: then (as Nagel et al. did for MobileNetV2) the Clip
of an equalized pair becomes a ReLU. That changes the float model wherever a
pre-activation exceeded 6, and is listed in the report. Other activations
(HardSwish, SiLU, GELU, Sigmoid ...) are not homogeneous and end a pair.

High-bias absorption (the paper's section 4.1) needs the statistics of the
pre-activations, which BatchNorm folding has consumed; it is not done here
(bias correction, :mod:`edgeopt.quant.bias_correction`, removes the mean
shift that remains).

Run after BatchNorm folding and before calibration: the rewrite is exact in
real arithmetic (float outputs change by rounding only).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt._scalars import is_integer
from edgeopt.errors import ConfigError
from edgeopt.passes import activation_clamp
from edgeopt.quant.rescaled import Rescaled

__all__ = [
    "EqualizeReport",
    "EqualizedPair",
    "SkippedPair",
    "equalize",
]

_CONV_FAMILY = frozenset({"Conv"})
_DENSE_FAMILY = frozenset({"Gemm", "MatMul"})
_HOMOGENEOUS = frozenset({"Relu", "LeakyRelu"})
_LINEAR = ("Conv", "Gemm", "MatMul")
# Elementwise activations that end a pair (named as such in the report).
_NON_HOMOGENEOUS = frozenset({"HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "Gelu", "Elu", "Selu", "Celu",
                              "Softplus", "Softsign", "Mish", "Swish", "Erf", "ThresholdedRelu"})
_SCALE_BOUNDS = (1e-6, 1e6)  # a scale outside this means a near-dead channel: clamped


@dataclass(frozen=True, kw_only=True)
class EqualizedPair:
    """Two layers equalized through ``activation`` (None: directly connected).

    ``spread_*`` is ``max_i r_i / min_i r_i`` of the per-channel weight ranges
    of the first layer's output channels, before and after.
    """

    first: str
    second: str
    activation: str | None
    channels: int
    spread_before: float
    spread_after: float


@dataclass(frozen=True, kw_only=True)
class SkippedPair:
    """A linear layer that did not start an equalized pair, and why."""

    first: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class EqualizeReport:
    """What :func:`equalize` did: pairs equalized, layers skipped with reasons, rounds run."""

    equalized: tuple[EqualizedPair, ...]
    skipped: tuple[SkippedPair, ...]
    rounds: int
    relu6_replaced: tuple[str, ...] = ()
    # the tensors between equalized layers, each scaled per channel (for compare; see edgeopt.quant.rescaled)
    rescaled: Mapping[str, Rescaled] = field(default_factory=dict)

    @property
    def modified(self) -> bool:
        return bool(self.equalized)

    def explain(self) -> list[str]:
        lines = [f"{p.first} -> {p.second}: equalized {p.channels} channels "
                 f"(range spread {p.spread_before:.1f} -> {p.spread_after:.1f})" for p in self.equalized]
        return lines + [f"{s.first}: not equalized: {s.reason}" for s in self.skipped]


# --------------------------------------------------------------------------
# graph helpers
# --------------------------------------------------------------------------


def _sole_reader(value: ir.Value) -> ir.Node | str:
    """The one node reading ``value``, or why there is not one."""
    if value.is_graph_output():
        return f"its output {value.name!r} is a graph output"
    readers = eir.consumers(value)
    if len(readers) != 1:
        return f"its output {value.name!r} has {len(readers)} readers"
    return readers[0]


def _activation_refusal(node: ir.Node, replace_relu6: bool) -> str | None:
    """Why ``node`` does not commute with a positive per-channel scale (None when it does)."""
    if eir.is_op(node, *_HOMOGENEOUS):
        return None
    if eir.is_op(node, *_NON_HOMOGENEOUS):
        return f"{node.op_type} {eir.node_label(node)!r} is not positive-homogeneous"
    if not eir.is_op(node, "Clip"):
        return f"it feeds {node.op_type} {eir.node_label(node)!r}, not a Conv/Gemm/MatMul or a ReLU"
    bounds = activation_clamp(node)  # a Clip's constant bounds (None when computed)
    if bounds is None:
        return f"Clip {eir.node_label(node)!r} has computed bounds"
    if bounds == (0.0, math.inf):
        return None
    if bounds == (0.0, 6.0):
        return None if replace_relu6 else (
            f"ReLU6 {eir.node_label(node)!r} is not positive-homogeneous (scaling moves its clip point "
            "per channel); --equalize-relu6 equalizes through it as a ReLU")
    return f"Clip {eir.node_label(node)!r} to {bounds} is not positive-homogeneous"


# --------------------------------------------------------------------------
# weights as numpy, by layout
# --------------------------------------------------------------------------


@dataclass(eq=False)
class _Layer:
    """A linear node's weight and bias in float64, edited by the rounds and stored once."""

    node: ir.Node
    weight: np.ndarray
    bias: np.ndarray | None
    dtype: np.dtype
    output_factor: np.ndarray | None = None  # the product of every scale_outputs

    @property
    def family(self) -> frozenset[str]:
        return _CONV_FAMILY if self.node.op_type == "Conv" else _DENSE_FAMILY

    @property
    def output_axis(self) -> int:
        transposed = self.node.op_type == "Gemm" and self.node.attributes.get_int("transB", 0)
        return 0 if self.node.op_type == "Conv" or transposed else 1

    @property
    def group(self) -> int:
        return self.node.attributes.get_int("group", 1) if self.node.op_type == "Conv" else 1

    def output_ranges(self) -> np.ndarray:
        moved = np.moveaxis(np.abs(self.weight), self.output_axis, 0)
        return moved.reshape(moved.shape[0], -1).max(axis=1)

    def input_ranges(self) -> np.ndarray:
        return np.abs(self._input_view()).max(axis=(2, 3)).reshape(-1)

    def _input_view(self) -> np.ndarray:
        """The weight as ``[groups, C/g, M/g, rest]``: input channel ``g * C/g + j`` is ``[g, j]``."""
        if self.node.op_type != "Conv":
            rows = self.weight.T if self.output_axis == 0 else self.weight  # [K, N]
            return rows[None, :, :, None]
        m, per_group = self.weight.shape[:2]
        grouped = self.weight.reshape(self.group, m // self.group, per_group, -1)
        return grouped.transpose(0, 2, 1, 3)

    def scale_outputs(self, factors: np.ndarray) -> None:
        shape = [1] * self.weight.ndim
        shape[self.output_axis] = -1
        self.weight = self.weight * factors.reshape(shape)
        if self.bias is not None:
            self.bias = self.bias * factors
        self.output_factor = factors if self.output_factor is None else self.output_factor * factors

    def scale_inputs(self, factors: np.ndarray) -> None:
        if self.node.op_type != "Conv":
            axis = 1 - self.output_axis
            shape = [1, 1]
            shape[axis] = -1
            self.weight = self.weight * factors.reshape(shape)
        else:
            m, per_group = self.weight.shape[:2]
            grouped = self.weight.reshape(self.group, m // self.group, per_group, -1)
            self.weight = (grouped * factors.reshape(self.group, 1, per_group, 1)).reshape(self.weight.shape)

    def store(self, graph: ir.Graph) -> None:
        hint = self.node.inputs[1].name or f"{eir.node_label(self.node)}.weight"
        eir.replace_constant_input(graph, self.node, 1, self.weight.astype(self.dtype), hint)
        if self.bias is not None:
            old = self.node.inputs[2]
            shape = eir.constant_array(old).shape
            eir.replace_constant_input(graph, self.node, 2, self.bias.reshape(shape).astype(self.dtype),
                                   old.name or f"{hint}_bias")


def _load_layer(node: ir.Node) -> _Layer | str:
    """The constant weight and bias of a Conv/Gemm/MatMul, or why they cannot be rescaled."""
    label = eir.node_label(node)
    weight = eir.constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or not np.issubdtype(weight.dtype, np.floating):
        return f"the weight of {label} is not a float constant"
    if node.op_type != "Conv" and weight.ndim != 2:
        return f"the weight of {label} has rank {weight.ndim}, not 2"
    if node.op_type == "Conv" and weight.ndim < 3:
        return f"the weight of {label} has rank {weight.ndim}"
    layer = _Layer(node=node, weight=weight.astype(np.float64), bias=None, dtype=weight.dtype)
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    if bias_value is None:
        return layer
    bias = eir.constant_array(bias_value)
    channels = weight.shape[layer.output_axis]
    if bias is None or bias.size != channels or bias.shape[-1] != channels:
        return f"the bias of {label} is not a constant vector of {channels} values"
    layer.bias = bias.astype(np.float64).reshape(-1)
    return layer


# --------------------------------------------------------------------------
# pairs
# --------------------------------------------------------------------------


@dataclass(eq=False)
class _Pair:
    first: _Layer
    second: _Layer
    activation: ir.Node | None
    spread_before: float = 0.0


def _follow(node: ir.Node, replace_relu6: bool) -> tuple[ir.Node | None, ir.Node] | str:
    """``(activation or None, next linear node)`` after ``node``, or why the chain stops."""
    reader = _sole_reader(node.outputs[0])
    if isinstance(reader, str):
        return reader
    activation = None
    if not eir.is_op(reader, *_LINEAR):
        refusal = _activation_refusal(reader, replace_relu6)
        if refusal is not None:
            return refusal
        activation, reader = reader, _sole_reader(reader.outputs[0])
        if isinstance(reader, str):
            return f"after {activation.op_type}, {reader}"
    if not eir.is_op(reader, *_LINEAR):
        return f"it feeds {reader.op_type} {eir.node_label(reader)!r}, not a Conv/Gemm/MatMul"
    source = (activation or node).outputs[0]
    if reader.inputs[0] is not source:
        return f"it feeds the weight input of {eir.node_label(reader)!r}"
    return activation, reader


def _pair_for(node: ir.Node, layers: dict[int, _Layer], replace_relu6: bool) -> _Pair | str:
    first = layers.get(id(node)) or _load_layer(node)
    if isinstance(first, str):
        return first
    followed = _follow(node, replace_relu6)
    if isinstance(followed, str):
        return followed
    activation, successor = followed
    second = layers.get(id(successor)) or _load_layer(successor)
    if isinstance(second, str):
        return second
    if first.family is not second.family:
        return f"{node.op_type} -> {successor.op_type} mixes a convolution and a dense layer"
    if eir.is_op(successor, "Gemm") and successor.attributes.get_int("transA", 0):
        return f"{eir.node_label(successor)} reads its input transposed (transA=1)"
    channels = first.weight.shape[first.output_axis]
    if second.input_ranges().size != channels:
        return f"{channels} output channels do not match the {second.input_ranges().size} inputs of the next layer"
    layers[id(node)], layers[id(successor)] = first, second
    return _Pair(first=first, second=second, activation=activation, spread_before=_spread(first.output_ranges()))


def _spread(ranges: np.ndarray) -> float:
    positive = ranges[ranges > 0]
    return float(positive.max() / positive.min()) if positive.size else 1.0


def _equalize_once(pair: _Pair) -> float:
    """Equalize one pair in place; return the largest ``|log s_i|`` applied."""
    r1, r2 = pair.first.output_ranges(), pair.second.input_ranges()
    live = (r1 > 0) & (r2 > 0)
    scale = np.ones_like(r1)
    scale[live] = np.clip(np.sqrt(r1[live] / r2[live]), *_SCALE_BOUNDS)
    pair.first.scale_outputs(1.0 / scale)
    pair.second.scale_inputs(scale)
    return float(np.abs(np.log(scale)).max(initial=0.0))


def _run_rounds(pairs: list[_Pair], iterations: int, tolerance: float) -> int:
    for round_index in range(1, iterations + 1):
        largest = max(_equalize_once(pair) for pair in pairs)
        if largest < tolerance:
            return round_index
    return iterations


def _replace_clip_by_relu(graph: ir.Graph, clip: ir.Node) -> None:
    """The Relu's output keeps the Clip's name: compare and the rescale record refer to it. The
    Clip's bounds go with it when nothing else reads them (ONNX Runtime warns of each unused one)."""
    name = clip.outputs[0].name
    bounds = [value for value in clip.inputs[1:] if value is not None]
    relu = ir.node("Relu", [clip.inputs[0]], name=f"{eir.node_label(clip)}_relu")
    eir.replace_nodes(graph, [clip], clip.outputs[0], [relu])
    if name and not relu.outputs[0].is_graph_output():
        relu.outputs[0].name = name
    for value in bounds:
        if (value.name in graph.initializers and not value.uses() and not value.is_graph_output()
                and not value.is_graph_input()):  # an IR < 4 model's initializer that is an input too
            graph.initializers.pop(value.name)


def _collect_pairs(graph: ir.Graph, replace_relu6: bool) -> tuple[list[_Pair], list[SkippedPair]]:
    layers: dict[int, _Layer] = {}
    pairs, skipped = [], []
    for node in graph:
        if not eir.is_op(node, *_LINEAR):
            continue
        found = _pair_for(node, layers, replace_relu6)
        if isinstance(found, str):
            skipped.append(SkippedPair(first=eir.node_label(node), reason=found))
        else:
            pairs.append(found)
    return pairs, skipped


def _check_settings(iterations: int, tolerance: float) -> None:
    if not is_integer(iterations) or iterations < 1:
        raise ConfigError(f"equalization iterations must be a positive integer, got {iterations!r}")
    if not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise ConfigError(f"equalization tolerance must be positive, got {tolerance!r}")


def _store(graph: ir.Graph, pairs: list[_Pair]) -> tuple[str, ...]:
    """Write every rescaled layer once; turn the ReLU6 of equalized pairs into ReLU."""
    for layer in {id(layer): layer for p in pairs for layer in (p.first, p.second)}.values():
        layer.store(graph)
    replaced = []
    for pair in pairs:
        clip = pair.activation
        if clip is not None and eir.is_op(clip, "Clip") and activation_clamp(clip) == (0.0, 6.0):
            replaced.append(eir.node_label(clip))
            _replace_clip_by_relu(graph, clip)
    return tuple(replaced)


def _summary(pair: _Pair) -> EqualizedPair:
    ranges = pair.first.output_ranges()
    return EqualizedPair(
        first=eir.node_label(pair.first.node), second=eir.node_label(pair.second.node),
        activation=pair.activation.op_type if pair.activation is not None else None,
        channels=int(ranges.size), spread_before=pair.spread_before, spread_after=_spread(ranges))


def equalize(model: ir.Model, *, iterations: int = 20, tolerance: float = 1e-4,
             replace_relu6: bool = False) -> EqualizeReport:
    """Equalize the weight ranges of consecutive linear layers of ``model``, in place.

    Rewrites the model it is given (pass a copy you own, e.g. the private
    copy of a quantization handler); the float function is unchanged up to
    rounding (and, with ``replace_relu6``, the ReLU6 clips of equalized
    pairs). ``tolerance`` bounds ``max |log s_i|`` of the last round.
    Returns the pairs equalized and the layers skipped with the reason.
    """
    _check_settings(iterations, tolerance)
    pairs, skipped = _collect_pairs(model.graph, replace_relu6)
    rounds = _run_rounds(pairs, iterations, tolerance) if pairs else 0
    rescaled = _rescaled_tensors(pairs)  # before _store replaces ReLU6 nodes (their outputs keep the name)
    replaced = _store(model.graph, pairs)
    return EqualizeReport(equalized=tuple(_summary(p) for p in pairs), skipped=tuple(skipped),
                          rounds=rounds, relu6_replaced=replaced, rescaled=rescaled)


def _rescaled_tensors(pairs: list[_Pair]) -> dict[str, Rescaled]:
    """The outputs of each pair's first layer and of its activation: channel ``c`` times the factor
    the rounds gave the first layer's output channel ``c`` (axis 1 of a Conv's NCHW, the last of a
    Gemm/MatMul's)."""
    found = {}
    for pair in pairs:
        factor = pair.first.output_factor
        if factor is None:
            continue
        axis = 1 if pair.first.node.op_type == "Conv" else -1
        for node in (pair.first.node, pair.activation):
            if node is not None and node.outputs[0].name:
                found[node.outputs[0].name] = Rescaled(axis, factor.astype(np.float32))
    return found

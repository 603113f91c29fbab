"""Build the QDQ graph from a placement plan and calibrated ranges.

For each planned item, in graph order:

* activation ``t``: ``t -> QuantizeLinear -> t_quantized -> DequantizeLinear
  -> t_dequantized``, inserted right after ``t``'s producer; every consumer
  reads ``t_dequantized`` (a graph output keeps its name on the DQ output;
  the float tensor becomes ``t_float``). Scale and zero point come from
  ``choose_qparams`` on the range (the union over a scale group; the group
  shares one pair of initializers named after its first tensor; see
  :func:`activation_qparams` for Concat); a Softmax output's range is fixed,
  not calibrated (:func:`probability_range`);
* constant operand ``c`` (of Add, Mul, Concat ...): ``c_quantized`` in the
  activation format with its own min/max (or its group's) -> DQ, read by the
  quantized consumers;
* weight ``w``: ``w_quantized`` int8 symmetric per output channel (or per
  tensor) -> DQ with ``axis``;
* bias ``b``: ``b_quantized`` int32 at ``scale = input_scale * weight_scale``,
  zero point 0 -> DQ.

ONNX Runtime then fuses each ``DQ -> op -> Q`` into its integer kernel. Names
are stable (``{tensor}_quantized``, ``{tensor}_scale`` ...; a numeric suffix
only on a clash), so the same inputs give byte-identical models.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.naming import claim_name
from edgeopt.quant.config import Int8Config, PerChannel, Target
from edgeopt.quant.formats import INT8_SYMMETRIC, INT32, Format
from edgeopt.quant.placement import QdqPlan
from edgeopt.quant.primitives import choose_qparams, quantize, quantize_bias, quantize_per_channel
from edgeopt.quant.registry import TensorQuantInfo
from edgeopt.quant.union_find import UnionFind

__all__ = ["activation_qparams", "insert_qdq", "probability_range"]


@dataclass(frozen=True)
class _Params:
    scale: np.ndarray  # float32, scalar or per channel
    zero_point: np.ndarray  # int64, same shape
    range: tuple[float, float]
    representative: str  # the tensor that names the shared scale/zero-point initializers


def _union_range(members: list[str], ranges: Mapping[str, tuple[float, float]]) -> tuple[float, float]:
    return (min(float(ranges[m][0]) for m in members), max(float(ranges[m][1]) for m in members))


def _narrow_concat(parts: list[list[str]], ranges: Mapping[str, tuple[float, float]],
                   concat_outputs: Collection[str]) -> bool:
    """Whether a Concat output among ``parts`` spans less than half their joint range."""
    low, high = _union_range([m for p in parts for m in p], ranges)
    widths = [high_p - low_p for p in parts if any(m in concat_outputs for m in p)
              for low_p, high_p in [_union_range(p, ranges)]]
    return high > low and any(width < 0.5 * (high - low) for width in widths)


def activation_qparams(plan: QdqPlan, ranges: Mapping[str, tuple[float, float]], fmt: Format, *,
                       relax_concat: bool = False, concat_outputs: Collection[str] = ()) -> dict[str, _Params]:
    """Scale and zero point per planned activation/constant tensor; shared tensors share them.

    Tensors of one ``plan.groups`` entry always share (the union of their
    ranges). Concat joins groups into one scale too, except with
    ``relax_concat`` (ONNX Runtime: QLinearConcat requantizes):

    * when one of the joined Concat outputs (``concat_outputs``) spans less than half the joint range,
      every group keeps its own range. Concats that share inputs (DenseNet's ``cat(features)`` of each
      layer) join into one scale, the block's widest; its first Concat, of the block input alone, then
      rounded that input at 2 to 3 times its own step (a small DenseNet's output: 28.4 -> 33.6 dB);
    * when the joint range is negative somewhere, the groups holding a fused Relu/Clip
      output keep their own range, so the Q after the activation keeps zero
      point = qmin and ONNX Runtime can still fold the clamp into the producer.

    Elsewhere one scale saves QLinearConcat's second rounding (0.2 to 1.8 dB on
    SqueezeNet, GoogLeNet, ShuffleNet and GhostNet against a scale per group).
    """
    order = {name: i for i, name in enumerate((*plan.activations, *plan.constants))}
    component = {t: group for group in plan.groups for t in group}
    joined = UnionFind()
    for name in order:
        joined.find(component.get(name, (name,))[0])
    for group in plan.concat_groups:
        joined.union(component.get(t, (t,))[0] for t in group)
    params: dict[str, _Params] = {}
    for cluster in joined.clusters():
        parts = [sorted(component.get(r, (r,)), key=order.__getitem__) for r in cluster]
        own: list[list[str]] = []
        if relax_concat and len(parts) > 1 and _narrow_concat(parts, ranges, concat_outputs):
            own = parts
        elif relax_concat and len(parts) > 1 and _union_range([m for p in parts for m in p], ranges)[0] < 0:
            own = [p for p in parts if any(m in plan.clamped for m in p)]
        shared = [m for p in parts if p not in own for m in p]
        for members in [*own, shared] if shared else own:
            members = sorted(members, key=order.__getitem__)
            low, high = _union_range(members, ranges)
            scale, zero_point = choose_qparams(low, high, fmt)
            for member in members:
                params[member] = _Params(scale=scale, zero_point=zero_point, range=(low, high),
                                         representative=members[0])
    return params


def _as_tuple(array: np.ndarray, kind: type) -> tuple:
    return tuple(map(kind, np.asarray(array).reshape(-1).tolist()))  # tolist: Python scalars in one call


class _Builder:
    """Adds initializers and Q/DQ nodes to one graph with unique, stable names."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.values: dict[str, ir.Value] = {v.name: v for v in graph.inputs}
        self.values.update(graph.initializers)
        for node in graph:
            self.values.update((v.name, v) for v in node.outputs if v.name)
        self.nodes = {node.name: node for node in graph}
        self._used = set(self.values) | set(self.nodes)
        self._input_anchor: ir.Node | None = None

    def unique(self, base: str) -> str:
        return claim_name(base, self._used)

    def initializer(self, base: str, array: np.ndarray) -> ir.Value:
        return eir.register_array(self.graph, self.unique(base), array)

    def dequantize_node(self, base: str, inputs: list[ir.Value], like: ir.Value | None,
                        axis: int | None = None) -> ir.Node:
        output = ir.Value(name=self.unique(f"{base}_dequantized"),
                          shape=like.shape if like is not None else None,
                          type=ir.TensorType(ir.DataType.FLOAT))
        attributes = {"axis": axis} if axis is not None else {}
        return ir.node("DequantizeLinear", inputs, attributes, outputs=[output],
                       name=self.unique(f"{base}_DequantizeLinear"))

    def insert_at_start(self, nodes: list[ir.Node]) -> None:
        if self._input_anchor is None:
            self.graph.insert_before(next(iter(self.graph)), nodes)
        else:
            self.graph.insert_after(self._input_anchor, nodes)
        self._input_anchor = nodes[-1]


class _QdqInserter:
    def __init__(self, model: ir.Model, plan: QdqPlan, params: dict[str, _Params], config: Int8Config) -> None:
        self.build = _Builder(model.graph)
        self.plan = plan
        self.params = params
        self.format = config.activations
        self.per_channel = isinstance(config.weight_granularity, PerChannel)
        self.shared_params: dict[str, tuple[ir.Value, ir.Value]] = {}
        self.weight_scales: dict[str, np.ndarray] = {}
        self.weight_cache: dict[tuple[str, int | None], tuple[ir.Value, np.ndarray]] = {}
        self.infos: list[TensorQuantInfo] = []
        self.replaced: set[str] = set()
        # learned ints replace round-to-nearest, by (weight, axis): a weight shared along another axis has
        # other scales there
        self.rounded_weights: dict[tuple[str, int | None], np.ndarray] = {}
        self.kept_float = frozenset(plan.kept_float)  # they read the float tensors
        self.outputs_quantized = config.outputs_quantized  # mcu: every tensor int8, as the C computes it

    def param_values(self, name: str) -> tuple[ir.Value, ir.Value]:
        params = self.params[name]
        representative = params.representative
        if representative not in self.shared_params:
            self.shared_params[representative] = (
                self.build.initializer(f"{representative}_scale", params.scale),
                self.build.initializer(f"{representative}_zero_point",
                                       params.zero_point.astype(self.format.numpy_dtype)))
        return self.shared_params[representative]

    def record(self, name: str, kind: str, op_type: str, fmt: Format, value_range: tuple[float, float],
               scale: np.ndarray, zero_point: np.ndarray, method: str, axis: int | None = None) -> None:
        self.infos.append(TensorQuantInfo(
            name=name, kind=kind, op_type=op_type, format=fmt.name, range=value_range,
            scale=_as_tuple(scale, float), zero_point=_as_tuple(zero_point, int), method=method, axis=axis))

    def activation(self, name: str, method: str) -> None:
        build, value = self.build, self.build.values[name]
        uses = [(node, index) for node, index in value.uses() if node.name not in self.kept_float]
        if value.is_graph_input() and not self.outputs_quantized:  # a float node reads the input itself
            uses = [(node, index) for node, index in uses if node.name in self.plan.nodes]
        if not uses and not value.is_graph_output():  # read only by nodes kept float: nothing to quantize
            return
        scale_value, zero_point_value = self.param_values(name)
        quantized = ir.Value(name=build.unique(f"{name}_quantized"), shape=value.shape,
                             type=ir.TensorType(self.format.onnx_type))
        q = ir.node("QuantizeLinear", [value, scale_value, zero_point_value], outputs=[quantized],
                    name=build.unique(f"{name}_QuantizeLinear"))
        dq = build.dequantize_node(name, [quantized, scale_value, zero_point_value], value)
        producer = value.producer()
        if producer is None:
            build.insert_at_start([q, dq])
        else:
            build.graph.insert_after(producer, [q, dq])
        for node, index in uses:
            # a Shape reads the int8 tensor (its shape is the same): reading the DequantizeLinear's output, it
            # kept a float copy of the whole tensor computed for its shape alone (ONNX Runtime cannot drop it)
            node.replace_input_with(index, (quantized if eir.is_op(node, "Shape", "Size") else dq.outputs[0]))
        if value.is_graph_output() and not value.is_graph_input():  # an input passed through stays itself
            self._move_graph_output(value, dq.outputs[0])
        params = self.params[name]
        self.record(name, "activation", producer.op_type if producer else "input", self.format,
                    params.range, params.scale, params.zero_point, method)

    def _move_graph_output(self, value: ir.Value, dequantized: ir.Value) -> None:
        """Every place ``value`` has among the graph outputs (a model may list one twice) goes to
        ``dequantized``, which takes the name."""
        outputs = self.build.graph.outputs
        name = value.name
        value.name = self.build.unique(f"{name}_float")
        dequantized.name = name
        for position in [i for i, v in enumerate(outputs) if v is value]:
            outputs[position] = dequantized

    def _replace_before(self, node: ir.Node, index: int, dq: ir.Node) -> None:
        self.build.graph.insert_before(node, [dq])
        self.replaced.add(node.inputs[index].name)
        node.replace_input_with(index, dq.outputs[0])

    def constant(self, name: str) -> None:
        value = self.build.values[name]
        params = self.params[name]
        quantized = quantize(eir.constant_array(value), params.scale, params.zero_point, self.format)
        scale_value, zero_point_value = self.param_values(name)
        stored = self.build.initializer(f"{name}_quantized", quantized)
        dq = self.build.dequantize_node(name, [stored, scale_value, zero_point_value], value)
        consumers = [(node, index) for node, index in value.uses() if node.name in self.plan.nodes]
        order = {node.name: i for i, node in enumerate(self.build.graph)}
        first = min(consumers, key=lambda use: order[use[0].name])[0]
        self.build.graph.insert_before(first, [dq])
        self.replaced.add(name)
        for node, index in consumers:
            node.replace_input_with(index, dq.outputs[0])
        self.record(name, "constant", "Constant", self.format, params.range, params.scale,
                    params.zero_point, "minmax")

    def weight(self, node_name: str, tensor: str, op_axis: int | None) -> None:
        node = self.build.nodes[node_name]
        axis = op_axis if self.per_channel else None
        key = (tensor, axis)
        if key not in self.weight_cache:
            array = eir.constant_array(self.build.values[tensor])
            quantized, scale, zero_point = quantize_per_channel(array, axis, INT8_SYMMETRIC)
            quantized = self.rounded_weights.get(key, quantized)
            inputs = [self.build.initializer(f"{tensor}_quantized", quantized),
                      self.build.initializer(f"{tensor}_scale", scale),
                      self.build.initializer(f"{tensor}_zero_point", zero_point.astype(np.int8))]
            dq = self.build.dequantize_node(tensor, inputs, self.build.values[tensor], axis)
            self.build.graph.insert_before(node, [dq])
            self.weight_cache[key] = (dq.outputs[0], scale)
            self.record(tensor, "weight", node.op_type, INT8_SYMMETRIC,
                        (float(array.min(initial=0.0)), float(array.max(initial=0.0))), scale, zero_point,
                        "minmax", axis)
        self.replaced.add(tensor)
        dequantized, scale = self.weight_cache[key]
        for index in (1, 2):  # input 1; a GRU's or LSTM's W (1) and R (2)
            value = node.inputs[index] if index < len(node.inputs) else None
            if value is not None and value.name == tensor:
                node.replace_input_with(index, dequantized)
        self.weight_scales.setdefault(node_name, scale)

    def bias(self, node_name: str, tensor: str, input_name: str, weight_name: str) -> None:
        node = self.build.nodes[node_name]
        weight_scale = self.weight_scales.get(node_name)
        if weight_scale is None:  # the weight is an activation (MatMul/Gemm of two tensors)
            weight_scale = self.params[weight_name].scale
        array = eir.constant_array(self.build.values[tensor])
        quantized, scale = quantize_bias(array, self.params[input_name].scale, weight_scale)
        zero_point = np.zeros(scale.shape, dtype=np.int32)
        axis = 0 if scale.ndim == 1 else None
        inputs = [self.build.initializer(f"{tensor}_quantized", quantized),
                  self.build.initializer(f"{tensor}_scale", scale),
                  self.build.initializer(f"{tensor}_zero_point", zero_point)]
        self._replace_before(node, 2, self.build.dequantize_node(tensor, inputs, self.build.values[tensor], axis))
        self.record(tensor, "bias", node.op_type, INT32, (float(array.min(initial=0.0)),
                    float(array.max(initial=0.0))), scale, zero_point, "derived", axis)

    def remove_unused_constants(self) -> None:
        graph = self.build.graph
        for name in sorted(self.replaced):
            value = self.build.values[name]
            if value.uses() or value.is_graph_output():
                continue
            if name in graph.initializers:
                graph.initializers.pop(name)
            producer = value.producer()
            if producer is not None and producer.op_type == "Constant":
                graph.remove(producer, safe=True)


def insert_qdq(model: ir.Model, plan: QdqPlan, ranges: Mapping[str, tuple[float, float]], config: Int8Config,
               *, methods: Mapping[str, str] | None = None,
               rounded_weights: Mapping[tuple[str, int | None], np.ndarray] | None = None,
               ) -> tuple[TensorQuantInfo, ...]:
    """Rewrite ``model`` in place to QDQ form following ``plan``; return what was quantized.

    ``ranges`` holds the calibrated range of every tensor in
    ``plan.activations`` (constants are measured here); ``methods`` names the
    calibration method per tensor for the report. ``rounded_weights`` holds
    int8 weights rounded otherwise than to nearest (AdaRound, GPTQ), keyed by
    weight name and per-channel axis (None per tensor); their scales are the
    min/max ones used here. A use of the weight along another axis rounds to
    nearest.
    """
    all_ranges = dict(ranges)
    for name in plan.constants:
        array = eir.constant_array(_value_named(model.graph, name))
        all_ranges[name] = (float(array.min(initial=0.0)), float(array.max(initial=0.0)))
    methods = dict(methods or {})
    for name in _probability_tensors(plan):
        all_ranges[name] = probability_range(config.activations)
        methods[name] = "fixed: softmax"
    missing = [name for name in plan.activations if name not in all_ranges]
    if missing:
        raise ValueError(f"no calibrated range for {', '.join(missing[:5])}")
    concat_outputs = {node.outputs[0].name for node in model.graph if node.op_type == "Concat"}
    params = activation_qparams(plan, all_ranges, config.activations, relax_concat=config.target is Target.ORT,
                                concat_outputs=concat_outputs)
    inserter = _QdqInserter(model, plan, params, config)
    inserter.rounded_weights = dict(rounded_weights or {})
    for name in plan.activations:
        inserter.activation(name, methods.get(name, config.calibration.value))
    for name in plan.constants:
        inserter.constant(name)
    for use in plan.weights:
        inserter.weight(use.node, use.tensor, use.axis)
    for use in plan.biases:
        inserter.bias(use.node, use.tensor, use.input, use.weight)
    inserter.remove_unused_constants()
    sums = frozenset(plan.sums)
    for node in model.graph:
        if node.name in sums:
            node.op_type = "Sum"  # the same function (edgeopt.quant.residual_stream says why)
    return tuple(inserter.infos)


def probability_range(fmt: Format) -> tuple[float, float]:
    """The fixed range of a Softmax output: ``[0, 1 - 1/n]`` over the format's ``n`` levels, which
    gives scale ``1/n`` and zero point ``qmin`` (1/256 for 8 bits, TFLite's and ONNX Runtime's choice)."""
    return 0.0, (fmt.num_levels - 1) / fmt.num_levels


def _probability_tensors(plan: QdqPlan) -> list[str]:
    """The Softmax outputs of the plan and the tensors that share their scale."""
    tensors = set(plan.probabilities)
    for group in plan.groups:
        if tensors.intersection(group):
            tensors.update(group)
    return sorted(tensors)


def _value_named(graph: ir.Graph, name: str) -> ir.Value:
    if name in graph.initializers:
        return graph.initializers[name]
    for node in graph:
        for value in node.outputs:
            if value.name == name:
                return value
    raise KeyError(name)

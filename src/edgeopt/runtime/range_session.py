"""The calibration pass's session: the float model returning, besides its outputs, what the observers need
of each tensor, reduced inside ONNX Runtime where they can do with less than the whole tensor (its min and
max, its channel means, sampled taps)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.runtime.ort import OrtSession, _with_all_outputs
from edgeopt.runtime.tap_gather import TapGather, add_tap_gather_nodes

__all__ = ["CHANNEL_MEAN_SUFFIXES", "PACKED_RANGE_OUTPUTS", "RANGE_SUFFIXES", "batch_one_reshapes", "range_session"]


RANGE_SUFFIXES = ("__edgeopt_min", "__edgeopt_max")
PACKED_RANGE_OUTPUTS = tuple("__edgeopt_packed" + suffix for suffix in RANGE_SUFFIXES)


def _free_batch_dim(graph) -> None:
    """Make dim 0 of the inputs and outputs symbolic and forget intermediate shapes (protobuf graph)."""
    for value in [*graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = "edgeopt_batch"
    del graph.value_info[:]


def batch_one_reshapes(model: ir.Model) -> dict[str, np.ndarray]:
    """The Reshapes that fix the batch at a literal 1, by output name, each with a target that follows it.

    A Reshape of a tensor whose dim 0 is 1 to a constant target starting with
    1 (``[1, -1, 4, 16]``) fixes the batch at 1. The same target with ``0``
    first ("copy the input's dim 0", allowzero off) gives the same result at
    batch 1 and keeps a larger batch: the free-batch session uses it. Other
    ways of fixing the batch are not rewritten; the caller checks grouped
    results against single samples before trusting them.
    """
    targets = {}
    for node in model.graph:
        if not eir.is_op(node, "Reshape") or len(node.inputs) < 2:
            continue
        target = eir.constant_array(node.inputs[1])
        shape = eir.static_shape(node.inputs[0])
        if (target is None or target.ndim != 1 or not target.size or int(target[0]) != 1 or not shape
                or shape[0] != 1 or node.attributes.get_int("allowzero", 0) or not node.outputs[0].name):
            continue
        targets[node.outputs[0].name] = np.concatenate([[0], target[1:]]).astype(np.int64)
    return targets


def _follow_batch(graph, targets: Mapping[str, np.ndarray]) -> None:
    """Point each Reshape of ``targets`` (by output name) at its batch-following target (protobuf graph)."""
    for node in graph.node:
        if node.op_type == "Reshape" and node.output and node.output[0] in targets:
            name = node.output[0] + "__edgeopt_batch_shape"
            graph.initializer.append(onnx.numpy_helper.from_array(targets[node.output[0]], name))
            node.input[1] = name


def _add_range_nodes(graph, reduced: Sequence[str], packed: Sequence[str], floors: Mapping[str, float],
                     pooled: Collection[str]) -> None:
    """ReduceMin/ReduceMax over all axes of each tensor: two scalar outputs per tensor of ``reduced``,
    and for ``packed`` (all float32) two 1-D outputs :data:`PACKED_RANGE_OUTPUTS` in their order.

    A packed tensor with a floor (``floors``: the lower bound of the clamp that made it, at least 0) is
    not reduced for its min: the floor stands in for it (a quantization range holds 0, so a min at or
    above 0 never moves it). Its max is taken by GlobalMaxPool first when it is 4-D (``pooled``): ONNX
    Runtime runs that pooling in the blocked channel layout of the Conv that made the tensor, where a
    Reduce needs the tensor reordered to NCHW first (a ReLU6 output of a 224x224 MobileNetV2 took
    longer to reorder than to compute). Max pooling is exact: the max is the Reduce's."""
    helper = onnx.helper
    for name in reduced:
        for op_type, suffix in zip(("ReduceMin", "ReduceMax"), RANGE_SUFFIXES):
            graph.node.append(helper.make_node(op_type, [name], [name + suffix], keepdims=0, name=name + suffix))
            graph.output.append(onnx.ValueInfoProto(name=name + suffix))
    if not packed:
        return
    # Each tensor flattened (a view), then reduced keeping its one axis: shape [1], ready to concatenate.
    flat_shape = "__edgeopt_flat_shape"
    graph.initializer.append(onnx.numpy_helper.from_array(np.array([-1], np.int64), flat_shape))
    for name in packed:
        low, high = (name + suffix for suffix in RANGE_SUFFIXES)
        source = name
        if name in floors and name in pooled:
            source = name + "__edgeopt_pooled"
            graph.node.append(helper.make_node("GlobalMaxPool", [name], [source], name=source))
        graph.node.append(helper.make_node("Reshape", [source, flat_shape], [name + "__edgeopt_flat"],
                                           name=name + "__edgeopt_flat"))
        if name in floors:
            graph.initializer.append(onnx.numpy_helper.from_array(np.array([floors[name]], np.float32), low))
        else:
            graph.node.append(helper.make_node("ReduceMin", [name + "__edgeopt_flat"], [low], keepdims=1, name=low))
        graph.node.append(helper.make_node("ReduceMax", [name + "__edgeopt_flat"], [high], keepdims=1, name=high))
    for suffix, output in zip(RANGE_SUFFIXES, PACKED_RANGE_OUTPUTS):
        graph.node.append(helper.make_node("Concat", [name + suffix for name in packed], [output], axis=0,
                                           name=output))
        graph.output.append(onnx.ValueInfoProto(name=output))


def _dims(value: ir.Value | None) -> tuple:
    return tuple(value.shape.dims) if value is not None and value.shape is not None else ()


CHANNEL_MEAN_SUFFIXES = ("__edgeopt_channel_mean", "__edgeopt_size")


def _add_channel_mean_nodes(graph, channel_means: Mapping[str, tuple[int, int]], opset: int,
                            areas: Mapping[str, int]) -> None:
    """For each tensor (name -> (channel axis, rank)): its mean over every other axis ([C]) and its
    number of elements (a scalar), so a caller gets per-channel sums without fetching the tensor.

    An NCHW tensor whose H * W ``areas`` knows is averaged by GlobalAveragePool first, in ONNX Runtime's
    blocked channel layout as the max of :func:`_add_range_nodes`, its size counted from the pooled
    ``[N, C, 1, 1]``. The mean of the pooled means is the tensor's mean, up to float rounding."""
    helper = onnx.helper
    for name, (axis, rank) in channel_means.items():
        mean, size = (name + suffix for suffix in CHANNEL_MEAN_SUFFIXES)
        source, axes = name, [a for a in range(rank) if a != axis]
        if name in areas:
            source = name + "__edgeopt_averaged"
            graph.node.append(helper.make_node("GlobalAveragePool", [name], [source], name=source))
            graph.initializer.append(onnx.numpy_helper.from_array(np.array(areas[name], np.int64), size + "_area"))
            graph.node.append(helper.make_node("Size", [source], [size + "_pooled"], name=size + "_pooled"))
            graph.node.append(helper.make_node("Mul", [size + "_pooled", size + "_area"], [size], name=size))
        else:
            graph.node.append(helper.make_node("Size", [name], [size], name=size))
        if opset >= 18:  # ReduceMean takes its axes as an input from opset 18 on
            axes_name = mean + "_axes"
            graph.initializer.append(onnx.numpy_helper.from_array(np.array(axes, np.int64), axes_name))
            graph.node.append(helper.make_node("ReduceMean", [source, axes_name], [mean], keepdims=0, name=mean))
        else:
            graph.node.append(helper.make_node("ReduceMean", [source], [mean], axes=axes, keepdims=0, name=mean))
        graph.output.extend([onnx.ValueInfoProto(name=mean), onnx.ValueInfoProto(name=size)])


def _nchw_areas(values: Mapping[str, ir.Value], channel_means: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    """H * W of each NCHW tensor of ``channel_means`` (channel axis 1 of 4) whose H and W are known."""
    areas = {}
    for name, (axis, rank) in channel_means.items():
        dims = _dims(values.get(name))
        if (axis, rank) == (1, 4) and len(dims) == 4 and all(isinstance(d, int) and d > 0 for d in dims[2:]):
            areas[name] = dims[2] * dims[3]
    return areas


def range_session(model: ir.Model, full: Sequence[str], reduced: Sequence[str], *,
                  packed: Sequence[str] = (), floors: Mapping[str, float] | None = None,
                  channel_means: Mapping[str, tuple[int, int]] | None = None,
                  gathers: Mapping[str, TapGather] | None = None,
                  threads: int | None = None, free_batch: bool = False) -> OrtSession:
    """A session returning the tensors ``full`` whole and, for each of ``reduced`` and ``packed``, only
    its min and max.

    The min and max are computed inside ONNX Runtime (ReduceMin/ReduceMax over
    all axes, outputs ``{name}__edgeopt_min`` / ``__edgeopt_max``), so a
    min/max calibration fetches two scalars per tensor instead of the tensor.
    Those of the float32 tensors ``packed`` come concatenated, in order, in
    two 1-D outputs :data:`PACKED_RANGE_OUTPUTS`: two arrays per run, however
    many tensors; the min of one with a floor (``floors``, name -> a lower
    bound at least 0 that its producer guarantees) is that floor, unreduced
    (see :func:`_add_range_nodes`). With ``free_batch`` the session's batch dim is symbolic and
    the Reshapes of :func:`batch_one_reshapes` follow it, so several batch-1
    samples can run as one batch (the caller checks the model allows it).
    ``channel_means`` (name -> (channel axis, rank)) adds each tensor's per-channel mean and size
    (outputs ``{name}`` + :data:`CHANNEL_MEAN_SUFFIXES`). ``gathers`` (output name -> :class:`TapGather`) adds
    sampled positions of tensors, and the input ``TAP_STREAM_INPUT`` they need (:mod:`.tap_gather`).
    """
    prepared = _with_all_outputs(model, full)
    proto = prepared.proto
    values = eir.values_by_name(model)
    if free_batch:
        _free_batch_dim(proto.graph)
        _follow_batch(proto.graph, batch_one_reshapes(model))
    wanted = set(packed)
    floors = {name: float(floor) for name, floor in (floors or {}).items() if name in wanted and floor >= 0}
    pooled = {name for name in floors if len(_dims(values.get(name))) == 4}
    _add_range_nodes(proto.graph, reduced, packed, floors, pooled)
    if channel_means:
        _add_channel_mean_nodes(proto.graph, channel_means, eir.default_opset(model),
                                _nchw_areas(values, channel_means))
    add_tap_gather_nodes(proto.graph, gathers or {})
    # Between runs the observers' numpy work needs the cores that spinning ORT threads would hold. In
    # ONNX Runtime's default order the pooled reductions kept a 224x224 MobileNetV2's ReLU6 outputs
    # alive to the end of each run: 17 MB more peak RSS.
    return OrtSession(prepared, threads=threads, spin=False, early_free=True)

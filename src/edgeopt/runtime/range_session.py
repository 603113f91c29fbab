"""The calibration pass's session: the float model returning, besides its outputs, what the observers need
of each tensor, reduced inside ONNX Runtime where they can do with less than the whole tensor (its min and
max, its channel means, sampled taps)."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.runtime.ort import OrtSession, _with_all_outputs
from edgeopt.runtime.tap_gather import TapGather, add_tap_gather_nodes

__all__ = ["CHANNEL_MEAN_SUFFIXES", "PACKED_RANGE_OUTPUTS", "RANGE_SUFFIXES", "RangeSession", "batch_one_reshapes",
           "range_session"]

logger = logging.getLogger(__name__)

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
                     pooled: Collection[str], bundles: Sequence[_Bundle] = ()) -> str | None:
    """ReduceMin/ReduceMax over all axes of each tensor: two scalar outputs per tensor of ``reduced``,
    and for ``packed`` (all float32) two 1-D outputs :data:`PACKED_RANGE_OUTPUTS` in their order.

    A packed tensor with a floor (``floors``: the lower bound of the clamp that made it, at least 0) is
    not reduced for its min: the floor stands in for it (a quantization range holds 0, so a min at or
    above 0 never moves it). Its max is taken by GlobalMaxPool first when it is 4-D (``pooled``): ONNX
    Runtime runs that pooling in the blocked channel layout of the Conv that made the tensor, where a
    Reduce needs the tensor reordered to NCHW first (a ReLU6 output of a 224x224 MobileNetV2 took
    longer to reorder than to compute). Max pooling is exact: the max is the Reduce's.

    The pooled maxes of the tensors of each of ``bundles`` are concatenated into one output instead
    (:class:`_Bundle`), whose per-tensor maxes :class:`RangeSession` takes: then the packed maxes of the
    others come in the output returned (None: all in ``PACKED_RANGE_OUTPUTS[1]``)."""
    helper = onnx.helper
    for name in reduced:
        for op_type, suffix in zip(("ReduceMin", "ReduceMax"), RANGE_SUFFIXES):
            graph.node.append(helper.make_node(op_type, [name], [name + suffix], keepdims=0, name=name + suffix))
            graph.output.append(onnx.ValueInfoProto(name=name + suffix))
    if not packed:
        return None
    bundled = {name for bundle in bundles for name in bundle.names}
    for bundle in bundles:
        _add_pooled_bundle(graph, bundle, "GlobalMaxPool")
    # Each tensor flattened (a view), then reduced keeping its one axis: shape [1], ready to concatenate.
    flat_shape = "__edgeopt_flat_shape"
    graph.initializer.append(onnx.numpy_helper.from_array(np.array([-1], np.int64), flat_shape))
    for name in packed:
        low, high = (name + suffix for suffix in RANGE_SUFFIXES)
        if name in floors:
            graph.initializer.append(onnx.numpy_helper.from_array(np.array([floors[name]], np.float32), low))
        if name in bundled:
            continue
        source = name
        if name in floors and name in pooled:
            source = name + "__edgeopt_pooled"
            graph.node.append(helper.make_node("GlobalMaxPool", [name], [source], name=source))
        graph.node.append(helper.make_node("Reshape", [source, flat_shape], [name + "__edgeopt_flat"],
                                           name=name + "__edgeopt_flat"))
        if name not in floors:
            graph.node.append(helper.make_node("ReduceMin", [name + "__edgeopt_flat"], [low], keepdims=1, name=low))
        graph.node.append(helper.make_node("ReduceMax", [name + "__edgeopt_flat"], [high], keepdims=1, name=high))
    rest = [name for name in packed if name not in bundled]
    highs = PACKED_RANGE_OUTPUTS[1] if not bundled else _UNBUNDLED_MAXES if rest else None
    for names, suffix, output in ((packed, RANGE_SUFFIXES[0], PACKED_RANGE_OUTPUTS[0]),
                                  (rest, RANGE_SUFFIXES[1], highs)):
        if output is not None:
            graph.node.append(helper.make_node("Concat", [name + suffix for name in names], [output], axis=0,
                                               name=output))
            graph.output.append(onnx.ValueInfoProto(name=output))
    return highs


#: The packed maxes of the tensors not in a bundle, when some are (RangeSession puts them in their places).
_UNBUNDLED_MAXES = "__edgeopt_packed_unbundled_max"


@dataclass(frozen=True)
class _Bundle:
    """4-D tensors of static channels whose pooled ``[N, C, 1, 1]`` (max or mean) ONNX Runtime
    concatenates along the channels into one output: in its blocked layout, where each pooled tensor
    alone would be reordered to NCHW and reduced by nodes of its own (a 224x224 MobileNetV2's 35 ReLU6
    maxes and 49 channel means: about 300 small nodes a run). ``output``: the concatenation (maxes) or its
    channel means ``[sum C]``; ``size``: the element count of the concatenation (means)."""

    names: tuple[str, ...]
    channels: tuple[int, ...]
    output: str
    size: str | None = None
    areas: tuple[int, ...] = ()

    @functools.cached_property
    def bounds(self) -> np.ndarray:
        """Where each tensor's channels start in the concatenation, and their total last."""
        return np.cumsum([0, *self.channels])


#: ONNX Runtime's channel block on x86 with AVX-512 (8 with AVX2, which divides it).
_CHANNEL_BLOCK = 16


def _bundles(names: Sequence[str], values: Mapping[str, ir.Value], stem: str,
             areas: Mapping[str, int] | None = None) -> list[_Bundle]:
    """The 4-D tensors of ``names`` of static channels, by their batch dim (the same literal or symbol) and
    dtype, so that their pooled tensors concatenate, in bundles of two or more (with ``areas``: those it
    knows only). Those whose channels are a multiple of :data:`_CHANNEL_BLOCK` are bundled apart: ONNX
    Runtime concatenates blocked tensors in their layout only when every one is (a 224x224 MobileNetV2's
    24 and 3 channel tensors among its 51 made it reorder them all)."""
    by_batch: dict[tuple, list[tuple[str, int]]] = {}
    for name in names:
        dims = _dims(values.get(name))
        if len(dims) != 4 or not isinstance(dims[1], int) or dims[1] <= 0 or (areas is not None and name not in areas):
            continue
        batch = dims[0] if isinstance(dims[0], int) else getattr(dims[0], "value", None)
        if batch is not None:
            aligned = dims[1] % _CHANNEL_BLOCK == 0
            by_batch.setdefault((batch, values[name].dtype, aligned), []).append((name, dims[1]))
    members = [group for group in by_batch.values() if len(group) > 1]
    bundles = []
    for index, group in enumerate(members):
        output = f"__edgeopt_{stem}_{index}"
        bundles.append(_Bundle(names=tuple(name for name, _ in group), channels=tuple(c for _, c in group),
                               output=output, size=output + "_size" if areas is not None else None,
                               areas=tuple(areas[name] for name, _ in group) if areas is not None else ()))
    return bundles


def _add_pooled_bundle(graph, bundle: _Bundle, pooling: str, opset: int = 13) -> None:
    """``pooling`` of each tensor of ``bundle``, concatenated on the channels; for a mean bundle, the channel
    means of that and its size."""
    helper = onnx.helper
    pooled = [f"{bundle.output}_{index}" for index in range(len(bundle.names))]
    for name, output in zip(bundle.names, pooled):
        graph.node.append(helper.make_node(pooling, [name], [output], name=output))
    joined = bundle.output if bundle.size is None else bundle.output + "_joined"
    graph.node.append(helper.make_node("Concat", pooled, [joined], axis=1, name=joined))
    if bundle.size is not None:
        graph.node.append(helper.make_node("Size", [joined], [bundle.size], name=bundle.size))
        graph.node.append(_reduce_mean(graph, joined, bundle.output, [0, 2, 3], opset))
        graph.output.append(onnx.ValueInfoProto(name=bundle.size))
    graph.output.append(onnx.ValueInfoProto(name=bundle.output))


def _reduce_mean(graph, source: str, output: str, axes: Sequence[int], opset: int):
    """A ReduceMean of ``axes`` (keepdims 0); its axes an input (added to ``graph``) from opset 18 on."""
    helper = onnx.helper
    if opset >= 18:
        axes_name = output + "_axes"
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(axes, np.int64), axes_name))
        return helper.make_node("ReduceMean", [source, axes_name], [output], keepdims=0, name=output)
    return helper.make_node("ReduceMean", [source], [output], axes=list(axes), keepdims=0, name=output)


def _dims(value: ir.Value | None) -> tuple:
    return tuple(value.shape.dims) if value is not None and value.shape is not None else ()


CHANNEL_MEAN_SUFFIXES = ("__edgeopt_channel_mean", "__edgeopt_size")


def _add_channel_mean_nodes(graph, channel_means: Mapping[str, tuple[int, int]], opset: int,
                            areas: Mapping[str, int], bundles: Sequence[_Bundle] = ()) -> None:
    """For each tensor (name -> (channel axis, rank)): its mean over every other axis ([C]) and its
    number of elements (a scalar), so a caller gets per-channel sums without fetching the tensor.

    An NCHW tensor whose H * W ``areas`` knows is averaged by GlobalAveragePool first, in ONNX Runtime's
    blocked channel layout as the max of :func:`_add_range_nodes`, its size counted from the pooled
    ``[N, C, 1, 1]``. The mean of the pooled means is the tensor's mean, up to float rounding. Those of
    ``bundles`` come in their bundle's outputs (:class:`_Bundle`), taken apart by :class:`RangeSession`."""
    helper = onnx.helper
    for bundle in bundles:
        _add_pooled_bundle(graph, bundle, "GlobalAveragePool", opset)
    bundled = {name for bundle in bundles for name in bundle.names}
    for name, (axis, rank) in channel_means.items():
        if name in bundled:
            continue
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
        graph.node.append(_reduce_mean(graph, source, mean, axes, opset))
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
                  threads: int | None = None, free_batch: bool = False, bundled: bool = True) -> RangeSession:
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
    ``bundled``: pooled maxes and means in bundles (:class:`_Bundle`; the session without them is its
    fallback, see :class:`RangeSession`).
    """
    fallback = functools.partial(range_session, model, full, reduced, packed=packed, floors=floors,
                                 channel_means=channel_means, gathers=gathers, threads=threads,
                                 free_batch=free_batch, bundled=False) if bundled else None
    prepared = _with_all_outputs(model, full)
    proto = prepared.proto
    values = eir.values_by_name(model)
    if free_batch:
        _free_batch_dim(proto.graph)
        _follow_batch(proto.graph, batch_one_reshapes(model))
    wanted = set(packed)
    floors = {name: float(floor) for name, floor in (floors or {}).items() if name in wanted and floor >= 0}
    pooled = {name for name in floors if len(_dims(values.get(name))) == 4}
    max_bundles = _bundles([name for name in packed if name in pooled], values, "pooled_max") if bundled else []
    highs = _add_range_nodes(proto.graph, reduced, packed, floors, pooled, max_bundles)
    mean_bundles = []
    if channel_means:
        areas = _nchw_areas(values, channel_means)
        mean_bundles = _bundles(list(channel_means), values, "channel_means", areas) if bundled else []
        _add_channel_mean_nodes(proto.graph, channel_means, eir.default_opset(model), areas, mean_bundles)
    add_tap_gather_nodes(proto.graph, gathers or {})
    # Between runs the observers' numpy work needs the cores that spinning ORT threads would hold. In
    # ONNX Runtime's default order the pooled reductions kept a 224x224 MobileNetV2's ReLU6 outputs
    # alive to the end of each run: 17 MB more peak RSS.
    return RangeSession(prepared, packed=packed, unbundled_maxes=highs, max_bundles=max_bundles,
                        mean_bundles=mean_bundles, fallback=fallback, threads=threads, spin=False, early_free=True)


class RangeSession(OrtSession):
    """The session of :func:`range_session`. Its outputs are those asked for: the outputs of a bundle
    (:class:`_Bundle`) are taken apart into the packed maxes and the channel means they hold, as
    ``PACKED_RANGE_OUTPUTS[1]`` and ``{name}`` + :data:`CHANNEL_MEAN_SUFFIXES`, exactly the values the
    nodes of each tensor would give (a max is exact, and ONNX Runtime's ReduceMean of the concatenated
    pooled means gives each channel's mean as that of the tensor alone does). A run whose bundles hold
    other channels than the model declares (a wrong shape in the model) makes the session without bundles
    and runs on it from then on."""

    def __init__(self, model, *, packed: Sequence[str], unbundled_maxes: str | None, max_bundles: Sequence[_Bundle],
                 mean_bundles: Sequence[_Bundle], fallback: Callable[[], RangeSession] | None = None,
                 **options) -> None:
        super().__init__(model, **options)
        # the session without bundles, made when a run finds a bundle's channels other than the model declares
        self._make_fallback, self._fallback, self._switch = fallback, None, threading.Lock()
        self._max_bundles, self._mean_bundles = list(max_bundles), list(mean_bundles)
        self._derived: dict[str, tuple[str, ...]] = {}  # output -> the session outputs it is taken from
        position = {name: index for index, name in enumerate(packed)}
        self._unbundled_maxes = unbundled_maxes
        self._unbundled_at = np.array([position[name] for name in packed
                                       if not any(name in bundle.names for bundle in max_bundles)], dtype=np.int64)
        self._bundled_at = [np.array([position[name] for name in bundle.names], dtype=np.int64)
                            for bundle in max_bundles]
        self._count = len(packed)
        if max_bundles:
            self._derived[PACKED_RANGE_OUTPUTS[1]] = (*([unbundled_maxes] if unbundled_maxes else []),
                                                      *(bundle.output for bundle in max_bundles))
        for bundle in mean_bundles:
            for name in bundle.names:
                for suffix in CHANNEL_MEAN_SUFFIXES:
                    self._derived[name + suffix] = (bundle.output, bundle.size)
        sources = {source for outputs in self._derived.values() for source in outputs}
        self.output_names = [*(name for name in self.output_names if name not in sources), *self._derived]

    def run(self, feed: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        if self._fallback is not None:
            return self._fallback.run(feed, output_names)
        names = list(output_names) if output_names is not None else self.output_names
        wanted = [name for name in names if name not in self._derived]
        wanted += [source for name in names for source in self._derived.get(name, ()) if source not in wanted]
        outputs = super().run(feed, list(dict.fromkeys(wanted)))
        if not self._as_declared(outputs):
            with self._switch:  # once, whichever of the runs in flight finds it
                if self._fallback is None:
                    logger.info("a tensor's channels differ from the model's shapes: its statistics reduced alone")
                    self._fallback = self._make_fallback()
            return self._fallback.run(feed, output_names)
        derived = {}
        if PACKED_RANGE_OUTPUTS[1] in self._derived and PACKED_RANGE_OUTPUTS[1] in names:
            derived[PACKED_RANGE_OUTPUTS[1]] = self._packed_maxes(outputs)
        for bundle in self._mean_bundles:
            if any(name + suffix in names for name in bundle.names for suffix in CHANNEL_MEAN_SUFFIXES):
                derived.update(_bundle_means(bundle, outputs[bundle.output], outputs[bundle.size]))
        return {name: derived[name] if name in derived else outputs[name] for name in names}

    def _as_declared(self, outputs: Mapping[str, np.ndarray]) -> bool:
        """Whether the bundles in ``outputs`` hold the channels the model declares of their tensors (a
        wrongly declared shape would shift every tensor after it in the concatenation)."""
        for bundle in (*self._max_bundles, *self._mean_bundles):
            array = outputs.get(bundle.output)
            axis = 1 if bundle.size is None else 0
            if array is not None and (array.ndim <= axis or array.shape[axis] != bundle.bounds[-1]):
                return False
        return True

    def _packed_maxes(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        highs = np.empty(self._count, dtype=np.float32)
        if self._unbundled_maxes:
            highs[self._unbundled_at] = outputs[self._unbundled_maxes]
        for bundle, at in zip(self._max_bundles, self._bundled_at):
            pooled = outputs[bundle.output]
            # a NaN stays (the batch's extreme is then not finite, and the batch skipped for the tensor),
            # where ONNX Runtime's ReduceMax keeps or drops it by its position
            channels = np.max(pooled.reshape(pooled.shape[0], -1), axis=0, initial=-np.inf)
            highs[at] = np.maximum.reduceat(channels, bundle.bounds[:-1])
        return highs


def _bundle_means(bundle: _Bundle, means: np.ndarray, size: np.ndarray) -> dict[str, np.ndarray]:
    """Each tensor's channel means and element count (``{name}`` + :data:`CHANNEL_MEAN_SUFFIXES`) from its
    bundle's: the means ``[sum C]`` in the order of the tensors, and the count of the pooled means
    (``N sum C``), ``N`` times each tensor's channels times its ``areas``."""
    rows = int(size) // max(int(bundle.bounds[-1]), 1)
    parts = {}
    for name, start, stop, area in zip(bundle.names, bundle.bounds[:-1], bundle.bounds[1:], bundle.areas):
        parts[name + CHANNEL_MEAN_SUFFIXES[0]] = means[start:stop]
        parts[name + CHANNEL_MEAN_SUFFIXES[1]] = np.array(rows * (stop - start) * area, dtype=size.dtype)
    return parts

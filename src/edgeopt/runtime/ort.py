"""ONNX Runtime on CPU: the only module of edgeopt that imports onnxruntime.

Sessions are built from an in-memory ``onnx_ir`` model (serialized without its
large weights, which ONNX Runtime reads from edgeopt's own arrays), serialized
bytes, or a file path. ``observe_all`` builds a session that also returns every
intermediate tensor, which shape filling and per-layer comparison use.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import types
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from edgeopt import ir as eir
from edgeopt.errors import DataError, ModelError
from edgeopt.runtime.tap_gather import TapGather, add_tap_gather_nodes

__all__ = ["CHANNEL_MEAN_SUFFIXES", "PACKED_RANGE_OUTPUTS", "RANGE_SUFFIXES", "OpTypes", "OrtSession",
           "batch_one_reshapes", "fill_missing_shapes", "fill_missing_types", "observing_session", "op_types",
           "op_times_ms", "optimized_model", "ort_version", "random_feed", "range_session"]

logger = logging.getLogger(__name__)


def ort_version() -> str:
    return ort.__version__


def _session_options(threads: int | None, optimize: bool, spin: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if not spin:  # idle worker threads sleep instead of busy-waiting for the next run
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 4  # ORT errors surface as exceptions; its log would repeat them
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return options


# ONNX Runtime refuses models whose IR version is newer than it knows; models
# written by a newer onnx package are lowered to this on the session's copy.
_MAX_IR_VERSION = 11


# Initializers of at least this size reach ONNX Runtime as OrtValues over edgeopt's own arrays
# (SessionOptions.add_external_initializers, no copy) instead of inside the serialized model:
# no protobuf copy of the weights, no parse of it by ONNX Runtime, nothing for it to copy.
EXTERNAL_MIN_BYTES = 1 << 14
_IN_MEMORY = "edgeopt-in-memory"  # placeholder location; ORT takes these tensors from the options
_EXTERNAL_DTYPES = frozenset(np.dtype(t) for t in (np.float32, np.float16, np.float64, np.int8, np.uint8,
                                                   np.int16, np.uint16, np.int32, np.int64, np.bool_))


@dataclass(frozen=True)
class SessionModel:
    """A model as ONNX Runtime takes it: protobuf without its large weights, and the weights."""

    proto: onnx.ModelProto
    initializers: Mapping[str, np.ndarray]


def session_model(model: ir.Model) -> SessionModel:
    """``model`` as protobuf (IR version lowered for ONNX Runtime) with its large top-level
    initializers left out as references to in-memory arrays (the model's own, not copies)."""
    arrays, swapped = {}, {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or tensor.nbytes < EXTERNAL_MIN_BYTES or isinstance(tensor, ir.ExternalTensor):
            continue
        array = tensor.numpy()
        if array.dtype not in _EXTERNAL_DTYPES:
            continue
        arrays[name] = np.ascontiguousarray(array)
        swapped[name] = tensor
        value.const_value = ir.ExternalTensor(_IN_MEMORY, 0, array.nbytes, tensor.dtype, shape=tensor.shape,
                                              name=name)
    try:
        proto = _ort_proto(model)
    finally:  # the model gets its tensors back whatever happened
        for name, tensor in swapped.items():
            model.graph.initializers[name].const_value = tensor
    return SessionModel(proto=proto, initializers=types.MappingProxyType(arrays))


def _ort_proto(model: ir.Model) -> onnx.ModelProto:
    """``model`` as protobuf with an IR version ONNX Runtime takes."""
    proto = ir.to_proto(model)
    proto.ir_version = min(proto.ir_version, _MAX_IR_VERSION)
    return proto


_MESSAGE_CHARS = 600


def _ort_message(error: Exception) -> str:
    """ONNX Runtime's message on one line: its lines joined (the shape it got and expected is often on
    the second), cut short when long."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS - 3] + "..."


def _load_error(error: Exception) -> ModelError:
    message = _ort_message(error)
    if "is not a registered function/op" in message:
        message += (" (an op neither standard ONNX nor one of ONNX Runtime's own: export the model with standard "
                    "ops, or keep it for the runtime that has the op)")
    return ModelError(f"ONNX Runtime cannot load the model: {message}")


def _session_bytes(model: bytes) -> bytes:
    """Serialized ``model`` with an IR version ONNX Runtime takes."""
    proto = onnx.load_from_string(model)
    if proto.ir_version <= _MAX_IR_VERSION:
        return model
    proto.ir_version = _MAX_IR_VERSION
    return proto.SerializeToString()


def _as_session_input(model: ir.Model | bytes | SessionModel,
                      options: ort.SessionOptions) -> tuple[bytes, list[ort.OrtValue]]:
    """The serialized model ONNX Runtime loads, its large initializers handed to ``options`` without a copy,
    and the OrtValues holding them, which must live as long as the session."""
    if isinstance(model, ir.Model):
        model = session_model(model)
    if not isinstance(model, SessionModel):
        return _session_bytes(model), []
    weights = [ort.OrtValue.ortvalue_from_numpy(array) for array in model.initializers.values()]
    if weights:
        options.add_external_initializers(list(model.initializers), weights)
    return model.proto.SerializeToString(), weights


class OrtSession:
    """A CPU inference session; ``run`` takes and returns ``{name: array}``."""

    def __init__(self, model: ir.Model | SessionModel | bytes | str | os.PathLike, *,
                 threads: int | None = None, optimize: bool = True, spin: bool = True,
                 early_free: bool = False, profile_prefix: str | None = None) -> None:
        """``model``: an in-memory model (its large weights are handed to ONNX Runtime without a
        copy, see :func:`session_model`), serialized bytes, or a file path. ``spin=False``: ONNX
        Runtime's worker threads sleep between runs rather than spin, leaving the cores to
        Python's work in between (calibration statistics); spinning suits back-to-back runs.
        ``early_free``: ONNX Runtime's priority-based node order, which runs a node as soon as its
        inputs are ready, so that tensors read by nodes appended at the end of the graph (the range
        reductions of :func:`range_session`) are not all kept alive until the end of the run; and no
        memory pattern (one block per run, sized for the run's peak): two runs at once of a 224x224
        MobileNetV2's range session with tap gathers held 50 MB more that way than served from the arena.
        ``profile_prefix``: ONNX Runtime profiles every run into a JSON file of that prefix
        (:meth:`end_profiling` names it)."""
        options = _session_options(threads, optimize, spin)
        if early_free:
            options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
            options.enable_mem_pattern = False
        if profile_prefix is not None:
            options.enable_profiling, options.profile_file_prefix = True, profile_prefix
        self._weights: list[ort.OrtValue] = []  # ONNX Runtime reads them for the session's life
        if isinstance(model, (str, os.PathLike)):
            source = str(model)
        else:
            source, self._weights = _as_session_input(model, options)
        try:
            self._session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as error:
            raise _load_error(error) from None
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, feed: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(output_names) if output_names is not None else self.output_names
        try:
            values = self._session.run(names, dict(feed))
        except Exception as error:
            message = _ort_message(error)
            if "must be within the inclusive range" in message:  # Gather's indices
                message += (" (an index input holds values past its table: token ids at or above the vocabulary "
                            "size, or a sequence longer than a position table?)")
            raise DataError(f"ONNX Runtime failed to run the model: {message}") from None
        return dict(zip(names, values))

    def end_profiling(self) -> str:
        """Stop profiling; the path of the JSON file written."""
        return self._session.end_profiling()


def op_times_ms(model: ir.Model | str | os.PathLike, feed: Mapping[str, np.ndarray], *, runs: int = 20,
                threads: int | None = None) -> dict[str, float]:
    """Milliseconds per run each op type of the graph ONNX Runtime runs takes (its profiler's kernel
    times, summed over the nodes of that type, averaged over ``runs`` runs after a first one, whose
    allocations are not counted), largest first."""
    import json

    with tempfile.TemporaryDirectory() as folder:
        session = OrtSession(model, threads=threads, profile_prefix=os.path.join(folder, "profile"))
        for _ in range(runs + 1):
            session.run(feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    starts = sorted(e["ts"] + e["dur"] for e in events if e.get("name") == "model_run")
    cutoff = starts[0] if starts else 0
    totals: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= cutoff:
            op = event.get("args", {}).get("op_name", "?")
            totals[op] = totals.get(op, 0.0) + event["dur"] / 1000.0 / max(len(starts) - 1, 1)
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def random_feed(specs: Sequence[eir.InputSpec], seed: int = 0,
                limits: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Random inputs of the right static shapes and dtypes (floats in [-1, 1), integers in [0, 8)).

    ``limits`` (:func:`edgeopt.ir.index_limits`) bounds the integers of inputs that index a table:
    a BERT's token type ids pick one of 2 rows, and an id of 5 fails the run."""
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in specs:
        if not spec.is_static:
            raise DataError(f"input {spec.name!r} has dynamic shape {spec.shape_text()}: "
                            f"fix it with --input-shape {spec.name}=...")
        if np.issubdtype(spec.dtype, np.floating):
            feed[spec.name] = rng.uniform(-1, 1, spec.shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feed[spec.name] = rng.integers(0, 2, spec.shape).astype(np.bool_)
        else:
            high = min(8, (limits or {}).get(spec.name, 8))
            feed[spec.name] = rng.integers(0, max(high, 1), spec.shape).astype(spec.dtype)
    return feed


def _with_all_outputs(model: ir.Model, names: Sequence[str]) -> SessionModel:
    """:func:`session_model` of ``model`` whose outputs also list ``names``."""
    prepared = session_model(model)
    existing = {o.name for o in prepared.proto.graph.output}
    for name in names:
        if name not in existing:
            prepared.proto.graph.output.append(onnx.ValueInfoProto(name=name))
    return prepared


def fill_missing_shapes(model: ir.Model, feed: Mapping[str, np.ndarray] | None = None) -> int:
    """Set shape and dtype on every node output whose static shape is unknown by running it once.

    Returns how many values were filled. The model's graph values are updated
    in place (this is a fresh model owned by the caller, never the user's file).
    """
    missing = [v for node in model.graph for v in node.outputs if v.name and not isinstance(v.type, ir.SequenceType)
               and (eir.static_shape(v) is None or v.dtype is None)]  # a sequence has no one shape
    if not missing:
        return 0
    results = _run_for(model, missing, feed)
    for value in missing:
        array = results[value.name]
        value.shape = ir.Shape(list(array.shape))
        value.dtype = ir.DataType.from_numpy(array.dtype)
    logger.info("filled %d shapes by running the model", len(missing))
    return len(missing)


def fill_missing_types(model: ir.Model, feed: Mapping[str, np.ndarray] | None = None) -> int:
    """Set the dtype of every node output ONNX shape inference left untyped by running the model once.

    ONNX Runtime knows the output types of its own ops (com.microsoft's
    SkipLayerNormalization, FusedMatMul ...) that ONNX's inference cannot
    type. Shapes are left alone: those of one run would fix dynamic dims.
    ``feed`` None runs on random inputs; a dynamic dim takes a small size
    (:func:`_typing_feed`): the types do not depend on it. DataError when the
    run fails. Returns how many values were typed; the model is updated in place.
    """
    missing = [v for node in model.graph for v in node.outputs if v.name and v.dtype is None]
    if not missing:
        return 0
    results = _run_for(model, missing, feed if feed is not None else _typing_feed(model))
    for value in missing:
        value.dtype = ir.DataType.from_numpy(results[value.name].dtype)
    logger.info("typed %d values by running the model", len(missing))
    return len(missing)


#: Sizes a dynamic input dim takes in the run that only types values: 1 on the first (batch) axis, 8 on
#: any other (tokens, pixels), so inputs sharing a symbol on the same axis agree. A run these sizes do not
#: fit fails as before (DataError): the caller says to give data.
_TYPING_BATCH, _TYPING_SIZE = 1, 8


def _typing_feed(model: ir.Model) -> dict[str, np.ndarray]:
    """Random inputs for a run whose only use is the dtypes of its values: dynamic dims made small."""
    specs = [eir.InputSpec(name=spec.name, shape=tuple(
        dim if isinstance(dim, int) else _TYPING_BATCH if axis == 0 else _TYPING_SIZE
        for axis, dim in enumerate(spec.shape)), dtype=spec.dtype, rank_known=spec.rank_known)
        for spec in eir.model_inputs(model)]
    return random_feed(specs, limits=eir.index_limits(model))


def _run_for(model: ir.Model, values: Sequence[ir.Value], feed: Mapping[str, np.ndarray] | None) -> dict:
    """The arrays of ``values`` (node outputs) in one unoptimized run on ``feed`` or random inputs."""
    feed = dict(feed) if feed is not None else random_feed(eir.model_inputs(model), limits=eir.index_limits(model))
    session = OrtSession(_with_all_outputs(model, [v.name for v in values]), optimize=False)
    return session.run(feed, [v.name for v in values])


class OpTypes(NamedTuple):
    """The types each formal input and output of an op admits (``"tensor(float16)"`` ...), as ONNX
    Runtime registers the op; ``variadic_*``: the last formal parameter repeats."""

    inputs: tuple[frozenset[str], ...]
    outputs: tuple[frozenset[str], ...]
    variadic_inputs: bool
    variadic_outputs: bool


@functools.cache
def op_types(domain: str, op_type: str) -> OpTypes | None:
    """The types of the newest schema ONNX Runtime has for ``domain``'s ``op_type`` (its contrib ops,
    com.microsoft, are unknown to the onnx package), or None when it has none."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    schemas = [s for s in ort_state.get_all_operator_schema() if s.domain == domain and s.name == op_type]
    if not schemas:
        return None
    schema = max(schemas, key=lambda s: s.since_version)
    variadic = ort_state.schemadef.OpSchema.FormalParameterOption.Variadic

    def admitted(params) -> tuple[frozenset[str], ...]:
        return tuple(frozenset(param.types) for param in params)

    return OpTypes(inputs=admitted(schema.inputs), outputs=admitted(schema.outputs),
                   variadic_inputs=bool(schema.inputs) and schema.inputs[-1].option == variadic,
                   variadic_outputs=bool(schema.outputs) and schema.outputs[-1].option == variadic)


def observing_session(model: ir.Model, names: Sequence[str], *, threads: int | None = None,
                      optimize: bool = True) -> OrtSession:
    """A session whose outputs are the model's outputs followed by the intermediate tensors ``names``.

    ``names`` must be produced by nodes (graph inputs are in the feed
    already). ONNX Runtime keeps a requested tensor intact through its graph
    optimizations, so ``optimize`` only trades session build time for speed.
    """
    return OrtSession(_with_all_outputs(model, names), threads=threads, optimize=optimize)


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


def optimized_model(model: ir.Model, *, threads: int | None = None) -> ir.Model:
    """The graph ONNX Runtime actually runs after its optimizations (QDQ fusions, layout).

    Used to check which integer kernels (QLinearConv, QLinearMatMul ...) a
    QDQ model turns into. Written by ORT to a temporary file and read back, its
    initializers of 1 MiB or more left out (their names, types and shapes stay):
    the model's large weights reach ONNX Runtime as in the sessions (no protobuf
    copy), and what it writes may pass protobuf's 2 GB (ONNX Runtime computes a
    float16 model's MatMuls in float32, with float32 copies of their weights).
    """
    options = _session_options(threads, optimize=True)
    source, weights = _as_session_input(model, options)  # (kept alive until ONNX Runtime has written the model)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "weights.data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                     str(_OPTIMIZED_EXTERNAL_MIN_BYTES))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "optimized.onnx"
        options.optimized_model_filepath = str(path)
        try:
            ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as error:
            raise _load_error(error) from None
        return ir.from_proto(onnx.load(str(path), load_external_data=False))


_OPTIMIZED_EXTERNAL_MIN_BYTES = 1 << 20

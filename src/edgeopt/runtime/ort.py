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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from edgeopt import ir as eir
from edgeopt.errors import DataError, ModelError

__all__ = ["OpTypes", "OrtSession", "fill_missing_shapes", "fill_missing_types", "observing_session", "op_types",
           "op_times_ms", "optimized_model", "ort_version", "random_feed"]

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

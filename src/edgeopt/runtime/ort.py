"""ONNX Runtime on CPU: the only module of edgeopt that imports onnxruntime.

Sessions are built from an in-memory ``onnx_ir`` model (serialized once) or a
file path. ``observe_all`` builds a session that also returns every
intermediate tensor, which shape filling and per-layer comparison use.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from edgeopt import ir as eir
from edgeopt.errors import DataError, ModelError
from edgeopt.io import model_to_bytes

__all__ = ["RANGE_SUFFIXES", "OrtSession", "fill_missing_shapes", "observing_session", "optimized_model",
           "ort_version", "random_feed", "range_session"]

logger = logging.getLogger(__name__)


def ort_version() -> str:
    return ort.__version__


def _session_options(threads: int | None, optimize: bool, lean: bool = False) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 4  # ORT errors surface as exceptions; its log would repeat them
    if lean:  # calibration: many runs of one model, memory matters more than allocation speed
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return options


# ONNX Runtime refuses models whose IR version is newer than it knows; models
# written by a newer onnx package are lowered to this on the session's copy.
_MAX_IR_VERSION = 11


def _session_bytes(model: ir.Model | bytes) -> bytes:
    import onnx  # local: only to patch the IR version of the session's copy

    proto = ir.to_proto(model) if isinstance(model, ir.Model) else onnx.load_from_string(model)
    if proto.ir_version <= _MAX_IR_VERSION:
        return model_to_bytes(model) if isinstance(model, ir.Model) else model
    proto.ir_version = _MAX_IR_VERSION
    return proto.SerializeToString()


class OrtSession:
    """A CPU inference session; ``run`` takes and returns ``{name: array}``."""

    def __init__(self, model: ir.Model | bytes | str | os.PathLike, *, threads: int | None = None,
                 optimize: bool = True, lean: bool = False, prepared: bool = False) -> None:
        """``prepared``: ``model`` is bytes this module already serialized for ONNX Runtime
        (IR version checked), so they are not parsed again; ``lean``: no memory arena or
        pre-planned memory pattern (smaller peak for long calibration runs)."""
        if isinstance(model, (str, os.PathLike)):
            source = str(model)
        else:
            source = model if prepared and isinstance(model, bytes) else _session_bytes(model)
        try:
            self._session = ort.InferenceSession(source, _session_options(threads, optimize, lean),
                                                 providers=["CPUExecutionProvider"])
        except Exception as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelError(f"ONNX Runtime cannot load the model: {message}") from None
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, feed: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(output_names) if output_names is not None else self.output_names
        try:
            values = self._session.run(names, dict(feed))
        except Exception as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DataError(f"ONNX Runtime failed to run the model: {message}") from None
        return dict(zip(names, values))


def random_feed(specs: Sequence[eir.InputSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the right static shapes and dtypes (floats in [-1, 1))."""
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
            feed[spec.name] = rng.integers(0, 8, spec.shape).astype(spec.dtype)
    return feed


def _output_proto(model: ir.Model, names: Sequence[str]):
    """A protobuf copy of ``model`` whose outputs also list ``names`` (IR version lowered for ORT)."""
    import onnx  # local: only for adding output declarations on the copy

    proto = ir.to_proto(model)
    existing = {o.name for o in proto.graph.output}
    for name in names:
        if name not in existing:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    proto.ir_version = min(proto.ir_version, _MAX_IR_VERSION)
    return proto


def _with_all_outputs(model: ir.Model, names: Sequence[str]) -> bytes:
    """Serialize a copy of ``model`` whose outputs also list ``names``."""
    return _output_proto(model, names).SerializeToString()


def fill_missing_shapes(model: ir.Model, feed: Mapping[str, np.ndarray] | None = None) -> int:
    """Set shape and dtype on every node output whose static shape is unknown by running it once.

    Returns how many values were filled. The model's graph values are updated
    in place (this is a fresh model owned by the caller, never the user's file).
    """
    missing = [v for node in model.graph for v in node.outputs
               if v.name and (eir.static_shape(v) is None or v.dtype is None)]
    if not missing:
        return 0
    feed = dict(feed) if feed is not None else random_feed(eir.model_inputs(model))
    session = OrtSession(_with_all_outputs(model, [v.name for v in missing]), optimize=False)
    results = session.run(feed, [v.name for v in missing])
    for value in missing:
        array = results[value.name]
        value.shape = ir.Shape(list(array.shape))
        value.dtype = ir.DataType.from_numpy(array.dtype)
    logger.info("filled %d shapes by running the model", len(missing))
    return len(missing)


def observing_session(model: ir.Model, names: Sequence[str], *, threads: int | None = None,
                      optimize: bool = True) -> OrtSession:
    """A session whose outputs are the model's outputs followed by the intermediate tensors ``names``.

    ``names`` must be produced by nodes (graph inputs are in the feed
    already). ONNX Runtime keeps a requested tensor intact through its graph
    optimizations, so ``optimize`` only trades session build time for speed.
    """
    return OrtSession(_with_all_outputs(model, names), threads=threads, optimize=optimize)


RANGE_SUFFIXES = ("__edgeopt_min", "__edgeopt_max")


def _free_batch_dim(graph) -> None:
    """Make dim 0 of the inputs and outputs symbolic and forget intermediate shapes (protobuf graph)."""
    for value in [*graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = "edgeopt_batch"
    del graph.value_info[:]


def range_session(model: ir.Model, full: Sequence[str], reduced: Sequence[str], *,
                  threads: int | None = None, free_batch: bool = False) -> OrtSession:
    """A session returning the tensors ``full`` whole and, for each of ``reduced``, only its min and max.

    The min and max are computed inside ONNX Runtime (ReduceMin/ReduceMax over
    all axes, outputs ``{name}__edgeopt_min`` / ``__edgeopt_max``), so a
    min/max calibration fetches two scalars per tensor instead of the tensor.
    With ``free_batch`` the session's batch dim is symbolic, so several
    batch-1 samples can run as one batch (the caller checks the model allows it).
    """
    import onnx  # local: the extra nodes are added to the session's protobuf copy

    proto = _output_proto(model, full)
    if free_batch:
        _free_batch_dim(proto.graph)
    for name in reduced:
        for op_type, suffix in zip(("ReduceMin", "ReduceMax"), RANGE_SUFFIXES):
            proto.graph.node.append(onnx.helper.make_node(op_type, [name], [name + suffix], keepdims=0,
                                                          name=name + suffix))
            proto.graph.output.append(onnx.ValueInfoProto(name=name + suffix))
    data = proto.SerializeToString()
    del proto  # one serialized copy of the weights at a time
    return OrtSession(data, threads=threads, lean=True, prepared=True)


def optimized_model(model: ir.Model, *, threads: int | None = None) -> ir.Model:
    """The graph ONNX Runtime actually runs after its optimizations (QDQ fusions, layout).

    Used to check which integer kernels (QLinearConv, QLinearMatMul ...) a
    QDQ model turns into. Written by ORT to a temporary file and read back.
    """
    import onnx  # local: ORT writes protobuf

    options = _session_options(threads, optimize=True)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "optimized.onnx"
        options.optimized_model_filepath = str(path)
        try:
            ort.InferenceSession(_session_bytes(model), options, providers=["CPUExecutionProvider"])
        except Exception as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelError(f"ONNX Runtime cannot load the model: {message}") from None
        return ir.from_proto(onnx.load(str(path)))

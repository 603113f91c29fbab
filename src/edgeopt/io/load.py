"""Load an ONNX model from any common exporter into an ``onnx_ir`` model.

Exporters differ in what they write; loading normalizes, on a copy, what every
later stage would otherwise trip over:

* weights in external data files are read from beside the model;
* graph inputs that shadow initializers (old PyTorch/Caffe2 exporters) become
  plain constants; initializers no node uses are dropped;
* sparse weights (``sparse_initializer``, ``Constant`` with ``sparse_value``)
  become dense ones, which every pass and runtime reads;
* calls of the model's local functions (``FunctionProto``: TorchScript's
  ``export_modules_as_functions``, onnxscript) are inlined, so the convs and
  matmuls in their bodies are seen, folded and quantized like any other;
* a node name used twice in one graph (ONNX Runtime refuses the model) gets
  a suffix on its second use (``conv`` -> ``conv_1``);
* dynamic input dimensions are fixed from ``input_shapes`` (``--input-shape``),
  and a model that still has dynamic inputs is refused with the name of the
  input to fix when ``require_static`` is set;
* shapes of every value are inferred (with constant data propagation); a graph
  output whose shape inference cannot find keeps the one the exporter wrote.

The file on disk is never modified.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import onnx_ir as ir

from edgeopt.errors import ModelError
from edgeopt.io.save import node_subgraphs
from edgeopt.io.shape_values import complete_reshape_shapes
from edgeopt.io.shapes import (check_static, clear_output_shapes, fix_input_shapes, parse_input_shapes,
                               restore_output_shapes)
from edgeopt.naming import claim_name
from edgeopt.runtime.memory import return_freed_memory

__all__ = ["FILE_BYTES_KEY", "SUPPORTED_OPSETS", "load_model", "model_file_bytes", "parse_input_shapes",
           "read_model_proto"]

logger = logging.getLogger(__name__)

SUPPORTED_OPSETS = range(11, 22)
FILE_BYTES_KEY = "edgeopt.file_bytes"  # Model.meta: size on disk of the file a model was loaded from


def read_model_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file (and its external data) or raise a one-line ModelError."""
    return _read_model(path)[0]


def _external_files(proto: onnx.ModelProto, folder: Path) -> list[Path]:
    """The data files the graph's initializers reference."""
    locations = {entry.value for tensor in proto.graph.initializer
                 for entry in tensor.external_data if entry.key == "location"}
    return [folder / location for location in sorted(locations)]


def _disk_bytes(file: Path, sidecars: Iterable[Path]) -> int:
    return file.stat().st_size + sum(p.stat().st_size for p in sidecars if p.is_file())


def _read_model(path: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """The model with its external data loaded, and its size on disk (file plus data files); a
    ModelProto given in memory is copied (its serialized size stands for the file's)."""
    if isinstance(path, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(path)
        if not proto.graph.node:
            raise ModelError("the onnx.ModelProto given is not a valid ONNX model (its graph has no nodes)")
        _require_outputs(proto, "the onnx.ModelProto given")
        tensors = [*proto.graph.initializer, *(attribute.t for node in proto.graph.node
                                               for attribute in node.attribute if attribute.HasField("t"))]
        if any(onnx.external_data_helper.uses_external_data(tensor) for tensor in tensors):
            raise ModelError("the onnx.ModelProto given keeps weights in external data files it was loaded "
                             "without: pass the model's path, or onnx.load it with its external data")
        return proto, proto.ByteSize()
    file = Path(path)
    if not file.exists():
        raise ModelError(f"model file {file} not found: check the path")
    if file.is_dir():
        saved_model = " (a TensorFlow SavedModel: convert it with python -m tf2onnx.convert --saved-model)"
        raise ModelError(f"{file} is a folder, not an .onnx model file"
                         f"{saved_model if (file / 'saved_model.pb').is_file() else ''}")
    if not file.is_file():  # /dev/zero was read until memory ran out, a FIFO blocked for ever
        raise ModelError(f"{file} is not a regular file (a device or a pipe): give the path of an .onnx file")
    if file.stat().st_size == 0:
        raise ModelError(f"{file} is empty (0 bytes): the export or the copy did not finish")
    try:
        proto = onnx.load(str(file), load_external_data=False)
        sidecars = _external_files(proto, file.parent)
        missing = [sidecar for sidecar in sidecars if not sidecar.is_file()]
        if missing:
            raise FileNotFoundError(2, "missing", str(missing[0]))
        onnx.external_data_helper.load_external_data_for_model(proto, str(file.parent))
    except FileNotFoundError as error:
        raise ModelError(f"{file}: its external weight file {Path(error.filename or '').name} is missing: "
                         "keep the data file next to the model") from None
    except Exception as error:  # protobuf raises DecodeError, RuntimeWarning, ValueError...
        foreign = _foreign_format(file)
        if foreign is not None:
            raise ModelError(f"{file} is {foreign}") from None
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"{file} is not a valid ONNX model ({first_line}): "
                         "is the file truncated or of another format?") from None
    if not proto.graph.node:
        raise ModelError(f"{file} is not a valid ONNX model (its graph has no nodes)")
    _require_outputs(proto, str(file))
    return proto, _disk_bytes(file, sidecars)


def _require_outputs(proto: onnx.ModelProto, what: str) -> None:
    """A graph without outputs computes nothing anyone can read: ONNX Runtime refused it with an internal
    message (quantize), run blamed the data and bench its worker."""
    if not proto.graph.output:
        raise ModelError(f"{what} has no graph outputs: nothing it computes can be read; export it with its "
                         "outputs (torch.onnx.export's output_names, or graph.output)")


_TFLITE_IDENTIFIER = b"TFL3"  # a .tflite flatbuffer's file identifier, at bytes 4-8


def _foreign_format(file: Path) -> str | None:
    """What a file that is not ONNX is, and what to do, when its first bytes tell: the model files
    users mistake for ONNX (a PyTorch checkpoint, TFLite, Keras) and calibration data."""
    try:
        with open(file, "rb") as stream:
            head = stream.read(8)
        names: list[str] = []
        if zipfile.is_zipfile(file):
            with zipfile.ZipFile(file) as archive:
                names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return None
    if any(name.endswith("data.pkl") for name in names) or head[:1] == b"\x80":  # torch.save: zip, or a pickle
        return ("a PyTorch checkpoint (torch.save), not an ONNX model: export the module to ONNX first "
                "(torch.onnx.export, or edgeopt.from_torch)")
    if head[4:8] == _TFLITE_IDENTIFIER:
        return "a TensorFlow Lite model, not an ONNX model: convert it first (python -m tf2onnx.convert --tflite)"
    if head.startswith(b"\x89HDF") or "model.weights.h5" in names:
        return "a Keras model, not an ONNX model: convert it first (tf2onnx.convert.from_keras)"
    if head.startswith(b"\x93NUMPY") or (names and all(name.endswith(".npy") for name in names)):
        return "NumPy data, not an ONNX model: give the model first, the data with --data"
    return None


def _default_opset(proto: onnx.ModelProto) -> int:
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    raise ModelError("model imports no default ONNX opset: it was not written by a standard exporter")


def _drop_shadowing_inputs(graph: onnx.GraphProto) -> None:
    initializer_names = {t.name for t in graph.initializer}
    kept = [v for v in graph.input if v.name not in initializer_names]
    if len(kept) != len(graph.input):
        del graph.input[:]
        graph.input.extend(kept)


def _used_names(graph: onnx.GraphProto) -> set[str]:
    used = {name for node in graph.node for name in node.input}
    used.update(v.name for v in graph.output)
    for node in graph.node:
        for subgraph in node_subgraphs(node):
            used.update(_used_names(subgraph))
    return used


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = _used_names(graph)
    kept = [t for t in graph.initializer if t.name in used]
    if len(kept) != len(graph.initializer):
        logger.info("dropped %d unused initializers", len(graph.initializer) - len(kept))
        del graph.initializer[:]
        graph.initializer.extend(kept)


def _dense(sparse: onnx.SparseTensorProto, name: str) -> onnx.TensorProto:
    """The dense tensor a sparse one stands for: zeros but at ``indices`` (linear, or one row of
    coordinates per value)."""
    values = onnx.numpy_helper.to_array(sparse.values).ravel()
    indices = onnx.numpy_helper.to_array(sparse.indices).astype(np.int64)
    shape = tuple(sparse.dims)
    dense = np.zeros(int(np.prod(shape)), dtype=values.dtype)
    if indices.size:
        dense[indices if indices.ndim == 1 else np.ravel_multi_index(tuple(indices.T), shape)] = values
    return onnx.numpy_helper.from_array(dense.reshape(shape), name)


def _densify_constants(nodes: Iterable[onnx.NodeProto]) -> None:
    for node in nodes:
        for attribute in node.attribute:
            if node.op_type == "Constant" and attribute.name == "sparse_value":
                tensor = _dense(attribute.sparse_tensor, node.output[0])
                attribute.Clear()
                attribute.CopyFrom(onnx.helper.make_attribute("value", tensor))
        for subgraph in node_subgraphs(node):
            _densify_sparse(subgraph)


def _densify_sparse(graph: onnx.GraphProto) -> None:
    """Sparse weights become dense ones (``onnx_ir`` reads no sparse tensor: it would drop a sparse
    initializer and refuse a sparse ``Constant``), in ``graph`` and its subgraphs."""
    for sparse in graph.sparse_initializer:
        graph.initializer.append(_dense(sparse, sparse.values.name))
    graph.ClearField("sparse_initializer")
    _densify_constants(graph.node)


def _unique_node_names(graph: onnx.GraphProto, taken: set[str] | None = None) -> None:
    """Name each unnamed node of ``graph`` ``{op_type}_{index}`` (its index in the node list: the
    label ``inspect`` shows, so ``--exclude`` and every report take that name) and rename the second
    and later nodes that repeat a name, and so in its subgraphs. New names avoid every name of the
    model (``taken``), so a subgraph's unnamed Conv does not take the name of the main graph's."""
    taken = _node_names(graph) if taken is None else taken
    seen: set[str] = set()
    for index, node in enumerate(graph.node):
        if not node.name:
            node.name = claim_name(f"{node.op_type}_{index}", taken)
        elif node.name in seen:  # (its name is taken: the first node holding it)
            renamed = claim_name(node.name, taken)
            logger.info("node name %r is used twice: the second is %r", node.name, renamed)
            node.name = renamed
        seen.add(node.name)
    for node in graph.node:  # after this graph's names, which keep the labels inspect shows
        for subgraph in node_subgraphs(node):
            _unique_node_names(subgraph, taken)


def _node_names(graph: onnx.GraphProto) -> set[str]:
    """The names of the nodes of ``graph`` and of its subgraphs."""
    names = {node.name for node in graph.node}
    for node in graph.node:
        for subgraph in node_subgraphs(node):
            names |= _node_names(subgraph)
    return names


def _inline_functions(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with every call of a local function replaced by the function's body (nested calls
    too). A body node is named after the call that runs it (``/b1/act/Block/Conv_0`` for the ``Conv_0`` of
    the function the node ``/b1/act/Block`` calls): reports and ``--exclude`` name each layer where it is."""
    if not proto.functions:
        return proto
    generated = _name_by_call_site(proto)
    try:
        inlined = onnx.inliner.inline_local_functions(proto, convert_version=True)
    except Exception as error:
        raise ModelError(f"cannot inline the model's local functions ({', '.join(f.name for f in proto.functions)}): "
                         f"{str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}"
                         ) from None
    _drop_inliner_suffixes(inlined.graph, generated)
    logger.info("inlined the calls of %d local function(s)", len(proto.functions))
    return inlined


def _name_by_call_site(proto: onnx.ModelProto) -> set[str]:
    """Give each call of a local function in the main graph (and the calls nested in those) its own copy
    of the function, whose nodes are named ``{call}/{node}`` (``{call}/{OpType}`` when unnamed); return
    those names. Calls inside subgraphs keep the shared functions, their nodes named ``{Function}/{node}``."""
    functions = {(f.domain, f.name, f.overload): f for f in proto.functions}
    copies: list[onnx.FunctionProto] = []
    calls = [node for node in proto.graph.node if (node.domain, node.op_type, node.overload) in functions]
    while calls:
        call = calls.pop()
        original = functions[(call.domain, call.op_type, call.overload)]
        copy = onnx.FunctionProto()
        copy.CopyFrom(original)
        copy.name = call.op_type = f"{original.name}__call{len(copies)}"
        for node, source in zip(copy.node, original.node):
            node.name = f"{call.name}/{source.name or source.op_type}"
            if (node.domain, node.op_type, node.overload) in functions:
                calls.append(node)
        copies.append(copy)
    for function in proto.functions:
        for node in function.node:
            node.name = f"{function.name}/{node.name or node.op_type}"
    proto.functions.extend(copies)
    return {node.name for copy in copies for node in copy.node}


def _drop_inliner_suffixes(graph: onnx.GraphProto, generated: set[str]) -> None:
    """The inliner suffixes every name it copies (``__1``, and ``_0`` ... for a repeat): drop that from the
    call-site names, which are unique already (a repeat in one body gets ``_1`` ...)."""
    taken = {node.name for node in graph.node}
    for node in graph.node:
        base, sep, suffix = node.name.rpartition("__")
        base = base if sep and base in generated and suffix.split("_")[0].isdigit() else None
        if base is not None:
            taken.discard(node.name)
            node.name = claim_name(base, taken)


# Weights move out of the protobuf into numpy arrays before shape inference: ONNX's inference
# serializes and re-parses the whole model (three copies of the weights at once, and 0.2 s on a
# ResNet-18), and a protobuf arena is freed only as a whole, so a model whose IR still points into
# it would keep every original weight alive after passes replace them (BatchNorm folding).
# Small tensors stay (shape inference propagates their values), as do types whose raw bytes
# numpy cannot view (bfloat16, float8, int4 ...).
_DETACH_MIN_BYTES = 1024
_DETACHABLE = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                         onnx.TensorProto.INT8, onnx.TensorProto.UINT8})


def _detach_weights(graph: onnx.GraphProto) -> dict[str, ir.Tensor]:
    """Move large initializers' data out of ``graph`` into numpy-backed tensors (dims stay)."""
    detached: dict[str, ir.Tensor] = {}
    for tensor in graph.initializer:
        if (tensor.data_type not in _DETACHABLE or tensor.data_location == onnx.TensorProto.EXTERNAL
                or len(tensor.raw_data) < _DETACH_MIN_BYTES):
            continue
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
        # A read-only view of the bytes object (the one copy made): passes build new arrays.
        array = np.frombuffer(tensor.raw_data, dtype=dtype).reshape(tuple(tensor.dims))
        if not dtype.isnative:  # big-endian host: the data is little-endian
            array = array.astype(dtype.newbyteorder("="))
        detached[tensor.name] = ir.Tensor(array, name=tensor.name, doc_string=tensor.doc_string or None)
        tensor.ClearField("raw_data")
    return detached


def _attach_weights(model: ir.Model, detached: Mapping[str, ir.Tensor]) -> None:
    initializers = model.graph.initializers
    for name, tensor in detached.items():
        initializers[name].const_value = tensor


# Ops whose output has the shape and type of their first input but which ONNX's shape inference
# (1.23) leaves untyped, and with them every value after them: GroupNormalization, which torch's
# dynamo exporter writes from opset 21 (a GroupNorm CNN then lost every shape past its first
# norm, and with them the float passes' rewrites: a mean pooled as GlobalAveragePool, a PRelu as
# LeakyRelu). Inference runs with an Identity standing in for each.
_SHAPE_OF_INPUT_OPS = frozenset({"GroupNormalization"})


def _infer_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    stand_ins = _stand_in_identities(proto.graph)
    try:
        inferred = _onnx_inference(proto)
    except Exception as error:  # inference is best effort; runtime fills the gaps
        logger.warning("ONNX shape inference failed (%s); shapes come from running the model", error)
        inferred = proto
    else:
        inferred = complete_reshape_shapes(inferred, _onnx_inference)
    for index, node in stand_ins.items():
        inferred.graph.node[index].CopyFrom(node)
    return inferred


def _onnx_inference(proto: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)


def _stand_in_identities(graph: onnx.GraphProto) -> dict[int, onnx.NodeProto]:
    """Turn each :data:`_SHAPE_OF_INPUT_OPS` node of ``graph`` into an Identity of its first input, in
    place; return the original nodes by position, to put back after inference."""
    originals = {}
    for index, node in enumerate(graph.node):
        if node.op_type in _SHAPE_OF_INPUT_OPS and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            originals[index] = onnx.NodeProto()
            originals[index].CopyFrom(node)
            identity = onnx.helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name)
            node.CopyFrom(identity)
    return originals


def load_model(
    path: str | os.PathLike | onnx.ModelProto,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    require_static: bool = True,
) -> ir.Model:
    """Load, validate and normalize an ONNX model; the file is never modified."""
    return_freed_memory()
    proto, file_bytes = _read_model(path)
    opset = _default_opset(proto)
    if opset not in SUPPORTED_OPSETS:
        logger.warning("model uses opset %d; edgeopt is tested with opsets %d-%d",
                       opset, SUPPORTED_OPSETS.start, SUPPORTED_OPSETS.stop - 1)
    graph = proto.graph
    _densify_sparse(graph)
    _unique_node_names(graph)
    for function in proto.functions:
        _densify_constants(function.node)
    _drop_shadowing_inputs(graph)
    proto.ir_version = max(proto.ir_version, 4)  # IR 3 wanted every initializer listed as an input
    _drop_unused_initializers(graph)
    if input_shapes:
        fix_input_shapes(graph, input_shapes)
    if require_static:
        check_static(graph)
    output_shapes = clear_output_shapes(graph)
    detached = _detach_weights(graph)
    del graph  # the original protobuf (and its arena) goes once inference has copied it
    proto = _infer_shapes(_inline_functions(proto))
    restore_output_shapes(proto.graph, output_shapes)
    try:
        model = ir.from_proto(proto)
    except Exception as error:
        where = "the onnx.ModelProto given" if isinstance(path, onnx.ModelProto) else path
        raise ModelError(f"{where}: cannot read the graph ({str(error).splitlines()[0]})") from None
    _attach_weights(model, detached)
    _sort_if_unordered(model.graph)
    model.meta[FILE_BYTES_KEY] = file_bytes
    return model


def _sort_if_unordered(graph: ir.Graph) -> None:
    """Put the nodes in topological order when the file has them out of order (ONNX Runtime accepts
    that; graph rewrites and copies need it). An ordered graph keeps its order exactly; a graph with a
    cycle is refused with the nodes on it."""
    seen = {id(v) for v in (*graph.inputs, *graph.initializers.values())}
    ordered = True
    for node in graph:
        if any(v is not None and id(v) not in seen and v.producer() is not None for v in node.inputs):
            ordered = False
            break
        seen.update(id(v) for v in node.outputs)
    if not ordered:
        try:
            graph.sort()
        except Exception:  # onnx_ir's ValueError: a cycle
            cycle = " -> ".join(repr(name) for name in _cycle(graph))
            raise ModelError(f"the graph has a cycle ({cycle}): a node reads what it computes itself; ONNX "
                             "graphs must be acyclic: re-export the model") from None


def _cycle(graph: ir.Graph) -> list[str]:
    """The names of nodes on one cycle of ``graph`` (in data-flow order), found by walking producers back
    from a node that topological order cannot place."""
    nodes = list(graph)
    placed: set[int] = set()
    progress = True
    while progress:  # place every node whose producers are placed (or outside the graph)
        progress = False
        for node in nodes:
            producers = [v.producer() for v in node.inputs if v is not None and v.producer() is not None]
            if id(node) not in placed and all(id(producer) in placed for producer in producers):
                placed.add(id(node))
                progress = True
    walk = [next(node for node in nodes if id(node) not in placed)]
    while walk.count(walk[-1]) < 2:  # an unplaced node always has an unplaced producer
        walk.append(next(v.producer() for v in walk[-1].inputs
                         if v is not None and v.producer() is not None and id(v.producer()) not in placed))
    start = walk.index(walk[-1])
    return [node.name or node.op_type for node in reversed(walk[start:])]


def model_file_bytes(path: str | os.PathLike) -> int:
    """Size on disk of a model file plus the external data files it references."""
    file = Path(path)
    return _disk_bytes(file, _external_files(onnx.load(str(file), load_external_data=False), file.parent))


def model_files(path: str | os.PathLike) -> list[Path]:
    """The model file and the external data files it references (none when it cannot be read)."""
    file = Path(path)
    try:
        return [file, *_external_files(onnx.load(str(file), load_external_data=False), file.parent)]
    except Exception:  # unreadable: loading it reports that, in its own words
        return [file]

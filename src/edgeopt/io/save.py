"""Atomic output: write to a temporary file in the target folder, then rename.

A crash or an error half way never leaves a truncated artifact behind, and the
target is replaced in one step (``os.replace`` is atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx
import onnx_ir as ir

from edgeopt.errors import ModelError, OutputError

__all__ = ["atomic_write_bytes", "atomic_write_files", "check_writable", "current_umask", "external_data_path",
           "make_output_folder", "model_file_contents", "model_to_bytes", "save_model"]

_PROTOBUF_LIMIT_BYTES = 2**31 - 1
# Past protobuf's limit, tensors of at least this size go to the external data file, each at an offset
# aligned to this (ONNX Runtime may map the file's pages straight into the tensors).
_EXTERNAL_MIN_BYTES = 1024
_EXTERNAL_ALIGNMENT = 4096


def check_writable(path: str | os.PathLike) -> Path:
    """Refuse, before any work, an output path that cannot be written: its folder is missing or
    read-only, or the path is a folder or a special file (``/dev/null``: replaced by a regular file
    when run as root)."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"cannot write {target}: {folder} is a file, not a folder; choose another -o path")
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} does not exist: create it or choose another -o path")
    if target.is_dir():
        raise OutputError(f"output {target} is a folder: give a file path to -o")
    if target.exists() and not target.is_file():  # the rename below would put a file in its place
        raise OutputError(f"output {target} is a device, pipe or socket, not a file (the finished file is renamed "
                          "over the target, which would replace it): give a file path to -o")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {folder} is not writable: choose another -o path")
    return target


def make_output_folder(path: str | os.PathLike, *, create: bool = True) -> Path:
    """The output folder ``path`` (``-o`` of the commands that write several files), created with its
    parents unless ``create`` is False (a check before any work); refused when it is a file."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output {folder} is a file: -o takes a folder here (it is created if missing)")
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot create the output folder {folder}: {error.strerror or error}") from error
    elif not folder.exists():
        check_creatable(folder)
    return folder


def check_creatable(folder: Path) -> None:
    """Refuse, before any work, a new output folder whose nearest existing ancestor is a file or not
    writable (it could not be created when the output is written)."""
    ancestor = next(parent for parent in folder.absolute().parents if parent.exists())
    if not ancestor.is_dir():
        raise OutputError(f"cannot create the output folder {folder}: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create the output folder {folder}: {ancestor} is not writable")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; the folder must exist. The file gets the usual
    permissions (``0o666`` less the umask), not the private ones of a temporary file."""
    return atomic_write_files([(path, data)])[0]


def atomic_write_files(files: Sequence[tuple[str | os.PathLike, bytes | bytearray]]) -> list[Path]:
    """Write several files that belong together (a model and its report): all of them or none.

    Each is written in full to a temporary file beside its target first; then all are renamed
    in one go, with Ctrl-C and SIGTERM held back until the last rename is done, so an interrupt
    never leaves a new file next to an old or missing partner.
    """
    targets = [check_writable(path) for path, _ in files]
    temps: list[str] = []
    target = targets[0]
    try:
        for target, (_, data) in zip(targets, files):
            handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            temps.append(temp_name)
            with os.fdopen(handle, "wb") as stream:
                os.fchmod(stream.fileno(), 0o666 & ~current_umask())
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
        with _signals_held():
            for temp_name, target in zip(temps, targets):
                os.replace(temp_name, target)
    except BaseException as error:  # nothing half-written stays behind
        for temp_name in temps:
            Path(temp_name).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OutputError(f"cannot write {target}: {error.strerror or error}") from error
        raise
    return targets


_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM arriving inside the block take effect when it ends (main thread only: a
    handler can be set nowhere else, and signals are delivered there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {number: signal.signal(number, lambda number, frame: caught.append(number))
                for number in _HELD_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        for number in dict.fromkeys(caught):
            signal.raise_signal(number)


def current_umask() -> int:
    """The process's umask (the bits a new file's mode loses)."""
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


#: Per-node debugging notes exporters write (torch's dynamo exporter: the Python stack trace, FX node,
#: module path of every node; onnxscript's rewriter and optimizer: the rule that made it), and the float
#: passes' pattern annotations (``edgeopt.pattern``: the quantizer's plan, of no use to a reader of the file).
_EXPORTER_METADATA_PREFIXES = ("pkg.torch.", "pkg.onnxscript.", "namespace", "edgeopt.pattern")


def model_to_bytes(model: ir.Model, *, value_info: bool = True, exporter_metadata: bool = True) -> bytes:
    """Serialize a model to ONNX protobuf bytes (deterministic for equal models).

    ``value_info`` False leaves out the type and shape annotations of intermediate values:
    any runtime infers them again, and on a small QDQ model they are a quarter of the file.
    ``exporter_metadata`` False leaves out the exporters' per-node debugging notes (torch's
    dynamo exporter writes a stack trace per node, 45% of a 2-layer decoder's int4 file) and the
    float passes' pattern annotations.
    """
    proto = _to_proto(model, value_info, exporter_metadata)
    if _byte_size(proto) > _PROTOBUF_LIMIT_BYTES:
        raise ModelError("model is larger than 2 GB: protobuf cannot hold it in one file (save it with its "
                         "weights beside it: edgeopt.io.model_file_contents)")
    return proto.SerializeToString(deterministic=True)


def _to_proto(model: ir.Model, value_info: bool, exporter_metadata: bool) -> onnx.ModelProto:
    proto = ir.to_proto(model)
    if not value_info:
        del proto.graph.value_info[:]
    if not exporter_metadata:
        _drop_exporter_metadata(proto.graph)
    return proto


def external_data_path(path: str | os.PathLike) -> Path:
    """Where the weights of a model written at ``path`` go when it passes 2 GB: ``model.onnx.data``."""
    return Path(path).with_name(f"{Path(path).name}.data")


def model_file_contents(model: ir.Model, path: str | os.PathLike, *, value_info: bool = True,
                        exporter_metadata: bool = True,
                        limit_bytes: int = _PROTOBUF_LIMIT_BYTES) -> list[tuple[Path, bytes | bytearray]]:
    """The files that hold ``model`` written at ``path``, with their bytes: the .onnx alone, or, when it would
    pass protobuf's 2 GB (``limit_bytes``), the .onnx with its weights in :func:`external_data_path` beside
    it (ONNX's external data, as ``onnx.save_model(save_as_external_data=True)`` and torch write it; ONNX
    Runtime and ``edgeopt`` read it from beside the model). See :func:`model_to_bytes` for the flags."""
    proto = _to_proto(model, value_info, exporter_metadata)
    if _byte_size(proto) <= limit_bytes:
        return [(Path(path), proto.SerializeToString(deterministic=True))]
    data_path = external_data_path(path)
    blob = bytearray()
    for tensor in _initializers(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.raw_data) < _EXTERNAL_MIN_BYTES:
            continue  # (a tensor in typed fields, bfloat16 or strings say, stays inline)
        blob.extend(bytes(-len(blob) % _EXTERNAL_ALIGNMENT))
        offset = len(blob)
        blob.extend(tensor.raw_data)
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(len(blob) - offset))):
            tensor.external_data.add(key=key, value=value)
    if _byte_size(proto) > limit_bytes:
        raise ModelError("model is larger than 2 GB without its weights: protobuf cannot hold its graph in one file")
    return [(Path(path), proto.SerializeToString(deterministic=True)), (data_path, blob)]  # (no copy of the weights)


def _byte_size(proto: onnx.ModelProto) -> int:
    """The serialized size of ``proto``; past 2 GB protobuf refuses to count it, and that is all we need."""
    from google.protobuf.message import EncodeError

    try:
        return proto.ByteSize()
    except EncodeError:
        return _PROTOBUF_LIMIT_BYTES + 1


def _initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """The initializers of ``graph`` and of its subgraphs, and the tensors of its Constant nodes."""
    yield from graph.initializer
    for node in graph.node:
        yield from (attribute.t for attribute in node.attribute if attribute.HasField("t"))
        for subgraph in node_subgraphs(node):
            yield from _initializers(subgraph)


def node_subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs ``node``'s attributes hold (If branches, Loop and Scan bodies)."""
    for attribute in node.attribute:
        if attribute.HasField("g"):
            yield attribute.g
        yield from attribute.graphs


def _drop_exporter_metadata(graph: onnx.GraphProto) -> None:
    """Remove the exporters' debugging entries from the nodes and values of ``graph`` and its subgraphs."""
    holders = [*graph.node, *graph.input, *graph.output, *graph.value_info, *graph.initializer]
    for holder in holders:
        kept = [entry for entry in holder.metadata_props if not entry.key.startswith(_EXPORTER_METADATA_PREFIXES)]
        if len(kept) != len(holder.metadata_props):
            del holder.metadata_props[:]
            holder.metadata_props.extend(kept)
    for node in graph.node:
        for subgraph in node_subgraphs(node):
            _drop_exporter_metadata(subgraph)


def save_model(model: ir.Model, path: str | os.PathLike) -> Path:
    """Save ``model`` as a self-contained .onnx file, atomically (past 2 GB, with its weights beside it in
    :func:`external_data_path`)."""
    return atomic_write_files(model_file_contents(model, path))[0]

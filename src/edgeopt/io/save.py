"""Atomic output: write to a temporary file in the target folder, then rename.

A crash or an error half way never leaves a truncated artifact behind, and the
target is replaced in one step (``os.replace`` is atomic on POSIX).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx_ir as ir

from edgeopt.errors import ModelError

__all__ = ["atomic_write_bytes", "model_to_bytes", "save_model"]

_PROTOBUF_LIMIT_BYTES = 2**31 - 1


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; the folder must exist."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise ModelError(f"output folder {folder} does not exist: create it or choose another -o path")
    handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return target


def model_to_bytes(model: ir.Model, *, value_info: bool = True) -> bytes:
    """Serialize a model to ONNX protobuf bytes (deterministic for equal models).

    ``value_info`` False leaves out the type and shape annotations of intermediate values:
    any runtime infers them again, and on a small QDQ model they are a quarter of the file.
    """
    proto = ir.to_proto(model)
    if not value_info:
        del proto.graph.value_info[:]
    if proto.ByteSize() > _PROTOBUF_LIMIT_BYTES:
        raise ModelError("model is larger than 2 GB: protobuf cannot hold it in one file")
    return proto.SerializeToString(deterministic=True)


def save_model(model: ir.Model, path: str | os.PathLike) -> Path:
    """Save ``model`` as a self-contained .onnx file, atomically."""
    return atomic_write_bytes(path, model_to_bytes(model))

"""What every API function shares: the model source type, progress callbacks, loading."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.api._terms import python_terms
from edgeopt.errors import ConfigError, EdgeoptWarning
from edgeopt.io import load_model

if TYPE_CHECKING:
    from edgeopt.data import ImagePreprocess

__all__ = ["ModelSource", "Progress", "calibration_source", "check_flag", "check_path", "check_progress",
           "check_type", "comparable_float", "issue_warnings", "load", "logged_warnings", "model_name",
           "model_source"]

ModelSource = str | os.PathLike | ir.Model
Progress = Callable[[int, int], None]


def _is_model_proto(model: object) -> bool:
    return type(model).__name__ == "ModelProto" and hasattr(model, "SerializeToString")  # onnx's, not imported


def _check_model_type(model: object, what: str) -> None:
    if not isinstance(model, (str, os.PathLike, ir.Model)) and not _is_model_proto(model):
        raise ConfigError(f"{what} must be a path to an .onnx file, an onnx.ModelProto or an onnx_ir.Model, "
                          f"got {type(model).__name__}")


def model_source(model: object, what: str = "model") -> ModelSource:
    """A model argument of the API as the functions take it: a path or an onnx_ir Model as given, an
    onnx ModelProto loaded as a file is (a copy, checked and normalized); else a ConfigError."""
    _check_model_type(model, what)
    if _is_model_proto(model):
        return load_model(model, require_static=False)
    return model


def check_type(value: object, expected: type | tuple[type, ...], what: str, hint: str = "") -> None:
    """ConfigError naming the argument when ``value`` (not None) is not of the ``expected`` type(s)."""
    if value is not None and not isinstance(value, expected):
        names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
        raise ConfigError(f"{what} must be {'an' if names[0] in 'AEIOU' else 'a'} {names}{hint}, "
                          f"got {type(value).__name__} {str(value)[:40]!r}")


def check_flag(value: object, what: str) -> None:
    """ConfigError unless ``value`` is True or False: a string such as "no" would count as true."""
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{what} must be True or False, got {type(value).__name__} {str(value)[:40]!r}")


def check_progress(progress: object) -> None:
    """ConfigError, before any work, unless ``progress`` is None or a function(done, total)."""
    if progress is not None and not callable(progress):
        raise ConfigError(f"progress must be a function(done, total) or None, got {type(progress).__name__}")


def check_path(value: object, what: str, *, optional: bool = True) -> None:
    """ConfigError when a file or folder argument is not a path (a str or os.PathLike)."""
    if (value is None and optional) or isinstance(value, (str, os.PathLike)):
        return
    raise ConfigError(f"{what} must be a path (a str or pathlib.Path), got {type(value).__name__}")


@python_terms()
def load(model: ModelSource, *, input_shapes: Mapping[str, Sequence[int]] | None = None,
         require_static: bool = True) -> ir.Model:
    """Load a model from a path (normalized, shapes inferred) or copy an in-memory one."""
    _check_model_type(model, "model")
    if isinstance(model, ir.Model):
        # fixed shapes and local functions (to inline) are seen to as a file's are (shapes inferred again)
        if input_shapes or model.functions:
            model = ir.to_proto(model)
        else:
            return ir.from_proto(ir.to_proto(model))
    loaded = load_model(model, input_shapes=input_shapes, require_static=require_static)
    if require_static:
        from edgeopt.runtime.ort import fill_missing_shapes

        fill_missing_shapes(loaded)
    return loaded


def model_name(model: ModelSource) -> str:
    return Path(model).name if not isinstance(model, ir.Model) else (model.graph.name or "model")


class _Collect(logging.Handler):
    """The warnings of one thread (another thread's quantize has a report of its own), and of the
    worker threads edgeopt starts for it (named ``edgeopt-...``)."""

    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.into = into
        self.thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        ours = record.thread == self.thread or (record.threadName or "").startswith("edgeopt-")
        if ours and message not in self.into:
            self.into.append(message)


@contextlib.contextmanager
def logged_warnings() -> Iterator[list[str]]:
    """The warnings edgeopt logs inside the block, each once, in order (for a report's ``warnings``).

    Warnings said once per process (an input's dtype cast) are said again in each block.
    """
    from edgeopt.data.feeds import forget_cast_warnings

    messages: list[str] = []
    handler = _Collect(messages)
    root = logging.getLogger("edgeopt")
    forget_cast_warnings()
    root.addHandler(handler)
    try:
        yield messages
    finally:
        root.removeHandler(handler)


def issue_warnings(messages: Iterable[str]) -> None:
    """A result's warnings through Python's :mod:`warnings` too (:class:`edgeopt.errors.EdgeoptWarning`),
    attributed to the line that called the API function: a script sees them without reading the result
    (those logged on the way reach no handler of logging's when the script configured none)."""
    for message in messages:
        warnings.warn(message, EdgeoptWarning, stacklevel=4)  # past this, the API function and its python_terms


def calibration_source(model: ir.Model, data, preprocess: ImagePreprocess | None, max_samples: int | None):
    """``data`` opened for ``model``'s inputs (with ``preprocess``), at most ``max_samples`` batches."""
    from edgeopt.data import open_data, take

    source = open_data(data, eir.model_inputs(model), preprocess=preprocess)
    return take(source, max_samples) if max_samples is not None else source


def comparable_float(float_model: ir.Model, *, in_place: bool = False) -> ir.Model:
    """The quantizer folds BatchNorm and affine ops into convs and keeps the convs' output names, so
    per-layer rows compare against the float model after the same float-exact passes (on a copy,
    unless the model is the caller's to rewrite)."""
    from edgeopt.passes import optimize_for_quantization

    return optimize_for_quantization(float_model, in_place=in_place).model

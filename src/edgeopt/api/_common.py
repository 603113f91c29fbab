"""What every API function shares: the model source type, progress callbacks, loading."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import onnx_ir as ir

from edgeopt.io import load_model

__all__ = ["ModelSource", "Progress", "load", "model_name"]

ModelSource = str | os.PathLike | ir.Model
Progress = Callable[[int, int], None]


def load(model: ModelSource, *, input_shapes: Mapping[str, Sequence[int]] | None = None,
         require_static: bool = True) -> ir.Model:
    """Load a model from a path (normalized, shapes inferred) or copy an in-memory one."""
    if isinstance(model, ir.Model):
        return ir.from_proto(ir.to_proto(model))
    loaded = load_model(model, input_shapes=input_shapes, require_static=require_static)
    if require_static:
        from edgeopt.runtime.ort import fill_missing_shapes

        fill_missing_shapes(loaded)
    return loaded


def model_name(model: ModelSource) -> str:
    return Path(model).name if not isinstance(model, ir.Model) else (model.graph.name or "model")

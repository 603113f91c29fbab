"""Which activations a float rewrite rescaled per channel, recorded in the model for ``compare``.

Cross-layer equalization and SmoothQuant keep the float model's function but
scale channels of the tensors between the layers they rewrite: equalizing
``conv1 -> relu -> conv2`` divides channel ``c`` of conv1's and relu's outputs
by ``s_c``. Compared with the float model as the user has it, such a tensor
looks wrong by a per-channel factor that has nothing to do with
quantization. The quantizer records the factors in the model's metadata
(``edgeopt.rescaled``: per tensor, its channel axis and the float32 factors,
base64), and ``compare`` divides them out before measuring.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

__all__ = ["METADATA_KEY", "Rescaled", "read_rescaled", "record_rescaled"]

METADATA_KEY = "edgeopt.rescaled"


@dataclass(frozen=True)
class Rescaled:
    """The rewritten tensor is the original one times ``factor`` along ``axis``."""

    axis: int
    factor: np.ndarray

    def undo(self, array: np.ndarray) -> np.ndarray:
        """``array`` (a tensor of the rewritten model) in the original model's channel scales."""
        axis = self.axis % array.ndim
        if array.shape[axis] != self.factor.size:
            return array
        shape = [1] * array.ndim
        shape[axis] = -1
        return array / self.factor.reshape(shape).astype(array.dtype)


def record_rescaled(model: ir.Model, tensors: Mapping[str, Rescaled]) -> None:
    """Add ``tensors`` to the model's record; a tensor rescaled twice on one axis multiplies."""
    merged = read_rescaled(model)
    for name, rescaled in tensors.items():
        before = merged.get(name)
        if before is not None and before.axis == rescaled.axis and before.factor.size == rescaled.factor.size:
            rescaled = Rescaled(rescaled.axis, before.factor * rescaled.factor)
        merged[name] = rescaled
    if merged:
        model.metadata_props[METADATA_KEY] = json.dumps(
            {name: [r.axis, base64.b64encode(np.asarray(r.factor, "<f4").tobytes()).decode()]
             for name, r in sorted(merged.items())}, separators=(",", ":"))


def read_rescaled(model: ir.Model) -> dict[str, Rescaled]:
    """The record of ``model`` (empty when it has none or it cannot be read)."""
    text = model.metadata_props.get(METADATA_KEY)
    if not text:
        return {}
    try:
        return {name: Rescaled(int(axis), np.frombuffer(base64.b64decode(data), "<f4").astype(np.float32))
                for name, (axis, data) in json.loads(text).items()}
    except (ValueError, TypeError, AttributeError):  # written by something else: compare as is
        return {}

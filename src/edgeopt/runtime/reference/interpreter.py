"""Run a lowered integer program: the reference every integer back end is tested against.

``ReferenceModel(model).run(feed)`` quantizes float inputs with the input's
scale and zero point (round half to even, as ONNX QuantizeLinear), runs each
op of the schedule through the ops table, and returns int8 outputs in the
model's (logical, NCHW) layout; ``dequantize`` gives the float view.
``trace`` returns every tensor of the program in its stored (NHWC) layout,
which is what the generated C code dumps for ``verify``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from edgeopt.errors import ConfigError, DataError
from edgeopt.runtime.reference.fixed_point import ROUNDINGS
from edgeopt.runtime.reference.lower import lower
from edgeopt.runtime.reference.ops import OPS
from edgeopt.runtime.reference.program import Program, TensorInfo

__all__ = ["ReferenceModel", "quantize_input"]


def quantize_input(array: np.ndarray, info: TensorInfo) -> np.ndarray:
    """Float (or int8) input in logical layout -> int8 in stored layout."""
    array = np.asarray(array)
    if array.shape != info.logical_shape:
        raise DataError(f"input {info.name!r} has shape {array.shape}, the model expects {info.logical_shape}")
    if np.issubdtype(array.dtype, np.floating):
        quantized = np.rint(array.astype(np.float32) / np.float32(info.scale)) + info.zero_point
        array = np.clip(quantized, -128, 127).astype(np.int8)
    elif array.dtype != np.int8:
        raise DataError(f"input {info.name!r}: expected float or int8 values, got {array.dtype}")
    return np.ascontiguousarray(array.transpose(info.layout))


class ReferenceModel:
    """The numpy integer interpreter of a QDQ model (the spec of the C code)."""

    def __init__(self, model: ir.Model | Program, *, rounding: str = "double") -> None:
        if rounding not in ROUNDINGS:
            raise ConfigError(f"rounding {rounding!r} is not one of: {', '.join(ROUNDINGS)}")
        self.program = model if isinstance(model, Program) else lower(model)
        self.rounding = rounding

    @property
    def input_names(self) -> list[str]:
        return [io.name for io in self.program.inputs]

    @property
    def output_names(self) -> list[str]:
        return [io.name for io in self.program.outputs]

    def trace(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every program tensor (inputs, constants, op outputs) as int8 in stored layout."""
        program = self.program
        missing = [io.name for io in program.inputs if io.name not in feed]
        if missing:
            raise DataError(f"missing model input(s): {', '.join(missing)}")
        env = {io.tensor: quantize_input(feed[io.name], program.tensors[io.tensor]) for io in program.inputs}
        env.update(program.constants)
        for op in program.ops:
            result = OPS[op.kind].reference(*(env[name] for name in op.inputs), params=op.params,
                                            rounding=self.rounding)
            env[op.output] = np.asarray(result, dtype=np.int8).reshape(program.tensors[op.output].shape)
        return env

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """int8 outputs in the model's logical layout."""
        env = self.trace(feed)
        return {io.name: self._logical(env[io.tensor], io.tensor) for io in self.program.outputs}

    def run_float(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs dequantized to float32."""
        return self.dequantize(self.run(feed))

    def dequantize(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = {}
        for io in self.program.outputs:
            info = self.program.tensors[io.tensor]
            values = outputs[io.name].astype(np.float32) - np.float32(info.zero_point)
            result[io.name] = values * np.float32(info.scale)
        return result

    def output_info(self, name: str) -> TensorInfo:
        return self.program.tensors[next(io.tensor for io in self.program.outputs if io.name == name)]

    def _logical(self, array: np.ndarray, tensor: str) -> np.ndarray:
        return np.ascontiguousarray(array.transpose(np.argsort(self.program.tensors[tensor].layout)))

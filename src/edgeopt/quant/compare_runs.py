"""The ONNX Runtime sessions of one comparison (:mod:`edgeopt.quant.compare`) and what each returns per batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.quant.compare_matching import TensorMatch

if TYPE_CHECKING:
    from edgeopt.quant.float_reference import FloatReference
    from edgeopt.runtime.ort import OrtSession

__all__ = ["Arrays", "Runs", "comparison_runs"]

Arrays = dict[str, np.ndarray]  # tensors by name


@dataclass(frozen=True, kw_only=True)
class Runs:
    """The sessions of one comparison and the names each returns per batch.

    ``layer_session`` is None when nothing is matched: the quantized model then runs once per batch;
    ``original_session`` is None when no match is a tensor of the original float model.
    """

    float_session: OrtSession | FloatReference
    float_names: list[str]
    output_session: OrtSession
    outputs: list[str]
    layer_session: OrtSession | None
    layer_names: list[str]
    quant_float_inputs: Mapping[str, np.dtype]  # float inputs of another float type (fp16 without float32 IO)
    original_session: OrtSession | None = None
    original_names: tuple[str, ...] = ()

    def run(self, feed: Mapping[str, np.ndarray]) -> tuple[Arrays, Arrays, Arrays]:
        """The float model's tensors (and the feed), the quantized DQ outputs, the quantized outputs."""
        reference = dict(feed) | self.float_session.run(feed, self.float_names)
        if self.original_session is not None:  # the same names as given: their values replace the optimized ones
            reference |= self.original_session.run(feed, list(self.original_names))
        quant_feed = {name: array.astype(self.quant_float_inputs[name]) if name in self.quant_float_inputs else array
                      for name, array in feed.items()}
        layers = self.layer_session.run(quant_feed, self.layer_names) if self.layer_session is not None else {}
        return reference, layers, self.output_session.run(quant_feed, self.outputs)


def _float32_outputs(model: ir.Model) -> ir.Model:
    """``model`` with each bfloat16 output cast to float32 under its name (ONNX Runtime's Python API cannot
    return a bfloat16 array; a bfloat16 holds in float32 exactly); ``model`` itself when it has none."""
    if not any(value.dtype == ir.DataType.BFLOAT16 for value in model.graph.outputs):
        return model
    model = model.clone()
    graph, cast = model.graph, {}
    for position, value in enumerate(list(graph.outputs)):
        if value.dtype == ir.DataType.BFLOAT16 and value not in cast:
            name, value.name = value.name, f"{value.name}__edgeopt_bfloat16"
            shape = value.shape.copy() if value.shape is not None else None
            node = ir.node("Cast", [value], {"to": ir.DataType.FLOAT}, name=f"{name}__edgeopt_cast",
                           outputs=[ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=shape)])
            graph.append(node)
            cast[value] = node.outputs[0]
        graph.outputs[position] = cast.get(value, value)
    return model


def comparison_runs(float_model: ir.Model, quant_model: ir.Model, matches: list[TensorMatch], outputs: list[str],
                    original: ir.Model | None = None, float_reference: FloatReference | None = None,
                    before_quantizing: Sequence[str] = (), *, layer_model: ir.Model | None = None) -> Runs:
    """The float model with its matched tensors exposed, or ``float_reference`` of it (and the original
    float model with those that are its); the quantized model as is, for the outputs; and the quantized
    model (or ``layer_model``, it with float-weight twins added) with its matched DQ outputs exposed, for
    the per-layer rows, and the tensors ``before_quantizing`` (what a node writes before a Q/DQ pair, or
    its twin)."""
    from edgeopt.runtime.ort import OrtSession, observing_session

    float_specs = {s.name: s.dtype for s in eir.model_inputs(float_model)}
    float_inputs = set(float_specs)
    computed = [m for m in matches if m.float_name not in float_inputs]
    float_names = [m.float_name for m in computed if not m.original]
    original_names = tuple(m.float_name for m in computed if m.original)
    layer_names = list(dict.fromkeys([*(m.quant_name for m in matches), *before_quantizing]))
    recast = {s.name: s.dtype for s in eir.model_inputs(quant_model)
              if s.dtype.kind == "f" and float_specs.get(s.name, s.dtype).kind == "f"
              and s.dtype != float_specs[s.name]}
    float_session = float_reference if float_reference is not None else observing_session(float_model, float_names)
    return Runs(float_session=float_session,
                 float_names=list(dict.fromkeys([*outputs, *float_names])),
                 output_session=OrtSession(_float32_outputs(quant_model)), outputs=outputs,
                 layer_session=(observing_session(layer_model or quant_model, layer_names) if layer_names
                                else None),
                 layer_names=layer_names, quant_float_inputs=recast,
                 original_session=observing_session(original, original_names) if original_names else None,
                 original_names=original_names)

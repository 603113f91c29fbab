"""Explicit opset upgrade for quantization, checked on the calibration data.

Per-channel DequantizeLinear (the ``axis`` attribute) needs opset 13; models
exported at opset 11 or 12 are converted with ``onnx.version_converter`` --
never silently: the conversion is reported, and :class:`OpsetCheck`
compares the converted float model with the original on the first
calibration batches (a conversion that changes the outputs is refused).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.errors import DataError, ModelError
from edgeopt.metrics import count_of
from edgeopt.runtime.ort import OrtSession, random_feed

__all__ = ["OpsetCheck", "OpsetConversion", "check_conversion", "convert_opset"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class OpsetConversion:
    """An opset upgrade and how well the converted model matched the original."""

    from_opset: int
    to_opset: int
    batches_checked: int
    max_abs_diff: float

    def note(self, why: str = "per-channel QDQ needs opset 13", *, calibration: bool = True) -> str:
        """``converted opset 11 -> 13 (why); float outputs match the original on 4 calibration batches ...``
        (``4 batches`` when the check did not run on calibration data)."""
        noun = "calibration batch" if calibration else "batch"
        batches = count_of(self.batches_checked, noun, noun + "es")
        return (f"converted opset {self.from_opset} -> {self.to_opset} ({why}); float outputs match the original "
                f"on {batches} (max abs diff {self.max_abs_diff:.3g})")


def convert_opset(model: ir.Model, version: int) -> ir.Model:
    """A new model converted to ``version`` of the default domain with onnx.version_converter."""
    import onnx  # local: the converter works on protobuf
    from onnx import version_converter

    source = eir.default_opset(model)
    unshaped = _unshaped_graph_value(model)
    if unshaped is not None:
        raise ModelError(f"cannot convert the model from opset {source} to {version}: graph input or output "
                         f"{unshaped.name!r} has no shape, not even a rank, and ONNX's checker requires one: "
                         f"give it a shape, or re-export the model at opset {version} or newer")
    try:
        proto = version_converter.convert_version(ir.to_proto(model), version)
        onnx.checker.check_model(proto)
    except Exception as error:  # the converter raises plain RuntimeError/ValueError
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelError(f"cannot convert the model from opset {source} to {version} ({first_line}): "
                         f"re-export it at opset {version} or newer") from None
    logger.info("converted opset %d -> %d", source, version)
    return ir.from_proto(proto)


def _unshaped_graph_value(model: ir.Model) -> ir.Value | None:
    """A tensor graph input or output of unknown rank: legal in a TypeProto, refused by the checker."""
    for value in [*model.graph.inputs, *model.graph.outputs]:
        if isinstance(value.type, ir.TensorType) and value.shape is None:
            return value
    return None


class OpsetCheck:
    """Calibration hook: run original and converted model on the first batches, compare outputs."""

    def __init__(self, original: ir.Model, converted: ir.Model, *, max_batches: int = 4,
                 tolerance: float = 1e-4) -> None:
        self.max_batches = max_batches
        self.tolerance = tolerance
        self._original = OrtSession(original, optimize=False)
        self._converted = OrtSession(converted, optimize=False)
        self._source = eir.default_opset(original)
        self._target = eir.default_opset(converted)
        self.batches_checked = 0
        self.max_abs_diff = 0.0

    def update(self, feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        if self.batches_checked >= self.max_batches:
            return
        expected = self._original.run(feed)
        got = self._converted.run(feed)
        compared = False
        for name, want in expected.items():
            have = got[name]
            if have.shape != want.shape:
                raise ModelError(f"converting opset {self._source} -> {self._target} changed the shape of "
                                 f"output {name!r}: re-export the model at opset 13 or newer")
            finite = np.isfinite(want) if want.dtype.kind == "f" else np.ones(want.shape, bool)
            if want.dtype.kind == "f" and not np.array_equal(finite, np.isfinite(have)):
                raise ModelError(f"converting opset {self._source} -> {self._target} changed where output "
                                 f"{name!r} is NaN or Inf: re-export the model at opset 13 or newer")
            if not finite.any():
                continue  # nothing to compare on this batch (a Log of negative inputs ...)
            compared = True
            difference = float(np.max(np.abs(have[finite].astype(np.float64) - want[finite]), initial=0.0))
            self.max_abs_diff = max(self.max_abs_diff, difference)
            bound = self.tolerance * max(1.0, float(np.max(np.abs(want[finite]), initial=0.0)))
            if difference > bound:
                raise ModelError(f"converting opset {self._source} -> {self._target} changed output {name!r} "
                                 f"(max abs diff {difference:.3g}): re-export the model at opset 13 or newer")
        self.batches_checked += compared

    def result(self) -> OpsetConversion:
        return OpsetConversion(from_opset=self._source, to_opset=self._target,
                               batches_checked=self.batches_checked, max_abs_diff=self.max_abs_diff)


def check_conversion(original: ir.Model, converted: ir.Model, data: Iterable[Mapping[str, np.ndarray]] | None, *,
                     tolerance: float = 1e-4) -> OpsetConversion | None:
    """Run both models on the first batches of ``data``, or on random inputs when there is no data and
    the inputs are static; ModelError when the conversion changed an output. None: nothing to run it on."""
    specs = eir.model_inputs(original)
    random = data is None
    if random and not all(spec.is_static for spec in specs):
        return None
    feeds = [random_feed(specs, seed=seed, limits=eir.index_limits(original)) for seed in range(2)] if random else data
    check = OpsetCheck(original, converted, tolerance=tolerance)
    for feed in feeds:
        if check.batches_checked >= check.max_batches:
            break
        try:
            check.update(feed, {})
        except DataError:  # random inputs the model cannot take (indices out of a table's range ...)
            if not random:
                raise
            return None
    return check.result() if check.batches_checked else None

"""What fp16 checks before it converts: tensor types, and weights and activations beyond float16's range.

**Types.** ONNX shape inference cannot type the outputs of ops outside the
ONNX domain (com.microsoft's SkipLayerNormalization, BiasGelu, FusedMatMul
from ONNX Runtime's transformer optimizer), nor anything downstream of them,
and the planner keeps an untyped node float32. ONNX Runtime knows those
types: the model runs once (on the first calibration batch, else on random
inputs of its static shapes) and the run's output dtypes fill the gaps.

**Weights.** float16 ends at 65504. A weight beyond it would be clamped
(a 1e5 weight scaled back by a later 1e-6 then gives 5 dB), so every node
reading it stays float32 and the weight exact, named in a note: the result
is what ``exclude`` of those nodes gives, without a failed first try.

**Activations.** With calibration data, one streaming pass of the float
model (min and max reduced inside ONNX Runtime) gives the range of every
float32 value. A value beyond :data:`ACTIVATION_LIMIT`, half of 65504, stays
float32 with its producer and every consumer: a float16 producer would write
inf, a float16 consumer would read a Cast to inf. ONNX Runtime on x86
computes most float16 ops in float32 and cannot show that overflow; the ONNX
reference and any runtime computing in float16 (GPU, ARM, NPUs) give inf or
NaN. The margin covers inputs larger than the calibration data's, and part
of the sums inside an op (a MatMul's partial sums), which are not observed.
Without data no activation is checked, and a note says so.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.data.base import reads_again
from edgeopt.errors import EdgeoptError
from edgeopt.metrics import count_of
from edgeopt.quant.float16_plan import all_float_values, is_constant
from edgeopt.quant.registry import Batch, ProgressCallback

__all__ = ["ACTIVATION_LIMIT", "FLOAT16_MAX", "RangeCheck", "check_fp16_ranges"]

logger = logging.getLogger(__name__)

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
#: Activations whose calibrated magnitude exceeds this stay float32 (half of 65504: a margin for unseen inputs).
ACTIVATION_LIMIT = FLOAT16_MAX / 2

WEIGHT_REASON = "a weight it reads holds values beyond ±65504, which float16 would clamp"
ACTIVATION_REASON = (f"a value it reads or writes exceeds ±{ACTIVATION_LIMIT:.0f} (half the float16 range) "
                     "on the calibration data")
_NAMED = 4  # values and nodes named in a note; the report's float_nodes lists them all


@dataclass
class RangeCheck:
    """Values that must stay float32, with the reason the planner gives their nodes, and notes."""

    float32_values: dict[ir.Value, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    details: dict[str, object] = field(default_factory=dict)


def check_fp16_ranges(model: ir.Model, data: Iterable[Batch] | None, *,
                      progress: ProgressCallback | None = None) -> RangeCheck:
    """Type what ONNX inference left untyped, then find the weights and activations float16 cannot hold.

    Reads ``data`` once (a one-shot iterator included): its first batch types the graph, then one
    min/max calibration pass observes every float32 activation.
    """
    check = RangeCheck()
    first, data = _first_batch(data)
    check.notes += _fill_types(model, first)
    _check_weights(model.graph, check)
    if data is None and check.float32_values:
        logger.warning("weights beyond float16's ±65504 stay float32, but the values their nodes compute are "
                       "likely beyond it too, and without --data their ranges are not checked: give --data")
    elif data is None:
        check.notes.append("activation ranges not checked against float16's ±65504: give --data to observe "
                           "them and keep the nodes of values beyond it in float32")
    else:
        _check_activations(model, data, check, progress)
    return check


def _first_batch(data: Iterable[Batch] | None) -> tuple[Batch | None, Iterable[Batch] | None]:
    """The first batch of ``data`` and data to read in full afterwards (a one-shot iterator is chained)."""
    if data is None:
        return None, None
    iterator = iter(data)
    first = next(iterator, None)
    if first is not None and not reads_again(data):  # maybe read-once (behind a wrapper): read it once
        return first, itertools.chain([first], iterator)
    return first, data


def _fill_types(model: ir.Model, feed: Batch | None) -> list[str]:
    """Notes on typing, by one ONNX Runtime run, the node outputs ONNX shape inference left untyped."""
    from edgeopt.data import check_feed
    from edgeopt.runtime.ort import fill_missing_types

    untyped = [v for node in model.graph for v in node.outputs if v.name and v.dtype is None]
    if not untyped:
        return []
    domains = sorted({node.domain for node in model.graph if node.domain not in eir.ONNX_DOMAINS})
    ops = f" (ops of {', '.join(map(repr, domains))})" if domains else ""
    on = "the first calibration batch" if feed is not None else "random inputs"
    try:
        checked = check_feed(eir.model_inputs(model), feed, where="calibration batch 1") if feed is not None else None
        fill_missing_types(model, checked)
    except EdgeoptError as error:  # dynamic input dims without data, a model random inputs do not fit
        logger.info("typing by a run failed: %s", error)
        return [f"ONNX shape inference left {len(untyped)} tensors untyped{ops}, and a run on {on} to type them "
                "failed: their nodes stay float32" + ("" if feed is not None else " (give --data to type them)")]
    return [f"ONNX shape inference left {len(untyped)} tensors untyped{ops}: typed by running the model once "
            f"in ONNX Runtime on {on}"]


def _check_weights(graph: ir.Graph, check: RangeCheck) -> None:
    """Constants holding a finite value beyond ±65504 stay float32, with every node reading them."""
    peaks = {}
    for value in all_float_values(graph):
        if is_constant(value):
            array = np.asarray(eir.constant_array(value), dtype=np.float32)
            finite = np.abs(array[np.isfinite(array)])
            if finite.size and finite.max() > FLOAT16_MAX:
                peaks[value] = float(finite.max())
    if not peaks:
        return
    check.float32_values.update((value, WEIGHT_REASON) for value in peaks)
    readers = _node_names(use.node for value in peaks for use in value.uses())
    check.notes.append(
        f"{count_of(len(readers), 'node', 'nodes')} kept float32 because a weight they read goes beyond "
        f"float16's ±65504 (clamped, it would change the results; kept, they are exact): {_named(readers)}; weights: "
        + _named([f"{value.name} (max |x| {peak:.3g})" for value, peak in peaks.items()]))
    check.details["weights_beyond_float16"] = [value.name for value in peaks]


def _check_activations(model: ir.Model, data: Iterable[Batch], check: RangeCheck,
                       progress: ProgressCallback | None) -> None:
    """One min/max pass over ``data``; values beyond ACTIVATION_LIMIT stay float32 with their nodes."""
    from edgeopt.quant.calibrate import calibrate
    from edgeopt.quant.config import CalibrationConfig

    # tensors only: a sequence of float tensors (SplitToSequence, dynamo's unoptimized chunk) has no range of
    # its own to observe (its tensors are observed where SequenceAt takes them out) and cannot be reshaped
    values = {v.name: v for v in all_float_values(model.graph)
              if v.name and not is_constant(v) and not isinstance(v.type, ir.SequenceType)}
    calibration = calibrate(model, data, list(values), CalibrationConfig(), progress=progress)
    peaks = {}
    for name, tensor in calibration.tensors.items():
        if tensor.is_float and tensor.minmax.count:  # no count: every batch held inf or NaN, as float16 would
            peak = max(map(abs, tensor.minmax.range))
            if peak > ACTIVATION_LIMIT:
                peaks[values[name]] = peak
    check.details["activations_beyond_limit"] = [value.name for value in peaks]
    batches = count_of(calibration.num_batches, "calibration batch", "calibration batches")
    if not peaks:
        check.notes.append(f"activation ranges checked on {batches}: every value stays within "
                           f"±{ACTIVATION_LIMIT:.0f}, half the float16 range")
        return
    check.float32_values.update((value, ACTIVATION_REASON) for value in peaks)
    nodes = _node_names(node for value in peaks for node in _touching(value))
    worst = sorted(peaks.items(), key=lambda item: -item[1])
    check.notes.append(
        f"{count_of(len(peaks), 'value exceeds', 'values exceed')} ±{ACTIVATION_LIMIT:.0f} (half of float16's "
        f"65504, a margin for unseen inputs) on {batches}: "
        + _named([f"{value.name} (max |x| {peak:.3g})" for value, peak in worst])
        + f"; their {count_of(len(nodes), 'producer and consumer node', 'producer and consumer nodes')} "
        f"kept float32: {_named(nodes)}")


def _touching(value: ir.Value) -> list[ir.Node]:
    producer = value.producer()
    return ([producer] if producer is not None else []) + [use.node for use in value.uses()]


def _node_names(nodes: Iterable[ir.Node]) -> list[str]:
    """Each node once, by name (unnamed ones by op type)."""
    return [node.name or node.op_type for node in dict.fromkeys(nodes)]


def _named(names: list[str]) -> str:
    return ", ".join(names[:_NAMED]) + (f" and {len(names) - _NAMED} more" if len(names) > _NAMED else "")

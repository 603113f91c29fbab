"""Per-layer and per-output fidelity of a QDQ model to the float model it came from.

Matching a quantized activation with its float counterpart is
:mod:`edgeopt.quant.compare_matching`'s; so is matching the tensors of a
model without Q/DQ pairs (float16, bfloat16, weight-only) by name.

Per batch, the float model runs once with its matched tensors exposed as
extra outputs (a float graph's fusions change only float rounding), and the
quantized model runs twice:

* **output rows** (SQNR, cosine, max abs error, top-1 agreement) come from
  the quantized model as a user runs it: an unmodified session with ONNX
  Runtime's default graph optimizations, so its integer kernels
  (QLinearConv, QLinearMatMul, QLinearSoftmax, ...) are the ones measured;
* **per-layer rows** come from a session with the matched DQ outputs exposed
  as extra outputs. Exposing a tensor can keep ORT from fusing the nodes
  around it (with int8 activations it often does), so these rows measure
  the QDQ graph's float simulation, which can differ from the fused kernels
  by more than rounding (a Softmax output scale too fine for its range
  saturates in the simulation and gave 0 in QLinearSoftmax before ONNX
  Runtime 1.32). Read them as where the quantization error arises, the
  output rows as what the model gives.

Each batch updates the streaming meters of :mod:`edgeopt.metrics` and is
dropped, so memory does not grow with the data.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.data import batch_rows, open_data, take, with_origin
from edgeopt.errors import DataError
from edgeopt.metrics import (AgreementMeter, EqualityMeter, FidelityMeter, Float64Scratch, json_number,
                             looks_like_class_scores)
from edgeopt.quant.compare_dynamic import dynamic_product_input, is_dynamic_model
from edgeopt.quant.compare_matching import (OutputCodes, TensorMatch, carried_value, compared_by_name,
                                            computed_before_quantizing, computed_from, fused_chain, match_names,
                                            match_pairs, match_tensors, may_hold_original, missing_qdq_note,
                                            output_codes, quantized_input_names, value_names)
from edgeopt.quant.compare_runs import Runs, comparison_runs
from edgeopt.quant.compare_twins import float_weight_twins
from edgeopt.quant.rescaled import Rescaled, read_rescaled

__all__ = [
    "CompareResult",
    "LayerComparison",
    "OutputComparison",
    "TensorMatch",
    "carried_value",
    "compare_models",
    "fused_chain",
    "layer_sqnr",
    "match_tensors",
    "missing_qdq_note",
    "quantized_input_names",
]

if TYPE_CHECKING:
    from edgeopt.quant.float_reference import FloatReference

logger = logging.getLogger(__name__)

ModelSource = str | os.PathLike | ir.Model
Progress = Callable[[int, int | None], None]


@dataclass(frozen=True, kw_only=True)
class LayerComparison:
    """Fidelity of one quantized activation to its float counterpart. A tensor matched by name (a float16 or
    weight-only model's) has no scale: ``scale`` is NaN, ``zero_point`` None and ``zero_point_dtype`` its
    type there (``float16``, ``float``)."""

    tensor: str
    quant_tensor: str
    op_type: str
    scale: float
    zero_point: int | None
    zero_point_dtype: str
    sqnr_db: float
    cosine: float
    max_abs_error: float
    lost_db: float | None = None  # SQNR lost inside the node writing it (see _with_losses)
    # the SQNR of what the node computes from its quantized inputs: before its output's Q/DQ pair, or (a node
    # reading a quantized weight) its float twin's output
    computed_sqnr_db: float | None = None

    def to_dict(self) -> dict:
        lost = None if self.lost_db is None else json_number(self.lost_db)
        computed = None if self.computed_sqnr_db is None else json_number(self.computed_sqnr_db)
        return {"tensor": self.tensor, "quant_tensor": self.quant_tensor, "op_type": self.op_type,
                "scale": None if math.isnan(self.scale) else json_number(self.scale),  # no Q/DQ pair: no scale
                "zero_point": self.zero_point,
                "zero_point_dtype": self.zero_point_dtype, "sqnr_db": json_number(self.sqnr_db),
                "cosine": json_number(self.cosine), "max_abs_error": json_number(self.max_abs_error),
                "lost_db": lost, "computed_sqnr_db": computed}


@dataclass(frozen=True, kw_only=True)
class OutputComparison:
    """Fidelity of one graph output; ``top1_agreement`` for class scores ``[N, C]`` (same top-1) and for
    integer outputs such as an ArgMax's class indices (equal values), else None. An ``integer`` output is
    judged by that agreement alone: the SQNR and cosine of class indices mean nothing (None in JSON)."""

    name: str
    sqnr_db: float
    cosine: float
    max_abs_error: float
    top1_agreement: float | None
    integer: bool = False
    reference_finite: bool = True  # False: the float model's output held inf or NaN

    @property
    def signal(self) -> bool:
        """Whether SQNR and cosine measure this output (not for integer outputs)."""
        return not self.integer

    def to_dict(self) -> dict:
        top1 = None if self.top1_agreement is None else json_number(self.top1_agreement)
        sqnr, cosine = (json_number(self.sqnr_db), json_number(self.cosine)) if self.signal else (None, None)
        return {"name": self.name, "sqnr_db": sqnr, "cosine": cosine, "max_abs_error": json_number(self.max_abs_error),
                "top1_agreement": top1, "integer": self.integer}


@dataclass(frozen=True, kw_only=True)
class CompareResult:
    """Per-layer rows (worst SQNR first, QDQ simulation) and per-output rows (the quantized model run
    as is) over ``samples`` batches holding ``rows`` samples (the leading dim of the first output).

    ``quantized_tensors`` counts the activation Q/DQ pairs of the QDQ model;
    ``unmatched`` names those without a float counterpart; ``skipped`` those
    whose shapes differ between the models. A model without such pairs (float16,
    bfloat16, int4 weight-only) has its tensors matched by name instead
    (``by_name``: the float tensors its computing ops write, see
    :func:`edgeopt.quant.compare_matching.match_names`). ``warnings``: what was warned about
    on the way (`edgeopt compare` fills it; in a quantize report they are the report's).
    """

    samples: int
    rows: int
    layers: tuple[LayerComparison, ...]
    outputs: tuple[OutputComparison, ...]
    quantized_tensors: int
    unmatched: tuple[str, ...]
    skipped: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    by_name: bool = False

    @property
    def matched(self) -> int:
        return len(self.layers)

    def worst_output_sqnr(self) -> float | None:
        """The lowest SQNR of the outputs SQNR measures (not integer ones), None when there is none."""
        return min((row.sqnr_db for row in self.outputs if row.signal), default=None)

    def by_loss(self) -> CompareResult:
        """The same rows, largest loss inside the node first (where the error arises; rows without a
        measured loss, such as graph inputs, last)."""
        layers = sorted(self.layers, key=lambda r: (r.lost_db is None, -(r.lost_db or 0.0), r.tensor))
        return replace(self, layers=tuple(layers))

    def to_dict(self) -> dict:
        return {"samples": self.samples, "rows": self.rows, "quantized_tensors": self.quantized_tensors,
                "matched": self.matched, "matched_by": "name" if self.by_name else "qdq",
                "unmatched": list(self.unmatched), "skipped": list(self.skipped),
                "outputs": [o.to_dict() for o in self.outputs], "layers": [r.to_dict() for r in self.layers],
                "warnings": list(self.warnings)}


# ------------------------------------------------------------------------ running


def _load(model: ModelSource) -> ir.Model:
    if isinstance(model, ir.Model):
        return model
    from edgeopt.io import load_model

    return load_model(model, require_static=False)


def _renamed_output(float_model: ir.Model, quant_model: ir.Model) -> ir.Model:
    """``quant_model``, or a copy whose one output is named as the float model's one output when the two
    differ (a converter that renamed it): the two are compared by position, and a warning says so."""
    (float_output,), (quant_output,) = float_model.graph.outputs, quant_model.graph.outputs
    if float_output.name == quant_output.name or float_output.name in value_names(quant_model.graph):
        return quant_model
    logger.warning("the models' one output is named %s in the float model and %s in the quantized model: compared "
                   "by position", float_output.name, quant_output.name)
    renamed = quant_model.clone()
    renamed.graph.outputs[0].name = float_output.name
    return renamed


def _check_interfaces(float_model: ir.Model, quant_model: ir.Model) -> list[str]:
    """The output names both models have; refuses models with different inputs."""
    float_inputs = [s.name for s in eir.model_inputs(float_model)]
    quant_inputs = [s.name for s in eir.model_inputs(quant_model)]
    if sorted(float_inputs) != sorted(quant_inputs):
        raise DataError(f"the models have different inputs (float: {', '.join(float_inputs)}; quantized: "
                        f"{', '.join(quant_inputs)}): compare a QDQ model with the float model it came from")
    quant_outputs = {v.name for v in quant_model.graph.outputs}
    float_outputs = [v.name for v in float_model.graph.outputs]
    common = [name for name in float_outputs if name in quant_outputs]
    if not common:
        raise DataError(f"the models share no output name (float: {', '.join(float_outputs)}; "
                        f"quantized: {', '.join(sorted(quant_outputs))}): "
                        "compare a QDQ model with the float model it came from")
    float_only = [name for name in float_outputs if name not in quant_outputs]
    if float_only:  # a renamed or dropped output: said, not silently left out of the output rows
        quant_only = sorted(quant_outputs.difference(float_outputs))
        logger.warning("output %s of the float model is not an output of the quantized model%s: not compared",
                       ", ".join(float_only), f" (its other outputs: {', '.join(quant_only)})" if quant_only else "")
    return common


class _Meters:
    """The meters of one comparison: per matched tensor, per output, top-1 where it applies."""

    def __init__(self, matches: list[TensorMatch], outputs: list[str],
                 rescaled: Mapping[str, Rescaled] | None = None,
                 output_codes: Mapping[str, OutputCodes] | None = None,
                 before_quantizing: Mapping[str, str | None] | None = None) -> None:
        self.matches = {m.float_name: m for m in matches}
        # float name -> what the node writing it computes from its quantized inputs: the tensor before its Q/DQ
        # pair, or its float twin's output; None: the pair changes none of its values (a Reshape on its grid)
        self.before_quantizing = dict(before_quantizing or {})
        self.rescaled = dict(rescaled or {})  # tensors a float rewrite scaled per channel (equalization ...)
        self.output_codes = dict(output_codes or {})
        scratch = Float64Scratch()  # one set of work arrays for every meter of the comparison
        self.layers = {m.float_name: FidelityMeter(m.float_name, scratch=scratch) for m in matches}
        self.outputs = {name: FidelityMeter(name, scratch=scratch) for name in outputs}
        self.carried = {name: FidelityMeter(name, scratch=scratch)
                        for name, before in self.before_quantizing.items() if before is not None}
        self.agreement: dict[str, AgreementMeter] = {}
        self.skipped: list[str] = []
        self.samples = self.rows = 0

    def _first_batch(self, reference: Mapping[str, np.ndarray], layers: Mapping[str, np.ndarray]) -> None:
        for name in list(self.layers):
            quant_name = self.matches[name].quant_name
            if reference[name].shape != layers[quant_name].shape:
                logger.warning("tensor %s has shape %s in the float model but %s in the quantized model: skipped",
                               name, reference[name].shape, layers[quant_name].shape)
                del self.layers[name]
                self.carried.pop(name, None)
                self.skipped.append(name)
        # class scores: their top-1; integer outputs (an ArgMax's class indices): equal values
        self.agreement = {name: EqualityMeter(name) if reference[name].dtype.kind in "iub" else AgreementMeter(name)
                          for name in self.outputs
                          if reference[name].dtype.kind in "iub" or looks_like_class_scores(reference[name].shape)}

    def update(self, reference: Mapping[str, np.ndarray], layers: Mapping[str, np.ndarray],
               outputs: Mapping[str, np.ndarray], *, rows: int) -> None:
        """``reference``: the float model's tensors; ``layers``: the quantized model's DQ outputs (by
        their names); ``outputs``: its graph outputs from the session that runs it as is; ``rows``: the
        samples in the batch fed (counted on the feed: an output may be sequence-first, [T, B, C])."""
        outputs = {name: self.output_codes[name].dequantize(array) if name in self.output_codes else array
                   for name, array in outputs.items()}
        if self.samples == 0:
            self._first_batch(reference, layers)
        for name, meter in self.layers.items():
            meter.update(reference[name], self._in_float_scales(name, layers[self.matches[name].quant_name]))
        for name, meter in self.carried.items():
            array = layers[self.before_quantizing[name]]
            if array.shape != reference[name].shape and array.size == reference[name].size:
                array = array.reshape(reference[name].shape)  # the same values in order (reshaped_from)
            meter.update(reference[name], self._in_float_scales(name, array))
        for name, meter in self.outputs.items():
            meter.update(reference[name], outputs[name])
        for name, meter in self.agreement.items():
            meter.update(reference[name], outputs[name])
        self.samples += 1
        self.rows += rows

    def layer_rows(self) -> list[LayerComparison]:
        rows = []
        for name, meter in self.layers.items():
            match, fidelity = self.matches[name], meter.result()
            rows.append(LayerComparison(tensor=name, quant_tensor=match.quant_name, op_type=match.op_type,
                                        scale=match.scale, zero_point=match.zero_point,
                                        zero_point_dtype=match.zero_point_dtype, sqnr_db=fidelity.sqnr_db,
                                        cosine=fidelity.cosine, max_abs_error=fidelity.max_abs_error))
        return sorted(rows, key=lambda r: (math.isnan(r.sqnr_db), r.sqnr_db, r.tensor))

    def _in_float_scales(self, name: str, array: np.ndarray) -> np.ndarray:
        """``array``, the quantized model's ``name``, with a float rewrite's per-channel scaling undone."""
        return self.rescaled[name].undo(array) if name in self.rescaled else array

    def carried_sqnr(self) -> dict[str, float]:
        """Per tensor of ``before_quantizing``: the SQNR of what its node computes before its Q/DQ pair."""
        exact = {name: self.layers[name].result().sqnr_db for name, before in self.before_quantizing.items()
                 if before is None and name in self.layers}
        return exact | {name: meter.result().sqnr_db for name, meter in self.carried.items()}

    def output_rows(self) -> list[OutputComparison]:
        rows = []
        for name, meter in self.outputs.items():
            fidelity, agreement = meter.result(), self.agreement.get(name)
            rows.append(OutputComparison(name=name, sqnr_db=fidelity.sqnr_db, cosine=fidelity.cosine,
                                         max_abs_error=fidelity.max_abs_error,
                                         top1_agreement=agreement.result().value if agreement else None,
                                         integer=isinstance(agreement, EqualityMeter),
                                         reference_finite=fidelity.reference_finite))
        return rows


def compare_models(float_model: ModelSource, quant_model: ModelSource, data: object, *,
                   original: ModelSource | None = None, max_samples: int | None = None,
                   progress: Progress | None = None, float_reference: FloatReference | None = None,
                   float_twins: bool = True, layers: bool = True) -> CompareResult:
    """Per-layer SQNR/cosine/max error of ``quant_model``'s activations, and output-level metrics.

    The output rows are those of ``quant_model`` run as is (ONNX Runtime's
    default optimizations, its fused integer kernels); the per-layer rows
    those of its QDQ simulation with the matched tensors exposed (see the
    module docstring). A model without activation Q/DQ pairs has its tensors
    matched by name when it stores or computes below float32 (fp16, bf16,
    weight-only: ``by_name``), else (the float model itself) gets output rows only.

    ``original``: the float model before the float passes that made
    ``float_model``, for the tensors of a quantizer that kept them (see the
    module docstring). ``data`` is anything :func:`edgeopt.data.open_data`
    takes; ``max_samples`` limits the batches read; ``progress(done, total)``
    is called per batch (``total`` is None when the source does not know its
    length). ``float_reference``: one of ``float_model`` (the same object) kept from an earlier comparison
    on the same data, which answers for it without running it again. ``float_twins``: measure what a layer
    reading a quantized weight loses against its float twin (:mod:`edgeopt.quant.compare_twins`); without
    them, as the accuracy search ranks it, by the drop from its quantized inputs. ``layers`` False: output
    rows only (the first model is no float model: its tensors are no reference for the layers).
    """
    float_ir, quant_ir = _load(float_model), _load(quant_model)
    if float_reference is not None and float_reference.model is not float_ir:  # its tensors would be another's
        raise ValueError("compare_models: float_reference was made for another float model than float_model")
    if len(float_ir.graph.outputs) == len(quant_ir.graph.outputs) == 1:
        quant_ir = _renamed_output(float_ir, quant_ir)
    outputs = _check_interfaces(float_ir, quant_ir)
    original_ir = _load(original) if original is not None and may_hold_original(float_ir, quant_ir) else None
    matches, unmatched, pairs = match_pairs(float_ir, quant_ir, original_ir) if layers else ([], [], 0)
    by_name = layers and not pairs and compared_by_name(quant_ir)
    if by_name:
        if float_ir is float_model and float_reference is None and _untyped(float_ir):
            float_ir = float_ir.clone()  # typed below: the caller's model is left as it was given
        _typed(float_ir, original_ir if original_ir is not original else None)
        matches = match_names(float_ir, quant_ir, original_ir)
    source = open_data(data, eir.model_inputs(float_ir))
    source = take(source, max_samples) if max_samples is not None else source
    computed = {} if by_name else computed_before_quantizing(quant_ir, matches)
    rescaled = read_rescaled(quant_ir)
    # a layer reading a quantized weight: what its float twin computes from the same quantized inputs
    layer_model, twins = ((quant_ir, {}) if by_name or not float_twins or not layers else
                          float_weight_twins(float_ir, quant_ir, matches, skip=computed, rescaled=rescaled,
                                             original=original_ir))
    computed |= twins
    meters = _Meters(matches, outputs, rescaled, output_codes(float_ir, quant_ir, outputs), computed)
    runs = comparison_runs(float_ir, quant_ir, matches, outputs, original_ir, float_reference,
                           [name for name in computed.values() if name is not None], layer_model=layer_model)
    _stream(source, runs, meters, progress)
    if meters.samples == 0:
        raise DataError("the data gave no samples: point --data at at least one sample")
    layers = _with_losses(quant_ir, meters.layer_rows(), by_name, meters.carried_sqnr())
    return CompareResult(samples=meters.samples, layers=tuple(layers),
                         outputs=tuple(meters.output_rows()), quantized_tensors=pairs,
                         unmatched=tuple(unmatched), skipped=tuple(meters.skipped), rows=meters.rows,
                         by_name=by_name and bool(matches))


def _untyped(model: ir.Model) -> bool:
    return any(value.name and value.dtype is None for node in model.graph for value in node.outputs)


def _typed(*models: ir.Model | None) -> None:
    """The float tensors ONNX shape inference left untyped (those after a com.microsoft Attention or
    SkipLayerNormalization) typed by one run: tensors are matched by name only when the float one is known to
    be float. Only dtypes are set, which the model already determined; a run that fails leaves them unknown."""
    from edgeopt.runtime.ort import fill_missing_types

    for model in models:
        if model is None:
            continue
        try:
            fill_missing_types(model)
        except DataError as error:
            logger.info("tensors left untyped, not compared: %s", error)


def _computing_node(value: ir.Value | None) -> ir.Node | None:
    """The node whose arithmetic ``value`` shows: its producer, or the head of its fused chain."""
    node = value.producer() if value is not None else None
    return (fused_chain(node) or [node])[0]


def _input_names(node: ir.Node, by_name: bool) -> list[str]:
    """The names of ``node``'s inputs as rows know them: carried by Q/DQ pairs, or (``by_name``) as computed."""
    if not by_name:
        return quantized_input_names(node)
    return [carried.name for carried in map(computed_from, node.inputs) if carried is not None]


def _with_losses(quant_model: ir.Model, rows: list[LayerComparison], by_name: bool = False,
                 carried: Mapping[str, float] | None = None) -> list[LayerComparison]:
    """The rows with the decibels lost inside the node writing each tensor. A row's SQNR is cumulative
    (every layer before adds its error); the loss is where the error arises:

    * a node reading no quantized constant (a Gather, a Concat, a LayerNorm kept float, an Add of two
      activations; ``carried``: the SQNR of what it computes before its output's Q/DQ pair) loses only
      what that pair rounds: a Gather of the class token at 18 dB from a sequence at 29 dB lost nothing,
      and a LayerNorm that scales a badly quantized row up loses nothing either, the error came in;
    * a node reading a quantized weight (a conv, a Gemm; ``carried``: the SQNR of its float twin, fed the
      same quantized inputs, :mod:`edgeopt.quant.compare_twins`) loses its weights' rounding and its
      output's; where no twin could be built (tensors a float rewrite rescaled, a model compared by name),
      the worst SQNR of its quantized inputs (``by_name``: of its inputs, a model input exact) minus its
      output's.

    An input quantized exactly (inf dB) and an output that is not leaves it all lost inside (inf)."""
    carried = carried or {}
    sqnr = {row.tensor: row.sqnr_db for row in rows}
    if by_name:  # the model's inputs are the float model's: exact
        sqnr |= {value.name: math.inf for value in quant_model.graph.inputs}
    values = {v.name: v for node in quant_model.graph for v in node.outputs}
    dynamic = by_name and is_dynamic_model(quant_model)
    with_losses = []
    for row in rows:
        if row.tensor in carried:
            with_losses.append(replace(row, lost_db=_lost([carried[row.tensor]], row.sqnr_db),
                                       computed_sqnr_db=carried[row.tensor]))
            continue
        node = _computing_node(values.get(row.tensor)) if not by_name else values[row.quant_tensor].producer()
        if dynamic:  # a dynamic int8 model computes in float32 but for its quantized products
            quantized = dynamic_product_input(node)
            if quantized is False:
                with_losses.append(replace(row, lost_db=0.0))
                continue
            if quantized is not None and quantized.dtype not in (ir.DataType.FLOAT, None):  # a lookup's indices
                with_losses.append(replace(row, lost_db=_lost([math.inf], row.sqnr_db)))
                continue
            names = [_measured_input(quantized, sqnr).name] if quantized is not None else []
        else:
            names = _input_names(node, by_name) if node is not None else []
        upstream = [sqnr[name] for name in names if name in sqnr]
        with_losses.append(replace(row, lost_db=_lost(upstream, row.sqnr_db)))
    return with_losses


def _measured_input(value: ir.Value, sqnr: Mapping[str, float]) -> ir.Value:
    """The row a dynamic product's input is measured by: the tensor it carries, before the Mul by 1 / s that
    SmoothQuant inserts where it cannot fold (that Mul's output has no float counterpart)."""
    value = computed_from(value)
    producer = value.producer()
    if value.name not in sqnr and eir.is_op(producer, "Mul") and any(map(eir.is_constant, producer.inputs)):
        fed = [v for v in producer.inputs if v is not None and not eir.is_constant(v)]
        return computed_from(fed[0]) if len(fed) == 1 else value
    return value


def _lost(upstream: list[float], sqnr_db: float) -> float | None:
    if not upstream or not math.isfinite(sqnr_db):
        return None
    finite = [value for value in upstream if math.isfinite(value)]
    return min(finite) - sqnr_db if finite else math.inf


def _stream(source: Iterable[dict[str, np.ndarray]], runs: Runs, meters: _Meters,
            progress: Progress | None) -> None:
    total = getattr(source, "num_samples", None)
    for feed in source:
        try:
            measured = runs.run(feed)
        except DataError as error:  # ONNX Runtime refusing the values: name the sample
            raise with_origin(error, feed) from None
        meters.update(*measured, rows=batch_rows(feed))
        if progress is not None:
            progress(meters.samples, total)


def layer_sqnr(float_model: ModelSource, quant_model: ModelSource, data: object, *,
               max_samples: int | None = None) -> dict[str, float]:
    """SQNR (dB) of every matched quantized activation, keyed by the float tensor's name."""
    result = compare_models(float_model, quant_model, data, max_samples=max_samples)
    return {row.tensor: row.sqnr_db for row in result.layers}

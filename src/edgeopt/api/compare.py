"""Compare a quantized model with its float model, layer by layer: ``compare``."""

from __future__ import annotations

import dataclasses
import logging

from edgeopt import ir as eir
from edgeopt.api._common import (ModelSource, Progress, calibration_source, check_progress, comparable_float,
                                 issue_warnings, load, logged_warnings, model_source)
from edgeopt.api._terms import python_terms
from edgeopt.data import ImagePreprocess
from edgeopt.quant.compare import CompareResult

__all__ = ["compare"]

logger = logging.getLogger(__name__)


@python_terms()
def compare(float_model: ModelSource, quant_model: ModelSource, data, *, preprocess: ImagePreprocess | None = None,
            max_samples: int | None = None, progress: Progress | None = None) -> CompareResult:
    """Per-layer SQNR and cosine of a quantized model against its float model, worst first; the warnings
    logged on the way are in its ``warnings`` too (a model without Q/DQ pairs, outputs below 0 dB ...)."""
    check_progress(progress)
    with logged_warnings() as logged:
        result = _compare(float_model, quant_model, data, preprocess=preprocess, max_samples=max_samples,
                          progress=progress)
    issue_warnings(logged)
    return dataclasses.replace(result, warnings=tuple(logged))


def _compare(float_model: ModelSource, quant_model: ModelSource, data, *, preprocess: ImagePreprocess | None,
             max_samples: int | None, progress: Progress | None) -> CompareResult:
    from edgeopt.quant.compare import compare_models, missing_qdq_note
    from edgeopt.quant.compare_matching import below_float32

    float_model, quant_model = model_source(float_model, "float model"), model_source(quant_model, "quantized model")
    quant_ir = load(quant_model, require_static=False)
    # edgeopt's quantizer folds BatchNorm ... first: its tensors are those of the optimized float model;
    # the model as given serves a quantizer that kept its graph (ONNX Runtime's quantize_static), read
    # again by compare_models only for such a model (its weights are not held twice for edgeopt's own)
    float_ir = load(float_model, require_static=False)
    quantized = below_float32(float_ir)
    if quantized is not None:  # two quantizations compared: their tensors are no float reference for the layers
        logger.warning("the first model is no float32 model (it holds %s): per-layer rows measure a quantized "
                       "model against its float model, so only the outputs are compared (give the float model "
                       "first for the layers)", quantized)
    float_ir = comparable_float(float_ir, in_place=True)  # a fresh copy already
    from edgeopt.data import AlsoCheckedSource

    source = AlsoCheckedSource(calibration_source(float_ir, data, preprocess, max_samples),
                               eir.model_inputs(quant_ir), "second model")
    result = compare_models(float_ir, quant_ir, source, original=float_model, progress=progress,
                            layers=quantized is None)
    if quantized is None and not result.layers and (note := missing_qdq_note(quant_ir)) is not None:
        logger.warning(note)
    for output in result.outputs:
        if output.signal and output.sqnr_db < 0:  # noise above the signal: no quantization of this model gives that
            logger.warning("output %s: SQNR %.1f dB, the second model's outputs are no closer to the first's than "
                           "zeros: is it a quantization of this float model (and a working one)?", output.name,
                           output.sqnr_db)
    worst = result.worst_output_sqnr()
    if (worst is not None and 0 <= worst < _UNRELATED_DB and result.quantized_tensors >= 4
            and 2 * result.matched < result.quantized_tensors):
        logger.warning("only %d of %d quantized tensors have a counterpart in the float model, and the outputs are "
                       "at %.1f dB: is the second model a quantization of this float model?", result.matched,
                       result.quantized_tensors, worst)
    return result


#: Below this output SQNR, with most quantized tensors unmatched, the two models look unrelated.
_UNRELATED_DB = 10.0

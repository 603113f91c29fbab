"""Int8 post-training quantization to a QDQ model (the handler for :class:`Int8Config`).

Steps, on the private copy the caller hands in:

1. refuse a model that is already quantized;
2. opset < 13: convert to 13 (per-channel QDQ needs it), reported, and
   checked against the original on the first calibration batches;
3. ``edgeopt.passes.optimize_for_quantization`` when available (fold
   BatchNorm/affine into Conv, fuse activations), then unique names; every
   ``exclude`` entry must name a node or op type of the given or the
   optimized model;
4. plan Q/DQ placement (:mod:`edgeopt.quant.placement`);
5. one streaming calibration pass over the planned activations;
6. insert Q/DQ with ranges from the configured method (:mod:`edgeopt.quant.qdq`).

The activation type follows the target (ORT on x86: uint8, MCU: int8) and is
logged and written into the result's notes.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Iterable

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from edgeopt import ir as eir
from edgeopt.quant.calibrate import calibrate
from edgeopt.quant.config import Int8Config, PerTensor, Target
from edgeopt.quant.opset import OpsetCheck, OpsetConversion, convert_opset
from edgeopt.quant.placement import check_exclude, check_not_quantized, plan_qdq
from edgeopt.quant.qdq import insert_qdq
from edgeopt.quant.registry import Batch, ProgressCallback, QuantResult, register_scheme

__all__ = ["QDQ_OPSET", "quantize_int8"]

logger = logging.getLogger(__name__)

QDQ_OPSET = 13


def _activation_note(config: Int8Config) -> str:
    fmt = config.activations.name
    if config.activation_format is not None:
        return f"activations {fmt} (set explicitly), weights int8 per {_granularity(config)}"
    why = ("ONNX Runtime's fast x86 integer kernels take u8 activations x s8 weights"
           if config.target is Target.ORT else "TFLite/CMSIS-NN int8 scheme")
    return f"target {config.target.value}: activations {fmt}, weights int8 per {_granularity(config)} ({why})"


def _granularity(config: Int8Config) -> str:
    return "tensor" if isinstance(config.weight_granularity, PerTensor) else "output channel"


def _optimize(model: ir.Model) -> tuple[ir.Model, object | None]:
    """Run ``edgeopt.passes.optimize_for_quantization`` when the passes package provides it."""
    try:
        from edgeopt.passes import optimize_for_quantization
    except ImportError:
        return model, None
    result = optimize_for_quantization(model)
    return result.model, result


def _prepare(model: ir.Model) -> None:
    """Unique node/value names (the plan refers to names) and dtypes where ONNX can infer them."""
    common_passes.NameFixPass()(model)
    if any(value.dtype is None for node in model.graph for value in node.outputs):
        try:
            common_passes.ShapeInferencePass()(model)
        except Exception as error:  # best effort: calibration records the dtypes it sees
            logger.info("shape inference skipped (%s)", str(error).splitlines()[0] if str(error) else error)


def _vanished_excludes(model: ir.Model, exclude: tuple[str, ...]) -> list[str]:
    present = {node.name for node in model.graph} | {node.op_type for node in model.graph}
    return [f"--exclude {entry!r}: no such node after the float passes (folded into its neighbour)"
            for entry in exclude if entry not in present]


@register_scheme(Int8Config)
def quantize_int8(model: ir.Model, config: Int8Config, data: Iterable[Batch] | None, *,
                  progress: ProgressCallback | None = None) -> QuantResult:
    """Int8 QDQ quantization of ``model`` (rewritten in place) calibrated on ``data``."""
    check_not_quantized(model)
    given = model
    notes = [_activation_note(config)]
    logger.info(notes[0])
    hooks, check = [], None
    if eir.default_opset(model) < QDQ_OPSET:
        original = model
        model = convert_opset(original, QDQ_OPSET)
        check = OpsetCheck(original, model, tolerance=config.verify_tolerance)
        hooks.append(check)
    model, optimization = _optimize(model)
    _prepare(model)
    check_exclude([given, model], config.exclude)
    notes.extend(_vanished_excludes(model, config.exclude))
    plan = plan_qdq(model, exclude=config.exclude)
    calibration = calibrate(model, data, plan.activations, config.calibration_config,
                            progress=progress, hooks=hooks)
    if calibration.non_float & set(plan.activations):
        plan = plan_qdq(model, exclude=config.exclude, non_float=calibration.non_float)
    tensors = insert_qdq(model, plan, calibration.ranges(), config, methods=calibration.methods())
    conversion: OpsetConversion | None = check.result() if check is not None else None
    if conversion is not None:
        notes.append(conversion.note())
    if plan.float_nodes:
        notes.append(f"{len(plan.float_nodes)} nodes stay float (see float_nodes)")
    details = {"calibration": calibration, "plan": plan, "opset_conversion": conversion,
               "activation_format": config.activations.name, "optimization": optimization}
    return QuantResult(model=model, scheme="int8", tensors=tensors, float_nodes=plan.float_nodes,
                       notes=tuple(notes), config=config, details=types.MappingProxyType(details))

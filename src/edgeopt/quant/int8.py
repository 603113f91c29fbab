"""Int8 post-training quantization to a QDQ model (the handler for :class:`Int8Config`).

Steps, on the private copy the caller (:func:`edgeopt.quant.quantize`, which
has refused a model already quantized) hands in:

1. opset < 13: convert to 13 (per-channel QDQ needs it), reported, and
   checked against the original on the first calibration batches;
2. ``edgeopt.passes.optimize_for_quantization`` when available (fold
   BatchNorm/affine into Conv, fuse activations), then unique names; every
   ``exclude`` entry must name a node or op type of the given or the
   optimized model;
3. plan Q/DQ placement (:mod:`edgeopt.quant.placement`);
4. one streaming calibration pass over the planned activations;
5. insert Q/DQ with ranges from the configured method (:mod:`edgeopt.quant.qdq`).

The activation type follows the target (ORT on x86: uint8, MCU: int8) and is
logged and written into the result's notes.
"""

from __future__ import annotations

import logging
import math
import types
from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from edgeopt import ir as eir
from edgeopt.data.base import reads_again
from edgeopt.errors import ModelError
from edgeopt.metrics import count_of
from edgeopt.quant.adaround import AdaRoundConfig, AdaRoundResult, LayerInputSampler, adaround_weights
from edgeopt.quant.adaround_solver import backend_used
from edgeopt.quant.bias_correction import ChannelMeanHook, correct_biases, correction_inputs, round_to_nearest
from edgeopt.quant.calibrate import calibrate
from edgeopt.quant.calibration_memo import CalibrationMemo
from edgeopt.quant.config import (CalibrationConfig, CalibrationMethod, Fallback, Int8Config, PerTensor, Target,
                                  is_excluded)
from edgeopt.quant.depthwise_rounding import (DEFAULT_MAX_SHARE, DepthwiseCorrelationHook, is_depthwise,
                                             round_depthwise, statistics_share)
from edgeopt.quant.equalize import equalize
from edgeopt.quant.fallback import fp16_fallback
from edgeopt.quant.gptq import gptq_layer
from edgeopt.quant.hard_activations import lower_hard_activations, without_integer_form
from edgeopt.quant.smoothquant import ChannelAbsMaxHook, smooth, smoothing_inputs
from edgeopt.quant.ops import FUSED_BETWEEN_PAIRS, MCU_OP_RULES, OP_RULES, is_qdq_op
from edgeopt.quant.masks import FLOAT_TARGET_MASK_FLOOR, MASK_FLOOR
from edgeopt.quant.opset import OpsetCheck, OpsetConversion, convert_opset
from edgeopt.quant.model_checks import NodeIndex, check_exclude, vanished_excludes
from edgeopt.quant.placement import plan_qdq, readers_behind_qdq, readers_past_data_movement
from edgeopt.quant.qdq import insert_qdq
from edgeopt.quant.rescaled import record_rescaled
from edgeopt.quant.registry import Batch, ProgressCallback, QuantResult, TensorQuantInfo, register_scheme

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


def _optimize(model: ir.Model, target: Target) -> tuple[ir.Model, object | None]:
    """Run ``edgeopt.passes.optimize_for_quantization`` on ``model`` itself (already the scheme's own); for
    the microcontroller, whose kernels have no BatchNormalization, one it cannot fold becomes a Mul and an Add."""
    try:
        from edgeopt.passes import optimize_for_quantization
    except ImportError:
        return model, None
    result = optimize_for_quantization(model, in_place=True, integer_only=target is Target.MCU)
    return result.model, result


def _infer_shapes(model: ir.Model) -> None:
    """ONNX shape and type inference, best effort (what it cannot infer stays unknown)."""
    try:
        common_passes.ShapeInferencePass()(model)
    except Exception as error:
        logger.info("shape inference skipped (%s)", str(error).splitlines()[0] if str(error) else error)


def _infer_ranks(model: ir.Model) -> None:
    """Shapes first when a MatMul or ReduceMean input has no known rank (a model built or loaded
    without shapes): the float passes need it to fuse MatMul + bias into Gemm and to pool a mean."""
    if any(node.op_type in ("MatMul", "ReduceMean") and node.inputs and node.inputs[0] is not None
           and node.inputs[0].shape is None for node in model.graph):
        _infer_shapes(model)


def _prepare(model: ir.Model) -> None:
    """Unique node/value names (the plan refers to names) and dtypes where ONNX can infer them
    (calibration records the dtypes it sees for the rest); Pads over every axis."""
    common_passes.NameFixPass()(model)
    if any(value.dtype is None for node in model.graph for value in node.outputs):
        _infer_shapes(model)
    _pads_over_every_axis(model)


def _pads_over_every_axis(model: ir.Model) -> None:
    """A Pad with an ``axes`` input (opset 18) gets full-rank ``pads`` instead, the same padding:
    between Q/DQ pairs ONNX Runtime's optimizer mishandles the ``axes`` form (the model fails to run)."""
    for node in model.graph:
        if node.op_type != "Pad" or len(node.inputs) < 4 or node.inputs[3] is None:
            continue
        pads, axes = eir.constant_array(node.inputs[1]), eir.constant_array(node.inputs[3])
        data = node.inputs[0]
        if pads is None or axes is None or data is None or data.shape is None:
            continue
        rank, axes, pads = len(data.shape), axes.reshape(-1) % len(data.shape), pads.reshape(-1)
        full = np.zeros(2 * rank, np.int64)
        full[axes], full[rank + axes] = pads[:len(axes)], pads[len(axes):]  # begins, then ends
        eir.replace_constant_input(model.graph, node, 1, full, f"{eir.node_label(node)}_pads")
        node.resize_inputs(3)


def _check_finite_weights(model: ir.Model, plan) -> None:
    """ModelError naming the first weight holding inf or NaN: no scale represents it, and the float
    model itself computes inf/NaN through it."""
    values = {value.name: value for node in model.graph for value in node.inputs if value is not None}
    for use in plan.weights:
        array = eir.constant_array(values[use.tensor])
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise ModelError(f"weight {use.tensor!r} of node {use.node!r} holds "
                             f"{count_of(bad, 'inf/NaN value', 'inf/NaN values')}: the float model is broken "
                             "there (it computes inf/NaN too); fix or retrain those weights")


def _float_rewrites(model: ir.Model, config: Int8Config, data: Iterable[Batch] | None,
                    memo: CalibrationMemo | None = None) -> tuple[list[str], tuple[str, ...], float | None]:
    """Float-exact rewrites that make the model easier to quantize: CLE, then SmoothQuant. Their notes,
    the ReLU6 nodes ``--equalize-relu6`` made ReLU (which does change the float model), and how much:
    the rewritten float model's output SQNR against the original's on the data (a copy of the model
    is kept for that while equalizing). What they measure on the data is kept in ``memo``."""
    notes, relu6_replaced = [], ()
    relu6_change = memo.relu6_change_db if memo is not None else None
    if config.equalize:
        # measured on data read again before calibration: a one-shot stream is left for calibration alone
        measure = config.equalize_relu6 and data is not None and relu6_change is None and reads_again(data)
        original = model.clone() if measure else None
        report = equalize(model, replace_relu6=config.equalize_relu6)
        relu6_replaced = report.relu6_replaced
        record_rescaled(model, report.rescaled)
        relu6_text = ""
        if report.relu6_replaced:
            relu6_text = (f"; {len(report.relu6_replaced)} ReLU6 turned into ReLU (the float model changes where "
                          "a value exceeded 6")
            if original is not None:
                relu6_change = _output_change_db(original, model, data)
                if memo is not None:
                    memo.relu6_change_db = relu6_change
            if relu6_change is not None:
                relu6_text += f": its outputs at {relu6_change:.1f} dB SQNR against the original's on the data"
            relu6_text += ")"
        del original
        notes.append(f"cross-layer equalization: {len(report.equalized)} layer pairs equalized, "
                     f"{len(report.skipped)} skipped" + relu6_text)
        notes += _first_skips([f"not equalized: {s.first}: {s.reason}" for s in report.skipped])
    if config.smoothquant_alpha is not None:
        hook = ChannelAbsMaxHook(smoothing_inputs(model))
        if hook.tensors:
            abs_max = memo.channel_abs_max if memo is not None else None
            if abs_max is None:
                calibrate(model, data, list(hook.tensors), CalibrationConfig(), hooks=[hook])
                abs_max = hook.result()
                if memo is not None:
                    memo.channel_abs_max = abs_max
            report = smooth(model, abs_max, alpha=config.smoothquant_alpha)
            record_rescaled(model, report.rescaled)
            notes.append(f"SmoothQuant (alpha {config.smoothquant_alpha:g}): "
                         f"{count_of(len(report.smoothed), 'input', 'inputs')} smoothed, {len(report.skipped)} skipped")
            notes += _first_skips([f"not smoothed: {reason}" for _, reason in report.skipped])
        else:
            notes.append("SmoothQuant: no MatMul/Gemm with a constant weight reads an activation: nothing to smooth")
    return notes, relu6_replaced, relu6_change


_CHANGE_SAMPLES = 64


def _output_change_db(original: ir.Model, rewritten: ir.Model, data: Iterable[Batch]) -> float:
    """The rewritten float model's worst output SQNR against the original's, on the first batches."""
    from edgeopt.quant.compare import compare_models

    worst = compare_models(original, rewritten, data, max_samples=_CHANGE_SAMPLES).worst_output_sqnr()
    return float("inf") if worst is None else worst  # class indices alone: no SQNR to lose


_SKIPS_SHOWN = 5


def _first_skips(skips: list[str]) -> list[str]:
    """Why the first few were skipped (a user who asked for the algorithm wants to know), and how
    many more."""
    more = [f"  ... and {len(skips) - _SKIPS_SHOWN} more"] if len(skips) > _SKIPS_SHOWN else []
    return [f"  {skip}" for skip in skips[:_SKIPS_SHOWN]] + more


def _auto_note(methods: Mapping[str, str], activations: Iterable[str]) -> str:
    """How many of the quantized activations ``auto`` gave each method's range."""
    chosen = Counter(methods[name] for name in activations if name in methods)
    listed = ", ".join(f"{method} {count}" for method, count in chosen.most_common())
    return f"auto calibration, the range of least estimated error per tensor: {listed}"


def _share(fraction: float) -> str:
    return f"{100 * fraction:.1f} %"


class _AccuracyHooks:
    """Statistics for bias correction and learned rounding (AdaRound, GPTQ), gathered in the one
    calibration pass."""

    def __init__(self, model: ir.Model, plan, config: Int8Config) -> None:
        self.config = config
        self.depthwise_share: float | None = None  # of depthwise GPTQ's statistics, when it was on by default
        # only the layers whose weights are quantized have a weight error to correct
        self.quantized_layers = frozenset(use.node for use in plan.weights)
        self.means = (ChannelMeanHook(correction_inputs(model, self.quantized_layers)) if config.bias_correct
                      else None)
        layers = [use.node for use in plan.weights]
        # learned rounding of every layer from sampled input rows, or GPTQ of the depthwise layers alone
        # from their tap correlations; either hook rides the calibration pass
        if config.adaround or config.gptq:
            self.sampler = LayerInputSampler(model, layers, max_samples=AdaRoundConfig().max_samples)
        else:
            depthwise = DepthwiseCorrelationHook(model, layers) if config.depthwise_gptq is not False else None
            if depthwise is not None and depthwise.layers and config.depthwise_gptq is None:
                # on by default when cheap: judged on all the model's depthwise layers, so that excluding some
                # (the accuracy search's rounds) does not switch it on for the others
                self.depthwise_share = statistics_share(model, [node.name for node in model.graph
                                                                if is_depthwise(node)])
                depthwise = depthwise if self.depthwise_share <= DEFAULT_MAX_SHARE else None
            self.sampler = depthwise if depthwise is not None and depthwise.layers else None
        self.hooks = [h for h in (self.means, self.sampler) if h is not None]
        self.tensors = [t for h in self.hooks for t in h.tensors]
        self.replan = config.bias_correct  # bias correction may give a bias-less Conv a bias input
        self._means_seen, self._samples_seen = self.means, self.sampler  # the hooks that saw the data

    def calibrate(self, model: ir.Model, data: Iterable[Batch], tensors: list[str], config: Int8Config,
                  hooks: list, progress: ProgressCallback | None, memo: CalibrationMemo | None):
        """The calibration pass of ``tensors`` with these hooks, or, when ``memo`` saw all they need,
        its answer (then the statistics are read from the hooks of that earlier pass)."""
        reusable = memo is not None and not hooks  # another hook (the opset check) needs the data itself
        answer = memo.answer(tensors, self.means, self.sampler) if reusable else None
        if answer is not None:
            self._means_seen, self._samples_seen = memo.means, memo.sampler
            return answer
        calibration = calibrate(model, data, tensors, config.calibration_config, progress=progress,
                                hooks=[*hooks, *self.hooks])
        if reusable:
            memo.keep(calibration, self.means, self.sampler)
        return calibration

    def _round(self, model: ir.Model, samples: Mapping) -> AdaRoundResult:
        """The learned rounding of the layers in ``samples`` (what the sampler gathered for each)."""
        if isinstance(self.sampler, DepthwiseCorrelationHook):
            return round_depthwise(model, samples, self.config.weight_granularity)
        return adaround_weights(model, samples, config=AdaRoundConfig(), granularity=self.config.weight_granularity,
                                solver=gptq_layer if self.config.gptq else None)

    def _rounding_note(self, result: AdaRoundResult, skipped) -> str:
        if isinstance(self.sampler, DepthwiseCorrelationHook):
            layers = result.layers
            nearest = sum(layer.mse_nearest for layer in layers)
            change = 100 * (1 - sum(layer.mse_learned for layer in layers) / nearest) if nearest > 0 else 0.0
            learned, channels = (sum(getattr(layer, field) for layer in layers)
                                 for field in ("channels_learned", "channels"))
            default = ("" if self.depthwise_share is None else
                       f" (by default: its statistics cost {_share(self.depthwise_share)} of the model's "
                       f"multiply-adds, at most {_share(DEFAULT_MAX_SHARE)}; --no-depthwise-gptq skips it)")
            return (f"depthwise GPTQ{default}: {count_of(len(layers), 'layer', 'layers')}, {learned} of "
                    f"{count_of(channels, 'output channel', 'output channels')} rounded otherwise than to nearest "
                    "(a channel keeps the nearest rounding unless GPTQ's, fitted on one half of the calibration "
                    f"samples, also cuts the error on the other), output error on the calibration data "
                    f"{change:.0f} % below the nearest rounding's before bias correction; {len(skipped)} skipped")
        backend = backend_used(AdaRoundConfig().backend).value
        method = ("GPTQ rounding" if self.config.gptq else
                  f"AdaRound ({backend} backend; the torch and numpy backends round a few weights differently)")
        return (f"{method}: {count_of(len(result.weights), 'weight', 'weights')} learned, "
                f"{count_of(len(skipped), 'layer', 'layers')} skipped")

    def apply(self, model: ir.Model, memo: CalibrationMemo | None = None) -> tuple[dict, list[str]]:
        notes, rounded, quantizer = [], {}, round_to_nearest(self.config.weight_granularity)
        if self.sampler is not None:
            samples = {name: rows for name, rows in self._samples_seen.result().items() if name in self.sampler.layers}
            result = memo.learned_rounding(frozenset(samples)) if memo is not None else None
            if result is None:
                result = self._round(model, samples)
                if memo is not None:
                    memo.keep_rounding(frozenset(samples), result)
            rounded, quantizer = result.rounded_weights(), result.weight_quantizer()
            # the layers the sampler refused (a 1-D convolution) are left to nearest rounding as well
            skipped = (*self.sampler.skipped, *result.skipped)
            notes.append(self._rounding_note(result, skipped))
            notes += _first_skips([f"not rounded: {name}: {reason}" for name, reason in skipped])
        elif self.config.depthwise_gptq:
            notes.append("depthwise GPTQ: no depthwise convolution with a quantized weight to round")
        elif self.depthwise_share is not None:
            cost = (f"its statistics would cost {_share(self.depthwise_share)} of the model's multiply-adds"
                    if math.isfinite(self.depthwise_share) else
                    "the size per sample of its statistics or of the model is unknown (free spatial or time dims)")
            notes.append(f"depthwise GPTQ off: {cost} (on by default up to {_share(DEFAULT_MAX_SHARE)}); "
                         "--depthwise-gptq rounds the depthwise convolutions anyway")
        if self.means is not None:
            means = {name: mean for name, mean in self._means_seen.result().items() if name in self.means.tensors}
            report = correct_biases(model, means, quantize_weight=quantizer,
                                    layers=self.quantized_layers)
            notes.append(f"bias correction: {count_of(len(report.corrected), 'layer', 'layers')} corrected, "
                         f"{len(report.skipped)} skipped")
            notes += _first_skips([f"not corrected: {node}: {reason}" for node, reason in report.skipped])
        return rounded, notes


def _excluded_float_anyway(model: ir.Model, exclude: Iterable[str], rules: Mapping) -> list[str]:
    """Notes for excluded nodes of an op without an integer kernel: they ran in float anyway (a Softmax,
    which ONNX Runtime fuses between quantized ops, now reads its input in float), and their output is
    quantized for the int8 nodes reading it, which are what to exclude instead."""
    exclude = set(exclude)
    notes = []
    for node in model.graph:
        if node.op_type in rules or not is_excluded(node, exclude):
            continue
        quantizers = [use.node for value in node.outputs for use in value.uses()
                      if is_qdq_op(use.node, "QuantizeLinear")]
        readers = list(dict.fromkeys(r.name for r in readers_past_data_movement(
            [reader for q in quantizers for reader in readers_behind_qdq(q)])))
        if readers:
            shown = ", ".join(readers[:3]) + (", ..." if len(readers) > 3 else "")
            given = node.name if node.name in exclude else node.op_type
            done = ("now reads its input in float (between quantized ops ONNX Runtime runs it as "
                    f"QLinear{node.op_type})" if node.op_type in FUSED_BETWEEN_PAIRS
                    else "has no integer kernel, so it ran in float anyway")
            notes.append(f"--exclude {given}: {node.name} ({node.op_type}) {done}; its output is quantized for "
                         f"{shown}: exclude those to keep it float")
    more = [f"... and {len(notes) - _SKIPS_SHOWN} more excluded nodes ran in float anyway"] \
        if len(notes) > _SKIPS_SHOWN else []
    return notes[:_SKIPS_SHOWN] + more


def _wide_softmax_notes(model: ir.Model, probabilities: Iterable[str], fmt) -> list[str]:
    """A note for each quantized Softmax output over more values than the format has steps: its
    fixed scale 1/levels rounds the typical probability (1/width) to 0 or one step."""
    wanted, notes = set(probabilities), []
    for node in model.graph:
        if node.op_type != "Softmax" or node.outputs[0].name not in wanted or node.outputs[0].shape is None:
            continue
        dims = list(node.outputs[0].shape.dims)
        default_axis = -1 if eir.default_opset(model) >= 13 else 1
        axis = node.attributes.get_int("axis", default_axis) % max(len(dims), 1)
        over = dims[axis:axis + 1] if eir.default_opset(model) >= 13 else dims[axis:]
        if not over or not all(isinstance(d, int) for d in over):
            continue
        width = int(np.prod(over))
        if width <= fmt.num_levels:
            continue
        readers = sorted({reader.name for reader in readers_past_data_movement(
            use.node for use in node.outputs[0].uses()) if reader.name})
        notes.append(f"Softmax {node.name} normalizes over {width} values, and its quantized output has steps of "
                     f"1/{fmt.num_levels}: probabilities under 1/{2 * fmt.num_levels} (the mean one is 1/{width}) "
                     f"round to 0; if accuracy suffers, --exclude {' '.join(readers) or node.name} keeps them float")
    return notes


# A Concat part whose own range is this many times narrower than the scale it shares has lost 4 of its 8 bits
_COARSE_CONCAT_RATIO = 16


def _levels_text(levels: float) -> str:
    return f"about {round(levels)}" if levels >= 1 else "less than one"


def _coarse_concat_notes(concats: Mapping[str, str], plan, ranges: Mapping[str, tuple[float, float]],
                         tensors: Iterable[TensorQuantInfo], target: Target) -> list[str]:
    """A note for each Concat part that keeps few levels under the scale it shares with the other parts
    (a detector's scores in [0, 1] beside box coordinates in pixels); ``concats``: output -> node name."""
    shared = {info.name: info.range for info in tensors if info.kind == "activation"}
    notes = []
    for group in plan.concat_groups:
        node = next((concats[name] for name in group if name in concats), None)
        if node is None:
            continue
        for part in [name for name in group if name in shared and name in ranges and name not in concats]:
            (low, high), (own_low, own_high) = shared[part], ranges[part]
            own = max(own_high, 0.0) - min(own_low, 0.0)
            if own <= 0 or (high - low) < _COARSE_CONCAT_RATIO * own:
                continue
            advice = ("the C kernels need one scale for all of a Concat's parts: bring the parts to similar "
                      "ranges in the model (box coordinates divided by the image size, say)" if target is Target.MCU
                      else f"if accuracy suffers, --exclude {node} keeps it float and its parts at their scales")
            notes.append(f"Concat {node} shares one scale over its parts: {part!r} spans [{own_low:.3g}, "
                         f"{own_high:.3g}], {(high - low) / own:.0f}x less than the joint [{low:.3g}, {high:.3g}], "
                         f"and keeps {_levels_text(255 * own / (high - low))} of 256 levels; {advice}")
    return notes


def _float_model(model: ir.Model, config: Int8Config, data: Iterable[Batch] | None, memo: CalibrationMemo | None,
                 notes: list[str]) -> tuple[ir.Model, OpsetCheck | None, object | None, tuple[str, ...], float | None]:
    """The float model as it will be quantized, with what calibration and the report need of its making:
    converted to opset 13 when older (the check compares it with the given one on the first batches),
    the float passes run, the excludes checked against both, the float rewrites made (--equalize,
    --smoothquant ...); their notes appended to ``notes``. Returns the model, the opset check, the
    passes' result, the ReLU6 replaced and the float change they made."""
    given = NodeIndex.of(model)  # not the model: the weights the float passes replace can be freed
    check = None
    if eir.default_opset(model) < QDQ_OPSET:
        converted = convert_opset(model, QDQ_OPSET)
        check = OpsetCheck(model, converted, tolerance=config.verify_tolerance)
        model = converted
    _infer_ranks(model)
    model, optimization = _optimize(model, config.target)
    if optimization is not None:
        notes.extend(optimization.refusal_notes())
    _prepare(model)
    check_exclude([given, model], config.exclude)
    notes.extend(vanished_excludes(model, config.exclude))
    rewrite_notes, relu6_replaced, relu6_change = _float_rewrites(model, config, data, memo)
    notes.extend(rewrite_notes)
    return model, check, optimization, relu6_replaced, relu6_change


@register_scheme(Int8Config)
def quantize_int8(model: ir.Model, config: Int8Config, data: Iterable[Batch] | None, *,
                  progress: ProgressCallback | None = None, memo: CalibrationMemo | None = None) -> QuantResult:
    """Int8 QDQ quantization of ``model`` (rewritten in place) calibrated on ``data``. ``memo``: what
    earlier calibrations of the same float model on the same data found (the accuracy search's rounds,
    which differ only in ``config.exclude``); it answers a pass it saw everything of and keeps a new one."""
    notes = [_activation_note(config)]
    logger.info(notes[0])
    model, check, optimization, relu6_replaced, relu6_change = _float_model(model, config, data, memo, notes)
    hooks = [check] if check is not None else []
    rules = MCU_OP_RULES if config.target is Target.MCU else OP_RULES  # the kernels that will run it
    ort = config.target is Target.ORT  # (the C has HardSwish/HardSigmoid kernels of its own)
    no_kernel = without_integer_form(model, config.activations) if ort else {}
    mask_floor = FLOAT_TARGET_MASK_FLOOR if ort else MASK_FLOOR  # ONNX Runtime runs a float Add at no cost
    plan = plan_qdq(model, exclude=config.exclude, quantize_outputs=config.outputs_quantized, rules=rules,
                    no_kernel=no_kernel, mask_floor=mask_floor)
    _check_finite_weights(model, plan)
    extra = _AccuracyHooks(model, plan, config)
    calibration = extra.calibrate(model, data, list(dict.fromkeys([*plan.activations, *extra.tensors])), config,
                                  hooks, progress, memo)
    rounded, extra_notes = extra.apply(model, memo)
    notes.extend(extra_notes)
    if config.calibration is CalibrationMethod.AUTO:
        notes.append(_auto_note(calibration.methods(), plan.activations))
    narrow = without_integer_form(model, config.activations, calibration.ranges()) if ort else {}
    if calibration.non_float & set(plan.activations) or extra.replan or narrow.keys() - no_kernel.keys():
        plan = plan_qdq(model, exclude=config.exclude, non_float=calibration.non_float,
                        quantize_outputs=config.outputs_quantized, rules=rules, no_kernel=no_kernel | narrow,
                        mask_floor=mask_floor)
    notes.extend(_wide_softmax_notes(model, plan.probabilities, config.activations))  # its readers, before Q/DQ
    ranges = calibration.ranges()
    concats = {node.outputs[0].name: node.name for node in model.graph if node.op_type == "Concat"}
    tensors = insert_qdq(model, plan, ranges, config, methods=calibration.methods(), rounded_weights=rounded)
    float_nodes, rewritten = plan.float_nodes, {}
    if ort:
        rewritten, kept = lower_hard_activations(model, config.activations, frozenset(f.node_name for f in float_nodes))
        float_nodes = (*float_nodes, *kept)
    notes.extend(_excluded_float_anyway(model, config.exclude, rules))
    notes.extend(_coarse_concat_notes(concats, plan, ranges, tensors, config.target))
    conversion: OpsetConversion | None = check.result() if check is not None else None
    if conversion is not None:
        notes.append(conversion.note())
    if float_nodes:
        notes.append(f"{count_of(len(float_nodes), 'node stays', 'nodes stay')} float (see float_nodes)")
    if config.fallback is Fallback.FP16 and float_nodes:
        float_nodes, fallback_notes = fp16_fallback(model, float_nodes, data, progress=progress)
        notes.extend(fallback_notes)
    elif config.fallback is Fallback.FP16:
        notes.append("--fallback fp16: every node runs in int8, none computes in float16")
    details = {"calibration": calibration, "plan": plan, "opset_conversion": conversion,
               "activation_format": config.activations.name, "optimization": optimization,
               "relu6_replaced": relu6_replaced, "relu6_float_sqnr_db": relu6_change,
               "rewritten_parts": types.MappingProxyType(rewritten)}
    # named as the CLI's --scheme: uint8 when the user asked for uint8 activations, else int8 (whose
    # activation type follows the target, told in the notes)
    scheme = "uint8" if config.activation_format is not None and config.activation_format.name == "uint8" else "int8"
    return QuantResult(model=model, scheme=scheme, tensors=tensors, float_nodes=tuple(float_nodes),
                       notes=tuple(notes), config=config, details=types.MappingProxyType(details))

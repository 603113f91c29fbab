"""The warnings ``quantize`` gives about the model it wrote: a goal too loose to mean anything, low
fidelity and what to do about it, float nodes the mcu target cannot compile."""

from __future__ import annotations

import math

from edgeopt import ir as eir
from edgeopt.metrics import count_of
from edgeopt.quant.accuracy import RETURNED, RETURNED_TO_8_BITS, AccuracySearch
from edgeopt.quant.compare import CompareResult
from edgeopt.quant.placement import EXCLUDED
from edgeopt.quant.registry import QuantResult

__all__ = ["blocks_c", "clipping_ranges", "loose_goal", "low_fidelity", "mcu_float_warning", "relu6_warning"]

# Output SQNR below this (noise at a tenth of the signal's power) is told as a warning: classifiers
# start to change their top-1 well above it, and a model this far off usually has a cause to fix.
LOW_FIDELITY_DB = 10.0
# --equalize-relu6's change of the float model itself is a warning when the int8 model's output SQNR is
# within this of it: most of the int8 model's error is then that change, not quantization.
RELU6_DOMINATES_DB = 3.0
_KEPT_REASONS = (EXCLUDED, RETURNED, RETURNED_TO_8_BITS)
# An activation losing this much at its own quantization, while its calibrated range leaves out a good part of
# what calibration saw (a quarter of the range's width or more beyond it), is told as clipped by its method.
CLIPPING_LOSS_DB = 10.0
_CLIPPED_SHARE = 0.25


def clipping_ranges(result: QuantResult, fidelity: CompareResult) -> list[str]:
    """A warning when the calibration method's ranges clip activations hard enough to lose CLIPPING_LOSS_DB
    or more each at their own quantization (entropy's KL threshold below a ReLU6's saturated values, say):
    measured, and the setting that keeps those values named."""
    calibration = result.details.get("calibration")
    ranges = {t.name: t for t in result.tensors if t.kind == "activation" and t.method not in ("minmax", "derived")}
    clipped = []
    for row in fidelity.layers:
        info, seen = ranges.get(row.tensor), calibration.tensors.get(row.tensor) if calibration else None
        if row.lost_db is None or not row.lost_db >= CLIPPING_LOSS_DB or info is None or seen is None:
            continue
        (low, high), (seen_low, seen_high) = info.range, seen.minmax.range
        if max(seen_high - high, low - seen_low) >= _CLIPPED_SHARE * (high - low):
            clipped.append((row.lost_db, row.tensor, info.method, (low, high), (seen_low, seen_high)))
    if not clipped:
        return []
    lost, name, method, (low, high), (seen_low, seen_high) = max(clipped, key=lambda item: item[0])
    lost_text = "all" if math.isinf(lost) else f"{lost:.1f} dB"
    return [f"{count_of(len(clipped), 'activation loses', 'activations lose')} {CLIPPING_LOSS_DB:g} dB or more at "
            f"its own quantization where the calibrated range clips values calibration saw: the worst, {name} "
            f"({method}), loses {lost_text} with [{low:.4g}, {high:.4g}] against [{seen_low:.4g}, {seen_high:.4g}] "
            "seen; --calibration percentile (the default) or minmax keeps those values"]


def loose_goal(search: AccuracySearch) -> str | None:
    """A warning when --max-drop is as large as the float model's (positive) score: any model scoring 0 or
    more meets it, the sign of a score in other units than the drop (a fraction, 0.978, with --max-drop 1
    meant as one point of accuracy); and when a score of at most 1 (a fraction?) is given a drop of 0.1 or
    more, ten points of accuracy if it is one (--max-drop 0.5 meant as half a point)."""
    drop, score = search.goal.max_drop, search.float_score
    if drop is None or not math.isfinite(score) or score <= 0:
        return None
    if score > drop and not (score <= 1 and drop >= _FRACTION_DROP):
        return None
    hint = (f"if --eval returns a fraction ({score:.4g} for {score * 100:.4g} %), one point is --max-drop 0.01"
            if score <= 1 else "give the drop in the units of the score")
    if score > drop:
        return (f"--max-drop {drop:g} on a float model scoring {score:.4g} accepts a drop of {drop * 100:.3g} points "
                f"of accuracy if --eval returns a fraction ({score:.4g} for {score * 100:.4g} %): one point is "
                "--max-drop 0.01")
    return (f"--max-drop {drop:g} is as large as the float model's score itself ({score:.4g}): any model scoring 0 "
            f"or more meets it; {hint}")


_FRACTION_DROP = 0.1  # on a score of at most 1: ten points of accuracy if the score is a fraction


def blocks_c(result: QuantResult) -> list:
    """The float nodes edgeopt compile cannot lower: every one but a data-movement op (an Identity
    passing an input on to an output), which the C does as a copy of the int8 values, and those that compute
    from the input's shape alone (PyTorch's zeros initial state of a GRU), which compile folds to constants
    once --input-shape fixes the shapes."""
    from edgeopt.runtime.reference.lower import MOVEMENT_OPS

    folded = eir.shape_derived_values(result.model.graph) if result.model is not None else set()
    nodes = {node.name: node for node in result.model.graph} if result.model is not None else {}
    return [node for node in result.float_nodes
            if _kept(node) or (node.op_type not in MOVEMENT_OPS
                               and not _computes_from_shapes(nodes.get(node.node_name), folded))]


def _computes_from_shapes(node, folded: set[str]) -> bool:
    return node is not None and bool(node.outputs) and all(value.name in folded for value in node.outputs)


def _kept(node) -> bool:
    """Whether the user (--exclude) or the accuracy search kept this node float."""
    return node.reason.startswith(_KEPT_REASONS)


def relu6_warning(result: QuantResult, fidelity: CompareResult) -> list[str]:
    """A warning when most of the int8 model's error is --equalize-relu6's change of the float model."""
    change = result.details.get("relu6_float_sqnr_db")
    measured = [row.sqnr_db for row in fidelity.outputs if row.signal and math.isfinite(row.sqnr_db)]
    if change is None or not measured or change > min(measured) + RELU6_DOMINATES_DB:
        return []
    return [f"most of the int8 model's error is --equalize-relu6's change of the float model itself: its outputs "
            f"are at {change:.1f} dB SQNR against the original's, the int8 model's at {min(measured):.1f} dB; "
            "--equalize keeps the float model"]


def mcu_float_warning(float_nodes) -> str:
    """What float nodes mean for the mcu target: no C (compile lowers all-int8 models only), and why."""
    names = [f.node_name for f in float_nodes]
    listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    text = (f"{count_of(len(names), 'node stays', 'nodes stay')} float ({listed}): "
            "edgeopt compile lowers all-int8 models only, so this model runs in ONNX Runtime but cannot become C")
    if any(_kept(f) for f in float_nodes):
        text += "; drop --exclude (or the accuracy goal) for the mcu target"
    if any(f.op_type in ("Loop", "Scan") for f in float_nodes):
        text += ("; a Loop or Scan (a recurrent layer a converter wrote as control flow, as tf2onnx does for Keras "
                 "3's) has no C kernel: export it as an ONNX LSTM, GRU or RNN op (tf2onnx writes one for Keras 2's "
                 "layers, Keras 3's model.export(format='onnx') for an LSTM)")
    return text


def mcu_lowering_refusal(result: QuantResult) -> str | None:
    """For the mcu target with no float node: what ``edgeopt compile`` would still refuse (an ArgMax of the
    class scores reads them dequantized and writes integers, so it is no float node, and has no C kernel),
    found by lowering the model as compile does; None when it lowers."""
    from edgeopt.errors import UnsupportedOpError
    from edgeopt.runtime.reference import lower

    try:
        lower(result.model.clone())
    except UnsupportedOpError as error:
        return f"edgeopt compile will refuse this model: {error}"
    except Exception:  # anything else compile reports itself: a warning must not fail quantize
        return None
    return None


def low_fidelity(result: QuantResult, fidelity: CompareResult, where: str) -> list[str]:
    """A warning for each output whose SQNR against the float model is below LOW_FIDELITY_DB, with
    what to do about it (and the cause when edgeopt made one: ReLU6 turned into ReLU)."""
    warnings = []
    for row in fidelity.outputs:
        if not row.sqnr_db < LOW_FIDELITY_DB or not row.signal:  # NaN: told above; class indices: agreement
            continue
        text = (f"output {row.name}: SQNR {row.sqnr_db:.1f} dB against the float model on {where} "
                f"(below {LOW_FIDELITY_DB:g} dB: the {result.scheme} model's outputs are far from the float "
                "model's)")
        replaced = result.details.get("relu6_replaced", ())
        if replaced:
            text += (f"; --equalize-relu6 turned {len(replaced)} ReLU6 into ReLU, which changes the float model "
                     "itself wherever a value exceeds 6: try --equalize instead")
        elif result.scheme in ("int8", "uint8"):
            from edgeopt.quant import Int8Config

            config = result.config
            rounds = not (isinstance(config, Int8Config) and (config.gptq or config.adaround))
            text += ("; `edgeopt compare` shows the layers where the error arises, "
                     + ("--gptq rounds the weights for the least output error, " if rounds else "")
                     + "and --min-sqnr DB or --exclude returns the worst to float")
        elif result.scheme == "int4":
            text += ("; `edgeopt compare` shows the layers where the error arises, and --min-sqnr DB or --exclude "
                     "returns the worst to float")
        else:  # fp16 keeps the nodes of out-of-range weights and (with data) activations float32 already
            text += ("; `edgeopt compare` shows the layers where the error arises, and --exclude keeps the nodes "
                     "you name in float32")
        warnings.append(text)
    return warnings

"""Accuracy-aware int8 (and int4 weight-only, and dynamic int8): put the most damaging layers back in float
until the metric is within budget.

The metric is either the user's (``evaluate(model) -> score``, higher is
better; the goal is ``float_score - score <= max_drop``) or, without labels,
the lowest output SQNR of the quantized model against the float model on the
calibration data, or on held-out samples when given (goal ``sqnr >= min_sqnr_db``).

Each round quantizes with the current exclusion set, measures the metric, and
if it misses the goal measures every quantized activation against the float
model (:func:`edgeopt.quant.compare.compare_models`). The damage a node does is
measured, not guessed: the decibels of fidelity lost inside that node
(:mod:`edgeopt.quant.accuracy_damage`: the SQNR of its quantized inputs minus the
SQNR of its output for a node reading a quantized weight; for one reading none,
only what its output's Q/DQ pair rounds off what it computed, as compare's "lost
dB": the error a LayerNorm scales up came in with its input). The node with the
largest damage goes back to float and the next round starts. The loop ends
when the goal is met, the time budget would be exceeded by another round, or
no quantized node is left; the best model seen is returned either way, with
every step and its reason. The float side of every round's comparison is the
same: the float model runs once per sample (:class:`FloatReference`). A
Ctrl-C keeps the best model of the rounds scored so far.

Once the goal is met with several nodes back in float, each of them is tried
in int8 (int4) again, earliest first (a node that looked worst early may have changed
nothing: the damage was downstream of a node returned later): one that the
goal holds without runs in int8 (int4) again. The model returned is then the one
meeting the goal with the fewest float nodes. With int4's 8-bit fallback
(``Int4WeightConfig(fallback="int8")``) a layer the search takes out of int4
goes to 8 bits instead of float, and the search ends when none is left in int4. Dynamic int8
(``DynamicInt8Config``) ranks its layers as int4 does: by the noise each adds inside (its rows matched by
name), its MatMul/Gemm, embedding tables and LSTMs alike.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from edgeopt import ir as eir
from edgeopt._scalars import is_integer, is_number, plain_fields
from edgeopt.errors import ConfigError, EdgeoptError, Interrupted, ModelError
from edgeopt.metrics import count_of, json_number
from edgeopt.quant.calibration_memo import CalibrationMemo
from edgeopt.quant.compare import CompareResult, compare_models
from edgeopt.quant.config import Fallback, Int8Config
from edgeopt.quant.dynamic import DynamicInt8Config, quantize_dynamic_int8, warn_mostly_float
from edgeopt.quant.fallback import fallback_part
from edgeopt.quant.float_reference import FloatReference
from edgeopt.quant.int4 import Int4WeightConfig, WeightFallback, quantize_int4
from edgeopt.quant.int4_rounding import Int4Memo
from edgeopt.quant.accuracy_damage import (
    DATA_MOVEMENT_LEFT,
    Candidate,
    node_damage,
    quantized_readers,
    weight_damage,
)
from edgeopt.quant.float16 import FLOAT_PASSES
from edgeopt.quant.int8 import quantize_int8
from edgeopt.quant.model_checks import NodeIndex, check_exclude, vanished_excludes
from edgeopt.quant.registry import FloatNode, QuantResult

__all__ = ["RETURNED", "RETURNED_TO_8_BITS", "AccuracyGoal", "AccuracySearch", "AccuracyStep",
           "accuracy_aware_quantize"]

logger = logging.getLogger(__name__)

#: The reason a node the search returned to float stays float,
RETURNED = "returned to float by the accuracy search"
#: and an int4 layer's, with the 8-bit fallback, that stays in 8 bits.
RETURNED_TO_8_BITS = "taken out of int4 into 8 bits by the accuracy search"

Evaluate = Callable[[ir.Model], float]
_Best = tuple[float, QuantResult, tuple[str, ...]]  # a round's score, result and the nodes it returned

# Samples of the calibration data used to measure per-layer and output SQNR each round.
FIDELITY_SAMPLES = 64


@dataclass(frozen=True, kw_only=True)
class AccuracyGoal:
    """Exactly one of ``max_drop`` (score points, needs an evaluate function) or ``min_sqnr_db``."""

    max_drop: float | None = None
    min_sqnr_db: float | None = None
    time_budget_s: float = 600.0
    max_float_nodes: int = 32

    def __post_init__(self) -> None:
        plain_fields(self)
        if (self.max_drop is None) == (self.min_sqnr_db is None):
            raise ConfigError("give exactly one accuracy goal: max_drop (--max-drop, with an evaluate function: "
                              "--eval) or min_sqnr_db (--min-sqnr)")
        for key, value, option in (("max_drop", self.max_drop, "--max-drop"),
                                   ("min_sqnr_db", self.min_sqnr_db, "--min-sqnr")):
            if value is not None and (not is_number(value) or not math.isfinite(value) or value < 0):
                raise ConfigError(f"{key} ({option}) must be a finite number >= 0, got {value!r}")
        if not is_number(self.time_budget_s) or not self.time_budget_s > 0:
            raise ConfigError(f"time_budget_s must be a positive number of seconds, got {self.time_budget_s!r} "
                              "(the CLI's --time-budget 10m is 600)")
        if not is_integer(self.max_float_nodes) or self.max_float_nodes < 1:
            raise ConfigError(f"max_float_nodes must be an integer >= 1, got {self.max_float_nodes!r}")

    def met(self, score: float, float_score: float) -> bool:
        if self.max_drop is not None:  # 0.93 - 0.92 is 0.010000000000000009: the subtraction's rounding is no drop
            return float_score - score <= self.max_drop + 1e-9 * max(abs(float_score), abs(score))
        return score >= self.min_sqnr_db

    def score_text(self, score: float) -> str:
        """``score`` with 3 decimals, or as many as show a step of ``max_drop`` (a loss moving by 1e-4)."""
        digits = 3
        if self.max_drop and math.isfinite(score):
            digits = max(3, math.ceil(-math.log10(self.max_drop)) + 1)
        return f"{score:.{digits}f}"

    def describe(self) -> str:
        if self.max_drop is not None:
            return f"accuracy drop <= {self.max_drop:g}"
        return f"output SQNR >= {self.min_sqnr_db:g} dB"


@dataclass(frozen=True, kw_only=True)
class AccuracyStep:
    """One round: the score with the nodes excluded so far, and the node chosen next (if any)."""

    excluded: tuple[str, ...]
    score: float
    seconds: float
    next_node: str | None = None
    next_op_type: str | None = None
    reason: str | None = None
    # returned with next_node: the other readers of the quantized output of the float node it reads (a
    # LayerNorm's Q, K and V): that tensor stays quantized until every reader computes in float
    also_returned: tuple[str, ...] = ()
    # a pruning round: this node was tried in int8 (an int4 search: int4) again (``excluded`` without it)
    retried: str | None = None
    # ... and the quantizer kept it float all the same (a float node reads its output): the quantizer's reason
    still_float: str | None = None

    @property
    def returned(self) -> tuple[str, ...]:
        """The nodes this round sends back to float for the next one."""
        return (self.next_node, *self.also_returned) if self.next_node else ()

    def to_dict(self) -> dict:
        return {"excluded": list(self.excluded), "score": json_number(self.score), "seconds": self.seconds,
                "next_node": self.next_node, "next_op_type": self.next_op_type, "reason": self.reason,
                "also_returned": list(self.also_returned), "retried": self.retried,
                "retried_in_int8": self.retried,  # the first name, kept for readers of int8 reports
                "still_float": self.still_float}


@dataclass(frozen=True, kw_only=True)
class AccuracySearch:
    """The best model found, the goal, and how the search went."""

    result: QuantResult
    goal: AccuracyGoal
    float_score: float
    best_score: float
    best_excluded: tuple[str, ...]
    met: bool
    steps: tuple[AccuracyStep, ...]
    stopped_because: str
    calibration_passes: int = 1  # over the data, for all the rounds (one unless a round needed a new tensor)
    interrupted: bool = False  # by Ctrl-C: the best of the rounds scored before it
    returned_to: str = "float"  # where the nodes taken out of int8 (int4) go: "float", or int4's "8 bits"
    measured_on: str = "calibration"  # the data the rounds were compared on: "calibration", or "held-out"

    @property
    def kept_where(self) -> str:
        """Where the nodes it took out of int8 (int4) are: "back in float", or "in 8 bits"."""
        return _kept_where(self.returned_to)

    def to_dict(self) -> dict:
        return {"goal": self.goal.describe(), "float_score": json_number(self.float_score),
                "best_score": json_number(self.best_score),
                "met": self.met, "float_nodes_added": list(self.best_excluded), "returned_to": self.returned_to,
                "stopped_because": self.stopped_because, "interrupted": self.interrupted,
                "calibration_passes": self.calibration_passes, "measured_on": self.measured_on,
                "steps": [s.to_dict() for s in self.steps]}


def _kept_where(returned_to: str) -> str:
    """Where the nodes the search took out of int8 (int4) are: "back in float", or "in 8 bits"."""
    return "back in float" if returned_to == "float" else f"in {returned_to}"


def _base_model(model: ir.Model, config: Int8Config | Int4WeightConfig | None = None) -> tuple[ir.Model, list[str]]:
    """The optimized float model, named as the quantizer will name it, so exclusions refer to real nodes
    (int4: after the weight-only passes, where a MatMul stays a MatMul for MatMulNBits to replace); and the
    weight-only passes' note on what they did (the rounds, quantizing ``base``, find nothing left to do)."""
    from edgeopt.passes import optimize_for_quantization
    from edgeopt.quant.float16 import weight_only_float_passes
    from edgeopt.quant.int8 import QDQ_OPSET
    from edgeopt.quant.opset import convert_opset

    if isinstance(config, (Int4WeightConfig, DynamicInt8Config)):
        base = model.clone()
        notes = [note for note in weight_only_float_passes(base, config.exclude, run=config.float_passes,
                                                           subgraphs=True) if note.startswith(FLOAT_PASSES)]
        # typed, as a loaded model is: the rounds' tensors are matched by name to its float ones
        eir.infer_shapes(base)
    else:
        base = convert_opset(model, QDQ_OPSET) if eir.default_opset(model) < QDQ_OPSET else model.clone()
        base, notes = optimize_for_quantization(base).model, []
    common_passes.NameFixPass()(base)
    return base, notes


def _output_sqnr(comparison: CompareResult) -> float:
    """The worst SQNR of the outputs it measures (an ArgMax's class indices are not a signal)."""
    worst = comparison.worst_output_sqnr()
    return -math.inf if worst is None else worst


def _all_float(model: ir.Model, config: Int4WeightConfig | DynamicInt8Config, scheme: str) -> QuantResult:
    """An int4 (dynamic int8) round with every layer back in float: the float model, its layers listed as
    excluded."""
    float_nodes = tuple(FloatNode(node.name, node.op_type, "excluded by config") for node in model.graph.all_nodes()
                        if node.name in config.exclude)
    return QuantResult(model=model, scheme=scheme, tensors=(), float_nodes=float_nodes,
                       notes=("every layer is back in float: the model is the float model",), config=config)


class _Search:
    """The state of one search: the base model, the data, the metric, the clock; the best round so far
    (score, result, nodes returned) and every step, kept here so a Ctrl-C loses none of them."""

    def __init__(self, base: ir.Model, config: Int8Config | Int4WeightConfig, data: Iterable, goal: AccuracyGoal,
                 evaluate: Evaluate | None, measure_data: Iterable | None = None) -> None:
        self.base, self.config, self.data, self.goal, self.evaluate = base, config, data, goal, evaluate
        self.measure_data = data if measure_data is None else measure_data  # what each round is compared on
        # what a node runs in, if not float
        self.scheme = ("int4" if isinstance(config, Int4WeightConfig) else "int8-dynamic"
                       if isinstance(config, DynamicInt8Config) else "int8")
        self.weight_layers = isinstance(config, (Int4WeightConfig, DynamicInt8Config))  # ranked by weight_damage
        self.to_8_bits = isinstance(config, Int4WeightConfig) and config.fallback is WeightFallback.INT8
        self.returned_to = "8 bits" if self.to_8_bits else "float"
        self.none_left = ("no layer left in int4 to hold in 8 bits" if self.to_8_bits
                          else "no quantized node left to return to float")
        self.dynamic_passes = 0  # SmoothQuant's, one per dynamic int8 round
        self.started = time.monotonic()
        self.memo = CalibrationMemo()  # the rounds differ only in what is excluded: one calibration serves them
        self.int4_memo = Int4Memo()  # (int4: the weights quantized and the input statistics, likewise)
        self.float_reference = FloatReference(base)  # and the float side of every round's comparison is the same
        self.best: _Best | None = None
        self.steps: list[AccuracyStep] = []

    def quantize(self, excluded: tuple[str, ...]) -> QuantResult:
        config = replace(self.config, exclude=tuple(dict.fromkeys(self.config.exclude + excluded)))
        if not self.weight_layers:
            return quantize_int8(self.base.clone(), config, self.data, memo=self.memo)
        try:  # (not by the layers the first round held in int4: 8-bit tables may remain, or go with them)
            result = (quantize_int4(self.base.clone(), config, self.data, memo=self.int4_memo)
                      if isinstance(config, Int4WeightConfig) else self._quantize_dynamic(config))
        except ModelError:
            if not self.steps:  # the first round's refusal is the model's
                raise
            # what int4 (dynamic int8) refuses once layers are back in float: nothing left to quantize
            return _all_float(self.base.clone(), config, self.scheme)
        return result

    def _quantize_dynamic(self, config: DynamicInt8Config) -> QuantResult:
        """A dynamic int8 round; SmoothQuant's calibration pass is counted (each round runs one)."""
        self.dynamic_passes += config.smoothquant_alpha is not None
        return quantize_dynamic_int8(self.base.clone(), config, self.data, warn=False)  # of the best only

    def candidates(self, result: QuantResult, comparison: CompareResult,
                   excluded: tuple[str, ...]) -> list[Candidate]:
        """The nodes not ``excluded`` yet to return to float, most damaging first."""
        if self.weight_layers:
            return [c for c in weight_damage(self.base, result, comparison) if c.node.name not in excluded]
        found = [c for c in node_damage(result, comparison) if c.node.name not in excluded]
        return found or [c for c in quantized_readers(result) if c.node.name not in excluded]

    def compare(self, result: QuantResult) -> CompareResult:
        # a round left all float is compared as the final fidelity check compares it: against a session of the
        # float model as is, not the reference's, whose exposed tensors make ONNX Runtime fuse another graph
        # (~140 dB apart: a 200 dB goal went unmet by the float model itself, measured inf once written)
        reference = self.float_reference if result.tensors else None
        return compare_models(self.base, result.model, self.measure_data, max_samples=FIDELITY_SAMPLES,
                              float_reference=reference, float_twins=False)  # (not what it ranks layers by)

    def score(self, quant_model: ir.Model, comparison: CompareResult) -> float:
        if self.evaluate is not None:
            return self.evaluate(quant_model)
        if not any(output.signal for output in comparison.outputs):
            # no round could meet the goal: every node would go back to float for nothing
            names = ", ".join(output.name for output in comparison.outputs)
            raise ConfigError(f"--min-sqnr measures float outputs, and every output of the model ({names}) is "
                              "integer (class indices are judged by agreement, not SQNR): use --max-drop with "
                              "--eval, or give the model its float scores as an output")
        return _output_sqnr(comparison)

    @property
    def calibration_passes(self) -> int:
        """Passes over the data that quantized: int8's rounds share theirs, and with ``--fallback fp16`` each
        reads it again for the float16 range check; int4's share theirs too (but for GPTQ input correlations
        too large for one pass, which each round reads again)."""
        if isinstance(self.config, Int4WeightConfig):
            return self.int4_memo.passes
        if isinstance(self.config, DynamicInt8Config):
            return self.dynamic_passes
        return self.memo.passes + (len(self.steps) if self.config.fallback is Fallback.FP16 else 0)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def accuracy_aware_quantize(model: ir.Model, config: Int8Config | Int4WeightConfig, data: Iterable,
                            goal: AccuracyGoal, *,
                            evaluate: Evaluate | None = None,
                            progress: Callable[[int, int | None], None] | None = None,
                            measure_data: Iterable | None = None) -> AccuracySearch:
    """Int8-quantize ``model`` (or int4: an ``Int4WeightConfig``), returning float the most damaging nodes
    until ``goal`` is met (int4: the MatMul/Gemm layers losing the most dB inside, their rows matched by name).

    ``data`` must be re-iterable (a data source or a list): every round
    measures on it; the first calibrates on it, and a later round only when it
    needs a tensor no earlier pass observed (:class:`CalibrationMemo`). ``evaluate(model) -> score`` is required
    for ``goal.max_drop``. ``measure_data`` (re-iterable too): held-out samples to compare each round on
    instead of ``data``, so that the output SQNR of a ``min_sqnr_db`` goal, and the ranking of the nodes, is
    not measured on the samples the ranges were fitted to (which flatters it: a BERT-style encoder at 42.98 dB
    there was at 37.27 dB on other samples).

    A KeyboardInterrupt (Ctrl-C) once a round has been scored raises :class:`~edgeopt.errors.Interrupted`
    whose ``partial`` is the search so far (``interrupted`` True, the best model found); before that, the
    KeyboardInterrupt goes on as it came. An error in a later round (``evaluate`` raising, or returning no
    finite score, for one candidate) ends the search there with the best model found, saying so in
    ``stopped_because`` and a warning: the rounds already scored are kept.
    """
    if goal.max_drop is not None and evaluate is None:
        raise ConfigError("--max-drop needs --eval module:function to score a model")
    base, pass_notes = _base_model(model, config)
    config, vanished = _excludes_of_base(model, base, config)
    search = _Search(base, config, data, goal, evaluate, measure_data)
    float_score = evaluate(search.base) if evaluate is not None else math.inf
    try:
        stopped, interrupted = _search(search, float_score, progress), False
    except KeyboardInterrupt:
        if search.best is None:
            raise
        stopped, interrupted = _interrupted_text(search, float_score), True
    except EdgeoptError as error:  # one candidate the --eval function failed on: the rounds scored are kept
        if search.best is None:
            raise
        stopped, interrupted = _failed_text(search, float_score, error), False
        logger.warning("the accuracy search stopped at round %d, which failed (%s): the best model of the %s "
                       "before it is returned", len(search.steps), error,
                       count_of(len(search.steps), "round", "rounds"))
    best_score, best_result, best_excluded = search.best
    returned = _why_returned(search.steps, [name for name in best_excluded if name not in config.exclude], goal,
                             float_score, search.scheme, RETURNED_TO_8_BITS if search.to_8_bits else RETURNED)
    found = AccuracySearch(result=_labelled(best_result, returned, vanished, pass_notes), goal=goal,
                           float_score=float_score, best_score=best_score, best_excluded=best_excluded,
                           met=goal.met(best_score, float_score), steps=tuple(search.steps), stopped_because=stopped,
                           calibration_passes=search.calibration_passes, interrupted=interrupted,
                           returned_to=search.returned_to,
                           measured_on="calibration" if measure_data is None else "held-out")
    if isinstance(config, DynamicInt8Config):
        warn_mostly_float(found.result)
    if interrupted:
        raise Interrupted(found)
    return found


def _search(search: _Search, float_score: float, progress: Callable[[int, int | None], None] | None) -> str:
    """The rounds, then the retrying in int8 (int4) of the nodes they returned once the goal is met; why it
    stopped."""
    stopped = _rounds(search, float_score, progress)
    if search.goal.met(search.best[0], float_score) and len(search.best[2]) > 1:
        pruned = _prune(search, float_score)
        still_float = {f.node_name for f in search.best[1].float_nodes}
        running = [name for name in pruned if name not in still_float]
        if running:
            stopped += (f"; {len(running)} of the nodes returned to {search.returned_to} changed too little and "
                        f"run {search.scheme} again")
        if kept_float := len(pruned) - len(running):
            stopped += (f"; {kept_float} more changed too little to stay returned, but the quantizer keeps "
                        f"{'it' if kept_float == 1 else 'them'} float all the same (a float node reads the output; "
                        "see the float nodes)")
    return stopped


def _interrupted_text(search: _Search, float_score: float) -> str:
    rounds = count_of(len(search.steps), "round", "rounds")
    if search.goal.met(search.best[0], float_score):  # the retrying in int8 (int4) of the nodes returned
        return f"goal met ({search.goal.describe()}), then interrupted after {rounds} while retrying in " \
               f"{search.scheme} the nodes returned to {search.returned_to}"
    return f"interrupted after {rounds}"


def _failed_text(search: _Search, float_score: float, error: EdgeoptError) -> str:
    failed = f"round {len(search.steps)} failed: {error}"
    if search.goal.met(search.best[0], float_score):  # in the retrying in int8 (int4) of the nodes returned
        return f"goal met ({search.goal.describe()}), then {failed}"
    return failed


def _rounds(search: _Search, float_score: float, progress: Callable[[int, int | None], None] | None) -> str:
    """The search's rounds: quantize with the nodes returned so far, score, and return the most damaging
    node left, until the goal is met, no node is left, or the time budget would run out. Each round goes
    to ``search.steps`` and the best one to ``search.best``; why it stopped."""
    goal, steps = search.goal, search.steps
    excluded: tuple[str, ...] = ()
    movement: set[str] = set()  # data movement returned with its float neighbours: not counted in max_float_nodes
    while True:
        round_start = time.monotonic()
        result = search.quantize(excluded)
        comparison = search.compare(result)
        score = search.score(result.model, comparison)
        # the round is recorded with its score at once: a Ctrl-C from here on keeps it among the steps
        steps.append(AccuracyStep(excluded=excluded, score=score, seconds=time.monotonic() - round_start))
        if search.best is None or score > search.best[0]:
            search.best = (score, result, excluded)
        if progress is not None:
            progress(len(steps), None)
        if goal.met(score, float_score):
            return f"goal met ({goal.describe()})"
        candidates = search.candidates(result, comparison, excluded)
        round_seconds = time.monotonic() - round_start
        counted = len(excluded) - len(movement)
        if not candidates or counted >= goal.max_float_nodes:
            steps[-1] = replace(steps[-1], seconds=round_seconds)
            return (search.none_left if not candidates
                    else f"{count_of(goal.max_float_nodes, 'node', 'nodes')} already "
                         f"{_kept_where(search.returned_to)} (the search's limit: --max-float-nodes)")
        first, *others = _returned_together(candidates, goal.max_float_nodes - counted)
        if first.through == DATA_MOVEMENT_LEFT:
            movement.update(c.node.name for c in (first, *others))
        steps[-1] = replace(steps[-1], seconds=round_seconds, next_node=first.node.name,
                            next_op_type=first.node.op_type, reason=first.reason,
                            also_returned=tuple(c.node.name for c in others))
        if search.elapsed() + round_seconds > goal.time_budget_s:
            return f"time budget of {goal.time_budget_s:g} s would be exceeded by another round"
        logger.info("score %.3f misses the goal; returning %s to float: %s", score, steps[-1].returned,
                    first.reason)
        excluded = excluded + steps[-1].returned


def _returned_together(candidates: list[Candidate], room: int) -> list[Candidate]:
    """The most damaging candidate, with the other readers of the float node's quantized output it reads
    (at most ``room`` in all): returning one reader alone leaves that tensor quantized for the others. The
    data movement still quantized between float nodes goes back all at once, whatever the room (it is not
    counted: it computes nothing)."""
    first = candidates[0]
    if first.through is None:
        return [first]
    together = [first, *[c for c in candidates[1:] if c.through == first.through]]
    return together if first.through == DATA_MOVEMENT_LEFT else together[:room]


def _prune(search: _Search, float_score: float) -> list[str]:
    """Try each node of the goal-meeting ``search.best`` in int8 (int4) again, earliest first, keeping it there
    when the goal still holds; within the time budget. ``search.best`` becomes the goal-meeting round with the
    fewest float nodes; the nodes given back to the quantizer (which keeps one float all the same while a float
    node reads its output: one returned after it, until that one is retried too)."""
    pruned = []
    met_by = next(step for step in search.steps if step.returned and step.excluded + step.returned == search.best[2])
    # one by one, data movement too: a run of it returned together and retried together stayed float whole where
    # one by one all but one went back (a ViT: 37 nodes float against 2, for half the rounds)
    for node_name in search.best[2][:len(met_by.excluded)]:  # the last ones returned are what met the goal
        if search.elapsed() + search.steps[-1].seconds > search.goal.time_budget_s:
            logger.warning("the time budget ended the retrying of float nodes in %s before %s: the model "
                           "keeps it and the nodes after it in float", search.scheme, node_name)
            break
        round_start = time.monotonic()
        trial = tuple(name for name in search.best[2] if name != node_name)
        result = search.quantize(trial)
        score = search.score(result.model, search.compare(result))
        still_float = next((f.reason for f in result.float_nodes if f.node_name == node_name), None)
        search.steps.append(AccuracyStep(excluded=trial, score=score, seconds=time.monotonic() - round_start,
                                         retried=node_name, still_float=still_float))
        if search.goal.met(score, float_score):
            logger.info("goal still met with %s in %s again (%.3f)", node_name, search.scheme, score)
            search.best = (score, result, trial)
            pruned.append(node_name)
    return pruned


def _excludes_of_base(model: ir.Model, base: ir.Model,
                      config: Int8Config | Int4WeightConfig) -> tuple[Int8Config | Int4WeightConfig, list[str]]:
    """``config`` with the exclude entries the float passes removed from ``base`` left out (the rounds
    quantize ``base``), and the notes saying so. An entry must name a node or op type of the user's
    model or of ``base``: a BatchNormalization folded into its conv is a node of the user's file."""
    # int4 and dynamic int8 quantize If branches and Loop/Scan bodies too
    subgraphs = isinstance(config, (Int4WeightConfig, DynamicInt8Config))
    check_exclude([NodeIndex.of(each, subgraphs=subgraphs) for each in (model, base)], config.exclude)
    index = NodeIndex.of(base, subgraphs=subgraphs)
    kept = tuple(entry for entry in config.exclude if entry in {*index.names, *index.op_types})
    return replace(config, exclude=kept), vanished_excludes(base, config.exclude, subgraphs=subgraphs)


def _why_returned(steps: list[AccuracyStep], returned: list[str], goal: AccuracyGoal,
                  float_score: float, scheme: str = "int8", kind: str = RETURNED) -> dict[str, str]:
    """The reason each node the search returned stays float: :data:`RETURNED`, then what was measured when
    it was chosen and, when it was tried in ``scheme`` again, the score that missed the goal."""
    reasons = {}
    for name in returned:
        chosen = next((index, step) for index, step in enumerate(steps) if name in step.returned)
        why = [f"round {chosen[0]}: {chosen[1].reason}"]
        retried = next((step for step in steps if step.retried == name), None)
        met = next((step for index, step in enumerate(steps) if not step.retried and name in step.excluded
                    and index and name in steps[index - 1].returned and goal.met(step.score, float_score)), None)
        if retried is not None:
            why.append(f"in {scheme} again the score was {goal.score_text(retried.score)}, missing {goal.describe()}")
        elif met is not None:  # the last one returned: it met the goal, and is not tried again
            where = "8 bits" if kind == RETURNED_TO_8_BITS else "float"
            why.append(f"with it in {where} the score reached {goal.score_text(met.score)}, meeting {goal.describe()}")
        reasons[name] = f"{kind} ({'; '.join(why)})"
    return reasons


def _labelled(result: QuantResult, returned: Mapping[str, str], vanished: list[str],
              pass_notes: Sequence[str] = ()) -> QuantResult:
    """``result`` with the nodes the search returned to float saying so and why (they went through
    exclude), and the notes of exclude entries the float passes removed, where quantizing the user's
    model puts them: after the activation note and the float passes' refusals. ``pass_notes``: what the
    weight-only float passes did to the user's model, in place of the round's "nothing to fold"."""
    float_nodes = tuple(f._replace(reason=returned[f.node_name] + fallback_part(f.reason)) if f.node_name in returned
                        else f for f in result.float_nodes)
    optimization = result.details.get("optimization")
    at = 1 + (len(optimization.refusal_notes()) if optimization is not None else 0)
    notes = tuple(_as_returned(note, returned) for note in (*result.notes[:at], *vanished, *result.notes[at:]))
    if pass_notes:
        notes = tuple(pass_notes[0] if note.startswith(FLOAT_PASSES) else note for note in notes)
    return replace(result, float_nodes=float_nodes, notes=notes)


def _as_returned(note: str, returned: Mapping[str, str]) -> str:
    """A note the quantizer wrote of an excluded node, ``--exclude NAME: ...``, saying that the search returned
    it when it did (the user gave no --exclude)."""
    head, colon, rest = note.partition(": ")
    name = head.removeprefix("--exclude ") if head.startswith("--exclude ") else None
    return f"returned to float by the accuracy search, {name}: {rest}" if name in returned and colon else note

"""Quantize a model and measure what it cost: ``quantize``."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.api._common import (ModelSource, Progress, calibration_source, check_flag, check_path, check_progress,
                                 check_type, comparable_float, issue_warnings, load, logged_warnings, model_source)
from edgeopt.api._artifact import (check_writable_artifact, report_path, stale_weights, write_quantized,
                                   written_files)
from edgeopt.api._quantize_warnings import (blocks_c, clipping_ranges, loose_goal, low_fidelity, mcu_float_warning,
                                            mcu_lowering_refusal, relu6_warning)
from edgeopt.api._terms import python_terms
from edgeopt.data import ImagePreprocess, batch_rows
from edgeopt.errors import ConfigError, DataError, EdgeoptError, Interrupted, OutputError
from edgeopt.io import FILE_BYTES_KEY, external_data_path, model_file_bytes, model_file_contents, model_files
from edgeopt.metrics import count_of
from edgeopt.quant.accuracy import FIDELITY_SAMPLES, AccuracyGoal, AccuracySearch, accuracy_aware_quantize
from edgeopt.quant.compare import CompareResult
from edgeopt.quant.registry import Batch, QuantResult
from edgeopt.quant.speed import SpeedCheck

__all__ = ["QuantizeReport", "quantize"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- quantize


MIN_CALIBRATION_SAMPLES = 16


@dataclass(frozen=True, kw_only=True)
class QuantizeReport:
    """A quantized model, where it was written, and what it measured."""

    result: QuantResult
    output: Path | None
    float_bytes: int
    quant_bytes: int
    calibration_samples: int  # samples (rows of the batches)
    calibration_batches: int = 0
    fidelity: CompareResult | None = None
    # the samples the fidelity check ran on: "calibration" (--data, which the scheme fitted to), "held-out"
    # (--eval-data), or "data" (--data, which the scheme fitted nothing to: int8-dynamic without SmoothQuant)
    fidelity_on: str = "calibration"
    speed: SpeedCheck | None = None
    search: AccuracySearch | None = None
    warnings: tuple[str, ...] = ()
    eval_samples: int | None = None  # the samples --eval-data holds, when its source knows (fidelity reads 64)

    @property
    def model(self) -> ir.Model:
        return self.result.model

    @property
    def interrupted(self) -> bool:
        """Whether a Ctrl-C stopped the accuracy search (or the checks after it): the model is its best so far."""
        return self.search is not None and self.search.interrupted

    def save(self, path: str | os.PathLike) -> QuantizeReport:
        """Write the model to ``path`` as ``quantize(output=path)`` does (atomically, without shape
        annotations, its weights beside it past 2 GB) with its numbers in the report file beside it;
        returns the report naming that output."""
        check_path(path, "path", optional=False)
        check_writable_artifact(path)
        saved = dataclasses.replace(self, output=Path(path))
        write_quantized(saved, written_files(self.model, path))
        return saved

    def __repr__(self) -> str:  # the dataclass's repr holds the whole graph: tens of kilobytes
        fidelity = self.fidelity.worst_output_sqnr() if self.fidelity is not None else None
        sqnr = f", output SQNR {fidelity:.2f} dB" if fidelity is not None else ""
        return (f"QuantizeReport(scheme={self.result.scheme!r}, output={str(self.output) if self.output else None!r}, "
                f"{self.float_bytes} -> {self.quant_bytes} bytes, {len(self.result.float_nodes)} float nodes{sqnr}, "
                f"{len(self.warnings)} warnings)")

    def to_dict(self) -> dict:
        result = self.result
        return {
            "scheme": result.scheme, "output": str(self.output) if self.output else None,
            "float_bytes": self.float_bytes, "quant_bytes": self.quant_bytes,
            "calibration_samples": self.calibration_samples, "calibration_batches": self.calibration_batches,
            "notes": list(result.notes), "warnings": list(self.warnings),
            "float_nodes": [{"node": f.node_name, "op_type": f.op_type, "reason": f.reason}
                            for f in result.float_nodes],
            "fidelity": self.fidelity.to_dict() if self.fidelity else None,
            "fidelity_on": self.fidelity_on if self.fidelity else None, "eval_samples": self.eval_samples,
            "speed": self.speed.to_dict() if self.speed else None,
            "accuracy_search": self.search.to_dict() if self.search else None,
            "tensors": [{"name": t.name, "kind": t.kind, "op_type": t.op_type, "format": t.format,
                         "range": list(t.range), "scale": list(t.scale[:8]), "zero_point": list(t.zero_point[:8]),
                         "method": t.method} for t in result.tensors],
        }


class _CountingSource:
    """Pass batches through and count them and their samples (the leading dim of a batch's first
    array), for the report and the too-few warning: the most of any pass (the accuracy search's
    later passes stop at the fidelity check's 64)."""

    def __init__(self, source) -> None:
        self._source = source
        self.count = self.samples = 0
        self.num_samples = getattr(source, "num_samples", None)
        self._spans: dict[str, tuple[float, float]] = {}  # float input -> least and greatest value seen

    def __iter__(self):
        count = samples = 0
        for batch in self._source:
            count, samples = count + 1, samples + batch_rows(batch)
            self.count, self.samples = max(self.count, count), max(self.samples, samples)
            for name, array in batch.items():
                if array.dtype.kind == "f" and array.size:
                    low, high = self._spans.get(name, (math.inf, -math.inf))
                    self._spans[name] = (min(low, float(array.min())), max(high, float(array.max())))
            yield batch

    def constant_inputs(self) -> dict[str, float]:
        """The float inputs that held one value in every sample seen (all zeros: a placeholder)."""
        return {name: low for name, (low, high) in self._spans.items() if low == high}


def _check_output_outside_data(data, output: str | os.PathLike | None) -> None:
    """ConfigError when ``output`` would replace the --data file, or land in the --data folder under a
    name the next run would read as a sample (an .onnx or a report there is ignored)."""
    from edgeopt.data.images import IMAGE_SUFFIXES
    from edgeopt.data.npy import DATA_SUFFIXES, path_exists

    if output is None or not isinstance(data, (str, os.PathLike)) or not path_exists(Path(data)):
        return
    source, target = Path(data).resolve(), Path(output).resolve()
    read_as_data = target.suffix.lower() in (*DATA_SUFFIXES, *IMAGE_SUFFIXES)
    if target == source or (source.is_dir() and source in target.parents and read_as_data):
        raise OutputError(f"-o/--output {output} would write over the calibration data {data}: "
                          "write the model elsewhere (as .onnx)")


def _overwrites_input(model: ModelSource, output: str | os.PathLike | None) -> Path | None:
    """The input file (the model or one of its external data files) that ``output``, its report or its
    external data file (past 2 GB) would replace, if any."""
    if output is None or isinstance(model, ir.Model):
        return None
    outputs = (Path(output), report_path(output), external_data_path(output))
    existing = [written for written in outputs if written.exists()]
    if not existing:  # every input file exists: nothing new can be one (and the model is not parsed again)
        return None
    inputs = {file.resolve(): file for file in model_files(model)}
    for written in existing:
        if written.resolve() in inputs:
            return inputs[written.resolve()]
    return None


def _evaluator(evaluate: str | Callable[[str], float] | None) -> Callable[[ir.Model], float] | None:
    """Wrap the user's ``evaluate(model_path) -> score`` so it takes a model (saved to a temp file)."""
    import tempfile

    from edgeopt.data.callable import UserWorkingDirectory, load_function

    if evaluate is None:
        return None
    directory = UserWorkingDirectory()  # an os.chdir in the user's code must not move --data and -o
    function = (load_function(evaluate, option="--eval", directory=directory) if isinstance(evaluate, str)
                else evaluate)

    label = evaluate if isinstance(evaluate, str) else getattr(evaluate, "__qualname__", type(evaluate).__name__)

    def score(model: ir.Model) -> float:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder, "candidate.onnx")
            for file, data in model_file_contents(model, path):
                file.write_bytes(data)
            try:
                with directory.entered():
                    value = function(str(path))
            except EdgeoptError:
                raise
            except SystemExit as done:  # sys.exit() in the user's code must not end the run as if it succeeded
                raise DataError(f"--eval {label}: the function called sys.exit({done.code!r}); it must return "
                                "a score") from None
            except Exception as error:  # the user's evaluation code failed
                raise DataError(f"--eval {label}: the function raised {type(error).__name__}: {error}") from error
        try:  # a number, a numpy or torch scalar; not a string that looks like one, nor a bool
            if isinstance(value, (bool, np.bool_, str, bytes)):
                raise TypeError
            number = float(value)
        except OverflowError:  # an int (or Fraction) beyond float's range: a score, but not a finite one
            raise DataError(f"--eval {label} returned {str(value)[:60]}...: too large for a float; it must return "
                            "a finite score") from None
        except (TypeError, ValueError):
            raise DataError(f"--eval {label} returned {type(value).__name__} {str(value)[:60]!r}: it must return "
                            "a number (the score, higher is better)") from None
        if not np.isfinite(number):
            raise DataError(f"--eval {label} returned {number}: it must return a finite score")
        return number

    return score


@python_terms()
def quantize(model: ModelSource, config: object, data=None, *, output: str | os.PathLike | None = None,
             preprocess: ImagePreprocess | None = None, max_samples: int | None = None,
             goal: AccuracyGoal | None = None, evaluate: str | Callable[[str], float] | None = None,
             eval_data=None, check_fidelity: bool = True, check_speed: bool = True,
             progress: Progress | None = None) -> QuantizeReport:
    """Quantize ``model`` with ``config`` (Int8Config, Fp16Config, Bf16Config, Int4WeightConfig, DynamicInt8Config).

    Calibration ``data`` is anything ``--data`` takes (an array, {name: array}, a list or iterable of
    batches, a DataLoader, a .npy/.npz file or folder); required for int8. It is read to its end: an endless
    iterator (``itertools.cycle``, a streaming dataset) needs ``max_samples``. The
    output is written atomically to ``output`` (never over the input), and
    its measured numbers beside it in ``OUT.report.json`` (for ``OUT.onnx``; ``OUT.x.report.json`` for a
    name not ending in ``.onnx``). The report's ``warnings`` are issued as :class:`edgeopt.EdgeoptWarning`
    too; ``report.save(path)`` writes the model and its numbers elsewhere. After
    quantizing, fidelity to the float model (output SQNR, top-1 agreement) is
    measured on up to 64 calibration samples, and float vs quantized latency
    in ONNX Runtime, with the reasons when the quantized model is slower.

    ``eval_data`` (anything ``--data`` takes; ``--eval-data``): held-out samples the fidelity check and
    the accuracy search measure on instead of the calibration data, whose ranges were fitted to it
    (``preprocess`` applies to it too, ``max_samples`` does not).

    With an accuracy ``goal`` (int8, int4-weight, int8-dynamic), the most damaging layers go back to
    float one by one until it is met (``evaluate(model_path) -> score`` for a
    ``max_drop`` goal; output SQNR on the calibration data, or ``eval_data``, for ``min_sqnr_db``).
    Warnings logged on the way (an integer input cast to float ...) are in
    the report's ``warnings`` too.

    A Ctrl-C (KeyboardInterrupt) in the search once a round has been scored,
    or in the checks after it, writes the best model found so far to
    ``output`` with its report (``report.interrupted``, the search's
    ``stopped_because`` says so, the checks not run) and raises
    :class:`edgeopt.Interrupted`, a KeyboardInterrupt whose ``partial`` is
    that report. Before that, the KeyboardInterrupt goes on as it came, and
    nothing is written.
    """
    model = model_source(model)
    _check_config(config, data)
    _check_argument_types(goal, evaluate, output)
    check_flag(check_fidelity, "check_fidelity")
    check_flag(check_speed, "check_speed")
    check_progress(progress)
    with logged_warnings() as logged:
        report = _quantize(model, config, data, output=output, preprocess=preprocess, max_samples=max_samples,
                           goal=goal, evaluate=evaluate, eval_data=eval_data, check_fidelity=check_fidelity,
                           check_speed=check_speed, progress=progress, logged=logged)
    issue_warnings(report.warnings)
    return report


def _check_config(config: object, data: object) -> None:
    """ConfigError for a config no scheme takes, before the data is opened; the arguments in the wrong
    order are told as such."""
    from edgeopt.quant.registry import handler_for, registered_schemes

    if isinstance(data, registered_schemes()) and not isinstance(config, registered_schemes()):
        raise ConfigError(f"quantize(model, config, data): the {type(data).__name__} was given as the data; "
                          "pass the config second and the calibration data third (or data=...)")
    handler_for(config)


def _check_argument_types(goal: object, evaluate: object, output: object) -> None:
    check_type(goal, AccuracyGoal, "goal")
    check_path(output, "output")
    if evaluate is not None and not (isinstance(evaluate, str) or callable(evaluate)):
        raise ConfigError(f"evaluate must be 'module:function' or a function(model_path) -> score, "
                          f"got {type(evaluate).__name__}")


def _quantize(model: ModelSource, config: object, data, *, output, preprocess, max_samples, goal, evaluate,
              eval_data, check_fidelity: bool, check_speed: bool, progress: Progress | None,
              logged: list[str]) -> QuantizeReport:
    """Check the request, quantize (or search), measure, write: each step below in that order."""
    _check_request(model, config, data, output=output, preprocess=preprocess, max_samples=max_samples, goal=goal)
    _check_eval_data(eval_data, output=output, goal=goal, check_fidelity=check_fidelity)
    loaded = load(model, require_static=False)
    float_bytes = _float_bytes(model, loaded)
    source = _CountingSource(calibration_source(loaded, data, preprocess, max_samples)) if data is not None else None
    held_out = _opened_eval_data(loaded, eval_data, preprocess)
    _check_goal(config, data, goal, evaluate)
    search = None
    if goal is not None:
        try:
            search = accuracy_aware_quantize(loaded, config, source, goal, evaluate=_evaluator(evaluate),
                                             progress=progress, measure_data=held_out)
        except Interrupted as stop:  # the best model found so far is written all the same, then the stop goes on
            search = stop.partial
        result = search.result
    else:
        from edgeopt.quant import quantize as run_scheme

        # A model loaded here from a file is the scheme's to rewrite: weights the float passes
        # replace are freed rather than kept for the checks below, which load the file again.
        owned = not isinstance(model, ir.Model)
        result = run_scheme(loaded, config, source, progress=progress, in_place=owned)
        if owned:
            loaded = None
    written = written_files(result.model, output if output is not None else "model.onnx")
    warnings = _result_warnings(config, result, search, source) + stale_weights(output, written)
    checks = _Checks(model=model, loaded=loaded, data=data, eval_data=held_out, preprocess=preprocess,
                     max_samples=max_samples, fidelity=check_fidelity, speed=check_speed,
                     fitted=getattr(config, "fits_data", True), unread=source is not None and source.count == 0)
    fidelity, speed, search = _checked(checks, result, search, warnings)
    report = QuantizeReport(result=result, output=Path(output) if output is not None else None,
                            float_bytes=float_bytes, quant_bytes=sum(len(data) for _, data in written),
                            calibration_samples=source.samples if source is not None else 0,
                            calibration_batches=source.count if source is not None else 0,
                            fidelity=fidelity, fidelity_on=checks.fidelity_on, speed=speed, search=search,
                            warnings=tuple(dict.fromkeys([*logged, *warnings])),
                            eval_samples=getattr(held_out, "num_samples", None))
    if output is not None:  # written last: an error in the checks above leaves nothing behind
        write_quantized(report, written)
    if report.interrupted:
        raise Interrupted(report)
    return report


@dataclass(frozen=True, kw_only=True)
class _Checks:
    """What the checks after quantizing measure on, and which of them run."""

    model: ModelSource
    loaded: ir.Model | None  # None: freed by the scheme, loaded again from ``model``
    data: object
    eval_data: object  # held-out samples for the fidelity check, opened (checked once), or None
    preprocess: ImagePreprocess | None
    max_samples: int | None
    fidelity: bool
    speed: bool
    fitted: bool = True  # whether the scheme fitted anything to ``data`` (ranges, SmoothQuant's scales)
    unread: bool = False  # whether ``data`` is still unread (the scheme needed none of it)

    @property
    def fidelity_on(self) -> str:
        return "held-out" if self.eval_data is not None else "calibration" if self.fitted else "data"


def _checked(checks: _Checks, result: QuantResult, search: AccuracySearch | None,
             warnings: list[str]) -> tuple[CompareResult | None, SpeedCheck | None, AccuracySearch | None]:
    """The fidelity and speed checks, with their warnings added to ``warnings``; none after an interrupted
    search, and a Ctrl-C in them after a search ends them (the search, then said to be interrupted)."""
    interrupted = "fidelity and speed checks skipped: interrupted"
    if search is not None and search.interrupted:
        warnings.append(interrupted)
        return None, None, search
    try:
        return (*_checks(checks, result, warnings), search)
    except KeyboardInterrupt:
        if search is None:
            raise
        warnings.append(interrupted)
        return None, None, dataclasses.replace(search, interrupted=True,
                                               stopped_because=f"{search.stopped_because}; then interrupted")


def _checks(checks: _Checks, result: QuantResult,
            warnings: list[str]) -> tuple[CompareResult | None, SpeedCheck | None]:
    """Fidelity to the float model on the held-out data, else on the calibration data (when it can be read
    again), and float vs quantized speed."""
    data, held_out = checks.data, checks.eval_data
    reiterable = data is not None and not isinstance(data, Iterator)
    # a one-shot iterator the scheme did not read (int8-dynamic without SmoothQuant) is there to be measured
    readable = reiterable or (data is not None and checks.unread)
    measured = held_out if held_out is not None else data if readable else None
    if checks.fidelity and measured is None and data is not None:
        warnings.append("fidelity check skipped: the calibration data was a one-shot iterator, already read "
                        "(pass a list, a re-iterable, a folder or a file to have it measured, or --eval-data)")
    loaded = checks.loaded
    if loaded is None and ((checks.fidelity and measured is not None) or checks.speed):
        loaded = load(checks.model, require_static=False)
    fidelity = None
    if checks.fidelity and measured is not None:
        limit = checks.max_samples if held_out is None else None  # --max-samples limits the calibration data
        fidelity = _fidelity(loaded, result.model, measured, checks.preprocess, limit)
        warnings.extend(_fidelity_warnings(result, fidelity, checks.fidelity_on))
    speed = None
    if checks.speed:
        speed, skipped = _speed_check(loaded, result, data if reiterable else held_out, checks.preprocess)
        warnings.extend(skipped)
    return fidelity, speed


def _opened_eval_data(model: ir.Model, eval_data, preprocess: ImagePreprocess | None):
    """--eval-data opened, its first sample checked against the model's inputs now rather than after the
    calibration; None when not given."""
    if eval_data is None:
        return None
    try:
        source = calibration_source(model, eval_data, preprocess, None)
        first = next(iter(source), None)
    except DataError as error:  # which of the two data options it is about
        raise DataError(f"--eval-data: {error}") from None
    if first is None:
        raise DataError("--eval-data gave no samples: point it at at least one held-out sample")
    return source


def _check_eval_data(eval_data, *, output, goal: AccuracyGoal | None, check_fidelity: bool) -> None:
    """--eval-data is measured on, more than once with a search, and by something: the fidelity check or
    the search; it is never written over."""
    if eval_data is None:
        return
    if isinstance(eval_data, Iterator):
        raise ConfigError("--eval-data is read more than once (each round of the search, the checks), and it is a "
                          "one-shot iterator (a generator): pass a list, a re-iterable, a folder or a file")
    if goal is None and not check_fidelity:
        raise ConfigError("--eval-data is what the fidelity check and the accuracy search measure on, and neither "
                          "runs: drop it, or keep the fidelity check on")
    _check_output_outside_data(eval_data, output)


def _check_request(model: ModelSource, config: object, data, *, output, preprocess, max_samples,
                   goal: AccuracyGoal | None) -> None:
    """What can be refused before the model is read: where the output goes, options without --data,
    and data that can be read only once for work that reads it again."""
    if output is not None:  # first: before the data and the model are looked at
        check_writable_artifact(output)
    _check_output_outside_data(data, output)
    overwritten = _overwrites_input(model, output)
    if overwritten is not None:
        raise OutputError(f"-o/--output {output} would overwrite the input model's file {overwritten}: "
                          "write elsewhere (edgeopt never overwrites its input)")
    if data is None and (preprocess is not None or max_samples is not None):
        raise ConfigError(f"{'--preprocess' if preprocess is not None else '--max-samples'} applies to --data: "
                          "give --data too, or drop it")
    from edgeopt.quant import Fallback, Int8Config

    fp16_fallback = isinstance(config, Int8Config) and config.fallback is Fallback.FP16
    if isinstance(data, Iterator) and (goal is not None or getattr(config, "smoothquant_alpha", None) is not None
                                       or fp16_fallback):
        needs = ("the accuracy search" if goal is not None else "--fallback fp16" if fp16_fallback
                 else "--smoothquant")
        raise ConfigError(f"{needs} reads the calibration data more than once, and it is a one-shot iterator "
                          "(a generator): pass a list, a re-iterable (a DataLoader rather than iter(loader)), "
                          "a folder or a file")


def _check_goal(config: object, data, goal: AccuracyGoal | None, evaluate) -> None:
    """int8 needs data; --eval goes with --max-drop; an accuracy goal is int8's, int4's and int8-dynamic's, and needs
    data."""
    from edgeopt.quant import Int8Config
    from edgeopt.quant.dynamic import DynamicInt8Config
    from edgeopt.quant.int4 import Int4WeightConfig

    if data is None and isinstance(config, Int8Config):
        raise ConfigError("int8 quantization needs calibration data: give --data (a folder of .npy, images, "
                          "or module:function)")
    if goal is not None and not isinstance(config, (Int8Config, Int4WeightConfig, DynamicInt8Config)):
        raise ConfigError("--max-drop/--min-sqnr apply to int8, int4-weight and int8-dynamic quantization only")
    if data is None and goal is not None:
        raise ConfigError("the accuracy search (--max-drop/--min-sqnr) measures each round on --data: give --data "
                          "(a folder of .npy, images, or module:function)")
    if evaluate is not None and (goal is None or goal.max_drop is None):
        if goal is not None:  # --min-sqnr: the goal for a user without labels, not a second goal for --eval
            raise ConfigError("--eval goes with --max-drop (the score drop you accept); --min-sqnr is the goal "
                              "without --eval: give one of the two")
        raise ConfigError("--eval is used with --max-drop: give the largest score drop you accept")


def _result_warnings(config: object, result: QuantResult, search: AccuracySearch | None,
                     source: _CountingSource | None) -> list[str]:
    """What the user should know about the model written and the data it was calibrated on."""
    from edgeopt.quant import Int8Config, Target

    warnings = []
    if search is not None and (loose := loose_goal(search)):
        warnings.append(loose)
    if search is not None and not search.met:
        warnings.append(f"accuracy goal not met ({search.goal.describe()}): best score "
                        f"{search.goal.score_text(search.best_score)} with "
                        f"{count_of(len(search.best_excluded), 'node', 'nodes')} "
                        f"{search.kept_where}; "
                        f"{search.stopped_because}")
    if not isinstance(config, Int8Config):
        return warnings
    if config.target is Target.MCU and (blocking := blocks_c(result)):
        warnings.append(mcu_float_warning(blocking))
    elif config.target is Target.MCU and (refusal := mcu_lowering_refusal(result)):
        warnings.append(refusal)
    if not result.tensors:
        why = (f"{count_of(len(result.float_nodes), 'node', 'nodes')} kept float, listed above" if result.float_nodes
               else "it computes nothing from its inputs that int8 could hold: no Conv, Gemm, MatMul or other op "
                    "with an integer kernel")
        warnings.append(f"no node runs in int8: the model written is the float model ({why})")
    if source is not None and source.samples < MIN_CALIBRATION_SAMPLES:
        counted = count_of(source.samples, "calibration sample", "calibration samples")
        warnings.append(f"only {counted}: ranges may not cover real inputs "
                        f"(use at least {MIN_CALIBRATION_SAMPLES}, ideally a few hundred)")
    if source is not None:
        warnings.extend(f"calibration data for input {name!r} is {value:g} in every sample: ranges calibrated on "
                        "it will not fit real inputs (a placeholder array? images that did not load?)"
                        for name, value in source.constant_inputs().items())
    return warnings


def _fidelity_warnings(result: QuantResult, fidelity: CompareResult, measured_on: str) -> list[str]:
    """Outputs not measured (inf/NaN, and whose fault), low fidelity, and --equalize-relu6's share of it."""
    warnings, where = [], "the data" if measured_on == "data" else f"the {measured_on} data"
    unmeasured = [row for row in fidelity.outputs if math.isnan(row.sqnr_db)]
    if float_fault := [row.name for row in unmeasured if not row.reference_finite]:
        warnings.append(f"fidelity of {', '.join(float_fault)} not measured: the float model's outputs hold "
                        f"inf/NaN on {where} (check the model and the data's scale)")
    if quant_fault := [row.name for row in unmeasured if row.reference_finite]:
        warnings.append(f"output {', '.join(quant_fault)} of the {result.scheme} model holds inf/NaN on {where} "
                        "where the float model's is finite: the model written is broken there; "
                        "`edgeopt compare` finds the layer, --exclude keeps it float")
    if measured_on == "held-out" and fidelity.rows < MIN_CALIBRATION_SAMPLES:
        warnings.append(f"only {count_of(fidelity.rows, 'held-out sample', 'held-out samples')}: the fidelity "
                        "figures (and an accuracy search's rounds) rest on them "
                        f"(use at least {MIN_CALIBRATION_SAMPLES})")
    return [*warnings, *low_fidelity(result, fidelity, where), *relu6_warning(result, fidelity),
            *clipping_ranges(result, fidelity)]


def _speed_check(loaded: ir.Model, result: QuantResult, data, preprocess) -> tuple[SpeedCheck | None, list[str]]:
    """Float vs quantized latency, and why it was skipped. A model with dynamic dims is timed on the first
    batch of ``data`` (None: data that cannot be read again), the sizes it will see."""
    dynamic = not all(spec.is_static for spec in eir.model_inputs(loaded))
    if dynamic and data is None:
        return None, ["speed check skipped: the model has dynamic input dims, and no re-readable data gives their "
                      "sizes (a folder, a file, or a module:function returning a list)"]
    feed = next(iter(calibration_source(loaded, data, preprocess, 1))) if dynamic else None
    speed = _speed(loaded, result.model, feed)
    if speed is not None and speed.slower:
        logger.info("the quantized model is slower than float here (%.3f ms vs %.3f ms): %s", speed.quant_ms,
                    speed.float_ms, "; ".join(speed.reasons or ("no cause found",)))
    return speed, []


def _float_bytes(model: ModelSource, loaded: ir.Model) -> int:
    """Size of the float model: its file(s) on disk (noted when loaded), or serialized when it came
    from memory."""
    if isinstance(model, ir.Model):
        return sum(len(data) for _, data in model_file_contents(model, "model.onnx"))
    return loaded.meta.get(FILE_BYTES_KEY) or model_file_bytes(model)


def _fidelity(float_model: ir.Model, quant_model: ir.Model, data, preprocess,
              max_samples: int | None) -> CompareResult:
    """Fidelity on the first batches of ``data``: at most 64, and no more than ``max_samples``;
    per-layer rows as ``compare`` gives them (against the float model after the same float passes)."""
    from edgeopt.quant.compare import compare_models

    batches = FIDELITY_SAMPLES if max_samples is None else min(FIDELITY_SAMPLES, max_samples)
    reference = comparable_float(float_model)
    # the model as given too, for a float16 or weight-only model, whose passes fuse no MatMul + Add into a Gemm
    return compare_models(reference, quant_model, calibration_source(float_model, data, preprocess, None),
                          original=float_model, max_samples=batches)


def _speed(float_model: ir.Model, quant_model: ir.Model, feed: Batch | None) -> SpeedCheck:
    """Float vs quantized latency on ``feed``, or on random inputs of the models' static shapes."""
    from edgeopt.quant.speed import speed_check

    return speed_check(float_model, quant_model, runs=50, threads=1, feed=feed)

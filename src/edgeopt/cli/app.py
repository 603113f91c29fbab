"""The commands. Each parses its options, calls one function of :mod:`edgeopt.api`, renders."""

from __future__ import annotations

import enum
import logging
import math
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from edgeopt import __version__, api  # api's functions, and ONNX with them, load when a command runs
from edgeopt.cli import InterruptedAfterWriting, state
from edgeopt.cli.quant_options import (BLOCK_SIZE, DEFAULT_TIME_BUDGET, CalibrationChoice, EmbeddingsChoice,
                                       FallbackChoice, Int8Algorithms, Scheme, TargetChoice, quant_config)
from edgeopt.cli.render import (bytes_text, count_of, count_text, in_batches, print_json, progress_bar,
                                stdout_to_stderr, table)
from edgeopt.errors import ConfigError, DataError, Interrupted

if TYPE_CHECKING:
    import numpy as np

    from edgeopt.data import ImagePreprocess

__all__ = ["GOAL_MISSED", "app"]

#: Exit code of a quantize whose --max-drop / --min-sqnr goal was not met (the best model found is written).
GOAL_MISSED = 8

app = typer.Typer(
    name="edgeopt",
    help="Make trained neural networks small, low-bit, fast and deployable on phones and microcontrollers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
PreprocessOption = Annotated[
    Optional[str],
    typer.Option("--preprocess", metavar="SPEC",
                 help="Image preprocessing for an image --data folder, e.g. "
                      "size=224x224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=nchw,dtype=float32."),
]


def parse_preprocess(text: str | None) -> ImagePreprocess | None:
    """The ``--preprocess`` spec, or None when the option was not given."""
    from edgeopt.data import ImagePreprocess

    return ImagePreprocess.parse(text) if text else None


def input_shapes(specs: list[str] | None) -> dict[str, tuple]:
    """The ``--input-shape NAME=DIMS`` options, parsed."""
    from edgeopt.io import parse_input_shapes

    return parse_input_shapes(specs or [])


InputShapeOption = Annotated[
    Optional[list[str]],
    typer.Option("--input-shape", metavar="NAME=DIMS",
                 help="Fix a dynamic input shape, e.g. input=1x3x224x224 (repeatable)."),
]


def _version(value: bool) -> None:
    if value:
        print(f"edgeopt {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    debug: Annotated[bool, typer.Option(
        "--debug", help="Show the traceback of any error (exit codes stay the same).")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv for debug).")] = 0,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    state.debug = debug
    logging.getLogger().setLevel({0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG))


# ----------------------------------------------------------------------- inspect


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="ONNX model file.")],
    input_shape: InputShapeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Per-node table of op, output shape, dtype, params, MACs and activation bytes, with totals."""
    result = api.inspect(model, input_shapes=input_shapes(input_shape))
    if json_output:
        print_json(result.to_dict())
        return
    _render_inspect(result)


def _render_inspect(result: api.InspectResult) -> None:
    rows = table(f"{result.name} (opset {result.opset}{', ' + result.producer if result.producer else ''})",
                 [("#", "right"), ("node", "left"), ("op", "left"), ("output shape", "left"), ("dtype", "left"),
                  ("params", "right"), ("MACs", "right"), ("activation", "right")])
    for index, node in enumerate(result.cost.nodes):
        shapes = ", ".join(("x".join(map(str, s)) or "scalar") if s is not None else "?" for s in node.output_shapes)
        rows.add_row(str(index), node.name, node.op_type, shapes, node.output_dtype, count_text(node.params),
                     count_text(node.macs), bytes_text(node.activation_bytes))
    state.stdout.print(rows)
    _render_inspect_totals(result)


def _weights_text(cost) -> str:
    """The weights' bytes as float32, float16 and int8; and as stored, when that is none of these (a quantized
    model: its low-bit weights with their scales and zero points)."""
    sizes = (f"{bytes_text(cost.param_bytes_fp32)} fp32 / {bytes_text(cost.param_bytes_fp16)} fp16 / "
             f"{bytes_text(cost.param_bytes_int8)} int8")
    if cost.weight_bytes in (cost.param_bytes_fp32, cost.param_bytes_fp16, cost.param_bytes_int8):
        return sizes
    return f"{bytes_text(cost.weight_bytes)} stored (as {sizes})"


def _render_inspect_totals(result: api.InspectResult) -> None:
    cost, memory = result.cost, result.memory
    lines = [
        ("inputs", ", ".join(f"{i.name} {i.shape_text()} {i.dtype}" for i in result.inputs)),
        ("MACs", f"{count_text(cost.macs)} ({cost.macs:,})"),
        ("other FLOPs", f"{count_text(cost.other_flops)} ({cost.other_flops:,})"),
        ("parameters", f"{count_text(cost.params)} ({cost.params:,})"),
        ("weights", _weights_text(cost)),
        ("peak activation RAM", f"{bytes_text(memory.peak_activation_bytes)} ({memory.peak_activation_bytes:,} B, "
                                f"greedy arena plan; lower bound {memory.lower_bound_bytes:,} B "
                                f"at {memory.peak_node})"),
    ]
    if cost.unknown_nodes:
        lines.append(("not counted", f"{count_of(len(cost.unknown_nodes), 'node', 'nodes')} with unknown shapes"))
    if cost.uncounted_ops:
        lines.append(("not counted", f"{', '.join(cost.uncounted_ops)}: no cost rule, 0 MACs and FLOPs in the totals"))
    if cost.subgraph_nodes:
        lines.append(("not counted", f"{count_of(cost.subgraph_nodes, 'node', 'nodes')} inside If/Loop/Scan bodies: "
                                     "their MACs and FLOPs are not in the totals (their weights are)"))
    totals = table("totals", [("", "left"), ("", "left")])
    totals.show_header = False
    for key, value in lines:
        totals.add_row(key, value)
    state.stdout.print(totals)


# --------------------------------------------------------------------------- run


def _parse_inputs(specs: list[str]) -> dict[str, np.ndarray | Path]:
    """``NAME=file.npy`` or ``file.npy`` (key "" = the model's only input) or ``file.npz`` (keyed by name).

    A .npy stays a path, so ``run`` can refuse to write an output over it.
    """
    from edgeopt.api.model import read_input_file

    inputs: dict[str, np.ndarray | Path] = {}
    for spec in specs:
        name, sep, path_text = spec.partition("=")
        if not sep:
            name, path_text = "", spec
        given = read_input_file(path_text) if zipfile.is_zipfile(path_text) else {name: Path(path_text)}
        for key, value in given.items():
            if key in inputs:
                which = f"input {key!r}" if key else "the unnamed input"
                raise DataError(f"--input gives {which} twice ({spec}): give each input once")
            inputs[key] = value
    return inputs


@app.command()
def run(
    model: Annotated[Path, typer.Argument(help="ONNX model file.")],
    inputs: Annotated[list[str], typer.Option("--input", "-i", metavar="[NAME=]FILE.npy",
                                              help="Input array (.npy, or .npz keyed by input name); "
                                                   "N stacked samples for a batch-1 input run one by one.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the outputs, one .npy per output.")],
    json_output: JsonOption = False,
) -> None:
    """Run a model in ONNX Runtime (CPU) and write its outputs as .npy files."""
    arrays = _parse_inputs(inputs)
    with progress_bar("running") as update:
        result = api.run(model, arrays, output_dir=output, progress=update)
    if json_output:
        print_json(result.to_dict())
        return
    rows = table(f"{count_of(result.samples, 'sample', 'samples')} -> {output}", [("output", "left"), ("shape", "left"),
                                                             ("dtype", "left"), ("file", "left")])
    for (name, array), file in zip(result.outputs.items(), result.files):
        rows.add_row(name, "x".join(map(str, array.shape)), str(array.dtype), str(file))
    state.stdout.print(rows)


# ------------------------------------------------------------------------- bench


@app.command()
def bench(
    models: Annotated[list[Path], typer.Argument(help="One or more ONNX models; ratios are against the first.")],
    threads: Annotated[Optional[int], typer.Option("--threads", help="Intra-op threads (default: ORT's).")] = None,
    runs: Annotated[int, typer.Option("--runs", help="Timed inferences per model.")] = 100,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed warm-up inferences per model.")] = 10,
    data: Annotated[Optional[str], typer.Option("--data", help="Real inputs: a .npy/.npz file or a folder of them, a "
                                                               "folder of images, or module:function.")] = None,
    preprocess: PreprocessOption = None,
    input_shape: InputShapeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Latency (min/median/p90), throughput, peak RSS and file size; several models run interleaved."""
    from edgeopt.bench import BenchConfig

    config = BenchConfig(runs=runs, warmup=warmup, threads=threads)
    with progress_bar("benchmarking") as update, stdout_to_stderr(json_output):  # --data module:function prints
        result = api.bench(models, config=config, data=data, input_shapes=input_shapes(input_shape),
                           preprocess=parse_preprocess(preprocess), progress=update)
    if json_output:
        print_json(result.to_dict())
        return
    render_bench(result)


def render_bench(result) -> None:
    rows = table(f"ONNX Runtime CPU, {result.config.runs} runs after {result.config.warmup} warm-up, "
                 f"threads={result.config.threads or 'default'}, interleaved",
                 [("model", "left"), ("min ms", "right"), ("median ms", "right"), ("p90 ms", "right"),
                  ("vs first", "right"), ("samples/s", "right"), ("peak RSS", "right"), ("file", "right")])
    for timing, ratio in zip(result.models, result.ratios()):
        rows.add_row(timing.name, f"{timing.min_ms:.3f}", f"{timing.median_ms:.3f}", f"{timing.p90_ms:.3f}",
                     f"{ratio:.2f}x", f"{timing.throughput_per_s:,.0f}", bytes_text(timing.peak_rss_bytes),
                     bytes_text(timing.file_bytes))
    state.stdout.print(rows)


# -------------------------------------------------------------------------- demo


@app.command()
def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the demo's artifacts.")] = Path("demo-out"),
    runs: Annotated[int, typer.Option("--runs", help="Timed inferences per model in the benchmark.")] = 200,
    json_output: JsonOption = False,
) -> None:
    """Run every stage that exists on the bundled digits CNN and print a short summary."""
    from edgeopt.demo import run_demo

    with progress_bar("demo") as update:
        result = run_demo(output, runs=runs, progress=update)
    if json_output:
        print_json(result.to_dict())
        return
    _render_inspect_totals(result.inspect)
    render_bench(result.bench)
    summary = table("demo summary", [("", "left"), ("", "left")])
    summary.show_header = False
    for key, value in result.summary_lines():
        summary.add_row(key, value)
    state.stdout.print(summary)


# ---------------------------------------------------------------------- quantize


class SortChoice(str, enum.Enum):
    sqnr = "sqnr"
    lost = "lost"


@app.command()
def quantize(
    model: Annotated[Path, typer.Argument(help="Float ONNX model.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Quantized ONNX model to write.")],
    data: Annotated[Optional[str], typer.Option("--data", help="Calibration data: a .npy/.npz file or a folder of "
                                                               "them, a folder of images, or module:function "
                                                               "(required for int8).")] = None,
    scheme: Annotated[Scheme, typer.Option("--scheme", help="int8 (activations by --target), uint8, fp16, bf16, "
                                                            "int4-weight, int8-dynamic (MatMul/Gemm/LSTM weights "
                                                            "int8, activations quantized as the model runs: "
                                                            "transformers and RNNs in ONNX Runtime, no --data "
                                                            "needed)."
                                                   )] = Scheme.int8,
    target: Annotated[TargetChoice, typer.Option("--target", help="ort: u8 activations x s8 weights (ONNX Runtime "
                                                                  "on x86); mcu: TFLite int8 scheme.")]
    = TargetChoice.ort,
    calibration: Annotated[CalibrationChoice, typer.Option("--calibration", help="How activation ranges are chosen.")]
    = CalibrationChoice.percentile,
    per_tensor: Annotated[bool, typer.Option("--per-tensor", help="Per-tensor weights (default per channel).")] = False,
    exclude: Annotated[Optional[list[str]], typer.Option(
        "--exclude", metavar="NODE_OR_OPTYPE", help="Keep this node or op type in float (repeatable).")] = None,
    block_size: Annotated[Optional[int], typer.Option("--block-size", help=f"Block size of int4-weight "
                                                                           f"(default {BLOCK_SIZE}).")] = None,
    equalize: Annotated[bool, typer.Option("--equalize", help="Cross-layer equalization of consecutive convs "
                                                              "(depthwise-separable nets).")] = False,
    equalize_relu6: Annotated[bool, typer.Option(
        "--equalize-relu6", help="--equalize, and through ReLU6 too by making it a ReLU (MobileNetV2; "
                                 "changes the float model where a value exceeds 6).")] = False,
    bias_correct: Annotated[bool, typer.Option("--bias-correct/--no-bias-correct",
                                               help="Correct the mean shift int8 weights cause in each layer's "
                                                    "output.")] = True,
    adaround: Annotated[bool, typer.Option("--adaround", help="Learn each weight's rounding from calibration "
                                                              "activations (slower).")] = False,
    gptq: Annotated[bool, typer.Option("--gptq", help="Round each layer's weights in turn, feeding each rounding "
                                                      "error to the weights not yet rounded (GPTQ; AdaRound's "
                                                      "gain in a fraction of its time; int4-weight too, with "
                                                      "--data: K x K float64 per layer input, 128 MiB at K = "
                                                      "4096, at most 1 GiB at a time; more takes more passes "
                                                      "over the data).")] = False,
    depthwise_gptq: Annotated[Optional[bool], typer.Option(
        "--depthwise-gptq/--no-depthwise-gptq",
        help="Round the depthwise convolutions' weights alone by GPTQ, from their input correlations "
             "gathered in the calibration pass (a smaller gain than --gptq's, in less time: +10-27 % on "
             "MobileNetV2 at 224x224, up to 2.5x on a 0.1 s calibration). Default: when those statistics "
             "cost at most 2 % of the model's multiply-adds, and without --gptq or --adaround.",
        show_default=False)] = None,
    smoothquant: Annotated[Optional[float], typer.Option("--smoothquant", metavar="ALPHA",
                                                         help="Migrate activation outliers of MatMul/Gemm inputs "
                                                              "into the weights (transformers), e.g. 0.5.")] = None,
    fallback: Annotated[FallbackChoice, typer.Option(
        "--fallback", help="What the nodes kept out of int8 (--exclude, the accuracy search, no integer kernel) "
                           "compute in: float (float32), or fp16 where float16 holds their values (for "
                           "runtimes with float16 kernels; weights half the size). int4-weight: float, or int8 "
                           "to hold the weights of the layers kept out of int4 in 8 bits (same blocks).")]
    = FallbackChoice.float,
    embeddings: Annotated[Optional[EmbeddingsChoice], typer.Option(
        "--embeddings", help="int4-weight: what the embedding tables Gather nodes read are held in, as ONNX "
                             "Runtime's GatherBlockQuantized: int8 (default; about 0.01 dB of output SQNR where "
                             "int4 costs 1.25 dB on a small GPT), int4, or float. int8-dynamic: int8 per row "
                             "(default) or float.")] = None,
    max_samples: Annotated[Optional[int], typer.Option(
        "--max-samples", min=1, help="Use at most N calibration batches (samples, for data of batch 1).")] = None,
    evaluate: Annotated[Optional[str], typer.Option("--eval", metavar="MODULE:FUNCTION",
                                                    help="Your metric: function(model_path) -> score, higher is "
                                                         "better (e.g. accuracy in %).")] = None,
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", help="With --eval: return the most damaging "
                                                                         "layers to float until the score drops "
                                                                         "at most this much.")] = None,
    min_sqnr: Annotated[Optional[float], typer.Option("--min-sqnr", metavar="DB",
                                                      help="Without labels: the same loop until the output SQNR "
                                                           "against the float model reaches DB.")] = None,
    eval_data: Annotated[Optional[str], typer.Option(
        "--eval-data", help="Held-out samples (as --data takes them) that the fidelity check and --min-sqnr "
                            "measure on, instead of the calibration data the ranges were fitted to.")] = None,
    time_budget: Annotated[Optional[str], typer.Option(
        "--time-budget", help="Limit of the accuracy loop, e.g. 90s, 10m, 1m30s, 1h (default 10m).")] = None,
    max_float_nodes: Annotated[Optional[int], typer.Option(
        "--max-float-nodes", min=1, help="Most nodes the accuracy loop returns to float (default 32; data "
                                         "movement between them not counted).")] = None,
    preprocess: PreprocessOption = None,
    speed_check: Annotated[bool, typer.Option("--speed-check/--no-speed-check",
                                              help="Time float vs quantized in ONNX Runtime afterwards.")] = True,
    json_output: JsonOption = False,
) -> None:
    """Quantize a float model (int8 QDQ calibrated on --data, fp16, bf16, int4 weight-only or dynamic int8)."""
    from edgeopt.quant.accuracy import AccuracyGoal

    algorithms = Int8Algorithms(equalize=equalize, equalize_relu6=equalize_relu6, bias_correct=bias_correct,
                                 adaround=adaround, gptq=gptq, depthwise_gptq=depthwise_gptq,
                                 smoothquant_alpha=smoothquant, fallback=fallback, embeddings=embeddings)
    config = quant_config(scheme, target, calibration, per_tensor, tuple(exclude or ()), block_size, algorithms)
    goal = None
    if max_drop is not None or min_sqnr is not None:
        goal = AccuracyGoal(max_drop=max_drop, min_sqnr_db=min_sqnr,
                            time_budget_s=_seconds(time_budget or DEFAULT_TIME_BUDGET),
                            **({} if max_float_nodes is None else {"max_float_nodes": max_float_nodes}))
    elif time_budget is not None or max_float_nodes is not None:
        option = "--time-budget" if time_budget is not None else "--max-float-nodes"
        raise ConfigError(f"{option} limits the accuracy search: use it with --max-drop or --min-sqnr, or drop it")
    # under --json, stdout is the report alone: what --eval or --data code prints goes to stderr
    with progress_bar("calibrating" if goal is None else "accuracy search") as update, stdout_to_stderr(json_output):
        try:
            report = api.quantize(model, config, data, output=output, max_samples=max_samples, goal=goal,
                                  evaluate=evaluate, eval_data=eval_data, preprocess=parse_preprocess(preprocess),
                                  check_speed=speed_check, progress=update)
        except Interrupted as stop:  # the best model found so far, written: shown, then the stop goes on
            report = stop.partial
    _show_quantize(report, json_output)


def _show_quantize(report: api.QuantizeReport, json_output: bool) -> None:
    """The report, as JSON or tables, and the exit of a search interrupted or whose goal was missed (under
    --json, the entry point prints an interrupted search's report, with the error)."""
    if json_output and not report.interrupted:
        print_json(report.to_dict())
    elif not json_output:
        _render_quantize(report)
    if report.interrupted:
        raise InterruptedAfterWriting(_kept_text(report), report.to_dict())
    if report.search is not None and not report.search.met:  # the best model found is written all the same
        raise typer.Exit(GOAL_MISSED)


def _kept_text(report: api.QuantizeReport) -> str:
    """What an interrupted accuracy search kept: where its best model went, and how good it is."""
    search = report.search
    met = "met" if search.met else "not met"
    return (f"the best model found so far is written to {report.output} (goal {search.goal.describe()} {met}, "
            f"score {search.goal.score_text(search.best_score)}, "
            f"{count_of(len(search.best_excluded), 'node', 'nodes')} "
            f"{search.kept_where})")


_DURATION_UNITS = {"s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1, "m": 60, "min": 60, "mins": 60,
                   "minute": 60, "minutes": 60, "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600}
_DURATION_PART = re.compile(r"\s*([-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|nan|inf))\s*([a-zA-Z]*)",
                            re.IGNORECASE)


def _seconds(text: str) -> float:
    """'90s', '10m', '1h', '1m30s', '10min', '1.5h' or plain seconds."""
    value, position, parts = 0.0, 0, 0
    while position < len(text.rstrip()):
        match = _DURATION_PART.match(text, position)
        unit = match.group(2).lower() if match else ""
        if match is None or (unit and unit not in _DURATION_UNITS) or (not unit and match.end() < len(text.rstrip())):
            raise ConfigError(f"--time-budget {text!r}: write it like 90s, 10m, 1m30s or 1h")
        value += float(match.group(1)) * _DURATION_UNITS.get(unit, 1)
        position, parts = match.end(), parts + 1
    if parts == 0:
        raise ConfigError(f"--time-budget {text!r}: write it like 90s, 10m, 1m30s or 1h")
    if not value > 0:
        raise ConfigError(f"--time-budget {text!r} must be positive")
    return value


def _render_search(search) -> None:
    goal = search.goal
    to_8_bits = search.returned_to != "float"
    rows = table(f"accuracy search: {goal.describe()} -> {search.stopped_because}",
                 [("round", "right"), ("8-bit layers" if to_8_bits else "float nodes", "right"), ("score", "right"),
                  ("next to 8 bits" if to_8_bits else "next back to float", "left"), ("why", "left")])
    low = "int4" if search.result.scheme == "int4" else "int8"
    for index, step in enumerate(search.steps):
        score = goal.score_text(step.score)
        if step.retried:  # a pruning round after the goal was met
            kept = f"goal missed without it: stays {'in ' if to_8_bits else ''}{search.returned_to}"
            if goal.met(step.score, search.float_score):
                kept = f"goal still met: runs {low}" if not step.still_float else \
                    f"goal still met, but the quantizer keeps it float: {step.still_float}"
            rows.add_row(str(index), str(len(step.excluded)), score, f"{step.retried} tried in {low}", kept)
            continue
        rows.add_row(str(index), str(len(step.excluded)), score,
                     _returned_text(step), step.reason or "")
    state.stdout.print(rows)
    float_text = "" if math.isinf(search.float_score) else f" (float model {goal.score_text(search.float_score)})"
    added = ", ".join(search.best_excluded) or "none"
    state.stdout.print(f"best: score {goal.score_text(search.best_score)}{float_text} with "
                       f"{count_of(len(search.best_excluded), 'node', 'nodes')} "
                       f"{search.kept_where}: {added}")
    passes = count_of(search.calibration_passes, "calibration pass", "calibration passes")
    from edgeopt.quant.accuracy import FIDELITY_SAMPLES

    measured = ("scored by the --eval function" if goal.max_drop is not None else
                f"compared on the {search.measured_on} data (its first {FIDELITY_SAMPLES} samples at most)")
    state.stdout.print(f"{count_of(len(search.steps), 'round', 'rounds')}, {passes} over the data; each round "
                       f"{measured}")


def _returned_text(step) -> str:
    """``q (MatMul)``, or ``q (MatMul) with k, v`` when the other readers of the same tensor go with it."""
    if not step.next_node:
        return ""
    together = f" with {', '.join(step.also_returned)}" if step.also_returned else ""
    return f"{step.next_node} ({step.next_op_type}){together}"


FLOAT_NODES_LISTED = 24  # beyond this many, one row per op and reason (every node is in --json and the report)


def _render_float_nodes(float_nodes, output, scheme: str) -> None:
    from edgeopt.api.quantize import report_path

    # int4 weight-only computes in float throughout: its list is of the layers whose weights are not int4
    kept = f"{count_of(len(float_nodes), 'node', 'nodes')} " + ("kept out of int4" if scheme == "int4"
                                                                  else "left in float")
    if len(float_nodes) <= FLOAT_NODES_LISTED:
        rows = table(kept, [("node", "left"), ("op", "left"), ("reason", "left")])
        for node in float_nodes:
            rows.add_row(node.node_name, node.op_type, node.reason)
        state.stdout.print(rows)
        return
    groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for node in float_nodes:
        groups.setdefault((node.op_type, _reason_kind(node.reason)), []).append((node.node_name, node.reason))
    where = f"; each one in {report_path(output)}" if output is not None else "; each one with --json"
    rows = table(f"{kept}, by op and reason{where}",
                 [("op", "left"), ("nodes", "right"), ("e.g.", "left"), ("reason", "left")])
    for (op_type, _), members in groups.items():
        name, reason = members[0]
        # the example's own reason, whole: cut at the kind, "(round 5: ...)" lost its brackets and "by 'x'" its place
        rows.add_row(op_type, str(len(members)), name, reason)
    state.stdout.print(rows)


def _reason_kind(reason: str) -> str:
    """A reason without what is its node's own (the round and figures of the accuracy search, the node
    kept float that another is read for), so that the nodes float for one cause group in one row."""
    from edgeopt.quant.accuracy import RETURNED, RETURNED_TO_8_BITS
    from edgeopt.quant.placement import MOVES_FOR_KEPT, READ_IN_FLOAT

    for kind in (RETURNED, RETURNED_TO_8_BITS, READ_IN_FLOAT, MOVES_FOR_KEPT):
        if reason.startswith(kind):
            return kind
    return reason


def _render_quantize(report: api.QuantizeReport) -> None:
    from edgeopt.cli.render_compare import render_speed

    result = report.result
    if report.search is not None:
        _render_search(report.search)
    for note in result.notes:
        state.stdout.print(f"note: {note}")
    if result.float_nodes:
        _render_float_nodes(result.float_nodes, report.output, result.scheme)
    summary = table(f"{result.scheme} -> {report.output}", [("", "left"), ("", "left")])
    summary.show_header = False
    summary.add_row("size", f"{bytes_text(report.float_bytes)} -> {bytes_text(report.quant_bytes)} "
                            f"({report.quant_bytes / report.float_bytes:.2f}x)")
    if report.calibration_samples:
        summary.add_row("calibration", f"{count_of(report.calibration_samples, 'sample', 'samples')}"
                                       f"{in_batches(report.calibration_samples, report.calibration_batches)}")
    if report.fidelity is not None:
        from edgeopt.quant.accuracy import FIDELITY_SAMPLES

        fidelity = report.fidelity
        counted = (f"{count_of(fidelity.rows, f'{report.fidelity_on} sample', f'{report.fidelity_on} samples')}"
                   f"{in_batches(fidelity.rows, fidelity.samples)}")
        available = report.calibration_samples if report.fidelity_on == "calibration" else report.eval_samples
        if available and fidelity.rows < available:
            counted = f"the first {counted} of {available}"
        elif fidelity.rows >= FIDELITY_SAMPLES:  # the data's size unknown: at most that many are measured
            counted = f"the first {counted}: the check reads at most {FIDELITY_SAMPLES}"
        for out in fidelity.outputs:
            if not out.signal:  # class indices: how many are equal, nothing else
                summary.add_row(f"fidelity {out.name}", f"equal values {out.top1_agreement:.2%} (on {counted})")
                continue
            top1 = f", top-1 agreement {out.top1_agreement:.2%}" if out.top1_agreement is not None else ""
            summary.add_row(f"fidelity {out.name}", f"SQNR {out.sqnr_db:.2f} dB, cosine {out.cosine:.5f}{top1} "
                                                    f"(on {counted})")
    state.stdout.print(summary)
    if report.speed is not None:
        render_speed(report.speed)
    for warning in report.warnings:  # through logging: a warning already shown as it happened is not repeated
        logging.getLogger("edgeopt").warning(warning)


# ----------------------------------------------------------------------- compare


@app.command()
def compare(
    float_model: Annotated[Path, typer.Argument(help="The float ONNX model.")],
    quant_model: Annotated[Path, typer.Argument(help="Its quantized (QDQ) version.")],
    data: Annotated[str, typer.Option("--data", help="Inputs to compare on: a .npy/.npz file or a folder "
                                                     "of them, a folder of images, or module:function.")],
    max_samples: Annotated[Optional[int], typer.Option(
        "--max-samples", min=1, help="Use at most N batches (samples, for data of batch 1).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Show only the N worst layers.")] = None,
    sort: Annotated[SortChoice, typer.Option(
        "--sort",
        help="Rows by SQNR, lowest first (cumulative: the last layers rank worst), or by dB lost inside the "
             "node, largest first (where the error arises).")] = SortChoice.sqnr,
    preprocess: PreprocessOption = None,
    json_output: JsonOption = False,
) -> None:
    """Per-layer SQNR and cosine of a quantized model against its float model, worst first."""
    from edgeopt.cli.render_compare import render_compare

    with progress_bar("comparing") as update, stdout_to_stderr(json_output):  # --data module:function prints
        result = api.compare(float_model, quant_model, data, max_samples=max_samples,
                             preprocess=parse_preprocess(preprocess), progress=update)
    if sort is SortChoice.lost:
        result = result.by_loss()
    if json_output:
        report = result.to_dict()
        report["layers"] = report["layers"][:limit]  # in the order shown
        print_json(report)
        return
    render_compare(result, limit=limit, by_loss=sort is SortChoice.lost)


from edgeopt.cli import deploy  # noqa: E402,F401  (registers compile, verify)

"""Rich tables for ``edgeopt compare`` (per-layer and output fidelity) and the int8 speed check."""

from __future__ import annotations

import math

from edgeopt.cli import state
from edgeopt.cli.render import count_of, in_batches, table
from edgeopt.quant.compare import CompareResult
from edgeopt.quant.speed import SpeedCheck

__all__ = ["render_compare", "render_speed"]


def _db(value: float) -> str:
    return "inf" if value == math.inf else f"{value:.2f}"


def _number(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _scale_text(scale: float, zero_point: int | None, dtype: str) -> str:
    if math.isnan(scale):  # a tensor matched by name (a float16 or weight-only model): its type
        return dtype
    zero_text = "per-axis" if zero_point is None else str(zero_point)
    return f"{scale:.4g} / {zero_text} {dtype}"


def render_compare(result: CompareResult, *, limit: int | None = None, by_loss: bool = False) -> None:
    """Output rows, then per-layer rows worst SQNR first (the first ``limit`` if given), then coverage."""
    samples = count_of(result.rows, "sample", "samples")
    outputs = table(f"outputs over {samples}{in_batches(result.rows, result.samples)}",
                    [("output", "left"), ("SQNR dB", "right"), ("cosine", "right"), ("max abs err", "right"),
                     ("top-1 agreement", "right")])
    for row in result.outputs:
        top1 = "-" if row.top1_agreement is None else f"{row.top1_agreement:.1%}"
        sqnr, cosine = (_db(row.sqnr_db), _number(row.cosine, 5)) if row.signal else ("-", "-")
        outputs.add_row(row.name, sqnr, cosine, f"{row.max_abs_error:.4g}", top1)
    state.stdout.print(outputs)
    if not result.layers:  # no Q/DQ pair and no tensor matched by name: output rows only, as warned
        return
    order = "largest loss first" if by_loss else "worst first"
    what = "tensors matched by name" if result.by_name else "quantized tensors"
    layers = table(f"{what}, {order} (lost dB: lost inside the node writing it)",
                   [("#", "right"), ("tensor", "left"), ("op", "left"),
                    ("type" if result.by_name else "scale / zero point", "left"),
                    ("SQNR dB", "right"), ("lost dB", "right"), ("cosine", "right"), ("max abs err", "right")])
    for index, row in enumerate(result.layers[:limit]):
        layers.add_row(str(index + 1), row.tensor, row.op_type,
                       _scale_text(row.scale, row.zero_point, row.zero_point_dtype),
                       _db(row.sqnr_db), _lost_text(row.lost_db),
                       _number(row.cosine, 5), f"{row.max_abs_error:.4g}")
    state.stdout.print(layers)
    state.stdout.print(_coverage_line(result))


def _lost_text(lost_db: float | None) -> str:
    if lost_db is None:
        return "-"
    return "all" if math.isinf(lost_db) else f"{lost_db:.2f}"  # inputs exact: the error arises there


def _coverage_line(result: CompareResult) -> str:
    if result.by_name and any(row.op_type.endswith(" (int8)") for row in result.layers):
        return (f"matched {result.matched} tensors by name, op and readers (a dynamic int8 model: each "
                "'(int8)' row quantized its input as the model ran, the other rows compute in float)")
    if result.by_name:
        return (f"matched {result.matched} tensors by name, op and readers (no QuantizeLinear -> DequantizeLinear "
                "pair: a float16, bfloat16 or weight-only model)")
    line = f"matched {result.matched} of {result.quantized_tensors} quantized activations to float tensors"
    if result.unmatched:
        line += (f"; {len(result.unmatched)} have no float counterpart (removed or renamed by passes, or added by "
                 "the quantizer: a HardSwish's gate on ONNX Runtime)")
    if result.skipped:
        line += f"; {len(result.skipped)} skipped (shapes differ)"
    return line


def render_speed(check: SpeedCheck) -> None:
    """Float vs quantized latency, the speedup, and the reasons when the quantized model is not faster."""
    timed_on = "" if check.inputs == "random" else f", on the first data batch ({check.inputs})"
    state.stdout.print(f"ONNX Runtime CPU, median of {check.runs} interleaved runs, "
                       f"threads={check.threads or 'default'}{timed_on}")
    rows = table(None, [("model", "left"), ("median ms", "right"), ("speedup", "right")])
    rows.add_row("float", f"{check.float_ms:.3f}", "1.00x")
    rows.add_row(check.label, f"{check.quant_ms:.3f}", f"{check.speedup:.2f}x")
    state.stdout.print(rows)
    if not check.slower:
        return
    state.stderr.print(f"warning: the {check.label} model is not faster than float on this machine "
                       f"({check.speedup:.2f}x)",
                       markup=False, highlight=False)
    for reason in check.reasons or ("no cause visible in the model or CPU: rerun with more runs",):
        state.stderr.print(f"  - {reason}", markup=False, highlight=False)

"""HardSwish in integer on ONNX Runtime: edgeopt's QLinearAdd + QLinearMul form against the float op.

ONNX Runtime has no integer HardSwish: between int8 layers it runs DequantizeLinear, HardSigmoid, Mul and
QuantizeLinear in float. edgeopt (int8, ONNX Runtime target) writes each HardSwish whose input spans at least
6 as an Add of 3 quantized over [0, 6] (the clamps are the quantization's ends) and a Mul by that gate, which
ONNX Runtime fuses into QLinearAdd and QLinearMul. Three models:

* ``mobilenet_v3_224``: MobileNetV3-Large at 1x3x224x224, untrained as ``quantize_vs_ort.py``'s 224x224
  models are (seeded weights, data-estimated BatchNorm statistics; fidelity to the float model on 512
  held-out smooth images);
* ``mobilenet_v3`` and ``demo``: ``quantize_vs_ort.py``'s trained digits models (its cached exports),
  accuracy on the 4,050 shifted digits test images too.

Each is quantized three ways, calibrated on the same samples as ``quantize_vs_ort.py`` (seed 0):

* ``edgeopt``: edgeopt's defaults (HardSwish in integer where it applies);
* ``edgeopt before``: the same with HardSwish and HardSigmoid given no rule on the ONNX Runtime target and not
  rewritten, as edgeopt was before: float between the Q/DQ pairs of their neighbours (patched in; on the demo
  model byte-identical to the previous commit's output, checked by hash). ``--exclude HardSwish`` is not that:
  it keeps the convolutions before the HardSwish float-out too;
* ``ORT``: ``onnxruntime.quantization.quantize_static`` after its ``quant_pre_process`` (QDQ, per-channel,
  uint8 activations, MinMax), its fastest model in ``quantize_vs_ort.py``.

Latency: the median of interleaved runs of (float, int8) pairs, one thread, pinned to one core (as
``quantize_vs_ort.py`` times); "vs fp32" is the speed-up within the pair, and "vs ORT" the latency relative to
ORT's int8 model as the two pairs' ratios give it (each against the float model timed beside it, so drift of
the machine between pairs cancels).

    python benchmarks/hardswish.py [--models mobilenet_v3_224,demo] [--markdown out.md]

Run by hand from the repository root (``tests.models`` must be importable); not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import sys
import tempfile
from dataclasses import dataclass
from unittest import mock

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from _common import environment, environment_markdown, markdown_table, publish  # noqa: E402
from quantize_vs_ort import (  # noqa: E402
    TEST_FEEDS_FOR_LATENCY,
    _fidelity,
    _pinned_to_one_core,
    _quantize_ort,
    _session,
    ort_preprocess,
    predict_batched,
    prepare_case,
)

MODELS = ("mobilenet_v3_224", "mobilenet_v3", "demo")
RUNS = {"mobilenet_v3_224": 100}  # else
SMALL_RUNS = 1000
SETTINGS = ("edgeopt", "edgeopt before", "ORT")


@dataclass
class Row:
    model: str
    setting: str
    path: pathlib.Path
    integer_hardswish: str = "-"
    sqnr_db: float = float("nan")
    agreement: float = float("nan")
    accuracy: float | None = None
    median_ms: float = float("nan")
    vs_fp32: float = float("nan")


@contextlib.contextmanager
def _as_before():
    """edgeopt as it was before it wrote HardSwish in integer: no rule for HardSwish/HardSigmoid on the ONNX
    Runtime target, nothing rewritten."""
    import edgeopt.quant.int8 as int8

    rules = {op: rule for op, rule in int8.OP_RULES.items() if op not in ("HardSwish", "HardSigmoid")}
    with (mock.patch.object(int8, "OP_RULES", rules),
          mock.patch.object(int8, "without_integer_form", lambda model, fmt, ranges=None: {}),
          mock.patch.object(int8, "lower_hard_activations", lambda model, fmt, listed: ({}, []))):
        yield


def _quantize(case, setting: str, work: pathlib.Path) -> Row:
    import edgeopt

    path = work / f"{case.name}-{setting.replace(' ', '-').lower()}.onnx"
    feeds = [{case.input_name: x[None]} for x in case.calib]
    row = Row(case.name, setting, path)
    if setting == "ORT":
        _quantize_ort({"model": str(case.prep_path), "output": str(path), "method": "MinMax"}, feeds)
        return row
    with _as_before() if setting == "edgeopt before" else contextlib.nullcontext():
        report = edgeopt.quantize(case.fp32_path, edgeopt.Int8Config(), feeds, output=path,
                                  check_fidelity=False, check_speed=False)
    total = sum(node.op_type == "HardSwish" for node in edgeopt.load(case.fp32_path).graph)
    written = sum(node.op_type == "HardSwish" for node in edgeopt.load(path).graph)
    row.integer_hardswish = f"{total - written} of {total}"
    return row


def _evaluate(case, row: Row, reference: np.ndarray) -> None:
    logits = predict_batched(_session(row.path), case.ext_x, case.input_name)
    row.agreement, row.sqnr_db = _fidelity(logits, reference)
    if not case.fidelity_only:
        row.accuracy = float(np.mean(logits.argmax(axis=1) == case.ext_y))


def _time(case, rows: list[Row], runs: int) -> None:
    from edgeopt.bench import BenchConfig, BenchTarget, bench_models

    feeds = [{case.input_name: x[None]} for x in case.test_x[:TEST_FEEDS_FOR_LATENCY]]
    config = BenchConfig(runs=runs, warmup=max(10, runs // 10), threads=1)

    def target(path: pathlib.Path) -> BenchTarget:
        return BenchTarget(name=path.name, onnx_bytes=path.read_bytes(), file_bytes=path.stat().st_size)

    with _pinned_to_one_core():
        for row in rows:
            result = bench_models([target(case.fp32_path), target(row.path)], [feeds, feeds], config)
            row.median_ms, row.vs_fp32 = result.models[1].median_ms, 1.0 / result.ratios()[1]


def run(models: list[str], work: pathlib.Path) -> list[Row]:
    rows = []
    for name in models:
        case = prepare_case(name, seed=0, calib_samples=200, work=work)
        ort_preprocess(case, work)
        reference = predict_batched(_session(case.fp32_path), case.ext_x, case.input_name)
        found = [_quantize(case, setting, work) for setting in SETTINGS]
        for row in found:
            _evaluate(case, row, reference)
        _time(case, found, RUNS.get(name, SMALL_RUNS))
        float_accuracy = None if case.fidelity_only else float(np.mean(reference.argmax(axis=1) == case.ext_y))
        print(f"[{name}] float accuracy {float_accuracy}", file=sys.stderr, flush=True)
        rows += found
    return rows


def table(rows: list[Row]) -> list[str]:
    ort = {row.model: row for row in rows if row.setting == "ORT"}
    body = [[row.model, row.setting, row.integer_hardswish, f"{row.sqnr_db:.2f}", f"{100 * row.agreement:.2f}",
             "-" if row.accuracy is None else f"{100 * row.accuracy:.2f}", f"{row.median_ms:.3f}",
             f"{row.vs_fp32:.2f}x", f"{ort[row.model].vs_fp32 / row.vs_fp32:.2f}x"] for row in rows]
    return markdown_table(["model", "setting", "HardSwish in int8", "SQNR dB", "agree %", "accuracy %",
                           "median ms", "vs fp32", "vs ORT"], body)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--markdown", type=pathlib.Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    env = environment(["benchmarks/hardswish.py", *argv])
    with tempfile.TemporaryDirectory() as folder:
        rows = run(models, pathlib.Path(folder))
    lines = ["## HardSwish in integer on ONNX Runtime", "", *environment_markdown(env), "", *table(rows), ""]
    text = "\n".join(lines)
    publish(text, args.markdown)


if __name__ == "__main__":
    main(sys.argv[1:])

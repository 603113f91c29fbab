"""edgeopt's dynamic int8 (``int8-dynamic``) next to ONNX Runtime's ``quantize_dynamic``, in one run.

Both write the same kind of graph: weights in int8 ahead of time, each MatMul input quantized to uint8
over its own range at run time (``DynamicQuantizeLinear`` + ``MatMulInteger``, which ONNX Runtime fuses
into ``DynamicQuantizeMatMul``). No calibration data, except for SmoothQuant.

Models (built here or by the repository's test builders; no downloads):

* ``bert``, ``gpt2``, ``vit``, ``t5``: the Hugging Face-style models of ``tests/hf_models.py`` (hidden 64);
  ``bert_fused``: that BERT after ONNX Runtime's transformer optimizer (``Attention``,
  ``EmbedLayerNormalization``, ``SkipLayerNormalization``: ``tests/quant/test_fused_transformers.py``);
  64 calibration samples (seed 1, SmoothQuant and static int8 only) and 64 evaluation samples (seed 2);
* ``llama``: the decoder of ``tests/llm_models.py`` with its KV cache, trained 200 steps on arithmetic
  progressions; ``llama_outliers``: the same trained weights with ``with_outlier_channels`` (RMSNorm
  gains x30 on three channels, the weights reading them /30: the same float function, LLM-style activation
  outliers). Samples of ``decoder_samples`` (64 + 64, seeds 1 and 2), and greedy decoding of 8 progression
  prompts for 16 tokens each, compared token by token with the float model's;
* ``transformer``: the digits transformer of ``quantize_vs_ort.py`` (trained, cached in
  ``benchmarks/.cache/``): its 200 calibration images and the 450-image test split, with accuracy;
* ``encoder768``: a BERT-base-size encoder, two ``nn.TransformerEncoderLayer(768, 12, 3072)`` (GELU) and
  a ``Linear(768, 10)`` head, seeded, input ``[1, 128, 768]``: fidelity on 16 random inputs (16 others
  calibrate), and latency at a realistic size; ``encoder768_prenorm``: the same with ``norm_first=True``
  (GPT's and ViT's order) and a LayerNorm before the head;
* ``lstm_speech``: a speech model's recurrent core, two sequence-first ``nn.LSTM(80, 512)`` layers over 100
  frames and a 30-way per-frame head, seeded (ORT's ``DynamicQuantizeLSTM`` on both sides).

Settings per model: fp32; ORT ``quantize_dynamic(weight_type=QInt8)`` with ``per_channel=False`` (its
default) and ``per_channel=True``; edgeopt ``DynamicInt8Config()`` (no data) and
``DynamicInt8Config(smoothquant_alpha=0.5)`` (with the calibration samples); for information, static int8
with the calibration samples side by side: ORT's ``quantize_static`` (QDQ, per-channel int8 weights, uint8
activations, MinMax) and edgeopt's ``Int8Config()``.

Measured: output SQNR (dB) of the first output against the float model over all evaluation samples
(concatenated), top-1 agreement of the argmax over the last axis, accuracy (digits transformer), greedy token
agreement (decoders); how many nodes of each file multiply by int8 (``int8 layers``: the tools do not quantize
the same set, e.g. ORT does not see through the ``Identity`` nodes an exporter writes for repeated weights,
and quantizes the ViT's patch Conv); model file size; quantize wall time (load + quantize + save, model path
in and file out for both tools, the least of ``--repeats`` in-process runs, all settings taking turns, after
imports); latency in ONNX Runtime: every setting of one model timed round-robin by ``edgeopt.bench`` (a worker
process per model, one intra-op thread, the same feed), median, and its ratio to fp32 and to ORT's per-channel
model; fp32 runs in a second process as well, and how far its two medians differ is noted as the noise floor
of those ratios.

Targets, checked for edgeopt's default and its SmoothQuant setting on every model: output SQNR >= ORT's
best dynamic setting (at 0.1 dB); int8 latency <= 1.05x ORT's per-channel model; file size <= ORT's
smaller file. Quantize time is reported, not judged.

Run from the repository root (``tests.*`` must be importable)::

    .venv/bin/python benchmarks/dynamic_vs_ort.py [--models bert,llama_outliers] [--quick] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import io
import logging
import os
import pathlib
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import (REPO_ROOT, environment, environment_markdown, markdown_table,  # noqa: E402
                     ort_quantize_static, publish)
from quantize_vs_ort import _import_both_tools  # noqa: E402

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

HF_MODELS = ("bert", "gpt2", "vit", "t5", "bert_fused")
DECODER_MODELS = ("llama", "llama_outliers")
LARGE_MODELS = ("encoder768", "encoder768_prenorm", "lstm_speech")  # realistic sizes, fewer latency runs
ALL_MODELS = (*HF_MODELS, *DECODER_MODELS, "transformer", *LARGE_MODELS)
CALIBRATION_SAMPLES, EVALUATION_SAMPLES = 64, 64
DIGITS_CALIBRATION_SAMPLES = 200
ENCODER_SAMPLES = 16  # calibration and evaluation inputs each, [1, 128, 768]
DECODER_TRAIN_STEPS = 200
GREEDY_PROMPTS, GREEDY_PROMPT_TOKENS, GREEDY_STEPS = 8, 6, 16
SMALL_RUNS, LARGE_RUNS = 200, 30  # latency runs per model: the small models, LARGE_MODELS
SMOOTHQUANT_ALPHA = 0.5
LATENCY_SLACK = 1.05


# ---------------------------------------------------------------- models and data


@dataclass
class Case:
    """One model: its float file, calibration and evaluation feeds, and what is measured on it."""

    name: str
    fp32_path: pathlib.Path
    calibration: list[dict]
    evaluation: list[dict]
    labels: np.ndarray | None = None  # one per evaluation feed (digits transformer)
    kv_heads: int | None = None  # decoders: greedy decoding through the cache
    runs: int = SMALL_RUNS
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _quiet():
    """torch's exporter prints and warns per op; none of it is about the benchmark."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


def hf_case(name: str, work: pathlib.Path) -> Case:
    from tests.hf_models import build_hf, hf_samples
    from tests.quant.test_fused_transformers import build_fused

    source = name.removesuffix("_fused")  # bert_fused: the BERT as ONNX Runtime's optimizer fuses it
    path = build_fused(source, work) if name.endswith("_fused") else build_hf(name, work)
    return Case(name=name, fp32_path=path, calibration=hf_samples(source, CALIBRATION_SAMPLES, seed=1),
                evaluation=hf_samples(source, EVALUATION_SAMPLES, seed=2))


@functools.cache
def _trained_decoder():
    import torch

    from tests.llm_models import Decoder, train

    torch.manual_seed(0)
    start = time.perf_counter()
    module = train(Decoder("llama"), steps=DECODER_TRAIN_STEPS)
    return module, time.perf_counter() - start


def decoder_case(name: str, work: pathlib.Path) -> Case:
    """The trained llama decoder; ``llama_outliers``: a copy with activation outlier channels."""
    import copy

    from tests.llm_models import decoder_samples, export_decoder, with_outlier_channels

    module, train_s = _trained_decoder()
    if name == "llama_outliers":
        module = with_outlier_channels(copy.deepcopy(module))
    path = export_decoder(module, work / f"{name}.onnx", opset=17)
    case = Case(name=name, fp32_path=path, kv_heads=module.kv_heads,
                calibration=decoder_samples(CALIBRATION_SAMPLES, kv_heads=module.kv_heads, seed=1),
                evaluation=decoder_samples(EVALUATION_SAMPLES, kv_heads=module.kv_heads, seed=2))
    case.notes.append(f"trained {DECODER_TRAIN_STEPS} steps in {train_s:.1f} s")
    return case


def digits_case(work: pathlib.Path) -> Case:
    from quantize_vs_ort import prepare_case

    digits = prepare_case("transformer", seed=0, calib_samples=DIGITS_CALIBRATION_SAMPLES, work=work)
    return Case(name="transformer", fp32_path=digits.fp32_path,
                calibration=[{digits.input_name: image[None]} for image in digits.calib],
                evaluation=[{digits.input_name: image[None]} for image in digits.test_x], labels=digits.test_y)


def _encoder768(norm_first: bool):
    from torch import nn

    def layer() -> nn.Module:
        return nn.TransformerEncoderLayer(768, 12, 3072, batch_first=True, dropout=0.0, activation="gelu",
                                          norm_first=norm_first)

    final = [nn.LayerNorm(768)] if norm_first else []
    return nn.Sequential(layer(), layer(), *final, nn.Linear(768, 10)).eval()


def encoder_case(work: pathlib.Path, name: str) -> Case:
    """BERT-base-size: two 768-wide encoder layers (12 heads, FFN 3072) and a 10-way head, [1, 128, 768];
    ``encoder768_prenorm``: the layers normalize first (GPT's and ViT's order), a LayerNorm before the head."""
    import torch

    torch.manual_seed(0)
    module, path = _encoder768(name == "encoder768_prenorm"), work / f"{name}.onnx"
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused inference op does not export
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(module, (torch.zeros(1, 128, 768),), str(path), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["logits"])
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)

    def inputs(seed: int) -> list[dict]:
        rng = np.random.default_rng(seed)
        return [{"input": rng.standard_normal((1, 128, 768)).astype(np.float32)} for _ in range(ENCODER_SAMPLES)]

    return Case(name=name, fp32_path=path, calibration=inputs(1), evaluation=inputs(2), runs=LARGE_RUNS)


def lstm_case(work: pathlib.Path) -> Case:
    """A speech model's recurrent core: two sequence-first LSTM layers (80 mel bands in, hidden 512) over 100
    frames and a 30-way per-frame head, seeded, [100, 1, 80]."""
    import torch
    from torch import nn

    class Speech(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = nn.LSTM(80, 512, num_layers=2), nn.Linear(512, 30)

        def forward(self, frames):
            return self.head(self.rnn(frames)[0])

    torch.manual_seed(0)
    module, path = Speech().eval(), work / "lstm_speech.onnx"
    with _quiet(), torch.no_grad():
        torch.onnx.export(module, (torch.zeros(100, 1, 80),), str(path), dynamo=False, opset_version=17,
                          input_names=["frames"], output_names=["logits"])

    def inputs(seed: int) -> list[dict]:
        rng = np.random.default_rng(seed)
        return [{"frames": rng.standard_normal((100, 1, 80)).astype(np.float32)} for _ in range(ENCODER_SAMPLES)]

    return Case(name="lstm_speech", fp32_path=path, calibration=inputs(1), evaluation=inputs(2), runs=LARGE_RUNS)


def build_case(name: str, work: pathlib.Path) -> Case:
    if name in HF_MODELS:
        return hf_case(name, work)
    if name in DECODER_MODELS:
        return decoder_case(name, work)
    if name == "lstm_speech":
        return lstm_case(work)
    return digits_case(work) if name == "transformer" else encoder_case(work, name)


# ---------------------------------------------------------------- the quantizers


def quantize_ort(source: pathlib.Path, target: pathlib.Path, data: list[dict], *,
                 per_channel: bool) -> tuple[str, ...]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    del data  # dynamic: no calibration
    # DefaultTensorType: the type ORT falls back to where its shape inference finds none (the fused BERT's
    # com.microsoft ops); without it ORT refuses that model, and it changes nothing where types are known
    quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=per_channel,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return ()


def quantize_edgeopt(source: pathlib.Path, target: pathlib.Path, data: list[dict], *,
                     smoothquant_alpha: float | None) -> tuple[str, ...]:
    """Returns edgeopt's note on SmoothQuant: how many MatMul inputs it smoothed, how many it could not."""
    import edgeopt

    config = edgeopt.DynamicInt8Config(smoothquant_alpha=smoothquant_alpha)
    report = edgeopt.quantize(source, config, None if smoothquant_alpha is None else data, output=target,
                              check_fidelity=False, check_speed=False)
    return tuple(n for n in report.result.notes if n.startswith("SmoothQuant"))


def quantize_edgeopt_static(source: pathlib.Path, target: pathlib.Path, data: list[dict]) -> tuple[str, ...]:
    import edgeopt

    edgeopt.quantize(source, edgeopt.Int8Config(), data, output=target, check_fidelity=False, check_speed=False)
    return ()


def quantize_ort_static(source: pathlib.Path, target: pathlib.Path, data: list[dict]) -> tuple[str, ...]:
    """ORT's ``quantize_static`` with MinMax (its Percentile and Entropy calibrators fail on samples of different
    lengths)."""
    import onnx

    ort_quantize_static(source, target, data, "MinMax", DefaultTensorType=onnx.TensorProto.FLOAT)
    return ()


@dataclass(frozen=True)
class Setting:
    key: str  # file stem
    label: str
    quantize: Callable[[pathlib.Path, pathlib.Path, list[dict]], tuple[str, ...]]  # -> notes for the report
    tool: str  # "ort" or "edgeopt"
    judged: bool = False  # checked against the targets


ORT_PER_TENSOR = Setting("ort-tensor", "ORT per-tensor (default)",
                         functools.partial(quantize_ort, per_channel=False), "ort")
ORT_PER_CHANNEL = Setting("ort-channel", "ORT per-channel", functools.partial(quantize_ort, per_channel=True), "ort")
SETTINGS = (
    ORT_PER_TENSOR,
    ORT_PER_CHANNEL,
    Setting("edgeopt", "edgeopt int8-dynamic (default)",
            functools.partial(quantize_edgeopt, smoothquant_alpha=None), "edgeopt", judged=True),
    Setting("edgeopt-sq", f"edgeopt int8-dynamic --smoothquant {SMOOTHQUANT_ALPHA}",
            functools.partial(quantize_edgeopt, smoothquant_alpha=SMOOTHQUANT_ALPHA), "edgeopt", judged=True),
    Setting("ort-static", "ORT static int8 (info)", quantize_ort_static, "ort"),
    Setting("edgeopt-static", "edgeopt static int8 (info)", quantize_edgeopt_static, "edgeopt"),
)


# ---------------------------------------------------------------- measuring


@dataclass
class Row:
    setting: Setting
    path: pathlib.Path | None = None
    error: str | None = None
    quantize_s: float | None = None
    file_bytes: int | None = None
    int8_layers: int | None = None
    sqnr_db: float | None = None
    agreement: float | None = None
    accuracy: float | None = None
    greedy_agreement: float | None = None
    latency_ms: float | None = None
    vs_fp32: float | None = None  # latency ratios, within one round-robin run
    vs_ort_channel: float | None = None


def _error_text(error: BaseException) -> str:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}"[:300]


def quantize_all(case: Case, work: pathlib.Path, repeats: int) -> None:
    """Every setting ``repeats`` times, taking turns; the least wall time is kept."""
    case.rows = [Row(setting=s, path=work / f"{case.name}.{s.key}.onnx") for s in SETTINGS]
    for repeat in range(repeats):
        for row in (r for r in case.rows if r.error is None):
            print(f"[{case.name}] {row.setting.label} ({repeat + 1}/{repeats}) ...", file=sys.stderr, flush=True)
            gc.collect()
            start = time.perf_counter()
            try:
                notes = row.setting.quantize(case.fp32_path, row.path, case.calibration)
            except Exception as error:  # reported in the table; the benchmark goes on
                traceback.print_exc()
                row.error, row.path = _error_text(error), None
                continue
            elapsed = time.perf_counter() - start
            if repeat == 0:
                case.notes += [f"edgeopt {note}" for note in notes]
            row.quantize_s = elapsed if row.quantize_s is None else min(row.quantize_s, elapsed)
    for row in case.rows:
        if row.path is not None:
            row.file_bytes, row.int8_layers = row.path.stat().st_size, int8_layers(row.path)


INTEGER_OPS = frozenset({"MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                         "DynamicQuantizeLSTM", "QAttention", "QEmbedLayerNormalization"})


def int8_layers(path: pathlib.Path) -> int:
    """Nodes that multiply by int8: integer ops (dynamic), or a MatMul/Gemm/Conv whose second input comes
    out of a DequantizeLinear (static QDQ; attention's activation x activation MatMuls included)."""
    import onnx

    nodes = onnx.load(str(path)).graph.node
    dequantized = {output for n in nodes if n.op_type == "DequantizeLinear" for output in n.output}
    return sum(n.op_type in INTEGER_OPS or (n.op_type in ("MatMul", "Gemm", "Conv") and len(n.input) > 1
                                            and n.input[1] in dequantized) for n in nodes)


def _session(path: pathlib.Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT's quantizer leaves unused initializers: a warning each
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def first_outputs(session, feeds: list[dict]) -> list[np.ndarray]:
    return [session.run(None, feed)[0] for feed in feeds]


def sqnr_db(reference: list[np.ndarray], other: list[np.ndarray]) -> float:
    reference = np.concatenate([r.ravel() for r in reference]).astype(np.float64)
    noise = float(np.sum((reference - np.concatenate([o.ravel() for o in other])) ** 2))
    return float("inf") if noise == 0 else float(10 * np.log10(float(np.sum(reference ** 2)) / noise))


def top1(outputs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([o.reshape(-1, o.shape[-1]).argmax(-1) for o in outputs])


def greedy_tokens(session, kv_heads: int) -> np.ndarray:
    from tests.llm_models import greedy, progression

    prompts = progression(GREEDY_PROMPTS, GREEDY_PROMPT_TOKENS, np.random.default_rng(3)).astype(np.int64)
    return np.array([greedy(session, prompt[None], GREEDY_STEPS, kv_heads) for prompt in prompts])


@dataclass
class Reference:
    """The float model's outputs that every quantized one is compared with."""

    outputs: list[np.ndarray]
    top1: np.ndarray
    tokens: np.ndarray | None


def evaluate(case: Case) -> Reference:
    session = _session(case.fp32_path)
    outputs = first_outputs(session, case.evaluation)
    reference = Reference(outputs=outputs, top1=top1(outputs),
                          tokens=None if case.kv_heads is None else greedy_tokens(session, case.kv_heads))
    for row in (r for r in case.rows if r.path is not None):
        try:
            session = _session(row.path)
            outputs = first_outputs(session, case.evaluation)
        except Exception as error:
            row.error, row.path = f"ORT cannot run it: {_error_text(error)}", None
            continue
        row.sqnr_db, predicted = sqnr_db(reference.outputs, outputs), top1(outputs)
        row.agreement = float(np.mean(predicted == reference.top1))
        if case.labels is not None:
            row.accuracy = float(np.mean(predicted == case.labels))
        if reference.tokens is not None:
            row.greedy_agreement = float(np.mean(greedy_tokens(session, case.kv_heads) == reference.tokens))
    return reference


def time_latency(case: Case, runs: int) -> float | None:
    """Median ms of every model, all timed round-robin on the first evaluation feed; returns fp32's.

    fp32 runs in two processes: how far apart two copies of one model come out is the noise floor
    of the ratios (noted per model)."""
    from edgeopt.bench import BenchConfig, BenchTarget, bench_models
    from edgeopt.errors import EdgeoptError

    rows = [r for r in case.rows if r.path is not None]
    paths = [case.fp32_path, case.fp32_path, *(r.path for r in rows)]
    targets = [BenchTarget(name=f"{i}:{p.name}", onnx_bytes=p.read_bytes(), file_bytes=p.stat().st_size)
               for i, p in enumerate(paths)]
    config = BenchConfig(runs=runs, warmup=max(5, runs // 10), threads=1)
    try:
        result = bench_models(targets, [case.evaluation[:1]] * len(targets), config)
    except EdgeoptError as error:
        case.notes.append(f"latency not measured: {_error_text(error)}")
        return None
    medians = [m.median_ms for m in result.models]
    case.notes.append(f"fp32 timed in a second process too: {medians[1] / medians[0]:.3f}x the first "
                      "(the noise floor of the latency ratios)")
    channel = next((m for r, m in zip(rows, medians[2:]) if r.setting is ORT_PER_CHANNEL), None)
    for row, median in zip(rows, medians[2:]):
        row.latency_ms, row.vs_fp32 = median, median / medians[0]
        row.vs_ort_channel = None if channel is None else median / channel
    return medians[0]


# ---------------------------------------------------------------- targets


@dataclass(frozen=True)
class Check:
    target: str
    model: str
    edgeopt: str
    ort: str
    measured: str
    passed: bool | None


def _row(case: Case, setting: Setting) -> Row | None:
    return next((r for r in case.rows if r.setting is setting and r.error is None), None)


def checks_for(case: Case, row: Row) -> list[Check]:
    ort_rows = [r for r in (_row(case, ORT_PER_TENSOR), _row(case, ORT_PER_CHANNEL)) if r is not None]
    who = row.setting.label
    if not ort_rows:
        return [Check("all", case.name, who, "no ORT result", "-", None)]
    best = max(ort_rows, key=lambda r: r.sqnr_db)
    margin_db = round(row.sqnr_db, 1) - round(best.sqnr_db, 1)  # at the precision shown
    checks = [Check("output SQNR >= ORT's best", case.name, f"{who} {row.sqnr_db:.1f} dB",
                    f"{best.setting.label} {best.sqnr_db:.1f} dB", f"{margin_db:+.1f} dB", margin_db >= -1e-9)]
    channel = _row(case, ORT_PER_CHANNEL)
    if channel is not None and row.latency_ms is not None and channel.latency_ms is not None:
        ratio = row.latency_ms / channel.latency_ms
        checks.append(Check(f"latency <= {LATENCY_SLACK}x ORT per-channel", case.name, f"{who} {row.latency_ms:.3f} ms",
                            f"{channel.latency_ms:.3f} ms", f"{ratio:.3f}x", ratio <= LATENCY_SLACK))
    smaller = min(ort_rows, key=lambda r: r.file_bytes)
    checks.append(Check("file size <= ORT's smaller", case.name, f"{who} {row.file_bytes / 1024:.1f} KiB",
                        f"{smaller.setting.label} {smaller.file_bytes / 1024:.1f} KiB",
                        f"{row.file_bytes / smaller.file_bytes:.3f}x", row.file_bytes <= smaller.file_bytes))
    return checks


def all_checks(cases: list[Case]) -> list[Check]:
    checks = []
    for case in cases:
        for setting in (s for s in SETTINGS if s.judged):
            row = _row(case, setting)
            checks += (checks_for(case, row) if row is not None else
                       [Check("all", case.name, f"{setting.label}: no result", "-", "-", False)])
    return checks


# ---------------------------------------------------------------- report


def _fmt(value: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "-" if value is None else format(value * scale, spec) + suffix


def results_table(cases: list[Case], fp32: dict[str, tuple[int, float | None, float | None]]) -> list[str]:
    headers = ["model", "setting", "int8 layers", "SQNR dB", "top-1 agree %", "accuracy %", "greedy %", "KiB",
               "quantize s", "median ms", "vs fp32", "vs ORT per-ch"]
    rows = []
    for case in cases:
        file_bytes, float_ms, float_accuracy = fp32[case.name]
        rows.append([case.name, "fp32", "-", "-", "-", _fmt(float_accuracy, ".2f", 100),
                     "-" if case.kv_heads is None else "100.0", f"{file_bytes / 1024:.1f}", "-",
                     _fmt(float_ms, ".3f"), "1.00x", "-"])
        for row in case.rows:
            if row.error:
                rows.append([case.name, row.setting.label, row.error, *["-"] * 9])
                continue
            rows.append([case.name, row.setting.label, row.int8_layers, f"{row.sqnr_db:.1f}",
                         f"{100 * row.agreement:.1f}", _fmt(row.accuracy, ".2f", 100),
                         _fmt(row.greedy_agreement, ".1f", 100),
                         f"{row.file_bytes / 1024:.1f}", f"{row.quantize_s:.3f}", _fmt(row.latency_ms, ".3f"),
                         _fmt(row.vs_fp32, ".2f", suffix="x"), _fmt(row.vs_ort_channel, ".2f", suffix="x")])
    return markdown_table(headers, rows, right=[False, False, *[True] * 10])


def checks_table(checks: list[Check]) -> list[str]:
    verdict = {True: "PASS", False: "FAIL", None: "-"}
    lines = markdown_table(["target", "model", "edgeopt", "ORT", "measured", "result"],
                           [[c.target, c.model, c.edgeopt, c.ort, c.measured, verdict[c.passed]] for c in checks])
    judged = [c for c in checks if c.passed is not None]
    return [*lines, "", f"{sum(c.passed for c in judged)} of {len(judged)} checks pass."]


def report(cases: list[Case], fp32: dict, env: dict, args: argparse.Namespace, load_start: float) -> str:
    lines = ["## dynamic_vs_ort: edgeopt int8-dynamic vs onnxruntime.quantization.quantize_dynamic", "",
             *environment_markdown(env),
             f"- quantize s: the least of {args.repeats} in-process runs (path in, file out), settings taking "
             "turns; latency: every setting of a model round-robin in its own process (edgeopt.bench), "
             f"1 intra-op thread, the first evaluation feed, {args.small_runs} runs ({args.large_runs} for "
             "the encoder768s and lstm_speech), median; 'vs' columns are latency ratios (below 1 is faster)",
             "- SQNR and top-1 agreement: first output against the float model over every evaluation sample "
             f"(hf models and decoders {EVALUATION_SAMPLES}, transformer 450 test images, the encoder768s and "
             f"lstm_speech {ENCODER_SAMPLES}); greedy %: tokens equal to the float model's, {GREEDY_PROMPTS} prompts x "
             f"{GREEDY_STEPS} steps",
             f"- load average (1 min) at start {load_start:.2f}, at end {os.getloadavg()[0]:.2f} on "
             f"{os.cpu_count()} cores",
             *(f"- {case.name}: {'; '.join(case.notes)}" for case in cases if case.notes),
             "", "### Results", "", *results_table(cases, fp32), "",
             "### Targets (edgeopt's default and SmoothQuant settings)", "",
             f"- SQNR against ORT's better dynamic setting, compared at 0.1 dB; latency against ORT's "
             f"per-channel model (<= {LATENCY_SLACK}x); file size against ORT's smaller file",
             "- the small models run in about 0.1 ms, where a few per cent between processes is noise (see the "
             "fp32 copy of each model above): their latency verdicts can flip from run to run, encoder768's and "
             "lstm_speech's much less", "",
             *checks_table(all_checks(cases))]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def run_case(name: str, work: pathlib.Path, args: argparse.Namespace) -> tuple[Case, tuple]:
    print(f"[{name}] building ...", file=sys.stderr, flush=True)
    case = build_case(name, work)
    quantize_all(case, work, args.repeats)
    reference = evaluate(case)
    float_accuracy = None if case.labels is None else float(np.mean(reference.top1 == case.labels))
    print(f"[{name}] timing {1 + sum(r.path is not None for r in case.rows)} models ...", file=sys.stderr, flush=True)
    float_ms = time_latency(case, args.large_runs if case.runs == LARGE_RUNS else args.small_runs)
    return case, (case.fp32_path.stat().st_size, float_ms, float_accuracy)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ALL_MODELS), help=f"comma-separated, from {', '.join(ALL_MODELS)}")
    parser.add_argument("--repeats", type=int, default=3, help="quantize runs per setting; the least time is kept")
    parser.add_argument("--quick", action="store_true", help="1 quantize run, 50 / 10 latency runs")
    parser.add_argument("--markdown", type=pathlib.Path, help="also write the report here")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(ALL_MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(ALL_MODELS)}")
    args.small_runs, args.large_runs = (50, 10) if args.quick else (SMALL_RUNS, LARGE_RUNS)
    args.repeats = 1 if args.quick else args.repeats
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    env = environment([str(pathlib.Path(sys.argv[0])), *argv])
    load_start = os.getloadavg()[0]
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)  # a line per node otherwise
    # ORT's quantize_dynamic logs this on the root logger at every call
    logging.getLogger().addFilter(lambda record: "pre-processing before quantization" not in record.getMessage())
    _import_both_tools()
    start = time.perf_counter()
    cases, fp32 = [], {}
    with tempfile.TemporaryDirectory(prefix="dynamic_vs_ort_") as tmp:
        for name in args.models:
            case, fp32[name] = run_case(name, pathlib.Path(tmp), args)
            cases.append(case)
    text = report(cases, fp32, env, args, load_start)
    text += f"\nTotal benchmark time {time.perf_counter() - start:.0f} s.\n"
    publish(text, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""edgeopt's int8 quantizer next to ONNX Runtime's ``quantize_static``, in one run.

Models: the bundled digits demo CNN and the torch architectures of
``tests/models.py`` (MobileNetV2/V3-, EfficientNet-, ResNet-style CNNs and a
transformer encoder), each trained for a few epochs on scikit-learn's digits
(the 8x8 images upsampled bilinearly: to 3x32x32 for the CNNs, to a 16x32
sequence for the transformer) and exported to ONNX. Trained models are cached
in ``benchmarks/.cache/`` keyed by name, seed and epochs.

For every model and every quantizer setting, in a fresh process each:

* edgeopt: ``quantize(model, Int8Config(calibration=M), data)`` for each
  calibration method M (per-channel int8 weights, uint8 activations: the ORT
  target's defaults);
* ONNX Runtime: ``quantize_static(QDQ, per_channel=True, uint8 activations,
  int8 weights)`` for each ``CalibrationMethod``, on the exported model and on
  the model after ORT's recommended ``quant_pre_process``.

Both get the same calibration samples (``--calib-samples`` drawn with
``--seed`` from the digits training split, batch 1) and import the same
libraries before the clock starts. Measured:

* accuracy on the digits test split (450 images) and its drop in points from
  the float model; output SQNR (dB) and top-1 agreement with the float model;
* wall time of load + calibrate + quantize + save (ORT's ``quant_pre_process``
  runs once beforehand, outside that time, and is reported separately);
* peak RSS (``ru_maxrss``) of the quantizing process;
* int8 latency in ONNX Runtime (median, one intra-op thread): each quantized
  model timed interleaved with the float model by ``edgeopt.bench`` (the bytes
  each tool wrote, unmodified), so "vs fp32" is a within-pair ratio.

Time and RSS are the least of ``--repeats`` interleaved runs of each setting.

The targets of the quantizer issue are then checked for edgeopt's default
setting and its most accurate one: accuracy against ORT's most accurate
setting; time and memory against ORT's run with the same calibration method
(else ORT's most accurate); latency against ORT's recommended flow
(``quant_pre_process`` + ``quantize_static``) with the same method (else
MinMax). The latency phase runs pinned to one core.

Run from the repository root (``tests.models`` must be importable)::

    python benchmarks/quantize_vs_ort.py [--models demo,resnet] [--calib-samples 200]
        [--runs 200] [--seed 0] [--quick] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    REPO_ROOT,
    WORKER_RESULT_PREFIX,
    digits_split,
    environment,
    environment_markdown,
    markdown_table,
    peak_rss_mb,
    prepare_cache_dir,
    run_worker,
)

SCRIPT = pathlib.Path(__file__).resolve()
ALL_MODELS = ("demo", "mobilenet_v2", "mobilenet_v3", "efficientnet", "resnet", "transformer")
CONV_MODELS = frozenset(ALL_MODELS) - {"transformer"}
ORT_METHODS = ("MinMax", "Entropy", "Percentile", "Distribution")
EDGEOPT_METHODS = ("minmax", "percentile", "entropy", "mse", "auto")
# edgeopt method -> ORT method with the same algorithm (for time/memory pairs)
SAME_METHOD = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
TRAIN_EPOCHS = {"mobilenet_v2": 20, "mobilenet_v3": 20, "efficientnet": 20, "resnet": 15, "transformer": 40}
TEST_FEEDS_FOR_LATENCY = 16


# ---------------------------------------------------------------- settings and results


@dataclass(frozen=True)
class Setting:
    tool: str  # "edgeopt" or "ort"
    method: str  # edgeopt CalibrationMethod value or ORT CalibrationMethod name
    preprocessed: bool = False  # ORT only: quant_pre_process ran first

    @property
    def label(self) -> str:
        return f"{self.method} + pre-process" if self.preprocessed else self.method

    @property
    def stem(self) -> str:
        return f"{self.tool}-{self.method.lower()}{'-prep' if self.preprocessed else ''}"


@dataclass
class Row:
    setting: Setting
    path: pathlib.Path | None = None
    error: str | None = None
    wall_s: float | None = None
    peak_rss_mb: float | None = None
    baseline_rss_mb: float | None = None
    accuracy: float | None = None
    agreement: float | None = None
    sqnr_db: float | None = None
    latency_ms: float | None = None
    relative: float | None = None  # int8 / fp32 median latency, timed as a pair


@dataclass
class Case:
    """One architecture: its float model, data, and everything measured on it."""

    name: str
    fp32_path: pathlib.Path
    input_name: str
    calib: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    train_s: float | None = None
    prep_path: pathlib.Path | None = None
    prep_s: float | None = None
    float_accuracy: float = float("nan")
    float_latency_ms: float | None = None
    float_logits: np.ndarray | None = field(default=None, repr=False)
    rows: list[Row] = field(default_factory=list)


# ---------------------------------------------------------------- worker (one quantization)


def _import_both_tools() -> None:
    """Import what either tool needs, so both workers start from the same baseline RSS."""
    import onnx  # noqa: F401
    import onnx_ir  # noqa: F401
    import onnxruntime  # noqa: F401
    import onnxruntime.quantization  # noqa: F401

    import edgeopt.api  # noqa: F401
    import edgeopt.io  # noqa: F401
    try:
        import edgeopt.quant  # noqa: F401
    except ImportError:
        pass


def _quantize_ort(payload: dict, feeds: list[dict]) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(feeds)

        def get_next(self):
            return next(self._feeds, None)

    quantize_static(payload["model"], payload["output"], Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod[payload["method"]])


def _quantize_edgeopt(payload: dict, feeds: list[dict]) -> None:
    from edgeopt import api
    from edgeopt.io import save_model
    from edgeopt.quant import CalibrationMethod, Int8Config, quantize

    model = api.load(payload["model"])
    result = quantize(model, Int8Config(calibration=CalibrationMethod(payload["method"])), feeds)
    save_model(result.model, payload["output"])


def worker_main(payload: dict) -> None:
    """Quantize one model with one setting; report wall time and peak RSS as JSON."""
    _import_both_tools()
    calib = np.load(payload["calib"])
    feeds = [{payload["input"]: calib[i:i + 1]} for i in range(len(calib))]
    baseline = peak_rss_mb()
    quantize = _quantize_ort if payload["tool"] == "ort" else _quantize_edgeopt
    start = time.perf_counter()
    try:
        quantize(payload, feeds)
    except Exception as error:  # reported in the table, the benchmark goes on
        traceback.print_exc()
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        result = {"error": f"{type(error).__name__}: {message}"[:300]}
    else:
        result = {"wall_s": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(),
                  "baseline_rss_mb": baseline}
    print(WORKER_RESULT_PREFIX + json.dumps(result), flush=True)


# ---------------------------------------------------------------- models and data


def _to_model_input(name: str, images: np.ndarray) -> np.ndarray:
    """Digits [N,1,8,8] -> the architecture's input: 3x32x32 (CNNs) or a 16x32 sequence."""
    if name == "demo":
        return images
    import torch
    from torch.nn import functional as F

    tensor = torch.from_numpy(images)
    if name == "transformer":
        return F.interpolate(tensor, size=(16, 32), mode="bilinear", align_corners=False)[:, 0].numpy()
    return F.interpolate(tensor, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1).numpy()


def _random_shift(images, generator):
    """Shift each 8x8 image by up to one pixel in each direction, zero-filled (train_demo.py's augmentation)."""
    import torch
    from torch.nn import functional as F

    padded = F.pad(images, (1, 1, 1, 1))
    offsets = torch.randint(0, 3, (images.shape[0], 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + 8, dx:dx + 8] for i, (dy, dx) in enumerate(offsets)])


def _train(name: str, x_train: np.ndarray, y_train: np.ndarray, *, seed: int, epochs: int):
    """A fresh ``tests.models`` architecture trained on digits with fixed seeds (AdamW, one-cycle)."""
    import torch
    from torch.nn import functional as F

    from tests.models import TORCH_MODELS

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    module = TORCH_MODELS[name][0]()
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    batch = 64
    steps = epochs * -(-len(x) // batch)
    lr = 1e-3 if name == "transformer" else 4e-3
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    module.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            index = order[start:start + batch]
            inputs = torch.from_numpy(_to_model_input(name, _random_shift(x[index], generator).numpy()))
            loss = F.cross_entropy(module(inputs), y[index], label_smoothing=0.05)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return module.eval()


def _trained_onnx(name: str, seed: int, x_train: np.ndarray, y_train: np.ndarray) -> tuple[pathlib.Path, float]:
    """The cached trained export of ``name`` (trained now if missing) and its training seconds."""
    import torch

    from tests.models import TORCH_MODELS, export_onnx

    epochs = TRAIN_EPOCHS[name]
    cache = prepare_cache_dir()
    path = cache / f"{name}-seed{seed}-e{epochs}-torch{torch.__version__}.onnx"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        return path, json.loads(meta.read_text())["train_s"]
    print(f"[{name}] training {epochs} epochs on digits ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    module = _train(name, x_train, y_train, seed=seed, epochs=epochs)
    train_s = time.perf_counter() - start
    staging = path.with_suffix(".tmp.onnx")
    export_onnx(module, (torch.zeros(*TORCH_MODELS[name][1]),), staging)
    staging.replace(path)
    meta.write_text(json.dumps({"train_s": train_s, "epochs": epochs, "seed": seed}))
    return path, train_s


def prepare_case(name: str, *, seed: int, calib_samples: int, work: pathlib.Path) -> Case:
    """Float model, calibration samples and test split for architecture ``name``."""
    x_train, x_test, y_train, y_test = digits_split()
    if name == "demo":
        from edgeopt.demo import demo_data, demo_model_path

        source, train_s = demo_model_path(), None
        x_test, y_test = demo_data()
    else:
        source, train_s = _trained_onnx(name, seed, x_train, y_train)
    fp32 = work / f"{name}-fp32.onnx"
    shutil.copyfile(source, fp32)
    pick = np.random.default_rng(seed).choice(len(x_train), size=min(calib_samples, len(x_train)), replace=False)
    calib = np.ascontiguousarray(_to_model_input(name, x_train[np.sort(pick)]), dtype=np.float32)
    return Case(name=name, fp32_path=fp32, input_name="input", calib=calib,
                test_x=np.ascontiguousarray(_to_model_input(name, x_test), dtype=np.float32),
                test_y=y_test, train_s=train_s)


def ort_preprocess(case: Case, work: pathlib.Path) -> None:
    """ORT's recommended step before quantize_static (symbolic shapes, graph optimization)."""
    import onnxruntime as ort
    from onnxruntime.quantization.shape_inference import quant_pre_process

    ort.set_default_logger_severity(3)
    path = work / f"{case.name}-fp32-prep.onnx"
    start = time.perf_counter()
    try:
        quant_pre_process(str(case.fp32_path), str(path))
    except Exception as error:  # then ORT's pre-processed rows report the error
        print(f"[{case.name}] quant_pre_process failed: {error}", file=sys.stderr)
        return
    case.prep_path, case.prep_s = path, time.perf_counter() - start


# ---------------------------------------------------------------- measuring


def quantize_row(case: Case, setting: Setting, work: pathlib.Path, calib_path: pathlib.Path) -> Row:
    row = Row(setting=setting)
    source = case.prep_path if setting.preprocessed else case.fp32_path
    if source is None:
        row.error = "quant_pre_process failed"
        return row
    output = work / f"{case.name}-{setting.stem}.onnx"
    payload = {"tool": setting.tool, "method": setting.method, "model": str(source), "output": str(output),
               "calib": str(calib_path), "input": case.input_name}
    result = run_worker(SCRIPT, payload)
    if "error" in result:
        row.error = result["error"]
        return row
    row.path, row.wall_s = output, result["wall_s"]
    row.peak_rss_mb, row.baseline_rss_mb = result["peak_rss_mb"], result["baseline_rss_mb"]
    return row


def merge_repeats(first: Row, again: Row) -> Row:
    """Keep the smaller wall time and peak RSS of two runs of one setting (same output model)."""
    if first.error or again.error:
        return first if first.error else again
    first.wall_s = min(first.wall_s, again.wall_s)
    first.peak_rss_mb = min(first.peak_rss_mb, again.peak_rss_mb)
    first.baseline_rss_mb = min(first.baseline_rss_mb, again.baseline_rss_mb)
    return first


def predict(path: pathlib.Path, images: np.ndarray, input_name: str) -> np.ndarray:
    """Logits of every image, batch 1, in ONNX Runtime (default graph optimizations)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {input_name: image[None]})[0].reshape(1, -1) for image in images])


def evaluate(case: Case) -> None:
    """Accuracy, SQNR and top-1 agreement of every quantized model against the float one."""
    case.float_logits = predict(case.fp32_path, case.test_x, case.input_name)
    reference = case.float_logits
    case.float_accuracy = float(np.mean(reference.argmax(1) == case.test_y))
    for row in case.rows:
        if row.path is None:
            continue
        try:
            logits = predict(row.path, case.test_x, case.input_name)
        except Exception as error:
            row.error, row.path = f"ORT cannot run it: {str(error).splitlines()[0][:200]}", None
            continue
        row.accuracy = float(np.mean(logits.argmax(1) == case.test_y))
        row.agreement = float(np.mean(logits.argmax(1) == reference.argmax(1)))
        noise = float(np.sum((logits - reference) ** 2))
        row.sqnr_db = float("inf") if noise == 0 else 10 * np.log10(float(np.sum(reference ** 2)) / noise)


def time_latency(case: Case, runs: int) -> None:
    """Median latency of every quantized model, each timed interleaved with the float model, one thread.

    Pairs (fp32, int8) rather than all models at once: with more than a few
    worker processes taking turns on two cores every inference starts with
    cold caches. ``relative`` is the int8/fp32 ratio within the pair, so
    comparisons between quantized models are immune to drift of the machine.
    """
    from edgeopt.bench import BenchConfig, BenchTarget

    feeds = [{case.input_name: image[None]} for image in case.test_x[:TEST_FEEDS_FOR_LATENCY]]
    config = BenchConfig(runs=runs, warmup=max(10, runs // 10), threads=1)
    fp32 = BenchTarget(name=case.fp32_path.name, onnx_bytes=case.fp32_path.read_bytes(),
                       file_bytes=case.fp32_path.stat().st_size)
    float_ms = []
    with _pinned_to_one_core():
        _time_pairs(case, fp32, feeds, config, float_ms)
    case.float_latency_ms = float(np.median(float_ms)) if float_ms else None


@contextlib.contextmanager
def _pinned_to_one_core():
    """Run the bench workers (they inherit the affinity) on one core, so both models of a pair
    share that core's caches and whatever else the machine runs there."""
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {max(previous)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


def _time_pairs(case: Case, fp32, feeds: list, config, float_ms: list[float]) -> None:
    from edgeopt.bench import BenchTarget, bench_models

    for row in case.rows:
        if row.path is None:
            continue
        int8 = BenchTarget(name=row.path.name, onnx_bytes=row.path.read_bytes(), file_bytes=row.path.stat().st_size)
        result = bench_models([fp32, int8], [feeds, feeds], config)
        float_ms.append(result.models[0].median_ms)
        row.latency_ms, row.relative = result.models[1].median_ms, result.ratios()[1]


def edgeopt_quantizer_available() -> bool:
    try:
        from edgeopt.quant import CalibrationMethod, Int8Config, quantize  # noqa: F401
    except ImportError:
        return False
    return True


def edgeopt_default_method() -> str | None:
    try:
        from edgeopt.quant import Int8Config
    except ImportError:
        return None
    return Int8Config().calibration.value


def run_case(name: str, args: argparse.Namespace, work: pathlib.Path) -> Case:
    case = prepare_case(name, seed=args.seed, calib_samples=args.calib_samples, work=work)
    calib_path = work / f"{name}-calib.npy"
    np.save(calib_path, case.calib)
    ort_preprocess(case, work)
    for repeat in range(args.repeats):
        rows = []
        for setting in settings(args):
            print(f"[{name}] {setting.tool} {setting.label} (run {repeat + 1}/{args.repeats}) ...",
                  file=sys.stderr, flush=True)
            if setting.tool == "edgeopt" and not args.edgeopt_available:
                rows.append(Row(setting=setting, error="n/a (edgeopt.quant not available yet)"))
            else:
                rows.append(quantize_row(case, setting, work, calib_path))
        case.rows = rows if not case.rows else [merge_repeats(a, b) for a, b in zip(case.rows, rows)]
    evaluate(case)
    print(f"[{name}] timing {len(case.rows) + 1} models ...", file=sys.stderr, flush=True)
    time_latency(case, args.runs)
    return case


def settings(args: argparse.Namespace) -> list[Setting]:
    result = [Setting("edgeopt", m) for m in args.edgeopt_methods]
    for preprocessed in (False, True):
        result += [Setting("ort", m, preprocessed) for m in args.ort_methods]
    return result


# ---------------------------------------------------------------- targets


def _best(rows: list[Row]) -> Row | None:
    """Most accurate row (ties: higher SQNR, then lower latency)."""
    ok = [r for r in rows if r.accuracy is not None]
    if not ok:
        return None
    return max(ok, key=lambda r: (r.accuracy, r.sqnr_db, -(r.relative or float("inf"))))


def _drop(case: Case, row: Row) -> float:
    return 100.0 * (case.float_accuracy - row.accuracy)


def _counterpart(row: Row, ort_rows: list[Row], ort_best: Row) -> Row:
    """ORT's run with the same calibration algorithm on the same (not pre-processed) model, else ORT's best."""
    same = SAME_METHOD.get(row.setting.method)
    for candidate in ort_rows:
        if candidate.setting.method == same and not candidate.setting.preprocessed and candidate.wall_s is not None:
            return candidate
    return ort_best


def _recommended_counterpart(row: Row, ort_rows: list[Row]) -> Row | None:
    """ORT's recommended flow (quant_pre_process first) with the same method, else MinMax."""
    method = SAME_METHOD.get(row.setting.method, "MinMax")
    for candidate in ort_rows:
        if candidate.setting.method == method and candidate.setting.preprocessed and candidate.relative:
            return candidate
    return None


@dataclass
class Check:
    target: str
    model: str
    edgeopt: str
    ort: str
    measured: str
    passed: bool | None  # None: could not be evaluated


def _verdict(passed: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[passed]


def check_targets(case: Case, which: str, row: Row, ort_rows: list[Row], ort_best: Row) -> list[Check]:
    """The issue's targets for one edgeopt setting on one model."""
    who = f"{which}: {row.setting.label}"
    drop, best_drop = _drop(case, row), _drop(case, ort_best)
    checks = [Check("accuracy drop <= ORT's best", case.name, f"{who} {drop:+.2f} pts",
                    f"{ort_best.setting.label} {best_drop:+.2f} pts", f"{drop - best_drop:+.2f} pts",
                    drop <= best_drop + 1e-9)]
    if case.name == "demo":
        checks.append(Check("demo accuracy drop <= 0.5 pts", case.name, f"{who} {drop:+.2f} pts", "-",
                            f"{drop:+.2f} pts", drop <= 0.5))
    other = _counterpart(row, ort_rows, ort_best)
    time_ratio = row.wall_s / other.wall_s
    checks.append(Check("calibration wall <= 0.5x ORT", case.name, f"{who} {row.wall_s:.2f} s",
                        f"{other.setting.label} {other.wall_s:.2f} s", f"{time_ratio:.2f}x", time_ratio <= 0.5))
    checks.append(Check("peak RSS <= ORT", case.name, f"{who} {row.peak_rss_mb:.0f} MB",
                        f"{other.setting.label} {other.peak_rss_mb:.0f} MB",
                        f"{row.peak_rss_mb - other.peak_rss_mb:+.0f} MB", row.peak_rss_mb <= other.peak_rss_mb))
    recommended = _recommended_counterpart(row, ort_rows)
    if row.relative is None or recommended is None:
        return checks
    ratio = row.relative / recommended.relative
    checks.append(Check("int8 latency <= 1.05x ORT's", case.name,
                        f"{who} {row.latency_ms:.3f} ms ({1 / row.relative:.2f}x fp32)",
                        f"{recommended.setting.label} {recommended.latency_ms:.3f} ms "
                        f"({1 / recommended.relative:.2f}x fp32)", f"{ratio:.2f}x", ratio <= 1.05))
    if case.name in CONV_MODELS:
        checks.append(Check("int8 >= 1.5x faster than fp32 (conv)", case.name, f"{who} {1 / row.relative:.2f}x",
                            f"{recommended.setting.label} {1 / recommended.relative:.2f}x",
                            f"{1 / row.relative:.2f}x", 1 / row.relative >= 1.5))
    return checks


def all_checks(cases: list[Case], default_method: str | None) -> list[Check]:
    checks = []
    for case in cases:
        ort_rows = [r for r in case.rows if r.setting.tool == "ort" and r.accuracy is not None]
        edgeopt_rows = [r for r in case.rows if r.setting.tool == "edgeopt" and r.accuracy is not None]
        ort_best = _best(ort_rows)
        if ort_best is None or not edgeopt_rows:
            checks.append(Check("all", case.name, "no edgeopt result" if not edgeopt_rows else "-",
                                "no ORT result" if ort_best is None else "-", "-", None))
            continue
        default = next((r for r in edgeopt_rows if r.setting.method == default_method), None)
        best = _best(edgeopt_rows)
        for which, row in (("default", default), ("best", best)):
            if row is not None and not (which == "best" and row is default):
                checks += check_targets(case, which, row, ort_rows, ort_best)
    return checks


# ---------------------------------------------------------------- report


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def results_table(cases: list[Case]) -> list[str]:
    headers = ["model", "tool", "setting", "top-1 %", "drop pts", "SQNR dB", "agree %", "calib s",
               "peak RSS MB", "median ms", "vs fp32"]
    rows = []
    for case in cases:
        rows.append([case.name, "float", "fp32", f"{100 * case.float_accuracy:.2f}", "-", "-", "-", "-", "-",
                     _fmt(case.float_latency_ms, ".3f"), "1.00x"])
        for row in case.rows:
            s = row.setting
            if row.error:
                rows.append([case.name, s.tool, s.label, row.error, *["-"] * 7])
                continue
            speedup = 1 / row.relative if row.relative else None
            rows.append([case.name, s.tool, s.label, f"{100 * row.accuracy:.2f}", f"{_drop(case, row):+.2f}",
                         _fmt(row.sqnr_db, ".1f"), f"{100 * row.agreement:.1f}", f"{row.wall_s:.2f}",
                         f"{row.peak_rss_mb:.0f}", _fmt(row.latency_ms, ".3f"),
                         "-" if speedup is None else f"{speedup:.2f}x"])
    return markdown_table(headers, rows, right=[False] * 3 + [True] * 8)


def notes(cases: list[Case]) -> list[str]:
    lines = []
    for case in cases:
        parts = []
        if case.train_s is not None:
            parts.append(f"trained {TRAIN_EPOCHS[case.name]} epochs in {case.train_s:.0f} s")
        if case.prep_s is not None:
            parts.append(f"ORT quant_pre_process {case.prep_s:.2f} s (not included in calib s)")
        baselines = [r.baseline_rss_mb for r in case.rows if r.baseline_rss_mb is not None]
        if baselines:
            parts.append(f"worker RSS before quantizing {min(baselines):.0f}-{max(baselines):.0f} MB")
        lines.append(f"- {case.name}: " + "; ".join(parts) if parts else f"- {case.name}")
    return lines


def report(cases: list[Case], checks: list[Check], env: dict, args: argparse.Namespace,
           default_method: str | None) -> str:
    lines = ["## quantize_vs_ort: edgeopt vs onnxruntime.quantization.quantize_static", "",
             *environment_markdown(env),
             f"- seed {args.seed}; {args.calib_samples} calibration samples (digits training split, batch 1), "
             f"the same for both tools; test split 450 images; latency: {args.runs} runs, each int8 model "
             "interleaved with fp32 on one pinned core, 1 intra-op thread, median",
             f"- edgeopt default calibration: {default_method or 'n/a (quantizer not available)'}; "
             f"each setting quantized {args.repeats}x, least time and RSS kept",
             f"- load average (1 min) at start {args.load_start:.2f}, at end {os.getloadavg()[0]:.2f} "
             f"on {os.cpu_count()} cores (other work on the machine inflates and blurs times)",
             "- one test image is 0.22 points; ORT's `Distribution` method is meant for float8 "
             "(ORT docs), listed for completeness",
             "", "### Results", "", *results_table(cases), "", *notes(cases), "", "### Targets", ""]
    if checks:
        lines += markdown_table(["target", "model", "edgeopt", "ORT", "measured", "result"],
                                [[c.target, c.model, c.edgeopt, c.ort, c.measured, _verdict(c.passed)]
                                 for c in checks])
        evaluated = [c for c in checks if c.passed is not None]
        failed = [c for c in evaluated if not c.passed]
        lines += ["", f"{len(evaluated) - len(failed)} of {len(evaluated)} checks pass."]
    else:
        lines.append("No targets evaluated (no edgeopt results).")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ALL_MODELS), help=f"comma-separated, from {', '.join(ALL_MODELS)}")
    parser.add_argument("--calib-samples", type=int, default=200)
    parser.add_argument("--runs", type=int, default=500, help="timed inferences per model and pair")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2,
                        help="quantize each setting this many times, interleaved; keep the least time and RSS")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: demo + mobilenet_v2, minmax only, 100 samples, 50 runs")
    parser.add_argument("--markdown", type=pathlib.Path, help="also write the report here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(ALL_MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(ALL_MODELS)}")
    args.edgeopt_methods, args.ort_methods = list(EDGEOPT_METHODS), list(ORT_METHODS)
    if args.quick:
        args.models = [m for m in args.models if m in ("demo", "mobilenet_v2")] or ["demo"]
        args.edgeopt_methods, args.ort_methods = ["minmax"], ["MinMax"]
        args.calib_samples, args.runs = min(args.calib_samples, 100), min(args.runs, 50)
        args.repeats = 1
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    env = environment([str(pathlib.Path(sys.argv[0])), *argv])
    args.load_start = os.getloadavg()[0]
    args.edgeopt_available = edgeopt_quantizer_available()
    default_method = edgeopt_default_method()
    work = prepare_cache_dir() / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    start = time.perf_counter()
    cases = [run_case(name, args, work) for name in args.models]
    text = report(cases, all_checks(cases, default_method), env, args, default_method)
    text += f"\nTotal benchmark time {time.perf_counter() - start:.0f} s.\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main(sys.argv[1:]))

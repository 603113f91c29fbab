"""The demo: every stage that exists, run on the bundled digits CNN.

The model (``assets/demo.onnx``) is a small CNN with a depthwise conv, batch
norm, ReLU6/hardswish, an SE block and a residual add, trained on
scikit-learn's digits by ``scripts/train_demo.py``; ``assets/digits_test.npz``
is its held-out test split (the demo's evaluation data). The last stage
quantizes the model for the microcontroller scheme (int8 activations, every
output quantized), compiles it to C for a Cortex-M4 board, runs the C on the
host on every test image and checks its accuracy against the reference
interpreter's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from edgeopt import api
from edgeopt.bench import BenchConfig, BenchResult
from edgeopt.codegen.c.report import CompileReport
from edgeopt.io import atomic_write_bytes, make_output_folder
from edgeopt.metrics import json_text

__all__ = ["DemoC", "DemoResult", "demo_c", "demo_data", "demo_model_path", "run_demo"]

Progress = Callable[[int, int | None], None]


def demo_model_path() -> Path:
    """Path of the bundled demo ONNX model."""
    return Path(str(resources.files("edgeopt") / "assets" / "demo.onnx"))


def demo_data() -> tuple[np.ndarray, np.ndarray]:
    """The digits test split: images (N x 1 x 8 x 8 float32 in [0, 1]) and labels (N int64)."""
    with np.load(Path(str(resources.files("edgeopt") / "assets" / "digits_test.npz")), allow_pickle=False) as data:
        return data["x"], data["y"]


def demo_calibration_path() -> Path:
    """256 digits training images (N x 1 x 8 x 8, stacked): the demo's calibration data."""
    return Path(str(resources.files("edgeopt") / "assets" / "digits_calib.npy"))


def top1_accuracy(model: api.ModelSource, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose arg-max logit is the label (ONNX Runtime, one sample at a time)."""
    logits = next(iter(api.run(model, {"": images}).outputs.values()))
    return float(np.mean(np.argmax(logits.reshape(len(labels), -1), axis=1) == labels))


DEMO_DEVICE = "cortex-m4"


@dataclass(frozen=True, kw_only=True)
class DemoC:
    """The demo model quantized for the MCU target, as C: its report, and its accuracy next to the
    reference interpreter's."""

    report: CompileReport
    accuracy: float
    reference_accuracy: float

    def summary_lines(self) -> list[tuple[str, str]]:
        result, host = self.report.result, self.report.host
        same = "equal" if self.accuracy == self.reference_accuracy else "DIFFERENT"
        lines = [("C accuracy", f"{self.accuracy:.2%} (reference interpreter {self.reference_accuracy:.2%}: {same})"),
                 ("C arena", f"{result.arena_bytes:,} B (lower bound {result.lower_bound_bytes:,} B)")]
        if host is not None:
            lines += [("C flash", f"{self.report.flash_bytes:,} B = weights {result.weight_bytes:,} B + code "
                                  f"{self.report.code_bytes:,} B (host gcc -O2 objects)"),
                      ("C host latency", f"{host.latency_ms:.3f} ms per inference" if host.latency_ms else "-")]
        fit = "fits" if self.report.fits else "does NOT fit: " + "; ".join(self.report.misses())
        lines.append((f"C on {result.device}", f"{fit}; {self.report.estimated_device_latency_ms:.2f} ms (estimate)"))
        return lines

    def to_dict(self) -> dict:
        return {"report": self.report.to_dict(), "accuracy": self.accuracy,
                "reference_accuracy": self.reference_accuracy}


def demo_c(model_path: Path, out_dir: Path, images: np.ndarray, labels: np.ndarray) -> DemoC:
    """Quantize the float model for the MCU target, compile it to C, run it on the host on every test
    image, and the reference interpreter too."""
    from edgeopt.quant import Int8Config, Target
    from edgeopt.runtime.reference import ReferenceModel

    int8_path = out_dir.parent / f"{model_path.stem}.mcu.onnx"
    api.quantize(model_path, Int8Config(target=Target.MCU), demo_calibration_path(), output=int8_path,
                 check_fidelity=False, check_speed=False)
    report = api.compile_model(int8_path, out_dir, device=DEMO_DEVICE, force=True)
    c_logits = next(iter(api.run(out_dir, {"": images}).outputs.values()))
    reference = ReferenceModel(api.load(int8_path))
    name = reference.input_names[0]
    reference_logits = np.concatenate([next(iter(reference.run_float({name: images[i:i + 1]}).values()))
                                       for i in range(len(images))])
    return DemoC(report=report, accuracy=_accuracy(c_logits, labels),
                 reference_accuracy=_accuracy(reference_logits, labels))


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits.reshape(len(labels), -1), axis=1) == labels))


@dataclass(frozen=True, kw_only=True)
class DemoResult:
    """Numbers measured by the demo, and where its artifacts are."""

    output_dir: Path
    inspect: api.InspectResult
    float_accuracy: float
    int8_accuracy: float
    quantize: api.QuantizeReport
    test_samples: int
    bench: BenchResult
    c_code: DemoC | None = None

    def summary_lines(self) -> list[tuple[str, str]]:
        float_timing, int8_timing = self.bench.models[:2]
        drop = (self.float_accuracy - self.int8_accuracy) * 100
        return [
            ("model", f"{self.inspect.name}: {self.inspect.cost.params:,} params, {self.inspect.cost.macs:,} MACs"),
            ("float accuracy", f"{self.float_accuracy:.2%} on {self.test_samples} digits test images"),
            ("int8 accuracy", f"{self.int8_accuracy:.2%} ({drop:+.2f} points drop; "
                              f"calibrated on {self.quantize.calibration_samples} training images)"),
            ("size", f"{float_timing.file_bytes:,} B float -> {int8_timing.file_bytes:,} B int8 "
                     f"(weights {self.inspect.cost.param_bytes_fp32:,} B -> {self.inspect.cost.param_bytes_int8:,} B)"),
            ("ORT latency", f"float {float_timing.median_ms:.3f} ms, int8 {int8_timing.median_ms:.3f} ms median "
                            f"({float_timing.median_ms / int8_timing.median_ms:.2f}x)"),
            *(self.c_code.summary_lines() if self.c_code is not None else []),
            ("artifacts", str(self.output_dir)),
        ]

    def to_dict(self) -> dict:
        return {"output_dir": str(self.output_dir), "inspect": self.inspect.to_dict(),
                "float_accuracy": self.float_accuracy, "int8_accuracy": self.int8_accuracy,
                "quantize": self.quantize.to_dict(), "test_samples": self.test_samples,
                "bench": self.bench.to_dict(), "c": self.c_code.to_dict() if self.c_code is not None else None}


def run_demo(output_dir: str | os.PathLike, *, runs: int = 200, progress: Progress | None = None) -> DemoResult:
    """Inspect, evaluate, quantize to int8 and benchmark the demo model; artifacts go to ``output_dir``."""
    from edgeopt.quant import Int8Config

    BenchConfig(runs=runs)  # a bad --runs is refused before any work, not after the quantization
    bench_config = BenchConfig(runs=runs, warmup=max(1, runs // 10), threads=1)
    folder = make_output_folder(output_dir)
    model_path, int8_path = folder / "demo.onnx", folder / "demo.int8.onnx"
    atomic_write_bytes(model_path, demo_model_path().read_bytes())
    steps = 6
    _step(progress, 0, steps)
    inspected = api.inspect(model_path)
    _step(progress, 1, steps)
    images, labels = demo_data()
    accuracy = top1_accuracy(model_path, images, labels)
    _step(progress, 2, steps)
    quantized = api.quantize(model_path, Int8Config(), demo_calibration_path(), output=int8_path, check_speed=False)
    _step(progress, 3, steps)
    int8_accuracy = top1_accuracy(int8_path, images, labels)
    _step(progress, 4, steps)
    timing = api.bench([model_path, int8_path], config=bench_config)
    _step(progress, 5, steps)
    c_code = demo_c(model_path, folder / "c", images, labels)
    _step(progress, 6, steps)
    result = DemoResult(output_dir=folder, inspect=inspected, float_accuracy=accuracy, int8_accuracy=int8_accuracy,
                        quantize=quantized, test_samples=len(labels), bench=timing, c_code=c_code)
    atomic_write_bytes(folder / "summary.json", json_text(result.to_dict()).encode())
    return result


def _step(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)

"""The demo: every stage that exists, run on the bundled digits CNN.

The model (``assets/demo.onnx``) is a small CNN with a depthwise conv, batch
norm, ReLU6/hardswish, an SE block and a residual add, trained on
scikit-learn's digits by ``scripts/train_demo.py``; ``assets/digits_test.npz``
is its held-out test split (the demo's evaluation data).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from edgeopt import api
from edgeopt.bench import BenchConfig, BenchResult

__all__ = ["DemoResult", "demo_data", "demo_model_path", "run_demo"]

Progress = Callable[[int, int | None], None]


def demo_model_path() -> Path:
    """Path of the bundled demo ONNX model."""
    return Path(str(resources.files("edgeopt") / "assets" / "demo.onnx"))


def demo_data() -> tuple[np.ndarray, np.ndarray]:
    """The digits test split: images (N x 1 x 8 x 8 float32 in [0, 1]) and labels (N int64)."""
    with np.load(Path(str(resources.files("edgeopt") / "assets" / "digits_test.npz")), allow_pickle=False) as data:
        return data["x"], data["y"]


def top1_accuracy(model: api.ModelSource, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose arg-max logit is the label (ONNX Runtime, one sample at a time)."""
    logits = next(iter(api.run(model, {"": images}).outputs.values()))
    return float(np.mean(np.argmax(logits.reshape(len(labels), -1), axis=1) == labels))


@dataclass(frozen=True, kw_only=True)
class DemoResult:
    """Numbers measured by the demo, and where its artifacts are."""

    output_dir: Path
    inspect: api.InspectResult
    float_accuracy: float
    test_samples: int
    bench: BenchResult

    def summary_lines(self) -> list[tuple[str, str]]:
        timing = self.bench.models[0]
        return [
            ("model", f"{self.inspect.name}: {self.inspect.cost.params:,} params, {self.inspect.cost.macs:,} MACs"),
            ("float accuracy", f"{self.float_accuracy:.2%} on {self.test_samples} digits test images"),
            ("ORT latency", f"{timing.median_ms:.3f} ms median ({timing.p90_ms:.3f} ms p90)"),
            ("artifacts", str(self.output_dir)),
        ]

    def to_dict(self) -> dict:
        return {"output_dir": str(self.output_dir), "inspect": self.inspect.to_dict(),
                "float_accuracy": self.float_accuracy, "test_samples": self.test_samples,
                "bench": self.bench.to_dict()}


def run_demo(output_dir: str | os.PathLike, *, runs: int = 200, progress: Progress | None = None) -> DemoResult:
    """Inspect, evaluate and benchmark the demo model; artifacts go to ``output_dir``."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    model_path = folder / "demo.onnx"
    shutil.copyfile(demo_model_path(), model_path)
    steps = 3
    _step(progress, 0, steps)
    inspected = api.inspect(model_path)
    _step(progress, 1, steps)
    images, labels = demo_data()
    accuracy = top1_accuracy(model_path, images, labels)
    _step(progress, 2, steps)
    timing = api.bench([model_path], config=BenchConfig(runs=runs, warmup=max(1, runs // 10), threads=1))
    _step(progress, 3, steps)
    result = DemoResult(output_dir=folder, inspect=inspected, float_accuracy=accuracy,
                        test_samples=len(labels), bench=timing)
    (folder / "summary.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    return result


def _step(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)

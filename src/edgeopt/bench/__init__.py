"""Side-by-side latency and memory measurement of models in ONNX Runtime."""

from edgeopt.bench.latency import BenchConfig, BenchResult, BenchTarget, ModelTiming, bench_models

__all__ = ["BenchConfig", "BenchResult", "BenchTarget", "ModelTiming", "bench_models"]

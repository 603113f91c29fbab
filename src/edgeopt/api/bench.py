"""Time models side by side: ONNX models in ONNX Runtime, compiled C folders in their harness."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.api._common import ModelSource, Progress, check_type, load, model_name, model_source
from edgeopt.api._terms import python_terms
from edgeopt.api.deploy import is_compiled_folder
from edgeopt.bench import BenchConfig, BenchResult, BenchTarget, bench_models
from edgeopt.data import ImagePreprocess
from edgeopt.errors import ConfigError, DataError, ModelError
from edgeopt.io import model_file_bytes, model_to_bytes

__all__ = ["bench"]


# ------------------------------------------------------------------------- bench


def _bench_feeds(specs: Sequence[eir.InputSpec], data: str | os.PathLike | Iterable | None, count: int,
                 preprocess: ImagePreprocess | None, limits: Mapping[str, int] | None = None) -> list[dict]:
    """Up to ``count`` real samples from ``data``, or a few random feeds of the inputs' shapes (token ids
    below ``limits``, :func:`edgeopt.ir.index_limits`)."""
    from edgeopt.data import open_data, take
    from edgeopt.runtime.ort import random_feed

    if data is None:
        return [random_feed(specs, seed=i, limits=limits) for i in range(min(count, 4))]
    feeds = list(take(open_data(data, specs, preprocess=preprocess), count))
    if not feeds:
        named = f"--data {data}" if isinstance(data, (str, os.PathLike)) else f"the data given ({type(data).__name__})"
        raise DataError(f"{named} gave no samples: point it at at least one sample")
    return feeds


def _file_bytes(model: ModelSource, onnx_bytes: bytes) -> int:
    return len(onnx_bytes) if isinstance(model, ir.Model) else model_file_bytes(model)


@python_terms()
def bench(models: Sequence[ModelSource], *, config: BenchConfig = BenchConfig(),
          data: str | os.PathLike | Iterable | None = None,
          input_shapes: Mapping[str, Sequence[int]] | None = None,
          preprocess: ImagePreprocess | None = None,
          progress: Progress | None = None) -> BenchResult:
    """Time models side by side in ONNX Runtime: latency, throughput, peak RSS, file size.

    Folders written by ``compile_model`` are timed in their C timing harness on the host. One model
    may be given alone (not in a list).
    """
    if isinstance(models, (str, os.PathLike, ir.Model)) or type(models).__name__ == "ModelProto":
        models = [models]
    if not isinstance(models, Iterable):
        raise ConfigError(f"models must be a model (a path, onnx.ModelProto or onnx_ir.Model) or a list of them, "
                          f"got {type(models).__name__}")
    check_type(config, BenchConfig, "config")
    models = [model_source(model) for model in models]
    if not models:
        raise ModelError("bench needs at least one model")
    if any(is_compiled_folder(model) for model in models):
        return _bench_with_c(models, config=config, data=data, input_shapes=input_shapes, preprocess=preprocess,
                             progress=progress)
    targets, feeds = [], []
    for model in models:
        loaded = load(model, input_shapes=input_shapes, require_static=data is None)  # else: shapes of the data
        onnx_bytes = model_to_bytes(loaded)
        targets.append(BenchTarget(name=model_name(model), onnx_bytes=onnx_bytes,
                                   file_bytes=_file_bytes(model, onnx_bytes)))
        try:
            feeds.append(_bench_feeds(eir.model_inputs(loaded), data, config.runs + config.warmup, preprocess,
                                      eir.index_limits(loaded)))
        except DataError as error:  # with several models, say which one the data does not fit
            if len(models) == 1:
                raise
            raise DataError(f"{error} (for {model_name(model)})") from None
    return bench_models(targets, feeds, config, progress=progress)


def _c_timing(folder: str | os.PathLike, config: BenchConfig, data, preprocess):
    from edgeopt.bench.latency import ModelTiming
    from edgeopt.codegen.c.host import HostProgram

    program = HostProgram(folder)
    feed = _bench_feeds(program.input_specs, data, 1, preprocess)[0]
    timing = program.time(feed, config.runs)
    report = Path(folder) / "report.json"
    flash = json.loads(report.read_text()).get("flash_bytes") if report.is_file() else None
    return ModelTiming(name=f"{Path(folder).name}/ [C, host gcc -O2]", file_bytes=flash or 0,
                       latencies_ms=timing.latencies_ms, samples_per_run=1, peak_rss_bytes=timing.peak_rss_bytes,
                       baseline_rss_bytes=0)


def _bench_with_c(models: Sequence[ModelSource], *, config: BenchConfig, data, input_shapes, preprocess,
                  progress) -> BenchResult:
    """ONNX models side by side in ONNX Runtime, then each C folder in its timing harness, in the order given."""
    onnx_models = [m for m in models if not is_compiled_folder(m)]
    onnx_result = bench(onnx_models, config=config, data=data, input_shapes=input_shapes, preprocess=preprocess,
                        progress=progress) if onnx_models else None
    onnx_timings = iter(onnx_result.models if onnx_result else ())
    timings = tuple(_c_timing(m, config, data, preprocess) if is_compiled_folder(m) else next(onnx_timings)
                    for m in models)
    return BenchResult(models=timings, config=config, cpu_count=os.cpu_count() or 1)

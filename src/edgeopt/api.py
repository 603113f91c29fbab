"""The Python API of edgeopt: one typed function per CLI command.

Every function takes paths or models and plain values, returns a result object
with a ``to_dict()`` for ``--json``, and raises :class:`edgeopt.errors.EdgeoptError`
subclasses for anything a user can cause.
"""

from __future__ import annotations

import io as _io
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.analysis import CostReport, MemoryReport, analyze_cost, memory_report
from edgeopt.bench import BenchConfig, BenchResult, BenchTarget, bench_models
from edgeopt.data import ImagePreprocess
from edgeopt.errors import ConfigError, DataError, EdgeoptError, ModelError
from edgeopt.quant.accuracy import AccuracyGoal, AccuracySearch, accuracy_aware_quantize
from edgeopt.quant.compare import CompareResult
from edgeopt.quant.registry import QuantResult
from edgeopt.quant.speed import SpeedCheck
from edgeopt.io import atomic_write_bytes, load_model, model_file_bytes, model_to_bytes

__all__ = [
    "InspectResult",
    "QuantizeReport",
    "RunResult",
    "bench",
    "compare",
    "compile_model",
    "from_torch",
    "inspect",
    "load",
    "quantize",
    "run",
    "verify",
]

logger = logging.getLogger(__name__)

ModelSource = str | os.PathLike | ir.Model
Progress = Callable[[int, int], None]


def load(model: ModelSource, *, input_shapes: Mapping[str, Sequence[int]] | None = None,
         require_static: bool = True) -> ir.Model:
    """Load a model from a path (normalized, shapes inferred) or copy an in-memory one."""
    if isinstance(model, ir.Model):
        return ir.from_proto(ir.to_proto(model))
    loaded = load_model(model, input_shapes=input_shapes, require_static=require_static)
    if require_static:
        from edgeopt.runtime.ort import fill_missing_shapes

        fill_missing_shapes(loaded)
    return loaded


def _model_name(model: ModelSource) -> str:
    return Path(model).name if not isinstance(model, ir.Model) else (model.graph.name or "model")


# ----------------------------------------------------------------------- inspect


@dataclass(frozen=True, kw_only=True)
class InspectResult:
    """What a model costs: per-node rows, totals and activation memory."""

    name: str
    opset: int
    producer: str
    inputs: tuple[eir.InputSpec, ...]
    outputs: tuple[tuple[str, tuple, str], ...]
    cost: CostReport
    memory: MemoryReport

    def to_dict(self) -> dict:
        cost, memory = self.cost, self.memory
        return {
            "model": self.name, "opset": self.opset, "producer": self.producer,
            "inputs": [{"name": i.name, "shape": list(i.shape), "dtype": str(i.dtype)} for i in self.inputs],
            "outputs": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in self.outputs],
            "macs": cost.macs, "params": cost.params, "other_flops": cost.other_flops,
            "peak_activation_bytes": memory.peak_activation_bytes,
            "lower_bound_bytes": memory.lower_bound_bytes,
            "naive_activation_bytes": memory.naive_bytes,
            "peak_node": memory.peak_node,
            "weight_bytes": {"stored": cost.weight_bytes, "fp32": cost.param_bytes_fp32,
                             "fp16": cost.param_bytes_fp16, "int8": cost.param_bytes_int8},
            "unknown_nodes": list(cost.unknown_nodes),
            "nodes": [{"name": n.name, "op_type": n.op_type,
                       "output_shapes": [list(s) if s is not None else None for s in n.output_shapes],
                       "dtype": n.output_dtype, "params": n.params, "macs": n.macs,
                       "other_flops": n.other_flops, "activation_bytes": n.activation_bytes}
                      for n in cost.nodes],
        }


def inspect(model: ModelSource, *, input_shapes: Mapping[str, Sequence[int]] | None = None) -> InspectResult:
    """Per-node op, shape, dtype, params, MACs, activation bytes; totals and peak activation RAM."""
    loaded = load(model, input_shapes=input_shapes)
    outputs = tuple((v.name, eir.static_shape(v) or (), str(eir.numpy_dtype(v))) for v in loaded.graph.outputs)
    return InspectResult(name=_model_name(model), opset=eir.default_opset(loaded),
                         producer=" ".join(p for p in (loaded.producer_name, loaded.producer_version) if p),
                         inputs=tuple(eir.model_inputs(loaded)), outputs=outputs,
                         cost=analyze_cost(loaded), memory=memory_report(loaded))


# --------------------------------------------------------------------------- run


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """Outputs of running a model, and the files they were written to."""

    outputs: dict[str, np.ndarray] = field(repr=False)
    samples: int
    files: tuple[Path, ...] = ()

    def to_dict(self) -> dict:
        return {"samples": self.samples,
                "outputs": {name: {"shape": list(a.shape), "dtype": str(a.dtype)} for name, a in self.outputs.items()},
                "files": [str(f) for f in self.files]}


def _split_samples(spec: eir.InputSpec, array: np.ndarray) -> list[np.ndarray] | None:
    """Per-sample arrays when ``array`` stacks N samples for a batch-1 input, else None."""
    if spec.shape and array.ndim == len(spec.shape) - 1:
        return [array[np.newaxis]]
    if spec.shape and spec.shape[0] == 1 and array.ndim == len(spec.shape) and array.shape[0] > 1:
        return [array[i:i + 1] for i in range(array.shape[0])]
    return None


def _name_unnamed(specs: Sequence[eir.InputSpec], arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Give the array passed without a name ("") to the model's only input."""
    named = dict(arrays)
    if "" in named:
        if len(specs) != 1:
            raise DataError(f"the model has {len(specs)} inputs ({', '.join(s.name for s in specs)}): "
                            "name each one, --input NAME=file.npy")
        named[specs[0].name] = named.pop("")
    return named


def _sample_feeds(specs: Sequence[eir.InputSpec], arrays: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    by_name = {spec.name: spec for spec in specs}
    split = {name: (_split_samples(by_name[name], array) if name in by_name else None)
             for name, array in arrays.items()}
    counts = {name: len(parts) for name, parts in split.items() if parts is not None}
    if not counts:
        return [dict(arrays)]
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{n}: {c}" for n, c in counts.items())
        raise DataError(f"inputs hold different numbers of stacked samples ({shown}): give each input the same N")
    total = next(iter(counts.values()))
    return [{name: (parts[i] if parts is not None else arrays[name]) for name, parts in split.items()}
            for i in range(total)]


def _safe_file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "output"


def _write_outputs(outputs: Mapping[str, np.ndarray], folder: Path) -> tuple[Path, ...]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name, array in outputs.items():
        buffer = _io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        files.append(atomic_write_bytes(folder / f"{_safe_file_name(name)}.npy", buffer.getvalue()))
    return tuple(files)


def run(model: ModelSource, inputs: Mapping[str, np.ndarray], *, output_dir: str | os.PathLike | None = None,
        progress: Progress | None = None) -> RunResult:
    """Run ``model`` in ONNX Runtime; N stacked samples for a batch-1 input run one by one.

    A folder written by ``compile_model`` runs its generated C, built on the host.
    """
    from edgeopt.data import check_feed
    from edgeopt.runtime.ort import OrtSession

    if _is_c_folder(model):
        return _run_c(model, inputs, output_dir, progress)
    loaded = load(model, require_static=False)
    specs = eir.model_inputs(loaded)
    feeds = _sample_feeds(specs, _name_unnamed(specs, inputs))
    session = OrtSession(loaded)
    results: list[dict[str, np.ndarray]] = []
    for index, feed in enumerate(feeds):
        results.append(session.run(check_feed(specs, feed, where="--input")))
        if progress is not None:
            progress(index + 1, len(feeds))
    outputs = {name: (np.concatenate([r[name] for r in results]) if len(results) > 1 else results[0][name])
               for name in session.output_names}
    files = _write_outputs(outputs, Path(output_dir)) if output_dir is not None else ()
    return RunResult(outputs=outputs, samples=len(feeds), files=files)


# ------------------------------------------------------------------------- bench


def _bench_feeds(model: ir.Model, data: str | os.PathLike | Iterable | None, count: int,
                 preprocess: ImagePreprocess | None) -> list[dict]:
    from edgeopt.data import open_data, take
    from edgeopt.runtime.ort import random_feed

    specs = eir.model_inputs(model)
    if data is None:
        return [random_feed(specs, seed=i) for i in range(min(count, 4))]
    feeds = list(take(open_data(data, specs, preprocess=preprocess), count))
    if not feeds:
        raise DataError(f"--data {data} gave no samples")
    return feeds


def _file_bytes(model: ModelSource, onnx_bytes: bytes) -> int:
    return len(onnx_bytes) if isinstance(model, ir.Model) else model_file_bytes(model)


def bench(models: Sequence[ModelSource], *, config: BenchConfig = BenchConfig(),
          data: str | os.PathLike | Iterable | None = None,
          input_shapes: Mapping[str, Sequence[int]] | None = None,
          preprocess: ImagePreprocess | None = None,
          progress: Progress | None = None) -> BenchResult:
    """Time models side by side in ONNX Runtime: latency, throughput, peak RSS, file size.

    Folders written by ``compile_model`` are timed in their C timing harness on the host.
    """
    if not models:
        raise ModelError("bench needs at least one model")
    if any(_is_c_folder(model) for model in models):
        return _bench_with_c(models, config=config, data=data, input_shapes=input_shapes, preprocess=preprocess,
                             progress=progress)
    targets, feeds = [], []
    for model in models:
        loaded = load(model, input_shapes=input_shapes)
        onnx_bytes = model_to_bytes(loaded)
        targets.append(BenchTarget(name=_model_name(model), onnx_bytes=onnx_bytes,
                                   file_bytes=_file_bytes(model, onnx_bytes)))
        feeds.append(_bench_feeds(loaded, data, config.runs + config.warmup, preprocess))
    return bench_models(targets, feeds, config, progress=progress)


# ------------------------------------------------------------------------- torch


def from_torch(module, example_inputs, *, path: str | os.PathLike | None = None, opset: int = 17,
               input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None) -> ir.Model:
    """Export a ``torch.nn.Module`` to ONNX (eval mode) and load it; saved to ``path`` if given."""
    from edgeopt.io.torch_export import export_torch

    return export_torch(module, example_inputs, path=path, opset=opset,
                        input_names=input_names, output_names=output_names)


# ---------------------------------------------------------------------- quantize


MIN_CALIBRATION_SAMPLES = 16


@dataclass(frozen=True, kw_only=True)
class QuantizeReport:
    """A quantized model, where it was written, and what it measured."""

    result: QuantResult
    output: Path | None
    float_bytes: int
    quant_bytes: int
    calibration_samples: int
    fidelity: CompareResult | None = None
    speed: SpeedCheck | None = None
    search: AccuracySearch | None = None
    warnings: tuple[str, ...] = ()

    @property
    def model(self) -> ir.Model:
        return self.result.model

    def to_dict(self) -> dict:
        result = self.result
        return {
            "scheme": result.scheme, "output": str(self.output) if self.output else None,
            "float_bytes": self.float_bytes, "quant_bytes": self.quant_bytes,
            "calibration_samples": self.calibration_samples,
            "notes": list(result.notes), "warnings": list(self.warnings),
            "float_nodes": [{"node": f.node_name, "op_type": f.op_type, "reason": f.reason}
                            for f in result.float_nodes],
            "fidelity": self.fidelity.to_dict() if self.fidelity else None,
            "speed": self.speed.to_dict() if self.speed else None,
            "accuracy_search": self.search.to_dict() if self.search else None,
            "tensors": [{"name": t.name, "kind": t.kind, "op_type": t.op_type, "format": t.format,
                         "range": list(t.range), "scale": list(t.scale[:8]), "zero_point": list(t.zero_point[:8]),
                         "method": t.method} for t in result.tensors],
        }


class _CountingSource:
    """Pass batches through and count them (for the report and the too-few warning)."""

    def __init__(self, source) -> None:
        self._source = source
        self.count = 0
        self.num_samples = getattr(source, "num_samples", None)

    def __iter__(self):
        self.count = 0
        for batch in self._source:
            self.count += 1
            yield batch


def _calibration_source(model: ir.Model, data, preprocess: ImagePreprocess | None, max_samples: int | None):
    from edgeopt.data import open_data, take

    source = open_data(data, eir.model_inputs(model), preprocess=preprocess)
    return take(source, max_samples) if max_samples is not None else source


def _same_file(a: ModelSource, b: str | os.PathLike | None) -> bool:
    if b is None or isinstance(a, ir.Model):
        return False
    return Path(a).resolve() == Path(b).resolve()


def _evaluator(evaluate: str | Callable[[str], float] | None) -> Callable[[ir.Model], float] | None:
    """Wrap the user's ``evaluate(model_path) -> score`` so it takes a model (saved to a temp file)."""
    import tempfile

    from edgeopt.data.callable import load_function

    if evaluate is None:
        return None
    function = load_function(evaluate, option="--eval") if isinstance(evaluate, str) else evaluate

    def score(model: ir.Model) -> float:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder, "candidate.onnx")
            path.write_bytes(model_to_bytes(model))
            try:
                value = float(function(str(path)))
            except EdgeoptError:
                raise
            except Exception as error:  # the user's evaluation code failed
                raise DataError(f"--eval {evaluate}: the function raised {type(error).__name__}: {error}") from error
        if not np.isfinite(value):
            raise DataError(f"--eval {evaluate} returned {value}: it must return a finite score")
        return value

    return score


def quantize(model: ModelSource, config: object, data=None, *, output: str | os.PathLike | None = None,
             preprocess: ImagePreprocess | None = None, max_samples: int | None = None,
             goal: AccuracyGoal | None = None, evaluate: str | Callable[[str], float] | None = None,
             check_fidelity: bool = True, check_speed: bool = True,
             progress: Progress | None = None) -> QuantizeReport:
    """Quantize ``model`` with ``config`` (Int8Config, Fp16Config, Bf16Config, Int4WeightConfig).

    Calibration ``data`` is anything ``--data`` takes; required for int8. The
    output is written atomically to ``output`` (never over the input). After
    quantizing, fidelity to the float model (output SQNR, top-1 agreement) is
    measured on up to 64 calibration samples, and float vs quantized latency
    in ONNX Runtime, with the reasons when the quantized model is slower.

    With an accuracy ``goal`` (int8 only), the most damaging layers go back to
    float one by one until it is met (``evaluate(model_path) -> score`` for a
    ``max_drop`` goal; output SQNR on the calibration data for ``min_sqnr_db``).
    """
    from edgeopt.quant import Int8Config
    from edgeopt.quant import quantize as run_scheme

    if _same_file(model, output):
        raise ConfigError("-o/--output must differ from the input model: edgeopt never overwrites its input")
    loaded = load(model, require_static=False)
    source = None
    if data is not None:
        source = _CountingSource(_calibration_source(loaded, data, preprocess, max_samples))
    elif isinstance(config, Int8Config):
        raise ConfigError("int8 quantization needs calibration data: give --data (a folder of .npy, images, "
                          "or module:function)")
    search = None
    if goal is not None:
        if not isinstance(config, Int8Config):
            raise ConfigError("--max-drop/--min-sqnr apply to int8 quantization only")
        search = accuracy_aware_quantize(loaded, config, source, goal, evaluate=_evaluator(evaluate),
                                         progress=progress)
        result = search.result
    else:
        result = run_scheme(loaded, config, source, progress=progress)
    quant_bytes = model_to_bytes(result.model)
    if output is not None:
        atomic_write_bytes(output, quant_bytes)
    warnings = []
    if search is not None and not search.met:
        warnings.append(f"accuracy goal not met ({search.goal.describe()}): best score {search.best_score:.3f} "
                        f"with {len(search.best_excluded)} node(s) back in float; {search.stopped_because}")
    if source is not None and source.count < MIN_CALIBRATION_SAMPLES and isinstance(config, Int8Config):
        warnings.append(f"only {source.count} calibration samples: ranges may not cover real inputs "
                        f"(use at least {MIN_CALIBRATION_SAMPLES}, ideally a few hundred)")
    reiterable = data is not None and not isinstance(data, Iterator)
    fidelity = _fidelity(loaded, result.model, data, preprocess) if check_fidelity and reiterable else None
    speed = _speed(loaded, result.model) if check_speed else None
    if speed is not None and speed.slower:
        logger.info("the quantized model is slower than float here (%.3f ms vs %.3f ms): %s", speed.quant_ms,
                    speed.float_ms, "; ".join(speed.reasons or ("no cause found",)))
    return QuantizeReport(result=result, output=Path(output) if output is not None else None,
                          float_bytes=len(model_to_bytes(loaded)), quant_bytes=len(quant_bytes),
                          calibration_samples=source.count if source is not None else 0,
                          fidelity=fidelity, speed=speed, search=search, warnings=tuple(warnings))


FIDELITY_SAMPLES = 64


def _fidelity(float_model: ir.Model, quant_model: ir.Model, data, preprocess) -> CompareResult:
    from edgeopt.quant.compare import compare_models

    return compare_models(float_model, quant_model, _calibration_source(float_model, data, preprocess, None),
                          max_samples=FIDELITY_SAMPLES)


def _speed(float_model: ir.Model, quant_model: ir.Model) -> SpeedCheck | None:
    from edgeopt.quant.speed import speed_check

    if not all(spec.is_static for spec in eir.model_inputs(float_model)):
        logger.info("speed check skipped: the model has dynamic input dims")
        return None
    return speed_check(float_model, quant_model, runs=50, threads=1)


# ----------------------------------------------------------------------- compare


def compare(float_model: ModelSource, quant_model: ModelSource, data, *, preprocess: ImagePreprocess | None = None,
            max_samples: int | None = None, progress: Progress | None = None) -> CompareResult:
    """Per-layer SQNR and cosine of a quantized model against its float model, worst first."""
    from edgeopt.quant.compare import compare_models

    from edgeopt.passes import optimize_for_quantization

    # The quantizer folds BatchNorm and affine ops into convs and keeps the convs' output names, so
    # per-layer rows compare against the float model after the same float-exact passes.
    float_ir = optimize_for_quantization(load(float_model, require_static=False)).model
    quant_ir = load(quant_model, require_static=False)
    source = _calibration_source(float_ir, data, preprocess, max_samples)
    return compare_models(float_ir, quant_ir, source, progress=progress)


# ------------------------------------------------------------- compile / verify


def _is_c_folder(model: ModelSource) -> bool:
    from edgeopt.codegen.c import is_c_folder

    return not isinstance(model, ir.Model) and is_c_folder(model)


def compile_model(model: ModelSource, output: str | os.PathLike, *, target: str = "c",
                  device: str | os.PathLike = "x86-host", name: str = "model", rounding: str = "double",
                  force: bool = False, measure: bool = True):
    """Generate deployable code for an int8 QDQ model and report what it costs.

    ``target="c"``: portable C99 into the folder ``output`` (see
    :mod:`edgeopt.codegen.c`). Unsupported ops are refused, listed with their
    nodes, before anything is written. With ``measure`` the code is built and
    timed on the host (flash, stack estimate, latency; needs gcc). The report
    goes to ``output/report.json``; a model that does not fit ``device`` is
    still written, and the report's ``fits``/``misses()`` say by how much.
    """
    from edgeopt.codegen.c import compile_c
    from edgeopt.codegen.c.report import CompileReport, measure_host

    if target != "c":
        raise ConfigError(f"--target {target!r} is not supported: the only code generation target is c")
    result = compile_c(load(model), output, device=device, name=name, rounding=rounding, force=force)
    host = None
    if measure:
        try:
            host = measure_host(result.out_dir)
        except EdgeoptError as error:
            logger.warning("host measurement skipped: %s", error)
    report = CompileReport(result=result, host=host)
    report.write()
    return report


def verify(out_dir: str | os.PathLike, data, *, preprocess: ImagePreprocess | None = None,
           max_samples: int | None = None):
    """Run the C code in ``out_dir`` and the reference interpreter on ``data``; name the first layer that differs."""
    from edgeopt.codegen.c import verify as verify_c
    from edgeopt.codegen.c.host import HostProgram
    from edgeopt.data import open_data, take

    source = open_data(data, HostProgram(out_dir).input_specs, preprocess=preprocess)
    return verify_c(out_dir, take(source, max_samples) if max_samples is not None else source)


def _run_c(folder: str | os.PathLike, inputs: Mapping[str, np.ndarray], output_dir, progress) -> RunResult:
    from edgeopt.codegen.c.host import HostProgram

    program = HostProgram(folder)
    feeds = _sample_feeds(program.input_specs, _name_unnamed(program.input_specs, inputs))
    outputs = program.run(feeds)
    if progress is not None:
        progress(len(feeds), len(feeds))
    files = _write_outputs(outputs, Path(output_dir)) if output_dir is not None else ()
    return RunResult(outputs=outputs, samples=len(feeds), files=files)


def _c_timing(folder: str | os.PathLike, config: BenchConfig, data, preprocess):
    from edgeopt.bench.latency import ModelTiming
    from edgeopt.codegen.c.host import HostProgram
    from edgeopt.data import open_data, take
    from edgeopt.runtime.ort import random_feed

    program = HostProgram(folder)
    specs = program.input_specs
    feed = (next(iter(take(open_data(data, specs, preprocess=preprocess), 1)), None) if data is not None
            else random_feed(specs, seed=0))
    if feed is None:
        raise DataError(f"--data {data} gave no samples")
    timing = program.time(feed, config.runs)
    report = Path(folder) / "report.json"
    flash = json.loads(report.read_text()).get("flash_bytes") if report.is_file() else None
    return ModelTiming(name=f"{Path(folder).name}/ [C, host gcc -O2]", file_bytes=flash or 0,
                       latencies_ms=timing.latencies_ms, samples_per_run=1, peak_rss_bytes=timing.peak_rss_bytes,
                       baseline_rss_bytes=0)


def _bench_with_c(models: Sequence[ModelSource], *, config: BenchConfig, data, input_shapes, preprocess,
                  progress) -> BenchResult:
    """ONNX models side by side in ONNX Runtime, then each C folder in its timing harness, in the order given."""
    onnx_models = [m for m in models if not _is_c_folder(m)]
    onnx_result = bench(onnx_models, config=config, data=data, input_shapes=input_shapes, preprocess=preprocess,
                        progress=progress) if onnx_models else None
    onnx_timings = iter(onnx_result.models if onnx_result else ())
    timings = tuple(_c_timing(m, config, data, preprocess) if _is_c_folder(m) else next(onnx_timings)
                    for m in models)
    return BenchResult(models=timings, config=config, cpu_count=os.cpu_count() or 1)

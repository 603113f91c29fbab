"""Is the quantized model faster than the float one on this machine, and if not, why?

Timing: both models run in ONNX Runtime in this process on the same random
inputs, interleaved (float, quant, then quant, float, ...) so a drift of the
machine's speed hits both alike; latency is the median of ``runs`` timed
``session.run`` calls after a short warm-up, and speedup = float_ms / quant_ms.

When speedup < 1 the reasons edgeopt can see are listed:

* the CPU has no int8 dot-product instructions (x86: AVX512-VNNI / AVX-VNNI;
  Arm: dot product ``asimddp`` / ``i8mm``) -- ORT's u8s8 GEMMs then gain little;
* float islands: an activation ``DequantizeLinear`` feeds an op that ONNX
  Runtime has no integer kernel for, so the tensor is dequantized, computed
  in float and quantized again;
* int8 (signed) activations on x86, where ORT's fast kernels take uint8;
* a tiny model: when float inference takes < 0.05 ms the per-call overhead
  dominates;
* Q/DQ nodes left unfused in the graph ONNX Runtime actually runs (read back
  from its optimizer), or no integer kernel at all;
* compute-heavy layers that run in float there between int8 kernels (nodes
  kept float and the nodes writing their inputs);
* and, measured rather than read from the graph, where the quantized model's
  time goes: its costliest op types in ONNX Runtime's profile of a few runs,
  each next to the float model's ops of the same kind (an int8 Transpose
  slower than the float one, a QuantizeLinear with no float counterpart).

The evidence is gathered in :mod:`edgeopt.quant.speed_evidence`.

The precision of the quantized model is read from its graph
(:func:`model_precision`): the integer-kernel reasons above apply to int8
models (a dynamic int8 model's: the CPU's, the model's size and the profile); an fp16/bf16 model is told
that ONNX Runtime's CPU provider computes
it in float32 (with the Cast nodes counted in the graph it runs), an int4
weight-only model that its compute stays float.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.data.feeds import shape_text
from edgeopt.errors import ConfigError, DataError
from edgeopt.metrics import count_of
from edgeopt.quant.speed_evidence import (
    WEIGHT_ONLY_PRECISIONS,
    X86_MACHINES,
    SpeedEvidence,
    float_islands,
    int8_dot_product_instructions,
    kernel_count,
    model_precision,
    op_profile,
    read_cpu_flags,
    signed_activations,
)

__all__ = ["TINY_MODEL_MS", "SpeedCheck", "slowdown_reasons", "speed_check"]

ModelSource = str | os.PathLike | ir.Model

TINY_MODEL_MS = 0.05

# ----------------------------------------------------------------------- reasons


def _cpu_reason(evidence: SpeedEvidence) -> str | None:
    if evidence.dot_product is None or evidence.dot_product:
        return None
    wanted = "AVX512-VNNI or AVX-VNNI" if evidence.machine.lower() in X86_MACHINES else "asimddp or i8mm"
    return (f"this CPU ({evidence.machine}) has no int8 dot-product instructions ({wanted}): "
            "ONNX Runtime's int8 kernels gain little over float here")


def _islands_reason(evidence: SpeedEvidence) -> str | None:
    if not evidence.islands:
        return None
    counts = Counter(island.op_type for island in evidence.islands)
    ops = ", ".join(f"{op} x{count}" if count > 1 else op for op, count in counts.most_common())
    return (f"{len(evidence.islands)} float islands: dequantized activations feed {ops}, which run in float "
            "between int8 layers (a dequantize and a quantize each): fold or quantize these ops"
            + "".join(hint for ops, hint in _SPELLED_OUT if ops <= set(counts)))


# Float islands that are an op spelled out by an older exporter: the opset that has it as one op.
_SPELLED_OUT = (
    ({"ReduceMean", "Sub", "Sqrt"}, "; ReduceMean, Sub and Sqrt are a spelled-out LayerNorm: exported at opset 17 "
                                    "or later it is one LayerNormalization op"),
    ({"Erf"}, "; Erf is a spelled-out GELU: exported at opset 20 or later it is one Gelu op"),
)


def _signed_reason(evidence: SpeedEvidence) -> str | None:
    if not evidence.signed_activations or evidence.machine.lower() not in X86_MACHINES:
        return None
    count, first = len(evidence.signed_activations), evidence.signed_activations[0]
    return (f"{count} activations are int8 (e.g. {first}): ONNX Runtime's fast x86 kernels take uint8 "
            "activations; quantize activations as uint8 for the ort target")


def _tiny_reason(evidence: SpeedEvidence) -> str | None:
    if evidence.float_ms >= TINY_MODEL_MS:
        return None
    return (f"the float model runs in {evidence.float_ms:.3f} ms: per-call overhead dominates, "
            "lower-precision kernels cannot pay off on a model this small")


def _half_precision_reason(evidence: SpeedEvidence) -> str | None:
    if evidence.precision not in ("float16", "bfloat16"):
        return None
    casts = (f"; {evidence.runtime_casts} Cast nodes convert between {evidence.label} and float32 in the graph "
             "it runs" if evidence.runtime_casts else "")
    return (f"ONNX Runtime's CPU provider computes this {evidence.label} model in float32 (it has few "
            f"{evidence.label} kernels){casts}: on CPU expect a smaller file, not a faster model")


def _weight_only_reason(evidence: SpeedEvidence) -> str | None:
    if evidence.precision not in WEIGHT_ONLY_PRECISIONS:
        return None
    bits = "int4" if evidence.precision == "int4" else "8-bit"
    return (f"{bits} weight-only: the weights are unpacked at run time and the compute stays float, so the gain "
            "is size and memory traffic, a speed-up only on large memory-bound MatMuls")


def _kernels_reason(evidence: SpeedEvidence) -> str | None:
    kernels = evidence.kernels
    if kernels is None:
        return None
    if kernels.integer_kernels == 0:
        return ("ONNX Runtime turned no node into an integer kernel (QLinearConv, QGemm, ...): "
                "the QDQ model runs in float with extra quantize/dequantize work")
    if kernels.unfused_qdq:
        return (f"{kernels.unfused_qdq} QuantizeLinear/DequantizeLinear nodes remain after ONNX Runtime's "
                f"optimizations (next to {count_of(kernels.integer_kernels, 'integer kernel', 'integer kernels')}): "
                "each is a float<->int8 "
                "conversion pass over a tensor")
    return None


def _float_layers_reason(evidence: SpeedEvidence) -> str | None:
    kernels = evidence.kernels
    if kernels is None or not kernels.float_layers or not kernels.integer_kernels:
        return None
    ops = ", ".join(f"{op} x{count}" if count > 1 else op for op, count in kernels.float_layers.items())
    layers = count_of(sum(kernels.float_layers.values()), "layer runs", "layers run")
    return (f"{layers} in float in the graph ONNX Runtime runs ({ops}), "
            "between int8 kernels: nodes kept float (--exclude, the accuracy search) and the nodes writing "
            "their inputs")


def _profile_reason(evidence: SpeedEvidence) -> str | None:
    if not evidence.op_times:
        return None
    costs = ", ".join(f"{time.op_type} {time.quant_ms:.3f} ms ("
                      + (f"{time.float_kind} {time.float_ms:.3f} ms" if time.float_ms is not None else "none in float")
                      + ")" for time in evidence.op_times)
    return (f"where the time goes, by ONNX Runtime's profile (ms per run; the float model's ops of the same kind in "
            f"brackets): {costs}")


def slowdown_reasons(evidence: SpeedEvidence) -> tuple[str, ...]:
    """Every reason ``evidence`` shows why the quantized model may not beat float, most fundamental first."""
    if evidence.precision == "int8":
        checks = (_cpu_reason, _tiny_reason, _kernels_reason, _float_layers_reason, _islands_reason,
                  _signed_reason, _profile_reason)
    elif evidence.precision == "int8-dynamic":  # integer MatMuls, everything between them float by design
        checks = (_cpu_reason, _tiny_reason, _profile_reason)
    else:
        checks = (_half_precision_reason, _weight_only_reason, _tiny_reason, _profile_reason)
    return tuple(reason for check in checks if (reason := check(evidence)) is not None)


# ------------------------------------------------------------------------ timing


@dataclass(frozen=True, kw_only=True)
class SpeedCheck:
    """Median latencies, speedup = float_ms / quant_ms, and the reasons when int8 is slower."""

    float_ms: float
    quant_ms: float
    runs: int
    threads: int | None
    evidence: SpeedEvidence
    reasons: tuple[str, ...] = ()
    inputs: str = "random"  # what was timed: "random" (the static shapes), or the feed's shapes

    @property
    def speedup(self) -> float:
        return self.float_ms / self.quant_ms

    @property
    def label(self) -> str:
        """How the quantized model is named in a report: "int8 (QDQ)", "fp16", "bf16", "int4 weights"."""
        return self.evidence.label

    @property
    def slower(self) -> bool:
        return self.speedup < 1.0

    def to_dict(self) -> dict:
        return {"float_ms": self.float_ms, "quant_ms": self.quant_ms, "speedup": self.speedup,
                "slower": self.slower, "runs": self.runs, "threads": self.threads, "inputs": self.inputs,
                "reasons": list(self.reasons), "evidence": self.evidence.to_dict()}


def _load(model: ModelSource) -> ir.Model:
    if isinstance(model, ir.Model):
        return model
    from edgeopt.io import load_model

    return load_model(model)


def _timed_ms(session, feed: Mapping[str, np.ndarray]) -> float:
    start = time.perf_counter()
    session.run(feed)
    return (time.perf_counter() - start) * 1000.0


def _interleaved_medians(sessions: tuple, feed: Mapping[str, np.ndarray], runs: int) -> tuple[float, float]:
    for _ in range(max(2, runs // 10)):
        for session in sessions:
            session.run(feed)
    times: tuple[list[float], list[float]] = ([], [])
    for run in range(runs):
        order = (0, 1) if run % 2 == 0 else (1, 0)
        for index in order:
            times[index].append(_timed_ms(sessions[index], feed))
    return statistics.median(times[0]), statistics.median(times[1])


def _check_inputs(float_model: ir.Model, quant_model: ir.Model) -> None:
    float_inputs = sorted(s.name for s in eir.model_inputs(float_model))
    quant_inputs = sorted(s.name for s in eir.model_inputs(quant_model))
    if float_inputs != quant_inputs:
        raise DataError(f"the models have different inputs (float: {', '.join(float_inputs)}; quantized: "
                        f"{', '.join(quant_inputs)}): time a QDQ model against the float model it came from")


def _evidence(quant_model: ir.Model, float_ms: float, threads: int | None,
              op_times: tuple = ()) -> SpeedEvidence:
    from edgeopt.runtime.ort import optimized_model

    machine = platform.machine() or "unknown"
    optimized = optimized_model(quant_model, threads=threads)
    return SpeedEvidence(machine=machine, dot_product=int8_dot_product_instructions(read_cpu_flags(), machine),
                         islands=float_islands(quant_model), signed_activations=signed_activations(quant_model),
                         float_ms=float_ms, kernels=kernel_count(optimized), precision=model_precision(quant_model),
                         runtime_casts=sum(1 for node in optimized.graph if node.op_type == "Cast"),
                         op_times=op_times)


def _profiled(float_model: ir.Model, quant_model: ir.Model, feed: Mapping[str, np.ndarray],
              threads: int | None) -> tuple:
    """:func:`op_profile` of the two models, from ONNX Runtime's profile of a few runs of each."""
    from edgeopt.runtime.ort import op_times_ms

    return op_profile(op_times_ms(float_model, feed, threads=threads), op_times_ms(quant_model, feed, threads=threads))


def speed_check(float_model: ModelSource, quant_model: ModelSource, *, runs: int = 50,
                threads: int | None = None, feed: Mapping[str, np.ndarray] | None = None) -> SpeedCheck:
    """Time float vs quantized side by side in ONNX Runtime; list reasons when the quantized model is slower.

    ``feed``: the inputs to time on (a model with dynamic dims needs them); default random inputs of
    the models' static shapes."""
    from edgeopt.runtime.ort import OrtSession, random_feed

    if runs < 1:
        raise ConfigError(f"runs must be at least 1, got {runs}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    float_ir, quant_ir = _load(float_model), _load(quant_model)
    _check_inputs(float_ir, quant_ir)
    inputs = "random" if feed is None else ", ".join(f"{name} {shape_text(np.shape(array))}"
                                                     for name, array in feed.items())
    if feed is None:
        feed = random_feed(eir.model_inputs(float_ir), limits=eir.index_limits(float_ir))
    feed = dict(feed)
    sessions = (OrtSession(float_ir, threads=threads), OrtSession(quant_ir, threads=threads))
    float_ms, quant_ms = _interleaved_medians(sessions, feed, runs)
    op_times = _profiled(float_ir, quant_ir, feed, threads) if float_ms < quant_ms else ()
    evidence = _evidence(quant_ir, float_ms, threads, op_times)
    reasons = slowdown_reasons(evidence) if float_ms < quant_ms else ()
    return SpeedCheck(float_ms=float_ms, quant_ms=quant_ms, runs=runs, threads=threads,
                      evidence=evidence, reasons=reasons, inputs=inputs)

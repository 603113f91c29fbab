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
  from its optimizer), or no integer kernel at all.

The precision of the quantized model is read from its graph
(:func:`model_precision`): the integer-kernel reasons above apply to int8
models; an fp16/bf16 model is told that ONNX Runtime's CPU provider computes
it in float32 (with the Cast nodes counted in the graph it runs), an int4
weight-only model that its compute stays float.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.errors import ConfigError, DataError
from edgeopt.quant.ops import QDQ_DOMAINS, is_qdq_op

__all__ = [
    "INT8_CAPABLE_OPS",
    "TINY_MODEL_MS",
    "FloatIsland",
    "KernelCount",
    "SpeedCheck",
    "SpeedEvidence",
    "float_islands",
    "int8_dot_product_instructions",
    "kernel_count",
    "model_precision",
    "read_cpu_flags",
    "signed_activations",
    "slowdown_reasons",
    "speed_check",
]

ModelSource = str | os.PathLike | ir.Model

TINY_MODEL_MS = 0.05

_X86 = ("x86_64", "amd64", "i386", "i686", "x86")
_X86_DOT_PRODUCT = ("avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8")
_ARM_DOT_PRODUCT = ("asimddp", "i8mm", "sve2")


# Ops that ONNX Runtime's CPU QDQ fusions turn into integer kernels or run on
# the 8-bit data directly (data movement, max pooling, clamps folded into Q).
INT8_CAPABLE_OPS = frozenset({
    "Add", "ArgMax", "AveragePool", "Clip", "Concat", "Conv", "ConvTranspose", "DepthToSpace", "Flatten",
    "Gather", "GatherElements", "Gemm", "GlobalAveragePool", "Identity", "LeakyRelu", "MatMul", "MaxPool",
    "Mul", "Pad", "Relu", "Reshape", "Resize", "Sigmoid", "Slice", "Softmax", "SpaceToDepth", "Split",
    "Squeeze", "Transpose", "Unsqueeze", "Where",
})

# Kernels of the graph ONNX Runtime runs that compute on 8-bit data.
_INTEGER_KERNELS = frozenset({"ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "QGemm",
                              "DynamicQuantizeMatMul", "QAttention", "MatMulNBits"})


# ---------------------------------------------------------------------- evidence

# model_precision() values and how a report names them
PRECISION_LABELS = {"int8": "int8 (QDQ)", "int4": "int4 weights", "float16": "fp16", "bfloat16": "bf16",
                    "float32": "float32"}
_LOW_BIT_WEIGHTS = frozenset({ir.DataType.INT4, ir.DataType.UINT4})


def model_precision(model: ir.Model) -> str:
    """What a quantized model computes or stores in, read from its graph: "int8" (activations are
    quantized), "int4" (weight-only block quantization), "float16", "bfloat16", else "float32"."""
    if any(is_qdq_op(node, "QuantizeLinear") and not eir.is_constant(node.inputs[0]) for node in model.graph):
        return "int8"
    if any(node.op_type == "MatMulNBits" or (is_qdq_op(node, "DequantizeLinear") and node.inputs[0] is not None
                                             and node.inputs[0].dtype in _LOW_BIT_WEIGHTS)
           for node in model.graph):
        return "int4"
    stored = {value.dtype for value in model.graph.initializers.values()}
    stored |= {ir.DataType(node.attributes["to"].value) for node in model.graph
               if node.op_type == "Cast" and "to" in node.attributes}
    for dtype, name in ((ir.DataType.FLOAT16, "float16"), (ir.DataType.BFLOAT16, "bfloat16")):
        if dtype in stored:
            return name
    return "float32"


def read_cpu_flags(path: str | os.PathLike = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU feature flags (x86 ``flags``, Arm ``Features``), or None when not readable (not Linux)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return None


def int8_dot_product_instructions(flags: Iterable[str] | None, machine: str) -> tuple[str, ...] | None:
    """The int8 dot-product instructions among ``flags``; None when the CPU or flags are unknown."""
    names = _X86_DOT_PRODUCT if machine.lower() in _X86 else (
        _ARM_DOT_PRODUCT if machine.lower().startswith(("arm", "aarch64")) else None)
    if flags is None or names is None:
        return None
    present = set(flags)
    return tuple(name for name in names if name in present)


@dataclass(frozen=True, kw_only=True)
class FloatIsland:
    """A node that reads a dequantized activation and runs in float."""

    node: str
    op_type: str


def float_islands(model: ir.Model, *, int8_ops: frozenset[str] = INT8_CAPABLE_OPS) -> tuple[FloatIsland, ...]:
    """Nodes fed by an activation DequantizeLinear whose op has no integer path (not in ``int8_ops``)."""
    islands = []
    for node in model.graph:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or (
                node.op_type in int8_ops and node.domain in QDQ_DOMAINS):
            continue
        if any(_is_activation_dequantize(value) for value in node.inputs):
            islands.append(FloatIsland(node=eir.node_label(node), op_type=node.op_type))
    return tuple(islands)


def _is_activation_dequantize(value: ir.Value | None) -> bool:
    producer = value.producer() if value is not None else None
    return is_qdq_op(producer, "DequantizeLinear") and not eir.is_constant(producer.inputs[0])


def _quantized_dtype(node: ir.Node) -> str:
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    if zero_point is not None and zero_point.dtype is not None:
        return zero_point.dtype.name.lower()
    array = eir.constant_array(zero_point)
    if array is not None:
        return str(array.dtype)
    attribute = node.attributes.get("output_dtype")
    return ir.DataType(attribute.value).name.lower() if attribute is not None and attribute.value else "uint8"


def signed_activations(model: ir.Model) -> tuple[str, ...]:
    """Activations that QuantizeLinear nodes quantize to int8 (signed)."""
    return tuple(node.inputs[0].name for node in model.graph
                 if is_qdq_op(node, "QuantizeLinear") and not eir.is_constant(node.inputs[0])
                 and _quantized_dtype(node) == "int8")


# Compute-heavy layers that, under these names in the graph ONNX Runtime runs, compute in float.
_FLOAT_LAYERS = frozenset({"Conv", "FusedConv", "ConvTranspose", "NhwcFusedConv", "MatMul", "FusedMatMul", "Gemm",
                           "FusedGemm"})


@dataclass(frozen=True, kw_only=True)
class KernelCount:
    """In the graph ONNX Runtime runs: integer kernels, Q/DQ nodes left away from the graph's edges,
    and compute-heavy layers that run in float (``{op_type: count}``)."""

    integer_kernels: int
    unfused_qdq: int
    float_layers: Mapping[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"integer_kernels": self.integer_kernels, "unfused_qdq": self.unfused_qdq,
                "float_layers": dict(self.float_layers)}


def _is_edge_conversion(node: ir.Node) -> bool:
    """Quantizing a graph input or dequantizing a graph output: needed by any int8 model."""
    if node.op_type == "QuantizeLinear":
        return node.inputs[0] is not None and node.inputs[0].is_graph_input()
    return any(output.is_graph_output() for output in node.outputs)


def kernel_count(optimized: ir.Model) -> KernelCount:
    """Count integer kernels and unfused Q/DQ nodes in ONNX Runtime's optimized graph."""
    integer = sum(1 for node in optimized.graph
                  if node.op_type.startswith("QLinear") or node.op_type in _INTEGER_KERNELS)
    unfused = sum(1 for node in optimized.graph
                  if node.op_type in ("QuantizeLinear", "DequantizeLinear")
                  and not _is_edge_conversion(node))
    float_layers = Counter(node.op_type for node in optimized.graph if node.op_type in _FLOAT_LAYERS)
    return KernelCount(integer_kernels=integer, unfused_qdq=unfused, float_layers=dict(float_layers.most_common()))


@dataclass(frozen=True, kw_only=True)
class SpeedEvidence:
    """What the reasons are read from; ``dot_product`` is None when the CPU's flags are unknown."""

    machine: str
    dot_product: tuple[str, ...] | None
    islands: tuple[FloatIsland, ...]
    signed_activations: tuple[str, ...]
    float_ms: float
    kernels: KernelCount | None = None
    precision: str = "int8"  # model_precision() of the quantized model
    runtime_casts: int = 0  # Cast nodes in the graph ONNX Runtime runs

    @property
    def label(self) -> str:
        return PRECISION_LABELS.get(self.precision, self.precision)

    def to_dict(self) -> dict:
        return {"machine": self.machine, "precision": self.precision, "runtime_casts": self.runtime_casts,
                "int8_dot_product": None if self.dot_product is None else list(self.dot_product),
                "float_islands": [{"node": i.node, "op_type": i.op_type} for i in self.islands],
                "signed_activations": list(self.signed_activations),
                "kernels": self.kernels.to_dict() if self.kernels is not None else None}


# ----------------------------------------------------------------------- reasons


def _cpu_reason(evidence: SpeedEvidence) -> str | None:
    if evidence.dot_product is None or evidence.dot_product:
        return None
    wanted = "AVX512-VNNI or AVX-VNNI" if evidence.machine.lower() in _X86 else "asimddp or i8mm"
    return (f"this CPU ({evidence.machine}) has no int8 dot-product instructions ({wanted}): "
            "ONNX Runtime's int8 kernels gain little over float here")


def _islands_reason(evidence: SpeedEvidence) -> str | None:
    if not evidence.islands:
        return None
    counts = Counter(island.op_type for island in evidence.islands)
    ops = ", ".join(f"{op} x{count}" if count > 1 else op for op, count in counts.most_common())
    return (f"{len(evidence.islands)} float islands: dequantized activations feed {ops}, which run in float "
            "between int8 layers (a dequantize and a quantize each): fold or quantize these ops")


def _signed_reason(evidence: SpeedEvidence) -> str | None:
    if not evidence.signed_activations or evidence.machine.lower() not in _X86:
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
    if evidence.precision != "int4":
        return None
    return ("int4 weight-only: the weights are unpacked at run time and the compute stays float, so the gain "
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
                f"optimizations (next to {kernels.integer_kernels} integer kernels): each is a float<->int8 "
                "conversion pass over a tensor")
    return None


def _float_layers_reason(evidence: SpeedEvidence) -> str | None:
    kernels = evidence.kernels
    if kernels is None or not kernels.float_layers or not kernels.integer_kernels:
        return None
    ops = ", ".join(f"{op} x{count}" if count > 1 else op for op, count in kernels.float_layers.items())
    return (f"{sum(kernels.float_layers.values())} layers run in float in the graph ONNX Runtime runs ({ops}), "
            "between int8 kernels: nodes kept float (--exclude, the accuracy search) and the nodes writing "
            "their inputs")


def slowdown_reasons(evidence: SpeedEvidence) -> tuple[str, ...]:
    """Every reason ``evidence`` shows why the quantized model may not beat float, most fundamental first."""
    if evidence.precision == "int8":
        checks = (_cpu_reason, _tiny_reason, _kernels_reason, _float_layers_reason, _islands_reason,
                  _signed_reason)
    else:
        checks = (_half_precision_reason, _weight_only_reason, _tiny_reason)
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
                "slower": self.slower, "runs": self.runs, "threads": self.threads,
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


def _evidence(quant_model: ir.Model, float_ms: float, threads: int | None) -> SpeedEvidence:
    from edgeopt.runtime.ort import optimized_model

    machine = platform.machine() or "unknown"
    optimized = optimized_model(quant_model, threads=threads)
    return SpeedEvidence(machine=machine, dot_product=int8_dot_product_instructions(read_cpu_flags(), machine),
                         islands=float_islands(quant_model), signed_activations=signed_activations(quant_model),
                         float_ms=float_ms, kernels=kernel_count(optimized), precision=model_precision(quant_model),
                         runtime_casts=sum(1 for node in optimized.graph if node.op_type == "Cast"))


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
    feed = dict(feed) if feed is not None else random_feed(eir.model_inputs(float_ir))
    sessions = (OrtSession(float_ir, threads=threads), OrtSession(quant_ir, threads=threads))
    float_ms, quant_ms = _interleaved_medians(sessions, feed, runs)
    evidence = _evidence(quant_ir, float_ms, threads)
    reasons = slowdown_reasons(evidence) if float_ms < quant_ms else ()
    return SpeedCheck(float_ms=float_ms, quant_ms=quant_ms, runs=runs, threads=threads,
                      evidence=evidence, reasons=reasons)

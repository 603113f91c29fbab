"""What the speed check reads from a quantized model and this machine to explain a slowdown.

The precision a model computes in (:func:`model_precision`, read from its
graph), the CPU's int8 dot-product instructions (:func:`read_cpu_flags`),
float islands and int8 activations in the QDQ graph, and the kernels of the
graph ONNX Runtime actually runs (:func:`kernel_count`: integer kernels, Q/DQ
nodes left unfused, compute-heavy layers left in float), and where the time
goes by ONNX Runtime's profiler (:func:`op_profile`), gathered in one
:class:`SpeedEvidence` that :mod:`edgeopt.quant.speed` turns into reasons.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.quant.ops import QDQ_DOMAINS, WEIGHT_ONLY_OPS, is_float16_cast, is_qdq_op

__all__ = [
    "INT8_CAPABLE_OPS",
    "PRECISION_LABELS",
    "WEIGHT_ONLY_PRECISIONS",
    "FloatIsland",
    "KernelCount",
    "OpTime",
    "SpeedEvidence",
    "X86_MACHINES",
    "float_islands",
    "int8_dot_product_instructions",
    "kernel_count",
    "model_precision",
    "op_profile",
    "read_cpu_flags",
    "signed_activations",
]

X86_MACHINES = ("x86_64", "amd64", "i386", "i686", "x86")
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


# model_precision() values and how a report names them
PRECISION_LABELS = {"int8": "int8 (QDQ)", "int8-dynamic": "int8 (dynamic)", "int4": "int4 weights",
                    "weight8": "8-bit weights", "float16": "fp16",
                    "bfloat16": "bf16", "float32": "float32"}
#: the model_precision() values of weight-only block quantization
WEIGHT_ONLY_PRECISIONS = ("int4", "weight8")
_LOW_BIT_WEIGHTS = frozenset({ir.DataType.INT4, ir.DataType.UINT4})
_DYNAMIC_OPS = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeMatMul"})


def model_precision(model: ir.Model) -> str:
    """What a quantized model computes or stores in, read from its graph: "int8" (activations are
    quantized), "int4" (weight-only block quantization, some of it in 4 bits), "weight8" (all of it in
    8 bits: int4's 8-bit fallback and embedding tables), "int8-dynamic" (activations quantized as the model
    runs), "float16", "bfloat16", else "float32"."""
    if any(is_qdq_op(node, "QuantizeLinear") and not eir.is_constant(node.inputs[0]) for node in model.graph):
        return "int8"
    if any(node.op_type in _DYNAMIC_OPS for node in model.graph):
        return "int8-dynamic"
    bits = {bits for node in model.graph if (bits := _weight_only_bits(node)) is not None}
    if bits:
        return "int4" if 4 in bits else "weight8"
    stored = {value.dtype for value in model.graph.initializers.values()}
    stored |= {ir.DataType(node.attributes["to"].value) for node in model.graph
               if node.op_type == "Cast" and "to" in node.attributes}
    for dtype, name in ((ir.DataType.FLOAT16, "float16"), (ir.DataType.BFLOAT16, "bfloat16")):
        if dtype in stored:
            return name
    return "float32"


def _weight_only_bits(node: ir.Node) -> int | None:
    """The bits of the weight ``node`` unpacks, when it is weight-only block quantization: a MatMulNBits
    or GatherBlockQuantized (its ``bits``), or a blocked or 4-bit DequantizeLinear of a constant."""
    if node.op_type in WEIGHT_ONLY_OPS:
        return node.attributes.get_int("bits", 4)
    if not is_qdq_op(node, "DequantizeLinear") or node.inputs[0] is None:
        return None
    if node.inputs[0].dtype in _LOW_BIT_WEIGHTS:
        return 4
    return 8 if eir.is_constant(node.inputs[0]) and node.attributes.get_int("block_size", 0) else None


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
    names = _X86_DOT_PRODUCT if machine.lower() in X86_MACHINES else (
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
        if not any(_is_activation_dequantize(value) for value in node.inputs):
            continue
        if is_float16_cast(node):  # --fallback fp16: the nodes reading the Cast compute in float16
            islands += [FloatIsland(node=eir.node_label(use.node), op_type=f"{use.node.op_type} (float16)")
                        for use in node.outputs[0].uses()]
        else:
            islands.append(FloatIsland(node=eir.node_label(node), op_type=node.op_type))
    return tuple(dict.fromkeys(islands))  # a node fed by two such Casts is one island


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
    op_times: tuple[OpTime, ...] = ()  # the quantized model's costliest op types, profiled (when it was slower)

    @property
    def label(self) -> str:
        return PRECISION_LABELS.get(self.precision, self.precision)

    def to_dict(self) -> dict:
        return {"machine": self.machine, "precision": self.precision, "runtime_casts": self.runtime_casts,
                "int8_dot_product": None if self.dot_product is None else list(self.dot_product),
                "float_islands": [{"node": i.node, "op_type": i.op_type} for i in self.islands],
                "signed_activations": list(self.signed_activations),
                "kernels": self.kernels.to_dict() if self.kernels is not None else None,
                "op_times": [time._asdict() for time in self.op_times]}


class OpTime(NamedTuple):
    """An op type of the graph ONNX Runtime runs for the quantized model and its milliseconds per run, next
    to those of the float model's ops of the same kind (a QLinearConv's are its Convs'); None: none there."""

    op_type: str
    quant_ms: float
    float_kind: str
    float_ms: float | None


# The kernels ONNX Runtime runs in place of an op, by the op they compute; QLinear<Op> computes <Op>.
_KIND = {"QGemm": "Gemm", "FusedGemm": "Gemm", "ConvInteger": "Conv", "FusedConv": "Conv", "NhwcConv": "Conv",
         "NhwcFusedConv": "Conv", "MatMulInteger": "MatMul", "MatMulIntegerToFloat": "MatMul",
         "DynamicQuantizeMatMul": "MatMul", "FusedMatMul": "MatMul", "MatMulNBits": "MatMul",
         "QAttention": "Attention"}
#: How many op types a slowdown's reason names.
PROFILED_OPS = 4


def _kind(op_type: str) -> str:
    if op_type in _KIND:
        return _KIND[op_type]
    return op_type.removeprefix("QLinear") if op_type.startswith("QLinear") else op_type


def op_profile(float_times: Mapping[str, float], quant_times: Mapping[str, float]) -> tuple[OpTime, ...]:
    """The quantized model's :data:`PROFILED_OPS` costliest op types (``op -> ms per run``, as
    :func:`edgeopt.runtime.ort.op_times_ms` gives them), each next to the float model's time for its kind."""
    by_kind: dict[str, float] = {}
    for op_type, ms in float_times.items():
        by_kind[_kind(op_type)] = by_kind.get(_kind(op_type), 0.0) + ms
    costliest = sorted(quant_times.items(), key=lambda item: -item[1])[:PROFILED_OPS]
    return tuple(OpTime(op_type, ms, _kind(op_type), by_kind.get(_kind(op_type))) for op_type, ms in costliest)

"""The residual stream of a transformer: where the ONNX Runtime target keeps it float.

A transformer adds each branch into a stream (``x + attention(norm(x))``) that a normalization reads next.
Quantized per tensor, the stream takes 8-bit steps set by its widest tokens and channels, and the
normalization (float in ONNX Runtime, which has no integer LayerNorm) scales the error of the narrow rows up
with them: a ViT's class token, a padded or short token. Measured in static int8 on the transformers of
``tests/hf_models.py`` (output SQNR against the float model): BERT 29.1 -> 36.0 dB, GPT-2 33.1 -> 40.2 dB,
ViT 19.1 -> 22.5 dB (30.5 with its class token's Concat in float, ``placement._float_output_chains``); ONNX
Runtime's ``quantize_static`` (MinMax) 23.6, 31.9 and 19.1 dB. A spelled-out
RMSNorm (``edgeopt.passes.rules.rms_norm``) is such a normalization too: the KV-cache decoder of
``tests/llm_models.py`` 26.5 -> 28.6 dB, with the RMSNorm float as one group. Latency in ONNX Runtime stays
within noise: the Adds were QLinearAdds, and the Gemms writing the branches keep their integer kernels with
a float output.

An Add that a LayerNormalization alone reads is written as ``Sum`` (the same function): ONNX Runtime would fuse
a float Add + LayerNormalization into its ``SkipLayerNormalization``, whose CPU kernel measured 8x slower
than the two ops it replaces (ONNX Runtime 1.32: 0.39 against 0.05 ms at ``[1, 128, 768]``, one or two
threads; a BERT-base-size encoder's int8 model 17 % slower in all).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.passes import PATTERN_KEY
from edgeopt.passes.rules import RMS_NORM
from edgeopt.quant.ops import DATA_MOVEMENT_OPS

__all__ = ["NORMALIZATION_OPS", "RESIDUAL_STREAM", "ResidualAdd", "residual_adds"]

#: Why an Add of a residual stream stays float (:func:`residual_adds`); :class:`ResidualAdd` says more.
RESIDUAL_STREAM = ("an Add of a residual stream that a float normalization reads: its 8-bit output would only be "
                   "dequantized again, at the cost of the stream's precision")
#: Normalizations that read a residual stream (ONNX's and ONNX Runtime's contrib ops).
NORMALIZATION_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "GroupNormalization",
                     "InstanceNormalization", "MeanVarianceNormalization")


@dataclass(frozen=True)
class ResidualAdd:
    """How an Add of a residual stream stays float: reading its inputs before their Q/DQ pairs (else
    dequantized), and written as ``Sum`` (a LayerNormalization alone reads it)."""

    reads_unquantized: bool
    as_sum: bool

    @property
    def reason(self) -> str:
        return (RESIDUAL_STREAM + ("; it reads its inputs unquantized" if self.reads_unquantized else "")
                + ("; written as Sum, which ONNX Runtime does not fuse into its slower SkipLayerNormalization"
                   if self.as_sum else ""))


def _normalizes(node: ir.Node) -> bool:
    return node.op_type in NORMALIZATION_OPS or node.metadata_props.get(PATTERN_KEY) in ("layer_norm", RMS_NORM)


def residual_adds(graph: ir.Graph, candidates: Mapping[str, ir.Node], refusals: Mapping[str, str]
                  ) -> dict[str, ResidualAdd]:
    """The Adds of a residual stream that the target normalizes in float (ONNX Runtime has no integer
    LayerNorm), by name: each an integer candidate whose every reader stays float or is such an Add,
    looking through data movement (a ViT's class-token Gather), at least one of them a normalization or such
    an Add (a transformer's ``x + attention(norm(x))``). Quantized, the stream's 8-bit steps are set by its
    widest tokens and channels, and the normalization scales the error of the narrow ones up with them.

    Such an Add reads its inputs before their Q/DQ pairs (kept float as ``--exclude`` keeps a node) when that
    costs no integer kernel: each input comes from a float node, another such Add, or a Gemm / constant-weight
    MatMul that the Add alone reads (ONNX Runtime then runs it with a float output, and the branch is not
    rounded to 8 bits either). Otherwise it reads them dequantized. :class:`ResidualAdd` says which."""
    found: set[str] = set()
    memo: dict[str, bool] = {}

    def reads_float(node: ir.Node) -> bool:
        if node.name in found or node.name in refusals:
            return True
        if node.name not in memo:
            memo[node.name] = False  # a cycle through a subgraph's outer reads: not float
            memo[node.name] = (eir.is_op(node, *DATA_MOVEMENT_OPS) and node.name in candidates
                               and _read_only_by(node.outputs, reads_float))
        return memo[node.name]

    def normalized(node: ir.Node) -> bool:
        if node.name in found or _normalizes(node):
            return True
        return (eir.is_op(node, *DATA_MOVEMENT_OPS)
                and any(normalized(r) for v in node.outputs for r in eir.consumers(v)))

    for node in reversed(tuple(graph)):  # readers first
        if node.op_type != "Add" or node.name not in candidates or node.name in refusals:
            continue
        readers = eir.consumers(node.outputs[0])
        if _read_only_by(node.outputs, reads_float) and any(normalized(r) for r in readers):
            found.add(node.name)
    return {node.name: ResidualAdd(reads_unquantized=all(_float_edge(v, found, refusals) for v in node.inputs),
                                   as_sum=[r.op_type for r in eir.consumers(node.outputs[0])] == ["LayerNormalization"])
            for node in graph if node.name in found}


def _read_only_by(values: Iterable[ir.Value], accepts) -> bool:
    """Every value of ``values`` is read, by nodes ``accepts`` all accept (a Shape or Size reads no value),
    and none is a graph output."""
    return all(not v.is_graph_output() and v.uses()
               and all(r.op_type in ("Shape", "Size") or accepts(r) for r in eir.consumers(v)) for v in values)


def _float_edge(value: ir.Value | None, found: Collection[str], refusals: Mapping[str, str]) -> bool:
    """Whether a residual Add (one of ``found``) can read ``value`` unquantized without costing its producer
    an integer kernel."""
    if value is None or eir.is_constant(value):
        return True
    producer = value.producer()
    if producer is None or producer.name in refusals or producer.name in found:
        return True
    return (eir.is_op(producer, "Gemm", "MatMul") and value is producer.outputs[0] and len(producer.inputs) > 1
            and eir.is_constant(producer.inputs[1]) and all(r.name in found for r in eir.consumers(value)))

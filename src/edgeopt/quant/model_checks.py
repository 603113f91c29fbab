"""What the quantizers check before they start: that the model is a float32 one not quantized already,
and that each ``--exclude`` entry names a node or an op type of it (else the closest names)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import onnx_ir as ir

from edgeopt.errors import ConfigError, ModelError
from edgeopt.metrics import count_of
from edgeopt.quant.ops import WEIGHT_ONLY_OPS

__all__ = ["NodeIndex", "check_exclude", "check_not_quantized", "vanished_excludes"]

_QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QGemm",
                            "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                            *WEIGHT_ONLY_OPS, "QAttention", "QEmbedLayerNormalization"})


_HALF_TYPES = {ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16"}


def check_not_quantized(model: ir.Model) -> None:
    """ModelError when the model already holds quantized ops or half-precision weights: every
    scheme starts from the float32 model (converting again would write a model that claims a
    precision it does not have, or quantize rounded weights a second time)."""
    for node in model.graph.all_nodes():
        if node.op_type in _QUANTIZED_OPS or node.op_type.startswith("QLinear"):
            raise ModelError(f"model is already quantized (node {node.name or node.op_type!r} is "
                             f"{node.op_type}): quantize the float model instead")
    half = [value for value in model.graph.initializers.values() if value.dtype in _HALF_TYPES]
    if half:
        raise ModelError(f"model is already converted to {_HALF_TYPES[half[0].dtype]} "
                         f"({count_of(len(half), 'weight', 'weights')}, e.g. {half[0].name!r}): quantize the "
                         "float32 model instead")
    _check_not_float64(model)


def _check_not_float64(model: ir.Model) -> None:
    """ModelError for a model that computes in float64 (numpy or scikit-learn exporters write them):
    every scheme converts float32 values, so it would come back unchanged. A float32 input, or
    float32 weights (initializers and Constant nodes) outnumbering float64 ones, make a float32 model;
    so does a float64 input cast to float32 before float32 weights (a TensorFlow graph fed float64, a
    pipeline's cast), but a float64 input with no float32 weight is a float64 model."""
    inputs = {v.dtype for v in model.graph.inputs}
    if ir.DataType.FLOAT in inputs:
        return
    tensors = [v.const_value for v in model.graph.initializers.values() if v.const_value is not None]
    tensors += [node.attributes["value"].value for node in model.graph.all_nodes()
                if node.op_type == "Constant" and "value" in node.attributes]
    sizes = {dtype: sum(t.size for t in tensors if t.dtype == dtype)
             for dtype in (ir.DataType.FLOAT, ir.DataType.DOUBLE)}
    if sizes[ir.DataType.DOUBLE] < sizes[ir.DataType.FLOAT] or (
            ir.DataType.DOUBLE not in inputs and sizes[ir.DataType.DOUBLE] == sizes[ir.DataType.FLOAT]):
        return
    raise ModelError("model computes in float64 (its inputs or most of its weights are float64): edgeopt "
                     "quantizes float32 models; export it in float32 (torch: model.float(); skl2onnx: "
                     "FloatTensorType)")


@dataclass(frozen=True)
class NodeIndex:
    """The node names and op types of a model (what ``--exclude`` may name), without the model."""

    names: tuple[str, ...]
    op_types: frozenset[str]
    left_out: frozenset[str] = frozenset()  # the names of subgraph nodes, when they are not indexed

    @classmethod
    def of(cls, model: ir.Model, *, subgraphs: bool = False) -> NodeIndex:
        """The main graph's nodes; with ``subgraphs``, those of If branches and Loop/Scan bodies too (for the
        schemes that rewrite them: int4-weight, bf16)."""
        nodes = list(model.graph.all_nodes() if subgraphs else model.graph)
        main = {id(node) for node in nodes}
        inner = () if subgraphs else (node.name for node in model.graph.all_nodes() if id(node) not in main)
        return cls(names=tuple(node.name for node in nodes if node.name),
                   op_types=frozenset(node.op_type for node in nodes), left_out=frozenset(inner))


def check_exclude(models: Iterable[ir.Model | NodeIndex], exclude: Iterable[str]) -> None:
    """ConfigError naming the first exclude entry that is neither a node name nor an op type of any of ``models``.

    (The user's model and its optimized form: a user names nodes of the
    file, accuracy tools name nodes of the model they quantized.)
    """
    indexes = [m if isinstance(m, NodeIndex) else NodeIndex.of(m) for m in models]
    names = list(dict.fromkeys(name for index in indexes for name in index.names))
    op_types = set().union(*(index.op_types for index in indexes))
    for entry in exclude:
        if entry in op_types or entry in names:
            continue
        if any(entry in index.left_out for index in indexes):
            raise ConfigError(f"--exclude {entry!r} is neither a node name nor an op type of the model's main graph: "
                              "it is inside an If branch or a Loop/Scan body, which this scheme leaves float anyway: "
                              "drop it")
        raise ConfigError(f"--exclude {entry!r} is neither a node name nor an op type of the model; "
                          f"{_exclude_suggestion(entry, names, op_types)}")


def _exclude_suggestion(entry: str, names: Sequence[str], op_types: Iterable[str]) -> str:
    """The op types and node names close to a mistyped ``--exclude`` entry (case aside), or examples of both."""
    by_lower = {op_type.lower(): op_type for op_type in sorted(op_types)}
    close_ops = [by_lower[key] for key in difflib.get_close_matches(entry.lower(), list(by_lower), n=3, cutoff=0.6)]
    close_names = difflib.get_close_matches(entry, names, n=5, cutoff=0.5)
    if close_ops or close_names:
        return "did you mean " + ", ".join([*(f"op type {op}" for op in close_ops), *close_names]) + "?"
    return (f"its op types are {', '.join(sorted(op_types)[:12])}{', ...' if len(by_lower) > 12 else ''}; "
            f"node names are like {', '.join(names[:3]) or 'none'}")


def vanished_excludes(model: ir.Model, exclude: Iterable[str], *, subgraphs: bool = False) -> list[str]:
    """Notes for the exclude entries that name no node or op type of ``model`` after the float passes
    (nor, with ``subgraphs``, of its subgraphs)."""
    index = NodeIndex.of(model, subgraphs=subgraphs)
    present = {*index.names, *index.op_types}
    return [f"--exclude {entry!r}: no such node after the float passes (folded into its neighbour)"
            for entry in exclude if entry not in present]

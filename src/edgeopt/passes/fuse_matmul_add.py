"""Fuse ``Add(MatMul(A, W), b)`` -- an exported ``nn.Linear`` -- into one ``Gemm``.

PyTorch exports ``nn.Linear`` on a ``[batch, seq, features]`` input as
``MatMul(A, W[K, N])`` then ``Add(., b[N])``. Quantized as they stand, the
MatMul output gets a Q/DQ of its own (one more rounding) and ``b`` is
quantized like an activation (8 bits). As one ``Gemm(A, W, b)`` the bias is
the layer's: int32 at ``scale = input_scale * weight_scale``, added in the
accumulator.

Gemm takes 2-D operands, so an input ``A[d0, ..., d(n-2), K]`` is flattened
to rows and the result unflattened::

    Reshape(A, [-1, K]) -> Gemm(., W, b) -> Reshape(., [d0, ..., d(n-2), N])

which is exact: MatMul treats every leading index as a row, and both
Reshapes keep row-major order. The output target uses ``-1`` for one leading
dim (the dynamic one, else ``d0``: the batch then follows what comes in) and
the static value for every other, so at most one leading dim may be dynamic.
Gemm computes ``A W + b`` as MatMul then Add do: the float function is the
same up to the order of the accumulation.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.passes._conv import foldable_parts
from edgeopt.passes._matching import is_op, producer_and_constant, shape_text
from edgeopt.passes._report import ReportedPassResult
from edgeopt.passes._rules import Match, Rule, RuleContext, RulePass, run_on_copy

__all__ = ["FuseMatMulAddPass", "MatMulAddToGemmRule", "fuse_matmul_add"]

#: Before opset 7 Gemm's C must match the output's shape unless ``broadcast=1`` says otherwise.
GEMM_BROADCAST_OPSET = 7


@dataclasses.dataclass
class _LinearAdd(Match):
    matmul: ir.Node
    add: ir.Node
    constant: ir.Value
    bias: np.ndarray | None = None  # [N], the weight's dtype
    channels_in: int = 0  # K
    leading: tuple[int | None, ...] = ()  # A's dims before K (None: dynamic); empty for a 2-D A


def _bias_refusal(array: np.ndarray, channels: int, output_rank: int) -> str | None:
    """Why the Add's constant is not one value per output feature (None when it is)."""
    if not np.issubdtype(array.dtype, np.floating):
        return f"the added constant is {array.dtype}, not float"
    shown = shape_text(array.shape)
    if array.ndim > output_rank:
        return f"the added constant has shape {shown}, of higher rank than the MatMul output ({output_rank})"
    if array.size == 1 or (array.shape[-1] == channels and array.size == channels):
        return None
    return f"the added constant has shape {shown}, not one value per output feature (expected [{channels}])"


def _leading_dims(value: ir.Value) -> tuple[int | None, ...] | str:
    """A's dims before the last one (None where dynamic), or why A cannot become Gemm rows."""
    if value.shape is None:
        return "the rank of the MatMul input is unknown"
    if len(value.shape) < 2:
        return f"the MatMul input has rank {len(value.shape)}; Gemm needs rows"
    leading = tuple(d if isinstance(d, int) else None for d in value.shape.dims[:-1])
    if sum(d is None for d in leading) > 1:
        return (f"{sum(d is None for d in leading)} leading dims of the MatMul input are dynamic "
                "(the output Reshape can infer only one)")
    if 0 in leading:
        return "the MatMul input is empty (a leading dim is 0)"
    return leading


def _match(add: ir.Node) -> _LinearAdd | None:
    found = producer_and_constant(add, ("MatMul",), commutative=True)
    if found is None:
        return None
    matmul, constant = found
    return _LinearAdd(nodes=(matmul, add), matmul=matmul, add=add, constant=constant)


def _check(match: _LinearAdd) -> str | None:
    parts = foldable_parts(match.matmul, match.add)
    if isinstance(parts, str):
        return parts
    leading = _leading_dims(match.matmul.inputs[0])
    if isinstance(leading, str):
        return leading
    bias = eir.constant_array(match.constant)
    reason = _bias_refusal(bias, parts.channels, len(leading) + 1)
    if reason is not None:
        return reason
    if bias.dtype != parts.weight.dtype:
        return f"the added constant is {bias.dtype} and the weight {parts.weight.dtype}"
    match.bias = np.broadcast_to(bias.reshape(-1), (parts.channels,))
    match.channels_in = parts.weight.shape[0]
    match.leading = leading if len(leading) > 1 else ()
    return None


def _bias_value(graph: ir.Graph, match: _LinearAdd) -> ir.Value:
    """The constant as a ``[N]`` initializer: itself when it already is one."""
    constant = match.constant
    if constant.is_initializer() and tuple(eir.constant_array(constant).shape) == match.bias.shape:
        return constant
    hint = constant.name or f"{eir.node_label(match.matmul)}.bias"
    return eir.add_initializer(graph, match.bias.copy(), f"{hint}_vector")


def _float_type(match: _LinearAdd) -> ir.TensorType:
    return ir.TensorType(ir.DataType.from_numpy(match.bias.dtype))


def _precedes(graph: ir.Graph, first: ir.Node, second: ir.Node) -> bool:
    for node in graph:
        if node is first:
            return True
        if node is second:
            return False
    return False


def _shared_flatten(graph: ir.Graph, value: ir.Value, target: np.ndarray, before: ir.Node) -> ir.Value | None:
    """The output of an existing ``Reshape(value, target)`` placed before ``before``, if there is one,
    so q, k and v reading one tensor read one flattened copy (one Q/DQ, one SmoothQuant site)."""
    for reader in eir.consumers(value):
        if (is_op(reader, "Reshape") and reader.inputs[0] is value and not reader.attributes.get_int("allowzero", 0)
                and np.array_equal(eir.constant_array(reader.inputs[1]), target)
                and _precedes(graph, reader, before)):
            return reader.outputs[0]
    return None


def _flattened(graph: ir.Graph, match: _LinearAdd, rows: int | None) -> tuple[list[ir.Node], ir.Value]:
    """New nodes (possibly none) and the value holding A as ``[rows, K]``."""
    source, channels_in = match.matmul.inputs[0], match.channels_in
    target = np.array([-1, channels_in], dtype=np.int64)
    shared = _shared_flatten(graph, source, target, match.add)
    if shared is not None:
        return [], shared
    name = eir.unique_value_name(graph, f"{source.name or eir.node_label(match.matmul)}_rows")
    shape_value = eir.add_initializer(graph, target, f"{name}_shape")
    rows_value = ir.Value(name=name, shape=ir.Shape([rows, channels_in]), type=_float_type(match))
    node = ir.node("Reshape", [source, shape_value], outputs=[rows_value], name=name)
    return [node], rows_value


def _output_target(leading: tuple[int | None, ...], channels: int) -> np.ndarray:
    """The unflatten target: ``-1`` at the dynamic leading dim (else dim 0), static values elsewhere."""
    infer = leading.index(None) if None in leading else 0
    return np.array([-1 if i == infer else d for i, d in enumerate(leading)] + [channels], dtype=np.int64)


class MatMulAddToGemmRule(Rule):
    """MatMul(A, W[K, N]) -> Add(constant [N]) -> one Gemm (A flattened to rows when rank > 2)."""

    name = "matmul-add-to-gemm"
    anchor_ops = frozenset({"Add"})

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        return _match(node)

    def check(self, match: _LinearAdd, context: RuleContext) -> str | None:
        if context.opset < GEMM_BROADCAST_OPSET:
            return f"Gemm broadcasts its bias from opset {GEMM_BROADCAST_OPSET} (model has {context.opset})"
        return _check(match)

    def rewrite(self, match: _LinearAdd, context: RuleContext) -> str:
        new_nodes = _gemm_nodes(context.graph, match)
        _replace_keeping_name(context.graph, match, new_nodes)
        gemm = next(node for node in new_nodes if node.op_type == "Gemm")
        rows = " between Reshapes to rows and back" if match.leading else ""
        return f"fused into Gemm {eir.node_label(gemm)}{rows}"


def _gemm_nodes(graph: ir.Graph, match: _LinearAdd) -> list[ir.Node]:
    """[Reshape to rows,] Gemm[, Reshape back]: the nodes that compute the Add's output."""
    output, channels = match.add.outputs[0], match.bias.shape[0]
    label = match.matmul.name or eir.node_label(match.matmul)
    rows = math.prod(match.leading) if None not in match.leading else None
    nodes, gemm_input = [], match.matmul.inputs[0]
    if match.leading:
        nodes, gemm_input = _flattened(graph, match, rows)
    gemm_output = ir.Value(name=eir.unique_value_name(graph, f"{label}_gemm"), type=_float_type(match),
                           shape=ir.Shape([rows, channels]) if match.leading else output.shape)
    nodes.append(ir.node("Gemm", [gemm_input, match.matmul.inputs[1], _bias_value(graph, match)],
                         outputs=[gemm_output], name=match.matmul.name))
    if match.leading:
        target = eir.add_initializer(graph, _output_target(match.leading, channels), f"{label}_output_shape")
        unflat = ir.Value(name=eir.unique_value_name(graph, f"{label}_unflat"), type=_float_type(match),
                          shape=output.shape)
        nodes.append(ir.node("Reshape", [gemm_output, target], outputs=[unflat], name=f"{label}_unflatten"))
    return nodes


def _replace_keeping_name(graph: ir.Graph, match: _LinearAdd, new_nodes: list[ir.Node]) -> None:
    """Swap in ``new_nodes``; their result takes the Add output's name (readers and users refer to it)."""
    old, new = match.add.outputs[0], new_nodes[-1].outputs[0]
    name = old.name
    eir.replace_nodes(graph, [match.add, match.matmul], old, new_nodes)
    if name and new.name != name:
        old.name = None
        new.name = name


class FuseMatMulAddPass(RulePass):
    """Fuse ``MatMul`` + ``Add(bias)`` (an exported Linear) into ``Gemm``, so its bias is quantized as int32.

    Rewrites:

    * ``Add(MatMul(A, W), b)`` and ``Add(b, MatMul(A, W))`` with a 2-D
      ``A`` -> ``Gemm(A, W, b)`` (alpha = beta = 1, no transposes);
    * the same with ``A[d0, ..., K]`` of rank > 2 -> ``Reshape(A, [-1, K])
      -> Gemm -> Reshape(., [d0, ..., N])`` (one dim inferred as ``-1``).
      Gemms reading the same ``A`` share one flattening Reshape.

    ``b`` becomes a ``[N]`` initializer; the Add output keeps its name and
    the Gemm takes the MatMul's node name (so ``--exclude`` still finds it).

    Preconditions (else left, with the reason): ``W`` is a float constant of
    shape ``[K, N]``; ``b`` is a float constant of the weight's dtype with one
    value per output feature (``[N]``, ``[1, N]``, ``[1, 1, N]``) or one
    value, of rank at most the output's ("the added constant has shape
    [16,64], not one value per output feature"); the MatMul output is read
    by that Add alone and is not a graph output; the rank of ``A`` is known
    and at least 2, and at most one of its leading dims is dynamic; opset
    >= 7 (Gemm broadcasting its bias). Runs after BatchNormalization
    folding, which leaves ``MatMul -> Add(shift)`` behind. Rewrites the
    model it is given.
    """

    name = "fuse-matmul-add"

    def __init__(self) -> None:
        self.rules = (MatMulAddToGemmRule(),)


def fuse_matmul_add(model: ir.Model) -> ReportedPassResult:
    """Fuse MatMul + Add(bias) into Gemm on a copy of ``model``; the input is not modified."""
    return run_on_copy(FuseMatMulAddPass(), model)

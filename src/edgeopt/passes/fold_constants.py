"""Fold constant subgraphs into initializers.

A node whose inputs are all constants computes the same tensor on every run;
evaluating it once (numpy, :mod:`edgeopt.passes._constant_ops`) and storing
the result as an initializer removes the node. Exporters leave many such
nodes: ``Constant`` nodes holding weights and scalars, and the shape
arithmetic around Reshape (``Shape -> Gather -> Unsqueeze -> Concat``), whose
``Shape`` is itself constant once the input shape is static, and
``CastLike(constant, x)``, which reads only the type of ``x``: torch's dynamo
exporter, unoptimized, writes a bias-free Conv's zero bias as
``Expand(CastLike(0, x), Shape(weight)[:1])`` (so the Conv kept a computed bias,
its BatchNorm did not fold and it stayed float). Later rules then see plain
initializers, and shapes: when folding computed something (not only turned
Constant nodes, which inference reads, into initializers) and values are left
of unknown shape, ONNX shape inference runs again, since a folded input may
be what it lacked (dynamo's unoptimized ``ReduceMean(x, Reshape([-1, -2],
[-1]))`` left the mean, and every value after it, without a shape, so the
mean of an SE block was not pooled as a GlobalAveragePool).

Folding a node whose constant input other nodes read too leaves both the
input and the result in the model. For shape arithmetic that is nothing; for
a weight (a tied embedding read by a Gather and, as ``Transpose(E)``, by the
LM head) it is a second copy of the weight. ``copy_shared=False`` refuses
such folds of tensors of :data:`SHARED_COPY_MIN_ELEMENTS` elements or more,
for callers that read through the node instead (int4 quantizes the head
from ``Transpose(E)`` and stores only its packed copy).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.passes._constant_ops import CONSTANT_OPS
from edgeopt.passes._matching import shape_text
from edgeopt.passes._report import PassReport, ReportedPassResult
from edgeopt.passes._rules import Match, Rule, RuleContext, RulePass, run_on_copy

__all__ = ["DEFAULT_MAX_ELEMENTS", "SHARED_COPY_MIN_ELEMENTS", "FoldConstantsPass", "fold_constants"]

logger = logging.getLogger(__name__)

#: Results larger than this (and larger than every input) are not materialized.
DEFAULT_MAX_ELEMENTS = 1 << 20

#: With ``copy_shared=False``, a result this large that copies a shared constant is not folded.
SHARED_COPY_MIN_ELEMENTS = 1024

# Quantization structure is meaningful even on constant weights: never fold it.
_KEPT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


@dataclasses.dataclass
class _ConstantNode(Match):
    node: ir.Node
    result: np.ndarray | None = None


def _attribute_kwargs(node: ir.Node) -> dict[str, object]:
    kwargs = {}
    for name, attribute in node.attributes.items():
        value = attribute.value
        kwargs[name] = list(value) if isinstance(value, tuple) else value
    return kwargs


def _shape_result(node: ir.Node) -> np.ndarray | None:
    shape = eir.static_shape(node.inputs[0])
    if shape is None:
        return None
    if node.op_type == "Size":
        return np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", None)
    return np.array(shape[start:end], dtype=np.int64)


def _shared_input(node: ir.Node, result_size: int) -> ir.Value | None:
    """A constant input at least as large as the result (and not small) that outlives the fold."""
    if result_size < SHARED_COPY_MIN_ELEMENTS:
        return None
    for value in node.inputs:
        array = eir.constant_array(value) if value is not None else None
        if array is not None and array.size >= result_size and (
                len(value.uses()) > 1 or value.is_graph_output()):
            return value
    return None


class FoldConstantRule(Rule):
    """Evaluate a node whose inputs are all constants (or a Shape/Size of a static shape)."""

    name = "fold-constant"
    verb = "folded"

    def __init__(self, max_elements: int = DEFAULT_MAX_ELEMENTS, *, copy_shared: bool = True) -> None:
        self.max_elements = max_elements
        self.copy_shared = copy_shared

    def pattern(self, node: ir.Node, context: RuleContext) -> Match | None:
        if node.op_type in _KEPT_OPS:
            return None
        if node.op_type == "Constant":
            return _ConstantNode(nodes=(node,), node=node)
        if node.op_type == "Identity" and node.inputs and node.inputs[0] is not None \
                and node.inputs[0].is_initializer():
            return None  # a second name for a weight: dead-code removal makes its readers read the weight
        if node.op_type in ("Shape", "Size") and eir.static_shape(node.inputs[0]) is not None:
            return _ConstantNode(nodes=(node,), node=node)
        if node.op_type == "CastLike" and eir.is_constant(node.inputs[0]) and node.inputs[1].dtype is not None:
            return _ConstantNode(nodes=(node,), node=node)  # only the type of input 1 is read
        inputs = [v for v in node.inputs if v is not None]
        if inputs and all(eir.is_constant(v) for v in inputs):
            return _ConstantNode(nodes=(node,), node=node)
        return None

    def check(self, match: _ConstantNode, context: RuleContext) -> str | None:
        node = match.node
        if len(node.outputs) != 1:
            return f"{node.op_type} has {len(node.outputs)} outputs"
        if node.outputs[0].is_graph_output():
            return f"its output {node.outputs[0].name!r} is a graph output"
        result = self._evaluate(node)
        if isinstance(result, str):
            return result
        largest_input = max((eir.constant_array(v).size for v in node.inputs
                             if v is not None and eir.is_constant(v)), default=0)
        if result.size > self.max_elements and result.size > largest_input:
            return f"result would have {result.size} elements (limit {self.max_elements})"
        if not self.copy_shared:
            shared = _shared_input(node, result.size)
            if shared is not None:
                return f"{shared.name!r} has other readers: folding would store a second copy of it"
        match.result = result
        return None

    def _evaluate(self, node: ir.Node) -> np.ndarray | str:
        if node.op_type == "Constant":
            array = eir.constant_array(node.outputs[0])
            return array if array is not None else "sparse or string Constant"
        if node.op_type in ("Shape", "Size"):
            return _shape_result(node)
        if node.op_type == "CastLike":
            return eir.constant_array(node.inputs[0]).astype(node.inputs[1].dtype.numpy())
        function = CONSTANT_OPS.get(node.op_type)
        if function is None:
            return f"no constant evaluator for {node.op_type}"
        arrays = [eir.constant_array(v) if v is not None else None for v in node.inputs]
        try:
            return np.asarray(function(*arrays, **_attribute_kwargs(node)))
        except Exception as error:  # an invalid or unusual node: leave it to the runtime
            return f"evaluation failed ({type(error).__name__}: {error})"

    def rewrite(self, match: _ConstantNode, context: RuleContext) -> str:
        output = match.node.outputs[0]
        name = output.name or f"{match.node.op_type}_folded"
        output.name = None
        value = eir.add_initializer(context.graph, match.result, name)
        eir.replace_value(output, value)
        eir.remove_nodes(context.graph, [match.node])
        return f"folded into initializer {value.name!r} {shape_text(match.result.shape)}"


class FoldConstantsPass(RulePass):
    """Replace constant-only nodes by initializers.

    Rewrites:

    * ``Constant`` nodes -> initializers of the same name;
    * ``Shape``/``Size`` of a value with a static shape -> int64 initializer;
    * ``CastLike`` of a constant to a value of known type -> the constant in that type;
    * any op of :data:`~edgeopt.passes._constant_ops.CONSTANT_OPS` (Reshape,
      Unsqueeze, Cast, Concat, Gather, Slice, Add, Mul, ...) whose inputs are
      all constants -> its result.

    Leaves (with a reason): ops without an evaluator, results over
    ``max_elements`` that are larger than every input (a huge Expand or
    ConstantOfShape), outputs that are graph outputs, multi-output nodes,
    and with ``copy_shared=False`` a copy of a constant other nodes read.
    Never folds Quantize/DequantizeLinear. Preconditions: none; shapes need
    to be inferred (as ``load_model`` does) for Shape folding. After folding,
    values still without a shape get one from ONNX shape inference where the
    folded constants make it possible. Rewrites the model it is given (main
    graph only).
    """

    name = "fold-constants"

    def __init__(self, max_elements: int = DEFAULT_MAX_ELEMENTS, *, copy_shared: bool = True) -> None:
        self.rules = (FoldConstantRule(max_elements, copy_shared=copy_shared),)

    def call(self, model: ir.Model) -> ReportedPassResult:
        """Fold to a fixed point; while that leaves values without a shape that inference then finds,
        fold again (a Shape of a value inference just shaped folds in turn)."""
        computing = [node for node in model.graph if node.op_type != "Constant"]
        result = super().call(model)
        applied = list(result.report.applied)
        for _ in range(self.max_sweeps):
            # inference reads Constant nodes already: only a folded computation can give it something new
            folded = [node for node in computing if node.graph is None]
            computing = [node for node in model.graph if node.op_type != "Constant"]
            if not (folded and _infer_missing_shapes(model)):
                break
            result = super().call(model)
            applied += result.report.applied
        report = PassReport(name=self.name, modified=bool(applied), outcomes=(*applied, *result.report.refused))
        return ReportedPassResult(model=model, modified=report.modified, report=report)


def _unshaped(model: ir.Model) -> int:
    return sum(value.shape is None for node in model.graph for value in node.outputs)


def _infer_missing_shapes(model: ir.Model) -> bool:
    """ONNX shape inference when values lack a shape, best effort as at loading; whether it found any."""
    missing = _unshaped(model)
    if not missing:
        return False
    try:
        eir.infer_shapes(model)
    except Exception as error:  # an op ONNX's inference rejects: the shapes stay as they were
        logger.info("shape inference after folding skipped (%s)", str(error).splitlines()[0] if str(error) else error)
    return _unshaped(model) < missing


def fold_constants(model: ir.Model, *, max_elements: int = DEFAULT_MAX_ELEMENTS,
                   copy_shared: bool = True) -> ReportedPassResult:
    """Fold constant subgraphs on a copy of ``model``; the input is not modified."""
    return run_on_copy(FoldConstantsPass(max_elements, copy_shared=copy_shared), model)

"""Float-weight twins: what a quantized layer would compute from its quantized inputs with its float weights.

A row of ``compare`` holds the error of a tensor from every layer before it. For
a layer reading a quantized weight (a conv, a Gemm), the error arising inside it
is its weights' rounding and its output's; the error of its inputs, scaled
by its arithmetic, is not its own. Its own share shows against a *twin*: the
float model's nodes computing the same tensor (the conv and the Relu fused with
it), copied into the quantized model and fed the quantized model's
dequantized activations in place of the float model's tensors. With ``y`` the
float tensor, ``y_t`` the twin's and ``y_q`` the quantized one::

    carried = SQNR(y, y_t)    # the inputs' error, through the layer's float arithmetic
    lost    = carried - SQNR(y, y_q)

so a layer that averages its inputs' noise away is not credited with the gain
(the old measure, worst input SQNR minus output SQNR, could be negative), and
one that amplifies it is not blamed for it. The same serves a node whose Relu
another quantizer dropped, letting its output's Q range clamp (ONNX Runtime's
after an Add): the twin is the float Add and Relu.

A twin is built only where it computes the same function: the float nodes
between the tensors the quantized layer's activations stand for and the
tensor it writes, of the same op types but for a Relu or Clip a quantizer
dropped (its Q range clamps); none where a float rewrite (equalization,
SmoothQuant) rescaled those tensors, since the float weights are then not
those the quantized layer approximates.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.naming import claim_name
from edgeopt.quant.compare_matching import TensorMatch, carried_value, dequantizes_constant, fused_chain, value_names
from edgeopt.quant.ops import is_float16_cast

__all__ = ["TWIN_SUFFIX", "float_weight_twins"]

#: Appended to the names of a twin's nodes, values and constants in the quantized model.
TWIN_SUFFIX = "__edgeopt_twin"
#: The longest float chain copied for one row (a Conv, a BatchNormalization left unfolded, a Relu).
_MAX_CHAIN = 4
_CLAMPS = ("Relu", "Clip")


def float_weight_twins(float_model: ir.Model, quant_model: ir.Model, matches: list[TensorMatch],
                       skip: Collection[str] = (), rescaled: Collection[str] = (),
                       original: ir.Model | None = None) -> tuple[ir.Model, dict[str, str]]:
    """``quant_model`` (a copy, when a twin was added) with a twin for every match not in ``skip`` (measured
    otherwise: :func:`~edgeopt.quant.compare_matching.computed_before_quantizing`), and float name -> the
    twin's output name in it. ``rescaled``: float names of tensors a float rewrite rescaled (no twin touches one);
    ``original``: the float model as given, whose nodes compute the matches that are its tensors."""
    by_quant_name = {m.quant_name: m for m in matches}
    quant_values = value_names(quant_model.graph)
    graphs = [model.graph for model in (float_model, original) if model is not None]
    values = {graph: value_names(graph) for graph in graphs}
    order = {node: index for graph in graphs for index, node in enumerate(graph)}
    plans: list[tuple[TensorMatch, list[ir.Node], dict[str, str]]] = []
    for match in matches:
        if match.float_name in skip or match.float_name in rescaled or (match.original and original is None):
            continue
        quantized_chain, frontier = _quantized_chain(quant_values.get(match.quant_name), by_quant_name)
        if not frontier or any(name in rescaled for name in frontier):
            continue
        # the tensor's own model first; the other when the layer's inputs are only there (ORT's quantizer
        # quantizes a conv's output before the BatchNormalization the passes folded into it)
        for graph in sorted(graphs, key=lambda g: g is not graphs[-1 if match.original else 0]):
            chain = _float_chain(values[graph].get(match.float_name), frontier, order)
            if chain and _same_computation(chain, quantized_chain):
                plans.append((match, chain, frontier))
                break
    if not plans:
        return quant_model, {}
    model = quant_model.clone()
    copied = value_names(model.graph)
    # one copy of each float constant (by identity: the two float models may hold different tensors of one
    # name), however many twins read it; every name the copies take is new to the graph
    names = _Names(taken={*copied, *model.graph.initializers}, node_names={node.name for node in model.graph})
    twins = {match.float_name: _copy_chain(model.graph, chain, {f: copied[q] for f, q in frontier.items()}, names,
                                           match.float_name) for match, chain, frontier in plans}
    return model, twins


@dataclass
class _Names:
    """The value and node names taken in the graph the twins join, and the copies of the float constants made
    so far."""

    taken: set[str]
    node_names: set[str] = field(default_factory=set)
    constants: dict[int, ir.Value] = field(default_factory=dict)

    def new(self, base: str) -> str:
        return claim_name(f"{base}{TWIN_SUFFIX}", self.taken)

    def new_node(self, base: str) -> str:
        """A node name of its own: two rows' chains may copy one float node (GPT-2's c_attn MatMul computes
        the q, k and v a Split takes apart), and ONNX Runtime refuses a graph with two nodes of one name."""
        return claim_name(f"{base}{TWIN_SUFFIX}", self.node_names)


def _quantized_chain(value: ir.Value | None,
                     by_quant_name: Mapping[str, TensorMatch]) -> tuple[list[ir.Node], dict[str, str]]:
    """The chain of nodes writing ``value`` (a DQ output) and float name -> DQ output name for each activation
    it reads, when every one is a matched DQ output (else no inputs)."""
    before = carried_value(value)
    node = before.producer() if before is not None else None
    if node is None:
        return [], {}
    chain = fused_chain(node) or [node]
    frontier = {}
    for input_value in chain[0].inputs:
        if is_float16_cast(input_value.producer() if input_value is not None else None):
            input_value = input_value.producer().inputs[0]  # a node computing in float16 (--fallback fp16)
        if input_value is None or eir.is_constant(input_value) or dequantizes_constant(input_value):
            continue
        match = by_quant_name.get(input_value.name)
        if match is None:
            return chain, {}  # an activation read in float, or not matched: the twin would not be fed as the layer is
        frontier[match.float_name] = match.quant_name
    return chain, frontier


def _float_chain(value: ir.Value | None, frontier: Mapping[str, str], order: Mapping[ir.Node, int]) -> list[ir.Node]:
    """The float model's nodes computing ``value`` from the ``frontier`` tensors and constants, in the
    graph's order; [] when they read anything else, hold a subgraph, or are more than :data:`_MAX_CHAIN`."""
    chain: set[ir.Node] = set()
    pending = [value]
    while pending:
        current = pending.pop()
        if current is None or current.name in frontier or eir.is_constant(current):
            continue
        node = current.producer()
        if node is None or node.graph is None or len(chain) == _MAX_CHAIN or _holds_subgraph(node):
            return []
        if node not in chain:
            chain.add(node)
            pending += list(node.inputs)
    reached = {v.name for node in chain for v in node.inputs if v is not None}
    return sorted(chain, key=order.__getitem__) if set(frontier) <= reached else []


def _holds_subgraph(node: ir.Node) -> bool:
    return any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values())


def _same_computation(chain: list[ir.Node], quantized_chain: list[ir.Node]) -> bool:
    """Whether the float ``chain`` computes what ``quantized_chain`` does: the same op types, less the
    Relu/Clip a quantizer may drop."""
    kinds = [node.op_type for node in chain]
    wanted = [node.op_type for node in quantized_chain]
    return kinds == wanted or [kind for kind in kinds if kind not in _CLAMPS] == wanted


def _copy_chain(graph: ir.Graph, chain: list[ir.Node], fed: Mapping[str, ir.Value], names: _Names,
                written: str) -> str:
    """Append copies of ``chain`` to ``graph``, reading ``fed`` (float name -> quantized value) and copies of
    its constants; the name of the copy of ``written``, the float tensor the chain computes (an output of its
    last node, not always the first: an LSTM's or GRU's Y_h is its second)."""
    copies: dict[str, ir.Value] = dict(fed)
    for node in chain:
        inputs = [None if value is None else copies.get(value.name) or _constant_copy(graph, value, names)
                  for value in node.inputs]
        outputs = [ir.Value(name=names.new(value.name), type=value.type,
                            shape=value.shape.copy() if value.shape is not None else None) for value in node.outputs]
        attributes = [ir.Attr(attr.name, attr.type, attr.value) for attr in node.attributes.values()]
        copy = ir.Node(node.domain, node.op_type, inputs, attributes, name=names.new_node(node.name),
                       outputs=outputs)
        graph.append(copy)
        copies |= {old.name: new for old, new in zip(node.outputs, copy.outputs)}
    return copies[written].name


def _constant_copy(graph: ir.Graph, value: ir.Value, names: _Names) -> ir.Value:
    """A float-model constant (an initializer, a Constant node's output) as an initializer of ``graph``."""
    if id(value) in names.constants:
        return names.constants[id(value)]
    copy = eir.register_array(graph, names.new(value.name), eir.constant_array(value))
    names.constants[id(value)] = copy
    return copy

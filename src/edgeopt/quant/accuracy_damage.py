"""Which node the accuracy search returns next: the damage each one does, measured, not guessed.

int8: a node's damage is the decibels of SQNR lost inside it (:func:`node_damage`): for a node reading no
quantized constant, what its output's Q/DQ pair rounds off what it computed; for any other, the SQNR of its
quantized inputs minus that of its output. (``compare`` measures the latter against the layer's float twin
instead, fed the same quantized inputs: a truer account of where error arises, but as a ranking it did worse on
``benchmarks/accuracy_search.py``, which runs the search on eight test architectures: efficientnet missed its
goal with 5 nodes float where the drop from the inputs meets it with 2, and BERT kept 22 nodes float instead of 8.
Returning a layer to float also takes the rounding off the inputs only it reads, which the drop counts and the
twin does not.) A float node's quantized output charges the nodes reading it,
since returning the float node itself would change nothing. Weight-only (int4): a layer's damage is the noise,
relative to the signal, it adds inside (:func:`weight_damage`), from its output's and its input's SQNR,
their rows matched by name.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.quant.compare import CompareResult
from edgeopt.quant.compare_matching import (carried_value, computed_from, fused_chain, quantized_input_names,
                                            reads_quantized_constant)
from edgeopt.quant.fallback import past_fallback_casts
from edgeopt.quant.ops import is_qdq_op
from edgeopt.quant.placement import (DATA_MOVEMENT_OPS, READ_IN_FLOAT, readers_behind_qdq,
                                     readers_past_data_movement)
from edgeopt.quant.registry import QuantResult

__all__ = ["DATA_MOVEMENT_LEFT", "Candidate", "low_bit_layers", "node_damage", "quantized_readers", "weight_damage"]


class Candidate(NamedTuple):
    damage: float  # the ranking: dB lost inside the node (int8), noise added relative to the signal (int4)
    node: ir.Node
    reason: str
    through: str | None = None  # the float node whose quantized output the damage is measured on


def node_damage(result: QuantResult, comparison: CompareResult) -> list[Candidate]:
    """The quantized nodes that returning to float would help, worst first.

    A float node's output (a Tanh, a LayerNorm) is quantized only because quantized nodes read it: its
    damage goes to those readers (``through`` names it), since returning the float node itself would
    change nothing.
    """
    sqnr = {row.tensor: row.sqnr_db for row in comparison.layers}
    float_nodes = _float_node_names(result)
    ranked = []
    for node, sqnr_db, computed_db in _quantized_producers(result.model, comparison):
        if eir.is_op(node, *DATA_MOVEMENT_OPS):  # lossless: returning it to float changes no value
            continue
        fused = fused_chain(node, float_nodes)  # Gemm -> Relu -> Q: the Gemm's error shows at the Relu's output
        head = fused[0] if fused else node
        damage, reason = _int8_damage(head, fused, sqnr, sqnr_db, computed_db)
        if head.name not in float_nodes:
            ranked.append(Candidate(damage, head, reason))
            continue
        for reader in _computing_readers(head):
            if reader.name not in float_nodes:
                ranked.append(Candidate(damage, reader, f"reads {head.name} ({head.op_type}, float) quantized: "
                                         f"{reason}", through=head.name))
    ranked.sort(key=lambda item: (-item.damage, item.node.name))
    return _as_exported(result, ranked)


def _as_exported(result: QuantResult, candidates: list[Candidate]) -> list[Candidate]:
    """``candidates`` with each node the quantizer wrote for another (a HardSwish's Add, Q, DQ and Mul on
    ONNX Runtime) as that node, which the search can return to float by its name; each node once (a node
    reached twice, by its own output and a float node it reads, counts once)."""
    parts = result.details.get("rewritten_parts", {}) if result.details else {}
    nodes = {node.name: node for node in result.model.graph} if parts else {}
    found, seen = [], set()
    for item in candidates:
        node = nodes.get(parts.get(item.node.name, ""), item.node)
        if node.name not in seen:
            seen.add(node.name)
            found.append(item._replace(node=node))
    return found


def _float_node_names(result: QuantResult) -> set[str]:
    """The nodes that read float inputs: not those that read int8 and compute in float because a node kept
    float reads their output (returning one to float still takes the quantization off its inputs)."""
    return {f.node_name for f in result.float_nodes if not f.reason.startswith(READ_IN_FLOAT)}


def low_bit_layers(base: ir.Model, result: QuantResult) -> dict[str, ir.Node]:
    """The MatMul/Gemm nodes of ``base`` whose weights ``result`` holds in int4, by the name of their output
    (a weight read through a Transpose, a tied embedding's, is named by the constant behind it); not those
    the 8-bit fallback holds. For dynamic int8 (a config without ``weight_format``): every quantized
    MatMul/Gemm, table, LSTM and ONNX Runtime's fused Attention (its QAttention's)."""
    low = getattr(result.config, "weight_format", None)
    quantized = {(info.name, info.op_type) for info in result.tensors
                 if info.kind == "weight" and (low is None or info.format == low.name)}
    layers = {}
    for node in base.graph.all_nodes():  # (and those of If branches and Loop/Scan bodies)
        weight = (node.inputs[1] if (eir.is_op(node, "MatMul", "Gemm", "LSTM") or _fused_attention(node))
                  and len(node.inputs) > 1 else None)
        weight = node.inputs[0] if eir.is_op(node, "Gather") else weight  # an embedding table
        transpose = weight.producer() if weight is not None else None
        if transpose is not None and transpose.op_type == "Transpose":
            weight = transpose.inputs[0]
        if weight is not None and (weight.name, node.op_type) in quantized:
            layers[node.outputs[0].name] = node
    return layers


def _fused_attention(node: ir.Node) -> bool:
    return node.op_type == "Attention" and node.domain == "com.microsoft"


def weight_damage(base: ir.Model, result: QuantResult, comparison: CompareResult) -> list[Candidate]:
    """Weight-only (int4): the layers whose weights ``result`` holds in int4, most damaging first: by the
    noise (relative to the signal) added inside the op computing with them, from the SQNR of its output
    (a row matched by name, a MatMulNBits', or a model output) and of its input. A layer whose input is
    exact (a model input, or the output of layers returned to float) adds all its output's noise; one whose
    input was not measured is ranked as if it were, and says so."""
    measured = {row.tensor: row.sqnr_db for row in comparison.layers}
    measured |= {row.name: row.sqnr_db for row in comparison.outputs if row.signal}
    inputs = {value.name for value in base.graph.inputs}
    ranked, unmeasured = [], []
    for name, node in low_bit_layers(base, result).items():
        if name not in measured:  # inside a subgraph: ONNX Runtime shows no tensor of it (or compare matched none)
            where = ("inside a control-flow subgraph" if node.graph is not base.graph
                     else "no tensor of the quantized model matched it")
            unmeasured.append(Candidate(0.0, node, f"its output not measured ({where}): "
                                                   "returned once every measured layer is"))
            continue
        carried = computed_from(node.inputs[1] if node.op_type == "Gather" else node.inputs[0])  # (its indices)
        input_db = measured.get(carried.name, math.inf) if carried is not None else math.inf
        added = 10 ** (-measured[name] / 10) - (10 ** (-input_db / 10) if math.isfinite(input_db) else 0.0)
        if math.isfinite(input_db):
            inside = f"{input_db - measured[name]:.1f} dB lost inside the node"
        else:
            exact = carried is not None and (carried.name in inputs or carried.name in measured)
            inside = "its input exact" if exact else "its input not measured (counted as exact)"
        ranked.append(Candidate(added, node, f"output SQNR {measured[name]:.1f} dB, {inside}"))
    ranked.sort(key=lambda item: (-item.damage, item.node.name))
    return ranked + unmeasured


#: The ``through`` of the data-movement nodes :func:`quantized_readers` finds: the search returns them together.
DATA_MOVEMENT_LEFT = "(data movement still quantized)"


def quantized_readers(result: QuantResult) -> list[Candidate]:
    """Nodes still reading a quantized activation whose own output is not compared (its readers are
    float): no damage is measured for them, but the search must be able to return them too. The
    data-movement ones (a head split's Reshape, Transpose and Gathers between float nodes) share one
    ``through``: each alone changes nothing but a Q/DQ round trip, and one per round took a round each
    (18 rounds of a ViT's search)."""
    float_nodes = _float_node_names(result)
    found = []
    for node in dict.fromkeys(past_fallback_casts(result.model.graph)):
        if (node.name in float_nodes or is_qdq_op(node, "QuantizeLinear") or is_qdq_op(node, "DequantizeLinear")
                or eir.is_op(node, "Shape", "Size")):
            continue
        inputs = quantized_input_names(node)
        if inputs:
            group = DATA_MOVEMENT_LEFT if eir.is_op(node, *DATA_MOVEMENT_OPS) else None
            found.append(Candidate(0.0, node, f"still reads {inputs[0]} quantized", through=group))
    return _as_exported(result, found)


def _readers_through_qdq(node: ir.Node) -> list[ir.Node]:
    """The nodes reading ``node``'s outputs through a QuantizeLinear -> DequantizeLinear pair."""
    return [reader for output in node.outputs for use in output.uses() if is_qdq_op(use.node, "QuantizeLinear")
            for reader in readers_behind_qdq(use.node)]


def _int8_damage(head: ir.Node, fused: list[ir.Node], sqnr: dict[str, float], sqnr_db: float,
                 computed_db: float | None) -> tuple[float, str]:
    """The dB lost inside ``head`` (and its ``fused`` chain), and the reason that says so.

    A node reading no quantized constant (an Add of two activations, a Softmax, a LayerNorm kept float;
    ``computed_db``: the SQNR of what it computes before its output's Q/DQ pair) adds only that pair's
    rounding: the error it scales up came in with its inputs. Any other node: the worst SQNR of its
    quantized inputs minus its output's (not its float twin's ``computed_db``: see the module docstring).
    An exact computation (inf dB, a shape's arithmetic) ranks by its output's SQNR alone, last."""
    if any(map(reads_quantized_constant, fused or [head])):
        computed_db = None
    input_sqnr = [sqnr[name] for name in quantized_input_names(head) if name in sqnr]
    upstream = computed_db if computed_db is not None else min(input_sqnr, default=math.inf)
    if not math.isfinite(upstream):
        return -sqnr_db, f"output SQNR {sqnr_db:.1f} dB"
    damage = upstream - sqnr_db
    if computed_db is not None:
        return damage, f"output SQNR {sqnr_db:.1f} dB, {damage:.1f} dB lost to its output's rounding"
    with_fused = f" (with its fused {'+'.join(n.op_type for n in fused[1:])})" if fused else ""
    return damage, f"output SQNR {sqnr_db:.1f} dB, {damage:.1f} dB below its quantized inputs'{with_fused}"


def _computing_readers(node: ir.Node) -> list[ir.Node]:
    """The readers of ``node``'s quantized outputs, past the data-movement ops between: returning
    those to float would change no value. Shape and Size read no value (a dynamic reshape's
    ``x.size()``): a tensor they alone read is not quantized, so they never go back to float."""
    readers = readers_past_data_movement(past_fallback_casts(_readers_through_qdq(node)))
    return [reader for reader in readers if not eir.is_op(reader, "Shape", "Size")]


def _quantized_producers(quant_model: ir.Model,
                         comparison: CompareResult) -> list[tuple[ir.Node, float, float | None]]:
    """(node, SQNR dB of its quantized output) for the compared activations, and for the nodes
    writing a graph output (compared as a model output, not a layer)."""
    values = {v.name: v for node in quant_model.graph for v in node.outputs}
    graph_outputs = {value.name: value for value in quant_model.graph.outputs}
    found = [(_producer(values.get(row.tensor)), row.sqnr_db, row.computed_sqnr_db) for row in comparison.layers]
    found += [(_output_writer(graph_outputs.get(row.name)), row.sqnr_db, None) for row in comparison.outputs
              if row.signal]  # class indices: their "SQNR" is no node's damage (an ArgMax has no int8 error)
    return [(node, sqnr_db, computed_db) for node, sqnr_db, computed_db in found
            if node is not None and node.op_type not in ("QuantizeLinear", "DequantizeLinear")]


def _producer(value: ir.Value | None) -> ir.Node | None:
    return value.producer() if value is not None else None


def _output_writer(output: ir.Value | None) -> ir.Node | None:
    """The node computing a graph output: behind its Q -> DQ pair, or writing it in float from
    quantized inputs (a Gemm/MatMul left with a float output); None when it runs all in float."""
    carried = carried_value(output)
    if carried is not None:
        return _producer(carried)
    node = _producer(output)
    reads_quantized = node is not None and any(is_qdq_op(_producer(v), "DequantizeLinear") for v in node.inputs)
    return node if reads_quantized else None

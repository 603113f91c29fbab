"""Builders for graph rewrites: new initializers, node labels, value replacement.

A rewrite never edits a tensor in place: a folded weight is a *new*
initializer, and the old one stays for any other reader until dead-code
elimination drops it. Replacing a value moves every use (and a graph-output
slot) to the new value; a graph output keeps its name, so the model's
interface is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

__all__ = [
    "add_initializer",
    "consumers",
    "drop_if_unused",
    "node_label",
    "other_input",
    "register_array",
    "remove_nodes",
    "replace_constant_input",
    "replace_nodes",
    "replace_value",
    "replace_value_refusal",
    "sole_consumer",
    "unique_value_name",
]


def node_label(node: ir.Node) -> str:
    """A name for messages: the node's name, or its op type and first output."""
    if node.name:
        return node.name
    output = node.outputs[0].name if node.outputs and node.outputs[0].name else "?"
    return f"{node.op_type}(->{output})"


def consumers(value: ir.Value) -> list[ir.Node]:
    """The distinct nodes that read ``value``, in first-use order."""
    seen: dict[int, ir.Node] = {}
    for usage in value.uses():
        seen.setdefault(id(usage.node), usage.node)
    return list(seen.values())


def sole_consumer(value: ir.Value) -> ir.Node | None:
    """The only node reading ``value``, when there is exactly one and it is not a graph output."""
    if value.is_graph_output():
        return None
    readers = consumers(value)
    return readers[0] if len(readers) == 1 else None


def other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """For a binary node reading ``value``, its other input."""
    if len(node.inputs) != 2:
        return None
    first, second = node.inputs
    return second if first is value else first


def _graph_value_names(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs if v.name}
    names.update(graph.initializers)
    names.update(v.name for node in graph for v in node.outputs if v.name)
    return names


def unique_value_name(graph: ir.Graph, hint: str) -> str:
    """``hint`` if no value of ``graph`` has that name, else ``hint_1``, ``hint_2``..."""
    taken = _graph_value_names(graph)
    if hint not in taken:
        return hint
    index = 1
    while f"{hint}_{index}" in taken:
        index += 1
    return f"{hint}_{index}"


def add_initializer(graph: ir.Graph, array: np.ndarray, name_hint: str) -> ir.Value:
    """Register ``array`` as a new initializer of ``graph`` and return its value."""
    return register_array(graph, unique_value_name(graph, name_hint), array)


def register_array(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` under ``name``, already unique (a rewrite naming many constants keeps its own set
    of taken names), as an initializer of ``graph``; its value."""
    array = np.asarray(array)
    if not array.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d array into 1-d)
        array = array.copy()
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.Tensor(array, name=name))
    graph.register_initializer(value)
    return value


def replace_constant_input(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray,
                           name_hint: str) -> ir.Value:
    """Make input ``index`` of ``node`` a new initializer holding ``array``.

    The old tensor is never written. An initializer that only ``node`` reads
    is dropped and its name reused (so names in a QDQ plan stay valid); a
    constant that others read stays for them and the new one gets a fresh
    name. ``node`` gains the input slot if it had fewer inputs.
    """
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    old = node.inputs[index]
    sole_reader = (old is not None and old.name in graph.initializers and not old.is_graph_input()
                   and not old.is_graph_output() and all(use.node is node for use in old.uses()))
    if sole_reader:
        node.replace_input_with(index, None)
        graph.initializers.pop(old.name)
        name_hint = old.name
    new = add_initializer(graph, array, name_hint)
    node.replace_input_with(index, new)
    return new


def drop_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    """Remove a constant nothing reads any more -- an initializer, or the ``Constant`` node that
    makes it -- so its data can be freed now rather than at the next dead-code sweep (a pass that
    rewrites every weight of a large model would otherwise hold the old and the new weights at once)."""
    if value is None or value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    producer = value.producer()
    if producer is not None:
        if producer.op_type == "Constant" and producer.graph is graph:
            graph.remove(producer, safe=True)
    elif value.is_initializer() and graph.initializers.get(value.name) is value:
        graph.initializers.pop(value.name)


def replace_value_refusal(old: ir.Value, new: ir.Value) -> str | None:
    """Why ``old`` cannot be replaced by ``new`` (None when it can).

    Replacing is always possible unless ``old`` is a graph output and ``new``
    is already part of the graph's interface (an input, an initializer or
    another output): the output would lose its name.
    """
    if not old.is_graph_output():
        return None
    if new.is_graph_input() or new.is_initializer() or new.is_graph_output():
        return f"{old.name!r} is a graph output and {new.name!r} is a graph input, initializer or output"
    return None


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Point every use of ``old`` (and its graph-output slot) at ``new``.

    When ``old`` is a graph output, ``new`` takes its name so the model's
    interface is unchanged; check :func:`replace_value_refusal` first. Type and
    shape known on ``old`` but not on ``new`` are carried over.
    """
    if new.type is None and old.type is not None:
        new.type = old.type
    if new.shape is None and old.shape is not None:
        new.shape = old.shape
    is_output = old.is_graph_output()
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if is_output:
        name = old.name
        old.name = None
        new.name = name


def remove_nodes(graph: ir.Graph, nodes: Iterable[ir.Node]) -> None:
    """Remove ``nodes`` (whose outputs nothing else reads) and detach their inputs."""
    nodes = [n for n in dict.fromkeys(nodes) if n.graph is graph]
    if nodes:
        graph.remove(nodes, safe=True)


def replace_nodes(graph: ir.Graph, old_nodes: Iterable[ir.Node], old_output: ir.Value,
                  new_nodes: list[ir.Node]) -> None:
    """Replace a matched subgraph computing ``old_output`` by ``new_nodes``.

    The new nodes go right before ``old_output``'s producer (their inputs
    exist by then); readers of ``old_output`` read the last new node's first
    output, which takes the old name if it was a graph output; then the old
    nodes are removed.
    """
    graph.insert_before(old_output.producer(), new_nodes)
    replace_value(old_output, new_nodes[-1].outputs[0])
    remove_nodes(graph, old_nodes)

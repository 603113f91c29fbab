"""The input of a Log stays float, with the nodes that compute it for that Log alone (placement rule 6).

``d log(x) = dx / x``: an 8-bit step ``s`` moves ``log(x)`` by ``s / x``, unbounded as ``x`` nears 0,
and a value below ``s / 2`` rounds to 0, whose log is ``-inf`` (or ``log(eps)`` behind a ``+ eps``). A
log-mel front end feeds a Log with power spectra and mel energies that span many decades (speech:
60-80 dB), on one per-tensor scale set by the loudest frame: quantized, the quiet bins round to 0
(a keyword-spotting net with its front end in the graph: output SQNR 14 dB, top-1 agreement 63 %;
with the front end float, 44 dB and 94 %). ``log(softmax(x))`` loses its small probabilities likewise.

A node is kept when it is one of the ops a spectral front end is built from (the framing and STFT
conv, squares and sums, the mel MatMul, ``+ eps``, moves) and every reader of each of its outputs is
the Log or such a node, walking up from the Log's input: ``mel @ power + eps`` (Add, MatMul, the
Transpose between them) stays float, and a tensor another reader takes too stops the walk there. So
does any other op: ``log(softmax(gemm(...)))`` keeps its Softmax's input quantized and the network
before it int8 (a walk through every single-reader node took a whole sequential CNN to float). What
the Log writes is quantized as usual.
"""

from __future__ import annotations

import onnx_ir as ir

from edgeopt import ir as eir

__all__ = ["log_input_nodes", "log_input_refusal"]


#: The ops of a spectral front end between a signal and its Log: framing and the STFT as a conv or
#: MatMul, the power (squares, sums, a magnitude's Sqrt/Abs), the mel MatMul, the floor (+ eps, Max,
#: Clip) and the moves between them.
_FRONT_END_OPS = ("Conv", "MatMul", "Gemm", "Mul", "Pow", "Sqrt", "Abs", "Add", "Sub", "Max", "Clip",
                  "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceMean", "Transpose", "Reshape", "Squeeze",
                  "Unsqueeze", "Slice", "Split", "Concat", "Pad", "Identity", "Cast")


def _feeds_only(node: ir.Node, kept: set[str]) -> bool:
    return all(not output.is_graph_output() and all(use.name in kept for use in eir.consumers(output))
               for output in node.outputs)


def log_input_nodes(graph: ir.Graph) -> dict[str, str]:
    """Node name -> the name of the Log whose input it computes (and nothing else)."""
    feeding: dict[str, str] = {}
    for log in graph:
        if not eir.is_op(log, "Log"):
            continue
        kept, stack = {log.name}, [log.inputs[0]]
        while stack:
            node = stack.pop().producer()
            if (node is None or node.name in kept or node.graph is not graph or not eir.is_op(node, *_FRONT_END_OPS)
                    or not _feeds_only(node, kept)):
                continue
            kept.add(node.name)
            feeding.setdefault(node.name, log.name)
            stack.extend(value for value in node.inputs if value is not None and not eir.is_constant(value))
    return feeding


def log_input_refusal(node: ir.Node, feeding: dict[str, str]) -> str | None:
    """Why ``node`` stays float when it computes a Log's input (:func:`log_input_nodes`), else None."""
    log = feeding.get(node.name)
    if log is None:
        return None
    return (f"computes the input of Log {log!r} (a log-mel front end?): an 8-bit step near 0 is an unbounded "
            "step of the log, and values below half a step round to 0")

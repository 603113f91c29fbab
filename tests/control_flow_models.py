"""Graphs whose layers sit inside control flow, as users bring them: an RNN written as a ``Scan`` (and
``torch.jit.script`` exports its loops as ``Loop``) whose body reads the outer graph's weights."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["scan_rnn", "scan_rnn_data"]

STEPS, FEATURES, HIDDEN, CLASSES = 6, 16, 32, 4


def scan_rnn() -> onnx.ModelProto:
    """x [6, 1, 16] -> pre (MatMul) -> Scan(h_t = tanh(x_t @ W + h @ U)), its body's two MatMuls (b_mm1,
    b_mm2) reading W and U from the main graph -> head (MatMul) -> y [1, 4]."""
    rng = np.random.default_rng(1)

    def weight(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    def value(name: str, *shape: int) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))

    body = helper.make_graph(
        [helper.make_node("MatMul", ["xt", "W"], ["a"], name="b_mm1"),
         helper.make_node("MatMul", ["h", "U"], ["b"], name="b_mm2"),
         helper.make_node("Add", ["a", "b"], ["s"], name="b_add"),
         helper.make_node("Tanh", ["s"], ["hn"], name="b_tanh"),
         helper.make_node("Identity", ["hn"], ["yt"], name="b_id")],
        "body", [value("h", 1, HIDDEN), value("xt", 1, FEATURES)], [value("hn", 1, HIDDEN), value("yt", 1, HIDDEN)])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "Win"], ["x16"], name="pre"),
         helper.make_node("Scan", ["h0", "x16"], ["hT", "ys"], name="scan", num_scan_inputs=1, body=body),
         helper.make_node("MatMul", ["hT", "Wo"], ["y"], name="head")],
        "scan_rnn", [value("x", STEPS, 1, FEATURES)], [value("y", 1, CLASSES)],
        [weight("W", FEATURES, HIDDEN), weight("U", HIDDEN, HIDDEN, scale=0.2),
         numpy_helper.from_array(np.zeros((1, HIDDEN), np.float32), "h0"), weight("Win", FEATURES, FEATURES),
         weight("Wo", HIDDEN, CLASSES)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def scan_rnn_data(count: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((STEPS, 1, FEATURES)).astype(np.float32)} for _ in range(count)]

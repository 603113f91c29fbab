"""Small float graphs (onnx.helper) for int8 placement tests, and measuring helpers.

Every builder returns an ``onnx_ir`` model with input ``x`` and output ``y``
(unless it says otherwise); weights are seeded. ``batches`` makes seeded
calibration data, ``sqnr_db`` compares outputs and ``ort_op_counts`` lists
the ops ONNX Runtime runs after its QDQ fusions.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from edgeopt.runtime.ort import OrtSession, optimized_model

__all__ = [
    "GraphBuilder",
    "batches",
    "ort_op_counts",
    "sqnr_db",
]


class GraphBuilder:
    """Adds nodes to a float graph; ``conv``/``gemm``/``matmul`` make their own seeded weights."""

    def __init__(self, seed: int = 0, opset: int = 17) -> None:
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def weight(self, name: str, shape: Sequence[int], scale: float = 0.3) -> str:
        array = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def constant(self, name: str, value) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def node(self, op_type: str, inputs: Sequence[str], name: str, **attributes) -> str:
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attributes))
        return name

    def conv(self, x: str, cin: int, cout: int, name: str, *, k: int = 3, group: int = 1,
             bias: bool = True) -> str:
        inputs = [x, self.weight(f"{name}.weight", (cout, cin // group, k, k))]
        if bias:
            inputs.append(self.weight(f"{name}.bias", (cout,), 0.1))
        return self.node("Conv", inputs, name, pads=[k // 2] * 4, group=group)

    def model(self, outputs: Sequence[str], input_shape: Sequence[int | str],
              output_shapes: Sequence[Sequence[int | str] | None] | None = None) -> ir.Model:
        shapes = output_shapes or [None] * len(outputs)
        graph = helper.make_graph(
            self.nodes, "test",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, s) for o, s in zip(outputs, shapes)],
            initializer=self.initializers)
        opsets = [helper.make_opsetid("", self.opset)]
        proto = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
        return ir.from_proto(proto)


def conv_classifier() -> ir.Model:
    """x [1, 3, 8, 8] -> Conv -> Relu -> Conv -> Relu -> global pool -> Flatten -> Gemm, whose output is the
    graph's (seed 3)."""
    g = GraphBuilder(seed=3)
    x = g.node("Relu", [g.conv("x", 3, 8, "conv1")], "relu1")
    x = g.node("Relu", [g.conv(x, 8, 8, "conv2")], "relu2")
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x], "pool")], "flat")
    logits = g.node("Gemm", [x, g.weight("fc.weight", (10, 8)), g.weight("fc.bias", (10,), 0.1)], "fc",
                    transB=1)
    return g.model([logits], (1, 3, 8, 8))


def batches(shape: Sequence[int], count: int, seed: int = 0, name: str = "x") -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


def sqnr_db(reference: ir.Model, test: ir.Model, data: Sequence[dict[str, np.ndarray]]) -> float:
    """SQNR of every output of ``test`` against ``reference`` over ``data``."""
    want, have = OrtSession(reference), OrtSession(test)
    signal = noise = 0.0
    for feed in data:
        expected, got = want.run(feed), have.run(feed)
        for name, array in expected.items():
            signal += float(np.sum(array.astype(np.float64) ** 2))
            noise += float(np.sum((array.astype(np.float64) - got[name]) ** 2))
    return 10.0 * np.log10(signal / noise)


def ort_op_counts(model: ir.Model) -> collections.Counter:
    """Op types in the graph ONNX Runtime runs, after its QDQ fusions."""
    return collections.Counter(node.op_type for node in optimized_model(model).graph)

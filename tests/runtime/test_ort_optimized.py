"""The graph ONNX Runtime runs after its optimizations, for models past protobuf's 2 GB once optimized."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from edgeopt.runtime.ort import optimized_model


def _float16_matmuls(rows: int, columns: int, count: int) -> ir.Model:
    """``count`` MatMuls of x [1, rows] by float16 weights [rows, columns] (zeros: cheap to build)."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT16), shape=ir.Shape([1, rows]))
    nodes, initializers = [], []
    for index in range(count):
        weight = ir.Value(name=f"w{index}", const_value=ir.tensor(np.zeros((rows, columns), np.float16),
                                                                  name=f"w{index}"))
        initializers.append(weight)
        nodes.append(ir.node("MatMul", [x, weight], name=f"mm{index}"))
        nodes[-1].outputs[0].name = f"y{index}"
        nodes[-1].outputs[0].type, nodes[-1].outputs[0].shape = ir.TensorType(ir.DataType.FLOAT16), \
            ir.Shape([1, columns])
    graph = ir.Graph([x], [node.outputs[0] for node in nodes], nodes=nodes, initializers=initializers,
                     opset_imports={"": 17})
    return ir.Model(graph, ir_version=9)


def test_a_small_model_reads_back_whole():
    optimized = optimized_model(_float16_matmuls(8, 8, 2))
    assert sorted(node.op_type for node in optimized.graph if node.op_type == "MatMul") == ["MatMul"] * 2


@pytest.mark.slow
def test_a_float16_model_whose_float32_copies_pass_2_gb():
    # 1.2 GB of float16 weights: ONNX Runtime's CPU provider computes these MatMuls in float32 and writes
    # 2.4 GB of float32 weights into the optimized model, which protobuf cannot serialize: the speed check
    # of `quantize --scheme fp16` on a 0.6B-parameter model failed with "ONNX Runtime cannot load the
    # model: INVALID_PROTOBUF : Protobuf serialization failed"
    optimized = optimized_model(_float16_matmuls(4096, 36864, 4))
    assert sum(node.op_type == "MatMul" for node in optimized.graph) == 4

"""ONNX Runtime's errors as edgeopt reports them: one line, with the part that says what is wrong."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.errors import DataError, ModelError
from edgeopt.runtime.ort import OrtSession


def _model(nodes, inputs, outputs, initializers=(), opsets=(("", 17),)) -> bytes:
    graph = helper.make_graph(nodes, "m", inputs, outputs, list(initializers))
    imports = [helper.make_opsetid(domain, version) for domain, version in opsets]
    return helper.make_model(graph, opset_imports=imports, ir_version=9).SerializeToString()


def test_an_unknown_custom_op_says_what_to_do():
    model = _model([helper.make_node("MyOp", ["x"], ["y"], domain="com.qa")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], opsets=(("", 17), ("com.qa", 1)))
    with pytest.raises(ModelError, match="com.qa:MyOp.* is not a registered function/op .*export the model with "
                                         "standard ops") as caught:
        OrtSession(model)
    assert "\n" not in str(caught.value)


def test_a_run_error_keeps_onnx_runtimes_detail_on_one_line():
    table = numpy_helper.from_array(np.zeros((10, 4), np.float32), "table")
    model = _model([helper.make_node("Gather", ["table", "ids"], ["y"])],
                   [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4])], [table])
    with pytest.raises(DataError, match=r"idx=12 must be within the inclusive range \[-10,9\] .*token ids at or "
                                        r"above the vocabulary size") as caught:
        OrtSession(model).run({"ids": np.array([[1, 12, 3]], np.int64)})
    assert "\n" not in str(caught.value)

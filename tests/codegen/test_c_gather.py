"""Gather of an activation at constant indices compiles to int8 slices (a concat for scattered indices).

Negative indices, repeated indices, ``axis=-1`` and a scalar index (its axis dropped) on a MatMul output:
quantized by edgeopt for the MCU, the reference equals ONNX Runtime on the QDQ model (a gather moves int8
values and keeps the scale), the C bit-exact; no indices at all (an empty tensor) are refused in one line.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdq_models as q
from edgeopt import api
from edgeopt.codegen.c import compile_c, verify
from edgeopt.errors import UnsupportedOpError
from edgeopt.quant import Int8Config, Target
from edgeopt.runtime.ort import OrtSession
from edgeopt.runtime.reference import ReferenceModel, lower

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None,
                               reason="needs gcc and make")
SHAPE = (2, 6, 8)
CASES = {
    "negative": (np.array([-1, -3, 0]), 1),
    "repeated": (np.array([1, 1, 2, 2, 0]), 1),
    "last_axis": (np.array([5, 6, 7, 0]), -1),
    "scalar_last_axis": (np.array(-2), -1),
    "scalar_batch": (np.array(1), 0),
}


def _quantized(tmp_path, indices: np.ndarray, axis: int):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["input", "w"], ["m"]),
             helper.make_node("Gather", ["m", "indices"], ["output"], name="pick", axis=axis)]
    graph = helper.make_graph(nodes, "gather", [helper.make_tensor_value_info("input", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(rng.normal(0, 0.4, (8, 8)).astype(np.float32), "w"),
                                           numpy_helper.from_array(indices.astype(np.int64), "indices")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "f.onnx")
    api.quantize(tmp_path / "f.onnx", Int8Config(target=Target.MCU), _batches(8, 0), output=tmp_path / "q.onnx",
                 check_speed=False, check_fidelity=False)
    return api.load(tmp_path / "q.onnx")


def _batches(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal(SHAPE).astype(np.float32)} for _ in range(count)]


@needs_gcc
@pytest.mark.parametrize("name", list(CASES))
def test_constant_indices_match_onnx_runtime_and_the_c(name, tmp_path):
    model = _quantized(tmp_path, *CASES[name])
    within, exact, worst = q.agreement(ReferenceModel(model, rounding="single"), OrtSession(model), _batches(2, 5))
    assert exact == 1.0, (within, exact, worst)
    compile_c(model, tmp_path / "c")
    result = verify(tmp_path / "c", _batches(2, 9))
    assert result.bit_exact, result.first_mismatch


def test_no_indices_are_refused_in_one_line(tmp_path):
    """An empty index list made a concat of no parts: compile wrote it and verify crashed."""
    model = _quantized(tmp_path, np.zeros(0, dtype=np.int64), 1)
    with pytest.raises(UnsupportedOpError, match=r"pick.*no indices") as error:
        lower(model)
    assert "\n" not in str(error.value)

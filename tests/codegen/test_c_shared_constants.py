"""A spelled-out group whose scalar is an initializer shared with a quantized node still lowers as one op.

Dynamo writes one initializer per distinct scalar: attention's ``* 0.5`` and GELU's ``0.5 * (1 + erf)`` read
the same ``val_14``. The MCU quantizer stores that constant int8 behind a DequantizeLinear for the quantized
Mul, and GELU's float Mul then reads the DequantizeLinear too: the group must still be recognized (its
scalars read through the DequantizeLinear) and compile to one lookup table, bit-exact.
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
from edgeopt.quant import Int8Config, Target
from edgeopt.runtime.ort import OrtSession
from edgeopt.runtime.reference import ReferenceModel, lower

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None,
                               reason="needs gcc and make")


def _shared_half_gelu(path) -> None:
    """x = (input @ w * 0.5) @ w2, then gelu(x) = x * (0.5 * (1 + erf(x / sqrt 2))) as dynamo writes it, the
    0.5 (and the 1, also read by an Add of x) one initializer each."""
    rng = np.random.default_rng(0)
    weights = {"w": rng.normal(0, 0.4, (8, 8)), "w2": rng.normal(0, 0.4, (8, 8)), "half": np.array(0.5),
               "sqrt2": np.array(np.sqrt(2.0)), "one": np.array(1.0)}
    nodes = [helper.make_node("MatMul", ["input", "w"], ["m"]), helper.make_node("Mul", ["m", "half"], ["scaled"]),
             helper.make_node("MatMul", ["scaled", "w2"], ["x"]), helper.make_node("Div", ["x", "sqrt2"], ["d"]),
             helper.make_node("Erf", ["d"], ["e"]), helper.make_node("Add", ["e", "one"], ["e1"]),
             helper.make_node("Mul", ["half", "e1"], ["h"]), helper.make_node("Mul", ["x", "h"], ["y"]),
             helper.make_node("Add", ["x", "one"], ["shifted"])]
    initializers = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    graph = helper.make_graph(nodes, "shared_half_gelu",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 6, 8])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 6, 8])
                               for name in ("y", "shifted")], initializer=initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def _batches(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal((1, 6, 8)).astype(np.float32)} for _ in range(count)]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("shared")
    _shared_half_gelu(tmp_path / "f.onnx")
    api.quantize(tmp_path / "f.onnx", Int8Config(target=Target.MCU), _batches(8, 0), output=tmp_path / "q.onnx",
                 check_speed=False, check_fidelity=False)
    return api.load(tmp_path / "q.onnx")


def test_the_shared_constant_is_quantized_for_both_readers(quantized):
    """The premise: GELU's Mul reads the DequantizeLinear made for the quantized Mul."""
    readers = [node for node in quantized.graph if node.op_type == "Mul"
               and any(v.producer() is not None and v.producer().op_type == "DequantizeLinear"
                       and v.name.startswith("half") for v in node.inputs)]
    assert len(readers) == 2


def test_the_gelu_lowers_to_one_table_within_one_step_of_onnx_runtime(quantized):
    program = lower(quantized)
    assert sorted(op.kind for op in program.ops) == ["add", "fully_connected", "fully_connected", "lut", "mul"]
    within, _, worst = q.agreement(ReferenceModel(quantized, rounding="single"), OrtSession(quantized),
                                   _batches(4, 5))
    assert within == 1.0 and worst <= 1, (within, worst)


@needs_gcc
def test_generated_c_is_bit_exact(quantized, tmp_path):
    compile_c(quantized, tmp_path / "c")
    result = verify(tmp_path / "c", _batches(2, 9))
    assert result.bit_exact, result.first_mismatch

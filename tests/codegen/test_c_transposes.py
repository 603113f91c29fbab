"""Transposes in the integer program: composed, moved past the ops that commute with them, or dropped.

Exporters write transposes around layout-agnostic ops (an activation between a transpose to channels-last and
one back; Keras' ``[1, T, F]`` read as a sequence-first ``[T, 1, F]``). Each costs the C a pass over the tensor
and an arena buffer. The lowering moves a transpose below an elementwise op or a Softmax that keeps its axis
innermost, composes the ones that meet, and keeps as a copy (written in place) one that moves no byte.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdq_models as q
from mcu_flow import assert_compiles_bit_exact, quantize_for_mcu
from edgeopt.runtime.ort import OrtSession
from edgeopt.runtime.reference import ReferenceModel, lower

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None,
                               reason="needs gcc and make")


def _model(path, middle: list, output_shape) -> None:
    """Conv [1, 3, 6, 7] -> 4 channels, then ``middle`` (nodes from "c" to "output")."""
    weight = np.random.default_rng(0).normal(0, 0.4, (4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), *middle]
    graph = helper.make_graph(nodes, "transposes", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                  [1, 3, 6, 7])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, output_shape)],
                              initializer=[numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _assert_agrees_with_onnx_runtime(model) -> None:
    within, _, worst = q.agreement(ReferenceModel(model), OrtSession(model), _data(4, 3))
    assert within >= 0.99 and worst <= 1, (within, worst)


def _data(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input": rng.normal(0, 1, (1, 3, 6, 7)).astype(np.float32)} for _ in range(count)]


@needs_gcc
def test_a_transpose_pair_around_an_activation_vanishes(tmp_path):
    """NCHW -> NHWC, Sigmoid, back to NCHW: the table runs on the conv's output as stored, and the two
    transposes compose to nothing."""
    _model(tmp_path / "float.onnx", [
        helper.make_node("Transpose", ["c"], ["t"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("Sigmoid", ["t"], ["s"], name="sigmoid"),
        helper.make_node("Transpose", ["s"], ["output"], name="to_nchw", perm=[0, 3, 1, 2])], [1, 4, 6, 7])
    _, model = quantize_for_mcu(tmp_path / "float.onnx", _data(16, 0), tmp_path / "int8.onnx")
    kinds = [op.kind for op in lower(model).ops]
    assert "transpose" not in kinds and kinds[:2] == ["conv2d", "lut"], kinds
    _assert_agrees_with_onnx_runtime(model)
    assert_compiles_bit_exact(model, tmp_path / "c", _data(2, 1))


@needs_gcc
def test_a_transpose_that_moves_the_softmax_axis_stays_before_it(tmp_path):
    """Softmax over the channels after NCHW -> NHWC: the transpose brings another axis innermost, so moving
    it below the Softmax would normalize the wrong axis; it stays, and the result is still bit-exact."""
    _model(tmp_path / "float.onnx", [
        helper.make_node("Transpose", ["c"], ["t"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("Softmax", ["t"], ["output"], name="softmax", axis=2)], [1, 6, 7, 4])
    _, model = quantize_for_mcu(tmp_path / "float.onnx", _data(16, 0), tmp_path / "int8.onnx")
    program = lower(model)
    softmax, = [op for op in program.ops if op.kind == "softmax"]
    assert {op.output: op for op in program.ops}[softmax.inputs[0]].kind == "transpose"
    _assert_agrees_with_onnx_runtime(model)
    assert_compiles_bit_exact(model, tmp_path / "c", _data(2, 1))


@needs_gcc
def test_a_channels_last_model_reads_and_writes_its_own_order_with_no_transpose(tmp_path):
    """tf2onnx and Keras write NHWC models: Transpose to NCHW after the input, back to NHWC before the output.
    The C takes the input and gives the output in the model's own NHWC order (the manifest's layout is the
    identity), and neither end runs a transpose."""
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.4, (4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["input"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["nchw", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Transpose", ["r"], ["output"], name="to_nhwc", perm=[0, 2, 3, 1])]
    graph = helper.make_graph(nodes, "nhwc", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 6, 7, 3])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 6, 7, 4])],
                              initializer=[numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "float.onnx")
    data = [{"input": rng.normal(0, 1, (1, 6, 7, 3)).astype(np.float32)} for _ in range(16)]
    _, model = quantize_for_mcu(tmp_path / "float.onnx", data, tmp_path / "int8.onnx")
    program = lower(model)
    assert [op.kind for op in program.ops] == ["reshape", "conv2d", "reshape"]
    for io in (*program.inputs, *program.outputs):
        assert program.tensors[io.tensor].layout == (0, 1, 2, 3), io.name
    within, _, worst = q.agreement(ReferenceModel(model), OrtSession(model), data[:4])
    assert within >= 0.99 and worst <= 1, (within, worst)
    assert_compiles_bit_exact(model, tmp_path / "c", data[:2])
    manifest = json.loads((tmp_path / "c" / "edgeopt_c.json").read_text())
    assert [entry["layout"] for entry in manifest["inputs"] + manifest["outputs"]] == [[0, 1, 2, 3]] * 2
    code = (tmp_path / "c" / "model.c").read_text()
    assert "eo_transpose_s8(" not in code and "eo_copy_s8(" not in code
    assert "the ONNX value's axes [0, 1, 2, 3]" in (tmp_path / "c" / "model.h").read_text()


@needs_gcc
def test_tf2onnx_conv1d_blocks_run_with_no_transpose_and_their_bias_and_relu_folded(tmp_path):
    """tf2onnx writes a Keras Conv1D over an NWC input as Unsqueeze, Transpose to NCHW, a 1 x k Conv without bias,
    Squeeze, then the bias as an Add of a [C, 1] constant and the activation. The Add and the Relu move above the
    Squeeze into the conv (a float pass), the transposes vanish: two convs, the pool and the dense, as a Conv1d
    written natively."""
    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(0, 0.4, (16, 8, 1, 3)), "b1": rng.normal(0, 0.2, (16, 1)),
               "w2": rng.normal(0, 0.3, (16, 16, 1, 3)), "b2": rng.normal(0, 0.2, (16, 1)),
               "fc": rng.normal(0, 0.3, (16, 5)), "fc_b": rng.normal(0, 0.1, 5)}
    constants = {"axis1": np.array([1], np.int64), "axis2": np.array([2], np.int64)}
    nodes = [helper.make_node("Unsqueeze", ["input", "axis1"], ["u"], name="expand"),
             helper.make_node("Transpose", ["u"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2])]
    previous = "nchw"
    for k in (1, 2):
        nodes += [helper.make_node("Conv", [previous, f"w{k}"], [f"c{k}"], name=f"conv{k}", pads=[0, 1, 0, 1]),
                  helper.make_node("Squeeze", [f"c{k}", "axis2"], [f"s{k}"], name=f"squeeze{k}"),
                  helper.make_node("Add", [f"s{k}", f"b{k}"], [f"a{k}"], name=f"bias{k}"),
                  helper.make_node("Relu", [f"a{k}"], [f"r{k}"], name=f"relu{k}")]
        if k == 1:
            nodes.append(helper.make_node("Unsqueeze", ["r1", "axis2"], ["e1"], name="expand1"))
            previous = "e1"
    nodes += [helper.make_node("GlobalAveragePool", ["r2"], ["pooled"], name="pool"),
              helper.make_node("Squeeze", ["pooled", "axis2"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "fc", "fc_b"], ["output"], name="dense")]
    graph = helper.make_graph(
        nodes, "tf2onnx_conv1d", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 32, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 5])],
        initializer=[*(numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()),
                     *(numpy_helper.from_array(v, k) for k, v in constants.items())])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "float.onnx")
    data = [{"input": rng.normal(0, 1, (1, 32, 8)).astype(np.float32)} for _ in range(16)]
    _, model = quantize_for_mcu(tmp_path / "float.onnx", data, tmp_path / "int8.onnx")
    kinds = [op.kind for op in lower(model).ops if op.kind != "reshape"]
    assert kinds == ["conv2d", "conv2d", "mean", "fully_connected"], kinds
    within, _, worst = q.agreement(ReferenceModel(model), OrtSession(model), data[:4])
    assert within >= 0.99 and worst <= 1, (within, worst)
    assert_compiles_bit_exact(model, tmp_path / "c", data[:2])
    assert "eo_copy_s8(" not in (tmp_path / "c" / "model.c").read_text()


@needs_gcc
def test_a_squeezed_conv_output_through_a_table_and_back_runs_with_no_transpose(tmp_path):
    """Conv [1, 4, 1, 7] -> Squeeze (rank 3, stored [N, C, L]) -> Sigmoid -> Unsqueeze -> Conv: the transposes the
    rank changes lower to meet across the table (a transpose that also reshapes, then a reshape of unit axes,
    compose) and vanish."""
    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(0, 0.4, (4, 3, 1, 3)), "w2": rng.normal(0, 0.4, (2, 4, 1, 3))}
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c"], name="conv1", pads=[0, 1, 0, 1]),
             helper.make_node("Squeeze", ["c", "axes"], ["s"], name="squeeze"),
             helper.make_node("Sigmoid", ["s"], ["g"], name="sigmoid"),
             helper.make_node("Unsqueeze", ["g", "axes"], ["u"], name="unsqueeze"),
             helper.make_node("Conv", ["u", "w2"], ["output"], name="conv2", pads=[0, 1, 0, 1])]
    graph = helper.make_graph(
        nodes, "squeezed", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 1, 7])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 2, 1, 7])],
        initializer=[*(numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()),
                     numpy_helper.from_array(np.array([2], np.int64), "axes")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "float.onnx")
    data = [{"input": rng.normal(0, 1, (1, 3, 1, 7)).astype(np.float32)} for _ in range(16)]
    _, model = quantize_for_mcu(tmp_path / "float.onnx", data, tmp_path / "int8.onnx")
    kinds = [op.kind for op in lower(model).ops if op.kind != "reshape"]
    assert kinds == ["conv2d", "lut", "conv2d"], kinds
    assert_compiles_bit_exact(model, tmp_path / "c", data[:2])

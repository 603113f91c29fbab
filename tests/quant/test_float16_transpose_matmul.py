"""fp16 of ``MatMul(Transpose(x, perm=[1, 0, 2]), W)``: ONNX Runtime 1.32 crashed (segmentation fault)
creating a session for the float16 form, which its optimizer fuses into a FusedMatMul with a transposed
batch. A sequence-first transformer's projection (torch's ``x.transpose(0, 1) @ W``, TorchScript's export
of ``nn.TransformerEncoder``) has it; edgeopt's own fidelity check died with exit 139 and no message.
Sessions are created in a child process, so a crash fails the test instead of ending the run."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.io import load_model, model_to_bytes
from edgeopt.quant import quantize
from edgeopt.quant.float16 import Fp16Config
from edgeopt.runtime.ort import OrtSession

RUN_IN_A_CHILD = """
import sys, numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])  # all optimizations
feed = dict(np.load(sys.argv[2]))
np.save(sys.argv[3], session.run(None, feed)[0])
"""


def run_in_a_child(model_bytes: bytes, feed: dict, tmp_path) -> np.ndarray:
    (tmp_path / "m.onnx").write_bytes(model_bytes)
    np.savez(tmp_path / "feed.npz", **feed)
    done = subprocess.run([sys.executable, "-c", RUN_IN_A_CHILD, str(tmp_path / "m.onnx"),
                           str(tmp_path / "feed.npz"), str(tmp_path / "out.npy")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"ONNX Runtime exited {done.returncode}: {done.stderr[-500:]}"
    return np.load(tmp_path / "out.npy")


def sqnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    noise = np.sum((reference.astype(np.float64) - other) ** 2)
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / noise))


def projection_model(*, transposed_read_too: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2], name="to_batch_first"),
             helper.make_node("MatMul", ["t", "w"], ["y"], name="projection")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6, 24])]
    if transposed_read_too:
        nodes.append(helper.make_node("Relu", ["t"], ["r"], name="other_reader"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [4, 6, 32]))
    graph = helper.make_graph(nodes, "seq_first", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 4, 32])],
                              outputs, [numpy_helper.from_array(rng.normal(size=(32, 24)).astype(np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("transposed_read_too", [False, True])
def test_a_transposed_batch_matmul_is_computed_before_the_transpose_and_loads(tmp_path, transposed_read_too):
    model = projection_model(transposed_read_too=transposed_read_too)
    feed = {"x": np.random.default_rng(1).normal(size=(6, 4, 32)).astype(np.float32)}
    result = quantize(ir.from_proto(model), Fp16Config(), data=[feed])
    graph = result.model.graph
    matmul = next(node for node in graph if node.op_type == "MatMul")
    assert matmul.inputs[0].producer().op_type == "Cast"  # x itself, cast to float16: no Transpose before it
    assert [node.op_type for node in graph].count("Transpose") == (2 if transposed_read_too else 1)
    assert any("1 MatMul of a Transpose(perm=[1, 0, 2])" in note for note in result.notes)
    assert result.notes[0] == "float16 weights and compute: 1 float32 constant converted, 3072 -> 1536 bytes"
    assert result.notes[1] == "0 weight values of magnitude 2**-25 or less rounded to 0"
    expected = OrtSession(model.SerializeToString()).run(feed)["y"]
    assert sqnr_db(expected, run_in_a_child(model_to_bytes(result.model), feed, tmp_path)) > 50


def test_other_transposes_before_a_matmul_are_left(tmp_path):
    model = projection_model(transposed_read_too=False)
    model.graph.node[0].attribute[0].ints[:] = [0, 1, 2]
    result = quantize(ir.from_proto(model), Fp16Config())
    assert [node.op_type for node in result.model.graph if node.op_type in ("Transpose", "MatMul")] == \
        ["Transpose", "MatMul"]
    assert not any("Transpose(perm=[1, 0, 2])" in note for note in result.notes)


def test_a_torchscript_transformer_encoder_in_fp16_loads_in_onnx_runtime(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False).eval()
    example = torch.randn(2, 8, 32)
    path = tmp_path / "encoder.onnx"
    torch.onnx.export(encoder, (example,), str(path), opset_version=14, dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch", 1: "tokens"}})
    feed = {"x": example.numpy()}
    result = quantize(load_model(path, require_static=False), Fp16Config(), data=[feed])
    expected = OrtSession(str(path)).run(feed)["y"]
    assert sqnr_db(expected, run_in_a_child(model_to_bytes(result.model), feed, tmp_path)) > 40


def test_an_excluded_transposed_batch_matmul_keeps_its_name_and_stays_float32():
    # the rewrite made a new MatMul: named anew, --exclude projection no longer found it and it went float16
    model = projection_model(transposed_read_too=False)
    result = quantize(ir.from_proto(model), Fp16Config(exclude=("projection",)))
    [matmul] = [node for node in result.model.graph if node.op_type == "MatMul"]
    assert matmul.name == "projection"
    assert [value.dtype for value in matmul.inputs] == [ir.DataType.FLOAT, ir.DataType.FLOAT]
    assert [node.node_name for node in result.float_nodes] == ["projection"]

"""What torch's dynamo exporter (``dynamo=True``, torch's default) writes quantizes as the TorchScript
export of the same module does: the same nodes float, about the same output SQNR.

The exporter's graphs differ (native LayerNormalization, ReduceMean pooling, ``node_*`` names,
opset 18-21); unoptimized (``optimize=False``) it also leaves BatchNormalization and computes each
bias-free Conv's zero bias at run time. Each export takes a few seconds: keep these few.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import edgeopt
from edgeopt.io import load_model
from edgeopt.quant import Int8Config, quantize
from tests.models import TORCH_MODELS, build_dynamo, build_onnx

from .int8_models import sqnr_db


def _inputs(name: str, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal(TORCH_MODELS[name][1]).astype(np.float32)} for _ in range(count)]


def _float_ops(result) -> list[str]:
    return sorted(node.op_type for node in result.float_nodes)


def test_an_unoptimized_dynamo_cnn_quantizes_as_its_torchscript_export(tmp_path):
    """mobilenet_v3 through dynamo with optimize=False: the zero biases fold (CastLike of a constant),
    so BatchNorm folds and every Conv is int8; the SE blocks' means, whose axes a Reshape computes,
    get shapes once folded and pool as GlobalAveragePool. The same nodes stay float as in the TorchScript
    export: HardSwish nodes of inputs too narrow for an integer gate (on these N(0, 1) inputs)."""
    dynamo = load_model(build_dynamo("mobilenet_v3", tmp_path, 18, optimize=False))
    torchscript = load_model(build_onnx("mobilenet_v3", tmp_path, 18))
    calibration = _inputs("mobilenet_v3", 16, seed=0)
    result = quantize(dynamo, Int8Config(), calibration)
    reference = quantize(torchscript, Int8Config(), calibration)
    assert _float_ops(result) == _float_ops(reference) and set(_float_ops(result)) <= {"HardSwish"}
    assert "BatchNormalization" not in [node.op_type for node in result.model.graph]
    held_out = _inputs("mobilenet_v3", 8, seed=1)
    assert sqnr_db(dynamo, result.model, held_out) >= sqnr_db(torchscript, reference.model, held_out) - 1.0


def test_inspect_of_a_model_holding_a_tensor_sequence_counts_the_tensors_around_it(tmp_path):
    """dynamo, unoptimized, writes ``y.split((2, 3), 1)`` as SplitToSequence -> SequenceAt: filling the
    shapes inference left unknown read the sequence's run result (a list) as an array and raised
    AttributeError. A sequence has no one shape: its SequenceAt outputs are filled."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("SplitToSequence", ["r", "sizes"], ["parts"], name="split", axis=1),
             helper.make_node("SequenceAt", ["parts", "zero"], ["a"], name="first"),
             helper.make_node("SequenceAt", ["parts", "one"], ["b"], name="second"),
             helper.make_node("Concat", ["b", "a"], ["y"], name="swap", axis=1)]
    graph = helper.make_graph(
        nodes, "split", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 4])],
        initializer=[numpy_helper.from_array(np.array([2, 3], np.int64), "sizes"),
                     numpy_helper.from_array(np.array(0, np.int64), "zero"),
                     numpy_helper.from_array(np.array(1, np.int64), "one")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "split.onnx")
    nodes = {row.name: row for row in edgeopt.inspect(tmp_path / "split.onnx").cost.nodes}
    assert (nodes["first"].output_shapes, nodes["second"].output_shapes) == (((1, 2, 4),), ((1, 3, 4),))


def _yolo_split_head(path) -> None:
    """dynamo's unoptimized YOLO head: conv -> channels last -> sigmoid -> ``split((2, 2, 5), -1)`` as
    SplitToSequence -> SequenceAt x3 -> xy * 8, wh * wh, conf -> Concat."""
    rng = np.random.default_rng(0)

    def int64(name, value):
        return numpy_helper.from_array(np.array(value, np.int64), name)

    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="det", kernel_shape=[1, 1]),
             helper.make_node("Transpose", ["c"], ["t"], name="to_last", perm=[0, 2, 3, 1]),
             helper.make_node("Sigmoid", ["t"], ["s"], name="sigmoid"),
             helper.make_node("SplitToSequence", ["s", "split"], ["parts"], name="split", axis=-1),
             *[helper.make_node("SequenceAt", ["parts", f"at{k}"], [part], name=part)
               for k, part in enumerate(["xy", "wh", "conf"])],
             helper.make_node("Mul", ["xy", "eight"], ["xy8"], name="scale_xy"),
             helper.make_node("Mul", ["wh", "wh"], ["wh2"], name="square_wh"),
             helper.make_node("Concat", ["xy8", "wh2", "conf"], ["y"], name="join", axis=-1)]
    graph = helper.make_graph(
        nodes, "yolo", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 9])],
        initializer=[numpy_helper.from_array(rng.normal(0, 0.5, (9, 8, 1, 1)).astype(np.float32), "w"),
                     numpy_helper.from_array(rng.normal(0, 0.1, 9).astype(np.float32), "b"),
                     int64("split", [2, 2, 5]), int64("at0", 0), int64("at1", 1), int64("at2", 2),
                     numpy_helper.from_array(np.array(8.0, np.float32), "eight")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def test_a_split_written_as_a_tensor_sequence_quantizes_and_is_checked(tmp_path):
    """The sequence of parts of unequal sizes gave every part one symbolic shape: int8's fidelity check
    failed in ONNX Runtime (QuantizeLinear 'conf'), and so did fp16's range check. As a Split, the parts
    are int8 (only the output Concat stays float for ort, as for a Split export) and fp16 converts."""
    _yolo_split_head(tmp_path / "yolo.onnx")
    data = [{"x": np.random.default_rng(seed).normal(size=(1, 8, 4, 4)).astype(np.float32)} for seed in range(8)]
    int8 = edgeopt.quantize(tmp_path / "yolo.onnx", edgeopt.Int8Config(), data, check_speed=False)
    assert _float_ops(int8.result) == ["Concat"] and int8.fidelity.outputs[0].sqnr_db >= 30.0
    fp16 = edgeopt.quantize(tmp_path / "yolo.onnx", edgeopt.Fp16Config(), data, check_speed=False)
    assert not fp16.result.float_nodes and fp16.fidelity.outputs[0].sqnr_db >= 60.0


def test_the_quantized_file_leaves_out_the_exporters_per_node_stack_traces(tmp_path):
    """dynamo writes each node's Python stack trace, FX node and module path as metadata: 45% of a small
    decoder's int4 file (178.8 -> 76.8 KiB without them), and the exporting machine's paths. The written
    model leaves them out; edgeopt's own annotations stay."""
    from edgeopt import api
    from edgeopt.quant.int4 import Int4WeightConfig

    source = build_dynamo("transformer", tmp_path, 18)
    assert any(entry.key.startswith("pkg.torch.") for node in onnx.load(str(source)).graph.node
               for entry in node.metadata_props)
    output = tmp_path / "int4.onnx"
    report = api.quantize(str(source), Int4WeightConfig(), None, output=output, check_fidelity=False, check_speed=False)
    written = onnx.load(str(output))
    keys = {entry.key for node in written.graph.node for entry in node.metadata_props}
    assert not [key for key in keys if key.startswith(("pkg.", "namespace"))]
    assert report.quant_bytes == output.stat().st_size

"""compare_models: per-layer and output fidelity of QDQ models made by ONNX Runtime's quantizer."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from edgeopt.errors import DataError, ModelError
from edgeopt.quant.compare import compare_models, layer_sqnr, match_tensors, missing_qdq_note
from tests.models import build_onnx, ort_qdq_model

INPUT_SHAPE = (1, 3, 32, 32)


def _samples(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal(INPUT_SHAPE).astype(np.float32)} for _ in range(count)]


def quantize_qdq(float_path: pathlib.Path, quant_path: pathlib.Path) -> pathlib.Path:
    """ORT's static QDQ quantizer: per-channel int8 weights, uint8 activations, 16 random samples."""
    return ort_qdq_model(float_path, quant_path, _samples(16, seed=0))


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    folder = tmp_path_factory.mktemp("compare")
    float_path = build_onnx("mobilenet_v2", folder)
    return float_path, quantize_qdq(float_path, folder / "mobilenet_v2_qdq.onnx")


@pytest.fixture(scope="module")
def result(mobilenet):
    float_path, quant_path = mobilenet
    return compare_models(float_path, quant_path, _samples(8, seed=1))


def test_every_quantized_activation_of_an_ort_model_is_matched(result):
    assert result.samples == 8
    assert result.quantized_tensors > 20
    assert result.matched == result.quantized_tensors
    assert result.unmatched == () and result.skipped == ()


def test_layers_are_sorted_worst_first(result):
    sqnrs = [row.sqnr_db for row in result.layers]
    assert sqnrs == sorted(sqnrs)
    assert all(math.isfinite(s) and s > 10 for s in sqnrs)
    assert all(0.9 < row.cosine <= 1.0 for row in result.layers)


def test_each_row_says_how_much_was_lost_inside_the_node_writing_it(result, mobilenet):
    # a row's SQNR is cumulative (the last layers rank worst); "lost" is where the error arises: what the
    # node computed from its quantized inputs (computed_sqnr_db) against what it wrote. For a node reading a
    # quantized weight (a conv) that is its float twin, the float model's conv fed the quantized inputs; for
    # one reading none (an Add of two activations), the tensor it writes before its output's Q/DQ pair
    import onnx_ir as ir

    from edgeopt.quant.compare_matching import fused_chain, reads_quantized_constant

    quant = ir.load(str(mobilenet[1]))
    values = {v.name: v for node in quant.graph for v in node.outputs}
    measured = [row for row in result.layers if row.lost_db is not None]
    assert len(measured) >= len(result.layers) - 2  # the graph input has no node, hence no loss

    def weighted(row) -> bool:
        node = values[row.tensor].producer()
        return any(map(reads_quantized_constant, fused_chain(node) or [node]))

    assert "Conv" in {values[row.tensor].producer().op_type for row in measured if weighted(row)}
    assert {values[row.tensor].producer().op_type for row in measured if not weighted(row)} >= {
        "Add", "GlobalAveragePool", "Flatten"}
    # ORT's quantizer keeps the names: every row has what its node computed, weighted or not
    assert all(row.computed_sqnr_db is not None for row in measured)
    for row in measured:
        assert row.lost_db == pytest.approx(row.computed_sqnr_db - row.sqnr_db)
        assert row.lost_db > -0.1, row  # a rounding adds error, bar chance
        if row.op_type == "Flatten":  # moves values only, on the scale it reads: nothing to round
            assert row.lost_db == 0.0
    assert json.loads(json.dumps(result.to_dict()))["layers"][0]["lost_db"] is not None


def test_a_weighted_layer_is_measured_against_its_float_twin_on_the_same_quantized_input(tmp_path):
    # conv2 + its Relu, as the float model has them, run on what the int8 model feeds conv2 (relu1's output,
    # dequantized): its SQNR against the float model is the error conv2 received, not the error it made
    import edgeopt
    from edgeopt.quant.config import Int8Config
    from edgeopt.runtime.ort import OrtSession, observing_session
    from tests.quant.int8_models import GraphBuilder, batches

    g = GraphBuilder(seed=5)
    x = g.node("Relu", [g.conv("x", 3, 8, "conv1")], "relu1")
    x = g.node("Relu", [g.conv(x, 8, 8, "conv2")], "relu2")
    flat = g.node("Flatten", [g.node("GlobalAveragePool", [x], "pool")], "flat")
    model = g.model([g.node("Gemm", [flat, g.weight("fc.w", (4, 8)), g.weight("fc.b", (4,))], "fc", transB=1)],
                    (1, 3, 8, 8))
    data = batches((1, 3, 8, 8), 8, seed=1)
    quantized = edgeopt.quantize(model, Int8Config(), data, check_speed=False, check_fidelity=False).model
    result = compare_models(model, quantized, data)
    row = next(row for row in result.layers if row.tensor == "relu2")

    relu1 = next(row for row in result.layers if row.tensor == "relu1").quant_tensor
    fed = observing_session(quantized, [relu1])
    second = g.model([x], (1, 3, 8, 8))  # the same builder's graph: conv2's float weights
    float_relu2 = observing_session(model, ["relu2"])
    twin_onnx = onnx.helper.make_model(onnx.helper.make_graph(
        [n for n in onnx.load_model_from_string(_bytes(second)).graph.node if n.name in ("conv2", "relu2")],
        "twin", [onnx.helper.make_tensor_value_info("relu1", onnx.TensorProto.FLOAT, None)],
        [onnx.helper.make_tensor_value_info("relu2", onnx.TensorProto.FLOAT, None)],
        [t for t in onnx.load_model_from_string(_bytes(second)).graph.initializer if t.name.startswith("conv2")]),
        opset_imports=[onnx.helper.make_opsetid("", 17)])
    twin = OrtSession(ir.from_proto(twin_onnx))
    signal = noise = 0.0
    for feed in data:
        reference = float_relu2.run(feed, ["relu2"])["relu2"].astype(np.float64)
        computed = twin.run({"relu1": fed.run(feed, [relu1])[relu1]})["relu2"]
        signal, noise = signal + np.sum(reference ** 2), noise + np.sum((reference - computed) ** 2)
    assert row.computed_sqnr_db == pytest.approx(10 * np.log10(signal / noise), abs=1e-3)
    assert row.lost_db == pytest.approx(row.computed_sqnr_db - row.sqnr_db)
    assert row.lost_db > 0


def test_two_rows_whose_twins_copy_one_float_node_give_each_copy_a_name_of_its_own(tmp_path):
    # GPT-2's c_attn: one MatMul computes q, k and v, which a Split takes apart. With `att @ v` kept float, the
    # twins of two rows each copied the MatMul as '/c_attn/MatMul__edgeopt_twin', and ONNX Runtime refused the
    # model ("two nodes with same node name"): quantize's fidelity check and `compare` failed with exit 2
    torch = pytest.importorskip("torch")
    import edgeopt
    from edgeopt.quant.config import Int8Config

    width, heads, tokens = 16, 2, 6

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn, self.c_proj = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)

        def forward(self, x):
            q, k, v = (t.view(1, tokens, heads, -1).transpose(1, 2) for t in self.c_attn(x).split(width, dim=2))
            attention = ((q @ k.transpose(-2, -1)) / math.sqrt(width // heads)).softmax(-1)
            return x + self.c_proj((attention @ v).transpose(1, 2).reshape(1, tokens, width))

    torch.manual_seed(0)
    path = tmp_path / "attention.onnx"
    torch.onnx.export(Attention().eval(), (torch.randn(1, tokens, width),), str(path), input_names=["x"],
                      opset_version=17, dynamo=False)
    probs_v = [node.name for node in onnx.load(path).graph.node if node.op_type == "MatMul"][2]
    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal((1, tokens, width)).astype(np.float32)} for _ in range(8)]
    report = edgeopt.quantize(path, Int8Config(exclude=(probs_v,)), data, output=tmp_path / "q.onnx",
                              check_speed=False)
    assert report.fidelity is not None
    result = compare_models(edgeopt.load(path), edgeopt.load(tmp_path / "q.onnx"), data)
    assert sum(row.computed_sqnr_db is not None for row in result.layers) >= 2


def _bytes(model) -> bytes:
    from edgeopt.io import model_to_bytes

    return model_to_bytes(model)


def test_a_selected_row_carries_its_error_in_and_loses_nothing(tmp_path):
    # a ViT's class token: a small row concatenated to large patch rows shares their scale, so it is
    # quantized coarsely, and the Gather that takes it out for the head shows a far lower SQNR than the
    # sequence it reads. The Gather loses nothing (the token had that error already); the Relu,
    # computing exactly from exact inputs, is where it is all lost
    import edgeopt
    from edgeopt.cli.render_compare import _lost_text
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    token = numpy_helper.from_array((0.02 * rng.standard_normal((1, 1, 16))).astype(np.float32), "token")
    weight = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "weight")
    shape = numpy_helper.from_array(np.array([1, 1, 16], np.int64), "shape")
    index = numpy_helper.from_array(np.array(0, np.int64), "index")
    nodes = [helper.make_node("Expand", ["token", "shape"], ["cls"], name="expand"),
             helper.make_node("Concat", ["cls", "x"], ["sequence"], name="concat", axis=1),
             helper.make_node("Relu", ["sequence"], ["activated"], name="relu"),
             helper.make_node("Gather", ["activated", "index"], ["first"], name="gather", axis=1),
             helper.make_node("MatMul", ["first", "weight"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "cls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [token, weight, shape, index])
    path = tmp_path / "cls.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    data = [{"x": rng.standard_normal((1, 8, 16)).astype(np.float32)} for _ in range(16)]
    report = edgeopt.quantize(path, edgeopt.Int8Config(), data, check_speed=False)
    rows = {row.tensor: row for row in compare_models(path, report.model, data).layers}
    assert rows["first"].sqnr_db < rows["activated"].sqnr_db - 10  # the row taken is the one badly quantized
    assert rows["first"].lost_db == 0.0 and rows["first"].computed_sqnr_db == rows["first"].sqnr_db
    # the Gather moves values on the grid of its input's pair into a pair of the same scale: nothing to run
    from edgeopt.io import load_model
    from edgeopt.quant.compare_matching import computed_before_quantizing, match_pairs

    before = computed_before_quantizing(report.model, match_pairs(load_model(path), report.model, None)[0])
    assert before["first"] is None and before["activated"] is not None
    assert math.isinf(rows["activated"].lost_db) and _lost_text(rows["activated"].lost_db) == "all"


def test_rows_carry_op_type_and_the_q_nodes_scale(result):
    ops = {row.op_type for row in result.layers}
    assert {"input", "Conv", "Add", "Gemm"} <= ops
    assert all(row.scale > 0 and row.zero_point_dtype == "uint8" for row in result.layers)
    assert all(0 <= row.zero_point <= 255 for row in result.layers)


def test_a_clip_the_quantizer_dropped_is_compared_at_its_output(result, mobilenet):
    # ORT removes ReLU6 (Clip) after a Conv/BN: its Q range clamps instead.
    float_path, quant_path = mobilenet
    assert not any(n.op_type == "Clip" for n in onnx.load(str(quant_path)).graph.node)
    clipped = [row for row in result.layers if row.op_type == "Clip"]
    assert clipped and all(row.tensor.endswith("Clip_output_0") for row in clipped)


def test_output_metrics(result):
    (output,) = result.outputs
    assert output.name == "output"
    assert math.isfinite(output.sqnr_db) and output.sqnr_db > 10
    assert 0.99 < output.cosine <= 1.0
    assert output.top1_agreement is not None and 0.0 <= output.top1_agreement <= 1.0


def test_to_dict_is_strict_json(result):
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["matched"] == result.matched
    assert data["layers"][0]["tensor"] == result.layers[0].tensor
    assert set(data["outputs"][0]) == {"name", "sqnr_db", "cosine", "max_abs_error", "top1_agreement", "integer"}
    assert data["warnings"] == []  # always there, so a reader of --json need not test for the key


def test_a_model_compared_with_itself_is_exact(mobilenet):
    float_path, _ = mobilenet
    floats = compare_models(float_path, float_path, _samples(2, seed=2))
    assert floats.layers == () and floats.quantized_tensors == 0
    (output,) = floats.outputs
    assert (output.sqnr_db, output.cosine, output.top1_agreement) == (math.inf, 1.0, 1.0)
    assert json.loads(json.dumps(floats.to_dict(), allow_nan=False))["outputs"][0]["sqnr_db"] == "inf"


def _damage_residual_branch(float_path: pathlib.Path, quant_path: pathlib.Path) -> tuple[str, onnx.ModelProto]:
    """Make the Q of the last residual branch 100x coarser (its DQ keeps the true scale)."""
    float_proto, quant = onnx.load(str(float_path)), onnx.load(str(quant_path))
    uses = [name for node in float_proto.graph.node for name in node.input]
    add = [node for node in float_proto.graph.node if node.op_type == "Add"][-1]
    branch = next(name for name in add.input if uses.count(name) == 1)
    scales = {init.name: numpy_helper.to_array(init) for init in quant.graph.initializer}
    quantize = next(n for n in quant.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == branch)
    quant.graph.initializer.append(numpy_helper.from_array(scales[quantize.input[1]] * 100, "damaged_scale"))
    quantize.input[1] = "damaged_scale"
    return branch, quant


def test_a_damaged_scale_makes_its_tensor_the_worst(mobilenet):
    float_path, quant_path = mobilenet
    branch, damaged = _damage_residual_branch(float_path, quant_path)
    result = compare_models(float_path, ir.from_proto(damaged), _samples(4, seed=3))
    assert result.layers[0].tensor == branch
    assert result.layers[0].sqnr_db < 3.0


def test_tensors_missing_from_the_float_model_are_counted_not_compared(mobilenet):
    float_path, quant_path = mobilenet
    quant = onnx.load(str(quant_path))
    quantize = next(n for n in quant.graph.node
                    if n.op_type == "QuantizeLinear" and n.input[0].endswith("Add_output_0"))
    old = quantize.input[0]
    for node in quant.graph.node:  # as if a pass had rewritten the Add under a new name
        node.input[:] = ["renamed_add" if name == old else name for name in node.input]
        node.output[:] = ["renamed_add" if name == old else name for name in node.output]
    result = compare_models(float_path, ir.from_proto(quant), _samples(2, seed=4))
    assert len(result.unmatched) == 1 and result.matched == result.quantized_tensors - 1
    assert old not in {row.tensor for row in result.layers}


def test_samples_are_counted_on_the_feed_not_on_a_sequence_first_output():
    # a CRNN's [T, B, classes] output: its leading axis is time, and counting it said 634 samples for 24
    import edgeopt
    from edgeopt.quant.config import Int8Config
    from tests.quant.int8_models import GraphBuilder, batches

    g = GraphBuilder(seed=3)
    steps = g.node("Transpose", [g.node("MatMul", ["x", g.weight("w", (8, 6))], "proj")], "time_first", perm=[1, 0, 2])
    model = g.model([steps], (1, 5, 8))
    data = batches((1, 5, 8), 4, seed=2)
    quantized = edgeopt.quantize(model, Int8Config(), data, check_speed=False, check_fidelity=False).model
    result = compare_models(model, quantized, data)
    assert (result.samples, result.rows) == (4, 4)


def test_a_quantized_model_of_another_network_is_compared_and_warned_about(mobilenet, tmp_path):
    # the same interface, another network: tensors of the same name and another shape were matched, and the float
    # twins built on them failed to load ("BatchNormalization__edgeopt_twin ... Dimension mismatch"); a pair of
    # unrelated networks at 0.3 dB (ShuffleNet, SqueezeNet) compared without a word
    from edgeopt import api

    float_path, quant_path = mobilenet
    other = quantize_qdq(build_onnx("mobilenet_v3", tmp_path), tmp_path / "mobilenet_v3_qdq.onnx")
    result = api.compare(float_path, other, _samples(4, seed=1))
    assert any("a quantization of this float model" in w for w in result.warnings), result.warnings
    assert result.matched * 2 < result.quantized_tensors
    assert not api.compare(float_path, quant_path, _samples(4, seed=1)).warnings


def test_streams_with_a_sample_limit_and_reports_progress(mobilenet):
    float_path, quant_path = mobilenet
    calls = []
    generator = (sample for sample in _samples(6, seed=5))
    result = compare_models(float_path, quant_path, generator, max_samples=3,
                            progress=lambda done, total: calls.append((done, total)))
    assert result.samples == 3
    assert calls == [(1, None), (2, None), (3, None)]


def test_a_qdq_model_against_itself_measures_each_tensors_own_rounding(mobilenet):
    # The "float" side is then the Q input: each row is that tensor's local quantization error alone.
    _, quant_path = mobilenet
    same = compare_models(quant_path, quant_path, _samples(2, seed=2))
    assert same.matched == same.quantized_tensors
    assert same.layers[0].sqnr_db < 60 < same.layers[-1].sqnr_db  # re-quantizing on the same grid is exact
    assert all(o.sqnr_db == math.inf and o.top1_agreement == 1.0 for o in same.outputs)


def test_layer_sqnr_keys_float_tensors(mobilenet, result):
    float_path, quant_path = mobilenet
    sqnr = layer_sqnr(float_path, quant_path, _samples(2, seed=1), max_samples=1)
    assert set(sqnr) == {row.tensor for row in result.layers}
    assert all(math.isfinite(value) for value in sqnr.values())


def test_match_tensors_pairs_float_names_with_dq_outputs(mobilenet):
    float_path, quant_path = mobilenet
    matches = match_tensors(ir.load(str(float_path)), ir.load(str(quant_path)))
    by_name = {m.float_name: m for m in matches}
    assert by_name["input"].quant_name == "input_DequantizeLinear_Output"
    assert by_name["output"].quant_name == "output" and by_name["output"].op_type == "Gemm"


def test_models_with_different_inputs_are_refused(mobilenet, tmp_path):
    float_path, quant_path = mobilenet
    quant = onnx.load(str(quant_path))
    quant.graph.input[0].name = "image"
    for node in quant.graph.node:
        node.input[:] = ["image" if name == "input" else name for name in node.input]
    with pytest.raises(DataError, match="different inputs"):
        compare_models(float_path, ir.from_proto(quant), _samples(1, seed=6))


def test_models_without_a_common_output_are_refused():
    # two outputs each, none of the same name: which is which is not known (one each is compared by position)
    data = [{"x": np.linspace(-1, 1, 4, dtype=np.float32).reshape(1, 4)}]
    float_model, quant_model = _two_output_model("offsets"), _two_output_model("offsets_renamed")
    quant_model.graph.output[0].name = "scores_renamed"
    for node in quant_model.graph.node:
        node.output[:] = ["scores_renamed" if name == "scores" else name for name in node.output]
    with pytest.raises(DataError, match="no output name"):
        compare_models(ir.from_proto(float_model), ir.from_proto(quant_model), data)


def test_a_single_output_of_another_name_is_compared_by_position(mobilenet, caplog):
    float_path, quant_path = mobilenet
    quant = onnx.load(str(quant_path))
    quant.graph.output[0].name = "logits"
    for node in quant.graph.node:
        node.output[:] = ["logits" if name == "output" else name for name in node.output]
    with caplog.at_level("WARNING"):
        result = compare_models(float_path, ir.from_proto(quant), _samples(2, seed=6))
    assert [row.name for row in result.outputs] == ["output"] and result.outputs[0].sqnr_db > 10
    assert "compared by position" in caplog.text



def _two_output_model(second: str) -> onnx.ModelProto:
    """x -> Relu -> scores, x -> Neg -> ``second``."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["scores"]), helper.make_node("Neg", ["x"], [second])]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4]) for name in ("scores", second)]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])], outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_float_output_the_quantized_model_lacks_is_warned_about_not_dropped_silently(caplog):
    data = [{"x": np.linspace(-1, 1, 4, dtype=np.float32).reshape(1, 4)}]
    with caplog.at_level("WARNING"):
        result = compare_models(ir.from_proto(_two_output_model("offsets")),
                                ir.from_proto(_two_output_model("offsets_renamed")), data)
    assert [row.name for row in result.outputs] == ["scores"]
    assert "output offsets of the float model is not an output of the quantized model (its other outputs: " \
           "offsets_renamed): not compared" in caplog.text

def test_a_model_without_q_or_dq_nodes_is_noted(mobilenet):
    float_path, quant_path = mobilenet
    assert missing_qdq_note(ir.load(str(quant_path))) is None
    assert "no QuantizeLinear/DequantizeLinear node" in missing_qdq_note(ir.load(str(float_path)))


def test_empty_data_is_refused(mobilenet):
    float_path, quant_path = mobilenet
    with pytest.raises(DataError, match="no samples"):
        compare_models(float_path, quant_path, [])


def test_render_compare_prints_the_worst_tensor(result, capsys):
    from edgeopt.cli.render_compare import render_compare

    render_compare(result, limit=3)
    out = capsys.readouterr().out
    assert "worst first" in out and "top-1 agreement" in out
    assert f"matched {result.matched} of {result.quantized_tensors}" in out


# --------------------------------------------- outputs as the user's model gives them

def _matmul_models() -> tuple[ir.Model, ir.Model]:
    """``x -> MatMul -> MatMul`` in float, and its QDQ version with int8 activations.

    ONNX Runtime runs the QDQ version as integer kernels (QLinearMatMul, then
    MatMulIntegerToFloat); exposing the DQ output ``h_dq`` (a matched tensor)
    keeps it from fusing across it, so that session computes the float
    simulation, whose outputs differ in float rounding at least. (A Softmax
    whose output scale is too fine used to differ by far more: ONNX Runtime
    before 1.32 wrapped QLinearSoftmax's saturated outputs to 0.)
    """
    helper, float32 = onnx.helper, onnx.TensorProto.FLOAT
    rng = np.random.default_rng(7)
    shapes = {"w1": (16, 16), "w2": (16, 4)}
    weights = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    inputs = [helper.make_tensor_value_info("x", float32, [8, 16])]
    outputs = [helper.make_tensor_value_info("y", float32, [8, 4])]
    float_nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])]
    float_constants = [numpy_helper.from_array(array, name) for name, array in weights.items()]
    quant_constants = [numpy_helper.from_array(np.array(scale, np.float32), f"{name}_scale")
                       for name, scale in (("x", 0.03), ("h", 0.1))]
    quant_constants += [numpy_helper.from_array(np.array(0, np.int8), f"{name}_zero") for name in ("x", "h")]
    for name, array in weights.items():  # int8 per output channel
        scale = (np.abs(array).max(0) / 127).astype(np.float32)
        quant_constants += [numpy_helper.from_array(np.round(array / scale).astype(np.int8), f"{name}_q"),
                            numpy_helper.from_array(scale, f"{name}_scale"),
                            numpy_helper.from_array(np.zeros(array.shape[1], np.int8), f"{name}_zero")]
    quant_nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
                   helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
                   helper.make_node("DequantizeLinear", ["w1_q", "w1_scale", "w1_zero"], ["w1"], axis=1),
                   helper.make_node("MatMul", ["x_dq", "w1"], ["h"]),
                   helper.make_node("QuantizeLinear", ["h", "h_scale", "h_zero"], ["h_q"]),
                   helper.make_node("DequantizeLinear", ["h_q", "h_scale", "h_zero"], ["h_dq"]),
                   helper.make_node("DequantizeLinear", ["w2_q", "w2_scale", "w2_zero"], ["w2"], axis=1),
                   helper.make_node("MatMul", ["h_dq", "w2"], ["y"])]
    models = []
    for nodes, constants in ((float_nodes, float_constants), (quant_nodes, quant_constants)):
        graph = helper.make_graph(nodes, "matmuls", inputs, outputs, initializer=constants)
        models.append(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    return ir.from_proto(models[0]), ir.from_proto(models[1])


def _ort_outputs(model: ir.Model, feeds: list[dict[str, np.ndarray]], expose: tuple[str, ...] = ()) -> list[np.ndarray]:
    """Output ``y`` of a default ONNX Runtime session, with the tensors ``expose`` as extra outputs."""
    import onnxruntime as ort

    proto = ir.to_proto(model)
    proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in expose)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return [session.run(["y"], feed)[0] for feed in feeds]


def test_output_metrics_are_those_of_the_quantized_model_run_as_is():
    float_model, quant_model = _matmul_models()
    rng = np.random.default_rng(8)
    feeds = [{"x": rng.standard_normal((8, 16)).astype(np.float32)} for _ in range(4)]
    reference, fused = _ort_outputs(float_model, feeds), _ort_outputs(quant_model, feeds)
    simulated = _ort_outputs(quant_model, feeds, expose=("h_dq",))
    assert not np.array_equal(fused, simulated)  # the case is real

    def errors(outputs):
        return np.concatenate([(r - f).ravel() for r, f in zip(reference, outputs)]).astype(np.float64)

    result = compare_models(float_model, quant_model, feeds)
    energy = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in reference)
    (output,) = result.outputs
    error = errors(fused)
    assert output.sqnr_db == pytest.approx(10 * math.log10(energy / float(error @ error)), rel=1e-9)
    assert output.max_abs_error == pytest.approx(float(np.max(np.abs(error))), rel=1e-9)
    assert output.max_abs_error != pytest.approx(float(np.max(np.abs(errors(simulated)))), rel=1e-9)
    agreement = np.mean([np.argmax(r, -1) == np.argmax(f, -1) for r, f in zip(reference, fused)])
    assert output.top1_agreement == pytest.approx(agreement)
    # Per-layer rows still come from the QDQ graph with every matched tensor exposed.
    assert {row.tensor for row in result.layers} == {"x", "h"}


@pytest.mark.parametrize("name, config", [("mobilenet_v2", {"equalize": True}),
                                          ("transformer", {"smoothquant_alpha": 0.5})])
def test_channels_a_float_rewrite_rescaled_are_compared_in_the_users_scale(tmp_path, name, config):
    # Equalization and SmoothQuant scale channels of the tensors between the layers they rewrite;
    # against the user's float model those rows must read as they do against the rewritten float
    # model, not as a per-channel factor mistaken for quantization error (QA: 3.7 dB rows at 39.8 dB out)
    from edgeopt.io import load_model
    from edgeopt.passes import optimize_for_quantization
    from edgeopt.quant import Int8Config, quantize
    from edgeopt.quant.int8 import _float_rewrites
    from edgeopt.quant.rescaled import METADATA_KEY
    from tests.models import TORCH_MODELS

    # compare() measures against the float model after the same float-exact passes (BatchNorm folded)
    float_model = optimize_for_quantization(load_model(build_onnx(name, tmp_path))).model
    rng = np.random.default_rng(0)
    data = [{"input": rng.standard_normal(TORCH_MODELS[name][1]).astype(np.float32)} for _ in range(8)]
    quant = quantize(float_model, Int8Config(**config), data).model
    assert METADATA_KEY in quant.metadata_props
    rewritten = optimize_for_quantization(float_model.clone()).model
    _float_rewrites(rewritten, Int8Config(**config), data)
    bare = ir.from_proto(ir.to_proto(quant))
    del bare.metadata_props[METADATA_KEY]
    mine = {row.tensor: row.sqnr_db for row in compare_models(float_model, quant, data).layers}
    reference = {row.tensor: row.sqnr_db for row in compare_models(rewritten, bare, data).layers}
    assert mine.keys() == reference.keys()
    # the same error, weighted by the user's channel scales instead of the rewritten ones: close, not equal
    off = [(t, mine[t], reference[t]) for t in mine if abs(mine[t] - reference[t]) >= 1.0]
    assert not off, off
    unaware = {row.tensor: row.sqnr_db for row in compare_models(float_model, bare, data).layers}
    assert min(unaware.values()) < min(mine.values()) - 5  # what the record corrects


def test_a_node_reading_only_exact_inputs_lost_all_of_its_error():
    # integer pixels 0..255 quantize exactly (scale 1): the input row is inf dB, and the first conv's
    # loss was blank ("-") where all of the error arises; it is inf ("all" in the table)
    import edgeopt
    from edgeopt.cli.render_compare import _lost_text
    from tests.quant.int8_models import GraphBuilder

    g = GraphBuilder(seed=5)
    x = g.node("Relu", [g.conv("x", 3, 8, "conv1")], "relu1")
    model = g.model([g.conv(x, 8, 4, "conv2")], (1, 3, 8, 8))
    rng = np.random.default_rng(0)
    data = [rng.integers(0, 256, (1, 3, 8, 8)).astype(np.float32) for _ in range(16)]
    data[0][0, 0, 0, 0], data[1][0, 0, 0, 0] = 0.0, 255.0  # the full range, so the scale is exactly 1
    report = edgeopt.quantize(model, edgeopt.Int8Config(), data, check_speed=False)
    rows = {row.tensor: row for row in compare_models(model, report.model, data).layers}
    assert math.isinf(rows["x"].sqnr_db) and rows["x"].lost_db is None
    assert math.isinf(rows[x].lost_db) and _lost_text(rows[x].lost_db) == "all"  # conv1 + its fused Relu


def test_edgeopt_compare_of_an_ort_model_measures_the_tensors_it_holds(mobilenet, result):
    # ONNX Runtime's quantizer keeps BatchNormalization, quantizing each conv's output before it. compare
    # measures against the float model after edgeopt's passes, where BatchNorm is folded and the conv's
    # output name holds the normalized values: those convs were compared with them, 1-3 dB rows that
    # topped the list and measured nothing (QA). They are the given model's tensors, as compare_models
    # of the model as given measures them.
    import edgeopt

    float_path, quant_path = mobilenet
    assert any(n.op_type == "BatchNormalization" for n in onnx.load(str(quant_path)).graph.node)
    measured = edgeopt.compare(float_path, quant_path, _samples(8, seed=1))
    assert measured.unmatched == () and measured.matched == result.matched
    assert {row.tensor: row.op_type for row in measured.layers} == {row.tensor: row.op_type for row in result.layers}
    assert {row.tensor: row.sqnr_db for row in measured.layers} == pytest.approx(
        {row.tensor: row.sqnr_db for row in result.layers})
    assert min(row.sqnr_db for row in measured.layers) > 10


def test_the_model_as_given_is_read_only_for_a_quantizer_that_kept_its_graph(mobilenet, tmp_path):
    """ORT's model holds tensors of the float model as given (before its BatchNorms); edgeopt's holds only
    those of the optimized model, so comparing it does not load the given model's weights a second time."""
    import edgeopt
    from edgeopt.io import load_model
    from edgeopt.passes import optimize_for_quantization
    from edgeopt.quant.compare_matching import may_hold_original

    float_path, ort_path = mobilenet
    optimized = optimize_for_quantization(load_model(float_path)).model
    ours = edgeopt.quantize(float_path, edgeopt.Int8Config(), _samples(8, seed=1), check_fidelity=False,
                            check_speed=False).model
    assert not may_hold_original(optimized, ours) and may_hold_original(optimized, load_model(ort_path))
    absent = tmp_path / "not_read.onnx"  # compare_models must not open it for edgeopt's model
    assert compare_models(optimized, ours, _samples(2, seed=2), original=absent).matched > 20
    with pytest.raises(ModelError, match="not_read.onnx"):
        compare_models(optimized, load_model(ort_path), _samples(2, seed=2), original=absent)


def test_edgeopt_compare_matches_the_matmul_outputs_ort_quantizes_before_their_bias(tmp_path):
    # A Linear on a sequence exports as MatMul + Add; edgeopt's passes make them one Gemm, so the MatMul
    # output ONNX Runtime's quantizer quantizes had no float counterpart (13 of 71 tensors unmatched)
    # and each Add output was labelled with the Reshape edgeopt writes it with.
    import edgeopt

    float_path = build_onnx("transformer", tmp_path)
    rng = np.random.default_rng(0)
    samples = [{"input": rng.standard_normal((1, 16, 32)).astype(np.float32)} for _ in range(8)]
    quant_path = ort_qdq_model(float_path, tmp_path / "transformer_qdq.onnx", samples)
    result = edgeopt.compare(float_path, quant_path, samples)
    assert result.unmatched == () and result.matched == result.quantized_tensors
    rows = {row.tensor: row for row in result.layers}
    assert rows["/layers/layers.0/mlp/mlp.0/MatMul_output_0"].op_type == "MatMul"
    assert rows["/layers/layers.0/mlp/mlp.0/Add_output_0"].op_type == "Add"
    given = {row.tensor: row.sqnr_db for row in compare_models(float_path, quant_path, samples).layers}
    assert {tensor: row.sqnr_db for tensor, row in rows.items()} == pytest.approx(given)


def test_a_qoperator_model_is_told_to_have_no_pairs_to_compare(mobilenet, tmp_path):
    # ONNX Runtime's QOperator format (QLinearConv ...) keeps a QuantizeLinear at the input and a
    # DequantizeLinear at the output: the note "has no Q/DQ node" did not apply, and compare printed the
    # output rows alone with no word on why no layer was compared
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._samples = iter(_samples(8, seed=0))

        def get_next(self):
            return next(self._samples, None)

    float_path, _ = mobilenet
    quant_path = tmp_path / "qoperator.onnx"
    quantize_static(str(float_path), str(quant_path), Reader(), quant_format=QuantFormat.QOperator, per_channel=True)
    quant = ir.load(str(quant_path))
    assert any(node.op_type == "QuantizeLinear" for node in quant.graph)
    note = missing_qdq_note(quant)
    assert note is not None and "QLinearConv" in note and "QuantFormat.QDQ" in note
    assert compare_models(float_path, quant, _samples(2, seed=1)).layers == ()


def _int8_output_models(scale: np.ndarray, zero_point: np.ndarray) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """x @ W -> y in float; the same with y the int8 codes of a QuantizeLinear (a model with int8 outputs)."""
    from onnx import TensorProto, helper

    weight = numpy_helper.from_array(np.random.default_rng(7).standard_normal((4, 3)).astype(np.float32), "W")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])

    def model(nodes, output_type, initializers):
        graph = helper.make_graph(nodes, "int8_out", [x], [helper.make_tensor_value_info("y", output_type, [2, 3])],
                                  [weight, *initializers])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    float_model = model([helper.make_node("MatMul", ["x", "W"], ["y"])], TensorProto.FLOAT, [])
    quant_model = model([helper.make_node("MatMul", ["x", "W"], ["y_float"]),
                         helper.make_node("QuantizeLinear", ["y_float", "s", "zp"], ["y"], axis=1)], TensorProto.INT8,
                        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero_point, "zp")])
    return float_model, quant_model


@pytest.mark.parametrize(("scale", "zero_point"), [
    (np.array(0.05, np.float32), np.array(-3, np.int8)),
    (np.array([0.05, 0.04, 0.06], np.float32), np.array([0, 5, -5], np.int8)),  # per axis
])
def test_an_int8_output_is_compared_dequantized_not_as_raw_codes(scale, zero_point, caplog):
    float_model, quant_model = _int8_output_models(scale, zero_point)
    data = [{"x": np.random.default_rng(seed).uniform(-1, 1, (2, 4)).astype(np.float32)} for seed in range(4)]
    with caplog.at_level("WARNING"):
        result = compare_models(ir.from_proto(float_model), ir.from_proto(quant_model), data)
    (output,) = result.outputs
    assert output.sqnr_db > 25 and output.max_abs_error <= 0.031 and not output.integer
    assert "no closer" not in caplog.text


def test_a_bfloat16_output_is_compared_not_refused_by_onnx_runtime_s_python_api():
    # ONNX Runtime's run() cannot return a bfloat16 array ("No corresponding Numpy type"): compare reads
    # such an output through a Cast to float32, in a copy of the model
    from onnx import TensorProto, helper

    weight = numpy_helper.from_array(np.random.default_rng(8).standard_normal((4, 3)).astype(np.float32), "W")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])

    def model(nodes, output_type):
        graph = helper.make_graph(nodes, "bf16_out", [x], [helper.make_tensor_value_info("y", output_type, [2, 3])],
                                  [weight])
        return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))

    quant_model = model([helper.make_node("MatMul", ["x", "W"], ["y_float"]),
                         helper.make_node("Cast", ["y_float"], ["y"], to=TensorProto.BFLOAT16)], TensorProto.BFLOAT16)
    data = [{"x": np.random.default_rng(seed).uniform(-1, 1, (2, 4)).astype(np.float32)} for seed in range(4)]
    result = compare_models(model([helper.make_node("MatMul", ["x", "W"], ["y"])], TensorProto.FLOAT), quant_model,
                            data)
    assert 40 < result.outputs[0].sqnr_db < 70  # bfloat16's 8-bit mantissa
    assert [(v.name, v.dtype) for v in quant_model.graph.outputs] == [("y", ir.DataType.BFLOAT16)]  # not mutated


def test_a_relu_ort_dropped_after_an_add_is_not_measured_on_the_unclamped_sum(tmp_path):
    # ORT's quantizer drops the Relu after a residual Add (its Q range clamps instead): the row of the
    # Relu's output was measured on the Add's unclamped sum before the pair (computed -2.2 dB, "lost"
    # -35.9 dB); what comes before a pair whose range clamps is not that tensor
    float_path = build_onnx("resnet", tmp_path)
    quant_path = quantize_qdq(float_path, tmp_path / "resnet_qdq.onnx")
    assert not any(node.op_type == "Relu" and node.input[0].endswith("Add_output_0")
                   for node in onnx.load(str(quant_path)).graph.node)
    rows = [row for row in compare_models(float_path, quant_path, _samples(8, seed=1)).layers
            if row.tensor.endswith("features.5/Relu_output_0")]
    assert len(rows) == 1 and rows[0].lost_db > -10
    assert rows[0].computed_sqnr_db is None or rows[0].computed_sqnr_db > rows[0].sqnr_db - 1


def test_no_float_twin_is_built_where_equalization_rescaled_the_tensors(tmp_path):
    # --equalize divides channels of conv1's output by s and multiplies conv2's weights by s: the float
    # model's conv2 fed the quantized (rescaled) input computes something else, so those rows keep the
    # input-minus-output measure, and the other layers still get their twins
    import edgeopt
    from edgeopt.quant.rescaled import read_rescaled

    path = build_onnx("mobilenet_v2", tmp_path)
    data = _samples(8, seed=1)
    quantized = edgeopt.quantize(path, edgeopt.Int8Config(equalize=True), data, check_speed=False,
                                 check_fidelity=False).model
    rescaled = read_rescaled(quantized)
    result = edgeopt.compare(path, quantized, data)
    assert rescaled and all(row.computed_sqnr_db is None for row in result.layers if row.tensor in rescaled)
    twinned = [row for row in result.layers if row.op_type == "Conv" and row.computed_sqnr_db is not None]
    assert len(twinned) >= 3 and all(row.lost_db > -0.1 for row in twinned)


def test_a_softmax_that_opset_conversion_wrapped_in_reshapes_shows_its_loss(tmp_path):
    # opset 11's Softmax(axis=1) on a 4-D tensor normalizes over C*H*W; converted to opset 13 it becomes
    # Flatten -> Softmax -> Reshape, and the row of its output is the Reshape's, exact on its input's grid.
    # The loss is the Softmax's: 256 probabilities near 1/256 on the fixed 1/256 grid
    import edgeopt
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(0.3 * rng.standard_normal((4, 4, 1, 1)).astype(np.float32), name)
               for name in ("w", "w2")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Softmax", ["c"], ["s"], name="softmax", axis=1),
             helper.make_node("Conv", ["s", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], weights)
    path = tmp_path / "softmax11.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=6), path)
    data = [{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(16)]
    quantized = edgeopt.quantize(path, edgeopt.Int8Config(), data, check_speed=False, check_fidelity=False).model
    row = next(row for row in edgeopt.compare(path, quantized, data).layers if row.tensor == "s")
    assert row.op_type == "Softmax" and row.sqnr_db < 20
    assert row.computed_sqnr_db > 35 and row.lost_db == pytest.approx(row.computed_sqnr_db - row.sqnr_db)


def test_a_node_computing_in_float16_is_measured_against_its_float_twin():
    # --fallback fp16: conv2, kept out of int8, reads its quantized input through a Cast to float16 and
    # holds float16 weights; its twin (the float32 conv2 on the same quantized input) shows what float16 and
    # its output's rounding cost it
    import edgeopt
    from tests.quant.int8_models import GraphBuilder, batches

    g = GraphBuilder(seed=6)
    x = g.node("Relu", [g.conv("x", 3, 8, "conv1")], "relu1")
    x = g.node("Relu", [g.conv(x, 8, 8, "conv2")], "relu2")
    x = g.conv(x, 8, 4, "conv3")
    model = g.model([x], (1, 3, 8, 8))
    data = batches((1, 3, 8, 8), 8, seed=2)
    quantized = edgeopt.quantize(model, edgeopt.Int8Config(fallback="fp16", exclude=("conv2",)), data,
                                 check_speed=False, check_fidelity=False).model
    assert any(node.op_type == "Conv" and node.inputs[1].dtype == ir.DataType.FLOAT16 for node in quantized.graph)
    row = next(row for row in edgeopt.compare(model, quantized, data).layers if row.tensor == "relu2")
    assert row.computed_sqnr_db is not None and row.lost_db == pytest.approx(row.computed_sqnr_db - row.sqnr_db)
    assert row.lost_db > 0


def test_a_quantized_model_given_first_gets_output_rows_only_and_a_warning(tmp_path):
    # an int8 model against itself showed layers at 1.5 dB ("lost: all") though its outputs were equal,
    # and an fp16 model given first failed to load a node edgeopt built ("bound to different types")
    import warnings

    import edgeopt
    from edgeopt.demo import demo_calibration_path, demo_model_path

    data = np.load(demo_calibration_path())[:16]
    int8, fp16 = tmp_path / "int8.onnx", tmp_path / "fp16.onnx"
    edgeopt.quantize(demo_model_path(), edgeopt.Int8Config(), data, output=int8, check_speed=False)
    edgeopt.quantize(demo_model_path(), edgeopt.Fp16Config(), output=fp16, check_speed=False)
    for first, holds in ((int8, "QuantizeLinear/DequantizeLinear nodes"), (fp16, "float16, bfloat16 or low-bit")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", edgeopt.EdgeoptWarning)
            result = edgeopt.compare(first, int8, data)
        assert not result.layers and result.outputs[0].top1_agreement is not None
        assert any(f"the first model is no float32 model (it holds {holds}" in w for w in result.warnings)
    assert math.isinf(edgeopt.compare(int8, int8, data).outputs[0].sqnr_db)
    assert edgeopt.compare(demo_model_path(), int8, data).layers  # the float model first: its layers


def test_a_row_without_a_scale_writes_null_in_json_not_a_string(tmp_path):
    # "scale": "nan" mixed strings into a numeric column
    import edgeopt
    from edgeopt.demo import demo_calibration_path, demo_model_path

    fp16 = tmp_path / "fp16.onnx"
    edgeopt.quantize(demo_model_path(), edgeopt.Fp16Config(), output=fp16, check_speed=False)
    layers = edgeopt.compare(demo_model_path(), fp16, np.load(demo_calibration_path())[:4]).to_dict()["layers"]
    assert layers and all(row["scale"] is None for row in layers)
    json.dumps(layers, allow_nan=False)

"""Dynamic int8 of ONNX Runtime's fused com.microsoft Attention (QAttention), on small models built inline:
two Attention layers in a row over a ``[2, 8, 32]`` input, 4 heads, each with its own packed QKV weight."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import edgeopt
from edgeopt.metrics import sqnr_db
from edgeopt.runtime.ort import OrtSession

HIDDEN, HEADS = 32, 4
SHAPE = (2, 8, HIDDEN)


def attention_model(tmp_path, *attributes: dict, shared: bool = False):
    """One Attention per entry of ``attributes`` (its extra attributes), each reading the one before; each with
    its own weight, or all one (``shared``)."""
    rng = np.random.default_rng(0)
    initializers, nodes, source = [], [], "x"
    for index, extra in enumerate(attributes):
        weight = "weight" if shared else f"weight_{index}"
        if not shared or index == 0:
            initializers += [
                numpy_helper.from_array(rng.normal(0, 0.2, (HIDDEN, 3 * HIDDEN)).astype(np.float32), weight),
                numpy_helper.from_array(rng.normal(0, 0.1, 3 * HIDDEN).astype(np.float32), f"bias_{index}")]
        bias = "bias_0" if shared else f"bias_{index}"
        nodes.append(helper.make_node("Attention", [source, weight, bias], [f"y_{index}"], name=f"attention_{index}",
                                      domain="com.microsoft", num_heads=HEADS, **extra))
        source = f"y_{index}"
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info(source, TensorProto.FLOAT, SHAPE)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)], ir_version=8)
    path = tmp_path / "attention.onnx"
    onnx.save(model, path)
    return path


def _quantize(path, output, config=None):
    return edgeopt.quantize(path, config or edgeopt.DynamicInt8Config(), None, output=output, check_fidelity=False,
                            check_speed=False)


def test_an_attribute_qattention_lacks_keeps_the_attention_float(tmp_path):
    """``rotary_embedding_dim`` was copied onto the QAttention, whose schema has no such attribute: ONNX
    Runtime refused to load the model written ("This is an invalid model")."""
    path = attention_model(tmp_path, {}, {"rotary_embedding_dim": HIDDEN // HEADS})
    report = _quantize(path, tmp_path / "q.onnx")
    assert [(node.node_name, node.reason) for node in report.result.float_nodes] == [
        ("attention_1", "it has attribute rotary_embedding_dim, which QAttention does not take")]
    feed = {"x": np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)}
    OrtSession(tmp_path / "q.onnx").run(feed)  # loads and runs


def test_inspect_costs_a_qattention_as_its_attention_and_counts_no_scale_as_a_parameter(tmp_path):
    """QAttention had no cost rule (0 MACs) and its weight scales and zero points (2 x 96 per layer) were
    counted as parameters."""
    path = attention_model(tmp_path, {}, {})
    _quantize(path, tmp_path / "q.onnx")
    float_cost, quant_cost = edgeopt.inspect(path).cost, edgeopt.inspect(tmp_path / "q.onnx").cost
    assert quant_cost.macs == float_cost.macs == 2 * (2 * 8 * HIDDEN * 3 * HIDDEN + 2 * 8 * 8 * 2 * HIDDEN)
    assert "QAttention" not in quant_cost.uncounted_ops
    assert quant_cost.params == float_cost.params == 2 * (HIDDEN * 3 * HIDDEN + 3 * HIDDEN)


def _samples(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(SHAPE).astype(np.float32)} for _ in range(count)]


def test_compare_measures_a_qattention_as_its_attention(tmp_path):
    """No layer row: ONNX cannot type an Attention's output, and a QAttention was not known to compute
    what its Attention does."""
    path = attention_model(tmp_path, {}, {})
    _quantize(path, tmp_path / "q.onnx")
    rows = edgeopt.compare(path, tmp_path / "q.onnx", _samples(4)).layers
    assert [(row.tensor, row.op_type) for row in rows] == [("y_0", "Attention (int8)")]
    assert 30 < rows[0].sqnr_db < 60 and rows[0].lost_db == float("inf")  # its input is the model's: exact


def test_the_accuracy_search_returns_an_attention_to_float(tmp_path):
    """The search ranked MatMul/Gemm, tables and LSTMs only: with two Attentions it had nothing to return
    and missed the goal ("no quantized node left to return to float")."""
    path = attention_model(tmp_path, {}, {})
    report = edgeopt.quantize(path, edgeopt.DynamicInt8Config(), _samples(4), output=tmp_path / "q.onnx",
                              goal=edgeopt.AccuracyGoal(min_sqnr_db=60), check_speed=False)
    assert report.search.met and set(report.search.best_excluded) == {"attention_0", "attention_1"}
    assert report.search.best_excluded[0] == "attention_0"  # measured: the first adds the most noise
    reasons = {node.node_name: node.reason for node in report.result.float_nodes}
    assert reasons["attention_0"].startswith("returned to float by the accuracy search (round 0: output SQNR ")


def test_a_weight_two_attentions_share_is_stored_once_in_int8(tmp_path):
    """Each Attention quantized its weight again: two int8 copies of the one float32 weight (ALBERT shares one
    layer's weights across all its layers, whose int8 model came out larger than its float one)."""
    path = attention_model(tmp_path, {}, {}, shared=True)
    report = _quantize(path, tmp_path / "q.onnx")
    model = onnx.load(tmp_path / "q.onnx")
    assert sorted(init.name for init in model.graph.initializer) == [
        "bias_0", "weight_quantized", "weight_scale", "weight_zero_point"]
    assert [node.input[1] for node in model.graph.node if node.op_type == "QAttention"] == ["weight_quantized"] * 2
    stored = HIDDEN * 3 * HIDDEN + 3 * HIDDEN * (4 + 1)  # int8 values, a float32 scale and an int8 zero point each
    assert f"weights {HIDDEN * 3 * HIDDEN * 4} -> {stored} bytes with scales" in report.result.notes[0]
    feed = _samples(1)[0]
    want, got = OrtSession(path).run(feed)["y_1"], OrtSession(tmp_path / "q.onnx").run(feed)["y_1"]
    assert sqnr_db(want, got) > 30


def test_a_layer_compare_did_not_measure_is_not_said_to_be_in_a_subgraph(tmp_path):
    """A main-graph layer without a row (compare matched no tensor of it) was ranked 'inside a control-flow
    subgraph'."""
    from edgeopt.io import load_model
    from edgeopt.quant.accuracy_damage import weight_damage
    from edgeopt.quant.compare import CompareResult
    from edgeopt.quant.dynamic import quantize_dynamic_int8

    path = attention_model(tmp_path, {}, {})
    result = quantize_dynamic_int8(load_model(path), edgeopt.DynamicInt8Config())
    nothing = CompareResult(samples=1, rows=1, layers=(), outputs=(), quantized_tensors=0, unmatched=())
    assert [(c.node.name, c.reason) for c in weight_damage(load_model(path), result, nothing)] == [
        (name, "its output not measured (no tensor of the quantized model matched it): returned once every "
               "measured layer is") for name in ("attention_0", "attention_1")]


def test_compare_leaves_the_float_model_it_is_given_untyped(tmp_path):
    from edgeopt.io import load_model, model_to_bytes
    from edgeopt.quant.compare import compare_models
    from tests.hf_models import hf_samples
    from tests.quant.test_fused_transformers import build_fused

    path = build_fused("bert", tmp_path)
    float_model = load_model(path, require_static=False)
    before = model_to_bytes(float_model)
    quantized = edgeopt.quantize(path, edgeopt.DynamicInt8Config(), None, check_fidelity=False,
                                 check_speed=False).result.model
    result = compare_models(float_model, quantized, hf_samples("bert", 4, seed=1))
    assert any(row.op_type == "Attention (int8)" for row in result.layers)
    assert model_to_bytes(float_model) == before  # the types compare needed were set on its own copy


def test_attentions_inside_if_branches_are_quantized_and_said_to_be(tmp_path):
    rng = np.random.default_rng(1)
    weight = numpy_helper.from_array(rng.normal(0, 0.2, (HIDDEN, 3 * HIDDEN)).astype(np.float32), "weight")
    bias = numpy_helper.from_array(rng.normal(0, 0.1, 3 * HIDDEN).astype(np.float32), "bias")
    branches = {name: helper.make_graph(
        [helper.make_node("Attention", ["x", "weight", "bias"], [f"{name}_y"], name=f"{name}_attention",
                          domain="com.microsoft", num_heads=HEADS, unidirectional=int(name == "then"))],
        name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, SHAPE)]) for name in ("then", "else")}
    graph = helper.make_graph(
        [helper.make_node("If", ["causal"], ["y"], name="branch", then_branch=branches["then"],
                          else_branch=branches["else"])], "branched",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE),
         helper.make_tensor_value_info("causal", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)], [weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)], ir_version=8)
    onnx.save(model, tmp_path / "branched.onnx")
    report = edgeopt.quantize(tmp_path / "branched.onnx", edgeopt.DynamicInt8Config(), None,
                              output=tmp_path / "q.onnx", check_fidelity=False, check_speed=False)
    assert report.result.details["attention"] == 2
    assert "2 Attentions inside control-flow subgraphs, their int8 weights stored in the main graph" in \
        report.result.notes
    float_session, quant_session = OrtSession(edgeopt.load(tmp_path / "branched.onnx")), OrtSession(
        edgeopt.load(tmp_path / "q.onnx"))
    for causal in (True, False):
        feed = {"x": rng.normal(0, 1, SHAPE).astype(np.float32), "causal": np.array(causal)}
        expected, got = float_session.run(feed)["y"], quant_session.run(feed)["y"]
        assert sqnr_db(expected, got) >= 30.0

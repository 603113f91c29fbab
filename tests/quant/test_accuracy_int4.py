"""The accuracy search for int4 weight-only models: the MatMuls adding the most noise go back to float."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeopt
from edgeopt.errors import ConfigError
from edgeopt.io import model_to_bytes
from edgeopt.quant import int4_importance
from edgeopt.quant.accuracy import RETURNED, AccuracyGoal, _base_model, accuracy_aware_quantize
from edgeopt.quant.float16 import Fp16Config
from edgeopt.quant.int4 import Int4WeightConfig, quantize_int4

_WIDTH = 64


def _mlp(rough: str = "fc2", *, transposed: str = "", also_output: str = "") -> ir.Model:
    """x [8, 64] -> fc1 -> Relu -> fc2 -> Relu -> fc3 -> y; the ``rough`` layer's weights heavy-tailed
    (a few large values per block: int4 rounds the rest of its block coarsely); the ``transposed`` layer
    reads its weight through a Transpose (as a tied LM head does); ``also_output`` is a model output too."""
    rng = np.random.default_rng(3)
    nodes, initializers, x = [], [], "x"
    for index, name in enumerate(("fc1", "fc2", "fc3")):
        weight = rng.standard_normal((_WIDTH, _WIDTH)) / np.sqrt(_WIDTH)
        if name == rough:
            weight *= np.where(rng.random(weight.shape) < 0.03, 12.0, 1.0)
        weight_name = f"{name}.weight"
        if name == transposed:
            weight = weight.T
            nodes.append(helper.make_node("Transpose", [weight_name], [f"{name}.weight_t"], name=f"{name}_t"))
        initializers.append(numpy_helper.from_array(weight.astype(np.float32), weight_name))
        nodes.append(helper.make_node("MatMul", [x, f"{name}.weight_t" if name == transposed else weight_name],
                                      [f"{name}_out"], name=name))
        x = f"{name}_out"
        if index < 2:
            nodes.append(helper.make_node("Relu", [x], [f"relu{index}"], name=f"relu{index}"))
            x = f"relu{index}"
    outputs = [x, *([also_output] if also_output else [])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, _WIDTH])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, [8, _WIDTH]) for o in outputs],
                              initializer=initializers)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _data(count: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((8, _WIDTH)).astype(np.float32)} for _ in range(count)]


def test_the_layer_adding_the_most_noise_goes_back_to_float_first_and_the_rest_stays_int4():
    first = accuracy_aware_quantize(_mlp(), Int4WeightConfig(),
                                    _data(), AccuracyGoal(min_sqnr_db=200.0, max_float_nodes=1))
    assert first.steps[0].next_node == "fc2", first.steps[0]
    # a goal between the all-int4 model's SQNR and the float model's: met with some layers int4
    search = accuracy_aware_quantize(_mlp(), Int4WeightConfig(), _data(),
                                     AccuracyGoal(min_sqnr_db=first.steps[0].score + 1.0))
    assert search.met and "fc2" in search.best_excluded and len(search.best_excluded) < 3
    ops = [node.op_type for node in search.result.model.graph]
    assert ops.count("MatMulNBits") == 3 - len(search.best_excluded)
    reasons = {entry.node_name: entry.reason for entry in search.result.float_nodes}
    assert reasons["fc2"].startswith(RETURNED) and "int8" not in reasons["fc2"]


def test_an_unreachable_goal_returns_every_layer_and_ends_with_the_float_model():
    search = accuracy_aware_quantize(_mlp(), Int4WeightConfig(), _data(), AccuracyGoal(min_sqnr_db=200.0))
    assert search.met and set(search.best_excluded) == {"fc1", "fc2", "fc3"}
    assert not any(node.op_type == "MatMulNBits" for node in search.result.model.graph)


def test_a_layer_reading_its_weight_through_a_transpose_is_ranked_too():
    # int4 names the constant behind the Transpose as the weight it quantized (a tied LM head's case)
    search = accuracy_aware_quantize(_mlp(rough="fc3", transposed="fc3"), Int4WeightConfig(float_passes=False),
                                     _data(), AccuracyGoal(min_sqnr_db=200.0, max_float_nodes=1))
    assert search.steps[0].next_node == "fc3", search.steps[0]


def test_an_input_that_is_a_model_output_too_is_measured_not_taken_as_exact():
    # relu1, fc3's input, is compared as a model output, not as a layer row
    search = accuracy_aware_quantize(_mlp(rough="fc3", also_output="relu1"), Int4WeightConfig(), _data(),
                                     AccuracyGoal(min_sqnr_db=200.0, max_float_nodes=1))
    assert search.steps[0].next_node == "fc3" and "dB lost inside the node" in search.steps[0].reason, search.steps[0]


def test_the_api_writes_the_searched_int4_model(tmp_path):
    path = tmp_path / "mlp.onnx"
    ir.save(_mlp(), path)
    report = edgeopt.quantize(path, Int4WeightConfig(), _data(), output=tmp_path / "q.onnx",
                              goal=AccuracyGoal(min_sqnr_db=200.0, max_float_nodes=2), check_speed=False)
    assert report.search is not None and not report.search.met and len(report.search.best_excluded) == 2
    assert any("accuracy goal not met" in warning for warning in report.warnings)
    assert sum(node.op_type == "MatMulNBits" for node in onnx.load(tmp_path / "q.onnx").graph.node) == 1


@pytest.mark.parametrize(("config", "data", "message"), [
    (Fp16Config(), True, "apply to int8, int4-weight and int8-dynamic quantization only"),
    (Int4WeightConfig(), False, "measures each round on --data"),
])
def test_a_goal_is_refused_where_no_search_can_run(tmp_path, config, data, message):
    path = tmp_path / "mlp.onnx"
    ir.save(_mlp(), path)
    with pytest.raises(ConfigError, match=message):
        edgeopt.quantize(path, config, _data() if data else None, output=tmp_path / "q.onnx",
                         goal=AccuracyGoal(min_sqnr_db=30.0))
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("config", [Int4WeightConfig(), Int4WeightConfig(fallback="int8"),
                                    Int4WeightConfig(gptq=True), Int4WeightConfig(gptq=True, fallback="int8")],
                         ids=["float", "int8-fallback", "gptq", "gptq-int8-fallback"])
def test_the_rounds_share_one_pass_and_each_weight_s_rounding_and_give_a_fresh_quantization_s_bytes(config):
    # the rounds quantize one float model on one data set: the first round's statistics serve all of them,
    # and a weight quantized in the same format for the same readers is the same weight
    search = accuracy_aware_quantize(_mlp(), config, _data(), AccuracyGoal(min_sqnr_db=23.0))
    assert search.met and len(search.steps) >= 3 and search.calibration_passes == 1, search.steps
    excluded = tuple(dict.fromkeys(config.exclude + search.best_excluded))
    fresh = quantize_int4(_base_model(_mlp(), config)[0], replace(config, exclude=excluded), _data())
    assert model_to_bytes(search.result.model) == model_to_bytes(fresh.model)
    assert search.result.notes == fresh.notes


def test_input_correlations_that_take_several_passes_are_read_again_each_round(monkeypatch):
    # they are not all held at once, so no round keeps them for the next; the weights still are
    monkeypatch.setattr(int4_importance, "GRAM_BUDGET_BYTES", _WIDTH * _WIDTH * 8)
    config = Int4WeightConfig(gptq=True)
    search = accuracy_aware_quantize(_mlp(), config, _data(), AccuracyGoal(min_sqnr_db=200.0, max_float_nodes=1))
    assert [step.next_node for step in search.steps] == ["fc2", None]
    assert search.calibration_passes == 3  # the first round's three inputs, one a pass; none in the second
    fresh = quantize_int4(_base_model(_mlp(), config)[0], replace(config, exclude=search.best_excluded), _data())
    assert model_to_bytes(search.result.model) == model_to_bytes(fresh.model)


def test_an_embedding_table_is_ranked_as_a_layer_whose_input_is_exact(tmp_path):
    from .test_int4 import tied_lm_model

    model = tied_lm_model(tmp_path)
    rng = np.random.default_rng(0)
    data = [{"ids": rng.integers(0, 96, (2, 5)).astype(np.int64)} for _ in range(8)]
    search = accuracy_aware_quantize(model, Int4WeightConfig(embeddings="int4", fallback="int8"), data,
                                     AccuracyGoal(min_sqnr_db=200.0))
    chosen = {step.next_node: step.reason for step in search.steps if step.next_node}
    assert set(chosen) == {"embed", "proj", "head"}, search.steps
    assert chosen["embed"].endswith("its input exact")
    # with the head back in float its E stays float32, which the Gather then reads too: no int4 copy of it
    search = accuracy_aware_quantize(model, Int4WeightConfig(embeddings="int4"), data,
                                     AccuracyGoal(min_sqnr_db=200.0))
    # (the table's Gather, ranked 22.2 dB against the head's 22.1 since the clip search weighs the inputs' mean,
    # may be returned on the way; tried in int4 again once the head is float it changes nothing, and goes back)
    assert set(search.best_excluded) == {"proj", "head"}, search.steps
    assert "GatherBlockQuantized" not in {node.op_type for node in search.result.model.graph}
    # a table in 8 bits (the default) or excluded stays so: the search, seeing E in int4 for the head, never
    # picks its Gather
    for config in (Int4WeightConfig(), Int4WeightConfig(embeddings="int4", exclude=("Gather",))):
        kept = accuracy_aware_quantize(model, config, data, AccuracyGoal(min_sqnr_db=200.0))
        assert "embed" not in {step.next_node for step in kept.steps}, kept.steps


def _untied_lm() -> ir.Model:
    """ids [2, 5] -> Gather(E [96, 64]) "embed" -> MatMul "proj" -> Tanh -> MatMul "head" -> logits."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
             helper.make_node("MatMul", ["h", "P"], ["p"], name="proj"), helper.make_node("Tanh", ["p"], ["t"]),
             helper.make_node("MatMul", ["t", "H"], ["logits"], name="head")]
    initializers = [numpy_helper.from_array((rng.standard_normal(shape) * 0.5).astype(np.float32), name)
                    for name, shape in (("E", (96, 64)), ("P", (64, 64)), ("H", (64, 96)))]
    graph = helper.make_graph(nodes, "lm", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 5, 96])],
                              initializer=initializers)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_a_search_taking_every_layer_out_of_int4_keeps_the_8_bit_table_it_measured():
    # the default 8-bit table is no int4 layer: with every MatMul back in float the model still holds it, as a
    # fresh quantization with the same exclusions does; not the float model, scored inf and "met"
    rng = np.random.default_rng(0)
    data = [{"ids": rng.integers(0, 96, (2, 5)).astype(np.int64)} for _ in range(8)]
    config = Int4WeightConfig()
    search = accuracy_aware_quantize(_untied_lm(), config, data, AccuracyGoal(min_sqnr_db=200.0))
    assert set(search.best_excluded) == {"proj", "head"} and not search.met, search.steps
    assert [node.op_type for node in search.result.model.graph][0] == "GatherBlockQuantized"
    fresh = quantize_int4(_base_model(_untied_lm(), config)[0], replace(config, exclude=search.best_excluded), data)
    assert model_to_bytes(search.result.model) == model_to_bytes(fresh.model)


def test_layers_inside_a_scan_body_are_returned_once_the_measured_ones_are():
    # an RNN written as a Scan: its body's two int4 MatMuls were never candidates (ONNX Runtime shows no tensor
    # of a subgraph), so --min-sqnr 45 stopped at 18.1 dB saying "no quantized node left to return to float"
    from tests.control_flow_models import scan_rnn, scan_rnn_data

    model = ir.from_proto(scan_rnn())
    search = accuracy_aware_quantize(model, Int4WeightConfig(), scan_rnn_data(), AccuracyGoal(min_sqnr_db=45.0))
    assert search.met and {"b_mm1", "b_mm2"} <= set(search.best_excluded), search.stopped_because
    assert {"b_mm1", "b_mm2"} <= {entry.node_name for entry in search.result.float_nodes}
    # and a body layer may be excluded by name, as without a goal
    excluded = accuracy_aware_quantize(model, Int4WeightConfig(exclude=("b_mm1",)), scan_rnn_data(),
                                       AccuracyGoal(min_sqnr_db=10.0))
    assert ("b_mm1", "excluded by config") in {(f.node_name, f.reason) for f in excluded.result.float_nodes}


def test_the_search_reports_what_the_float_passes_did_to_the_users_model():
    # the rounds quantize the model the passes already ran on: the search's int4 model said "float passes first:
    # nothing to fold or fuse" where int4 alone said "48 -> 33 nodes"
    import edgeopt.demo
    from edgeopt.io import load_model

    model = load_model(edgeopt.demo.demo_model_path())
    data = [{"input": sample[None]} for sample in np.load(edgeopt.demo.demo_calibration_path())[:16]]
    alone = [n for n in quantize_int4(model.clone(), Int4WeightConfig(), data).notes if n.startswith("float passes")]
    search = accuracy_aware_quantize(model, Int4WeightConfig(), data, AccuracyGoal(min_sqnr_db=25.0))
    assert [n for n in search.result.notes if n.startswith("float passes")] == alone
    assert "nodes" in alone[0] and "nothing to fold" not in alone[0]

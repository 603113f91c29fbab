"""Dynamic int8 (``DynamicInt8Config``, ``--scheme int8-dynamic``): weights int8 ahead of time, activations
quantized as the model runs, as ONNX Runtime's ``quantize_dynamic`` writes it and fuses it."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt import DynamicInt8Config
from edgeopt import ir as eir
from edgeopt.errors import ConfigError, ModelError
from edgeopt.io import load_model, model_to_bytes
from edgeopt.quant import PerChannel, PerTensor, quantize
from edgeopt.quant.compare import compare_models
from edgeopt.quant.speed_evidence import model_precision
from edgeopt.runtime.ort import OrtSession, optimized_model
from tests.hf_models import build_hf, hf_samples
from tests.quant.test_int4 import gaussian_feed, merged_decoder_model, mlp, op_types, save, sqnr_db

MATCHES_REFERENCE_DB = 60.0  # ONNX Runtime's kernels against the numpy reference: float rounding only


def load(path) -> ir.Model:
    """A token model as exported: batch and sequence length dynamic."""
    return load_model(path, require_static=False)


def reference_output(model: ir.Model, feed: dict[str, np.ndarray]) -> np.ndarray:
    """The mlp's output computed as the ONNX spec defines dynamic int8: DynamicQuantizeLinear of each layer
    input (uint8 over [min(0, x), max(0, x)]), per-column symmetric int8 weights in [-127, 127]."""

    def dynamic_quantize(x):
        low, high = min(0.0, float(x.min())), max(0.0, float(x.max()))
        scale = np.float32((high - low) / 255)
        zero_point = np.clip(np.rint(-low / scale), 0, 255)
        return np.clip(np.rint(x / scale) + zero_point, 0, 255) - zero_point, scale

    def product(x, weight):
        w_scale = (np.abs(weight).max(axis=0) / 127).astype(np.float32)
        w_q = np.clip(np.rint(weight / w_scale), -127, 127)
        x_q, x_scale = dynamic_quantize(x)
        return (x_q @ w_q).astype(np.float32) * (x_scale * w_scale)

    weights = {v.name: eir.constant_array(v) for v in model.graph.initializers.values()}
    hidden = np.maximum(product(feed["input"], weights["fc1.weight"]) + weights["fc1.bias"], 0)
    return product(hidden, weights["fc2.weight"].T) + weights["fc2.bias"]


def test_the_mlp_computes_what_the_onnx_spec_defines(tmp_path):
    model = mlp(tmp_path)
    result = quantize(model, DynamicInt8Config(), data=None)
    ops = op_types(result.model)
    assert ops.count("DynamicQuantizeLinear") == 2 and ops.count("MatMulInteger") == 2
    assert "MatMul" not in ops and "Gemm" not in ops
    feed = gaussian_feed(model)
    actual = OrtSession(result.model).run(feed)["output"]
    assert sqnr_db(reference_output(model, feed), actual) >= MATCHES_REFERENCE_DB
    assert sqnr_db(OrtSession(model).run(feed)["output"], actual) >= 30.0  # and near the float model
    weights = {t.name: t for t in result.tensors}
    assert set(weights) == {"fc1.weight", "fc2.weight"}
    assert len(weights["fc1.weight"].scale) == 384 and weights["fc1.weight"].axis == 1
    assert len(weights["fc2.weight"].scale) == 64 and weights["fc2.weight"].axis == 0  # stored [N, K] (transB)
    assert result.scheme == "int8-dynamic" and model_precision(result.model) == "int8-dynamic"


def test_onnx_runtime_fuses_each_product_into_one_integer_kernel(tmp_path):
    result = quantize(mlp(tmp_path), DynamicInt8Config(), data=None)
    fused = op_types(optimized_model(result.model))
    assert fused.count("DynamicQuantizeMatMul") == 2, fused
    assert not {"MatMulInteger", "DynamicQuantizeLinear", "Cast"} & set(fused)


def test_per_tensor_weights_have_one_scale(tmp_path):
    model = mlp(tmp_path)
    result = quantize(model, DynamicInt8Config(weight_granularity=PerTensor()), data=None)
    assert {len(t.scale) for t in result.tensors} == {1}
    feed = gaussian_feed(model)
    assert sqnr_db(OrtSession(model).run(feed)["output"], OrtSession(result.model).run(feed)["output"]) >= 25.0


@pytest.mark.parametrize("make", [
    lambda: DynamicInt8Config(weight_granularity=PerChannel(axis=0)),
    lambda: DynamicInt8Config(smoothquant_alpha=1.5),
    lambda: DynamicInt8Config(smoothquant_alpha=1.0),  # (0, 1), as Int8Config takes it
    lambda: DynamicInt8Config(embeddings="yes"),
    lambda: DynamicInt8Config(exclude="fc1"),
])
def test_bad_config_is_a_config_error(make):
    with pytest.raises(ConfigError):
        make()


def test_the_same_input_is_quantized_once_for_every_layer_reading_it(tmp_path):
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), f"w{i}") for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"proj{i}") for i in range(3)]
    graph = helper.make_graph(nodes, "qkv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [4, 16]) for i in range(3)],
                              initializer=weights)
    model = save(graph, tmp_path / "qkv.onnx")
    result = quantize(model, DynamicInt8Config(), data=None)
    assert op_types(result.model).count("DynamicQuantizeLinear") == 1
    assert result.details["dynamic_inputs"] == 1 and result.details["matmul"] == 3
    feed = gaussian_feed(model)
    for name, value in OrtSession(model).run(feed).items():  # the outputs keep their names
        assert sqnr_db(value, OrtSession(result.model).run(feed)[name]) >= 35.0


@pytest.mark.parametrize(("x_shape", "w_shape", "scale_shape"), [
    ((32,), (32, 16), (16,)),  # a vector input
    ((8, 32), (32,), ()),  # a vector weight: one column, a scalar product per row
    ((32,), (32,), ()),  # both: a scalar
    ((8, 32), (2, 32, 16), (2, 1, 16)),  # a stack of weights: a scale per column of each matrix
    ((2, 8, 32), (3, 2, 32, 16), (3, 2, 1, 16)),
])
def test_vectors_and_stacks_of_weights_are_quantized_as_onnx_runtime_runs_them(tmp_path, x_shape, w_shape,
                                                                               scale_shape):
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal(w_shape) / np.sqrt(32)).astype(np.float32)
    out_shape = np.matmul(np.zeros(x_shape), np.zeros(w_shape)).shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "shapes",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                              initializer=[numpy_helper.from_array(weight, "w")])
    model = save(graph, tmp_path / "shapes.onnx")
    result = quantize(model, DynamicInt8Config(), data=None)
    assert result.details["matmul"] == 1 and not result.float_nodes
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)  # the product keeps the output's shape
    scale = next(v for v in result.model.graph.initializers.values() if v.name == "w_scale")
    assert tuple(scale.shape) == scale_shape
    fused = op_types(optimized_model(result.model))
    assert "DynamicQuantizeMatMul" in fused and "MatMulInteger" not in fused, fused
    feed = gaussian_feed(model)
    expected, actual = OrtSession(model).run(feed)["y"], OrtSession(result.model).run(feed)["y"]
    assert actual.shape == expected.shape and sqnr_db(expected, actual) >= 35.0


def test_what_stays_float_is_listed_with_the_reason(tmp_path):
    model = load(build_hf("bert", tmp_path))
    result = quantize(model, DynamicInt8Config(exclude=("/pooler/Gemm",)), data=None)
    reasons = {(node.op_type, node.reason) for node in result.float_nodes}
    assert ("Gemm", "excluded by config") in reasons
    attention = [n for n in result.float_nodes if n.reason.startswith("both of its inputs are computed")]
    assert len(attention) == 4  # scores and context of two layers
    assert any(note.startswith("left float: ") for note in result.notes)


def test_an_einsum_with_a_stacked_weight_is_named_as_the_reason(tmp_path):
    # Keras' EinsumDense over heads (weight [D, H, K]): no dense layer the float passes can make a MatMul
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((32, 4, 8)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Einsum", ["x", "w"], ["y"], name="heads", equation="bsd,dhk->bshk")],
                              "einsum", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 4, 8])],
                              initializer=[weight])
    with pytest.raises(ModelError, match=r"\(heads: an Einsum with a constant operand that is no dense layer"):
        quantize(save(graph, tmp_path / "einsum.onnx"), DynamicInt8Config(), data=None)


def test_a_bert_is_at_least_as_faithful_as_onnx_runtimes_dynamic_quantization(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = build_hf("bert", tmp_path)
    ours = tmp_path / "ours.onnx"
    import edgeopt

    report = edgeopt.quantize(path, DynamicInt8Config(), None, output=ours, check_fidelity=False, check_speed=False)
    assert report.result.details["tables"] == 3  # word, position and token-type embeddings in int8 rows
    theirs = tmp_path / "ort.onnx"
    quantize_dynamic(str(path), str(theirs), weight_type=QuantType.QInt8, per_channel=True)
    samples = hf_samples("bert", 24, seed=2)
    float_session, our_session, their_session = (OrtSession(load(p)) for p in (path, ours, theirs))
    reference = np.concatenate([float_session.run(s)["logits"].ravel() for s in samples])
    mine = np.concatenate([our_session.run(s)["logits"].ravel() for s in samples])
    other = np.concatenate([their_session.run(s)["logits"].ravel() for s in samples])
    assert sqnr_db(reference, mine) >= sqnr_db(reference, other)  # measured 39.3 against 37.2 dB
    assert ours.stat().st_size < theirs.stat().st_size
    assert json.loads(ours.with_suffix(".report.json").read_text())["scheme"] == "int8-dynamic"


def test_a_tied_embedding_is_stored_in_int8_rows_once_its_head_is_quantized(tmp_path):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 16)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["x"], name="embed"),
             helper.make_node("Transpose", ["table"], ["table_t"], name="tie", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "table_t"], ["logits"], name="head")]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 6, 50])],
                              initializer=[numpy_helper.from_array(table, "table")])
    model = save(graph, tmp_path / "tied.onnx")
    result = quantize(model, DynamicInt8Config(float_passes=False), data=None)
    assert result.details["tables"] == 1 and result.details["matmul"] == 1
    assert not [v for v in result.model.graph.initializers.values() if v.dtype == ir.DataType.FLOAT
                and v.const_value.size == table.size]  # no float copy of the table left
    feed = {"ids": rng.integers(0, 50, (1, 6)).astype(np.int64)}
    assert sqnr_db(OrtSession(model).run(feed)["logits"], OrtSession(result.model).run(feed)["logits"]) >= 30.0
    # the float head reads the table: an int8 copy would add bytes, and nothing is left to quantize
    with pytest.raises(ModelError, match="embed: its table stays in the model in float32 for tie"):
        quantize(model, DynamicInt8Config(float_passes=False, exclude=("head",)), data=None)


def test_a_convolutional_model_is_refused_with_what_to_use(tmp_path):
    from tests.models import build_onnx

    model = load_model(build_onnx("resnet", tmp_path))
    with pytest.raises(ModelError, match="for convolutions use --scheme int8 with --data"):
        quantize(model, DynamicInt8Config(exclude=("Gemm",)), data=None)


def test_a_model_without_convolutions_is_not_pointed_at_them(tmp_path):
    # every layer excluded: the refusal said "for convolutions use --scheme int8" of an MLP
    with pytest.raises(ModelError, match="use --scheme int8 with --data, or fp16, for this model") as caught:
        quantize(mlp(tmp_path), DynamicInt8Config(exclude=("MatMul", "Gemm")), data=None)
    assert "convolutions" not in str(caught.value)


def test_an_opset_10_model_is_refused(tmp_path):
    model = mlp(tmp_path)
    proto = onnx.load(tmp_path / "mlp.onnx")
    proto.opset_import[0].version = 10
    onnx.save(proto, tmp_path / "old.onnx")
    with pytest.raises(ModelError, match="needs opset 11"):
        quantize(load_model(tmp_path / "old.onnx"), DynamicInt8Config(), data=None)
    assert model_to_bytes(model)  # the input model is untouched


def test_a_dynamic_model_is_not_quantized_again(tmp_path):
    result = quantize(mlp(tmp_path), DynamicInt8Config(), data=None)
    with pytest.raises(ModelError, match="already quantized"):
        quantize(result.model, DynamicInt8Config(), data=None)


def test_the_output_is_byte_identical_run_to_run(tmp_path):
    path = build_hf("gpt2", tmp_path)
    first, second = (model_to_bytes(quantize(load(path), DynamicInt8Config(), data=None).model) for _ in range(2))
    assert first == second


def test_smoothquant_needs_data_and_smooths_layer_inputs(tmp_path):
    path = build_hf("gpt2", tmp_path)
    with pytest.raises(ConfigError, match="SmoothQuant .--smoothquant. measures each channel's range"):
        quantize(load(path), DynamicInt8Config(smoothquant_alpha=0.5), data=None)
    result = quantize(load(path), DynamicInt8Config(smoothquant_alpha=0.5), data=hf_samples("gpt2", 16))
    assert any(note.startswith("SmoothQuant (alpha 0.5): ") and "0 inputs smoothed" not in note
               for note in result.notes)


def test_compare_shows_each_quantized_product_and_where_it_loses(tmp_path):
    path = build_hf("bert", tmp_path)
    quantized = quantize(load(path), DynamicInt8Config(), data=None).model
    result = compare_models(load(path), quantized, hf_samples("bert", 8, seed=1))
    assert result.by_name
    rows = {row.tensor: row for row in result.layers}
    products = [row for row in rows.values() if row.op_type.endswith("(int8)")]
    assert {row.op_type for row in products} >= {"MatMul (int8)", "Gemm (int8)", "Gather (int8)"}
    assert all(row.lost_db is not None and row.lost_db > 0 for row in products)
    # every other node computes in float32, exactly as in the float model: it adds nothing
    assert all(row.lost_db == 0.0 for row in rows.values() if not row.op_type.endswith("(int8)"))


def test_compare_undoes_smoothquants_division_of_the_layer_norm_outputs(tmp_path):
    from tests.models import build_onnx

    path = build_onnx("transformer", tmp_path)  # pre-norm: 1/s folds into each LayerNorm's gamma and beta
    rng = np.random.default_rng(0)
    samples = [{"input": rng.standard_normal((1, 16, 32)).astype(np.float32)} for _ in range(6)]
    result = quantize(load_model(path), DynamicInt8Config(smoothquant_alpha=0.5), data=samples)
    rows = compare_models(load_model(path), result.model, samples).layers
    norms = [row for row in rows if row.op_type == "LayerNormalization"]
    assert len(norms) == 5 and all(row.sqnr_db > 30.0 for row in norms), [(r.tensor, r.sqnr_db) for r in norms]


def test_onnx_runtimes_dynamic_models_are_compared_by_name_too(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = build_hf("gpt2", tmp_path)
    theirs = tmp_path / "ort.onnx"
    quantize_dynamic(str(path), str(theirs), weight_type=QuantType.QInt8)
    result = compare_models(load(path), load(theirs), hf_samples("gpt2", 4, seed=1))
    assert result.by_name and [row for row in result.layers if row.op_type == "Gemm (int8)"]


def test_layers_inside_if_branches_and_loop_bodies_are_quantized(tmp_path):
    model = merged_decoder_model(tmp_path)
    result = quantize(model, DynamicInt8Config(), data=None)
    nodes = list(result.model.graph.all_nodes())
    assert [n.op_type for n in nodes if n.op_type in ("MatMul", "MatMulInteger")] == ["MatMulInteger"] * 5
    # x, read in both branches, is quantized in each: neither branch sees the other's values
    assert sum(n.op_type == "DynamicQuantizeLinear" for n in nodes) == 5
    assert any(note.startswith("4 of them inside control-flow subgraphs") for note in result.notes)
    session, reference = OrtSession(result.model), OrtSession(model)
    for use_cache in (True, False):
        feed = {"x": np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32),
                "use_cache": np.array(use_cache)}
        assert sqnr_db(reference.run(feed)["y"], session.run(feed)["y"]) >= 30.0


def test_an_lstm_becomes_dynamic_quantize_lstm_as_onnx_runtime_writes_it(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from tests.audio_models import audio_samples, build_audio

    path = build_audio("lstm", tmp_path)
    result = quantize(load(path), DynamicInt8Config(), data=None)
    lstm = next(node for node in result.model.graph if node.op_type == "DynamicQuantizeLSTM")
    assert lstm.domain == "com.microsoft" and result.details["lstm"] == 1
    float_lstm = next(node for node in load(path).graph if node.op_type == "LSTM")
    directions, rows, inputs = eir.constant_array(float_lstm.inputs[1]).shape
    assert eir.constant_array(lstm.inputs[1]).shape == (directions, inputs, rows)  # transposed, int8
    assert eir.constant_array(lstm.inputs[8]).shape == (directions, rows)  # a scale per gate row
    assert result.details["weight_bytes_after"] < 0.3 * result.details["weight_bytes_before"]
    theirs = tmp_path / "ort.onnx"
    quantize_dynamic(str(path), str(theirs), weight_type=QuantType.QInt8, per_channel=True)
    samples = audio_samples("lstm", 8, seed=2)
    sessions = [OrtSession(model) for model in (load(path), result.model, load(theirs))]
    reference, mine, other = ([session.run(s)["output"].ravel() for s in samples] for session in sessions)
    mine_db = sqnr_db(np.concatenate(reference), np.concatenate(mine))
    assert mine_db >= 40.0 and mine_db >= sqnr_db(np.concatenate(reference), np.concatenate(other)) - 0.1
    rows = compare_models(load(path), result.model, samples[:4]).layers
    assert {row.op_type for row in rows} >= {"LSTM (int8)"}  # compare finds it by name, all its loss inside
    assert all(row.lost_db == math.inf for row in rows if row.op_type == "LSTM (int8)")


def test_lstms_sharing_their_weights_share_the_int8_copies(tmp_path):
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
               for name, shape in (("W", (1, 32, 4)), ("R", (1, 32, 8)))]
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["forward"], name="forward", hidden_size=8),
             helper.make_node("LSTM", ["x", "W", "R"], ["backward"], name="backward", hidden_size=8,
                              direction="reverse")]
    graph = helper.make_graph(nodes, "shared_lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 2, 4])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, [5, 1, 2, 8])
                               for name in ("forward", "backward")], initializer=weights)
    model = save(graph, tmp_path / "shared_lstm.onnx")
    result = quantize(model, DynamicInt8Config(), data=None)
    assert op_types(result.model) == ["DynamicQuantizeLSTM"] * 2 and result.details["lstm"] == 2
    assert len(result.model.graph.initializers) == 6  # W and R once: int8, scales, zero points
    # counted once too: W and R in float32; int8 values, and per gate row a float32 scale and an int8 zero point
    assert result.details["weight_bytes_before"] == 4 * 32 * (4 + 8)
    assert result.details["weight_bytes_after"] == 32 * (4 + 8) + 2 * 32 * (4 + 1)
    assert "2 LSTMs -> DynamicQuantizeLSTM" in result.notes[0]
    feed = gaussian_feed(model)
    for name, value in OrtSession(model).run(feed).items():
        assert sqnr_db(value, OrtSession(result.model).run(feed)[name]) >= 35.0


def test_a_gru_and_a_batch_first_lstm_stay_float_with_the_reason(tmp_path, caplog):
    from tests.audio_models import build_audio

    with caplog.at_level(logging.WARNING, logger="edgeopt.quant.dynamic"):
        result = quantize(load(build_audio("gru", tmp_path)), DynamicInt8Config(), data=None)
    assert {(n.op_type, n.reason) for n in result.float_nodes} == {
        ("GRU", "ONNX Runtime has no quantized GRU (DynamicQuantizeLSTM is the LSTM's)")}
    # a model without convolutions is not sent to static int8, which keeps a GRU float too
    assert [record.getMessage().split("; ", 1)[1] for record in caplog.records] == [
        "those GRU reads stay float (the notes say why): --scheme fp16 halves them"]
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("W", (1, 32, 4)), ("R", (1, 32, 8)), ("head", (8, 3)))]
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["y"], name="rnn", hidden_size=8, layout=1),
             helper.make_node("MatMul", ["y", "head"], ["out"], name="head")]
    graph = helper.make_graph(nodes, "batch_first", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 5, 1, 3])],
                              initializer=weights)
    kept = quantize(save(graph, tmp_path / "batch_first.onnx"), DynamicInt8Config(), data=None)
    assert [(n.node_name, n.reason) for n in kept.float_nodes] == [
        ("rnn", "layout=1 (batch-first): ONNX Runtime's DynamicQuantizeLSTM takes sequence-first inputs")]


def test_a_constant_on_the_left_and_a_one_value_table_stay_float_with_the_reason(tmp_path):
    rng = np.random.default_rng(0)
    constants = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
                 for name, shape in (("left", (4, 8)), ("w", (6, 3)), ("bias_table", (10, 1)))]
    nodes = [helper.make_node("MatMul", ["left", "x"], ["y"], name="left_product"),  # [4, 8] @ [8, 6]
             helper.make_node("MatMul", ["y", "w"], ["z"], name="dense"),
             helper.make_node("Gather", ["bias_table", "ids"], ["b"], name="lookup")]
    graph = helper.make_graph(nodes, "odd", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 6]),
                                             helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 3]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, [3, 1])], initializer=constants)
    result = quantize(save(graph, tmp_path / "odd.onnx"), DynamicInt8Config(float_passes=False), data=None)
    assert result.details["matmul"] == 1 and result.details["tables"] == 0
    assert {(n.node_name, n.reason) for n in result.float_nodes} == {
        ("left_product", "its constant is the left-hand input (W @ x): dynamic int8 is written for x @ W"),
        ("lookup", "its rows hold one value each: an int8 value and its row's scale take more bytes than float32")}


def test_compare_measures_a_product_behind_smoothquants_inserted_mul(tmp_path):
    path = build_hf("bert", tmp_path)  # post-norm: the LayerNorm output is read by the residual too, no fold
    samples = hf_samples("bert", 8, seed=1)
    result = quantize(load(path), DynamicInt8Config(smoothquant_alpha=0.5), data=samples)
    assert any(note.startswith("SmoothQuant (alpha 0.5): ") for note in result.notes)
    rows = compare_models(load(path), result.model, samples).layers
    products = [row for row in rows if row.op_type in ("MatMul (int8)", "Gemm (int8)")]
    assert len(products) == 13 and all(row.lost_db is not None for row in products)  # (logits: an output)


def test_a_one_shot_generator_the_scheme_did_not_read_is_measured(tmp_path):
    import edgeopt

    mlp(tmp_path)
    batches = ({"input": np.random.default_rng(seed).standard_normal((32, 256)).astype(np.float32)}
               for seed in range(8))
    report = edgeopt.quantize(tmp_path / "mlp.onnx", DynamicInt8Config(), batches, output=tmp_path / "q.onnx",
                              check_speed=False)
    assert report.fidelity is not None and report.fidelity_on == "data" and not report.warnings
    assert report.calibration_samples == 0  # nothing was calibrated on it


def test_the_accuracy_search_warns_of_the_model_it_keeps_not_of_each_round(tmp_path):
    """Each round logged its own "most of the weights stay float32": with every layer back in float at the
    end, the report still said 393,216 of 491,520 bytes stayed float (fc1 returned alone, a round)."""
    import edgeopt

    mlp(tmp_path)
    samples = [{"input": np.random.default_rng(seed).standard_normal((32, 256)).astype(np.float32)}
               for seed in range(4)]

    def warnings(goal_db: float) -> tuple[tuple[str, ...], tuple[str, ...]]:
        report = edgeopt.quantize(tmp_path / "mlp.onnx", DynamicInt8Config(), samples, output=tmp_path / "q.onnx",
                                  goal=edgeopt.AccuracyGoal(min_sqnr_db=goal_db), check_speed=False)
        return report.search.best_excluded, tuple(w for w in report.warnings if w.startswith("most of the weights"))

    assert warnings(200.0) == (("fc1", "fc2"), ())  # the float model: the rounds' warnings were of other models
    kept, said = warnings(39.0)  # fc1 (393,216 bytes) float, fc2 in int8: said once, of this model
    assert kept == ("fc1",) and len(said) == 1 and said[0].startswith(
        "most of the weights stay float32 (393,216 of 491,520 bytes")


def test_the_float_weights_warning_counts_no_scale_of_a_quantized_lstm(tmp_path, caplog):
    """The DynamicQuantizeLSTM's [1, 64] float32 weight scales were counted as weights kept float, and it was
    named among the ops whose weights 'stay float'."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
               for name, shape in (("W", (1, 64, 16)), ("R", (1, 64, 16)), ("GW", (1, 96, 16)), ("GR", (1, 96, 32)))]
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["", "h"], name="lstm", hidden_size=16),
             helper.make_node("GRU", ["h", "GW", "GR"], ["y"], name="gru", hidden_size=32)]
    graph = helper.make_graph(nodes, "lstm_gru", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 2, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 32])],
                              initializer=weights)
    with caplog.at_level(logging.WARNING, logger="edgeopt.quant.dynamic"):
        quantize(save(graph, tmp_path / "lstm_gru.onnx"), DynamicInt8Config(), data=None)
    gru_bytes, lstm_bytes = 4 * 96 * (16 + 32), 4 * 64 * (16 + 16)
    assert [record.getMessage() for record in caplog.records] == [
        f"most of the weights stay float32 ({gru_bytes:,} of {gru_bytes + lstm_bytes:,} bytes, listed in the notes): "
        "int8-dynamic quantizes MatMul/Gemm layers; those GRU reads stay float (the notes say why): "
        "--scheme fp16 halves them"]

"""Int8 post-training quantization end to end, on the real small architectures.

SQNR thresholds (dB, int8: u8 activations per tensor, s8 weights per output
channel, int32 bias) against the float model in ONNX Runtime:
conv nets >= 30 dB, the transformer encoder (LayerNorm, GELU and Softmax in
float) >= 25 dB.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from edgeopt.errors import DataError, ModelError
from edgeopt.io import load_model, model_to_bytes
from edgeopt.quant import CalibrationMethod, Int8Config, quantize
from edgeopt.quant.opset import OpsetCheck
from edgeopt.runtime.ort import OrtSession
from tests.models import (
    TORCH_MODELS,
    MultiHeadSelfAttention,
    build_onnx,
    constant_weights_model,
    dynamic_input_model,
    export_onnx,
    external_data_model,
    shadowed_initializer_model,
    tf_style_model,
)

from .int8_models import ort_op_counts, sqnr_db

CONV_NET_SQNR_DB = 30.0
TRANSFORMER_SQNR_DB = 25.0


def _images(shape, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Smooth image-like inputs: low-resolution noise upsampled, plus fine noise, normalized."""
    rng = np.random.default_rng(seed)
    n, c, h, w = shape
    feeds = []
    for _ in range(count):
        coarse = rng.uniform(0, 1, (n, c, h // 4, w // 4))
        image = np.kron(coarse, np.ones((1, 1, 4, 4))) + rng.normal(0, 0.05, shape)
        feeds.append({"input": ((image - 0.45) / 0.25).astype(np.float32)})
    return feeds


def _inputs(name: str, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    shape = TORCH_MODELS[name][1]
    if len(shape) == 4:
        return _images(shape, count, seed)
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    cache = {}

    def get(name: str, opset: int = 17):
        if (name, opset) not in cache:
            cache[name, opset] = load_model(build_onnx(name, folder, opset))
        return cache[name, opset]

    return get


@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2", "mobilenet_v3", "unet"])
def test_conv_nets_keep_30_db(models, name):
    model = models(name)
    result = quantize(model, Int8Config(), _inputs(name, 16, seed=0))
    sqnr = sqnr_db(model, result.model, _inputs(name, 8, seed=1))
    assert sqnr >= CONV_NET_SQNR_DB, f"{name}: {sqnr:.1f} dB"
    counts = ort_op_counts(result.model)
    assert counts["QLinearConv"] >= 8 and "FusedConv" not in counts


def test_transformer_runs_its_matmuls_in_integer(models):
    model = models("transformer")
    result = quantize(model, Int8Config(calibration=CalibrationMethod.AUTO), _inputs("transformer", 16, 0))
    assert sqnr_db(model, result.model, _inputs("transformer", 8, 1)) >= TRANSFORMER_SQNR_DB
    counts = ort_op_counts(result.model)
    # The Linears (13 MatMul + Add(bias) fused into Gemm, and the head) run as QGemm with an int32
    # bias; the attention products q k^T and softmax v as QLinearMatMul.
    assert counts["QGemm"] == 14 and counts["QLinearMatMul"] == 4
    assert sum(t.kind == "bias" and t.format == "int32" for t in result.tensors) == 14
    reasons = {(n.op_type, n.reason) for n in result.float_nodes}
    assert ("LayerNormalization", "no integer kernel for LayerNormalization") in reasons


def test_an_excluded_node_runs_in_float_in_onnx_runtime(models):
    # Between a DQ and a Q, ONNX Runtime fuses an Add into QLinearAdd, and a Conv with float weights
    # into QLinearConv with weights it quantizes itself: an excluded node must read float inputs.
    model = models("resnet")
    calibration = _inputs("resnet", 8, seed=0)
    conv = [node.name for node in model.graph if node.op_type == "Conv"][-1]
    base = ort_op_counts(quantize(model, Int8Config(), calibration).model)
    no_add = ort_op_counts(quantize(model, Int8Config(exclude=("Add",)), calibration).model)
    one_conv = ort_op_counts(quantize(model, Int8Config(exclude=(conv,)), calibration).model)
    assert base["QLinearAdd"] >= 2 and no_add["QLinearAdd"] == 0 and no_add["QLinearConv"] < base["QLinearConv"]
    assert one_conv["QLinearConv"] < base["QLinearConv"] and one_conv["Conv"] + one_conv["FusedConv"] >= 1


def test_the_nodes_writing_an_excluded_node_s_inputs_are_listed_float(models):
    # ONNX Runtime fuses a node into its integer kernel only when a QuantizeLinear alone reads its output:
    # the convs writing an excluded Add's inputs read int8 and compute in float (Conv, FusedConv). The
    # report listed the Add alone, where ONNX Runtime runs every conv it names (QA: a search "returning 5
    # nodes to float" left 8 float layers in ONNX Runtime's graph, 5 convs of them unlisted).
    from edgeopt.quant.placement import READ_IN_FLOAT

    model = models("resnet")
    add = [node.name for node in model.graph if node.op_type == "Add"][-1]
    result = quantize(model, Int8Config(exclude=(add,)), _inputs("resnet", 8, seed=0))
    writers = [f for f in result.float_nodes if f.reason.startswith(READ_IN_FLOAT)]
    assert writers and all(repr(add) in f.reason for f in writers)
    counts = ort_op_counts(result.model)
    assert counts["Conv"] + counts["FusedConv"] == sum(f.op_type == "Conv" for f in result.float_nodes) >= 2


def test_a_gemm_read_in_float_alone_is_not_listed_float(models):
    # DQ -> Gemm with no QuantizeLinear after it runs as QGemm with a float output: an integer kernel
    from edgeopt.quant.placement import READ_IN_FLOAT
    from tests.quant.int8_models import GraphBuilder, batches

    g = GraphBuilder(seed=2)
    h = g.node("Gemm", ["x", g.weight("g1.weight", (16, 16)), g.weight("g1.bias", (16,), 0.1)], "g1", transB=1)
    h = g.node("Gemm", [h, g.weight("g2.weight", (16, 16)), g.weight("g2.bias", (16,), 0.1)], "g2", transB=1)
    relu = g.node("Relu", [h], "relu")
    y = g.node("Gemm", [relu, g.weight("g3.weight", (10, 16)), g.weight("g3.bias", (10,), 0.1)], "g3", transB=1)
    model = g.model([y], (1, 16))
    first = quantize(model, Int8Config(exclude=("g2",)), batches((1, 16), 8))
    assert not any(f.node_name == "g1" for f in first.float_nodes) and ort_op_counts(first.model)["QGemm"] == 2
    fused = quantize(model, Int8Config(exclude=("g3",)), batches((1, 16), 8))  # g2 + its Relu: a float FusedGemm
    reasons = {f.node_name: f.reason for f in fused.float_nodes}
    assert reasons["g2"].startswith(READ_IN_FLOAT) and "Gemm + Relu" in reasons["g2"]
    assert reasons["relu"] == reasons["g2"]
    counts = ort_op_counts(fused.model)
    assert counts["QGemm"] == 1 and counts["FusedGemm"] + counts["Gemm"] == 2


def test_an_excluded_node_behind_data_movement_stays_float(models):
    # The attention MatMul reads Transposes of Reshapes: ORT moves a DequantizeLinear past them, so
    # they read float inputs too (and say why), or the MatMul would be fused back into QLinearMatMul.
    from edgeopt.quant import Target

    model = models("transformer")
    calibration = _inputs("transformer", 8, seed=0)
    attention = next(node.name for node in model.graph if node.op_type == "MatMul"
                     and not any(v.const_value is not None for v in node.inputs))
    base = ort_op_counts(quantize(model, Int8Config(), calibration).model)
    result = quantize(model, Int8Config(exclude=(attention,)), calibration)
    kept = ort_op_counts(result.model)
    assert kept["QLinearMatMul"] == base["QLinearMatMul"] - 1 and kept["MatMul"] == base["MatMul"] + 1
    assert any(f.reason == f"moves data only for {attention!r}, which is kept float" for f in result.float_nodes)
    mcu = quantize(model, Int8Config(exclude=(attention,), target=Target.MCU), calibration)
    assert any(f.node_name == attention for f in mcu.float_nodes)


def test_softmax_probabilities_get_the_fixed_range_not_a_calibrated_one(tmp_path):
    # Over sequences of 2 to 24 tokens, attention probabilities near 1 (short sequences) are rare: a
    # calibrated range clips them, and ONNX Runtime's fused QLinearSoftmax (before 1.32) even wraps a
    # value above the range to 0. On 2-token inputs (ORT 1.31): 0.8 dB calibrated, 23.5 dB fixed.
    import torch

    from edgeopt.quant import Target

    torch.manual_seed(0)
    path = export_onnx(MultiHeadSelfAttention(32, 4), torch.zeros(1, 24, 32), tmp_path / "attention.onnx",
                       dynamic_axes={"input": {1: "S"}, "output": {1: "S"}})
    model = load_model(path, require_static=False)
    rng = np.random.default_rng(0)
    calibration = [{"input": rng.standard_normal((1, int(length), 32)).astype(np.float32)}
                   for length in rng.integers(2, 25, 16)]
    short = [{"input": rng.standard_normal((1, 2, 32)).astype(np.float32)} for _ in range(8)]
    for target, zero_point in ((Target.ORT, 0), (Target.MCU, -128)):
        result = quantize(model, Int8Config(target=target), calibration)
        fixed = [t for t in result.tensors if t.method == "fixed: softmax"]
        assert [(t.op_type, t.scale, t.zero_point) for t in fixed] == [("Softmax", (1 / 256,), (zero_point,))]
        assert sqnr_db(model, result.model, short) >= 20.0, target


def test_a_softmax_wider_than_its_steps_is_noted_with_what_keeps_it_float(tmp_path):
    import torch

    torch.manual_seed(0)
    notes = {}
    for tokens in (300, 24):  # 300 probabilities per row against steps of 1/256; 24 is fine
        path = export_onnx(MultiHeadSelfAttention(32, 4), torch.zeros(1, tokens, 32), tmp_path / f"a{tokens}.onnx")
        model = load_model(path)
        calibration = [{"input": np.random.default_rng(i).standard_normal((1, tokens, 32)).astype(np.float32)}
                       for i in range(4)]
        notes[tokens] = [n for n in quantize(model, Int8Config(), calibration).notes if n.startswith("Softmax")]
        if tokens == 300:
            model_300, calibration_300 = model, calibration
            reader = next(node.name for node in model.graph if node.op_type == "MatMul"
                          and node.inputs[0].producer() is not None and node.inputs[0].producer().op_type == "Softmax")
    assert len(notes[300]) == 1 and "over 300 values" in notes[300][0] and "1/256" in notes[300][0]
    assert notes[300][0].endswith(f"--exclude {reader} keeps them float")
    assert notes[24] == []
    kept = quantize(model_300, Int8Config(exclude=(reader,)), calibration_300).model  # as the note says
    softmax = next(node for node in kept.graph if node.op_type == "Softmax")
    assert {use.node.op_type for use in softmax.outputs[0].uses()} == {"MatMul"}


def test_the_ort_target_leaves_the_classifier_logits_float(models):
    # ORT fuses DQ -> Gemm with no Q after it into QGemm with a float output: the logits are not
    # rounded to 256 levels, at no cost in speed. The MCU scheme (C kernels write int8) quantizes them.
    from edgeopt.quant import Target

    model = models("resnet")
    calibration, test = _inputs("resnet", 16, seed=0), _inputs("resnet", 8, seed=1)
    results = {name: quantize(model, config, calibration) for name, config in (
        ("ort", Int8Config()), ("quantized", Int8Config(quantize_outputs=True)),
        ("mcu", Int8Config(target=Target.MCU)))}
    writers = {name: result.model.graph.outputs[0].producer().op_type for name, result in results.items()}
    assert writers == {"ort": "Gemm", "quantized": "DequantizeLinear", "mcu": "DequantizeLinear"}
    assert "output" not in {t.name for t in results["ort"].tensors}
    counts = ort_op_counts(results["ort"].model)
    assert counts["QGemm"] == 1 and counts["DequantizeLinear"] == 0
    float_logits = sqnr_db(model, results["ort"].model, test)
    assert float_logits > sqnr_db(model, results["quantized"].model, test) + 0.5  # measured +1.4 dB


@pytest.mark.parametrize("method", list(CalibrationMethod))
def test_every_calibration_method_gives_a_working_model(models, method):
    model = models("resnet")
    result = quantize(model, Int8Config(calibration=method), _inputs("resnet", 8, 0))
    assert sqnr_db(model, result.model, _inputs("resnet", 4, 1)) >= CONV_NET_SQNR_DB
    activations = [t for t in result.tensors if t.kind == "activation"]
    if method is CalibrationMethod.AUTO:
        assert {t.method for t in activations} <= {m.value for m in CalibrationMethod} - {"auto"}
        (note,) = [n for n in result.notes if n.startswith("auto calibration")]  # how many got which range
        counts = [int(part.rsplit(" ", 1)[1]) for part in note.split(": ", 1)[1].split(", ")]
        assert sum(counts) == sum(t.method != "derived" for t in activations)
    else:
        assert {t.method for t in activations} == {method.value}


def test_same_model_data_and_settings_give_byte_identical_output(models):
    model = models("mobilenet_v3")
    data = _inputs("mobilenet_v3", 6, 0)
    config = Int8Config(calibration=CalibrationMethod.AUTO)
    first = model_to_bytes(quantize(model, config, data).model)
    second = model_to_bytes(quantize(model, config, iter(data)).model)
    assert first == second


def test_the_input_model_is_not_modified(models):
    model = models("efficientnet")
    before = model_to_bytes(model)
    result = quantize(model, Int8Config(), _inputs("efficientnet", 4, 0))
    assert model_to_bytes(model) == before
    assert result.model is not model
    # SiLU (x * sigmoid(x)) runs as integer Sigmoid and Mul: nothing of it stays float.
    assert not [n for n in result.float_nodes if n.op_type in ("Sigmoid", "Mul")]


def test_opset_11_is_converted_to_13_and_checked(models):
    model = models("mobilenet_v2", opset=11)
    result = quantize(model, Int8Config(), _inputs("mobilenet_v2", 8, 0))
    conversion = result.details["opset_conversion"]
    assert (conversion.from_opset, conversion.to_opset, conversion.batches_checked) == (11, 13, 4)
    assert conversion.max_abs_diff <= 1e-5
    assert any("converted opset 11 -> 13" in note for note in result.notes)
    assert result.model.opset_imports[""] == 13 and model.opset_imports[""] == 11
    assert sqnr_db(model, result.model, _inputs("mobilenet_v2", 4, 1)) >= CONV_NET_SQNR_DB
    assert ort_op_counts(result.model)["QLinearConv"] >= 8


def test_a_conversion_that_changes_outputs_is_refused(models):
    original = models("resnet")
    changed = original.clone()
    bias = next(v for name, v in changed.graph.initializers.items() if name.endswith("bias"))
    bias.const_value = ir.tensor(bias.const_value.numpy() + 1.0)
    check = OpsetCheck(original, changed)
    with pytest.raises(ModelError, match="changed output 'output'"):
        check.update(_inputs("resnet", 1, 0)[0], {})


def test_dynamic_dims_are_quantized_from_data_of_varying_shapes(tmp_path):
    model = load_model(dynamic_input_model(tmp_path / "dynamic.onnx"), require_static=False)
    rng = np.random.default_rng(0)
    data = [{"input": rng.standard_normal((n, 3, h, w)).astype(np.float32)}
            for n, h, w in [(1, 8, 8), (2, 16, 12), (1, 5, 7), (3, 10, 10)]]
    result = quantize(model, Int8Config(), data)
    unseen = [{"input": rng.standard_normal((2, 3, 9, 13)).astype(np.float32)}]
    assert sqnr_db(model, result.model, unseen) >= CONV_NET_SQNR_DB
    assert [str(d) for d in result.model.graph.inputs[0].shape] == ["N", "3", "H", "W"]


def test_dynamic_batch_export_quantizes(tmp_path):
    model = load_model(build_onnx("resnet", tmp_path, 17, dynamic_batch=True), require_static=False)
    data = [{"input": feed["input"].repeat(n, axis=0)} for feed, n in zip(_images((1, 3, 32, 32), 3, 0), (1, 4, 2))]
    result = quantize(model, Int8Config(), data)
    batch = {"input": np.concatenate([f["input"] for f in _images((1, 3, 32, 32), 5, 1)])}
    assert OrtSession(result.model).run(batch)["output"].shape == (5, 10)


def test_result_reports_tensors_notes_and_reusable_calibration(models):
    calls = []
    data = _inputs("resnet", 5, 0)
    result = quantize(models("resnet"), Int8Config(calibration=CalibrationMethod.MSE), data,
                      progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (5, 5)
    assert result.scheme == "int8" and result.config == Int8Config(calibration=CalibrationMethod.MSE)
    assert result.notes[0].startswith("target ort: activations uint8")
    kinds = {t.kind for t in result.tensors}
    assert kinds == {"activation", "weight", "bias"}
    calibration = result.details["calibration"]
    assert calibration.num_batches == 5
    entropy = calibration.with_method(CalibrationMethod.ENTROPY)  # no second pass over the data
    assert set(entropy.ranges()) == set(calibration.ranges())


def test_missing_data_is_a_data_error(models):
    with pytest.raises(DataError, match="calibration needs data"):
        quantize(models("resnet"), Int8Config())


@pytest.mark.parametrize("builder, input_name, shape", [
    (constant_weights_model, "input", (1, 3, 8, 8)),
    (external_data_model, "input", (1, 3, 8, 8)),
    (tf_style_model, "input_1", (1, 16, 16, 3)),
    (shadowed_initializer_model, "input", (1, 3, 8, 8)),
])
def test_odd_exporter_graphs_quantize(tmp_path, builder, input_name, shape):
    model = load_model(builder(tmp_path / "model.onnx"))
    rng = np.random.default_rng(0)
    data = [{input_name: rng.standard_normal(shape).astype(np.float32)} for _ in range(8)]
    result = quantize(model, Int8Config(), data)
    assert sqnr_db(model, result.model, data) >= CONV_NET_SQNR_DB
    assert ort_op_counts(result.model)["QLinearConv"] == 1 and result.float_nodes == ()


def test_a_linear_of_a_model_without_shapes_still_becomes_gemm():
    """MatMul + bias on a 3-D tensor, in a model built without any inferred shapes: quantize infers
    them first, so the float passes fuse the pair and the bias is int32."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["mm"]),
         helper.make_node("Add", ["mm", "b"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(rng.normal(size=(8, 6)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.normal(size=6).astype(np.float32), "b")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert model.graph.node(1).inputs[0].shape is None  # the MatMul reads a value of unknown rank
    feeds = [{"x": rng.normal(size=(1, 4, 8)).astype(np.float32)} for _ in range(8)]
    result = quantize(model, Int8Config(), feeds)
    assert [n.op_type for n in result.model.graph if n.op_type in ("Gemm", "MatMul", "Add")] == ["Gemm"]
    assert sqnr_db(model, result.model, feeds) > CONV_NET_SQNR_DB


def test_a_batched_matmul_weight_is_quantized_per_tensor_and_runs(tmp_path):
    """ONNX Runtime's integer MatMul refuses per-column zero points on a 3-D weight ('b zero point is not
    valid'): a batched weight [B, K, N] is quantized per tensor."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper


    weight = np.random.default_rng(0).standard_normal((2, 16, 8)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "bmm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8])],
                              [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "bmm.onnx")
    model = load_model(tmp_path / "bmm.onnx")
    data = [{"x": x} for x in np.random.default_rng(1).standard_normal((16, 2, 4, 16)).astype(np.float32)]
    result = quantize(model, Int8Config(), data)
    assert next(t for t in result.tensors if t.kind == "weight").axis is None
    feed = data[0]
    reference, quantized = OrtSession(model).run(feed)["y"], OrtSession(result.model).run(feed)["y"]
    assert 10 * np.log10(np.sum(reference**2) / np.sum((reference - quantized) ** 2)) > 30


def test_a_graph_input_that_is_also_an_output_keeps_its_name(tmp_path):
    """The pass-through output stays the float input; it was renamed 'x_float' and the check failed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper


    weight = np.random.default_rng(0).standard_normal((4, 4, 1, 1)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "passthrough",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6]),
                               helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "p.onnx")
    data = [{"x": x} for x in np.random.default_rng(1).standard_normal((16, 1, 4, 6, 6)).astype(np.float32)]
    result = quantize(load_model(tmp_path / "p.onnx"), Int8Config(), data)
    assert [v.name for v in result.model.graph.inputs] == ["x"]
    assert [v.name for v in result.model.graph.outputs] == ["y", "x"]
    assert result.model.graph.outputs[1] is result.model.graph.inputs[0]


def test_a_weight_holding_inf_is_refused_by_name(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((4, 4, 1, 1)).astype(np.float32)
    weight[2, 1, 0, 0] = np.inf
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "inf",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "inf.onnx")
    data = [{"x": x} for x in np.random.default_rng(1).standard_normal((4, 1, 4, 6, 6)).astype(np.float32)]
    with pytest.raises(ModelError, match="weight 'w' of node 'conv' holds 1 inf/NaN"):
        quantize(load_model(tmp_path / "inf.onnx"), Int8Config(), data)


def test_attention_whose_v_comes_from_a_gather_runs_both_matmuls_in_integer(tmp_path):
    # timm-style attention: qkv.reshape(...).permute(...), then q, k, v = qkv[0], qkv[1], qkv[2] (Gathers).
    # probs @ v's second input is an activation, not a weight: it must get a Q/DQ pair too, or ORT runs
    # that MatMul in float behind a Softmax rounded to 8 bits for nothing
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self, dim: int = 32, heads: int = 2) -> None:
            super().__init__()
            self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

        def forward(self, x):
            b, n, c = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            probs = ((q @ k.transpose(-2, -1)) * 0.25).softmax(-1)
            return self.proj((probs @ v).transpose(1, 2).reshape(b, n, c))

    torch.manual_seed(0)
    model = load_model(export_onnx(Attention().eval(), torch.zeros(1, 16, 32), tmp_path / "attention.onnx"))
    rng = np.random.default_rng(0)
    calibration = [{"input": rng.standard_normal((1, 16, 32)).astype(np.float32)} for _ in range(8)]
    result = quantize(model, Int8Config(), calibration)
    counts = ort_op_counts(result.model)
    assert counts["QLinearMatMul"] == 2 and counts["MatMul"] == 0
    assert sqnr_db(model, result.model, calibration) > 25


def test_an_embedding_table_is_stored_in_int8_and_gathered_from_it():
    # token ids -> Gather(table) -> MatMul: the table was left float32 (a BERT-mini's int8 file 0.55x of
    # float, ORT's 0.26x); quantized, ONNX Runtime gathers the int8 rows directly
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    table = numpy_helper.from_array((rng.standard_normal((4000, 64)) * 0.5).astype(np.float32), "table")
    weight = numpy_helper.from_array((rng.standard_normal((64, 8)) * 0.2).astype(np.float32), "w")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"], name="embed", axis=0),
             helper.make_node("MatMul", ["rows", "w"], ["y"], name="proj")]
    graph = helper.make_graph(nodes, "embed", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8])], [table, weight])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    data = [{"ids": rng.integers(0, 4000, (1, 16))} for _ in range(8)]
    result = quantize(model, Int8Config(), data)
    assert len(model_to_bytes(result.model)) < 0.3 * len(model_to_bytes(model))
    assert ort_op_counts(result.model)["Gather"] == 1 and "embed" not in {n.node_name for n in result.float_nodes}
    assert sqnr_db(model, result.model, data) > 30
    from edgeopt.quant import Target  # edgeopt's C gathers at constant indices only: the MCU target keeps a
    # lookup of token ids float, and says so

    mcu = quantize(model, Int8Config(target=Target.MCU), data)
    reasons = {node.node_name: node.reason for node in mcu.float_nodes}
    assert "run-time indices (an embedding lookup)" in reasons["embed"]


def test_the_mcu_target_gathers_an_activation_at_constant_indices_in_int8():
    """Attention's q, k, v = qkv[0], qkv[1], qkv[2] (Gather of a scalar index) copies int8 blocks in the C."""
    from onnx import TensorProto, helper, numpy_helper

    from edgeopt.quant import Target
    from edgeopt.runtime.reference import lower

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((rng.standard_normal((8, 24)) * 0.3).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, 4, 3, 8]), "shape")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["qkv"], name="proj"),
             helper.make_node("Reshape", ["qkv", "shape"], ["split"], name="split"),
             helper.make_node("Transpose", ["split"], ["heads"], name="heads", perm=[2, 0, 1, 3])]
    outputs = []
    for name in "qkv":
        nodes.append(helper.make_node("Gather", ["heads", f"i{name}"], [name], name=f"take_{name}", axis=0))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4, 8]))
    initializers = [weight, shape] + [numpy_helper.from_array(np.array(i), f"i{n}") for i, n in enumerate("qkv")]
    graph = helper.make_graph(nodes, "gather", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                              outputs, initializers)
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    data = [{"x": rng.standard_normal((1, 4, 8)).astype(np.float32)} for _ in range(8)]
    mcu = quantize(model, Int8Config(target=Target.MCU), data)
    assert not {node.node_name for node in mcu.float_nodes} & {"take_q", "take_k", "take_v"}
    assert [op.kind for op in lower(mcu.model).ops].count("slice") == 3


def test_the_rewrites_the_float_passes_refused_are_in_the_notes_with_their_reason():
    """A conv whose output is read twice keeps its BatchNormalization (float), and a hardswish spelled
    with /5 is not one (its Div becomes a quantized Mul by 0.2): the notes say why, so the user can
    re-export."""
    from .int8_models import GraphBuilder, batches

    graph = GraphBuilder()
    conv = graph.conv("x", 3, 8, "conv")
    norm = graph.node("BatchNormalization", [conv, graph.constant("g", np.linspace(0.5, 1.5, 8)),
                                             graph.constant("b", np.zeros(8)), graph.constant("m", np.zeros(8)),
                                             graph.constant("v", np.ones(8))], "bn")
    shifted = graph.node("Add", [norm, graph.constant("three", 3.0)], "add3")
    clipped = graph.node("Clip", [shifted, graph.constant("zero", 0.0), graph.constant("six", 6.0)], "clip")
    scaled = graph.node("Div", [graph.node("Mul", [norm, clipped], "mul"), graph.constant("five", 5.0)], "div5")
    model = graph.model([scaled, graph.node("Relu", [conv], "side")], [1, 3, 8, 8])
    result = quantize(model, Int8Config(), batches([1, 3, 8, 8], 8))
    start = next(i for i, note in enumerate(result.notes) if note.startswith("float passes:"))
    assert result.notes[start:start + 3] == (
        "float passes: 2 rewrites matched but not applied, so those nodes stay as exported:",
        "  not folded (fold-batchnorm): conv + bn: Conv output has 2 consumers",
        "  not fused (fuse-activations): add3 + clip: the Clip output is not scaled by 1/6 "
        "(as in x * clip(x + 3, 0, 6) / 6)")
    assert "bn" in {node.node_name for node in result.float_nodes}


def test_a_pattern_refused_at_every_block_is_one_note_naming_the_first_place(models):
    """Exported at opset 11, a MobileNetV3's seven HardSigmoid * x cannot become HardSwish (opset 14)."""
    feeds = _inputs("mobilenet_v3", 4, seed=0)
    refused = [note for note in quantize(models("mobilenet_v3", 11), Int8Config(), feeds).notes
               if note.startswith("  not fused")]
    assert len(refused) == 1 and refused[0].endswith("and 6 more: HardSwish needs opset >= 14 (model has 13)")
    assert not any(note.startswith("float passes:") for note in quantize(models("mobilenet_v3", 14), Int8Config(),
                                                                           feeds).notes)


def test_the_mcu_target_quantizes_a_relu_no_op_before_it_absorbs():
    """A Relu after a MaxPool: the ORT target keeps it float (no integer kernel there); the MCU target gives
    it a Q/DQ pair of its own, which the C runs as a clamped requantization."""
    from onnx import TensorProto, helper, numpy_helper

    from edgeopt.quant import Target
    from edgeopt.runtime.reference import lower

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(0, 0.4, shape).astype(np.float32), name)
               for name, shape in (("w", (4, 3, 3, 3)), ("w2", (4, 4, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Relu", ["p"], ["r"], name="lone_relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "relu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], weights)
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    data = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    assert "lone_relu" in {node.node_name for node in quantize(model, Int8Config(), data).float_nodes}
    mcu = quantize(model, Int8Config(target=Target.MCU), data)
    assert mcu.float_nodes == ()
    assert [op.kind for op in lower(mcu.model).ops].count("requantize") >= 1
    assert sqnr_db(model, mcu.model, data) > 30

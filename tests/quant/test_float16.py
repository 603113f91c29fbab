"""fp16 (weights and compute) and bf16 (weights stored, compute float32) conversion.

Thresholds: float16 keeps 11 significant bits, so one rounding costs about
-71 dB and a network of a few dozen rounded layers stays far above 40 dB;
bfloat16 keeps 8 bits (about -53 dB per rounding) applied to weights only,
so 25 dB leaves wide room on the same networks.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from edgeopt import ir as eir
from edgeopt.errors import ConfigError
from edgeopt.io import load_model, model_to_bytes
from edgeopt.quant import quantize
from edgeopt.quant.float16 import FLOAT32_OPS, Bf16Config, Fp16Config, to_float16
from edgeopt.quant.float16_ranges import ACTIVATION_REASON, WEIGHT_REASON
from edgeopt.runtime.ort import OrtSession, random_feed
from tests.models import build_onnx, tanh_loop_body

FP16_MIN_SQNR_DB = 40.0
BF16_MIN_SQNR_DB = 25.0


def sqnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    noise = np.sum((reference.astype(np.float64) - other) ** 2)
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / max(noise, 1e-30)))


def run_both(model: ir.Model, converted: ir.Model, seed: int = 0) -> tuple[dict, dict]:
    feed = random_feed(eir.model_inputs(model), seed=seed)
    return OrtSession(model).run(feed), OrtSession(converted).run(feed)


def initializer_bytes(model: ir.Model) -> int:
    return sum(np.asarray(v.const_value.numpy()).nbytes for v in model.graph.initializers.values())


def check_types(model: ir.Model) -> None:
    """ONNX's strict checker: every node's input and output types satisfy its schema."""
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def casts_agree(model: ir.Model) -> bool:
    return all(node.attributes.get_int("to") == node.outputs[0].dtype
               for node in model.graph if node.op_type == "Cast")


@pytest.fixture(scope="module")
def torch_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("torch")
    return {name: build_onnx(name, folder) for name in ("mobilenet_v3", "transformer")}


# --------------------------------------------------------------------------
# configs and numerics
# --------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: Fp16Config(exclude="Conv"),
    lambda: Fp16Config(exclude=("",)),
    lambda: Fp16Config(keep_io_float32="yes"),
    lambda: Bf16Config(exclude=[3]),
])
def test_bad_config_is_a_config_error(make):
    with pytest.raises(ConfigError):
        make()


def test_configs_are_frozen_and_keyword_only():
    with pytest.raises(TypeError):
        Fp16Config(True)  # noqa: FBT003
    with pytest.raises(AttributeError):
        Fp16Config().exclude = ("Conv",)


def test_to_float16_clamps_to_the_range_and_counts():
    values = [1e5, -7e4, 65504.0, 1.0, 1e-9, 0.0, np.inf, 2.0**-25, -(2.0**-25), 2.0**-24]
    half = to_float16(np.array(values, dtype=np.float32))
    assert half.array.dtype == np.float16
    # 2**-25 is half the smallest subnormal: a tie, rounded to even (zero); 2**-24 is that subnormal
    assert half.array.tolist() == [65504.0, -65504.0, 65504.0, 1.0, 0.0, 0.0, np.inf, 0.0, 0.0, 2.0**-24]
    assert (half.clamped, half.flushed) == (2, 3)


# --------------------------------------------------------------------------
# fp16 on real architectures
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mobilenet_v3", "transformer"])
def test_fp16_runs_in_ort_with_float32_io_and_high_sqnr(torch_models, name):
    model = load_model(torch_models[name])
    result = quantize(model, Fp16Config(), data=None)
    converted = result.model
    assert result.scheme == "fp16"
    assert [v.dtype for v in converted.graph.inputs] == [ir.DataType.FLOAT]
    assert [v.dtype for v in converted.graph.outputs] == [ir.DataType.FLOAT]
    assert [v.name for v in converted.graph.outputs] == [v.name for v in model.graph.outputs]
    reference, outputs = run_both(model, converted)
    for key, value in reference.items():
        assert outputs[key].dtype == np.float32
        assert sqnr_db(value, outputs[key]) >= FP16_MIN_SQNR_DB
    check_types(converted)
    assert casts_agree(converted)


@pytest.mark.parametrize("name", ["mobilenet_v3", "transformer"])
def test_fp16_halves_the_weights(torch_models, name):
    model = load_model(torch_models[name])
    result = quantize(model, Fp16Config(), data=None)
    details = result.details
    assert details["weight_bytes_after"] * 2 == details["weight_bytes_before"]
    # every float weight left after the float passes is converted; folding BatchNorm first leaves fewer
    halves = [v for v in result.model.graph.initializers.values() if v.dtype == ir.DataType.FLOAT16]
    assert sum(v.const_value.nbytes for v in halves) * 2 == details["weight_bytes_before"]
    assert not [v for v in result.model.graph.initializers.values()
                if v.dtype == ir.DataType.FLOAT and v.const_value.size > 1]
    constants = sum(node.attributes["value"].value.nbytes for node in model.graph
                    if node.op_type == "Constant" and "value" in node.attributes)  # folded into initializers
    assert details["weight_bytes_before"] <= initializer_bytes(model) + constants
    ratio = len(model_to_bytes(result.model)) / len(model_to_bytes(model))
    assert ratio < 0.6  # half the weights plus the graph structure
    assert any("bytes" in note for note in result.notes)


def test_half_precision_folds_batchnorm_first_and_checks_excludes(torch_models):
    # 1 / sqrt(var + eps) is not computed in float16, and fewer ops round in half precision
    model = load_model(torch_models["mobilenet_v3"])
    assert any(node.op_type == "BatchNormalization" for node in model.graph)
    for config in (Fp16Config(), Bf16Config()):
        result = quantize(model, config, data=None)
        assert not any(node.op_type == "BatchNormalization" for node in result.model.graph)
        assert any(note.startswith("float passes first") for note in result.notes)
        reference, outputs = run_both(model, result.model)
        floor = FP16_MIN_SQNR_DB if isinstance(config, Fp16Config) else BF16_MIN_SQNR_DB
        assert sqnr_db(reference["output"], outputs["output"]) >= floor
    with pytest.raises(ConfigError, match="NoSuchNode"):
        quantize(model, Fp16Config(exclude=("NoSuchNode",)), data=None)
    with pytest.raises(ConfigError, match="NoSuchNode"):
        quantize(model, Bf16Config(exclude=("NoSuchNode",)), data=None)


def test_fp16_leaves_the_input_model_untouched(torch_models):
    model = load_model(torch_models["transformer"])
    before = model_to_bytes(model)
    quantize(model, Fp16Config(), data=None)
    assert model_to_bytes(model) == before


def test_fp16_excluded_op_type_stays_float32(torch_models):
    model = load_model(torch_models["transformer"])
    result = quantize(model, Fp16Config(exclude=("Softmax",)), data=None)
    softmaxes = [n for n in result.model.graph if n.op_type == "Softmax"]
    assert softmaxes
    for node in softmaxes:
        assert [v.dtype for v in (*node.inputs, *node.outputs)] == [ir.DataType.FLOAT] * 2
    assert {(n.op_type, n.reason) for n in result.float_nodes} == {("Softmax", "excluded by config")}
    reference, outputs = run_both(model, result.model)
    assert sqnr_db(reference["output"], outputs["output"]) >= FP16_MIN_SQNR_DB


def test_fp16_without_float32_io_takes_and_returns_float16(torch_models):
    model = load_model(torch_models["mobilenet_v3"])
    converted = quantize(model, Fp16Config(keep_io_float32=False), data=None).model
    assert converted.graph.inputs[0].dtype == ir.DataType.FLOAT16
    assert converted.graph.outputs[0].dtype == ir.DataType.FLOAT16
    feed = random_feed(eir.model_inputs(model))
    reference = OrtSession(model).run(feed)["output"]
    output = OrtSession(converted).run({"input": feed["input"].astype(np.float16)})["output"]
    assert output.dtype == np.float16
    assert sqnr_db(reference, output.astype(np.float32)) >= FP16_MIN_SQNR_DB


# --------------------------------------------------------------------------
# fp16: ops whose attributes or inputs carry float types
# --------------------------------------------------------------------------


def odd_ops_model(tmp_path, big_weight: float = 0.5):
    """Resize, ConstantOfShape, Constant(value_float), CumSum, Cast to float, Range, LayerNorm, shared weight.

    x [1,4,8,8] -> Resize x2 (scales initializer) + ConstantOfShape(0.25)
    -> * Constant(value_float) * w_big -> CumSum -> Cast(to=FLOAT) + Range(0, 16)
    -> LayerNorm (Mean output is a graph output) -> Conv "keep_me" and Conv
    "conv_b" (same weight) -> Add -> y [1,4,16,16]; opset 17.
    """
    rng = np.random.default_rng(0)
    conv_w = (rng.standard_normal((4, 4, 1, 1)) * 0.3).astype(np.float32)
    initializers = [
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
        numpy_helper.from_array(np.array([1, 4, 16, 16], np.int64), "fill_shape"),
        numpy_helper.from_array(np.array(3, np.int64), "cumsum_axis"),
        numpy_helper.from_array(np.array([1.0, big_weight, 1e-9, 1.0], np.float32).reshape(1, 1, 1, 4).repeat(4, 3)
                                .reshape(1, 1, 1, 16), "w_big"),
        numpy_helper.from_array((rng.random(16) + 0.5).astype(np.float32), "ln_scale"),
        numpy_helper.from_array((rng.standard_normal(16) * 0.1).astype(np.float32), "ln_bias"),
        numpy_helper.from_array(conv_w, "conv_w"),
    ]
    f32 = lambda v, name: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(  # noqa: E731
        np.array(v, np.float32), name))
    nodes = [
        helper.make_node("Resize", ["x", "", "scales"], ["up"], name="resize", mode="nearest"),
        helper.make_node("ConstantOfShape", ["fill_shape"], ["fill"], name="fill",
                         value=numpy_helper.from_array(np.array([0.25], np.float32))),
        helper.make_node("Add", ["up", "fill"], ["a"], name="add_fill"),
        helper.make_node("Constant", [], ["k"], name="k", value_float=0.5),
        helper.make_node("Mul", ["a", "k"], ["m"], name="mul_k"),
        helper.make_node("Mul", ["m", "w_big"], ["mw"], name="mul_w"),
        helper.make_node("CumSum", ["mw", "cumsum_axis"], ["cs"], name="cumsum"),
        helper.make_node("Cast", ["cs"], ["cc"], name="cast_float", to=TensorProto.FLOAT),
        f32(0.0, "start"), f32(16.0, "limit"), f32(1.0, "delta"),
        helper.make_node("Range", ["start", "limit", "delta"], ["ramp"], name="range"),
        helper.make_node("Add", ["cc", "ramp"], ["r"], name="add_ramp"),
        helper.make_node("LayerNormalization", ["r", "ln_scale", "ln_bias"], ["ln", "mean"], name="ln", axis=-1),
        helper.make_node("Conv", ["ln", "conv_w"], ["ca"], name="keep_me"),
        helper.make_node("Conv", ["ln", "conv_w"], ["cb"], name="conv_b"),
        helper.make_node("Add", ["ca", "cb"], ["y"], name="add_out"),
    ]
    graph = helper.make_graph(
        nodes, "odd_ops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16]),
         helper.make_tensor_value_info("mean", TensorProto.FLOAT, [1, 4, 16, 1])],
        initializer=initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(proto, full_check=True)
    path = tmp_path / "odd_ops.onnx"
    onnx.save(proto, path)
    return load_model(path)


def _node(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.name == name)


def test_fp16_float_typed_attributes_and_inputs(tmp_path):
    model = odd_ops_model(tmp_path)
    # converted as it is: constant folding would turn the odd ops into initializers
    result = quantize(model, Fp16Config(exclude=("keep_me",), float_passes=False), data=None)
    converted = result.model
    check_types(converted)
    assert casts_agree(converted)
    float16, float32 = ir.DataType.FLOAT16, ir.DataType.FLOAT
    resize = _node(converted, "resize")
    assert (resize.inputs[0].dtype, resize.inputs[2].dtype) == (float16, float32)  # scales stay float32
    fill = _node(converted, "fill")
    assert fill.attributes.get_tensor("value").dtype == float16
    assert _node(converted, "cast_float").attributes.get_int("to") == float16
    assert _node(converted, "mul_k").inputs[1].dtype == float16  # Constant value_float converted
    assert _node(converted, "ln").outputs[1].dtype == float32  # Mean: float or bfloat16 only
    for name in ("cumsum", "range", "keep_me"):
        node = _node(converted, name)
        assert all(v.dtype != float16 for v in (*node.inputs, *node.outputs) if v is not None), name
    assert _node(converted, "keep_me").inputs[1].const_value.dtype == float32  # shared weight kept exact
    assert _node(converted, "conv_b").inputs[1].dtype == float16
    kept = {n.node_name: n.reason for n in result.float_nodes}
    assert kept["cumsum"] == FLOAT32_OPS["CumSum"]
    assert kept["keep_me"] == "excluded by config"
    assert "float16" in kept["range"]
    assert {v.name: v.dtype for v in converted.graph.outputs} == {"y": float32, "mean": float32}
    reference, outputs = run_both(model, converted)
    for key in ("y", "mean"):
        assert outputs[key].dtype == np.float32
        assert sqnr_db(reference[key], outputs[key]) >= FP16_MIN_SQNR_DB


def test_fp16_counts_flushed_weights(tmp_path):
    model = odd_ops_model(tmp_path)
    result = quantize(model, Fp16Config(), data=None)
    assert result.details["clamped_values"] == 0
    assert result.details["flushed_values"] == 4  # 1e-9 appears once in each group of four
    assert any(note.startswith("4 weight values of magnitude 2**-25 or less rounded to 0") for note in result.notes)


def test_fp16_keeps_the_nodes_of_weights_beyond_its_range_float32_and_exact(tmp_path, caplog):
    # clamped to 65504, a 1e5 weight gave 5 dB and a note; --exclude of its node gave exact results
    model = odd_ops_model(tmp_path, big_weight=1e5)
    data = [random_feed(eir.model_inputs(model), seed=seed) for seed in range(4)]
    result = quantize(model, Fp16Config(), data=data)
    weight = _node(result.model, "mul_w").inputs[1]
    assert weight.const_value.dtype == ir.DataType.FLOAT and weight.const_value.numpy().max() == np.float32(1e5)
    assert {n.node_name: n.reason for n in result.float_nodes}["mul_w"] == WEIGHT_REASON
    assert result.details["clamped_values"] == 0
    assert result.details["weights_beyond_float16"] == ["w_big"]
    assert any("mul_w; weights: w_big (max |x| 1e+05)" in note for note in result.notes)
    check_types(result.model)
    reference, outputs = run_both(model, result.model)
    assert sqnr_db(reference["y"], outputs["y"]) >= FP16_MIN_SQNR_DB
    assert np.isfinite(ReferenceEvaluator(ir.to_proto(result.model)).run(None, data[0])[0]).all()
    # without data the weight stays exact too, with a warning that what it computes was not checked
    with caplog.at_level("WARNING", logger="edgeopt"):
        unchecked = quantize(model, Fp16Config(), data=None)
    assert _node(unchecked.model, "mul_w").inputs[1].const_value.dtype == ir.DataType.FLOAT
    assert any("without --data their ranges are not checked" in record.message for record in caplog.records)


def test_fp16_types_every_output_of_a_variadic_op(tmp_path):
    """Split's outputs 1..n share output 0's type constraint: all float16, no Casts between them."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 24)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]),
         helper.make_node("Split", ["h"], ["a", "b", "c"], axis=1, num_outputs=3),
         helper.make_node("Mul", ["a", "b"], ["ab"]), helper.make_node("Add", ["ab", "c"], ["y"])],
        "split", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], initializer=[weight])
    path = tmp_path / "split.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    model = load_model(path)
    converted = quantize(model, Fp16Config(), data=None).model
    check_types(converted)
    split = next(node for node in converted.graph if node.op_type == "Split")
    assert [v.dtype for v in split.outputs] == [ir.DataType.FLOAT16] * 3
    assert sum(node.op_type == "Cast" for node in converted.graph) == 2  # the graph boundary only
    reference, outputs = run_both(model, converted)
    assert sqnr_db(reference["y"], outputs["y"]) >= FP16_MIN_SQNR_DB


# --------------------------------------------------------------------------
# bf16: weights stored in bfloat16, compute float32
# --------------------------------------------------------------------------


def test_bf16_notes_count_in_words():
    nodes = [helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("MatMul", ["m", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(np.ones((4, 3), np.float32), "w"),
                               numpy_helper.from_array(np.array(2.0, np.float32), "s")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    notes = quantize(model, Bf16Config(), data=None).notes
    assert "1 float32 constant stored as bfloat16, 48 -> 24 bytes" in notes
    assert "1 scalar constant left float32 (no size to win)" in notes


@pytest.mark.parametrize("name", ["mobilenet_v3", "transformer"])
def test_bf16_stores_weights_low_and_computes_float32(torch_models, name):
    model = load_model(torch_models[name])
    result = quantize(model, Bf16Config(), data=None)
    converted = result.model
    assert result.scheme == "bf16"
    assert any("weights stored in bf16, compute float32" in note for note in result.notes)
    stored = [v for v in converted.graph.initializers.values() if v.dtype == ir.DataType.BFLOAT16]
    assert len(stored) == result.details["weights_converted"] > 0
    for value in stored:  # each is read only by a Cast back to float32
        assert {(u.node.op_type, u.node.attributes.get_int("to")) for u in value.uses()} == {
            ("Cast", ir.DataType.FLOAT)}
    for node in converted.graph:
        assert all(v.dtype != ir.DataType.BFLOAT16 for v in node.outputs if node.op_type != "Constant")
    assert result.details["weight_bytes_after"] * 2 == result.details["weight_bytes_before"]
    assert len(model_to_bytes(converted)) / len(model_to_bytes(model)) < 0.65
    reference, outputs = run_both(model, converted)
    for key, value in reference.items():
        assert outputs[key].dtype == np.float32
        assert sqnr_db(value, outputs[key]) >= BF16_MIN_SQNR_DB
    check_types(converted)


def test_bf16_of_an_opset_11_model_is_converted_to_13_and_loads(tmp_path):
    # Cast from bfloat16 is not in opset 11: written as is, ONNX Runtime refuses the graph
    model = load_model(build_onnx("mobilenet_v3", tmp_path, 11))
    result = quantize(model, Bf16Config(), data=None)
    assert eir.default_opset(result.model) == 13
    assert any(note.startswith("converted opset 11 -> 13") and "float outputs match the original on 2 batches"
               in note for note in result.notes)
    reference, outputs = run_both(model, result.model)
    assert sqnr_db(reference["output"], outputs["output"]) >= BF16_MIN_SQNR_DB


def test_bf16_refuses_an_opset_conversion_that_changes_the_model():
    # onnx's converter turns an opset 9 linear Upsample into a Resize that samples otherwise: int8
    # refused such a model; bf16 wrote it (7 dB) and said nothing
    from edgeopt.errors import ModelError

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Upsample", ["c", "scales"], ["u"], mode="linear"),
             helper.make_node("Conv", ["u", "w2"], ["y"], kernel_shape=[3, 3], pads=[1] * 4)]
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("w1", (6, 3, 3, 3)), ("w2", (4, 6, 3, 3)))]
    weights.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    graph = helper.make_graph(nodes, "up", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])], weights)
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=4))
    with pytest.raises(ModelError, match=r"converting opset 9 -> 13 changed output 'y'"):
        quantize(model, Bf16Config(), data=None)


def test_bf16_keeps_float32_positions_and_excluded_weights(tmp_path):
    model = odd_ops_model(tmp_path)
    result = quantize(model, Bf16Config(exclude=("keep_me",)), data=None)
    converted = result.model
    assert _node(converted, "resize").inputs[2].const_value.dtype == ir.DataType.FLOAT  # scales
    assert _node(converted, "keep_me").inputs[1].const_value.dtype == ir.DataType.FLOAT  # shared, excluded
    assert "ln_scale" in {t.name for t in result.tensors}
    reference, outputs = run_both(model, converted)
    assert sqnr_db(reference["y"], outputs["y"]) >= BF16_MIN_SQNR_DB
    check_types(converted)


def test_bf16_opset_conversion_of_a_model_random_inputs_do_not_fit_is_written_unchecked():
    # token type ids, shifted by 3, index a 2-row table: random ids (0..7; those reaching a Gather through
    # Cast/Reshape.. are drawn below its rows, not these) make the model fail, so the conversion
    # cannot be checked without data; it is written, and says so (it crashed the command)
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Add", ["types", "shift"], ["shifted"]),
             helper.make_node("Gather", ["table", "shifted"], ["rows"], axis=0),
             helper.make_node("MatMul", ["rows", "w"], ["y"])]
    weights = [numpy_helper.from_array(rng.standard_normal((2, 16)).astype(np.float32), "table"),
               numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w"),
               numpy_helper.from_array(np.array(-3, np.int64), "shift")]
    graph = helper.make_graph(nodes, "types", [helper.make_tensor_value_info("types", TensorProto.INT64, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])], weights)
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)], ir_version=7))
    result = quantize(model, Bf16Config(), data=None)
    assert any("not checked: without --data" in note for note in result.notes)
    checked = quantize(model, Bf16Config(), data=[{"types": np.array([[3, 4, 4, 3]])}])
    assert any("float outputs match the original on 1 batch " in note for note in checked.notes)


# --------------------------------------------------------------------------
# fp16: activation ranges, types ONNX cannot infer, what stays float32
# --------------------------------------------------------------------------


def overflow_model() -> ir.Model:
    """x [1,16] -> MatMul -> Mul 20000 "scale_up" -> Relu -> Add itself "double" -> Mul 1/20000 -> MatMul -> y.

    Weights fit float16 easily; the scaled activations reach about 1.2e5 and 2.4e5, beyond its 65504.
    """
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal((16, 32)) * 0.3).astype(np.float32), "w1"),
               numpy_helper.from_array(np.array(20000.0, np.float32), "up"),
               numpy_helper.from_array(np.array(1 / 20000, np.float32), "down"),
               numpy_helper.from_array((rng.standard_normal((32, 16)) * 0.3).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
             helper.make_node("Mul", ["a", "up"], ["b"], name="scale_up"),
             helper.make_node("Relu", ["b"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "r"], ["r2"], name="double"),
             helper.make_node("Mul", ["r2", "down"], ["c"], name="scale_down"),
             helper.make_node("MatMul", ["c", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "overflow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], weights)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def overflow_data(count: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(count)]


def test_fp16_keeps_the_nodes_of_activations_beyond_half_its_range_float32():
    # was converted whole: ORT on x86 computes float16 ops in float32 and measured 70 dB, while the
    # ONNX reference (and any runtime computing in float16) gave NaN
    model, data = overflow_model(), overflow_data()
    result = quantize(model, Fp16Config(), data=data)
    kept = {n.node_name: n.reason for n in result.float_nodes}
    assert kept == dict.fromkeys(["scale_up", "relu", "double", "scale_down"], ACTIVATION_REASON)
    assert sorted(result.details["activations_beyond_limit"]) == ["b", "r", "r2"]
    assert any(note.startswith("3 values exceed ±32752") and "scale_up, relu, double, scale_down" in note
               for note in result.notes)
    for name in ("mm1", "mm2"):
        assert _node(result.model, name).inputs[1].dtype == ir.DataType.FLOAT16
    check_types(result.model)
    spec = ReferenceEvaluator(ir.to_proto(result.model))
    for feed in data:
        expected = OrtSession(model).run(feed)["y"]
        got = spec.run(None, feed)[0]
        assert np.isfinite(got).all()
        assert sqnr_db(expected, got) >= FP16_MIN_SQNR_DB


def test_fp16_reads_one_shot_data_once_and_says_when_ranges_went_unchecked():
    model = overflow_model()
    from_generator = quantize(model, Fp16Config(), data=(feed for feed in overflow_data()))
    assert len(from_generator.details["activations_beyond_limit"]) == 3
    assert any("on 8 calibration batches" in note for note in from_generator.notes)
    unchecked = quantize(model, Fp16Config(), data=None)
    assert not unchecked.float_nodes
    assert any(note.startswith("activation ranges not checked") and "--data" in note for note in unchecked.notes)
    within = quantize(model, Fp16Config(), data=[{"x": feed["x"] * 1e-3} for feed in overflow_data()])
    assert not within.float_nodes
    assert any("every value stays within ±32752" in note for note in within.notes)


def ms_domain_model() -> ir.Model:
    """x [2,32] -> com.microsoft FusedMatMul (w1) -> MatMul (w2) -> Relu -> y: ONNX shape inference types
    nothing after the FusedMatMul, as in models from ONNX Runtime's transformer optimizer."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32), "w1"),
               numpy_helper.from_array(rng.standard_normal((64, 16)).astype(np.float32), "w2")]
    nodes = [helper.make_node("FusedMatMul", ["x", "w1"], ["h"], name="fused", domain="com.microsoft", alpha=0.5),
             helper.make_node("MatMul", ["h", "w2"], ["m"], name="mm"),
             helper.make_node("Relu", ["m"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "ms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])], weights)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return ir.from_proto(helper.make_model(graph, opset_imports=opsets, ir_version=8))


def test_fp16_types_what_onnx_cannot_by_running_the_model_once():
    # every node after a com.microsoft op stayed float32 as "tensor types unknown"
    model = ms_domain_model()
    for data in (None, [random_feed(eir.model_inputs(model), seed=1)]):
        result = quantize(model, Fp16Config(), data=data)
        assert {n.node_name: n.reason for n in result.float_nodes} == {
            "fused": "op of domain 'com.microsoft': fp16 computes ONNX-domain ops only"}
        assert _node(result.model, "mm").inputs[1].dtype == ir.DataType.FLOAT16
        assert any("left 2 tensors untyped (ops of 'com.microsoft')" in note
                   and "typed by running the model once" in note for note in result.notes)
        reference, outputs = run_both(model, result.model)
        assert sqnr_db(reference["y"], outputs["y"]) >= FP16_MIN_SQNR_DB


def test_bf16_stores_every_weight_low_whatever_the_activation_types():
    # bf16 computes in float32: it kept float32 the weights of untyped nodes and of com.microsoft ops
    model = ms_domain_model()
    result = quantize(model, Bf16Config(), data=None)
    assert {t.name for t in result.tensors} == {"w1", "w2"}
    assert not result.float_nodes
    assert result.details["weight_bytes_after"] * 2 == result.details["weight_bytes_before"] == (32 * 64 + 64 * 16) * 4
    reference, outputs = run_both(model, result.model)
    assert sqnr_db(reference["y"], outputs["y"]) >= BF16_MIN_SQNR_DB


@pytest.mark.parametrize("config", [Fp16Config(exclude=("MatMul",)), Bf16Config(exclude=("MatMul",))])
def test_half_precision_warns_when_most_weight_bytes_stay_float32(config, caplog):
    with caplog.at_level("WARNING", logger="edgeopt"):
        quantize(overflow_model(), config, data=None)
    warnings = [r.message for r in caplog.records if r.levelname == "WARNING"]
    # fp16 converts the two scalars (8 bytes), bf16 leaves scalars alone
    assert any(" float32 weight bytes (0%)" in w and "mostly because: excluded by config (4096 bytes)" in w
               for w in warnings), warnings
    caplog.clear()
    with caplog.at_level("WARNING", logger="edgeopt"):
        quantize(overflow_model(), type(config)(), data=None)
    assert not [r for r in caplog.records if "converted only" in r.message]


@pytest.mark.parametrize("config", [Fp16Config(), Bf16Config()], ids=["fp16", "bf16"])
def test_a_tied_embedding_is_stored_once(tmp_path, config):
    # Gather(E, ids) and an LM head MatMul(h, Transpose(E)), as torch's dynamo writes a tied GPT: folding
    # the Transpose stored a second, transposed copy of E (0.58x instead of 0.5x of the float file)
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "E")
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"]),
             helper.make_node("Transpose", ["E"], ["E_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "E_t"], ["logits"])]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 8, 64])], [table])
    path = tmp_path / "tied.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    model = load_model(path)
    result = quantize(model, config)
    tables = [v for v in result.model.graph.initializers.values() if v.const_value is not None
              and v.const_value.size == 64 * 32]
    assert len(tables) == 1
    ids = {"ids": rng.integers(0, 64, (1, 8)).astype(np.int64)}
    expected = OrtSession(model).run(ids)["logits"]
    actual = OrtSession(result.model).run(ids)["logits"]
    assert np.allclose(actual, expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("config", [Fp16Config(), Bf16Config()], ids=["fp16", "bf16"])
def test_an_output_listed_twice_keeps_its_name_and_dtype_in_both_places(config):
    """The second place of an output listed twice was renamed 'y_float16' and kept float16."""
    rng = np.random.default_rng(2)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])] * 2,
        [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    outputs = quantize(model, config).model.graph.outputs
    assert [value.name for value in outputs] == ["y", "y"] and outputs[0] is outputs[1]
    assert outputs[0].dtype == ir.DataType.FLOAT


# --------------------------------------------------------------------------
# control flow: weights read inside If branches and Loop bodies
# --------------------------------------------------------------------------


def control_flow_model() -> ir.Model:
    """If(flag) whose branches read main-graph weights (then: x @ wa, else: x @ wb), as a merged decoder's
    layers do, then a Loop (2 trips) whose body reads its own weight wl."""
    rng = np.random.default_rng(7)
    wa, wb, wl = ((rng.standard_normal((32, 32)) * 0.2).astype(np.float32) for _ in range(3))
    value = helper.make_tensor_value_info
    branch = {name: helper.make_graph([helper.make_node("MatMul", ["x", weight], [f"{name}_y"], name=f"{name}_mm")],
                                      name, [], [value(f"{name}_y", TensorProto.FLOAT, [2, 32])])
              for name, weight in (("then", "wa"), ("else", "wb"))}
    body = tanh_loop_body(wl)
    nodes = [helper.make_node("If", ["flag"], ["h"], name="branch", then_branch=branch["then"],
                              else_branch=branch["else"]),
             helper.make_node("Loop", ["trips", "", "h"], ["y"], name="loop", body=body)]
    graph = helper.make_graph(nodes, "control_flow", [value("x", TensorProto.FLOAT, [2, 32]),
                                                      value("flag", TensorProto.BOOL, [])],
                              [value("y", TensorProto.FLOAT, [2, 32])],
                              [numpy_helper.from_array(wa, "wa"), numpy_helper.from_array(wb, "wb"),
                               numpy_helper.from_array(np.array(2, np.int64), "trips")])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_bf16_stores_the_weights_subgraphs_read_low_too():
    model = control_flow_model()
    result = quantize(model, Bf16Config(), data=None)
    assert {t.name for t in result.tensors} == {"wa", "wb", "wl"}
    assert result.details["weight_bytes_after"] * 2 == result.details["weight_bytes_before"] == 3 * 32 * 32 * 4
    check_types(result.model)
    for flag in (True, False):
        feed = {"x": np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32), "flag": np.array(flag)}
        assert sqnr_db(OrtSession(model).run(feed)["y"], OrtSession(result.model).run(feed)["y"]) >= BF16_MIN_SQNR_DB


def test_fp16_says_weights_read_inside_subgraphs_stay_float32_for_control_flow(caplog):
    with caplog.at_level("WARNING", logger="edgeopt"):
        result = quantize(control_flow_model(), Fp16Config(), data=None)
    assert {(node.node_name, node.reason) for node in result.float_nodes} == {
        ("branch", "control flow: its subgraphs are kept float32"),
        ("loop", "control flow: its subgraphs are kept float32")}
    warnings = [r.message for r in caplog.records if "converted only" in r.message]
    # it said "mostly because: no node reads them"
    assert warnings and "0 of 12288 float32 weight bytes" in warnings[0]
    assert "control flow: its subgraphs are kept float32 (12288 bytes)" in warnings[0], warnings


def test_a_weight_that_is_also_a_graph_output_is_named_as_why_it_stays_float32(caplog):
    # it said "mostly because: no node reads them", though a MatMul reads it
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64]),
                               helper.make_tensor_value_info("w", TensorProto.FLOAT, [64, 64])], [weight])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    for config in (Fp16Config(), Bf16Config()):
        caplog.clear()
        with caplog.at_level("WARNING", logger="edgeopt"):
            quantize(model, config, data=None)
        warnings = [r.message for r in caplog.records if "converted only" in r.message]
        assert warnings and "they are graph outputs themselves, which keep float32 (16384 bytes)" in warnings[0]


def test_bf16_exclude_names_a_node_inside_a_subgraph():
    result = quantize(control_flow_model(), Bf16Config(exclude=("else_mm",)), data=None)
    assert {t.name for t in result.tensors} == {"wa", "wl"}
    assert [(node.node_name, node.reason) for node in result.float_nodes] == [("else_mm", "excluded by config")]
    with pytest.raises(ConfigError, match="'else_mm' is neither a node name"):  # fp16 keeps subgraphs float32
        quantize(control_flow_model(), Fp16Config(exclude=("else_mm",)), data=None)


def test_fp16_checks_the_ranges_of_a_model_holding_a_tensor_sequence():
    """torch's dynamo exporter, unoptimized, writes ``x.chunk(2, 1)`` as SplitToSequence -> SequenceAt:
    the range check observed the sequence as a tensor (a Reshape of it), and ONNX Runtime refused the
    observing model. The tensors SequenceAt takes out are observed instead. Without the float passes,
    whose split-sequence pass would turn the sequence into a Split first."""
    nodes = [helper.make_node("Mul", ["x", "w"], ["scaled"], name="scale"),
             helper.make_node("SplitToSequence", ["scaled", "sizes"], ["parts"], name="chunk", axis=1),
             helper.make_node("SequenceAt", ["parts", "zero"], ["a"], name="first"),
             helper.make_node("SequenceAt", ["parts", "one"], ["b"], name="second"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    graph = helper.make_graph(
        nodes, "chunk", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3])],
        initializer=[numpy_helper.from_array(np.full((1, 4, 1), 2.0, np.float32), "w"),
                     numpy_helper.from_array(np.array([2, 2], np.int64), "sizes"),
                     numpy_helper.from_array(np.array(0, np.int64), "zero"),
                     numpy_helper.from_array(np.array(1, np.int64), "one")])
    model = load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    data = [random_feed(eir.model_inputs(model), seed=seed) for seed in range(4)]
    result = quantize(model, Fp16Config(float_passes=False), data=data)
    assert "SplitToSequence" in [node.op_type for node in result.model.graph]
    assert any(note.startswith("activation ranges checked on 4 calibration batches") for note in result.notes)
    reference, outputs = run_both(model, result.model)
    assert sqnr_db(reference["y"], outputs["y"]) >= FP16_MIN_SQNR_DB

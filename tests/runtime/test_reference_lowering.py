"""Lowering refuses what it cannot run, and the interpreter exposes every tensor."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import qdq_models as q
from edgeopt.errors import ConfigError, DataError, ModelError, UnsupportedOpError
from edgeopt.runtime.reference import OPS, ReferenceModel, lower


def _qdq_with_float_islands() -> onnx.ModelProto:
    b = q._Builder(9)
    x = b.node("Relu", [b.conv("input", 3, 4)])
    x = b.node("Erf", [x])
    x = b.node("Sin", [x])
    return b.model(b.conv(x, 4, 4, k=1), (1, 3, 8, 8))


def test_float_model_is_refused_with_advice():
    with pytest.raises(ModelError, match="edgeopt quantize"):
        lower(q.to_ir(q.float_model("conv_relu")))


def test_every_unsupported_op_is_listed_with_its_node_name():
    model = q.to_ir(q.quantize_with_ort(_qdq_with_float_islands()))
    with pytest.raises(UnsupportedOpError) as error:
        lower(model)
    assert "Erf (erf" in str(error.value) and "Sin (sin" in str(error.value)


def test_trace_has_every_op_output_in_stored_layout():
    model = q.to_ir(q.quantize_with_ort(q.float_model("concat_pools")))
    reference = ReferenceModel(model)
    trace = reference.trace(q.calibration_batches(q.float_model("concat_pools"), 1)[0])
    for op in reference.program.ops:
        assert trace[op.output].dtype == np.int8
        assert trace[op.output].shape == reference.program.tensors[op.output].shape


def test_int8_input_equals_quantized_float_input():
    float_model = q.float_model("residual_add")
    reference = ReferenceModel(q.to_ir(q.quantize_with_ort(float_model)))
    batch = q.calibration_batches(float_model, 1)[0]
    info = reference.program.tensors[reference.program.inputs[0].tensor]
    quantized = np.clip(np.rint(batch["input"] / np.float32(info.scale)) + info.zero_point, -128, 127)
    assert np.array_equal(reference.run(batch)["output"],
                          reference.run({"input": quantized.astype(np.int8)})["output"])


def test_bad_rounding_and_bad_input_shape_are_user_errors():
    model = q.to_ir(q.quantize_with_ort(q.float_model("conv_relu")))
    with pytest.raises(ConfigError):
        ReferenceModel(model, rounding="banker")
    with pytest.raises(DataError):
        ReferenceModel(model).run({"input": np.zeros((1, 3, 4, 4), np.float32)})


def test_every_program_op_kind_is_in_the_table():
    for name in q.FLOAT_BUILDERS:
        program = lower(q.to_ir(q.quantize_with_ort(q.float_model(name))))
        assert {op.kind for op in program.ops} <= set(OPS)
        for op in program.ops:
            assert isinstance(op.params, OPS[op.kind].params_type)


def test_a_constant_where_an_activation_goes_is_named_as_such():
    # MatMul(W, x), the constant first: edgeopt quantizes W like an activation operand, which the C kernels
    # do not take; the error called its dequantized copy 'a float value that is not quantized'
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from edgeopt.quant import Int8Config, Target, quantize

    weight = numpy_helper.from_array(np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["w", "x"], ["y"], name="left")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2])], [weight])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    data = [{"x": x} for x in np.random.default_rng(2).standard_normal((8, 8, 2)).astype(np.float32)]
    quantized = quantize(model, Int8Config(target=Target.MCU), data).model
    with pytest.raises(UnsupportedOpError, match=r"MatMul \(left\) reads the constant 'w_dequantized'.*swap"):
        lower(quantized)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_a_gelu_table_is_onnx_runtime_s_gelu_of_every_int8_input(approximate):
    # the table computed the exact GELU for Gelu(approximate="tanh") too: entries of a fine output scale
    # were one step off ONNX Runtime's
    from onnx import TensorProto, helper, numpy_helper

    from edgeopt.runtime.ort import OrtSession

    input_scale, output_scale = 0.04, 0.0004
    constants = [numpy_helper.from_array(np.array(s, np.float32), n) for n, s in (("si", input_scale),
                                                                                   ("so", output_scale))]
    constants.append(numpy_helper.from_array(np.array(0, np.int8), "zp"))
    nodes = [helper.make_node("QuantizeLinear", ["x", "si", "zp"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "si", "zp"], ["d"], name="d"),
             helper.make_node("Gelu", ["d"], ["g"], name="gelu", approximate=approximate),
             helper.make_node("QuantizeLinear", ["g", "so", "zp"], ["y"], name="q_out")]
    graph = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256])],
                              [helper.make_tensor_value_info("y", TensorProto.INT8, [256])], constants)
    model = q.to_ir(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    feed = {"x": np.arange(-128, 128, dtype=np.float32) * np.float32(input_scale)}
    expected = OrtSession(model, optimize=False).run(feed)["y"]
    np.testing.assert_array_equal(ReferenceModel(model).run(feed)["y"], expected)


def test_an_argmax_output_is_refused_with_what_to_do_instead():
    # a classifier exported with its argmax: the C has no index output, and the int8 scores order alike
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["scores"]),
             helper.make_node("ArgMax", ["scores"], ["output"], name="argmax", axis=1, keepdims=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 10])],
                              [helper.make_tensor_value_info("output", TensorProto.INT64, [1])],
                              [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
                               numpy_helper.from_array(np.array(0, np.int8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(UnsupportedOpError, match="ArgMax \\(argmax\\).*export the model without it and take the "
                                                 "index of the largest int8 output"):
        lower(q.to_ir(model))


def test_quantizing_for_the_mcu_warns_when_compile_would_still_refuse_the_model(tmp_path):
    # a classifier exported with its argmax: no node stays float (the ArgMax writes integers), so quantize said
    # nothing, and compile refused the model afterwards
    from onnx import TensorProto, helper, numpy_helper

    import edgeopt
    from edgeopt.quant import Int8Config, Target

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc"], ["scores"], name="fc", transB=1),
             helper.make_node("ArgMax", ["scores"], ["label"], name="argmax", axis=1, keepdims=0)]
    graph = helper.make_graph(nodes, "classifier",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, [1])],
                              [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w"),
                               numpy_helper.from_array(rng.normal(0, 0.3, (10, 8)).astype(np.float32), "fc")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "argmax.onnx")
    data = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    report = edgeopt.quantize(tmp_path / "argmax.onnx", Int8Config(target=Target.MCU), data,
                              output=tmp_path / "q.onnx", check_speed=False)
    assert report.result.float_nodes == ()
    assert any(w.startswith("edgeopt compile will refuse this model") and "ArgMax (argmax)" in w
               for w in report.warnings), report.warnings

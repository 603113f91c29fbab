"""Elementwise ops the microcontroller target quantizes beyond the common activations: tables and Sub.

Any elementwise op of one int8 input is a 256-entry table (Softplus, Mish, Softsign, Abs, Neg, Exp, Erf, Selu,
Celu, ThresholdedRelu, as Sigmoid or Tanh are); a Sub is TFLite's int8 Add with the second input's multiplier
negated, also when it folds into a conv before it (conv2d_add). Each between two convs (so both its sides are int8),
quantized with ``--target mcu``: no float node left, the integer reference within one step of ONNX Runtime on the
QDQ model, and the generated C bit-exact with the reference. The ort target keeps them float (ONNX Runtime has
no integer kernel for them).
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdq_models as q
from mcu_flow import assert_compiles_bit_exact, quantize_for_mcu
from edgeopt import api
from edgeopt.quant import Int8Config
from edgeopt.runtime.ort import OrtSession
from edgeopt.runtime.reference import ReferenceModel, lower

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None,
                               reason="needs gcc and make")
SHAPE = [1, 3, 6, 7]


def _save(path, middle: list, opset: int = 18) -> None:
    """conv_a(input) -> c, conv_b(input) -> d, ``middle`` (from c and d to "m"), conv_out(m) -> output."""
    rng = np.random.default_rng(0)
    weights = {"wa": rng.normal(0, 0.4, (4, 3, 3, 3)), "wb": rng.normal(0, 0.4, (4, 3, 3, 3)),
               "wo": rng.normal(0, 0.4, (2, 4, 1, 1)), "offset": rng.normal(0, 0.5, (1, 4, 1, 1))}
    nodes = [helper.make_node("Conv", ["input", "wa"], ["c"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["input", "wb"], ["d"], name="conv_b", pads=[1, 1, 1, 1]),
             *middle,
             helper.make_node("Conv", ["m", "wo"], ["output"], name="conv_out")]
    graph = helper.make_graph(
        nodes, "elementwise", [helper.make_tensor_value_info("input", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 2, 6, 7])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)


def _data(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input": rng.normal(0, 1, SHAPE).astype(np.float32)} for _ in range(count)]


UNARY = {"Softplus": {}, "Softsign": {}, "Mish": {}, "Abs": {}, "Neg": {}, "Exp": {}, "Erf": {}, "Selu": {},
         "Celu": {"alpha": 0.5}, "ThresholdedRelu": {"alpha": 0.3}}
SUBS = {  # and the op each lowers to
    "sub_of_two_tables": ([helper.make_node("Sigmoid", ["c"], ["sc"], name="sigmoid"),
                           helper.make_node("Tanh", ["d"], ["td"], name="tanh"),
                           helper.make_node("Sub", ["sc", "td"], ["m"], name="sub")], "add"),
    "sub_of_a_constant": ([helper.make_node("Sub", ["offset", "c"], ["m"], name="sub")], "add"),
    # a conv's output minus another's: the Sub folds into one of the convs (conv2d_add)
    "sub_of_two_convs": ([helper.make_node("Sub", ["c", "d"], ["m"], name="sub")], "conv2d_add"),
}


def _middle(name: str) -> list:
    if name in UNARY:
        return [helper.make_node(name, ["c"], ["m"], name=name.lower(), **UNARY[name])]
    return SUBS[name][0]


@pytest.fixture(scope="module", params=[*UNARY, *SUBS])
def quantized(request, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp(request.param)
    _save(tmp_path / "float.onnx", _middle(request.param))
    result, model = quantize_for_mcu(tmp_path / "float.onnx", _data(16, 0), tmp_path / "int8.onnx")
    assert result.float_nodes == (), result.float_nodes
    return request.param, tmp_path, model


def test_the_integer_op_is_within_a_step_of_onnx_runtime(quantized):
    name, _, model = quantized
    within, _, worst = q.agreement(ReferenceModel(model), OrtSession(model), _data(4, 3))
    assert within >= 0.99 and worst <= 2, (name, within, worst)
    kinds = [op.kind for op in lower(model).ops]
    assert ("lut" if name in UNARY else SUBS[name][1]) in kinds, kinds


@needs_gcc
def test_generated_c_is_bit_exact(quantized, tmp_path):
    _, _, model = quantized
    assert_compiles_bit_exact(model, tmp_path / "c", _data(2, 4))


@pytest.mark.parametrize("op", ["Mish", "Neg"])
def test_the_ort_target_keeps_them_float(tmp_path, op):
    _save(tmp_path / "float.onnx", _middle(op))
    result = api.quantize(tmp_path / "float.onnx", Int8Config(), _data(8, 0), output=tmp_path / "int8.onnx",
                          check_speed=False, check_fidelity=False).result
    assert op in [node.op_type for node in result.float_nodes]


def _lower_rank_add(path, out_rank: int) -> None:
    """Gemm [1, 16] + Squeeze(MatMul)[16] (tf2onnx's unrolled RNN cell), or, with ``out_rank`` 4, a conv's
    [1, 4, 6, 7] + the [4, 6, 7] Squeeze of another conv."""
    rng = np.random.default_rng(0)
    if out_rank == 2:
        nodes = [helper.make_node("Gemm", ["input", "w1", "b1"], ["a"], name="dense"),
                 helper.make_node("MatMul", ["input", "w2"], ["m"], name="recurrent"),
                 helper.make_node("Squeeze", ["m", "axes"], ["s"], name="squeeze"),
                 helper.make_node("Add", ["a", "s"], ["sum"], name="add"),
                 helper.make_node("Tanh", ["sum"], ["output"], name="tanh")]
        weights = {"w1": rng.normal(0, 0.4, (8, 16)), "b1": np.zeros(16), "w2": rng.normal(0, 0.4, (8, 16))}
        shapes = ([1, 8], [1, 16])
    else:
        nodes = [helper.make_node("Conv", ["input", "wa"], ["c"], name="conv_a", pads=[1, 1, 1, 1]),
                 helper.make_node("Conv", ["input", "wb"], ["d"], name="conv_b", pads=[1, 1, 1, 1]),
                 helper.make_node("Squeeze", ["d", "axes"], ["s"], name="squeeze"),
                 helper.make_node("Add", ["c", "s"], ["output"], name="add")]
        weights = {"wa": rng.normal(0, 0.4, (4, 3, 3, 3)), "wb": rng.normal(0, 0.4, (4, 3, 3, 3))}
        shapes = (SHAPE, [1, 4, 6, 7])
    graph = helper.make_graph(
        nodes, "lower_rank", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shapes[0])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, shapes[1])],
        initializer=[*(numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()),
                     numpy_helper.from_array(np.array([0], np.int64), "axes")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


@needs_gcc
def test_an_add_of_a_lower_rank_activation_compiles(tmp_path):
    """ONNX broadcasts [16] over [1, 16]: the lower-rank operand is a reshape (in place), then the Add."""
    _lower_rank_add(tmp_path / "float.onnx", 2)
    rng = np.random.default_rng(1)
    data = [{"input": rng.normal(0, 1, (1, 8)).astype(np.float32)} for _ in range(16)]
    _, model = quantize_for_mcu(tmp_path / "float.onnx", data, tmp_path / "int8.onnx")
    within, _, worst = q.agreement(ReferenceModel(model), OrtSession(model), data[:4])
    assert within >= 0.99 and worst <= 1, (within, worst)
    assert_compiles_bit_exact(model, tmp_path / "c", data[:2])


def test_a_lower_rank_activation_the_layout_would_reorder_is_refused_in_one_line(tmp_path):
    """[4, 6, 7] over NCHW [1, 4, 6, 7] is stored [1, 6, 7, 4] in the C: a reshape would read it out of order."""
    from edgeopt.errors import UnsupportedOpError

    _lower_rank_add(tmp_path / "float.onnx", 4)
    _, model = quantize_for_mcu(tmp_path / "float.onnx", _data(8, 0), tmp_path / "int8.onnx")
    with pytest.raises(UnsupportedOpError, match=r"add.*rank 3 over rank 4 would reorder") as error:
        lower(model)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("axes, keepdims", [([1], 0), ([1], 1), ([2], 1)])
def test_a_reduce_max_is_a_max_pool_over_rows(tmp_path, axes, keepdims):
    """tf2onnx writes Keras' GlobalMaxPooling1D as ReduceMax over the steps of [N, L, C]: a max pool over the
    [outer, reduce, 1, inner] view, at the input's scale, bit-exact."""
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.4, (6, 5)).astype(np.float32)
    out_shape = [1, 1, 5] if keepdims and axes == [1] else ([1, 5] if not keepdims else [1, 8, 1])
    nodes = [helper.make_node("MatMul", ["input", "w"], ["m"], name="dense"),
             helper.make_node("ReduceMax", ["m"], ["output"], name="max", axes=axes, keepdims=keepdims)]
    graph = helper.make_graph(nodes, "reduce_max", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                  [1, 8, 6])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
                              initializer=[numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "float.onnx")
    data = [{"input": rng.normal(0, 1, (1, 8, 6)).astype(np.float32)} for _ in range(16)]
    result, model = quantize_for_mcu(tmp_path / "float.onnx", data, tmp_path / "int8.onnx")
    assert result.float_nodes == ()
    assert "max_pool" in [op.kind for op in lower(model).ops]
    within, _, worst = q.agreement(ReferenceModel(model), OrtSession(model), data[:4])
    assert within >= 0.99 and worst <= 1, (within, worst)
    assert_compiles_bit_exact(model, tmp_path / "c", data[:2])


@needs_gcc
def test_a_rank_5_broadcast_add_compiles_bit_exact(tmp_path):
    # Swin's shifted-window mask: scores viewed [B, windows, heads, N, N] + mask [1, windows, 1, N, N]; the C
    # kernels broadcast over 4 axes, and this one stopped `edgeopt compile` with an internal error (exit 70)
    rng = np.random.default_rng(0)
    mask = numpy_helper.from_array(np.where(rng.random((1, 2, 1, 6, 7)) > 0.5, -1.0, 0.5).astype(np.float32), "mask")
    shape = numpy_helper.from_array(np.array([1, 2, 2, 6, 7], np.int64), "five")
    back = numpy_helper.from_array(np.array([1, 4, 6, 7], np.int64), "four")
    path = tmp_path / "float.onnx"
    _save(path, [helper.make_node("Reshape", ["c", "five"], ["c5"], name="split"),
                 helper.make_node("Add", ["c5", "mask"], ["m5"], name="masked"),
                 helper.make_node("Reshape", ["m5", "four"], ["m"], name="merge")])
    proto = onnx.load(path)
    proto.graph.initializer.extend([mask, shape, back])
    onnx.save(proto, path)
    result, model = quantize_for_mcu(path, _data(16, 0), tmp_path / "int8.onnx")
    assert result.float_nodes == (), result.float_nodes
    assert_compiles_bit_exact(model, tmp_path / "c", _data(2, 4))


def _quantized_for_mcu_exactly(tmp_path, nodes, constants: dict, output_shape, data, held_out):
    """Quantize ``nodes`` (``input`` [SHAPE] -> ``output``, float constants and int64 ones as given) for the
    microcontroller: every node int8, the integer reference within a step of ONNX Runtime on the QDQ model,
    and the C bit-exact with the reference."""
    graph = helper.make_graph(
        nodes, "model", [helper.make_tensor_value_info("input", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, output_shape)],
        initializer=[numpy_helper.from_array(v if v.dtype == np.int64 else v.astype(np.float32), k)
                     for k, v in constants.items()])
    path = tmp_path / "float.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    result, model = quantize_for_mcu(path, data, tmp_path / "int8.onnx")
    assert result.float_nodes == (), result.float_nodes
    within, _, worst = q.agreement(ReferenceModel(model), OrtSession(model), held_out)
    assert within >= 0.99 and worst <= 1, (within, worst)
    assert_compiles_bit_exact(model, tmp_path / "c", held_out[:2])


@needs_gcc
def test_a_model_normalizing_raw_pixels_in_its_graph_compiles_bit_exact(tmp_path):
    # (x / 255 - mean) / std before the first conv: the Divs stayed float (ONNX Runtime's placement), and
    # `edgeopt compile` refused the model for that one float node
    rng = np.random.default_rng(1)
    constants = {"full": np.array(255.0), "mean": np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1),
                 "std": np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1), "w1": rng.normal(0, 0.4, (4, 3, 3, 3)),
                 "w2": rng.normal(0, 0.4, (2, 4, 1, 1))}
    nodes = [helper.make_node("Div", ["input", "full"], ["unit"], name="to_unit"),
             helper.make_node("Sub", ["unit", "mean"], ["centered"], name="center"),
             helper.make_node("Div", ["centered", "std"], ["scaled"], name="scale"),
             helper.make_node("Conv", ["scaled", "w1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["output"], name="conv2")]
    pixels = [{"input": np.random.default_rng(seed).uniform(0, 255, SHAPE).astype(np.float32)} for seed in range(20)]
    _quantized_for_mcu_exactly(tmp_path, nodes, constants, [1, 2, 6, 7], pixels[:16], pixels[16:])


@needs_gcc
@pytest.mark.parametrize("mode", ["reflect", "edge"])
def test_a_reflect_or_edge_pad_runs_in_int8_on_the_microcontroller(mode, tmp_path):
    # a super-resolution or style-transfer net's ReflectionPad2d before its convs: it stayed float ("reflect Pad
    # has no integer kernel"), and `edgeopt compile` refused the model for that one float node
    rng = np.random.default_rng(2)
    constants = {"w1": rng.normal(0, 0.4, (4, 3, 3, 3)), "w2": rng.normal(0, 0.4, (2, 4, 3, 3)),
                 "pads": np.array([0, 0, 2, 1, 0, 0, 1, 2], np.int64)}
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Pad", ["r", "pads"], ["padded"], name="pad", mode=mode),
             helper.make_node("Conv", ["padded", "w2"], ["output"], name="conv2")]
    _quantized_for_mcu_exactly(tmp_path, nodes, constants, [1, 2, 7, 8], _data(16, 0), _data(4, 3))


@needs_gcc
@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean", "ReduceMax"])
def test_a_sum_over_branches_without_keepdims_runs_in_int8_on_the_microcontroller(op, tmp_path):
    # SKNet: two conv branches stacked [N, 2, C, H, W], summed over the branches without keepdims. ReduceSum had
    # no integer kernel, and a reduction whose kept axes are not the output's stored order was refused
    rng = np.random.default_rng(3)
    constants = {"wa": rng.normal(0, 0.4, (4, 3, 3, 3)), "wb": rng.normal(0, 0.4, (4, 3, 3, 3)),
                 "wo": rng.normal(0, 0.4, (2, 4, 1, 1)), "axis": np.array([1], np.int64)}
    reduce = (helper.make_node(op, ["stacked", "axis"], ["m"], name="sum", keepdims=0) if op == "ReduceSum"
              else helper.make_node(op, ["stacked"], ["m"], name="sum", axes=[1], keepdims=0))
    nodes = [helper.make_node("Conv", ["input", "wa"], ["c"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["input", "wb"], ["d"], name="conv_b", pads=[1, 1, 1, 1]),
             helper.make_node("Unsqueeze", ["c", "axis"], ["c5"], name="ua"),
             helper.make_node("Unsqueeze", ["d", "axis"], ["d5"], name="ub"),
             helper.make_node("Concat", ["c5", "d5"], ["stacked"], name="stack", axis=1), reduce,
             helper.make_node("Conv", ["m", "wo"], ["output"], name="conv_out")]
    _quantized_for_mcu_exactly(tmp_path, nodes, constants, [1, 2, 6, 7], _data(16, 0), _data(4, 3))


def test_a_bias_that_leaves_the_int32_accumulator_no_room_is_refused_naming_the_layer(tmp_path):
    # a bias near int32's limit (a layer of tiny weights, its bias clipped there): the C's int32 sum of bias and
    # products wrapped (signed overflow, undefined behaviour) where the reference's int64 sum saturated, and
    # verify found 737 values differing
    from edgeopt.codegen.c import compile_c
    from edgeopt.errors import CodegenError

    _save(tmp_path / "float.onnx", [helper.make_node("Relu", ["c"], ["m"], name="relu")])
    _, model = quantize_for_mcu(tmp_path / "float.onnx", _data(16, 0), tmp_path / "int8.onnx")
    proto = onnx.load(tmp_path / "int8.onnx")
    bias = next(init for init in proto.graph.initializer if init.data_type == TensorProto.INT32
                and any(node.op_type == "DequantizeLinear" and node.input[0] == init.name
                        and any(c.input[2:3] == [node.output[0]] and c.name == "conv_a" for c in proto.graph.node)
                        for node in proto.graph.node))
    bias.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(bias).shape, 2**31 - 1000, np.int32),
                                          bias.name))
    onnx.save(proto, tmp_path / "edge.onnx")
    with pytest.raises(CodegenError, match="conv_a: its int32 bias .* leaves no room in the C's int32 accumulator"):
        compile_c(api.load(tmp_path / "edge.onnx", require_static=False), tmp_path / "c")


@needs_gcc
def test_input_and_output_names_are_written_safely_into_c_comments(tmp_path):
    # an ONNX name holding "*/" ended model.h's comment (the rest became code: "#error x"), "/*" broke -Werror
    # (-Wcomment) and a backslash spliced the line: the generated code did not build
    weight = np.random.default_rng(4).normal(0, 0.4, (2, 3, 3, 3)).astype(np.float32)
    source, sink = "pixels */ #error x \\", "prob /* é \\"
    graph = helper.make_graph(
        [helper.make_node("Conv", [source, "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], [sink], name="relu")],
        "names", [helper.make_tensor_value_info(source, TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info(sink, TensorProto.FLOAT, [1, 2, 6, 7])], [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "float.onnx")
    feeds = [{source: feed["input"]} for feed in _data(18, 0)]
    _, model = quantize_for_mcu(tmp_path / "float.onnx", feeds[:16], tmp_path / "int8.onnx")
    assert_compiles_bit_exact(model, tmp_path / "c", feeds[16:])  # verify builds it with -Wall -Wextra -Werror

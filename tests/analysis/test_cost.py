"""MACs, FLOPs and parameters of hand-built models, checked against the written-out formulas."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeopt
from edgeopt.analysis import CostReport, analyze_cost
from edgeopt.io import load_model

FLOAT = TensorProto.FLOAT


def _info(name: str, shape, dtype=FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _weight(name: str, *shape: int, dtype=np.float32) -> onnx.TensorProto:
    array = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    return numpy_helper.from_array(array, name)


def _load(tmp_path, nodes, inputs, outputs, initializers=(), *, require_static=True):
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)  # a well-formed model
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return load_model(path, require_static=require_static)


def _assert_totals(report: CostReport) -> None:
    rows = report.nodes
    assert report.macs == sum(r.macs for r in rows)
    assert report.other_flops == sum(r.other_flops for r in rows)
    assert report.params == sum(r.params for r in rows)
    assert report.weight_bytes == sum(r.weight_bytes for r in rows)
    assert report.activation_bytes == sum(r.activation_bytes for r in rows)
    assert (report.param_bytes_fp32, report.param_bytes_fp16, report.param_bytes_int8) == (
        4 * report.params, 2 * report.params, report.params)
    assert report.flops == 2 * report.macs + report.other_flops


def _single(tmp_path, node, inputs, output, initializers=()) -> CostReport:
    report = analyze_cost(_load(tmp_path, [node], inputs, [output], initializers))
    _assert_totals(report)
    assert len(report.nodes) == 1
    return report


def test_package_exports_the_analysis_api():
    assert edgeopt.analysis.analyze_cost is analyze_cost


def test_conv_with_groups_dilation_stride_and_padding(tmp_path):
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", group=2, dilations=[2, 2],
                            strides=[2, 2], pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    report = _single(tmp_path, node, [_info("x", [1, 4, 11, 11])], _info("y", None),
                     [_weight("w", 8, 2, 3, 3), _weight("b", 8)])
    # H_out = floor((11 + 1 + 1 - (2 * (3 - 1) + 1)) / 2) + 1 = 5
    row = report.nodes[0]
    assert row.output_shapes == ((1, 8, 5, 5),)
    assert row.macs == 1 * 8 * 5 * 5 * (4 // 2) * 3 * 3
    assert row.other_flops == 1 * 8 * 5 * 5  # the bias add
    assert row.params == 8 * 2 * 3 * 3 + 8
    assert row.weight_bytes == 4 * row.params
    assert row.activation_bytes == 4 * 1 * 8 * 5 * 5
    assert (row.name, row.op_type, row.output_dtype) == ("conv", "Conv", "float32")


def test_depthwise_conv(tmp_path):
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=6, pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    report = _single(tmp_path, node, [_info("x", [1, 6, 8, 8])], _info("y", None), [_weight("w", 6, 1, 3, 3)])
    assert report.macs == 1 * 6 * 8 * 8 * (6 // 6) * 3 * 3
    assert report.other_flops == 0  # no bias
    assert report.params == 6 * 1 * 3 * 3


def test_conv1d_and_conv3d_use_every_spatial_dim(tmp_path):
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3, 3])
    report = _single(tmp_path, node, [_info("x", [2, 3, 5, 6, 7])], _info("y", None), [_weight("w", 4, 3, 3, 3, 3)])
    assert report.macs == 2 * 4 * (3 * 4 * 5) * 3 * (3 * 3 * 3)


def test_conv_transpose_with_stride_2_and_groups(tmp_path):
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], group=2, strides=[2, 2], kernel_shape=[3, 3])
    report = _single(tmp_path, node, [_info("x", [1, 4, 5, 5])], _info("y", None),
                     [_weight("w", 4, 2, 3, 3), _weight("b", 4)])
    # H_out = (5 - 1) * 2 + 3 = 11; C_out = 2 * groups = 4
    assert report.nodes[0].output_shapes == ((1, 4, 11, 11),)
    assert report.macs == 1 * 4 * 5 * 5 * (4 // 2) * 3 * 3
    assert report.other_flops == 1 * 4 * 11 * 11
    assert report.params == 4 * 2 * 3 * 3 + 4


def test_gemm_with_trans_b_and_bias(tmp_path):
    node = helper.make_node("Gemm", ["a", "w", "c"], ["y"], transB=1)
    report = _single(tmp_path, node, [_info("a", [3, 5])], _info("y", None), [_weight("w", 7, 5), _weight("c", 7)])
    assert report.macs == 3 * 7 * 5  # M * N * K
    assert report.other_flops == 3 * 7
    assert report.params == 7 * 5 + 7


def test_gemm_with_trans_a(tmp_path):
    node = helper.make_node("Gemm", ["a", "w"], ["y"], transA=1)
    report = _single(tmp_path, node, [_info("a", [5, 3])], _info("y", None), [_weight("w", 5, 7)])
    assert report.macs == 3 * 7 * 5


def test_batched_matmul_broadcasts_a_weight(tmp_path):
    node = helper.make_node("MatMul", ["a", "w"], ["y"])
    report = _single(tmp_path, node, [_info("a", [2, 3, 4, 5])], _info("y", None), [_weight("w", 5, 6)])
    assert report.nodes[0].output_shapes == ((2, 3, 4, 6),)
    assert report.macs == (2 * 3) * 4 * 6 * 5
    assert report.params == 5 * 6


def test_matmul_broadcasts_batch_dims_of_both_operands(tmp_path):
    node = helper.make_node("MatMul", ["a", "b"], ["y"])
    report = _single(tmp_path, node, [_info("a", [2, 1, 4, 5]), _info("b", [3, 5, 6])], _info("y", None))
    assert report.macs == (2 * 3) * 4 * 6 * 5
    assert report.params == 0


def test_matmul_with_a_vector_follows_numpy(tmp_path):
    node = helper.make_node("MatMul", ["v", "w"], ["y"])
    report = _single(tmp_path, node, [_info("v", [5])], _info("y", None), [_weight("w", 5, 6)])
    assert report.nodes[0].output_shapes == ((6,),)
    assert report.macs == 6 * 5


def test_other_flop_conventions(tmp_path):
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["p", "s", "t", "m", "v"], ["n"]),
        helper.make_node("GlobalAveragePool", ["n"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Softmax", ["f"], ["y"]),
    ]
    stats = [_weight(name, 4) for name in "stmv"]
    report = analyze_cost(_load(tmp_path, nodes, [_info("x", [1, 4, 8, 8])], [_info("y", None)], stats))
    _assert_totals(report)
    assert [r.other_flops for r in report.nodes] == [
        1 * 4 * 8 * 8,            # Relu: one per output element
        (1 * 4 * 4 * 4) * 2 * 2,  # MaxPool: output elements * kernel size
        2 * 1 * 4 * 4 * 4,        # BatchNormalization: scale and shift
        1 * 4 * 4 * 4,            # GlobalAveragePool: input elements
        0,                        # Flatten: data movement
        3 * 4,                    # Softmax: exp, sum, divide
    ]
    assert report.macs == 0
    assert report.params == 4 * 4


def test_weights_in_constant_nodes_are_counted_on_their_consumer(tmp_path):
    nodes = [
        helper.make_node("Constant", [], ["w"], value=_weight("w", 4, 3)),
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([2, 6], np.int64))),
        helper.make_node("Constant", [], ["two"], value_float=2.0),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Mul", ["h", "two"], ["m"]),
        helper.make_node("Reshape", ["m", "shape"], ["y"]),
    ]
    report = analyze_cost(_load(tmp_path, nodes, [_info("x", [4, 4])], [_info("y", None)]))
    _assert_totals(report)
    # Constant nodes are not rows; unnamed rows are named by their index in the graph.
    assert [r.name for r in report.nodes] == ["MatMul_3", "Mul_4", "Reshape_5"]
    assert [r.params for r in report.nodes] == [4 * 3, 0, 0]  # scalar and int64 shape are not weights
    assert report.macs == 4 * 3 * 4


def test_shared_weight_is_counted_once_on_its_first_consumer(tmp_path):
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="first"),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="second"),
    ]
    report = analyze_cost(_load(tmp_path, nodes, [_info("x", [2, 4])], [_info("y", None)], [_weight("w", 4, 4)]))
    _assert_totals(report)
    assert [(r.name, r.params) for r in report.nodes] == [("first", 16), ("second", 0)]
    assert report.macs == 2 * (2 * 4 * 4)


def test_float_constant_reshaped_before_use_counts_on_the_reshape(tmp_path):
    nodes = [
        helper.make_node("Reshape", ["w", "shape"], ["w2"], name="reshape"),
        helper.make_node("MatMul", ["x", "w2"], ["y"], name="matmul"),
    ]
    shape = numpy_helper.from_array(np.array([4, 3], np.int64), "shape")
    report = analyze_cost(_load(tmp_path, nodes, [_info("x", [2, 4])], [_info("y", None)],
                                [_weight("w", 12), shape]))
    _assert_totals(report)
    assert [(r.name, r.params) for r in report.nodes] == [("reshape", 12), ("matmul", 0)]


def test_quantized_weight_counts_but_its_scales_do_not(tmp_path):
    # the scales are no parameters of the network, but they are stored: 32 int8 weights and 8 float32 scales
    weight = numpy_helper.from_array(np.ones((8, 4), np.int8), "wq")
    scale = numpy_helper.from_array(np.full(8, 0.1, np.float32), "scale")
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "scale"], ["w"], axis=0, name="dq"),
        helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="gemm"),
    ]
    report = analyze_cost(_load(tmp_path, nodes, [_info("x", [1, 4])], [_info("y", None)], [weight, scale]))
    _assert_totals(report)
    assert [(r.name, r.params, r.weight_bytes) for r in report.nodes] == [("dq", 32, 32 + 8 * 4), ("gemm", 0, 0)]
    assert report.param_bytes_fp32 == 32 * 4
    assert report.macs == 1 * 8 * 4


@pytest.mark.parametrize("bits", [4, 8])
def test_matmul_nbits_counts_k_times_n_weights_not_its_packed_bytes(tmp_path, bits):
    # K = 40 in blocks of 32: B is [N, 2 blocks, 32 * bits / 8] bytes, K padded to 64
    k, n, block_size = 40, 6, 32
    packed = numpy_helper.from_array(np.zeros((n, 2, block_size * bits // 8), np.uint8), "b")
    scales = numpy_helper.from_array(np.ones(n * 2, np.float32), "scales")
    node = helper.make_node("MatMulNBits", ["x", "b", "scales"], ["y"], domain="com.microsoft", name="nbits",
                            K=k, N=n, bits=bits, block_size=block_size)
    graph = helper.make_graph([node], "nbits", [_info("x", [3, k])], [_info("y", [3, n])], [packed, scales])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    onnx.save(model, tmp_path / "nbits.onnx")
    report = analyze_cost(load_model(tmp_path / "nbits.onnx"))
    _assert_totals(report)
    # stored: the packed bytes and the 12 float32 block scales
    assert [(r.params, r.weight_bytes) for r in report.nodes] == [(k * n, n * 2 * block_size * bits // 8 + 12 * 4)]
    assert report.macs == 3 * n * k


def test_unknown_shapes_cost_zero_and_are_listed(tmp_path):
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    model = _load(tmp_path, nodes, [_info("x", ["N", 3, 4, 4])], [_info("y", None)], [_weight("w", 2, 3, 1, 1)],
                  require_static=False)
    report = analyze_cost(model)
    _assert_totals(report)
    assert report.unknown_nodes == ("conv", "relu")
    assert (report.macs, report.other_flops) == (0, 0)
    assert report.params == 2 * 3  # weights do not need activation shapes


def test_ops_without_a_rule_are_listed(tmp_path):
    node = helper.make_node("Einsum", ["a", "b"], ["y"], equation="ij,jk->ik")
    report = _single(tmp_path, node, [_info("a", [2, 3]), _info("b", [3, 4])], _info("y", None))
    assert report.uncounted_ops == ("Einsum",)
    assert report.unknown_nodes == ()


def test_nodes_inside_if_branches_are_not_counted(tmp_path):
    then_branch = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [], [_info("t", [2, 2])])
    else_branch = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [_info("e", [2, 2])])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch)
    report = _single(tmp_path, node, [_info("x", [2, 2]), _info("cond", [], TensorProto.BOOL)],
                     _info("y", [2, 2]))
    assert report.subgraph_nodes == 2
    assert (report.macs, report.other_flops) == (0, 0)


def test_weights_read_inside_a_scan_body_are_parameters_of_the_scan(tmp_path):
    # an RNN written as a Scan over outer-scope weights: inspect said 416 parameters for 1,952 in the file (the
    # body's x @ w and h @ u and its own bias were counted nowhere); each counts once, on the Scan's row
    body = helper.make_graph(
        [helper.make_node("MatMul", ["xt", "w"], ["a"]), helper.make_node("MatMul", ["h", "u"], ["b"]),
         helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Add", ["s", "bias"], ["c"]),
         helper.make_node("Tanh", ["c"], ["hn"]), helper.make_node("Identity", ["hn"], ["yt"])],
        "body", [_info("h", [1, 32]), _info("xt", [1, 16])], [_info("hn", [1, 32]), _info("yt", [1, 32])],
        initializer=[_weight("bias", 1, 32)])
    nodes = [helper.make_node("Scan", ["h0", "x"], ["last", "ys"], name="scan", num_scan_inputs=1, body=body),
             helper.make_node("MatMul", ["last", "w_out"], ["y"], name="head")]
    report = analyze_cost(_load(tmp_path, nodes, [_info("x", [6, 1, 16]), _info("h0", [1, 32])], [_info("y", [1, 4])],
                                [_weight("w", 16, 32), _weight("u", 32, 32), _weight("w_out", 32, 4)]))
    _assert_totals(report)
    assert {row.name: row.params for row in report.nodes} == {"scan": 16 * 32 + 32 * 32 + 32, "head": 32 * 4}
    assert report.subgraph_nodes == 6 and report.macs == 32 * 4


def test_an_onnx_runtime_qoperator_model_costs_what_its_float_model_does(tmp_path):
    # ONNX Runtime's QOperator format (quant_format=QOperator): its QGemm, QLinearAdd and QLinearGlobalAveragePool
    # had no rule (0 MACs, listed uncounted) and the QGemm's int32 bias was no parameter
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "x8"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1)]
    _load(tmp_path, nodes, [_info("x", [1, 3, 4, 4]), _info("x8", [1, 8, 4, 4])], [_info("y", [1, 10])],
          [_weight("w", 8, 3, 3, 3), _weight("b", 8), _weight("wf", 10, 8), _weight("bf", 10)])

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.feeds = iter([{"x": rng.standard_normal((1, 3, 4, 4)).astype(np.float32),
                                "x8": rng.standard_normal((1, 8, 4, 4)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(tmp_path / "model.onnx"), str(tmp_path / "qop.onnx"), Reader(),
                    quant_format=QuantFormat.QOperator)
    quantized = edgeopt.inspect(tmp_path / "qop.onnx").cost  # (shapes past the contrib ops: from a typing run)
    assert {"QGemm", "QLinearAdd", "QLinearGlobalAveragePool"} <= {row.op_type for row in quantized.nodes}
    assert quantized.uncounted_ops == () and quantized.unknown_nodes == ()
    expected = edgeopt.inspect(tmp_path / "model.onnx").cost
    assert (quantized.macs, quantized.params) == (expected.macs, expected.params)


def test_a_dynamic_quantize_lstm_costs_what_its_float_lstm_does(tmp_path):
    # ONNX Runtime's DynamicQuantizeLSTM (edgeopt's int8-dynamic writes it) had no rule (0 MACs, listed
    # uncounted), and its per-gate-row scales and zero points counted as parameters
    from edgeopt import DynamicInt8Config
    from edgeopt.quant import quantize

    nodes = [helper.make_node("LSTM", ["x", "w", "r", "b"], ["y"], hidden_size=8, direction="bidirectional")]
    expected = analyze_cost(_load(tmp_path, nodes, [_info("x", [5, 2, 4])], [_info("y", [5, 2, 2, 8])],
                                  [_weight("w", 2, 32, 4), _weight("r", 2, 32, 8), _weight("b", 2, 64)]))
    model = quantize(load_model(tmp_path / "model.onnx"), DynamicInt8Config(), data=None).model
    quantized = analyze_cost(model)
    assert [row.op_type for row in quantized.nodes] == ["DynamicQuantizeLSTM"] and quantized.uncounted_ops == ()
    assert (quantized.macs, quantized.other_flops, quantized.params) == (
        expected.macs, expected.other_flops, expected.params)


def test_real_mobilenet_macs_match_torch_module_formula(tmp_path):
    torch = pytest.importorskip("torch")
    from tests import models

    module, example = models.build_torch("mobilenet_v2")
    expected_macs = 0

    def count(layer, _inputs, output):
        nonlocal expected_macs
        if isinstance(layer, torch.nn.Conv2d):
            expected_macs += output.numel() * (layer.in_channels // layer.groups) * int(np.prod(layer.kernel_size))
        elif isinstance(layer, torch.nn.Linear):
            expected_macs += output.numel() * layer.in_features

    for layer in module.modules():
        layer.register_forward_hook(count)
    with torch.no_grad():
        module(example)
    report = analyze_cost(load_model(models.build_onnx("mobilenet_v2", tmp_path)))
    _assert_totals(report)
    assert report.macs == expected_macs
    assert report.unknown_nodes == () and report.uncounted_ops == ()
    running_stats = sum(b.numel() for name, b in module.named_buffers()
                        if name.endswith(("running_mean", "running_var")))
    assert report.params == sum(p.numel() for p in module.parameters()) + running_stats


@pytest.mark.parametrize(("dtype", "bits"), [(TensorProto.UINT8, 4), (TensorProto.UINT8, 8), (TensorProto.UINT4, 4)],
                         ids=["uint8-4-bit", "uint8-8-bit", "uint4"])
def test_gather_block_quantized_counts_its_table_s_values_however_stored(tmp_path, dtype, bits):
    # edgeopt packs the codes in uint8 bytes (8 / bits a byte); ONNX Runtime's quantizer writes a UINT4 tensor of
    # the table's own shape, one element a value
    rows, d, block_size = 10, 64, 32
    shape = [rows, d * bits // 8] if dtype == TensorProto.UINT8 else [rows, d]
    table = helper.make_tensor("table", dtype, shape, np.zeros(int(np.prod(shape)), np.uint8).tolist())
    scales = numpy_helper.from_array(np.ones((rows, d // block_size), np.float32), "scales")
    node = helper.make_node("GatherBlockQuantized", ["table", "ids", "scales"], ["y"], domain="com.microsoft",
                            name="embed", gather_axis=0, quantize_axis=1, block_size=block_size, bits=bits)
    graph = helper.make_graph([node], "gbq", [_info("ids", [3], TensorProto.INT64)], [_info("y", [3, d])],
                              [table, scales])
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), tmp_path / "gbq.onnx")
    report = analyze_cost(load_model(tmp_path / "gbq.onnx"))
    _assert_totals(report)
    # stored: the codes and the float32 block scales
    assert [(r.params, r.weight_bytes) for r in report.nodes] == [(rows * d, rows * d * bits // 8 + rows * 2 * 4)]


def test_a_fused_attention_reading_a_past_attends_over_the_past_keys_too(tmp_path):
    batch, tokens, width, heads, past = 2, 8, 32, 4, 3
    weight = numpy_helper.from_array(np.zeros((width, 3 * width), np.float32), "w")
    bias = numpy_helper.from_array(np.zeros(3 * width, np.float32), "b")
    costs = []
    for with_past in (False, True):
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, tokens, width])]
        if with_past:
            inputs.append(helper.make_tensor_value_info("past", TensorProto.FLOAT,
                                                        [2, batch, heads, past, width // heads]))
        node = helper.make_node("Attention", ["x", "w", "b", "", "past"] if with_past else ["x", "w", "b"],
                                ["y", "present"] if with_past else ["y"], domain="com.microsoft", num_heads=heads)
        graph = helper.make_graph([node], "attention", inputs,
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, tokens, width])],
                                  initializer=[weight, bias])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        onnx.save(model, tmp_path / "attention.onnx")
        costs.append(analyze_cost(load_model(tmp_path / "attention.onnx")).macs)
    projection = batch * tokens * width * 3 * width
    assert costs == [projection + batch * tokens * tokens * 2 * width,
                     projection + batch * tokens * (tokens + past) * 2 * width]


def test_a_free_batch_counts_as_one_sample_when_asked(tmp_path):
    """A model exported with a dynamic batch has an unknown cost, or its cost per sample; a free dim
    elsewhere stays unknown either way."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("MatMul", ["y", "m"], ["z"], name="matmul")]
    model = _load(tmp_path, nodes, [_info("x", ["N", 3, 8, 8])], [_info("z", ["N", 4, 8, 5])],
                  [_weight("w", 4, 3, 3, 3), _weight("m", 8, 5)], require_static=False)
    assert analyze_cost(model).unknown_nodes == ("conv", "matmul")
    per_sample = analyze_cost(model, free_batch_as_one=True)
    assert per_sample.unknown_nodes == ()
    assert [row.macs for row in per_sample.nodes] == [4 * 64 * 27, 4 * 8 * 5 * 8]
    assert per_sample.nodes[0].output_shapes == ((1, 4, 8, 8),)
    free_width = _load(tmp_path, nodes[:1], [_info("x", [1, 3, 8, "W"])], [_info("y", [1, 4, 8, "W"])],
                       [_weight("w", 4, 3, 3, 3)], require_static=False)
    assert analyze_cost(free_width, free_batch_as_one=True).unknown_nodes == ("conv",)

"""--fallback fp16: the nodes an int8 model keeps float compute in float16, the int8 part untouched."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import edgeopt
from edgeopt.errors import ConfigError
from edgeopt.quant.accuracy import AccuracyGoal, accuracy_aware_quantize
from edgeopt.quant.compare import compare_models
from edgeopt.quant.config import Fallback, Int8Config
from edgeopt.quant.fallback import IN_FLOAT16, KEPT_FLOAT32
from edgeopt.quant.int8 import quantize_int8
from edgeopt.quant.speed_evidence import float_islands
from tests.conftest import assert_one_line_error
from tests.quant.int8_models import GraphBuilder, batches, ort_op_counts, sqnr_db

_SHAPE = (1, 3, 8, 8)


def _net(offset: float | None = None) -> ir.Model:
    """conv1 -> Relu -> conv2 -> Relu -> pool -> Gemm; with ``offset``, it is added to conv2's output and
    taken off again before the pool (values beyond float16's range in between)."""
    g = GraphBuilder(seed=5)
    x = g.node("Relu", [g.conv("x", 3, 16, "conv1")], "relu1")
    x = g.node("Relu", [g.conv(x, 16, 16, "conv2")], "relu2")
    if offset is not None:
        x = g.node("Sub", [g.node("Add", [x, g.constant("offset", offset)], "shift"), g.constant("back", offset)],
                   "unshift")
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x], "pool")], "flat")
    logits = g.node("Gemm", [x, g.weight("fc.weight", (10, 16)), g.weight("fc.bias", (10,), 0.1)], "fc", transB=1)
    return g.model([logits], _SHAPE)


def _node(model: ir.Model, name: str) -> ir.Node:
    return next(node for node in model.graph if node.name == name)


def test_an_excluded_gemm_computes_in_float16_and_the_int8_part_keeps_its_kernels():
    data = batches(_SHAPE, 16)
    as_float = quantize_int8(_net(), Int8Config(exclude=("fc",)), data)
    as_half = quantize_int8(_net(), Int8Config(exclude=("fc",), fallback="fp16"), data)
    fc = _node(as_half.model, "fc")
    assert fc.inputs[1].dtype == ir.DataType.FLOAT16 and fc.outputs[0].dtype == ir.DataType.FLOAT16
    assert _node(as_float.model, "fc").inputs[1].dtype == ir.DataType.FLOAT
    # the model still takes and returns float32, and ONNX Runtime still runs the convs' integer kernels
    assert [v.dtype for v in (*as_half.model.graph.inputs, *as_half.model.graph.outputs)] == [ir.DataType.FLOAT] * 2
    assert ort_op_counts(as_half.model)["QLinearConv"] == ort_op_counts(as_float.model)["QLinearConv"] == 2
    reasons = {entry.node_name: entry.reason for entry in as_half.float_nodes}
    assert reasons["fc"] == f"excluded (--exclude); {IN_FLOAT16}"
    assert any(note.startswith("--fallback fp16: ") for note in as_half.notes)
    # float16 rounds fc's weights and values: at most a little fidelity lost against the float fallback
    half, full = sqnr_db(_net(), as_half.model, data), sqnr_db(_net(), as_float.model, data)
    assert half > full - 1.0, (half, full)


def test_a_float_node_whose_values_float16_cannot_hold_stays_float32_and_says_why():
    data = batches(_SHAPE, 8)
    result = quantize_int8(_net(offset=1e5), Int8Config(exclude=("shift", "unshift"), fallback="fp16"), data)
    reasons = {entry.node_name: entry.reason for entry in result.float_nodes}
    assert f"; {KEPT_FLOAT32}: " in reasons["shift"] and f"; {KEPT_FLOAT32}: " in reasons["unshift"], reasons
    assert _node(result.model, "shift").outputs[0].dtype == ir.DataType.FLOAT
    assert np.isfinite(sqnr_db(_net(offset=1e5), result.model, data))


def test_the_accuracy_search_returns_model_nodes_and_they_compute_in_float16():
    # an unreachable goal: the search returns node after node until none reads an int8 value; the nodes
    # are the float model's (never a Cast the fallback made, which reads one), each computing in float16
    search = accuracy_aware_quantize(_net(), Int8Config(fallback="fp16"), batches(_SHAPE, 8),
                                     AccuracyGoal(min_sqnr_db=200.0))
    names = {node.name for node in _net().graph}
    assert search.best_excluded and set(search.best_excluded) <= names
    reasons = {entry.node_name: entry.reason for entry in search.result.float_nodes}
    assert all(reasons[name].endswith(IN_FLOAT16) for name in search.best_excluded), reasons


def test_the_search_returns_the_int8_nodes_behind_a_float16_node_as_it_does_with_a_float32_one():
    # conv2 excluded and computing in float16 reads conv1's output through a Cast: conv1, the pool and fc
    # must still be candidates (a node reading Cast(DQ(x)) reads x quantized)
    returned = {}
    for fallback in ("float", "fp16"):
        search = accuracy_aware_quantize(_net(), Int8Config(exclude=("conv2",), fallback=fallback),
                                         batches(_SHAPE, 8), AccuracyGoal(min_sqnr_db=200.0))
        returned[fallback] = set(search.best_excluded)
    assert returned["fp16"] == returned["float"] == {"conv1", "pool", "fc"}, returned


def test_compare_matches_a_quantized_tensor_a_float16_node_writes():
    # relu2 computes in float16 and is quantized for the pool through a Cast to float32 (another name)
    data = batches(_SHAPE, 4)
    rows = {}
    for fallback in ("float", "fp16"):
        result = quantize_int8(_net(), Int8Config(exclude=("conv2",), fallback=fallback), data)
        comparison = compare_models(_net(), result.model, data)
        assert comparison.unmatched == ()
        rows[fallback] = {row.tensor: row.lost_db is not None for row in comparison.layers}
    assert rows["fp16"] == rows["float"] and rows["fp16"]["relu2"] and rows["fp16"]["pool"], rows


def test_a_node_reading_a_float16_cast_twice_is_one_float_island():
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["dq"], name="dq"),
             helper.make_node("Cast", ["dq"], ["half"], name="to_half", to=TensorProto.FLOAT16),
             helper.make_node("Mul", ["half", "half"], ["square"], name="square"),
             helper.make_node("Cast", ["square"], ["y"], name="to_float", to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                              initializer=[numpy_helper.from_array(np.array(0.1, np.float32), "scale"),
                                           numpy_helper.from_array(np.array(128, np.uint8), "zero")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [island.op_type for island in float_islands(model)] == ["Mul (float16)"]


def test_the_speed_check_names_the_ops_computing_in_float16():
    result = quantize_int8(_net(), Int8Config(exclude=("fc",), fallback="fp16"), batches(_SHAPE, 8))
    # fc reads the pool in float, so the pool computes in float16 too: the first op behind the Cast
    assert "GlobalAveragePool (float16)" in {island.op_type for island in float_islands(result.model)}


def test_a_float_matmul_the_float16_crash_workaround_rewrites_still_computes_in_float16():
    # MatMul(Transpose(h, perm=[1, 0, 2]), W) in float16 crashes ONNX Runtime 1.32: the conversion computes
    # the MatMul before the Transpose, a new node of the same name, which the fallback still converts
    rng = np.random.default_rng(0)
    g = GraphBuilder()
    h = g.node("MatMul", ["x", g.weight("w0", (16, 16))], "mm0")
    y = g.node("MatMul", [g.node("Transpose", [h], "tr", perm=[1, 0, 2]), g.weight("w1", (16, 16))], "mm1")
    data = [{"x": rng.standard_normal((2, 4, 16)).astype(np.float32)} for _ in range(8)]
    result = quantize_int8(g.model([y], (2, 4, 16)), Int8Config(exclude=("mm1",), fallback="fp16"), data)
    reasons = {entry.node_name: entry.reason for entry in result.float_nodes}
    assert reasons == {"mm1": f"excluded (--exclude); {IN_FLOAT16}"}
    assert _node(result.model, "mm1").inputs[1].dtype == ir.DataType.FLOAT16


def test_a_model_wholly_in_int8_says_the_fallback_had_nothing_to_convert():
    result = quantize_int8(_net(), Int8Config(fallback="fp16"), batches(_SHAPE, 8))
    assert result.float_nodes == () and "--fallback fp16: every node runs in int8" in " ".join(result.notes)
    assert not any(node.op_type == "Cast" for node in result.model.graph)


def test_fallback_is_checked_and_spelled_as_on_the_command_line():
    assert Int8Config(fallback="fp16").fallback is Fallback.FP16 and Int8Config().fallback is Fallback.FLOAT
    with pytest.raises(ConfigError, match="fallback must be one of"):
        Int8Config(fallback="bf16")


def test_a_one_shot_iterator_is_refused_as_the_fallback_reads_the_data_again(tmp_path):
    path = tmp_path / "net.onnx"
    ir.save(_net(), path)
    with pytest.raises(ConfigError, match="--fallback fp16 reads the calibration data more than once"):
        edgeopt.quantize(path, Int8Config(fallback="fp16"), iter(batches(_SHAPE, 4)), output=tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()


def test_the_cli_refuses_fallback_with_a_scheme_it_does_not_apply_to(cli, tmp_path):
    path = tmp_path / "net.onnx"
    ir.save(_net(), path)
    result = cli("quantize", path, "-o", tmp_path / "q.onnx", "--scheme", "fp16", "--fallback", "fp16")
    assert_one_line_error(result, "--fallback fp16 applies to --scheme int8 and uint8 only, not fp16")

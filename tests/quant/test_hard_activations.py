"""HardSwish and HardSigmoid run in integer on ONNX Runtime: written as QLinearAdd (+ QLinearMul), with the
clamps done by the quantization's saturation (edgeopt.quant.hard_activations)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.quant import Int8Config, Target, quantize
from edgeopt.quant.formats import INT8, UINT8
from edgeopt.quant.hard_activations import lower_hard_activations
from edgeopt.runtime.ort import OrtSession
from edgeopt.runtime.reference import ReferenceModel
from tests.models import build_onnx

from .int8_models import GraphBuilder, batches, ort_op_counts, sqnr_db

SWEEP = np.linspace(-9.0, 9.0, 2001, dtype=np.float32)


def _qdq_op(op_type: str, fmt, in_range: tuple[float, float], out_range: tuple[float, float], arity: int = 1,
            **attributes):
    """x -> Q -> DQ -> op -> Q -> DQ -> y, each Q over its range in ``fmt`` (the shape edgeopt's placement writes)."""
    dtype, levels = fmt.numpy_dtype, fmt.qmax - fmt.qmin

    def params(name: str, low: float, high: float) -> list:
        scale = (high - low) / levels
        zero = int(np.clip(round(fmt.qmin - low / scale), fmt.qmin, fmt.qmax))
        return [numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
                numpy_helper.from_array(np.array(zero, dtype), f"{name}_z")]

    constants = params("in", *in_range) + params("out", *out_range)
    nodes = [helper.make_node("QuantizeLinear", ["x", "in_s", "in_z"], ["xq"], name="x_q"),
             helper.make_node("DequantizeLinear", ["xq", "in_s", "in_z"], ["xd"], name="x_dq"),
             helper.make_node(op_type, ["xd"] * arity, ["a"], name="act", **attributes),
             helper.make_node("QuantizeLinear", ["a", "out_s", "out_z"], ["aq"], name="a_q"),
             helper.make_node("DequantizeLinear", ["aq", "out_s", "out_z"], ["y"], name="a_dq")]
    graph = helper.make_graph(nodes, "hard", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [len(SWEEP)])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [len(SWEEP)])], constants)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _run(model: ir.Model) -> np.ndarray:
    return OrtSession(model).run({"x": SWEEP})["y"]


def test_a_hardswish_is_x_times_a_gate_clamped_by_its_quantization(fmt=UINT8):
    model = _qdq_op("HardSwish", fmt, (-8.0, 8.0), (-0.375, 8.0))
    expected = _run(model)
    parts, kept = lower_hard_activations(model, fmt)
    assert set(parts.values()) == {"act"} and len(parts) == 5 and kept == []  # offset DQ, Add, gate Q/DQ, Mul
    assert "HardSwish" not in [node.op_type for node in model.graph]
    got = _run(model)
    step = 8.375 / 255
    # the gate is rounded to 1/255: at most |x| / 510 more than the output's own rounding
    assert np.max(np.abs(got - expected)) <= step + 3.0 / 510 + 1e-6
    assert np.mean(got == expected) > 0.8
    # the clamps are exact: 0 below x = -3, x itself above 3 (as the float op, to the output's rounding)
    np.testing.assert_array_equal(got[SWEEP < -3.1], expected[SWEEP < -3.1])
    np.testing.assert_array_equal(got[SWEEP > 3.1], expected[SWEEP > 3.1])


def test_onnx_runtime_runs_the_lowered_hardswish_as_qlinearadd_and_qlinearmul():
    model = _qdq_op("HardSwish", UINT8, (-8.0, 8.0), (-0.375, 8.0))
    before = ort_op_counts(model)
    assert before["HardSigmoid"] + before["HardSwish"] == 1  # float between its pairs
    lower_hard_activations(model, UINT8)
    after = ort_op_counts(model)
    assert after["QLinearAdd"] == after["QLinearMul"] == 1
    assert after["HardSigmoid"] == after["HardSwish"] == after["Mul"] == after["Add"] == 0
    assert after["QuantizeLinear"] == after["DequantizeLinear"] == 1  # the model's own input and output


@pytest.mark.parametrize("beta", [0.5, -0.5])
def test_a_hardsigmoid_under_a_unit_range_becomes_an_add_rounding_as_before(beta, fmt=UINT8):
    model = _qdq_op("HardSigmoid", fmt, (-8.0, 8.0), (0.0, 0.9), alpha=0.2, beta=beta)
    expected = _run(model)
    parts, kept = lower_hard_activations(model, fmt)
    assert parts == {"hardsigmoid_offset_DequantizeLinear": "act", "act": "act"} and kept == []
    assert [node.op_type for node in model.graph].count("Add") == 1
    got = _run(model)
    assert np.max(np.abs(got - expected)) <= 0.9 / 255 + 1e-6  # float32's order of operations, at a tie
    assert np.mean(got == expected) > 0.99
    assert ort_op_counts(model)["QLinearAdd"] == 1


def test_a_hardsigmoid_quantized_past_one_stays_as_it_is():
    # its Q's top (2.0) is not the clamp's (1.0): saturating there would not clamp
    model = _qdq_op("HardSigmoid", UINT8, (-8.0, 8.0), (0.0, 2.0), alpha=0.2, beta=0.5)
    done, kept = lower_hard_activations(model, UINT8)
    assert done == {} and [(f.node_name, f.op_type) for f in kept] == [("act", "HardSigmoid")]
    assert "not inside the clamp's [0, 1]" in kept[0].reason
    assert "HardSigmoid" in [node.op_type for node in model.graph]


def test_a_hardswish_of_an_input_narrower_than_its_gate_stays_float_and_says_why():
    # +-0.25 (a MobileNetV3 head's): the gate's 6/255 step is 12 of the input's; the product lost 1.3 dB
    model = _qdq_op("HardSwish", UINT8, (-0.25, 0.25), (-0.125, 0.25))
    done, kept = lower_hard_activations(model, UINT8)
    assert done == {} and "spans 0.5 (< 6)" in kept[0].reason
    assert "HardSwish" in [node.op_type for node in model.graph]
    # already listed float (excluded): not listed twice
    assert lower_hard_activations(model, UINT8, frozenset({"act"})) == ({}, [])


def test_a_hardswish_placement_reported_float_is_not_rewritten_whatever_surrounds_it():
    # placed as an op without a kernel (its calibrated input under 6 wide) but between its neighbours' pairs of
    # a wider shared scale: rewritten, it ran in integer while the report called it float
    model = _qdq_op("HardSwish", UINT8, (-8.0, 8.0), (-0.375, 8.0))
    assert lower_hard_activations(model, UINT8, frozenset({"act"})) == ({}, [])
    assert "HardSwish" in [node.op_type for node in model.graph]


def test_int8_activations_keep_them_float_as_onnx_runtime_fuses_no_int8_qlinearadd():
    model = _qdq_op("HardSwish", INT8, (-8.0, 8.0), (-0.375, 8.0))
    assert ort_op_counts(_qdq_op("Add", INT8, (-8.0, 8.0), (-8.0, 8.0), 2))["QLinearAdd"] == 0  # (why)
    done, kept = lower_hard_activations(model, INT8)
    assert done == {} and "of int8 activations" in kept[0].reason


def test_a_hardswish_read_in_float_too_is_left_alone():
    model = _qdq_op("HardSwish", UINT8, (-8.0, 8.0), (-0.375, 8.0))
    act = next(node for node in model.graph if node.op_type == "HardSwish")
    model.graph.outputs.append(act.outputs[0])  # a float reader: ONNX Runtime would not fuse the Mul
    done, kept = lower_hard_activations(model, UINT8)
    assert done == {} and "read in float too" in kept[0].reason


def _conv_hardswish_conv() -> ir.Model:
    b = GraphBuilder(seed=21)
    b.conv(b.node("HardSwish", [b.conv("x", 4, 8, "c1")], "hswish"), 8, 4, "y")
    return b.model(["y"], (1, 4, 10, 10))


def test_the_ort_target_lowers_and_the_mcu_target_keeps_its_own_kernel():
    model = _conv_hardswish_conv()
    data = batches((1, 4, 10, 10), 16)
    ort = quantize(model, Int8Config(), data)
    assert ort.float_nodes == ()
    assert "HardSwish" not in [node.op_type for node in ort.model.graph]
    # compare and the accuracy search find the tensor by its float name
    assert "hswish" in [value.name for node in ort.model.graph for value in node.outputs]
    mcu = quantize(model, Int8Config(target=Target.MCU), data)
    assert "HardSwish" in [node.op_type for node in mcu.model.graph]
    held_out = batches((1, 4, 10, 10), 8, seed=1)
    assert sqnr_db(model, ort.model, held_out) >= sqnr_db(model, mcu.model, held_out) - 1.0


def test_the_integer_reference_reads_the_gate_at_its_own_scale():
    # the gate's Q -> DQ pair has two scales; the reference (and the C) took every DQ at its Q's scale
    model = _conv_hardswish_conv()
    data = batches((1, 4, 10, 10), 16)
    quantized = quantize(model, Int8Config(), data).model
    feed = batches((1, 4, 10, 10), 1, seed=2)[0]
    expected = OrtSession(quantized).run(feed)["y"]
    got = ReferenceModel(quantized).run_float(feed)["y"]
    step = float(np.ptp(expected)) / 255
    assert np.max(np.abs(got - expected)) <= 2 * step


def test_mobilenet_v3_runs_its_hardswish_in_integer_on_onnx_runtime_and_keeps_its_fidelity(tmp_path):
    # (untrained, on N(0, 1) inputs: 6 of its 8 HardSwish read inputs spanning 0.5 to 1.6 and stay float)
    from edgeopt.io import load_model

    model = load_model(build_onnx("mobilenet_v3", tmp_path, 17))
    hardswish = sum(node.op_type == "HardSwish" for node in model.graph)
    data = [{"input": x} for x in np.random.default_rng(0).standard_normal((16, 1, 3, 32, 32)).astype(np.float32)]
    lowered = quantize(model, Int8Config(), data)
    float_gates = quantize(model, Int8Config(exclude=("HardSwish",)), data)
    kept = [f for f in lowered.float_nodes if f.op_type == "HardSwish"]
    assert [f for f in lowered.float_nodes if f not in kept] == []
    assert all("(< 6), finer than an 8-bit gate" in f.reason for f in kept) and 0 < len(kept) < hardswish
    counts = ort_op_counts(lowered.model)
    assert counts["HardSigmoid"] == len(kept) and counts["QLinearMul"] == 3 + hardswish - len(kept)  # 3 SE, gates
    held_out = [{"input": x} for x in np.random.default_rng(1).standard_normal((8, 1, 3, 32, 32)).astype(np.float32)]
    assert sqnr_db(model, lowered.model, held_out) >= sqnr_db(model, float_gates.model, held_out) - 0.5


def test_a_narrow_hardswish_is_placed_as_an_op_without_kernel():
    # decided on the calibrated range, before the Q/DQ pairs are placed: placed as before edgeopt wrote HardSwish in
    # integer, a float op between its neighbours' pairs. Placed as quantized and left float after, it counted as a
    # quantized node in the accuracy search: on benchmarks/accuracy_search.py's mobilenet_v3, 59 rounds and 3 float
    # nodes where it takes 8 and 2
    from edgeopt.quant.ops import OP_RULES
    from edgeopt.quant.placement import plan_qdq

    b = GraphBuilder(seed=22)
    hidden = b.node("HardSwish", [b.node("Gemm", ["x", b.weight("fc1.weight", (32, 16), 0.02)], "fc1", transB=1)],
                    "hswish")
    b.node("Gemm", [hidden, b.weight("fc2.weight", (10, 32))], "y", transB=1)
    model = b.model(["y"], (1, 16))
    result = quantize(model, Int8Config(), batches((1, 16), 16))
    assert [(f.node_name, f.op_type) for f in result.float_nodes] == [("hswish", "HardSwish")]
    assert "spans 0.576 (< 6), finer than an 8-bit gate" in result.float_nodes[0].reason
    without_rule = {op: rule for op, rule in OP_RULES.items() if op != "HardSwish"}
    narrow, before, lowered = (plan_qdq(model, no_kernel={"hswish": "narrow"}), plan_qdq(model, rules=without_rule),
                               plan_qdq(model))
    assert (narrow.nodes, narrow.activations) == (before.nodes, before.activations)
    assert [f.reason for f in narrow.float_nodes] == ["narrow"] and "hswish" in lowered.nodes


def test_a_hardsigmoid_without_offset_is_placed_as_an_op_without_kernel():
    # beta 0: no Add to clamp with (a Q -> DQ requantization ONNX Runtime would run in float)
    b = GraphBuilder(seed=23)  # (after an Add: after a Gemm or a Conv it would fold into it as a clamp)
    total = b.node("Add", [b.node("Gemm", ["x", b.weight("fc1.weight", (32, 16))], "fc1", transB=1),
                           b.node("Gemm", ["x", b.weight("fc1b.weight", (32, 16))], "fc1b", transB=1)], "sum")
    gate = b.node("HardSigmoid", [total], "gate", alpha=0.2, beta=0.0)
    b.node("Gemm", [gate, b.weight("fc2.weight", (10, 32))], "y", transB=1)
    result = quantize(b.model(["y"], (1, 16)), Int8Config(), batches((1, 16), 16))
    assert [(f.node_name, f.op_type) for f in result.float_nodes] == [("gate", "HardSigmoid")]
    assert "writes none with alpha 0.2, beta 0" in result.float_nodes[0].reason
    assert "gate" not in result.details["plan"].nodes


def test_compare_shows_a_lowered_hardsigmoid_at_the_scale_its_dequantizelinear_reads():
    # its Q quantizes x + beta / alpha at the output's scale / alpha; the tensor is stored and read at the output's
    # scale (the DQ's): compare showed 0.0196 (1/255 / 0.2) for a HardSigmoid held over [0, 1] at 1/255
    import edgeopt

    b = GraphBuilder(seed=5)
    total = b.node("Add", [b.conv("x", 3, 8, "c1"), b.conv("x", 3, 8, "c2")], "add")
    b.conv(b.node("HardSigmoid", [total], "hsig", alpha=0.2, beta=0.5), 8, 4, "y")
    model = b.model(["y"], (1, 3, 8, 8))
    data = [{"x": 3 * batch["x"]} for batch in batches((1, 3, 8, 8), 8)]
    result = quantize(model, Int8Config(), data)
    assert result.details["rewritten_parts"]["hsig"] == "hsig"
    stored = next(t for t in result.tensors if t.name == "hsig")
    row = next(row for row in edgeopt.compare(model, result.model, data).layers if row.tensor == "hsig")
    assert (row.op_type, row.zero_point) == ("HardSigmoid", 0)
    assert row.scale == pytest.approx(stored.scale[0]) == pytest.approx(1 / 255)

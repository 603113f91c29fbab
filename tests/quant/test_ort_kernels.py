"""What edgeopt says runs in integer is what ONNX Runtime runs in integer: placement checked against the graph
ORT optimizes (its QDQ fusions), for the activations exporters write out and the ops whose attributes decide."""

from __future__ import annotations

import pytest

from edgeopt.io import load_model
from edgeopt.quant import Int8Config, Target, quantize
from edgeopt.runtime.ort import optimized_model
from tests.models import export_onnx, gelu_new_mlp, se_gated_convs, tanh_gelu_mlp

from .int8_models import GraphBuilder, batches, ort_op_counts, sqnr_db

IMAGE = (1, 8, 12, 12)


def _tanh_gelu_model(tmp_path, opset: int):
    import torch

    path = export_onnx(tanh_gelu_mlp(), (torch.zeros(2, 5, 16),), tmp_path / f"mlp{opset}.onnx", opset=opset)
    return load_model(path)


def test_a_written_out_tanh_gelu_is_one_float_group_on_onnx_runtime(tmp_path):
    # its Mul and Add ran as six QLinearMul and two QLinearAdd around a float Tanh, rounding between each step
    model = _tanh_gelu_model(tmp_path, 17)
    data = batches((2, 5, 16), 8, name="input")
    result = quantize(model, Int8Config(), data)
    reasons = {f.op_type + ": " + f.reason for f in result.float_nodes}
    # every op of the group is told so, the Tanh too (it said 'no integer kernel for Tanh' beside its Mul and Add)
    assert reasons == {f"{op}: part of a spelled-out gelu_tanh (kept as one float op)" for op in ("Mul", "Add", "Tanh")}
    assert len(result.float_nodes) == 9
    counts = ort_op_counts(result.model)
    assert counts["QGemm"] == 2 and counts["QLinearMul"] == counts["QLinearAdd"] == 0
    assert sqnr_db(model, result.model, batches((2, 5, 16), 8, seed=1, name="input")) >= 30.0


@pytest.mark.parametrize("opset", [17, 20])
def test_a_tanh_gelu_is_int8_on_the_mcu(tmp_path, opset):
    # op by op below opset 20 (a float group would not compile), one Gelu lookup table from 20 (it stayed float)
    model = _tanh_gelu_model(tmp_path, opset)
    result = quantize(model, Int8Config(target=Target.MCU), batches((2, 5, 16), 8, name="input"))
    assert result.float_nodes == ()
    gelus = [n for n in result.model.graph if n.op_type == "Gelu"]
    assert [n.attributes.get_string("approximate") for n in gelus] == (["tanh"] if opset >= 20 else [])


def _resize_between_convs(mode: str, coordinate_mode: str):
    b = GraphBuilder(seed=3)
    relu = b.node("Relu", [b.conv("x", 8, 8, "c1")], "relu")
    scales = b.constant("scales", [1, 1, 2, 2])
    up = b.node("Resize", [relu, "", scales], "up", mode=mode, coordinate_transformation_mode=coordinate_mode)
    b.conv(up, 8, 4, "y")
    return b.model(["y"], IMAGE)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("coordinate_mode", ["asymmetric", "half_pixel", "align_corners", "pytorch_half_pixel"])
def test_a_resize_is_listed_float_exactly_when_onnx_runtime_interpolates_it_in_float(mode, coordinate_mode):
    # a linear Resize was planned as an int8 copy; ONNX Runtime 1.32 runs it in float between a DQ and a Q
    model = _resize_between_convs(mode, coordinate_mode)
    result = quantize(model, Int8Config(), batches(IMAGE, 4))
    [resize] = [n for n in optimized_model(result.model).graph if n.op_type == "Resize"]
    runs_in_float = resize.inputs[0].producer().op_type == "DequantizeLinear"
    assert runs_in_float == (mode == "linear")
    listed = {f.node_name: f.reason for f in result.float_nodes}
    assert ("up" in listed) == runs_in_float
    if runs_in_float:
        assert listed["up"].startswith("ONNX Runtime interpolates a linear Resize in float")
    assert ort_op_counts(result.model)["QLinearConv"] == 2


def test_a_linear_resize_is_still_int8_on_the_mcu():
    result = quantize(_resize_between_convs("linear", "half_pixel"), Int8Config(target=Target.MCU), batches(IMAGE, 4))
    assert result.float_nodes == ()


@pytest.mark.parametrize("opset", [14, 17])
def test_a_hardsigmoid_se_gate_runs_in_its_conv(tmp_path, opset):
    # nn.Hardsigmoid after the SE block's expanding conv ran in float between a DQ and a Q on ONNX Runtime
    # (no integer HardSigmoid); folded into the conv as a [0, 1] clamp it is one QLinearConv
    import torch

    model = load_model(export_onnx(se_gated_convs(), (torch.zeros(1, 3, 12, 12),), tmp_path / "se.onnx", opset=opset))
    assert "HardSigmoid" in [n.op_type for n in model.graph]
    calibration, test = batches((1, 3, 12, 12), 8, name="input"), batches((1, 3, 12, 12), 8, seed=1, name="input")
    results = {target: quantize(model, Int8Config(target=target), calibration) for target in Target}
    for result in results.values():
        assert result.float_nodes == ()
        assert "HardSigmoid" not in [n.op_type for n in result.model.graph]
        assert sqnr_db(model, result.model, test) >= 33.0
    counts = ort_op_counts(results[Target.ORT].model)
    assert counts["HardSigmoid"] == 0 and counts["QLinearConv"] == 4 and counts["QLinearMul"] == 1


@pytest.mark.parametrize("opset", [17, 20])
def test_a_tanh_gelu_cubed_by_pow_runs_in_int8_on_the_mcu(tmp_path, opset):
    # below opset 20 the Pow, which has no int8 kernel (it was the one float node), is written x * x * x
    import torch

    model = load_model(export_onnx(gelu_new_mlp(), (torch.zeros(2, 5, 16),), tmp_path / "mlp.onnx", opset=opset))
    result = quantize(model, Int8Config(target=Target.MCU), batches((2, 5, 16), 8, name="input"))
    assert [(f.op_type, f.reason) for f in result.float_nodes] == []
    assert "Pow" not in {node.op_type for node in result.model.graph}

"""The MCU target quantizes PRelu, DepthToSpace, SpaceToDepth and a linear Resize (the C has integer kernels for
them); the ORT target keeps them float. Data movement shares its input's scale; what the kernels cannot compute
stays float with the reason."""

from __future__ import annotations

import onnx_ir as ir

from edgeopt.quant import Int8Config, Target, quantize

from .int8_models import GraphBuilder, batches

SHAPE = (1, 8, 8, 8)


def _upsampling_head(*, slope_is_constant: bool = True, antialias: int = 0, resize_scale: float = 0.5) -> ir.Model:
    """Conv -> PRelu -> Conv -> DepthToSpace (CRD) -> linear Resize -> SpaceToDepth -> Conv."""
    b = GraphBuilder(seed=21, opset=18)
    conv = b.conv("x", 8, 8, "c1")
    slope = b.weight("slope", (8, 1, 1), 0.2) if slope_is_constant else b.node("Sigmoid", [conv], "gate")
    x = b.conv(b.node("PRelu", [conv, slope], "prelu"), 8, 8, "c2")
    x = b.node("DepthToSpace", [x], "to_space", blocksize=2, mode="CRD")
    x = b.node("Resize", [x, "", b.constant("scales", [1, 1, resize_scale, resize_scale])], "resize", mode="linear",
               antialias=antialias)
    b.conv(b.node("SpaceToDepth", [x], "to_depth", blocksize=2), 8, 4, "y")
    return b.model(["y"], SHAPE)


def _scale_names(model: ir.Model, tensors) -> set[str]:
    quantizers = {node.inputs[0].name: node for node in model.graph if node.op_type == "QuantizeLinear"}
    return {quantizers[tensor].inputs[1].name for tensor in tensors}


def test_the_mcu_target_quantizes_them_and_the_moves_share_one_scale():
    mcu = quantize(_upsampling_head(), Int8Config(target=Target.MCU), batches(SHAPE, 4))
    assert mcu.float_nodes == ()
    assert len(_scale_names(mcu.model, ["c2", "to_space", "resize", "to_depth"])) == 1
    assert _scale_names(mcu.model, ["prelu"]) != _scale_names(mcu.model, ["c1"])
    ort = quantize(_upsampling_head(), Int8Config(), batches(SHAPE, 4))
    assert {"prelu", "to_space", "resize", "to_depth"} <= {node.node_name for node in ort.float_nodes}


def test_a_prelu_slope_computed_at_run_time_and_an_antialiased_shrink_stay_float():
    model = _upsampling_head(slope_is_constant=False, antialias=1)
    result = quantize(model, Int8Config(target=Target.MCU), batches(SHAPE, 4))
    reasons = {node.node_name: node.reason for node in result.float_nodes}
    assert reasons["prelu"] == "its slope is not a constant"
    assert reasons["resize"] == "a linear Resize with antialias=1 that shrinks has no integer kernel"


def test_an_antialiased_linear_resize_that_enlarges_is_quantized():
    # antialias stretches the filter only when shrinking: upsampling interpolates two neighbours all the same
    model = _upsampling_head(antialias=1, resize_scale=2.0)
    assert quantize(model, Int8Config(target=Target.MCU), batches(SHAPE, 4)).float_nodes == ()

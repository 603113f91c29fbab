"""Q/DQ placement of LayerNorm and the spelled-out erf GELU: around them for the mcu target (whose C computes
each as one int8 op), float for the ort target as before (ONNX Runtime has no integer kernel for either)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from edgeopt.quant.api import quantize
from edgeopt.quant.config import Int8Config
from tests.passes._helpers import make_model
from tests.runtime.layer_norm_models import constant, layer_norm_op, spelled_gelu, spelled_layer_norm


def _standalone(body, initializers, shape, opset):
    """The body alone, reading the graph input and writing the graph output (no neighbour quantized)."""
    for node in body:
        node.input[:] = ["x" if name == "xd" else name for name in node.input]
    return make_model(body, [("x", shape)], [("y", shape)], initializers, opset=opset)


def _quantize(model, target: str):
    data = [{"x": np.random.default_rng(i).standard_normal(model.graph.inputs[0].shape.numpy()).astype(np.float32)}
            for i in range(4)]
    return quantize(model, Int8Config(target=target), data)


def _quantized_values(model) -> set[str]:
    return {node.inputs[0].name for node in model.graph if node.op_type == "QuantizeLinear"}


@pytest.mark.parametrize("name, body, opset", [
    ("op", layer_norm_op(np.linspace(0.5, 1.5, 8), np.zeros(8)), 17),
    ("layer_norm", spelled_layer_norm([-1], np.linspace(0.5, 1.5, 8), np.zeros(8)), 13),
    ("gelu", spelled_gelu("half_x_first"), 13),
])
def test_the_mcu_target_quantizes_the_input_and_output_only(name, body, opset):
    mcu = _quantize(_standalone(*body, (2, 8), opset), "mcu")
    assert mcu.float_nodes == ()
    assert _quantized_values(mcu.model) == {"x", "y_float"}  # the output Q reads the renamed float output
    ort = _quantize(_standalone(*body, (2, 8), opset), "ort")
    assert "QuantizeLinear" not in {node.op_type for node in ort.model.graph}
    reasons = {f.reason for f in ort.float_nodes}
    assert reasons == ({"no integer kernel for LayerNormalization"} if name == "op"
                       else {f"part of a spelled-out {name} (kept as one float op)"})


def test_gamma_and_beta_stay_float_constants_read_by_the_lowering():
    mcu = _quantize(_standalone(*layer_norm_op(np.linspace(-1, 1, 8), np.full(8, 0.5)), (2, 8), 17), "mcu")
    norm = next(node for node in mcu.model.graph if node.op_type == "LayerNormalization")
    assert norm.inputs[1].const_value is not None and norm.inputs[2].const_value is not None


def test_a_gelu_group_between_gemms_has_no_pair_inside():
    rng = np.random.default_rng(0)
    gelu, constants = spelled_gelu("half_last")
    for node in gelu:
        node.input[:] = ["h" if name == "xd" else name for name in node.input]
        node.output[:] = ["g" if name == "y" else name for name in node.output]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]), *gelu, helper.make_node("Gemm", ["g", "w2"], ["y"])]
    weights = [constant("w1", rng.normal(0, 0.3, (8, 16))), constant("b1", np.zeros(16)),
               constant("w2", rng.normal(0, 0.3, (16, 8)))]
    mcu = _quantize(make_model(nodes, [("x", (2, 8))], [("y", (2, 8))], [*constants, *weights], opset=13), "mcu")
    assert _quantized_values(mcu.model) == {"x", "h", "g", "y_float"}


def test_excluding_one_step_of_a_group_keeps_the_whole_group_float():
    # half a group in int8 would put a Q/DQ pair between its steps, which no kernel reads
    model = _standalone(*spelled_gelu("half_x_first"), (2, 8), 13)
    data = [{"x": np.random.default_rng(i).standard_normal((2, 8)).astype(np.float32)} for i in range(4)]
    result = quantize(model, Int8Config(target="mcu", exclude=("Erf",)), data)
    reasons = {f.op_type: f.reason for f in result.float_nodes}
    assert set(reasons) == {"Div", "Erf", "Add", "Mul"} and reasons["Erf"].startswith("excluded")
    assert reasons["Div"].startswith("part of a spelled-out gelu whose Erf")
    assert _quantized_values(result.model) <= {"x", "y_float"}


def test_a_layer_norm_read_by_a_gelu_has_a_pair_between_the_two_groups():
    """Two spelled-out groups back to back are two int8 ops: the LayerNorm's output is quantized (it was
    left float, inside neither group, and compile refused it as a float island)."""
    norm, norm_constants = spelled_layer_norm([-1], np.linspace(0.5, 1.5, 8), np.zeros(8))
    gelu, gelu_constants = spelled_gelu("half_last")
    for node in norm:
        node.input[:] = ["x" if name == "xd" else name for name in node.input]
        node.output[:] = ["n_out" if name == "y" else name for name in node.output]
    for node in gelu:
        node.input[:] = ["n_out" if name == "xd" else name for name in node.input]
    model = make_model([*norm, *gelu], [("x", (2, 8))], [("y", (2, 8))], [*norm_constants, *gelu_constants],
                       opset=13)
    mcu = _quantize(model, "mcu")
    assert mcu.float_nodes == ()
    assert _quantized_values(mcu.model) == {"x", "n_out", "y_float"}

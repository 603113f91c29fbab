"""RMSNorm spelled out (Llama's and T5's ``x * rsqrt(mean(x^2) + eps) * w``) is annotated ``rms_norm``: one
float group for the quantizer, and a normalization reading the residual stream."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from edgeopt.passes import PATTERN_KEY, fuse_activations
from edgeopt.quant.api import quantize
from edgeopt.quant.config import Int8Config
from edgeopt.quant.residual_stream import RESIDUAL_STREAM

from ._helpers import assert_same_outputs, make_model, random_weight, weight

WIDTH = 8
SHAPE = (1, 4, WIDTH)


def _rms_norm(square: str = "Pow", divide: str = "Div1", gain: str | None = "after", x: str = "x"):
    """Nodes computing ``n`` from ``x``: ``square`` Pow or Mul; ``divide`` Div1 (x * Div(1, r)), Reciprocal
    (x * Reciprocal(r)) or Div (Div(x, r)); ``gain`` "after" (Mul by w last), "before" (T5: w * x first) or None."""
    squared = (helper.make_node("Pow", [x, "two"], ["sq"]) if square == "Pow"
               else helper.make_node("Mul", [x, x], ["sq"]))
    nodes = [squared,
             helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["mse"]),
             helper.make_node("Sqrt", ["mse"], ["r"])]
    scaled = x
    if gain == "before":
        nodes.append(helper.make_node("Mul", ["w", x], ["wx"]))
        scaled = "wx"
    normalized = "n" if gain != "after" else "xr"
    if divide == "Div":
        nodes.append(helper.make_node("Div", [scaled, "r"], [normalized]))
    else:
        nodes.append(helper.make_node("Div", ["one", "r"], ["inv"]) if divide == "Div1"
                     else helper.make_node("Reciprocal", ["r"], ["inv"]))
        nodes.append(helper.make_node("Mul", [scaled, "inv"], [normalized]))
    if gain == "after":
        nodes.append(helper.make_node("Mul", ["xr", "w"], ["n"]))
    constants = [weight("two", 2.0), weight("eps", 1e-6), weight("one", 1.0),
                 weight("w", np.linspace(0.5, 1.5, WIDTH))]
    return nodes, constants


@pytest.mark.parametrize("square, divide, gain", [
    ("Pow", "Div1", "after"), ("Mul", "Reciprocal", "after"), ("Pow", "Div", None), ("Pow", "Div1", "before"),
    ("Pow", "Reciprocal", None),
])
def test_spelled_rms_norms_are_annotated_and_compute_the_same(square, divide, gain):
    nodes, constants = _rms_norm(square, divide, gain)
    model = make_model([*nodes, helper.make_node("MatMul", ["n", "wm"], ["y"])], [("x", SHAPE)], [("y", SHAPE)],
                       [*constants, random_weight("wm", (WIDTH, WIDTH))])
    result = fuse_activations(model)
    marked = [n.op_type for n in result.model.graph if n.metadata_props.get(PATTERN_KEY) == "rms_norm"]
    assert len(marked) == len(nodes) and "MatMul" not in marked
    assert_same_outputs(model, result.model)


def test_a_mean_over_another_axis_or_of_x_minus_mean_is_not_an_rms_norm():
    nodes, constants = _rms_norm()
    nodes[1] = helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[1], keepdims=1)
    model = make_model(nodes, [("x", SHAPE)], [("n", SHAPE)], constants)
    assert not any(PATTERN_KEY in n.metadata_props for n in fuse_activations(model).model.graph)
    centred = [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1], keepdims=1),
               helper.make_node("Sub", ["x", "mean"], ["d"]), *_rms_norm(x="d")[0]]
    model = make_model(centred, [("x", SHAPE)], [("n", SHAPE)], constants)
    assert "rms_norm" not in {n.metadata_props.get(PATTERN_KEY) for n in fuse_activations(model).model.graph}


def test_a_pre_norm_block_with_rms_norms_keeps_the_group_and_its_stream_float():
    # x -> RMSNorm -> MatMul -> (+ x) -> RMSNorm -> MatMul -> y
    first, constants = _rms_norm()
    renamed = {"x": "s", "two": "two", "eps": "eps", "one": "one", "w": "w"}
    second = [helper.make_node(n.op_type, [renamed.get(i, i + "2") for i in n.input], [o + "2" for o in n.output],
                               **{a.name: helper.get_attribute_value(a) for a in n.attribute}) for n in first]
    nodes = [*first, helper.make_node("MatMul", ["n", "w1"], ["branch"]),
             helper.make_node("Add", ["x", "branch"], ["s"]), *second, helper.make_node("MatMul", ["n2", "w2"], ["y"])]
    model = make_model(nodes, [("x", SHAPE)], [("y", SHAPE)],
                       [*constants, random_weight("w1", (WIDTH, WIDTH)), random_weight("w2", (WIDTH, WIDTH))])
    data = [{"x": np.random.default_rng(i).standard_normal(SHAPE).astype(np.float32)} for i in range(8)]
    result = quantize(model, Int8Config(), data)
    reasons = {f.node_name: f.reason for f in result.float_nodes}
    add = next(n.name for n in result.model.graph if n.outputs[0].name == "s")
    assert reasons[add].startswith(RESIDUAL_STREAM)
    assert sum(reason == "part of a spelled-out rms_norm (kept as one float op)" for reason in reasons.values()) \
        == 2 * len(first)
    quantized = {n.inputs[0].name for n in result.model.graph if n.op_type == "QuantizeLinear"}
    assert {"n", "n2"} <= quantized and not quantized & {"sq", "ms", "mse", "r", "inv", "xr", "s", "branch"}


def test_the_written_model_carries_no_pattern_annotation(tmp_path):
    import onnx

    import edgeopt
    from edgeopt.io import save_model

    nodes, constants = _rms_norm()
    model = make_model([*nodes, helper.make_node("MatMul", ["n", "wm"], ["y"])], [("x", SHAPE)], [("y", SHAPE)],
                       [*constants, random_weight("wm", (WIDTH, WIDTH))])
    source = save_model(model, tmp_path / "float.onnx")
    data = [{"x": np.random.default_rng(i).standard_normal(SHAPE).astype(np.float32)} for i in range(4)]
    edgeopt.quantize(source, Int8Config(), data, output=tmp_path / "int8.onnx", check_speed=False)
    written = onnx.load(tmp_path / "int8.onnx")
    assert not any(entry.key == PATTERN_KEY for node in written.graph.node for entry in node.metadata_props)

"""``F.normalize`` spelled out (ReduceL2, Clip or Max by eps, Expand, Div) is annotated ``l2_norm``: one group the
microcontroller target quantizes as one integer op (and the ort target keeps float as one op)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from edgeopt.passes import PATTERN_KEY, fuse_activations

from ._helpers import assert_same_outputs, make_model, weight

SHAPE = (2, 6, 5)


def _l2_norm(floor: str = "Clip", expand: str | None = "shape", axis: int = 1, high: float | None = None):
    """Nodes computing ``y`` from ``x``: ``floor`` Clip or Max by eps; ``expand`` "shape" (TorchScript's Expand to
    Shape(x)), "constant" (dynamo's) or None; ``high`` an upper bound on the Clip."""
    clip_inputs = ["norm", "eps"] + (["high"] if high is not None else [])
    nodes = [helper.make_node("ReduceL2", ["x"], ["norm"], axes=[axis], keepdims=1),
             helper.make_node("Clip", clip_inputs, ["floored"]) if floor == "Clip"
             else helper.make_node("Max", ["norm", "eps"], ["floored"])]
    if expand == "shape":
        nodes += [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Expand", ["floored", "shape"], ["e"])]
    elif expand == "constant":
        nodes.append(helper.make_node("Expand", ["floored", "shape_constant"], ["e"]))
    nodes.append(helper.make_node("Div", ["x", "e" if expand else "floored"], ["y"]))
    constants = [weight("eps", 1e-12), weight("high", high if high is not None else 0.0),
                 numpy_helper.from_array(np.array(SHAPE, np.int64), "shape_constant")]
    return nodes, constants


@pytest.mark.parametrize("floor, expand, axis", [("Clip", "shape", 1), ("Clip", "constant", -1), ("Max", None, 2)])
def test_spelled_l2_norms_are_annotated_and_compute_the_same(floor, expand, axis):
    nodes, constants = _l2_norm(floor, expand, axis)
    model = make_model(nodes, [("x", SHAPE)], [("y", SHAPE)], constants)
    result = fuse_activations(model)
    marked = {n.op_type for n in result.model.graph if n.metadata_props.get(PATTERN_KEY) == "l2_norm"}
    assert {"ReduceL2", "Div"} <= marked and "Shape" not in marked
    assert_same_outputs(model, result.model)


def test_a_norm_clamped_above_or_dividing_something_else_is_not_annotated():
    nodes, constants = _l2_norm(high=10.0)  # Clip(norm, eps, 10): not F.normalize
    model = make_model(nodes, [("x", SHAPE)], [("y", SHAPE)], constants)
    assert not any(PATTERN_KEY in n.metadata_props for n in fuse_activations(model).model.graph)
    nodes, constants = _l2_norm(expand=None)
    nodes[-1] = helper.make_node("Div", ["z", "floored"], ["y"])  # another tensor divided by x's norm
    model = make_model(nodes, [("x", SHAPE), ("z", SHAPE)], [("y", SHAPE)], constants)
    assert not any(PATTERN_KEY in n.metadata_props for n in fuse_activations(model).model.graph)

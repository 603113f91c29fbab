"""FoldPadPass: a zero Pad before a Conv becomes the Conv's own padding."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from edgeopt.passes import fold_pad

from ._helpers import assert_same_outputs, explain, make_model, op_types, random_weight, weight


def _pads(values) -> object:
    return numpy_helper.from_array(np.asarray(values, np.int64), "pads")


def pad_then_conv(pads, *, opset: int = 17, value=None, mode: str | None = None, conv_pads=(1, 1, 1, 1),
                  **conv_attributes):
    """x[1,4,6,6] -> Pad -> Conv 3x3 (8 channels) -> y."""
    attributes = {"mode": mode} if mode else {}
    channels = 4 + pads[1] + pads[5]
    inputs, initializers = ["x"], [random_weight("w", [8, channels, 3, 3]), random_weight("b", [8])]
    if opset < 11:
        attributes |= {"pads": list(pads), **({"value": value} if value is not None else {})}
    else:
        inputs.append("pads")
        initializers.append(_pads(pads))
        if value is not None:
            inputs.append("value")
            initializers.append(weight("value", value))
    nodes = [helper.make_node("Pad", inputs, ["padded"], name="pad", **attributes),
             helper.make_node("Conv", ["padded", "w", "b"], ["y"], name="conv", kernel_shape=[3, 3],
                              **({"pads": list(conv_pads)} if conv_pads else {}), **conv_attributes)]
    stride = conv_attributes.get("strides", [1, 1])[0]
    around = np.add(conv_pads or (0, 0, 0, 0), [pads[2], pads[3], pads[6], pads[7]])
    if conv_attributes.get("auto_pad"):
        around = (1, 1, 1, 1)
    rows, cols = (int(6 + around[i] + around[i + 2] - 3) // stride + 1 for i in (0, 1))
    return make_model(nodes, [("x", [1, 4, 6, 6])], [("y", [1, 8, rows, cols])], initializers, opset=opset)


@pytest.mark.parametrize("opset", [9, 13, 18])
@pytest.mark.parametrize("pads, conv_pads", [
    ([0, 0, 1, 1, 0, 0, 1, 1], None),  # ZeroPadding2D before a conv without padding
    ([0, 0, 0, 0, 0, 0, 1, 1], (1, 1, 1, 1)),  # TensorFlow's asymmetric 'SAME' for a strided conv
    ([0, 0, 2, 0, 0, 0, 1, 3], (1, 1, 1, 1)),
], ids=["zero-padding", "same-strided", "uneven"])
def test_a_zero_pad_before_a_conv_folds_into_its_pads(opset, pads, conv_pads):
    model = pad_then_conv(pads, opset=opset, conv_pads=conv_pads, strides=[2, 2])
    result = fold_pad(model)
    assert op_types(result.model) == ["Conv"]
    conv = next(iter(result.model.graph))
    expected = np.add(conv_pads or (0, 0, 0, 0), [pads[2], pads[3], pads[6], pads[7]])
    assert list(conv.attributes.get_ints("pads")) == list(expected)
    assert conv.inputs[0].name == "x" and result.model.graph.outputs[0].name == "y"
    assert_same_outputs(model, result.model)


@pytest.mark.parametrize("kwargs, reason", [
    ({"value": 0.5}, "the Pad fills with 0.5, not the zeros a Conv pads with"),
    ({"mode": "reflect"}, "reflect padding is not the zeros a Conv pads with"),
    ({"pads": [0, 1, 0, 0, 0, 1, 0, 0]}, "the Pad pads the batch or channel axis"),
    ({"pads": [0, 0, -1, 0, 0, 0, 0, 0]}, "the Pad crops (a negative amount)"),
    ({"conv_pads": None, "auto_pad": "SAME_UPPER"}, "the Conv pads by auto_pad=SAME_UPPER"),
])
def test_other_pads_are_left_with_the_reason(kwargs, reason):
    pads = kwargs.pop("pads", [0, 0, 1, 1, 0, 0, 1, 1])
    model = pad_then_conv(pads, **kwargs)
    result = fold_pad(model)
    assert not result.modified and op_types(result.model) == ["Pad", "Conv"]
    assert explain(result) == [f"pad + conv: not folded: {reason}"]


def test_a_pad_read_by_two_nodes_stays():
    nodes = [helper.make_node("Pad", ["x", "pads"], ["padded"], name="pad"),
             helper.make_node("Conv", ["padded", "w"], ["y"], name="conv", kernel_shape=[3, 3]),
             helper.make_node("Relu", ["padded"], ["z"], name="relu")]
    model = make_model(nodes, [("x", [1, 4, 6, 6])], [("y", [1, 8, 6, 6]), ("z", [1, 4, 8, 8])],
                       [_pads([0, 0, 1, 1, 0, 0, 1, 1]), random_weight("w", [8, 4, 3, 3])])
    assert not fold_pad(model).modified

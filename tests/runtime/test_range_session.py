"""range_session: the extremes and channel means ONNX Runtime reduces during calibration, against numpy.

A clamped tensor's min is its clamp's floor, unreduced, and its max comes from
GlobalMaxPool when it is 4-D; a channel mean of an NCHW tensor comes from
GlobalAveragePool. Each must give what numpy gives on the whole tensor, on a
batch-1 run and on a run of several samples as one batch.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.runtime.ort import observing_session
from edgeopt.runtime.range_session import CHANNEL_MEAN_SUFFIXES, PACKED_RANGE_OUTPUTS, range_session

CHANNELS = 16


def _model() -> ir.Model:
    """x [1,16,12,12] -> Conv 3x3 -> relu -> Conv 1x1 -> proj (unclamped) -> Clip(0.5, 4) -> clip
    -> Reshape [1,16,144] -> Relu -> relu3d; shapes inferred, as load_model does."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((CHANNELS, CHANNELS, *k)).astype(np.float32) / 4, name)
               for name, k in (("w3", (3, 3)), ("w1", (1, 1)))]
    constants = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("lo", 0.5), ("hi", 4.0))]
    constants.append(numpy_helper.from_array(np.array([1, CHANNELS, -1], np.int64), "flat"))
    nodes = [helper.make_node("Conv", ["x", "w3"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"]),
             helper.make_node("Conv", ["relu", "w1"], ["proj"]),
             helper.make_node("Clip", ["proj", "lo", "hi"], ["clip"]),
             helper.make_node("Reshape", ["clip", "flat"], ["clip3d"]),
             helper.make_node("Relu", ["clip3d"], ["y"])]
    graph = helper.make_graph(nodes, "ranges",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, CHANNELS, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, CHANNELS, 144])],
                              initializer=[*weights, *constants])
    opsets = [helper.make_opsetid("", 17)]
    proto = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto, strict_mode=True))


PACKED = ["conv", "relu", "proj", "clip", "y"]
FLOORS = {"relu": 0.0, "clip": 0.5, "y": 0.0}


def _feed(samples: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((samples, CHANNELS, 12, 12)).astype(np.float32)}


def _whole(model: ir.Model, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every tensor of PACKED, whole, one sample per run, stacked."""
    session = observing_session(model, PACKED)
    runs = [session.run({"x": sample[None]}) for sample in feed["x"]]
    return {name: np.concatenate([run[name] for run in runs]) for name in PACKED}


@pytest.mark.parametrize("samples", [1, 3])
def test_a_floor_stands_in_for_the_min_and_the_pooled_max_is_the_max(samples):
    model, feed = _model(), _feed(samples)
    session = range_session(model, [], [], packed=PACKED, floors=FLOORS, free_batch=samples > 1)
    outputs = session.run(feed, list(PACKED_RANGE_OUTPUTS))
    whole = _whole(model, feed)
    for index, name in enumerate(PACKED):
        assert outputs[PACKED_RANGE_OUTPUTS[1]][index] == whole[name].max(), name
        expected_min = FLOORS.get(name, whole[name].min())
        assert outputs[PACKED_RANGE_OUTPUTS[0]][index] == np.float32(expected_min), name
    # the floors hold: a clamped tensor never goes below its floor
    assert all(whole[name].min() >= floor for name, floor in FLOORS.items())


def test_a_floor_below_zero_or_of_a_tensor_not_packed_is_ignored():
    model, feed = _model(), _feed()
    session = range_session(model, [], ["x"], packed=PACKED, floors={"proj": -1.0, "x": 0.0})
    outputs = session.run(feed, [*PACKED_RANGE_OUTPUTS, "x__edgeopt_min"])
    whole = _whole(model, feed)
    assert outputs[PACKED_RANGE_OUTPUTS[0]][PACKED.index("proj")] == whole["proj"].min() != -1.0
    assert outputs["x__edgeopt_min"] == feed["x"].min() < 0


@pytest.mark.parametrize("samples", [1, 3])
def test_channel_means_through_global_average_pool_match_numpy(samples):
    model, feed = _model(), _feed(samples)
    means = {"relu": (1, 4), "clip": (1, 4), "y": (1, 3)}
    session = range_session(model, [], [], channel_means=means, free_batch=samples > 1)
    names = [name + suffix for name in means for suffix in CHANNEL_MEAN_SUFFIXES]
    outputs = session.run(feed, names)
    whole = _whole(model, feed)
    for name, (axis, rank) in means.items():
        axes = tuple(a for a in range(rank) if a != axis)
        np.testing.assert_allclose(outputs[name + CHANNEL_MEAN_SUFFIXES[0]], whole[name].mean(axis=axes),
                                   rtol=1e-5, atol=1e-6 * float(np.abs(whole[name]).max()))
        assert int(outputs[name + CHANNEL_MEAN_SUFFIXES[1]]) == whole[name].size, name


def _layers_model(batch: int | str) -> ir.Model:
    """x [batch, 16, 8, 8] -> Conv+Relu a (16 channels) -> Conv+Relu b (24) -> Conv+Clip c (32) -> Conv d (24):
    tensors whose pooled maxes and means ONNX Runtime bundles, two of channels a multiple of 16, two not."""
    rng = np.random.default_rng(3)
    shapes = {"wa": (16, 16), "wb": (24, 16), "wc": (32, 24), "wd": (24, 32)}
    weights = [numpy_helper.from_array((rng.standard_normal((*s, 3, 3)) / 8).astype(np.float32), n)
               for n, s in shapes.items()]
    weights += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("lo", 0.0), ("hi", 6.0))]
    nodes = [helper.make_node("Conv", ["x", "wa"], ["ca"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["ca"], ["a"]),
             helper.make_node("Conv", ["a", "wb"], ["cb"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["cb"], ["b"]),
             helper.make_node("Conv", ["b", "wc"], ["cc"], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["cc", "lo", "hi"], ["c"]),
             helper.make_node("Conv", ["c", "wd"], ["d"], pads=[1, 1, 1, 1])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 16, 8, 8])]
    outputs = [helper.make_tensor_value_info("d", TensorProto.FLOAT, [batch, 24, 8, 8])]
    graph = helper.make_graph(nodes, "bundles", inputs, outputs, initializer=weights)
    opsets = [helper.make_opsetid("", 17)]
    proto = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto, strict_mode=True))


@pytest.mark.parametrize(("batch", "samples"), [(1, 1), ("N", 3)])
def test_bundled_pooled_maxes_and_means_are_those_of_each_tensor_s_own_nodes(batch, samples):
    """The tensors' pooled maxes and channel means, concatenated in ONNX Runtime and taken apart after, give
    bit for bit what each tensor's own Reduce nodes give (a session built without bundles)."""
    model = _layers_model(batch)
    feed = {"x": np.random.default_rng(4).standard_normal((samples, 16, 8, 8)).astype(np.float32)}
    tensors = ["a", "b", "c", "d"]
    kwargs = {"packed": tensors, "floors": {"a": 0.0, "b": 0.0, "c": 0.0},
              "channel_means": dict.fromkeys(tensors, (1, 4)), "free_batch": batch == "N"}
    names = [*PACKED_RANGE_OUTPUTS, *(name + suffix for name in tensors for suffix in CHANNEL_MEAN_SUFFIXES)]
    bundled = range_session(model, [], [], **kwargs)
    sources = {output.name for output in bundled._session.get_outputs()}
    # maxes of a, c (16, 32 channels) and of b; means of a, c and of b, d: a multiple of 16 apart
    assert {"__edgeopt_pooled_max_0", "__edgeopt_channel_means_0", "__edgeopt_channel_means_1"} <= sources
    assert set(bundled.output_names) >= set(names) and not sources & {n for n in names if "channel_mean" in n}
    alone = range_session(model, [], [], **kwargs, bundled=False)
    bundle_outputs = {"__edgeopt_pooled_max_0", "__edgeopt_channel_means_0", "__edgeopt_channel_means_1"}
    assert not {output.name for output in alone._session.get_outputs()} & bundle_outputs
    expected, actual = alone.run(feed, names), bundled.run(feed, names)
    for name in names:
        assert actual[name].dtype == expected[name].dtype and actual[name].shape == expected[name].shape, name
        assert np.array_equal(actual[name], expected[name]), name
    whole = observing_session(model, tensors).run(feed)
    assert np.array_equal(actual[PACKED_RANGE_OUTPUTS[1]], [whole[name].max() for name in tensors])
    assert int(actual["d" + CHANNEL_MEAN_SUFFIXES[1]]) == whole["d"].size


def test_a_tensor_whose_channels_are_not_those_declared_is_reduced_alone(caplog):
    """The model declares 32 channels for a (it has 16): concatenated, every tensor after it would be read
    at the wrong place. The first run finds the bundles' channels short and the session reduces each tensor
    alone from then on, giving what a session without bundles gives."""
    model = _layers_model(1)
    model.graph.node(1).outputs[0].shape = ir.Shape([1, 32, 8, 8])  # the Relu's a
    tensors = ["a", "b", "c", "d"]
    kwargs = {"packed": tensors, "floors": {"a": 0.0, "b": 0.0, "c": 0.0},
              "channel_means": dict.fromkeys(tensors, (1, 4))}
    names = [*PACKED_RANGE_OUTPUTS, *(name + suffix for name in tensors for suffix in CHANNEL_MEAN_SUFFIXES)]
    session = range_session(model, [], [], **kwargs)
    feed = {"x": np.random.default_rng(5).standard_normal((1, 16, 8, 8)).astype(np.float32)}
    whole = observing_session(model, tensors).run(feed)
    with caplog.at_level("INFO", logger="edgeopt.runtime.range_session"):
        for _ in range(2):
            outputs = session.run(feed, names)
            assert np.array_equal(outputs[PACKED_RANGE_OUTPUTS[1]], [whole[name].max() for name in tensors])
            for name in tensors:
                np.testing.assert_allclose(outputs[name + CHANNEL_MEAN_SUFFIXES[0]], whole[name].mean(axis=(0, 2, 3)),
                                           rtol=1e-5, atol=1e-6)
    assert caplog.text.count("channels differ from the model's shapes") == 1

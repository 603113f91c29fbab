"""Tap gathers of a range session: sampled positions of a tensor, per row by its place in the stream.

Row ``r`` of a gather must hold ``x[r].reshape(C, -1)[:, table[stream[r] % phases]]``, what numpy gives on the
whole tensor, at batch 1 and on a run of several rows; a tensor whose rows are not the run's must not pass.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.errors import DataError, ModelError
from edgeopt.runtime.ort import observing_session
from edgeopt.runtime.range_session import range_session
from edgeopt.runtime.tap_gather import TAP_STREAM_INPUT, TapGather, check_stream

CHANNELS, SIDE = 5, 6
TABLE = np.array([[0, 7, 35], [1, 1, 20], [35, 0, 14]], np.int64)  # 3 phases of 3 positions of a 6 x 6 map


def _model(batch: int | str, *, reshaped_to: list[int] | None = None) -> ir.Model:
    """x [batch, 5, 6, 6] -> Relu -> relu (-> Reshape to ``reshaped_to`` -> relu2) -> y."""
    nodes = [helper.make_node("Relu", ["x"], ["relu"])]
    initializers, last, shape = [], "relu", [batch, CHANNELS, SIDE, SIDE]
    if reshaped_to is not None:
        initializers.append(numpy_helper.from_array(np.array(reshaped_to, np.int64), "target"))
        nodes.append(helper.make_node("Reshape", ["relu", "target"], ["relu2"]))
        last, shape = "relu2", reshaped_to
    nodes.append(helper.make_node("Neg", [last], ["y"]))
    graph = helper.make_graph(nodes, "taps", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                            [batch, CHANNELS, SIDE, SIDE])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], initializer=initializers)
    opsets = [helper.make_opsetid("", 13)]
    proto = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto, strict_mode=True))


def _expected(whole: np.ndarray, stream: np.ndarray) -> np.ndarray:
    planes = whole.reshape(whole.shape[0], whole.shape[1], -1)
    return np.stack([plane[:, TABLE[index % len(TABLE)]] for plane, index in zip(planes, stream)])


@pytest.mark.parametrize(("rows", "first"), [(1, 0), (1, 4), (4, 2)])
def test_each_row_holds_the_positions_of_its_place_in_the_stream(rows, first):
    model = _model("N")
    feed = {"x": np.random.default_rng(rows).standard_normal((rows, CHANNELS, SIDE, SIDE)).astype(np.float32)}
    stream = np.arange(first, first + rows, dtype=np.int64)
    session = range_session(model, [], ["relu"], gathers={"taps": TapGather("relu", TABLE, CHANNELS)})
    outputs = session.run({**feed, TAP_STREAM_INPUT: stream}, ["taps", "relu__edgeopt_max"])
    whole = observing_session(model, ["relu"]).run(feed)["relu"]
    assert outputs["taps"].shape == (rows, CHANNELS, TABLE.shape[1])
    np.testing.assert_array_equal(outputs["taps"], _expected(whole, stream))
    assert outputs["relu__edgeopt_max"] == whole.max()  # the rest of the session is untouched
    assert check_stream(stream, outputs["taps"], first, "relu", "") is stream


def test_a_tensor_with_more_rows_than_the_run_comes_back_with_them_and_the_check_refuses_it():
    """x [1, 5, 6, 6] reshaped to [2, 5, 3, 6]: two rows for a run of one."""
    model = _model(1, reshaped_to=[2, CHANNELS, 3, SIDE])
    table = TABLE % 18
    session = range_session(model, [], [], gathers={"taps": TapGather("relu2", table, CHANNELS)})
    stream = np.array([0], np.int64)
    feed = {"x": np.ones((1, CHANNELS, SIDE, SIDE), np.float32), TAP_STREAM_INPUT: stream}
    taps = session.run(feed, ["taps"])["taps"]
    assert taps.shape[0] == 2
    with pytest.raises(ModelError, match="do not match the rows of the run.*the remedy"):
        check_stream(stream, taps, 0, "relu2", "the remedy")


def test_a_tensor_with_fewer_rows_than_the_run_fails_to_run():
    """x [N, 5, 6, 6] reshaped to [1, 5 N, 6, 6]: one row for a run of two."""
    model = _model("N", reshaped_to=[1, -1, SIDE, SIDE])
    session = range_session(model, [], [], gathers={"taps": TapGather("relu2", TABLE, CHANNELS)})
    feed = {"x": np.ones((2, CHANNELS, SIDE, SIDE), np.float32), TAP_STREAM_INPUT: np.arange(2, dtype=np.int64)}
    with pytest.raises(DataError):
        session.run(feed, ["taps"])


@pytest.mark.parametrize("stream", [None, np.array([1]), np.array([0, 2]), np.array([[0, 1]])])
def test_the_stream_must_number_the_rows_on_from_the_first(stream):
    with pytest.raises(ModelError, match="do not match"):
        check_stream(stream, np.zeros((2, 3, 4)), 0, "t", "r")

"""Depthwise GPTQ's statistics from taps gathered inside ONNX Runtime, not from whole input tensors.

In the calibration pass the depthwise hook asks the range session for the taps
of its sampled positions (a few hundred KB a sample) instead of the layers'
whole inputs (15 MB a sample on a 224x224 MobileNetV2). The sums must be
exactly those of the hook fed the whole tensors, however the samples are
batched; where a tensor comes whole anyway (a histogram method) or its rows
may not be the run's, the hook reads it whole.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from edgeopt.quant import CalibrationConfig, CalibrationMethod, calibrate
from edgeopt.quant.depthwise_rounding import DepthwiseCorrelationHook, DepthwiseInputs
from edgeopt.runtime.ort import observing_session
from tests.passes._helpers import make_model

CHANNELS = 6
LAYERS = ["dw1", "dw2"]


def _net(batch: int | str) -> ir.Model:
    """x -> Relu -> r -> dw1 (3x3, stride 2, padded) -> h -> Clip(0, 6) -> c -> dw2 (3x3 dilated 2, padded) -> y:
    16x16 then 8x8 maps, so 8 positions a sample are sampled from each, borders included."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((CHANNELS, 1, 3, 3)).astype(np.float32), name)
               for name in ("w1", "w2")]
    bounds = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("lo", 0.0), ("hi", 6.0))]
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Conv", ["r", "w1"], ["h"], name="dw1", group=CHANNELS, pads=[1, 1, 1, 1],
                              strides=[2, 2]),
             helper.make_node("Clip", ["h", "lo", "hi"], ["c"]),
             helper.make_node("Conv", ["c", "w2"], ["y"], name="dw2", group=CHANNELS, pads=[2, 2, 2, 2],
                              dilations=[2, 2])]
    return make_model(nodes, [("x", [batch, CHANNELS, 16, 16])], [("y", [batch, CHANNELS, 8, 8])],
                      [*weights, *bounds])


def _data(rows: int, count: int = 37) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(rows)
    return [{"x": rng.standard_normal((rows, CHANNELS, 16, 16)).astype(np.float32)} for _ in range(count)]


def _from_whole_tensors(model: ir.Model, data) -> dict[str, DepthwiseInputs]:
    """The hook fed each batch's whole layer inputs, as a calibration pass fetching them would."""
    hook = DepthwiseCorrelationHook(model, LAYERS)
    session = observing_session(model, ["r", "c"])
    for feed in data:
        hook.update(feed, session.run(feed))
    return hook.result()


def _calibrated(model: ir.Model, data, method: CalibrationMethod, monkeypatch) -> DepthwiseCorrelationHook:
    hook = DepthwiseCorrelationHook(model, LAYERS)
    whole_reads = []
    original = DepthwiseCorrelationHook._add
    monkeypatch.setattr(DepthwiseCorrelationHook, "_add",
                        lambda self, name, *rest: (whole_reads.append(name), original(self, name, *rest)))
    calibrate(model, iter(data), ["x", "r", "h", "c", "y"], CalibrationConfig(method=method), hooks=[hook])
    hook.whole_reads = sorted(set(whole_reads))
    return hook


@pytest.mark.parametrize(("batch", "rows"), [(1, 1), ("N", 3)])  # batch-1 samples run 16 at a time; 3-row ones
@pytest.mark.parametrize("method", [CalibrationMethod.MINMAX, CalibrationMethod.PERCENTILE])
def test_the_sums_are_those_of_the_whole_tensors_and_only_a_histogram_method_reads_them(batch, rows, method,
                                                                                         monkeypatch):
    model, data = _net(batch), _data(rows)
    hook = _calibrated(model, data, method, monkeypatch)
    assert sorted(hook.gathers) == ["dw1__edgeopt_taps", "dw2__edgeopt_taps"] and hook.whole_tensors == ()
    # min/max reads the gathered taps only; a histogram method fetches r and c whole, and the hook reads them
    assert hook.whole_reads == ([] if method is CalibrationMethod.MINMAX else LAYERS)
    gathered, expected = hook.result(), _from_whole_tensors(model, data)
    assert gathered.keys() == expected.keys() == set(LAYERS)
    for name in LAYERS:
        assert np.array_equal(gathered[name].rows, expected[name].rows)
        assert np.array_equal(gathered[name].folds, expected[name].folds)  # exactly: the same values, summed alike


def test_a_layer_whose_rows_may_not_be_the_run_s_is_read_whole():
    """dw2's input is reshaped from [1, 2C, 8, 8] to [2, C, 8, 8]: two rows per sample, not gathered."""
    rng = np.random.default_rng(1)
    weights = [numpy_helper.from_array(rng.standard_normal((c, 1, 3, 3)).astype(np.float32), n)
               for n, c in (("w1", 2 * CHANNELS), ("w2", CHANNELS))]
    target = numpy_helper.from_array(np.array([2, CHANNELS, 8, 8], np.int64), "target")
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Conv", ["r", "w1"], ["h"], name="dw1", group=2 * CHANNELS, pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["h", "target"], ["t"]),
             helper.make_node("Conv", ["t", "w2"], ["y"], name="dw2", group=CHANNELS, pads=[1, 1, 1, 1])]
    model = make_model(nodes, [("x", [1, 2 * CHANNELS, 8, 8])], [("y", [2, CHANNELS, 8, 8])],
                       [*weights, target])
    hook = DepthwiseCorrelationHook(model, LAYERS)
    assert list(hook.gathers) == ["dw1__edgeopt_taps"] and hook.whole_tensors == ("t",)


def test_a_1d_depthwise_layer_is_gathered_as_its_whole_input_gives_it(monkeypatch):
    """A temporal convolution's input [N, C, 40]: 8 positions of 40 a sample, the first and last padded."""
    rng = np.random.default_rng(2)
    weight = numpy_helper.from_array(rng.standard_normal((CHANNELS, 1, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Conv", ["r", "w"], ["y"], name="dw1", group=CHANNELS, pads=[1, 1])]
    model = make_model(nodes, [("x", [1, CHANNELS, 40])], [("y", [1, CHANNELS, 40])], [weight])
    data = [{"x": rng.standard_normal((1, CHANNELS, 40)).astype(np.float32)} for _ in range(21)]
    hook = DepthwiseCorrelationHook(model, ["dw1"])
    assert list(hook.gathers) == ["dw1__edgeopt_taps"]
    monkeypatch.setattr(DepthwiseCorrelationHook, "_add", lambda *args: pytest.fail("read whole"))
    calibrate(model, iter(data), ["x", "r", "y"], CalibrationConfig(), hooks=[hook])
    gathered = hook.result()["dw1"]
    monkeypatch.undo()
    whole = DepthwiseCorrelationHook(model, ["dw1"])
    session = observing_session(model, ["r"])
    for feed in data:
        whole.update(feed, session.run(feed))
    expected = whole.result()["dw1"]
    assert np.array_equal(gathered.rows, expected.rows) and np.array_equal(gathered.folds, expected.folds)


def test_the_taps_on_the_padding_are_zero_even_where_the_map_is_infinite(monkeypatch):
    """A padded tap points at a border position of the map (its index clipped) and gets that value from ONNX
    Runtime: the hook zeroes it, as on the whole tensor. The map infinite on its borders in some samples (x
    scaled by 1e38 before the Relu): a padded tap left infinite would drop its position from the sums, where
    the whole tensor's keeps it."""
    model = _net(1)
    scale = numpy_helper.from_array(np.array(1e38, np.float32), "scale")
    model.graph.initializers["scale"] = ir.Value(name="scale", const_value=ir.from_proto(scale))
    relu = next(node for node in model.graph if node.op_type == "Relu")
    scaled = ir.node("Mul", [relu.inputs[0], model.graph.initializers["scale"]], name="scaled")
    model.graph.insert_before(relu, scaled)
    relu.replace_input_with(0, scaled.outputs[0])
    data = _data(1)
    for index, feed in enumerate(data):
        feed["x"] = np.clip(feed["x"], -1.0, 1.0)
        if index % 3 == 0:
            feed["x"][:, :, [0, -1], :] = 10.0
            feed["x"][:, :, :, [0, -1]] = 10.0
    hook = _calibrated(model, data, CalibrationMethod.MINMAX, monkeypatch)
    assert hook.whole_reads == []
    gathered, expected = hook.result(), _from_whole_tensors(model, data)
    for name in LAYERS:
        assert np.array_equal(gathered[name].rows, expected[name].rows)
        assert np.array_equal(gathered[name].folds, expected[name].folds)
    sampled = len(data) * 8 // 2  # positions a fold would have without infinities: some taps hold them
    assert 0 < expected["dw1"].rows.min() < sampled and expected["dw1"].rows.max() <= sampled

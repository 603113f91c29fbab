"""Calibration: one streaming ONNX Runtime pass, bounded memory, every method's range."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from onnx import numpy_helper

from edgeopt.errors import DataError
from edgeopt.quant import CalibrationConfig, CalibrationMethod, calibrate
from edgeopt.runtime.ort import observing_session

from .int8_models import GraphBuilder, batches

SHAPE = (1, 3, 16, 16)


def _conv_relu_model():
    b = GraphBuilder(seed=1)
    b.node("Relu", [b.conv("x", 3, 8, "conv")], "relu")
    b.conv("relu", 8, 4, "y", k=1)
    return b.model(["y"], SHAPE)


def _stream(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield {"x": rng.standard_normal(SHAPE).astype(np.float32)}


def test_minmax_ranges_are_the_extremes_over_all_batches():
    model = _conv_relu_model()
    data = batches(SHAPE, 6)
    result = calibrate(model, data, ["x", "conv", "relu", "y"], CalibrationConfig())
    session = observing_session(model, ["conv", "relu"])
    outputs = [session.run(feed) for feed in data]
    for name in ("conv", "relu", "y"):
        values = np.stack([o[name] for o in outputs])
        assert result.tensors[name].range == (float(values.min()), float(values.max()))
    inputs = np.stack([feed["x"] for feed in data])
    assert result.tensors["x"].range == (float(inputs.min()), float(inputs.max()))  # graph input, from the feed
    assert result.num_batches == 6 and list(result.tensors) == ["x", "conv", "relu", "y"]


def test_a_feed_buffer_refilled_in_place_is_calibrated_as_it_was():
    """A data loader may fill one buffer in place for every batch. Calibration runs a few batch-1 feeds
    as one batch and observes each while the next is read: it kept the buffer, so a group ran the last
    feed several times and a batch was observed with the next one's values."""
    model = _conv_relu_model()
    data = batches(SHAPE, 12)

    def refilled():
        buffer = np.empty(SHAPE, np.float32)
        for feed in data:
            buffer[...] = feed["x"]
            yield {"x": buffer}

    names = ["x", "conv", "relu", "y"]
    expected = calibrate(model, data, names, CalibrationConfig())
    result = calibrate(model, refilled(), names, CalibrationConfig())
    assert {n: result.tensors[n].range for n in names} == {n: expected.tensors[n].range for n in names}


def test_histogram_methods_all_come_from_one_pass():
    calls = []
    result = calibrate(_conv_relu_model(), _stream(5), ["relu", "y"],
                       CalibrationConfig(method=CalibrationMethod.AUTO),
                       progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, None), (2, None), (3, None), (4, None), (5, None)]  # a generator has no length
    for tensor in result.tensors.values():
        assert set(tensor.ranges) == {CalibrationMethod.MINMAX, CalibrationMethod.PERCENTILE,
                                      CalibrationMethod.ENTROPY, CalibrationMethod.MSE}
        assert tensor.method == min(tensor.errors, key=tensor.errors.get)  # auto: least estimated error
    entropy = result.with_method(CalibrationMethod.ENTROPY)
    assert all(t.method is CalibrationMethod.ENTROPY for t in entropy.tensors.values())
    assert entropy.ranges()["y"] == result.tensors["y"].ranges[CalibrationMethod.ENTROPY]


def test_progress_knows_the_total_of_a_sized_data_set():
    calls = []
    calibrate(_conv_relu_model(), batches(SHAPE, 3), ["y"], CalibrationConfig(),
              progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_progress_knows_the_total_of_a_data_folder(tmp_path):
    # a data source has no len() but counts its samples from the file headers
    from edgeopt import ir as eir
    from edgeopt.data import open_data

    model = _conv_relu_model()
    for index, feed in enumerate(batches(SHAPE, 3)):
        np.save(tmp_path / f"s{index}.npy", feed["x"])
    calls = []
    calibrate(model, open_data(tmp_path, eir.model_inputs(model)), ["y"], CalibrationConfig(),
              progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_minmax_does_not_keep_histograms_or_switch_to_them():
    result = calibrate(_conv_relu_model(), batches(SHAPE, 2), ["y"], CalibrationConfig())
    assert result.tensors["y"].histogram is None
    with pytest.raises(ValueError, match="needs histograms"):
        result.with_method(CalibrationMethod.MSE)


def _peak_bytes(count: int, method: CalibrationMethod) -> int:
    model = _conv_relu_model()
    config = CalibrationConfig(method=method)
    tracemalloc.start()
    try:
        calibrate(model, _stream(count), ["x", "conv", "relu", "y"], config)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("method", [CalibrationMethod.MINMAX, CalibrationMethod.AUTO])
def test_memory_stays_bounded_whatever_the_number_of_batches(method):
    # 200 batches: 13 groups of 16, enough to fill the pipeline (two runs in flight, two queued, one
    # observed). How many groups are alive at the peak depends on the threads' timing (one 500-batch pass
    # of a loaded full run peaked 51 KB above its 100-batch one, others within 25 KB), so each count keeps
    # the least of two passes: state that survives its batch would raise every pass.
    short = min(_peak_bytes(200, method) for _ in range(2))
    long = min(_peak_bytes(500, method) for _ in range(2))
    batch_bytes = 8 * 16 * 16 * 4
    assert long < short + 4 * batch_bytes, (short, long)  # no per-batch state survives
    assert long < 2_000_000


def test_bad_data_is_a_data_error():
    model = _conv_relu_model()
    config = CalibrationConfig()
    with pytest.raises(DataError, match="calibration needs data"):
        calibrate(model, None, ["y"], config)
    with pytest.raises(DataError, match="wrap a single batch in a list"):
        calibrate(model, {"x": np.zeros(SHAPE, np.float32)}, ["y"], config)
    with pytest.raises(DataError, match="calibration data is empty"):
        calibrate(model, [], ["y"], config)
    with pytest.raises(DataError, match="calibration batch 1"):
        calibrate(model, [{"image": np.zeros(SHAPE, np.float32)}], ["y"], config)


def test_float64_batches_are_cast_to_the_model_input_type():
    data = [{"x": np.random.default_rng(0).standard_normal(SHAPE)}]
    result = calibrate(_conv_relu_model(), data, ["x"], CalibrationConfig())
    assert result.tensors["x"].is_float


def test_a_model_that_fixes_its_batch_falls_back_to_one_sample_per_run(tmp_path):
    from edgeopt.io import load_model
    from tests.models import build_onnx

    model = load_model(build_onnx("transformer", tmp_path))  # reshapes to constant [1, 16, 4, 8]
    rng = np.random.default_rng(0)
    data = [{"input": rng.standard_normal((1, 16, 32)).astype(np.float32)} for _ in range(20)]
    names = [n.outputs[0].name for n in model.graph if n.op_type == "Softmax"]
    result = calibrate(model, data, names, CalibrationConfig())
    session = observing_session(model, names)
    values = np.stack([session.run(feed, names)[names[0]] for feed in data])
    assert result.num_batches == 20
    assert result.tensors[names[0]].range == (float(values.min()), float(values.max()))


class _WholeTensorHook:
    """Reads its tensor whole from every run (as AdaRound's input sampler does)."""

    def __init__(self, name: str) -> None:
        self.tensors, self.batches = (name,), []

    def update(self, feed, outputs) -> None:
        self.batches.append(outputs[self.tensors[0]].copy())


def test_a_tensor_one_hook_reads_whole_stays_whole_for_a_channel_means_hook_too():
    """Bias correction (channel means, reduced inside ONNX Runtime) with AdaRound (whole layer
    inputs) on min/max calibration: the shared tensor comes whole, and both hooks get their data."""
    from edgeopt.quant.bias_correction import ChannelMeanHook

    import onnx
    import onnx_ir as ir

    model = ir.from_proto(onnx.shape_inference.infer_shapes(ir.to_proto(_conv_relu_model())))
    assert [v.shape for n in model.graph for v in n.outputs if v.name == "relu"] == [ir.Shape([1, 8, 16, 16])]
    data = batches(SHAPE, 4)
    means, whole = ChannelMeanHook({"relu": 1}), _WholeTensorHook("relu")
    calibrate(model, data, ["relu"], CalibrationConfig(), hooks=[means, whole])
    relu = np.concatenate(whole.batches)
    assert relu.shape == (4, 8, 16, 16)
    np.testing.assert_allclose(means.result()["relu"], relu.mean(axis=(0, 2, 3)), rtol=1e-6)
    alone = ChannelMeanHook({"relu": 1})  # alone, it gets the means computed inside ONNX Runtime
    calibrate(model, data, ["relu"], CalibrationConfig(), hooks=[alone])
    np.testing.assert_allclose(alone.result()["relu"], relu.mean(axis=(0, 2, 3)), rtol=1e-5)


def _rearranging_model():
    """conv -> Reshape -> Transpose -> Relu, with a Flatten of the input and of an unobserved Reshape."""
    b = GraphBuilder(seed=2)
    b.conv("x", 3, 4, "conv")
    b.initializers += [numpy_helper.from_array(np.array(shape, np.int64), name)
                       for name, shape in (("shape", [1, 4, 256]), ("shape2", [1, 1024]))]
    b.node("Reshape", ["conv", "shape"], "rows")
    b.node("Transpose", ["rows"], "cols", perm=[0, 2, 1])
    b.node("Relu", ["cols"], "relu")
    b.node("Flatten", ["x"], "flat_x", axis=1)
    b.node("Reshape", ["relu", "shape2"], "hidden")
    b.node("Identity", ["hidden"], "y")
    return b.model(["y", "flat_x"], SHAPE)


@pytest.mark.parametrize("method", [CalibrationMethod.MINMAX, CalibrationMethod.ENTROPY])
def test_a_rearranged_tensor_takes_its_roots_statistics_exactly(method):
    """A Reshape or Transpose holds its input's values: it is not observed again, and its statistics are
    exactly those it gets when observed on its own (through a chain, and whatever the order asked)."""
    from edgeopt.quant.calibrate import same_values_aliases

    model, data, config = _rearranging_model(), batches(SHAPE, 5), CalibrationConfig(method=method)
    names = ["cols", "y", "conv", "rows", "flat_x", "x", "relu"]
    assert same_values_aliases(model, names) == {"cols": "conv", "rows": "conv", "flat_x": "x", "y": "relu"}
    assert same_values_aliases(model, names, keep={"rows"}) == {"cols": "rows", "flat_x": "x", "y": "relu"}
    result = calibrate(model, data, names, config)
    assert list(result.tensors) == names
    for name in names:
        alone = calibrate(model, data, [name], config).tensors[name]
        tensor = result.tensors[name]
        # (``minmax.count`` counts values when they are seen, batches when ONNX Runtime reduces them)
        assert tensor.name == name and tensor.range == alone.range
        assert (tensor.minmax.min, tensor.minmax.max) == (alone.minmax.min, alone.minmax.max)
        if method.needs_histogram:
            np.testing.assert_array_equal(tensor.histogram.counts, alone.histogram.counts)
            assert (tensor.histogram.width, tensor.histogram.start) == (alone.histogram.width, alone.histogram.start)


def test_a_rearranged_tensor_a_hook_reads_whole_is_fetched_for_it():
    model, data = _rearranging_model(), batches(SHAPE, 3)
    hook = _WholeTensorHook("cols")
    result = calibrate(model, data, ["conv", "cols"], CalibrationConfig(), hooks=[hook])
    assert np.concatenate(hook.batches).shape == (3, 256, 4)
    assert result.tensors["cols"].range == result.tensors["conv"].range

"""Grouped calibration runs: batch-1 samples run 16 at a time only when that changes nothing.

A model that fixes its batch at 1 may fail at batch 16, or run and silently
mix samples. Either way the calibrated ranges must be those of running the
samples one by one: the reference here is the float model run per sample
(``observing_session``), reduced with numpy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx
import pytest
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from edgeopt import ir as eir
from edgeopt.quant import CalibrationConfig, calibrate
from edgeopt.runtime.ort import observing_session
from edgeopt.runtime.range_session import batch_one_reshapes, range_session

SAMPLES = 40  # groups of 16, 16 and 8
FALLBACK_MESSAGE = "the model does not batch"


def _model(nodes: Sequence[onnx.NodeProto], input_shape: Sequence[int], output_shape: Sequence[int],
           initializers: Sequence[tuple[str, np.ndarray]] = ()) -> ir.Model:
    """x -> nodes -> y, intermediate shapes inferred (as ``load_model`` does)."""
    tensors = [numpy_helper.from_array(array, name) for name, array in initializers]
    graph = helper.make_graph(list(nodes), "grouping",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(output_shape))],
                              initializer=tensors)
    opsets = [helper.make_opsetid("", 17)]
    proto = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto, strict_mode=True))


def _shape(*dims: int) -> np.ndarray:
    return np.array(dims, dtype=np.int64)


def _samples(shape: Sequence[int], seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(SAMPLES)]


def _tensor_names(model: ir.Model) -> list[str]:
    return ["x", *(node.outputs[0].name for node in model.graph)]


def _per_sample_ranges(model: ir.Model, data, names: Sequence[str]) -> dict[str, tuple[float, float]]:
    computed = [name for name in names if name != "x"]
    session = observing_session(model, computed)
    runs = [{**session.run(feed), "x": feed["x"]} for feed in data]
    ranges = {}
    for name in names:
        values = np.stack([run[name] for run in runs])
        ranges[name] = (float(values.min()), float(values.max()))
    return ranges


def _calibrated_ranges(model: ir.Model, data, names: Sequence[str]) -> dict[str, tuple[float, float]]:
    result = calibrate(model, iter(data), names, CalibrationConfig())
    assert result.num_batches == len(data)
    return {name: result.tensors[name].range for name in names}


def _batch_fixed_by_constant_reshapes() -> ir.Model:
    """x[1,16,8] -> Reshape [16,8] (no batch dim) -> MatMul W -> Reshape [1,16,8] -> Relu -> y.

    Neither Reshape starts a batch-1 input with a literal 1 target, so nothing
    is rewritten: at batch 16 the first Reshape cannot fit 16 samples.
    """
    weight = np.random.default_rng(1).standard_normal((8, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Reshape", ["x", "flat_shape"], ["flat"], name="flat"),
        helper.make_node("MatMul", ["flat", "w"], ["mixed"], name="mixed"),
        helper.make_node("Reshape", ["mixed", "batch_shape"], ["unflat"], name="unflat"),
        helper.make_node("Relu", ["unflat"], ["y"], name="y"),
    ]
    return _model(nodes, (1, 16, 8), (1, 16, 8),
                  [("flat_shape", _shape(16, 8)), ("w", weight), ("batch_shape", _shape(1, 16, 8))])


def test_a_batch_fixed_without_a_leading_one_falls_back_to_single_samples(caplog):
    model = _batch_fixed_by_constant_reshapes()
    assert batch_one_reshapes(model) == {}  # nothing to rewrite: the grouped run itself must fail
    data = _samples((1, 16, 8))
    names = _tensor_names(model)
    with caplog.at_level(logging.INFO, logger="edgeopt.quant.grouping"):
        ranges = _calibrated_ranges(model, data, names)
    assert FALLBACK_MESSAGE in caplog.text
    assert ranges == _per_sample_ranges(model, data, names)


def _softmax_over_a_batch_moved_off_dim_0() -> ir.Model:
    """x[1,1,32] -> Transpose(1,0,2) -> Reshape [1,-1] -> Softmax -> Reshape [1,-1,32] -> Transpose(1,0,2).

    At batch 1 both Transposes are no-ops and Softmax normalizes each sample's
    32 values. Both Reshapes have a batch-1 input and a target [1, ...], so the
    free-batch session rewrites them to [0, ...]; but the first Transpose moved
    the batch to dim 1, so at batch N the Softmax normalizes all 32 N values
    together while y still comes out [N, 1, 32]: only comparing the first
    group with single runs catches it.
    """
    nodes = [
        helper.make_node("Transpose", ["x"], ["moved"], name="moved", perm=[1, 0, 2]),
        helper.make_node("Reshape", ["moved", "flat_shape"], ["flat"], name="flat"),
        helper.make_node("Softmax", ["flat"], ["softmax"], name="softmax", axis=-1),
        helper.make_node("Reshape", ["softmax", "unflat_shape"], ["unflat"], name="unflat"),
        helper.make_node("Transpose", ["unflat"], ["y"], name="y", perm=[1, 0, 2]),
    ]
    return _model(nodes, (1, 1, 32), (1, 1, 32),
                  [("flat_shape", _shape(1, -1)), ("unflat_shape", _shape(1, -1, 32))])


def test_rewritten_reshapes_that_mix_samples_are_caught_by_the_single_sample_check(caplog):
    model = _softmax_over_a_batch_moved_off_dim_0()
    assert set(batch_one_reshapes(model)) == {"flat", "unflat"}
    data = _samples((1, 1, 32))
    names = _tensor_names(model)
    # The premise: on the free-batch session 16 samples run, keep y's shape and give wrong values.
    grouped = range_session(model, ["softmax", "y"], [], free_batch=True).run(
        {"x": np.concatenate([feed["x"] for feed in data[:16]])}, ["y"])["y"]
    single = observing_session(model, []).run
    assert grouped.shape == (16, 1, 32)
    assert not np.allclose(grouped, np.concatenate([single(feed)["y"] for feed in data[:16]]))
    with caplog.at_level(logging.INFO, logger="edgeopt.quant.grouping"):
        ranges = _calibrated_ranges(model, data, names)
    assert FALLBACK_MESSAGE in caplog.text
    assert ranges == _per_sample_ranges(model, data, names)


def _softmax_after_a_leading_minus_one_reshape() -> ir.Model:
    """x[1,4,8] -> Transpose(1,0,2) -> Reshape [-1, 32] -> Softmax -> y[1,32].

    A seq-first layout (as exported from ``batch_first=False`` attention): the
    Reshape's ``-1`` absorbs the batch, so at batch N y is [N, 32] -- the right
    shape -- but each row holds pieces of 4 samples. No Reshape starts with a
    literal 1, so ``batch_one_reshapes`` rewrites nothing.
    """
    nodes = [
        helper.make_node("Transpose", ["x"], ["moved"], name="moved", perm=[1, 0, 2]),
        helper.make_node("Reshape", ["moved", "rows_shape"], ["rows"], name="rows"),
        helper.make_node("Softmax", ["rows"], ["y"], name="y", axis=-1),
    ]
    return _model(nodes, (1, 4, 8), (1, 32), [("rows_shape", _shape(-1, 32))])


def test_grouped_runs_that_mix_samples_without_any_rewrite_are_caught():
    model = _softmax_after_a_leading_minus_one_reshape()
    assert batch_one_reshapes(model) == {}
    data = _samples((1, 4, 8))
    names = _tensor_names(model)
    assert _calibrated_ranges(model, data, names) == _per_sample_ranges(model, data, names)


def _rows_of_sixteen() -> ir.Model:
    """x[1,16,8] -> Reshape [16,-1] -> ReduceMean(axis 1) -> y[16,1]: a fixed dim that equals the group size.

    At batch 16, y is [16, 1] (dim 0 matches the group) but row i is the mean
    of sample i instead of the mean of row i of the one sample.
    """
    nodes = [
        helper.make_node("Reshape", ["x", "rows_shape"], ["rows"], name="rows"),
        helper.make_node("ReduceMean", ["rows"], ["y"], name="y", axes=[1], keepdims=1),
    ]
    return _model(nodes, (1, 16, 8), (16, 1), [("rows_shape", _shape(16, -1))])


def test_a_fixed_dim_equal_to_the_group_size_is_not_taken_for_the_batch():
    model = _rows_of_sixteen()
    data = _samples((1, 16, 8))
    names = _tensor_names(model)
    assert _calibrated_ranges(model, data, names) == _per_sample_ranges(model, data, names)


def test_groups_are_bounded_by_the_tensors_they_return_not_only_by_their_input():
    # token ids are 1 KB a sample, the activations they expand to megabytes: 16 samples per run took a
    # BERT-mini's calibration to 1 GB of peak memory (300 MB in groups bounded by what comes back)
    from edgeopt.quant.grouping import GROUP_FETCH_BYTES, GROUP_SIZE, group_size

    ids = [eir.InputSpec(name="ids", shape=(1, 128), dtype=np.dtype(np.int64))]
    assert group_size(ids, []) == GROUP_SIZE
    assert group_size(ids, [], fetched_bytes=GROUP_FETCH_BYTES // 3) == 3
    assert group_size(ids, [], fetched_bytes=2 * GROUP_FETCH_BYTES) == 1


def _conv_relu() -> ir.Model:
    """x[1,3,8,8] -> Conv 3x3 -> Relu -> y: a grouped model (the batch is free)."""
    weight = np.random.default_rng(2).standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["y"], name="y")]
    return _model(nodes, (1, 3, 8, 8), (1, 4, 8, 8), [("w", weight)])


def _histograms(model: ir.Model, data, names: Sequence[str], method: str) -> dict[str, tuple]:
    from edgeopt.quant import CalibrationMethod

    result = calibrate(model, iter(data), names, CalibrationConfig(method=CalibrationMethod(method)))
    out = {}
    for name in names:
        tensor = result.tensors[name]
        hist = tensor.histogram
        out[name] = (hist.width, hist.start, hist.counts.tobytes(), hist.zeros, tensor.range)
    return out


def test_histograms_and_ranges_do_not_depend_on_how_samples_are_grouped_into_runs(monkeypatch):
    # The bin grid comes from the first sample with a non-zero value and only doubles afterwards; it
    # once came from the first run, so 16 samples per run gave other ranges than 1 or 5 per run (and
    # group sizes depend on the model's size). The first sample is all zeros: it must not set the grid.
    from edgeopt.quant import grouping

    model = _conv_relu()
    data = _samples((1, 3, 8, 8), seed=3)
    data[0] = {"x": np.zeros((1, 3, 8, 8), np.float32)}
    data[5] = {"x": 8.0 * data[5]["x"]}  # the grid doubles in the middle of a group
    names = _tensor_names(model)
    for method in ("percentile", "entropy", "mse"):
        results = []
        for size in (1, 5, 16):
            monkeypatch.setattr(grouping, "GROUP_SIZE", size)
            results.append(_histograms(model, data, names, method))
        assert results[0] == results[1] == results[2], method


class _OrderHook:
    """Records the first value of every batch it sees, in order (groupable: sees groups as one batch)."""

    groupable = True
    tensors = ("y",)

    def __init__(self) -> None:
        self.seen: list[float] = []

    def update(self, feed, outputs) -> None:
        self.seen.extend(float(sample.reshape(-1)[0]) for sample in outputs["y"])


@pytest.mark.parametrize("size", [1, 16])
def test_runs_in_flight_give_what_one_run_at_a_time_gives(monkeypatch, size):
    # two runs at once (each on half the cores) must observe and hand the hooks every batch in data order
    from edgeopt.quant import CalibrationMethod, grouping

    model, data = _conv_relu(), _samples((1, 3, 8, 8), seed=4)
    names = _tensor_names(model)
    monkeypatch.setattr(grouping, "GROUP_SIZE", size)
    monkeypatch.setattr(grouping.os, "cpu_count", lambda: 2)
    results = []
    for width in (1, 2):
        monkeypatch.setattr(grouping, "RUNS_IN_FLIGHT", width)
        for method in (CalibrationMethod.MINMAX, CalibrationMethod.PERCENTILE):
            hook = _OrderHook()
            result = calibrate(model, iter(data), names, CalibrationConfig(method=method), hooks=[hook])
            results.append(({name: result.tensors[name].range for name in names}, hook.seen, result.num_batches))
    assert results[0] == results[2] and results[1] == results[3]
    assert results[0][2] == SAMPLES and len(results[0][1]) == SAMPLES


def test_the_min_of_a_clamped_tensor_is_its_floor():
    # min/max calibration takes a Relu's or a Clip(0.5, 4)'s floor for the min of its output (a range
    # holds 0 anyway), even where every value is above it; the max, and an unclamped tensor's min, as seen
    weight = np.random.default_rng(5).standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Abs", ["conv"], ["abs"]),
             helper.make_node("Add", ["abs", "one"], ["shifted"]),  # >= 1: above both floors
             helper.make_node("Relu", ["shifted"], ["relu"]),
             helper.make_node("Clip", ["shifted", "lo", "hi"], ["clip"]),
             helper.make_node("Add", ["relu", "clip"], ["y"])]
    scalars = [(name, np.array(value, np.float32)) for name, value in (("one", 1.0), ("lo", 0.5), ("hi", 4.0))]
    model = _model(nodes, (1, 3, 8, 8), (1, 4, 8, 8), [("w", weight), *scalars])
    data = _samples((1, 3, 8, 8), seed=5)
    names = _tensor_names(model)
    result = calibrate(model, iter(data), names, CalibrationConfig())
    seen = _per_sample_ranges(model, data, names)
    assert seen["relu"][0] >= 1 and seen["clip"][0] >= 1
    assert result.tensors["relu"].minmax.range == (0.0, seen["relu"][1])
    assert result.tensors["clip"].minmax.range == (0.5, seen["clip"][1])
    assert result.tensors["conv"].minmax.range == seen["conv"] and seen["conv"][0] < 0


def test_runs_go_ahead_only_while_what_they_return_whole_is_small_and_known(monkeypatch):
    from edgeopt.quant import grouping

    monkeypatch.setattr(grouping.os, "cpu_count", lambda: 2)
    model = _conv_relu()  # conv and y: 4 x 8 x 8 float32 = 1 KiB a sample each
    assert grouping.run_bytes(model, ["conv", "y"], 16, gathered_bytes=100) == (2048 + 100) * 16
    assert grouping.runs_in_flight(model, [], 16) == 2
    assert grouping.runs_in_flight(model, ["conv", "y"], 16) == 2
    assert grouping.runs_in_flight(model, ["conv", "y"], grouping.RUN_AHEAD_FETCH_BYTES // 2048 + 1) == 1
    model.graph.node(0).outputs[0].shape = ir.Shape(["n", 4, 8, 8])  # not static: its size is unknown
    assert grouping.run_bytes(model, ["conv"], 1) is None and grouping.run_bytes(model, [], 1) == 0
    assert grouping.runs_in_flight(model, ["conv"], 1) == 1
    monkeypatch.setattr(grouping.os, "cpu_count", lambda: 1)
    assert grouping.runs_in_flight(model, [], 16) == 1


def test_observing_on_the_calling_thread_gives_what_the_worker_threads_give(monkeypatch):
    # runs returning little whole are observed between runs on the calling thread, others beside the runs on
    # worker threads: the same statistics, batches handed to the hooks in the same order, the same progress
    import importlib

    from edgeopt.quant import CalibrationMethod

    calibrate_module = importlib.import_module("edgeopt.quant.calibrate")  # (the package's calibrate is the function)
    model, data = _conv_relu(), _samples((1, 3, 8, 8), seed=6)
    names = _tensor_names(model)
    chosen = []
    observe = calibrate_module._observe_runs
    monkeypatch.setattr(calibrate_module, "_observe_runs",
                        lambda *args, inline, **kw: (chosen.append(inline), observe(*args, inline=inline, **kw))[1])
    results = []
    for limit in (calibrate_module.INLINE_OBSERVATION_BYTES, 0):  # 0: nothing is light enough, threads
        monkeypatch.setattr(calibrate_module, "INLINE_OBSERVATION_BYTES", limit)
        for method in (CalibrationMethod.MINMAX, CalibrationMethod.PERCENTILE):
            hook, progress = _OrderHook(), []
            result = calibrate(model, data, names, CalibrationConfig(method=method), hooks=[hook],
                               progress=lambda done, total: progress.append((done, total)))
            ranges = {name: (result.tensors[name].range, dict(result.tensors[name].ranges)) for name in names}
            results.append((ranges, hook.seen, result.num_batches, progress))
    assert chosen == [True, True, False, False]
    assert results[0] == results[2] and results[1] == results[3]
    assert results[1][3] == [(done, SAMPLES) for done in range(1, SAMPLES + 1)]

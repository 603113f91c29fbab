"""GPTQ rounding of depthwise convolutions (``--depthwise-gptq``), from tap correlations summed in the calibration
pass."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

import edgeopt
from edgeopt.errors import ConfigError
from edgeopt.quant.adaround import conv_geometry
from edgeopt.quant.depthwise_rounding import (DEFAULT_MAX_SHARE, POSITIONS, DepthwiseCorrelationHook,
                                              DepthwiseInputs, is_depthwise, round_depthwise, statistics_share)
from edgeopt.quant.gptq import output_error
from edgeopt.quant.primitives import quantize_per_channel
from tests.passes._helpers import make_model
from tests.quant.test_gptq import dw_net_path  # noqa: F401 (a fixture: the depthwise-separable net)


def _depthwise(channels: int, spatial: list[int], kernel: list[int], *, multiplier: int = 1, seed: int = 0,
               **attributes) -> ir.Model:
    weight = np.random.default_rng(seed).standard_normal((channels * multiplier, 1, *kernel)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=channels, **attributes)
    pads, strides, _, size = conv_geometry(ir.from_proto(node), weight, tuple(spatial))
    return make_model([node], [("x", [1, channels, *spatial])], [("y", [1, channels * multiplier, *size])],
                      [numpy_helper.from_array(weight, "w")])


def _im2col_gram(samples: np.ndarray, kernel, strides, pads, dilations) -> tuple[np.ndarray, int]:
    """Sum over every sample and output position of ``t t^T`` per channel, ``t`` the taps: written out."""
    padded = np.pad(samples.astype(np.float64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span = [(kernel[a] - 1) * dilations[a] + 1 for a in range(2)]
    windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=(2, 3))
    windows = windows[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]  # [N, C, oh, ow, kh, kw]
    taps = windows.reshape(*windows.shape[:4], -1)
    count = taps.shape[0] * taps.shape[2] * taps.shape[3]
    return np.einsum("ncyxk,ncyxl->ckl", taps, taps), count


def _fed(hook: DepthwiseCorrelationHook, samples: np.ndarray, batch: int) -> dict[str, DepthwiseInputs]:
    for start in range(0, len(samples), batch):
        hook.update({"x": samples[start:start + batch]}, {})
    return hook.result()


@pytest.mark.parametrize(("spatial", "kernel", "attributes"), [
    ([4, 4], [3, 3], {"pads": [1, 1, 1, 1], "strides": [2, 2]}),  # 2 x 2 outputs, padding on every side
    ([5, 5], [3, 3], {"dilations": [2, 2], "pads": [1, 0, 0, 1]}),  # 2 x 2 outputs, dilated, uneven padding
    ([3, 4], [2, 2], {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),  # 2 x 2
])
def test_every_tap_of_a_small_feature_map_is_summed_as_im2col_gives_it(spatial, kernel, attributes):
    model = _depthwise(3, spatial, kernel, **attributes)
    samples = np.random.default_rng(1).standard_normal((5, 3, *spatial)).astype(np.float32)
    seen = _fed(DepthwiseCorrelationHook(model, ["dw"]), samples, batch=2)["dw"]
    pads, strides, dilations, _ = conv_geometry(next(iter(model.graph)), np.zeros((3, 1, *kernel)), tuple(spatial))
    for fold, picked in enumerate((samples[0::2], samples[1::2])):
        gram, rows = _im2col_gram(picked, kernel, strides, pads, dilations)
        assert (seen.rows[fold] == rows).all()
        np.testing.assert_allclose(seen.folds[fold], gram / rows, rtol=1e-6, atol=1e-9)


def test_a_1d_depthwise_conv_is_summed_as_a_1_by_k_one():
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=2, pads=[1, 1])
    weight = np.ones((2, 1, 3), np.float32)
    model = make_model([node], [("x", [1, 2, 6])], [("y", [1, 2, 6])], [numpy_helper.from_array(weight, "w")])
    samples = np.random.default_rng(2).standard_normal((4, 2, 6)).astype(np.float32)
    seen = _fed(DepthwiseCorrelationHook(model, ["dw"]), samples, batch=4)["dw"]
    gram, rows = _im2col_gram(samples[0::2, :, None, :], [1, 3], [1, 1], [0, 1, 0, 1], [1, 1])
    assert (seen.rows == rows).all() and rows == 2 * POSITIONS - 4  # 6 positions a sample: all of them
    np.testing.assert_allclose(seen.folds[0], gram / rows, rtol=1e-6)


def test_a_large_feature_map_gives_the_same_positions_whatever_the_batching():
    model = _depthwise(4, [16, 16], [3, 3], pads=[1, 1, 1, 1])
    samples = np.random.default_rng(3).standard_normal((11, 4, 16, 16)).astype(np.float32)
    one, grouped = (_fed(DepthwiseCorrelationHook(model, ["dw"]), samples, batch)["dw"] for batch in (1, 7))
    assert (one.rows == grouped.rows).all() and (one.rows == [[6 * POSITIONS], [5 * POSITIONS]]).all()
    np.testing.assert_allclose(one.folds, grouped.folds, rtol=1e-12)


def test_the_sampled_positions_spread_over_rows_columns_and_borders_and_the_correlations_match_all_of_them():
    """8 positions a sample on a 16 x 16 map: their taps' correlation within 3 % of every position's (taken
    every 32 along the flattened map they fell in 4 columns and missed both side borders: 8 % off)."""
    model = _depthwise(2, [16, 16], [3, 3], pads=[1, 1, 1, 1])
    index, _ = DepthwiseCorrelationHook(model, ["dw"])._taps("dw", next(iter(model.graph)), (16, 16))
    rows, cols = np.divmod(index.reshape(8, POSITIONS, 9)[:, :, 4], 16)  # the centre taps
    assert set(rows.ravel()) == set(cols.ravel()) == set(range(16))
    samples = 1.0 + np.random.default_rng(9).standard_normal((1024, 2, 16, 16)).astype(np.float32)
    seen = _fed(DepthwiseCorrelationHook(model, ["dw"]), samples, batch=16)["dw"]
    gram, count = _im2col_gram(samples, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1])
    error = np.linalg.norm(seen.gram - gram / count, axis=(1, 2)) / np.linalg.norm(gram / count, axis=(1, 2))
    assert (error < 0.03).all(), error  # measured: 2.4 % (1.6-2.0 % with 2,048 samples: sampling noise)


def test_positions_holding_nan_are_left_out_of_their_channel():
    model = _depthwise(2, [2, 2], [1, 2])
    samples = np.random.default_rng(4).standard_normal((4, 2, 2, 2)).astype(np.float32)
    poisoned = samples.copy()
    poisoned[2, 1, 0, 0] = np.nan  # channel 1 of sample 2 (fold 0), one of its 2 x 1 positions
    clean, seen = (_fed(DepthwiseCorrelationHook(model, ["dw"]), data, batch=4)["dw"] for data in (samples, poisoned))
    assert np.isfinite(seen.folds).all() and (seen.rows == [[4, 3], [4, 4]]).all()
    assert np.allclose(seen.folds[1], clean.folds[1]) and np.allclose(seen.folds[0, 0], clean.folds[0, 0])


def test_only_depthwise_convolutions_are_covered():
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="first", pads=[1, 1, 1, 1]),  # one input channel
             helper.make_node("Conv", ["a", "w2"], ["b"], name="dw", group=4, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["b", "w3"], ["c"], name="pointwise"),
             helper.make_node("Conv", ["c", "w4"], ["y"], name="dw1x1", group=4)]
    rng = np.random.default_rng(5)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in
               (("w1", (4, 1, 3, 3)), ("w2", (4, 1, 3, 3)), ("w3", (4, 4, 1, 1)), ("w4", (4, 1, 1, 1)))]
    model = make_model(nodes, [("x", [1, 1, 6, 6])], [("y", [1, 4, 6, 6])], weights)
    assert [node.name for node in model.graph if is_depthwise(node)] == ["dw"]
    assert DepthwiseCorrelationHook(model, [node.name for node in model.graph]).tensors == ("a",)


def _smooth(count: int, channels: int, size: int, seed: int) -> np.ndarray:
    """Spatially correlated inputs (a 3x3 box blur of noise), the case where GPTQ's error feedback pays."""
    noise = np.random.default_rng(seed).standard_normal((count, channels, size + 2, size + 2))
    return sum(noise[:, :, dy:dy + size, dx:dx + size] for dy in range(3) for dx in range(3)).astype(np.float32)


def test_the_rounding_has_less_output_error_on_unseen_inputs_than_the_nearest():
    model = _depthwise(32, [12, 12], [3, 3], multiplier=2, pads=[1, 1, 1, 1], seed=6)
    fitted = _fed(DepthwiseCorrelationHook(model, ["dw"]), _smooth(64, 32, 12, seed=7), batch=16)
    held_out = _fed(DepthwiseCorrelationHook(model, ["dw"]), _smooth(64, 32, 12, seed=8), batch=16)["dw"].gram
    result = round_depthwise(model, fitted)
    weight = next(iter(model.graph)).inputs[1].const_value.numpy()
    nearest, scale, _ = quantize_per_channel(weight, 0)
    matrices, steps = weight.reshape(32, 2, 9).astype(np.float64), np.asarray(scale, np.float64).reshape(32, 2, 1)
    error = {name: output_error(matrices - ints.reshape(32, 2, 9) * steps, held_out)
             for name, ints in (("nearest", nearest), ("gptq", result.weights["w"]))}
    assert len(result.layers) == 1 and result.layers[0].mse_learned < result.layers[0].mse_nearest
    assert error["gptq"].sum() < 0.8 * error["nearest"].sum(), {k: v.sum() for k, v in error.items()}
    assert np.mean(error["gptq"] <= error["nearest"]) > 0.8


def test_a_single_calibration_sample_keeps_the_nearest_rounding():
    """With one sample there is no second fold to check the rounding on, so none is trusted."""
    model = _depthwise(8, [12, 12], [3, 3], pads=[1, 1, 1, 1])
    result = round_depthwise(model, _fed(DepthwiseCorrelationHook(model, ["dw"]), _smooth(1, 8, 12, 9), batch=1))
    nearest, _, _ = quantize_per_channel(next(iter(model.graph)).inputs[1].const_value.numpy(), 0)
    assert np.array_equal(result.weights["w"], nearest)


# --------------------------------------------------------------------------
# through quantize
# --------------------------------------------------------------------------


def _depthwise_weights(path) -> dict[str, np.ndarray]:
    """The dequantized weight of each depthwise Conv of a QDQ model, by node name."""
    from edgeopt.quant.primitives import dequantize

    model = ir.load(path)
    weights = {}
    for node in model.graph:
        if node.op_type == "Conv" and node.attributes.get_int("group", 1) > 1:
            dq = node.inputs[1].producer()
            q, scale = (value.const_value.numpy() for value in dq.inputs[:2])
            weights[node.name] = dequantize(q, scale, 0, axis=dq.attributes.get_int("axis", 1))
    return weights


def test_quantize_rounds_the_depthwise_layers_and_their_output_error_falls_on_unseen_inputs(
        dw_net_path, tmp_path):
    from edgeopt.runtime.ort import observing_session

    calibration, held_out = _smooth(64, 3, 16, seed=10), _smooth(64, 3, 16, seed=11)
    paths, notes = {}, {}
    for name, config in (("default", edgeopt.Int8Config(depthwise_gptq=True)),
                         ("again", edgeopt.Int8Config(depthwise_gptq=True)), ("nearest", edgeopt.Int8Config())):
        paths[name] = tmp_path / f"{name}.onnx"
        notes[name] = edgeopt.quantize(str(dw_net_path), config, calibration, output=paths[name],
                                       check_fidelity=False, check_speed=False).result.notes
    pattern = (r"depthwise GPTQ: 2 layers, [1-9]\d* of 48 output channels rounded otherwise than to nearest "
               r"\(a channel keeps the nearest rounding unless GPTQ's, fitted on one half of the calibration "
               r"samples, also cuts the error on the other\), output error on the calibration data [1-9]\d % "
               r"below the nearest rounding's before bias correction; 0 skipped")
    assert any(re.fullmatch(pattern, note) for note in notes["default"]), notes["default"]
    assert not any("rounded by GPTQ" in note for note in notes["nearest"])
    assert paths["default"].read_bytes() == paths["again"].read_bytes()
    # each depthwise layer's output error on held-out inputs (their tap correlations, in the float model)
    model = ir.load(dw_net_path)
    hook = DepthwiseCorrelationHook(model, [node.name for node in model.graph])
    session = observing_session(model, list(hook.tensors))
    for image in held_out:
        feed = {"input": image[None]}
        hook.update(feed, session.run(feed, list(hook.tensors)))
    unseen = hook.result()
    floats = {node.name: node.inputs[1].const_value.numpy() for node in model.graph if node.name in unseen}
    rounded = {name: _depthwise_weights(paths[name]) for name in ("default", "nearest")}
    assert sorted(rounded["default"]) == sorted(unseen) and len(unseen) == 2
    total = dict.fromkeys(rounded, 0.0)
    for layer, weight in floats.items():
        errors = {name: output_error((weight - rounded[name][layer]).reshape(weight.shape[0], 1, -1).astype(
            np.float64), unseen[layer].gram).sum() for name in rounded}
        assert not np.array_equal(rounded["default"][layer], rounded["nearest"][layer])
        assert errors["default"] < errors["nearest"], (layer, errors)
        total = {name: total[name] + errors[name] for name in total}
    assert total["default"] < 0.9 * total["nearest"], total  # measured: 0.031 against 0.038


def test_gptq_rounds_the_depthwise_layers_with_the_rest(dw_net_path):
    notes = edgeopt.quantize(str(dw_net_path), edgeopt.Int8Config(gptq=True), _smooth(32, 3, 16, seed=12),
                             check_fidelity=False, check_speed=False).result.notes
    assert any(note.startswith("GPTQ rounding: 6 weights learned") for note in notes)
    assert not any(note.startswith("depthwise convolutions") for note in notes)


def test_the_setting_must_be_a_bool_and_is_one_way_of_rounding():
    with pytest.raises(ConfigError, match="depthwise_gptq must be True, False or None"):
        edgeopt.Int8Config(depthwise_gptq="no")
    for other in ("gptq", "adaround"):
        with pytest.raises(ConfigError, match=rf"^{other} \(--{other}\) rounds the depthwise convolutions too: "
                                              r"drop depthwise_gptq \(--depthwise-gptq\)$"):
            edgeopt.Int8Config(depthwise_gptq=True, **{other: True})
        assert edgeopt.Int8Config(**{other: True}).depthwise_gptq is None  # the default gives way to them


def test_a_channel_never_finite_keeps_the_nearest_rounding_and_the_others_are_still_rounded():
    """Channel 0 is NaN everywhere (a Log of zeros upstream): it has no rows (the layer was dropped whole)."""
    model = _depthwise(8, [12, 12], [3, 3], pads=[1, 1, 1, 1])
    samples = _smooth(64, 8, 12, seed=13)
    samples[:, 0] = np.nan
    with np.errstate(all="raise"):  # the NaN rows are found and left out without a numpy warning
        seen = _fed(DepthwiseCorrelationHook(model, ["dw"]), samples, batch=16)["dw"]
    assert (seen.rows[:, 0] == 0).all() and (seen.rows[:, 1:] > 0).all() and np.isfinite(seen.folds).all()
    result = round_depthwise(model, {"dw": seen})
    nearest, _, _ = quantize_per_channel(next(iter(model.graph)).inputs[1].const_value.numpy(), 0)
    assert np.array_equal(result.weights["w"][0], nearest[0])
    assert result.layers[0].channels_learned > 0


def _saved(path, nodes, inputs, outputs, weights: dict[str, tuple[int, ...]], seed: int) -> str:
    """:func:`make_model`'s model, its weights seeded N(0, 1), written to ``path``."""
    rng = np.random.default_rng(seed)
    initializers = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
                    for name, shape in weights.items()]
    ir.save(make_model(nodes, inputs, outputs, initializers), path)
    return str(path)


def _dw_model(tmp_path) -> str:
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="dw", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Conv", ["r", "w2"], ["y"], name="pw")]
    return _saved(tmp_path / "dw.onnx", nodes, [("x", [1, 8, 12, 12])], [("y", [1, 4, 12, 12])],
                  {"w1": (8, 1, 3, 3), "w2": (4, 8, 1, 1)}, seed=14)


@pytest.mark.parametrize("config", [
    edgeopt.Int8Config(depthwise_gptq=True, weight_granularity=edgeopt.quant.PerTensor()),
    edgeopt.Int8Config(depthwise_gptq=True, target=edgeopt.quant.Target.MCU)], ids=["per-tensor", "mcu"])
def test_the_rounding_keeps_the_nearest_rounding_s_scales(tmp_path, config):
    from edgeopt.runtime.ort import OrtSession

    path, data = _dw_model(tmp_path), [{"x": image[None]} for image in _smooth(32, 8, 12, seed=15)]
    scales = {}
    for name, setting in (("gptq", config), ("nearest", dataclasses.replace(config, depthwise_gptq=False))):
        output = tmp_path / f"{name}.onnx"
        notes = edgeopt.quantize(path, setting, data, output=output, check_speed=False).result.notes
        assert any(note.startswith("depthwise GPTQ: 1 layer, ") for note in notes) is (name == "gptq")
        model = ir.load(output)
        OrtSession(model).run(data[0])
        dq = next(iter(n for n in model.graph if n.op_type == "Conv" and n.name == "dw")).inputs[1].producer()
        scales[name] = dq.inputs[1].const_value.numpy()
    assert np.array_equal(scales["gptq"], scales["nearest"])


def test_the_accuracy_search_rounds_once_and_matches_a_fresh_quantization(dw_net_path):
    from tests.quant.test_accuracy import _search_and_fresh
    from edgeopt.quant.accuracy import AccuracyGoal

    data = [{"input": image[None]} for image in _smooth(16, 3, 16, seed=16)]
    search, same_bytes, fresh_notes = _search_and_fresh(
        ir.load(dw_net_path), edgeopt.Int8Config(depthwise_gptq=True), data,
        AccuracyGoal(min_sqnr_db=200.0, max_float_nodes=3))
    assert len(search.steps) >= 2 and search.calibration_passes == 1
    assert same_bytes and search.result.notes == fresh_notes
    assert any(note.startswith("depthwise GPTQ: ") for note in fresh_notes)


def test_a_model_without_depthwise_layers_is_told_so(tmp_path):
    path = _saved(tmp_path / "plain.onnx", [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
                  [("x", [1, 3, 8, 8])], [("y", [1, 4, 6, 6])], {"w": (4, 3, 3, 3)}, seed=17)
    data = [{"x": image[None]} for image in _smooth(16, 3, 8, seed=18)]
    notes = edgeopt.quantize(path, edgeopt.Int8Config(depthwise_gptq=True), data, check_speed=False).result.notes
    assert "depthwise GPTQ: no depthwise convolution with a quantized weight to round" in notes


# --------------------------------------------------------------------------
# on by default where it costs little
# --------------------------------------------------------------------------


def test_the_statistics_share_is_their_multiply_adds_over_the_models():
    """8 channels of 3x3 taps: 8 positions x 81 per channel, against the Conv's 9 per output element."""
    small = _depthwise(8, [12, 12], [3, 3], pads=[1, 1, 1, 1])
    large = _depthwise(8, [64, 64], [3, 3], pads=[1, 1, 1, 1])
    assert statistics_share(small, ["dw"]) == pytest.approx(8 * 8 * 81 / (8 * 144 * 9))  # 50 %
    assert statistics_share(large, ["dw"]) == pytest.approx(8 * 8 * 81 / (8 * 4096 * 9))  # 1.8 %
    assert statistics_share(large, ["dw"]) < DEFAULT_MAX_SHARE < statistics_share(small, ["dw"])
    doubled = _depthwise(8, [12, 12], [3, 3], multiplier=2, pads=[1, 1, 1, 1])  # one correlation per group
    assert statistics_share(doubled, ["dw"]) == pytest.approx(8 * 8 * 81 / (16 * 144 * 9))
    tiny = _depthwise(8, [2, 2], [3, 3], pads=[1, 1, 1, 1])  # 4 positions, all of them
    assert statistics_share(tiny, ["dw"]) == pytest.approx(8 * 4 * 81 / (8 * 4 * 9))
    batch = ir.SymbolicDim("N")  # a free batch dim is one sample
    for value in (*large.graph.inputs, *large.graph.outputs):
        value.shape = ir.Shape([batch, *list(value.shape)[1:]])
    assert statistics_share(large, ["dw"]) == pytest.approx(8 * 8 * 81 / (8 * 4096 * 9))
    for value in large.graph.outputs:
        value.shape = None  # unknown: looks costly
    assert statistics_share(large, ["dw"]) == float("inf")


def test_a_depthwise_layer_of_unknown_size_makes_the_share_infinite(tmp_path):
    """The pointwise conv's cost is known, the depthwise one's output size is not: not "free"."""
    model = ir.load(_dw_model(tmp_path))  # its shapes inferred
    assert statistics_share(model, ["dw"]) == pytest.approx(8 * 8 * 81 / (8 * 144 * 9 + 4 * 144 * 8))
    next(node for node in model.graph if node.name == "dw").outputs[0].shape = ir.Shape([1, 8, "H", "W"])
    assert statistics_share(model, ["dw"]) == float("inf")


@pytest.mark.parametrize(("size", "by_default"), [(64, True), (12, False)])
def test_by_default_the_depthwise_layers_are_rounded_where_the_statistics_cost_little(tmp_path, size, by_default):
    model = _depthwise(8, [size, size], [3, 3], pads=[1, 1, 1, 1], seed=19)
    path = tmp_path / "dw.onnx"
    ir.save(model, path)
    data = [{"x": image[None]} for image in _smooth(24, 8, size, seed=20)]
    outputs, notes = {}, {}
    for name, setting in (("default", None), ("on", True), ("off", False)):
        outputs[name] = tmp_path / f"{name}.onnx"
        notes[name] = edgeopt.quantize(str(path), edgeopt.Int8Config(depthwise_gptq=setting), data,
                                       output=outputs[name], check_speed=False).result.notes
    same = "on" if by_default else "off"
    assert outputs["default"].read_bytes() == outputs[same].read_bytes()
    assert outputs["on"].read_bytes() != outputs["off"].read_bytes()
    share = statistics_share(model, ["dw"])
    if by_default:
        prefix = (f"depthwise GPTQ (by default: its statistics cost {100 * share:.1f} % of the model's multiply-adds, "
                  "at most 2.0 %; --no-depthwise-gptq skips it): 1 layer, ")
        assert any(note.startswith(prefix) for note in notes["default"]), notes["default"]
    else:
        assert (f"depthwise GPTQ off: its statistics would cost {100 * share:.1f} % of the model's multiply-adds "
                "(on by default up to 2.0 %); --depthwise-gptq rounds the depthwise convolutions anyway"
                in notes["default"])
    assert not any(note.startswith("depthwise GPTQ") for note in notes["off"])


def test_layers_of_one_shape_are_rounded_together_as_each_alone(dw_net_path):
    from edgeopt.runtime.ort import observing_session

    model = ir.load(dw_net_path)
    hook = DepthwiseCorrelationHook(model, [node.name for node in model.graph])
    session = observing_session(model, list(hook.tensors))
    for image in _smooth(24, 3, 16, seed=22):
        feed = {"input": image[None]}
        hook.update(feed, session.run(feed, list(hook.tensors)))
    seen = hook.result()
    assert len(seen) == 2
    together = round_depthwise(model, seen)
    for name in seen:
        alone = round_depthwise(model, {name: seen[name]})
        (weight, ints), = alone.weights.items()
        assert np.array_equal(together.weights[weight], ints)
        assert alone.layers == tuple(layer for layer in together.layers if layer.weight == weight)


def test_a_depthwise_layer_of_unknown_size_is_off_by_default_and_the_note_says_why(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=4, pads=[1, 1])]  # over a free time axis
    path = _saved(tmp_path / "tcn.onnx", nodes, [("x", [1, 4, "T"])], [("y", [1, 4, "T"])], {"w": (4, 1, 3)},
                  seed=25)
    rng = np.random.default_rng(25)
    data = [{"x": rng.standard_normal((1, 4, 20)).astype(np.float32)} for _ in range(16)]
    notes = edgeopt.quantize(path, edgeopt.Int8Config(), data, check_speed=False).result.notes
    assert ("depthwise GPTQ off: the size per sample of its statistics or of the model is unknown (free spatial "
            "or time dims) (on by default up to 2.0 %); --depthwise-gptq rounds the depthwise convolutions anyway"
            in notes), notes


def test_the_default_is_decided_on_all_the_depthwise_layers_whatever_is_excluded(tmp_path):
    """Two depthwise layers cost 3.7 % together, 1.9 % alone: excluding one (as a round of the accuracy
    search does) must not switch the rounding on for the other."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="dw1", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "w2"], ["b"], name="dw2", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["b", "w3"], ["y"], name="pw")]
    path = _saved(tmp_path / "two.onnx", nodes, [("x", [1, 8, 32, 32])], [("y", [1, 16, 32, 32])],
                  {"w1": (8, 1, 3, 3), "w2": (8, 1, 3, 3), "w3": (16, 8, 1, 1)}, seed=26)
    data = [{"x": image[None]} for image in _smooth(16, 8, 32, seed=27)]
    off = ("depthwise GPTQ off: its statistics would cost 3.7 % of the model's multiply-adds (on by default up to "
           "2.0 %); --depthwise-gptq rounds the depthwise convolutions anyway")
    for exclude in ((), ("dw1",)):
        notes = edgeopt.quantize(path, edgeopt.Int8Config(exclude=exclude), data, check_speed=False).result.notes
        assert off in notes, (exclude, notes)

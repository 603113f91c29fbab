"""The per-channel statistics hooks of bias correction, SmoothQuant and int4's clipping search."""

from __future__ import annotations

import numpy as np
import pytest

from edgeopt.quant.channel_stats import ChannelAbsMaxHook, ChannelMeanHook, ChannelMomentsHook

_SAMPLES = np.random.default_rng(0).standard_normal((6, 5, 3)).astype(np.float32)  # [batch, tokens, channels]

_EXPECTED = {
    ChannelAbsMaxHook: np.abs(_SAMPLES).max(axis=(0, 1)),
    ChannelMeanHook: _SAMPLES.astype(np.float64).mean(axis=(0, 1)),
    ChannelMomentsHook: np.square(_SAMPLES.astype(np.float64)).mean(axis=(0, 1)),
}


def _hook(kind):
    return kind(["x"]) if kind is ChannelMomentsHook else kind({"x": -1})


def _seen(hook) -> dict[str, np.ndarray]:
    """The hook's statistic by tensor; int4's moments by their mean square (their mean: the last test)."""
    return {name: getattr(value, "mean_square", value) for name, value in hook.result().items()}


@pytest.mark.parametrize("kind", list(_EXPECTED))
def test_a_statistic_does_not_depend_on_how_samples_are_batched(kind):
    whole, one_by_one = _hook(kind), _hook(kind)
    whole.update({}, {"x": _SAMPLES})
    for sample in _SAMPLES:
        one_by_one.update({}, {"x": sample[None]})

    assert kind.groupable
    np.testing.assert_allclose(_seen(whole)["x"], _EXPECTED[kind], rtol=1e-6)
    np.testing.assert_allclose(_seen(one_by_one)["x"], _seen(whole)["x"], rtol=1e-12)


@pytest.mark.parametrize("kind", list(_EXPECTED))
def test_non_finite_values_are_left_out_of_their_channel(kind):
    hook = _hook(kind)
    poisoned = _SAMPLES.copy()
    poisoned[0, 0, 1], poisoned[1, 2, 1] = np.nan, np.inf
    hook.update({}, {"x": poisoned})

    finite = np.ma.masked_invalid(poisoned.astype(np.float64)).reshape(-1, 3)
    column = {ChannelAbsMaxHook: np.abs(finite).max(axis=0), ChannelMeanHook: finite.mean(axis=0),
              ChannelMomentsHook: np.square(finite).mean(axis=0)}[kind]
    np.testing.assert_allclose(_seen(hook)["x"], np.asarray(column), rtol=1e-6)


@pytest.mark.parametrize("kind", list(_EXPECTED))
def test_graph_inputs_come_from_the_feed_and_unusable_tensors_are_left_out(kind):
    hook = kind(["x", "ids", "scalar", "absent"]) if kind is ChannelMomentsHook else \
        kind({"x": -1, "ids": -1, "scalar": -1, "absent": -1})
    hook.update({"x": _SAMPLES, "ids": np.arange(6).reshape(2, 3)}, {"scalar": np.float32(2.0)})

    assert set(hook.result()) == {"x"}
    np.testing.assert_allclose(_seen(hook)["x"], _EXPECTED[kind], rtol=1e-6)


def test_int4_importance_is_float32_and_bias_correction_means_float64():
    square, mean = ChannelMomentsHook(["x"]), ChannelMeanHook({"x": -1})
    for hook in (square, mean):
        hook.update({}, {"x": _SAMPLES})

    assert square.result()["x"].mean_square.dtype == np.float32
    assert mean.result()["x"].dtype == np.float64


def test_int4s_moments_are_the_mean_square_and_the_mean_of_each_channel():
    # the clipping search weighs a block's errors by the channels' variance and, together, by their mean
    whole, one_by_one = ChannelMomentsHook(["x"]), ChannelMomentsHook(["x"])
    whole.update({}, {"x": _SAMPLES})
    for sample in _SAMPLES:
        one_by_one.update({}, {"x": sample[None]})
    seen = whole.result()["x"]
    assert seen.mean_square.dtype == seen.mean.dtype == np.float32
    np.testing.assert_allclose(seen.mean_square, _EXPECTED[ChannelMomentsHook], rtol=1e-6)
    np.testing.assert_allclose(seen.mean, _EXPECTED[ChannelMeanHook], rtol=1e-6)
    np.testing.assert_array_equal(one_by_one.result()["x"].mean, seen.mean)


def test_means_reduced_in_onnx_runtime_sum_as_each_tensor_s_own_and_mix_with_whole_ones():
    """The hook sums the runs' reduced means of all its tensors as one vector: exactly each tensor's own
    running sums, a channel whose mean is not finite left out of that run, a whole tensor beside them."""
    from edgeopt.quant.channel_stats import ChannelMeanObserver
    from edgeopt.runtime.range_session import CHANNEL_MEAN_SUFFIXES

    mean_suffix, size_suffix = CHANNEL_MEAN_SUFFIXES

    rng = np.random.default_rng(3)
    runs = [{"a": rng.standard_normal(4).astype(np.float32), "b": rng.standard_normal(2).astype(np.float32)}
            for _ in range(5)]
    runs[2]["b"][1] = np.nan
    hook = ChannelMeanHook({"a": 1, "b": 1, "w": 1})
    reference = {name: ChannelMeanObserver() for name in ("a", "b")}
    for index, run in enumerate(runs):
        sizes = {"a": np.int64(4 * (index + 7)), "b": np.int64(2 * 9)}
        outputs = {**{name + mean_suffix: mean for name, mean in run.items()},
                   **{name + size_suffix: size for name, size in sizes.items()},
                   "w": _SAMPLES[index:index + 1].reshape(1, 3, 5)}
        hook.update({}, outputs)
        for name, mean in run.items():
            reference[name].update_mean(mean, int(sizes[name]) // mean.size)
    seen = hook.result()
    for name in ("a", "b"):
        assert np.array_equal(seen[name], reference[name].result().mean)
    np.testing.assert_allclose(seen["b"][1], np.mean([run["b"][1] for run in runs if np.isfinite(run["b"][1])],
                                                     dtype=np.float64), rtol=1e-12)
    np.testing.assert_allclose(seen["w"], _SAMPLES[:5].astype(np.float64).reshape(5, 3, 5).mean(axis=(0, 2)))

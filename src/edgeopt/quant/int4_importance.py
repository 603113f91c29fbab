"""Input-channel importance for int4's per-block clipping search, from calibration data.

A layer ``y = x @ W`` with ``W`` rounded to ``W + E`` makes the output error
``x @ E``; its expected square over the data, summed over a column's block,
is ``sum_k E[x_k**2] E_k**2`` plus cross terms ``E[x_j x_k] E_j E_k`` that
have no sign to exploit for independent rounding errors. So the mean square
``h_k = E[x_k**2]`` of each input channel k (the last axis of the layer's
input) weighs the weight error of row k: a channel that is always near zero
costs nothing however coarse its weights, and a loud one (a transformer's
outlier channels) costs the most. One streaming pass, sums only: the result
does not depend on how samples are batched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from edgeopt.quant.calibrate import calibrate
from edgeopt.quant.config import CalibrationConfig
from edgeopt.quant.registry import Batch, ProgressCallback

__all__ = ["ChannelMeanSquareHook", "input_channel_importance"]


class ChannelMeanSquareHook:
    """A calibration hook (``update(feed, outputs)``) averaging ``x**2`` per last-axis channel of ``tensors``.

    Non-finite values are left out of their channel's mean.
    """

    groupable = True  # per-channel sums: the same whatever the batching

    def __init__(self, tensors: Iterable[str]) -> None:
        self.tensors = {name: -1 for name in tensors}
        self._sums: dict[str, np.ndarray] = {}
        self._counts: dict[str, np.ndarray] = {}

    def update(self, feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        for name in self.tensors:
            array = outputs[name] if name in outputs else feed.get(name)
            if array is None or not np.issubdtype(np.asarray(array).dtype, np.floating) or not np.ndim(array):
                continue
            rows = np.asarray(array, dtype=np.float64).reshape(-1, np.shape(array)[-1])
            finite = np.isfinite(rows)
            self._add(name, np.square(np.where(finite, rows, 0.0)).sum(axis=0), finite.sum(axis=0))

    def _add(self, name: str, total: np.ndarray, count: np.ndarray) -> None:
        if name in self._sums and self._sums[name].shape == total.shape:
            self._sums[name] += total
            self._counts[name] += count
        elif name not in self._sums:
            self._sums[name], self._counts[name] = total, count

    def result(self) -> dict[str, np.ndarray]:
        """``E[x**2]`` per channel, float32, by tensor name (tensors never seen are left out)."""
        return {name: (total / np.maximum(self._counts[name], 1)).astype(np.float32)
                for name, total in self._sums.items()}


def input_channel_importance(model, data: Iterable[Batch], tensors: Iterable[str], *,
                             progress: ProgressCallback | None = None) -> dict[str, np.ndarray]:
    """``E[x**2]`` per last-axis channel of each of ``tensors`` (the layers' inputs) over ``data``."""
    names = list(dict.fromkeys(tensors))
    hook = ChannelMeanSquareHook(names)
    calibrate(model, data, names, CalibrationConfig(), progress=progress, hooks=[hook])
    return hook.result()

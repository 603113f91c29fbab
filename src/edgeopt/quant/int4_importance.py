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

from collections.abc import Iterable

import numpy as np

from edgeopt.quant.calibrate import calibrate
from edgeopt.quant.channel_stats import ChannelMeanSquareHook
from edgeopt.quant.config import CalibrationConfig
from edgeopt.quant.registry import Batch, ProgressCallback

__all__ = ["ChannelMeanSquareHook", "input_channel_importance"]


def input_channel_importance(model, data: Iterable[Batch], tensors: Iterable[str], *,
                             progress: ProgressCallback | None = None) -> dict[str, np.ndarray]:
    """``E[x**2]`` per last-axis channel of each of ``tensors`` (the layers' inputs) over ``data``."""
    names = list(dict.fromkeys(tensors))
    hook = ChannelMeanSquareHook(names)
    calibrate(model, data, names, CalibrationConfig(), progress=progress, hooks=[hook])
    return hook.result()

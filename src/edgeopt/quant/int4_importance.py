"""Input-channel statistics for int4's per-block clipping search and GPTQ, from calibration data.

A layer ``y = x @ W`` with ``W`` rounded to ``W + E`` makes the output error
``x @ E``; its expected square over the data, per output column ``e``, is
``e^T H e`` with ``H = E[x x^T]`` the correlation of the input channels (the
last axis of the layer's input). The clipping search weighs the weight error
of row k by the diagonal alone, ``h_k = E[x_k**2]``: cross terms
``H_jk e_j e_k`` have no sign to exploit for independent rounding errors. A
channel that is always near zero then costs nothing however coarse its
weights, and a loud one (a transformer's outlier channels) costs the most.
GPTQ (:mod:`edgeopt.quant.int4_gptq`) makes the errors dependent, so it reads
all of ``H``: ``K x K`` float64 sums per input tensor, shared by the layers
that read it. One streaming pass, sums only: the result does not depend on
how samples are batched.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from edgeopt.quant.calibrate import calibrate
from edgeopt.quant.channel_stats import (
    ChannelMeanSquareHook,
    ChannelStatsHook,
    InputCorrelationHook,
    LayerInputStatistics,
)
from edgeopt.quant.config import CalibrationConfig
from edgeopt.quant.registry import Batch, ProgressCallback

__all__ = ["ChannelMeanSquareHook", "LayerInputStatistics", "input_channel_importance", "layer_input_statistics",
           "summed_statistics"]


def _observed(model, data: Iterable[Batch], hook: ChannelStatsHook,
              progress: ProgressCallback | None) -> dict[str, object]:
    names = list(hook.tensors)
    calibrate(model, data, names, CalibrationConfig(), progress=progress, hooks=[hook])
    return hook.result()


def input_channel_importance(model, data: Iterable[Batch], tensors: Iterable[str], *,
                             progress: ProgressCallback | None = None) -> dict[str, np.ndarray]:
    """``E[x**2]`` per last-axis channel of each of ``tensors`` (the layers' inputs) over ``data``."""
    return _observed(model, data, ChannelMeanSquareHook(dict.fromkeys(tensors)), progress)


def layer_input_statistics(model, data: Iterable[Batch], tensors: Iterable[str], *, correlation: bool,
                           progress: ProgressCallback | None = None) -> dict[str, LayerInputStatistics]:
    """:class:`LayerInputStatistics` of each of ``tensors`` over ``data``, with ``gram`` when
    ``correlation`` (memory ``K * K`` float64 per tensor); tensors never seen are left out."""
    if not correlation:
        return {name: LayerInputStatistics(mean_square=mean_square)
                for name, mean_square in input_channel_importance(model, data, tensors, progress=progress).items()}
    return _observed(model, data, InputCorrelationHook(dict.fromkeys(tensors)), progress)


def summed_statistics(readers: Iterable[LayerInputStatistics | None], k: int) -> LayerInputStatistics | None:
    """The statistics of a weight read by several layers (tied embeddings), each adding its output's
    error: the sums of theirs; None when some reader's is unknown or not of ``k`` channels."""
    readers = list(readers)
    if not readers or any(seen is None or seen.mean_square.shape != (k,) for seen in readers):
        return None
    if len(readers) == 1:
        return readers[0]
    grams = [seen.gram for seen in readers]
    return LayerInputStatistics(mean_square=sum(seen.mean_square for seen in readers),
                                gram=None if any(gram is None for gram in grams) else sum(grams),
                                rows=min(seen.rows for seen in readers))

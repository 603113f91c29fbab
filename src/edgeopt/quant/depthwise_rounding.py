"""Depthwise convolutions rounded by GPTQ by default, from input statistics of the one calibration pass.

An output channel of a depthwise 3x3 convolution sums 9 products, so its
weights' rounding errors do not average out as those of a 1x1 convolution
over 96 channels do, and int8 MobileNets lose much of their fidelity there.
GPTQ (:mod:`edgeopt.quant.gptq`) rounds a layer's weights so that the errors
cancel in the layer's output; all it needs of the data is the correlation
``H = E[x x^T]`` of the taps each output channel reads. For a depthwise
convolution (``weight [M, 1, k...]``, ``group > 1``) that is a ``K x K``
matrix per input channel (``K = k*k`` taps), small enough to gather in the
calibration pass itself, beside the ranges: :class:`DepthwiseCorrelationHook`
reads each layer's input batch by batch and sums ``x x^T`` over
:data:`POSITIONS` output positions of each sample (evenly spaced, on one of
eight interleaved grids in turn; every position of a smaller feature map).
The samples' count, not the feature map's size, sets the rows: 200 samples
give 1,600 per layer, plenty for a 9 x 9 or 25 x 25 correlation, which GPTQ
shrinks toward its diagonal by its sampling noise. :func:`round_depthwise`
then rounds each layer's weights from those sums, and each output channel
keeps whichever of the GPTQ and the nearest rounding has the smaller output
error on them.

On the benchmark's models (``benchmarks/quantize_vs_ort.py``, output SQNR
against the float model on its larger evaluation set) it gains 0.4 dB on
MobileNetV2 at 224x224 (14.9 -> 15.3 dB), 0.1 to 0.7 dB on the 32x32
depthwise-separable nets, for about 0.05 s of calibration time on those.
``--gptq`` and ``--adaround`` round every layer, these included, from sampled
input rows instead; ``Int8Config(depthwise_gptq=False)``
(``--no-depthwise-gptq``) keeps the nearest rounding.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.quant.adaround import (SHARED_WEIGHT, AdaRoundResult, RoundedLayer, conv_geometry,
                                    quantized_weight_axis)
from edgeopt.quant.adaround_solver import channel_scales
from edgeopt.quant.config import PerChannel, PerTensor
from edgeopt.quant.gptq import gptq_from_gram, output_error
from edgeopt.quant.primitives import quantize_per_channel

__all__ = ["POSITIONS", "DepthwiseCorrelationHook", "DepthwiseInputs", "is_depthwise", "round_depthwise"]

#: Output positions per sample whose input taps are summed: every position of a feature map this
#: small or smaller, an evenly spaced sample of a larger one.
POSITIONS = 8
#: Samples gathered at a time (their taps: 16 x 8 positions x 25 taps x 960 channels, 3 million
#: values at most in a MobileNet).
_CHUNK = 16
#: Sample ``i`` of a large feature map takes the positions ``(j + (i mod 8 + 0.5) / 8) x spacing``:
#: eight interleaved grids, taken in turn.
_PHASES = 8


def is_depthwise(node: ir.Node) -> bool:
    """A depthwise 1-D or 2-D Conv: groups of one input channel each (``group > 1``, a float constant
    weight ``[M, 1, k...]`` of more than one tap). A Conv of a one-channel input (a grayscale network's
    first layer) has that weight too, but rounding the demo model's that way made its output less
    faithful (29.65 -> 29.49 dB on the benchmark's 4,050 images), so it keeps the nearest rounding."""
    if not eir.is_op(node, "Conv") or len(node.inputs) < 2 or node.inputs[0] is None:
        return False
    weight = eir.constant_array(node.inputs[1])
    return (node.attributes.get_int("group", 1) > 1 and weight is not None
            and np.issubdtype(weight.dtype, np.floating) and weight.ndim in (3, 4)
            and weight.shape[1] == 1 and int(np.prod(weight.shape[2:])) > 1)


@dataclass(frozen=True, kw_only=True)
class DepthwiseInputs:
    """What the calibration pass saw of a depthwise layer's input: per input channel (group), the mean
    ``E[x x^T]`` of the taps one output position reads, over the even and over the odd samples apart
    (``folds``: float64 ``[F, G, K, K]``, ``K`` taps; ``F`` = 2, or 1 when one of them saw nothing),
    each over ``rows[f]`` positions holding no NaN or infinity (the fewest of any channel)."""

    folds: np.ndarray
    rows: tuple[int, ...]

    @property
    def gram(self) -> np.ndarray:
        """``E[x x^T]`` over all the samples: ``[G, K, K]``."""
        weights = np.asarray(self.rows, dtype=np.float64) / sum(self.rows)
        return np.tensordot(weights, self.folds, axes=1)


class DepthwiseCorrelationHook:
    """A calibration hook summing the tap correlations of the inputs of the depthwise layers among ``nodes``.

    ``tensors`` lists what the calibration pass must fetch, ``layers`` the layers
    it covers; ``result()`` maps node name to :class:`DepthwiseInputs`.
    """

    #: Which positions a sample gives depends on its index in the stream, not on how samples are batched.
    groupable = True

    def __init__(self, model: ir.Model, nodes: Collection[str]) -> None:
        by_name = {node.name: node for node in model.graph}
        self._layers = {name: by_name[name] for name in dict.fromkeys(nodes)
                        if name in by_name and is_depthwise(by_name[name])}
        self.layers = frozenset(self._layers)
        self._weights = {name: eir.constant_array(node.inputs[1]) for name, node in self._layers.items()}
        self.tensors = tuple(dict.fromkeys(node.inputs[0].name for node in self._layers.values()))
        self._sums: dict[str, np.ndarray] = {}
        self._rows: dict[str, np.ndarray] = {}
        self._seen: dict[str, int] = {}
        self._tap_cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def update(self, feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        for name, node in self._layers.items():
            tensor = node.inputs[0].name
            batch = outputs[tensor] if tensor in outputs else feed.get(tensor)
            if batch is None:
                continue
            batch, weight = np.asarray(batch), self._weights[name]
            group = node.attributes.get_int("group", 1)
            if (not np.issubdtype(batch.dtype, np.floating) or batch.ndim != weight.ndim
                    or batch.shape[1] != group or not batch.shape[0]):
                continue
            for start in range(0, batch.shape[0], _CHUNK):
                self._add(name, node, batch[start:start + _CHUNK])

    def _add(self, name: str, node: ir.Node, batch: np.ndarray) -> None:
        """Fold one chunk of samples ``[B, C, *spatial]`` into the layer's sums."""
        spatial = batch.shape[2:]
        count, channels = batch.shape[:2]
        planes = batch.reshape(count, channels, -1)
        first = self._seen.get(name, 0)
        self._seen[name] = first + count
        folds: tuple[list, list] = ([], [])  # the taps of the even and the odd samples of the stream
        for i in range(count):
            index, outside = self._taps(name, node, spatial, (first + i) % _PHASES)
            taps = planes[i][:, index.reshape(-1)]
            taps[:, outside] = 0  # zero padding
            folds[(first + i) % 2].append(taps)
        for fold, gathered in enumerate(folds):
            if gathered:
                taps = gathered[0] if len(gathered) == 1 else np.concatenate(gathered, axis=1)
                self._fold_in(name, fold, taps.reshape(channels, -1, index.shape[1]))

    def _fold_in(self, name: str, fold: int, taps: np.ndarray) -> None:
        """Add the correlations of ``taps [C, rows, K]`` to the layer's sums of ``fold``."""
        taps = taps.astype(np.float64)
        gram = taps.transpose(0, 2, 1) @ taps
        rows = np.full(taps.shape[0], taps.shape[1], dtype=np.int64)
        if not np.isfinite(gram).all():  # a position with a NaN or infinity says nothing of the rounding
            finite = np.isfinite(taps).all(axis=2)
            taps = np.where(finite[..., None], taps, 0.0)
            gram, rows = taps.transpose(0, 2, 1) @ taps, finite.sum(axis=1)
        if name not in self._sums:
            self._sums[name] = np.zeros((2, *gram.shape))
            self._rows[name] = np.zeros((2, len(rows)), dtype=np.int64)
        self._sums[name][fold] += gram
        self._rows[name][fold] += rows

    def _taps(self, name: str, node: ir.Node, spatial: tuple[int, ...], phase: int) -> tuple[np.ndarray, np.ndarray]:
        """Where the taps of a sample's positions of ``phase`` lie in its flattened input plane
        (``[P, K]``), and which of them fall on the zero padding (flat indices into that array)."""
        key = (name, spatial, phase)
        if key not in self._tap_cache:
            weight = self._weights[name]
            pads, strides, dilations, (out_h, out_w) = conv_geometry(node, weight, spatial)
            height, width = (1, spatial[0]) if weight.ndim == 3 else spatial
            kernel = (1, weight.shape[2]) if weight.ndim == 3 else weight.shape[2:]
            positions = max(out_h * out_w, 1)
            take = min(positions, POSITIONS)
            spacing = positions / take
            flat = np.floor((np.arange(take) + (phase + 0.5) / _PHASES) * spacing).astype(np.int64)
            y, x = np.divmod(np.minimum(flat, positions - 1), max(out_w, 1))
            rows_at = y[:, None] * strides[0] - pads[0] + np.arange(kernel[0]) * dilations[0]  # [P, kh]
            cols_at = x[:, None] * strides[1] - pads[1] + np.arange(kernel[1]) * dilations[1]  # [P, kw]
            inside = (((rows_at >= 0) & (rows_at < height))[:, :, None]
                      & ((cols_at >= 0) & (cols_at < width))[:, None, :]).reshape(take, -1)
            index = (np.clip(rows_at, 0, height - 1)[:, :, None] * width
                     + np.clip(cols_at, 0, width - 1)[:, None, :]).reshape(take, -1)
            self._tap_cache[key] = index, np.flatnonzero(~inside)
        return self._tap_cache[key]

    def result(self) -> dict[str, DepthwiseInputs]:
        """The tap correlations by layer (layers never seen, or whose every position held NaN, left out)."""
        results = {}
        for name, sums in self._sums.items():
            rows = self._rows[name]
            seen = rows.min(axis=1) > 0
            if seen.any():
                folds = sums[seen] / rows[seen][:, :, None, None]
                results[name] = DepthwiseInputs(folds=folds, rows=tuple(int(r) for r in rows[seen].min(axis=1)))
        return results


def round_depthwise(model: ir.Model, inputs: Mapping[str, DepthwiseInputs],
                    granularity: PerTensor | PerChannel = PerChannel()) -> AdaRoundResult:
    """GPTQ rounding of each depthwise layer in ``inputs`` (node name -> :class:`DepthwiseInputs`).

    ``model`` is only read. Scales are the QDQ builder's (min/max int8
    symmetric, per output channel or per tensor); the result plugs into the
    QDQ builder and bias correction as AdaRound's does.
    """
    by_name = {node.name: node for node in model.graph}
    weights, scales, axes, layers, skipped = {}, {}, {}, [], []
    for name, seen in inputs.items():
        node = by_name.get(name)
        if node is None or not is_depthwise(node):
            skipped.append((name, "not a depthwise Conv of this model"))
            continue
        weight_name, weight = node.inputs[1].name, eir.constant_array(node.inputs[1])
        axis = quantized_weight_axis(node, weight.ndim, granularity)
        if weight_name in weights:
            skipped.append((name, f"its weight {weight_name!r} {SHARED_WEIGHT}"))
            continue
        if axis not in (None, 0):
            skipped.append((name, f"its scales run along weight axis {axis}, not the output channels"))
            continue
        _, scale, _ = quantize_per_channel(weight, axis)
        group = node.attributes.get_int("group", 1)
        matrices = weight.astype(np.float64).reshape(group, weight.shape[0] // group, -1)
        step_sizes = channel_scales(scale, matrices)[..., None]
        steps = matrices / step_sizes
        gram, nearest = seen.gram, np.clip(np.rint(steps), -127, 127)
        ints = np.where(_generalizes(steps, nearest, seen)[..., None], gptq_from_gram(steps, gram, sum(seen.rows)),
                        nearest).astype(np.int8)
        weights[weight_name], scales[weight_name], axes[weight_name] = ints.reshape(weight.shape), scale, axis
        layers.append(RoundedLayer(
            node=eir.node_label(node), weight=weight_name, samples=sum(seen.rows),
            mse_nearest=float(np.mean(output_error((steps - nearest) * step_sizes, gram))),
            mse_learned=float(np.mean(output_error((steps - ints) * step_sizes, gram)))))
    return AdaRoundResult(weights=weights, scales=scales, axes=axes, layers=tuple(layers), skipped=tuple(skipped),
                          granularity=granularity)



def _generalizes(steps: np.ndarray, nearest: np.ndarray, seen: DepthwiseInputs) -> np.ndarray:
    """Per output channel ``[G, N]``: whether GPTQ fitted on one fold of the samples has less output error
    than the nearest rounding on the other, summed over both ways round. GPTQ's own guard judges it on the
    samples it fitted, which a 25-tap channel can overfit when they are few; a channel whose rounding
    does not carry over to unseen samples keeps the nearest. One fold only (a single sample): none."""
    if len(seen.rows) < 2:
        return np.zeros(steps.shape[:2], dtype=bool)
    learned = nearest_error = 0.0
    for fit, judge in ((0, 1), (1, 0)):
        ints = gptq_from_gram(steps, seen.folds[fit], seen.rows[fit])
        learned = learned + output_error(steps - ints, seen.folds[judge])
        nearest_error = nearest_error + output_error(steps - nearest, seen.folds[judge])
    return learned < nearest_error

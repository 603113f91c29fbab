"""What calibration found, kept for quantizing the same float model again with other nodes left float.

The accuracy search quantizes one float model round after round, each time
with one more node excluded. Everything its calibration passes measure is a
statistic of one tensor of the *float* model: min/max and histograms, the
channel means bias correction reads, the channel maxima of SmoothQuant, the
input rows AdaRound samples (each layer's reservoir seeded by the layer's
name), the tap correlations of the depthwise layers. None depends on which
other tensors a pass observes, and the float model after the float passes is
the same in every round. So a round that needs no tensor, channel mean or
learned-rounding layer beyond what an earlier pass saw is answered from that
pass, and gets what a fresh pass would give, bytes included, without reading
the data again. A round needing more (a node put
back in int8 whose input was never observed) runs a fresh pass, which is
kept in place of the last.

The learned rounding (AdaRound's, GPTQ's) is kept too: each layer's is learned
from its own samples and weight alone, so a round whose layers all had theirs
learned before reads them from here (unless a weight is shared between layers, where
which layer learns it depends on which others are there).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass, field

import numpy as np

from edgeopt.quant.adaround import SHARED_WEIGHT, AdaRoundResult, LayerInputSampler
from edgeopt.quant.calibrate import CalibrationResult
from edgeopt.quant.channel_stats import ChannelMeanHook
from edgeopt.quant.depthwise_rounding import DepthwiseCorrelationHook

__all__ = ["CalibrationMemo"]


@dataclass
class CalibrationMemo:
    """The last calibration pass over one float model and one dataset, and the statistics its hooks
    gathered; ``passes`` counts the passes run, ``reused`` the ones answered from here."""

    calibration: CalibrationResult | None = None
    means: ChannelMeanHook | None = None
    sampler: LayerInputSampler | DepthwiseCorrelationHook | None = None
    channel_abs_max: dict[str, np.ndarray] | None = None  # SmoothQuant's, measured before calibration
    relu6_change_db: float | None = None  # --equalize-relu6's change of the float model
    rounding: AdaRoundResult | None = None  # AdaRound's, for the layers in _rounded
    passes: int = 0
    reused: int = 0
    _tensors: frozenset[str] = field(default=frozenset(), repr=False)
    _rounded: frozenset[str] = field(default=frozenset(), repr=False)

    def answer(self, tensors: Sequence[str], means: ChannelMeanHook | None,
               sampler: LayerInputSampler | DepthwiseCorrelationHook | None) -> CalibrationResult | None:
        """The calibration of ``tensors`` from the last pass, or None when it saw too little: a tensor,
        a channel mean (on the same axis) or an AdaRound layer that ``means``/``sampler`` want."""
        if self.calibration is None or not self._tensors.issuperset(tensors):
            return None
        if means is not None and (self.means is None or not self.means.tensors.items() >= means.tensors.items()):
            return None
        if sampler is not None and (type(self.sampler) is not type(sampler)
                                    or not self.sampler.layers >= sampler.layers):
            return None
        self.reused += 1
        return self.calibration.restricted(tensors)

    def keep(self, calibration: CalibrationResult, means: ChannelMeanHook | None,
             sampler: LayerInputSampler | DepthwiseCorrelationHook | None) -> None:
        """Remember a fresh pass (and the hooks that ran in it) in place of the last."""
        self.calibration, self.means, self.sampler = calibration, means, sampler
        self._tensors = frozenset(calibration.tensors)
        self.passes += 1

    def learned_rounding(self, layers: frozenset[str]) -> AdaRoundResult | None:
        """AdaRound's result for exactly ``layers``, cut from an earlier one that learned them all, or None."""
        result = self.rounding
        if result is None or not self._rounded >= layers or any(SHARED_WEIGHT in why for _, why in result.skipped):
            return None
        kept = tuple(layer for layer in result.layers if layer.node in layers)
        names = {layer.weight for layer in kept}
        return dataclasses.replace(result, layers=kept, skipped=tuple(s for s in result.skipped if s[0] in layers),
                                   weights={n: w for n, w in result.weights.items() if n in names},
                                   scales={n: v for n, v in result.scales.items() if n in names},
                                   axes={n: a for n, a in result.axes.items() if n in names})

    def keep_rounding(self, layers: frozenset[str], result: AdaRoundResult) -> None:
        """Remember AdaRound's result for ``layers`` in place of the last."""
        self.rounding, self._rounded = result, layers

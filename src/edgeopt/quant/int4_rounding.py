"""How int4 (and its 8-bit fallback) rounds each distinct weight, and what the accuracy search's rounds share.

A weight is rounded by the per-block clip search of :mod:`edgeopt.quant.int4_blocks`, weighted by the mean
square of its layer's input channels when calibration data is given (:mod:`edgeopt.quant.int4_importance`), or
by GPTQ against their correlation (:mod:`edgeopt.quant.int4_gptq`); an embedding table's rows, which are looked
up rather than multiplied, by the unweighted clip search. The rounds of an accuracy search quantize one float
model on one data set with other layers excluded: :class:`Int4Memo` keeps each weight as rounded for the same
readers in the same format, and the input statistics when one pass held them all, so that a round rounds only
what no round before it did.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping

import onnx_ir as ir

from edgeopt.quant.int4_blocks import BlockQuantizedWeight, quantize_blocks
from edgeopt.quant.int4_gptq import gptq_blocks
from edgeopt.quant.int4_importance import LayerInputStatistics, StreamedStatistics, summed_statistics
from edgeopt.quant.int4_lowering import WeightTarget
from edgeopt.quant.registry import Batch, ProgressCallback

__all__ = ["Int4Memo", "LayerStatistics", "Rounded", "layer_statistics", "reader_inputs", "rounded"]


@dataclasses.dataclass
class Int4Memo:
    """What the rounds of an int4 accuracy search share, each quantizing the same float model with other layers
    excluded: each weight as quantized for the same readers in the same format (with what it adds to the
    notes), and the layers' input statistics when one pass over the data held them all. A round then quantizes
    only the weights no round before it did, and reads the data only for inputs none observed: the same bytes
    as a fresh quantization, without the clip search (or GPTQ) of every weight each round."""

    weights: dict[tuple, Rounded] = dataclasses.field(default_factory=dict)
    statistics: dict[str, LayerInputStatistics] = dataclasses.field(default_factory=dict)
    passes: int = 0  # over the calibration data, by all the rounds


@dataclasses.dataclass(frozen=True)
class Rounded:
    """A weight quantized for its readers, how (for the report), and what it adds to the GPTQ and weighting
    notes' counts (``unweighted``; GPTQ's ``weights``, ``columns``, ``kept``, ``not_2d``)."""

    weight: BlockQuantizedWeight
    method: str
    counts: Counter


class LayerStatistics:
    """The layers' input statistics: a memo's, else those :class:`StreamedStatistics` computes (kept in the
    memo when one pass computes them all)."""

    def __init__(self, streamed: StreamedStatistics, memo: Int4Memo | None) -> None:
        self.streamed = streamed
        self._memo = memo.statistics if memo is not None and len(streamed.passes) <= 1 else None
        self._known = memo.statistics if memo is not None else {}

    def get(self, name: str) -> LayerInputStatistics | None:
        if name in self._known:
            return self._known[name]
        seen = self.streamed.get(name)
        if self._memo is not None and seen is not None:
            self._memo[name] = seen
        return seen

    def release(self, name: str) -> None:
        self.streamed.release(name)


def reader_inputs(readers: list[WeightTarget]) -> tuple[str, ...]:
    return tuple(target.activation.name if target.activation is not None else "" for target in readers)


def layer_statistics(model: ir.Model, groups: Mapping[tuple, list[WeightTarget]], data: Iterable[Batch] | None,
                     correlation: bool, progress: ProgressCallback | None, memo: Int4Memo | None) -> LayerStatistics:
    """What the calibration passes see of each target's input (nothing without data): of the inputs that are
    main-graph values, which the calibration run observes (not a subgraph's own), those of the weights and
    inputs ``memo`` does not hold."""
    weights = [([t.activation.name for t in readers if t.activation is not None and t.activation.graph is model.graph
                 and (memo is None or t.activation.name not in memo.statistics)], readers[0].weight.shape[-2])
               for key, readers in groups.items() if memo is None or (key, reader_inputs(readers)) not in memo.weights]
    streamed = StreamedStatistics(model, data, [w for w in weights if w[0]], correlation=correlation,
                                  progress=progress)
    if memo is not None:
        memo.passes += len(streamed.passes)
    return LayerStatistics(streamed, memo)


_WEIGHTED = "clip search, weighted by input channels"


def rounded(readers: list[WeightTarget], block_size: int, gptq: bool, statistics: LayerStatistics) -> Rounded:
    """A weight quantized for its ``readers``, and how (for the report)."""
    weight = readers[0].weight
    fmt = readers[0].weight_format
    if readers[0].activation is None:  # a table's rows are looked up, not multiplied: no channel weighs them
        return Rounded(quantize_blocks(weight, block_size, fmt), "clip search (a table's rows)", Counter())
    seen = summed_statistics((statistics.get(t.activation.name) for t in readers), weight.shape[-2])
    if seen is None:  # (all of them without data)
        return Rounded(quantize_blocks(weight, block_size, fmt), "clip search", Counter(unweighted=1))
    if not gptq or weight.ndim != 2:
        return Rounded(quantize_blocks(weight, block_size, fmt, importance=seen.mean_square, mean=seen.mean), _WEIGHTED,
                       Counter(not_2d=int(gptq)))
    solved = gptq_blocks(weight, seen, block_size, fmt)
    return Rounded(solved.weight, f"GPTQ rounding, {_WEIGHTED}",
                   Counter(weights=1, columns=solved.columns, kept=solved.gptq_columns))

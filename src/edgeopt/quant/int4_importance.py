"""Input-channel statistics for int4's per-block clipping search and GPTQ, from calibration data.

A layer ``y = x @ W`` with ``W`` rounded to ``W + E`` makes the output error
``x @ E``; its expected square over the data, per output column ``e``, is
``e^T H e`` with ``H = E[x x^T]`` the correlation of the input channels (the
last axis of the layer's input). With ``H = mu mu^T + C`` (the channels' means
``mu`` and covariance ``C``), the clipping search weighs the weight error of
row k by the variance ``C_kk`` and the block's errors together by the means,
``(mu . e)**2``: the covariance's cross terms ``C_jk e_j e_k`` have no sign to
exploit for independent rounding errors, but the means multiply every sample
alike (:func:`edgeopt.quant.int4_blocks.block_scales`). A channel that is
always near zero then costs nothing however coarse its weights, and a loud
one (a transformer's outlier channels) costs the most.
GPTQ (:mod:`edgeopt.quant.int4_gptq`) makes the errors dependent, so it reads
all of ``H``: ``K x K`` float64 sums per input tensor, shared by the layers
that read it. Streaming passes, sums only: the result depends on how samples
are batched, or on how many passes it takes, only by the order of float64
additions (each pass groups samples into runs by the tensors it fetches).

The sums of all the model's inputs at once would not fit in memory for a
large transformer (an LLM's 32 layers, each with inputs of K = 4096 and one
of K = 11008: 42 GiB). :class:`StreamedStatistics` therefore holds at most
:data:`GRAM_BUDGET_BYTES` of them: the inputs, in the order their weights are
quantized, are split into passes over the data that each fit the budget, a
pass runs when the first of its inputs is asked for, and an input's sums are
released once every weight that reads it is quantized.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import onnx_ir as ir

from edgeopt.errors import DataError, EmptyDataError
from edgeopt.metrics import count_of
from edgeopt.quant.calibrate import calibrate
from edgeopt.quant.channel_stats import ChannelMomentsHook, InputCorrelationHook, LayerInputStatistics
from edgeopt.quant.config import CalibrationConfig
from edgeopt.quant.registry import Batch, ProgressCallback

__all__ = ["GRAM_BUDGET_BYTES", "ChannelMomentsHook", "LayerInputStatistics", "StreamedStatistics",
           "correlation_passes", "summed_statistics"]

GRAM_BUDGET_BYTES = 1 << 30  # K x K float64 sums held at once; more take more passes over the data


def correlation_passes(weights: Iterable[tuple[Sequence[str], int]], budget_bytes: float) -> list[list[str]]:
    """The input tensors of ``weights`` (in quantization order: each weight's readers' inputs, and its
    K) split into consecutive passes whose ``K x K`` float64 sums fit ``budget_bytes`` (an input larger
    than the budget gets a pass of its own). An input is in the pass of the first weight reading it."""
    passes: list[list[str]] = [[]]
    held, seen = 0, set()
    for inputs, k in weights:
        new = [name for name in dict.fromkeys(inputs) if name not in seen]
        cost = len(new) * k * k * 8
        if passes[-1] and new and held + cost > budget_bytes:
            passes.append([])
            held = 0
        passes[-1].extend(new)
        seen.update(new)
        held += cost
    return [names for names in passes if names]


class StreamedStatistics:
    """The :class:`LayerInputStatistics` of each layer input, computed pass by pass as they are asked
    for (:func:`correlation_passes`; one pass without ``correlation``, whose statistics are ``[K]``).

    ``weights`` lists each weight's readers' inputs (main-graph values) and K, in the order they are
    quantized; :meth:`get` of an input runs its pass if it has not run, :meth:`release` frees an input
    whose readers are all done. ``data`` is read once per pass, so more than one pass needs data that
    can be iterated again (a data source or a list, not a generator)."""

    def __init__(self, model: ir.Model, data: Iterable[Batch] | None, weights: Sequence[tuple[Sequence[str], int]],
                 *, correlation: bool, progress: ProgressCallback | None = None) -> None:
        self._model, self._data, self._correlation, self._progress = model, data, correlation, progress
        budget_bytes = GRAM_BUDGET_BYTES  # read when called (tests lower it)
        self.passes = [] if data is None else correlation_passes(weights, budget_bytes if correlation else math.inf)
        self._pass_of = {name: index for index, names in enumerate(self.passes) for name in names}
        self._loaded: dict[str, LayerInputStatistics] = {}
        self._ran: set[int] = set()
        self._samples: int | None = None
        if len(self.passes) > 1 and isinstance(data, Iterator):
            raise DataError(f"GPTQ's input correlations need {len(self.passes)} passes over the calibration "
                            f"data (at most {budget_bytes / 2**30:.3g} GiB of them at a time), but the data is a "
                            "one-shot iterator: pass a list or a data source")

    def get(self, name: str) -> LayerInputStatistics | None:
        """The statistics of input ``name``; None when no pass observes it (or it was never seen)."""
        index = self._pass_of.get(name)
        if index is not None and index not in self._ran:
            self._run(index)
        return self._loaded.get(name)

    def release(self, name: str) -> None:
        self._loaded.pop(name, None)

    def _run(self, index: int) -> None:
        """Pass ``index`` over the data: the statistics of its inputs, loaded. Each pass must read as many
        samples as the first."""
        self._ran.add(index)
        names = self.passes[index]
        hook = InputCorrelationHook(names) if self._correlation else ChannelMomentsHook(names)
        try:
            samples = calibrate(self._model, self._data, names, CalibrationConfig(),
                                progress=self._pass_progress(index), hooks=[hook]).num_batches
        except EmptyDataError as error:
            if self._samples is None:
                raise
            raise self._not_reread(index + 1, 0) from error
        if self._samples is not None and samples != self._samples:
            raise self._not_reread(index + 1, samples)
        self._samples = samples
        seen = hook.result()
        self._loaded.update(seen)

    def _pass_progress(self, index: int) -> ProgressCallback | None:
        """Progress over all the passes: pass ``index`` continues where the one before ended."""
        count, progress = len(self.passes), self._progress
        if progress is None or count == 1:
            return progress
        done_before = index * (self._samples or 0)

        def report(done: int, total: int | None) -> None:
            progress(done_before + done, None if total is None else total * count)
        return report

    def _not_reread(self, pass_number: int, samples: int) -> DataError:
        return DataError(f"the calibration data gave {count_of(self._samples, 'sample', 'samples')} on the first "
                         f"pass and {samples} on pass {pass_number} of {len(self.passes)}: GPTQ's input "
                         "correlations take several passes over it, so it must give the same samples each time "
                         "(a list or a data source, not a generator)")


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
                                rows=min(seen.rows for seen in readers))  # (no mean: each reader's term apart)

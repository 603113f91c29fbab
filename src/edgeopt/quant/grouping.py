"""Running calibration samples in groups: several batch-1 samples as one ONNX Runtime run.

Batch-1 samples run GROUP_SIZE at a time on a copy of the model with a free
batch dim: the same min/max and histograms, a tenth of the per-call overhead.
Only when every hook is groupable (see ``calibrate.BatchHook``) and every
input has batch dim 1. A constant Reshape target [1, ...] follows the batch
on that copy ([0, ...]: see ``batch_one_reshapes``). Grouping is trusted only
once the first group gave what its samples give one by one: a model that
fixes its batch fails to run, or mixes samples up (a seq-first Transpose
before a Reshape [-1, ...], a fixed dim that equals the group size) and fails
that check; either way it falls back to one sample per run. Groups stay small
for big inputs, where per-call overhead no longer matters and a batch's
activations would dominate peak memory: at most GROUP_INPUT_BYTES of input
and GROUP_FETCH_BYTES of whole tensors returned per group.

Groups run RUNS_IN_FLIGHT at a time on the one session (while what a run
returns whole is small: RUN_AHEAD_FETCH_BYTES), each run on its share of the
cores, their results handed on in data order: the observers see
the batches as a plain loop would, and the statistics are those of one run at
a time (the benchmark's 40 int8 models came out byte-identical).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.data import LabelledFeed, batch_rows, checked_feed, with_origin
from edgeopt.errors import DataError
from edgeopt.quant.registry import Batch
from edgeopt.runtime.ort import OrtSession
from edgeopt.runtime.range_session import CHANNEL_MEAN_SUFFIXES, RANGE_SUFFIXES, range_session
from edgeopt.runtime.tap_gather import TAP_STREAM_INPUT

__all__ = ["GROUP_FETCH_BYTES", "GROUP_INPUT_BYTES", "GROUP_SIZE", "QUEUED_PER_RUN", "RUNS_IN_FLIGHT",
           "RUN_AHEAD_FETCH_BYTES", "Runner", "fetched_bytes", "group_size", "groups", "run_bytes", "runs_in_flight"]

logger = logging.getLogger(__name__)

GROUP_SIZE = 16
GROUP_INPUT_BYTES = 1 << 20
GROUP_FETCH_BYTES = 64 << 20  # whole tensors returned per group (histograms): a BERT's attention maps add up
#: Groups run at once, each on its share of the cores: ONNX Runtime's threads sleep between operators
#: while Python observes (see ``range_session``), so one run on two threads was no faster than on one
#: (a 224x224 MobileNetV2), while two runs side by side keep both cores busy.
RUNS_IN_FLIGHT = 2
#: Runs go ahead of the observers only while what a run returns whole is at most this size: four more
#: batches are alive then (two running, two queued). (A 224x224 MobileNetV2's depthwise inputs, 15 MB a
#: sample, fetched whole for depthwise GPTQ, raised its peak RSS by 60 MB, past ONNX Runtime's own
#: calibration's. Their sampled taps, gathered in the session instead, are 2 MB.)
RUN_AHEAD_FETCH_BYTES = 4 << 20
#: Groups handed to ONNX Runtime ahead, per run in flight: while the observers are busy with a batch (a hook
#: slower on one than the runs), the next runs go on instead of waiting for the observers to ask for them
#: (a 224x224 MobileNetV2 with depthwise GPTQ: its calibration pass 0.81 -> 0.74 s).
QUEUED_PER_RUN = 2
_MATCH_TOLERANCE = 1e-5  # of a tensor's magnitude: summation order, not mixed-up samples (see _matches)


def group_size(specs: Sequence[eir.InputSpec], hooks: Sequence[object], *, fetched_bytes: int = 0) -> int:
    """Samples per run: at most GROUP_INPUT_BYTES of input and GROUP_FETCH_BYTES of the tensors that
    come back whole (``fetched_bytes`` per sample, where shapes are known): token ids are a few bytes,
    the activations they expand to many megabytes."""
    groupable = (all(getattr(hook, "groupable", False) for hook in hooks) and bool(specs)
                 and all(spec.is_static and spec.shape and spec.shape[0] == 1 for spec in specs))
    if not groupable:
        return 1
    sample_bytes = sum(int(np.prod(spec.shape)) * spec.dtype.itemsize for spec in specs)
    by_output = GROUP_FETCH_BYTES // fetched_bytes if fetched_bytes else GROUP_SIZE
    return max(1, min(GROUP_SIZE, GROUP_INPUT_BYTES // max(sample_bytes, 1), by_output))


def fetched_bytes(model: ir.Model, names: Iterable[str]) -> int:
    """Bytes per sample of the tensors ``names`` whose static shapes are known (the others count 0)."""
    return sum(size or 0 for size in _sample_bytes(model, names))


def run_bytes(model: ir.Model, whole: Sequence[str], group: int, *, gathered_bytes: int = 0) -> int | None:
    """Bytes a run of ``group`` samples returns: the tensors ``whole`` and ``gathered_bytes`` a sample of
    tap gathers; None when a tensor's shape is not static."""
    sizes = _sample_bytes(model, whole)
    return None if any(size is None for size in sizes) else (sum(sizes) + gathered_bytes) * group


def runs_in_flight(model: ir.Model, whole: Sequence[str], group: int, *, gathered_bytes: int = 0) -> int:
    """How many groups run at once: :data:`RUNS_IN_FLIGHT` (at most one per core) when the tensors a
    run returns whole (``whole``, ``group`` samples a run) are of known shapes and, with the
    ``gathered_bytes`` a sample of tap gathers, at most :data:`RUN_AHEAD_FETCH_BYTES` in all, else 1."""
    size = run_bytes(model, whole, group, gathered_bytes=gathered_bytes)
    if size is None or size > RUN_AHEAD_FETCH_BYTES:
        return 1
    return max(1, min(RUNS_IN_FLIGHT, os.cpu_count() or 1))


def _sample_bytes(model: ir.Model, names: Iterable[str]) -> list[int | None]:
    """Bytes per sample of each of ``names`` as float32 (what is fetched whole), None when its shape is not
    static."""
    values = eir.values_by_name(model)
    sizes = []
    for name in names:
        shape = eir.static_shape(values.get(name))
        sizes.append(int(np.prod(shape)) * 4 if shape is not None else None)
    return sizes


def groups(data: Iterable[Batch], specs: Sequence[eir.InputSpec], size: int) -> Iterator[list[dict]]:
    """Checked feeds, in runs of up to ``size`` with identical shapes (in data order)."""
    group: list[dict] = []
    for index, batch in enumerate(data):
        where = getattr(batch, "where", None) or f"calibration batch {index + 1}"
        # copies: a data loader may refill its arrays in place for the next batch while this one waits in
        # its group, or is observed as the next one runs
        checked = checked_feed(specs, batch, where=where)
        feed = LabelledFeed({name: np.array(array) for name, array in checked.items()}, where)
        if group and (len(group) == size or not _same_shapes(feed, group[0])):
            yield group
            group = []
        group.append(feed)
    if group:
        yield group


def _same_shapes(feed: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray]) -> bool:
    for name, array in feed.items():
        if array.shape != other[name].shape:
            return False
    return True


class Runner:
    """Runs groups of feeds as one batch while the model allows it, else one by one; up to
    :data:`RUNS_IN_FLIGHT` groups at once (:meth:`run_all`), their results in order."""

    def __init__(self, model: ir.Model, observation, fetch: Sequence[str], *, group: int, width: int = 1) -> None:
        self.model, self.observation = model, observation
        self.outputs = [value.name for value in model.graph.outputs]
        self.fetch = list(fetch)
        self.group = group
        self.grouped = group > 1
        self.width = width  # groups run at once (runs_in_flight), each on its share of the cores
        self.threads = max(1, (os.cpu_count() or 1) // width) if width > 1 else None
        self._fallback = threading.Lock()
        # Grouping is trusted once the first group matches its samples' single runs.
        self.unverified = self.grouped
        self.session = self._session(free_batch=self.grouped)

    def _session(self, *, free_batch: bool) -> OrtSession:
        observation = self.observation
        return range_session(self.model, observation.full, observation.reduced, packed=observation.packed.names,
                             floors=observation.floors, channel_means=observation.channel_means,
                             gathers=observation.gathers, threads=self.threads, free_batch=free_batch)

    def run_all(self, feed_groups: Iterable[list[dict]]) -> Iterator[tuple[dict, dict, int]]:
        """:meth:`run` of every group, in order. The first runs alone when samples are grouped (it decides
        whether groups run as one batch); then :attr:`width` groups run at once, on as many of ONNX
        Runtime's threads, and as many again wait their turn (:data:`QUEUED_PER_RUN`)."""
        pending = self._numbered(feed_groups)
        if self.grouped:
            first = next(pending, None)
            if first is None:
                return
            yield from self.run(*first)
        if self.width == 1:
            for feeds, row in pending:
                yield from self.run(feeds, row)
            return
        with ThreadPoolExecutor(max_workers=self.width, thread_name_prefix="edgeopt-run") as pool:
            running: deque = deque()
            for feeds, row in pending:
                running.append(pool.submit(self._run_list, feeds, row))
                if len(running) >= self.width * QUEUED_PER_RUN:
                    yield from running.popleft().result()
            while running:
                yield from running.popleft().result()

    @staticmethod
    def _numbered(feed_groups: Iterable[list[dict]]) -> Iterator[tuple[list[dict], int]]:
        """Each group with the index in the stream of its first row (batch dim 0 of its feeds)."""
        row = 0
        for feeds in feed_groups:
            yield feeds, row
            row += sum(batch_rows(feed) for feed in feeds)

    def _run_list(self, feeds: list[dict], row: int) -> list[tuple[dict, dict, int]]:
        return list(self.run(feeds, row))

    def run(self, feeds: list[dict], row: int = 0) -> Iterator[tuple[dict, dict, int]]:
        """``(feed, outputs, samples)``: the group as one run, or each feed alone; ``row``: the index in the
        stream of the group's first row, for the tap gathers (whose outputs come with their rows' indices)."""
        if self.grouped and len(feeds) > 1:
            joined = {name: np.concatenate([feed[name] for feed in feeds]) for name in feeds[0]}
            outputs = self._try_group(joined, feeds, row)
            if outputs is not None:
                yield joined, outputs, len(feeds)
                return
        for feed in feeds:
            try:
                outputs = self._run(feed, self.fetch, row) if self.fetch else {}
            except DataError as error:
                raise with_origin(error, feed) from None
            row += batch_rows(feed)
            yield feed, outputs, 1

    def _run(self, feed: Mapping[str, np.ndarray], names: Sequence[str], row: int) -> dict:
        """One session run; with tap gathers, the stream index of each row fed and returned."""
        if not self.observation.gathers:
            return self.session.run(feed, names)
        stream = np.arange(row, row + batch_rows(feed), dtype=np.int64)
        outputs = self.session.run({**feed, TAP_STREAM_INPUT: stream}, names)
        outputs[TAP_STREAM_INPUT] = stream
        return outputs

    def _try_group(self, feed: dict, feeds: list[dict], row: int) -> dict | None:
        names = list(dict.fromkeys([*self.fetch, *self.outputs]))
        try:
            outputs = self._run(feed, names, row)
        except DataError:
            outputs = None
        if (outputs is not None and all(outputs[o].shape[:1] == (len(feeds),) for o in self.outputs)
                and (not self.unverified or self._same_as_single_runs(outputs, feeds, names, row))):
            self.unverified = False
            return outputs
        with self._fallback:  # once, whichever of the runs in flight finds it
            if self.grouped:
                logger.info("the model does not batch (it fixes its batch size): calibrating one sample per run")
                self.session = self._session(free_batch=False)
                self.grouped = False
        return None

    def _same_as_single_runs(self, outputs: Mapping[str, np.ndarray], feeds: list[dict], names: list[str],
                             row: int) -> bool:
        try:
            singles = []
            for feed in feeds:
                singles.append(self._run(feed, names, row))
                row += batch_rows(feed)
        except DataError:
            return False
        return all(_matches(outputs[name], _joined(name, [single[name] for single in singles])) for name in names)


def _joined(name: str, parts: list[np.ndarray]) -> np.ndarray | None:
    """What one run of the samples together must give for output ``name``, from their single runs:
    the least (greatest) of the minima (maxima), else the tensors stacked along the batch dim."""
    if name.endswith(RANGE_SUFFIXES[0]):
        return np.asarray(np.minimum.reduce(parts))
    if name.endswith(RANGE_SUFFIXES[1]):
        return np.asarray(np.maximum.reduce(parts))
    if name.endswith(CHANNEL_MEAN_SUFFIXES[0]):  # samples of one shape: the mean of their means
        return np.asarray(np.mean(parts, axis=0, dtype=np.float64), dtype=parts[0].dtype)
    if name.endswith(CHANNEL_MEAN_SUFFIXES[1]):
        return np.asarray(np.sum(parts), dtype=parts[0].dtype)
    return np.concatenate(parts) if parts[0].ndim else None


def _matches(actual: np.ndarray, expected: np.ndarray | None) -> bool:
    """Same shape, dtype and values; floats up to rounding relative to the tensor's magnitude (a
    batch may sum in another order: a ReduceMean differs by ~1e-7 of its largest value, while
    mixing samples up changes values by their own size)."""
    if expected is None or actual.shape != expected.shape or actual.dtype != expected.dtype:
        return False
    if not np.issubdtype(actual.dtype, np.inexact):
        return bool(np.array_equal(actual, expected))
    magnitude = float(np.max(np.abs(expected[np.isfinite(expected)]), initial=0.0))
    return bool(np.allclose(actual, expected, rtol=_MATCH_TOLERANCE, atol=_MATCH_TOLERANCE * magnitude,
                            equal_nan=True))


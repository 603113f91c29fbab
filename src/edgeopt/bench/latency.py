"""Latency, throughput and peak memory of one or more models, measured side by side.

Each model runs in its own worker process, so its peak resident memory
(``VmHWM``) is its own. The parent drives the workers in turn, one
inference each (A B A B ...), so a drift of the shared machine's speed hits
every model alike and the ratios against the first model stay meaningful.
Latency is the wall time of ``session.run`` inside the worker.

Statistics: min, median and 90th percentile of the per-inference latency;
throughput = samples per inference / median latency.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from edgeopt._scalars import is_integer, plain_fields
from edgeopt.errors import ConfigError, EdgeoptError

__all__ = ["BenchConfig", "BenchResult", "BenchTarget", "ModelTiming", "bench_models"]

Feeds = Sequence[Mapping[str, np.ndarray]]


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """How to time: inferences measured, warm-up inferences, intra-op threads."""

    runs: int = 100
    warmup: int = 10
    threads: int | None = None

    def __post_init__(self) -> None:
        plain_fields(self)
        for key in ("runs", "warmup", "threads"):
            value = getattr(self, key)
            integer = is_integer(value)
            if (value is not None or key != "threads") and not integer:
                raise ConfigError(f"{key} must be an integer (--{key}), got {type(value).__name__} {value!r}")
        if self.runs < 1:
            raise ConfigError(f"runs (--runs) must be at least 1, got {self.runs}")
        if self.warmup < 0:
            raise ConfigError(f"warmup (--warmup) must be 0 or more, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads (--threads) must be at least 1, got {self.threads}")
        if self.threads is not None and self.threads > (limit := max_threads()):
            # 100000 threads grew a worker to 16.7 GB for 10 minutes: more threads than cores only adds switching
            raise ConfigError(f"--threads {self.threads} is more than this machine can use ({os.cpu_count() or 1} "
                              f"cores; at most {limit} accepted): give at most the number of cores")


def max_threads() -> int:
    """The most intra-op threads ``--threads`` takes: four per core, and 16 at least."""
    return max(16, 4 * (os.cpu_count() or 1))


@dataclass(frozen=True, kw_only=True)
class BenchTarget:
    """One model to time: its display name, serialized ONNX and size on disk."""

    name: str
    onnx_bytes: bytes = field(repr=False)
    file_bytes: int


@dataclass(frozen=True, kw_only=True)
class ModelTiming:
    """Measured numbers of one model."""

    name: str
    file_bytes: int
    latencies_ms: tuple[float, ...] = field(repr=False)
    samples_per_run: int
    peak_rss_bytes: int
    baseline_rss_bytes: int

    @property
    def min_ms(self) -> float:
        return float(np.min(self.latencies_ms))

    @property
    def median_ms(self) -> float:
        return float(np.median(self.latencies_ms))

    @property
    def p90_ms(self) -> float:
        return float(np.percentile(self.latencies_ms, 90))

    @property
    def throughput_per_s(self) -> float:
        return self.samples_per_run * 1000.0 / self.median_ms

    def to_dict(self) -> dict:
        return {"name": self.name, "file_bytes": self.file_bytes, "min_ms": self.min_ms,
                "median_ms": self.median_ms, "p90_ms": self.p90_ms,
                "throughput_per_s": self.throughput_per_s, "runs": len(self.latencies_ms),
                "peak_rss_bytes": self.peak_rss_bytes,
                "model_rss_bytes": self.peak_rss_bytes - self.baseline_rss_bytes}


@dataclass(frozen=True, kw_only=True)
class BenchResult:
    """Timings of every model, in the order given; ratios are against the first."""

    models: tuple[ModelTiming, ...]
    config: BenchConfig
    cpu_count: int

    def ratios(self) -> list[float]:
        base = self.models[0].median_ms
        return [m.median_ms / base for m in self.models]

    def to_dict(self) -> dict:
        rows = [m.to_dict() | {"median_ratio_vs_first": r} for m, r in zip(self.models, self.ratios())]
        return {"models": rows, "runs": self.config.runs, "warmup": self.config.warmup,
                "threads": self.config.threads, "cpu_count": self.cpu_count}


def _max_rss_bytes() -> int:
    """This process's own peak resident memory.

    Linux's ``ru_maxrss`` survives fork+exec, so a spawned worker would report
    its parent's peak; ``VmHWM`` in /proc/self/status is the process's own.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def serve(incoming: Connection, outgoing: Connection) -> None:
    """The worker's side: receive the model, feeds and threads, build a session, then answer each 'run'
    request with one timed inference, and 'stop' with the process's peak RSS."""
    from edgeopt.runtime.ort import OrtSession

    model_bytes, feeds, threads = incoming.recv()
    try:
        baseline = _max_rss_bytes()
        session = OrtSession(model_bytes, threads=threads)
        outgoing.send(("ready", baseline))
        index = 0
        while incoming.recv() == "run":
            feed = feeds[index % len(feeds)]
            start = time.perf_counter()
            session.run(feed)
            outgoing.send(("ms", (time.perf_counter() - start) * 1000.0))
            index += 1
        outgoing.send(("rss", _max_rss_bytes()))
    except EdgeoptError as error:
        outgoing.send(("error", str(error)))


def _worker_environment() -> dict[str, str]:
    """This environment, with the folder edgeopt is imported from first on the worker's path (the caller
    may have put it on ``sys.path`` by hand)."""
    import edgeopt

    environment = dict(os.environ)
    here = str(Path(edgeopt.__file__).resolve().parents[1])
    environment["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [environment.get("PYTHONPATH")])])
    return environment


class _Worker:
    """A fresh Python process (``python -m edgeopt.bench._worker``) driven over two pipes.

    Not multiprocessing's "spawn": that re-imports the caller's main script in
    the child, which re-runs a script without an ``if __name__ == "__main__"``
    guard (and fails there); a module of our own imports nothing of the caller's.
    """

    def __init__(self, name: str, model_bytes: bytes, feeds: Feeds, threads: int | None) -> None:
        self.name = name
        to_child_read, to_child_write = os.pipe()
        from_child_read, from_child_write = os.pipe()
        self._stderr = tempfile.TemporaryFile()
        try:
            self.process = subprocess.Popen(
                # -P: the caller's folder is not put first on the path (a json.py there would be imported)
                [sys.executable, "-P", "-m", "edgeopt.bench._worker", str(to_child_read), str(from_child_write)],
                pass_fds=(to_child_read, from_child_write), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=self._stderr, env=_worker_environment())
        finally:  # the parent keeps only its ends: a worker that dies is then an EOF, not a hang
            os.close(to_child_read)
            os.close(from_child_write)
        self._send = Connection(to_child_write, readable=False)
        self._recv = Connection(from_child_read, writable=False)
        try:
            self._call(lambda: self._send.send((model_bytes, list(feeds), threads)))
            self.baseline_rss_bytes = self._expect("ready")
        except BaseException:  # a Ctrl-C or SIGTERM while it starts: bench_models never got it to close
            self.close()
            raise

    def _call(self, action):
        try:
            return action()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            self.process.wait(timeout=10)
            self._stderr.seek(0)
            lines = self._stderr.read().decode(errors="replace").strip().splitlines()
            detail = f": {lines[-1]}" if lines else ""
            raise EdgeoptError(f"the benchmark process of {self.name} exited with code "
                               f"{self.process.returncode}{detail}") from None

    def _expect(self, tag: str):
        kind, value = self._call(self._recv.recv)
        if kind == "error":
            raise EdgeoptError(f"{self.name}: {value}")
        if kind != tag:
            raise RuntimeError(f"bench worker sent {kind!r}, expected {tag!r}")
        return value

    def time_one(self) -> float:
        self._call(lambda: self._send.send("run"))
        return self._expect("ms")

    def finish(self) -> int:
        self._call(lambda: self._send.send("stop"))
        rss = self._expect("rss")
        self.process.wait(timeout=10)
        return rss

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for end in (self._send, self._recv, self._stderr):
            end.close()


def bench_models(
    targets: Sequence[BenchTarget],
    feeds_per_model: Sequence[Feeds],
    config: BenchConfig,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> BenchResult:
    """Time each target on its feeds, interleaved, each in its own process."""
    workers: list[_Worker] = []
    try:
        for target, feeds in zip(targets, feeds_per_model):
            workers.append(_Worker(target.name, target.onnx_bytes, feeds, config.threads))
        return _time_interleaved(targets, feeds_per_model, config, workers, progress)
    finally:
        for worker in workers:
            worker.close()


def _time_interleaved(targets: Sequence[BenchTarget], feeds_per_model: Sequence[Feeds], config: BenchConfig,
                      workers: list[_Worker], progress: Callable[[int, int], None] | None) -> BenchResult:
    times: list[list[float]] = [[] for _ in workers]
    total = (config.warmup + config.runs) * len(workers)
    done = 0
    for step in range(config.warmup + config.runs):
        # each step starts with the next model: every model runs in every position of the round equally
        # often (A B, B A, ...), as running right after another model is not the same as running first
        # (two copies of one model measured 0.85x in the fixed order A B A B)
        first = step % len(workers)
        for index in [*range(first, len(workers)), *range(first)]:
            elapsed = workers[index].time_one()
            if step >= config.warmup:
                times[index].append(elapsed)
            done += 1
            if progress is not None:
                progress(done, total)
    peaks = [w.finish() for w in workers]
    timings = tuple(
        ModelTiming(name=target.name, file_bytes=target.file_bytes, latencies_ms=tuple(t),
                    samples_per_run=_batch_size(feeds[0]), peak_rss_bytes=peak,
                    baseline_rss_bytes=w.baseline_rss_bytes)
        for target, feeds, t, peak, w in zip(targets, feeds_per_model, times, peaks, workers))
    return BenchResult(models=timings, config=config, cpu_count=os.cpu_count() or 1)


def _batch_size(feed: Mapping[str, np.ndarray]) -> int:
    first = next(iter(feed.values()))
    return int(first.shape[0]) if first.ndim else 1


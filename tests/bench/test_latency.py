"""The timing workers: separate processes that never run the caller's script, and never hang the caller."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgeopt.bench.latency import BenchConfig, BenchTarget, _Worker, bench_models
from edgeopt.demo import demo_data, demo_model_path
from edgeopt.errors import EdgeoptError


def test_bench_from_a_script_without_a_main_guard(tmp_path):
    """multiprocessing's spawn re-ran such a script in each worker, which failed there and hung the caller."""
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(f"""
        import edgeopt
        print("script body ran")
        from edgeopt.bench import BenchConfig
        result = edgeopt.bench([{str(demo_model_path())!r}], config=BenchConfig(runs=3, warmup=0))
        print("median", result.models[0].median_ms > 0)
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["script body ran", "median True"]


def test_a_worker_that_dies_is_an_error_not_a_hang():
    images, _ = demo_data()
    worker = _Worker("demo", demo_model_path().read_bytes(), [{"input": images[:1]}], threads=1)
    try:
        assert worker.time_one() > 0
        worker.process.kill()
        worker.process.wait()
        with pytest.raises(EdgeoptError, match="benchmark process of demo exited with code -9"):
            worker.time_one()
    finally:
        worker.close()


def test_bench_models_times_each_model_in_its_own_process():
    images, _ = demo_data()
    data = demo_model_path().read_bytes()
    targets = [BenchTarget(name=name, onnx_bytes=data, file_bytes=len(data)) for name in ("a", "b")]
    result = bench_models(targets, [[{"input": images[:1]}]] * 2, BenchConfig(runs=4, warmup=1, threads=1))
    assert [len(m.latencies_ms) for m in result.models] == [4, 4]
    assert all(m.peak_rss_bytes > m.baseline_rss_bytes > 0 for m in result.models)


def test_bench_from_a_folder_holding_a_module_named_like_a_dependency(tmp_path, monkeypatch):
    """`python -m` puts the current folder first on sys.path: a user's json.py was imported by the worker."""
    (tmp_path / "json.py").write_text("raise RuntimeError('user file json.py was imported')\n")
    monkeypatch.chdir(tmp_path)
    images, _ = demo_data()
    data = demo_model_path().read_bytes()
    target = BenchTarget(name="demo", onnx_bytes=data, file_bytes=len(data))
    result = bench_models([target], [[{"input": images[:1]}]], BenchConfig(runs=2, warmup=0, threads=1))
    assert len(result.models[0].latencies_ms) == 2


def test_models_take_turns_with_the_first_of_each_round_rotating():
    # A B A B ... always ran B right after A; every model now starts every other round (A B, B A, ...)
    from edgeopt.bench.latency import _time_interleaved

    order: list[str] = []

    class Recording:
        baseline_rss_bytes = 0

        def __init__(self, name):
            self.name = name

        def time_one(self):
            order.append(self.name)
            return 1.0

        def finish(self):
            return 0

    targets = [type("Target", (), {"name": name, "file_bytes": 0})() for name in "AB"]
    feeds = [[{"x": np.zeros((1, 2), np.float32)}]] * 2
    _time_interleaved(targets, feeds, BenchConfig(runs=4, warmup=0), [Recording("A"), Recording("B")], None)
    assert "".join(order) == "ABBAABBA"


def test_more_threads_than_the_machine_can_use_are_refused():
    # --threads 100000 grew the worker to 20,000 threads and 16.7 GB for more than 10 minutes
    from edgeopt.bench.latency import max_threads
    from edgeopt.errors import ConfigError

    assert BenchConfig(threads=max_threads()).threads == max_threads()
    with pytest.raises(ConfigError, match="is more than this machine can use"):
        BenchConfig(threads=100000)


def test_a_worker_interrupted_while_it_starts_is_not_left_running(monkeypatch):
    # a SIGTERM while the worker built its session: bench_models never held it, so nothing killed it
    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    def interrupted(self, tag):
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(_Worker, "_expect", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _Worker("demo", demo_model_path().read_bytes(), [{"input": demo_data()[0][:1]}], None)
    assert started and started[0].poll() is not None

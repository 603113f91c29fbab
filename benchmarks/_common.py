"""Shared helpers for the hand-run benchmarks in ``benchmarks/``.

What every benchmark records next to its numbers (BENCHMARKS.md asks for it):
the exact command, the CPU model and its instruction-set flags, the library
versions and the date. Plus the plumbing: a worker run in a fresh Python
process that reports JSON (so its peak RSS is its own), a markdown table
renderer, and the digits data split the demo model was trained on.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import pathlib
import platform
import resource
import shlex
import subprocess
import sys
from collections.abc import Sequence

import numpy as np

__all__ = [
    "CACHE_DIR",
    "REPO_ROOT",
    "WORKER_RESULT_PREFIX",
    "cpu_info",
    "digits_split",
    "environment",
    "environment_markdown",
    "library_versions",
    "markdown_table",
    "publish",
    "peak_rss_mb",
    "prepare_cache_dir",
    "run_worker",
]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / "benchmarks" / ".cache"
WORKER_RESULT_PREFIX = "BENCH-RESULT "

# Instruction-set extensions that decide which ONNX Runtime kernels run
# (fp32 GEMM: AVX2/FMA/AVX-512; int8 GEMM: AVX2, AVX512BW, AVX512/AVX-VNNI, AMX).
_ISA_FLAGS = ("sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
              "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")

_LIBRARIES = ("edgeopt", "onnx", "onnxruntime", "onnx-ir", "numpy", "torch", "scikit-learn")


def cpu_info() -> tuple[str, tuple[str, ...]]:
    """The CPU's model name and the listed instruction-set flags it has (Linux /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, ()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    return model, tuple(f for f in _ISA_FLAGS if f in flags)


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def environment(argv: Sequence[str]) -> dict:
    """What a reader needs to reproduce or compare the run."""
    model, flags = cpu_info()
    return {
        "command": "python " + " ".join(shlex.quote(a) for a in argv),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": model,
        "cores": os.cpu_count(),
        "isa_flags": list(flags),
        "python": platform.python_version(),
        "versions": library_versions(),
    }


def environment_markdown(env: dict) -> list[str]:
    versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items())
    return [
        f"- command: `{env['command']}` (from the repository root)",
        f"- date: {env['date']}",
        f"- CPU: {env['cpu']}, {env['cores']} cores; ISA flags: {' '.join(env['isa_flags']) or 'unknown'}",
        f"- Python {env['python']}; {versions}",
    ]


def publish(text: str, markdown: pathlib.Path | None) -> None:
    """Print the report, and write it to ``markdown`` too when given (``--markdown``)."""
    print(text)
    if markdown is not None:
        markdown.write_text(text)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *,
                   right: Sequence[bool] | None = None) -> list[str]:
    """A GitHub-flavoured markdown table; ``right`` marks right-aligned (numeric) columns."""
    right = right or [False] * len(headers)
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        padded = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right)) + "|"
    return [line(headers), rule, *(line(r) for r in cells)]


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB.

    Linux's ``VmHWM`` (the high-water mark of this process's own address
    space). Not ``ru_maxrss``: Linux carries that over from the parent across
    fork + exec, so a worker started by a parent holding torch would report
    the parent's size.
    """
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_worker(script: pathlib.Path, payload: dict, *, timeout_s: float = 1800.0) -> dict:
    """Run ``script --worker JSON`` in a fresh interpreter and return the JSON it reports.

    The worker prints one line starting with WORKER_RESULT_PREFIX. A crash or a
    timeout comes back as ``{"error": "..."}`` so one failing setting does not
    stop the benchmark.
    """
    command = [sys.executable, str(script), "--worker", json.dumps(payload)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(WORKER_RESULT_PREFIX):
            return json.loads(line[len(WORKER_RESULT_PREFIX):])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"worker exited {done.returncode}: {tail[:300]}"}


def prepare_cache_dir() -> pathlib.Path:
    """benchmarks/.cache/, created with a .gitignore of its own so nothing in it is committed."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    ignore = CACHE_DIR / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    return CACHE_DIR


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn digits as (x_train, x_test, y_train, y_test), x float32 [N,1,8,8] in [0, 1].

    The split of ``scripts/train_demo.py``: ``train_test_split(test_size=0.25,
    random_state=0, stratify=y)``, so the test part equals the bundled
    ``digits_test.npz``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    return tuple(train_test_split(x, y, test_size=0.25, random_state=0, stratify=y))


def chosen_models(parser, value: str, choices) -> list[str]:
    """The comma-separated names of ``--models`` (``value``), each one of ``choices``; else the parser's error."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in choices]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(choices)}")
    return names


def ort_quantize_static(source, target, data: list[dict], method: str = "MinMax", **extra_options) -> None:
    """ONNX Runtime's ``quantize_static`` as its docs recommend for x86: QDQ, per-channel int8 weights, uint8
    activations, with calibration ``method`` (a ``CalibrationMethod`` name) on the samples ``data``."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.samples = iter(data)

        def get_next(self):
            return next(self.samples, None)

    quantize_static(source, target, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method), extra_options=extra_options)

"""Run and time a generated C project on the host, like a model.

``HostProgram(out_dir)`` reads the folder's ``edgeopt_c.json`` (input and
output quantization), builds the test driver once (``make``; the binaries in
``out_dir/.build`` are reused while the sources are unchanged) and runs every
sample of a batch in one process: float inputs are quantized with the input's
scale and zero point (as the reference does), int8 inputs pass as they are,
and outputs come back dequantized to float32 in the model's logical layout.
``time`` runs the timing harness (``bench.c``) and returns per-run wall times.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeopt import ir as eir
from edgeopt.codegen.c.api import read_manifest
from edgeopt.codegen.c.build import build, run_batch
from edgeopt.errors import CodegenError, DataError
from edgeopt.runtime.reference import TensorInfo, quantize_input

__all__ = ["HostProgram", "HostTiming"]


@dataclass(frozen=True, kw_only=True)
class HostTiming:
    """Wall times of single inferences of the generated C on the host, and the harness's peak RSS (0: unknown)."""

    latencies_ms: tuple[float, ...]
    peak_rss_bytes: int


def _info(entry: Mapping) -> TensorInfo:
    return TensorInfo(name=entry["tensor"], shape=tuple(entry["stored_shape"]), scale=entry["scale"],
                      zero_point=entry["zero_point"], layout=tuple(entry["layout"]))


class HostProgram:
    """A folder written by ``compile_c``, run on the host."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)
        self.manifest = read_manifest(self.out_dir)
        self.name = self.manifest["name"]
        self.inputs = [(entry["name"], _info(entry)) for entry in self.manifest["inputs"]]
        self.outputs = [(entry["name"], _info(entry)) for entry in self.manifest["outputs"]]

    @property
    def input_specs(self) -> list[eir.InputSpec]:
        """The model's inputs as float32 of their logical shape (int8 is accepted too)."""
        return [eir.InputSpec(name=name, shape=info.logical_shape, dtype=np.dtype(np.float32))
                for name, info in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [name for name, _ in self.outputs]

    def sample_bytes(self, feed: Mapping[str, np.ndarray]) -> bytes:
        missing = [name for name, _ in self.inputs if name not in feed]
        if missing:
            raise DataError(f"missing model input(s): {', '.join(missing)}")
        for name, _ in self.inputs:
            array = np.asarray(feed[name])
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise DataError(f"input {name!r} holds NaN or Inf values")
        return b"".join(quantize_input(feed[name], info).tobytes() for name, info in self.inputs)

    def run(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Outputs of every feed (one sample each) concatenated on the first axis, dequantized to float32."""
        if not feeds:
            raise DataError("no samples to run")
        binary = build(self.out_dir, self.name)
        raw, _ = run_batch(binary, b"".join(self.sample_bytes(feed) for feed in feeds))
        data = np.frombuffer(raw, np.int8).reshape(len(feeds), -1)
        outputs, position = {}, 0
        for name, info in self.outputs:
            stored = data[:, position: position + info.size].reshape(len(feeds), *info.shape)
            position += info.size
            logical = stored.transpose(0, *(1 + np.argsort(info.layout)))
            logical = logical.reshape(-1, *logical.shape[2:]) if logical.ndim > 2 else logical
            outputs[name] = (logical.astype(np.float32) - np.float32(info.zero_point)) * np.float32(info.scale)
        return outputs

    def time(self, feed: Mapping[str, np.ndarray], runs: int) -> HostTiming:
        """``runs`` timed inferences of ``feed`` (after ``runs // 10 + 1`` untimed) in the timing harness."""
        binary = build(self.out_dir, f"{self.name}_bench")
        input_file = binary.parent / f"bench_input.{os.getpid()}.bin"
        input_file.write_bytes(self.sample_bytes(feed))
        try:
            result = subprocess.run([str(binary), str(input_file), str(runs)], capture_output=True, text=True)
        finally:
            input_file.unlink(missing_ok=True)
        if result.returncode != 0:
            raise CodegenError(f"{binary.name} exited with {result.returncode}: {result.stderr.strip()[:200]}")
        peak = re.search(r"peak_rss_kib (\d+)", result.stderr)
        latencies = tuple(int(line) / 1e6 for line in result.stdout.split())
        return HostTiming(latencies_ms=latencies, peak_rss_bytes=int(peak.group(1)) * 1024 if peak else 0)

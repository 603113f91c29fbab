"""Build a generated C project with the system compiler (``make``, into ``.build/``), and run it on the host."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from edgeopt.errors import CodegenError

__all__ = ["BUILD_DIR", "RUN_FOLDER_PREFIX", "BuildFailed", "build", "run_batch", "run_binary"]

BUILD_DIR = ".build"
RUN_FOLDER_PREFIX = ".edgeopt-run-"  # a run's input/output files, in BUILD_DIR (a killed run may leave one)


class BuildFailed(CodegenError):
    """The compiler refused the generated code (the tools are there): an error, not a skipped measurement."""


def _check_tools() -> None:
    if shutil.which("make") is None or shutil.which("gcc") is None:
        raise CodegenError("building the C code needs `make` and `gcc` on PATH")


def _explain(out_dir: Path, compiler_output: str) -> str:
    if "eo_arena_fits_device" in compiler_output:
        text = "".join(header.read_text() for header in Path(out_dir).glob("*.h"))
        arena = re.search(r"_ARENA_BYTES (\d+)", text)
        sram = re.search(r"_DEVICE_SRAM_BYTES (\d+)", text)
        if arena and sram:
            missing = int(arena.group(1)) - int(sram.group(1))
            return (f"the arena ({arena.group(1)} bytes) does not fit the device's SRAM ({sram.group(1)} bytes): "
                    f"{missing} bytes missing (build check in the generated code)")
    return " | ".join(compiler_output.strip().splitlines()[:4])


def build(out_dir: str | Path, target: str) -> Path:
    """``make target`` in ``out_dir`` (up-to-date builds are reused); the path of what it built."""
    _check_tools()
    result = subprocess.run(["make", "-s", target], cwd=out_dir, capture_output=True, text=True)
    if result.returncode != 0:
        message = _explain(Path(out_dir), result.stderr or result.stdout)
        raise BuildFailed(f"building {target} in {out_dir} failed: {message}")
    return Path(out_dir) / BUILD_DIR / target


def run_batch(binary: Path, input_bytes: bytes, *, trace: bool = False) -> tuple[bytes, bytes]:
    """Run a built driver on samples (each: every input's int8 bytes); returns (output bytes, trace bytes)."""
    with tempfile.TemporaryDirectory(prefix=RUN_FOLDER_PREFIX, dir=binary.parent) as folder:
        input_file, output_file, trace_file = (Path(folder) / name for name in ("in.bin", "out.bin", "trace.bin"))
        input_file.write_bytes(input_bytes)
        command = [str(binary), str(input_file), str(output_file)] + ([str(trace_file)] if trace else [])
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise CodegenError(f"{binary.name} exited with {result.returncode}: {result.stderr.strip()[:200]}")
        return output_file.read_bytes(), trace_file.read_bytes() if trace else b""


def run_binary(binary: Path, inputs: list[np.ndarray], trace: bool = False) -> tuple[bytes, bytes]:
    """Run a built model on one sample of int8 inputs (stored layout); returns (output bytes, trace bytes)."""
    data = b"".join(np.ascontiguousarray(a, dtype=np.int8).tobytes() for a in inputs)
    return run_batch(binary, data, trace=trace)

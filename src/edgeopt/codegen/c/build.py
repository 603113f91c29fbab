"""Build a generated C project with the system compiler (``make``), and run it on the host."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

from edgeopt.errors import CodegenError

__all__ = ["build", "run_binary"]


def build(out_dir: str | Path, target: str) -> Path:
    """``make target`` in ``out_dir``; the path of the binary, or a CodegenError with the compiler's words."""
    if shutil.which("make") is None or shutil.which("gcc") is None:
        raise CodegenError("building the C code needs `make` and `gcc` on PATH")
    result = subprocess.run(["make", "-s", target], cwd=out_dir, capture_output=True, text=True)
    if result.returncode != 0:
        message = " | ".join((result.stderr or result.stdout).strip().splitlines()[:4])
        raise CodegenError(f"building {target} in {out_dir} failed: {message}")
    return Path(out_dir) / target


def run_binary(binary: Path, inputs: list[np.ndarray], trace: bool = False) -> tuple[bytes, bytes]:
    """Run a built model on int8 inputs (stored layout); returns (output bytes, trace bytes)."""
    folder = binary.parent
    input_file, output_file, trace_file = folder / "_in.bin", folder / "_out.bin", folder / "_trace.bin"
    input_file.write_bytes(b"".join(np.ascontiguousarray(a, dtype=np.int8).tobytes() for a in inputs))
    command = [str(binary), str(input_file), str(output_file)] + ([str(trace_file)] if trace else [])
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise CodegenError(f"{binary.name} exited with {result.returncode}: {result.stderr.strip()[:200]}")
    try:
        return output_file.read_bytes(), trace_file.read_bytes() if trace else b""
    finally:
        for file in (input_file, output_file, trace_file):
            file.unlink(missing_ok=True)

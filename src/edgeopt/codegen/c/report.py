"""What a compiled model costs: flash, RAM, host latency, and whether it fits a device.

Measured on the host, with the system gcc at ``-O2`` (the Makefile's flags):

* flash = ``size -A`` of ``model.o`` and of the kernels ``model.o`` calls and
  the helpers they reach by relocation (``kernels.o`` is built with
  ``-ffunction-sections``; the rest would be dropped by the linker):
  ``.text`` (code) + ``.rodata`` (weights, tables) +
  ``.data*`` (parameter structs). ``weights_bytes`` are the int8 weights,
  int32 biases, multipliers, shifts and lookup tables; ``code_bytes`` is the
  rest (code and parameter structs), so flash = weights + code. Host x86-64
  code size is a *proxy* for the MCU's (Thumb-2 code is usually smaller; the
  weights are the same bytes).
* RAM = the arena (exact) + a stack *estimate*: the deepest call chain
  (``model_run`` -> kernel -> ``eo_requantize``) of the host frames gcc's
  ``-fstack-usage`` reports.
* host latency = the median wall time of one inference in the timing
  harness (``bench.c``), after warm-up.

Fit: device flash minus flash, device SRAM minus RAM (negative = missing).
The device latency is an *estimate* from the profile (MACs / (MACs per cycle
x clock)); see :mod:`edgeopt.devices`.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeopt.codegen.c.api import CompileResult
from edgeopt.codegen.c.build import BUILD_DIR, build
from edgeopt.codegen.c.host import HostProgram
from edgeopt.errors import CodegenError
from edgeopt.io import atomic_write_bytes

__all__ = ["REPORT", "CompileReport", "HostMeasurement", "measure_host"]


REPORT = "report.json"
_TARGET_SECONDS = 0.3


@dataclass(frozen=True, kw_only=True)
class HostMeasurement:
    """Sizes of the compiled objects, the stack estimate and the host latency."""

    compiler: str
    text_bytes: int
    rodata_bytes: int
    data_bytes: int
    stack_bytes: int
    latency_ms: float | None
    latency_min_ms: float | None
    runs: int

    @property
    def flash_bytes(self) -> int:
        return self.text_bytes + self.rodata_bytes + self.data_bytes


def _sections(path: Path) -> dict[str, int]:
    result = subprocess.run(["size", "-A", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise CodegenError(f"`size -A {path}` failed: {result.stderr.strip()[:200]}")
    sections = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith(".") and parts[1].isdigit():
            sections[parts[0]] = sections.get(parts[0], 0) + int(parts[1])
    return sections


def _called_kernels(model_object: Path) -> set[str]:
    result = subprocess.run(["nm", "-u", str(model_object)], capture_output=True, text=True)
    return {line.split()[-1] for line in result.stdout.splitlines() if line.strip()}


def _flash_sections(sections: dict[str, int], keep) -> tuple[int, int, int]:
    text = rodata = data = 0
    for name, size in sections.items():
        if not keep(name):
            continue
        if name.startswith(".text"):
            text += size
        elif name.startswith(".rodata"):
            rodata += size
        elif name.startswith(".data"):
            data += size
    return text, rodata, data


def _references(path: Path) -> dict[str, set[str]]:
    """For each ``.text.*`` section of an object, the sections its relocations name (the static helpers a
    kernel calls, when gcc did not inline them)."""
    result = subprocess.run(["readelf", "-rW", str(path)], capture_output=True, text=True)
    references: dict[str, set[str]] = {}
    current = None
    for line in result.stdout.splitlines():
        if line.startswith("Relocation section '.rela.text."):
            current = references.setdefault(line.split("'")[1].removeprefix(".rela"), set())
        elif line.startswith("Relocation section"):
            current = None
        elif current is not None and len(fields := line.split()) >= 5:  # offset, info, type, value, symbol
            symbol = fields[4]
            if symbol.startswith(".text.") or symbol.startswith("eo_"):  # a helper's section, or a kernel
                current.add(symbol if symbol.startswith(".text.") else f".text.{symbol}")
    return references


def _reachable(roots: set[str], references: dict[str, set[str]]) -> set[str]:
    seen, stack = set(roots), list(roots)
    while stack:
        for section in references.get(stack.pop(), ()):
            if section not in seen:
                seen.add(section)
                stack.append(section)
    return seen


def _object_sizes(folder: Path, name: str) -> tuple[int, int, int]:
    model = _flash_sections(_sections(folder / f"{name}.o"), lambda section: True)
    called = _called_kernels(folder / f"{name}.o") | {"eo_requantize"}
    # code: the kernels the model calls and the helpers they reach (a linker with --gc-sections keeps those)
    text = _reachable({f".text.{kernel}" for kernel in called}, _references(folder / "kernels.o"))

    def used(section: str) -> bool:
        return not section.startswith(".text.") or section in text

    kernels = _flash_sections(_sections(folder / "kernels.o"), used)
    return tuple(a + b for a, b in zip(model, kernels))


def _stack_bytes(folder: Path, name: str) -> int:
    frames = {}
    for file in (folder / f"{name}.su", folder / "kernels.su"):
        for line in file.read_text().splitlines():
            location, size, *_ = line.split("\t")
            frames[location.rsplit(":", 1)[-1]] = int(size)
    kernels = [size for function, size in frames.items() if function.startswith("eo_") and function != "eo_requantize"]
    return frames.get(f"{name}_run", 0) + max(kernels, default=0) + frames.get("eo_requantize", 0)


def _compiler() -> str:
    result = subprocess.run(["gcc", "-dumpfullversion"], capture_output=True, text=True)
    machine = subprocess.run(["gcc", "-dumpmachine"], capture_output=True, text=True)
    return f"gcc {result.stdout.strip()} -O2, {machine.stdout.strip()}"


def _latency(program: HostProgram, runs: int | None) -> tuple[float | None, float | None, int]:
    if runs == 0:
        return None, None, 0
    rng = np.random.default_rng(0)
    feed = {spec.name: rng.standard_normal(spec.shape).astype(np.float32) for spec in program.input_specs}
    if runs is None:
        probe = float(np.median(program.time(feed, 5).latencies_ms))
        runs = int(np.clip(_TARGET_SECONDS * 1e3 / max(probe, 1e-3), 20, 2000))
    latencies = program.time(feed, runs).latencies_ms
    return float(np.median(latencies)), float(np.min(latencies)), runs


def measure_host(out_dir: str | Path, *, runs: int | None = None) -> HostMeasurement:
    """Build the objects and the timing harness of ``out_dir`` and measure them (``runs=0``: no timing)."""
    program = HostProgram(out_dir)
    build(out_dir, "objects")
    folder = Path(out_dir) / BUILD_DIR
    text, rodata, data = _object_sizes(folder, program.name)
    latency, latency_min, runs = _latency(program, runs)
    return HostMeasurement(compiler=_compiler(), text_bytes=text, rodata_bytes=rodata, data_bytes=data,
                           stack_bytes=_stack_bytes(folder, program.name), latency_ms=latency,
                           latency_min_ms=latency_min, runs=runs)


@dataclass(frozen=True, kw_only=True)
class CompileReport:
    """A compile's numbers: plan, flash, RAM, latency, fit against the device."""

    result: CompileResult
    host: HostMeasurement | None

    @property
    def flash_bytes(self) -> int | None:
        return self.host.flash_bytes if self.host else None

    @property
    def code_bytes(self) -> int | None:
        return self.host.flash_bytes - self.result.weight_bytes if self.host else None

    @property
    def stack_bytes(self) -> int | None:
        return self.host.stack_bytes if self.host else None

    @property
    def ram_bytes(self) -> int:
        return self.result.arena_bytes + (self.stack_bytes or 0)

    @property
    def flash_spare_bytes(self) -> int | None:
        return self.result.profile.flash_bytes - self.flash_bytes if self.host else None

    @property
    def sram_spare_bytes(self) -> int:
        return self.result.profile.sram_bytes - self.ram_bytes

    @property
    def weights_exceed_flash(self) -> bool:
        """Without a host measurement, the weights alone are a lower bound of flash: they may already miss."""
        return self.host is None and self.result.weight_bytes > self.result.profile.flash_bytes

    @property
    def fits(self) -> bool:
        flash_fits = self.flash_spare_bytes >= 0 if self.flash_spare_bytes is not None else \
            not self.weights_exceed_flash
        return self.sram_spare_bytes >= 0 and flash_fits

    @property
    def estimated_device_latency_ms(self) -> float:
        return self.result.profile.estimated_latency_ms(self.result.macs)

    def misses(self) -> list[str]:
        """What does not fit, in words (empty when it fits)."""
        profile, missing = self.result.profile, []
        if self.sram_spare_bytes < 0:
            stack = f" + stack estimate {self.stack_bytes:,} B" if self.stack_bytes else ""
            missing.append(f"RAM {self.ram_bytes:,} B (arena {self.result.arena_bytes:,} B{stack}) > SRAM "
                           f"{profile.sram_bytes:,} B: {-self.sram_spare_bytes:,} bytes missing")
        if self.flash_spare_bytes is not None and self.flash_spare_bytes < 0:
            missing.append(f"flash {self.flash_bytes:,} B > {profile.flash_bytes:,} B: "
                           f"{-self.flash_spare_bytes:,} bytes missing")
        if self.weights_exceed_flash:
            missing.append(f"flash: the weights alone are {self.result.weight_bytes:,} B > {profile.flash_bytes:,} "
                           f"B (code not measured): at least "
                           f"{self.result.weight_bytes - profile.flash_bytes:,} bytes missing")
        return missing

    def to_dict(self) -> dict:
        result, host = self.result, self.host
        return {
            "out_dir": str(result.out_dir), "name": result.name, "rounding": result.rounding,
            "files": list(result.files), "ops": result.ops, "macs": result.macs,
            "arena_bytes": result.arena_bytes, "lower_bound_bytes": result.lower_bound_bytes,
            "greedy_arena_bytes": result.greedy_arena_bytes, "graph_order_lower_bound_bytes":
                result.graph_order_lower_bound_bytes, "plan_method": result.plan_method,
            "plan_optimal": result.plan_optimal, "schedule": result.schedule_method,
            "in_place_ops": result.in_place_ops, "weights_bytes": result.weight_bytes,
            "code_bytes": self.code_bytes, "flash_bytes": self.flash_bytes,
            "stack_bytes_estimate": self.stack_bytes, "ram_bytes": self.ram_bytes,
            "host": None if host is None else {
                "compiler": host.compiler, "text_bytes": host.text_bytes, "rodata_bytes": host.rodata_bytes,
                "data_bytes": host.data_bytes, "latency_ms": host.latency_ms, "latency_min_ms": host.latency_min_ms,
                "runs": host.runs, "note": "host gcc -O2 object sizes are a proxy for the MCU's code size"},
            "device": result.profile.to_dict(),
            "fit": {"fits": self.fits, "flash_spare_bytes": self.flash_spare_bytes,
                    "sram_spare_bytes": self.sram_spare_bytes, "arena_fits_sram": result.fits,
                    "misses": self.misses()},
            "device_latency_ms_estimate": self.estimated_device_latency_ms,
            "inputs": list(result.inputs), "outputs": list(result.outputs),
        }

    def write(self) -> Path:
        path = Path(self.result.out_dir) / REPORT
        return atomic_write_bytes(path, json.dumps(self.to_dict(), indent=2).encode())

"""``compile_c`` and ``verify``: the C target of ``edgeopt compile`` and ``edgeopt verify``.

``compile_c`` lowers the QDQ model (refusing unsupported ops before anything
is written), plans the arena, emits the project into a temporary folder next
to ``out_dir`` and renames it into place. The folder also holds the QDQ model
(``reference.onnx``) and ``edgeopt_c.json`` so ``verify`` can rebuild the
reference and compare it with the C code tensor by tensor.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgeopt.codegen.c.build import build, run_binary
from edgeopt.codegen.c.emit import emit_sources
from edgeopt.codegen.c.plan import plan_memory
from edgeopt.errors import CodegenError, ConfigError
from edgeopt.io import load_model, save_model
from edgeopt.runtime.reference import ReferenceModel, lower
from edgeopt.runtime.reference.fixed_point import ROUNDINGS

__all__ = ["DEVICE_SRAM_BYTES", "CompileResult", "LayerMismatch", "VerifyResult", "compile_c", "verify"]

logger = logging.getLogger(__name__)

# SRAM of typical boards per core, until device profiles (devices/*.yaml) provide them.
DEVICE_SRAM_BYTES: dict[str, int | None] = {
    "host": None,
    "cortex-m0plus": 32 * 1024,
    "cortex-m4": 192 * 1024,
    "cortex-m33": 256 * 1024,
    "cortex-m7": 512 * 1024,
    "cortex-m55": 2 * 1024 * 1024,
}
_MANIFEST = "edgeopt_c.json"
_REFERENCE_MODEL = "reference.onnx"


@dataclass(frozen=True, kw_only=True)
class CompileResult:
    out_dir: Path
    files: tuple[str, ...]
    ops: int
    arena_bytes: int
    lower_bound_bytes: int
    greedy_arena_bytes: int
    plan_method: str
    weight_bytes: int
    device: str
    device_sram_bytes: int | None
    rounding: str

    @property
    def fits(self) -> bool:
        return self.device_sram_bytes is None or self.arena_bytes <= self.device_sram_bytes

    @property
    def missing_bytes(self) -> int:
        return 0 if self.fits else self.arena_bytes - self.device_sram_bytes


@dataclass(frozen=True, kw_only=True)
class LayerMismatch:
    step: int
    node: str
    kind: str
    tensor: str
    differing_elements: int
    max_abs_difference: int


@dataclass(frozen=True, kw_only=True)
class VerifyResult:
    batches: int
    tensors_compared: int
    first_mismatch: LayerMismatch | None

    @property
    def bit_exact(self) -> bool:
        return self.first_mismatch is None


def _check_options(name: str, rounding: str, device: str) -> None:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ConfigError(f"--name {name!r} must be a C identifier (letters, digits, underscore)")
    if rounding not in ROUNDINGS:
        raise ConfigError(f"--rounding {rounding!r} is not one of: {', '.join(ROUNDINGS)}")
    if device not in DEVICE_SRAM_BYTES:
        raise ConfigError(f"--device {device!r} is not one of: {', '.join(DEVICE_SRAM_BYTES)}")


def _weight_bytes(program) -> int:
    total = sum(a.nbytes for a in program.constants.values())
    for op in program.ops:
        total += sum(value.nbytes for value in vars(op.params).values() if isinstance(value, np.ndarray))
    return int(total)


def _write_folder(out_dir: Path, files: Mapping[str, str], model: ir.Model, manifest: dict, force: bool) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for file_name, text in files.items():
            (staging / file_name).write_text(text)
        save_model(model, staging / _REFERENCE_MODEL)
        (staging / _MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out_dir.exists() and force:
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def compile_c(model: ir.Model, out_dir: str | Path, *, device: str = "host", name: str = "model",
              rounding: str = "double", force: bool = False) -> CompileResult:
    """Generate the C project of a QDQ model; see the module docstring."""
    _check_options(name, rounding, device)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise CodegenError(f"output folder {out_dir} exists: choose another -o or pass --force to overwrite it")
    program = lower(model)
    plan = plan_memory(program)
    sram = DEVICE_SRAM_BYTES[device]
    sources = emit_sources(program, plan, name=name, rounding=rounding, device_sram_bytes=sram)
    manifest = {"name": name, "rounding": rounding, "device": device, "arena_bytes": plan.arena_bytes}
    _write_folder(out_dir, sources.files, model, manifest, force)
    result = CompileResult(out_dir=out_dir, files=tuple(sorted(sources.files)), ops=len(program.ops),
                           arena_bytes=plan.arena_bytes, lower_bound_bytes=plan.lower_bound_bytes,
                           greedy_arena_bytes=plan.greedy_bytes, plan_method=plan.method,
                           weight_bytes=_weight_bytes(program), device=device, device_sram_bytes=sram,
                           rounding=rounding)
    if not result.fits:
        logger.warning("arena of %d bytes does not fit %s (%d bytes of SRAM): %d bytes short; the build check fails",
                       result.arena_bytes, device, sram, result.missing_bytes)
    return result


def _compare(reference: ReferenceModel, trace: bytes, expected: dict[str, np.ndarray]) -> tuple[int, LayerMismatch | None]:
    data, position = np.frombuffer(trace, np.int8), 0
    for step, op in enumerate(reference.program.ops):
        size = reference.program.tensors[op.output].size
        ours, theirs = expected[op.output].reshape(-1), data[position: position + size]
        position += size
        if theirs.size != size or not np.array_equal(ours, theirs):
            diff = np.abs(ours.astype(np.int64)[: theirs.size] - theirs.astype(np.int64))
            return step + 1, LayerMismatch(step=step, node=op.node, kind=op.kind, tensor=op.output,
                                           differing_elements=int((diff != 0).sum()) + size - theirs.size,
                                           max_abs_difference=int(diff.max(initial=0)))
    return len(reference.program.ops), None


def verify(out_dir: str | Path, data: Iterable[Mapping[str, np.ndarray]]) -> VerifyResult:
    """Run the generated C (built with tracing) and the reference on ``data``; name the first layer that differs."""
    out_dir = Path(out_dir)
    manifest_file = out_dir / _MANIFEST
    if not manifest_file.exists():
        raise CodegenError(f"{out_dir} is not a folder written by `edgeopt compile --target c`")
    manifest = json.loads(manifest_file.read_text())
    reference = ReferenceModel(load_model(out_dir / _REFERENCE_MODEL), rounding=manifest["rounding"])
    binary = build(out_dir, f"{manifest['name']}_trace")
    batches = compared = 0
    for feed in data:
        expected = reference.trace(feed)
        inputs = [expected[io.tensor] for io in reference.program.inputs]
        _, trace = run_binary(binary, inputs, trace=True)
        count, mismatch = _compare(reference, trace, expected)
        batches, compared = batches + 1, compared + count
        if mismatch is not None:
            return VerifyResult(batches=batches, tensors_compared=compared, first_mismatch=mismatch)
    return VerifyResult(batches=batches, tensors_compared=compared, first_mismatch=None)

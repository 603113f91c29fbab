"""``compile_c`` and ``verify``: the C target of ``edgeopt compile`` and ``edgeopt verify``.

``compile_c`` lowers the QDQ model (refusing unsupported ops before anything
is written), picks the execution order of least peak memory, plans the arena
(in-place ops, greedy then exact placement), emits the project into a
temporary folder next to ``out_dir`` and renames it into place. The folder
also holds the QDQ model (``reference.onnx``), ``memory_map.json`` (every
tensor's offset, size and live steps) and ``edgeopt_c.json`` (name, rounding,
device, schedule, input/output quantization) so ``verify`` can rebuild the
reference in the same order and compare it with the C code tensor by tensor,
and :class:`~edgeopt.codegen.c.host.HostProgram` can run the code on the host.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgeopt._scalars import is_integer, is_number
from edgeopt.analysis.memory import lower_bound_bytes as lower_bound_of
from edgeopt.codegen.c.build import BUILD_DIR, RUN_FOLDER_PREFIX, BuildFailed, build, run_batch
from edgeopt.codegen.c.emit import emit_sources
from edgeopt.codegen.c.plan import MemoryPlan, plan_memory, program_lifetimes
from edgeopt.codegen.c.schedule import Schedule, choose_schedule, reorder
from edgeopt.devices import DeviceProfile, load_device
from edgeopt.errors import CodegenError, ConfigError, DataError, ModelError, OutputError
from edgeopt.io import load_model, save_model
from edgeopt.io.save import check_creatable, current_umask
from edgeopt.runtime.reference import ReferenceModel, lower
from edgeopt.runtime.reference.fixed_point import ROUNDINGS
from edgeopt.runtime.reference.program import Program
from edgeopt.runtime.reference.rnn import GATES

__all__ = ["MANIFEST", "CompileResult", "LayerMismatch", "VerifyResult", "compile_c", "is_c_folder",
           "read_manifest", "verify"]

logger = logging.getLogger(__name__)

MANIFEST = "edgeopt_c.json"
MEMORY_MAP = "memory_map.json"
_REFERENCE_MODEL = "reference.onnx"


@dataclass(frozen=True, kw_only=True)
class CompileResult:
    out_dir: Path
    files: tuple[str, ...]
    ops: int
    arena_bytes: int
    lower_bound_bytes: int  # max over steps of live buffer bytes: fused ops, chosen order, in-place aliases
    greedy_arena_bytes: int
    plan_method: str
    plan_optimal: bool
    graph_order_lower_bound_bytes: int  # of the same (fused) ops, before reordering and in-place
    schedule_method: str
    in_place_ops: int
    weight_bytes: int
    macs: int
    profile: DeviceProfile
    rounding: str
    name: str
    # the C's input and output buffers, as the manifest has them: name, stored_shape, layout (the ONNX axis
    # each stored axis is), scale, zero_point
    inputs: tuple[dict, ...] = ()
    outputs: tuple[dict, ...] = ()

    @property
    def device(self) -> str:
        return self.profile.name

    @property
    def device_sram_bytes(self) -> int:
        return self.profile.sram_bytes

    @property
    def fits(self) -> bool:
        """The arena fits the device's SRAM (the build check of the generated code)."""
        return self.arena_bytes <= self.device_sram_bytes

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
    sanitized: bool = False  # the C ran under AddressSanitizer and UBSan

    @property
    def bit_exact(self) -> bool:
        return self.first_mismatch is None

    def to_dict(self) -> dict:
        mismatch = self.first_mismatch
        return {"bit_exact": self.bit_exact, "samples": self.batches, "tensors_compared": self.tensors_compared,
                "first_mismatch": None if mismatch is None else dataclasses.asdict(mismatch),
                "sanitized": self.sanitized}


_GENERATED_STEMS = frozenset({"kernels", "main", "bench"})  # the project's other C files


_C_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _check_options(name: str, rounding: str) -> None:
    if not _C_IDENTIFIER.fullmatch(name):
        raise ConfigError(f"--name {name!r} must be a C identifier (letters, digits, underscore)")
    if name.upper().startswith("EO_"):  # the kernels' own macros: EO_KERNELS_H would be both headers' guard
        raise ConfigError(f"--name {name!r}: names starting with eo_ are the kernels' (choose another name)")
    if name.lower() in _GENERATED_STEMS:  # Kernels.c is kernels.c on a case-insensitive file system
        raise ConfigError(f"--name {name!r} would overwrite the generated {name}.c/.h (the project also writes "
                          f"{', '.join(sorted(_GENERATED_STEMS))}): choose another name")
    if rounding not in ROUNDINGS:
        raise ConfigError(f"--rounding {rounding!r} is not one of: {', '.join(ROUNDINGS)}")


#: The recurrent cells' op kinds (runtime/reference/rnn.py).
_CELLS = tuple(GATES)


def program_macs(program: Program) -> int:
    """Multiply-accumulates of the convolutions, fully connected layers, MatMuls of two activations and
    recurrent cells."""
    total = 0
    for op in program.ops:
        if op.kind in ("conv2d", "conv2d_add"):
            conv = op.params if op.kind == "conv2d" else op.params.conv
            weight = conv.weight  # (O, KH, KW, I/group)
            total += program.tensors[op.output].size * int(np.prod(weight.shape[1:]))
        elif op.kind == "fully_connected":
            total += program.tensors[op.output].size * op.params.weight.shape[1]
        elif op.kind == "conv_transpose2d":  # every input value scatters a kernel per output channel of its group
            out_channels, kernel_h, kernel_w, _ = op.params.weight.shape
            total += program.tensors[op.inputs[0]].size * out_channels // op.params.group * kernel_h * kernel_w
        elif op.kind == "batch_matmul":
            p = op.params
            total += p.batch * p.rows * p.depth * p.columns
        elif op.kind in _CELLS:  # each step: every gate's rows over the input and the state
            p = op.params
            total += p.directions * p.batch * p.steps * p.w.shape[1] * (p.input_size + p.hidden)
    return int(total)


def _io_manifest(program: Program, ios) -> list[dict]:
    return [{"name": io.name, "tensor": io.tensor, "is_float": io.is_float,
             "stored_shape": list(program.tensors[io.tensor].shape),
             "layout": list(program.tensors[io.tensor].layout),
             "scale": program.tensors[io.tensor].scale, "zero_point": program.tensors[io.tensor].zero_point}
            for io in ios]


def _memory_map(program: Program, plan: MemoryPlan) -> dict:
    """Which tensor where, when: offsets, sizes, live steps, the op that writes each one."""
    writer = {op.output: (step, op) for step, op in enumerate(program.ops)}
    written_over = {target: source for source, target in plan.in_place}
    tensors = []
    for lifetime in sorted(plan.lifetimes, key=lambda t: (plan.offset(t.name), t.start)):
        step, op = writer.get(lifetime.name, (None, None))
        tensors.append({"tensor": lifetime.name, "offset": plan.offset(lifetime.name), "bytes": lifetime.size_bytes,
                        "first_step": lifetime.start, "last_step": lifetime.end,
                        "written_by": op.node if op is not None else "(model input)",
                        "in_place_over": written_over.get(lifetime.name)})
    steps = [{"step": step, "kind": op.kind, "node": op.node, "output": op.output} for step, op in
             enumerate(program.ops)]
    return {"arena_bytes": plan.arena_bytes, "lower_bound_bytes": plan.lower_bound_bytes,
            "alignment": plan.plan.alignment, "method": plan.method, "optimal": plan.optimal,
            "tensors": tensors, "schedule": steps}


def check_output_folder(out_dir: Path, *, force: bool) -> None:
    """Refuse an ``-o`` that is a file, a link, the current folder (or one holding it), or a non-empty
    folder unless ``force``; even with ``force``, only a folder holding nothing but what an earlier
    compile wrote is replaced (the user's own files there are kept)."""
    if out_dir.is_symlink():
        raise OutputError(f"output {out_dir} is a symbolic link: give the folder it points to, or another -o")
    if not out_dir.exists():
        check_creatable(out_dir)
        return
    if not out_dir.is_dir():
        raise OutputError(f"output {out_dir} is a file: -o takes a folder (it is created if missing)")
    resolved = out_dir.resolve()  # the folder is written whole and renamed into place: never the one we are in
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise OutputError(f"output folder {out_dir} is the current folder or holds it: choose another -o "
                           "(compile writes a new folder)")
    entries = sorted(entry.name for entry in out_dir.iterdir())
    if not entries:
        return
    if not force:
        raise OutputError(f"output folder {out_dir} exists: choose another -o or pass --force to overwrite it")
    written = _written_by_compile(out_dir)
    foreign = [entry for entry in entries if entry not in written]
    build_dir = out_dir / BUILD_DIR
    if not foreign and build_dir.is_dir() and not build_dir.is_symlink():  # what make built there, nothing else
        foreign = [f"{BUILD_DIR}/{entry.name}" for entry in sorted(build_dir.iterdir())
                   if entry.name not in _built_by_make(out_dir) and not entry.name.startswith(RUN_FOLDER_PREFIX)]
    elif build_dir.is_symlink():
        foreign = [BUILD_DIR]
    if foreign:
        raise OutputError(f"output folder {out_dir} holds files edgeopt compile did not write (e.g. "
                           f"{foreign[0]}): --force replaces only what a compile wrote; move them or choose "
                           "another -o")


def _written_by_compile(out_dir: Path) -> set[str]:
    """The names an earlier compile wrote into ``out_dir`` (read from its manifest), its report and
    build folder; empty when there is no readable manifest."""
    from edgeopt.codegen.c.report import REPORT

    try:
        name = json.loads((out_dir / MANIFEST).read_text())["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {MANIFEST, MEMORY_MAP, _REFERENCE_MODEL, REPORT, BUILD_DIR, "Makefile", "main.c", "bench.c",
            "kernels.c", "kernels.h", f"{name}.c", f"{name}.h"}


def _built_by_make(out_dir: Path) -> set[str]:
    """What the generated Makefile's targets write into its build folder."""
    name = json.loads((out_dir / MANIFEST).read_text())["name"]  # readable: _written_by_compile read it
    return {name, f"{name}_trace", f"{name}_checked", f"{name}_bench", f"{name}.o", "kernels.o", f"{name}.su",
            "kernels.su"}


def _write_folder(out_dir: Path, files: Mapping[str, str], model: ir.Model, manifest: dict, force: bool) -> None:
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as error:  # what the checks before the work cannot see (/proc, a full disk ...)
        raise OutputError(f"cannot create the output folder {out_dir}: {error.strerror or error}") from error
    try:
        staging.chmod(0o777 & ~current_umask())  # a folder's usual mode, not mkdtemp's private 0700
        for file_name, text in files.items():
            (staging / file_name).write_text(text)
        save_model(model, staging / _REFERENCE_MODEL)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out_dir.exists() and force:
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):
            raise OutputError(f"cannot write the output folder {out_dir}: {error.strerror or error}") from error
        raise


def compile_c(model: ir.Model, out_dir: str | Path, *, device: str | Path | DeviceProfile = "x86-host",
              name: str = "model", rounding: str = "double", force: bool = False) -> CompileResult:
    """Generate the C project of a QDQ model; see the module docstring."""
    _check_options(name, rounding)
    profile = load_device(device)
    out_dir = Path(out_dir)
    check_output_folder(out_dir, force=force)
    lowered = lower(model)
    schedule = choose_schedule(lowered)
    program = reorder(lowered, schedule.order)
    plan = plan_memory(program)
    sources = emit_sources(program, plan, name=name, rounding=rounding, device_sram_bytes=profile.sram_bytes)
    files = dict(sources.files) | {MEMORY_MAP: json.dumps(_memory_map(program, plan), indent=2)}
    manifest = _manifest(program, plan, schedule, profile, name, rounding)
    _write_folder(out_dir, files, model, manifest, force)
    graph_order_bound = lower_bound_of(program_lifetimes(lowered))
    result = _result(out_dir, files, program, plan, schedule, profile, manifest, graph_order_bound,
                     sources.const_bytes)
    if not result.fits:
        logger.info("arena of %d bytes does not fit %s (%d bytes of SRAM): %d bytes short; the build check fails",
                       result.arena_bytes, profile.name, profile.sram_bytes, result.missing_bytes)
    return result


def _manifest(program: Program, plan: MemoryPlan, schedule: Schedule, profile: DeviceProfile, name: str,
              rounding: str) -> dict:
    return {"name": name, "rounding": rounding, "device": profile.to_dict(), "arena_bytes": plan.arena_bytes,
            "schedule": list(schedule.order), "inputs": _io_manifest(program, program.inputs),
            "outputs": _io_manifest(program, program.outputs)}


def _result(out_dir, files, program, plan, schedule, profile, manifest: dict, graph_order_bound,
            const_bytes: int) -> CompileResult:
    return CompileResult(out_dir=out_dir, files=tuple(sorted(files)), ops=len(program.ops),
                         arena_bytes=plan.arena_bytes, lower_bound_bytes=plan.lower_bound_bytes,
                         greedy_arena_bytes=plan.greedy_bytes, plan_method=plan.method, plan_optimal=plan.optimal,
                         graph_order_lower_bound_bytes=graph_order_bound, schedule_method=schedule.method,
                         in_place_ops=len(plan.in_place), weight_bytes=const_bytes,
                         macs=program_macs(program), profile=profile, rounding=manifest["rounding"],
                         name=manifest["name"], inputs=tuple(manifest["inputs"]), outputs=tuple(manifest["outputs"]))


def is_c_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``compile_c``."""
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


_RECOMPILE = "compile the model again into a new folder (or delete this one first)"
#: What a manifest must hold (``verify``, ``run`` and ``bench`` read each).
_MANIFEST_KEYS = {"name": str, "rounding": str, "inputs": list, "outputs": list, "schedule": list}


def read_manifest(out_dir: str | Path) -> dict:
    """The folder's ``edgeopt_c.json``; a missing, unreadable or damaged one is an error saying to recompile."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        raise ModelError(f"{out_dir} not found: give the folder `edgeopt compile --target c` wrote")
    if not is_c_folder(out_dir):  # what was given is unusable as given: the model's exit code, not the build's
        raise ModelError(f"{out_dir} is not a folder written by `edgeopt compile --target c`")
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        raise CodegenError(f"{out_dir / MANIFEST} cannot be read ({error}): {_RECOMPILE}") from None
    damaged = [key for key, kind in _MANIFEST_KEYS.items()
               if not isinstance(manifest, dict) or not isinstance(manifest.get(key), kind)]
    problem = f"no valid {', '.join(damaged)}" if damaged else _manifest_problem(manifest)
    if problem:
        raise CodegenError(f"{out_dir / MANIFEST} is damaged ({problem}): {_RECOMPILE}")
    return manifest


def _manifest_problem(manifest: dict) -> str | None:
    """What is wrong with a manifest's values (its keys are there, of the right types), else None: a hand
    edit went on to a KeyError, a divide by zero or wrong numbers in verify, run and bench."""
    if not _C_IDENTIFIER.fullmatch(manifest["name"]):
        return f"name {manifest['name']!r} is no C identifier"
    if manifest["rounding"] not in ROUNDINGS:
        return f"rounding {manifest['rounding']!r}"
    schedule = manifest["schedule"]
    if not schedule or sorted(schedule) != list(range(len(schedule))) or not all(map(is_integer, schedule)):
        return "the schedule is not an order of the ops"
    if not manifest["inputs"] or not manifest["outputs"]:
        return "no inputs or no outputs"
    for entry in manifest["inputs"] + manifest["outputs"]:
        shape = entry.get("stored_shape") if isinstance(entry, dict) else None
        scale, zero_point = (entry.get("scale"), entry.get("zero_point")) if isinstance(entry, dict) else (0, 0)
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("tensor"), str)
                and isinstance(entry.get("is_float"), bool) and isinstance(shape, list) and shape
                and all(is_integer(d) and d > 0 for d in shape) and isinstance(entry.get("layout"), list)
                and sorted(entry["layout"]) == list(range(len(shape)))
                and is_number(scale) and math.isfinite(scale)
                and scale > 0 and is_integer(zero_point) and -128 <= zero_point <= 127):
            name = entry.get("name") if isinstance(entry, dict) else entry
            return f"the entry of {name!r}: its tensor, shape, layout, scale or zero point"
    return None


def _compare(reference: ReferenceModel, trace: bytes,
             expected: dict[str, np.ndarray]) -> tuple[int, LayerMismatch | None]:
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
    """Run the generated C (built with tracing) and the reference on ``data``; name the first layer that differs.

    Both run the fused program: a ``conv2d_add`` op is one layer, named ``"<conv node>+<add node>"``, whose
    tensor is the Add's output (the conv's intermediate int8 tensor exists in neither).
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    try:
        program = reorder(lower(load_model(out_dir / _REFERENCE_MODEL)), manifest["schedule"])
    except ValueError as error:  # a schedule of another length than the reference model's ops
        raise CodegenError(f"{out_dir / MANIFEST} is damaged ({error}): {_RECOMPILE}") from None
    reference = ReferenceModel(program, rounding=manifest["rounding"])
    binary, sanitized = _traced_binary(out_dir, manifest["name"])
    batches = compared = 0
    for feed in data:
        expected = reference.trace(feed)
        sample = b"".join(expected[io.tensor].tobytes() for io in reference.program.inputs)
        try:
            _, trace = run_batch(binary, sample, trace=True)
        except CodegenError as error:
            if not sanitized:
                raise
            raise CodegenError(f"the C broke a memory or arithmetic rule on sample {batches + 1} (AddressSanitizer "
                               f"and UBSan): {_sanitizer_line(str(error))}") from None
        count, mismatch = _compare(reference, trace, expected)
        batches, compared = batches + 1, compared + count
        if mismatch is not None:
            return VerifyResult(batches=batches, tensors_compared=compared, first_mismatch=mismatch,
                                sanitized=sanitized)
    if not batches:  # nothing compared is not "bit-exact"
        raise DataError("the data gave no samples: point --data at at least one sample")
    return VerifyResult(batches=batches, tensors_compared=compared, first_mismatch=None, sanitized=sanitized)


def _sanitizer_line(text: str) -> str:
    """The line of a sanitizer's report that says what went wrong (``ERROR: AddressSanitizer: ...``,
    ``kernels.c:95: runtime error: ...``), else ``text``."""
    for line in text.splitlines():
        if "ERROR:" in line or "runtime error:" in line:
            return re.sub(r"^==\d+==", "", line).strip()
    return text


def _traced_binary(out_dir: Path, name: str) -> tuple[Path, bool]:
    """The tracing driver, under AddressSanitizer and UBSan where the compiler has them (an arena overrun, a
    signed overflow then stop it, where the plain build may still agree with the reference), else plain."""
    try:
        return build(out_dir, f"{name}_checked"), True
    except BuildFailed:
        plain = build(out_dir, f"{name}_trace")  # a fault of the code itself fails here too, and is raised
        logger.info("the sanitized build failed (no sanitizer runtime?): verifying without it")
        return plain, False

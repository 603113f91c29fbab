"""The deployment commands: ``compile`` (QDQ model -> C project with a report) and ``verify`` (C vs reference).

Registered on the app of :mod:`edgeopt.cli.app`, which imports this module.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeopt import api
from edgeopt.cli import InterruptedAfterWriting, state
from edgeopt.cli.app import InputShapeOption, JsonOption, PreprocessOption, app, input_shapes, parse_preprocess
from edgeopt.cli.render import bytes_text, count_of, count_text, print_json, table
from edgeopt.errors import CodegenError, Interrupted

__all__ = ["compile_command", "verify_command"]


class CodeTarget(str, enum.Enum):
    c = "c"


class Rounding(str, enum.Enum):
    double = "double"
    single = "single"


@app.command("compile")
def compile_command(
    model: Annotated[Path, typer.Argument(help="int8 QDQ ONNX model (from `edgeopt quantize`).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the generated project.")],
    target: Annotated[CodeTarget, typer.Option("--target", help="Code to generate: c (portable C99, int8, "
                                                                "static arena).")] = CodeTarget.c,
    device: Annotated[str, typer.Option("--device", help="Device profile the code must fit: a built-in name "
                                                         "(cortex-m0plus, cortex-m4, cortex-m7, cortex-m33, "
                                                         "cortex-m55, cortex-a53, cortex-a76, x86-host) or a "
                                                         "profile .yaml.")] = "x86-host",
    name: Annotated[str, typer.Option("--name", help="C name of the model (files NAME.c/.h, NAME_run()).")]
    = "model",
    rounding: Annotated[Rounding, typer.Option("--rounding", help="Requantization rounding: double (TFLite) or "
                                                                  "single (CMSIS-NN).")] = Rounding.double,
    force: Annotated[bool, typer.Option("--force", help="Replace the output folder if it holds only what an "
                                                         "earlier edgeopt compile wrote (else it is kept).")] = False,
    measure: Annotated[bool, typer.Option("--measure/--no-measure", help="Build and time the code on the host "
                                                                         "(flash, stack, latency).")] = True,
    input_shape: InputShapeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Generate C for an int8 model: arena plan, flash/RAM/latency report, fit against a device."""
    try:
        report = api.compile_model(model, output, target=target.value, device=device, name=name,
                                   rounding=rounding.value, force=force, measure=measure,
                                   input_shapes=input_shapes(input_shape))
    except Interrupted as stop:  # during the host measurement: the project and its report are written
        raise InterruptedAfterWriting(f"the C project in {stop.partial.result.out_dir} is complete; its host "
                                      "measurement was not (report.json has no host figures)",
                                      stop.partial.to_dict()) from None
    failure = None
    if not report.fits:
        check = "; its build check fails" if not report.result.fits else ""  # the Makefile checks the arena
        failure = CodegenError(f"the model does not fit {report.result.device}: " + "; ".join(report.misses())
                               + f" (code written to {report.result.out_dir}{check})")
    _finish(report.to_dict(), failure, json_output, lambda: _render_compile(model, report))


def _finish(result: dict, failure: CodegenError | None, json_output: bool, render) -> None:
    """The result, rendered or as JSON, then ``failure`` raised; under --json the failure carries the result,
    so stdout holds one JSON object (the result with its ``error``), not the result and then the error."""
    if json_output and failure is not None:
        failure.result = result
        raise failure
    if json_output:
        print_json(result)
    else:
        render()
    if failure is not None:
        raise failure


def _spare(spare: int | None, total: int, what: str) -> str:
    if spare is None:
        return f"{what} not measured"
    if spare < 0:
        return f"{what} {-spare:,} B MISSING of {bytes_text(total)}"
    return f"{what} {spare:,} B to spare of {bytes_text(total)}"


def _io_text(result) -> str:
    """The C's buffers: int8, their stored shape, and which ONNX axis each stored axis is when not in order."""
    parts = []
    for kind, entries in (("in", result.inputs), ("out", result.outputs)):
        for entry in entries:
            layout = entry["layout"]
            order = "" if layout == sorted(layout) else f" = ONNX axes {layout}"
            parts.append(f"{kind} {entry['name']!r} int8 {entry['stored_shape']}{order}")
    return "; ".join(parts)


def _render_compile(model: Path, report) -> None:
    result, host, profile = report.result, report.host, report.result.profile
    bound = "optimal" if result.plan_optimal else "best found in the search budget"
    rows = [("arena", f"{result.arena_bytes:,} B (lower bound {result.lower_bound_bytes:,} B; {result.plan_method} "
                      f"plan, {bound}; greedy alone {result.greedy_arena_bytes:,} B)"),
            ("planner", f"{count_of(result.in_place_ops, 'op runs', 'ops run')} in place; execution order: "
                        f"{result.schedule_method}; lower bound before reordering and in-place "
                        f"{result.graph_order_lower_bound_bytes:,} B")]
    if host is not None:
        rows += [("RAM", f"{report.ram_bytes:,} B = arena + stack {host.stack_bytes:,} B (estimate: gcc "
                         "-fstack-usage frames of the deepest call chain, host)"),
                 ("flash", f"{report.flash_bytes:,} B = weights {result.weight_bytes:,} B + code "
                           f"{report.code_bytes:,} B (size of {host.compiler} objects: a proxy for the MCU's)")]
        if host.latency_ms is not None:
            rows.append(("host latency", f"{host.latency_ms:.3f} ms per inference (median of {host.runs} runs, "
                                         f"min {host.latency_min_ms:.3f} ms; C on this machine)"))
    else:
        rows.append(("flash", f"weights {result.weight_bytes:,} B; code not measured (no host build)"))
    rows += [("device", f"{profile.name}: {profile.board}"),
             ("fit", _spare(report.flash_spare_bytes, profile.flash_bytes, "flash") + "; "
                     + _spare(report.sram_spare_bytes, profile.sram_bytes, "SRAM")),
             ("device latency", f"{report.estimated_device_latency_ms:.3f} ms (estimate: {count_text(result.macs)} "
                                f"MACs / ({profile.int8_macs_per_cycle:g} MACs/cycle x {profile.clock_mhz:g} MHz))"),
             ("io", _io_text(result)),
             ("files", f"{result.out_dir}/: {', '.join(result.files)}, report.json")]
    summary = table(f"{model.name} -> C99, {result.ops} ops, {result.rounding} rounding", [("", "left"), ("", "left")])
    summary.show_header = False
    for key, value in rows:
        summary.add_row(key, value)
    state.stdout.print(summary)


@app.command("verify")
def verify_command(
    folder: Annotated[Path, typer.Argument(help="Folder written by `edgeopt compile --target c`.")],
    data: Annotated[str, typer.Option("--data", help="Inputs: a .npy/.npz file or a folder of them, a folder "
                                                     "of images, or module:function.")],
    max_samples: Annotated[Optional[int], typer.Option("--max-samples", min=1, help="Use at most N samples.")] = None,
    preprocess: PreprocessOption = None,
    json_output: JsonOption = False,
) -> None:
    """Run the generated C and the reference interpreter on --data; name the first layer that differs."""
    result = api.verify(folder, data, max_samples=max_samples,
                        preprocess=parse_preprocess(preprocess))
    mismatch = result.first_mismatch
    failure = None if mismatch is None else CodegenError(
        f"C differs from the reference at step {mismatch.step}, node {mismatch.node} ({mismatch.kind}), tensor "
        f"{mismatch.tensor!r}: {count_of(mismatch.differing_elements, 'element differs', 'elements differ')}, "
        f"by up to {mismatch.max_abs_difference} (sample {result.batches})")

    def render() -> None:
        if mismatch is None:
            checked = "; the C ran under AddressSanitizer and UBSan" if result.sanitized else ""
            state.stdout.print(f"bit-exact: {count_of(result.batches, 'sample', 'samples')}, "
                               f"{result.tensors_compared:,} tensors compared (every op's output, C vs reference"
                               f"{checked})")

    _finish(result.to_dict(), failure, json_output, render)

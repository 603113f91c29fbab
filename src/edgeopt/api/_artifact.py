"""Where a quantized model and its measured numbers are written: ``OUT.onnx``, ``OUT.report.json`` beside
it, and past 2 GB its weights in ``OUT.onnx.data``; all of them together, or none."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import onnx_ir as ir

from edgeopt.io import atomic_write_files, check_writable, external_data_path, model_file_contents
from edgeopt.metrics import json_text

if TYPE_CHECKING:
    from edgeopt.api.quantize import QuantizeReport

__all__ = ["check_writable_artifact", "report_path", "stale_weights", "write_quantized", "written_files"]


def stale_weights(output: str | os.PathLike | None, written: list[tuple[Path, bytes | bytearray]]) -> list[str]:
    """A warning when a weights file an earlier, larger model left at ``OUT.onnx.data`` stays beside an
    ``OUT.onnx`` now written whole, which does not read it (it is not edgeopt's to delete)."""
    stale = external_data_path(output) if output is not None else None
    if stale is None or not stale.exists() or any(path == stale for path, _ in written):
        return []
    return [f"{stale} is left from an earlier model: {Path(output).name} is written whole and does not read it "
            "(delete it, or write elsewhere)"]


def written_files(model: ir.Model, output: str | os.PathLike) -> list[tuple[Path, bytes | bytearray]]:
    """The files of a quantized model at ``output``: without inferable annotations and exporters' debugging
    notes (size only); past 2 GB the weights go beside the .onnx."""
    return model_file_contents(model, output, value_info=False, exporter_metadata=False)


def write_quantized(report: QuantizeReport, written: list[tuple[Path, bytes | bytearray]]) -> None:
    """The model's files and its report at ``report.output``: the artifact ships with its measured numbers,
    all its files replaced, or none."""
    atomic_write_files([*written, (report_path(report.output), json_text(report.to_dict()).encode())])


def check_writable_artifact(output: str | os.PathLike) -> None:
    """OutputError unless the model's file, its report and its weights file (written past 2 GB) can all go
    at ``output``."""
    check_writable(output)  # first: a folder (-o .) has no name to derive the other two's from
    check_writable(report_path(output))
    check_writable(external_data_path(output))


def report_path(output: str | os.PathLike) -> Path:
    """Where the numbers of a quantized model go: ``model.int8.onnx`` -> ``model.int8.report.json``; a name
    not ending in ``.onnx`` keeps its whole name (``m.int8`` -> ``m.int8.report.json``: ``m.fp16``'s differs)."""
    path = Path(output)
    stem = path.stem if path.suffix.lower() == ".onnx" else path.name
    return path.with_name(f"{stem}.report.json")

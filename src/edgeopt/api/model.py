"""Look at and run a model: ``inspect``, ``run``, ``from_torch``."""

from __future__ import annotations

import io as _io
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.analysis import CostReport, MemoryReport, analyze_cost, memory_report
from edgeopt.api._common import ModelSource, Progress, check_path, check_progress, load, model_name, model_source
from edgeopt.api._terms import python_terms
from edgeopt.data.feeds import as_numpy, dims_match
from edgeopt.data.npy import read_error
from edgeopt.errors import DataError, OutputError
from edgeopt.io import atomic_write_files, make_output_folder

__all__ = ["InspectResult", "RunResult", "from_torch", "inspect", "run"]


# ----------------------------------------------------------------------- inspect


@dataclass(frozen=True, kw_only=True)
class InspectResult:
    """What a model costs: per-node rows, totals and activation memory."""

    name: str
    opset: int
    producer: str
    inputs: tuple[eir.InputSpec, ...]
    outputs: tuple[tuple[str, tuple, str], ...]
    cost: CostReport
    memory: MemoryReport

    def to_dict(self) -> dict:
        cost, memory = self.cost, self.memory
        return {
            "model": self.name, "opset": self.opset, "producer": self.producer,
            "inputs": [{"name": i.name, "shape": list(i.shape), "dtype": str(i.dtype)} for i in self.inputs],
            "outputs": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in self.outputs],
            "macs": cost.macs, "params": cost.params, "other_flops": cost.other_flops,
            "peak_activation_bytes": memory.peak_activation_bytes,
            "lower_bound_bytes": memory.lower_bound_bytes,
            "naive_activation_bytes": memory.naive_bytes,
            "peak_node": memory.peak_node,
            "weight_bytes": {"stored": cost.weight_bytes, "fp32": cost.param_bytes_fp32,
                             "fp16": cost.param_bytes_fp16, "int8": cost.param_bytes_int8},
            "unknown_nodes": list(cost.unknown_nodes), "uncounted_ops": list(cost.uncounted_ops),
            "subgraph_nodes": cost.subgraph_nodes,
            "nodes": [{"name": n.name, "op_type": n.op_type,
                       "output_shapes": [list(s) if s is not None else None for s in n.output_shapes],
                       "dtype": n.output_dtype, "params": n.params, "macs": n.macs,
                       "other_flops": n.other_flops, "activation_bytes": n.activation_bytes}
                      for n in cost.nodes],
        }


@python_terms()
def inspect(model: ModelSource, *, input_shapes: Mapping[str, Sequence[int]] | None = None) -> InspectResult:
    """Per-node op, shape, dtype, params, MACs, activation bytes; totals and peak activation RAM."""
    model = model_source(model)
    loaded = load(model, input_shapes=input_shapes)
    outputs = tuple((v.name, eir.static_shape(v) or (), str(eir.numpy_dtype(v))) for v in loaded.graph.outputs)
    return InspectResult(name=model_name(model), opset=eir.default_opset(loaded),
                         producer=" ".join(p for p in (loaded.producer_name, loaded.producer_version) if p),
                         inputs=tuple(eir.model_inputs(loaded)), outputs=outputs,
                         cost=analyze_cost(loaded), memory=memory_report(loaded))


# --------------------------------------------------------------------------- run


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """Outputs of running a model, and the files they were written to."""

    outputs: dict[str, np.ndarray] = field(repr=False)
    samples: int
    files: tuple[Path, ...] = ()

    def to_dict(self) -> dict:
        return {"samples": self.samples,
                "outputs": {name: {"shape": list(a.shape), "dtype": str(a.dtype)} for name, a in self.outputs.items()},
                "files": [str(f) for f in self.files]}


def _split_samples(spec: eir.InputSpec, array: np.ndarray) -> list[np.ndarray] | None:
    """Per-sample arrays when ``array`` stacks N samples for a batch-1 input (concatenated, ``N x C x H x W``,
    or ``np.stack``-ed, ``N x 1 x C x H x W``, as ``--data`` takes them), else None."""
    if spec.shape and array.ndim == len(spec.shape) - 1:
        return [array[np.newaxis]]
    if spec.shape and spec.shape[0] == 1 and array.ndim == len(spec.shape) and array.shape[0] > 1:
        return [array[i:i + 1] for i in range(array.shape[0])]
    if spec.shape and array.ndim == len(spec.shape) + 1 and dims_match(spec.shape, array.shape[1:]):
        return [array[i] for i in range(array.shape[0])]
    return None


def _name_unnamed(specs: Sequence[eir.InputSpec], arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Give the array passed without a name ("") to the model's only input."""
    named = dict(arrays)
    if "" in named:
        if len(specs) != 1:
            raise DataError(f"the model has {len(specs)} inputs ({', '.join(s.name for s in specs)}): "
                            "name each one, --input NAME=file.npy")
        if specs[0].name in named:
            raise DataError(f"input {specs[0].name!r} is given twice, by name and unnamed: give it once")
        named[specs[0].name] = named.pop("")
    return named


def _sample_feeds(specs: Sequence[eir.InputSpec], arrays: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    by_name = {spec.name: spec for spec in specs}
    split = {name: (_split_samples(by_name[name], array) if name in by_name else None)
             for name, array in arrays.items()}
    counts = {name: len(parts) for name, parts in split.items() if parts is not None}
    if not counts:
        return [dict(arrays)]
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{n}: {c}" for n, c in counts.items())
        raise DataError(f"inputs hold different numbers of stacked samples ({shown}): give each input the same N")
    total = next(iter(counts.values()))
    return [{name: (parts[i] if parts is not None else arrays[name]) for name, parts in split.items()}
            for i in range(total)]


def _safe_file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "output"


def _output_files(folder: Path, names: Sequence[str]) -> dict[str, Path]:
    """``<output>.npy`` per output name; names that map to one file (``y/1`` and ``y_1``, or ``Y`` and ``y``
    on a case-insensitive disk) get ``_2``, ``_3`` ... so no output replaces another."""
    files: dict[str, Path] = {}
    taken: set[str] = set()
    for name in names:
        stem = base = _safe_file_name(name)
        count = 1
        while stem.lower() in taken:
            count += 1
            stem = f"{base}_{count}"
        taken.add(stem.lower())
        files[name] = folder / f"{stem}.npy"
    return files


def read_input_file(path: str | os.PathLike) -> np.ndarray | dict[str, np.ndarray]:
    """The array in a .npy file, or the arrays of a .npz keyed by name (read whole: nothing stays mapped)."""
    path = Path(path)
    if path.is_dir():  # quantize's --data takes a folder of samples; run reads one batch
        raise DataError(f"input {path} is a folder: give one .npy or .npz file (one batch); "
                        "`edgeopt compare --data` or `quantize --data` read a folder of samples")
    if not path.is_file():
        raise DataError(f"input file {path} not found")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise read_error(path, error) from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            try:
                return {key: loaded[key] for key in loaded.files}
            except (ValueError, OSError, EOFError) as error:  # an object array inside, a damaged member
                raise read_error(path, error) from None
    return loaded


def _read_inputs(inputs: Mapping[str, np.ndarray | str | os.PathLike]) -> tuple[dict[str, np.ndarray], list[Path]]:
    """Arrays by input name (a value may be a .npy file), and the files they came from. A single array
    or .npy file, not in a mapping, feeds the model's only input; a single .npz feeds the inputs its keys name."""
    if isinstance(inputs, (str, os.PathLike)) or hasattr(inputs, "__array__"):  # a numpy array, a torch tensor
        inputs = {"": inputs}
    if not isinstance(inputs, Mapping):
        raise DataError(f"inputs must map input names to arrays or .npy files, got a {type(inputs).__name__}")
    arrays, files = {}, []
    for name, value in inputs.items():
        if isinstance(value, (str, os.PathLike)):
            loaded = read_input_file(value)
            if isinstance(loaded, dict) and name:
                raise DataError(f"{value} is a .npz keyed by input name: pass it alone (run(model, 'file.npz'), "
                                f"--input file.npz), not as input {name!r}")
            if isinstance(loaded, dict):
                arrays.update(loaded)
            else:
                arrays[name] = loaded
            files.append(Path(value))
        elif hasattr(value, "__array__"):
            arrays[name] = as_numpy(value)
        else:
            which = f"input {name!r}" if name else "the input"
            raise DataError(f"{which} is a {type(value).__name__}: pass a numpy array or the path of a .npy file")
    return arrays, files


def _check_spares_inputs(output_names: Sequence[str], folder: Path, input_files: Sequence[Path]) -> None:
    """Refuse (before any work) to write an output over one of the input files."""
    for name, target in _output_files(folder, output_names).items():
        for source in input_files:
            if target.exists() and target.resolve() == source.resolve():
                raise OutputError(f"output '{name}' would be written over the input file {source}: "
                                  "choose another -o/--output folder")


def _write_outputs(outputs: Mapping[str, np.ndarray], folder: Path) -> tuple[Path, ...]:
    make_output_folder(folder)
    files = []
    for (name, array), target in zip(outputs.items(), _output_files(folder, list(outputs)).values()):
        buffer = _io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        files.append((target, buffer.getvalue()))
    return tuple(atomic_write_files(files))  # the outputs of one run together, or none


@python_terms(**{"-o": "output_dir", "-o/--output": "output_dir", "--output": "output_dir"})
def run(model: ModelSource, inputs: Mapping[str, np.ndarray | str | os.PathLike] | np.ndarray | str | os.PathLike, *,
        output_dir: str | os.PathLike | None = None, progress: Progress | None = None) -> RunResult:
    """Run ``model`` in ONNX Runtime; N stacked samples for a batch-1 input run one by one.

    ``inputs`` maps input names to arrays or .npy files (the key "" names the
    model's only input). Outputs go to ``output_dir`` as ``<output>.npy``,
    never over one of the input files. A folder written by ``compile_model``
    runs its generated C, built on the host.
    """
    from edgeopt.data import check_feed
    from edgeopt.runtime.ort import OrtSession

    from edgeopt.api.deploy import is_compiled_folder, run_compiled

    model = model_source(model)
    check_path(output_dir, "output_dir")
    check_progress(progress)
    if output_dir is not None:
        make_output_folder(output_dir, create=False)  # before any work
    arrays, input_files = _read_inputs(inputs)
    if is_compiled_folder(model):
        return run_compiled(model, arrays, output_dir, progress, input_files=input_files)
    loaded = load(model, require_static=False)
    specs = eir.model_inputs(loaded)
    feeds = _sample_feeds(specs, _name_unnamed(specs, arrays))
    if not feeds:  # an array of 0 samples (stacked on an axis of length 0)
        named = ", ".join(map(str, input_files)) or "--input"
        raise DataError(f"{named} holds no sample (an axis of length 0): give at least one")
    session = OrtSession(loaded)
    if output_dir is not None:
        _check_spares_inputs(session.output_names, Path(output_dir), input_files)
    results: list[dict[str, np.ndarray]] = []
    where = f"--input {', '.join(map(str, input_files))}" if input_files else "--input"
    for index, feed in enumerate(feeds):
        sample = f" [sample {index}]" if len(feeds) > 1 else ""
        results.append(session.run(check_feed(specs, feed, where=where + sample)))
        if progress is not None:
            progress(index + 1, len(feeds))
    outputs = {name: (np.concatenate([r[name] for r in results]) if len(results) > 1 else results[0][name])
               for name in session.output_names}
    files = _write_outputs(outputs, Path(output_dir)) if output_dir is not None else ()
    return RunResult(outputs=outputs, samples=sum(_feed_samples(specs, feed) for feed in feeds), files=files)


def _feed_samples(specs: Sequence[eir.InputSpec], feed: Mapping[str, np.ndarray]) -> int:
    """The samples one run takes: the rows of a dynamic batch axis (N stacked samples run at once), else 1."""
    first = specs[0] if specs else None
    batched = first is not None and len(first.shape) > 1 and not isinstance(first.shape[0], int)
    return int(np.shape(feed[first.name])[0]) if batched and first.name in feed else 1


# ------------------------------------------------------------------------- torch


@python_terms()
def from_torch(module, example_inputs, *, path: str | os.PathLike | None = None, opset: int = 17,
               input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None) -> ir.Model:
    """Export a ``torch.nn.Module`` to ONNX (eval mode) and load it; saved to ``path`` if given."""
    from edgeopt.io.torch_export import export_torch

    return export_torch(module, example_inputs, path=path, opset=opset,
                        input_names=input_names, output_names=output_names)

"""Deploy: ``compile_model`` (QDQ int8 -> C), ``verify``, and running compiled C like a model."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgeopt.api._common import ModelSource, check_flag, check_path, load, model_source
from edgeopt.api._terms import python_terms
from edgeopt.api.model import RunResult, _check_spares_inputs, _name_unnamed, _sample_feeds, _write_outputs
from edgeopt.data import ImagePreprocess
from edgeopt.errors import CodegenError, ConfigError, EdgeoptError, Interrupted, OutputError

__all__ = ["compile_model", "is_compiled_folder", "run_compiled", "verify"]

logger = logging.getLogger(__name__)


def is_compiled_folder(model: ModelSource) -> bool:
    from edgeopt.codegen.c import is_c_folder

    return not isinstance(model, ir.Model) and is_c_folder(model)


@python_terms()
def compile_model(model: ModelSource, output: str | os.PathLike, *, target: str = "c",
                  device: str | os.PathLike = "x86-host", name: str = "model", rounding: str = "double",
                  force: bool = False, measure: bool = True,
                  input_shapes: Mapping[str, Sequence[int]] | None = None):
    """Generate deployable code for an int8 QDQ model and report what it costs.

    ``input_shapes`` fixes dynamic input dimensions (``--input-shape``): the C
    code has one static arena, so every shape must be known.

    ``target="c"``: portable C99 into the folder ``output`` (see
    :mod:`edgeopt.codegen.c`). Unsupported ops are refused, listed with their
    nodes, before anything is written. With ``measure`` the code is built and
    timed on the host (flash, stack estimate, latency; needs gcc). The report
    goes to ``output/report.json``; a model that does not fit ``device`` is
    still written, and the report's ``fits``/``misses()`` say by how much.
    """
    from edgeopt.codegen.c import compile_c
    from edgeopt.codegen.c.build import BuildFailed
    from edgeopt.codegen.c.report import CompileReport, measure_host

    model = model_source(model)
    check_path(output, "output", optional=False)
    check_flag(force, "force")
    check_flag(measure, "measure")
    if target != "c":
        raise ConfigError(f"--target {target!r} is not supported: the only code generation target is c")
    if not isinstance(model, ir.Model) and Path(output).resolve() in Path(model).resolve().parents:
        raise OutputError(f"the model {model} is inside the output folder {output}: compiling would replace it; "
                          "choose another -o")
    result = compile_c(_static_shape_arithmetic_folded(load(model, input_shapes=input_shapes)), output,
                       device=device, name=name, rounding=rounding, force=force)
    host = None
    if measure:
        try:
            host = measure_host(result.out_dir)
        except BuildFailed as error:  # the generated code does not build: that is no measurement to skip
            raise CodegenError(f"the generated C does not build ({error}): please report it") from None
        except EdgeoptError as error:  # no gcc or make here, a binary that cannot run
            logger.warning("host measurement skipped: %s", error)
        except KeyboardInterrupt:  # the code is written: its report too, without the host's figures
            report = CompileReport(result=result, host=None)
            report.write()
            raise Interrupted(report) from None
    report = CompileReport(result=result, host=host)
    report.write()
    return report


def _static_shape_arithmetic_folded(model: ir.Model) -> ir.Model:
    """``model`` with the shape arithmetic a dynamic dim left in it folded, now that every shape is fixed.

    A model quantized with a dynamic batch keeps ``Shape -> Squeeze/Gather -> Concat -> Reshape``
    (``x.view(x.size(0), -1)``, and torch.flatten in the dynamo exporter's unoptimized graph): the C has
    no Shape kernel, and once ``--input-shape`` fixes the shapes those nodes are constants. A model
    without Shape or Size nodes is compiled as it is.
    """
    if not any(node.op_type in ("Shape", "Size") for node in model.graph):
        return model
    from edgeopt.passes import EliminateDeadCodePass, FoldConstantsPass

    FoldConstantsPass()(model)
    EliminateDeadCodePass()(model)
    return model


@python_terms(**{"-o": "out_dir"})
def verify(out_dir: str | os.PathLike, data, *, preprocess: ImagePreprocess | None = None,
           max_samples: int | None = None):
    """Run the C code in ``out_dir`` and the reference interpreter on ``data``; name the first layer that differs."""
    from edgeopt.codegen.c import verify as verify_c
    from edgeopt.codegen.c.host import HostProgram
    from edgeopt.data import open_data, take

    check_path(out_dir, "out_dir (the folder edgeopt compile wrote)", optional=False)
    source = open_data(data, HostProgram(out_dir).input_specs, preprocess=preprocess)
    return verify_c(out_dir, take(source, max_samples) if max_samples is not None else source)


def _check_compiled_feeds(specs, feeds: Sequence[Mapping[str, np.ndarray]], input_files: Sequence[Path]) -> None:
    """The checks (and messages) of running an ONNX model: input names, shapes, NaN/Inf. An int8 input is
    checked as the float it passes for (the C takes it as it is)."""
    from edgeopt.data import check_feed

    where = f"--input {', '.join(map(str, input_files))}" if input_files else "--input"
    for index, feed in enumerate(feeds):
        as_float = {name: (array.astype(np.float32) if getattr(array, "dtype", None) == np.int8 else array)
                    for name, array in feed.items()}
        check_feed(specs, as_float, where=where + (f" [sample {index}]" if len(feeds) > 1 else ""))


def run_compiled(folder: str | os.PathLike, inputs: Mapping[str, np.ndarray], output_dir, progress, *,
                 input_files: Sequence[Path] = ()) -> RunResult:
    from edgeopt.codegen.c.host import HostProgram

    program = HostProgram(folder)
    feeds = _sample_feeds(program.input_specs, _name_unnamed(program.input_specs, inputs))
    _check_compiled_feeds(program.input_specs, feeds, input_files)
    if output_dir is not None:
        _check_spares_inputs(program.output_names, Path(output_dir), input_files)
    outputs = program.run(feeds)
    if progress is not None:
        progress(len(feeds), len(feeds))
    files = _write_outputs(outputs, Path(output_dir)) if output_dir is not None else ()
    return RunResult(outputs=outputs, samples=len(feeds), files=files)



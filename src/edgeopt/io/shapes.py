"""Input and output shapes of a model being loaded: ``--input-shape`` fixes dynamic input dims (and the
named dims other inputs share with them), a model left dynamic is refused with the flag to give, and the
exporter's output shapes give way to inferred ones but fill what inference cannot find."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx

from edgeopt.errors import ModelError

__all__ = ["check_static", "clear_output_shapes", "fix_input_shapes", "parse_input_shapes", "restore_output_shapes",
           "value_dims"]

logger = logging.getLogger(__name__)


def parse_input_shapes(specs: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``NAME=1x3x224x224`` strings into ``{name: shape}``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims_text = spec.rpartition("=")
        if not sep or not name or not dims_text:
            raise ModelError(f"--input-shape {spec!r} is not NAME=DIMS: write it like input=1x3x224x224")
        try:
            dims = tuple(int(d) for d in dims_text.lower().replace(",", "x").split("x"))
        except ValueError:
            raise ModelError(f"--input-shape {spec!r}: dims must be integers like 1x3x224x224") from None
        if any(d <= 0 for d in dims):
            raise ModelError(f"--input-shape {spec!r}: every dim must be a positive integer")
        if shapes.get(name, dims) != dims:
            raise ModelError(f"--input-shape gives {name} two shapes ({'x'.join(map(str, shapes[name]))} and "
                             f"{dims_text}): give it once")
        shapes[name] = dims
    return shapes


def value_dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    """Each dim of ``value``'s tensor shape: its size, its name, or None (neither, or a size of 0)."""
    dims: list[int | str | None] = []
    for dim in value.type.tensor_type.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value > 0:
            dims.append(dim.dim_value)
        else:
            dims.append(dim.dim_param or None)
    return dims


def _check_input_shapes(shapes: object) -> None:
    """ModelError unless ``shapes`` maps input names to sequences of positive integers (``input_shapes``
    in Python; ``parse_input_shapes`` reads the command line's NAME=DIMS)."""
    if not isinstance(shapes, Mapping):
        raise ModelError(f"input_shapes must map input names to dims, e.g. {{'input': (1, 3, 224, 224)}}, "
                         f"got {type(shapes).__name__} {str(shapes)[:40]!r}")
    for name, dims in shapes.items():
        valid = isinstance(dims, (Sequence, np.ndarray)) and not isinstance(dims, str) and all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in dims)
        if not isinstance(name, str) or not valid:
            raise ModelError(f"input_shapes[{name!r}] = {dims!r}: give an input name and a tuple of positive "
                             "integer dims, e.g. (1, 3, 224, 224)")


def fix_input_shapes(graph: onnx.GraphProto, shapes: Mapping[str, Sequence[int]]) -> None:
    _check_input_shapes(shapes)
    by_name = {v.name: v for v in graph.input}
    for name, shape in shapes.items():
        if name not in by_name:
            raise ModelError(f"--input-shape names {name!r}, but the model's inputs are: {', '.join(by_name)}")
        value = by_name[name]
        current = value_dims(value)
        if value.type.tensor_type.HasField("shape") and len(current) != len(shape):
            raise ModelError(f"--input-shape {name}: model input has rank {len(current)} "
                             f"({'x'.join(str(d or '?') for d in current)}), got {len(shape)} dims")
        for position, (old, new) in enumerate(zip(current, shape)):
            if isinstance(old, int) and old != new:
                raise ModelError(f"--input-shape {name}: dim {position} is fixed to {old} in the model, got {new}")
    bound = _bound_dim_names(by_name, shapes)
    for name, shape in shapes.items():
        _set_dims(by_name[name], shape)
    for name, value in by_name.items():
        params = [dim.dim_param for dim in value.type.tensor_type.shape.dim]
        if name not in shapes and any(param in bound for param in params):
            _set_dims(value, [bound.get(param, dim.dim_value) if param else dim.dim_value
                              for param, dim in zip(params, value.type.tensor_type.shape.dim)], keep_params=True)
            logger.info("--input-shape: %s takes its sizes of %s from the inputs given", name,
                        ", ".join(sorted({p for p in params if p in bound})))


def _bound_dim_names(by_name: Mapping[str, onnx.ValueInfoProto], shapes: Mapping[str, Sequence[int]]
                     ) -> dict[str, int]:
    """The sizes the given shapes give the inputs' named dims (``batch``, ``past``): ONNX's named dims
    are equal wherever the name recurs, so a decoder's KV-cache inputs take ``batch`` and ``past``
    from one of them. A name given two sizes binds nothing."""
    sizes: dict[str, set[int]] = {}
    for name, shape in shapes.items():
        for dim, size in zip(by_name[name].type.tensor_type.shape.dim, shape):
            if dim.dim_param:
                sizes.setdefault(dim.dim_param, set()).add(int(size))
    return {param: next(iter(found)) for param, found in sizes.items() if len(found) == 1}


def _set_dims(value: onnx.ValueInfoProto, shape: Sequence[int], *, keep_params: bool = False) -> None:
    """Write ``shape`` into ``value``'s type; with ``keep_params`` a size 0 keeps the dim's name."""
    tensor_shape = value.type.tensor_type.shape
    params = [dim.dim_param for dim in tensor_shape.dim]
    tensor_shape.ClearField("dim")
    for size, param in zip(shape, params if keep_params else [""] * len(shape)):
        dim = tensor_shape.dim.add()
        if size or not param:
            dim.dim_value = int(size)
        else:
            dim.dim_param = param


def check_static(graph: onnx.GraphProto) -> None:
    for value in graph.input:
        dims = value_dims(value)
        if not value.type.tensor_type.HasField("shape") or any(not isinstance(d, int) for d in dims):
            shown = "x".join(str(d) if d is not None else "?" for d in dims) or "unknown"
            params = [dim.dim_param for dim in value.type.tensor_type.shape.dim]
            # a dynamic batch is 1; other dynamic dims have no safe guess: their names (H, W) stay for the user
            example = "x".join(str(d) if isinstance(d, int) else "1" if i == 0 else (params[i] or "?")
                               for i, d in enumerate(dims)) or "1x3x224x224"
            named = [params[i] or "?" for i, d in enumerate(dims) if i > 0 and not isinstance(d, int)]
            told = (f" with {', '.join(dict.fromkeys(named))} replaced by the integer sizes you will run" if named
                    else " (the sizes you will run)" if example != shown else "")
            sharing = [other.name for other in graph.input if other is not value and set(params) & {
                dim.dim_param for dim in other.type.tensor_type.shape.dim if dim.dim_param}]
            if sharing:
                told += f"; {len(sharing)} other inputs with the same dim names ({sharing[0]}, ...) take these sizes"
            raise ModelError(f"input {value.name!r} has dynamic shape {shown}: fix it with --input-shape "
                             f"{value.name}={example}{told}")


def clear_output_shapes(graph: onnx.GraphProto) -> dict[str, onnx.TensorShapeProto]:
    """Forget exporter-written intermediate and output shapes so inference recomputes them: a symbolic
    dim may be fixed by ``--input-shape`` now, and a static one may be stale (a head swapped by hand,
    its output still written 1x1000), which ONNX's inference keeps over what it computes.

    Returns the output shapes cleared, for :func:`restore_output_shapes`.
    """
    del graph.value_info[:]
    cleared: dict[str, onnx.TensorShapeProto] = {}
    for value in graph.output:
        if value.type.tensor_type.HasField("shape"):
            cleared[value.name] = onnx.TensorShapeProto()
            cleared[value.name].CopyFrom(value.type.tensor_type.shape)
            value.type.tensor_type.ClearField("shape")
    return cleared


def restore_output_shapes(graph: onnx.GraphProto, cleared: Mapping[str, onnx.TensorShapeProto]) -> None:
    """Give the exporter's shape back to outputs whose shape inference could not find, and its static
    dims to those inference left unknown (when the ranks agree).

    Before opset 13 inference loses even the rank of a Reshape whose target is computed at run
    time, as ``x.view(x.size(0), -1)`` exports (Shape -> Gather -> Unsqueeze -> Concat, ops that
    propagate data only from opset 13), and ONNX's checker requires a shape on every graph output.
    """
    for value in graph.output:
        tensor_type = value.type.tensor_type
        if value.name not in cleared:
            continue
        written = cleared[value.name]
        if not tensor_type.HasField("shape"):
            tensor_type.shape.CopyFrom(written)
        elif len(tensor_type.shape.dim) == len(written.dim):
            for dim, exported in zip(tensor_type.shape.dim, written.dim):
                if not dim.HasField("dim_value") and exported.HasField("dim_value") and not dim.dim_param:
                    dim.dim_value = exported.dim_value

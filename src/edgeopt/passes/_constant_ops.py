"""Numpy versions of the small ONNX ops exporters leave on constants.

Each entry is a plain function with the op's signature: inputs positional
(None for an omitted optional input), attributes as keywords with their ONNX
defaults; where an attribute became an input in a later opset (Unsqueeze
axes, Clip bounds) either form is accepted. They cover the
shape arithmetic (Shape -> Gather -> Unsqueeze -> Concat -> Reshape) and the
elementwise math on weights that exporters write (and the Mod of a negative axis that
torch's nn.MultiheadAttention export computes, the Trilu of a causal mask of static
length); anything else is not folded.
Results keep ONNX dtypes: integer Div truncates toward zero, Pow keeps the
base's type.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

__all__ = ["CONSTANT_OPS"]


def _axes(axes_input: np.ndarray | None, axes_attribute: list[int] | None) -> list[int] | None:
    if axes_input is not None:
        return [int(a) for a in axes_input.reshape(-1)]
    return list(axes_attribute) if axes_attribute is not None else None


def _div(a, b):
    if np.issubdtype(a.dtype, np.integer):
        return np.trunc(np.true_divide(a, b)).astype(a.dtype)
    return np.divide(a, b).astype(a.dtype)


def _mod(a, b, *, fmod: int = 0):
    """``fmod=0``: the remainder takes the divisor's sign (Python's ``%``), integers only; 1: the dividend's (C)."""
    return np.asarray(np.fmod(a, b) if fmod else np.mod(a, b)).astype(a.dtype)


def _trilu(x, k=None, *, upper: int = 1):
    """The upper (or lower) triangle of the last two axes from diagonal ``k``; a causal mask's ``triu``."""
    diagonal = int(k) if k is not None else 0
    return (np.triu(x, diagonal) if upper else np.tril(x, diagonal)).astype(x.dtype)


def _cast(x, *, to: int, saturate: int = 1):
    return x.astype(ir.DataType(to).numpy())


def _reshape(data, shape, *, allowzero: int = 0):
    dims = [int(d) for d in shape]
    if not allowzero:
        dims = [data.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return data.reshape(dims)


def _unsqueeze(data, axes=None, **attributes):
    axes = _axes(axes, attributes.get("axes"))
    rank = data.ndim + len(axes)
    result = data
    for axis in sorted(a + rank if a < 0 else a for a in axes):
        result = np.expand_dims(result, axis)
    return result


def _squeeze(data, axes=None, **attributes):
    axes = _axes(axes, attributes.get("axes"))
    if axes is None:
        return np.squeeze(data)
    return np.squeeze(data, axis=tuple(axes))


def _slice(data, starts, ends, axes=None, steps=None):
    index = [slice(None)] * data.ndim
    axes_list = list(range(len(starts))) if axes is None else [int(a) for a in axes]
    steps_list = [1] * len(starts) if steps is None else [int(s) for s in steps]
    for start, end, axis, step in zip(starts, ends, axes_list, steps_list):
        index[axis] = slice(int(start), int(end), step)
    return data[tuple(index)]


def _flatten(x, *, axis: int = 1):
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


def _constant_of_shape(shape, *, value=None):
    fill = np.zeros(1, np.float32) if value is None else value.numpy().reshape(-1)
    return np.full([int(d) for d in shape], fill[0], dtype=fill.dtype)


def _expand(x, shape):
    return np.array(np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(int(d) for d in shape))))


def _range(start, limit, delta):
    return np.arange(start.item(), limit.item(), delta.item()).astype(start.dtype)


def _transpose(x, *, perm=None):
    return np.transpose(x, perm)


def _clip(x, low=None, high=None, **attributes):
    low = attributes.get("min", low)
    high = attributes.get("max", high)
    result = x if low is None else np.maximum(x, low)
    return (result if high is None else np.minimum(result, high)).astype(x.dtype)


def _elementwise(function: Callable) -> Callable:
    def apply(*arrays):
        return np.asarray(function(*arrays)).astype(arrays[0].dtype, copy=False)

    return apply


def _variadic(function: Callable) -> Callable:
    def apply(*arrays):
        result = arrays[0]
        for array in arrays[1:]:
            result = function(result, array)
        return np.asarray(result)

    return apply


def _boolean(function: Callable) -> Callable:
    return lambda *arrays: np.asarray(function(*arrays))


CONSTANT_OPS: dict[str, Callable[..., np.ndarray]] = {
    "Identity": lambda x: x,
    "Cast": _cast,
    "Reshape": _reshape,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Flatten": _flatten,
    "Transpose": _transpose,
    "Concat": lambda *arrays, axis: np.concatenate(arrays, axis=axis),
    "Gather": lambda data, indices, *, axis=0: np.take(data, indices.astype(np.int64), axis=axis),
    "Slice": _slice,
    "Expand": _expand,
    "ConstantOfShape": _constant_of_shape,
    "Range": _range,
    "Clip": _clip,
    "Add": _elementwise(np.add),
    "Sub": _elementwise(np.subtract),
    "Mul": _elementwise(np.multiply),
    "Div": _div,
    "Mod": _mod,
    "Trilu": _trilu,
    "Pow": _elementwise(np.power),
    "Neg": _elementwise(np.negative),
    "Abs": _elementwise(np.abs),
    "Sqrt": _elementwise(np.sqrt),
    "Reciprocal": _elementwise(np.reciprocal),
    "Floor": _elementwise(np.floor),
    "Ceil": _elementwise(np.ceil),
    "Min": _variadic(np.minimum),
    "Max": _variadic(np.maximum),
    "Equal": _boolean(np.equal),
    "Less": _boolean(np.less),
    "Greater": _boolean(np.greater),
    "Not": _boolean(np.logical_not),
    "And": _boolean(np.logical_and),
    "Or": _boolean(np.logical_or),
    "Where": lambda condition, x, y: np.where(condition, x, y),
}

"""Check one batch of input data against the model's inputs.

A *feed* is ``{input_name: array}``. It is valid for a model when it names
exactly the model's inputs, every array has the input's rank, every static dim
matches (a dynamic dim, a symbol or ``None``, accepts any size), and the
values are finite numbers. Arrays are cast to the input's dtype only when that
is unambiguous:

* any float or integer data into a float input (float64 → float32 included;
  integer data is warned about once per input and dtype: raw 0-255 pixels
  given to a model trained on normalized ones calibrate the wrong ranges);
* integer data into an integer input when every value fits the target type;
* booleans into any numeric input, and 0/1 integers into a boolean one (an
  attention mask saved as int64 for a model that takes it as bool);
* float data into an integer input is refused: rounding would be a guess.

The returned arrays are C-contiguous and of the input's dtype. Read-only
(e.g. memory-mapped), strided or cast data is copied once; a writable array
that already fits is returned as given.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence

import numpy as np

from edgeopt.errors import DataError
from edgeopt.ir.values import InputSpec

__all__ = ["as_numpy", "check_feed", "dims_match", "forget_cast_warnings", "shape_text"]

_NUMERIC_KINDS = "biuf"

logger = logging.getLogger(__name__)
_warned = threading.local()  # per thread: the (input, data dtype, input dtype) casts already warned about


def _warned_casts() -> set[tuple[str, str, str]]:
    if not hasattr(_warned, "casts"):
        _warned.casts = set()
    return _warned.casts


def forget_cast_warnings() -> None:
    """Warn again about casts already warned about (a new command or report starts)."""
    _warned_casts().clear()


def shape_text(shape: Sequence[int | str | None]) -> str:
    """``1x3x?x?`` for a shape whose dynamic dims (symbols or None) show as ``?``."""
    if not shape:
        return "scalar"
    return "x".join(str(d) if isinstance(d, int) else "?" for d in shape)


def dims_match(expected: Sequence[int | str | None], got: Sequence[int]) -> bool:
    """True when ``got`` has the rank of ``expected`` and agrees on every static dim."""
    if len(expected) != len(got):
        return False
    return all(not isinstance(want, int) or want == have for want, have in zip(expected, got))


def _input_list(specs: Sequence[InputSpec]) -> str:
    return ", ".join(spec.name for spec in specs)


def _check_names(specs: Sequence[InputSpec], feed: Mapping[str, object], where: str) -> None:
    names = {spec.name for spec in specs}
    for name in feed:
        if name not in names:
            raise DataError(f"{where} has data for {name!r}, which is not a model input "
                            f"(the model's inputs are: {_input_list(specs)}): rename or remove it")
    for spec in specs:
        if spec.name not in feed:
            raise DataError(f"{where} has no data for model input {spec.name!r} "
                            f"(the model's inputs are: {_input_list(specs)}): add an array named {spec.name!r}")


def as_numpy(value: object) -> np.ndarray:
    """``value`` as a numpy array (no copy where numpy needs none); a torch tensor that requires grad
    (activations captured without ``torch.no_grad()``), which numpy refuses, is detached first."""
    if type(value).__module__.startswith("torch") and callable(getattr(value, "detach", None)):
        value = value.detach().cpu()
    return np.asarray(value)


def _as_array(value: object, name: str, where: str) -> np.ndarray:
    try:
        array = as_numpy(value)
    except (ValueError, TypeError) as error:
        raise DataError(f"{where}: the data for input {name!r} is not an array "
                        f"({str(error).splitlines()[0]}): give a numeric numpy array") from None
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise DataError(f"{where}: input {name!r} holds {array.dtype} data, not real numbers: "
                        "save numeric arrays (float32, int64, uint8, ...)")
    return array


_ONE_SAMPLE_PER_ITEM = ("yield one sample per item, or pass {name: array} with the samples stacked on axis 0 "
                        "(edgeopt splits it)")


def _check_shape(spec: InputSpec, array: np.ndarray, where: str) -> None:
    if not spec.rank_known or dims_match(spec.shape, array.shape):
        return
    rank_note, advice = "", _reordered_advice(spec.shape, array.shape) or "reshape or resize the data"
    stacked = _is_stacked(spec.shape, array.shape)
    if stacked:  # np.stack of batches: the rank is as documented, a sample's own shape is what differs
        rank_note = f" ({array.shape[0]} stacked samples of {shape_text(array.shape[1:])})"
    elif array.ndim == 0:  # np.save of a scalar
        rank_note = f" (a single number, no axes: the model wants rank {len(spec.shape)})"
    elif array.ndim != len(spec.shape):
        rank_note = f" (rank {array.ndim}, the model wants rank {len(spec.shape)})"
    if stacked and dims_match(spec.shape, array.shape[1:]):  # an item of a generator holding many samples
        advice = _ONE_SAMPLE_PER_ITEM
    elif not stacked and array.ndim and spec.shape[0] == 1 and array.shape[0] > 1 \
            and dims_match(spec.shape[1:], array.shape[1:]):
        # a DataLoader's batches for a model exported at batch 1
        advice = f"the model takes batch 1, this is a batch of {array.shape[0]}: {_ONE_SAMPLE_PER_ITEM}"
    raise DataError(f"{where}: input {spec.name!r} wants shape {shape_text(spec.shape)} "
                    f"but got {shape_text(array.shape)}{rank_note}: {advice}")


def _reordered_advice(expected: Sequence[int | str | None], got: tuple[int, ...]) -> str | None:
    """Advice for data whose sample dims are the input's in another order (channels-last images for
    an NCHW model): a reshape, the usual advice, would scramble them silently."""
    rest = tuple(expected[1:])
    lead = len(got) - len(rest)  # axes before a sample's dims: none, the batch, or stacked samples and the batch
    if lead not in (0, 1, 2) or (lead == 2 and not _is_stacked(expected, got)):
        return None
    sample = got[lead:]
    if len(rest) < 2 or dims_match(rest, sample):
        return None
    advice = "its dims are the input's in another order: transpose the data, do not reshape it"
    if len(rest) == 3 and dims_match(rest, (sample[2], sample[0], sample[1])):
        return f"{advice} (channels-last to NCHW: x.transpose{(*range(lead), lead + 2, lead, lead + 1)})"
    if len(rest) == 3 and dims_match(rest, (sample[1], sample[2], sample[0])):
        return f"{advice} (NCHW to channels-last: x.transpose{(*range(lead), lead + 1, lead + 2, lead)})"
    if all(isinstance(d, int) for d in rest) and sorted(sample) == sorted(rest):
        return advice
    return None


def _is_stacked(expected: Sequence[int | str | None], got: tuple[int, ...]) -> bool:
    """``got`` is samples stacked on a new axis 0, each with the input's rank and batch dim (N x 1 x ...)."""
    return len(expected) > 0 and len(got) == len(expected) + 1 and dims_match(expected[:1], got[1:2])


def _check_int_range(spec: InputSpec, array: np.ndarray, where: str) -> None:
    if array.size == 0 or array.dtype.kind == "b" or np.can_cast(array.dtype, spec.dtype, casting="safe"):
        return
    info = np.iinfo(spec.dtype)
    low, high = int(array.min()), int(array.max())
    if low < info.min or high > info.max:
        raise DataError(f"{where}: input {spec.name!r} wants {spec.dtype} but the values span "
                        f"{low}..{high}: bring them into {info.min}..{info.max}")


def _check_zeros_and_ones(spec: InputSpec, array: np.ndarray, where: str) -> None:
    if array.size == 0:
        return
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 1:
        raise DataError(f"{where}: input {spec.name!r} wants bool but the values span {low}..{high}: "
                        "give booleans, or 0 and 1")


def _check_cast(spec: InputSpec, array: np.ndarray, where: str) -> None:
    want, have = spec.dtype.kind, array.dtype.kind
    if array.dtype == spec.dtype:
        return
    if want == "f":
        key = (spec.name, str(array.dtype), str(spec.dtype))
        if have in "iu" and key not in _warned_casts():
            _warned_casts().add(key)
            logger.warning("%s: input %r gets %s data, cast to %s as is: if the model was trained on "
                           "normalized values, normalize the data the same way first", where, spec.name,
                           array.dtype, spec.dtype)
        return
    if want in "iu" and have in "biu":
        _check_int_range(spec, array, where)
        return
    if want == "b" and have in "iu":
        _check_zeros_and_ones(spec, array, where)
        return
    module = "ml_dtypes" if spec.dtype == "bfloat16" else "np"  # numpy has no bfloat16: ml_dtypes (onnx's) has
    raise DataError(f"{where}: input {spec.name!r} wants {spec.dtype} but the data is {array.dtype}: "
                    f"convert it (array.astype({module}.{spec.dtype})) if that is what you mean")


def _check_finite(spec: InputSpec, array: np.ndarray, where: str) -> None:
    if array.dtype.kind != "f" or np.isfinite(array).all():
        return
    what = "NaN" if np.isnan(array).any() else "Inf"
    raise DataError(f"{where} holds {what} values in input {spec.name!r}: clean the data")


def _owned(spec: InputSpec, array: np.ndarray, where: str) -> np.ndarray:
    """Cast/copy once; a downcast that overflows (1e300 into float32) is reported."""
    needs_copy = isinstance(array, np.memmap) or not array.flags.writeable
    if array.dtype == spec.dtype and array.flags.c_contiguous and not needs_copy:
        return array
    with np.errstate(over="ignore"):  # an overflow is reported below, as a DataError
        result = np.array(array, dtype=spec.dtype, order="C")
    if spec.dtype.kind == "f" and array.dtype.kind == "f" and spec.dtype.itemsize < array.dtype.itemsize:
        if not np.isfinite(result).all():
            raise DataError(f"{where}: input {spec.name!r} holds values beyond the {spec.dtype} range: "
                            "rescale the data")
    return result


def check_feed(
    specs: Sequence[InputSpec],
    feed: Mapping[str, object],
    *,
    where: str,
) -> dict[str, np.ndarray]:
    """Validate one batch against the model inputs and return it, cast where lossless.

    Raises a one-line :class:`DataError` naming the input and ``where`` (the
    source, e.g. a file path) for unknown or missing inputs, wrong shapes,
    non-numeric or lossy dtypes, and NaN or Inf values.
    """
    _check_names(specs, feed, where)
    checked: dict[str, np.ndarray] = {}
    for spec in specs:
        array = _as_array(feed[spec.name], spec.name, where)
        _check_shape(spec, array, where)
        _check_cast(spec, array, where)
        _check_finite(spec, array, where)
        checked[spec.name] = _owned(spec, array, where)
    _check_shared_dims(specs, checked, where)
    return checked


def _check_shared_dims(specs: Sequence[InputSpec], feed: Mapping[str, np.ndarray], where: str) -> None:
    """A named dynamic dim (``seq``) must have one size across the inputs of a batch: token ids of
    8 and a mask of 9 would otherwise fail deep inside ONNX Runtime."""
    seen: dict[str, tuple[str, int]] = {}
    for spec in specs:
        if not spec.rank_known:
            continue
        for dim, size in zip(spec.shape, feed[spec.name].shape):
            if not isinstance(dim, str) or not dim:
                continue
            first = seen.setdefault(dim, (spec.name, size))
            if first[1] != size:
                raise DataError(f"{where}: input '{spec.name}' has {dim}={size} but '{first[0]}' has {dim}="
                                f"{first[1]}: the model gives both the same size (give them the same length)")

"""Fidelity of a test tensor (e.g. the quantized model's) to a reference (the float model's).

Every metric is accumulated over all samples seen, in float64, so streaming
batch by batch gives the same number as one call on the concatenated data.
With reference ``r`` and test ``t`` summed over every element of every sample:

* SQNR (dB)        = 10 log10( sum r^2 / sum (r - t)^2 )
  (+inf when the error is zero, -inf when the error is not but the signal is);
* cosine           = sum r t / ( sqrt(sum r^2) sqrt(sum t^2) )
  (1 when both are all zero, 0 when only one is);
* max abs error    = max |r - t|;
* top-1 agreement  = fraction of rows whose argmax over the last axis is the
  same in ``r`` and ``t`` -- meaningful for class scores, which
  :func:`looks_like_class_scores` recognises as ``[N, C]`` with ``C > 1``;
* accuracy         = fraction of rows whose argmax equals the integer label.

The meters follow the estimator discipline: the constructor stores settings
(a name for messages), ``update`` streams, ``result`` returns a frozen value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgeopt.errors import DataError

__all__ = [
    "AccuracyMeter",
    "AgreementMeter",
    "EqualityMeter",
    "Fidelity",
    "FidelityMeter",
    "Float64Scratch",
    "Rate",
    "accuracy",
    "cosine_similarity",
    "count_of",
    "json_number",
    "json_text",
    "looks_like_class_scores",
    "max_abs_error",
    "sqnr_db",
    "top1_agreement",
]


def count_of(count: int | None, singular: str, plural: str) -> str:
    """``1 sample``, ``2 samples``: a count in words, for reports and messages."""
    return f"{count} {singular if count == 1 else plural}"


def json_number(value: float) -> float | str:
    """``value`` for strict JSON: finite floats as is, else ``"inf"``, ``"-inf"`` or ``"nan"``."""
    return float(value) if math.isfinite(value) else str(float(value))


def json_text(data) -> str:
    """``data`` as strict JSON text (indented): every non-finite float, wherever it sits, written as
    :func:`json_number` writes it, since ``Infinity`` and ``NaN`` are not JSON; other objects by ``str``."""
    def strict(item):
        if isinstance(item, float):
            return json_number(item)
        if isinstance(item, dict):
            return {key: strict(value) for key, value in item.items()}
        if isinstance(item, (list, tuple)):
            return [strict(value) for value in item]
        return item

    return json.dumps(strict(data), indent=2, default=str, allow_nan=False)


def looks_like_class_scores(shape: Sequence[int]) -> bool:
    """True for ``[N, C]`` with ``C > 1``: one row of class scores (logits, probabilities) per sample."""
    return len(shape) == 2 and shape[1] > 1


def _sqnr_from_energy(signal: float, noise: float) -> float:
    if not (math.isfinite(signal) and math.isfinite(noise)):  # inf or NaN values: no meaningful ratio
        return math.nan
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _cosine_from_sums(dot: float, reference_energy: float, test_energy: float) -> float:
    if not all(math.isfinite(x) for x in (dot, reference_energy, test_energy)):
        return math.nan  # (min/max would turn a NaN into 1.0)
    if reference_energy == 0.0 and test_energy == 0.0:
        return 1.0
    if reference_energy == 0.0 or test_energy == 0.0:
        return 0.0
    return max(-1.0, min(1.0, dot / math.sqrt(reference_energy * test_energy)))


def _pair(name: str, reference: object, test: object, what: str = "tensor") -> tuple[np.ndarray, np.ndarray]:
    """Both arrays, refusing different shapes with the tensor's (or output's) name."""
    reference_array, test_array = np.asarray(reference), np.asarray(test)
    if reference_array.shape != test_array.shape:
        raise DataError(f"{name}: reference shape {reference_array.shape} differs from test shape "
                        f"{test_array.shape}: compare the same {what} of both models")
    return reference_array, test_array


class Float64Scratch:
    """Work arrays for :meth:`FidelityMeter.update`, reused from one update to the next.

    An update widens both tensors to float64 and takes their difference. Fresh arrays for that cost
    more than the arithmetic: edgeopt has glibc map every block of 1 MiB and more anew
    (:mod:`edgeopt.runtime.memory`), so each one is page-faulted in and zeroed again. The meters of
    one comparison share a scratch, which holds three float64 arrays of the largest tensor seen
    until it is dropped. The values computed are the same either way.
    """

    def __init__(self) -> None:
        self._arrays: tuple[np.ndarray, ...] = ()

    def arrays(self, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Three float64 arrays of ``size`` elements (views of the work arrays, grown when needed)."""
        if not self._arrays or self._arrays[0].size < size:
            self._arrays = ()  # the old ones go before the new ones are allocated
            self._arrays = tuple(np.empty(size, dtype=np.float64) for _ in range(3))
        return tuple(array[:size] for array in self._arrays)


@dataclass(frozen=True, kw_only=True)
class Fidelity:
    """SQNR, cosine and max abs error of one tensor over ``elements`` values in ``updates`` batches."""

    sqnr_db: float
    cosine: float
    max_abs_error: float
    elements: int
    updates: int
    reference_finite: bool = True  # False: the reference held inf or NaN (a NaN SQNR is not the test's doing)

    def to_dict(self) -> dict:
        return {"sqnr_db": json_number(self.sqnr_db), "cosine": json_number(self.cosine),
                "max_abs_error": json_number(self.max_abs_error), "elements": self.elements}


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Dot product of two float64 vectors in numpy's own loop: BLAS' ddot hands large vectors to its
    threads, which costs 20x more than the sum on a busy 2-core machine (the fidelity check's time)."""
    return float(np.einsum("i,i->", a, b))


class FidelityMeter:
    """Streams the sums behind SQNR, cosine and max abs error of one tensor."""

    def __init__(self, name: str = "tensor", *, scratch: Float64Scratch | None = None) -> None:
        self.name = name
        self._scratch = scratch  # None: work arrays of its own for each update
        self._reference_energy = 0.0
        self._test_energy = 0.0
        self._noise_energy = 0.0
        self._dot = 0.0
        self._max_abs_error = 0.0
        self._elements = 0
        self._updates = 0

    def update(self, reference: object, test: object) -> None:
        reference_array, test_array = _pair(self.name, reference, test)
        scratch = self._scratch if self._scratch is not None else Float64Scratch()
        r, t, error = scratch.arrays(reference_array.size)
        np.copyto(r, reference_array.reshape(-1), casting="unsafe")  # exact: every float32 is a float64
        np.copyto(t, test_array.reshape(-1), casting="unsafe")
        # -inf - -inf (a masked attention score in both models) is NaN, as the metrics say (no meaningful
        # ratio): numpy's RuntimeWarning about it reached the user's terminal as if something had failed
        with np.errstate(invalid="ignore", over="ignore"):
            np.subtract(r, t, out=error)
            self._reference_energy += _dot(r, r)
            self._test_energy += _dot(t, t)
            self._noise_energy += _dot(error, error)
            self._dot += _dot(r, t)
        if error.size:
            largest = float(np.max(np.abs(error, out=error)))
            # NaN propagates (Python's max would drop it): an inf or NaN output is no 0.0 error
            self._max_abs_error = largest if math.isnan(largest) else max(self._max_abs_error, largest)
        self._elements += r.size
        self._updates += 1

    def result(self) -> Fidelity:
        """The metrics so far; NaN for all three before any element was seen."""
        if self._elements == 0:
            return Fidelity(sqnr_db=math.nan, cosine=math.nan, max_abs_error=math.nan,
                            elements=0, updates=self._updates)
        return Fidelity(sqnr_db=_sqnr_from_energy(self._reference_energy, self._noise_energy),
                        cosine=_cosine_from_sums(self._dot, self._reference_energy, self._test_energy),
                        max_abs_error=self._max_abs_error, elements=self._elements, updates=self._updates,
                        reference_finite=math.isfinite(self._reference_energy))


@dataclass(frozen=True, kw_only=True)
class Rate:
    """``matched`` of ``total`` rows; ``value`` is the fraction (NaN when no row was seen)."""

    matched: int
    total: int

    @property
    def value(self) -> float:
        return self.matched / self.total if self.total else math.nan

    def to_dict(self) -> dict:
        return {"value": json_number(self.value), "matched": self.matched, "total": self.total}


def _rows_argmax(name: str, scores: np.ndarray) -> np.ndarray:
    if scores.ndim == 0 or scores.shape[-1] == 0:
        raise DataError(f"{name}: scores of shape {scores.shape} have no class axis: "
                        "pass class scores shaped [N, C]")
    return np.argmax(scores, axis=-1).ravel()


class AgreementMeter:
    """Streams top-1 agreement: rows whose last-axis argmax is the same in reference and test."""

    def __init__(self, name: str = "output") -> None:
        self.name = name
        self._matched = 0
        self._total = 0

    def update(self, reference: object, test: object) -> None:
        reference_array, test_array = _pair(self.name, reference, test, "output")
        same = _rows_argmax(self.name, reference_array) == _rows_argmax(self.name, test_array)
        self._matched += int(np.count_nonzero(same))
        self._total += same.size

    def result(self) -> Rate:
        return Rate(matched=self._matched, total=self._total)


class EqualityMeter(AgreementMeter):
    """Streams the agreement of integer outputs (class indices from an ArgMax, token ids): the
    fraction of elements equal in reference and test."""

    def update(self, reference: object, test: object) -> None:
        reference_array, test_array = _pair(self.name, reference, test, "output")
        self._matched += int(np.count_nonzero(reference_array == test_array))
        self._total += reference_array.size


def _integer_labels(name: str, labels: object, rows: int) -> np.ndarray:
    array = np.asarray(labels)
    if array.dtype.kind not in "iub":
        raise DataError(f"{name}: labels have dtype {array.dtype}: pass integer class indices")
    if array.size != rows:
        raise DataError(f"{name}: {array.size} labels for {rows} rows of scores: "
                        "give one class index per row")
    return array.ravel().astype(np.int64)


class AccuracyMeter:
    """Streams top-1 accuracy: rows whose last-axis argmax equals the integer label."""

    def __init__(self, name: str = "output") -> None:
        self.name = name
        self._matched = 0
        self._total = 0

    def update(self, scores: object, labels: object) -> None:
        predicted = _rows_argmax(self.name, np.asarray(scores))
        expected = _integer_labels(self.name, labels, predicted.size)
        self._matched += int(np.count_nonzero(predicted == expected))
        self._total += predicted.size

    def result(self) -> Rate:
        return Rate(matched=self._matched, total=self._total)


def _fidelity(reference: object, test: object) -> Fidelity:
    meter = FidelityMeter()
    meter.update(reference, test)
    return meter.result()


def sqnr_db(reference: object, test: object) -> float:
    """SQNR of ``test`` against ``reference`` in dB, over all elements."""
    return _fidelity(reference, test).sqnr_db


def cosine_similarity(reference: object, test: object) -> float:
    """Cosine of the angle between the flattened tensors."""
    return _fidelity(reference, test).cosine


def max_abs_error(reference: object, test: object) -> float:
    """Largest element-wise absolute difference."""
    return _fidelity(reference, test).max_abs_error


def top1_agreement(reference: object, test: object) -> float:
    """Fraction of rows with the same last-axis argmax."""
    meter = AgreementMeter()
    meter.update(reference, test)
    return meter.result().value


def accuracy(scores: object, labels: object) -> float:
    """Fraction of rows whose last-axis argmax equals the label."""
    meter = AccuracyMeter()
    meter.update(scores, labels)
    return meter.result().value

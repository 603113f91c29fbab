"""The data source protocol, and how stacked arrays are cut into samples.

A :class:`DataSource` is an iterable of validated batches
``{input_name: np.ndarray}``; iterating it again starts over. Subclasses
implement ``_feeds()``, yielding raw ``(feed, where)`` pairs; the base class
passes each through :func:`~edgeopt.data.feeds.check_feed`.

*Stacked* arrays (a big .npy file, arrays given in memory) hold many samples
along axis 0. For an input of shape ``[B, *rest]`` an array is cut as:

* ``[*rest]`` (one sample without the batch axis): one batch, axis added;
* ``[N*B, *rest]``: N batches of B rows (B is 1 when the batch dim is dynamic);
* ``[N, B, *rest]``: N whole inputs stacked on a new axis (``np.stack`` of
  batch-1 samples, or samples of an input without a batch axis): N batches;
* ``[N]`` for an input ``[B]`` of dynamic batch (per-sample lengths): N batches of one
  value when the feed's other inputs hold N samples, else one batch as is;
* anything else: one batch as is, which ``check_feed`` then accepts or
  refuses with the expected shape.

Cutting slices lazily, so a stacked file on disk is read one sample at a time.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgeopt._scalars import is_integer, plain_scalar
from edgeopt.data.feeds import as_numpy, check_feed, dims_match
from edgeopt.errors import ConfigError, DataError
from edgeopt.ir.values import InputSpec
from edgeopt.metrics import count_of

__all__ = [
    "AlsoCheckedSource",
    "ArraySource",
    "DataSource",
    "IterableSource",
    "LabelledFeed",
    "TakeSource",
    "batch_rows",
    "dataset_from_arrays",
    "reads_again",
    "split_stacked",
    "take",
    "with_origin",
]

Feed = dict[str, np.ndarray]


class LabelledFeed(dict):
    """A checked batch that knows where it came from (a file and sample), so an error found past the
    data checks (ONNX Runtime refusing token ids beyond the vocabulary) can name it too, and the model
    inputs it was checked against (``checked``; a consumer with the same ones need not check it again)."""

    __slots__ = ("where", "checked")

    def __init__(self, feed: Mapping[str, np.ndarray], where: str, checked: tuple[InputSpec, ...] = ()) -> None:
        super().__init__(feed)
        self.where, self.checked = where, checked


def checked_feed(specs: Sequence[InputSpec], batch: Mapping[str, object], *, where: str) -> dict[str, np.ndarray]:
    """:func:`check_feed` of ``batch``, unless a data source checked it against the same ``specs`` already."""
    if isinstance(batch, LabelledFeed) and batch.checked and batch.checked == tuple(specs):
        return batch
    return check_feed(specs, batch, where=where)


def with_origin(error: DataError, feed: Mapping[str, np.ndarray]) -> DataError:
    """``error`` prefixed with where ``feed`` came from, when it is a :class:`LabelledFeed`."""
    where = getattr(feed, "where", None)
    return DataError(f"{where}: {error}") if where and not str(error).startswith(where) else error


class DataSource(ABC):
    """An iterable of validated batches for one model's inputs."""

    def __init__(self, specs: Sequence[InputSpec]) -> None:
        self._specs = tuple(specs)

    @property
    def specs(self) -> tuple[InputSpec, ...]:
        """The model inputs every batch is checked against."""
        return self._specs

    @property
    def num_samples(self) -> int | None:
        """How many batches one pass yields, or None when not known in advance."""
        return None

    def __iter__(self) -> Iterator[Feed]:
        for feed, where in self._feeds():
            yield LabelledFeed(check_feed(self._specs, feed, where=where), where, self._specs)

    def __len__(self) -> int:
        count = self.num_samples
        if count is None:
            raise TypeError(f"the length of {self.describe()} is not known in advance")
        return count

    @abstractmethod
    def _feeds(self) -> Iterator[tuple[Mapping[str, object], str]]:
        """Raw ``(feed, where)`` pairs; ``where`` names the origin for error messages."""

    @abstractmethod
    def describe(self) -> str:
        """One line for logs and reports, e.g. ``folder calib/ (200 .npy files, one sample each)``."""


@dataclass(frozen=True, kw_only=True)
class _Cut:
    """How one stacked array becomes batches: ``count`` slices of ``rows``, or whole."""

    count: int
    rows: int = 0
    add_axis: bool = False
    element: bool = False  # each index on axis 0 is a whole input (a scalar input's vector, np.stack's inputs)


def _plan_cut(spec: InputSpec | None, shape: tuple[int, ...]) -> _Cut:
    if spec is not None and spec.rank_known and not spec.shape and len(shape) == 1:
        return _Cut(count=shape[0], element=True)
    if spec is None or not spec.shape:
        return _Cut(count=1)
    first, rest = spec.shape[0], spec.shape[1:]
    if dims_match(rest, shape):
        return _Cut(count=1, add_axis=True)
    if dims_match(spec.shape, shape[1:]):
        return _Cut(count=shape[0], element=True)
    rows = first if isinstance(first, int) else 1
    stackable = isinstance(first, int) or len(spec.shape) > 1
    if stackable and shape and rows > 0 and shape[0] % rows == 0 and dims_match(rest, shape[1:]):
        return _Cut(count=shape[0] // rows, rows=rows)
    return _Cut(count=1)


def _cut(array: np.ndarray, cut: _Cut, index: int) -> np.ndarray:
    if cut.element:  # sliced first: a file on disk reads that row alone
        return array[index:index + 1][0]
    if cut.add_axis:
        return array[np.newaxis]
    if cut.rows == 0:
        return array
    return array[index * cut.rows:(index + 1) * cut.rows]


def _batch_vector(spec: InputSpec | None, shape: tuple[int, ...]) -> bool:
    """A 1-D array for a 1-D input of dynamic batch (per-sample lengths ``[N]``): one batch of that many
    values, or that many batch-1 samples; the feed's other inputs decide."""
    return (spec is not None and spec.rank_known and len(spec.shape) == 1 and not isinstance(spec.shape[0], int)
            and len(shape) == 1)


def _same_batch(dim: object, other: object) -> bool:
    """Whether a vector's dim may be another input's dynamic batch: unnamed, or of the same name."""
    return not isinstance(other, int) and (dim is None or other is None or dim == other)


def _plan_cuts(specs: Sequence[InputSpec], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, _Cut]:
    """Each array's cut; a batch vector (:func:`_batch_vector`) as long as the samples the other inputs
    hold is cut with them, one value per sample (``x [4, T, 40]`` with ``lengths [4]``: 4 samples), when
    its dim is their batch dim: beside ``x [1, 8]`` a vector ``class_ids [K]`` is the model's, not per sample."""
    by_name = {spec.name: spec for spec in specs}
    cuts = {name: _plan_cut(by_name.get(name), shape) for name, shape in shapes.items()}
    vectors = {name for name, shape in shapes.items() if _batch_vector(by_name.get(name), shape)}
    others = {cut.count for name, cut in cuts.items() if name in by_name and name not in vectors}
    batches = [by_name[name].shape[0] for name in cuts
               if name in by_name and name not in vectors and by_name[name].rank_known and by_name[name].shape]
    if len(others) == 1 and (count := others.pop()) > 1:
        cuts.update({name: _Cut(count=count, rows=1) for name in vectors if shapes[name][0] == count
                     and any(_same_batch(by_name[name].shape[0], batch) for batch in batches)})
    return cuts


def stacked_count(specs: Sequence[InputSpec], shapes: Mapping[str, tuple[int, ...]], *, where: str) -> int:
    """How many batches :func:`split_stacked` yields for arrays of these shapes."""
    names = {spec.name for spec in specs}
    counts = {name: cut.count for name, cut in _plan_cuts(specs, shapes).items() if name in names}
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{name}: {count}" for name, count in counts.items())
        raise DataError(f"{where} holds different numbers of samples per input ({shown}): "
                        "stack the same number of samples for every input")
    # with no known input name there is one feed, so check_feed can name the problem
    return next(iter(counts.values()), 1)


def split_stacked(
    specs: Sequence[InputSpec],
    arrays: Mapping[str, np.ndarray],
    *,
    where: str,
) -> Iterator[tuple[dict[str, np.ndarray], str]]:
    """Cut arrays stacked on axis 0 into per-batch feeds, all inputs in lockstep."""
    shapes = {name: _shape(array, name, where) for name, array in arrays.items()}
    count = stacked_count(specs, shapes, where=where)
    cuts = _plan_cuts(specs, shapes)
    for index in range(count):
        label = where if count == 1 else f"{where} [sample {index}]"
        yield {name: _cut(arrays[name], cuts[name], index) for name in arrays}, label


def _shape(value: object, name: str, where: str) -> tuple[int, ...]:
    """The shape of an array or nested list; a ragged list (rows of different lengths) is a DataError."""
    try:
        shape = getattr(value, "shape", None)  # an array, a tensor, a file's lazy rows: nothing read or converted
        return tuple(map(int, shape)) if shape is not None else tuple(np.shape(value))
    except ValueError as error:  # numpy: "setting an array element with a sequence ... inhomogeneous shape"
        raise DataError(f"{where}: input '{name}' is a nested list whose rows differ in length, not an array: "
                        "give an array (or lists of equal lengths), or samples of different shapes as a list of "
                        "{input_name: array} batches, one per sample") from error


def _read_only(array: object, name: str) -> np.ndarray:
    """A read-only view, so check_feed hands out copies and the caller's data stays untouched."""
    _shape(array, name, "arrays")
    view = as_numpy(array).view()
    view.flags.writeable = False
    return view


class ArraySource(DataSource):
    """Samples cut from in-memory arrays stacked on axis 0, one per input name."""

    def __init__(self, arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec]) -> None:
        super().__init__(specs)
        if not arrays:
            raise DataError("no arrays given: pass {input_name: array} with samples stacked on axis 0")
        self._arrays = {name: _read_only(array, name) for name, array in arrays.items()}
        shapes = {name: array.shape for name, array in self._arrays.items()}
        self._count = stacked_count(self._specs, shapes, where="arrays")
        if self._count == 0:
            raise DataError("the arrays given hold no samples: pass arrays stacked on axis 0")

    @property
    def num_samples(self) -> int:
        return self._count

    def _feeds(self) -> Iterator[tuple[Mapping[str, object], str]]:
        return split_stacked(self._specs, self._arrays, where="arrays")

    def describe(self) -> str:
        return f"arrays {', '.join(self._arrays)} ({count_of(self._count, 'sample', 'samples')})"


def batch_rows(arrays: Mapping[str, object]) -> int:
    """The samples in a batch of arrays (a feed, or a model's outputs): the leading dim of the first
    array, 1 for a scalar."""
    first = next(iter(arrays.values()), None)
    return int(first.shape[0]) if getattr(first, "ndim", 0) else 1


def dataset_from_arrays(arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec]) -> ArraySource:
    """A source yielding the samples of in-memory arrays stacked on axis 0."""
    return ArraySource(arrays, specs)


def as_feed(item: object, specs: Sequence[InputSpec], *, where: str) -> dict[str, object]:
    """One batch from a user's item: a mapping, a bare array for a single-input model, or a list or tuple
    of arrays, one per model input in its input order (a ``DataLoader(TensorDataset(x))`` batch is ``[x]``).

    An array missing only the batch axis gets one; nothing else is reshaped.
    """
    if isinstance(item, Mapping):
        feed = dict(item)
    elif len(specs) == 1 and hasattr(item, "__array__"):
        feed = {specs[0].name: item}
    elif isinstance(item, (list, tuple)) and item and all(hasattr(value, "__array__") for value in item):
        feed = _positional_feed(item, specs, where)
    else:
        inputs = ", ".join(spec.name for spec in specs)
        raise DataError(f"{where} is a {type(item).__name__}, not a dict of arrays keyed by input name "
                        f"({inputs}): yield {{name: array}} dicts")
    by_name = {spec.name: spec for spec in specs}
    for name, value in feed.items():
        spec = by_name.get(name)
        if spec is not None and _plan_cut(spec, _shape(value, name, where)).add_axis:
            feed[name] = as_numpy(value)[np.newaxis]
    return feed


def _positional_feed(item: Sequence[object], specs: Sequence[InputSpec], where: str) -> dict[str, object]:
    """A list or tuple of arrays as the model's inputs in order; of another length, a DataError (a batch of
    inputs and labels, as a classification DataLoader yields, is the common case)."""
    if len(item) != len(specs):
        inputs = ", ".join(spec.name for spec in specs)
        raise DataError(f"{where} is a {type(item).__name__} of {len(item)} arrays, and the model takes "
                        f"{count_of(len(specs), 'input', 'inputs')} ({inputs}): yield the inputs alone, in that "
                        "order (a DataLoader of (inputs, labels): a dataset without the labels), or "
                        "{name: array} dicts")
    return {spec.name: value for spec, value in zip(specs, item)}


def item_feeds(item: object, specs: Sequence[InputSpec], *, where: str) -> Iterator[tuple[dict[str, object], str]]:
    """The feeds of one user item: :func:`as_feed`, and for a model that takes batch 1 an item holding
    several samples stacked on axis 0 (a DataLoader's batch of 8) cut into them, as a stacked array is. A
    model of dynamic batch runs such an item as one batch."""
    feed = as_feed(item, specs, where=where)
    if not _several_for_batch_one(feed, specs, where):
        yield feed, where
        return
    yield from split_stacked(specs, feed, where=where)


def _takes_batch_one(specs: Sequence[InputSpec]) -> bool:
    """Whether every input of the model has a batch dim fixed at 1 (an export at batch 1)."""
    return bool(specs) and all(spec.rank_known and spec.shape and spec.shape[0] == 1 for spec in specs)


def _several_for_batch_one(feed: Mapping[str, object], specs: Sequence[InputSpec], where: str) -> bool:
    """Whether the model takes batch 1 and ``feed`` holds an input of its rank with more than one row."""
    by_name = {spec.name: spec for spec in specs}
    if not _takes_batch_one(specs):
        return False
    return any(name in by_name and len(shape := _shape(value, name, where)) == len(by_name[name].shape)
               and shape[0] > 1 for name, value in feed.items())


def _item_count(item: object, specs: Sequence[InputSpec], where: str) -> int:
    """How many feeds :func:`item_feeds` makes of ``item`` (read from shapes, no data copied)."""
    feed = as_feed(item, specs, where=where)
    if not _several_for_batch_one(feed, specs, where):
        return 1
    return stacked_count(specs, {name: _shape(value, name, where) for name, value in feed.items()}, where=where)


class IterableSource(DataSource):
    """Batches from any Python iterable of ``{name: array}`` dicts (or arrays, single input)."""

    def __init__(self, items: Iterable[object], specs: Sequence[InputSpec], *, label: str = "") -> None:
        super().__init__(specs)
        self._items = items
        self._label = label or f"Python {type(items).__name__}"

    @property
    def num_samples(self) -> int | None:
        if not isinstance(self._items, Sequence):  # a DataLoader's len counts batches, which a model of batch 1
            # takes sample by sample: their number is known once read
            return len(self._items) if hasattr(self._items, "__len__") and not _takes_batch_one(self._specs) else None
        return sum(_item_count(item, self._specs, f"{self._label} item {index}")
                   for index, item in enumerate(self._items))

    def _feeds(self) -> Iterator[tuple[Mapping[str, object], str]]:
        for index, item in enumerate(self._items):
            yield from item_feeds(item, self._specs, where=f"{self._label} item {index}")

    def describe(self) -> str:
        count = self.num_samples
        return self._label + (f" ({count} batches)" if count is not None else "")


class TakeSource(DataSource):
    """The first ``limit`` batches of another source."""

    def __init__(self, source: DataSource, limit: int) -> None:
        super().__init__(source.specs)
        self._source = source
        self._limit = limit

    @property
    def num_samples(self) -> int | None:
        inner = self._source.num_samples
        return None if inner is None else min(inner, self._limit)

    def _feeds(self) -> Iterator[tuple[Mapping[str, object], str]]:
        return itertools.islice(self._source._feeds(), self._limit)

    def describe(self) -> str:
        return f"{self._source.describe()}, first {self._limit}"


class AlsoCheckedSource(DataSource):
    """Another source's batches, each checked against a second model's inputs as well (``compare``
    runs the data through two models, which may fix different sizes)."""

    def __init__(self, source: DataSource, specs: Sequence[InputSpec], model: str) -> None:
        super().__init__(source.specs)
        self._source, self._other, self._model = source, tuple(specs), model

    @property
    def num_samples(self) -> int | None:
        return self._source.num_samples

    def __iter__(self) -> Iterator[Feed]:
        for feed, where in self._feeds():
            checked = check_feed(self._specs, feed, where=where)
            check_feed(self._other, checked, where=f"{where} (for the {self._model})")
            yield LabelledFeed(checked, where, self._specs)

    def _feeds(self) -> Iterator[tuple[Mapping[str, object], str]]:
        return self._source._feeds()

    def describe(self) -> str:
        return self._source.describe()


def reads_again(data: object) -> bool:
    """Whether iterating ``data`` again starts over: a list, or a data source over files or a sized
    collection. A generator, even wrapped in a data source, does not (its length is not known)."""
    if getattr(data, "num_samples", None) is not None:
        return True
    return isinstance(data, (list, tuple))


def take(source: DataSource, limit: int) -> DataSource:
    """The first ``limit`` batches of ``source`` (a source yielding one sample per batch gives samples)."""
    limit = plain_scalar(limit)
    if not is_integer(limit) or limit < 1:
        raise ConfigError(f"max_samples (--max-samples), the number of samples to take, must be a positive integer, "
                          f"got {limit!r}")
    return TakeSource(source, limit)

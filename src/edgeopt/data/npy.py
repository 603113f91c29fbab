"""Samples stored as NumPy files: one .npy/.npz file, or a folder of them.

Layouts of a folder (detected, in this order):

a. **Files at the top level**, sorted naturally (``s2`` before ``s10``):
   a ``.npy`` file per sample for a single-input model, or a ``.npz`` per
   sample holding one array per input name. A file may also hold many samples
   stacked on axis 0 (``[N, *rest]`` for an input ``[1, *rest]``), or one sample
   without the batch axis (``[*rest]``); see :mod:`edgeopt.data.base`.
b. **One subfolder per input name** (multi-input models), each holding one
   file per sample; files pair up by position in natural order, and every
   subfolder must hold the same number.

Other files (``manifest.json``, ``README``, hidden files) are ignored. Data is
read lazily: ``.npy`` files are memory-mapped and sliced one sample at a time,
so a file far bigger than RAM streams; ``.npz`` members (compressed or not)
are read from their zip stream a sample at a time as they are sliced. Nothing
is ever unpickled (``allow_pickle=False``).
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import TypeVar

import numpy as np

from edgeopt.data.base import DataSource, split_stacked, stacked_count
from edgeopt.errors import DataError
from edgeopt.ir.values import InputSpec
from edgeopt.metrics import count_of

__all__ = ["NpyFileSource", "NpyFolderSource", "check_path", "list_files", "natural_key", "path_exists",
           "read_arrays", "read_error"]

DATA_SUFFIXES = (".npy", ".npz")
_T = TypeVar("_T")
_Reader = Callable[[Path, Sequence[InputSpec]], dict[str, _T]]  # read_arrays or _read_shapes


def natural_key(name: str) -> tuple[list[int | str], str]:
    """Sort key that orders embedded numbers by value: ``s2`` before ``s10``. Names that differ only
    in case or leading zeros (``s1``, ``s01``, ``S1``) are then ordered by the name itself: left
    tied, they kept the order the file system lists them in, which differs between copies of a folder
    (a tmpfs lists files as created), and so would the calibration."""
    parts = re.split(r"(\d+)", name)  # text at even positions, digit runs at odd ones
    return [int(part) if index % 2 else part.lower() for index, part in enumerate(parts)], name


def path_exists(path: Path) -> bool:
    """``path.exists()``, or a DataError when the system will not tell (a folder on the way that
    this user may not enter)."""
    try:
        return path.exists()
    except OSError as error:
        raise DataError(f"cannot access data path {path} ({error.strerror or error}): "
                        "check the permissions of it and of the folders above it") from None


def list_files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    """Visible files directly in ``folder`` with one of ``suffixes``, naturally sorted."""
    try:
        files = [p for p in folder.iterdir()
                 if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes]
    except OSError as error:
        raise DataError(f"cannot list data folder {folder} ({error.strerror or error}): "
                        "check its permissions") from None
    return sorted(files, key=lambda p: natural_key(p.name))


def read_error(path: Path, error: Exception) -> DataError:
    """The one-line error for a .npy/.npz file numpy could not read (another format, pickled objects,
    a truncated file)."""
    text = str(error)
    if isinstance(error, OSError) and error.strerror:  # the system's refusal (permissions, a folder), not the format
        return DataError(f"cannot read {path} ({error.strerror}): check that it is a file you may read")
    if "Python objects" in text or "Object arrays" in text:
        return DataError(f"{path} holds Python objects, which edgeopt never unpickles: "
                         "save plain numeric arrays (np.save with a float or int array)")
    if "pickled" in text or "magic string" in text:
        return DataError(f"{path} is not in .npy format (a pickle or another format): "
                         "save the array with np.save")
    first_line = text.splitlines()[0] if text else type(error).__name__
    return DataError(f"cannot read {path} ({first_line}): is it a complete .npy/.npz file?")


def _open_npy(path: Path) -> np.ndarray | _NpyRows:
    """A C-order .npy as :class:`_NpyRows` (read as it is sliced); others memory-mapped."""
    try:
        with open(path, "rb") as stream:
            reader = _HEADER_READERS.get(np.lib.format.read_magic(stream))
            if reader is not None:
                shape, fortran_order, dtype = reader(stream)
                if not fortran_order and dtype.kind in "biufc":  # numbers; the rest is refused later
                    return _NpyRows(path, stream.tell(), shape, dtype)
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise read_error(path, error) from None


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class _Rows:
    """An array on disk read by rows on demand: slicing ``[a:b]`` on axis 0 reads just those rows
    (:meth:`_read_rows`); anything else reads it whole. Stacked samples stream this way in bounded
    memory."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.shape, self.dtype = path, shape, dtype
        self.ndim = len(shape)
        self._row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize if shape else 0

    def _read_rows(self, start: int, out: np.ndarray) -> None:
        """Fill ``out`` with the rows from ``start`` on."""
        raise NotImplementedError

    def _whole_scalar(self) -> np.ndarray:
        raise NotImplementedError

    def _fill(self, stream, out: np.ndarray, where: str) -> None:
        if stream.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise DataError(f"cannot read {self.path} ({where} ends early): is it a complete .npy/.npz file?")

    def __getitem__(self, key):
        if not (isinstance(key, slice) and key.step in (None, 1) and self.ndim):
            return np.asarray(self)[key]
        start, stop, _ = key.indices(self.shape[0])
        out = np.empty((max(stop - start, 0), *self.shape[1:]), dtype=self.dtype)
        if out.size:
            self._read_rows(start, out)
        return out

    def __array__(self, dtype=None, copy=None):
        whole = self[0:self.shape[0]] if self.ndim else self._whole_scalar()
        return whole if dtype is None else whole.astype(dtype)


class _NpyRows(_Rows):
    """A C-order .npy file read with positioned reads. (A memory map keeps every page it has read
    mapped until the pass ends, so the process's resident memory grew with the file.)"""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        super().__init__(path, shape, dtype)
        self._offset = offset

    def _read_rows(self, start: int, out: np.ndarray) -> None:
        with open(self.path, "rb") as stream:
            stream.seek(self._offset + start * self._row_bytes)
            self._fill(stream, out, "the file")

    def _whole_scalar(self) -> np.ndarray:
        return np.load(self.path, allow_pickle=False)


class _NpzRows(_Rows):
    """One .npz member read from its zip stream, rows in order (a zip member cannot be seeked or
    memory-mapped); reading backwards reopens the member."""

    def __init__(self, path: Path, member: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        super().__init__(path, shape, dtype)
        self.member = member
        self._stream = None
        self._next_row = 0

    def _seek_row(self, row: int) -> None:
        if self._stream is None or row < self._next_row:
            self.close()
            self._archive = zipfile.ZipFile(self.path)
            self._stream = self._archive.open(self.member)
            _HEADER_READERS[np.lib.format.read_magic(self._stream)](self._stream)
            self._next_row = 0
        while self._next_row < row:  # skip in chunks of at most 64 rows
            step = min(row - self._next_row, 64)
            self._fill(self._stream, np.empty(step * self._row_bytes, np.uint8), f"member {self.member}")
            self._next_row += step

    def _read_rows(self, start: int, out: np.ndarray) -> None:
        self._seek_row(start)
        self._fill(self._stream, out, f"member {self.member}")
        self._next_row += len(out)

    def _whole_scalar(self) -> np.ndarray:
        with np.load(self.path, allow_pickle=False) as archive:
            return archive[self.member.removesuffix(".npy")]

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._archive.close()
            self._stream = None


def _npz_headers(path: Path) -> dict[str, tuple[str, tuple[int, ...], bool, np.dtype]] | None:
    """``{key: (member, shape, fortran_order, dtype)}`` from an .npz's headers, without reading the data;
    None for a rare header version."""
    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                with archive.open(member) as stream:
                    reader = _HEADER_READERS.get(np.lib.format.read_magic(stream))
                    if reader is None:
                        return None
                    shape, fortran_order, dtype = reader(stream)
                    headers[member.removesuffix(".npy")] = (member, shape, fortran_order, dtype)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise read_error(path, error) from None
    return headers


def _open_npz(path: Path) -> dict[str, np.ndarray | _NpzRows]:
    """The members of an .npz: plain C-order arrays as :class:`_NpzRows` (read as they are sliced),
    others (Fortran order, a rare header version) read whole. Objects are refused, never unpickled."""
    headers = _npz_headers(path)
    if headers is not None and all(not fortran and not dtype.hasobject for _, _, fortran, dtype in headers.values()):
        return {key: _NpzRows(path, member, shape, dtype) for key, (member, shape, _, dtype) in headers.items()}
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise read_error(path, error) from None


def _npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of an .npz's members from their headers, without reading the data."""
    headers = _npz_headers(path)
    if headers is None:  # a rare header version: read the arrays instead
        return {key: np.shape(array) for key, array in _open_npz(path).items()}
    return {key: shape for key, (_, shape, _, _) in headers.items()}


def _by_input(path: Path, keyed: Mapping[str, _T], specs: Sequence[InputSpec]) -> dict[str, _T]:
    """Key a file's arrays (or shapes) by input name; a lone unnamed array (.npy, or np.savez's
    ``arr_0``) feeds a lone input, while a named .npz member must carry the input's name."""
    lone_key = next(iter(keyed)) if len(keyed) == 1 else None
    unnamed = path.suffix.lower() == ".npy" or lone_key == "arr_0"
    if len(specs) == 1 and len(keyed) == 1 and unnamed:
        return {specs[0].name: next(iter(keyed.values()))}
    if path.suffix.lower() == ".npy":
        names = ", ".join(spec.name for spec in specs)
        raise DataError(f"{path} holds one array but the model has {len(specs)} inputs ({names}): "
                        "save one .npz per sample with an array per input name, or use one subfolder per input")
    return dict(keyed)


def read_arrays(path: Path, specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """The arrays of one .npy/.npz file keyed by input name (read as they are sliced)."""
    if path.suffix.lower() == ".npz":
        return _by_input(path, _open_npz(path), specs)
    return _by_input(path, {"": _open_npy(path)}, specs)


def _read_shapes(path: Path, specs: Sequence[InputSpec]) -> dict[str, tuple[int, ...]]:
    if path.suffix.lower() == ".npz":
        return _by_input(path, _npz_shapes(path), specs)
    return _by_input(path, {"": _open_npy(path).shape}, specs)


def check_path(path: Path) -> None:
    """Refuse a data path that does not exist, with what to do."""
    if not path_exists(path):
        raise DataError(f"data path {path} not found: check the --data path")


class NpyFileSource(DataSource):
    """The samples of one .npy/.npz file, stacked on axis 0 (.npz: one array per input)."""

    def __init__(self, path: str | Path, specs: Sequence[InputSpec]) -> None:
        super().__init__(specs)
        self._path = Path(path)
        check_path(self._path)
        if self._path.is_dir() or self._path.suffix.lower() not in DATA_SUFFIXES:
            raise DataError(f"{self._path} is not a .npy or .npz file")

    @cached_property
    def num_samples(self) -> int:
        shapes = _read_shapes(self._path, self._specs)
        return stacked_count(self._specs, shapes, where=str(self._path))

    def _feeds(self) -> Iterator[tuple[Mapping[str, object], str]]:
        arrays = read_arrays(self._path, self._specs)
        return split_stacked(self._specs, arrays, where=str(self._path))

    def describe(self) -> str:
        return f"file {self._path} ({count_of(self.num_samples, 'sample', 'samples')})"


def _input_subfolders(folder: Path, specs: Sequence[InputSpec]) -> dict[str, list[Path]]:
    """Layout (b): ``{input: files}``, or {} when no subfolder is named after an input."""
    present = [spec.name for spec in specs if (folder / spec.name).is_dir()]
    if not present:
        return {}
    missing = [spec.name for spec in specs if spec.name not in present]
    if missing:
        raise DataError(f"data folder {folder} has subfolders for inputs {', '.join(present)} "
                        f"but none for {', '.join(missing)}: add one subfolder per input")
    files = {name: list_files(folder / name, DATA_SUFFIXES) for name in present}
    counts = {len(found) for found in files.values()}
    if len(counts) > 1 or 0 in counts:
        shown = ", ".join(f"{name}/: {len(found)}" for name, found in files.items())
        raise DataError(f"data folder {folder}: the input subfolders hold different numbers of "
                        f".npy/.npz files ({shown}): give every input one file per sample")
    return files


def _single(path: Path, spec: InputSpec, read: _Reader[_T]) -> _T:
    """The one array (or shape) of a file in an input's subfolder."""
    keyed = read(path, [spec])
    if spec.name not in keyed:
        arrays = "1 array" if len(keyed) == 1 else f"{len(keyed)} arrays"
        raise DataError(f"{path} holds {arrays} ({', '.join(keyed)}), none named {spec.name!r}: a file in "
                        f"subfolder {spec.name}/ holds that input's array (a .npy, or an .npz member named "
                        f"{spec.name!r})")
    return keyed[spec.name]


class NpyFolderSource(DataSource):
    """A folder of .npy/.npz files; the layout is detected (see the module docstring)."""

    def __init__(self, path: str | Path, specs: Sequence[InputSpec]) -> None:
        super().__init__(specs)
        self._path = Path(path)
        check_path(self._path)
        if not self._path.is_dir():
            raise DataError(f"data path {self._path} is not a folder")
        self._files = list_files(self._path, DATA_SUFFIXES)
        self._subfolders = {} if self._files else _input_subfolders(self._path, self._specs)
        if not self._files and not self._subfolders:
            raise DataError(f"data folder {self._path} holds no .npy or .npz files")

    @cached_property
    def num_samples(self) -> int:
        """Counted from the file headers; no data is read."""
        counts = (stacked_count(self._specs, shapes, where=where) for shapes, where in self._read_all(_read_shapes))
        return sum(counts)

    def _feeds(self) -> Iterator[tuple[Mapping[str, object], str]]:
        for arrays, where in self._read_all(read_arrays):
            yield from split_stacked(self._specs, arrays, where=where)

    def _read_all(self, read: _Reader[_T]) -> Iterator[tuple[dict[str, _T], str]]:
        """``read`` applied per file, or per set of paired subfolder files, keyed by input name."""
        if not self._subfolders:
            yield from ((read(file, self._specs), str(file)) for file in self._files)
            return
        specs = {spec.name: spec for spec in self._specs}
        for paths in zip(*self._subfolders.values()):
            named = dict(zip(self._subfolders, paths))
            keyed = {name: _single(path, specs[name], read) for name, path in named.items()}
            yield keyed, " + ".join(map(str, paths))

    def describe(self) -> str:
        samples = count_of(self.num_samples, "sample", "samples")
        if self._subfolders:
            folders = ", ".join(f"{name}/" for name in self._subfolders)
            return f"folder {self._path}/ (one subfolder per input: {folders}; {samples})"
        kinds = "/".join(sorted({file.suffix.lower() for file in self._files}))
        each = "one sample each" if self.num_samples == len(self._files) else samples
        return f"folder {self._path}/ ({count_of(len(self._files), f'{kinds} file', f'{kinds} files')}, {each})"

"""Pick the data source for ``--data``: folder, file, image folder or function.

``open_data`` dispatches on what it is given:

* a :class:`DataSource`: returned as is;
* a folder holding .npy/.npz files (at the top or in one subfolder per input
  name): :class:`NpyFolderSource`;
* a folder holding images (searched recursively): :class:`ImageFolderSource`
  with the given :class:`ImagePreprocess` (defaults from the model input);
* a .npy/.npz file: :class:`NpyFileSource`, samples stacked on axis 0;
* ``module:function`` or ``file.py:function`` (not an existing path):
  :class:`CallableSource`;
* in the Python API, a ``{input_name: array}`` mapping or a bare array
  (stacked samples) or any other iterable of batches.

Every batch any source yields has been through :func:`check_feed`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from edgeopt.data.base import DataSource, IterableSource, dataset_from_arrays
from edgeopt.data.callable import CallableSource, looks_like_callable
from edgeopt.data.images import IMAGE_SUFFIXES, ImageFolderSource, ImagePreprocess
from edgeopt.data.npy import DATA_SUFFIXES, NpyFileSource, NpyFolderSource, list_files, natural_key, path_exists
from edgeopt.errors import ConfigError, DataError
from edgeopt.ir.values import InputSpec

__all__ = ["open_data"]

logger = logging.getLogger(__name__)

DataSpec = str | os.PathLike | Mapping | Iterable | DataSource


def _holds_arrays(folder: Path, specs: Sequence[InputSpec]) -> bool:
    if list_files(folder, DATA_SUFFIXES):
        return True
    subfolders = [folder / spec.name for spec in specs if (folder / spec.name).is_dir()]
    return any(list_files(subfolder, DATA_SUFFIXES) for subfolder in subfolders)


def _holds_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for p in folder.rglob("*"))


def _open_folder(folder: Path, specs: Sequence[InputSpec], preprocess: ImagePreprocess | None) -> DataSource:
    if _holds_arrays(folder, specs):
        if preprocess is not None:
            logger.warning("%s holds .npy/.npz data: the image preprocessing given is not used", folder)
        return NpyFolderSource(folder, specs)
    if _holds_images(folder):
        return ImageFolderSource(folder, specs, preprocess)
    nested = _nested_array_folders(folder)
    if nested:
        inputs = ", ".join(spec.name for spec in specs)
        shown = ", ".join(f"{sub}/" for sub in nested[:3]) + (", ..." if len(nested) > 3 else "")
        raise DataError(f"data folder {folder} holds .npy/.npz files only in subfolders ({shown}), and none is "
                        f"named after a model input ({inputs}): point --data at the folder holding the files, "
                        "or give one subfolder per input, named after it")
    raise DataError(f"data folder {folder} holds no .npy, .npz or image files "
                    f"({', '.join(IMAGE_SUFFIXES)}): point --data at your samples")


def _nested_array_folders(folder: Path) -> list[str]:
    """The subfolders (relative, naturally sorted) below ``folder`` holding visible .npy/.npz files."""
    found = {p.parent.relative_to(folder).as_posix() for p in folder.rglob("*")
             if p.suffix.lower() in DATA_SUFFIXES and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)}
    return sorted(found, key=natural_key)


def _open_text(text: str | os.PathLike, specs: Sequence[InputSpec],
               preprocess: ImagePreprocess | None) -> DataSource:
    path = Path(text)
    exists = path_exists(path)
    if not exists and isinstance(text, str) and looks_like_callable(text):
        return CallableSource(text, specs)
    if not exists:
        raise DataError(f"data path {path} not found: pass a folder of .npy/.npz files or images, "
                        "a .npy/.npz file, or module:function")
    if path.is_dir():
        return _with_samples(_open_folder(path, specs, preprocess))
    if path.suffix.lower() in DATA_SUFFIXES:
        if preprocess is not None:
            logger.warning("%s holds arrays: the image preprocessing given is not used", path)
        return _with_samples(NpyFileSource(path, specs))
    raise DataError(f"--data {path} is not a folder or a .npy/.npz file: "
                    "put images in a folder, or save arrays with np.save")


def _with_samples(source: DataSource) -> DataSource:
    """``source``, refused by name when it knows it holds no sample (zero-length arrays): calibration
    would say only that its data was empty."""
    if source.num_samples == 0:
        raise DataError(f"{source.describe()}: no sample in it (zero-length arrays?): give at least one")
    return source


def _open_array(array: object, specs: Sequence[InputSpec]) -> DataSource:
    if len(specs) != 1:
        names = ", ".join(spec.name for spec in specs)
        raise DataError(f"one array given but the model has inputs {names}: pass {{input_name: array}}")
    return dataset_from_arrays({specs[0].name: array}, specs)


def open_data(
    data: DataSpec,
    specs: Sequence[InputSpec],
    *,
    preprocess: ImagePreprocess | None = None,
) -> DataSource:
    """The source for ``data`` (see the module docstring); batches are checked against ``specs``."""
    if preprocess is not None and not isinstance(preprocess, ImagePreprocess):
        raise ConfigError(f"preprocess must be an ImagePreprocess (ImagePreprocess.parse({str(preprocess)[:40]!r}) "
                          f"reads a --preprocess spec), got {type(preprocess).__name__}")
    if isinstance(data, DataSource):
        return data
    if isinstance(data, (str, os.PathLike)):
        return _open_text(data, specs, preprocess)
    if isinstance(data, Mapping):
        return dataset_from_arrays(data, specs)
    if hasattr(data, "__array__"):
        return _open_array(data, specs)
    if isinstance(data, Iterable):
        return IterableSource(data, specs)
    raise DataError(f"data of type {type(data).__name__} is not usable: pass a path, module:function, "
                    "{input_name: array} or an iterable of such batches")

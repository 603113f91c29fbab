"""Batches produced by the user's own Python function, named ``module:function``.

``module:function`` imports ``module`` from ``sys.path`` and, after it, the current
directory (as ``python -m`` would find a module of the project you run in);
``path/to/file.py:function`` loads that file. The function takes no arguments
and is called once per pass over the data. It returns either

* an iterable (list, generator, ``torch.utils.data.DataLoader``...) whose
  items are batches: ``{input_name: array}`` dicts, or bare arrays for a
  single-input model; an array missing only the batch axis gets one;
* or the whole data set at once: a ``{input_name: array}`` mapping or a bare
  array, samples stacked on axis 0 (cut as in :mod:`edgeopt.data.base`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from edgeopt.data.base import DataSource, item_feeds, split_stacked
from edgeopt.errors import DataError
from edgeopt.ir.values import InputSpec

__all__ = ["CallableSource", "UserWorkingDirectory", "load_function", "looks_like_callable"]

_FUNCTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_END = object()  # the end of the user's iterable


def looks_like_callable(text: str) -> bool:
    """True for ``module:function`` or ``file.py:function`` (and not a Windows drive path)."""
    target, sep, function = text.rpartition(":")
    return bool(sep and target and len(target) > 1 and _FUNCTION_NAME.match(function))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _import_file(path: Path, spec_text: str, option: str) -> object:
    if not path.is_file():
        raise DataError(f"{option} {spec_text}: file {path} not found")
    module_name = f"edgeopt_user_data_{abs(hash(path.resolve()))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise DataError(f"{option} {spec_text}: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up here
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


# module name -> the working directory its import changed to, where a later load of it starts: its
# import-time code (an os.chdir to its data set) does not run again
_IMPORTED_INTO: dict[str, str] = {}


def _import_module(target: str) -> object:
    """``importlib.import_module``, with the current directory searched last for the time of the call.
    Called in the user's working directory (:meth:`UserWorkingDirectory.entered`), which it moves to
    where the module's first import went when the module is imported already."""
    if target in sys.modules and target in _IMPORTED_INTO:
        os.chdir(_IMPORTED_INTO[target])
        return sys.modules[target]
    here = os.getcwd()
    if here in sys.path or "" in sys.path:
        module = importlib.import_module(target)
    else:
        sys.path.append(here)
        try:
            module = importlib.import_module(target)
        finally:
            sys.path.remove(here)
    if os.getcwd() != here:
        _IMPORTED_INTO[target] = os.getcwd()
    return module


def _import(target: str, spec_text: str, option: str) -> object:
    try:
        if target.endswith(".py") or "/" in target or "\\" in target:
            return _import_file(Path(target), spec_text, option)
        return _import_module(target)
    except DataError:
        raise
    except (Exception, SystemExit) as error:  # the user's module may raise, or parse argv and exit, on import
        raise DataError(f"{option} {spec_text}: importing {target} failed ({_first_line(error)}): "
                        "check the module path and that it imports on its own") from error


class UserWorkingDirectory:
    """The working directory of the user's code, kept apart from edgeopt's.

    Evaluation scripts often ``os.chdir`` to their data set, on import or in
    the function: that code runs in the directory it last changed to, and
    edgeopt's own relative paths (``--data calib.npy``, ``-o out.onnx``) keep
    the meaning they had when given.
    """

    def __init__(self) -> None:
        self._theirs: str | None = None

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        ours = os.getcwd()
        if self._theirs is not None and self._theirs != ours:
            os.chdir(self._theirs)
        try:
            yield
        finally:
            try:
                self._theirs = os.getcwd()
            except FileNotFoundError:  # their code removed the directory it was in (a temporary one)
                self._theirs = None
            if self._theirs != ours:
                os.chdir(ours)


def load_function(spec_text: str, option: str = "--data",
                  directory: UserWorkingDirectory | None = None) -> Callable[..., object]:
    """The function named by ``module:function`` or ``file.py:function``; ``option`` names it in errors.
    ``directory``: where the module's import leaves the working directory (edgeopt's is restored)."""
    target, sep, name = spec_text.rpartition(":")
    if not looks_like_callable(spec_text):
        raise DataError(f"{option} {spec_text!r} is not module:function or path/to/file.py:function")
    with (directory or UserWorkingDirectory()).entered():
        module = _import(target, spec_text, option)
    function = getattr(module, name, None)
    if function is None:
        raise DataError(f"{option} {spec_text}: {target} has no attribute {name!r}")
    if not callable(function):
        raise DataError(f"{option} {spec_text}: {name} is a {type(function).__name__}, not a function")
    return function


class CallableSource(DataSource):
    """Batches from a user function ``module:function`` (see the module docstring)."""

    def __init__(self, spec_text: str, specs: Sequence[InputSpec]) -> None:
        super().__init__(specs)
        self._spec_text = spec_text
        self._directory = UserWorkingDirectory()
        self._function = load_function(spec_text, directory=self._directory)

    def _call(self) -> object:
        try:
            with self._directory.entered():
                return self._function()
        except (Exception, SystemExit) as error:  # a failure inside user code is reported, with its cause chained
            raise DataError(f"--data {self._spec_text}: the function raised ({_first_line(error)})") from error

    def _feeds(self) -> Iterator[tuple[Mapping[str, object], str]]:
        result = self._call()
        if isinstance(result, Mapping) or hasattr(result, "__array__"):
            yield from split_stacked(self._specs, self._stacked(result), where=self._spec_text)
        elif isinstance(result, Iterable) and not isinstance(result, (str, bytes)):
            yield from self._items(result)
        else:
            what = "None" if result is None else f"{type(result).__name__} {repr(result)[:40]}"
            raise DataError(f"--data {self._spec_text} returned {what}, not an iterable of {{input_name: array}} "
                            "dicts: return a list or yield the batches")

    def _stacked(self, result: object) -> Mapping[str, object]:
        if isinstance(result, Mapping):
            return result
        if len(self._specs) != 1:
            raise DataError(f"--data {self._spec_text} returned one array but the model has "
                            f"{len(self._specs)} inputs: return {{input_name: array}} dicts")
        return {self._specs[0].name: result}

    def _items(self, items: Iterable[object]) -> Iterator[tuple[Mapping[str, object], str]]:
        try:
            for index, item in enumerate(self._read_in_their_directory(items)):
                yield from item_feeds(item, self._specs, where=f"{self._spec_text} item {index}")
        except DataError:
            raise
        except (Exception, SystemExit) as error:  # the user's generator failed mid-way
            raise DataError(f"--data {self._spec_text}: iterating the result failed "
                            f"({_first_line(error)})") from error

    def _read_in_their_directory(self, items: Iterable[object]) -> Iterator[object]:
        """``items`` one by one, each read in the user's working directory: a generator's body (or a
        DataLoader's) is their code too, and runs as the batches are read, not when the function returns."""
        with self._directory.entered():
            iterator = iter(items)
        while True:
            with self._directory.entered():
                item = next(iterator, _END)
            if item is _END:
                return
            yield item

    def describe(self) -> str:
        return f"function {self._spec_text}"

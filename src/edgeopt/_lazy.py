"""Packages whose public names are imported on first use (PEP 562).

``edgeopt`` and ``edgeopt.api`` re-export functions whose modules pull in
ONNX, ONNX Runtime and numpy; imported eagerly, ``edgeopt --help`` waited a
second or more for them, and a Ctrl-C in that time was a traceback. A lazy
package resolves a name the first time it is read, and keeps it.

A name can be both a public function and a subpackage (``edgeopt.bench``,
``edgeopt.api.quantize``): the import system binds a loaded subpackage on
its parent, which would hide the function, so such a binding is not made
(the subpackage is still reached through ``sys.modules``, as every
``from edgeopt.bench import ...`` does).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable, Mapping

__all__ = ["lazy_package"]


class _LazyPackage(types.ModuleType):
    """A package module whose public names win over subpackages of the same name."""

    _exports: Mapping[str, str] = {}

    def __setattr__(self, name: str, value: object) -> None:
        if not (name in self._exports and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


def lazy_package(name: str, exports: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """Make package ``name`` lazy: ``exports`` maps each public name to the module defining it. Returns the
    package's ``__getattr__`` and ``__dir__``, which its ``__init__`` binds at module level."""
    package = sys.modules[name]

    def get(attribute: str) -> object:
        if attribute in exports:
            value = getattr(importlib.import_module(exports[attribute]), attribute)
        elif (attribute.isidentifier() and not attribute.startswith("_")  # find_spec imports a dotted name's parent
              and importlib.util.find_spec(f"{name}.{attribute}") is not None):
            value = importlib.import_module(f"{name}.{attribute}")  # a subpackage read as an attribute
        else:
            raise AttributeError(f"module {name!r} has no attribute {attribute!r}")
        types.ModuleType.__setattr__(package, attribute, value)
        return value

    def listing() -> list[str]:
        return sorted({*vars(package), *exports})

    package.__class__ = type("_LazyPackage", (_LazyPackage,), {"_exports": dict(exports)})
    return get, listing

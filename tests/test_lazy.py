"""edgeopt and edgeopt.api import their public names on first use (edgeopt/_lazy.py)."""

from __future__ import annotations

import pickle

import pytest

import edgeopt
import edgeopt.api


def test_the_public_names_are_listed_star_imported_and_pickled():
    assert set(edgeopt.__all__) <= set(dir(edgeopt)) and set(edgeopt.api.__all__) <= set(dir(edgeopt.api))
    names: dict = {}
    exec("from edgeopt import *", names)
    assert set(edgeopt.__all__) <= set(names)
    assert edgeopt.bench is edgeopt.api.bench and callable(edgeopt.bench)  # the function, not the subpackage
    assert pickle.loads(pickle.dumps(edgeopt.quantize)) is edgeopt.quantize


@pytest.mark.parametrize("name", ["no_such_name", "no_such.name", "api.no_such_name", ""])
def test_a_name_the_package_lacks_is_an_attribute_error(name):
    # hasattr and getattr with a default rely on it: a dotted name raised ModuleNotFoundError
    with pytest.raises(AttributeError, match=f"module 'edgeopt' has no attribute {name!r}"):
        getattr(edgeopt, name)
    assert not hasattr(edgeopt, name)


def test_compare_is_the_function_once_its_module_is_loaded():
    # edgeopt.api.compare is also the module defining it: loading that module must not hide the function
    import importlib

    module = importlib.import_module("edgeopt.api.compare")
    assert edgeopt.api.compare is module.compare and edgeopt.compare is module.compare and callable(edgeopt.compare)

"""CallableSource: the user's own ``module:function``."""

from __future__ import annotations

import os
import sys
import textwrap

import numpy as np
import pytest

from edgeopt.data import CallableSource, open_data
from edgeopt.errors import DataError
from tests.data.helpers import VECTOR, spec

MODULE = '''
import numpy as np

def batches():
    for i in range(3):
        yield {"x": np.full((1, 4), i, np.float32)}

def bare_arrays():
    return [np.ones(4), np.zeros(4)]

def stacked():
    return np.zeros((5, 4))

def broken():
    raise RuntimeError("database is down")

def wrong_items():
    return ["x", "y"]

def number():
    return 3

def nothing():
    data = [{"x": np.zeros((1, 4), np.float32)}]  # built, then not returned

def bad_shape():
    yield {"x": np.zeros((2, 2), np.float32)}

def ragged():
    return {"x": [[1.0, 2.0, 3.0, 4.0], [3.0]]}

def ragged_items():
    return [{"x": [[1.0, 2.0], [3.0]]}]

not_a_function = 42
'''


@pytest.fixture
def module_file(tmp_path):
    path = tmp_path / "my_data.py"
    path.write_text(textwrap.dedent(MODULE))
    return path


def test_file_function_yielding_dicts(module_file):
    source = open_data(f"{module_file}:batches", [VECTOR])
    assert isinstance(source, CallableSource)
    assert [b["x"][0, 0] for b in source] == [0, 1, 2]
    assert [b["x"][0, 0] for b in source] == [0, 1, 2]  # each pass calls the function again
    assert source.describe() == f"function {module_file}:batches"


def test_importable_module_function(module_file, monkeypatch):
    monkeypatch.syspath_prepend(str(module_file.parent))
    monkeypatch.delitem(sys.modules, "my_data", raising=False)
    assert len(list(open_data("my_data:batches", [VECTOR]))) == 3


def test_a_module_of_the_current_directory_is_found(module_file, monkeypatch):
    # as `python -m` would: the user runs edgeopt in their project and names its module
    monkeypatch.chdir(module_file.parent)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(module_file.parent))])
    monkeypatch.delitem(sys.modules, "my_data", raising=False)
    assert len(list(open_data("my_data:batches", [VECTOR]))) == 3
    assert str(module_file.parent) not in sys.path  # searched for the import only


def test_bare_arrays_are_wrapped_for_a_single_input(module_file):
    batches = list(CallableSource(f"{module_file}:bare_arrays", [VECTOR]))
    assert [b["x"].shape for b in batches] == [(1, 4), (1, 4)]
    assert batches[0]["x"].dtype == np.float32


def test_a_returned_array_is_cut_into_samples(module_file):
    assert len(list(CallableSource(f"{module_file}:stacked", [VECTOR]))) == 5


def test_bare_arrays_need_a_single_input_model(module_file):
    two = [spec("x", (1, 4)), spec("y", (1, 4))]
    with pytest.raises(DataError, match=r"item 0 is a ndarray, not a dict of arrays keyed by input name \(x, y\)"):
        list(CallableSource(f"{module_file}:bare_arrays", two))


@pytest.mark.parametrize(("target", "message"), [
    ("no_such_module_xyz:f", r"importing no_such_module_xyz failed \(ModuleNotFoundError"),
    ("{file}:missing", r"has no attribute 'missing'"),
    ("{file}:not_a_function", r"not_a_function is a int, not a function"),
    ("{dir}/absent.py:f", r"file .*absent\.py not found"),
])
def test_import_errors_are_one_line(module_file, target, message):
    text = target.format(file=module_file, dir=module_file.parent)
    with pytest.raises(DataError, match=message) as caught:
        CallableSource(text, [VECTOR])
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("function", "message"), [
    ("broken", r"the function raised \(RuntimeError: database is down\)"),
    ("wrong_items", r"item 0 is a str, not a dict of arrays"),
    ("number", r"returned int 3, not an iterable of .*: return a list or yield the batches"),
    ("nothing", r"returned None, not an iterable of \{input_name: array\} dicts"),
    ("bad_shape", r"bad_shape item 0: input 'x' wants shape 1x4 but got 2x2"),
    # numpy's ValueError on a ragged list was an internal error (exit 70)
    ("ragged", r"ragged: input 'x' is a nested list whose rows differ in length"),
    ("ragged_items", r"item 0: input 'x' is a nested list whose rows differ in length"),
])
def test_wrong_results_are_data_errors(module_file, function, message):
    with pytest.raises(DataError, match=message):
        list(CallableSource(f"{module_file}:{function}", [VECTOR]))


def test_module_that_fails_to_import(tmp_path):
    (tmp_path / "bad.py").write_text("import numpy\nraise ImportError('needs torchvision')\n")
    with pytest.raises(DataError, match=r"importing .*bad\.py failed \(ImportError: needs torchvision\)"):
        CallableSource(f"{tmp_path / 'bad.py'}:f", [VECTOR])


def _chdir_module(tmp_path, name: str, functions: str):
    """A data set folder holding x.npy (2 samples of 4) and module ``name`` in ``tmp_path`` that changes
    directory into it on import, then defines ``functions`` (source; DATA_DIR stands for the folder).
    Returns the module's path."""
    data_dir = tmp_path / "dataset"
    data_dir.mkdir()
    np.save(data_dir / "x.npy", np.ones((2, 4), np.float32))
    header = f"import os\nimport numpy as np\nos.chdir({str(data_dir)!r})\n"
    path = tmp_path / f"{name}.py"
    path.write_text(header + textwrap.dedent(functions).replace("DATA_DIR", repr(str(data_dir))))
    return path


def test_a_function_that_changes_directory_keeps_it_and_leaves_ours(tmp_path, monkeypatch):
    # a data script that chdirs to its data set (on import, or when called) ran edgeopt's own relative
    # paths (-o out.onnx, --data of a later pass) from there; it keeps its directory, edgeopt its own
    path = _chdir_module(tmp_path, "loader", '''
        def samples():
            return np.load("x.npy")  # relative to where the import went
    ''')
    monkeypatch.chdir(tmp_path)
    source = open_data(f"{path}:samples", [VECTOR])
    assert [b["x"].shape for b in source] == [(1, 4), (1, 4)]
    assert os.getcwd() == str(tmp_path)


def test_a_generator_runs_in_the_directory_its_code_chose(tmp_path, monkeypatch):
    # the function's body of a generator runs as the batches are read, not when it is called: the import's
    # chdir was undone by then ("iterating the result failed (FileNotFoundError: 'x.npy')"), and a chdir in
    # the body moved edgeopt's own directory for good (-o out.onnx was written into the data set)
    path = _chdir_module(tmp_path, "loader", '''
        def on_import():
            for row in np.load("x.npy"):  # relative to where the import went
                yield {"x": row[None]}

        def in_the_body():
            os.chdir("/")
            os.chdir(DATA_DIR)
            for row in np.load("x.npy"):
                yield {"x": row[None]}
    ''')
    monkeypatch.chdir(tmp_path)
    for function in ("on_import", "in_the_body"):
        seen = []
        for batch in open_data(f"{path}:{function}", [VECTOR]):
            seen.append((batch["x"].shape, os.getcwd()))
        assert seen == [((1, 4), str(tmp_path))] * 2, function
    assert os.getcwd() == str(tmp_path)


def test_a_module_imported_before_runs_where_its_import_went(tmp_path, monkeypatch):
    # quantize opens --data again for its fidelity check (and --eval may name the same module): the module
    # is imported once, so its import's chdir did not happen for the second source, whose calls ran in
    # edgeopt's directory ("the function raised (FileNotFoundError: 'x.npy')")
    _chdir_module(tmp_path, "chdir_loader", '''
        def samples():
            return np.load("x.npy")
    ''')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "chdir_loader", raising=False)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # calibration, then the fidelity check
        assert [b["x"].shape for b in open_data("chdir_loader:samples", [VECTOR])] == [(1, 4), (1, 4)]
        assert os.getcwd() == str(tmp_path)


def test_a_function_that_leaves_a_directory_it_removed_is_not_said_to_have_raised(tmp_path, monkeypatch):
    # its code went into a temporary directory, which is gone when it returns: edgeopt's own directory is
    # restored, and the next call starts there (it said "the function raised (FileNotFoundError ...)")
    path = tmp_path / "scratch_loader.py"
    path.write_text(textwrap.dedent('''
        import os
        import tempfile
        import numpy as np

        def samples():
            with tempfile.TemporaryDirectory() as scratch:
                os.chdir(scratch)
            return np.ones((2, 4), np.float32)
    '''))
    monkeypatch.chdir(tmp_path)
    source = open_data(f"{path}:samples", [VECTOR])
    for _ in range(2):
        assert [b["x"].shape for b in source] == [(1, 4), (1, 4)]
        assert os.getcwd() == str(tmp_path)

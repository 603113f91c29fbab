"""NpyFolderSource and NpyFileSource: every layout, every bad input."""

from __future__ import annotations

import tracemalloc

from pathlib import Path

import numpy as np
import pytest

from edgeopt.data import NpyFileSource, NpyFolderSource, open_data
from edgeopt.data.npy import list_files
from edgeopt.errors import DataError
from tests.data.helpers import IMAGE, TOKENS, VECTOR, spec

PAIR = [spec("a", (1, 2)), spec("b", (1, 3), np.int64)]


def sample(index: int, shape=(1, 3, 8, 8)) -> np.ndarray:
    return np.full(shape, index, dtype=np.float32)


def test_one_npy_per_sample(tmp_path):
    for i in range(3):
        np.save(tmp_path / f"s{i}.npy", sample(i))
    source = NpyFolderSource(tmp_path, [IMAGE])
    batches = list(source)
    assert [b["input"][0, 0, 0, 0] for b in batches] == [0, 1, 2]
    assert all(b["input"].shape == (1, 3, 8, 8) for b in batches)
    assert len(source) == 3
    assert source.describe() == f"folder {tmp_path}/ (3 .npy files, one sample each)"


def test_files_are_sorted_naturally_and_others_ignored(tmp_path):
    for i in (10, 2, 1):
        np.save(tmp_path / f"sample{i}.npy", sample(i))
    (tmp_path / "manifest.json").write_text('{"classes": 10}')
    (tmp_path / "README").write_text("calibration set")
    (tmp_path / "labels.txt").write_text("1\n2\n10\n")
    np.save(tmp_path / ".hidden.npy", sample(99))
    values = [b["input"][0, 0, 0, 0] for b in NpyFolderSource(tmp_path, [IMAGE])]
    assert values == [1, 2, 10]


def test_stacked_file_yields_one_sample_at_a_time(tmp_path):
    np.save(tmp_path / "calib.npy", np.stack([sample(i, (3, 8, 8)) for i in range(5)]))
    source = NpyFolderSource(tmp_path, [IMAGE])
    batches = list(source)
    assert len(batches) == 5 == source.num_samples
    assert all(b["input"].shape == (1, 3, 8, 8) for b in batches)
    assert [b["input"][0, 0, 0, 0] for b in batches] == [0, 1, 2, 3, 4]
    assert source.describe() == f"folder {tmp_path}/ (1 .npy file, 5 samples)"


def test_sample_without_batch_axis_gets_one(tmp_path):
    np.save(tmp_path / "one.npy", sample(7, (3, 8, 8)))
    (batch,) = list(NpyFolderSource(tmp_path, [IMAGE]))
    assert batch["input"].shape == (1, 3, 8, 8)


def test_dynamic_batch_input_is_fed_one_sample_per_batch(tmp_path):
    np.save(tmp_path / "ids.npy", np.arange(20).reshape(4, 5))
    batches = list(NpyFileSource(tmp_path / "ids.npy", [TOKENS]))
    assert [b["ids"].shape for b in batches] == [(1, 5)] * 4


def test_static_batch_input_is_fed_whole_batches(tmp_path):
    batch8 = spec("x", (8, 4))
    np.save(tmp_path / "x.npy", np.zeros((24, 4), np.float32))
    assert [b["x"].shape for b in NpyFileSource(tmp_path / "x.npy", [batch8])] == [(8, 4)] * 3


def test_npz_per_sample_for_a_two_input_model(tmp_path):
    for i in range(2):
        np.savez(tmp_path / f"s{i}.npz", a=np.full((1, 2), i, np.float32), b=np.full((1, 3), i))
    batches = list(NpyFolderSource(tmp_path, PAIR))
    assert [(b["a"][0, 0], b["b"][0, 0]) for b in batches] == [(0, 0), (1, 1)]
    assert batches[0]["b"].dtype == np.int64


def test_stacked_npz_file_for_a_two_input_model(tmp_path):
    np.savez(tmp_path / "all.npz", a=np.zeros((6, 2), np.float32), b=np.ones((6, 3), np.int64))
    source = open_data(tmp_path / "all.npz", PAIR)
    assert isinstance(source, NpyFileSource)
    assert source.num_samples == 6 and len(list(source)) == 6


def test_one_subfolder_per_input_pairs_files_by_sorted_name(tmp_path):
    for i in (1, 2, 10):
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "b").mkdir(exist_ok=True)
        np.save(tmp_path / "a" / f"{i}.npy", np.full((1, 2), i, np.float32))
        np.save(tmp_path / "b" / f"{i}.npy", np.full((3,), i, np.int64))
    (tmp_path / "manifest.json").write_text("{}")
    source = open_data(tmp_path, PAIR)
    batches = list(source)
    assert [(b["a"][0, 0], b["b"][0, 0]) for b in batches] == [(1, 1), (2, 2), (10, 10)]
    assert batches[0]["b"].shape == (1, 3)
    assert len(source) == 3
    assert source.describe() == f"folder {tmp_path}/ (one subfolder per input: a/, b/; 3 samples)"


def test_mismatched_subfolder_counts_are_refused(tmp_path):
    for name, count in (("a", 3), ("b", 2)):
        (tmp_path / name).mkdir()
        for i in range(count):
            np.save(tmp_path / name / f"{i}.npy", np.zeros((1, 2)))
    with pytest.raises(DataError, match=r"different numbers of .npy/.npz files \(a/: 3, b/: 2\)"):
        NpyFolderSource(tmp_path, PAIR)


def test_an_npz_in_an_input_subfolder_without_that_input_says_what_it_holds(tmp_path):
    """It said 'holds 1 arrays (foo): ... must hold one array' of a file holding one array."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    np.savez(tmp_path / "a" / "0.npz", foo=np.zeros((1, 2), np.float32))
    np.save(tmp_path / "b" / "0.npy", np.zeros((1, 3), np.int64))
    with pytest.raises(DataError, match=r"0\.npz holds 1 array \(foo\), none named 'a': a file in subfolder a/ holds "
                                        r"that input's array \(a \.npy, or an \.npz member named 'a'\)$"):
        list(open_data(tmp_path, PAIR))


def test_missing_subfolder_is_named(tmp_path):
    (tmp_path / "a").mkdir()
    np.save(tmp_path / "a" / "0.npy", np.zeros((1, 2)))
    with pytest.raises(DataError, match=r"none for b: add one subfolder per input"):
        NpyFolderSource(tmp_path, PAIR)


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(DataError, match=rf"^data folder {tmp_path} holds no .npy or .npz files$"):
        NpyFolderSource(tmp_path, [IMAGE])


def test_missing_path_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"data path .*nowhere not found"):
        NpyFolderSource(tmp_path / "nowhere", [IMAGE])
    with pytest.raises(DataError, match=r"data path .*nowhere not found"):
        open_data(str(tmp_path / "nowhere"), [IMAGE])


def test_single_npy_for_a_two_input_model_says_what_to_do(tmp_path):
    np.save(tmp_path / "s.npy", np.zeros((1, 2), np.float32))
    with pytest.raises(DataError, match=r"holds one array but the model has 2 inputs \(a, b\): save one .npz"):
        list(NpyFolderSource(tmp_path, PAIR))


def test_wrong_input_name_in_npz_lists_the_inputs(tmp_path):
    np.savez(tmp_path / "s.npz", a=np.zeros((1, 2), np.float32), c=np.zeros((1, 3), np.int64))
    with pytest.raises(DataError, match=r"s\.npz has data for 'c', which is not a model input .*inputs are: a, b"):
        list(NpyFolderSource(tmp_path, PAIR))


def test_wrong_shape_names_the_file(tmp_path):
    np.save(tmp_path / "s.npy", np.zeros((1, 3, 9, 9), np.float32))
    with pytest.raises(DataError, match=r"s\.npy: input 'input' wants shape 1x3x8x8 but got 1x3x9x9"):
        list(NpyFolderSource(tmp_path, [IMAGE]))


def test_wrong_dtype_names_the_file(tmp_path):
    np.save(tmp_path / "ids.npy", np.zeros((1, 5), np.float32))
    with pytest.raises(DataError, match=r"ids\.npy: input 'ids' wants int64 but the data is float32"):
        list(open_data(tmp_path, [TOKENS]))
    np.save(tmp_path / "ids.npy", np.array([["a"] * 5]))
    with pytest.raises(DataError, match=r"ids\.npy: input 'ids' holds <U1 data, not real numbers"):
        list(open_data(tmp_path, [TOKENS]))


@pytest.mark.parametrize(("bad", "word"), [(np.nan, "NaN"), (np.inf, "Inf")])
def test_nan_and_inf_name_the_sample(tmp_path, bad, word):
    data = np.zeros((4, 4), np.float32)
    data[2, 1] = bad
    np.save(tmp_path / "x.npy", data)
    source = open_data(tmp_path / "x.npy", [VECTOR])
    with pytest.raises(DataError, match=rf"x\.npy \[sample 2\] holds {word} values in input 'x': clean the data"):
        list(source)


def test_pickled_object_array_is_refused_not_loaded(tmp_path):
    np.save(tmp_path / "evil.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"evil\.npy holds Python objects, which edgeopt never unpickles"):
        list(NpyFolderSource(tmp_path, [VECTOR]))
    np.savez(tmp_path / "evil.npz", x=np.array([None], dtype=object))
    with pytest.raises(DataError, match=r"evil\.npz holds Python objects"):
        list(NpyFileSource(tmp_path / "evil.npz", [VECTOR]))


def test_garbage_and_truncated_files_are_refused(tmp_path):
    (tmp_path / "junk.npy").write_bytes(b"not an array at all")
    with pytest.raises(DataError, match=r"junk\.npy is not in .npy format"):
        list(NpyFileSource(tmp_path / "junk.npy", [VECTOR]))
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(DataError, match=r"cannot read .*empty\.npz"):
        list(NpyFileSource(tmp_path / "empty.npz", [VECTOR]))


def test_stacked_file_streams_without_loading_it_whole(tmp_path):
    """2000 samples of 4 KiB (8 MB): peak numpy allocation stays at a few samples."""
    data = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(2000, 1024))
    data[:] = np.arange(2000, dtype=np.float32)[:, None]
    data.flush()
    del data
    source = open_data(tmp_path / "big.npy", [spec("x", (1, 1024))])
    tracemalloc.start()
    count, last = 0, None
    for batch in source:
        assert batch["x"].shape == (1, 1024) and batch["x"].base is None  # an owned per-sample copy
        count, last = count + 1, batch["x"][0, 0]
    _, peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert (count, last) == (2000, 1999)
    assert peak_bytes < 256 * 1024, peak_bytes  # the whole file is 8 MB


def _rss_file_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssFile:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status (Linux)")
def test_a_stacked_npy_does_not_stay_resident_as_it_streams(tmp_path):
    """A memory map kept every page read resident (mapped) until the pass ended: the peak RSS of
    calibration on one big .npy grew with the file (1.3 GB for 1.2 GB of samples)."""
    data = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(256, 65536))
    data[:] = 1.0
    data.flush()
    del data
    source = open_data(tmp_path / "big.npy", [spec("x", (1, 65536))])
    before, growth, count = _rss_file_bytes(), 0, 0
    for _ in source:
        count += 1
        growth = max(growth, _rss_file_bytes() - before)
    assert count == 256
    assert growth < 16 * 2**20, growth  # the file is 64 MiB


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "compressed"])
def test_stacked_npz_streams_without_loading_it_whole(tmp_path, save):
    """The same 2000 samples in an .npz (stored or deflated): read from the zip stream one sample at
    a time, equal to np.load's, and a second pass (which starts over) too."""
    rows = np.arange(2000, dtype=np.float32)[:, None] + np.zeros((1, 1024), np.float32)
    save(tmp_path / "big.npz", x=rows, y=np.arange(2000, dtype=np.int64)[:, None])
    source = open_data(tmp_path / "big.npz", [spec("x", (1, 1024)), spec("y", (1, 1), np.int64)])
    for _ in range(2):
        tracemalloc.start()
        count = 0
        for batch in source:
            assert np.array_equal(batch["x"], rows[count:count + 1]) and batch["y"][0, 0] == count
            count += 1
        _, peak_bytes = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert count == 2000
        assert peak_bytes < 512 * 1024, peak_bytes  # x alone is 8 MB


def test_npz_members_of_other_layouts_are_read_whole(tmp_path):
    # Fortran order cannot stream by rows; a scalar has no rows: both are read with np.load.
    np.savez(tmp_path / "f.npz", a=np.asfortranarray(np.arange(12, dtype=np.float32).reshape(6, 2)),
             b=np.ones((6, 3), np.int64))
    assert [batch["a"].tolist() for batch in open_data(tmp_path / "f.npz", PAIR)][1] == [[2.0, 3.0]]


def test_non_numeric_npy_dtypes_are_refused_in_words(tmp_path):
    """Datetimes cannot be read into a buffer: the row reader leaves them to the check that names them."""
    np.save(tmp_path / "when.npy", np.array(["2026-11-22"] * 4, dtype="datetime64[s]").reshape(4, 1))
    with pytest.raises(DataError, match="not real numbers"):
        list(open_data(tmp_path / "when.npy", [spec("x", (1, 1))]))


def test_names_equal_but_for_case_or_leading_zeros_sort_the_same_in_every_copy(tmp_path):
    """s1, s01 and S1 have one natural key: left tied, they kept the order the file system listed
    them in, which differs between copies of a folder (a tmpfs lists them as created), and so did
    the calibration's bytes and the pairing of subfolder files."""
    names = ["s1.npy", "s01.npy", "S1.npy", "s2.npy", "s10.npy"]
    listed = []
    for copy, order in (("a", names), ("b", names[::-1])):
        (tmp_path / copy).mkdir()
        for name in order:
            np.save(tmp_path / copy / name, sample(names.index(name)))
        listed.append([p.name for p in list_files(tmp_path / copy, (".npy",))])
    assert listed[0] == listed[1] == ["S1.npy", "s01.npy", "s1.npy", "s2.npy", "s10.npy"]


def test_stacked_whole_inputs_are_one_sample_each(tmp_path):
    """np.stack of batch-1 samples gives [N, 1, ...]: N samples (it was refused as rank 5). It
    streams by rows as [N, ...] does."""
    np.save(tmp_path / "calib.npy", np.stack([sample(i) for i in range(2000)]))  # 2000 x 1x3x8x8, 6 MB
    source = open_data(tmp_path / "calib.npy", [IMAGE])
    tracemalloc.start()
    values = [batch["input"][0, 0, 0, 0] for batch in source]
    _, peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert values == list(range(2000)) and source.num_samples == 2000
    assert peak_bytes < 256 * 1024, peak_bytes  # the file is 6 MB
    assert next(iter(source))["input"].shape == (1, 3, 8, 8)


def test_inputs_without_a_batch_axis_stack_on_a_new_one(tmp_path):
    """An input [16, 32] (no batch axis): samples stacked as [N, 16, 32], as in memory."""
    sequence = spec("x", (4, 2))
    np.save(tmp_path / "x.npy", np.arange(24, dtype=np.float32).reshape(3, 4, 2))
    batches = list(NpyFileSource(tmp_path / "x.npy", [sequence]))
    assert [b["x"].shape for b in batches] == [(4, 2)] * 3 and batches[2]["x"][0, 0] == 16
    in_memory = open_data({"x": np.zeros((5, 4, 2))}, [sequence])
    assert len(in_memory) == 5 and [b["x"].shape for b in in_memory] == [(4, 2)] * 5


def test_an_unreadable_file_or_folder_says_so(tmp_path, monkeypatch):
    """Permissions are not a truncated file; a folder that cannot be listed was an internal error
    (exit 70). (Tests may run as root, which reads anything: the refusals are simulated.)"""
    np.save(tmp_path / "x.npy", sample(0))

    def refuse(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "iterdir", refuse)
    with pytest.raises(DataError, match=rf"^cannot list data folder {tmp_path} \(Permission denied\): "
                                        r"check its permissions$"):
        open_data(tmp_path, [IMAGE])
    monkeypatch.undo()
    monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(DataError, match=r"cannot read .*x\.npy \(Permission denied\): check that it is a file "
                                        r"you may read$"):
        list(open_data(tmp_path / "x.npy", [IMAGE]))
    monkeypatch.undo()
    monkeypatch.setattr(Path, "stat", refuse)
    with pytest.raises(DataError, match=r"cannot access data path .*x\.npy \(Permission denied\): check the "
                                        r"permissions of it and of the folders above it"):
        open_data(tmp_path / "x.npy", [IMAGE])

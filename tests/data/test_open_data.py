"""open_data dispatch, in-memory sources, take, and a real ONNX model's inputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.data import (
    ArraySource,
    ImageFolderSource,
    IterableSource,
    NpyFileSource,
    NpyFolderSource,
    dataset_from_arrays,
    open_data,
    take,
)
from edgeopt.errors import ConfigError, DataError
from edgeopt.io import load_model
from edgeopt.ir import model_inputs
from tests.data.helpers import IMAGE, VECTOR, spec, write_png


def test_dispatch_on_what_is_given(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 4), np.float32))
    write_png(tmp_path / "imgs" / "a.png", np.zeros((8, 8, 3)))
    assert isinstance(open_data(tmp_path, [VECTOR]), NpyFolderSource)
    assert isinstance(open_data(str(tmp_path / "x.npy"), [VECTOR]), NpyFileSource)
    assert isinstance(open_data(tmp_path / "imgs", [IMAGE]), ImageFolderSource)
    assert isinstance(open_data({"x": np.zeros((3, 4))}, [VECTOR]), ArraySource)
    assert isinstance(open_data(np.zeros((3, 4)), [VECTOR]), ArraySource)
    listed = open_data([{"x": np.zeros((1, 4))}], [VECTOR])
    assert isinstance(listed, IterableSource) and len(listed) == 1
    assert open_data(listed, [VECTOR]) is listed


def test_other_files_and_objects_are_refused(tmp_path):
    (tmp_path / "data.csv").write_text("1,2,3,4\n")
    with pytest.raises(DataError, match=r"data\.csv is not a folder or a .npy/.npz file"):
        open_data(tmp_path / "data.csv", [VECTOR])
    with pytest.raises(DataError, match=r"data of type int is not usable"):
        open_data(3, [VECTOR])


def test_a_source_of_one_sample_says_one_sample(tmp_path):
    np.save(tmp_path / "one.npy", np.zeros((1, 4), np.float32))
    assert open_data(tmp_path / "one.npy", [VECTOR]).describe().endswith("(1 sample)")
    assert open_data({"x": np.zeros((1, 4))}, [VECTOR]).describe() == "arrays x (1 sample)"


def test_files_of_zero_length_arrays_are_refused_by_name(tmp_path):
    """Calibration said only 'calibration data is empty', with no file named."""
    np.save(tmp_path / "empty.npy", np.zeros((0, 4), np.float32))
    with pytest.raises(DataError, match=r"^file .*empty\.npy \(0 samples\): no sample in it"):
        open_data(tmp_path / "empty.npy", [VECTOR])
    (tmp_path / "folder").mkdir()
    np.savez(tmp_path / "folder" / "a.npz", x=np.zeros((0, 4), np.float32))
    with pytest.raises(DataError, match=r"^folder .*folder/ \(1 .npz file, 0 samples\): no sample in it"):
        open_data(tmp_path / "folder", [VECTOR])


def test_arrays_only_in_subfolders_not_named_after_inputs_are_named(tmp_path):
    """A folder of class subfolders (cat/, dog/) holding .npy files was said to hold no .npy files."""
    for sub in ("cat", "dog", ".cache"):
        (tmp_path / sub).mkdir()
        np.save(tmp_path / sub / "0.npy", np.zeros((1, 4), np.float32))
    with pytest.raises(DataError, match=rf"^data folder {tmp_path} holds .npy/.npz files only in subfolders "
                                        r"\(cat/, dog/\), and none is named after a model input \(x\): point "
                                        r"--data at the folder holding the files, or give one subfolder per input"):
        open_data(tmp_path, [VECTOR])


def test_dataset_from_arrays_yields_samples_in_lockstep():
    specs = [spec("a", (1, 2)), spec("b", ("n", 3), np.int64)]
    source = dataset_from_arrays({"a": np.arange(10.0).reshape(5, 2), "b": np.zeros((5, 3), np.int64)}, specs)
    batches = list(source)
    assert len(source) == 5 and [b["a"][0, 0] for b in batches] == [0, 2, 4, 6, 8]
    assert source.describe() == "arrays a, b (5 samples)"
    with pytest.raises(DataError, match=r"different numbers of samples per input \(a: 5, b: 4\)"):
        dataset_from_arrays({"a": np.zeros((5, 2)), "b": np.zeros((4, 3), np.int64)}, specs)


def test_a_list_of_samples_of_different_shapes_under_one_name_says_how_to_give_them():
    """{"input": [a, b]} with images of two sizes: the way to give them is a list of batches."""
    dynamic = spec("input", ("n", 3, "h", "w"))
    samples = [np.zeros((1, 3, 8, 8), np.float32), np.zeros((1, 3, 9, 9), np.float32)]
    with pytest.raises(DataError, match=r"arrays: input 'input' is a nested list whose rows differ in length, .*or "
                                        r"samples of different shapes as a list of \{input_name: array\} batches"):
        open_data({"input": samples}, [dynamic])
    assert [b["input"].shape[2] for b in open_data([{"input": a} for a in samples], [dynamic])] == [8, 9]


def test_dataset_from_arrays_does_not_alias_the_callers_data():
    data = np.zeros((3, 4), np.float32)
    batch = next(iter(dataset_from_arrays({"x": data}, [VECTOR])))
    batch["x"][...] = 1.0
    assert not data.any()


def test_iterable_of_unknown_length():
    source = open_data(({"x": np.zeros((1, 4))} for _ in range(2)), [VECTOR])
    assert source.num_samples is None
    with pytest.raises(TypeError, match="not known in advance"):
        len(source)
    assert len(list(source)) == 2


def test_take_limits_the_samples(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((100, 4), np.float32))
    source = take(open_data(tmp_path / "x.npy", [VECTOR]), 7)
    assert len(source) == 7 and len(list(source)) == 7
    assert source.describe().endswith("(100 samples), first 7")
    assert take(open_data(iter([]), [VECTOR]), 3).num_samples is None
    with pytest.raises(ConfigError, match="positive integer"):
        take(source, 0)


def conv_model(path):
    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["out"], pads=[1, 1, 1, 1])], "conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 8, 8])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.save(model, path)
    return path


def test_real_model_inputs_drive_the_checks(tmp_path):
    specs = model_inputs(load_model(conv_model(tmp_path / "conv.onnx")))
    write_png(tmp_path / "imgs" / "cat.png", np.full((20, 30, 3), 128))
    (batch,) = list(open_data(tmp_path / "imgs", specs))
    assert batch["image"].shape == (1, 3, 8, 8) and batch["image"].dtype == np.float32
    np.save(tmp_path / "wrong.npy", np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(DataError, match=r"wrong\.npy: input 'image' wants shape 1x3x8x8 but got 1x3x16x16"):
        list(open_data(tmp_path / "wrong.npy", specs))

"""Atomic output: files that belong together (a model and its report) are replaced together."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from edgeopt.errors import OutputError
from edgeopt.io import atomic_write_files
from edgeopt.io import save


def _old_pair(tmp_path):
    model, report = tmp_path / "m.onnx", tmp_path / "m.report.json"
    model.write_bytes(b"old model")
    report.write_bytes(b"old report")
    return model, report


@pytest.fixture
def ctrl_c_raises():
    """Python's own SIGINT handler for the test: a process started in the background by a shell script
    inherits SIGINT ignored, and then no KeyboardInterrupt comes at all."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_between_the_renames_waits_until_both_files_are_new(tmp_path, monkeypatch, ctrl_c_raises):
    # Ctrl-C the instant the model was renamed into place once left it next to the previous run's report
    model, report = _old_pair(tmp_path)
    real_replace = os.replace

    def replace(source, target):
        real_replace(source, target)
        if str(target) == str(model):
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(save.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_files([(model, b"new model"), (report, b"new report")])
    assert model.read_bytes() == b"new model" and report.read_bytes() == b"new report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.report.json"]  # no temporary left
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_failure_before_the_renames_leaves_both_old_files(tmp_path, monkeypatch):
    model, report = _old_pair(tmp_path)
    real_fsync, calls = os.fsync, []

    def fsync(descriptor):  # the disk fills while the second file (the report) is written
        calls.append(descriptor)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_fsync(descriptor)

    monkeypatch.setattr(save.os, "fsync", fsync)
    with pytest.raises(OutputError, match="cannot write .*m.report.json: No space left"):
        atomic_write_files([(model, b"new model"), (report, b"new report")])
    assert model.read_bytes() == b"old model" and report.read_bytes() == b"old report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.report.json"]


def test_a_model_too_large_for_protobuf_is_a_model_error_not_an_output_error(monkeypatch):
    # model_to_bytes also serializes for ONNX Runtime (bench, the quantized size): no -o is involved,
    # so no other -o path would help (exit 4 says one would)
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from edgeopt.errors import ModelError

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    monkeypatch.setattr(save, "_PROTOBUF_LIMIT_BYTES", 8)
    with pytest.raises(ModelError, match="larger than 2 GB") as raised:
        save.model_to_bytes(model)
    assert not isinstance(raised.value, OutputError)


def test_a_special_file_is_refused_not_replaced_by_the_rename(tmp_path):
    # -o /dev/null ("only the numbers, please"): the finished file was renamed over the device, which root
    # may do: /dev/null became a regular file holding the model
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    with pytest.raises(OutputError, match="pipe is a device, pipe or socket, not a file"):
        atomic_write_files([(pipe, b"model")])
    assert pipe.is_fifo() and [path.name for path in tmp_path.iterdir()] == ["pipe"]


def test_a_model_past_the_protobuf_limit_is_written_with_its_weights_beside_it(tmp_path):
    # past 2 GB (here a limit of 4 KiB) the weights go to model.onnx.data, as onnx.save_model writes external
    # data; ONNX Runtime and edgeopt load the pair, with the outputs of the model as it was in memory
    import onnxruntime as ort

    from edgeopt.io import load_model, model_file_contents
    from tests.quant.int8_models import GraphBuilder

    g = GraphBuilder(seed=1)
    model = g.model([g.conv(g.node("Relu", [g.conv("x", 3, 32, "c1")], "r"), 32, 16, "c2")], (1, 3, 8, 8))
    path = tmp_path / "big.onnx"
    files = model_file_contents(model, path, limit_bytes=4096)
    assert [file.name for file, _ in files] == ["big.onnx", "big.onnx.data"] and len(files[0][1]) < 4096
    whole = model_file_contents(model, tmp_path / "whole.onnx")
    assert len(whole) == 1
    for file, data in [*files, *whole]:
        file.write_bytes(data)
    x = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    expected = ort.InferenceSession(str(tmp_path / "whole.onnx"), providers=["CPUExecutionProvider"]).run(None, x)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)
    np.testing.assert_array_equal(got[0], expected[0])
    assert len(list(load_model(path).graph.initializers)) == len(list(model.graph.initializers))


def test_quantize_writes_the_model_its_external_data_and_its_report_together(tmp_path, monkeypatch):
    import functools
    import importlib

    import onnxruntime as ort

    import edgeopt
    from edgeopt.io import model_file_contents

    artifact = importlib.import_module("edgeopt.api._artifact")  # where quantize's files are made
    from tests.quant.int8_models import GraphBuilder, batches

    monkeypatch.setattr(artifact, "model_file_contents", functools.partial(model_file_contents, limit_bytes=2048))
    g = GraphBuilder(seed=2)
    model = g.model([g.conv(g.node("Relu", [g.conv("x", 3, 32, "c1")], "r"), 32, 16, "c2")], (1, 3, 8, 8))
    out = tmp_path / "q.onnx"
    report = edgeopt.quantize(model, edgeopt.Fp16Config(), output=out, check_speed=False)
    data = tmp_path / "q.onnx.data"
    assert data.exists() and (tmp_path / "q.report.json").exists()
    assert report.quant_bytes == out.stat().st_size + data.stat().st_size
    x = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    assert ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, x)[0].shape == (1, 16, 8, 8)


def test_an_output_whose_external_data_file_would_replace_the_inputs_is_refused(tmp_path):
    # the input's weights live in out.onnx.data: writing out.onnx past 2 GB would put its own there
    import onnx

    import edgeopt
    from edgeopt.errors import OutputError
    from tests.models import external_data_model

    source = external_data_model(tmp_path / "source.onnx")
    onnx.save(onnx.load(str(source)), str(tmp_path / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="out.onnx.data", size_threshold=0)
    before = (tmp_path / "out.onnx.data").read_bytes()
    with pytest.raises(OutputError, match="out.onnx.data"):
        edgeopt.quantize(tmp_path / "model.onnx", edgeopt.Fp16Config(), output=tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").read_bytes() == before and not (tmp_path / "out.onnx").exists()

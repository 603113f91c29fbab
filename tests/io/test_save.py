"""Atomic output: files that belong together (a model and its report) are replaced together."""

from __future__ import annotations

import os
import signal

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

"""An output that cannot be written is the same kind of error, with the same exit code, in every command."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import edgeopt
from edgeopt.demo import demo_model_path
from edgeopt.errors import OutputError
from tests.conftest import assert_one_line_error

DIGITS = Path(edgeopt.__file__).parent / "assets" / "digits_calib.npy"


@pytest.fixture
def workdir(tmp_path):
    shutil.copyfile(demo_model_path(), tmp_path / "demo.onnx")
    (tmp_path / "taken").write_text("mine")
    os.mkfifo(tmp_path / "pipe")  # as /dev/null is a device: no file to rename over
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (("quantize", "demo.onnx", "--scheme", "fp16", "-o", "taken/x.onnx"), "taken is a file, not a folder"),
    (("quantize", "demo.onnx", "--scheme", "fp16", "-o", "missing/x.onnx"), "missing does not exist"),
    (("quantize", "demo.onnx", "--scheme", "fp16", "-o", "demo.onnx"), "would overwrite the input"),
    (("quantize", "demo.onnx", "--scheme", "fp16", "-o", "pipe"), "pipe is a device, pipe or socket"),
    (("compile", "demo.onnx", "-o", "taken"), "is a file: -o takes a folder"),
    (("compile", "demo.onnx", "-o", "taken/below"), "taken is a file"),
    (("demo", "-o", "taken"), "is a file: -o takes a folder"),
    (("run", "demo.onnx", "-i", str(DIGITS), "-o", "taken/below"), "taken is a file"),
])
def test_an_unwritable_output_is_exit_code_4_in_every_command(cli, workdir, monkeypatch, args, message):
    monkeypatch.chdir(workdir)
    before = (workdir / "demo.onnx").read_bytes()
    result = cli(*args)
    assert_one_line_error(result, message)
    assert result.code == OutputError.exit_code == 4
    assert (workdir / "taken").read_text() == "mine" and (workdir / "demo.onnx").read_bytes() == before
    assert (workdir / "pipe").is_fifo()

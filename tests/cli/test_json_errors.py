"""Under --json, an error is JSON on stdout too: a program reading stdout gets an object saying what failed,
the same in every command, while stderr keeps the one line and the exit code stays the error's."""

from __future__ import annotations

import json

import pytest

from edgeopt.demo import demo_calibration_path, demo_model_path
from tests.conftest import assert_one_line_error


def _error_of(result):
    return json.loads(result.stdout)["error"]


@pytest.mark.parametrize("command", [
    ("quantize", "missing.onnx", "-o", "q.onnx", "--data", demo_calibration_path()),
    ("compare", "missing.onnx", demo_model_path(), "--data", demo_calibration_path()),
], ids=["quantize", "compare"])
def test_a_user_error_under_json_is_the_stderr_line_as_json_on_stdout(cli, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    result = cli(*command, "--json")
    assert_one_line_error(result, "model file missing.onnx not found")
    line = result.stderr.strip().splitlines()[-1]
    assert _error_of(result) == {"message": line.removeprefix("error: "), "exit_code": 2} and result.code == 2


@pytest.mark.parametrize("command", [
    ("quantize", demo_model_path(), "-o", "q.onnx", "--data", demo_calibration_path(), "--max-samples", "0"),
    ("compare", demo_model_path(), demo_model_path(), "--data", demo_calibration_path(), "--max-samples", "0"),
], ids=["quantize", "compare"])
def test_a_usage_error_under_json_is_json_on_stdout_too(cli, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    result = cli(*command, "--json")
    assert result.code == 2 and "--max-samples" in result.stderr
    error = _error_of(result)
    assert error["exit_code"] == 2 and "'--max-samples'" in error["message"]


def test_bad_data_keeps_its_exit_code_and_without_json_stdout_stays_empty(cli, tmp_path):
    result = cli("compare", demo_model_path(), demo_model_path(), "--data", tmp_path / "missing.npy", "--json")
    assert result.code == 3 and _error_of(result)["exit_code"] == 3
    assert "missing.npy not found" in _error_of(result)["message"]
    plain = cli("compare", demo_model_path(), demo_model_path(), "--data", tmp_path / "missing.npy")
    assert plain.code == 3 and plain.stdout == ""


@pytest.mark.parametrize("options", [("-o", "--json"), ("-o", "q.onnx", "--exclude", "--json")],
                         ids=["output", "exclude"])
def test_json_as_an_option_value_asks_for_no_json(cli, tmp_path, monkeypatch, options):
    # -o --json names a file, --exclude --json a node: the error stays off stdout
    monkeypatch.chdir(tmp_path)
    result = cli("quantize", "missing.onnx", *options, "--data", demo_calibration_path())
    assert_one_line_error(result, "model file missing.onnx not found")
    assert result.code == 2 and result.stdout == ""


def test_json_after_an_option_value_and_after_global_flags_is_json(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("-v", "quantize", "missing.onnx", "-o", "q.onnx", "--exclude", "conv", "--json")
    assert _error_of(result)["exit_code"] == 2 and result.code == 2


def test_ctrl_c_while_the_options_are_read_for_json_is_an_interrupt(cli, monkeypatch):
    from edgeopt.cli import main

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(main, "_values_taken", interrupted)
    result = cli("inspect", demo_model_path(), "--json")
    assert result.code == 130 and result.stderr.strip() == "error: interrupted"

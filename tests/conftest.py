"""Shared fixtures: run the CLI in-process and capture what a user would see."""

from __future__ import annotations

from dataclasses import dataclass

import pytest


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    """``cli("inspect", path)`` runs ``edgeopt inspect path`` and returns code, stdout, stderr."""
    from edgeopt.cli.main import _run

    def invoke(*args) -> CliResult:
        code = _run([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke


def assert_one_line_error(result: CliResult, *fragments: str) -> None:
    """A user error: non-zero exit, one line on stderr naming the problem, no traceback."""
    assert result.code != 0, result
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and len(errors[0]) > len("error: "), result.stderr
    message = errors[0]
    for fragment in fragments:
        assert fragment in message, (fragment, message)

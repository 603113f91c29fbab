"""The ``edgeopt`` command line: parse, call the API, render. Nothing else."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Mapping

__all__ = ["main"]

INTERRUPTED = 130  # 128 + SIGINT, the shell's code for a Ctrl-C


class InterruptedAfterWriting(Exception):
    """A command interrupted (Ctrl-C, SIGTERM) that wrote what it had done: the accuracy search its best
    model. The entry point says ``message`` in its ``error: interrupted`` line, exits as on any interrupt,
    and under --json prints ``result`` (the report) with the error. Not a KeyboardInterrupt: Typer would
    make it an exit code, losing both."""

    def __init__(self, message: str, result: dict) -> None:
        super().__init__(message)
        self.message, self.result = message, result


_ctrl_c_seen = False


def _record_ctrl_c(signum, frame) -> None:
    """Python's own Ctrl-C (raise KeyboardInterrupt), remembering that one came: a Ctrl-C that lands
    inside a C extension's import (ONNX Runtime's, numpy's) comes out as an ImportError instead."""
    global _ctrl_c_seen
    _ctrl_c_seen = True
    raise KeyboardInterrupt


def ctrl_c_seen() -> bool:
    """Whether a Ctrl-C reached the ``edgeopt`` script (an error after it is the interrupt's doing)."""
    return _ctrl_c_seen


def main() -> None:
    """The ``edgeopt`` script. The commands (and ONNX, ONNX Runtime, numpy) are imported here, so a
    Ctrl-C while they load exits 130 without a traceback, as one during a command does."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when started with SIGINT ignored
        signal.signal(signal.SIGINT, _record_ctrl_c)
    try:
        from edgeopt.cli.main import main as run
    except Exception:
        if not _ctrl_c_seen:
            raise
        _exit_interrupted()
    except KeyboardInterrupt:
        _exit_interrupted()
    run()


def json_flag_given(args: list[str], values_taken: Mapping[str, int]) -> bool:
    """Whether ``args`` give the --json flag: before a ``--`` that ends the options, and not as the value
    of an option (``values_taken``: option -> how many values it takes; ``-o --json`` names a file)."""
    skipped = 0
    for token in args:
        if skipped:
            skipped -= 1
        elif token in ("--", "--json"):
            return token == "--json"
        else:
            skipped = values_taken.get(token, 0)
    return False


def _exit_interrupted() -> None:
    """Interrupted while the commands load: the error line, and under --json the error as JSON on stdout
    (which options take a value is not known yet: every ``--json`` before ``--`` counts)."""
    print("error: interrupted", file=sys.stderr)
    if json_flag_given(sys.argv[1:], {}):
        print(json.dumps(error_object("interrupted", INTERRUPTED), indent=2))  # numpy may be what was cut short
    sys.exit(INTERRUPTED)


def error_object(message: str, code: int, result: Mapping | None = None) -> dict:
    """What --json prints for an error: ``{"error": {"message", "exit_code"}}``, after the keys of what
    was done before it (the report of an interrupted accuracy search)."""
    return {**(result or {}), "error": {"message": message, "exit_code": code}}

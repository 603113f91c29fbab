"""The ``edgeopt`` command line: parse, call the API, render. Nothing else."""

from __future__ import annotations

import sys

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


def main() -> None:
    """The ``edgeopt`` script. The commands (and ONNX, ONNX Runtime, numpy) are imported here, so a
    Ctrl-C while they load exits 130 without a traceback, as one during a command does."""
    try:
        from edgeopt.cli.main import main as run
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED)
    run()

"""The ``edgeopt`` command line: parse, call the API, render. Nothing else."""

from __future__ import annotations

import sys

__all__ = ["main"]

INTERRUPTED = 130  # 128 + SIGINT, the shell's code for a Ctrl-C


def main() -> None:
    """The ``edgeopt`` script. The commands (and ONNX, ONNX Runtime, numpy) are imported here, so a
    Ctrl-C while they load exits 130 without a traceback, as one during a command does."""
    try:
        from edgeopt.cli.main import main as run
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED)
    run()

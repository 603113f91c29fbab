"""The ``edgeopt`` command line: parse, call the API, render. Nothing else."""

from edgeopt.cli.main import main

__all__ = ["main"]

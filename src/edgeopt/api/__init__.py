"""The Python API of edgeopt: one typed function per CLI command.

Every function takes paths or models and plain values, returns a result object
with a ``to_dict()`` for ``--json``, and raises :class:`edgeopt.errors.EdgeoptError`
subclasses for anything a user can cause.
"""

from __future__ import annotations

from edgeopt.api._common import ModelSource, Progress, load
from edgeopt.api.bench import bench
from edgeopt.api.deploy import compile_model, verify
from edgeopt.api.model import InspectResult, RunResult, from_torch, inspect, run
from edgeopt.api.quantize import QuantizeReport, compare, quantize

__all__ = [
    "InspectResult",
    "ModelSource",
    "Progress",
    "QuantizeReport",
    "RunResult",
    "bench",
    "compare",
    "compile_model",
    "from_torch",
    "inspect",
    "load",
    "quantize",
    "run",
    "verify",
]

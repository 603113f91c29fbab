"""The Python API of edgeopt: one typed function per CLI command.

Every function takes paths or models and plain values, returns a result object
with a ``to_dict()`` for ``--json``, and raises :class:`edgeopt.errors.EdgeoptError`
subclasses for anything a user can cause.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgeopt._lazy import lazy_package

# public name -> the module that defines it, imported on first use (the CLI starts without them)
_EXPORTS = {
    **dict.fromkeys(("ModelSource", "Progress", "load"), "edgeopt.api._common"),
    "bench": "edgeopt.api.bench",
    **dict.fromkeys(("compile_model", "verify"), "edgeopt.api.deploy"),
    **dict.fromkeys(("InspectResult", "RunResult", "from_torch", "inspect", "run"), "edgeopt.api.model"),
    "compare": "edgeopt.api.compare",
    **dict.fromkeys(("QuantizeReport", "quantize"), "edgeopt.api.quantize"),
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_package(__name__, _EXPORTS)

if TYPE_CHECKING:  # the names for type checkers and IDEs
    from edgeopt.api._common import ModelSource, Progress, load
    from edgeopt.api.bench import bench
    from edgeopt.api.deploy import compile_model, verify
    from edgeopt.api.model import InspectResult, RunResult, from_torch, inspect, run
    from edgeopt.api.compare import compare
    from edgeopt.api.quantize import QuantizeReport, quantize

"""edgeopt: make trained neural networks small, low-bit, fast and deployable on edge devices.

The top-level functions mirror the CLI commands (see :mod:`edgeopt.api`), and
the configurations they take are here too, so a script needs one import::

    import edgeopt

    report = edgeopt.quantize("model.onnx", edgeopt.Int8Config(), "calib/", output="model.int8.onnx")

The names below are imported on first use (PEP 562), so ``import edgeopt.cli`` and
``import edgeopt.errors`` do not pull in ONNX, ONNX Runtime and numpy before they are needed:
the command line starts, and a Ctrl-C while it loads them, is its own to handle.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(("bench", "compare", "compile_model", "from_torch", "inspect", "load", "quantize", "run",
                     "verify"), "edgeopt.api"),
    "AccuracyGoal": "edgeopt.quant.accuracy",
    "BenchConfig": "edgeopt.bench",
    "ImagePreprocess": "edgeopt.data",
    **dict.fromkeys(("CalibrationMethod", "Int8Config", "PerBlock", "PerChannel", "PerTensor", "Target"),
                    "edgeopt.quant.config"),
    **dict.fromkeys(("Bf16Config", "Fp16Config"), "edgeopt.quant.float16"),
    **dict.fromkeys(("INT8", "UINT8"), "edgeopt.quant.formats"),  # Int8Config(activation_format=UINT8)
    "Int4WeightConfig": "edgeopt.quant.int4",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str):
    """A public name, or a subpackage (``edgeopt.quant`` after a bare ``import edgeopt``), on first use."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """The import system binds a loaded subpackage on its parent (``edgeopt.bench``, the benchmark
    package), which would hide the public function of the same name: it is reached through
    ``sys.modules`` (``from edgeopt.bench import ...``) instead."""

    def __setattr__(self, name: str, value: object) -> None:
        if not (name in _EXPORTS and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # the names for type checkers and IDEs
    from edgeopt.api import bench, compare, compile_model, from_torch, inspect, load, quantize, run, verify
    from edgeopt.bench import BenchConfig
    from edgeopt.data import ImagePreprocess
    from edgeopt.quant.accuracy import AccuracyGoal
    from edgeopt.quant.config import CalibrationMethod, Int8Config, PerBlock, PerChannel, PerTensor, Target
    from edgeopt.quant.float16 import Bf16Config, Fp16Config
    from edgeopt.quant.formats import INT8, UINT8
    from edgeopt.quant.int4 import Int4WeightConfig

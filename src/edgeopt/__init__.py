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

from typing import TYPE_CHECKING

from edgeopt._lazy import lazy_package

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(("bench", "compare", "compile_model", "from_torch", "inspect", "load", "quantize", "run",
                     "verify"), "edgeopt.api"),
    "AccuracyGoal": "edgeopt.quant.accuracy",
    "BenchConfig": "edgeopt.bench",
    "ImagePreprocess": "edgeopt.data",
    **dict.fromkeys(("ConfigError", "DataError", "EdgeoptError", "EdgeoptWarning", "Interrupted", "ModelError",
                     "OutputError", "UnsupportedOpError"), "edgeopt.errors"),
    "QuantizeReport": "edgeopt.api.quantize",
    "CompareResult": "edgeopt.quant.compare",
    **dict.fromkeys(("CalibrationMethod", "Fallback", "Int8Config", "PerBlock", "PerChannel", "PerTensor", "Target"),
                    "edgeopt.quant.config"),
    **dict.fromkeys(("Bf16Config", "Fp16Config"), "edgeopt.quant.float16"),
    "DynamicInt8Config": "edgeopt.quant.dynamic",
    **dict.fromkeys(("INT4", "INT8", "UINT4", "UINT8"), "edgeopt.quant.formats"),  # Int8Config(activation_format=UINT8)
    **dict.fromkeys(("AccuracyLevel", "Embeddings", "Int4WeightConfig", "WeightFallback"), "edgeopt.quant.int4"),
}

__all__ = [*sorted(_EXPORTS), "__version__"]

__getattr__, __dir__ = lazy_package(__name__, _EXPORTS)

if TYPE_CHECKING:  # the names for type checkers and IDEs
    from edgeopt.api import bench, compare, compile_model, from_torch, inspect, load, quantize, run, verify
    from edgeopt.bench import BenchConfig
    from edgeopt.data import ImagePreprocess
    from edgeopt.api.quantize import QuantizeReport
    from edgeopt.errors import (ConfigError, DataError, EdgeoptError, EdgeoptWarning, Interrupted, ModelError,
                                OutputError, UnsupportedOpError)
    from edgeopt.quant.accuracy import AccuracyGoal
    from edgeopt.quant.config import CalibrationMethod, Fallback, Int8Config, PerBlock, PerChannel, PerTensor, Target
    from edgeopt.quant.dynamic import DynamicInt8Config
    from edgeopt.quant.float16 import Bf16Config, Fp16Config
    from edgeopt.quant.formats import INT4, INT8, UINT4, UINT8
    from edgeopt.quant.compare import CompareResult
    from edgeopt.quant.int4 import AccuracyLevel, Embeddings, Int4WeightConfig, WeightFallback

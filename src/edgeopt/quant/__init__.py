"""Quantization: formats, the numpy spec, observers, calibration, QDQ placement, schemes.

``quantize(model, config, data)`` runs the scheme registered for the config
type: :class:`Int8Config` (int8 QDQ, calibrated), and the float16/bfloat16
and int4 weight-only schemes of :mod:`edgeopt.quant.float16` and
:mod:`edgeopt.quant.int4`.
"""

from __future__ import annotations

import importlib

from edgeopt.quant import int8 as _int8  # noqa: F401  (registers Int8Config)
from edgeopt.quant.api import quantize
from edgeopt.quant.calibrate import CalibrationResult, TensorCalibration, calibrate
from edgeopt.quant.config import (
    CalibrationConfig,
    CalibrationMethod,
    Fallback,
    Granularity,
    Int8Config,
    PerBlock,
    PerChannel,
    PerTensor,
    Target,
)
from edgeopt.quant.formats import FORMATS, Format, format_named
from edgeopt.quant.placement import QdqPlan, plan_qdq
from edgeopt.quant.qdq import insert_qdq
from edgeopt.quant.registry import FloatNode, QuantResult, TensorQuantInfo, register_scheme

# Schemes written in their own modules register themselves on import.
for _scheme_module in ("float16", "int4", "dynamic"):
    try:
        importlib.import_module(f"edgeopt.quant.{_scheme_module}")
    except ModuleNotFoundError as _error:
        if _error.name != f"edgeopt.quant.{_scheme_module}":
            raise

__all__ = [
    "FORMATS",
    "CalibrationConfig",
    "CalibrationMethod",
    "CalibrationResult",
    "FloatNode",
    "Format",
    "Granularity",
    "Int8Config",
    "PerBlock",
    "PerChannel",
    "PerTensor",
    "QdqPlan",
    "QuantResult",
    "Fallback",
    "Target",
    "TensorCalibration",
    "TensorQuantInfo",
    "calibrate",
    "format_named",
    "insert_qdq",
    "plan_qdq",
    "quantize",
    "register_scheme",
]

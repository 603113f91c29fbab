"""Quantization schemes: one config type, one handler, one result type.

``quantize(model, config, data)`` looks up the handler registered for
``type(config)``; a new scheme (int8 QDQ, fp16, bf16, int4 weight-only ...)
is a frozen config dataclass plus a function decorated with
``@register_scheme(ThatConfig)``::

    @register_scheme(Fp16Config)
    def quantize_fp16(model, config, data, *, progress=None) -> QuantResult: ...

Handler contract:

* ``model`` is a private copy made by :func:`edgeopt.quant.quantize`; the
  handler may rewrite it in place and return it in the result. (Call the
  handler directly and you pass your own copy.)
* ``data`` is an iterable of ``{input_name: np.ndarray}`` batches, or None for
  schemes that need no calibration (weight-only, float16). It may be iterated
  more than once only if it is a re-iterable (a list, a data source object);
  handlers that need data iterate it exactly once.
* ``progress(done, total)`` is called as batches stream; ``total`` is None
  when the data has no ``len``.
* The result is a :class:`QuantResult`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np
import onnx_ir as ir

from edgeopt.errors import ConfigError

__all__ = [
    "Batch",
    "FloatNode",
    "ProgressCallback",
    "QuantResult",
    "SchemeHandler",
    "TensorQuantInfo",
    "handler_for",
    "register_scheme",
    "registered_schemes",
]

Batch = Mapping[str, np.ndarray]
ProgressCallback = Callable[[int, "int | None"], None]


class SchemeHandler(Protocol):
    def __call__(self, model: ir.Model, config: object, data: Iterable[Batch] | None, *,
                 progress: ProgressCallback | None = None) -> "QuantResult": ...


class FloatNode(NamedTuple):
    """A node the scheme left in float, and why (shown to the user as is)."""

    node_name: str
    op_type: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class TensorQuantInfo:
    """How one tensor was quantized.

    ``kind`` is ``"activation"``, ``"weight"`` or ``"bias"``; ``op_type`` is the
    op that produces (activation) or consumes (weight, bias) it. ``range`` is
    the float range the parameters were chosen for: the calibrated range of
    an activation (for tensors sharing a scale: the union over the group),
    the min and max of a constant's values (over all channels); ``scale`` and
    ``zero_point`` are tuples with one entry per channel (or block), a single
    entry for per-tensor, along ``axis``. ``method`` names the calibration
    method (``"minmax"`` for weights, ``"derived"`` for biases) and
    ``format`` the low-bit format's name in :mod:`edgeopt.quant.formats`.
    """

    name: str
    kind: str
    op_type: str
    format: str
    range: tuple[float, float]
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    method: str
    axis: int | None = None

    @classmethod
    def symmetric_weight(cls, name: str, op_type: str, fmt: str, value_range: tuple[float, float], scale,
                         axis: int | None) -> TensorQuantInfo:
        """A weight rounded symmetric (zero points 0) over its min/max, its ``scale`` an array (one per
        channel, or one)."""
        scales = tuple(np.ravel(scale).tolist())
        return cls(name=name, kind="weight", op_type=op_type, format=fmt, range=value_range, scale=scales,
                   zero_point=(0,) * len(scales), method="minmax", axis=axis)


@dataclass(frozen=True, kw_only=True)
class QuantResult:
    """A quantized model and what was done to get it.

    ``scheme`` is a short name (``"int8"``, ``"fp16"`` ...); ``notes`` are
    one-line facts a user should read (opset converted, activation type
    chosen for the target ...). ``config`` is the config the handler ran with;
    ``details`` holds scheme-specific values keyed by name -- for int8:
    ``calibration`` (the ``CalibrationResult``, reusable without a new pass),
    ``plan`` (the ``QdqPlan``), ``opset_conversion`` (``OpsetConversion`` or
    None), ``activation_format`` (``"uint8"``/``"int8"``) and
    ``optimization`` (the float passes' result, or None), ``relu6_replaced`` (the ReLU6 nodes
    ``--equalize-relu6`` turned into ReLU) and ``relu6_float_sqnr_db`` (the float model's output SQNR
    after that, against the original's, on the calibration data; None when not measured).
    """

    model: ir.Model
    scheme: str
    tensors: tuple[TensorQuantInfo, ...] = ()
    float_nodes: tuple[FloatNode, ...] = ()
    notes: tuple[str, ...] = ()
    config: object | None = None
    details: Mapping[str, object] = field(default_factory=dict)

    def tensor(self, name: str) -> TensorQuantInfo:
        for info in self.tensors:
            if info.name == name:
                return info
        raise KeyError(name)


_HANDLERS: dict[type, SchemeHandler] = {}


def register_scheme(config_type: type) -> Callable[[SchemeHandler], SchemeHandler]:
    """Decorator: register the decorated handler for configs of exactly ``config_type``."""

    def decorator(handler: SchemeHandler) -> SchemeHandler:
        existing = _HANDLERS.get(config_type)
        if existing is not None and existing is not handler:
            raise TypeError(f"a quantization handler for {config_type.__name__} is already registered "
                            f"({existing.__module__}.{existing.__qualname__})")
        _HANDLERS[config_type] = handler
        return handler

    return decorator


def handler_for(config: object) -> SchemeHandler:
    """The handler registered for ``type(config)`` (or its nearest base class)."""
    for cls in type(config).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    known = ", ".join(sorted(t.__name__ for t in _HANDLERS)) or "none"
    raise ConfigError(f"no quantization scheme takes a {type(config).__name__}: "
                      f"use one of the configs {known}")


def registered_schemes() -> tuple[type, ...]:
    """Config types with a handler, sorted by name."""
    return tuple(sorted(_HANDLERS, key=lambda t: t.__name__))

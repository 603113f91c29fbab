"""``quantize(model, config, data)``: dispatch on the type of ``config``.

Each scheme registers a handler for its config type
(:func:`edgeopt.quant.registry.register_scheme`); this function finds it,
hands it a private copy of the model (the caller's model is never
modified; ``in_place=True`` hands over the model itself, for a caller that
loaded it only for this and drops it: the weights a float pass replaces are
then freed instead of kept alive by the caller) and returns the handler's
:class:`QuantResult`.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir

from edgeopt.quant.model_checks import check_not_quantized
from edgeopt.quant.registry import Batch, ProgressCallback, QuantResult, handler_for

__all__ = ["quantize"]


def quantize(model: ir.Model, config: object, data: Iterable[Batch] | None = None, *,
             progress: ProgressCallback | None = None, in_place: bool = False) -> QuantResult:
    """Quantize a copy of ``model`` with the scheme registered for ``type(config)``.

    ``data``: calibration batches ``{input_name: array}`` (schemes that need
    none accept None). ``progress(done, total)`` is called per batch. A model
    already quantized or converted to float16/bfloat16 is refused (ModelError).
    """
    handler = handler_for(config)
    check_not_quantized(model)
    if not in_place:
        model = model.clone()
    return handler(model, config, data, progress=progress)

"""The low-bit number formats of edgeopt, declared once.

Every packer, the numpy reference, the QDQ builder and the C emitter read
this table; nothing else spells a ``qmin`` or an ONNX element type.

An integer format stores ``q`` in ``[qmin, qmax]`` and means
``x = (q - zero_point) * scale``. *Symmetric* formats always use
``zero_point = 0`` and ``scale = max|x| / qmax`` (so int8 weights use
[-127, 127], the TFLite/CMSIS-NN weight range, and -128 never occurs).
Asymmetric formats choose ``zero_point`` so that the range covers
``[min, max]`` and 0 is exactly representable.

Float formats (fp16, bf16) have no ``qmin``/``qmax``: values are rounded to
the nearest representable number. ``numpy_dtype`` is the storage type of a
packed array: int4/uint4 values are held one per int8/uint8 element (the ONNX
INT4/UINT4 tensor packs two per byte when serialized); bfloat16 uses
``ml_dtypes.bfloat16``, the type onnx_ir uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir

from edgeopt.errors import ConfigError

__all__ = [
    "BFLOAT16",
    "FLOAT16",
    "FORMATS",
    "INT4",
    "INT8",
    "INT8_BLOCK",
    "INT8_SYMMETRIC",
    "INT32",
    "UINT4",
    "UINT8",
    "Format",
    "format_named",
]


@dataclass(frozen=True, kw_only=True)
class Format:
    """One number format: its name, storage dtype, integer range and ONNX type."""

    name: str
    numpy_dtype: np.dtype
    onnx_type: ir.DataType
    bits: int
    qmin: int | None = None
    qmax: int | None = None
    symmetric: bool = False
    default_block_size: int | None = None

    @property
    def is_integer(self) -> bool:
        return self.qmin is not None

    @property
    def num_levels(self) -> int:
        """How many integer values the format may use (255 for int8 weights, 256 for uint8)."""
        if self.qmin is None or self.qmax is None:
            raise ValueError(f"{self.name} is a float format")
        return self.qmax - self.qmin + 1

    def __str__(self) -> str:
        return self.name


def _integer(name: str, dtype: type, onnx_type: ir.DataType, bits: int, qmin: int, qmax: int, *,
             symmetric: bool = False, block: int | None = None) -> Format:
    return Format(name=name, numpy_dtype=np.dtype(dtype), onnx_type=onnx_type, bits=bits,
                  qmin=qmin, qmax=qmax, symmetric=symmetric, default_block_size=block)


# name -> format. Roles: int8_symmetric = weights; uint8/int8 = activations
# (uint8 for ONNX Runtime on x86, int8 for the MCU/TFLite scheme); int32 =
# biases (scale = input_scale * weight_scale); int4/uint4 = block-wise
# weight-only, int8_block/uint8 its 8-bit fallback (int8_block: symmetric
# with all 256 levels, as int4 uses all 16); float16/bfloat16 = weights stored
# low, compute in float.
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        _integer("int8_symmetric", np.int8, ir.DataType.INT8, 8, -127, 127, symmetric=True),
        _integer("int8", np.int8, ir.DataType.INT8, 8, -128, 127),
        _integer("uint8", np.uint8, ir.DataType.UINT8, 8, 0, 255),
        _integer("int32", np.int32, ir.DataType.INT32, 32, -(2**31) + 1, 2**31 - 1, symmetric=True),
        _integer("int4", np.int8, ir.DataType.INT4, 4, -8, 7, symmetric=True, block=32),
        _integer("uint4", np.uint8, ir.DataType.UINT4, 4, 0, 15, block=32),
        _integer("int8_block", np.int8, ir.DataType.INT8, 8, -128, 127, symmetric=True, block=32),
        Format(name="float16", numpy_dtype=np.dtype(np.float16), onnx_type=ir.DataType.FLOAT16, bits=16),
        Format(name="bfloat16", numpy_dtype=np.dtype(ml_dtypes.bfloat16), onnx_type=ir.DataType.BFLOAT16,
               bits=16),
    )
}

INT8_SYMMETRIC = FORMATS["int8_symmetric"]
INT8 = FORMATS["int8"]
UINT8 = FORMATS["uint8"]
INT32 = FORMATS["int32"]
INT4 = FORMATS["int4"]
UINT4 = FORMATS["uint4"]
INT8_BLOCK = FORMATS["int8_block"]
FLOAT16 = FORMATS["float16"]
BFLOAT16 = FORMATS["bfloat16"]


def format_named(name: str) -> Format:
    """The format called ``name``; a ConfigError lists the known names otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ConfigError(f"unknown number format {name!r}: use one of {', '.join(FORMATS)}") from None

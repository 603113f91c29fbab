"""Int4 weight-only, block-wise quantization of MatMul and Gemm weights.

For ``y = x @ W`` with a constant weight ``W`` of shape ``[..., K, N]``, K
(the reduction axis) is cut into blocks of ``b`` rows; each block of each
column gets its own scale (and zero point), by the min/max rule of
:mod:`edgeopt.quant.primitives` in the format of :mod:`edgeopt.quant.formats`:

* ``int4`` (symmetric): ``scale = max|w| / 7``, ``q = clamp(rint(w / scale), -8, 7)``;
* ``uint4`` (asymmetric): the block range widened to include 0,
  ``scale = (max - min) / 15``, ``zero_point = clamp(rint(-min / scale), 0, 15)``;

and ``w' = (q - zero_point) * scale``. For Gaussian weights the symmetric
rule gives a weight SQNR of about 21 dB at b = 32 and 19 dB at b = 128.

Lowering, per node:

* MatMul with a 2-D constant weight, and Gemm (``transA = 0``; ``alpha``
  and ``transB`` folded into the weight, ``beta * C`` into the bias) become
  ONNX Runtime's ``com.microsoft.MatMulNBits`` (bits = 4): B is uint8
  ``[N, ceil(K / b), b / 2]`` -- column n's codes along K, two per byte, low
  nibble first; K is padded to a whole block with codes of value 0 -- scales
  float32 ``[N * ceil(K / b)]``; for int4 the code is ``q + 8`` and the
  zero-points input is left out (MatMulNBits then uses 8); for uint4 the
  code is ``q`` and zero points are packed the same way, ``[N *
  ceil(ceil(K / b) / 2)]``. A constant bias that broadcasts over rows rides
  in MatMulNBits' bias input; any other C is added by an Add node.
* MatMul with a constant weight of rank > 2 becomes the standard ONNX path,
  ``DequantizeLinear(INT4/UINT4 weight, scale, axis = rank - 2,
  block_size = b)`` feeding the MatMul, when the model's opset is >= 21
  (blocked quantization); at a lower opset it stays float (no silent opset
  upgrade).
* Everything else stays float and is listed with the reason.

Nibble packing is done in one place, :func:`pack_nibbles`.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.errors import ConfigError
from edgeopt.quant.config import PerBlock
from edgeopt.quant.float16 import UniqueNames
from edgeopt.quant.formats import INT4, UINT4, Format
from edgeopt.quant.primitives import choose_qparams, dequantize, quantize
from edgeopt.quant.registry import Batch, FloatNode, ProgressCallback, QuantResult, TensorQuantInfo, register_scheme

__all__ = [
    "AccuracyLevel",
    "BlockQuantizedWeight",
    "Int4WeightConfig",
    "MatMulNBitsWeight",
    "decode_matmul_nbits",
    "encode_matmul_nbits",
    "pack_nibbles",
    "quantize_blocks",
    "quantize_int4",
    "unpack_nibbles",
]

logger = logging.getLogger(__name__)

_MS_DOMAIN = "com.microsoft"
_BLOCKED_DQ_OPSET = 21  # DequantizeLinear gained block_size (and INT4) in opset 21
_NBITS_BITS = 4


class AccuracyLevel(enum.IntEnum):
    """The least precision MatMulNBits may compute the float input in (ONNX Runtime's ``accuracy_level``)."""

    UNSET = 0
    FLOAT32 = 1
    FLOAT16 = 2
    BFLOAT16 = 3
    INT8 = 4  # the input is quantized to int8 per block: fastest on CPU, least accurate


_WEIGHT_FORMATS = (INT4, UINT4)


@dataclass(frozen=True, kw_only=True)
class Int4WeightConfig:
    """Int4 weight-only quantization of MatMul/Gemm weights.

    ``granularity``: blocks of ``size`` values along K (a power of two >= 16).
    ``weight_format``: ``INT4`` (symmetric, no zero points) or ``UINT4``
    (asymmetric, per-block zero points). ``accuracy_level``: written to
    MatMulNBits when set; None leaves ONNX Runtime's default (float input
    not downcast). ``exclude``: node names or op types to leave float.
    """

    granularity: PerBlock = PerBlock(size=32)
    weight_format: Format = INT4
    accuracy_level: AccuracyLevel | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.granularity, PerBlock):
            raise ConfigError(f"granularity of int4 must be PerBlock(size=...), got {self.granularity!r}")
        if self.weight_format not in _WEIGHT_FORMATS:
            raise ConfigError(f"weight_format of int4 must be int4 or uint4, got {self.weight_format!r}")
        if self.accuracy_level is not None and not isinstance(self.accuracy_level, AccuracyLevel):
            allowed = ", ".join(f"AccuracyLevel.{m.name}" for m in AccuracyLevel)
            raise ConfigError(f"accuracy_level must be None or one of {allowed}, got {self.accuracy_level!r}")
        if isinstance(self.exclude, str) or not all(isinstance(n, str) and n for n in self.exclude):
            raise ConfigError(f"exclude must be a tuple of node names or op types, got {self.exclude!r}")

    @property
    def block_size(self) -> int:
        return self.granularity.size


# ---------------------------------------------------------------------------
# nibbles: the one packer
# ---------------------------------------------------------------------------


def _require_nibble_format(fmt: Format) -> None:
    if fmt.bits != 4:
        raise ValueError(f"pack_nibbles packs 4-bit formats, not {fmt.name}")


def pack_nibbles(values: np.ndarray, fmt: Format) -> np.ndarray:
    """Pack 4-bit integers two per byte along the last axis, the first in the low nibble.

    ``values`` hold ``fmt``'s integers (int4: -8..7 in two's complement,
    uint4: 0..15); an odd last axis is padded with a 0 nibble. This is the
    layout of ONNX INT4/UINT4 tensors (flattened) and of MatMulNBits blobs.
    """
    _require_nibble_format(fmt)
    values = np.asarray(values)
    if values.size and (values.min() < fmt.qmin or values.max() > fmt.qmax):
        raise ValueError(f"values outside the {fmt.name} range [{fmt.qmin}, {fmt.qmax}]")
    nibbles = values.astype(np.uint8) & 0x0F  # two's complement low bits for int4
    if nibbles.shape[-1] % 2:
        nibbles = np.concatenate([nibbles, np.zeros((*nibbles.shape[:-1], 1), np.uint8)], axis=-1)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_nibbles(packed: np.ndarray, count: int, fmt: Format) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: ``count`` values per row, as ``fmt.numpy_dtype``."""
    _require_nibble_format(fmt)
    packed = np.asarray(packed, dtype=np.uint8)
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)[..., :count]
    if fmt.qmin < 0:  # sign-extend: 8..15 mean -8..-1
        return (nibbles.astype(np.int8) ^ 0x08) - 0x08
    return nibbles.astype(fmt.numpy_dtype)


# ---------------------------------------------------------------------------
# block quantization (the reference) and the MatMulNBits encoding
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BlockQuantizedWeight:
    """``q`` like the weight ``[..., K, N]``; scale and zero point ``[..., ceil(K / b), N]``.

    This is ONNX blocked quantization along axis ``ndim - 2``.
    """

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    block_size: int
    format: Format

    @property
    def axis(self) -> int:
        return self.q.ndim - 2

    def dequantize(self) -> np.ndarray:
        """The reference: ``(q - zero_point) * scale`` in float32."""
        return dequantize(self.q, self.scale, self.zero_point, axis=self.axis, block_size=self.block_size)


def _pad_rows(weight: np.ndarray, block_size: int, fill) -> np.ndarray:
    """Pad axis -2 to a multiple of ``block_size`` with ``fill`` (broadcast per block row)."""
    k = weight.shape[-2]
    extra = -k % block_size
    if not extra:
        return weight
    pad = np.broadcast_to(np.asarray(fill, dtype=weight.dtype), (*weight.shape[:-2], extra, weight.shape[-1]))
    return np.concatenate([weight, pad], axis=-2)


def quantize_blocks(weight: np.ndarray, block_size: int, fmt: Format) -> BlockQuantizedWeight:
    """Min/max block quantization of ``weight [..., K, N]`` along K into ``fmt``."""
    weight = np.asarray(weight, dtype=np.float32)
    padded = _pad_rows(weight, block_size, 0.0)
    blocks = padded.reshape(*padded.shape[:-2], -1, block_size, padded.shape[-1])
    scale, zero_point = choose_qparams(blocks.min(axis=-2), blocks.max(axis=-2), fmt)
    zero_point = zero_point.astype(fmt.numpy_dtype)
    q = quantize(weight, scale, zero_point, fmt, axis=weight.ndim - 2, block_size=block_size)
    return BlockQuantizedWeight(q=q, scale=scale, zero_point=zero_point, block_size=block_size, format=fmt)


@dataclass(frozen=True, kw_only=True)
class MatMulNBitsWeight:
    """The constant inputs of a 4-bit MatMulNBits: B, scales and (uint4) zero points."""

    packed: np.ndarray  # uint8 [N, n_blocks, block_size / 2]
    scales: np.ndarray  # float32 [N * n_blocks]
    zero_points: np.ndarray | None  # uint8 [N * ceil(n_blocks / 2)], None: the op's default 8
    k: int
    n: int
    block_size: int


def encode_matmul_nbits(weight: BlockQuantizedWeight) -> MatMulNBitsWeight:
    """Lay out a 2-D block-quantized weight ``[K, N]`` the way MatMulNBits reads it."""
    if weight.q.ndim != 2:
        raise ValueError(f"MatMulNBits takes a 2-D weight, got shape {weight.q.shape}")
    k, n = weight.q.shape
    symmetric = weight.format.symmetric
    # MatMulNBits codes are unsigned; int4's q in [-8, 7] is stored as q + 8, its default zero point.
    codes = weight.q.astype(np.int16) + (8 if symmetric else 0)
    padding = 8 if symmetric else weight.zero_point[-1:]  # padded rows dequantize to 0
    codes = _pad_rows(codes, weight.block_size, padding)  # [K_padded, N]
    n_blocks = codes.shape[0] // weight.block_size
    per_column = codes.T.reshape(n, n_blocks, weight.block_size)
    packed = pack_nibbles(per_column, UINT4)
    scales = np.ascontiguousarray(weight.scale.T).reshape(-1).astype(np.float32)
    zero_points = None if symmetric else pack_nibbles(weight.zero_point.T, UINT4).reshape(-1)
    return MatMulNBitsWeight(packed=packed, scales=scales, zero_points=zero_points, k=k, n=n,
                             block_size=weight.block_size)


def decode_matmul_nbits(encoded: MatMulNBitsWeight) -> np.ndarray:
    """What MatMulNBits computes with: ``(code - zero_point) * scale`` as float32 ``[K, N]``."""
    n, n_blocks, block_size = encoded.n, encoded.packed.shape[1], encoded.block_size
    codes = unpack_nibbles(encoded.packed, block_size, UINT4).astype(np.int64)  # [N, n_blocks, b]
    if encoded.zero_points is None:
        zero_points = np.full((n, n_blocks), 8, dtype=np.int64)
    else:
        zero_points = unpack_nibbles(encoded.zero_points.reshape(n, -1), n_blocks, UINT4).astype(np.int64)
    scales = encoded.scales.reshape(n, n_blocks, 1)
    values = (codes - zero_points[..., None]).astype(np.float32) * scales
    return values.reshape(n, n_blocks * block_size)[:, :encoded.k].T

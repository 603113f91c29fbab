"""Block-wise 4-bit weight quantization, nibble packing and the MatMulNBits encoding.

For a weight ``W`` of shape ``[..., K, N]``, K (the reduction axis) is cut
into blocks of ``b`` rows; each block of each column gets its own scale (and
zero point), by the min/max rule of :mod:`edgeopt.quant.primitives` in the
format of :mod:`edgeopt.quant.formats`:

* ``int4`` (symmetric): ``scale = max|w| / 7``, ``q = clamp(rint(w / scale), -8, 7)``;
* ``uint4`` (asymmetric): the block range widened to include 0,
  ``scale = (max - min) / 15``, ``zero_point = clamp(rint(-min / scale), 0, 15)``;

and ``w' = (q - zero_point) * scale``. For Gaussian weights the symmetric
rule gives a weight SQNR of about 20 dB at b = 32 and 18.5 dB at b = 128
(noise ``(max|w| / 7)**2 / 12`` with a block max of 2.4 and 2.9 sigma).

Nibbles are packed two per byte along the last axis, the first in the low
nibble (int4 in two's complement), in one place, :func:`pack_nibbles`.

ONNX Runtime's ``com.microsoft.MatMulNBits`` (bits = 4) reads a 2-D weight
``[K, N]`` as: B uint8 ``[N, ceil(K / b), b / 2]`` -- column n's codes along
K, two per byte, low nibble first; K is padded to a whole block with codes of
value 0 -- scales float32 ``[N * ceil(K / b)]``; for int4 the code is
``q + 8`` and there are no zero points (MatMulNBits then uses 8); for uint4
the code is ``q`` and zero points are packed the same way, ``[N *
ceil(ceil(K / b) / 2)]``. It computes with ``(code - zero_point) * scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeopt.quant.formats import UINT4, Format
from edgeopt.quant.primitives import choose_qparams, dequantize, quantize

__all__ = [
    "BlockQuantizedWeight",
    "MatMulNBitsWeight",
    "decode_matmul_nbits",
    "encode_matmul_nbits",
    "pack_nibbles",
    "quantize_blocks",
    "unpack_nibbles",
]


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

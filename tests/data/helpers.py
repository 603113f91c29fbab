"""Input specs and files the data tests share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from edgeopt.ir.values import InputSpec

IMAGE = InputSpec(name="input", shape=(1, 3, 8, 8), dtype=np.dtype(np.float32))
VECTOR = InputSpec(name="x", shape=(1, 4), dtype=np.dtype(np.float32))
TOKENS = InputSpec(name="ids", shape=("batch", 5), dtype=np.dtype(np.int64))


def spec(name: str, shape: tuple, dtype=np.float32) -> InputSpec:
    return InputSpec(name=name, shape=shape, dtype=np.dtype(dtype))


def write_png(path: Path, pixels: np.ndarray) -> Path:
    """Save ``H x W x 3`` (or ``H x W``) uint8 pixels losslessly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)
    return path

"""C generated from models quantized by edgeopt itself (MCU target) is bit-exact with the reference.

The demo model and torch-built MobileNet- and ResNet-style networks, each
quantized with ``Int8Config(target=Target.MCU)`` on calibration data, compiled,
built with gcc, run on held-out inputs, and compared tensor by tensor.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgeopt import api
from edgeopt.codegen.c import compile_c, verify
from edgeopt.demo import demo_calibration_path, demo_model_path
from edgeopt.quant import Int8Config, Target
from tests.models import build_onnx

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None,
                                reason="needs gcc and make")


def _smooth_images(count: int, seed: int) -> np.ndarray:
    """Image-like inputs (upsampled noise), [count, 3, 32, 32]."""
    coarse = np.random.default_rng(seed).normal(size=(count, 3, 8, 8)).astype(np.float32)
    return np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3)


def _quantize_compile_verify(float_path, calibration, held_out, tmp_path, rounding="double"):
    quantized = tmp_path / "model.int8.onnx"
    api.quantize(float_path, Int8Config(target=Target.MCU), calibration, output=quantized,
                 check_speed=False, check_fidelity=False)
    compile_c(api.load(quantized), tmp_path / "c", rounding=rounding)
    result = verify(tmp_path / "c", held_out)
    assert result.bit_exact, result.first_mismatch
    assert result.tensors_compared >= 10 * len(held_out)


@pytest.mark.parametrize("rounding", ["double", "single"])
def test_demo_model(tmp_path, rounding):
    held_out = [{"input": x[np.newaxis]} for x in np.load(demo_calibration_path())[-4:]]
    _quantize_compile_verify(demo_model_path(), demo_calibration_path(), held_out, tmp_path, rounding)


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet", pytest.param("mobilenet_v3", marks=pytest.mark.slow)])
def test_torch_architectures(tmp_path, name):
    np.save(tmp_path / "calib.npy", _smooth_images(24, seed=0))
    held_out = [{"input": x[np.newaxis]} for x in _smooth_images(3, seed=1)]
    _quantize_compile_verify(build_onnx(name, tmp_path), tmp_path / "calib.npy", held_out, tmp_path)

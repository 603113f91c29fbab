"""The C ConvTranspose kernel (``eo_conv_transpose2d_s8``, gather form) is bit-exact with the reference.

The reference computes the scatter form. Every geometry of ``qdq_models.CONV_TRANSPOSE_CASES`` (which ONNX
Runtime computes exactly: ``test_reference_conv_transpose.py``) is one branch of one model, built once; the
models ONNX Runtime quantizes are in ``test_c_bit_exact.py`` (both roundings); a U-Net edgeopt quantizes for
the MCU is here.
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

import qdq_models as q
from edgeopt import api
from edgeopt.codegen.c import compile_c, verify
from edgeopt.quant import Int8Config, Target
from edgeopt.runtime.ort import OrtSession
from edgeopt.runtime.reference import OPS, ReferenceModel

logging.getLogger("root").setLevel(logging.ERROR)
pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None,
                                reason="needs gcc and make")


def test_every_conv_transpose_geometry_is_bit_exact_in_c(tmp_path):
    assert OPS["conv_transpose2d"].in_place == ()  # it reads its input across a window: never written over
    model = q.to_ir(q.integer_conv_transposes(list(q.CONV_TRANSPOSE_CASES.values())))
    compile_c(model, tmp_path / "c")
    result = verify(tmp_path / "c", q.integer_feeds())
    assert result.bit_exact, result.first_mismatch
    assert result.tensors_compared == 2 * len(q.CONV_TRANSPOSE_CASES)


def _smooth_images(count: int, seed: int) -> np.ndarray:
    coarse = np.random.default_rng(seed).normal(size=(count, 3, 8, 8)).astype(np.float32)
    return np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3)


def test_a_u_net_with_conv_transpose_upsampling_quantized_for_the_mcu_compiles_bit_exact(tmp_path):
    """Two ConvTranspose2d(k=2, s=2) upsamples and skip Concats: quantized by edgeopt (no float node left),
    compiled, bit-exact with the reference, which is within a step of ONNX Runtime on the same QDQ model."""
    from tests.zoo_models import build_zoo

    np.save(tmp_path / "calib.npy", _smooth_images(8, seed=0))
    quantized = api.quantize(build_zoo("unet_ct", tmp_path, 13), Int8Config(target=Target.MCU),
                             tmp_path / "calib.npy", output=tmp_path / "unet.int8.onnx", check_speed=False,
                             check_fidelity=False)
    assert not quantized.result.float_nodes
    model = api.load(tmp_path / "unet.int8.onnx")
    compile_c(model, tmp_path / "c")
    held_out = [{"input": x[np.newaxis]} for x in _smooth_images(2, seed=1)]
    result = verify(tmp_path / "c", held_out)
    assert result.bit_exact, result.first_mismatch
    reference = ReferenceModel(model)
    assert [op.kind for op in reference.program.ops].count("conv_transpose2d") == 2
    within, _, worst = q.agreement(reference, OrtSession(model), held_out)
    assert within >= 0.999 and worst <= 1, (within, worst)

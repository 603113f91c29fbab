"""The reference interpreter agrees with ONNX Runtime on QDQ models (issue 4: >= 99.9% within 1 LSB).

Where they differ and why:

* ``rounding="single"`` (one rounding of the 64-bit product, CMSIS-NN's
  single-rounding build) is within 1 LSB of ORT everywhere we measured, and
  bit-exact on most models; the remaining 1-LSB cases are ties (ORT rounds
  half to even in float, we round half up in fixed point) and float32
  evaluation of LUT activations / average pools near a rounding boundary.
* ``rounding="double"`` (TFLite's default, gemmlowp) rounds twice: the high
  multiply leaves only ``-shift`` fraction bits, so results within
  ``2**shift`` of a .5 tie round up. When the output multiplier's right
  shift is small (few fraction bits), up to ~1% of a layer's values differ
  by 1 LSB and the differences can compound through depthwise layers to 2-3
  LSB at the output. That is TFLite's behaviour, kept on purpose: the C code
  must match the reference bit for bit, and both variants are offered.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

import qdq_models as q
from edgeopt.runtime.ort import OrtSession
from edgeopt.runtime.reference import ReferenceModel

logging.getLogger("root").setLevel(logging.ERROR)

THRESHOLD = 0.999


@pytest.fixture(scope="module", params=["int8", "uint8"])
def activation(request):
    return request.param


@pytest.mark.parametrize("name", sorted(q.FLOAT_BUILDERS))
def test_small_models_single_rounding_agree_with_ort(name, activation):
    float_model = q.float_model(name)
    model = q.to_ir(q.quantize_with_ort(float_model, activation=activation))
    within, _, worst = q.agreement(ReferenceModel(model, rounding="single"), OrtSession(model),
                                   q.calibration_batches(float_model, 4, seed=11))
    assert within >= THRESHOLD, (within, worst)


@pytest.mark.parametrize("name", sorted(q.FLOAT_BUILDERS))
def test_small_models_double_rounding_close_to_ort(name):
    float_model = q.float_model(name)
    model = q.to_ir(q.quantize_with_ort(float_model))
    within, _, worst = q.agreement(ReferenceModel(model, rounding="double"), OrtSession(model),
                                   q.calibration_batches(float_model, 4, seed=11))
    assert within >= 0.98 and worst <= 3, (within, worst)


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3", "resnet"])
@pytest.mark.parametrize("rounding", ["double", "single"])
def test_torch_architectures_agree_with_ort(name, rounding):
    proto = q.torch_qdq_model(name)
    model = q.to_ir(proto)
    batches = [{"input": np.random.default_rng(s).standard_normal((1, 3, 32, 32)).astype(np.float32)}
               for s in range(6)]
    within, _, worst = q.agreement(ReferenceModel(model, rounding=rounding), OrtSession(model), batches)
    if rounding == "single":
        assert within >= THRESHOLD, (within, worst)
    else:  # double rounding compounds through 15 layers (see the module docstring)
        assert within >= 0.95 and worst <= 3, (within, worst)


def test_uint8_activations_are_shifted_exactly_to_int8():
    float_model = q.float_model("conv_relu")
    model = q.to_ir(q.quantize_with_ort(float_model, activation="uint8"))
    reference = ReferenceModel(model)
    zero_points = {info.zero_point for info in reference.program.tensors.values()}
    assert all(-128 <= zp <= 127 for zp in zero_points)
    batch = q.calibration_batches(float_model, 1)[0]
    ort_out = OrtSession(model).run(batch)["output"]
    assert np.abs(reference.run_float(batch)["output"] - ort_out).max() <= 1.01 * reference.output_info("output").scale

"""ConvTranspose lowers to ``conv_transpose2d``: the integer result is ONNX Runtime's, exactly.

At scale 1 with small integer weights and inputs (``qdq_models.integer_conv_transposes``) ONNX Runtime's
float ConvTranspose computes exact integers, so every stride, pad, dilation, auto_pad, output_padding and
output_shape rule of the ONNX spec (``qdq_models.CONV_TRANSPOSE_CASES``) is checked value for value.
The models ONNX Runtime's quantizer makes (``conv_transpose`` and ``conv_transpose_padding`` in
``FLOAT_BUILDERS``) are in ``test_reference_vs_ort.py`` and ``test_c_bit_exact.py`` with the others.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

import qdq_models as q
from edgeopt.errors import UnsupportedOpError
from edgeopt.runtime.ort import OrtSession
from edgeopt.runtime.reference import ReferenceModel, lower

logging.getLogger("root").setLevel(logging.ERROR)

@pytest.mark.parametrize("case", sorted(q.CONV_TRANSPOSE_CASES))
def test_integer_conv_transpose_is_onnx_runtime_s_exactly(case):
    model = q.to_ir(q.integer_conv_transposes([q.CONV_TRANSPOSE_CASES[case]]))
    reference, session = ReferenceModel(model), OrtSession(model, optimize=False)
    assert [op.kind for op in reference.program.ops] == ["conv_transpose2d"]
    for feed in q.integer_feeds():
        expected = session.run(feed)["y0"]
        assert np.abs(expected).max() < 100  # inside int8: exact, not clamped
        np.testing.assert_array_equal(reference.run_float(feed)["y0"], expected)


def test_a_relu_after_a_conv_transpose_is_its_clamp():
    program = lower(q.to_ir(q.integer_conv_transposes([q.CONV_TRANSPOSE_CASES["relu_without_bias"]])))
    (op,) = program.ops
    assert (op.kind, op.params.act_min, op.params.act_max) == ("conv_transpose2d", 0, 127)
    assert not op.params.bias.any()


def test_mcu_quantization_scales_output_channels_and_the_lowering_reads_them():
    """edgeopt's MCU target quantizes a (group 1) ConvTranspose weight [C_in, C_out, k, k] per axis 1; the
    integer program scales each output channel by its own scale, folds the Relu and the Clip after the
    ConvTransposes into their clamps (no requantize op) and stays within a step of ONNX Runtime."""
    from edgeopt import ir as eir
    from edgeopt.quant import Int8Config, Target, quantize

    float_model = q.float_model("conv_transpose")
    data = q.calibration_batches(float_model, 8)
    model = quantize(q.to_ir(float_model), Int8Config(target=Target.MCU), data).model
    deconvs = [node for node in model.graph if node.op_type == "ConvTranspose"]
    for node in deconvs:
        weight_dq = node.inputs[1].producer()
        assert weight_dq.attributes.get_int("axis", 1) == 1
        assert eir.constant_array(weight_dq.inputs[1]).shape == (eir.static_shape(node.outputs[0])[1],)
    reference = ReferenceModel(model, rounding="single")
    kinds = [op.kind for op in reference.program.ops]
    assert kinds == ["conv2d"] + ["conv_transpose2d"] * 3 == ["conv2d"] + ["conv_transpose2d"] * len(deconvs)
    assert all(len(set(op.params.multiplier)) > 1 for op in reference.program.ops)  # per output channel
    within, _, worst = q.agreement(reference, OrtSession(model), q.calibration_batches(float_model, 3, seed=5))
    assert within >= 0.999 and worst <= 1, (within, worst)


@pytest.mark.parametrize("case, message", [
    (dict(group=2, out_channels=4), r"ConvTranspose \(deconv0\): ConvTranspose with group 2 over 4 input and 4 "
                                    r"output channels is not supported; the C kernel takes 1-D or 2-D "
                                    r"ConvTranspose with group 1 or depthwise \(group = input channels = output "
                                    r"channels\): write it as one ConvTranspose per group, each on a Split of the "
                                    r"input"),
    (dict(strides=[2, 2], auto_pad="SAME_UPPER", output_padding=[1, 1]),
     r"ConvTranspose \(deconv0\): the model records output shape \[1, 4, 11, 9\], the ONNX formula gives "
     r"\[1, 4, 10, 8\] .*give explicit pads"),
])
def test_what_the_kernel_does_not_take_is_refused_in_one_line(case, message):
    model = q.to_ir(q.integer_conv_transposes([case], in_channels=4))
    with pytest.raises(UnsupportedOpError, match=message) as error:
        lower(model)
    refusal = str(error.value).split("; To fix")[0].split(". To fix")[0]
    assert "\n" not in str(error.value) and refusal.count("ConvTranspose (") == 1

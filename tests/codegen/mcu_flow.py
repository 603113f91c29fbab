"""The flow the C tests share: quantize a float model for the microcontroller target, compile it, verify it."""

from __future__ import annotations

from edgeopt import api
from edgeopt.codegen.c import compile_c, verify
from edgeopt.quant import Int8Config, Target


def quantize_for_mcu(float_path, data, output):
    """``(QuantResult, the int8 model loaded back)`` of ``edgeopt quantize --target mcu``, without the fidelity
    and speed checks."""
    report = api.quantize(float_path, Int8Config(target=Target.MCU), data, output=output, check_speed=False,
                          check_fidelity=False)
    return report.result, api.load(output, require_static=False)  # dynamic dims: compile fixes them


def assert_compiles_bit_exact(model, out_dir, held_out, **compile_options):
    """Compile ``model`` to C in ``out_dir`` and check the C against the reference on ``held_out``, every
    intermediate tensor."""
    compile_c(model, out_dir, **compile_options)
    result = verify(out_dir, held_out)
    assert result.bit_exact, result.first_mismatch
    return result

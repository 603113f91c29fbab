"""Conv -> residual Add fusion (``conv2d_add``): same bits as the unfused pair, refused where unsafe."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qdq_models as q
from edgeopt.runtime.reference import IntOp, Program, ProgramIO, ReferenceModel, TensorInfo, lower
from edgeopt.runtime.reference.fixed_point import quantize_multiplier
from edgeopt.runtime.reference.fuse import check, fuse_conv_add
from edgeopt.runtime.reference.program import AddParams, Conv2dParams

_NHWC = (0, 2, 3, 1)


def _tensor(name, shape, scale, zero_point) -> TensorInfo:
    return TensorInfo(name=name, shape=shape, scale=scale, zero_point=zero_point, layout=_NHWC)


def _conv_params(rng, channels: int, kernel: int, zero_points, act_range) -> Conv2dParams:
    pairs = [quantize_multiplier(r) for r in rng.uniform(1e-3, 0.5, channels)]
    return Conv2dParams(
        weight=rng.integers(-127, 128, (channels, kernel, kernel, channels)).astype(np.int8),
        bias=rng.integers(-5000, 5000, channels).astype(np.int32),
        multiplier=np.array([m for m, _ in pairs], np.int32), shift=np.array([s for _, s in pairs], np.int32),
        input_zero_point=zero_points[0], output_zero_point=zero_points[1], strides=(1, 1), dilations=(1, 1),
        pads=(kernel // 2,) * 4, group=1, act_min=act_range[0], act_max=act_range[1])


def _add_params(scales, zero_points, act_range) -> AddParams:
    """As ``lower_add`` folds them: inputs to 2 * max scale with 20 bits of headroom."""
    twice_max = 2.0 * max(scales[0], scales[1])
    (ma, sa), (mb, sb) = (quantize_multiplier(s / twice_max) for s in scales[:2])
    mo, so = quantize_multiplier(twice_max / ((1 << 20) * scales[2]))
    return AddParams(input_zero_points=zero_points[:2], input_multipliers=(ma, mb), input_shifts=(sa, sb),
                     output_multiplier=mo, output_shift=so, output_zero_point=zero_points[2], left_shift=20,
                     act_min=act_range[0], act_max=act_range[1])


def _residual_program(seed: int, conv_first: bool, shape=(1, 5, 6, 4)) -> Program:
    """x -> conv2d -> t; y = add(t, s) (or add(s, t)), random scales, zero points and clamps."""
    rng = np.random.default_rng(seed)
    zero_points = tuple(int(z) for z in rng.integers(-60, 60, 4))  # x, t, s, y
    scales = tuple(float(s) for s in rng.uniform(0.01, 0.2, 3))  # t, s, y
    conv_range = (int(rng.integers(-128, -60)), int(rng.integers(60, 128)))
    add_range = (zero_points[3], 127) if seed % 2 else (-128, 127)  # a fused Relu, or none
    tensors = {name: _tensor(name, shape, scale, zp) for name, scale, zp in
               zip("xtsy", (0.05,) + scales, zero_points)}
    operands = ("t", "s") if conv_first else ("s", "t")
    order = (0, 1, 2) if conv_first else (1, 0, 2)
    add = _add_params([scales[i] for i in order], tuple(zero_points[i + 1] for i in order), add_range)
    ops = (IntOp(kind="conv2d", inputs=("x",), output="t", node="conv",
                 params=_conv_params(rng, shape[3], 3, (zero_points[0], zero_points[1]), conv_range)),
           IntOp(kind="add", inputs=operands, output="y", node="add", params=add))
    inputs = tuple(ProgramIO(name=name, tensor=name, is_float=False) for name in "xs")
    return Program(tensors=tensors, ops=ops, inputs=inputs,
                   outputs=(ProgramIO(name="y", tensor="y", is_float=False),))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), conv_first=st.booleans(), rounding=st.sampled_from(["double", "single"]))
def test_fused_op_equals_the_unfused_pair_bit_for_bit(seed, conv_first, rounding):
    program = _residual_program(seed, conv_first)
    fused = fuse_conv_add(program)
    assert [op.kind for op in fused.ops] == ["conv2d_add"] and fused.ops[0].inputs == ("x", "s")
    assert "t" not in fused.tensors
    rng = np.random.default_rng(seed + 1)
    feed = {name: rng.integers(-128, 128, program.tensors[name].logical_shape).astype(np.int8) for name in "xs"}
    ours = ReferenceModel(fused, rounding=rounding).run(feed)
    assert np.array_equal(ours["y"], ReferenceModel(program, rounding=rounding).run(feed)["y"])


@pytest.mark.parametrize("rounding", ["double", "single"])
def test_residual_model_is_fused_and_every_tensor_is_unchanged(rounding):
    float_model = q.float_model("residual_add")
    model = q.to_ir(q.quantize_with_ort(float_model))
    fused = ReferenceModel(lower(model), rounding=rounding)
    unfused = ReferenceModel(lower(model, fuse=False), rounding=rounding)
    (op,) = [op for op in fused.program.ops if op.kind == "conv2d_add"]
    assert len(fused.program.ops) == len(unfused.program.ops) - 1
    # the fused op is named after both nodes and writes the Add's output tensor
    add = next(o for o in unfused.program.ops if o.kind == "add")
    assert op.output == add.output and op.node.endswith("+" + add.node)
    for scale in (0.3, 1.0, 8.0):
        for batch in q.calibration_batches(float_model, 2, seed=int(scale * 10)):
            feed = {k: v * np.float32(scale) for k, v in batch.items()}
            ours, theirs = fused.trace(feed), unfused.trace(feed)
            for fused_op in fused.program.ops:
                assert np.array_equal(ours[fused_op.output], theirs[fused_op.output]), fused_op.node


def _with_ops(program: Program, *ops: IntOp, outputs=None) -> Program:
    tensors = dict(program.tensors)
    for op in ops:
        tensors.setdefault(op.output, program.tensors["y"])
    return Program(tensors=tensors, ops=program.ops + ops, inputs=program.inputs,
                   outputs=outputs if outputs is not None else program.outputs)


def _reason(program: Program) -> str | None:
    readers: dict[str, int] = {}
    for op in program.ops:
        for name in op.inputs:
            readers[name] = readers.get(name, 0) + 1
    return check(program, program.ops[0], program.ops[1], readers)


def test_fusion_is_refused_with_a_reason():
    program = _residual_program(0, True)
    assert _reason(program) is None
    # the conv output is read again later
    again = IntOp(kind="add", inputs=("t", "y"), output="z", node="add2", params=program.ops[1].params)
    twice = _with_ops(program, again)
    assert "read by other ops" in _reason(twice) and fuse_conv_add(twice).ops[0].kind == "conv2d"
    # the conv output is a model output
    exposed = _with_ops(program, outputs=program.outputs + (ProgramIO(name="t", tensor="t", is_float=False),))
    assert "model output" in _reason(exposed)
    # the shortcut is the conv's own input: y cannot be written over it
    own = Program(tensors=program.tensors, inputs=program.inputs[:1], outputs=program.outputs,
                  ops=(program.ops[0], IntOp(kind="add", inputs=("t", "x"), output="y", node="add",
                                             params=program.ops[1].params)))
    assert "own input" in _reason(own) and fuse_conv_add(own) is own
    # a broadcast operand
    tensors = dict(program.tensors) | {"s": _tensor("s", (1, 1, 1, 4), 0.1, 0)}
    broadcast = Program(tensors=tensors, ops=program.ops, inputs=program.inputs, outputs=program.outputs)
    assert "broadcast" in _reason(broadcast)

"""FuseActivationsPass: spelled-out hardswish, hardsigmoid, LayerNorm, GELU, SiLU become single ops."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn
from torch.nn import functional as F

from edgeopt.passes import PATTERN_KEY, activation_clamp, following_clamp, fuse_activations, is_relu6
from tests.models import tanh_gelu_mlp

from ._helpers import (
    assert_same_outputs,
    computing_ops,
    explain,
    export_torch,
    make_model,
    op_types,
    random_weight,
    weight,
)


# --------------------------------------------------------------------------
# hardswish / hardsigmoid
# --------------------------------------------------------------------------


def _hard_graph(tail, *, opset: int = 17, clip_as_attributes: bool = False):
    """x -> Add(3) -> Clip(0, 6) -> ``tail`` nodes ending in ``y``."""
    clip = (helper.make_node("Clip", ["p"], ["c"], name="clip", min=0.0, max=6.0) if clip_as_attributes
            else helper.make_node("Clip", ["p", "zero", "six"], ["c"], name="clip"))
    nodes = [helper.make_node("Add", ["x", "three"], ["p"], name="add3"), clip, *tail]
    constants = [weight("three", 3.0), weight("six_c", 6.0), weight("sixth", 1 / 6)]
    if not clip_as_attributes:
        constants += [weight("zero", 0.0), weight("six", 6.0)]
    return make_model(nodes, [("x", [2, 4, 5])], [("y", [2, 4, 5])], constants, opset=opset)


HARDSWISH_TAILS = {
    "x*clip/6": [helper.make_node("Mul", ["x", "c"], ["m"], name="mul"),
                 helper.make_node("Div", ["m", "six_c"], ["y"], name="div")],
    "clip*x*(1/6)": [helper.make_node("Mul", ["c", "x"], ["m"], name="mul"),
                     helper.make_node("Mul", ["m", "sixth"], ["y"], name="scale")],
    "(x/6)*clip": [helper.make_node("Div", ["x", "six_c"], ["xs"], name="div"),
                   helper.make_node("Mul", ["xs", "c"], ["y"], name="mul")],
    "x*(clip/6)": [helper.make_node("Div", ["c", "six_c"], ["h"], name="div"),
                   helper.make_node("Mul", ["x", "h"], ["y"], name="mul")],
}


@pytest.mark.parametrize("tail", HARDSWISH_TAILS.values(), ids=HARDSWISH_TAILS.keys())
def test_hardswish_spellings_become_hardswish(tail):
    model = _hard_graph(tail)
    result = fuse_activations(model)
    assert op_types(result.model) == ["HardSwish"]
    assert result.model.graph.outputs[0].name == "y"
    assert_same_outputs(model, result.model)


def test_hardsigmoid_spelling_becomes_hardsigmoid():
    model = _hard_graph([helper.make_node("Div", ["c", "six_c"], ["y"], name="div")])
    result = fuse_activations(model)
    assert op_types(result.model) == ["HardSigmoid"]
    assert_same_outputs(model, result.model)


@pytest.mark.parametrize("tail", HARDSWISH_TAILS.values(), ids=HARDSWISH_TAILS.keys())
def test_below_opset_14_hardswish_becomes_x_times_hardsigmoid(tail):
    # as torch exports hardswish there: left as Add, Clip, Mul, Div, a quantized model rounded x + 3 and
    # x * clip(...) apart and kept the Div float (the microcontroller code could not compile it)
    model = _hard_graph(tail, opset=13)
    result = fuse_activations(model)
    assert op_types(result.model) == ["HardSigmoid", "Mul"]
    assert "HardSwish needs opset >= 14 (model has 13)" in explain(result)[0]
    assert result.model.graph.outputs[0].name == "y"
    assert_same_outputs(model, result.model)


def test_opset_10_clip_attributes_still_give_hardsigmoid_and_keep_the_mul():
    model = _hard_graph(HARDSWISH_TAILS["x*(clip/6)"], opset=10, clip_as_attributes=True)
    result = fuse_activations(model)
    assert op_types(result.model) == ["HardSigmoid", "Mul"]
    assert "HardSwish needs opset >= 14 (model has 10)" in explain(result)[0]
    assert_same_outputs(model, result.model)


def test_wrong_clip_bounds_are_reported():
    model = _hard_graph(HARDSWISH_TAILS["x*clip/6"])
    model.graph.initializers["six"].const_value = ir.tensor(np.array(5.0, np.float32))
    assert explain(fuse_activations(model)) == ["add3 + clip: not fused: Clip bounds are (0.0, 5.0), not (0, 6)"]


class ManualHardswish(nn.Module):
    def forward(self, x):
        return x * F.relu6(x + 3) / 6


class HardswishViaHardsigmoid(nn.Module):
    def forward(self, x):
        return x * F.hardsigmoid(x)


@pytest.mark.parametrize("module", [ManualHardswish(), HardswishViaHardsigmoid()], ids=["relu6", "hardsigmoid"])
def test_torch_hardswish_spellings(tmp_path, module):
    model = export_torch(module, (1, 4, 6, 6), tmp_path)
    result = fuse_activations(model)
    assert computing_ops(result.model) == ["HardSwish"]
    assert_same_outputs(model, result.model)


def test_squeeze_excite_gate_is_not_hardswish():
    nodes = [helper.make_node("HardSigmoid", ["g"], ["h"], name="gate", alpha=1 / 6, beta=0.5),
             helper.make_node("Mul", ["x", "h"], ["y"], name="scale")]
    model = make_model(nodes, [("x", [1, 4, 3, 3]), ("g", [1, 4, 1, 1])], [("y", [1, 4, 3, 3])])
    result = fuse_activations(model)
    assert not result.modified and op_types(result.model) == ["HardSigmoid", "Mul"]


# --------------------------------------------------------------------------
# LayerNorm
# --------------------------------------------------------------------------


class ManualLayerNorm(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.beta = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return self.gamma * ((x - mean) / torch.sqrt(var + 1e-5)) + self.beta


def test_torch_manual_layer_norm_becomes_layer_normalization(tmp_path):
    model = export_torch(ManualLayerNorm(), (2, 5, 8), tmp_path)
    assert "LayerNormalization" not in op_types(model)
    result = fuse_activations(model)
    assert computing_ops(result.model) == ["LayerNormalization"]
    assert_same_outputs(model, result.model)


def _layer_norm_nodes(axes_input: bool, *, with_affine: bool = True):
    reduce = (lambda i, o, n: helper.make_node("ReduceMean", [i, "axes"], [o], name=n)) if axes_input \
        else (lambda i, o, n: helper.make_node("ReduceMean", [i], [o], name=n, axes=[-2, -1]))
    nodes = [reduce("x", "mean", "mean"),
             helper.make_node("Sub", ["x", "mean"], ["d"], name="sub"),
             helper.make_node("Mul", ["d", "d"], ["sq"], name="square"),
             reduce("sq", "var", "var"),
             helper.make_node("Add", ["var", "eps"], ["ve"], name="add_eps"),
             helper.make_node("Sqrt", ["ve"], ["std"], name="sqrt"),
             helper.make_node("Reciprocal", ["std"], ["inv"], name="inv"),
             helper.make_node("Mul", ["d", "inv"], ["n" if with_affine else "y"], name="normalize")]
    if with_affine:
        nodes += [helper.make_node("Mul", ["gamma", "n"], ["g"], name="gamma_mul"),
                  helper.make_node("Add", ["g", "beta"], ["y"], name="beta_add")]
    return nodes


@pytest.mark.parametrize("opset, with_affine", [(17, True), (18, True), (17, False)])
def test_two_axis_layer_norm_with_reciprocal(opset, with_affine):
    constants = [weight("eps", 1e-3), random_weight("gamma", [1, 4, 6], low=0.5, high=1.5),
                 random_weight("beta", [6]), numpy_helper.from_array(np.array([-2, -1], np.int64), "axes")]
    model = make_model(_layer_norm_nodes(opset >= 18, with_affine=with_affine), [("x", [3, 4, 6])],
                       [("y", [3, 4, 6])], constants, opset=opset)
    result = fuse_activations(model)
    assert op_types(result.model) == ["LayerNormalization"]
    node = result.model.graph.node(0)
    assert node.attributes.get_int("axis") == -2
    assert_same_outputs(model, result.model)


@pytest.mark.parametrize("axes, fused", [([-2, -1], True), ([1], False)])
def test_a_layer_norm_computing_x_minus_mean_twice_is_matched(axes, fused):
    # torch's dynamo exporter with optimize=False writes (x - mean) once for the square and once for the
    # division: the rule wanted one Sub with two readers, so ConvNeXt's LayerNorm2d exported so was quantized
    # step by step (29.5 dB where the TorchScript export of the same module reaches 33.3 dB)
    nodes = _layer_norm_nodes(False)
    nodes.insert(2, helper.make_node("Sub", ["x", "mean"], ["d2"], name="sub_again"))
    nodes[-3].input[0] = "d2"  # the normalize Mul reads the second Sub
    for node in (nodes[0], nodes[4]):
        node.attribute[0].ints[:] = axes
    gamma_shape = [1, 4, 6] if fused else [4, 1]
    constants = [weight("eps", 1e-3), random_weight("gamma", gamma_shape, low=0.5, high=1.5),
                 random_weight("beta", [6] if fused else [4, 1])]
    model = make_model(nodes, [("x", [3, 4, 6])], [("y", [3, 4, 6])], constants)
    result = fuse_activations(model)
    if fused:
        assert op_types(result.model) == ["LayerNormalization"]
    else:
        assert {n.metadata_props.get(PATTERN_KEY) for n in result.model.graph} == {"layer_norm"}
    assert explain(result) == []
    assert_same_outputs(model, result.model)


def test_below_opset_17_a_layer_norm_is_annotated_and_its_steps_stay_float_together():
    # No LayerNormalization before opset 17: the group was quantized op by op (Q/DQ between the Div, the
    # gamma Mul and the beta Add): a transformer exported at opset 14 lost 1.7 dB against its opset-17 twin
    from edgeopt.quant.api import quantize
    from edgeopt.quant.config import Int8Config

    constants = [weight("eps", 1e-3), random_weight("gamma", [1, 4, 6], low=0.5, high=1.5),
                 random_weight("beta", [6]), numpy_helper.from_array(np.array([-2, -1], np.int64), "axes")]
    model = make_model(_layer_norm_nodes(False), [("x", [3, 4, 6])], [("y", [3, 4, 6])], constants, opset=14)
    result = fuse_activations(model)
    assert op_types(result.model) == op_types(model)
    assert {n.metadata_props.get(PATTERN_KEY) for n in result.model.graph} == {"layer_norm"}
    assert explain(result) == []  # marked, not refused: nothing left to explain
    data = [{"x": np.random.default_rng(i).standard_normal((3, 4, 6)).astype(np.float32)} for i in range(4)]
    quantized = quantize(model, Int8Config(), data)
    assert "QuantizeLinear" not in op_types(quantized.model)
    reasons = {f.node_name: f.reason for f in quantized.float_nodes}
    assert len(reasons) == 10  # every step; those with an integer kernel say why they stay float anyway
    for name in ("square", "add_eps", "normalize", "gamma_mul", "beta_add"):
        assert reasons[name] == "part of a spelled-out layer_norm (kept as one float op)"


@pytest.mark.parametrize("gamma_shape, absorbed", [([4, 1], True), ([1, 6], False)])
def test_layer_norm_over_a_leading_axis_is_annotated_and_stays_float_together(gamma_shape, absorbed):
    # ConvNeXt's channels-first LayerNorm (x.mean(1) of NCHW): no LayerNormalization normalizes a leading
    # axis, so it was refused and quantized step by step (its variance, quotient, gamma and beta rounded to
    # 8 bits each). Marked as one float op, it reads one Q/DQ and writes one; a gamma varying along a kept
    # axis is no per-channel affine and stays out of the group
    from edgeopt.quant.api import quantize
    from edgeopt.quant.config import Int8Config

    nodes = _layer_norm_nodes(False)
    for node in (nodes[0], nodes[3]):
        node.attribute[0].ints[:] = [1]
    model = make_model(nodes, [("x", [3, 4, 6])], [("y", [3, 4, 6])],
                       [weight("eps", 1e-3), random_weight("gamma", gamma_shape, low=0.5, high=1.5),
                        random_weight("beta", [4, 1])])
    result = fuse_activations(model)
    assert op_types(result.model) == op_types(model) and explain(result) == []
    marked = {n.name for n in result.model.graph if n.metadata_props.get(PATTERN_KEY) == "layer_norm"}
    steps = {"mean", "sub", "square", "var", "add_eps", "sqrt", "inv", "normalize"}
    assert marked == (steps | {"gamma_mul", "beta_add"} if absorbed else steps)
    assert_same_outputs(model, result.model)
    data = [{"x": np.random.default_rng(i).standard_normal((3, 4, 6)).astype(np.float32)} for i in range(4)]
    reasons = {f.node_name: f.reason for f in quantize(model, Int8Config(), data).float_nodes}
    assert all(reasons[name] == "part of a spelled-out layer_norm (kept as one float op)" for name in marked)


def test_a_convnext_channels_first_layer_norm_is_one_float_op(tmp_path):
    """The original ConvNeXt's LayerNorm2d (mean/var over dim 1, ``weight[:, None, None] * x + bias``): one
    float group between int8 layers; quantized step by step the output lost 5.8 dB here (26.3 against 32.2 dB)."""
    from edgeopt import api
    from edgeopt.metrics import sqnr_db
    from edgeopt.quant import Int8Config
    from edgeopt.runtime.ort import OrtSession
    from tests.zoo_models import build_zoo

    path = build_zoo("convnext", tmp_path, 13)
    images = [np.repeat(np.repeat(np.random.default_rng(s).normal(size=(1, 3, 8, 8)), 4, 2), 4, 3).astype(np.float32)
              for s in range(32)]
    report = api.quantize(path, Int8Config(), [{"input": x} for x in images[:16]], output=tmp_path / "q.onnx",
                          check_speed=False, check_fidelity=False)
    reasons = {f.node_name: f.reason for f in report.result.float_nodes}
    for block in ("/stem/stem.1/", "/down/down.0/"):
        group = [name for name in reasons if name.startswith(block)]
        assert len(group) == 9 and {reasons[name] for name in group} == {
            "part of a spelled-out layer_norm (kept as one float op)"}
    float_session, quant_session = OrtSession(api.load(path)), OrtSession(api.load(tmp_path / "q.onnx"))
    ours = [quant_session.run({"input": x})["output"] for x in images[16:]]
    reference = [float_session.run({"input": x})["output"] for x in images[16:]]
    assert sqnr_db(np.concatenate(reference), np.concatenate(ours)) > 30.0


# --------------------------------------------------------------------------
# GELU and SiLU
# --------------------------------------------------------------------------


class ManualGelu(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


@pytest.mark.parametrize("module", [ManualGelu(), nn.GELU()], ids=["manual", "nn.GELU"])
def test_torch_gelu_is_annotated_below_opset_20_and_fused_from_20(tmp_path, module):
    model = export_torch(module, (2, 16), tmp_path, opset=17)
    result = fuse_activations(model)
    assert "Erf" in computing_ops(result.model)
    assert {n.metadata_props.get(PATTERN_KEY) for n in result.model.graph if n.op_type != "Constant"} == {"gelu"}
    assert result.report.applied[0].message == "annotated as gelu (Gelu needs opset >= 20, model has 17)"
    assert_same_outputs(model, result.model)

    model = export_torch(ManualGelu(), (2, 16), tmp_path, opset=20)
    result = fuse_activations(model)
    assert computing_ops(result.model) == ["Gelu"]
    assert_same_outputs(model, result.model)


def test_gelu_with_mul_by_inverse_sqrt2():
    nodes = [helper.make_node("Mul", ["x", "inv_sqrt2"], ["s"], name="scale"),
             helper.make_node("Erf", ["s"], ["e"], name="erf"),
             helper.make_node("Add", ["one", "e"], ["p"], name="plus_one"),
             helper.make_node("Mul", ["p", "half"], ["h"], name="half_mul"),
             helper.make_node("Mul", ["h", "x"], ["y"], name="x_mul")]
    model = make_model(nodes, [("x", [2, 8])], [("y", [2, 8])],
                       [weight("inv_sqrt2", 0.7071), weight("one", 1.0), weight("half", 0.5)], opset=20)
    result = fuse_activations(model)
    assert op_types(result.model) == ["Gelu"]
    assert_same_outputs(model, result.model, atol=1e-4)


def test_torch_silu_is_annotated_and_still_runs(tmp_path):
    class Silu(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    model = export_torch(Silu(), (2, 8), tmp_path)
    result = fuse_activations(model)
    assert computing_ops(result.model) == ["Sigmoid", "Mul"]
    assert [n.metadata_props.get(PATTERN_KEY) for n in result.model.graph] == ["silu", "silu"]
    assert_same_outputs(model, result.model)
    assert not fuse_activations(result.model).modified  # annotating twice is not a change


def test_silu_becomes_swish_from_opset_24():
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"], name="sigmoid"),
             helper.make_node("Mul", ["x", "s"], ["y"], name="mul")]
    model = make_model(nodes, [("x", [2, 8])], [("y", [2, 8])], opset=24)
    result = fuse_activations(model)
    assert op_types(result.model) == ["Swish"]
    assert_same_outputs(model, result.model)


# --------------------------------------------------------------------------
# clamps for the quantizer
# --------------------------------------------------------------------------


def test_activation_clamp_reads_relu_and_constant_clips():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[1, 1]),
             helper.make_node("Clip", ["c", "zero", "six"], ["r6"], name="relu6"),
             helper.make_node("Relu", ["r6"], ["r"], name="relu"),
             helper.make_node("Clip", ["r", "", "six"], ["upper"], name="upper_only"),
             helper.make_node("Clip", ["upper", "x_min"], ["y"], name="computed")]
    model = make_model(nodes, [("x", [1, 2, 2, 2]), ("x_min", [])], [("y", [1, 2, 2, 2])],
                       [random_weight("w", [2, 2, 1, 1]), weight("zero", 0.0), weight("six", 6.0)])
    conv, relu6, relu, upper, computed = model.graph
    assert activation_clamp(relu6) == (0.0, 6.0) and is_relu6(relu6)
    assert activation_clamp(relu) == (0.0, math.inf)
    assert activation_clamp(upper) == (-math.inf, 6.0)
    assert activation_clamp(computed) is None and activation_clamp(conv) is None
    assert following_clamp(conv) == (relu6, (0.0, 6.0))

    legacy = make_model([helper.make_node("Clip", ["x"], ["y"], name="clip", min=-1.0, max=1.0)],
                        [("x", [2])], [("y", [2])], opset=10)
    assert activation_clamp(legacy.graph.node(0)) == (-1.0, 1.0)


# --------------------------------------------------------------------------
# clamps written as Min/Max of constants (TensorFlow's minimum/maximum, torch.maximum)
# --------------------------------------------------------------------------


def _minmax_graph(nodes, *, opset: int = 17):
    constants = [weight("zero", 0.0), weight("six", 6.0), weight("low", -1.5), weight("high", 2.5)]
    return make_model(nodes, [("x", [2, 4, 5])], [("y", [2, 4, 5])], constants, opset=opset)


MINMAX_CLAMPS = {
    "min(max(x,0),6)": ([helper.make_node("Max", ["x", "zero"], ["m"], name="max"),
                        helper.make_node("Min", ["m", "six"], ["y"], name="min")], "Clip", (0.0, 6.0)),
    "max(min(6,x),0)": ([helper.make_node("Min", ["six", "x"], ["m"], name="min"),
                        helper.make_node("Max", ["zero", "m"], ["y"], name="max")], "Clip", (0.0, 6.0)),
    "max(x,0)": ([helper.make_node("Max", ["x", "zero"], ["y"], name="max")], "Relu", (0.0, math.inf)),
    "min(x,2.5)": ([helper.make_node("Min", ["x", "high"], ["y"], name="min")], "Clip", (-math.inf, 2.5)),
    "min(max(x,-1.5),2.5)": ([helper.make_node("Max", ["x", "low"], ["m"], name="max"),
                             helper.make_node("Min", ["m", "high"], ["y"], name="min")], "Clip", (-1.5, 2.5)),
}


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("case", MINMAX_CLAMPS.values(), ids=MINMAX_CLAMPS.keys())
def test_min_max_clamps_of_constants_become_one_clip_or_relu(case, opset):
    nodes, op_type, bounds = case
    model = _minmax_graph(nodes, opset=opset)
    result = fuse_activations(model)
    assert computing_ops(result.model) == [op_type]
    assert activation_clamp(next(iter(result.model.graph))) == bounds
    assert_same_outputs(model, result.model)


def test_min_max_that_are_not_one_clamp_are_not_merged():
    # bounds the wrong way round: max(min(x, -1.5), 2.5) is 2.5 everywhere, not Clip(x, 2.5, -1.5);
    # each stays a clamp of its own. Two tensors: no clamp. A second reader: one op each.
    crossed = _minmax_graph([helper.make_node("Min", ["x", "low"], ["m"], name="min"),
                             helper.make_node("Max", ["m", "high"], ["y"], name="max")])
    result = fuse_activations(crossed)
    assert computing_ops(result.model) == ["Clip", "Clip"]
    assert_same_outputs(crossed, result.model)
    two_tensors = make_model([helper.make_node("Max", ["x", "z"], ["y"], name="max")],
                             [("x", [2, 3]), ("z", [2, 3])], [("y", [2, 3])])
    assert computing_ops(fuse_activations(two_tensors).model) == ["Max"]
    shared = make_model([helper.make_node("Max", ["x", "zero"], ["m"], name="max"),
                         helper.make_node("Min", ["m", "six"], ["y"], name="min")],
                        [("x", [2, 3])], [("y", [2, 3]), ("m", [2, 3])], [weight("zero", 0.0), weight("six", 6.0)])
    fused = fuse_activations(shared).model
    assert computing_ops(fused) == ["Relu", "Clip"]  # Max's output is read twice: each becomes its own op
    assert_same_outputs(shared, fused)


def _run(model: ir.Model, feed: dict) -> np.ndarray:
    from edgeopt.runtime.ort import OrtSession

    return OrtSession(model, optimize=False).run(feed)["y"]


@pytest.mark.parametrize("opset", [10, 17])
@pytest.mark.parametrize("op_type", ["Min", "Max"])
def test_a_one_sided_min_max_clamp_passes_inf_through_as_min_max_does(op_type, opset):
    # Clip's omitted bound is the type's largest finite number: Max(x, -1.5) keeps an inf, a Clip with
    # no max turns it into FLT_MAX
    model = _minmax_graph([helper.make_node(op_type, ["x", "low"], ["y"], name="clamp")], opset=opset)
    result = fuse_activations(model)
    assert computing_ops(result.model) == ["Clip"]
    x = np.resize(np.array([np.inf, -np.inf, np.nan, 0.0, -3.0, 3.0], np.float32), (2, 4, 5))
    np.testing.assert_array_equal(_run(result.model, {"x": x}), _run(model, {"x": x}))


def test_min_max_clamps_that_onnx_runtime_or_the_shapes_would_not_keep_are_left():
    # a float64 clamp below opset 11 (ONNX Runtime has no float64 Clip-6); a bound of shape [1] on an
    # operand of unknown rank (a scalar x gives Max(x, [c]) shape [1], Clip(x, c) shape [])
    double = helper.make_graph([helper.make_node("Max", ["x", "low"], ["y"], name="max")], "g",
                               [helper.make_tensor_value_info("x", 11, [2, 3])],
                               [helper.make_tensor_value_info("y", 11, [2, 3])],
                               [numpy_helper.from_array(np.array(-1.5), "low")])
    model = ir.from_proto(helper.make_model(double, opset_imports=[helper.make_opsetid("", 10)], ir_version=8))
    assert computing_ops(fuse_activations(model).model) == ["Max"]
    unknown = helper.make_graph([helper.make_node("Max", ["x", "low"], ["y"], name="max")], "g",
                                [helper.make_tensor_value_info("x", 1, None)],
                                [helper.make_tensor_value_info("y", 1, None)],
                                [numpy_helper.from_array(np.array([-1.5], np.float32), "low")])
    model = ir.from_proto(helper.make_model(unknown, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    assert computing_ops(fuse_activations(model).model) == ["Max"]


def test_a_conv_clamped_by_min_max_quantizes_with_the_clamp_as_its_output_range():
    from edgeopt.quant.api import quantize
    from edgeopt.quant.config import Int8Config, Target

    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Max", ["c", "zero"], ["m"], name="max"),
             helper.make_node("Min", ["m", "six"], ["y"], name="min")]
    model = make_model(nodes, [("x", [1, 3, 6, 6])], [("y", [1, 4, 6, 6])],
                       [random_weight("w", (4, 3, 3, 3)), weight("zero", 0.0), weight("six", 6.0)])
    data = [{"x": np.random.default_rng(i).standard_normal((1, 3, 6, 6)).astype(np.float32)} for i in range(8)]
    result = quantize(model, Int8Config(target=Target.MCU), data)
    assert not result.float_nodes  # the Clip is the conv's fused output clamp: Conv -> Clip -> Q
    assert "Max" not in op_types(result.model) and "Min" not in op_types(result.model)


@pytest.mark.parametrize("opset", [17, 18])
def test_torch_tanh_gelu_is_annotated_below_opset_20(tmp_path, opset):
    model = export_torch(tanh_gelu_mlp(), (2, 5, 16), tmp_path, opset=opset)
    result = fuse_activations(model)
    annotated = [n.op_type for n in result.model.graph if n.metadata_props.get(PATTERN_KEY) == "gelu_tanh"]
    assert sorted(annotated) == ["Add", "Add", "Mul", "Mul", "Mul", "Mul", "Mul", "Mul", "Tanh"]
    assert result.report.applied[0].message == f"annotated as gelu_tanh (Gelu needs opset >= 20, model has {opset})"
    assert_same_outputs(model, result.model)
    assert not fuse_activations(result.model).modified


def _tanh_gelu_nodes(cubic: float = 0.044715, *, pow_cube: bool):
    """Hugging Face's gelu_new (x**3 as Pow, constants first) or torch's spelling (x * (x * x), constants last)."""
    cube = ([helper.make_node("Pow", ["x", "three"], ["cube"], name="cube")] if pow_cube else
            [helper.make_node("Mul", ["x", "x"], ["square"], name="square"),
             helper.make_node("Mul", ["x", "square"], ["cube"], name="cube")])
    constants = [weight("three", 3.0), weight("cubic", cubic), weight("outer", math.sqrt(2 / math.pi)),
                 weight("one", 1.0), weight("half", 0.5)]
    nodes = [*cube,
             helper.make_node("Mul", ["cubic", "cube"] if pow_cube else ["cube", "cubic"], ["term"], name="term"),
             helper.make_node("Add", ["x", "term"] if pow_cube else ["term", "x"], ["inner"], name="inner"),
             helper.make_node("Mul", ["outer", "inner"] if pow_cube else ["inner", "outer"], ["t"], name="scale"),
             helper.make_node("Tanh", ["t"], ["tanh"], name="tanh"),
             helper.make_node("Add", ["one", "tanh"] if pow_cube else ["tanh", "one"], ["p"], name="plus_one"),
             helper.make_node("Mul", ["half", "x"], ["hx"], name="half_x"),
             helper.make_node("Mul", ["hx", "p"], ["y"], name="product")]
    return nodes, constants


@pytest.mark.parametrize("pow_cube", [True, False], ids=["Pow", "Mul"])
def test_tanh_gelu_becomes_gelu_tanh_from_opset_20(pow_cube):
    nodes, constants = _tanh_gelu_nodes(pow_cube=pow_cube)
    model = make_model(nodes, [("x", [2, 64])], [("y", [2, 64])], constants, opset=20)
    result = fuse_activations(model)
    [gelu] = result.model.graph
    assert gelu.op_type == "Gelu" and gelu.attributes.get_string("approximate") == "tanh"
    assert explain(result) == [] and result.report.applied[0].message == "fused into Gelu (approximate='tanh')"
    assert_same_outputs(model, result.model)  # ONNX Runtime's Gelu(tanh) against the written-out float ops


def test_a_tanh_gelu_with_another_cubic_coefficient_is_not_fused():
    nodes, constants = _tanh_gelu_nodes(0.05, pow_cube=True)
    model = make_model(nodes, [("x", [2, 64])], [("y", [2, 64])], constants, opset=20)
    result = fuse_activations(model)
    assert "Gelu" not in op_types(result.model) and not result.modified
    assert not any(PATTERN_KEY in n.metadata_props for n in result.model.graph)
    [line] = explain(result)
    assert line.endswith("not fused: the cube is scaled by 0.05, not 0.044715: not GELU")

"""The default pipeline and the contract every pass meets."""

from __future__ import annotations

import inspect

import pytest
from onnx import helper

import edgeopt.passes as passes
from edgeopt.io import load_model
from edgeopt.passes import ALL_PASSES, activation_clamp, optimize_for_quantization
from tests.models import build_onnx

from ._helpers import assert_same_outputs, batchnorm_params, make_model, op_types, random_weight, snapshot


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    """MobileNetV3-like torch export: Conv+BN, hardswish, SE with hardsigmoid gates, residuals."""
    return load_model(build_onnx("mobilenet_v3", tmp_path_factory.mktemp("models"), opset=17))


@pytest.mark.parametrize("pass_class", ALL_PASSES, ids=lambda c: c.__name__)
def test_every_pass_meets_the_contract(pass_class, mobilenet):
    assert pass_class.__name__.endswith("Pass")
    assert isinstance(pass_class.name, str) and pass_class.name
    doc = inspect.getdoc(pass_class)
    assert doc and "Rewrites" in doc and "Preconditions" in doc
    facade = getattr(passes, pass_class.__module__.rsplit(".", 1)[1])
    assert callable(facade) and inspect.getdoc(facade)

    before = snapshot(mobilenet)
    result = facade(mobilenet)
    assert snapshot(mobilenet) == before, "the facade must not mutate its input"
    assert result.model is not mobilenet
    assert result.report.name == pass_class.name and result.report.modified == result.modified
    assert_same_outputs(mobilenet, result.model)
    again = facade(result.model)
    assert not again.modified, "a second run has nothing left to do"


def test_pipeline_on_mobilenet_folds_batchnorm_and_keeps_outputs(mobilenet):
    before = snapshot(mobilenet)
    result = optimize_for_quantization(mobilenet)
    assert snapshot(mobilenet) == before
    ops = op_types(result.model)
    assert "BatchNormalization" not in ops and "Constant" not in ops
    assert ops.count("HardSwish") == 7 and "HardSigmoid" not in ops
    gates = [n for n in result.model.graph if n.op_type == "Clip" and activation_clamp(n) == (0.0, 1.0)]
    assert len(gates) == 3  # SE gates stay gates (not HardSwish), folded into their convs as [0, 1] clamps
    assert [r.name for r in result.reports] == [
        "fold-constants", "eliminate-dead-code", "split-sequence", "fold-pad", "fold-batchnorm", "fold-affine",
        "fuse-matmul-add", "fuse-activations", "canonicalize", "eliminate-dead-code"]
    assert result.modified
    assert_same_outputs(mobilenet, result.model)
    assert not optimize_for_quantization(result.model).modified


def test_explain_names_the_nodes_and_the_reason():
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="Conv_12", kernel_shape=[1, 1])
    bn = helper.make_node("BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["y"],
                          name="BatchNormalization_13")
    relu = helper.make_node("Relu", ["c"], ["z"], name="Relu_14")
    model = make_model([conv, bn, relu], [("x", [1, 4, 3, 3])], [("y", [1, 8, 3, 3]), ("z", [1, 8, 3, 3])],
                       [random_weight("w", [8, 4, 1, 1]), *batchnorm_params("bn", 8)])
    result = optimize_for_quantization(model)
    assert result.explain() == [
        "fold-batchnorm: Conv_12 + BatchNormalization_13: not folded: Conv output has 2 consumers"]
    assert "fold-batchnorm: Conv_12 + BatchNormalization_13: not folded" in "\n".join(
        result.explain(include_applied=True))
    assert_same_outputs(model, result.model)


def test_pipeline_runs_on_other_real_architectures(tmp_path):
    for name in ("transformer", "unet"):
        model = load_model(build_onnx(name, tmp_path, opset=17))
        result = optimize_for_quantization(model)
        assert "BatchNormalization" not in op_types(result.model)
        assert_same_outputs(model, result.model, atol=1e-4)


def test_an_identity_of_a_weight_reads_the_weight_instead_of_a_copy():
    # torch's exporter writes a shared or tied weight as Identity(W): folding it made a second
    # initializer, so fp16 and int8 files stored the weight twice (a BERT in fp16: 0.76x, not 0.5x)
    import onnx_ir as ir

    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="first"),
             helper.make_node("Identity", ["w"], ["w_again"], name="alias"),
             helper.make_node("MatMul", ["a", "w_again"], ["y"], name="second")]
    model = make_model(nodes, [("x", [1, 8])], [("y", [1, 8])], [random_weight("w", (8, 8))])
    original = ir.from_proto(ir.to_proto(model))
    optimized = optimize_for_quantization(model).model
    assert list(optimized.graph.initializers) == ["w"]
    assert [node.inputs[1].name for node in optimized.graph] == ["w", "w"]
    assert_same_outputs(original, optimized)

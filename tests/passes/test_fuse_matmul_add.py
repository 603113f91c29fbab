"""FuseMatMulAddPass: MatMul + Add(bias) (an exported Linear) becomes one Gemm, float-exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper
from torch import nn

from edgeopt import ir as eir
from edgeopt.io import load_model
from edgeopt.passes import fuse_matmul_add, optimize_for_quantization
from edgeopt.runtime.ort import OrtSession
from tests.models import build_onnx, export_onnx

from ._helpers import assert_same_outputs, batchnorm_params, explain, make_model, op_types, random_weight, weight

RNG = np.random.default_rng(0)
TIGHT = {"atol": 1e-5, "rtol": 1e-5}


def linear(x_shape, *, bias_shape=(6,), bias_first=False, out_shape=None, extra_nodes=(), extra_outputs=()):
    """x -> MatMul(W[5, 6]) -> Add(b) -> y, with ``b`` of ``bias_shape`` (first operand if ``bias_first``)."""
    operands = ["b", "m"] if bias_first else ["m", "b"]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"),
             helper.make_node("Add", operands, ["y"], name="fc_bias"), *extra_nodes]
    out_shape = out_shape or [*x_shape[:-1], 6]
    return make_model(nodes, [("x", x_shape)], [("y", out_shape), *extra_outputs],
                      [random_weight("w", [5, 6]), weight("b", RNG.normal(0, 1, bias_shape))])


def same_outputs_at_batches(original, rewritten, batches, shape):
    """Both models agree on inputs of each batch size (for a dynamic batch dim)."""
    before, after = OrtSession(original, optimize=False), OrtSession(rewritten, optimize=False)
    for batch in batches:
        feed = {"x": RNG.normal(0, 3, (batch, *shape)).astype(np.float32)}
        np.testing.assert_allclose(after.run(feed)["y"], before.run(feed)["y"], **TIGHT)


@pytest.mark.parametrize("bias_shape", [(6,), (1, 6), ()], ids=["vector", "row", "scalar"])
@pytest.mark.parametrize("bias_first", [False, True], ids=["matmul-first", "bias-first"])
def test_two_dimensional_linear_becomes_one_gemm(bias_shape, bias_first):
    model = linear([3, 5], bias_shape=bias_shape, bias_first=bias_first)
    result = fuse_matmul_add(model)
    assert result.modified and op_types(result.model) == ["Gemm"]
    [gemm] = result.model.graph
    assert gemm.name == "fc" and gemm.inputs[1].name == "w"
    assert eir.constant_array(gemm.inputs[2]).shape == (6,)
    assert all(gemm.attributes.get_int(a, 0) == 0 for a in ("transA", "transB"))
    assert result.model.graph.outputs[0].name == "y"
    assert explain(result) == []
    assert_same_outputs(model, result.model, **TIGHT)


@pytest.mark.parametrize("bias_shape", [(6,), (1, 1, 6)], ids=["vector", "rank-3"])
def test_linear_on_a_sequence_runs_as_gemm_on_rows(bias_shape):
    model = linear([2, 4, 5], bias_shape=bias_shape)
    result = fuse_matmul_add(model)
    assert op_types(result.model) == ["Reshape", "Gemm", "Reshape"]
    flatten, _, unflatten = result.model.graph
    assert eir.constant_array(flatten.inputs[1]).tolist() == [-1, 5]
    assert eir.constant_array(unflatten.inputs[1]).tolist() == [-1, 4, 6]  # the batch follows the input
    assert result.model.graph.outputs[0].name == "y"
    assert_same_outputs(model, result.model, **TIGHT)


def test_a_dynamic_batch_is_inferred_and_the_rest_stays_static():
    model = linear(["N", 4, 5])
    result = fuse_matmul_add(model)
    assert op_types(result.model) == ["Reshape", "Gemm", "Reshape"]
    assert eir.constant_array(list(result.model.graph)[-1].inputs[1]).tolist() == [-1, 4, 6]
    same_outputs_at_batches(model, result.model, (1, 3), (4, 5))


def test_two_dynamic_leading_dims_are_refused():
    model = linear(["N", "S", 5])
    result = fuse_matmul_add(model)
    assert not result.modified
    assert explain(result) == ["fc + fc_bias: not fused: 2 leading dims of the MatMul input are dynamic "
                               "(the output Reshape can infer only one)"]


def test_the_add_output_keeps_its_name_inside_the_graph():
    relu = helper.make_node("Relu", ["y"], ["z"], name="relu")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"),
             helper.make_node("Add", ["m", "b"], ["y"], name="fc_bias"), relu]
    model = make_model(nodes, [("x", [2, 4, 5])], [("z", [2, 4, 6])],
                       [random_weight("w", [5, 6]), weight("b", RNG.normal(0, 1, 6))])
    result = fuse_matmul_add(model)
    assert [n.op_type for n in result.model.graph] == ["Reshape", "Gemm", "Reshape", "Relu"]
    assert list(result.model.graph)[-1].inputs[0].name == "y"
    assert_same_outputs(model, result.model, **TIGHT)


def test_linears_reading_one_tensor_share_its_rows():
    nodes, initializers = [], []
    for name in ("q", "k", "v"):
        nodes += [helper.make_node("MatMul", ["x", f"{name}.w"], [f"{name}.m"], name=f"{name}"),
                  helper.make_node("Add", [f"{name}.m", f"{name}.b"], [name], name=f"{name}_bias")]
        initializers += [random_weight(f"{name}.w", [5, 6]), weight(f"{name}.b", RNG.normal(0, 1, 6))]
    model = make_model(nodes, [("x", [1, 4, 5])], [(name, [1, 4, 6]) for name in "qkv"], initializers)
    result = fuse_matmul_add(model)
    assert op_types(result.model).count("Reshape") == 4  # one flattening, three unflattenings
    gemms = [n for n in result.model.graph if n.op_type == "Gemm"]
    assert len({id(g.inputs[0]) for g in gemms}) == 1
    assert [v.name for v in result.model.graph.outputs] == ["q", "k", "v"]
    assert_same_outputs(model, result.model, **TIGHT)


def test_transformer_encoder_linears_all_fuse(tmp_path):
    model = load_model(build_onnx("transformer", tmp_path))
    result = fuse_matmul_add(model)
    ops = op_types(result.model)
    # 13 MatMul Linears + the head (exported as Gemm already); left: q k^T and softmax v.
    assert ops.count("Gemm") == 14 and ops.count("MatMul") == 4
    assert explain(result) == []
    assert_same_outputs(model, result.model, **TIGHT)
    assert not fuse_matmul_add(result.model).modified


def test_torch_transformer_encoder_with_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    path = export_onnx(encoder, (torch.randn(2, 10, 32),), tmp_path / "encoder.onnx", dynamic_batch=True,
                       input_names=["x"], output_names=["y"])
    model = load_model(path, require_static=False)
    result = optimize_for_quantization(model)
    fused = [line for line in result.explain(include_applied=True) if line.startswith("fuse-matmul-add")]
    assert len(fused) == 6 and all("fused into Gemm" in line for line in fused)  # in-proj, linear1, linear2
    same_outputs_at_batches(model, result.model, (1, 3), (10, 32))


def test_batchnorm_after_a_matmul_ends_as_one_gemm():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"),
             helper.make_node("BatchNormalization", ["m", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["y"],
                              name="bn")]
    model = make_model(nodes, [("x", [3, 5])], [("y", [3, 6])],
                       [random_weight("w", [5, 6]), *batchnorm_params("bn", 6)])
    result = optimize_for_quantization(model)
    assert op_types(result.model) == ["Gemm"]
    assert_same_outputs(model, result.model, **TIGHT)


# --------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------


def test_matmul_of_two_activations_is_refused():
    nodes = [helper.make_node("MatMul", ["x", "z"], ["m"], name="fc"),
             helper.make_node("Add", ["m", "b"], ["y"], name="fc_bias")]
    model = make_model(nodes, [("x", [3, 5]), ("z", [5, 6])], [("y", [3, 6])], [weight("b", RNG.normal(0, 1, 6))])
    result = fuse_matmul_add(model)
    assert not result.modified
    assert explain(result) == ["fc + fc_bias: not fused: fc weight is not a constant"]


def test_a_per_row_constant_is_refused():
    model = linear([1, 4, 5], bias_shape=(4, 6))
    result = fuse_matmul_add(model)
    assert not result.modified
    assert explain(result) == ["fc + fc_bias: not fused: the added constant has shape [4,6], "
                               "not one value per output feature (expected [6])"]


def test_a_constant_of_higher_rank_than_the_output_is_refused():
    model = linear([3, 5], bias_shape=(1, 1, 6), out_shape=[1, 3, 6])
    [line] = explain(fuse_matmul_add(model))
    assert line.endswith("the added constant has shape [1,1,6], of higher rank than the MatMul output (2)")


def test_a_matmul_output_with_two_readers_is_refused():
    model = linear([3, 5], extra_nodes=[helper.make_node("Relu", ["m"], ["r"], name="relu")],
                   extra_outputs=[("r", [3, 6])])
    result = fuse_matmul_add(model)
    assert not result.modified
    assert explain(result) == ["fc + fc_bias: not fused: MatMul output has 2 consumers"]


def test_a_matmul_output_that_is_a_graph_output_is_refused():
    model = linear([3, 5], extra_outputs=[("m", [3, 6])])
    assert explain(fuse_matmul_add(model)) == ["fc + fc_bias: not fused: MatMul output 'm' is a graph output"]


def test_a_vector_input_is_refused():
    model = linear([5], out_shape=[6])
    assert explain(fuse_matmul_add(model)) == ["fc + fc_bias: not fused: the MatMul input has rank 1; Gemm needs rows"]

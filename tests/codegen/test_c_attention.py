"""Self-attention compiles to C: MatMul of two activations and Softmax over any axis, bit-exact.

Multi-head attention as exporters write it (per-head Reshape and Transpose to
[N, heads, T, d], ``Q K^T``, a scale, Softmax over the keys, ``P V``), single-head
attention on rank-3 tensors, and a Softmax over a spatial axis of a conv output:
quantized by edgeopt for the MCU, the integer reference within 1 LSB of ONNX Runtime
on the QDQ model, the generated C bit-exact with the reference.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdq_models as q
from mcu_flow import assert_compiles_bit_exact, quantize_for_mcu
from edgeopt import api
from edgeopt.codegen.c import compile_c, verify
from edgeopt.errors import UnsupportedOpError
from edgeopt.quant import Int8Config, Target
from edgeopt.runtime.ort import OrtSession
from edgeopt.runtime.reference import ReferenceModel, lower

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None,
                               reason="needs gcc and make")
TOKENS, WIDTH, HEADS = 10, 16, 4


def _save(path, nodes, inputs, outputs, weights) -> None:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs,
                              initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _multi_head(path) -> None:
    rng = np.random.default_rng(0)
    head = WIDTH // HEADS
    weights = {f"w{n}": rng.normal(0, WIDTH ** -0.5, (WIDTH, WIDTH)).astype(np.float32) for n in "qkvo"}
    weights |= {"heads": np.array([1, TOKENS, HEADS, head]), "merged": np.array([1, TOKENS, WIDTH]),
                "scale": np.array(head ** -0.5, dtype=np.float32)}
    nodes = []
    for n, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [helper.make_node("MatMul", ["input", f"w{n}"], [f"{n}_flat"], name=f"proj_{n}"),
                  helper.make_node("Reshape", [f"{n}_flat", "heads"], [f"{n}_split"], name=f"split_{n}"),
                  helper.make_node("Transpose", [f"{n}_split"], [n], name=f"heads_{n}", perm=perm)]
    nodes += [helper.make_node("MatMul", ["q", "k"], ["scores"], name="q_kt"),
              helper.make_node("Mul", ["scores", "scale"], ["scaled"], name="scale"),
              helper.make_node("Softmax", ["scaled"], ["p"], name="softmax", axis=-1),
              helper.make_node("MatMul", ["p", "v"], ["context"], name="p_v"),
              helper.make_node("Transpose", ["context"], ["context_t"], name="merge_t", perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["context_t", "merged"], ["context_m"], name="merge"),
              helper.make_node("MatMul", ["context_m", "wo"], ["output"], name="proj_o")]
    _save(path, nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, TOKENS, WIDTH])],
          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, TOKENS, WIDTH])], weights)


def _single_head(path) -> None:
    """Rank-3 attention: [1, T, d] tensors are stored in logical order, no transposes around the kernel."""
    rng = np.random.default_rng(1)
    weights = {f"w{n}": rng.normal(0, WIDTH ** -0.5, (WIDTH, WIDTH)).astype(np.float32) for n in "qkv"}
    nodes = [helper.make_node("MatMul", ["input", f"w{n}"], [n], name=f"proj_{n}") for n in "qkv"]
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
              helper.make_node("MatMul", ["q", "kt"], ["scores"], name="q_kt"),
              helper.make_node("Softmax", ["scores"], ["p"], name="softmax", axis=2),
              helper.make_node("MatMul", ["p", "v"], ["output"], name="p_v")]
    _save(path, nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, TOKENS, WIDTH])],
          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, TOKENS, WIDTH])], weights)


def _spatial_softmax(path) -> None:
    """Softmax over the width of a conv's NCHW output (stored NHWC: not the innermost axis)."""
    weights = {"w": np.random.default_rng(2).normal(0, 0.4, (4, 3, 3, 3)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Softmax", ["c"], ["output"], name="softmax", axis=3)]
    _save(path, nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 6, 7])],
          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 6, 7])], weights)


BUILDERS = {"multi_head": _multi_head, "single_head": _single_head, "spatial_softmax": _spatial_softmax}


def _inputs(model, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    shape = tuple(model.graph.inputs[0].shape)
    rng = np.random.default_rng(seed)
    return [{"input": rng.normal(0, 1, shape).astype(np.float32)} for _ in range(count)]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def quantized(request, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp(request.param)
    BUILDERS[request.param](tmp_path / "float.onnx")
    float_model = api.load(tmp_path / "float.onnx")
    api.quantize(tmp_path / "float.onnx", Int8Config(target=Target.MCU), _inputs(float_model, 16, seed=0),
                 output=tmp_path / "int8.onnx", check_speed=False, check_fidelity=False)
    return request.param, api.load(tmp_path / "int8.onnx")


def test_integer_reference_agrees_with_onnx_runtime(quantized):
    _, model = quantized
    within, _, worst = q.agreement(ReferenceModel(model, rounding="single"), OrtSession(model),
                                   _inputs(model, 4, seed=3))
    assert within >= 0.999 and worst <= 1, (within, worst)


def test_matmuls_of_activations_are_one_kernel_each(quantized):
    name, model = quantized
    kinds = [op.kind for op in lower(model).ops]
    assert kinds.count("batch_matmul") == {"multi_head": 2, "single_head": 2, "spatial_softmax": 0}[name]
    assert kinds.count("softmax") == 1
    if name == "single_head":  # rank 3 is stored in logical order: only the model's own K transpose
        assert kinds.count("transpose") == 1


@needs_gcc
def test_generated_c_is_bit_exact(quantized, tmp_path):
    _, model = quantized
    compile_c(model, tmp_path / "c")
    result = verify(tmp_path / "c", _inputs(model, 2, seed=4))
    assert result.bit_exact, result.first_mismatch


def test_broadcast_batch_axes_are_refused_in_one_line(tmp_path):
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["a", "b"], ["output"], name="broadcast_matmul")]
    _save(tmp_path / "float.onnx", nodes,
          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3, 4]),
           helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4, 5])],
          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 3, 5])], {})
    data = [{"a": rng.normal(size=(2, 3, 4)).astype(np.float32), "b": rng.normal(size=(1, 4, 5)).astype(np.float32)}
            for _ in range(4)]
    api.quantize(tmp_path / "float.onnx", Int8Config(target=Target.MCU), data, output=tmp_path / "int8.onnx",
                 check_speed=False, check_fidelity=False)
    with pytest.raises(UnsupportedOpError, match=r"broadcast_matmul.*same batch axes") as error:
        lower(api.load(tmp_path / "int8.onnx"))
    assert "\n" not in str(error.value)


def test_back_to_back_transposes_run_as_one(quantized):
    """The per-head Reshape/Transpose pairs lower to chains of transposes (rank-4 tensors are stored NHWC):
    each chain is one pass, and the scores' scale and Softmax, which commute with the transposes around them,
    run in the batch MatMul's logical order: the multi-head block needs 4 transposes (Q, K and V to heads, the
    context back), 14 before they were composed, 7 before they moved past the scale and Softmax."""
    name, model = quantized
    program = lower(model)
    producer = {op.output: op for op in program.ops}
    readers = [name for op in program.ops for name in op.inputs]
    for op in program.ops:
        first = producer.get(op.inputs[0]) if op.kind == "transpose" else None
        if first is not None and first.kind == "transpose" and readers.count(op.inputs[0]) == 1:
            shape = program.tensors[first.inputs[0]].shape
            assert program.tensors[first.output].shape != tuple(shape[a] for a in first.params.perm), op.node
    if name == "multi_head":
        assert [op.kind for op in program.ops].count("transpose") == 4
        softmax, = [op for op in program.ops if op.kind == "softmax"]
        assert producer[softmax.inputs[0]].kind == "mul" and producer[producer[softmax.inputs[0]].inputs[0]].kind \
            == "batch_matmul"


def test_an_inner_axis_past_the_int32_accumulator_is_refused(tmp_path):
    """The C sums in int32 (the reference in int64): 34,000 products of up to 255 x 255 could overflow, and
    the two would then differ without a word."""
    depth = 34_000
    nodes = [helper.make_node("MatMul", ["a", "b"], ["output"], name="long_matmul")]
    _save(tmp_path / "float.onnx", nodes,
          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 1, depth]),
           helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, depth, 1])],
          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, 1])], {})
    rng = np.random.default_rng(0)
    data = [{"a": rng.uniform(0, 1, (1, 1, depth)).astype(np.float32),
             "b": rng.uniform(0, 1, (1, depth, 1)).astype(np.float32)} for _ in range(2)]
    api.quantize(tmp_path / "float.onnx", Int8Config(target=Target.MCU), data, output=tmp_path / "int8.onnx",
                 check_speed=False, check_fidelity=False)
    with pytest.raises(UnsupportedOpError, match=r"long_matmul.*34000 products.*int32") as error:
        lower(api.load(tmp_path / "int8.onnx"))
    assert "\n" not in str(error.value)


@needs_gcc
def test_mobilevit_quantized_for_the_mcu_compiles_bit_exact(tmp_path):
    """MobileViT's transformer: LayerNorm, qkv split by Gather at constant indices, Q K^T, Softmax, P V."""
    from tests.zoo_models import build_zoo

    rng = np.random.default_rng(6)
    samples = [{"input": rng.normal(0, 1, (1, 3, 32, 32)).astype(np.float32)} for _ in range(10)]
    result, model = quantize_for_mcu(build_zoo("mobilevit", tmp_path), samples[:8], tmp_path / "int8.onnx")
    assert result.float_nodes == ()
    assert_compiles_bit_exact(model, tmp_path / "c", samples[8:])

"""Shared helpers for pass tests: build models inline, compare outputs in ORT."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from edgeopt import ir as eir
from edgeopt.io import load_model, model_to_bytes
from edgeopt.runtime.ort import OrtSession, random_feed

FLOAT = TensorProto.FLOAT


def assert_same_outputs(original: ir.Model, rewritten: ir.Model, *, atol: float = 1e-5,
                        rtol: float = 1e-4, seeds: Sequence[int] = (0, 1, 2)) -> None:
    """Both models give the same outputs (by name) on a few random inputs, run in ONNX Runtime."""
    before = OrtSession(original, optimize=False)
    after = OrtSession(rewritten, optimize=False)
    assert sorted(before.output_names) == sorted(after.output_names)
    for seed in seeds:
        feed = {name: 3 * array for name, array in random_feed(eir.model_inputs(original), seed).items()}
        expected, actual = before.run(feed), after.run(feed)
        for name, value in expected.items():
            np.testing.assert_allclose(actual[name], value, atol=atol, rtol=rtol, err_msg=name)


def op_types(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def computing_ops(model: ir.Model) -> list[str]:
    """Op types without the ``Constant`` nodes exporters scatter around."""
    return [t for t in op_types(model) if t != "Constant"]


def snapshot(model: ir.Model) -> bytes:
    """Serialized bytes, to check a model was not mutated."""
    return model_to_bytes(model)


def weight(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def random_weight(name: str, shape, seed: int = 0, low: float = -1.0, high: float = 1.0) -> onnx.TensorProto:
    rng = np.random.default_rng(seed + sum(map(ord, name)))
    return weight(name, rng.uniform(low, high, shape))


def batchnorm_params(prefix: str, channels: int, seed: int = 0) -> list[onnx.TensorProto]:
    """scale, bias, mean, var initializers named ``{prefix}.scale`` etc. that look trained."""
    rng = np.random.default_rng(seed)
    return [
        weight(f"{prefix}.scale", rng.uniform(0.5, 1.5, channels)),
        weight(f"{prefix}.bias", rng.normal(0, 0.2, channels)),
        weight(f"{prefix}.mean", rng.normal(0, 0.2, channels)),
        weight(f"{prefix}.var", rng.uniform(0.5, 1.5, channels)),
    ]


def make_model(nodes, inputs, outputs, initializers=(), *, opset: int = 17) -> ir.Model:
    """An ``onnx.helper`` graph as an ir.Model with inferred shapes.

    ``inputs``/``outputs`` are ``(name, shape)`` pairs of float tensors.
    """
    graph = helper.make_graph(
        nodes, "test",
        [helper.make_tensor_value_info(n, FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, FLOAT, s) for n, s in outputs],
        initializer=list(initializers))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 10
    onnx.checker.check_model(proto)
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto, data_prop=True))


def export_torch(module, shape, tmp_path: pathlib.Path, *, opset: int = 17, name: str = "m") -> ir.Model:
    """Export an eval-mode torch module (BatchNorm kept as a node) and load it as edgeopt does."""
    import torch

    from tests.models import export_onnx

    torch.manual_seed(0)
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    path = export_onnx(module.eval(), (example,), tmp_path / f"{name}_op{opset}.onnx", opset=opset)
    return load_model(path)


def explain(result) -> list[str]:
    return result.report.explain()

"""The shared test models export cleanly, pass the checker and run in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from tests import models  # noqa: E402

CNNS = ["mobilenet_v3", "mobilenet_v2", "efficientnet", "resnet", "unet"]


def _run(path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _torch_output(name: str, batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
    module, example = models.build_torch(name)
    example = torch.cat([example * (1.0 - 0.5 * i) for i in range(batch)])
    with torch.no_grad():
        return example.numpy(), module(example).numpy()


def _dims(value_info: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize(
    ("name", "opset"),
    [(name, 17) for name in models.TORCH_MODELS]
    + [(name, 11) for name in CNNS]
    + [("mobilenet_v3", 13), ("transformer", 13), ("transformer", 18), ("unet", 18)],
)
def test_torch_model_exports_and_matches_torch(tmp_path, name, opset):
    path = models.build_onnx(name, tmp_path, opset)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == opset
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["output"]
    assert _dims(model.graph.input[0]) == list(models.TORCH_MODELS[name][1])
    assert "Identity" not in {n.op_type for n in model.graph.node}

    x, expected = _torch_output(name)
    (actual,) = _run(path, {"input": x})
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", CNNS)
def test_cnn_exports_keep_batchnorm_with_initializer_weights(tmp_path, name):
    graph = onnx.load(str(models.build_onnx(name, tmp_path))).graph
    initializers = {t.name for t in graph.initializer}
    ops = {n.op_type for n in graph.node}
    assert "BatchNormalization" in ops
    for node in graph.node:
        if node.op_type in {"Conv", "ConvTranspose", "BatchNormalization", "Gemm"}:
            assert set(node.input[1:]) <= initializers, node.name


@pytest.mark.parametrize(
    ("name", "expected_ops"),
    [
        ("mobilenet_v3", {"HardSwish", "HardSigmoid", "Clip", "Relu", "GlobalAveragePool", "Add"}),
        ("mobilenet_v2", {"Clip", "Add", "Gemm"}),
        ("efficientnet", {"Sigmoid", "Mul", "GlobalAveragePool"}),
        ("resnet", {"MaxPool", "Relu", "Add"}),
        ("transformer", {"LayerNormalization", "Softmax", "Erf", "MatMul", "Transpose", "Reshape"}),
        ("unet", {"ConvTranspose", "Resize", "Concat", "MaxPool"}),
    ],
)
def test_architecture_features_survive_export(tmp_path, name, expected_ops):
    graph = onnx.load(str(models.build_onnx(name, tmp_path))).graph
    assert expected_ops <= {n.op_type for n in graph.node}


@pytest.mark.parametrize("name", ["resnet", "transformer"])
def test_dynamic_batch_export_runs_batch_of_three(tmp_path, name):
    path = models.build_onnx(name, tmp_path, dynamic_batch=True)
    model = onnx.load(str(path))
    assert _dims(model.graph.input[0])[0] == "N"
    x, expected = _torch_output(name, batch=3)
    (actual,) = _run(path, {"input": x})
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-4)


def test_build_onnx_writes_a_fresh_copy_per_call(tmp_path):
    (tmp_path / "a").mkdir()
    first = models.build_onnx("resnet", tmp_path / "a")
    second = models.build_onnx("resnet", tmp_path)
    first.write_bytes(b"modified by a test")
    third = models.build_onnx("resnet", tmp_path / "a")
    assert third == first
    assert third.read_bytes() == second.read_bytes()


def test_export_onnx_names_several_inputs_and_restores_training_flag(tmp_path):
    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm1d(4)

        def forward(self, a, b):
            return self.bn(a + b), a - b

    module = Pair().train()
    inputs = (torch.randn(2, 4), torch.randn(2, 4))
    path = models.export_onnx(module, inputs, tmp_path / "pair.onnx", opset=13)
    graph = onnx.load(str(path)).graph
    assert module.training
    assert [i.name for i in graph.input] == ["input_0", "input_1"]
    assert [o.name for o in graph.output] == ["output_0", "output_1"]


def _random_feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    initializers = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(0)
    return {
        i.name: rng.standard_normal([d if isinstance(d, int) else 5 for d in _dims(i)]).astype(np.float32)
        for i in model.graph.input
        if i.name not in initializers
    }


@pytest.mark.parametrize(
    "builder",
    [
        models.constant_weights_model,
        models.external_data_model,
        models.dynamic_input_model,
        models.shadowed_initializer_model,
        models.tf_style_model,
    ],
)
def test_onnx_builder_passes_checker_and_runs(tmp_path, builder):
    path = builder(tmp_path / "model.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    outputs = _run(path, _random_feeds(model))
    assert len(outputs) == 1 and np.all(np.isfinite(outputs[0]))


def test_constant_weights_model_has_no_initializers(tmp_path):
    graph = onnx.load(str(models.constant_weights_model(tmp_path / "m.onnx"))).graph
    assert not graph.initializer
    assert [n.op_type for n in graph.node].count("Constant") == 4


def test_external_data_model_keeps_every_weight_in_one_side_file(tmp_path):
    path = models.external_data_model(tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx.data").is_file()
    graph = onnx.load(str(path), load_external_data=False).graph
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)


def test_dynamic_input_model_has_symbolic_dims(tmp_path):
    graph = onnx.load(str(models.dynamic_input_model(tmp_path / "m.onnx"))).graph
    assert _dims(graph.input[0]) == ["N", 3, "H", "W"]
    (output,) = _run(tmp_path / "m.onnx", {"input": np.ones((2, 3, 7, 5), np.float32)})
    assert output.shape == (2, 4, 7, 5)


def test_shadowed_initializer_model_lists_initializers_as_inputs(tmp_path):
    graph = onnx.load(str(models.shadowed_initializer_model(tmp_path / "m.onnx"))).graph
    inputs = {i.name for i in graph.input}
    used = {name for node in graph.node for name in node.input}
    assert {"conv.weight", "conv.bias"} <= inputs & {t.name for t in graph.initializer}
    assert "unused_table" not in used | inputs


def test_tf_style_model_is_nhwc_around_nchw_conv(tmp_path):
    model = onnx.load(str(models.tf_style_model(tmp_path / "m.onnx")))
    assert model.opset_import[0].version == 13
    assert [n.op_type for n in model.graph.node] == ["Transpose", "Conv", "Relu", "Transpose"]
    assert _dims(model.graph.input[0]) == [1, 16, 16, 3]
    assert _dims(model.graph.output[0]) == [1, 16, 16, 8]

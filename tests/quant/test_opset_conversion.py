"""Opset 11/12 models are converted to opset 13 for per-channel QDQ, checked, and quantize as well.

The case that broke: a dynamic batch axis and ``x.view(x.size(0), -1)``. Before opset 13 shape
inference cannot follow the Shape -> Gather -> Unsqueeze -> Concat chain that builds the Reshape
target, so it loses the output's rank; the loader must keep the exporter's output shape, because
ONNX's checker (run on the converted model) requires a shape on every graph input and output.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from edgeopt.errors import ModelError
from edgeopt.io import load_model
from edgeopt.quant import Int8Config, quantize
from edgeopt.quant.opset import convert_opset
from edgeopt.runtime.ort import OrtSession

from .int8_models import sqnr_db

torch = pytest.importorskip("torch")

from tests.models import export_onnx  # noqa: E402

CONV_NET_SQNR_DB = 30.0


class ViewFlattenNet(torch.nn.Module):
    """Conv 3x3/2 (8 channels) -> ReLU -> ``view(batch, -1)`` -> Linear(512, 10), on 3x16x16 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.view(y.size(0), -1))


def _view_flatten_model(tmp_path, opset: int) -> ir.Model:
    torch.manual_seed(0)
    path = export_onnx(ViewFlattenNet(), torch.zeros(1, 3, 16, 16), tmp_path / f"view_flatten_op{opset}.onnx",
                       opset=opset, dynamic_batch=True)
    return load_model(path, require_static=False)


def _images(count: int, seed: int, batch: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)} for _ in range(count)]


@pytest.mark.parametrize("opset", [11, 12])
def test_loaded_model_keeps_the_exported_output_shape_inference_cannot_find(tmp_path, opset):
    model = _view_flatten_model(tmp_path, opset)
    assert [str(d) for d in model.graph.outputs[0].shape] == ["N", "10"]
    onnx.checker.check_model(ir.to_proto(model))


@pytest.mark.parametrize("opset", [11, 12])
def test_dynamic_batch_view_flatten_model_is_converted_checked_and_quantized(tmp_path, opset):
    model = _view_flatten_model(tmp_path, opset)
    result = quantize(model, Int8Config(), _images(16, seed=0))
    conversion = result.details["opset_conversion"]
    assert (conversion.from_opset, conversion.to_opset, conversion.batches_checked) == (opset, 13, 4)
    assert result.model.opset_imports[""] == 13 and model.opset_imports[""] == opset
    onnx.checker.check_model(ir.to_proto(result.model))
    assert sqnr_db(model, result.model, _images(8, seed=1)) >= CONV_NET_SQNR_DB
    batch = _images(1, seed=2, batch=5)[0]
    assert OrtSession(result.model).run(batch)["output"].shape == (5, 10)


def test_an_output_of_unknown_rank_is_named_when_conversion_is_refused():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]))
    with pytest.raises(ModelError, match="output 'y' has no shape"):
        convert_opset(model, 13)

"""compare of a model without Q/DQ pairs (float16, bfloat16, int4 weight-only): its tensors matched by name."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx_ir as ir
import pytest

import edgeopt
from edgeopt.quant.compare import compare_models
from edgeopt.quant.float16 import Fp16Config
from edgeopt.quant.int4 import Int4WeightConfig
from tests.models import build_onnx


def _samples(shape, count: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [{"input": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


@pytest.fixture(scope="module")
def transformer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("by_name")
    return build_onnx("transformer", folder), folder


def _quantized(path, config, data, output):
    edgeopt.quantize(path, config, data, output=output, check_fidelity=False, check_speed=False)
    return output


def test_an_int4_model_s_layers_are_compared_and_its_matmuls_lose_the_most(transformer):
    path, folder = transformer
    data = _samples((1, 16, 32))
    quant = _quantized(path, Int4WeightConfig(), data, folder / "int4.onnx")
    result = compare_models(path, quant, data)
    assert result.by_name and result.quantized_tensors == 0 and result.matched > 20
    rows = {row.tensor: row for row in result.layers}
    nbits = [row for row in result.layers if row.op_type == "MatMulNBits"]
    assert len(nbits) >= 8 and all(math.isnan(row.scale) and row.zero_point_dtype == "float" for row in nbits)
    assert all(math.isfinite(row.sqnr_db) for row in result.layers)
    # the rounded weights are where the error arises: the largest loss inside a node is a MatMulNBits'
    worst = result.by_loss().layers[0]
    assert worst.op_type == "MatMulNBits", worst
    assert all(row.lost_db is not None for row in nbits)
    assert json.loads(json.dumps(result.to_dict()))["matched_by"] == "name" and rows


def test_a_float16_model_s_tensors_are_compared_in_their_type(transformer):
    path, folder = transformer
    data = _samples((1, 16, 32))
    quant = _quantized(path, Fp16Config(), data, folder / "fp16.onnx")
    result = compare_models(path, quant, data)
    assert result.by_name and result.matched > 20
    assert {row.zero_point_dtype for row in result.layers} == {"float16"}
    assert all(row.sqnr_db > 40 for row in result.layers)  # float16 rounding, not a mismatched tensor


def test_a_float16_model_of_the_graph_as_given_is_compared_with_the_given_tensors(tmp_path):
    # Another converter's float16 model keeps BatchNormalization: its conv outputs hold the values before
    # the normalization, which the optimized float model's conv outputs of those names do not; they are
    # compared with the model as given, not reported as a 0 dB mismatch
    path = build_onnx("mobilenet_v2", tmp_path)
    data = _samples((1, 3, 32, 32))
    quant = _quantized(path, Fp16Config(float_passes=False), data, tmp_path / "fp16_bn.onnx")
    assert any(node.op_type == "BatchNormalization" for node in ir.load(quant).graph)
    result = edgeopt.compare(path, quant, data)
    assert result.by_name and result.matched > 20
    assert all(row.sqnr_db > 40 for row in result.layers), min(result.layers, key=lambda row: row.sqnr_db)
    assert any(row.op_type == "BatchNormalization" for row in result.layers)


def test_a_float32_model_compared_with_itself_has_no_rows_and_says_why(transformer, caplog):
    path, _ = transformer
    result = edgeopt.compare(path, path, _samples((1, 16, 32), 2))
    assert result.layers == () and not result.by_name
    assert any("no QuantizeLinear/DequantizeLinear node" in warning for warning in result.warnings)


def test_a_float16_model_whose_tensors_are_named_otherwise_has_no_rows_and_says_so(tmp_path):
    path = build_onnx("mobilenet_v2", tmp_path)
    data = _samples((1, 3, 32, 32))
    model = ir.load(_quantized(path, Fp16Config(), data, tmp_path / "fp16.onnx"))
    outputs = {value.name for value in model.graph.outputs}
    for node in model.graph:  # as a converter that names its tensors its own way writes them
        for value in node.outputs:
            if value.name not in outputs:
                value.name = f"renamed_{value.name}"
    result = edgeopt.compare(path, model, data)
    assert result.layers == () and not result.by_name
    assert any("no tensor of the second model" in warning for warning in result.warnings), result.warnings


def test_the_cli_shows_the_rows_of_a_weight_only_model(cli, transformer):
    path, folder = transformer
    data = _samples((1, 16, 32))
    np.save(folder / "data.npy", np.stack([d["input"] for d in data]))
    quant = _quantized(path, Int4WeightConfig(), data, folder / "int4_cli.onnx")
    result = cli("compare", path, quant, "--data", folder / "data.npy", "--sort", "lost", "--limit", "3")
    assert result.code == 0, result
    assert "tensors matched by name, largest loss first" in result.stdout and "MatMulNBits" in result.stdout
    assert "matched" in result.stdout and "no QuantizeLinear" not in result.stderr


def test_quantize_s_fidelity_check_of_a_float16_model_has_its_matmul_rows(transformer):
    # the check compares with the float model after int8's passes, which make MatMul + Add one Gemm; the
    # float16 model keeps both, so their rows come from the model as given
    path, folder = transformer
    data = _samples((1, 16, 32))
    report = edgeopt.quantize(path, Fp16Config(), data, output=folder / "fp16_checked.onnx", check_speed=False)
    rows = report.fidelity.layers
    assert report.fidelity.by_name and sum(row.op_type == "MatMul" for row in rows) >= 12, len(rows)


def test_a_single_output_renamed_by_a_converter_is_compared_by_position(transformer):
    path, folder = transformer
    data = _samples((1, 16, 32))
    model = ir.load(_quantized(path, Fp16Config(), data, folder / "fp16_renamed.onnx"))
    model.graph.outputs[0].name = "logits"  # the float model calls it "output"
    result = edgeopt.compare(path, model, data)
    assert [row.name for row in result.outputs] == ["output"] and result.outputs[0].sqnr_db > 40
    assert any("compared by position" in warning for warning in result.warnings), result.warnings
    assert model.graph.outputs[0].name == "logits"  # the model given is not renamed

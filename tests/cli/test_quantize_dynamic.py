"""`edgeopt quantize --scheme int8-dynamic` as a user meets it: no data needed, data for the checks and
SmoothQuant, and the options that do not apply refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeopt.demo import demo_model_path
from tests.conftest import assert_one_line_error
from tests.hf_models import build_hf, hf_samples


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return build_hf("bert", tmp_path_factory.mktemp("bert"))


@pytest.fixture
def bert_data(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for index, sample in enumerate(hf_samples("bert", 12, seed=3)):
        np.savez(folder / f"{index:02d}.npz", **sample)
    return folder


def test_no_data_is_needed(cli, tmp_path, bert):
    out = tmp_path / "bert.dynamic.onnx"
    result = cli("quantize", bert, "--scheme", "int8-dynamic", "-o", out, "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["scheme"] == "int8-dynamic" and report["calibration_samples"] == 0
    assert report["notes"][0].startswith("dynamic int8: 12 MatMul and 2 Gemm -> DynamicQuantizeLinear + ")
    assert report["quant_bytes"] < 0.4 * report["float_bytes"]
    assert json.loads(out.with_suffix(".report.json").read_text())["scheme"] == "int8-dynamic"


def test_data_gives_the_fidelity_check_and_smoothquant(cli, tmp_path, bert, bert_data):
    result = cli("quantize", bert, "--scheme", "int8-dynamic", "-o", tmp_path / "q.onnx", "--data", bert_data,
                 "--smoothquant", "0.5", "--json", "--no-speed-check")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert float(report["fidelity"]["outputs"][0]["sqnr_db"]) > 30
    assert report["fidelity_on"] == "calibration"  # SmoothQuant's scales were fitted to it
    assert any(note.startswith("SmoothQuant (alpha 0.5)") for note in report["notes"])


def test_data_nothing_was_fitted_to_is_said_to_be_so(cli, tmp_path, bert, bert_data):
    result = cli("quantize", bert, "--scheme", "int8-dynamic", "-o", tmp_path / "q.onnx", "--data", bert_data,
                 "--no-speed-check")
    assert result.code == 0, result.stderr
    assert "(on 12 data samples)" in result.stdout


def test_compare_lists_the_quantized_products(cli, tmp_path, bert, bert_data):
    out = tmp_path / "q.onnx"
    assert cli("quantize", bert, "--scheme", "int8-dynamic", "-o", out, "--no-speed-check").code == 0
    result = cli("compare", bert, out, "--data", bert_data, "--json")
    assert result.code == 0, result.stderr
    ops = {row["op_type"] for row in json.loads(result.stdout)["layers"]}
    assert {"MatMul (int8)", "Gemm (int8)", "Gather (int8)"} <= ops
    text = cli("compare", bert, out, "--data", bert_data)
    assert text.code == 0, text.stderr
    assert "(a dynamic int8 model: each '(int8)' row quantized its input as the model ran" in text.stdout
    assert "weight-only" not in text.stdout


@pytest.mark.parametrize(("options", "fragments"), [
    (["--target", "mcu"], ("a microcontroller needs them calibrated ahead of time", "--scheme int8 --target mcu")),
    (["--embeddings", "int4"], ("int8-dynamic holds embedding tables in int8 or float",)),
    (["--smoothquant", "0.5"], ("SmoothQuant (--smoothquant) measures each channel's range", "give --data")),
    (["--min-sqnr", "40"], ("the accuracy search (--max-drop/--min-sqnr) measures each round on --data",)),
])
def test_what_does_not_apply_is_one_line(cli, tmp_path, bert, options, fragments):
    out = tmp_path / "q.onnx"
    result = cli("quantize", bert, "--scheme", "int8-dynamic", "-o", out, *options)
    assert_one_line_error(result, *fragments)
    assert not out.exists()


def test_a_convolutional_model_is_told_to_use_static_int8(cli, tmp_path):
    result = cli("quantize", demo_model_path(), "--scheme", "int8-dynamic", "-o", tmp_path / "q.onnx", "--json",
                 "--no-speed-check")
    assert result.code == 0, result.stderr  # its classifier is quantized; its convolutions are not
    report = json.loads(result.stdout)
    assert any(text.startswith("most of the weights stay float32") and "--scheme int8 with --data" in text
               for text in report["warnings"]), report["warnings"]
    assert any(text.startswith("int8-dynamic rewrites MatMul/Gemm weights only: those of Conv x") for text in
               report["notes"])


def test_inspect_reads_the_dynamic_model(cli, tmp_path):
    from tests.quant.test_int4 import mlp

    mlp(tmp_path)
    out = tmp_path / "mlp.dynamic.onnx"
    assert cli("quantize", tmp_path / "mlp.onnx", "--scheme", "int8-dynamic", "-o", out).code == 0
    result = cli("inspect", out)
    assert result.code == 0, result.stderr
    assert "32x256, scalar, scalar" in result.stdout  # DynamicQuantizeLinear's scale and zero point
    report = json.loads(cli("inspect", out, "--json").stdout)
    assert report["macs"] == 32 * (256 * 384 + 384 * 64)  # MatMulInteger counts as the MatMul it is
    float_report = json.loads(cli("inspect", tmp_path / "mlp.onnx", "--json").stdout)
    assert report["params"] == float_report["params"]  # the weight scales are stored, but no parameters
    assert report["weight_bytes"]["stored"] < 0.3 * float_report["weight_bytes"]["stored"]


def test_compile_tells_a_dynamic_model_to_quantize_statically_for_the_mcu(cli, tmp_path):
    from tests.quant.test_int4 import mlp

    mlp(tmp_path)
    out = tmp_path / "mlp.dynamic.onnx"
    assert cli("quantize", tmp_path / "mlp.onnx", "--scheme", "int8-dynamic", "-o", out, "--no-speed-check").code == 0
    result = cli("compile", out, "--target", "c", "-o", tmp_path / "c")
    assert_one_line_error(result, "dynamic int8 one (DynamicQuantizeLinear, MatMulInteger)",
                          "--scheme int8 --target mcu --data")
    assert not (tmp_path / "c").exists()

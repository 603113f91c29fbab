"""The CLI as a user meets it: inspect, run, bench on real architectures, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import edgeopt.demo
from edgeopt import api
from edgeopt.errors import ConfigError, DataError
from edgeopt.runtime.ort import OrtSession
from tests.conftest import assert_one_line_error
from tests.models import (
    TORCH_MODELS,
    build_onnx,
    constant_weights_model,
    dynamic_input_model,
    external_data_model,
)

COMMANDS = ["inspect", "run", "bench", "demo", "quantize", "compare", "compile", "verify"]
README = Path(__file__).parents[2] / "README.md"


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_has_help(cli, command):
    result = cli(*([command] if command else []), "--help")
    assert result.code == 0
    assert "Usage:" in result.stdout


def test_every_command_is_in_the_readme():
    text = README.read_text()
    for command in COMMANDS:
        assert f"edgeopt {command}" in text, command


@pytest.mark.parametrize("name", sorted(TORCH_MODELS))
def test_inspect_real_architectures_totals_match_rows(cli, tmp_path, name):
    path = build_onnx(name, tmp_path)
    result = cli("inspect", path, "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert {"macs", "params", "peak_activation_bytes", "nodes"} <= set(report)
    assert report["macs"] == sum(n["macs"] for n in report["nodes"]) > 0
    assert report["params"] == sum(n["params"] for n in report["nodes"]) > 0
    assert report["lower_bound_bytes"] <= report["peak_activation_bytes"] <= report["naive_activation_bytes"]
    assert not report["unknown_nodes"]
    human = cli("inspect", path)
    assert human.code == 0 and "peak activation RAM" in human.stdout


def test_inspect_counts_torch_parameters_exactly(cli, tmp_path):
    from tests.models import build_torch

    module, _ = build_torch("resnet")
    expected = sum(p.numel() for p in module.parameters())
    # BatchNorm running statistics are weights of the exported graph too.
    expected += sum(b.numel() for n, b in module.named_buffers() if "running" in n)
    report = json.loads(cli("inspect", build_onnx("resnet", tmp_path), "--json").stdout)
    assert report["params"] == expected


def test_inspect_constant_node_and_external_weights(cli, tmp_path):
    # Conv 4x3x3x3 + bias 4, Gemm 10x64 + bias 10
    expected = 4 * 3 * 3 * 3 + 4 + 10 * 64 + 10
    for builder in (constant_weights_model, external_data_model):
        report = json.loads(cli("inspect", builder(tmp_path / f"{builder.__name__}.onnx"), "--json").stdout)
        assert report["params"] == expected, builder.__name__


def test_run_writes_one_npy_per_output_and_matches_ort(cli, tmp_path):
    path = build_onnx("mobilenet_v3", tmp_path)
    x = np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = cli("run", path, "--input", f"input={tmp_path / 'x.npy'}", "-o", tmp_path / "out")
    assert result.code == 0, result.stderr
    expected = OrtSession(path).run({"input": x})["output"]
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "output.npy"), expected)


def test_run_stacked_samples_one_by_one_without_name(cli, tmp_path):
    path = build_onnx("resnet", tmp_path)
    batch = np.random.default_rng(1).normal(size=(5, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "batch.npy", batch)
    result = cli("run", path, "-i", tmp_path / "batch.npy", "-o", tmp_path / "out", "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["samples"] == 5
    outputs = np.load(tmp_path / "out" / "output.npy")
    session = OrtSession(path)
    expected = np.concatenate([session.run({"input": batch[i:i + 1]})["output"] for i in range(5)])
    np.testing.assert_allclose(outputs, expected, rtol=1e-6, atol=1e-6)


def test_run_takes_samples_stacked_with_np_stack(cli, tmp_path):
    # N x 1 x 3 x 32 x 32, the form --data takes: it was refused ("... stacked samples ...: pass {name: array}
    # with the samples stacked on axis 0")
    path = build_onnx("resnet", tmp_path)
    batch = np.random.default_rng(3).normal(size=(3, 1, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "stacked.npy", batch)
    result = cli("run", path, "-i", tmp_path / "stacked.npy", "-o", tmp_path / "out", "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["samples"] == 3
    session = OrtSession(path)
    expected = np.concatenate([session.run({"input": sample})["output"] for sample in batch])
    np.testing.assert_allclose(np.load(tmp_path / "out" / "output.npy"), expected, rtol=1e-6, atol=1e-6)


def test_run_dynamic_model_takes_shape_from_data(cli, tmp_path):
    path = dynamic_input_model(tmp_path / "dyn.onnx")
    np.save(tmp_path / "x.npy", np.ones((2, 3, 5, 7), np.float32))
    result = cli("run", path, "-i", tmp_path / "x.npy", "-o", tmp_path / "out")
    assert result.code == 0, result.stderr
    assert np.load(tmp_path / "out" / "output.npy").shape[:2] == (2, 4)


def test_run_given_a_folder_says_it_takes_one_file(cli, tmp_path):
    # it said "input file <folder> not found" of a folder that exists
    path = build_onnx("resnet", tmp_path)
    (tmp_path / "samples").mkdir()
    np.save(tmp_path / "samples" / "a.npy", np.zeros((1, 3, 32, 32), np.float32))
    result = cli("run", path, "-i", f"input={tmp_path / 'samples'}", "-o", tmp_path / "out")
    assert_one_line_error(result, "is a folder: give one .npy or .npz file")
    assert not (tmp_path / "out").exists()


def test_run_never_writes_an_output_over_its_input_file(cli, tmp_path):
    path = build_onnx("resnet", tmp_path)  # its output is named "output"
    x = np.random.default_rng(2).normal(size=(1, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "output.npy", x)
    before = (tmp_path / "output.npy").read_bytes()
    result = cli("run", path, "-i", tmp_path / "output.npy", "-o", tmp_path)
    assert_one_line_error(result, "output.npy", "-o/--output")
    assert (tmp_path / "output.npy").read_bytes() == before
    # the same from Python, with the file passed by name; an .npz input cannot be replaced by a .npy output
    with pytest.raises(ConfigError, match="over the input file"):
        api.run(path, {"input": tmp_path / "output.npy"}, output_dir=tmp_path)
    assert (tmp_path / "output.npy").read_bytes() == before
    np.savez(tmp_path / "x.npz", input=x)
    assert cli("run", path, "-i", tmp_path / "x.npz", "-o", tmp_path).code == 0
    np.testing.assert_array_equal(np.load(tmp_path / "output.npy"), OrtSession(path).run({"input": x})["output"])


def test_run_gives_outputs_whose_names_make_one_file_name_a_file_each(cli, tmp_path):
    # 'y:0' and 'y_0' both became y_0.npy: the second output replaced the first's file
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y:0"], name="relu"), helper.make_node("Neg", ["x"], ["y_0"], name="neg")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4]) for name in ("y:0", "y_0")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "two.onnx")
    np.save(tmp_path / "x.npy", np.full((1, 4), 2.0, np.float32))
    result = cli("run", tmp_path / "two.onnx", "-i", tmp_path / "x.npy", "-o", tmp_path / "out", "--json")
    assert result.code == 0, result.stderr
    assert np.load(tmp_path / "out" / "y_0.npy").tolist() == [[2.0] * 4]
    assert np.load(tmp_path / "out" / "y_0_2.npy").tolist() == [[-2.0] * 4]
    assert "y_0_2.npy" in result.stdout


def test_bench_two_models_side_by_side(cli, tmp_path):
    first, second = build_onnx("resnet", tmp_path), build_onnx("mobilenet_v2", tmp_path)
    result = cli("bench", first, second, "--runs", "5", "--warmup", "1", "--threads", "1", "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    rows = report["models"]
    assert [r["name"] for r in rows] == [first.name, second.name]
    assert rows[0]["median_ratio_vs_first"] == 1.0
    for row in rows:
        assert row["runs"] == 5 and 0 < row["min_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert row["peak_rss_bytes"] > 0 and row["file_bytes"] == Path(tmp_path / row["name"]).stat().st_size


def test_bench_with_real_data_folder(cli, tmp_path):
    path = build_onnx("mobilenet_v2", tmp_path)
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(3):
        np.save(folder / f"s{i}.npy", np.full((1, 3, 32, 32), i, np.float32))
    result = cli("bench", path, "--runs", "3", "--warmup", "0", "--data", folder)
    assert result.code == 0, result.stderr
    assert "median ms" in result.stdout


def test_bench_of_a_dynamic_model_takes_its_shapes_from_the_data(cli, tmp_path):
    path = dynamic_input_model(tmp_path / "dyn.onnx")
    np.save(tmp_path / "x.npy", np.ones((1, 3, 16, 16), np.float32))
    result = cli("bench", path, "--data", tmp_path / "x.npy", "--runs", "3", "--warmup", "0", "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["models"][0]["runs"] == 3


def test_compare_of_an_unrelated_second_model_is_warned_about(cli, tmp_path):
    first, second = build_onnx("resnet", tmp_path), build_onnx("mobilenet_v2", tmp_path)  # same interface
    np.save(tmp_path / "x.npy", np.random.default_rng(3).normal(size=(8, 3, 32, 32)).astype(np.float32))
    result = cli("compare", first, second, "--data", tmp_path / "x.npy")
    assert result.code == 0 and "is it a quantization of this float model" in result.stderr
    itself = cli("compare", first, first, "--data", tmp_path / "x.npy")
    assert "is it a quantization" not in itself.stderr


def test_compare_refuses_a_quantization_option_it_would_ignore(cli, tmp_path):
    # --embeddings says how int4-weight quantizes; compare quantizes nothing, and took it silently
    path = build_onnx("resnet", tmp_path)
    np.save(tmp_path / "x.npy", np.random.default_rng(3).normal(size=(2, 3, 32, 32)).astype(np.float32))
    result = cli("compare", path, path, "--data", tmp_path / "x.npy", "--embeddings", "int4")
    assert result.code == 2 and "--embeddings" in result.stderr, result


# ----------------------------------------------------------------- bad input


def test_missing_model_file(cli, tmp_path):
    assert_one_line_error(cli("inspect", tmp_path / "nope.onnx"), "not found")


def test_truncated_and_non_onnx_files(cli, tmp_path):
    good = build_onnx("resnet", tmp_path).read_bytes()
    (tmp_path / "cut.onnx").write_bytes(good[: len(good) // 3])
    assert_one_line_error(cli("inspect", tmp_path / "cut.onnx"), "not a valid ONNX model")
    (tmp_path / "notes.onnx").write_text("this is not a model\n" * 50)
    assert_one_line_error(cli("bench", tmp_path / "notes.onnx"), "not a valid ONNX model")


def test_wrong_input_name_shape_and_dtype(cli, tmp_path):
    path = build_onnx("resnet", tmp_path)
    np.save(tmp_path / "ok.npy", np.zeros((1, 3, 32, 32), np.float32))
    np.save(tmp_path / "shape.npy", np.zeros((1, 3, 31, 32), np.float32))
    np.save(tmp_path / "dtype.npy", np.array([["a"] * 32] * 3))
    out = tmp_path / "out"
    assert_one_line_error(cli("run", path, "-i", f"image={tmp_path / 'ok.npy'}", "-o", out), "image", "input")
    assert_one_line_error(cli("run", path, "-i", f"input={tmp_path / 'shape.npy'}", "-o", out), "input")
    assert_one_line_error(cli("run", path, "-i", f"input={tmp_path / 'dtype.npy'}", "-o", out), "input")
    assert not out.exists() or not any(out.iterdir())


def test_nan_input_is_refused(cli, tmp_path):
    path = build_onnx("resnet", tmp_path)
    x = np.zeros((1, 3, 32, 32), np.float32)
    x[0, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", x)
    assert_one_line_error(cli("run", path, "-i", tmp_path / "nan.npy", "-o", tmp_path / "out"), "NaN", "nan.npy")


def test_dynamic_dim_without_input_shape(cli, tmp_path):
    path = dynamic_input_model(tmp_path / "dyn.onnx")
    name = onnx.load(str(path)).graph.input[0].name
    assert_one_line_error(cli("inspect", path), name, "--input-shape")
    fixed = cli("inspect", path, "--input-shape", f"{name}=1x3x16x16", "--json")
    assert fixed.code == 0 and json.loads(fixed.stdout)["macs"] == 1 * 8 * 16 * 16 * 3 * 3 * 3 + 1 * 4 * 16 * 16 * 8


def test_empty_data_folder(cli, tmp_path):
    path = build_onnx("resnet", tmp_path)
    (tmp_path / "empty").mkdir()
    assert_one_line_error(cli("bench", path, "--data", tmp_path / "empty", "--runs", "1"), "empty")


def test_bad_option_values(cli, tmp_path):
    path = build_onnx("resnet", tmp_path)
    assert_one_line_error(cli("bench", path, "--runs", "0"), "--runs")
    assert_one_line_error(cli("inspect", path, "--input-shape", "input"), "--input-shape")


def test_compare_of_a_model_without_qdq_shows_output_rows_only(cli, tmp_path):
    path = build_onnx("resnet", tmp_path)
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 32, 32), np.float32))
    result = cli("compare", path, path, "--data", tmp_path / "x.npy")
    assert result.code == 0 and "no QuantizeLinear/DequantizeLinear" in result.stderr
    assert "quantized tensors" not in result.stdout and "matched 0" not in result.stdout


def test_run_says_what_is_wrong_with_an_input_file_that_is_not_an_array(cli, tmp_path):
    # numpy's "This file contains pickled (object) data ... load it unsafely" for a text or ONNX file
    from edgeopt.demo import demo_model_path

    (tmp_path / "text.npy").write_text("hello")
    result = cli("run", demo_model_path(), "-i", tmp_path / "text.npy", "-o", tmp_path / "out")
    assert_one_line_error(result, "text.npy is not in .npy format")
    assert "unsafely" not in result.stderr
    np.save(tmp_path / "objects.npy", np.empty(2, dtype=object), allow_pickle=True)
    np.savez(tmp_path / "objects.npz", input=np.empty(2, dtype=object))
    for name in ("objects.npy", "objects.npz"):
        result = cli("run", demo_model_path(), "-i", tmp_path / name, "-o", tmp_path / "out")
        assert_one_line_error(result, f"{name} holds Python objects, which edgeopt never unpickles")


def test_an_output_over_an_input_file_exits_as_in_quantize_and_compile(cli, tmp_path):
    # run said it with exit 3 (a data error), quantize and compile with 4 (an option to change)
    from edgeopt.demo import demo_calibration_path, demo_model_path

    np.save(tmp_path / "logits.npy", np.load(demo_calibration_path())[:2])
    ran = cli("run", demo_model_path(), "-i", tmp_path / "logits.npy", "-o", tmp_path)
    assert_one_line_error(ran, "would be written over the input file")
    model = tmp_path / "model.onnx"
    model.write_bytes(demo_model_path().read_bytes())
    quantized = cli("quantize", model, "--scheme", "fp16", "-o", model)
    assert_one_line_error(quantized, "would overwrite the input model's file")
    assert ran.code == quantized.code == 4


def test_run_refuses_an_input_given_twice(cli, tmp_path):
    # the last one given won silently (or the unnamed one over the named one)
    from edgeopt.demo import demo_calibration_path, demo_model_path

    np.save(tmp_path / "a.npy", np.load(demo_calibration_path())[:2])
    np.save(tmp_path / "b.npy", np.load(demo_calibration_path())[2:5])
    for first, second in (("input=", "input="), ("", "input="), ("", "")):
        result = cli("run", demo_model_path(), "-i", f"{first}{tmp_path / 'a.npy'}", "-i",
                     f"{second}{tmp_path / 'b.npy'}", "-o", tmp_path / "out")
        assert_one_line_error(result, "twice")
        assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="'input' is given twice, by name and unnamed"):
        api.run(demo_model_path(), {"": tmp_path / "a.npy", "input": tmp_path / "b.npy"})


def test_run_writes_outputs_whose_file_names_collide_to_different_files(cli, tmp_path):
    # outputs "y/1" and "y_1" were both written to y_1.npy: one of them was lost
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4]) for name in ("y/1", "y_1", "Y_1")]
    nodes = [helper.make_node(op, ["x"], [name]) for op, name in (("Relu", "y/1"), ("Neg", "y_1"), ("Abs", "Y_1"))]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outputs), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "collide.onnx")
    data = np.arange(4, dtype=np.float32).reshape(1, 4) - 2
    np.save(tmp_path / "x.npy", data)
    result = cli("run", tmp_path / "collide.onnx", "-i", tmp_path / "x.npy", "-o", tmp_path / "out", "--json")
    assert result.code == 0, result.stderr
    files = json.loads(result.stdout)["files"]
    assert [Path(f).name for f in files] == ["y_1.npy", "y_1_2.npy", "Y_1_3.npy"]
    for file, expected in zip(files, (np.maximum(data, 0), -data, np.abs(data))):
        np.testing.assert_array_equal(np.load(file), expected)


def test_bench_names_the_model_the_data_does_not_fit(cli, tmp_path):
    # "digits.npy: input 'input' wants shape 1x1x16x16 ...": both models have an input named 'input'
    from onnx import TensorProto, helper

    from edgeopt.demo import demo_calibration_path, demo_model_path

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 16, 16])
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "larger.onnx")
    np.save(tmp_path / "digits.npy", np.load(demo_calibration_path())[:4])
    result = cli("bench", demo_model_path(), tmp_path / "larger.onnx", "--data", tmp_path / "digits.npy",
                 "--runs", "2")
    assert_one_line_error(result, "wants shape 1x1x16x16", "(for larger.onnx)")


def test_run_counts_the_samples_of_a_dynamic_batch(cli, tmp_path):
    # 8 stacked samples run at once by a model of dynamic batch were told "1 sample(s)"
    path = dynamic_input_model(tmp_path / "dynamic.onnx")  # input N x 3 x H x W
    np.save(tmp_path / "x.npy", np.zeros((8, 3, 6, 6), np.float32))
    result = cli("run", path, "-i", tmp_path / "x.npy", "-o", tmp_path / "out", "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["samples"] == 8


def test_inspect_of_a_quantized_model_shows_the_weights_as_stored(cli, tmp_path):
    # an int8 model's weights take neither their float32 nor their int8 bytes alone: int8 codes, int32 biases,
    # scales and zero points
    import edgeopt
    from edgeopt.demo import demo_calibration_path, demo_model_path

    out = tmp_path / "demo.int8.onnx"
    edgeopt.quantize(demo_model_path(), edgeopt.Int8Config(), demo_calibration_path(), output=out, check_speed=False)
    stored = edgeopt.inspect(out).cost.weight_bytes
    shown = cli("inspect", out)
    assert shown.code == 0 and "stored (as" in shown.stdout
    assert "stored (as" not in cli("inspect", demo_model_path()).stdout  # float32: stored as fp32
    assert json.loads(cli("inspect", out, "--json").stdout)["weight_bytes"]["stored"] == stored


def test_debug_shows_the_traceback_and_keeps_the_exit_code(cli, tmp_path, monkeypatch):
    # `edgeopt --debug quantize missing.onnx` exited 1 (the traceback escaping to Python), not 2 as without it
    missing = cli("--debug", "quantize", tmp_path / "missing.onnx", "-o", tmp_path / "q.onnx", "--scheme", "fp16")
    assert missing.code == 2 and "Traceback" in missing.stderr and "error: " in missing.stderr
    assert cli("quantize", tmp_path / "missing.onnx", "-o", tmp_path / "q.onnx", "--scheme", "fp16").code == 2

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(api, "inspect", broken)
    bug = cli("--debug", "inspect", edgeopt.demo.demo_model_path())
    assert bug.code == 70 and "Traceback" in bug.stderr and "RuntimeError: a bug" in bug.stderr


def test_a_scalar_npy_and_an_npy_of_no_samples_are_data_errors(cli, tmp_path):
    # np.save of a scalar: "internal error: IndexError" (exit 70) in quantize, compare, bench and run; run of an
    # array of 0 samples: the same
    model = edgeopt.demo.demo_model_path()
    np.save(tmp_path / "scalar.npy", np.float32(3))
    np.save(tmp_path / "none.npy", np.zeros((0, 1, 1, 8, 8), np.float32))
    scalar = cli("run", model, "-i", tmp_path / "scalar.npy", "-o", tmp_path / "out")
    assert_one_line_error(scalar, "a single number, no axes")
    assert scalar.code == 3
    quantized = cli("quantize", model, "--data", tmp_path / "scalar.npy", "-o", tmp_path / "q.onnx")
    assert quantized.code == 3 and "a single number" in quantized.stderr
    empty = cli("run", model, "-i", tmp_path / "none.npy", "-o", tmp_path / "out")
    assert_one_line_error(empty, "holds no sample")
    assert empty.code == 3

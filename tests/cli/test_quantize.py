"""`edgeopt quantize` and `edgeopt compare` as a user meets them, including bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import edgeopt
from edgeopt.demo import demo_calibration_path, demo_data, demo_model_path
from edgeopt.errors import ConfigError
from edgeopt.io import model_to_bytes
from tests.conftest import assert_one_line_error
from tests.models import build_onnx, dynamic_input_model


@pytest.fixture
def calib(tmp_path):
    """A folder of 32 single-sample .npy files for the demo model."""
    folder = tmp_path / "calib"
    folder.mkdir()
    for index, sample in enumerate(np.load(demo_calibration_path())[:32]):
        np.save(folder / f"sample{index}.npy", sample[np.newaxis])
    return folder


def test_int8_demo_keeps_accuracy_and_reports_fidelity(cli, tmp_path):
    out = tmp_path / "demo.int8.onnx"
    result = cli("quantize", demo_model_path(), "--data", demo_calibration_path(), "-o", out, "--json",
                 "--no-speed-check")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["scheme"] == "int8" and report["calibration_samples"] == 256
    assert any("uint8" in note for note in report["notes"])  # the ORT target's activation type is printed
    logits = report["fidelity"]["outputs"][0]
    assert float(logits["sqnr_db"]) > 25 and float(logits["top1_agreement"]) > 0.97
    images, labels = demo_data()
    from edgeopt.demo import top1_accuracy

    assert top1_accuracy(demo_model_path(), images, labels) - top1_accuracy(out, images, labels) <= 0.005


def test_quantize_is_byte_identical_across_runs(cli, tmp_path, calib):
    for name in ("a.onnx", "b.onnx"):
        assert cli("quantize", demo_model_path(), "--data", calib, "-o", tmp_path / name,
                   "--no-speed-check", "--calibration", "percentile").code == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_the_python_api_mirrors_the_cli(cli, tmp_path, calib):
    # `import edgeopt` is enough: the function and its configuration are at the top level
    import edgeopt

    assert cli("quantize", demo_model_path(), "--data", calib, "-o", tmp_path / "cli.onnx", "--no-speed-check",
               "--calibration", "minmax", "--equalize").code == 0
    report = edgeopt.quantize(demo_model_path(), edgeopt.Int8Config(calibration=edgeopt.CalibrationMethod.MINMAX,
                                                                    equalize=True),
                              calib, output=tmp_path / "api.onnx", check_speed=False)
    assert (tmp_path / "api.onnx").read_bytes() == (tmp_path / "cli.onnx").read_bytes()
    assert report.fidelity.outputs[0].sqnr_db > 25 and report.result.model is not None
    assert all(getattr(edgeopt, name) is not None for name in edgeopt.__all__)


@pytest.mark.parametrize("scheme", ["fp16", "bf16", "int4-weight"])
def test_other_schemes_need_no_data(cli, tmp_path, scheme):
    model = build_onnx("transformer", tmp_path)
    result = cli("quantize", model, "--scheme", scheme, "-o", tmp_path / "q.onnx", "--no-speed-check", "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["quant_bytes"] < model.stat().st_size


def _strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_min_sqnr_search_returns_layers_to_float(cli, tmp_path, calib):
    out = tmp_path / "q.onnx"
    result = cli("quantize", demo_model_path(), "--data", calib, "-o", out, "--min-sqnr", "33",
                 "--no-speed-check", "--json")
    assert result.code == 0, result.stderr
    report = _strict_json(result.stdout)  # the float model's SQNR is infinite: "inf", not Infinity
    assert report == _strict_json(out.with_name("q.report.json").read_text())
    search = report["accuracy_search"]
    assert search["met"] and search["best_score"] >= 33 and search["float_score"] == "inf"
    assert search["float_nodes_added"], "the plain int8 model is below 33 dB, so some node must go back to float"


def test_compare_lists_layers_worst_first(cli, tmp_path, calib):
    out = tmp_path / "q.onnx"
    assert cli("quantize", demo_model_path(), "--data", calib, "-o", out, "--no-speed-check").code == 0
    result = cli("compare", demo_model_path(), out, "--data", calib, "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    sqnr = [float(row["sqnr_db"]) for row in report["layers"]]
    assert sqnr == sorted(sqnr) and len(sqnr) > 10
    assert {"tensor", "op_type", "scale", "cosine"} <= set(report["layers"][0])


def test_compare_json_carries_the_warnings_said_on_stderr(cli, tmp_path, calib):
    """A script reading --json sees what a person reads on stderr: here, that the second model has no
    Q/DQ pair to compare layer by layer (the float model given twice)."""
    result = cli("compare", demo_model_path(), demo_model_path(), "--data", calib, "--json")
    assert result.code == 0, result.stderr
    warnings = json.loads(result.stdout)["warnings"]
    assert len(warnings) == 1 and "QuantizeLinear" in warnings[0] and warnings[0] in result.stderr
    report = edgeopt.compare(demo_model_path(), demo_model_path(), calib)
    assert report.warnings == tuple(warnings) and report.layers == ()


def test_dynamic_model_takes_shapes_from_data(cli, tmp_path):
    model = dynamic_input_model(tmp_path / "dyn.onnx")
    folder = tmp_path / "varying"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index, (height, width) in enumerate([(8, 8), (12, 10), (16, 16), (9, 13)] * 5):
        np.save(folder / f"s{index}.npy", rng.normal(size=(1, 3, height, width)).astype(np.float32))
    result = cli("quantize", model, "--data", folder, "-o", tmp_path / "q.onnx", "--no-speed-check")
    assert result.code == 0, result.stderr


def test_opset11_model_is_converted_and_reported(cli, tmp_path):
    model = build_onnx("resnet", tmp_path, opset=11)
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(16):
        np.save(folder / f"s{index}.npy", rng.normal(size=(1, 3, 32, 32)).astype(np.float32))
    out = tmp_path / "q.onnx"
    result = cli("quantize", model, "--data", folder, "-o", out, "--no-speed-check", "--json")
    assert result.code == 0, result.stderr
    assert any("13" in note for note in json.loads(result.stdout)["notes"])
    assert max(o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")) >= 13


# ----------------------------------------------------------------- bad input


def _write(folder, name, array):
    folder.mkdir(exist_ok=True)
    np.save(folder / name, array)
    return folder


@pytest.mark.parametrize("case, fragment", [
    ("nan", "NaN"), ("inf", "Inf"), ("shape", "input"), ("dtype", "input"), ("empty", "no .npy"),
])
def test_bad_calibration_data(cli, tmp_path, case, fragment):
    folder = tmp_path / "bad"
    folder.mkdir()
    good = np.zeros((1, 1, 8, 8), np.float32)
    if case == "nan":
        good[0, 0, 0, 0] = np.nan
    if case == "inf":
        good[0, 0, 0, 0] = np.inf
    if case != "empty":
        array = {"shape": np.zeros((1, 1, 7, 8), np.float32), "dtype": np.array(["x"] * 64)}.get(case, good)
        np.save(folder / "s0.npy", array)
    out = tmp_path / "q.onnx"
    assert_one_line_error(cli("quantize", demo_model_path(), "--data", folder, "-o", out), fragment)
    assert not out.exists()


def test_wrong_input_name_in_npz(cli, tmp_path):
    np.savez(tmp_path / "s.npz", image=np.zeros((1, 1, 8, 8), np.float32))
    out = tmp_path / "q.onnx"
    assert_one_line_error(cli("quantize", demo_model_path(), "--data", tmp_path / "s.npz", "-o", out), "image")
    assert not out.exists()


def test_too_few_samples_is_a_warning(cli, tmp_path):
    folder = _write(tmp_path / "few", "s.npy", np.load(demo_calibration_path())[:2])
    result = cli("quantize", demo_model_path(), "--data", folder, "-o", tmp_path / "q.onnx", "--no-speed-check")
    assert result.code == 0 and "only 2 calibration samples" in result.stderr


def test_calibration_data_of_one_value_is_a_warning(cli, tmp_path):
    """All-zero data (a placeholder saved instead of the samples) quantized with 'SQNR 54 dB' on it
    and not a word."""
    np.save(tmp_path / "zeros.npy", np.zeros((20, 1, 8, 8), np.float32))
    result = cli("quantize", demo_model_path(), "--data", tmp_path / "zeros.npy", "-o", tmp_path / "q.onnx",
                 "--no-speed-check", "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["warnings"] == [
        "calibration data for input 'input' is 0 in every sample: ranges calibrated on it will not fit real inputs "
        "(a placeholder array? images that did not load?)"]


def test_samples_stacked_with_np_stack_calibrate_as_concatenated(cli, tmp_path):
    """np.stack of batch-1 samples is [N, 1, ...]: the same samples as [N, ...], the same bytes (it was
    refused as rank 5); one sample is said as one."""
    samples = np.load(demo_calibration_path())[:20]
    np.save(tmp_path / "concatenated.npy", samples)
    np.save(tmp_path / "stacked.npy", np.stack([sample[np.newaxis] for sample in samples]))
    for name in ("concatenated", "stacked"):
        result = cli("quantize", demo_model_path(), "--data", tmp_path / f"{name}.npy", "-o", tmp_path / f"{name}.onnx",
                     "--no-speed-check")
        assert result.code == 0 and "20 samples" in result.stdout, result.stderr
    assert (tmp_path / "concatenated.onnx").read_bytes() == (tmp_path / "stacked.onnx").read_bytes()
    np.save(tmp_path / "one.npy", samples[:1])
    one = cli("quantize", demo_model_path(), "--data", tmp_path / "one.npy", "-o", tmp_path / "one.onnx",
              "--no-speed-check")
    assert one.code == 0 and "only 1 calibration sample:" in one.stderr
    assert "1 sample " in one.stdout and "on 1 calibration sample)" in one.stdout, one.stdout


@pytest.mark.parametrize("target", ["ort", "mcu"])
def test_uint8_scheme_is_named_uint8_and_writes_uint8_activations(cli, tmp_path, target):
    out = tmp_path / "demo.uint8.onnx"
    result = cli("quantize", demo_model_path(), "--data", demo_calibration_path(), "--scheme", "uint8",
                 "--target", target, "-o", out, "--json", "--no-speed-check")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["scheme"] == "uint8"
    graph = onnx.load(str(out)).graph
    points = {init.name: init.data_type for init in graph.initializer}
    activation_points = [points[node.input[2]] for node in graph.node if node.op_type == "QuantizeLinear"]
    assert activation_points and set(activation_points) == {onnx.TensorProto.UINT8}


def test_logged_warnings_are_in_the_report_and_said_once(cli, tmp_path):
    pixels = np.round(np.load(demo_calibration_path()) * 16).astype(np.uint8)  # integer data for a float input
    folder = _write(tmp_path / "ints", "s.npy", pixels)
    result = cli("quantize", demo_model_path(), "--data", folder, "-o", tmp_path / "q.onnx", "--no-speed-check",
                 "--json")
    assert result.code == 0, result.stderr
    warnings = json.loads(result.stdout)["warnings"]
    assert any("gets uint8 data, cast to float32" in w for w in warnings)
    assert result.stderr.count("cast to float32") == 1
    saved = json.loads((tmp_path / "q.report.json").read_text())["warnings"]
    assert saved == warnings
    # a second quantize in the same process reports it again
    again = edgeopt.quantize(demo_model_path(), edgeopt.Int8Config(), folder, check_speed=False)
    assert any("cast to float32" in w for w in again.warnings)


def test_already_quantized_model_is_refused(cli, tmp_path, calib):
    once = tmp_path / "q.onnx"
    assert cli("quantize", demo_model_path(), "--data", calib, "-o", once, "--no-speed-check").code == 0
    assert_one_line_error(cli("quantize", once, "--data", calib, "-o", tmp_path / "qq.onnx"), "already quantized")
    for scheme in ("fp16", "bf16", "int4-weight"):  # every scheme starts from the float32 model
        assert_one_line_error(cli("quantize", once, "--scheme", scheme, "-o", tmp_path / "qq.onnx"),
                              "already quantized")
    half = tmp_path / "half.onnx"  # an fp16 model came back byte-identical, labelled int8
    assert cli("quantize", demo_model_path(), "--scheme", "fp16", "-o", half, "--no-speed-check").code == 0
    for scheme in ("int8", "fp16", "int4-weight"):
        assert_one_line_error(cli("quantize", half, "--scheme", scheme, "--data", calib, "-o", tmp_path / "qq.onnx"),
                              "already converted to float16", "float32 model")
    assert not (tmp_path / "qq.onnx").exists()


def test_unknown_exclude_and_missing_data(cli, tmp_path, calib):
    out = tmp_path / "q.onnx"
    assert_one_line_error(cli("quantize", demo_model_path(), "--data", calib, "-o", out, "--exclude", "Conv_99"),
                          "Conv_99")
    assert_one_line_error(cli("quantize", demo_model_path(), "-o", out), "--data")
    assert_one_line_error(cli("quantize", demo_model_path(), "--data", calib, "-o", demo_model_path()), "input")
    assert not out.exists()


def test_output_over_an_external_data_file_of_the_input_is_refused(cli, tmp_path):
    """-o naming the input's weight file (or a report landing on it) would destroy the input model."""
    model = tmp_path / "m.onnx"
    onnx.save(onnx.load(demo_model_path()), model, save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert_one_line_error(cli("quantize", model, "--scheme", "fp16", "-o", tmp_path / "m.onnx.data"),
                          "m.onnx.data", "overwrite")
    (tmp_path / "weights").mkdir()
    onnx.save(onnx.load(demo_model_path()), tmp_path / "weights" / "w.onnx", save_as_external_data=True,
              location="w.json.report.json", size_threshold=0)  # where -o w.json puts its numbers
    assert_one_line_error(cli("quantize", tmp_path / "weights" / "w.onnx", "--scheme", "fp16",
                              "-o", tmp_path / "weights" / "w.json"), "w.json.report.json", "overwrite")
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == before


def test_an_unwritable_output_is_refused_before_any_work(cli, tmp_path, calib):
    folder = tmp_path / "existing"
    folder.mkdir()
    assert_one_line_error(cli("quantize", demo_model_path(), "--data", calib, "-o", folder), "is a folder", "-o")
    (tmp_path / "q.report.json").mkdir()  # where the numbers would go
    assert_one_line_error(cli("quantize", demo_model_path(), "--data", calib, "-o", tmp_path / "q.onnx"),
                          "q.report.json", "is a folder")
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("output", [".", "./", "/"])
def test_output_naming_a_folder_without_a_file_name_is_refused_as_a_folder(cli, tmp_path, monkeypatch, calib,
                                                                         output):
    """`-o .` (meant as "here") has no name to put the report beside: it was an internal error."""
    monkeypatch.chdir(tmp_path)
    result = cli("quantize", demo_model_path(), "--data", calib, "-o", output)
    assert_one_line_error(result, "is a folder", "-o")
    assert result.code == 4 and not [path for path in tmp_path.iterdir() if path.is_file()]


def test_an_error_after_quantizing_leaves_no_output(cli, tmp_path):
    # fp16 needs no data; given data is used for the fidelity check after the conversion, and a
    # mismatch found there must not leave the converted model behind
    model = build_onnx("transformer", tmp_path)
    folder = _write(tmp_path / "wrong", "s.npy", np.zeros((1, 3, 32, 32), np.float32))
    out = tmp_path / "q.onnx"
    assert_one_line_error(cli("quantize", model, "--scheme", "fp16", "--data", folder, "-o", out), "shape")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_outputs_get_the_usual_permissions(cli, tmp_path, calib):
    import os
    import stat

    previous = os.umask(0o022)
    try:
        assert cli("quantize", demo_model_path(), "--data", calib, "-o", tmp_path / "q.onnx",
                   "--no-speed-check").code == 0
    finally:
        os.umask(previous)
    for name in ("q.onnx", "q.report.json"):  # not the 0600 of a temporary file
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


@pytest.mark.parametrize(("scheme", "option", "applies"), [
    ("fp16", ["--adaround"], "int8 and uint8"), ("fp16", ["--gptq"], "int8, uint8 and int4-weight"),
    ("bf16", ["--gptq"], "int8, uint8 and int4-weight"), ("bf16", ["--calibration", "mse"], "int8 and uint8"),
    ("int4-weight", ["--smoothquant", "0.5"], "int8, uint8 and int8-dynamic"),
    ("int8", ["--block-size", "64"], "int4-weight"), ("fp16", ["--per-tensor"], "int8, uint8 and int8-dynamic"),
    ("int8-dynamic", ["--calibration", "mse"], "int8 and uint8"),
    ("int8-dynamic", ["--block-size", "64"], "int4-weight"),
    ("int8-dynamic", ["--gptq"], "int8, uint8 and int4-weight"), ("int8-dynamic", ["--adaround"], "int8 and uint8"),
    ("int8-dynamic", ["--no-bias-correct"], "int8 and uint8"), ("bf16", ["--depthwise-gptq"], "int8 and uint8"),
    ("fp16", ["--no-depthwise-gptq"], "int8 and uint8"),
    ("fp16", ["--embeddings", "float"], "int4-weight and int8-dynamic"),
])
def test_an_option_the_scheme_would_ignore_is_an_error(cli, tmp_path, calib, scheme, option, applies):
    result = cli("quantize", demo_model_path(), "--scheme", scheme, *option, "--data", calib, "-o", tmp_path / "q.onnx")
    assert_one_line_error(result, option[0], f"--scheme {applies} only")
    assert not (tmp_path / "q.onnx").exists()


def test_a_model_with_nothing_in_int8_is_said_to_be_float(tmp_path, calib):
    import edgeopt

    op_types = tuple(sorted({node.op_type for node in onnx.load(demo_model_path()).graph.node}))
    report = edgeopt.quantize(demo_model_path(), edgeopt.Int8Config(exclude=op_types), calib,
                              check_fidelity=False, check_speed=False)
    assert not report.result.tensors
    assert any(warning.startswith("no node runs in int8: the model written is the float model")
               for warning in report.warnings)


def test_samples_are_counted_not_batches(tmp_path, calib):
    # Batches of 8, 5, 1 and 16 rows are 30 samples; --max-samples bounds the fidelity check too, and
    # the accuracy search reports the samples calibration used, not those of its last fidelity pass.
    import edgeopt
    from edgeopt.quant.accuracy import AccuracyGoal

    model = build_onnx("resnet", tmp_path, dynamic_batch=True)
    rng = np.random.default_rng(0)
    batches = [{"input": rng.standard_normal((rows, 3, 32, 32)).astype(np.float32)} for rows in (8, 5, 1, 16)]
    report = edgeopt.quantize(model, edgeopt.Int8Config(), batches)
    assert (report.calibration_samples, report.calibration_batches, report.fidelity.samples) == (30, 4, 4)
    assert report.fidelity.rows == 30 and report.fidelity.to_dict()["rows"] == 30
    assert report.speed is not None and report.speed.inputs == "input 8x3x32x32"  # timed on the first batch
    once = edgeopt.quantize(model, edgeopt.Int8Config(), iter(batches))  # a one-shot iterator: said, not silent
    assert once.speed is None and any(w.startswith("speed check skipped") for w in once.warnings)
    assert once.fidelity is None and any(w.startswith("fidelity check skipped") for w in once.warnings)
    for kwargs in ({"config": edgeopt.Int8Config(smoothquant_alpha=0.5)},
                   {"config": edgeopt.Int8Config(), "goal": AccuracyGoal(min_sqnr_db=30.0)}):
        with pytest.raises(ConfigError, match="more than once, and it is a one-shot iterator"):
            edgeopt.quantize(model, data=iter(batches), **kwargs)  # was: "calibration data is empty"
    assert report.to_dict()["calibration_samples"] == 30
    limited = edgeopt.quantize(demo_model_path(), edgeopt.Int8Config(), calib, max_samples=10, check_speed=False)
    assert (limited.calibration_samples, limited.fidelity.samples) == (10, 10)
    searched = edgeopt.quantize(demo_model_path(), edgeopt.Int8Config(), demo_calibration_path(),
                                check_speed=False, goal=AccuracyGoal(min_sqnr_db=0.0))
    assert searched.calibration_samples == 256  # all of them; its fidelity pass reads 64


def test_the_mcu_target_warns_that_a_node_kept_float_cannot_be_compiled(cli, tmp_path, calib):
    result = cli("quantize", demo_model_path(), "--data", calib, "--target", "mcu", "--exclude", "Add",
                 "-o", tmp_path / "q.onnx", "--no-speed-check")
    assert result.code == 0 and "stay float" in result.stderr and "cannot become C" in result.stderr


def test_the_input_model_is_never_modified(cli, tmp_path, calib):
    model = build_onnx("mobilenet_v3", tmp_path)
    before = model.read_bytes()
    folder = tmp_path / "d"
    folder.mkdir()
    np.save(folder / "s.npy", np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32))
    assert cli("quantize", model, "--data", folder, "-o", tmp_path / "q.onnx", "--no-speed-check").code == 0
    assert model.read_bytes() == before


def test_accuracy_algorithms_run_and_are_reported(cli, tmp_path, calib):
    result = cli("quantize", demo_model_path(), "--data", calib, "-o", tmp_path / "q.onnx", "--no-speed-check",
                 "--equalize", "--bias-correct", "--json")
    assert result.code == 0, result.stderr
    notes = " ".join(json.loads(result.stdout)["notes"])
    assert "cross-layer equalization" in notes and "bias correction: 14 layers corrected" in notes


def test_smoothquant_on_a_transformer(cli, tmp_path):
    model = build_onnx("transformer", tmp_path)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(16, 16, 32)).astype(np.float32))
    result = cli("quantize", model, "--data", tmp_path / "x.npy", "-o", tmp_path / "q.onnx", "--no-speed-check",
                 "--smoothquant", "0.5", "--json")
    assert result.code == 0, result.stderr
    assert "SmoothQuant (alpha 0.5)" in " ".join(json.loads(result.stdout)["notes"])


@pytest.mark.slow
def test_adaround_improves_or_keeps_fidelity(cli, tmp_path):
    def run(*flags):
        result = cli("quantize", demo_model_path(), "--data", demo_calibration_path(), "-o", tmp_path / "q.onnx",
                     "--no-speed-check", "--json", *flags)
        assert result.code == 0, result.stderr
        return json.loads(result.stdout)

    def sqnr(report):
        return float(report["fidelity"]["outputs"][0]["sqnr_db"])

    learned = run("--adaround")
    assert sqnr(learned) >= sqnr(run()) - 0.1
    # torch is installed with the test extras: the note names the backend whose rounding the file holds
    assert any(note.startswith("AdaRound (torch backend;") for note in learned["notes"])


def test_gptq_rounds_the_weights_and_excludes_adaround(cli, tmp_path, calib):
    def run(*flags):
        return cli("quantize", demo_model_path(), "--data", calib, "-o", tmp_path / "q.onnx", "--no-speed-check",
                   "--json", *flags)

    result = run("--gptq")
    assert result.code == 0, result.stderr
    notes = json.loads(result.stdout)["notes"]
    assert any(note.startswith("GPTQ rounding: ") and "weights learned" in note for note in notes), notes
    (tmp_path / "q.onnx").unlink()
    refused = run("--gptq", "--adaround")
    assert refused.code != 0 and "pick one" in json.loads(refused.stdout)["error"]["message"]
    assert not (tmp_path / "q.onnx").exists()


def test_gptq_rounds_int4_weights_and_needs_data(cli, tmp_path):
    model, out = build_onnx("transformer", tmp_path), tmp_path / "q.onnx"
    data = tmp_path / "calib.npy"
    np.save(data, np.random.default_rng(0).standard_normal((16, 1, 16, 32)).astype(np.float32))
    result = cli("quantize", model, "--scheme", "int4-weight", "--gptq", "--data", data, "-o", out,
                 "--no-speed-check", "--json")
    assert result.code == 0, result.stderr
    notes = json.loads(result.stdout)["notes"]
    assert any(note.startswith("GPTQ rounding: 14 weights (") for note in notes), notes
    out.unlink()
    assert_one_line_error(cli("quantize", model, "--scheme", "int4-weight", "--gptq", "-o", out), "--gptq", "--data")
    assert not out.exists()


def test_the_quantized_model_ships_with_its_numbers(cli, tmp_path, calib):
    out = tmp_path / "demo.int8.onnx"
    assert cli("quantize", demo_model_path(), "--data", calib, "-o", out, "--no-speed-check").code == 0
    report = json.loads((tmp_path / "demo.int8.report.json").read_text())
    assert report["output"] == str(out) and report["fidelity"]["outputs"][0]["sqnr_db"]
    # no intermediate shape annotations (runtimes infer them): on the demo they were a quarter of the file
    written = onnx.load(str(out))
    assert not written.graph.value_info and report["quant_bytes"] == out.stat().st_size
    assert out.stat().st_size < 1.05 * demo_model_path().stat().st_size


def test_options_that_would_do_nothing_are_refused(cli, tmp_path, calib):
    out, model = tmp_path / "q.onnx", demo_model_path()
    assert_one_line_error(cli("quantize", model, "--scheme", "fp16", "-o", out, "--max-samples", "3"), "--max-samples",
                          "--data")
    assert_one_line_error(cli("quantize", model, "--scheme", "fp16", "-o", out, "--preprocess", "size=8x8"),
                          "--preprocess", "--data")
    assert_one_line_error(cli("quantize", model, "--data", calib, "-o", out, "--time-budget", "5s"), "--time-budget",
                          "--min-sqnr")
    for budget in ("nan", "nanm", "0", "-1s"):
        assert_one_line_error(cli("quantize", model, "--data", calib, "-o", out, "--min-sqnr", "30", "--time-budget",
                                  budget), f"--time-budget {budget!r} must be positive")
    assert_one_line_error(cli("quantize", model, "--scheme", "fp16", "-o", out, "--block-size", "32"), "--block-size")
    assert not out.exists()


def test_output_over_the_calibration_data_is_refused(cli, tmp_path):
    data = tmp_path / "calib.npy"
    data.write_bytes(demo_calibration_path().read_bytes())
    assert_one_line_error(cli("quantize", demo_model_path(), "--data", data, "-o", data), "calibration data")
    assert data.read_bytes() == demo_calibration_path().read_bytes()
    folder = tmp_path / "calib"
    folder.mkdir()
    (folder / "a.npy").write_bytes(demo_calibration_path().read_bytes())
    assert_one_line_error(cli("quantize", demo_model_path(), "--data", folder, "-o", folder / "q.npy"),
                          "calibration data")  # the next run would read it as a sample
    assert cli("quantize", demo_model_path(), "--data", folder, "-o", folder / "q.onnx",
               "--no-speed-check").code == 0  # an .onnx there is not data


def test_a_float_model_that_outputs_nan_is_warned_about_not_scored(tmp_path):
    import edgeopt
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((rng.standard_normal((16, 16)) * 0.3).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("Sqrt", ["a"], ["y"])],
                              "sqrt", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "sqrt.onnx")
    data = [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(16)]  # Sqrt of < 0: NaN
    report = edgeopt.quantize(tmp_path / "sqrt.onnx", edgeopt.Int8Config(), data, check_speed=False)
    assert np.isnan(report.fidelity.outputs[0].sqnr_db) and np.isnan(report.fidelity.outputs[0].cosine)
    assert any("fidelity of y not measured" in warning for warning in report.warnings)


def test_a_quantized_model_that_outputs_nan_is_blamed_not_the_float_model(tmp_path, monkeypatch):
    """The warning said the float model's outputs held inf/NaN when the quantized model's did."""
    import onnx_ir as ir

    from edgeopt.quant import registry
    from edgeopt.quant.float16 import Fp16Config, quantize_fp16

    class BrokenFp16Config(Fp16Config):
        pass

    def broken_fp16(model, config, data=None, *, progress=None):  # fp16 that writes a NaN into a weight
        result = quantize_fp16(model, Fp16Config(), data, progress=progress)
        weight = next(v for v in result.model.graph.initializers.values() if v.const_value.size > 1)
        weight.const_value = ir.Tensor(np.full(weight.shape.numpy(), np.nan, np.float16), name=weight.name)
        return result

    monkeypatch.setitem(registry._HANDLERS, BrokenFp16Config, broken_fp16)
    data = np.load(demo_calibration_path())[:16]
    report = edgeopt.quantize(demo_model_path(), BrokenFp16Config(), data, check_speed=False)
    assert np.isnan(report.fidelity.outputs[0].sqnr_db)
    assert not any("float model's outputs hold inf/NaN" in warning for warning in report.warnings)
    assert any("output logits of the fp16 model holds inf/NaN on the calibration data where the float model's is "
               "finite" in warning for warning in report.warnings), report.warnings


def test_the_reports_per_layer_rows_are_those_compare_gives(tmp_path):
    # the float model has BatchNorm: a quantized conv output is compared after it, as compare does
    path = build_onnx("mobilenet_v2", tmp_path)
    samples = [{"input": np.random.default_rng(i).standard_normal((1, 3, 32, 32)).astype(np.float32)}
               for i in range(8)]
    report = edgeopt.quantize(path, edgeopt.Int8Config(), samples, check_speed=False)
    quant = tmp_path / "q.onnx"
    quant.write_bytes(model_to_bytes(report.result.model))
    compared = {row.tensor: row.sqnr_db for row in edgeopt.compare(path, quant, samples).layers}
    reported = {row.tensor: row.sqnr_db for row in report.fidelity.layers}
    assert reported.keys() == compared.keys() and min(reported.values()) > 15
    assert all(abs(reported[t] - compared[t]) < 1e-3 for t in reported)


def test_concurrent_quantize_calls_keep_their_warnings_apart(tmp_path):
    import threading

    floats = np.load(demo_calibration_path())
    sources = {"ints": np.round(floats * 16).astype(np.int64), "floats": floats}
    reports = {}

    def run(name):
        reports[name] = edgeopt.quantize(demo_model_path(), edgeopt.Int8Config(), sources[name],
                                         check_speed=False, check_fidelity=False)

    threads = [threading.Thread(target=run, args=(name,)) for name in sources]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert any("cast to float32" in w for w in reports["ints"].warnings)
    assert not any("cast to float32" in w for w in reports["floats"].warnings)


def test_a_long_list_of_float_nodes_is_shown_by_op_and_reason(cli, tmp_path, monkeypatch):
    from edgeopt.cli import app as cli_app

    path = build_onnx("transformer", tmp_path)  # 18 float nodes on the ORT target: listed one by one
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(4, 16, 32)).astype(np.float32))
    command = ("quantize", path, "--data", tmp_path / "x.npy", "-o", tmp_path / "q.onnx", "--no-speed-check")
    listed = cli(*command)
    assert listed.code == 0 and "left in float" in listed.stdout and "by op and reason" not in listed.stdout
    monkeypatch.setattr(cli_app, "FLOAT_NODES_LISTED", 4)
    grouped = cli(*command)
    assert grouped.code == 0 and "by op and reason; each one in" in grouped.stdout
    assert len(json.loads((tmp_path / "q.report.json").read_text())["float_nodes"]) > 4


def test_nodes_float_for_one_cause_share_a_row_whatever_their_own_figures(capsys, monkeypatch):
    """Each node the search returns, and each one read in float for a node kept float, has a reason of its
    own (its round and figures, the node it is read for): grouped by the whole reason, a long list kept a
    row per node."""
    from edgeopt.cli import app as cli_app
    from edgeopt.quant.registry import FloatNode

    monkeypatch.setattr(cli_app, "FLOAT_NODES_LISTED", 2)
    nodes = [FloatNode(f"conv{i}", "Conv", f"returned to float by the accuracy search (round {i}: output SQNR "
                                             f"{20 + i}.0 dB); computes in float16 (--fallback fp16)")
             for i in range(3)]
    nodes.append(FloatNode("tanh", "Tanh", "no integer kernel for Tanh"))
    cli_app._render_float_nodes(nodes, None, "int8")
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("│ ")]
    assert len(rows) == 2
    # the example's reason whole (cut at the kind, it read "search; round 0: ... dB); computes in float16 (--fall...")
    grouped = ("│ Conv │     3 │ conv0 │ returned to float by the accuracy search (round 0: output SQNR 20.0 dB);"
               " computes in float16 (--fallback fp16)")
    assert grouped in rows[0]
    assert rows[1].split("│")[4].strip() == "no integer kernel for Tanh"


def _save(tmp_path, name, nodes, initializers, in_shape, out_shape):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                              [numpy_helper.from_array(array, key) for key, array in initializers.items()])
    path = tmp_path / f"{name}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_an_output_far_from_the_float_models_is_warned_about_with_what_to_do(cli, tmp_path):
    # y = relu(conv(x) + 1000) - 1000: the conv's output lives in [990, 1010], so its uint8 range (which
    # holds 0) has steps of 4, far above the signal's spread of ~3: int8 gives mostly noise
    from onnx import helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),  # keeps the Sub from folding into the conv's bias
             helper.make_node("Sub", ["r", "offset"], ["y"])]
    weights = {"w": (rng.standard_normal((8, 4, 3, 3)) / 6).astype(np.float32),
               "b": np.full(8, 1000.0, np.float32), "offset": np.array(1000.0, np.float32)}
    path = _save(tmp_path, "offset", nodes, weights, [1, 4, 8, 8], [1, 8, 8, 8])
    np.save(tmp_path / "calib.npy", rng.standard_normal((32, 4, 8, 8)).astype(np.float32))
    result = cli("quantize", path, "--data", tmp_path / "calib.npy", "-o", tmp_path / "q.onnx", "--no-speed-check",
                 "--json")
    assert result.code == 0, result.stderr  # written: it is what int8 gives, and the user is told
    report = json.loads(result.stdout)
    assert float(report["fidelity"]["outputs"][0]["sqnr_db"]) < 10
    low = [w for w in report["warnings"] if w.startswith("output y: SQNR")]
    assert len(low) == 1 and "edgeopt compare" in low[0] and "--min-sqnr" in low[0], report["warnings"]
    shown = cli("quantize", path, "--data", tmp_path / "calib.npy", "-o", tmp_path / "q.onnx", "--no-speed-check")
    assert (shown.stdout + shown.stderr).count("output y: SQNR") == 1


def test_equalize_relu6_that_changes_the_float_model_is_named_as_the_cause(tmp_path):
    # conv -> ReLU6 -> conv on inputs that drive most values past 6: --equalize-relu6 makes the ReLU6 a
    # ReLU, so the "quantized" model computes another function; the warning says so, not "find the layer"
    from onnx import helper

    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c1", "zero", "six"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])]
    weights = {"w1": (rng.standard_normal((8, 4, 3, 3)) * [[[[4.0]]]] * rng.uniform(0.1, 3, (8, 1, 1, 1)))
               .astype(np.float32),
               "w2": rng.standard_normal((8, 8, 3, 3)).astype(np.float32),
               "zero": np.array(0.0, np.float32), "six": np.array(6.0, np.float32)}
    path = _save(tmp_path, "relu6", nodes, weights, [1, 4, 8, 8], [1, 8, 8, 8])
    data = [{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(32)]
    plain = edgeopt.quantize(path, edgeopt.Int8Config(equalize=True), data, check_speed=False)
    assert not any("SQNR" in w for w in plain.warnings)  # the ReLU6 ends the pair: nothing changes
    report = edgeopt.quantize(path, edgeopt.Int8Config(equalize=True, equalize_relu6=True), data, check_speed=False)
    assert report.fidelity.outputs[0].sqnr_db < 10
    low = [w for w in report.warnings if w.startswith("output y: SQNR")]
    assert len(low) == 1 and "--equalize-relu6 turned 1 ReLU6 into ReLU" in low[0], report.warnings
    # the change of the float model alone is measured, and named as most of the error
    change = report.result.details["relu6_float_sqnr_db"]
    assert change < 10 and any("dB SQNR against the original's" in note for note in report.result.notes)
    assert any(w.startswith("most of the int8 model's error is --equalize-relu6's change") for w in report.warnings)
    assert plain.result.details["relu6_float_sqnr_db"] is None
    # a one-shot stream is left whole for calibration: the change is then not measured
    streamed = edgeopt.quantize(path, edgeopt.Int8Config(equalize=True, equalize_relu6=True), iter(data),
                                check_speed=False)
    assert streamed.calibration_samples == len(data) and streamed.result.details["relu6_float_sqnr_db"] is None


def test_the_api_takes_an_onnx_model_proto_and_refuses_other_objects_clearly(tmp_path):
    # an onnx.ModelProto (what onnx.load returns) was a TypeError from pathlib; None too
    from edgeopt.errors import ConfigError

    proto = onnx.load(demo_model_path())
    before = proto.SerializeToString()
    data = np.load(demo_calibration_path())[:16]
    report = edgeopt.quantize(proto, edgeopt.Int8Config(), data, check_speed=False)
    from_file = edgeopt.quantize(demo_model_path(), edgeopt.Int8Config(), data, check_speed=False)
    assert model_to_bytes(report.model) == model_to_bytes(from_file.model)
    assert proto.SerializeToString() == before  # the caller's model is not changed
    assert edgeopt.inspect(proto).cost == edgeopt.inspect(demo_model_path()).cost
    assert edgeopt.compare(proto, report.model, data).outputs[0].sqnr_db > 25
    for call in (lambda: edgeopt.quantize(None, edgeopt.Int8Config(), data),
                 lambda: edgeopt.compare(proto, 42, data), lambda: edgeopt.inspect(b"bytes")):
        with pytest.raises(ConfigError, match="must be a path to an .onnx file, an onnx.ModelProto or an onnx_ir"):
            call()


def test_compare_checks_the_data_against_the_second_model_too(cli, tmp_path):
    # a dynamic float model and an int8 model of fixed size: the data fits the first only, and ONNX
    # Runtime's message about the second was cut to a line without the sizes
    dynamic = dynamic_input_model(tmp_path / "dynamic.onnx")
    fixed = onnx.load(dynamic)
    for value in (fixed.graph.input[0], fixed.graph.output[0]):
        for dim, size in zip(value.type.tensor_type.shape.dim, (1, 3, 8, 8) if value is fixed.graph.input[0]
                             else (1, 4, 8, 8)):
            dim.dim_value = size
    onnx.save(fixed, tmp_path / "fixed.onnx")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", rng.standard_normal((16, 3, 8, 8)).astype(np.float32))
    assert cli("quantize", tmp_path / "fixed.onnx", "--data", tmp_path / "calib.npy", "-o", tmp_path / "q.onnx",
               "--no-speed-check").code == 0
    (tmp_path / "other").mkdir()
    np.save(tmp_path / "other" / "s0.npy", rng.standard_normal((1, 3, 6, 10)).astype(np.float32))
    result = cli("compare", dynamic, tmp_path / "q.onnx", "--data", tmp_path / "other")
    assert_one_line_error(result, "s0.npy (for the second model): input 'input' wants shape 1x3x8x8 but got 1x3x6x10")


def _argmax_model(path, rng, *, scores_output: bool = False):
    """x [1, 16, 8] -> MatMul -> scores [1, 16, 6] -> ArgMax -> y int64 [1, 16] (and scores, if asked, as an
    output too); the weight is the first draw of ``rng``."""
    from onnx import helper

    nodes = [helper.make_node("MatMul", ["x", "w"], ["scores"]),
             helper.make_node("ArgMax", ["scores"], ["y"], axis=2, keepdims=0)]
    outputs = [helper.make_tensor_value_info("y", onnx.TensorProto.INT64, [1, 16])]
    if scores_output:
        outputs.insert(0, helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, [1, 16, 6]))
    graph = helper.make_graph(nodes, "argmax", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16, 8])],
                              outputs,
                              [onnx.numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_an_integer_output_is_scored_by_equal_values_not_by_the_argmax_of_its_indices(tmp_path):
    # y = ArgMax over channels per position, int64 [1, 16]: it was given a "top-1 agreement" of the argmax
    # of the class indices themselves (81 % where 97.5 % of the indices were equal)
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    path = _argmax_model(tmp_path / "argmax.onnx", rng)
    data = rng.standard_normal((32, 1, 16, 8)).astype(np.float32)
    report = edgeopt.quantize(path, edgeopt.Int8Config(), list(data), output=tmp_path / "q.onnx", check_speed=False)
    runs = [[ort.InferenceSession(str(p)).run(None, {"x": x})[0] for x in data] for p in (path, tmp_path / "q.onnx")]
    equal = float(np.mean(np.concatenate(runs[0]) == np.concatenate(runs[1])))
    assert report.fidelity.outputs[0].top1_agreement == pytest.approx(equal)
    compared = edgeopt.compare(path, tmp_path / "q.onnx", list(data))
    assert compared.outputs[0].top1_agreement == pytest.approx(equal)
    # class indices are no signal: no SQNR or cosine shown or exported for them
    assert compared.outputs[0].integer and not compared.outputs[0].signal
    assert compared.to_dict()["outputs"][0]["sqnr_db"] is None and compared.to_dict()["outputs"][0]["integer"]


def test_the_sqnr_goal_ignores_an_integer_output_beside_the_scores(tmp_path, cli):
    # scores and their ArgMax: --min-sqnr judged the class indices too (a few flipped indices read as a
    # low SQNR), so the search returned layers to float for an output SQNR does not measure
    rng = np.random.default_rng(1)
    path = _argmax_model(tmp_path / "argmax.onnx", rng, scores_output=True)
    data = rng.standard_normal((32, 1, 16, 8)).astype(np.float32)
    report = edgeopt.quantize(path, edgeopt.Int8Config(), list(data), output=tmp_path / "q.onnx", check_speed=False,
                              goal=edgeopt.AccuracyGoal(min_sqnr_db=25.0))
    scores, indices = report.fidelity.outputs
    assert scores.signal and not indices.signal and indices.top1_agreement < 1.0
    assert report.search.met and report.search.best_excluded == ()  # the scores' SQNR alone meets 25 dB
    np.save(tmp_path / "calib.npy", data[:8, 0])  # 8 samples of [16, 8]
    result = cli("compare", path, tmp_path / "q.onnx", "--data", tmp_path / "calib.npy")
    assert result.code == 0
    row = next(line for line in result.stdout.splitlines() if line.startswith("│ y "))
    assert row.split("│")[2].strip() == "-" and row.split("│")[3].strip() == "-"


def test_the_sqnr_goal_refuses_a_model_whose_outputs_are_all_integer(tmp_path, cli):
    # ArgMax alone: with no output to measure, every round scored -inf and the search returned every
    # node to float before giving up ("no quantized node left"), the goal not met
    rng = np.random.default_rng(1)
    path = _argmax_model(tmp_path / "argmax.onnx", rng)
    np.save(tmp_path / "calib.npy", rng.standard_normal((8, 16, 8)).astype(np.float32))
    result = cli("quantize", path, "-o", tmp_path / "q.onnx", "--data", tmp_path / "calib.npy", "--min-sqnr", "25")
    assert_one_line_error(result, "every output of the model (y) is integer")
    assert not (tmp_path / "q.onnx").exists()


def test_a_float_node_reading_a_graph_input_reads_it_exactly(tmp_path):
    # x feeds a MatMul (int8, so x gets a Q/DQ pair) and an Identity that is a graph output: the copy
    # read x_dequantized, so an output that only passes the input on came out rounded (40 dB)
    from onnx import helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Identity", ["x"], ["copy"])]
    graph = helper.make_graph(nodes, "copy", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4]),
                               helper.make_tensor_value_info("copy", onnx.TensorProto.FLOAT, [1, 8])],
                              [onnx.numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")])
    path = tmp_path / "copy.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    data = list(rng.standard_normal((32, 1, 8)).astype(np.float32))
    report = edgeopt.quantize(path, edgeopt.Int8Config(), data, check_speed=False)
    rows = {row.name: row for row in report.fidelity.outputs}
    assert rows["copy"].max_abs_error == 0.0 and rows["y"].sqnr_db > 30
    assert any(node.op_type == "QuantizeLinear" for node in report.model.graph)  # the MatMul still reads int8


def _matmul_relu(tmp_path, scale: float = 100.0):
    from onnx import helper

    weight = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32) * scale
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 8])],
                              [onnx.numpy_helper.from_array(weight, "W")])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_fp16_checks_the_first_batch_of_a_one_shot_generator_too(tmp_path):
    # the range check read the first batch for typing and lost it: an overflow only there went unseen
    path = _matmul_relu(tmp_path)
    rng = np.random.default_rng(1)
    batches = [{"x": rng.standard_normal((1, 16)).astype(np.float32) * (1000 if i == 0 else 1)} for i in range(10)]
    report = edgeopt.quantize(path, edgeopt.Fp16Config(), (batch for batch in batches), check_speed=False)
    assert any("exceed" in note and "on 10 calibration batch" in note for note in report.result.notes), \
        report.result.notes


def test_in_memory_models_take_input_shapes_and_a_proto_must_carry_its_weights(tmp_path):
    # input_shapes were dropped for an onnx_ir/ModelProto model; a proto loaded without its external
    # data read whatever file of that name the current folder held
    from edgeopt.errors import ModelError

    path = _matmul_relu(tmp_path)
    proto = onnx.load(path)
    assert edgeopt.inspect(proto, input_shapes={"x": [4, 16]}).inputs[0].shape == (4, 16)
    onnx.save(proto, tmp_path / "external.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="external.data", size_threshold=0)
    without = onnx.load(tmp_path / "external.onnx", load_external_data=False)
    with pytest.raises(ModelError, match="external data files it was loaded without"):
        edgeopt.inspect(without)


def test_fp16_with_float16_inputs_is_compared_on_float32_data(tmp_path):
    # fp16 without float32 IO took float16 inputs: compare and quantize's fidelity check fed float32
    path = _matmul_relu(tmp_path, scale=1.0)
    data = [{"x": np.random.default_rng(2).standard_normal((1, 16)).astype(np.float32)} for _ in range(8)]
    report = edgeopt.quantize(path, edgeopt.Fp16Config(keep_io_float32=False), data, output=tmp_path / "h.onnx",
                              check_speed=False)
    assert report.fidelity.outputs[0].sqnr_db > 50
    assert edgeopt.compare(path, tmp_path / "h.onnx", data).outputs[0].sqnr_db > 50


def test_the_mcu_target_warns_about_float_nodes_compile_refuses(tmp_path):
    # a Floor has no int8 path and stays float: compile refuses the model,
    # so quantize --target mcu says so (only a data-movement node passing values on is lowered as a copy)
    from onnx import helper

    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal(shape).astype(np.float32)
               for name, shape in (("W", (8, 8)), ("B", (8,)), ("W2", (8, 4)), ("B2", (4,)))}
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["g1"], name="g1"),
             helper.make_node("Floor", ["g1"], ["r"], name="floor"),
             helper.make_node("Gemm", ["r", "W2", "B2"], ["y"], name="g2")]
    path = _save(tmp_path, "gemm_floor", nodes, weights, [1, 8], [1, 4])
    data = [{"x": rng.standard_normal((1, 8)).astype(np.float32)} for _ in range(16)]
    report = edgeopt.quantize(path, edgeopt.Int8Config(target=edgeopt.Target.MCU), data, check_speed=False)
    assert any("floor" in w and "cannot become C" in w for w in report.warnings), report.warnings


def test_the_mcu_target_warns_about_a_loop_reading_the_input_from_outside_its_body(tmp_path):
    """tf2onnx's Keras 3 RNN: a Loop whose listed inputs are constants (trip count, a counter) but whose body
    reads the model input from the graph around it, and whose first output is the int64 counter. It was not
    listed as float (its first output is no float) nor warned about (taken as computed from shapes alone), and
    compile then refused the model."""
    from onnx import TensorProto, helper, numpy_helper

    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["counter_in", "one"], ["counter_out"]),
         helper.make_node("Gather", ["x", "i"], ["step"], axis=0),  # the model input, read from outside
         helper.make_node("Tanh", ["step"], ["scan"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("counter_in", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("counter_out", TensorProto.INT64, []),
         helper.make_tensor_value_info("scan", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(np.array(1, np.int64), "one")])
    nodes = [helper.make_node("Loop", ["trip", "cond", "counter"], ["count", "steps"], name="while_loop", body=body),
             helper.make_node("Reshape", ["steps", "shape"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "W", "B"], ["y"], name="dense")]
    rng = np.random.default_rng(0)
    weights = {"trip": np.array(4, np.int64), "cond": np.array(True), "counter": np.array(0, np.int64),
               "shape": np.array([1, 32], np.int64), "W": rng.standard_normal((32, 4)).astype(np.float32),
               "B": np.zeros(4, np.float32)}
    path = _save(tmp_path, "outer_scope_loop", nodes, weights, [4, 1, 8], [1, 4])
    data = [{"x": rng.standard_normal((4, 1, 8)).astype(np.float32)} for _ in range(16)]
    report = edgeopt.quantize(path, edgeopt.Int8Config(target=edgeopt.Target.MCU), data, check_speed=False)
    assert "while_loop" in [node.node_name for node in report.result.float_nodes]
    assert any("while_loop" in w and "cannot become C" in w and "export it as an ONNX LSTM, GRU or RNN op" in w
               for w in report.warnings), report.warnings


def test_compare_sorts_by_the_loss_inside_each_node_when_asked(cli, tmp_path):
    out = tmp_path / "q.onnx"
    assert cli("quantize", demo_model_path(), "--data", demo_calibration_path(), "-o", out,
               "--no-speed-check").code == 0
    result = cli("compare", demo_model_path(), out, "--data", demo_calibration_path(), "--sort", "lost", "--json")
    assert result.code == 0, result.stderr
    losses = [row["lost_db"] for row in json.loads(result.stdout)["layers"] if row["lost_db"] is not None]
    assert losses == sorted(losses, reverse=True) and len(losses) > 10
    shown = cli("compare", demo_model_path(), out, "--data", demo_calibration_path(), "--sort", "lost", "--limit", "3")
    assert "largest loss first" in shown.stdout
    assert cli("compare", demo_model_path(), out, "--data", demo_calibration_path(), "--sort", "size").code == 2


def test_an_onnx_ir_model_with_local_functions_is_inlined_as_a_file_is(tmp_path):
    # a file's function calls are inlined on load; an onnx_ir.Model given in memory kept them opaque, so
    # its layers stayed float ('no integer kernel for Two'); the caller's model is left as it was
    import onnx_ir as ir

    from tests.io.test_load import _nested_function_model

    model = ir.load(_nested_function_model(tmp_path / "functions.onnx"))
    before = ir.to_proto(model).SerializeToString()
    data = [{"x": x} for x in np.random.default_rng(5).standard_normal((16, 1, 8)).astype(np.float32)]
    report = edgeopt.quantize(model, edgeopt.Int8Config(), data, check_speed=False)
    assert not report.result.float_nodes
    assert ir.to_proto(model).SerializeToString() == before


def test_a_sample_onnx_runtime_refuses_is_named(cli, tmp_path):
    """Token ids past the vocabulary pass the data checks and fail inside ONNX Runtime: the error named
    neither the file nor the sample, in a folder of thousands."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((10, 4)).astype(np.float32), "table")
    weight = numpy_helper.from_array(rng.standard_normal((4, 2)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w"], ["y"])], "emb",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 2])], [table, weight])
    model = tmp_path / "emb.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), model)
    folder = tmp_path / "ids"
    folder.mkdir()
    for index in range(20):
        np.save(folder / f"s{index}.npy", rng.integers(0, 10 if index != 13 else 50, (1, 5)))
    out = tmp_path / "q.onnx"
    assert_one_line_error(cli("quantize", model, "--data", folder, "-o", out, "--no-speed-check"),
                          f"error: {folder / 's13.npy'}: ONNX Runtime failed to run the model", "vocabulary size")
    assert not out.exists()
    np.save(folder / "s13.npy", np.ones((1, 5), np.int64))
    assert cli("quantize", model, "--data", folder, "-o", out, "--no-speed-check").code == 0
    np.save(folder / "s13.npy", np.full((1, 5), 50))
    assert_one_line_error(cli("compare", model, out, "--data", folder), f"error: {folder / 's13.npy'}: ONNX Runtime")


def test_a_model_with_no_op_int8_could_run_says_so_instead_of_pointing_at_an_empty_list(tmp_path):
    """A model whose output is a Constant: nothing is kept float, so there is no list above to point to."""
    import edgeopt

    value = onnx.numpy_helper.from_array(np.ones((1, 4), np.float32), "value")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Constant", [], ["y"], name="constant", value=value)], "constant",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "constant.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    data = [{"x": np.full((1, 4), float(i), np.float32)} for i in range(4)]
    report = edgeopt.quantize(path, edgeopt.Int8Config(), data, check_fidelity=False, check_speed=False)
    assert not report.result.float_nodes
    [warning] = [w for w in report.warnings if w.startswith("no node runs in int8")]
    assert "listed above" not in warning and "no Conv, Gemm, MatMul" in warning, warning


def test_time_budgets_are_read_as_people_write_them():
    # "1m30s", "10min" and "20sec" were refused ("write it like 90s, 10m or 1h")
    from edgeopt.cli.app import _seconds

    assert [_seconds(text) for text in ("90s", "10m", "1h", "1m30s", "10min", "20sec", "1.5m", "1h30m", "2 min",
                                        "45")] == [90, 600, 3600, 90, 600, 20, 90, 5400, 120, 45]
    for text in ("1d", "abc", "", "m"):
        with pytest.raises(ConfigError, match="write it like 90s, 10m, 1m30s or 1h"):
            _seconds(text)


def test_a_weights_file_left_beside_the_output_by_an_earlier_model_is_warned_about(cli, tmp_path, calib):
    # a model past 2 GB wrote OUT.onnx.data; a small one written whole to OUT.onnx left it there, unread
    (tmp_path / "q.onnx.data").write_bytes(b"old weights")
    result = cli("quantize", demo_model_path(), "--data", calib, "-o", tmp_path / "q.onnx", "--no-speed-check")
    assert result.code == 0, result.stderr
    assert "q.onnx.data is left from an earlier model: q.onnx is written whole and does not read it" in result.stderr
    assert (tmp_path / "q.onnx.data").read_bytes() == b"old weights"  # not edgeopt's to delete

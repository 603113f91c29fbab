"""edgeopt compile / verify, and run / bench on a compiled folder, as a user meets them (issue 4)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "runtime"))
sys.path.insert(0, str(Path(__file__).parents[1]))

import qdq_models as q  # noqa: E402
from edgeopt import api  # noqa: E402
from edgeopt.errors import DataError  # noqa: E402
from edgeopt.runtime.reference import ReferenceModel  # noqa: E402
from tests.conftest import assert_one_line_error  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None,
                                reason="needs gcc and make")


def _batches(model, count, seed=0):
    return [dict(batch) for batch in q.calibration_batches(model, count, seed=seed)]


@pytest.fixture(scope="module")
def qdq_path(tmp_path_factory) -> Path:
    """residual_add (conv, residual Add, Sigmoid gate, Mul) quantized by edgeopt for the MCU target."""
    from edgeopt.quant import Int8Config, Target

    folder = tmp_path_factory.mktemp("models")
    float_model = q.float_model("residual_add")
    onnx.save(float_model, str(folder / "net.onnx"))
    api.quantize(folder / "net.onnx", Int8Config(target=Target.MCU), _batches(float_model, 16),
                 output=folder / "net.int8.onnx", check_fidelity=False, check_speed=False)
    return folder / "net.int8.onnx"


@pytest.fixture(scope="module")
def compiled(qdq_path, tmp_path_factory) -> Path:
    from edgeopt.cli.main import _run

    out = tmp_path_factory.mktemp("c") / "out"
    assert _run(["compile", str(qdq_path), "--target", "c", "-o", str(out), "--device", "cortex-m7"]) == 0
    return out


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    for index, batch in enumerate(_batches(q.float_model("residual_add"), 4, seed=1)):
        np.save(folder / f"{index}.npy", batch["input"])
    return folder


def test_compile_writes_the_project_report_and_memory_map(compiled):
    assert {"model.c", "model.h", "kernels.c", "kernels.h", "main.c", "bench.c", "Makefile", "report.json",
            "memory_map.json", "edgeopt_c.json", "reference.onnx"} <= {p.name for p in compiled.iterdir()}
    report = json.loads((compiled / "report.json").read_text())
    assert {"arena_bytes", "lower_bound_bytes", "weights_bytes", "code_bytes", "flash_bytes", "ram_bytes",
            "stack_bytes_estimate", "device_latency_ms_estimate", "fit", "host"} <= set(report)
    assert report["lower_bound_bytes"] <= report["arena_bytes"] <= report["greedy_arena_bytes"]
    assert report["flash_bytes"] == report["weights_bytes"] + report["code_bytes"] > report["weights_bytes"] > 0
    assert report["ram_bytes"] == report["arena_bytes"] + report["stack_bytes_estimate"]
    assert report["host"]["latency_ms"] > 0 and report["device"]["name"] == "cortex-m7"
    assert report["fit"]["fits"] and report["fit"]["sram_spare_bytes"] == 512 * 1024 - report["ram_bytes"]
    # the C's buffers: an NCHW input is stored NHWC, and the report says which ONNX axis each stored axis is
    (entry,) = report["inputs"]
    assert entry["layout"] == [0, 2, 3, 1] and len(entry["stored_shape"]) == 4 and report["outputs"]
    memory_map = json.loads((compiled / "memory_map.json").read_text())
    assert memory_map["arena_bytes"] == report["arena_bytes"]
    assert all(t["offset"] + t["bytes"] <= report["arena_bytes"] for t in memory_map["tensors"])


def test_compile_prints_the_report(cli, qdq_path, tmp_path):
    result = cli("compile", qdq_path, "-o", tmp_path / "out", "--device", "cortex-m4", "--no-measure")
    assert result.code == 0, result.stderr
    for fragment in ("arena", "lower bound", "weights", "cortex-m4", "STM32F446RE", "(estimate",
                     "in 'input' int8 [", "= ONNX axes [0, 2, 3, 1]"):
        assert fragment in result.stdout, fragment


def test_verify_is_bit_exact(cli, compiled, data_folder):
    result = cli("verify", compiled, "--data", data_folder)
    assert result.code == 0, result.stderr
    assert "bit-exact: 4 samples" in result.stdout
    report = json.loads(cli("verify", compiled, "--data", data_folder, "--json").stdout)
    assert report["bit_exact"] and report["tensors_compared"] > 4


def test_verify_of_no_samples_is_an_error_not_bit_exact(cli, compiled, tmp_path, monkeypatch):
    # a module:function returning no batches printed "bit-exact: 0 sample(s), 0 tensors compared", exit 0
    (tmp_path / "no_batches.py").write_text("def batches():\n    return []\n")
    monkeypatch.chdir(tmp_path)
    result = cli("verify", compiled, "--data", "no_batches:batches")
    assert_one_line_error(result, "gave no samples")
    assert "bit-exact" not in result.stdout
    with pytest.raises(DataError, match="gave no samples"):
        api.verify(compiled, [])


def test_verify_names_the_layer_that_differs(cli, compiled, data_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(compiled, broken)
    source = broken / "model.c"
    text = source.read_text()
    marker = re.search(r"static const int32_t op0_bias\[\d+\] = \{\n    ", text).group(0)
    source.write_text(text.replace(marker, marker + "100000 + "))
    result = cli("verify", broken, "--data", data_folder)
    assert_one_line_error(result, "differs from the reference at step 0", "conv2d")


def test_run_folder_matches_the_reference(cli, compiled, qdq_path, tmp_path):
    x = np.concatenate([b["input"] for b in _batches(q.float_model("residual_add"), 5, seed=2)])
    np.save(tmp_path / "x.npy", x)
    result = cli("run", compiled, "--input", f"input={tmp_path / 'x.npy'}", "-o", tmp_path / "out")
    assert result.code == 0, result.stderr
    reference = ReferenceModel(api.load(qdq_path))
    name = reference.output_names[0]
    expected = np.concatenate([reference.run_float({"input": x[i:i + 1]})[name] for i in range(len(x))])
    np.testing.assert_array_equal(np.load(tmp_path / "out" / f"{name}.npy"), expected)


def test_run_folder_passes_int8_inputs_as_they_are(compiled, qdq_path):
    reference = ReferenceModel(api.load(qdq_path))
    info = reference.program.tensors[reference.program.inputs[0].tensor]
    x = np.random.default_rng(3).integers(-128, 128, size=info.logical_shape).astype(np.int8)
    ours = api.run(compiled, {"input": x}).outputs
    theirs = reference.run_float({"input": x})
    np.testing.assert_array_equal(ours[reference.output_names[0]], theirs[reference.output_names[0]])


def test_run_folder_checks_its_inputs_as_running_a_model_does(compiled):
    # "missing model input(s): input" for a misnamed input; "holds NaN or Inf values" without the sample
    from edgeopt.codegen.c.host import HostProgram

    spec = HostProgram(compiled).input_specs[0]
    x = np.zeros((3, *spec.shape[1:]), np.float32)
    with pytest.raises(DataError, match="has data for 'x', which is not a model input"):
        api.run(compiled, {"x": x[:1]})
    x[1].flat[0] = np.nan
    with pytest.raises(DataError, match=rf"\[sample 1\] holds NaN values in input '{spec.name}'"):
        api.run(compiled, {spec.name: x})
    assert api.run(compiled, {spec.name: x[[0, 2]]}).samples == 2


def test_bench_folder_next_to_onnx(cli, compiled, qdq_path):
    result = cli("bench", compiled, qdq_path, "--runs", "20", "--json")
    assert result.code == 0, result.stderr
    rows = json.loads(result.stdout)["models"]
    assert "[C, host gcc -O2]" in rows[0]["name"] and rows[0]["median_ms"] > 0 and rows[0]["runs"] == 20
    assert rows[1]["name"] == qdq_path.name


def test_unsupported_ops_are_listed_with_their_nodes_before_writing(cli, tmp_path):
    b = q._Builder(1)
    x = b.node("Floor", [b.node("Relu", [b.conv("input", 3, 4)])])
    x = b.node("Floor", [b.conv(x, 4, 4, k=1)])
    path = tmp_path / "floor.onnx"
    onnx.save(q.quantize_with_ort(b.model(b.conv(x, 4, 4, k=1), (1, 3, 8, 8))), str(path))
    result = cli("compile", path, "-o", tmp_path / "out")
    assert_one_line_error(result, "cannot lower 2 ops to integer kernels", "Floor (floor5_node)",
                          "Floor (floor9_node)")
    assert not (tmp_path / "out").exists()


def test_float_model_says_quantize_first(cli, tmp_path):
    path = tmp_path / "float.onnx"
    onnx.save(q.float_model("conv_relu"), str(path))
    assert_one_line_error(cli("compile", path, "-o", tmp_path / "out"), "edgeopt quantize")


def test_existing_folder_is_not_overwritten_without_force(cli, qdq_path, tmp_path):
    assert cli("compile", qdq_path, "-o", tmp_path / "out", "--no-measure").code == 0
    assert_one_line_error(cli("compile", qdq_path, "-o", tmp_path / "out", "--no-measure"), "--force")
    assert cli("compile", qdq_path, "-o", tmp_path / "out", "--no-measure", "--force").code == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "mine.txt").write_text("keep")
    assert_one_line_error(cli("compile", qdq_path, "-o", tmp_path / "mine", "--no-measure", "--force"),
                          "did not write", "mine.txt")
    assert (tmp_path / "mine" / "mine.txt").read_text() == "keep"


def test_force_never_removes_the_current_folder_or_follows_a_link(cli, qdq_path, tmp_path, monkeypatch):
    assert cli("compile", qdq_path, "-o", tmp_path / "out", "--no-measure").code == 0
    monkeypatch.chdir(tmp_path / "out")  # inside the compiled folder: -o . would delete where the user stands
    assert_one_line_error(cli("compile", qdq_path, "-o", ".", "--no-measure", "--force"), "current folder")
    assert (tmp_path / "out" / "model.c").exists()
    (tmp_path / "empty").mkdir()  # an empty current folder too (it was deleted, or an internal error)
    monkeypatch.chdir(tmp_path / "empty")
    for force in ((), ("--force",)):
        for here in (".", str(tmp_path / "empty")):
            assert_one_line_error(cli("compile", qdq_path, "-o", here, "--no-measure", *force), "current folder")
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())
    (tmp_path / "link").symlink_to(tmp_path / "out")
    assert_one_line_error(cli("compile", qdq_path, "-o", tmp_path / "link", "--no-measure", "--force"),
                          "symbolic link")
    assert (tmp_path / "out" / "model.c").exists()


def test_the_input_model_is_never_replaced(cli, qdq_path, tmp_path):
    """A model inside a compiled folder (its reference.onnx, or one the user put there) would go with it."""
    assert cli("compile", qdq_path, "-o", tmp_path / "out", "--no-measure").code == 0
    inside = tmp_path / "out" / "reference.onnx"
    before = inside.read_bytes()
    assert_one_line_error(cli("compile", inside, "-o", tmp_path / "out", "--no-measure", "--force"),
                          "inside the output folder")
    assert inside.read_bytes() == before
    assert_one_line_error(cli("compile", qdq_path, "-o", qdq_path, "--no-measure", "--force"), "is a file")
    np.save(tmp_path / "x.npy", np.zeros(1, dtype=np.float32))
    assert_one_line_error(cli("run", qdq_path, "-i", tmp_path / "x.npy", "-o", qdq_path), "is a file")


def test_an_output_folder_that_cannot_be_created_is_refused_before_any_work(cli, qdq_path, tmp_path):
    # -o below a file (or in /proc) was an internal error from mkdtemp, after the code was generated
    (tmp_path / "taken").write_text("mine")
    result = cli("compile", qdq_path, "-o", tmp_path / "taken" / "out", "--no-measure")
    assert_one_line_error(result, "cannot create the output folder", "taken")
    assert result.code != 70 and (tmp_path / "taken").read_text() == "mine"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if not os.access(locked, os.W_OK):  # root writes anywhere
        assert_one_line_error(cli("compile", qdq_path, "-o", locked / "out", "--no-measure"), "not writable")
    if Path("/proc/self").is_dir():  # writable by its mode, yet no folder can be made there
        assert_one_line_error(cli("compile", qdq_path, "-o", "/proc/edgeopt-out", "--no-measure"),
                              "cannot create the output folder /proc/edgeopt-out")


def test_device_too_small_writes_the_code_says_bytes_missing_and_the_build_fails(cli, qdq_path, tmp_path):
    board = tmp_path / "tiny.yaml"
    board.write_text("board: a test board\nflash_bytes: 4 KiB\nsram_bytes: 1 KiB\nclock_mhz: 16\n"
                     "int8_macs_per_cycle: 0.25\nfp32_macs_per_cycle: 0.01\n")
    result = cli("compile", qdq_path, "-o", tmp_path / "out", "--device", board)
    assert_one_line_error(result, "does not fit tiny", "bytes missing", "check fails")
    assert (tmp_path / "out" / "model.c").exists() and (tmp_path / "out" / "report.json").exists()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["fit"]["sram_spare_bytes"] < 0 and report["fit"]["flash_spare_bytes"] < 0
    build = subprocess.run(["make", "-s"], cwd=tmp_path / "out", capture_output=True, text=True)
    assert build.returncode != 0 and "eo_arena_fits_device" in build.stderr
    # under --json, one object: the report with its error (it printed the report, then the error, two documents)
    as_json = cli("compile", qdq_path, "-o", tmp_path / "again", "--device", board, "--json")
    printed = json.loads(as_json.stdout)
    assert as_json.code == result.code and "does not fit tiny" in printed["error"]["message"]
    assert printed["fit"]["sram_spare_bytes"] < 0


def test_bad_device_and_target(cli, qdq_path, tmp_path):
    assert_one_line_error(cli("compile", qdq_path, "-o", tmp_path / "out", "--device", "pdp-11"),
                          "unknown device 'pdp-11'", "cortex-m4")
    assert cli("compile", qdq_path, "-o", tmp_path / "out", "--target", "verilog").code == 2


def test_verify_and_run_need_a_compiled_folder(cli, tmp_path, data_folder):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(cli("verify", tmp_path / "empty", "--data", data_folder), "edgeopt compile")


def test_a_dynamic_model_compiles_with_input_shape(cli, tmp_path):
    """The error about a dynamic input names --input-shape, which compile takes."""
    from edgeopt.quant import Int8Config, Target
    from tests.models import dynamic_input_model

    float_path = dynamic_input_model(tmp_path / "dynamic.onnx")
    calibration = np.random.default_rng(0).normal(size=(16, 1, 3, 12, 12)).astype(np.float32)
    quantized = tmp_path / "dynamic.int8.onnx"
    api.quantize(float_path, Int8Config(target=Target.MCU), [{"input": x} for x in calibration], output=quantized,
                 check_speed=False, check_fidelity=False)
    assert_one_line_error(cli("compile", quantized, "-o", tmp_path / "c", "--no-measure"), "--input-shape input=")
    assert cli("compile", quantized, "-o", tmp_path / "c", "--no-measure", "--input-shape", "input=1x3x12x12").code == 0
    assert api.verify(tmp_path / "c", [{"input": x} for x in calibration[:2]]).bit_exact


def test_weights_alone_over_flash_miss_without_measuring_and_the_build_check_is_not_blamed(cli, qdq_path, tmp_path):
    plain = json.loads(cli("compile", qdq_path, "-o", tmp_path / "plain", "--no-measure", "--json").stdout)
    board = tmp_path / "small_flash.yaml"
    board.write_text(f"board: a test board\nflash_bytes: {plain['weights_bytes'] - 1}\nsram_bytes: 1 MiB\n"
                     "clock_mhz: 16\nint8_macs_per_cycle: 0.25\nfp32_macs_per_cycle: 0.01\n")
    result = cli("compile", qdq_path, "-o", tmp_path / "out", "--device", board, "--no-measure")
    assert_one_line_error(result, "does not fit", "weights alone", "at least 1 bytes missing")
    assert "build check" not in result.stderr  # the Makefile checks the arena only, and that fits
    assert subprocess.run(["make", "-s"], cwd=tmp_path / "out", capture_output=True).returncode == 0


def test_a_ctrl_c_during_the_host_measurement_keeps_the_project_and_writes_its_report(cli, qdq_path, tmp_path,
                                                                                       monkeypatch):
    # the folder was left without report.json, and "exit 130, error: interrupted" said nothing of what was there
    import edgeopt.codegen.c.report as report_module

    def interrupted(out_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module, "measure_host", interrupted)
    result = cli("compile", qdq_path, "-o", tmp_path / "c")
    assert result.code == 130, result.stderr
    assert "the C project in" in result.stderr and "its host measurement was not" in result.stderr
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["host"] is None and report["arena_bytes"] > 0


def test_verify_of_a_missing_or_foreign_folder_is_an_input_error_not_a_build_error(cli, tmp_path, data_folder):
    # both exited 7, the code of a failed code generation or build
    missing = cli("verify", tmp_path / "nothere", "--data", data_folder)
    assert missing.code == 2 and "nothere not found: give the folder `edgeopt compile --target c` wrote" in \
        missing.stderr
    foreign = cli("verify", tmp_path, "--data", data_folder)
    assert foreign.code == 2 and "is not a folder written by `edgeopt compile --target c`" in foreign.stderr

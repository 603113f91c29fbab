"""What a Python script does with the API and expects to work: NumPy scalars from a sweep, the CLI's words
in a config, torch tensors as data, warnings through :mod:`warnings`, saving and printing a report."""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pytest

import edgeopt
from edgeopt.demo import demo_calibration_path, demo_model_path
from edgeopt.errors import ConfigError, EdgeoptWarning


@pytest.fixture(scope="module")
def data():
    return np.load(demo_calibration_path())[:32]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_numpy_scalars_from_a_sweep_are_the_numbers_they_hold():
    # np.float32(99.9) was refused with "percentile must be in (50, 100], got np.float32(99.9)"
    config = edgeopt.Int8Config(percentile=np.float32(99.9), num_bins=np.int64(2048), equalize=np.bool_(True),
                                smoothquant_alpha=np.linspace(0.25, 0.75, 3)[1])
    assert config == edgeopt.Int8Config(percentile=99.9, num_bins=2048, equalize=True, smoothquant_alpha=0.5)
    assert type(config.percentile) is float and type(config.num_bins) is int and type(config.equalize) is bool
    assert edgeopt.PerBlock(size=np.arange(16, 80, 16)[1]) == edgeopt.PerBlock(size=32)
    goal = edgeopt.AccuracyGoal(min_sqnr_db=np.float32(30), max_float_nodes=np.int64(3))
    assert (goal.min_sqnr_db, goal.max_float_nodes) == (30.0, 3)
    assert edgeopt.BenchConfig(runs=np.int32(5)).runs == 5
    assert edgeopt.Fp16Config(keep_io_float32=np.bool_(False)).keep_io_float32 is False
    assert edgeopt.ImagePreprocess(mean=(np.float32(0.5),), size=(np.int64(8), np.int64(8))).size == (8, 8)


@pytest.mark.parametrize("config", [lambda: edgeopt.Int8Config(verify_tolerance=True),
                                    lambda: edgeopt.PerChannel(axis=True), lambda: edgeopt.PerBlock(size=True),
                                    lambda: edgeopt.Int8Config(percentile=True)])
def test_a_bool_is_no_number(config):
    with pytest.raises(ConfigError):
        config()


def test_configs_take_the_command_lines_words():
    assert edgeopt.Int8Config(activation_format="uint8") == edgeopt.Int8Config(activation_format=edgeopt.UINT8)
    assert edgeopt.Int8Config(activation_format="INT8").activations is edgeopt.INT8
    assert edgeopt.Int4WeightConfig(weight_format="int4").weight_format is edgeopt.INT4
    assert edgeopt.DynamicInt8Config(embeddings="float") == edgeopt.DynamicInt8Config(embeddings=False)
    assert edgeopt.DynamicInt8Config(embeddings="int8").embeddings is True
    for level in ("int8", 4, edgeopt.AccuracyLevel.INT8):
        assert edgeopt.Int4WeightConfig(accuracy_level=level).accuracy_level is edgeopt.AccuracyLevel.INT8
    with pytest.raises(ConfigError, match=r"activation_format .* must be edgeopt.UINT8 \('uint8'\) or INT8 "
                                          r"\('int8'\), got 'int4'"):
        edgeopt.Int8Config(activation_format="int4")
    with pytest.raises(ConfigError, match="accuracy_level must be None or one of"):
        edgeopt.Int4WeightConfig(accuracy_level=7)
    with pytest.raises(ConfigError, match="embeddings must be True or False, got 'int4'"):
        edgeopt.DynamicInt8Config(embeddings="int4")


def test_the_top_level_names_the_errors_and_results_a_script_catches_and_reads():
    for name in ("EdgeoptError", "ConfigError", "DataError", "ModelError", "OutputError", "UnsupportedOpError",
                 "EdgeoptWarning", "QuantizeReport", "CompareResult", "AccuracyLevel", "Embeddings", "INT4", "UINT4"):
        assert name in edgeopt.__all__ and getattr(edgeopt, name) is not None


def test_torch_tensors_that_require_grad_are_data_like_any_other(tmp_path, data):
    torch = pytest.importorskip("torch")
    # activations captured without torch.no_grad(): numpy refused them with torch's RuntimeError
    tensor = torch.from_numpy(data.copy()).requires_grad_()
    config = edgeopt.Int8Config()
    edgeopt.quantize(demo_model_path(), config, tensor, output=tmp_path / "t.onnx", check_speed=False)
    edgeopt.quantize(demo_model_path(), config, data, output=tmp_path / "a.onnx", check_speed=False)
    assert _sha(tmp_path / "t.onnx") == _sha(tmp_path / "a.onnx")
    compared = edgeopt.compare(demo_model_path(), tmp_path / "a.onnx", tensor[:8])
    assert compared.samples == 8
    outputs = edgeopt.run(demo_model_path(), {"input": tensor[:3]}).outputs["logits"]
    np.testing.assert_array_equal(outputs, edgeopt.run(demo_model_path(), data[:3]).outputs["logits"])
    np.testing.assert_array_equal(outputs, edgeopt.run(demo_model_path(), tensor[:3]).outputs["logits"])


def test_a_progress_that_cannot_be_called_is_refused_before_any_work(tmp_path, data):
    # progress=5 failed with "'int' object is not callable" inside the calibration pass
    with pytest.raises(ConfigError, match="progress must be a function"):
        edgeopt.quantize(demo_model_path(), edgeopt.Int8Config(), data, output=tmp_path / "q.onnx", progress=5)
    with pytest.raises(ConfigError, match="progress must be a function"):
        edgeopt.run(demo_model_path(), data[:2], progress=1)
    with pytest.raises(ConfigError, match="progress must be a function"):
        edgeopt.compare(demo_model_path(), demo_model_path(), data[:2], progress="bar")
    assert not list(tmp_path.iterdir())


def test_a_results_warnings_reach_pythons_warnings_attributed_to_the_caller(data):
    # "only 4 calibration samples" and "the goal was not met" were kept in report.warnings alone
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = edgeopt.quantize(demo_model_path(), edgeopt.Int8Config(), data[:4], check_speed=False)
    issued = [w for w in caught if issubclass(w.category, EdgeoptWarning)]
    assert [str(w.message) for w in issued] == list(report.warnings)
    assert any("only 4 calibration samples" in message for message in report.warnings)
    assert {w.filename for w in issued} == {__file__}


def test_save_writes_what_output_writes_and_the_repr_is_short(tmp_path, data):
    report = edgeopt.quantize(demo_model_path(), edgeopt.Int8Config(), data, output=tmp_path / "out.onnx",
                              check_speed=False)
    saved = report.save(tmp_path / "saved.onnx")
    assert saved.output == tmp_path / "saved.onnx"
    assert _sha(tmp_path / "saved.onnx") == _sha(tmp_path / "out.onnx")
    numbers = json.loads((tmp_path / "saved.report.json").read_text())
    assert numbers["output"] == str(tmp_path / "saved.onnx")
    assert numbers["tensors"] == json.loads((tmp_path / "out.report.json").read_text())["tensors"]
    assert len(repr(report)) < 300 and "scheme='int8'" in repr(report)
    with pytest.raises(ConfigError, match="path must be a path"):
        report.save(None)


def test_outputs_not_ending_in_onnx_keep_reports_of_their_own(tmp_path, data):
    # m.int8 and m.fp16 both wrote m.report.json, the second over the first
    edgeopt.quantize(demo_model_path(), edgeopt.Int8Config(), data, output=tmp_path / "m.int8", check_speed=False)
    edgeopt.quantize(demo_model_path(), edgeopt.Fp16Config(), data, output=tmp_path / "m.fp16", check_speed=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.fp16", "m.fp16.report.json", "m.int8",
                                                           "m.int8.report.json"]
    assert json.loads((tmp_path / "m.int8.report.json").read_text())["scheme"] == "int8"


def test_a_dataloader_of_input_tensors_is_data_and_one_with_labels_is_told_what_to_do(tmp_path, data):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    # its batches are [x] lists: "item 0 is a list, not a dict of arrays keyed by input name"
    loader = DataLoader(TensorDataset(torch.from_numpy(data)), batch_size=8)
    edgeopt.quantize(demo_model_path(), edgeopt.Int8Config(), loader, output=tmp_path / "l.onnx", check_speed=False)
    edgeopt.quantize(demo_model_path(), edgeopt.Int8Config(), data, output=tmp_path / "a.onnx", check_speed=False)
    assert _sha(tmp_path / "l.onnx") == _sha(tmp_path / "a.onnx")
    labelled = DataLoader(TensorDataset(torch.from_numpy(data), torch.zeros(len(data))), batch_size=8)
    with pytest.raises(edgeopt.DataError, match=r"is a list of 2 arrays, and the model takes 1 input \(input\): "
                                                r"yield the inputs alone"):
        edgeopt.quantize(demo_model_path(), edgeopt.Int8Config(), labelled, check_speed=False)


def test_errors_raised_to_python_give_the_python_names_of_the_options_they_name(tmp_path, cli):
    # "give --data" told a script's author of a flag they do not have
    with pytest.raises(ConfigError) as caught:
        edgeopt.quantize(demo_model_path(), edgeopt.Int8Config())
    assert str(caught.value).endswith("give --data (a folder of .npy, images, or module:function) "
                                      "(in Python: --data is data)")
    with pytest.raises(edgeopt.DataError, match=r"\(in Python: --input is inputs\)$"):
        edgeopt.run(demo_model_path(), {"x": np.zeros((1, 1, 8, 8), np.float32)})
    with pytest.raises(ConfigError, match=r"give exactly one accuracy goal: max_drop \(--max-drop, "):
        edgeopt.AccuracyGoal()
    result = cli("quantize", demo_model_path(), "-o", tmp_path / "q.onnx")  # the command line: its words alone
    assert result.code == 4 and "give --data" in result.stderr and "in Python" not in result.stderr


def test_bf16_fits_nothing_to_the_data_it_is_measured_on(data):
    # its fidelity was said to be on "calibration" data, which bfloat16 (float32's range) never reads to decide
    report = edgeopt.quantize(demo_model_path(), edgeopt.Bf16Config(), data, check_speed=False)
    assert report.fidelity_on == "data"

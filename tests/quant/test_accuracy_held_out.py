"""Held-out data for the fidelity check and the ``--min-sqnr`` search (``eval_data``, ``--eval-data``).

Ranges are fitted to the calibration data, so the output SQNR measured on that same data flatters
the model: on inputs reaching beyond the calibrated ranges the int8 model clips. Samples given as
``eval_data`` are what every round of the search and the fidelity check after it are compared on.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import edgeopt
from edgeopt.errors import ConfigError, DataError
from edgeopt.quant.accuracy import AccuracyGoal, accuracy_aware_quantize
from edgeopt.quant.compare import compare_models
from edgeopt.quant.config import CalibrationMethod, Int8Config
from tests.conftest import assert_one_line_error
from tests.quant.int8_models import batches, conv_classifier

SHAPE = (1, 3, 8, 8)
GOAL_DB = 30.0


def _calibration():
    return batches(SHAPE, 16, seed=0)


def _held_out():
    """Inputs of the calibration's kind, but four times as large: beyond every calibrated range."""
    return [{"x": feed["x"] * 4} for feed in batches(SHAPE, 16, seed=1)]


def _output_sqnr(model, quantized, data) -> float:
    return compare_models(model, quantized, data).worst_output_sqnr()


def test_the_search_compares_each_round_on_the_held_out_data():
    model, config = conv_classifier(), Int8Config(calibration=CalibrationMethod.MINMAX)
    goal = AccuracyGoal(min_sqnr_db=GOAL_DB)
    flattered = accuracy_aware_quantize(model, config, _calibration(), goal)
    # measured on its own calibration data the int8 model meets the goal at once, yet clips on new inputs
    assert flattered.met and flattered.best_excluded == () and flattered.measured_on == "calibration"
    assert _output_sqnr(model, flattered.result.model, _held_out()) < GOAL_DB

    honest = accuracy_aware_quantize(model, config, _calibration(), goal, measure_data=_held_out())
    assert honest.met and honest.best_excluded and honest.measured_on == "held-out"
    assert honest.to_dict()["measured_on"] == "held-out"
    # the score it reports is the held-out one, and the model written meets the goal there
    held_out_sqnr = _output_sqnr(model, honest.result.model, _held_out())
    assert honest.best_score == pytest.approx(held_out_sqnr) and held_out_sqnr >= GOAL_DB


def test_the_fidelity_check_runs_on_the_held_out_data_when_given(tmp_path):
    model = conv_classifier()
    report = edgeopt.quantize(model, Int8Config(), _calibration(), eval_data=_held_out()[:10], check_speed=False)
    assert report.fidelity_on == "held-out" and report.fidelity.rows == 10
    assert report.fidelity.worst_output_sqnr() == pytest.approx(
        _output_sqnr(model, report.model, _held_out()[:10]))
    as_dict = report.to_dict()
    assert as_dict["fidelity_on"] == "held-out"
    plain = edgeopt.quantize(model, Int8Config(), _calibration(), check_speed=False)
    assert plain.fidelity_on == "calibration" and plain.fidelity.rows == 16
    # --max-samples limits the calibration data, not the held-out samples measured on
    limited = edgeopt.quantize(model, Int8Config(), _calibration(), max_samples=4, eval_data=_held_out()[:10],
                               check_speed=False)
    assert limited.fidelity.rows == 10


def test_held_out_data_for_an_fp16_model_without_calibration_data_is_measured_on(tmp_path):
    report = edgeopt.quantize(conv_classifier(), edgeopt.Fp16Config(), eval_data=_held_out()[:4],
                              check_speed=False)
    assert report.fidelity_on == "held-out" and report.fidelity.rows == 4


def test_held_out_data_that_cannot_serve_is_refused_before_anything_runs(tmp_path):
    model, out = conv_classifier(), tmp_path / "q.onnx"
    with pytest.raises(ConfigError, match="--eval-data is read more than once"):
        edgeopt.quantize(model, Int8Config(), _calibration(), eval_data=iter(_held_out()), output=out)
    with pytest.raises(ConfigError, match="neither runs"):
        edgeopt.quantize(model, Int8Config(), _calibration(), eval_data=_held_out(), check_fidelity=False,
                         output=out)
    read = []

    class Calibration:  # records whether the calibration ran
        def __iter__(self):
            read.append(True)
            return iter(_calibration())

    # a wrong input name in the held-out samples is found before the calibration, not after it
    with pytest.raises(DataError, match="'y'"):
        edgeopt.quantize(model, Int8Config(), Calibration(), eval_data=[{"y": np.zeros(SHAPE, np.float32)}],
                         output=out)
    with pytest.raises(DataError, match="--eval-data gave no samples"):
        edgeopt.quantize(model, Int8Config(), Calibration(), eval_data=[], output=out)
    assert not read and not out.exists()


@pytest.fixture
def npy_files(tmp_path):
    calibration, held_out = tmp_path / "calib.npy", tmp_path / "held.npy"
    np.save(calibration, np.concatenate([feed["x"] for feed in _calibration()]))
    np.save(held_out, np.concatenate([feed["x"] for feed in _held_out()[:6]]))
    model = tmp_path / "model.onnx"
    from edgeopt.io import save_model

    save_model(conv_classifier(), model)
    return model, calibration, held_out


def test_the_cli_says_what_the_search_and_the_fidelity_check_measured_on(cli, tmp_path, npy_files):
    model, calibration, held_out = npy_files
    result = cli("quantize", model, "--data", calibration, "--eval-data", held_out, "--min-sqnr", str(GOAL_DB),
                 "--calibration", "minmax", "-o", tmp_path / "q.onnx", "--no-speed-check")
    assert result.code == 0, result.stderr
    assert "each round compared on the held-out data" in result.stdout
    assert "(on 6 held-out samples)" in result.stdout
    as_json = cli("quantize", model, "--data", calibration, "--eval-data", held_out, "-o", tmp_path / "r.onnx",
                  "--no-speed-check", "--json")
    assert json.loads(as_json.stdout)["fidelity_on"] == "held-out"


def test_a_missing_held_out_file_is_one_clear_line(cli, tmp_path, npy_files):
    model, calibration, _ = npy_files
    result = cli("quantize", model, "--data", calibration, "--eval-data", tmp_path / "nope.npy",
                 "-o", tmp_path / "q.onnx")
    assert_one_line_error(result, "--eval-data: ", "nope.npy")
    assert not (tmp_path / "q.onnx").exists()


def test_the_fidelity_check_says_it_read_only_the_first_64_calibration_samples(cli, tmp_path, npy_files):
    # it said "(on 64 calibration samples)" of 80 given, and a goal met on those was taken as met on all
    model, _, _ = npy_files
    calibration = tmp_path / "eighty.npy"
    np.save(calibration, np.random.default_rng(5).standard_normal((80, *_calibration()[0]["x"].shape[1:]))
            .astype(np.float32))
    result = cli("quantize", model, "--data", calibration, "-o", tmp_path / "q.onnx", "--no-speed-check")
    assert result.code == 0, result.stderr
    assert "(on the first 64 calibration samples of 80)" in result.stdout
    searched = cli("quantize", model, "--data", calibration, "--min-sqnr", "20", "-o", tmp_path / "s.onnx",
                   "--no-speed-check")
    assert "each round compared on the calibration data (its first 64 samples at most)" in searched.stdout


def test_a_held_out_set_of_a_few_samples_is_warned_about(cli, tmp_path, npy_files):
    # the search judged its rounds "on 3 held-out samples" without a word; calibrating on as few warns
    model, calibration, held_out = npy_files
    few = tmp_path / "few.npy"
    np.save(few, np.load(held_out)[:3])
    result = cli("quantize", model, "--data", calibration, "--eval-data", few, "-o", tmp_path / "q.onnx",
                 "--no-speed-check")
    assert result.code == 0, result.stderr
    warned = "only 3 held-out samples: the fidelity figures (and an accuracy search's rounds) rest on them"
    assert warned in result.stderr


def test_the_fidelity_line_says_when_it_measured_the_first_64_held_out_samples_only(cli, tmp_path, npy_files):
    # "(on 64 held-out samples)" of 100 given: the check reads at most 64, and the line did not say so
    model, calibration, _ = npy_files
    held_out = tmp_path / "held100.npy"
    np.save(held_out, np.concatenate([feed["x"] for feed in batches((1, 3, 8, 8), 100, seed=7)]))
    result = cli("quantize", model, "--data", calibration, "--eval-data", held_out, "-o", tmp_path / "q.onnx",
                 "--no-speed-check")
    assert result.code == 0, result.stderr
    assert "(on the first 64 held-out samples of 100)" in result.stdout
    as_json = cli("quantize", model, "--data", calibration, "--eval-data", held_out, "-o", tmp_path / "r.onnx",
                  "--no-speed-check", "--json")
    assert json.loads(as_json.stdout)["eval_samples"] == 100

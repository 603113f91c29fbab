"""Dynamic int8 on a decoder with LLM-style activation outliers (``with_outlier_channels``: three RMSNorm
channels 30x larger, the same float function): SmoothQuant and the accuracy search, against ONNX Runtime's
``quantize_dynamic``."""

from __future__ import annotations

import functools
import pathlib
import tempfile

import pytest
import torch

import edgeopt
from edgeopt.io import load_model
from edgeopt.metrics import FidelityMeter
from edgeopt.quant.accuracy import AccuracyGoal
from edgeopt.runtime.ort import OrtSession
from tests.llm_models import Decoder, decoder_samples, export_decoder, with_outlier_channels


@functools.cache
def _decoder_bytes() -> bytes:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        return export_decoder(with_outlier_channels(Decoder("llama")), pathlib.Path(folder) / "m.onnx",
                              opset=17).read_bytes()


@pytest.fixture
def decoder(tmp_path) -> pathlib.Path:
    path = tmp_path / "llama_outliers.onnx"
    path.write_bytes(_decoder_bytes())
    return path


def logits_sqnr_db(float_path, quant_path, samples) -> float:
    want, have = (OrtSession(load_model(p, require_static=False)) for p in (float_path, quant_path))
    meter = FidelityMeter()  # energies summed over the samples
    for feed in samples:
        meter.update(want.run(feed)["logits"], have.run(feed)["logits"])
    return meter.result().sqnr_db


def test_smoothquant_takes_the_outliers_where_onnx_runtime_cannot(decoder, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    held_out = decoder_samples(16, seed=2)
    quantize_dynamic(str(decoder), str(tmp_path / "ort.onnx"), weight_type=QuantType.QInt8, per_channel=True)
    edgeopt.quantize(decoder, edgeopt.DynamicInt8Config(smoothquant_alpha=0.5), decoder_samples(16, seed=1),
                     output=tmp_path / "smooth.onnx", check_speed=False)
    theirs = logits_sqnr_db(decoder, tmp_path / "ort.onnx", held_out)
    ours = logits_sqnr_db(decoder, tmp_path / "smooth.onnx", held_out)
    assert ours >= theirs + 6.0, (ours, theirs)  # measured 40.1 against 31.0 dB


def test_the_accuracy_search_returns_the_worst_layers_to_float_until_the_goal(decoder, tmp_path):
    held_out = decoder_samples(16, seed=2)
    edgeopt.quantize(decoder, edgeopt.DynamicInt8Config(), None, output=tmp_path / "plain.onnx", check_speed=False)
    goal = logits_sqnr_db(decoder, tmp_path / "plain.onnx", held_out) + 5.0
    report = edgeopt.quantize(decoder, edgeopt.DynamicInt8Config(), decoder_samples(16, seed=1),
                              goal=AccuracyGoal(min_sqnr_db=goal), eval_data=held_out,
                              output=tmp_path / "searched.onnx", check_speed=False)
    search = report.search
    assert search.met and search.best_excluded and search.calibration_passes == 0
    returned = [node for node in report.result.float_nodes if node.node_name in search.best_excluded]
    assert len(returned) == len(search.best_excluded)
    assert all(node.reason.startswith("returned to float by the accuracy search") for node in returned)
    assert logits_sqnr_db(decoder, tmp_path / "searched.onnx", held_out) >= goal  # on the held-out samples

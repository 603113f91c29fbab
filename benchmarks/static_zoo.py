"""Static int8 on every architecture the tests build: edgeopt next to ONNX Runtime's ``quantize_static``.

Models: ``tests/models.py`` (MobileNetV2/V3-, EfficientNet-, ResNet-style CNNs, a transformer encoder, a
U-Net decoder), ``tests/zoo_models.py`` (SqueezeNet, ShuffleNetV2, DenseNet, GoogLeNet, ResNeXt, ConvNeXt,
MobileViT, GhostNet, a channels-last Keras-style CNN, a U-Net with ConvTranspose), ``tests/vision_models.py``
(a YOLO-style detector, DeepLab, super-resolution, CoordConv) and ``tests/audio_models.py`` (a keyword-spotting
TCN and 2-D CNN, GRU and LSTM models, a Conformer block): seeded, untrained, exported by TorchScript at opset
17, each with its builder's input shape.

Each is quantized from 16 N(0, 1) calibration samples (seed 0) by edgeopt (``Int8Config()``: per-channel int8
weights, uint8 activations) and by ORT (``quantize_static``, QDQ, per-channel, uint8 activations, int8 weights)
with MinMax and with Percentile calibration, and measured on 16 other samples (seed 1): the worst output
SQNR against the float model (dB). A tool that fails to quantize a model, or writes one ONNX Runtime cannot
run, shows the error. Fidelity only: the latency of these small models is per-op overhead (see
``quantize_vs_ort.py`` for latency at realistic sizes).

Run from the repository root (``tests.*`` must be importable)::

    python benchmarks/static_zoo.py [--models densenet,conformer] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import pathlib
import sys
import tempfile
import warnings

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from _common import (chosen_models, environment, environment_markdown, markdown_table,  # noqa: E402
                     ort_quantize_static, publish)

SAMPLES = 16
ORT_METHODS = ("MinMax", "Percentile")


def _builders() -> dict:
    """model name -> (build(tmp_dir) -> path, input shape)."""
    from tests.audio_models import AUDIO_MODELS, build_audio
    from tests.models import TORCH_MODELS, build_onnx
    from tests.vision_models import VISION_MODELS, build_vision
    from tests.zoo_models import ZOO_MODELS, build_zoo

    builders = {name: (lambda tmp, n=name: build_onnx(n, tmp), spec[1]) for name, spec in TORCH_MODELS.items()}
    builders.update({name: (lambda tmp, n=name: build_zoo(n, tmp), spec[1]) for name, spec in ZOO_MODELS.items()})
    builders.update({name: (lambda tmp, n=name: build_vision(n, tmp), spec[1])
                     for name, spec in VISION_MODELS.items()})
    builders.update({name: (lambda tmp, n=name: build_audio(n, tmp), spec[1]) for name, spec in AUDIO_MODELS.items()
                     if name != "conformer_mha"})  # that one exports through dynamo only
    return builders


def _samples(path: pathlib.Path, shape: tuple[int, ...], seed: int) -> list[dict[str, np.ndarray]]:
    import onnx

    name = onnx.load(str(path), load_external_data=False).graph.input[0].name
    rng = np.random.default_rng(seed)
    return [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(SAMPLES)]


def _sqnr(float_path: pathlib.Path, quant_path: pathlib.Path, samples: list[dict]) -> float:
    """The worst output SQNR (dB) of ``quant_path`` against ``float_path`` over ``samples``, concatenated."""
    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (float_path, quant_path)]
    reference, quantized = ([s.run(None, feed) for feed in samples] for s in sessions)
    worst = float("inf")
    for index in range(len(reference[0])):
        ref = np.concatenate([np.ravel(r[index]).astype(np.float64) for r in reference])
        out = np.concatenate([np.ravel(q[index]).astype(np.float64) for q in quantized])
        noise = float(np.sum((ref - out) ** 2))
        worst = min(worst, float("inf") if noise == 0 else 10 * np.log10(float(np.sum(ref ** 2)) / noise))
    return worst


def _quantize_edgeopt(source: pathlib.Path, target: pathlib.Path, data: list[dict]) -> None:
    import edgeopt

    edgeopt.quantize(source, edgeopt.Int8Config(), data, output=target, check_fidelity=False, check_speed=False)


def _measure(quantize, float_path: pathlib.Path, target: pathlib.Path, evaluation: list[dict]) -> str:
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            quantize(target)
    except Exception as error:  # noqa: BLE001 - a tool's failure is a result here
        return f"fails to quantize: {type(error).__name__}"
    try:
        return f"{_sqnr(float_path, target, evaluation):.2f}"
    except Exception as error:  # noqa: BLE001
        return f"fails to run: {type(error).__name__}"


def run(name: str, build, shape: tuple[int, ...], folder: pathlib.Path) -> list[str]:
    path = build(folder)
    calibration, evaluation = _samples(path, shape, 0), _samples(path, shape, 1)
    row = [name, _measure(lambda t: _quantize_edgeopt(path, t, calibration), path, folder / f"{name}-eo.onnx",
                          evaluation)]
    row += [_measure(lambda t, m=method: ort_quantize_static(path, t, calibration, m), path,
                     folder / f"{name}-ort-{method}.onnx", evaluation) for method in ORT_METHODS]
    return row


def _margin(row: list[str]) -> str:
    """edgeopt's SQNR minus ORT's best that runs, or '-'."""
    try:
        ours = float(row[1])
    except ValueError:
        return "-"
    theirs = [float(v) for v in row[2:] if v.replace(".", "", 1).replace("-", "", 1).isdigit()]
    return f"{ours - max(theirs):+.2f}" if theirs else "-"


def main() -> None:
    builders = _builders()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(builders), help=f"comma-separated, from {', '.join(builders)}")
    parser.add_argument("--markdown", type=pathlib.Path, help="also write the table and environment here")
    args = parser.parse_args()
    names = chosen_models(parser, args.models, builders)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            build, shape = builders[name]
            rows.append(run(name, build, shape, pathlib.Path(tmp)))
            rows[-1].append(_margin(rows[-1]))
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    headers = ["model", "edgeopt SQNR dB", *(f"ORT {m} SQNR dB" for m in ORT_METHODS), "edgeopt - ORT's best"]
    table = markdown_table(headers, rows, right=[False, True, True, True, True])
    ahead = sum(1 for row in rows if row[-1] != "-" and float(row[-1]) >= 0)
    judged = sum(1 for row in rows if row[-1] != "-")
    text = "\n".join([*environment_markdown(environment(sys.argv)), "", *table, "",
                      f"edgeopt at or above ORT's best on {ahead} of {judged} models both tools quantize.", ""])
    publish(text, args.markdown)


if __name__ == "__main__":
    main()

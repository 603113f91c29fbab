"""How edgeopt rounds int8 weights: to nearest (``--no-depthwise-gptq``), the depthwise layers by GPTQ
(``--depthwise-gptq``; the default where its statistics cost at most 2 % of the model's multiply-adds,
as on the 224x224 MobileNetV2), every layer by GPTQ (``--gptq``) or by AdaRound (``--adaround``).

The models, calibration samples and evaluation sets of ``quantize_vs_ort.py``
(its cached trained exports and its untrained 224x224 CNNs, same seed), each
quantized once per setting with edgeopt's default settings otherwise (percentile
calibration, bias correction, per-channel int8 weights, uint8 activations):

* output SQNR (dB) and top-1 agreement with the float model on the larger
  evaluation set (4,050 shifted digits test images for the trained models, 512
  held-out inputs for the 224x224 ones), and the accuracy drop in points on it
  for the trained models;
* wall time of ``edgeopt.quantize`` (load, calibrate, round, save; no fidelity
  or speed check afterwards) and the peak RSS of a fresh process running it
  (imports done and frozen out of the garbage collector before the clock
  starts), one process per setting, one after the other.

    python benchmarks/rounding.py [--models mobilenet_v2_224,demo] [--markdown out.md]

Run by hand from the repository root (``tests.models`` must be importable); not a test.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from _common import environment, environment_markdown, markdown_table, peak_rss_mb, publish  # noqa: E402
from quantize_vs_ort import (  # noqa: E402
    ALL_MODELS,
    _fidelity,
    _import_both_tools,
    _session,
    predict_batched,
    prepare_case,
)

import edgeopt  # noqa: E402

SETTINGS = {"nearest": {"depthwise_gptq": False}, "depthwise": {"depthwise_gptq": True}, "gptq": {"gptq": True},
            "adaround": {"adaround": True}}


def _outputs(path: pathlib.Path, case) -> np.ndarray:
    """Logits of the larger evaluation set, as ``quantize_vs_ort.py`` computes them."""
    return predict_batched(_session(path), case.ext_x, case.input_name)


def _quantize(model: str, setting: str, calib: str, output: str) -> tuple[float, float]:
    """In a fresh process: wall seconds of ``edgeopt.quantize`` and the process's peak RSS (MB)."""
    _import_both_tools()
    import edgeopt.quant.int8  # noqa: F401 (with AdaRound and GPTQ)

    data = np.load(calib)
    gc.collect()
    gc.freeze()
    start = time.perf_counter()
    edgeopt.quantize(model, edgeopt.Int8Config(**SETTINGS[setting]), data, output=output, check_fidelity=False,
                     check_speed=False)
    return time.perf_counter() - start, peak_rss_mb()


def measure(name: str, settings: list[str], work: pathlib.Path, calib_samples: int, seed: int) -> list[list[str]]:
    case = prepare_case(name, seed=seed, calib_samples=calib_samples, work=work)
    reference = _outputs(case.fp32_path, case)
    calib = work / f"{name}-calib.npy"
    np.save(calib, case.calib)
    rows = []
    for setting in settings:
        output = work / f"{name}-{setting}.onnx"
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            wall, rss = pool.apply(_quantize, (str(case.fp32_path), setting, str(calib), str(output)))
        quantized = _outputs(output, case)
        agreement, sqnr_db = _fidelity(quantized, reference)
        drop = "-" if case.ext_y is None else (
            f"{100 * (np.mean(reference.argmax(1) == case.ext_y) - np.mean(quantized.argmax(1) == case.ext_y)):+.2f}")
        rows.append([name, setting, f"{sqnr_db:.2f}", f"{100 * agreement:.2f}", drop, f"{wall:.2f}", f"{rss:.0f}"])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(ALL_MODELS))
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--calib-samples", type=int, default=200, help="as quantize_vs_ort.py (224x224 models: 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", type=pathlib.Path, help="also write the report here")
    args = parser.parse_args(argv)
    env = environment([sys.argv[0], *argv])
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeopt-rounding-") as folder:
        for name in args.models.split(","):
            rows += measure(name, args.settings.split(","), pathlib.Path(folder), args.calib_samples, args.seed)
    lines = ["## `benchmarks/rounding.py`: int8 weight rounding, nearest vs depthwise GPTQ vs GPTQ vs AdaRound", "",
             *markdown_table(["model", "rounding", "SQNR dB", "agree %", "drop pts", "quantize s", "peak RSS MB"],
                             rows, right=[False, False, True, True, True, True, True]),
             "", *environment_markdown(env)]
    text = "\n".join(lines) + "\n"
    publish(text, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

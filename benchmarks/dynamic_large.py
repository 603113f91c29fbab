"""Dynamic int8 of a BERT-base-depth encoder (340 MB float): edgeopt next to ONNX Runtime's ``quantize_dynamic``.

``dynamic_vs_ort.py`` measures fidelity and speed on small and 2-layer models; this script measures what a
model of realistic size costs to quantize, in a fresh process per tool: twelve
``nn.TransformerEncoderLayer(768, 12, 3072)`` (GELU) and a ``Linear(768, 10)`` head, seeded, input
``[1, 128, 768]`` (85 M parameters; built once into ``benchmarks/.cache/``).

Settings: ORT ``quantize_dynamic(weight_type=QInt8)`` with ``per_channel`` True and False, and edgeopt
``DynamicInt8Config()`` (what ``edgeopt quantize --scheme int8-dynamic`` runs, without its checks). Each
quantizes ``--repeats`` times, each time in a fresh interpreter that imports both tools before the clock
starts; the least wall time (load + quantize + save) and peak RSS (Linux ``VmHWM``) are kept. Then the
written files are timed in ONNX Runtime (one intra-op thread, all models taking turns on the same input,
median of ``--runs``) and compared with the float model on ``--samples`` random inputs (output SQNR).

Run from the repository root::

    python benchmarks/dynamic_large.py [--repeats 2] [--runs 8] [--samples 4] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    WORKER_RESULT_PREFIX,
    environment,
    environment_markdown,
    markdown_table,
    peak_rss_mb,
    prepare_cache_dir,
    publish,
    run_worker,
)
from quantize_vs_ort import _import_both_tools  # noqa: E402

SCRIPT = pathlib.Path(__file__).resolve()
LAYERS, WIDTH, TOKENS = 12, 768, 128
SETTINGS = (("ort-channel", "ORT per-channel"), ("ort-tensor", "ORT per-tensor (default)"),
            ("edgeopt", "edgeopt int8-dynamic"))


def build(path: pathlib.Path) -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers = [nn.TransformerEncoderLayer(WIDTH, 12, 4 * WIDTH, batch_first=True, dropout=0.0, activation="gelu")
              for _ in range(LAYERS)]
    module = nn.Sequential(*layers, nn.Linear(WIDTH, 10)).eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused inference op does not export
    try:
        with torch.no_grad():
            torch.onnx.export(module, (torch.zeros(1, TOKENS, WIDTH),), str(path), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["logits"])
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def worker_main(payload: dict) -> None:
    """Quantize the model with one setting; report wall time and peak RSS as JSON."""
    _import_both_tools()
    gc.collect()
    gc.freeze()
    start = time.perf_counter()
    if payload["setting"] == "edgeopt":
        import edgeopt

        edgeopt.quantize(payload["model"], edgeopt.DynamicInt8Config(), None, output=payload["output"],
                         check_fidelity=False, check_speed=False)
    else:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(payload["model"], payload["output"], weight_type=QuantType.QInt8,
                         per_channel=payload["setting"] == "ort-channel")
    result = {"wall_s": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}
    print(WORKER_RESULT_PREFIX + json.dumps(result), flush=True)


def measure(paths: dict[str, pathlib.Path], runs: int, samples: int) -> dict[str, tuple[float, float]]:
    """Median latency (ms) and output SQNR against the float model (dB) of each file, by setting."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for name, path in paths.items()}
    rng = np.random.default_rng(2)
    feeds = [{"input": rng.standard_normal((1, TOKENS, WIDTH)).astype(np.float32)} for _ in range(samples)]
    outputs = {name: [session.run(None, feed)[0].astype(np.float64) for feed in feeds]
               for name, session in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for run in range(runs):
        for name, session in sessions.items():  # taking turns: drift on a shared machine hits them all
            start = time.perf_counter()
            session.run(None, feeds[run % samples])
            times[name].append(time.perf_counter() - start)
    reference = np.concatenate([out.ravel() for out in outputs["fp32"]])
    results = {}
    for name in sessions:
        noise = reference - np.concatenate([out.ravel() for out in outputs[name]])
        sqnr = 10 * np.log10(np.sum(reference ** 2) / max(np.sum(noise ** 2), 1e-30))
        results[name] = (1000 * float(np.median(times[name])), float(sqnr))
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--markdown", type=pathlib.Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    env, load_start = environment([str(pathlib.Path(sys.argv[0])), *argv]), os.getloadavg()[0]
    cache = prepare_cache_dir()
    model = cache / f"encoder{WIDTH}x{LAYERS}.onnx"
    if not model.exists():
        build(model)
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for setting, _label in SETTINGS:
            output = cache / f"encoder{WIDTH}x{LAYERS}-{setting}.onnx"
            result = run_worker(SCRIPT, {"setting": setting, "model": str(model), "output": str(output)})
            if "error" in result:
                raise SystemExit(f"{setting}: {result['error']}")
            kept = best.setdefault(setting, result)
            kept["wall_s"], kept["peak_rss_mb"] = (min(kept["wall_s"], result["wall_s"]),
                                                   min(kept["peak_rss_mb"], result["peak_rss_mb"]))
    paths = {"fp32": model, **{setting: cache / f"encoder{WIDTH}x{LAYERS}-{setting}.onnx" for setting, _ in SETTINGS}}
    measured = measure(paths, args.runs, args.samples)
    float_ms = measured["fp32"][0]
    rows = [["fp32", "-", "-", f"{model.stat().st_size / 2**20:.1f}", f"{float_ms:.1f}", "1.00x", "-"]]
    for setting, label in SETTINGS:
        ms, sqnr = measured[setting]
        rows.append([label, f"{best[setting]['wall_s']:.2f}", f"{best[setting]['peak_rss_mb']:.0f}",
                     f"{paths[setting].stat().st_size / 2**20:.1f}", f"{ms:.1f}", f"{ms / float_ms:.2f}x",
                     f"{sqnr:.1f}"])
    text = "\n".join([
        f"## dynamic_large: int8-dynamic of a {LAYERS}-layer {WIDTH}-wide encoder", "", *environment_markdown(env),
        f"- quantize: least of {args.repeats} fresh processes each; latency: median of {args.runs} runs, models "
        f"taking turns, 1 intra-op thread; SQNR on {args.samples} random inputs [1, {TOKENS}, {WIDTH}]",
        f"- load average (1 min) at start {load_start:.2f}, at end {os.getloadavg()[0]:.2f}", "",
        *markdown_table(["setting", "quantize s", "peak RSS MB", "file MiB", "median ms", "vs fp32", "SQNR dB"],
                        rows, right=[False] + [True] * 6), ""])
    publish(text, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

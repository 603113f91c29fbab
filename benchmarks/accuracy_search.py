"""How the accuracy-aware search (``--min-sqnr``) goes on the test architectures: rounds, nodes kept float,
the score reached, wall time.

Each model of ``tests/models.py`` (CNNs with depthwise-separable convs, SE
blocks and hardswish, a ResNet, a transformer encoder) and ``tests/hf_models.py``
(BERT, GPT-2, ViT, T5 style token models) is exported at opset 17 with its seed-0
weights, given 24 random samples (seed 0; token models: random ids and masks),
and quantized to int8 with edgeopt's defaults and an output-SQNR goal set above
what plain int8 reaches on it, so the search has work to do. Per model:

* ``rounds``: quantize-and-measure rounds, the retries of the nodes returned included;
* ``float``: nodes the best model keeps out of int8 for the goal;
* ``score``: its output SQNR on the calibration samples (dB), and whether it met the goal;
* ``seconds``: wall time of the whole ``edgeopt.quantize`` call (shared machine: noisy).

The rounds, nodes and scores are deterministic; run it on two checkouts to
compare their searches (``PYTHONPATH=OTHER/src python benchmarks/accuracy_search.py``).

    python benchmarks/accuracy_search.py [--models vit,efficientnet] [--markdown out.md]

Run by hand from the repository root (``tests.models`` must be importable); not a test.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from _common import environment, environment_markdown, markdown_table  # noqa: E402

#: model -> output-SQNR goal (dB): above plain int8's on these weights and samples
GOALS = {"mobilenet_v3": 52.0, "efficientnet": 55.0, "resnet": 50.0, "transformer": 40.0,
         "bert": 40.0, "gpt2": 45.0, "vit": 28.0, "t5": 40.0}
TOKEN_MODELS = ("bert", "gpt2", "vit", "t5")
SAMPLES = 24


def _model_and_data(name: str, folder: pathlib.Path) -> tuple[pathlib.Path, list[dict[str, np.ndarray]]]:
    if name in TOKEN_MODELS:
        from tests.hf_models import build_hf, hf_samples

        return build_hf(name, folder, 17), hf_samples(name, SAMPLES, seed=0)
    import onnx

    from tests.models import build_onnx, build_torch

    path = build_onnx(name, folder, 17)
    shape = tuple(build_torch(name)[1].shape)
    input_name = onnx.load(str(path)).graph.input[0].name
    rng = np.random.default_rng(0)
    return path, [{input_name: rng.standard_normal(shape).astype(np.float32)} for _ in range(SAMPLES)]


def run(name: str, goal_db: float) -> dict:
    import edgeopt

    with tempfile.TemporaryDirectory() as folder:
        path, data = _model_and_data(name, pathlib.Path(folder))
        start = time.perf_counter()
        report = edgeopt.quantize(path, edgeopt.Int8Config(), data, output=pathlib.Path(folder) / "q.onnx",
                                  goal=edgeopt.AccuracyGoal(min_sqnr_db=goal_db), check_speed=False)
        seconds = time.perf_counter() - start
    search = report.search
    return {"model": name, "goal": f"{goal_db:g} dB", "rounds": len(search.steps),
            "float": len(search.best_excluded), "score": f"{search.best_score:.2f} dB",
            "met": "yes" if search.met else "no", "seconds": f"{seconds:.1f}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(GOALS), help=f"comma-separated, from {', '.join(GOALS)}")
    parser.add_argument("--markdown", type=pathlib.Path, help="also write the table and environment here")
    args = parser.parse_args()
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in names if name not in GOALS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(GOALS)}")
    rows = []
    for name in names:
        rows.append(run(name, GOALS[name]))
        print(rows[-1], flush=True)
    columns = ["model", "goal", "rounds", "float", "score", "met", "seconds"]
    table = markdown_table(columns, [[row[c] for c in columns] for row in rows],
                           right=[False, True, True, True, True, False, True])
    text = "\n".join([*environment_markdown(environment(sys.argv)), "", *table, ""])
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()

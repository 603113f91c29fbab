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
* ``fresh``: the same model's output SQNR on 24 other samples of the same kind (seed 2), which the
  search never saw, and whether the goal holds there;
* ``seconds``: wall time of the whole ``edgeopt.quantize`` call (shared machine: noisy).

With ``--eval-data`` the search runs a second time per model, measuring every round on 24 held-out
samples (seed 1; ``eval_data``, the CLI's ``--eval-data``) instead of the calibration samples: its
rounds, float nodes, score (on those held-out samples) and fresh score follow in the ``(eval-data)``
columns.

The rounds, nodes and scores are deterministic; run it on two checkouts to
compare their searches (``PYTHONPATH=OTHER/src python benchmarks/accuracy_search.py``).

    python benchmarks/accuracy_search.py [--models vit,efficientnet] [--eval-data] [--markdown out.md]

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
from _common import chosen_models, environment, environment_markdown, markdown_table, publish  # noqa: E402

#: model -> output-SQNR goal (dB): above plain int8's on these weights and samples
GOALS = {"mobilenet_v3": 52.0, "efficientnet": 55.0, "resnet": 50.0, "transformer": 40.0,
         "bert": 40.0, "gpt2": 45.0, "vit": 36.0, "t5": 40.0}
TOKEN_MODELS = ("bert", "gpt2", "vit", "t5")
SAMPLES = 24


def _model(name: str, folder: pathlib.Path) -> pathlib.Path:
    if name in TOKEN_MODELS:
        from tests.hf_models import build_hf

        return build_hf(name, folder, 17)
    from tests.models import build_onnx

    return build_onnx(name, folder, 17)


def _samples(name: str, path: pathlib.Path, seed: int) -> list[dict[str, np.ndarray]]:
    """24 random samples (token models: ids and masks); seed 0 calibrates, seed 1 is held out."""
    if name in TOKEN_MODELS:
        from tests.hf_models import hf_samples

        return hf_samples(name, SAMPLES, seed=seed)
    import onnx

    from tests.models import build_torch

    shape = tuple(build_torch(name)[1].shape)
    input_name = onnx.load(str(path)).graph.input[0].name
    rng = np.random.default_rng(seed)
    return [{input_name: rng.standard_normal(shape).astype(np.float32)} for _ in range(SAMPLES)]


def _search(path: pathlib.Path, data: list, goal_db: float, held_out: list | None, fresh: list):
    """The search's report (measuring its rounds on ``held_out``, if given), its wall time, and its model's
    output SQNR on ``fresh``."""
    import edgeopt
    from edgeopt.quant.compare import compare_models

    start = time.perf_counter()
    report = edgeopt.quantize(path, edgeopt.Int8Config(), data, output=path.with_name("q.onnx"),
                              goal=edgeopt.AccuracyGoal(min_sqnr_db=goal_db), check_speed=False,
                              eval_data=held_out)
    seconds = time.perf_counter() - start
    return report.search, seconds, compare_models(path, report.model, fresh).worst_output_sqnr()


def _met(score: float, goal_db: float) -> str:
    return "yes" if score >= goal_db else "no"


def run(name: str, goal_db: float, *, eval_data: bool) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        path = _model(name, pathlib.Path(folder))
        data, fresh = _samples(name, path, 0), _samples(name, path, 2)
        search, seconds, fresh_db = _search(path, data, goal_db, None, fresh)
        row = {"model": name, "goal": f"{goal_db:g} dB", "rounds": len(search.steps),
               "float": len(search.best_excluded), "score": f"{search.best_score:.2f} dB",
               "met": "yes" if search.met else "no", "fresh": f"{fresh_db:.2f} dB",
               "met fresh": _met(fresh_db, goal_db), "seconds": f"{seconds:.1f}"}
        if eval_data:
            search, seconds, fresh_db = _search(path, data, goal_db, _samples(name, path, 1), fresh)
            row |= {"rounds (eval-data)": len(search.steps), "float (eval-data)": len(search.best_excluded),
                    "score (eval-data)": f"{search.best_score:.2f} dB", "fresh (eval-data)": f"{fresh_db:.2f} dB",
                    "met fresh (eval-data)": _met(fresh_db, goal_db), "seconds (eval-data)": f"{seconds:.1f}"}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(GOALS), help=f"comma-separated, from {', '.join(GOALS)}")
    parser.add_argument("--eval-data", action="store_true",
                        help="search again measuring each round on the held-out samples (eval_data)")
    parser.add_argument("--markdown", type=pathlib.Path, help="also write the table and environment here")
    args = parser.parse_args()
    names = chosen_models(parser, args.models, GOALS)
    rows = []
    for name in names:
        rows.append(run(name, GOALS[name], eval_data=args.eval_data))
        print(rows[-1], flush=True)
    columns = list(rows[0]) if rows else []
    table = markdown_table(columns, [[row[c] for c in columns] for row in rows],
                           right=[not column.startswith(("model", "met")) for column in columns])
    text = "\n".join([*environment_markdown(environment(sys.argv)), "", *table, ""])
    publish(text, args.markdown)


if __name__ == "__main__":
    main()

"""The accuracy-aware mode from the command line: ``--eval module:function --max-drop``, the user's
code misbehaving, and the API objects it takes."""

from __future__ import annotations

import json
import pathlib
import textwrap

import numpy as np
import pytest

import edgeopt
from edgeopt.demo import demo_calibration_path, demo_model_path
from edgeopt.errors import ConfigError
from tests.conftest import assert_one_line_error

EVALS = textwrap.dedent('''
    import sys

    import numpy as np
    import onnxruntime as ort

    from edgeopt.demo import demo_data

    def accuracy(path):
        images, labels = demo_data()
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        logits = np.concatenate([session.run(None, {"input": image[None]})[0] for image in images[:200]])
        return np.mean(logits.argmax(1) == labels[:200]) * 100  # a numpy float: a number

    def chatty(path):
        print("scoring", path)
        return accuracy(path)

    def leaves(path):
        sys.exit(0)

    def text(path):
        return "95.5"

    def huge(path):
        return 10 ** 400  # beyond float's range

    def fraction(path):  # as sklearn's accuracy_score gives it
        return accuracy(path) / 100
''')


@pytest.fixture
def evals(tmp_path):
    path = tmp_path / "evals.py"
    path.write_text(EVALS)
    return path


def _quantize(cli, tmp_path, evals, function, *extra):
    return cli("quantize", demo_model_path(), "--data", demo_calibration_path(), "-o", tmp_path / "q.onnx",
               "--eval", f"{evals}:{function}", "--max-drop", "0.5", "--no-speed-check", *extra)


def test_eval_and_max_drop_report_the_score_of_the_model_written(cli, tmp_path, evals):
    import importlib.util

    result = _quantize(cli, tmp_path, evals, "chatty", "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)  # what the function prints goes to stderr: stdout is the report
    assert "scoring" in result.stderr
    search = report["accuracy_search"]
    spec = importlib.util.spec_from_file_location("evals_check", evals)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert search["met"] and search["best_score"] == pytest.approx(module.accuracy(str(tmp_path / "q.onnx")))
    assert search["float_score"] - search["best_score"] <= 0.5


@pytest.mark.parametrize("function, words", [("leaves", "called sys.exit(0)"), ("text", "must return a number"),
                                             ("huge", "must return a finite score")])
def test_eval_code_that_exits_or_returns_text_is_one_clear_error(cli, tmp_path, evals, function, words):
    assert_one_line_error(_quantize(cli, tmp_path, evals, function), f"{evals}:{function}", words)
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("fields", [{"max_drop": "1"}, {"max_drop": 1, "time_budget_s": "10m"},
                                    {"min_sqnr_db": 30, "max_float_nodes": 2.5}, {"min_sqnr_db": True}])
def test_accuracy_goal_refuses_what_is_not_a_number(fields):
    with pytest.raises(ConfigError):
        edgeopt.AccuracyGoal(**fields)


def test_goal_errors_name_the_options_the_user_gave():
    # "max_drop must be ..." named the Python field, and --eval with --min-sqnr was told to give --max-drop
    with pytest.raises(ConfigError, match=r"max_drop \(--max-drop\) must be a finite number >= 0"):
        edgeopt.AccuracyGoal(max_drop=-1.0)
    with pytest.raises(ConfigError, match="--min-sqnr is the goal without --eval: give one of the two"):
        edgeopt.quantize(demo_model_path(), edgeopt.Int8Config(), np.load(demo_calibration_path())[:16],
                         goal=edgeopt.AccuracyGoal(min_sqnr_db=30.0), evaluate=lambda path: 1.0)


def test_run_and_bench_take_one_input_or_model_without_a_container(tmp_path):
    images = np.load(demo_calibration_path())[:3]
    assert edgeopt.run(demo_model_path(), images).samples == 3
    timing = edgeopt.bench(demo_model_path(), config=edgeopt.BenchConfig(runs=2, warmup=0, threads=1))
    assert [model.name for model in timing.models] == [demo_model_path().name]


def test_compare_json_honours_limit_and_max_samples_must_be_positive(cli, tmp_path):
    out = tmp_path / "q.onnx"
    assert cli("quantize", demo_model_path(), "--data", demo_calibration_path(), "-o", out,
               "--no-speed-check").code == 0
    result = cli("compare", demo_model_path(), out, "--data", demo_calibration_path(), "--max-samples", "8",
                 "--limit", "2", "--json")
    assert result.code == 0, result.stderr
    layers = json.loads(result.stdout)["layers"]
    assert len(layers) == 2 and layers[0]["sqnr_db"] <= layers[1]["sqnr_db"]
    zero = cli("compare", demo_model_path(), out, "--data", demo_calibration_path(), "--max-samples", "0")
    assert zero.code == 2 and "--max-samples" in zero.stderr


def test_image_preprocessing_given_with_array_data_is_warned_about(cli, tmp_path):
    result = cli("quantize", demo_model_path(), "--data", demo_calibration_path(), "-o", tmp_path / "q.onnx",
                 "--preprocess", "size=8x8", "--no-speed-check")
    assert result.code == 0 and "image preprocessing given is not used" in result.stderr


def test_sigterm_during_eval_removes_temporary_files_and_writes_nothing(tmp_path, evals):
    import os
    import signal
    import subprocess
    import sys
    import time

    evals.write_text(EVALS + textwrap.dedent(f'''
        def slow(path):
            open({str(tmp_path / "started")!r}, "w").close()
            import time
            time.sleep(60)
    '''))
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    command = [sys.executable, "-c", "from edgeopt.cli import main; main()", "quantize", str(demo_model_path()),
               "--data", str(demo_calibration_path()), "-o", str(tmp_path / "q.onnx"), "--eval", f"{evals}:slow",
               "--max-drop", "0.5", "--no-speed-check"]
    process = subprocess.Popen(command, env={**os.environ, "TMPDIR": str(temporary)}, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143 and "error: terminated" in stderr and "Traceback" not in stderr
    left = [path.name for path in temporary.iterdir() if path.name != ".ses"]  # .ses: a library's session id
    assert not left and not (tmp_path / "q.onnx").exists()


def test_an_eval_that_changes_directory_leaves_data_and_output_paths_as_given(cli, tmp_path, evals, monkeypatch):
    # Evaluation scripts chdir to their data set, on import or in the function: --data calib.npy was then
    # looked for there ("cannot read calib.npy ... is it a complete .npy file?") and -o would land there.
    # The user's code keeps the directory it chose, from one call to the next; edgeopt's paths keep theirs.
    import shutil

    elsewhere = tmp_path / "validation"
    elsewhere.mkdir()
    (elsewhere / "labels.txt").write_text("ready")
    evals.write_text(EVALS + textwrap.dedent(f'''
        import os
        os.chdir({str(elsewhere)!r})

        def wanders(path):
            assert open("labels.txt").read() == "ready"  # relative to where the import went
            os.chdir({str(elsewhere)!r})
            return accuracy(path)
    '''))
    shutil.copy(demo_calibration_path(), tmp_path / "calib.npy")
    monkeypatch.chdir(tmp_path)
    result = cli("quantize", demo_model_path(), "--data", "calib.npy", "-o", "q.onnx", "--eval",
                 f"{evals}:wanders", "--max-drop", "0.5", "--no-speed-check")
    assert result.code == 0, result.stderr
    assert (tmp_path / "q.onnx").exists() and (tmp_path / "q.report.json").exists()
    assert sorted(path.name for path in elsewhere.iterdir()) == ["labels.txt"]
    assert pathlib.Path.cwd() == tmp_path


def test_a_drop_as_large_as_the_score_itself_is_warned_about(cli, tmp_path, evals):
    # sklearn's accuracy_score is a fraction: --max-drop 1.0 (the README's "1 point") then accepts any
    # model at all, and the search stopped at round 0 saying "goal met"
    warnings = _warnings_of_a_drop(cli, tmp_path, evals, "1.0")
    assert any("--max-drop 1 is as large as the float model's score itself" in w and "--max-drop 0.01" in w
               for w in warnings), warnings
    percent = _quantize(cli, tmp_path, evals, "accuracy", "--json")
    assert not any("as large as" in w for w in json.loads(percent.stdout)["warnings"])


def test_a_goal_not_met_exits_8_with_the_best_model_and_its_report_written(cli, tmp_path):
    """A CI job asking for --min-sqnr must fail when the goal is missed, and still get the model to inspect."""
    out = tmp_path / "q.onnx"
    result = cli("quantize", demo_model_path(), "--data", demo_calibration_path(), "-o", out, "--min-sqnr", "200",
                 "--time-budget", "1s", "--no-speed-check", "--json")
    assert result.code == 8, result.stderr
    report = json.loads(result.stdout)
    assert report["accuracy_search"]["met"] is False and out.exists()
    assert json.loads(out.with_name("q.report.json").read_text())["accuracy_search"]["met"] is False
    assert any(w.startswith("accuracy goal not met (output SQNR >= 200") for w in report["warnings"])
    assert "Traceback" not in result.stderr


def test_scores_are_shown_to_the_resolution_of_the_drop_accepted():
    # a loss-like score with --max-drop 0.0001 showed "-0.100 (float model -0.099)": the drop was invisible
    assert edgeopt.AccuracyGoal(max_drop=1e-4).score_text(-0.0998663) == "-0.09987"
    assert edgeopt.AccuracyGoal(max_drop=1.0).score_text(97.5556) == "97.556"
    assert edgeopt.AccuracyGoal(min_sqnr_db=30.0).score_text(33.7716) == "33.772"
    assert edgeopt.AccuracyGoal(max_drop=0.0).score_text(0.97555) == "0.976"


def _scores_then_ctrl_c(at_call):
    """An evaluate(path) scoring the float model 100 and every quantized one 50, pressed Ctrl-C on call
    ``at_call`` (call 1 scores the float model, call 2 round 0, ...)."""
    calls = []

    def evaluate(path):
        calls.append(path)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return 100.0 if len(calls) == 1 else 50.0

    return evaluate


def test_ctrl_c_in_the_search_writes_the_best_model_so_far_and_raises_interrupted_with_its_report(tmp_path):
    # Ctrl-C twenty minutes into a search discarded every round: the best one is written, its report
    # saying the search was interrupted and the goal missed, and the stop goes on as a KeyboardInterrupt
    out = tmp_path / "q.onnx"
    with pytest.raises(edgeopt.Interrupted) as stopped:
        edgeopt.quantize(demo_model_path(), edgeopt.Int8Config(), np.load(demo_calibration_path())[:32],
                         output=out, goal=edgeopt.AccuracyGoal(max_drop=1.0), evaluate=_scores_then_ctrl_c(3))
    assert isinstance(stopped.value, KeyboardInterrupt)
    report = stopped.value.partial
    assert report.interrupted and report.fidelity is None and report.speed is None
    assert len(report.search.steps) == 1 and report.search.best_excluded == () and not report.search.met
    written = json.loads((tmp_path / "q.report.json").read_text())
    search = written["accuracy_search"]
    assert search["interrupted"] and search["stopped_because"] == "interrupted after 1 round" and not search["met"]
    assert "fidelity and speed checks skipped: interrupted" in written["warnings"]
    assert edgeopt.load(out).graph.num_nodes() == report.model.graph.num_nodes()


def test_ctrl_c_before_a_round_was_scored_writes_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt) as stopped:
        edgeopt.quantize(demo_model_path(), edgeopt.Int8Config(), np.load(demo_calibration_path())[:32],
                         output=tmp_path / "q.onnx", goal=edgeopt.AccuracyGoal(max_drop=1.0),
                         evaluate=_scores_then_ctrl_c(2))
    assert not isinstance(stopped.value, edgeopt.Interrupted)
    assert list(tmp_path.iterdir()) == []


CTRL_C_ON_CALL_3 = textwrap.dedent('''
    calls = 0

    def stops(path):
        global calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return 100.0 if calls == 1 else 50.0
''')


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_ctrl_c_in_the_search_exits_130_saying_where_the_best_model_is(cli, tmp_path, as_json):
    evals = tmp_path / f"stops_{int(as_json)}.py"
    evals.write_text(CTRL_C_ON_CALL_3)
    result = cli("quantize", demo_model_path(), "--data", demo_calibration_path(), "-o", tmp_path / "q.onnx",
                 "--eval", f"{evals}:stops", "--max-drop", "1", "--no-speed-check", *(["--json"] if as_json else []))
    assert_one_line_error(result, f"interrupted: the best model found so far is written to {tmp_path / 'q.onnx'} "
                                  "(goal accuracy drop <= 1 not met, score 50.000, 0 nodes back in float)")
    assert result.code == 130 and (tmp_path / "q.onnx").exists()
    if as_json:  # the report, with the error
        report = json.loads(result.stdout)
        assert report["error"]["exit_code"] == 130 and report["error"]["message"].startswith("interrupted: ")
        assert report["accuracy_search"]["interrupted"] is True
    else:
        assert "interrupted after 1 round" in result.stdout


def test_sigint_during_a_round_writes_the_best_model_and_exits_130(tmp_path, evals):
    import signal
    import subprocess
    import sys
    import time

    evals.write_text(textwrap.dedent(f'''
        import time

        calls = 0

        def slow(path):
            global calls
            calls += 1
            if calls == 3:  # round 1: round 0 was scored
                open({str(tmp_path / "started")!r}, "w").close()
                time.sleep(60)
            return 100.0 if calls == 1 else 50.0
    '''))
    # Python's own SIGINT handler: a process started in the background inherits SIGINT ignored
    command = [sys.executable, "-c", "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
               "from edgeopt.cli import main; main()", "quantize", str(demo_model_path()),
               "--data", str(demo_calibration_path()), "-o", str(tmp_path / "q.onnx"), "--eval", f"{evals}:slow",
               "--max-drop", "1", "--no-speed-check"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "started").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert "error: interrupted: the best model found so far is written to" in stderr
    assert json.loads((tmp_path / "q.report.json").read_text())["accuracy_search"]["interrupted"] is True


def test_ctrl_c_in_the_checks_after_a_search_writes_its_model_without_them(tmp_path, monkeypatch):
    import importlib

    api_quantize = importlib.import_module("edgeopt.api.quantize")  # the module: the package names the function

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api_quantize, "_fidelity", interrupted)
    with pytest.raises(edgeopt.Interrupted) as stopped:
        edgeopt.quantize(demo_model_path(), edgeopt.Int8Config(), np.load(demo_calibration_path())[:32],
                         output=tmp_path / "q.onnx", goal=edgeopt.AccuracyGoal(min_sqnr_db=0.0), check_speed=False)
    search = stopped.value.partial.search
    assert search.met and search.interrupted and search.stopped_because.endswith("; then interrupted")
    written = json.loads((tmp_path / "q.report.json").read_text())
    assert written["fidelity"] is None and written["accuracy_search"]["interrupted"] is True


def test_max_float_nodes_limits_the_search_and_the_stop_names_the_option(cli, tmp_path):
    # the search's limit of 32 nodes had no option, and hitting it said only "32 nodes already back in float"
    out = tmp_path / "q.onnx"
    result = cli("quantize", demo_model_path(), "--data", demo_calibration_path(), "-o", out, "--min-sqnr", "200",
                 "--max-float-nodes", "1", "--no-speed-check", "--json")
    assert result.code == 8, result.stderr
    search = json.loads(result.stdout)["accuracy_search"]
    assert len(search["float_nodes_added"]) == 1
    assert search["stopped_because"] == "1 node already back in float (the search's limit: --max-float-nodes)"
    alone = cli("quantize", demo_model_path(), "--data", demo_calibration_path(), "-o", out, "--max-float-nodes", "3")
    assert alone.code == 4 and "--max-float-nodes limits the accuracy search" in alone.stderr


def test_a_drop_of_a_tenth_or_more_on_a_score_of_at_most_one_is_warned_about(cli, tmp_path, evals):
    # --max-drop 0.5 on a fraction is a 50-point drop: nothing was said
    warnings = _warnings_of_a_drop(cli, tmp_path, evals, "0.5")
    assert any("--max-drop 0.5 on a float model scoring 0.98" in w and "accepts a drop of 50 points" in w
               and "one point is --max-drop 0.01" in w for w in warnings), warnings
    assert not any("--max-drop" in w for w in _warnings_of_a_drop(cli, tmp_path, evals, "0.01"))


def _warnings_of_a_drop(cli, tmp_path, evals, drop: str) -> list[str]:
    """The report's warnings for --max-drop ``drop`` on a score that is a fraction (sklearn's accuracy_score)."""
    result = cli("quantize", demo_model_path(), "--data", demo_calibration_path(), "-o", tmp_path / "q.onnx",
                 "--eval", f"{evals}:fraction", "--max-drop", drop, "--no-speed-check", "--json")
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)["warnings"]


def test_an_eval_failing_in_a_later_round_keeps_the_best_model_of_the_rounds_before(cli, tmp_path):
    # the rounds already scored were thrown away: exit 3 and nothing written
    evals = tmp_path / "flaky.py"
    evals.write_text(textwrap.dedent('''
        calls = 0

        def flaky(path):
            global calls
            calls += 1
            if calls == 4:  # the float model, then rounds 0 and 1 are scored
                raise ValueError("the board did not answer")
            return 100.0 if calls == 1 else 50.0 + calls
    '''))
    out = tmp_path / "q.onnx"
    result = cli("quantize", demo_model_path(), "--data", demo_calibration_path(), "-o", out, "--eval",
                 f"{evals}:flaky", "--max-drop", "1", "--no-speed-check", "--json")
    assert result.code == 8, result.stderr
    search = json.loads(result.stdout)["accuracy_search"]
    assert search["stopped_because"].startswith("round 2 failed: --eval ") and "the board did not answer" in \
        search["stopped_because"]
    assert len(search["steps"]) == 2 and search["best_score"] == 53.0 and not search["met"]
    assert json.loads((tmp_path / "q.report.json").read_text())["accuracy_search"] == search
    assert "the accuracy search stopped at round 2, which failed" in result.stderr


def test_under_json_what_an_evals_child_processes_print_goes_to_stderr(tmp_path):
    import subprocess
    import sys

    evals = tmp_path / "runner.py"
    evals.write_text(textwrap.dedent('''
        import os
        import subprocess
        import sys

        def flashed(path):
            subprocess.run([sys.executable, "-c", "print('runner: flashed')"], check=True)
            os.write(1, b"raw write\\n")
            return 1.0
    '''))
    command = [sys.executable, "-m", "edgeopt", "quantize", str(demo_model_path()), "--data",
               str(demo_calibration_path()), "-o", str(tmp_path / "q.onnx"), "--eval", f"{evals}:flashed",
               "--max-drop", "0.5", "--no-speed-check", "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["accuracy_search"]["met"]  # stdout: the report alone
    assert "runner: flashed" in result.stderr and "raw write" in result.stderr

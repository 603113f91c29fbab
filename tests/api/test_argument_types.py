"""Arguments of the wrong type given to the Python API: one ConfigError/DataError naming the argument,
not a TypeError or AttributeError from deep inside."""

from __future__ import annotations

import numpy as np
import pytest

import edgeopt
from edgeopt.demo import demo_calibration_path, demo_model_path
from edgeopt.errors import ConfigError, DataError, ModelError


@pytest.fixture(scope="module")
def data():
    return np.load(demo_calibration_path())[:16]


def test_quantize_refuses_a_goal_preprocess_output_or_eval_of_the_wrong_type(tmp_path, data):
    config = edgeopt.Int8Config()
    cases = [({"goal": "1.0"}, "goal must be an AccuracyGoal"),
             ({"preprocess": "size=8x8"}, "preprocess must be an ImagePreprocess"),
             ({"output": 3}, "output must be a path"),
             ({"evaluate": 5, "goal": edgeopt.AccuracyGoal(max_drop=1.0)}, "evaluate must be")]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            edgeopt.quantize(demo_model_path(), config, data, check_speed=False, **kwargs)
    assert not list(tmp_path.iterdir())


def test_quantize_says_when_the_config_and_the_data_are_swapped(data):
    # it said "data of type Fp16Config is not usable"
    with pytest.raises(ConfigError, match="the Fp16Config was given as the data; pass the config second"):
        edgeopt.quantize(demo_model_path(), data, edgeopt.Fp16Config(), check_speed=False)
    with pytest.raises(ConfigError, match="no quantization scheme takes a str"):
        edgeopt.quantize(demo_model_path(), "fp16", data, check_speed=False)


def test_bench_refuses_a_config_or_models_of_the_wrong_type():
    with pytest.raises(ConfigError, match="config must be a BenchConfig"):
        edgeopt.bench([demo_model_path()], config={"runs": 3})
    for models in (None, 3):
        with pytest.raises(ConfigError, match="models must be"):
            edgeopt.bench(models)


@pytest.mark.parametrize("key, value", [("runs", "10"), ("runs", 2.5), ("warmup", 1.5), ("threads", "2"),
                                        ("runs", True)])
def test_bench_config_takes_integers_only(key, value):
    with pytest.raises(ConfigError, match=f"{key} must be an integer"):
        edgeopt.BenchConfig(**{key: value})


def test_compile_needs_an_output_path(tmp_path):
    with pytest.raises(ConfigError, match="output must be a path"):
        edgeopt.compile_model(demo_model_path(), None)


def test_run_refuses_an_input_that_is_not_an_array_or_a_file(data):
    with pytest.raises(DataError, match="input 'input' is a list: pass a numpy array or the path of a .npy file"):
        edgeopt.run(demo_model_path(), {"input": data[:2].tolist()})
    with pytest.raises(ConfigError, match="output_dir must be a path"):
        edgeopt.run(demo_model_path(), {"input": data[:2]}, output_dir=7)


@pytest.mark.parametrize("shapes", ["input=1x1x8x8", {"input": 5}, {"input": [1, 1, "a", 8]}, {"input": [1, 1, -8, 8]},
                                    {3: [1, 1, 8, 8]}])
def test_input_shapes_must_map_names_to_positive_integer_dims(shapes):
    with pytest.raises(ModelError, match="input_shapes|--input-shape"):
        edgeopt.inspect(demo_model_path(), input_shapes=shapes)


def test_bench_of_empty_data_names_it_without_the_repr_of_an_iterator():
    for data in ([], iter([])):
        with pytest.raises(DataError, match=r"the data given \((list|list_iterator)\) gave no samples") as caught:
            edgeopt.bench(demo_model_path(), config=edgeopt.BenchConfig(runs=3), data=data)
        assert "object at 0x" not in str(caught.value)


def test_run_takes_a_npz_path_alone_as_the_command_line_does(tmp_path, data):
    # edgeopt.run(model, "inputs.npz") was refused ("pass its arrays"), while --input inputs.npz works
    np.savez(tmp_path / "inputs.npz", input=data[:3])
    from_file = edgeopt.run(demo_model_path(), tmp_path / "inputs.npz").outputs["logits"]
    np.testing.assert_array_equal(from_file, edgeopt.run(demo_model_path(), {"input": data[:3]}).outputs["logits"])
    with pytest.raises(DataError, match="is a .npz keyed by input name: pass it alone"):
        edgeopt.run(demo_model_path(), {"input": tmp_path / "inputs.npz"})


def test_verify_needs_the_path_of_a_compiled_folder(data):
    import onnx

    with pytest.raises(ConfigError, match=r"out_dir \(the folder edgeopt compile wrote\) must be a path"):
        edgeopt.verify(onnx.load(demo_model_path()), data[:2])


def test_flags_take_true_or_false_only(tmp_path):
    # force="no" is a true string: compile_model replaced the folder; check_speed="no" timed the models
    with pytest.raises(ConfigError, match="force must be True or False, got str 'no'"):
        edgeopt.compile_model(demo_model_path(), tmp_path / "c", force="no")
    with pytest.raises(ConfigError, match="measure must be True or False"):
        edgeopt.compile_model(demo_model_path(), tmp_path / "c", measure=None)
    with pytest.raises(ConfigError, match="check_speed must be True or False"):
        edgeopt.quantize(demo_model_path(), edgeopt.Fp16Config(), check_speed="no")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("model", [5, None, b"bytes"])
def test_load_refuses_what_is_not_a_model(model):
    with pytest.raises(ConfigError, match="model must be a path to an .onnx file"):
        edgeopt.load(model)


def test_from_torch_refuses_what_is_not_a_module():
    pytest.importorskip("torch")
    with pytest.raises(ConfigError, match="from_torch exports a torch.nn.Module, got str"):
        edgeopt.from_torch("model.pt", np.zeros((1, 3), np.float32))

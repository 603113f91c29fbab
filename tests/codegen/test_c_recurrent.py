"""RNN, GRU and LSTM in integers for the microcontroller target: quantized by `edgeopt quantize --target mcu`,
lowered to the ``rnn``/``gru``/``lstm`` ops of the integer reference, compiled to ``eo_rnn_s8``/``eo_gru_s8``/
``eo_lstm_s8``, bit-exact against the reference.

The state is Q15 between steps (runtime/reference/rnn.py), so the integer cells stay close to ONNX Runtime's
float GRU/LSTM over the QDQ model's int8 weights: the reference's output is within a step or two of it.
Variants built with onnx.helper cover what exporters write: a GRU's linear_before_reset 0 (ONNX's default)
and 1 (PyTorch's), forward, reverse and bidirectional, Y read, Y_h read, both read, an LSTM's Y_c, constant
initial states, a streaming model's states read from model inputs, and a plain tanh RNN's. A batch-first
cell (layout 1) stays float: ONNX Runtime cannot run one, so it cannot be calibrated either. The keyword-spotting models of
tests/audio_models.py (PyTorch's 2-layer batch-first GRU, and its bidirectional LSTM averaged over time,
each with zeros states computed from the input's shape) compile once --input-shape fixes the shapes.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdq_models as q
from audio_models import audio_samples, build_audio
from mcu_flow import assert_compiles_bit_exact, quantize_for_mcu
from edgeopt import api
from edgeopt.api.deploy import _static_shape_arithmetic_folded
from edgeopt.codegen.c import compile_c
from edgeopt.errors import UnsupportedOpError
from edgeopt.quant import Int8Config
from edgeopt.runtime.ort import OrtSession
from edgeopt.runtime.reference import ReferenceModel, lower
from edgeopt.runtime.reference.rnn import row_multipliers, scale_rows, sigmoid, tanh

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None,
                               reason="needs gcc and make")
STEPS, BATCH, FEATURES, HIDDEN = 7, 2, 6, 5


def _cell_model(path, *, op="GRU", directions=1, outputs=("y",), initial=False, opset=17, bias=0.3, **attributes):
    """A GRU or LSTM over the model's input (int8 in both runtimes, so they differ by the cell alone), then a
    Tanh on each output read (an op after it, as in a model). ``initial``: True for constant initial states,
    "inputs" for states read from model inputs (a streaming model's, carried from one call to the next).
    ``bias``: B's standard deviation. Returns the model inputs' shapes."""
    rng = np.random.default_rng(0)
    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[op]
    x_shape = [STEPS, BATCH, FEATURES]
    weights = {"W": rng.normal(0, 0.5, (directions, gates * HIDDEN, FEATURES)).astype(np.float32),
               "R": rng.normal(0, 0.5, (directions, gates * HIDDEN, HIDDEN)).astype(np.float32),
               "B": rng.normal(0, bias, (directions, 2 * gates * HIDDEN)).astype(np.float32)}
    inputs = ["input", "W", "R", "B", "", "", ""]
    state = [directions, BATCH, HIDDEN]
    model_inputs = {"input": x_shape}
    if initial == "inputs":
        model_inputs.update({"h0": state, **({"c0": state} if op == "LSTM" else {})})
        inputs[5:5 + len(model_inputs) - 1] = list(model_inputs)[1:]
    elif initial:
        weights["h0"] = rng.uniform(-0.8, 0.8, state).astype(np.float32)
        inputs[5] = "h0"
        if op == "LSTM":
            weights["c0"] = rng.uniform(-2.0, 2.0, state).astype(np.float32)
            inputs[6] = "c0"
    while not inputs[-1]:
        inputs.pop()
    names = ["y", "y_h", "y_c"][:3 if op == "LSTM" else 2]
    cell = helper.make_node(op, inputs, names, name=op.lower(), hidden_size=HIDDEN,
                            **({"direction": "bidirectional"} if directions == 2 else {}), **attributes)
    shapes = {"y": [STEPS, directions, BATCH, HIDDEN], "y_h": state, "y_c": state}
    nodes = [cell]
    nodes += [helper.make_node("Tanh", [name], [f"out_{name}"], name=f"tanh_{name}") for name in outputs]
    graph = helper.make_graph(
        nodes, op.lower(), [helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)
                            for name, dims in model_inputs.items()],
        [helper.make_tensor_value_info(f"out_{name}", TensorProto.FLOAT, shapes[name]) for name in outputs],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return model_inputs


_INPUT_VALUES = {"input": lambda rng, dims: rng.normal(0, 1, dims),
                 "h0": lambda rng, dims: rng.uniform(-0.9, 0.9, dims),
                 "c0": lambda rng, dims: rng.uniform(-3.0, 3.0, dims)}


def _inputs(shapes, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{name: _INPUT_VALUES[name](rng, dims).astype(np.float32) for name, dims in shapes.items()}
            for _ in range(count)]


VARIANTS = {
    "pytorch_forward_y": dict(linear_before_reset=1),
    "onnx_default_y_h": dict(outputs=("y_h",)),
    "reverse_both_outputs": dict(direction="reverse", outputs=("y", "y_h")),
    "bidirectional_initial_state": dict(directions=2, initial=True, linear_before_reset=1, outputs=("y", "y_h")),
    "bidirectional_onnx_default": dict(directions=2, outputs=("y",)),
    "lstm_forward_y": dict(op="LSTM"),
    "lstm_states_y_h_y_c": dict(op="LSTM", outputs=("y_h", "y_c")),
    "lstm_bidirectional_initial_states": dict(op="LSTM", directions=2, initial=True, outputs=("y", "y_c")),
    "lstm_reverse": dict(op="LSTM", direction="reverse", outputs=("y",)),
    "gru_streaming_state": dict(initial="inputs", linear_before_reset=1, outputs=("y", "y_h")),
    "lstm_streaming_states": dict(op="LSTM", directions=2, initial="inputs", outputs=("y_h", "y_c")),
    "lstm_biases_beyond_8": dict(op="LSTM", bias=6.0, outputs=("y", "y_h")),  # int16 biases in coarser steps
    "rnn_forward_y": dict(op="RNN"),
    "rnn_bidirectional_initial_state": dict(op="RNN", directions=2, initial=True, outputs=("y", "y_h")),
    "rnn_reverse_streaming_state": dict(op="RNN", direction="reverse", initial="inputs", outputs=("y_h",)),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp(request.param)
    shape = _cell_model(tmp_path / "float.onnx", **VARIANTS[request.param])
    result, model = quantize_for_mcu(tmp_path / "float.onnx", _inputs(shape, 16, seed=0), tmp_path / "int8.onnx")
    assert result.float_nodes == ()
    return request.param, shape, model


def test_the_cell_runs_in_integers_within_two_steps_of_onnx_runtime(variant):
    name, shape, model = variant
    within, _, worst = q.agreement(ReferenceModel(model), OrtSession(model), _inputs(shape, 4, seed=3))
    assert within >= 0.98 and worst <= 2, (name, within, worst)
    outputs = VARIANTS[name].get("outputs", ("y",))
    kind = VARIANTS[name].get("op", "GRU").lower()
    ops = lower(model).ops
    cells = [op for op in ops if op.kind == kind]
    # each output read from one op, but Y_h beside Y of a one-direction cell: Y's last step, sliced out of it
    sliced = {"y", "y_h"} <= set(outputs) and VARIANTS[name].get("directions", 1) == 1
    assert len(cells) == len(outputs) - sliced
    assert ("slice" in [op.kind for op in ops]) == sliced
    if VARIANTS[name].get("initial") == "inputs":  # the states are int8 inputs of the op, after x
        assert {len(op.inputs) for op in cells} == {len(shape)}
    assert {op.params.bias_shift > 0 for op in cells} == {"bias" in VARIANTS[name]}  # biases of 8 and more


@needs_gcc
@pytest.mark.parametrize("rounding", ["double", "single"])
def test_generated_c_is_bit_exact(variant, rounding, tmp_path):
    _, shape, model = variant
    assert_compiles_bit_exact(model, tmp_path / "c", _inputs(shape, 2, seed=4), rounding=rounding)


def test_the_gates_are_within_three_and_four_q15_steps_of_sigmoid_and_tanh():
    q12 = np.arange(-8 * 4096, 8 * 4096, 7)
    real = q12 / 4096.0
    expected_sigmoid = np.array([1 / (1 + math.exp(-v)) for v in real]) * 32768
    expected_tanh = np.tanh(real) * 32768
    assert np.abs(sigmoid(q12) - expected_sigmoid).max() <= 3  # measured 2.3: tanh(x / 2)'s error halved, a floor
    assert np.abs(tanh(q12) - expected_tanh).max() <= 4  # measured 3.7
    assert tanh(np.array([10**9]))[0] == 32767 and sigmoid(np.array([-(10**9)]))[0] == 0  # clamped, not wrapped
    assert np.array_equal(tanh(-q12), -tanh(q12))  # one table over [0, 8], read mirrored


def test_row_multipliers_keep_every_row_within_half_a_step_of_the_largest_rows_error():
    """One shift per matrix: the largest row's multiplier fills int16, smaller rows keep the same absolute
    error (what a gate's sum feels), not the same relative one."""
    rng = np.random.default_rng(0)
    real = np.exp(rng.uniform(math.log(1e-3), math.log(0.5), 64))
    multiplier, shift = row_multipliers(real, "W")
    assert multiplier.dtype == np.int16 and 2**14 <= multiplier.max() <= 2**15 - 1
    product = rng.integers(-(2**20), 2**20, (8, 64))
    error = np.abs(scale_rows(product, multiplier, shift) - product * real)
    assert error.max() <= 0.5 + 2**20 * 2.0 ** -(shift + 1)
    with pytest.raises(ValueError, match="too coarse"):
        row_multipliers(np.array([0.5, 2.0**14]), "R")


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
def test_the_ort_target_keeps_the_cells_float(tmp_path, op):
    """ONNX Runtime has no QDQ RNN, GRU or LSTM: on the ort target they would run in float between DQ and Q, so
    they stay float (int8-dynamic's DynamicQuantizeLSTM is the ORT route for an LSTM)."""
    shape = _cell_model(tmp_path / "float.onnx", op=op)
    result = api.quantize(tmp_path / "float.onnx", Int8Config(), _inputs(shape, 8, seed=0),
                          output=tmp_path / "int8.onnx", check_speed=False, check_fidelity=False).result
    assert op in [node.op_type for node in result.float_nodes]  # and the Tanh, which has no ORT kernel


@pytest.mark.parametrize("attributes, reason", [
    (dict(clip=2.0), "clip is set"),
    (dict(activations=["Sigmoid", "Relu"]), "the integer kernel computes the default Sigmoid and Tanh"),
    (dict(op="LSTM", input_forget=1), "input_forget=1"),
    (dict(op="LSTM", activations=["Sigmoid", "Tanh", "Relu"]), "computes the default Sigmoid, Tanh and Tanh"),
    (dict(op="RNN", activations=["Relu"]), "the integer kernel computes the default Tanh"),
])
def test_a_cell_the_kernel_cannot_run_stays_float_and_compile_says_why_in_one_line(tmp_path, attributes, reason):
    shape = _cell_model(tmp_path / "float.onnx", **attributes)
    op = attributes.get("op", "GRU")
    result, model = quantize_for_mcu(tmp_path / "float.onnx", _inputs(shape, 8, seed=0), tmp_path / "int8.onnx")
    assert [(node.op_type, reason in node.reason) for node in result.float_nodes] == [(op, True)]
    with pytest.raises(UnsupportedOpError) as error:
        compile_c(model, tmp_path / "c")
    assert "\n" not in str(error.value) and f"{op} ({op.lower()})" in str(error.value)


# the keyword-spotting models: (cell ops in the program, the SQNR each runtime's int8 reaches against float)
KEYWORD_MODELS = {"gru": 2, "lstm": 1}


@pytest.fixture(scope="module", params=sorted(KEYWORD_MODELS))
def keyword_model(request, tmp_path_factory):
    name = request.param
    tmp_path = tmp_path_factory.mktemp(f"kws_{name}")
    path = build_audio(name, tmp_path)
    quantize_for_mcu(path, audio_samples(name, 16), tmp_path / "int8.onnx")
    frames = 49  # what `edgeopt compile --input-shape input=1x49x40` loads
    loaded = api.load(tmp_path / "int8.onnx", input_shapes={"input": (1, frames, 40)})
    fixed = _static_shape_arithmetic_folded(loaded)
    held_out = audio_samples(name, 6, seed=7, frames=(frames, frames))
    return name, path, tmp_path / "int8.onnx", fixed, held_out


def _sqnr(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference**2) / max(float(np.sum((ours - reference) ** 2)), 1e-30)))


def test_the_keyword_spotting_cells_in_integers_keep_the_qdq_models_fidelity(keyword_model):
    """PyTorch's 2-layer batch-first GRU (linear_before_reset 1) and 1-layer bidirectional LSTM averaged over
    time, zeros states from the input's shape: the integer reference against the QDQ model in ONNX Runtime
    (which runs the cells in float over the int8 weights) and both against the float model, on 6 held-out
    clips of 49 frames. Measured: GRU 42.1 dB to identical against the QDQ model, mean 35.5 dB against
    float (the QDQ model 36.2; one clip is at 22.5 dB for both: the untrained model's logits are close
    there, and int8 flips its top-1 in both runtimes alike); LSTM 42.7 dB to identical, mean 29.2 dB
    (the QDQ model 29.2)."""
    name, path, quantized, fixed, held_out = keyword_model
    reference, qdq, float_session = ReferenceModel(fixed), OrtSession(quantized), OrtSession(path)
    ours_db, qdq_db = [], []
    for feed in held_out:
        ours = reference.dequantize(reference.run(feed))["output"]
        theirs, truth = qdq.run(feed)["output"], float_session.run(feed)["output"]
        assert _sqnr(ours, theirs) >= 30.0
        ours_db.append(_sqnr(ours, truth))
        qdq_db.append(_sqnr(theirs, truth))
    assert np.mean(ours_db) >= np.mean(qdq_db) - 1.5, (ours_db, qdq_db)
    assert [op.kind for op in reference.program.ops].count(name) == KEYWORD_MODELS[name]


@needs_gcc
def test_the_keyword_spotting_cells_compile_bit_exact(keyword_model, tmp_path):
    _, _, _, fixed, held_out = keyword_model
    result = assert_compiles_bit_exact(fixed, tmp_path / "c", held_out[:2])
    assert result.tensors_compared > 0


def test_quantize_does_not_warn_that_a_shape_computed_state_blocks_the_c(tmp_path):
    """PyTorch's zeros initial state (Shape -> ConstantOfShape -> Slice) stays float at quantize time, where the
    batch is dynamic; compile folds it once --input-shape fixes the shapes, so it is no reason to warn that the
    model cannot become C."""
    path = build_audio("gru", tmp_path)
    report = api.quantize(path, Int8Config(target="mcu"), audio_samples("gru", 8), output=tmp_path / "int8.onnx",
                          check_speed=False, check_fidelity=False)
    assert {node.op_type for node in report.result.float_nodes} == {"ConstantOfShape", "Slice"}
    assert not [warning for warning in report.warnings if "cannot become C" in warning], report.warnings


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
def test_the_fidelity_check_measures_y_h_against_the_cells_own_twin_output(op, tmp_path):
    """A cell reading quantized W and R gets a float-weight twin in the fidelity check; the twin's Y_h is its
    second output, and Y (its first, [T, D, B, H]) was compared against the float Y_h ([D, B, H]): quantize
    failed with 'reference shape ... differs from test shape' on any cell whose Y_h is read."""
    shape = _cell_model(tmp_path / "float.onnx", op=op, outputs=("y_h",))
    report = api.quantize(tmp_path / "float.onnx", Int8Config(target="mcu"), _inputs(shape, 8, seed=0),
                          output=tmp_path / "int8.onnx", check_speed=False)
    row, = [row for row in report.fidelity.layers if row.tensor == "y_h"]
    assert row.computed_sqnr_db > row.sqnr_db > 20  # the twin, float weights, is the closer to float (~40 dB)


def _crnn_onnx(path, cell: str) -> None:
    """A CRNN keyword spotter: Conv1d (stride 2) + BatchNorm + ReLU over 40 mel bands, permuted to
    [T, N, C] for a sequence-first GRU or LSTM whose last step feeds a Linear head (TorchScript, opset 17)."""
    import torch
    from torch import nn

    class Crnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv1d(40, 32, 5, stride=2, padding=2), nn.BatchNorm1d(32), nn.ReLU())
            self.rnn = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[cell](32, 24)
            self.head = nn.Linear(24, 12)

        def forward(self, x):
            out, _ = self.rnn(self.conv(x).permute(2, 0, 1))
            return self.head(out[-1])

    torch.manual_seed(0)
    torch.onnx.export(Crnn().eval(), (torch.randn(1, 40, 60),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"])


@needs_gcc
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_a_conv_front_end_before_the_cell_compiles_bit_exact(cell, tmp_path):
    """The conv's [N, C, T] output reaches the cell through the lift of 1-D convs (stored [N, T, C]) and the
    permute; measured: identical to the QDQ model in ONNX Runtime on most clips, 43.5 dB on the others."""
    _crnn_onnx(tmp_path / "float.onnx", cell)
    rng = np.random.default_rng(0)
    data = [{"input": rng.normal(0, 1, (1, 40, 60)).astype(np.float32)} for _ in range(16)]
    result, model = quantize_for_mcu(tmp_path / "float.onnx", data, tmp_path / "int8.onnx")
    assert result.float_nodes == ()
    reference, qdq = ReferenceModel(model), OrtSession(model)
    for feed in data[:3]:
        ours, theirs = reference.dequantize(reference.run(feed))["output"], qdq.run(feed)["output"]
        assert 10 * np.log10(np.sum(theirs**2) / max(float(np.sum((ours - theirs) ** 2)), 1e-30)) >= 30.0
    assert_compiles_bit_exact(model, tmp_path / "c", data[:2])
    # the conv's NHWC output read back as [N, C, T], then permuted to [T, N, C]: with N = 1 the two transposes
    # compose to the bytes as stored (a reshape, in place), and the model's [N, C, T] input is stored [N, T, C]
    program = lower(model)
    assert "transpose" not in [op.kind for op in program.ops]
    assert program.tensors[program.inputs[0].tensor].layout == (0, 2, 1)
    code = (tmp_path / "c" / "model.c").read_text()
    assert "eo_copy_s8(" not in code and "eo_transpose_s8(" not in code


@needs_gcc
def test_a_single_batch_first_sequence_reaches_the_cell_without_a_copy(tmp_path):
    """Keras' export: the input [1, T, F] transposed to the cell's [T, 1, F]. Moving an axis of size 1 moves no
    byte: the transpose is a reshape the planner writes in place, and the C calls no kernel for it."""
    nodes = [helper.make_node("Transpose", ["input"], ["steps"], perm=[1, 0, 2], name="to_steps"),
             helper.make_node("LSTM", ["steps", "W", "R", "B"], ["", "y_h"], name="lstm", hidden_size=HIDDEN),
             helper.make_node("Tanh", ["y_h"], ["output"], name="tanh")]
    rng = np.random.default_rng(0)
    weights = {"W": rng.normal(0, 0.5, (1, 4 * HIDDEN, FEATURES)), "R": rng.normal(0, 0.5, (1, 4 * HIDDEN, HIDDEN)),
               "B": rng.normal(0, 0.3, (1, 8 * HIDDEN))}
    graph = helper.make_graph(
        nodes, "batch_first", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, STEPS, FEATURES])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, HIDDEN])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "float.onnx")
    data = [{"input": rng.normal(0, 1, (1, STEPS, FEATURES)).astype(np.float32)} for _ in range(8)]
    _, model = quantize_for_mcu(tmp_path / "float.onnx", data, tmp_path / "int8.onnx")
    assert [op.kind for op in lower(model).ops] == ["reshape", "lstm", "lut"]  # the Tanh: a table
    assert_compiles_bit_exact(model, tmp_path / "c", data[:2])
    code = (tmp_path / "c" / "model.c").read_text()
    assert "eo_transpose_s8(" not in code and "eo_copy_s8(" not in code

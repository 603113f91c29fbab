"""RMSNorm and L2 normalization on the microcontroller: the LayerNorm kernel with no mean subtracted.

RMSNorm (Llama's, T5's: spelled out below opset 23, the op from 23) and L2 normalization (``F.normalize``
spelled out, ONNX's LpNormalization with p = 2) had no integer kernel: the quantizer left them float and
``edgeopt compile`` refused the model. Each is now one ``layer_norm`` op, not centered, on ``q - zp_in``:
the integer reference within one output step of ONNX Runtime on the QDQ model (which computes the group in
float between its DequantizeLinear and QuantizeLinear), and the C bit-exact with the reference.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from onnx import helper

import qdq_models as q
from edgeopt.runtime.ort import OrtSession
from edgeopt.runtime.reference import ReferenceModel, lower
from layer_norm_models import constant, qdq_graph
from mcu_flow import assert_compiles_bit_exact, quantize_for_mcu

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None,
                               reason="needs gcc and make")
SHAPE = (3, 5, 16)


def _rms_body(divide: str, gain_first: bool):
    """x / sqrt(mean(x^2, last axis) + eps) * w, as exporters write it (T5: w * x first)."""
    x = "xd"
    nodes = []
    if gain_first:
        nodes.append(helper.make_node("Mul", ["w", "xd"], ["wx"]))
        x = "wx"
    nodes += [helper.make_node("Pow", ["xd", "two"], ["sq"]),
              helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1),
              helper.make_node("Add", ["ms", "eps"], ["ms_eps"]),
              helper.make_node("Sqrt", ["ms_eps"], ["r"])]
    last = "y" if gain_first else "n"
    if divide == "Div":
        nodes.append(helper.make_node("Div", [x, "r"], [last]))
    else:
        nodes += [helper.make_node("Reciprocal", ["r"], ["inv"]), helper.make_node("Mul", [x, "inv"], [last])]
    if not gain_first:
        nodes.append(helper.make_node("Mul", ["n", "w"], ["y"]))
    gain = np.random.default_rng(1).uniform(-1.5, 1.5, SHAPE[-1])
    return nodes, [constant("two", 2.0), constant("eps", 1e-6), constant("w", gain)]


def _l2_body(floor: str, expand: bool, axis: int):
    """x / max(||x||, eps) over ``axis``: ReduceL2, Clip (or Max), [Expand to x's shape], Div."""
    nodes = [helper.make_node("ReduceL2", ["xd"], ["norm"], axes=[axis], keepdims=1),
             helper.make_node("Clip", ["norm", "eps"], ["clamped"]) if floor == "Clip"
             else helper.make_node("Max", ["norm", "eps"], ["clamped"])]
    if expand:
        nodes += [helper.make_node("Shape", ["xd"], ["shape"]),
                  helper.make_node("Expand", ["clamped", "shape"], ["wide"])]
    nodes.append(helper.make_node("Div", ["xd", "wide" if expand else "clamped"], ["y"]))
    return nodes, [constant("eps", 1e-12)]


BODIES = {
    "rms_div": lambda: (_rms_body("Div", False), 17),
    "rms_reciprocal": lambda: (_rms_body("Reciprocal", False), 17),
    "rms_t5_gain_first": lambda: (_rms_body("Div", True), 17),
    "rms_op": lambda: (([helper.make_node("RMSNormalization", ["xd", "w"], ["y"], axis=-1, epsilon=1e-6)],
                        [constant("w", np.random.default_rng(1).uniform(-1.5, 1.5, SHAPE[-1]))]), 23),
    "l2_clip_expand": lambda: (_l2_body("Clip", True, -1), 17),
    "l2_max_middle_axis": lambda: (_l2_body("Max", False, 1), 17),
    "lp_op": lambda: (([helper.make_node("LpNormalization", ["xd"], ["y"], axis=-1, p=2)], []), 17),
}


def _feeds(count: int, seed: int):
    rng = np.random.default_rng(seed)  # rows of their own scale and offset: q - zp matters
    return [{"x": (rng.standard_normal(SHAPE) * rng.uniform(0.2, 2.0, (1, SHAPE[1], 1)) + 0.8).astype(np.float32)}
            for _ in range(count)]


@needs_gcc
@pytest.mark.parametrize("name", list(BODIES))
def test_rms_and_l2_norm_are_one_integer_op_within_a_step_of_ort_and_bit_exact_in_c(name, tmp_path):
    (body, initializers), opset = BODIES[name]()
    out_scale = 0.03 if name.startswith("rms") else 0.5 / 127  # an L2-normalized value lies in [-1, 1]
    model = qdq_graph(body, initializers, SHAPE, opset=opset, out_scale=out_scale, zero_points=(-40, 2))
    program = lower(model)
    assert [op.kind for op in program.ops] == ["layer_norm"], [op.kind for op in program.ops]
    assert not program.ops[0].params.centered
    feeds = _feeds(4, 0)
    within, _, worst = q.agreement(ReferenceModel(model), OrtSession(model), feeds)
    assert within >= 0.99 and worst <= 1, (within, worst)
    assert_compiles_bit_exact(model, tmp_path / "c", feeds[:2])


def test_an_lp_normalization_by_the_l1_norm_is_refused_with_the_reason():
    from edgeopt.errors import UnsupportedOpError

    model = qdq_graph([helper.make_node("LpNormalization", ["xd"], ["y"], axis=-1, p=1)], [], SHAPE)
    with pytest.raises(UnsupportedOpError, match="L2 norm \\(p = 2\\) only"):
        lower(model)


class _EmbeddingNet:
    """A keyword-spotting embedding: Conv1d, RMSNorm over channels, Linear, mean over time, F.normalize."""

    @staticmethod
    def build(torch):
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv1d(4, 16, 3, padding=1)
                self.gain = torch.nn.Parameter(torch.rand(16) + 0.5)
                self.fc = torch.nn.Linear(16, 8)

            def forward(self, x):
                h = self.conv(x).transpose(1, 2)
                h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gain
                return torch.nn.functional.normalize(self.fc(h).mean(1), dim=1)

        torch.manual_seed(0)
        return Net().eval()


@needs_gcc
@pytest.mark.parametrize("dynamo", [False, True])
def test_an_embedding_net_with_rms_norm_and_f_normalize_compiles_for_the_mcu(dynamo, tmp_path):
    # 'cannot lower 4 ops to integer kernels: ReduceL2; Expand; Div ...': both groups stayed float
    torch = pytest.importorskip("torch")
    path = tmp_path / "net.onnx"
    torch.onnx.export(_EmbeddingNet.build(torch), (torch.randn(1, 4, 12),), str(path),
                      input_names=["x"], opset_version=18 if dynamo else 17, dynamo=dynamo)
    rng = np.random.default_rng(0)
    samples = [{"x": rng.standard_normal((1, 4, 12)).astype(np.float32)} for _ in range(40)]
    result, model = quantize_for_mcu(path, samples[:32], tmp_path / "q.onnx")
    assert result.float_nodes == ()
    assert sorted(op.kind for op in lower(model).ops if op.kind == "layer_norm") == ["layer_norm"] * 2
    # a step of difference in the mean before F.normalize (of 8 values) moves the outputs by up to two of theirs
    within, _, worst = q.agreement(ReferenceModel(model), OrtSession(model), samples[32:])
    assert within >= 0.98 and worst <= 2, (within, worst)
    assert_compiles_bit_exact(model, tmp_path / "c", samples[32:34])


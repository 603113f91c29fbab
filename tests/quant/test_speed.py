"""speed_check: float vs int8 timing structure (never a speed), and the slowdown reasons on synthetic evidence."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.errors import ConfigError, DataError
from edgeopt.metrics import count_of
from edgeopt.quant.speed import TINY_MODEL_MS, slowdown_reasons, speed_check
from edgeopt.quant.speed_evidence import (
    FloatIsland,
    KernelCount,
    SpeedEvidence,
    float_islands,
    int8_dot_product_instructions,
    kernel_count,
    model_precision,
    read_cpu_flags,
    signed_activations,
)
from tests.models import build_onnx, ort_qdq_model

# ------------------------------------------------------------------ real models


def _quantize(float_path: pathlib.Path, quant_path: pathlib.Path) -> pathlib.Path:
    rng = np.random.default_rng(0)
    samples = [{"input": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(16)]
    return ort_qdq_model(float_path, quant_path, samples)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    folder = tmp_path_factory.mktemp("speed")
    float_path = build_onnx("resnet", folder)
    return float_path, _quantize(float_path, folder / "resnet_qdq.onnx")


@pytest.fixture(scope="module")
def check(resnet):
    return speed_check(*resnet, runs=10, threads=1)


def test_speed_check_reports_medians_and_their_ratio(check):
    assert check.float_ms > 0 and check.quant_ms > 0
    assert check.speedup == pytest.approx(check.float_ms / check.quant_ms)
    assert check.slower == (check.speedup < 1.0)
    assert (check.runs, check.threads) == (10, 1)


def test_reasons_are_given_only_when_int8_is_slower(check):
    assert all(isinstance(reason, str) and reason for reason in check.reasons)
    if not check.slower:
        assert check.reasons == ()


def test_evidence_of_an_ort_qdq_model_with_batchnorm_left_in(check):
    # Without ORT's pre-processing the BatchNormalization nodes stay, between Q/DQ pairs.
    evidence = check.evidence
    assert {island.op_type for island in evidence.islands} == {"BatchNormalization"}
    assert evidence.signed_activations == ()
    assert evidence.kernels is not None and evidence.kernels.integer_kernels > 0
    assert evidence.kernels.unfused_qdq > 0


def test_speed_check_to_dict_is_json(check):
    data = json.loads(json.dumps(check.to_dict(), allow_nan=False))
    assert {"float_ms", "quant_ms", "speedup", "slower", "reasons", "evidence"} <= set(data)
    assert data["evidence"]["float_islands"][0]["op_type"] == "BatchNormalization"


def test_render_speed(check, capsys):
    from edgeopt.cli.render_compare import render_speed

    render_speed(check)
    captured = capsys.readouterr()
    assert "int8 (QDQ)" in captured.out
    assert ("not faster" in captured.err) == check.slower


def test_an_ort_qdq_model_reads_as_int8(resnet):
    from edgeopt.io import load_model

    assert model_precision(load_model(resnet[1])) == "int8"
    assert model_precision(load_model(resnet[0])) == "float32"


@pytest.mark.parametrize(("scheme", "precision", "label"), [("Fp16Config", "float16", "fp16"),
                                                            ("Bf16Config", "bfloat16", "bf16"),
                                                            ("Int4WeightConfig", "int4", "int4 weights")])
def test_other_precisions_are_timed_and_explained_as_themselves(resnet, scheme, precision, label, capsys):
    # An fp16 model slower than float on CPU must not be told about integer kernels and float islands.
    import edgeopt
    from edgeopt.cli.render_compare import render_speed

    converted = edgeopt.quantize(str(resnet[0]), getattr(edgeopt, scheme)(), check_fidelity=False,
                                 check_speed=False).result.model
    assert model_precision(converted) == precision
    result = speed_check(resnet[0], converted, runs=3, threads=1)
    assert result.label == label and result.evidence.to_dict()["precision"] == precision
    render_speed(result)
    captured = capsys.readouterr()
    assert label in captured.out and "int8" not in captured.out + captured.err
    assert all("integer kernel" not in reason and "int8" not in reason for reason in result.reasons)


def test_models_with_different_inputs_are_refused(resnet):
    float_path, quant_path = resnet
    quant = onnx.load(str(quant_path))
    quant.graph.input[0].name = "image"
    for node in quant.graph.node:
        node.input[:] = ["image" if name == "input" else name for name in node.input]
    with pytest.raises(DataError, match="different inputs"):
        speed_check(float_path, ir.from_proto(quant), runs=1)


def test_bad_settings_are_refused(resnet):
    with pytest.raises(ConfigError, match="runs"):
        speed_check(*resnet, runs=0)
    with pytest.raises(ConfigError, match="threads"):
        speed_check(*resnet, threads=0)


# ---------------------------------------------------------------- CPU features


def test_cpu_flags_are_read_from_the_x86_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Fake\nflags\t\t: fpu sse2 avx2 avx512_vnni\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    assert read_cpu_flags(cpuinfo) == frozenset({"fpu", "sse2", "avx2", "avx512_vnni"})


def test_cpu_flags_are_read_from_the_arm_features_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\nCPU implementer\t: 0x41\n")
    assert read_cpu_flags(cpuinfo) == frozenset({"fp", "asimd", "asimddp"})


def test_cpu_flags_of_a_missing_file_are_unknown(tmp_path):
    assert read_cpu_flags(tmp_path / "absent") is None


def test_int8_dot_product_instructions():
    assert int8_dot_product_instructions({"avx2", "fma"}, "x86_64") == ()
    assert int8_dot_product_instructions({"avx2", "avx512_vnni"}, "x86_64") == ("avx512_vnni",)
    assert int8_dot_product_instructions({"avx_vnni"}, "AMD64") == ("avx_vnni",)
    assert int8_dot_product_instructions({"asimd", "asimddp", "i8mm"}, "aarch64") == ("asimddp", "i8mm")
    assert int8_dot_product_instructions({"asimd"}, "aarch64") == ()
    assert int8_dot_product_instructions(None, "x86_64") is None
    assert int8_dot_product_instructions({"avx512_vnni"}, "riscv64") is None


# ------------------------------------------------------------ synthetic graphs


def _qdq_model(*, island_op: str = "Tanh", activation_dtype=np.uint8) -> ir.Model:
    """input -Q/DQ-> Conv (int8 weight via DQ) -Q/DQ-> island_op -Q/DQ-> Sub(weight DQ) -> output."""
    zero = np.zeros((), activation_dtype)
    inits = [numpy_helper.from_array(np.float32(0.05), "s"), numpy_helper.from_array(zero, "z"),
             numpy_helper.from_array(np.ones((4, 3, 3, 3), np.int8), "w_q"),
             numpy_helper.from_array(np.full(4, 0.01, np.float32), "w_s"),
             numpy_helper.from_array(np.zeros(4, np.int8), "w_z"),
             numpy_helper.from_array(np.ones((1, 4, 1, 1), np.int8), "b_q"),
             numpy_helper.from_array(np.float32(0.1), "b_s")]
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "s", "z"], ["x_q"], name="q_in"),
        helper.make_node("DequantizeLinear", ["x_q", "s", "z"], ["x_dq"], name="dq_in"),
        helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], name="dq_w", axis=0),
        helper.make_node("Conv", ["x_dq", "w"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["conv", "s", "z"], ["conv_q"], name="q_conv"),
        helper.make_node("DequantizeLinear", ["conv_q", "s", "z"], ["conv_dq"], name="dq_conv"),
        helper.make_node(island_op, ["conv_dq"], ["act"], name="island"),
        helper.make_node("QuantizeLinear", ["act", "s", "z"], ["act_q"], name="q_act"),
        helper.make_node("DequantizeLinear", ["act_q", "s", "z"], ["act_dq"], name="dq_act"),
        helper.make_node("DequantizeLinear", ["b_q", "b_s"], ["b"], name="dq_b"),
        helper.make_node("Sub", ["act_dq", "b"], ["output"], name="sub"),
    ]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_float_islands_are_ops_without_an_integer_path_reading_a_dequantized_activation():
    # Conv reads a DQ'd activation but has an integer kernel; Sub reads a DQ'd activation
    # and is not in ORT's QDQ fusions; the weight DQ feeding Conv is not an activation.
    islands = float_islands(_qdq_model(island_op="Tanh"))
    assert islands == (FloatIsland(node="island", op_type="Tanh"), FloatIsland(node="sub", op_type="Sub"))


def test_an_op_ort_runs_in_int8_is_not_an_island():
    assert float_islands(_qdq_model(island_op="Sigmoid")) == (FloatIsland(node="sub", op_type="Sub"),)


def test_a_float_model_has_no_islands(tmp_path):
    assert float_islands(ir.load(str(build_onnx("resnet", tmp_path)))) == ()


def test_signed_activations_are_found_by_the_zero_point_dtype():
    assert signed_activations(_qdq_model(activation_dtype=np.int8)) == ("input", "conv", "act")
    assert signed_activations(_qdq_model(activation_dtype=np.uint8)) == ()


def test_kernel_count_ignores_the_conversions_at_the_graph_edges():
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "s", "z"], ["x_q"]),
        helper.make_node("QLinearConv", ["x_q", "s", "z", "w_q", "w_s", "w_z", "s", "z"], ["y_q"],
                         domain="com.microsoft"),
        helper.make_node("DequantizeLinear", ["y_q", "s", "z"], ["y"]),
        helper.make_node("Softmax", ["y"], ["p"]),
        helper.make_node("QuantizeLinear", ["p", "s", "z"], ["p_q"]),
        helper.make_node("DequantizeLinear", ["p_q", "s", "z"], ["output"]),
    ]
    graph = helper.make_graph(nodes, "optimized", [helper.make_tensor_value_info("input", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                                  helper.make_opsetid("com.microsoft", 1)]))
    assert kernel_count(model) == KernelCount(integer_kernels=1, unfused_qdq=2)


# --------------------------------------------------------------------- reasons


def _evidence(**changes) -> SpeedEvidence:
    clean = dict(machine="x86_64", dot_product=("avx512_vnni",), islands=(), signed_activations=(),
                 float_ms=1.0, kernels=KernelCount(integer_kernels=10, unfused_qdq=0))
    return SpeedEvidence(**(clean | changes))


def test_clean_evidence_gives_no_reason():
    assert slowdown_reasons(_evidence()) == ()
    assert slowdown_reasons(_evidence(dot_product=None, kernels=None)) == ()


def test_a_cpu_without_int8_dot_product_is_a_reason():
    (reason,) = slowdown_reasons(_evidence(dot_product=()))
    assert "no int8 dot-product" in reason and "VNNI" in reason
    (reason,) = slowdown_reasons(_evidence(machine="aarch64", dot_product=()))
    assert "asimddp" in reason


def test_float_islands_are_a_reason_listing_their_ops():
    islands = (FloatIsland(node="a", op_type="Softplus"), FloatIsland(node="b", op_type="Erf"),
               FloatIsland(node="c", op_type="Softplus"))
    (reason,) = slowdown_reasons(_evidence(islands=islands))
    assert reason.startswith("3 float islands") and "Softplus x2, Erf" in reason
    assert "Erf is a spelled-out GELU: exported at opset 20" in reason  # the way out an old exporter left
    islands = (FloatIsland(node="m", op_type="ReduceMean"), FloatIsland(node="d", op_type="Sub"),
               FloatIsland(node="s", op_type="Sqrt"))
    (reason,) = slowdown_reasons(_evidence(islands=islands))
    assert "spelled-out LayerNorm: exported at opset 17" in reason and "GELU" not in reason
    (reason,) = slowdown_reasons(_evidence(islands=islands[::2]))  # an RMSNorm: no mean taken off
    assert "LayerNorm" not in reason


def test_int8_activations_are_a_reason_on_x86_only():
    (reason,) = slowdown_reasons(_evidence(signed_activations=("conv1", "conv2")))
    assert "2 activations are int8 (e.g. conv1)" in reason and "uint8" in reason
    assert slowdown_reasons(_evidence(machine="aarch64", dot_product=("asimddp",),
                                      signed_activations=("conv1",))) == ()


def test_a_tiny_model_is_a_reason():
    (reason,) = slowdown_reasons(_evidence(float_ms=TINY_MODEL_MS / 2))
    assert "overhead" in reason and f"{TINY_MODEL_MS / 2:.3f} ms" in reason


def test_unfused_qdq_and_missing_integer_kernels_are_reasons():
    (reason,) = slowdown_reasons(_evidence(kernels=KernelCount(integer_kernels=3, unfused_qdq=12)))
    assert reason.startswith("12 QuantizeLinear/DequantizeLinear nodes remain")
    (reason,) = slowdown_reasons(_evidence(kernels=KernelCount(integer_kernels=0, unfused_qdq=12)))
    assert "no node into an integer kernel" in reason


def test_layers_left_in_float_between_int8_kernels_are_a_reason(resnet):
    # An excluded Conv reads float inputs, so it and the node writing them run in float in ORT.
    from edgeopt.io import load_model
    from edgeopt.quant import Int8Config, quantize
    from edgeopt.runtime.ort import optimized_model

    model = load_model(resnet[0])
    conv = next(node.name for node in model.graph if node.op_type == "Conv")
    calibration = [{"input": np.random.default_rng(i).standard_normal((1, 3, 32, 32)).astype(np.float32)}
                   for i in range(4)]
    kept = quantize(model, Int8Config(exclude=(conv,)), calibration).model
    counts = kernel_count(optimized_model(kept))
    assert counts.float_layers and counts.integer_kernels
    reasons = slowdown_reasons(_evidence(kernels=counts))
    layers = count_of(sum(counts.float_layers.values()), "layer runs", "layers run")  # "1 layer runs"
    assert any(r.startswith(f"{layers} in float") for r in reasons)


def test_half_precision_and_weight_only_models_get_their_own_reasons():
    (tiny_fp16, *_) = slowdown_reasons(_evidence(precision="float16", runtime_casts=3, float_ms=1.0))
    assert "computes this fp16 model in float32" in tiny_fp16 and "3 Cast nodes" in tiny_fp16
    (reason,) = slowdown_reasons(_evidence(precision="bfloat16", runtime_casts=0, dot_product=()))
    assert "bf16 model in float32" in reason and "Cast" not in reason  # no int8 dot-product talk
    reasons = slowdown_reasons(_evidence(precision="int4", float_ms=TINY_MODEL_MS / 2,
                                         islands=(FloatIsland(node="n", op_type="Erf"),)))
    assert len(reasons) == 2 and "int4 weight-only" in reasons[0] and "overhead" in reasons[1]
    (reason,) = slowdown_reasons(_evidence(precision="weight8"))  # int4's fallback and tables, all in 8 bits
    assert reason.startswith("8-bit weight-only") and "int4" not in reason


def test_several_reasons_come_most_fundamental_first():
    reasons = slowdown_reasons(_evidence(dot_product=(), float_ms=0.01,
                                         islands=(FloatIsland(node="n", op_type="Erf"),)))
    assert len(reasons) == 3
    assert "dot-product" in reasons[0] and "overhead" in reasons[1] and "float islands" in reasons[2]


# ------------------------------------------------------------------ profile


def test_the_profile_times_each_op_type_of_the_graph_onnx_runtime_runs(resnet):
    from edgeopt.runtime.ort import op_times_ms

    feed = {"input": np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    float_times, quant_times = (op_times_ms(path, feed, runs=3, threads=1) for path in resnet)
    assert all(ms > 0 for ms in [*float_times.values(), *quant_times.values()])
    assert list(quant_times.values()) == sorted(quant_times.values(), reverse=True)
    assert "QLinearConv" in quant_times and not any(op.startswith("QLinear") for op in float_times)


def test_op_profile_puts_each_int8_kernel_next_to_the_float_ops_of_its_kind():
    from edgeopt.quant.speed_evidence import PROFILED_OPS, OpTime, op_profile

    float_times = {"Conv": 0.030, "FusedConv": 0.010, "ReorderOutput": 0.013, "Transpose": 0.004}
    quant_times = {"QLinearConv": 0.050, "Transpose": 0.020, "QuantizeLinear": 0.012, "QGemm": 0.003, "Mul": 0.001}
    assert op_profile(float_times, quant_times) == (
        OpTime("QLinearConv", 0.050, "Conv", pytest.approx(0.040)), OpTime("Transpose", 0.020, "Transpose", 0.004),
        OpTime("QuantizeLinear", 0.012, "QuantizeLinear", None), OpTime("QGemm", 0.003, "Gemm", None))
    assert len(op_profile(float_times, quant_times)) == PROFILED_OPS


def test_the_profile_is_a_reason_naming_where_the_time_goes():
    from edgeopt.quant.speed_evidence import OpTime

    times = (OpTime("Transpose", 0.05, "Transpose", 0.01), OpTime("QuantizeLinear", 0.012, "QuantizeLinear", None))
    (reason,) = slowdown_reasons(_evidence(op_times=times))
    assert "Transpose 0.050 ms (Transpose 0.010 ms)" in reason and "QuantizeLinear 0.012 ms (none in float)" in reason
    assert json.loads(json.dumps(_evidence(op_times=times).to_dict()))["op_times"][0]["op_type"] == "Transpose"


def test_a_slower_quantized_model_is_profiled(resnet, monkeypatch):
    import edgeopt.quant.speed as speed

    monkeypatch.setattr(speed, "_interleaved_medians", lambda sessions, feed, runs: (1.0, 2.0))
    slower = speed_check(*resnet, runs=2, threads=1)
    assert slower.evidence.op_times and slower.evidence.op_times[0].quant_ms > 0
    assert any(reason.startswith("where the time goes") for reason in slower.reasons)
    monkeypatch.setattr(speed, "_interleaved_medians", lambda sessions, feed, runs: (2.0, 1.0))
    assert speed_check(*resnet, runs=2, threads=1).evidence.op_times == ()  # faster: nothing to explain

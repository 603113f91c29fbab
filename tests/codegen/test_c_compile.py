"""compile_c: memory plan, bad input rules of issue 4, the build check, verify naming a layer."""

from __future__ import annotations

import logging
import re
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdq_models as q
from edgeopt.analysis.memory import ArenaPlan, TensorLifetime, check_no_overlap, greedy_arena_plan
from edgeopt.codegen.c import compile_c, verify
from edgeopt.codegen.c.build import build
from edgeopt.codegen.c.plan import exact_arena_plan, plan_memory
from edgeopt.errors import CodegenError, ConfigError, ModelError, OutputError, UnsupportedOpError
from edgeopt.runtime.reference import lower

logging.getLogger("root").setLevel(logging.ERROR)
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


def _qdq(name="conv_relu"):
    return q.to_ir(q.quantize_with_ort(q.float_model(name)))


@pytest.mark.parametrize("name", sorted(q.FLOAT_BUILDERS))
def test_no_two_live_tensors_overlap(name):
    memory = plan_memory(lower(_qdq(name)))
    assert check_no_overlap(memory.plan, memory.buffers) == ()
    assert memory.lower_bound_bytes <= memory.arena_bytes <= memory.greedy_bytes
    # Tensor by tensor: two tensors live at one step share bytes only when an op writes one over the other.
    tensors = ArenaPlan(offsets={t.name: memory.offset(t.name) for t in memory.lifetimes},
                        arena_bytes=memory.arena_bytes, lower_bound_bytes=0, alignment=16)
    assert set(check_no_overlap(tensors, memory.lifetimes)) <= {
        pair for source, target in memory.in_place for pair in ((source, target), (target, source))}


def test_exact_search_beats_greedy_on_a_hand_computable_case():
    # Greedy (largest first) puts b at 0 and a above it; c then has no room
    # under either, though a, b at [0, 48) and c reusing a's slot fits in 64.
    lifetimes = [TensorLifetime(name="a", size_bytes=32, start=0, end=1),
                 TensorLifetime(name="b", size_bytes=48, start=1, end=2),
                 TensorLifetime(name="c", size_bytes=32, start=2, end=3),
                 TensorLifetime(name="d", size_bytes=16, start=0, end=3)]
    greedy = greedy_arena_plan(lifetimes, alignment=16)
    exact = exact_arena_plan(lifetimes, greedy, 16)
    assert exact.arena_bytes == exact.lower_bound_bytes == 96
    assert check_no_overlap(exact, lifetimes) == ()


@needs_gcc
def test_output_files_and_arena_macro(tmp_path):
    result = compile_c(_qdq(), tmp_path / "out", device="cortex-m7", name="net")
    assert {"net.h", "net.c", "kernels.c", "kernels.h", "main.c", "Makefile"} <= set(result.files)
    header = (tmp_path / "out" / "net.h").read_text()
    assert re.search(rf"#define NET_ARENA_BYTES {result.arena_bytes}\b", header)
    assert "int net_run(const int8_t *input0, int8_t *output0);" in header
    for file_name in ("kernels.c", "kernels.h", "net.c"):
        code = re.sub(r"/\*.*?\*/", "", (tmp_path / "out" / file_name).read_text(), flags=re.S)
        assert not re.search(r"\b(float|double)\b", code), file_name
    build(tmp_path / "out", "net")


def test_unsupported_ops_are_refused_before_writing(tmp_path):
    b = q._Builder(1)
    x = b.node("Floor", [b.node("Relu", [b.conv("input", 3, 4)])])
    model = q.to_ir(q.quantize_with_ort(b.model(b.conv(x, 4, 4, k=1), (1, 3, 8, 8))))
    with pytest.raises(UnsupportedOpError, match=r"Floor \(floor"):
        compile_c(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_float_model_says_quantize_first(tmp_path):
    with pytest.raises(ModelError, match="edgeopt quantize"):
        compile_c(q.to_ir(q.float_model("conv_relu")), tmp_path / "out")


def test_existing_folder_needs_force_and_force_replaces_only_a_compiled_folder(tmp_path):
    compile_c(_qdq(), tmp_path / "out")
    (tmp_path / "out" / ".build").mkdir()  # what its Makefile builds
    (tmp_path / "out" / "report.json").write_text("{}")
    with pytest.raises(OutputError, match="--force"):
        compile_c(_qdq(), tmp_path / "out")
    compile_c(_qdq(), tmp_path / "out", force=True)
    assert not (tmp_path / "out" / ".build").exists()
    (tmp_path / "out" / "my_app.c").write_text("the user's own code, added to the project")
    with pytest.raises(OutputError, match="did not write .e.g. my_app.c"):
        compile_c(_qdq(), tmp_path / "out", force=True)
    assert (tmp_path / "out" / "my_app.c").exists()
    (tmp_path / "mine").mkdir()  # the user's own folder (or the current one): never deleted
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="did not write"):
        compile_c(_qdq(), tmp_path / "mine", force=True)
    assert (tmp_path / "mine" / "keep.txt").read_text() == "mine"
    (tmp_path / "file.c").write_text("")
    with pytest.raises(OutputError, match="is a file"):
        compile_c(_qdq(), tmp_path / "file.c", force=True)


def test_force_keeps_the_users_files_in_the_build_folder(tmp_path):
    # .build was taken whole as the Makefile's: a user's notes there were deleted by --force
    compile_c(_qdq(), tmp_path / "out")
    build = tmp_path / "out" / ".build"
    build.mkdir()
    (build / "model").write_text("a driver make built")
    (build / "kernels.o").write_text("an object make built")
    (build / ".edgeopt-run-x1y2").mkdir()  # a run's files, left by a run killed with SIGKILL
    compile_c(_qdq(), tmp_path / "out", force=True)  # only what make and edgeopt write there: replaced
    build.mkdir()
    (build / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"did not write .e\.g\. \.build/notes\.txt"):
        compile_c(_qdq(), tmp_path / "out", force=True)
    assert (build / "notes.txt").read_text() == "mine"


def test_bad_options_are_config_errors(tmp_path):
    for options in ({"name": "9lives"}, {"name": "kernels"}, {"name": "main"}, {"rounding": "up"},
                    {"device": "pdp-11"}, {"device": tmp_path / "no.yaml"}):
        with pytest.raises(ConfigError):
            compile_c(_qdq(), tmp_path / "out", **options)
    # EO_KERNELS's header guard was kernels.h's (EO_KERNELS_H): the code did not build, and compile said only
    # "host measurement skipped"
    for name in ("EO_KERNELS", "eo_model"):
        with pytest.raises(ConfigError, match="names starting with eo_ are the kernels'"):
            compile_c(_qdq(), tmp_path / "out", name=name)


@needs_gcc
def test_generated_code_that_does_not_build_is_an_error_not_a_skipped_measurement(tmp_path, monkeypatch):
    from edgeopt import api
    from edgeopt.codegen.c import emit

    monkeypatch.setattr(emit, "_in_comment", lambda text: text + " */ broken")  # as an unescaped name did
    with pytest.raises(CodegenError, match="the generated C does not build"):
        api.compile_model(_qdq(), tmp_path / "out")


@needs_gcc
def test_model_too_big_for_device_still_writes_but_build_fails(tmp_path):
    model = q.to_ir(q.quantize_with_ort(q.float_model("residual_add")))
    result = compile_c(model, tmp_path / "out", device="cortex-m0plus")
    assert result.fits  # 7 KB fits 32 KB; a board of our own with 1 KiB forces a miss
    board = tmp_path / "tiny.yaml"
    board.write_text("board: test\nflash_bytes: 64 KiB\nsram_bytes: 1 KiB\nclock_mhz: 16\n"
                     "int8_macs_per_cycle: 0.25\nfp32_macs_per_cycle: 0.01\n")
    result = compile_c(model, tmp_path / "tiny", device=board)
    assert not result.fits and result.missing_bytes == result.arena_bytes - 1024
    assert (tmp_path / "tiny" / "model.c").exists()
    with pytest.raises(CodegenError, match=f"{result.missing_bytes} bytes missing"):
        build(tmp_path / "tiny", "model")


@needs_gcc
def test_verify_names_the_first_layer_that_differs(tmp_path):
    model = _qdq("depthwise_separable")
    compile_c(model, tmp_path / "out")
    source = tmp_path / "out" / "model.c"
    text = source.read_text()
    marker = re.search(r"static const int32_t op2_bias\[\d+\] = \{\n    ", text).group(0)
    source.write_text(text.replace(marker, marker + "100000 + "))
    batches = q.calibration_batches(q.float_model("depthwise_separable"), 1)
    result = verify(tmp_path / "out", [dict(batch) for batch in batches])
    assert not result.bit_exact
    assert result.first_mismatch.step == 2 and result.first_mismatch.kind == "conv2d"


def _qdq_conv_clip(low: np.ndarray, high: np.ndarray):
    """Hand-built QDQ: input -> Q/DQ -> Conv (int8 weights) -> Clip(low, high) -> Q/DQ -> output."""
    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, (4, 3, 3, 3), dtype=np.int8)
    inits = [numpy_helper.from_array(np.float32(1 / 64), "s_in"), numpy_helper.from_array(np.int8(0), "z"),
             numpy_helper.from_array(weight, "w_q"), numpy_helper.from_array(np.float32(1 / 256), "s_w"),
             numpy_helper.from_array(np.float32(6 / 127), "s_out"),
             numpy_helper.from_array(np.asarray(low, np.float32), "low"),
             numpy_helper.from_array(np.asarray(high, np.float32), "high")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s_in", "z"], ["x_q"], name="q_in"),
             helper.make_node("DequantizeLinear", ["x_q", "s_in", "z"], ["x"], name="dq_in"),
             helper.make_node("DequantizeLinear", ["w_q", "s_w", "z"], ["w"], name="dq_w"),
             helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["y", "low", "high"], ["c"], name="relu6"),
             helper.make_node("QuantizeLinear", ["c", "s_out", "z"], ["c_q"], name="q_out"),
             helper.make_node("DequantizeLinear", ["c_q", "s_out", "z"], ["output"], name="dq_out")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_clip_bounds_may_be_one_element_arrays(tmp_path):
    # ONNX Runtime runs Clip with min/max of shape [1] (or [1, 1]); compile_c takes the single value.
    x = np.random.default_rng(1).uniform(-2, 2, (1, 3, 6, 6)).astype(np.float32)
    scalar = compile_c(q.to_ir(_qdq_conv_clip(np.float32(0), np.float32(6))), tmp_path / "scalar")
    for shape in ((1,), (1, 1)):
        proto = _qdq_conv_clip(np.zeros(shape), np.full(shape, 6.0))
        ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})
        out = tmp_path / f"shape{len(shape)}"
        result = compile_c(q.to_ir(proto), out)
        assert result.ops == scalar.ops and result.arena_bytes == scalar.arena_bytes
        assert (out / "model.c").read_text() == (tmp_path / "scalar" / "model.c").read_text()


def test_clip_bounds_of_several_elements_are_refused(tmp_path):
    proto = _qdq_conv_clip(np.zeros(2), np.float32(6))
    with pytest.raises(UnsupportedOpError, match=r"Clip \(relu6\): Clip min must be a scalar.*shape \[2\]"):
        compile_c(q.to_ir(proto), tmp_path / "out")


def test_a_refusal_says_what_to_do_once():
    # each float-island node repeated the whole explanation, and no refusal named a way out
    import onnx_ir as ir

    def constant(name, value, dtype):
        return numpy_helper.from_array(np.array(value, dtype=dtype), name)

    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("Erf", ["xd"], ["e"]), helper.make_node("Log", ["e"], ["a"]),
             helper.make_node("QuantizeLinear", ["a", "s", "z"], ["aq"]),
             helper.make_node("DequantizeLinear", ["aq", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "refused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                              [constant("s", 0.05, np.float32), constant("z", 0, np.int8)])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    with pytest.raises(UnsupportedOpError) as caught:
        compile_c(model, "/nonexistent/never-written")
    message = str(caught.value)
    assert "Erf (" in message and "Log (" in message and message.count("every op output must reach") <= 1
    assert "export at opset 20" in message and "the C kernels cover Abs, Add," in message


@needs_gcc
def test_a_weight_several_ops_read_is_stored_once(tmp_path):
    """One initializer read by four Gemms (a tied layer; tf2onnx's unrolled RNN reads one kernel at every
    step) is one int8 array in the QDQ model: the C declares it once too, and the weights count it once."""
    import onnx

    from mcu_flow import assert_compiles_bit_exact, quantize_for_mcu

    rng = np.random.default_rng(0)
    nodes, previous = [], "input"
    for k in range(4):
        nodes += [helper.make_node("Gemm", [previous, "W", "B"], [f"g{k}"], name=f"dense{k}"),
                  helper.make_node("Relu", [f"g{k}"], [f"r{k}"], name=f"relu{k}")]
        previous = f"r{k}"
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, [1, 64])],
                              [numpy_helper.from_array((rng.standard_normal((64, 64)) * 0.15).astype(np.float32), "W"),
                               numpy_helper.from_array(np.full(64, 0.05, np.float32), "B")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "float.onnx")
    data = [{"input": rng.random((1, 64), dtype=np.float32)} for _ in range(16)]
    _, model = quantize_for_mcu(tmp_path / "float.onnx", data, tmp_path / "int8.onnx")
    result = assert_compiles_bit_exact(model, tmp_path / "c", data[:2])
    code = (tmp_path / "c" / "model.c").read_text()
    assert len(re.findall(r"static const int8_t \w+\[4096\]", code)) == 1
    assert len(re.findall(r"#define op\d+_weight op\d+_weight /\* the same values \*/", code)) == 3
    stored = sum(int(length) * {"int8_t": 1, "int16_t": 2, "int32_t": 4}[c_type]
                 for c_type, length in re.findall(r"static const (\w+) \w+\[(\d+)\] = \{", code))
    assert compile_c(model, tmp_path / "again").weight_bytes == stored < 2 * 4096
    assert result.bit_exact


@needs_gcc
def test_verify_runs_the_c_under_the_sanitizers_and_catches_an_arena_overrun(tmp_path):
    # an arena 8 bytes short: the plain build still agreed with the reference ("bit-exact: 32 samples") while
    # writing past it; under AddressSanitizer the overrun stops the run
    out = tmp_path / "out"
    compile_c(_qdq("depthwise_separable"), out)
    data = [dict(batch) for batch in q.calibration_batches(q.float_model("depthwise_separable"), 2)]
    assert verify(out, data).sanitized
    model_c = out / "model.c"
    model_c.write_text(re.sub(r"bytes\[(\d+)\]", r"bytes[\1 - 8]", model_c.read_text()))
    with pytest.raises(CodegenError, match="broke a memory or arithmetic rule .* AddressSanitizer: global-buffer"):
        verify(out, data)


@needs_gcc
def test_the_c_builds_under_the_strict_warnings_embedded_projects_use(tmp_path):
    # firmware builds often add -Wconversion -Wsign-conversion -Wshadow to -Werror: the recurrent kernels'
    # `sizeof(int16_t) * p->hidden` (int to size_t) stopped such a build
    import subprocess

    compile_c(_qdq("conv_relu"), tmp_path / "c")
    flags = ["-std=c99", "-Wall", "-Wextra", "-Wpedantic", "-Wconversion", "-Wsign-conversion", "-Wshadow",
             "-Wdouble-promotion", "-Wcast-qual", "-Werror", "-c", "-o", "/dev/null"]
    for source in ("kernels.c", "model.c"):
        built = subprocess.run(["gcc", *flags, source], cwd=tmp_path / "c", capture_output=True, text=True)
        assert built.returncode == 0, built.stderr


def _damaged(manifest: dict, edit: str) -> dict:
    import json

    key, _, value = edit.partition("=")
    where, _, field = key.partition(".")
    target = manifest["inputs"][0] if where == "input" else manifest
    target[field or where] = json.loads(value)
    return manifest


@pytest.mark.parametrize("content", ["garbage", "{}", "[1]", '{"name": "model"}', "input.stored_shape=[1, 3]",
                                     "input.scale=0", "input.zero_point=1000", 'input.scale="x"', "schedule=[0, 1, 99]",
                                     "schedule=[]", "outputs=[]", 'name="../../evil"', 'rounding="triple"'])
def test_a_damaged_manifest_is_a_codegen_error_saying_to_compile_again(content, tmp_path):
    # verify, run and bench of a folder whose edgeopt_c.json was damaged: "internal error" (JSONDecodeError,
    # KeyError, TypeError, IndexError), exit 70; a zero scale or a zero point of 1000: wrong numbers, exit 0
    import json

    from edgeopt.codegen.c.api import MANIFEST, read_manifest

    compile_c(_qdq("conv_relu"), tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    (tmp_path / "c" / MANIFEST).write_text(json.dumps(_damaged(manifest, content)) if "=" in content else content)
    with pytest.raises(CodegenError, match="compile the model again into a new folder"):
        read_manifest(tmp_path / "c")
    with pytest.raises(CodegenError, match="compile the model again"):
        verify(tmp_path / "c", [])


def test_a_device_profile_that_is_not_utf8_is_refused_with_the_reason(tmp_path):
    from edgeopt.devices import load_device

    (tmp_path / "latin1.yaml").write_bytes(b"board: caf\xe9\nflash_bytes: 256 KiB\nsram_bytes: 64 KiB\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_device(tmp_path / "latin1.yaml")

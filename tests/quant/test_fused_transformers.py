"""Transformers fused by ONNX Runtime's own optimizer (``onnxruntime.transformers.optimizer``) into
com.microsoft ops: a BERT becomes EmbedLayerNormalization, Attention (packed QKV weight),
SkipLayerNormalization and BiasGelu (MultiHeadAttention with ``use_multi_head_attention``), a ViT keeps
its attention MatMuls between SkipLayerNormalization and BiasGelu. Users bring these models as they come
out of that tool. Each fused model is built once per process from ``tests/hf_models.py`` (about 2 s).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import pathlib
import tempfile

import edgeopt
from tests.hf_models import HEADS, HF_INPUTS, HIDDEN, build_hf


@functools.cache
def _fused_bytes(name: str, multi_head: bool = False) -> bytes:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(name)
    options.use_multi_head_attention = multi_head  # separate Q, K, V MatMuls feeding MultiHeadAttention

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        level = logging.getLogger("onnxruntime").level
        logging.getLogger("onnxruntime").setLevel(logging.ERROR)
        try:
            fused = optimize_model(str(build_hf(name, tmp, 17)), model_type=name, num_heads=HEADS,
                                   hidden_size=HIDDEN, use_gpu=False, optimization_options=options)
        finally:
            logging.getLogger("onnxruntime").setLevel(level)
        path = pathlib.Path(tmp) / "fused.onnx"
        fused.save_model_to_file(str(path))
        return path.read_bytes()


def build_fused(name: str, tmp_dir, *, multi_head: bool = False) -> pathlib.Path:
    """``name`` (bert, gpt2, vit) from tests/hf_models.py at opset 17, fused by ONNX Runtime's optimizer
    (``multi_head``: into MultiHeadAttention rather than Attention)."""
    path = pathlib.Path(tmp_dir) / f"{name}_fused{'_mha' if multi_head else ''}.onnx"
    path.write_bytes(_fused_bytes(name, multi_head))
    return path


def _fixed(name: str, tokens: int = 16) -> dict[str, tuple[int, int]]:
    return {input_name: (1, tokens) for input_name in HF_INPUTS[name]}


def _ops(report) -> dict[str, list]:
    rows: dict[str, list] = {}
    for row in report.cost.nodes:
        rows.setdefault(row.op_type, []).append(row)
    return rows


def test_the_fused_bert_holds_the_contrib_ops_this_file_is_about(tmp_path):
    import onnx

    ops = {node.op_type for node in onnx.load(build_fused("bert", tmp_path)).graph.node}
    assert {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu"} <= ops


def test_inspect_of_a_fused_bert_feeds_token_types_its_segment_table_holds(tmp_path):
    """EmbedLayerNormalization reads the token type ids as indices into its 2-row segment table:
    random ids in [0, 8) made the shape-finding run fail ("input index out of range")."""
    from edgeopt import ir as eir
    from edgeopt.io import load_model

    path = build_fused("bert", tmp_path)
    limits = eir.index_limits(load_model(path, require_static=False))
    assert limits == {"input_ids": 100, "token_type_ids": 2}
    assert edgeopt.inspect(path, input_shapes=_fixed("bert")).cost.macs > 0


def test_inspect_counts_the_macs_of_a_fused_attention_as_of_the_ops_it_replaced(tmp_path):
    """Attention_0 computes the Q, K, V projections (16 tokens x 64 x 192) and the scores and context
    (2 x 16 x 16 x 64): 229,376 MACs, not 0; the fused model costs what the unfused one does."""
    fused = edgeopt.inspect(build_fused("bert", tmp_path), input_shapes=_fixed("bert"))
    attention = _ops(fused)["Attention"]
    assert [row.macs for row in attention] == [16 * 64 * 192 + 2 * 16 * 16 * 64] * 2
    assert "Attention" not in fused.cost.uncounted_ops and not fused.cost.unknown_nodes
    unfused = edgeopt.inspect(build_hf("bert", tmp_path), input_shapes=_fixed("bert"))
    assert fused.cost.macs == unfused.cost.macs


def test_inspect_counts_the_scores_and_context_of_a_multi_head_attention(tmp_path):
    """MultiHeadAttention reads Q, K, V projected by MatMuls: its own MACs are 2 x 16 x 16 x 64."""
    fused = edgeopt.inspect(build_fused("bert", tmp_path, multi_head=True), input_shapes=_fixed("bert"))
    assert [row.macs for row in _ops(fused)["MultiHeadAttention"]] == [2 * 16 * 16 * 64] * 2
    assert fused.cost.macs == edgeopt.inspect(build_hf("bert", tmp_path), input_shapes=_fixed("bert")).cost.macs


def _output_sqnr_db(float_path, quant_path, name: str) -> float:
    from edgeopt.metrics import sqnr_db
    from edgeopt.io import load_model
    from edgeopt.runtime.ort import OrtSession
    from tests.hf_models import hf_samples

    reference, quantized = OrtSession(float_path), OrtSession(quant_path)
    samples = hf_samples(name, 4, seed=1)
    return sqnr_db([reference.run(s)["logits"] for s in samples], [quantized.run(s)["logits"] for s in samples])


def test_fp16_without_data_types_a_fused_bert_of_dynamic_dims_by_a_small_run(tmp_path):
    """ONNX shape inference cannot type what follows an Attention; the run typing it needed static
    input shapes, so with batch x tokens inputs every MatMul and Gemm stayed float32: 0 of 458 KB
    converted. The types do not depend on the sizes: dynamic dims take small ones."""
    path = build_fused("bert", tmp_path)
    report = edgeopt.quantize(path, edgeopt.Fp16Config(), output=tmp_path / "fp16.onnx", check_fidelity=False,
                              check_speed=False)
    kept = {node.op_type: node.reason for node in report.result.float_nodes}
    assert set(kept) == {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu"}
    # ONNX Runtime has float16 schemas for them: "no float16 schema to check" was not why
    assert set(kept.values()) == {"op of domain 'com.microsoft': fp16 computes ONNX-domain ops only"}
    assert report.quant_bytes < 0.7 * report.float_bytes
    assert _output_sqnr_db(path, tmp_path / "fp16.onnx", "bert") > 50


def test_int4_says_the_fused_attention_and_embeddings_keep_their_weights_float32(tmp_path):
    """The packed QKV weights of the two Attention nodes and the EmbedLayerNormalization tables, 140,800 bytes,
    about 30 % of the file, stayed float32 and no note said so (contrib ops were skipped)."""
    path = build_fused("bert", tmp_path)
    report = edgeopt.quantize(path, edgeopt.Int4WeightConfig(), output=tmp_path / "int4.onnx",
                              check_fidelity=False, check_speed=False)
    assert report.result.details["matmul_nbits"] == 8
    note = next(text for text in report.result.notes if text.startswith("int4-weight rewrites MatMul/Gemm"))
    assert "those of Attention x2, EmbedLayerNormalization x1 stay float32 (140,800 bytes)" in note
    assert "no int4 form" in note and "half" not in note  # fp16 keeps these contrib ops float32 too
    assert _output_sqnr_db(path, tmp_path / "int4.onnx", "bert") > 15


def test_fp16_of_a_fused_vit_avoids_the_float16_pattern_onnx_runtime_crashes_on(tmp_path):
    """The second layer's ``MatMul(Transpose(x, perm=[1, 0, 2]), W)`` reads a SkipLayerNormalization output,
    whose shape ONNX cannot infer: the crash workaround wanted a known 3-D shape and skipped it, and ONNX
    Runtime crashed (segmentation fault) creating a session for the fp16 model (with --data, in quantize
    itself). The perm already says x is 3-D. The session is created in a child process."""
    import subprocess
    import sys

    path = build_fused("vit", tmp_path)
    report = edgeopt.quantize(path, edgeopt.Fp16Config(), output=tmp_path / "fp16.onnx", check_fidelity=False,
                              check_speed=False)
    assert any(note.startswith("2 MatMuls of a Transpose(perm=[1, 0, 2])") for note in report.result.notes)
    code = ("import sys; from tests.quant.test_fused_transformers import _output_sqnr_db; "
            "print(_output_sqnr_db(sys.argv[1], sys.argv[2], 'vit'))")
    run = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "fp16.onnx")], capture_output=True,
                         text=True, cwd=pathlib.Path(__file__).parents[2], timeout=120)
    assert run.returncode == 0, run.stderr[-500:]
    assert float(run.stdout.strip().splitlines()[-1]) > 50


def test_dynamic_int8_writes_qattention_for_the_fused_attention(tmp_path):
    import numpy as np
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgeopt.io import load_model
    from edgeopt.metrics import sqnr_db
    from edgeopt.runtime.ort import OrtSession
    from tests.hf_models import hf_samples

    path = build_fused("bert", tmp_path)
    report = edgeopt.quantize(path, edgeopt.DynamicInt8Config(), None, output=tmp_path / "ours.onnx",
                              check_fidelity=False, check_speed=False)
    ops = [node.op_type for node in onnx.load(tmp_path / "ours.onnx").graph.node]
    assert ops.count("QAttention") == 2 and "Attention" not in ops and report.result.details["attention"] == 2
    attention = [info for info in report.result.tensors if info.op_type == "Attention"]
    assert {info.format for info in attention} == {"int7_symmetric"} and len(attention[0].scale) == 3 * HIDDEN
    assert any("EmbedLayerNormalization x1 stay float32" in note for note in report.result.notes)
    # ONNX Runtime's own quantizer needs DefaultTensorType on this model (it fails to infer a type otherwise)
    quantize_dynamic(str(path), str(tmp_path / "ort.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    sessions = [OrtSession(load_model(p, require_static=False))
                for p in (path, tmp_path / "ours.onnx", tmp_path / "ort.onnx")]
    samples = hf_samples("bert", 16, seed=2)
    reference, mine, theirs = (np.concatenate([s.run(feed)["logits"].ravel() for feed in samples]) for s in sessions)
    # benchmarks/dynamic_vs_ort.py, on 64 samples: 40.5 against 38.3 dB
    assert sqnr_db(reference, mine) >= sqnr_db(reference, theirs)


def test_an_attention_qattention_cannot_take_stays_float_with_the_reason(tmp_path):
    import onnx

    path = build_fused("bert", tmp_path)
    model = onnx.load(path)
    for node in model.graph.node:
        if node.op_type == "Attention":
            node.attribute.append(onnx.helper.make_attribute("qkv_hidden_sizes", [HIDDEN] * 3))
    onnx.save(model, tmp_path / "sized.onnx")
    report = edgeopt.quantize(tmp_path / "sized.onnx", edgeopt.DynamicInt8Config(), None, check_fidelity=False,
                              check_speed=False)
    assert [(node.op_type, node.reason) for node in report.result.float_nodes if node.op_type == "Attention"] == [
        ("Attention", "its Q, K and V have different sizes (qkv_hidden_sizes), which QAttention does not take")] * 2

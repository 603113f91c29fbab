"""Hugging Face-style token models (``tests/hf_models.py``): int64 token ids and attention masks,
embeddings, ``arange`` positions, additive masks, tied LM heads. What users exporting a BERT or a
GPT-2 hit first. Each export takes about a second (cached per process).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import edgeopt
from tests.hf_models import HF_INPUTS, build_hf, hf_samples


def _fixed(name: str, tokens: int = 8) -> dict[str, tuple[int, int]]:
    return {input_name: (1, tokens) for input_name in HF_INPUTS[name]}


def test_inspect_of_a_bert_with_token_types_runs_it_on_ids_its_tables_hold(tmp_path):
    """The shapes after ``arange`` (Range) are only known by running the model, on random inputs:
    integers in [0, 8) made the token type ids index past their 2-row table and inspect failed.
    Integer inputs that index a table are drawn below its row count."""
    report = edgeopt.inspect(build_hf("bert", tmp_path), input_shapes=_fixed("bert"))
    assert report.cost.macs > 0
    assert all(row.output_shapes and None not in row.output_shapes[0] for row in report.cost.nodes)


def test_bench_of_a_bert_without_data_feeds_ids_its_tables_hold(tmp_path):
    result = edgeopt.bench(build_hf("bert", tmp_path), config=edgeopt.BenchConfig(runs=2, warmup=1),
                           input_shapes=_fixed("bert"))
    assert len(result.to_dict()["models"]) == 1


def test_index_limits_follow_token_ids_through_casts_and_reshapes(tmp_path):
    from edgeopt import ir as eir
    from edgeopt.io import load_model

    limits = eir.index_limits(load_model(build_hf("bert", tmp_path), require_static=False))
    assert limits == {"input_ids": 100, "token_type_ids": 2}  # the attention mask indexes nothing
    assert np.issubdtype(type(limits["input_ids"]), np.integer)


def test_bf16_keeps_a_mask_constant_of_float32_min_exact(tmp_path):
    """Hugging Face fills causal masks with finfo(float32).min (-3.40e38), beyond bfloat16's largest
    value (3.39e38): stored in bf16 the [S, S] mask constant became -inf, ``_unmask_unattended``'s
    ``mask == finfo.min`` no longer matched the left-padded rows, ``-inf * 0`` gave NaN and the output
    SQNR fell to 1.8 dB. Such a constant stays float32, noted; the others are stored in bf16."""
    from edgeopt.io import load_model
    from edgeopt.quant import quantize
    from edgeopt.quant.float16 import Bf16Config

    from .int8_models import sqnr_db
    from .test_float16 import BF16_MIN_SQNR_DB

    model = load_model(build_hf("llama_mask", tmp_path))
    samples = hf_samples("llama_mask", 4, tokens=8)
    result = quantize(model, Bf16Config(), samples)
    assert sqnr_db(model, result.model, samples) >= BF16_MIN_SQNR_DB
    assert any("kept float32: finite values beyond bfloat16's" in note for note in result.notes)
    assert result.details["weights_converted"] >= 5  # the embedding, q, k, v and the head


def test_int8_folds_a_static_causal_mask_and_keeps_its_add_float_for_the_mask(tmp_path):
    """``triu(full((S, S), finfo.min))`` of a static-length export is a Trilu of a constant: it was not
    folded (no evaluator for Trilu), so the mask was a computed value and its readers were listed float
    for want of an integer kernel; folded, the Add applying it names the mask as its reason."""
    from edgeopt.io import load_model
    from edgeopt.quant import Int8Config, quantize

    samples = hf_samples("llama_mask", 16, tokens=8)
    result = quantize(load_model(build_hf("llama_mask", tmp_path)), Int8Config(), samples)
    assert not any("Trilu" in note for note in result.notes)
    assert "Trilu" not in [node.op_type for node in result.model.graph]
    reasons = {node.op_type: node.reason for node in result.float_nodes}
    assert "an attention mask?" in reasons["Add"]


def test_fp16_computes_t5_relative_position_buckets_in_float32(tmp_path):
    """T5 computes each relative position's bucket as ``(log(n / 8) / log(16) * 8).long()``: in float16 the
    logarithm rounds below a whole step (n = 16 gave 1, not 2; n = 32 3, not 4), a Cast truncates it, the attention
    adds another row of the bias table and the output SQNR fell to 41 dB (fp16 elsewhere: 66-72 dB).
    Float arithmetic computed from integers alone and cast back to an integer stays float32."""
    from edgeopt.io import load_model
    from edgeopt.quant import quantize
    from edgeopt.quant.float16 import Fp16Config
    from edgeopt.quant.float16_plan import INDEX_ARITHMETIC_REASON

    from .int8_models import sqnr_db

    model = load_model(build_hf("t5", tmp_path), require_static=False)
    samples = hf_samples("t5", 4, tokens=40)
    result = quantize(model, Fp16Config(), samples)
    assert sqnr_db(model, result.model, samples) >= 55.0  # 69 dB
    kept = sorted(node.op_type for node in result.float_nodes if node.reason == INDEX_ARITHMETIC_REASON)
    assert kept == ["Cast", "Cast", "Div", "Div", "Log", "Mul"]  # int -> float, / 8, log, / log(16), * 8, -> long
    assert "MatMul" not in [node.op_type for node in result.float_nodes]


def test_int8_keeps_t5_relative_position_buckets_exact(tmp_path):
    """int8 quantized T5's bucket arithmetic (the distance cast to float, / 8, log, / log(16), * 8): each
    step rounded to 8 bits before the Cast to int64, and 372 of 2500 relative positions (50 tokens) took
    another bucket's bias. Those nodes stay float, for both targets, with the reason."""
    from edgeopt.io import load_model
    from edgeopt.quant import Int8Config, Target, quantize
    from edgeopt.quant.masks import INDEX_REASON

    model = load_model(build_hf("t5", tmp_path), require_static=False)
    samples = hf_samples("t5", 16, tokens=40)
    for target in (Target.ORT, Target.MCU):
        result = quantize(model, Int8Config(target=target), samples)
        indexing = sorted(node.node_name for node in result.float_nodes if node.reason == INDEX_REASON)
        assert len(indexing) == 3, indexing  # / 8, / log(16), * 8 (the Casts and the Log have no kernel)
        node = next(node for node in result.model.graph if node.op_type == "Log")
        assert node.inputs[0].producer().op_type == "Mul"  # / 8, in float
        steps = []
        while node.op_type != "Cast":  # log -> / log(16) -> * 8 -> Cast to int64, no Q/DQ between
            node = next(iter(node.outputs[0].consumers()))
            steps.append(node.op_type)
        assert steps == ["Mul", "Mul", "Cast"]


def test_rotary_angles_stay_float32_in_int8_and_fp16(tmp_path):
    """Rotary embeddings' angles ``inv_freq @ position_ids`` reach hundreds of radians: int8 rounded them to
    steps of about 1 rad before cos/sin (cos/sin 9-12 dB SQNR, the attention scores 10 dB; 30 dB kept
    float), and float16 has steps of 0.125 rad at 128 and 2 rad past 2048 (Hugging Face computes them in
    float32 for that reason). The angle MatMul and what moves its output to cos/sin stay float32."""
    from edgeopt.io import load_model
    from edgeopt.quant import Int8Config, quantize
    from edgeopt.quant.float16 import Fp16Config
    from edgeopt.quant.float16_plan import INDEX_ARITHMETIC_REASON
    from edgeopt.quant.masks import INDEX_REASON

    model = load_model(build_hf("rope", tmp_path), require_static=False)
    samples = hf_samples("rope", 16)
    for config, reason in ((Int8Config(), INDEX_REASON), (Fp16Config(), INDEX_ARITHMETIC_REASON)):
        result = quantize(model, config, samples)
        kept = {node.op_type for node in result.float_nodes if node.reason.endswith(reason)}
        assert kept >= {"MatMul", "Concat"}, (type(config).__name__, kept)
        for trig in (node for node in result.model.graph if node.op_type in ("Sin", "Cos")):
            assert trig.inputs[0].producer().op_type == "Concat"  # no DequantizeLinear, no Cast to float16


def test_a_dequantized_activation_read_by_sin_is_no_position_arithmetic():
    """--fallback fp16 plans the float nodes of the int8 model, Q/DQ pairs included: a DequantizeLinear
    reads an integer tensor and constants, like position arithmetic, but writes an activation (a SIREN's
    Sin reads it), which may compute in float16."""
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from edgeopt import ir as eir

    nodes = [helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["x"]),
             helper.make_node("Sin", ["x"], ["y"])]
    graph = helper.make_graph(nodes, "siren", [helper.make_tensor_value_info("q", TensorProto.UINT8, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(np.array(0.1, np.float32), "scale"),
                               numpy_helper.from_array(np.array(128, np.uint8), "zero")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    eir.infer_shapes(model)
    assert eir.index_arithmetic_values(model.graph) == set()


def _vit_with_quantized_class_token(tmp_path):
    """The ViT with its class-token Concat written as a graph output too: an integer Concat then joins the
    token to the patches at one 8-bit scale, as every Concat did before one that only float nodes read joined
    its parts in float (the residual stream's position Add), each at its own scale."""
    proto = onnx.load(build_hf("vit", tmp_path))
    concat = next(n for n in proto.graph.node if n.op_type == "Concat" and any("Expand" in i for i in n.input))
    proto.graph.output.append(onnx.helper.make_tensor_value_info(concat.output[0], onnx.TensorProto.FLOAT, None))
    path = tmp_path / "vit_tokens.onnx"
    onnx.save(proto, path)
    return path


def test_the_search_ranks_a_vit_layernorm_by_its_own_rounding_not_the_class_token_it_scales_up(tmp_path):
    # a ViT's class token is a small row in a sequence quantized per tensor: it arrives at each LayerNorm
    # badly quantized, and the LayerNorm (kept float) scales it up to the size of the other rows. Ranked
    # by "worst quantized input minus output", the LayerNorm's readers looked 12 dB worse than anything
    # else and took the search's first rounds for nothing (the score fell). Ranked by what each node
    # adds (its output's rounding, for a node reading no quantized weight), they rank low
    from edgeopt.quant.accuracy_damage import node_damage
    from edgeopt.quant.compare import compare_models

    path = _vit_with_quantized_class_token(tmp_path)
    data = hf_samples("vit", 32)
    base = edgeopt.quantize(path, edgeopt.Int8Config(), data, check_speed=False, check_fidelity=False)
    ranked = node_damage(base.result, compare_models(path, base.model, data))
    through_layernorm = [c for c in ranked if c.through is not None and "norm" in c.through]
    assert through_layernorm and max(c.damage for c in through_layernorm) < 1.0
    assert "LayerNormalization" not in ranked[0].reason


@pytest.mark.slow
def test_the_vit_search_goes_to_the_class_tokens_path_at_once(tmp_path):
    # with the LayerNorms' readers ranked by their own rounding the search reaches 28 dB in 14 rounds
    # (38 before), returning the patch embedding, the position Add and the residual stream
    report = edgeopt.quantize(_vit_with_quantized_class_token(tmp_path), edgeopt.Int8Config(),
                              hf_samples("vit", 32), check_speed=False, goal=edgeopt.AccuracyGoal(min_sqnr_db=28))
    search = report.search
    assert search.met and len(search.best_excluded) <= 4 and len(search.steps) <= 16, search.steps


def test_fp16_computes_buckets_of_constant_positions_in_float32_too():
    # at static shapes T5's relative positions are constants: the float passes fold the int -> float Cast and the
    # / 8 into an initializer but not the Log after it, and the Log, Div, Mul and Cast to int64 of the buckets ran
    # in float16 (they were not computed "from integer tensors")
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from edgeopt.quant import quantize
    from edgeopt.quant.float16 import Fp16Config
    from edgeopt.quant.float16_plan import INDEX_ARITHMETIC_REASON

    positions = np.abs(np.arange(12)[None, :] - np.arange(12)[:, None]).astype(np.int64) + 8
    nodes = [helper.make_node("Cast", ["positions"], ["p"], to=TensorProto.FLOAT),
             helper.make_node("Div", ["p", "eight"], ["scaled"]),
             helper.make_node("Log", ["scaled"], ["log"]),
             helper.make_node("Div", ["log", "log16"], ["fraction"]),
             helper.make_node("Mul", ["fraction", "eight"], ["steps"]),
             helper.make_node("Cast", ["steps"], ["buckets"], to=TensorProto.INT64),
             helper.make_node("Gather", ["table", "buckets"], ["bias"]),
             helper.make_node("Add", ["x", "bias"], ["y"])]
    constants = {"positions": positions, "eight": np.float32(8), "log16": np.float32(np.log(16)),
                 "table": np.random.default_rng(0).normal(0, 1, (32,)).astype(np.float32)}
    graph = helper.make_graph(nodes, "buckets", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [12, 12])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    result = quantize(model, Fp16Config(), None)
    kept = sorted(node.op_type for node in result.float_nodes if node.reason == INDEX_ARITHMETIC_REASON)
    assert kept == ["Cast", "Div", "Log", "Mul"], kept

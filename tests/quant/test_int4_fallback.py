"""int4 weight-only with the 8-bit fallback: the layers kept out of int4 (``--exclude``, the accuracy search)
hold their weights in 8 bits, in the same blocks, instead of float32.

8 bits over 256 levels have a step 17 times finer than 4 bits over 16: about 24.6 dB more weight SQNR
(Gaussian weights at b = 32: about 21.6 dB in int4, so about 46 dB in 8 bits), for a code byte per value
instead of half a byte. ONNX Runtime's MatMulNBits runs bits = 8 (codes one a byte, the default zero point
128); the blocked DequantizeLinear of opset 21 takes INT8/UINT8.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from edgeopt import ir as eir
from edgeopt.errors import ConfigError
from edgeopt.io import save_model
from edgeopt.quant import quantize
from edgeopt.quant.accuracy import RETURNED_TO_8_BITS, AccuracyGoal, accuracy_aware_quantize
from edgeopt.quant.fallback import IN_8_BITS
from edgeopt.quant.formats import INT4, INT8_BLOCK, UINT4, UINT8
from edgeopt.quant.config import Fallback
from edgeopt.quant.int4 import Int4WeightConfig, WeightFallback
from edgeopt.quant.int4_blocks import decode_matmul_nbits, encode_matmul_nbits, quantize_blocks
from edgeopt.runtime.ort import OrtSession
from tests.conftest import assert_one_line_error

from .test_accuracy_int4 import _data, _mlp
from .test_int4 import batched_weight_model, gaussian_feed, mlp, op_types, packed_weights, sqnr_db

# Gaussian weights, by block size: int4's (21.3 and 19.7 dB) plus 20 log10(255 / 15) = 24.6 dB
EIGHT_BIT_WEIGHT_MIN_SQNR_DB = {32: 45.0, 128: 43.5}


def _nbits_nodes(model: ir.Model) -> dict[str, ir.Node]:
    return {node.name: node for node in model.graph if node.op_type == "MatMulNBits"}


@pytest.mark.parametrize("fmt", [INT8_BLOCK, UINT8], ids=lambda f: f.name)
@pytest.mark.parametrize(("k", "n", "block_size"), [(64, 5, 32), (80, 3, 32), (300, 4, 128)])
def test_the_8_bit_matmul_nbits_layout_decodes_exactly_to_the_reference(fmt, k, n, block_size):
    weight = np.random.default_rng(k * n).standard_normal((k, n)).astype(np.float32)
    quantized = quantize_blocks(weight, block_size, fmt)
    encoded = encode_matmul_nbits(quantized)
    n_blocks = -(-k // block_size)
    assert encoded.bits == 8 and encoded.packed.shape == (n, n_blocks, block_size)
    assert encoded.zero_points is None if fmt.symmetric else encoded.zero_points.shape == (n * n_blocks,)
    np.testing.assert_array_equal(decode_matmul_nbits(encoded), quantized.dequantize())
    assert sqnr_db(weight, quantized.dequantize()) >= EIGHT_BIT_WEIGHT_MIN_SQNR_DB[block_size]


def test_symmetric_8_bit_blocks_put_the_extreme_at_minus_128():
    weight = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32)
    quantized = quantize_blocks(weight, 32, INT8_BLOCK)
    assert quantized.q.min() == -128 and np.all(quantized.zero_point == 0)


@pytest.mark.parametrize("fmt", [INT4, UINT4], ids=lambda f: f.name)
def test_an_excluded_layer_holds_its_weight_in_8_bits_that_ort_runs_exactly(tmp_path, fmt):
    model = mlp(tmp_path)
    config = Int4WeightConfig(weight_format=fmt, exclude=("fc2",), fallback="int8")
    result = quantize(model, config, data=None)
    nodes = _nbits_nodes(result.model)
    assert [node.attributes.get_int("bits") for node in nodes.values()] == [4, 8]
    fallback = INT8_BLOCK if fmt is INT4 else UINT8
    assert {t.name: t.format for t in result.tensors} == {"fc1.weight": fmt.name, "fc2.weight": fallback.name}
    (kept,) = result.float_nodes
    assert kept.node_name == "fc2" and f"; {IN_8_BITS} ({fallback.name}" in kept.reason
    assert "; 1 of these, kept out of int4, in 8 bits (" in result.notes[0]
    # ONNX Runtime computes with what the encoding decodes to: the float model on those weights
    fc2 = packed_weights(result.model, nodes["fc2_Q8"])
    w2 = eir.constant_array(next(n for n in model.graph if n.name == "fc2").inputs[1]).T
    np.testing.assert_array_equal(decode_matmul_nbits(fc2), quantize_blocks(w2, 32, fallback).dequantize())
    feed = gaussian_feed(model)
    reference = OrtSession(model).run(feed)["output"]
    int4_only = OrtSession(quantize(model, Int4WeightConfig(weight_format=fmt), data=None).model).run(feed)["output"]
    float_kept = OrtSession(quantize(model, Int4WeightConfig(weight_format=fmt, exclude=("fc2",)),
                                     data=None).model).run(feed)["output"]
    mixed = OrtSession(result.model).run(feed)["output"]
    # the 8-bit layer adds next to nothing to fc1's int4 error: as good as keeping it float, within 0.1 dB
    assert sqnr_db(reference, mixed) > sqnr_db(reference, int4_only) + 1.0
    assert sqnr_db(reference, mixed) >= sqnr_db(reference, float_kept) - 0.1


def test_the_8_bit_layer_takes_under_a_third_of_its_float32_bytes(tmp_path):
    model = mlp(tmp_path)
    float_kept = quantize(model, Int4WeightConfig(exclude=("fc2",)), data=None).details
    mixed = quantize(model, Int4WeightConfig(exclude=("fc2",), fallback="int8"), data=None).details
    fc2_float_bytes = 64 * 384 * 4
    fc2_8_bit_bytes = mixed["weight_bytes_after"] - float_kept["weight_bytes_after"]
    assert mixed["weight_bytes_before"] == float_kept["weight_bytes_before"] + fc2_float_bytes
    # codes (1 byte) + a float32 scale and a zero point byte per 32 values: 1.16 bytes a value
    assert fc2_8_bit_bytes == 64 * (384 + 12 * 5)
    assert fc2_8_bit_bytes < fc2_float_bytes / 3


def test_a_3d_weight_kept_out_of_int4_uses_8_bit_blocked_dequantize_linear(tmp_path):
    model = batched_weight_model(tmp_path, opset=21)
    result = quantize(model, Int4WeightConfig(exclude=("bmm",), fallback="int8"), data=None)
    assert op_types(result.model) == ["DequantizeLinear", "MatMul"]
    dequantize_node = result.model.graph.node(0)
    assert dequantize_node.inputs[0].dtype == ir.DataType.UINT8
    weight = eir.constant_array(next(iter(model.graph)).inputs[1])
    feed = gaussian_feed(model)
    expected = feed["input"] @ quantize_blocks(weight, 32, UINT8).dequantize()
    assert sqnr_db(expected, OrtSession(result.model).run(feed)["output"]) >= 60.0


def test_a_layer_8_bits_would_not_make_smaller_stays_float_and_says_why(tmp_path):
    model = mlp(tmp_path, dims=(4, 64, 8))  # fc1: K = 4, padded to a block of 32 codes of a byte each
    result = quantize(model, Int4WeightConfig(exclude=("fc1",), fallback="int8"), data=None)
    reasons = {f.node_name: f.reason for f in result.float_nodes}
    assert reasons["fc1"].startswith("excluded by config, and not held in uint8 either: K = 4 is below")


@pytest.mark.parametrize("exclude", ["embed", "Gather"])
def test_an_excluded_table_kept_float_by_embeddings_float_stays_float_with_the_8_bit_fallback(tmp_path, exclude):
    # the fallback holds what is kept out of int4 in 8 bits; --embeddings float kept the table out of any format
    from .test_int4 import float_constants, tied_lm_model

    model = tied_lm_model(tmp_path)
    result = quantize(model, Int4WeightConfig(embeddings="float", exclude=(exclude,), fallback="int8"), data=None)
    assert op_types(result.model) == ["Gather", "MatMulNBits", "Tanh", "MatMulNBits"]
    assert float_constants(result.model) == ["E"]
    assert [(f.node_name, f.reason) for f in result.float_nodes] == [
        ("embed", "an embedding table, kept float by config (--embeddings float)")]


@pytest.mark.parametrize("make", [lambda: Int4WeightConfig(fallback="fp16"),
                                  lambda: Int4WeightConfig(fallback=Fallback.FP16)])
def test_a_fallback_int4_cannot_take_is_a_config_error(make):
    with pytest.raises(ConfigError, match="fallback must be one of"):
        make()


# --------------------------------------------------------------------------
# the accuracy search
# --------------------------------------------------------------------------


def test_the_search_takes_the_noisiest_layer_into_8_bits_and_keeps_the_others_in_int4():
    all_int4 = accuracy_aware_quantize(_mlp(), Int4WeightConfig(fallback="int8"), _data(),
                                       AccuracyGoal(min_sqnr_db=200.0, max_float_nodes=1))
    search = accuracy_aware_quantize(_mlp(), Int4WeightConfig(fallback="int8"), _data(),
                                     AccuracyGoal(min_sqnr_db=all_int4.steps[0].score + 1.0))
    assert search.met and search.best_excluded == ("fc2",) and search.returned_to == "8 bits"
    assert search.result.config.fallback is WeightFallback.INT8
    bits = {name: node.attributes.get_int("bits") for name, node in _nbits_nodes(search.result.model).items()}
    assert bits == {"fc1_Q4": 4, "fc2_Q8": 8, "fc3_Q4": 4}
    (kept,) = search.result.float_nodes
    assert kept.reason.startswith(f"{RETURNED_TO_8_BITS} (round 0: ") and "with it in 8 bits the score" in kept.reason
    assert kept.reason.endswith(f"; {IN_8_BITS} (uint8, --fallback int8)")


def test_an_unreachable_goal_ends_with_every_layer_in_8_bits_not_the_float_model():
    search = accuracy_aware_quantize(_mlp(), Int4WeightConfig(fallback="int8"), _data(),
                                     AccuracyGoal(min_sqnr_db=200.0))
    assert not search.met and set(search.best_excluded) == {"fc1", "fc2", "fc3"}
    assert search.stopped_because == "no layer left in int4 to hold in 8 bits"
    bits = [node.attributes.get_int("bits") for node in _nbits_nodes(search.result.model).values()]
    assert bits == [8, 8, 8]
    assert search.best_score > 35.0  # 8-bit weights throughout: the best of the rounds


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------


@pytest.mark.parametrize(("scheme", "fallback", "message"), [
    ("int8", "int8", "--fallback int8 applies to --scheme int4-weight only, not int8"),
    ("int4-weight", "fp16", "--fallback fp16 applies to --scheme int8 and uint8 only, not int4-weight"),
    ("fp16", "int8", "--fallback int8 applies to --scheme int4-weight only, not fp16"),
])
def test_a_fallback_the_scheme_does_not_take_is_refused_in_one_line(cli, tmp_path, scheme, fallback, message):
    path = tmp_path / "mlp.onnx"
    save_model(mlp(tmp_path), path)
    out = tmp_path / "out.onnx"
    assert_one_line_error(cli("quantize", path, "-o", out, "--scheme", scheme, "--fallback", fallback,
                              "--no-speed-check"), message)
    assert not out.exists()


def test_the_command_line_holds_an_excluded_layer_in_8_bits(cli, tmp_path):
    path = tmp_path / "mlp.onnx"
    save_model(mlp(tmp_path), path)
    outcome = cli("quantize", path, "-o", tmp_path / "out.onnx", "--scheme", "int4-weight", "--exclude", "fc2",
                  "--fallback", "int8", "--no-speed-check", "--json")
    assert outcome.code == 0, outcome
    report = json.loads(outcome.stdout)
    (kept,) = report["float_nodes"]
    assert kept["reason"] == "excluded by config; weight held in 8 bits (uint8, --fallback int8)"


def test_the_command_line_chooses_what_embedding_tables_are_held_in(cli, tmp_path):
    from .test_int4 import tied_lm_model

    path = tmp_path / "tied.onnx"
    save_model(tied_lm_model(tmp_path), path)
    out = tmp_path / "out.onnx"
    assert_one_line_error(cli("quantize", path, "-o", out, "--scheme", "fp16", "--embeddings", "int4"),
                          "--embeddings applies to --scheme int4-weight and int8-dynamic only, not fp16")
    assert not out.exists()
    for choice, bits in (("int4", 4), ("int8", 8)):
        outcome = cli("quantize", path, "-o", out, "--scheme", "int4-weight", "--embeddings", choice,
                      "--no-speed-check", "--json")
        assert outcome.code == 0, outcome
        gather = next(node for node in onnx.load(out).graph.node if node.op_type == "GatherBlockQuantized")
        assert next(a.i for a in gather.attribute if a.name == "bits") == bits


def test_a_model_whose_weights_are_all_in_8_bits_is_not_called_int4(tmp_path):
    # every layer excluded with the 8-bit fallback: the speed check called the model "int4 weights"
    from edgeopt.quant.speed_evidence import PRECISION_LABELS, model_precision

    model = mlp(tmp_path)
    all_8_bits = quantize(model, Int4WeightConfig(exclude=("fc1", "fc2"), fallback="int8"), data=None).model
    assert {node.attributes.get_int("bits") for node in _nbits_nodes(all_8_bits).values()} == {8}
    assert PRECISION_LABELS[model_precision(all_8_bits)] == "8-bit weights"
    mixed = quantize(model, Int4WeightConfig(exclude=("fc2",), fallback="int8"), data=None).model
    assert PRECISION_LABELS[model_precision(mixed)] == "int4 weights"

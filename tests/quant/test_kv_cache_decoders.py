"""Decoder-only language models with a KV cache (``tests/llm_models.py``): past key/value inputs with
a dynamic past length (0 for a prompt), int64 position ids, rotary embeddings, RMSNorm, grouped-query
attention, a tied LM head. Calibration samples differ in prompt and cache length.
"""

from __future__ import annotations

import functools
import pathlib
import tempfile

import numpy as np
import onnx
import torch

import edgeopt
from edgeopt.io import load_model
from edgeopt.quant import Int8Config, quantize
from edgeopt.quant.int4 import Int4WeightConfig
from edgeopt.runtime.ort import OrtSession
from tests.llm_models import Decoder, decoder_names, decoder_samples, export_decoder


@functools.cache
def _llama_bytes(opset: int) -> bytes:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        return export_decoder(Decoder("llama"), pathlib.Path(folder) / "m.onnx", opset).read_bytes()


def _llama(tmp_path, opset: int = 17):
    path = tmp_path / f"llama_op{opset}.onnx"
    path.write_bytes(_llama_bytes(opset))
    return path


def _logits_sqnr_db(float_model, quant_model, samples) -> float:
    want, have = OrtSession(float_model), OrtSession(quant_model)
    signal = noise = 0.0
    for feed in samples:
        expected, got = want.run(feed)["logits"].astype(np.float64), have.run(feed)["logits"]
        signal, noise = signal + np.sum(expected ** 2), noise + np.sum((expected - got) ** 2)
    return float(10 * np.log10(signal / noise))


def test_inspect_takes_the_cache_sizes_from_one_past_input(tmp_path):
    """Six inputs share the dims batch, tokens and past: two --input-shape give all of them."""
    report = edgeopt.inspect(_llama(tmp_path), input_shapes={"input_ids": (1, 8), "past_key_0": (1, 2, 16, 16)})
    assert report.cost.macs > 0


def test_int8_with_caches_of_every_length_runs_them_all(tmp_path):
    """Caches of 0 to 20 positions and prompts of 3 to 16 tokens calibrate one model, which runs a cache
    it was not calibrated on; the rotary angles stay float32 and the additive causal mask's Add float."""
    model = load_model(_llama(tmp_path), require_static=False)
    result = quantize(model, Int8Config(), decoder_samples(16, seed=0))
    held_out = decoder_samples(8, seed=1)
    assert _logits_sqnr_db(model, result.model, held_out) >= 28.0  # measured 32.7
    assert {"Cos", "Sin", "Softmax"} <= {node.op_type for node in result.float_nodes}
    cache_joins = {node.name for node in model.graph if node.op_type == "Concat" and any(v.name.startswith("past_")
                                                                                       for v in node.inputs)}
    assert len(cache_joins) == 4 and not cache_joins & {node.node_name for node in result.float_nodes}
    inputs, outputs = decoder_names()
    session = OrtSession(result.model)
    assert session.input_names == inputs and session.output_names == outputs


def test_int4_puts_every_linear_in_matmul_nbits_and_the_table_in_gather_block_quantized(tmp_path):
    model = load_model(_llama(tmp_path), require_static=False)
    result = quantize(model, Int4WeightConfig(), None)  # blocks of 32
    ops = [node.op_type for node in result.model.graph]
    assert ops.count("MatMulNBits") == 15  # 7 per block and the tied head
    assert ops.count("GatherBlockQuantized") == 1
    assert _logits_sqnr_db(model, result.model, decoder_samples(8, seed=1)) >= 18.0  # measured 23.3
    onnx.checker.check_model(onnx.load_from_string(edgeopt.io.model_to_bytes(result.model)))

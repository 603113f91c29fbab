"""edgeopt's int4 weight-only quantizer vs ONNX Runtime's ``MatMulNBitsQuantizer`` (RTN), side by side.

Both write ``com.microsoft.MatMulNBits``; the question is only how well each
rounds. Two models built here with torch (no downloads), weights drawn to
look trained (Student-t rows, LayerNorm gains that make a few loud channels,
as real transformers have):

* ``mlp``: 512 -> 2048 -> 2048 -> 512 with GELU over ``[4, 8, 512]`` inputs
  (3-D, so the exporter writes MatMul + Add: ONNX Runtime's quantizer skips
  Gemm) whose channels differ in loudness;
* ``gpt``: a 4-layer decoder (d = 256, 4 heads, FFN 1024, vocabulary 1024,
  causal attention, untied LM head), token ids as input.

For block sizes 16/32/64/128: ONNX Runtime symmetric and asymmetric (its
default) RTN, edgeopt int4 (symmetric) without and with calibration data,
and with data and GPTQ rounding (``--gptq``), and edgeopt uint4 (asymmetric,
its default) the same three ways. Columns: weight SQNR (dB) per
layer, decoded from the written MatMulNBits blobs of each file (mean and
worst layer), and output SQNR (dB) against the float model on held-out
inputs (not the calibration ones). Each output model is run by ONNX Runtime;
for edgeopt's, the ``ref dB`` column checks its MatMulNBits against a float
MatMul on edgeopt's own reference dequantization of the same weights (rounding
only: 60+ dB).

    .venv/bin/python benchmarks/int4_vs_ort.py [--blocks 16,32,64,128] [--models mlp,gpt]
    .venv/bin/python benchmarks/int4_vs_ort.py --tables

``--tables``: the GPT with its embedding table quantized too (block 32), ONNX Runtime's quantizer with its
Gather support (``GatherBlockQuantized``, int4) against edgeopt's ``--embeddings int4`` and its default (the
table in 8 bits); ``table dB`` decodes each file's table.

Prints a markdown table. Run by hand, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import pathlib
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import environment, environment_markdown, markdown_table  # noqa: E402

from edgeopt.io import load_model, model_to_bytes  # noqa: E402
from edgeopt.quant import quantize  # noqa: E402
from edgeopt.quant.config import PerBlock  # noqa: E402
from edgeopt.quant.formats import INT4, UINT4  # noqa: E402
from edgeopt.quant.int4 import Int4WeightConfig  # noqa: E402
from edgeopt.quant.int4_blocks import MatMulNBitsWeight, decode_matmul_nbits  # noqa: E402

CALIBRATION_BATCHES = 8
HELD_OUT_BATCHES = 8


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------


def _trained_looking(module: nn.Module, generator: torch.Generator) -> None:
    """Linear weights Student-t (heavier tails than an init), LayerNorm gains log-normal (loud channels)."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            t = torch.distributions.StudentT(5.0).sample(sub.weight.shape)
            sub.weight.data = t * (0.5 / sub.in_features ** 0.5)
        elif isinstance(sub, nn.LayerNorm):
            sub.weight.data = torch.exp(torch.randn(sub.weight.shape, generator=generator) * 0.75)
        elif isinstance(sub, nn.Embedding):
            sub.weight.data = torch.randn(sub.weight.shape, generator=generator)


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, context: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.heads = heads
        self.register_buffer("mask", torch.full((context, context), float("-inf")).triu(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(width, dim=-1)
        shape = (batch, length, self.heads, width // self.heads)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / (width // self.heads) ** 0.5 + self.mask[:length, :length]
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, width)
        x = x + self.proj(attended)
        return x + self.down(nn.functional.gelu(self.up(self.ln2(x))))


class _Gpt(nn.Module):
    def __init__(self, vocabulary: int = 1024, width: int = 256, layers: int = 4, context: int = 32) -> None:
        super().__init__()
        self.embed, self.position = nn.Embedding(vocabulary, width), nn.Parameter(torch.randn(context, width) * 0.1)
        self.blocks = nn.ModuleList(_Block(width, 4, context) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, vocabulary, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def _export(module: nn.Module, example: torch.Tensor, path: pathlib.Path, input_name: str) -> None:
    module.eval()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(module, (example,), str(path), input_names=[input_name], output_names=["output"],
                          opset_version=17, dynamo=False)


def build_models(folder: pathlib.Path) -> dict[str, tuple[pathlib.Path, list[dict], list[dict]]]:
    """name -> (model file, calibration feeds, held-out feeds)."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.LayerNorm(2048), nn.Linear(2048, 2048), nn.GELU(),
                        nn.Linear(2048, 512))
    _trained_looking(mlp, generator)
    loudness = np.exp(np.random.default_rng(1).normal(0.0, 1.0, 512)).astype(np.float32)
    rng = np.random.default_rng(2)
    mlp_feeds = [{"input": (rng.standard_normal((4, 8, 512)) * loudness).astype(np.float32)}
                 for _ in range(CALIBRATION_BATCHES + HELD_OUT_BATCHES)]
    _export(mlp, torch.from_numpy(mlp_feeds[0]["input"]), folder / "mlp.onnx", "input")
    gpt = _Gpt()
    _trained_looking(gpt, generator)
    gpt_feeds = [{"ids": rng.integers(0, 1024, (4, 32)).astype(np.int64)}
                 for _ in range(CALIBRATION_BATCHES + HELD_OUT_BATCHES)]
    _export(gpt, torch.from_numpy(gpt_feeds[0]["ids"]), folder / "gpt.onnx", "ids")
    split = CALIBRATION_BATCHES
    return {"mlp": (folder / "mlp.onnx", mlp_feeds[:split], mlp_feeds[split:]),
            "gpt": (folder / "gpt.onnx", gpt_feeds[:split], gpt_feeds[split:])}


# --------------------------------------------------------------------------
# the two quantizers
# --------------------------------------------------------------------------


def quantize_ort(source: pathlib.Path, target: pathlib.Path, block_size: int, symmetric: bool) -> float:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    start = time.perf_counter()
    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), block_size=block_size, is_symmetric=symmetric,
                                     op_types_to_quantize=("MatMul", "Gemm"))
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), False)
    return time.perf_counter() - start


def quantize_edgeopt(source: pathlib.Path, target: pathlib.Path, block_size: int, fmt, data, gptq: bool,
                     embeddings: str = "float") -> float:
    start = time.perf_counter()
    # by default the embedding table stays float, as ORT's MatMul/Gemm-only quantizer leaves it: the same layers
    config = Int4WeightConfig(granularity=PerBlock(size=block_size), weight_format=fmt, gptq=gptq,
                              embeddings=embeddings)
    result = quantize(load_model(source), config, data=data)
    target.write_bytes(model_to_bytes(result.model))
    return time.perf_counter() - start


# --------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------


def sqnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    noise = np.sum((reference - other) ** 2)
    return float(10 * np.log10(np.sum(reference ** 2) / max(noise, 1e-30)))


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def decoded_weights(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Each MatMulNBits' weight ``[K, N]`` as it computes with, by the float weight it came from
    (both tools name the blob ``<weight>_Q4``)."""
    model = onnx.load(str(path))
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = {}
    for node in (n for n in model.graph.node if n.op_type == "MatMulNBits"):
        attributes = _attributes(node)
        zero_points = constants.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        packed = constants[node.input[1]].reshape(attributes["N"], -1, attributes["block_size"] // 2)
        encoded = MatMulNBitsWeight(packed=packed, scales=constants[node.input[2]].reshape(-1),
                                    zero_points=None if zero_points is None else zero_points.reshape(-1),
                                    k=attributes["K"], n=attributes["N"], block_size=attributes["block_size"])
        weights[node.input[1].removesuffix("_Q4")] = decode_matmul_nbits(encoded)
    return weights


def weight_sqnrs(float_path: pathlib.Path, quantized_path: pathlib.Path) -> list[float]:
    originals = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(float_path)).graph.initializer}
    result = []
    for name, decoded in decoded_weights(quantized_path).items():
        original = originals[name]
        original = original if original.shape == decoded.shape else original.T  # a Gemm's transB weight
        result.append(sqnr_db(original, decoded))
    return result


def run(path: pathlib.Path, feeds: list[dict]) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT's quantizer leaves unused initializers; its warning per tensor is noise
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, feed)[0] for feed in feeds])


def as_float_matmuls(path: pathlib.Path, target: pathlib.Path) -> None:
    """``path`` with every MatMulNBits replaced by MatMul (+ Add of its bias) on its decoded weight."""
    model = onnx.load(str(path))
    constants = {t.name: t for t in model.graph.initializer}
    decoded = decoded_weights(path)
    nodes = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            nodes.append(node)
            continue
        weight_name = node.input[1].removesuffix("_Q4") + "_decoded"
        model.graph.initializer.append(numpy_helper.from_array(decoded[node.input[1].removesuffix("_Q4")],
                                                               weight_name))
        has_bias = len(node.input) > 5 and node.input[5]
        product = node.output[0] + ("_product" if has_bias else "")
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], weight_name], [product]))
        if has_bias:
            nodes.append(onnx.helper.make_node("Add", [product, node.input[5]], [node.output[0]]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del constants
    onnx.save(model, str(target))


def quantize_ort_with_tables(source: pathlib.Path, target: pathlib.Path, block_size: int) -> float:
    """ORT's quantizer with its Gather support on: the embedding table too, in int4 (its default asymmetric)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    start = time.perf_counter()
    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), block_size=block_size, is_symmetric=False,
                                     op_types_to_quantize=("MatMul", "Gather"),
                                     quant_axes=(("MatMul", 0), ("Gather", 1)))
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), False)
    return time.perf_counter() - start


def decoded_table(path: pathlib.Path) -> np.ndarray:
    """The table the model's GatherBlockQuantized looks rows up in, ``(q - zero_point) * scale`` per block of each
    row, whichever way the file stores its codes (ORT: UINT4 tensors; edgeopt: bytes, two 4-bit codes each)."""
    model = onnx.load(str(path))
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    attributes = _attributes(node)
    bits, block_size = attributes.get("bits", 4), attributes["block_size"]
    data, scales = constants[node.input[0]], constants[node.input[2]]
    zero_points = constants[node.input[3]] if len(node.input) > 3 and node.input[3] else None
    rows, blocks = scales.shape
    if data.dtype == np.uint8 and bits == 4 and data.shape[1] * 2 == blocks * block_size:  # packed in bytes
        data = np.stack([data & 0x0F, data >> 4], axis=-1).reshape(rows, -1)
        if zero_points is not None:
            zero_points = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(rows, -1)[:, :blocks]
    default = 1 << (bits - 1)
    zero_points = np.full((rows, blocks), default) if zero_points is None else zero_points[:, :blocks]
    codes = data.astype(np.int64).reshape(rows, blocks, block_size)
    return ((codes - zero_points.astype(np.int64)[..., None]) * scales[..., None]).reshape(rows, -1).astype(np.float32)


TABLE_VARIANTS = (  # label, tool, --embeddings
    ("ORT RTN asym, MatMul + Gather", "ort", None),
    ("edgeopt uint4 + data, --embeddings int4", "edgeopt", "int4"),
    ("edgeopt uint4 + data (default: table in 8 bits)", "edgeopt", "int8"),
)


def table_rows(float_path: pathlib.Path, folder: pathlib.Path, calibration: list[dict], held_out: list[dict],
               reference: np.ndarray, block_size: int) -> list[list]:
    """The GPT with its embedding table quantized too: ORT's Gather support against edgeopt's."""
    table = next(numpy_helper.to_array(t) for t in onnx.load(str(float_path)).graph.initializer
                 if t.name == "embed.weight")
    rows = []
    for label, tool, embeddings in TABLE_VARIANTS:
        path = folder / f"gpt.tables.{block_size}.{tool}.{embeddings}.onnx"
        seconds = (quantize_ort_with_tables(float_path, path, block_size) if tool == "ort" else
                   quantize_edgeopt(float_path, path, block_size, UINT4, calibration, False, embeddings))
        rows.append(["gpt", block_size, label, f"{sqnr_db(table, decoded_table(path)):.2f}",
                     f"{np.mean(weight_sqnrs(float_path, path)):.2f}", f"{sqnr_db(reference, run(path, held_out)):.2f}",
                     f"{path.stat().st_size / 1024:.0f}", f"{seconds:.2f}"])
        print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    return rows


def measure(name: str, float_path: pathlib.Path, path: pathlib.Path, held_out: list[dict],
            reference: np.ndarray, edgeopt: bool) -> dict:
    layers = weight_sqnrs(float_path, path)
    output = run(path, held_out)
    row = {"weight_mean": float(np.mean(layers)), "weight_min": float(np.min(layers)), "layers": len(layers),
           "output": sqnr_db(reference, output), "ref": None, "kib": path.stat().st_size / 1024}
    if edgeopt:
        check = path.with_name(path.stem + ".ref.onnx")
        as_float_matmuls(path, check)
        row["ref"] = sqnr_db(run(check, held_out), output)
    return row


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


VARIANTS = (  # label, tool, symmetric / format, with calibration data, GPTQ
    ("ORT RTN sym", "ort", True, False, False),
    ("ORT RTN asym (default)", "ort", False, False, False),
    ("edgeopt int4", "edgeopt", INT4, False, False),
    ("edgeopt int4 + data", "edgeopt", INT4, True, False),
    ("edgeopt int4 + data + gptq", "edgeopt", INT4, True, True),
    ("edgeopt uint4", "edgeopt", UINT4, False, False),
    ("edgeopt uint4 + data", "edgeopt", UINT4, True, False),
    ("edgeopt uint4 + data + gptq", "edgeopt", UINT4, True, True),
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", default="16,32,64,128")
    parser.add_argument("--models", default="mlp,gpt")
    parser.add_argument("--tables", action="store_true",
                        help="only the GPT with its embedding table quantized too, at block 32")
    args = parser.parse_args(argv)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # a line per node otherwise
    blocks = [int(b) for b in args.blocks.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="int4_vs_ort_") as tmp:
        folder = pathlib.Path(tmp)
        models = build_models(folder)
        if args.tables:
            float_path, calibration, held_out = models["gpt"]
            rows = table_rows(float_path, folder, calibration, held_out, run(float_path, held_out), 32)
            headers = ["model", "block", "quantizer", "table dB", "layer weight dB (mean)", "output dB (held out)",
                       "KiB", "s"]
            print("\n".join(markdown_table(headers, rows, right=[False, True, False, *[True] * 5])))
            print()
            print("\n".join(environment_markdown(environment(sys.argv))))
            return
        for model_name in args.models.split(","):
            float_path, calibration, held_out = models[model_name]
            reference = run(float_path, held_out)
            for block_size in blocks:
                for label, tool, kind, with_data, gptq in VARIANTS:
                    path = folder / f"{model_name}.{block_size}.{label.replace(' ', '_')}.onnx"
                    if tool == "ort":
                        seconds = quantize_ort(float_path, path, block_size, kind)
                    else:
                        seconds = quantize_edgeopt(float_path, path, block_size, kind,
                                                   calibration if with_data else None, gptq)
                    row = measure(model_name, float_path, path, held_out, reference, tool == "edgeopt")
                    rows.append([model_name, block_size, label, row["layers"], f"{row['weight_mean']:.2f}",
                                 f"{row['weight_min']:.2f}", f"{row['output']:.2f}",
                                 "" if row["ref"] is None else f"{row['ref']:.1f}", f"{row['kib']:.0f}",
                                 f"{seconds:.2f}"])
                    print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    headers = ["model", "block", "quantizer", "layers", "weight dB (mean)", "weight dB (worst)",
               "output dB (held out)", "ref dB", "KiB", "s"]
    print("\n".join(markdown_table(headers, rows, right=[False, True, False, *[True] * 7])))
    print()
    print("\n".join(environment_markdown(environment(sys.argv))))


if __name__ == "__main__":
    main()

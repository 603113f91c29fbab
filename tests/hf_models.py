"""Hugging Face-style token models written in plain torch (no ``transformers``, no downloads).

* ``bert``: input_ids, attention_mask, token_type_ids (int64) -> word + position (``arange``,
  ``expand_as``) + token-type embeddings, LayerNorm, 2 post-norm layers (erf GELU), the extended
  mask ``(1 - mask[:, None, None, :]) * finfo.min`` added to the scores, a Tanh pooler, a classifier.
* ``gpt2``: input_ids -> wte + wpe, 2 pre-norm blocks of Conv1D-style ``addmm`` layers, a causal
  ``Where(tril, scores, finfo.min)``, ``gelu_new`` (tanh GELU with ``pow(x, 3)``), the LM head
  tied to ``wte`` (``x @ wte.weight.t()``).
* ``vit``: pixel_values -> patch Conv, cls token Concat, position embedding Add, 2 pre-norm layers.
* ``llama_mask``: a one-layer decoder whose causal mask is built as Hugging Face's ``_update_causal_mask``
  (sdpa path) builds it, ``_unmask_unattended`` included: ``triu(full((S, S), finfo.min))``, padding
  filled with ``finfo.min``, rows that are all ``finfo.min`` (left padding) multiplied by 0. Exported with
  a static sequence length, as edge deployments fix it, so the ``full`` stays an [S, S] constant.
* ``rope``: input_ids, position_ids -> one Llama-style attention layer with rotary embeddings computed
  as Hugging Face's LlamaRotaryEmbedding does: angles ``inv_freq @ position_ids``, ``cat(f, f)``, cos, sin.
* ``t5``: input_ids, attention_mask -> one T5 encoder layer (RMSNorm, no biases) whose attention adds a
  relative position bias: buckets computed at run time as T5 does, ``(log(n / 8) / log(16) * 8).long()``.

Hidden size 64, vocabulary 100, random seeded weights. ``build_hf(name, tmp_dir, opset)`` exports
with the TorchScript exporter (batch and sequence dynamic), ``dynamo=True`` for opset 18 and up;
exports are cached per process. ``hf_samples`` gives token ids of varying lengths with padded masks.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import pathlib
import tempfile
import warnings

import numpy as np
import torch
from torch import nn

__all__ = ["HF_INPUTS", "build_hf", "hf_samples"]

VOCAB = 100
HIDDEN = 64
HEADS = 4


def _heads(x: torch.Tensor) -> torch.Tensor:
    batch, tokens, _ = x.shape
    return x.view(batch, tokens, HEADS, HIDDEN // HEADS).permute(0, 2, 1, 3)


def _merge(x: torch.Tensor) -> torch.Tensor:
    x = x.permute(0, 2, 1, 3).contiguous()
    return x.view(x.shape[0], x.shape[1], -1)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class _BertLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.key, self.value, self.out = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
        self.inter, self.output = nn.Linear(HIDDEN, 4 * HIDDEN), nn.Linear(4 * HIDDEN, HIDDEN)
        self.ln_1, self.ln_2 = nn.LayerNorm(HIDDEN, eps=1e-12), nn.LayerNorm(HIDDEN, eps=1e-12)

    def forward(self, x, mask):
        q, k, v = _heads(self.query(x)), _heads(self.key(x)), _heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(HIDDEN // HEADS) + mask
        x = self.ln_1(self.out(_merge(torch.matmul(torch.softmax(scores, dim=-1), v))) + x)
        return self.ln_2(self.output(nn.functional.gelu(self.inter(x))) + x)


class Bert(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.word, self.position, self.token_type = nn.Embedding(VOCAB, HIDDEN), nn.Embedding(64, HIDDEN), \
            nn.Embedding(2, HIDDEN)
        self.ln = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.layers = nn.ModuleList([_BertLayer() for _ in range(2)])
        self.pooler, self.classifier = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, classes)

    def forward(self, input_ids, attention_mask, token_type_ids):
        positions = torch.arange(input_ids.shape[1], dtype=torch.long).unsqueeze(0).expand_as(input_ids)
        x = self.ln(self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids))
        mask = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min
        for layer in self.layers:
            x = layer(x, mask)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


class _Conv1D(nn.Module):
    """GPT-2's linear layer: ``addmm(bias, x.view(-1, nx), weight)`` with weight [nx, nf]."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.randn(nf) * 0.02)

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (self.weight.shape[1],))


class _GptBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.c_attn, self.c_proj = _Conv1D(3 * HIDDEN, HIDDEN), _Conv1D(HIDDEN, HIDDEN)
        self.c_fc, self.mlp_proj = _Conv1D(4 * HIDDEN, HIDDEN), _Conv1D(HIDDEN, 4 * HIDDEN)
        self.register_buffer("bias", torch.tril(torch.ones(64, 64, dtype=torch.bool)).view(1, 1, 64, 64))

    def forward(self, x):
        q, k, v = (_heads(part) for part in self.c_attn(self.ln_1(x)).split(HIDDEN, dim=2))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(HIDDEN // HEADS)
        tokens = q.size(-2)
        causal = self.bias[:, :, :tokens, :tokens]
        scores = torch.where(causal, scores, torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype))
        x = x + self.c_proj(_merge(torch.matmul(torch.softmax(scores, dim=-1), v)))
        return x + self.mlp_proj(gelu_new(self.c_fc(self.ln_2(x))))


class Gpt2(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, HIDDEN), nn.Embedding(64, HIDDEN)
        self.blocks = nn.ModuleList([_GptBlock() for _ in range(2)])
        self.ln_f = nn.LayerNorm(HIDDEN)

    def forward(self, input_ids):
        positions = torch.arange(0, input_ids.shape[-1], dtype=torch.long).unsqueeze(0)
        x = self.wte(input_ids) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        return torch.matmul(self.ln_f(x), self.wte.weight.t())


class Vit(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, HIDDEN, 4, 4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, HIDDEN) * 0.02)
        self.position = nn.Parameter(torch.randn(1, 17, HIDDEN) * 0.02)
        layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, 4 * HIDDEN, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.ln, self.head = nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, classes)

    def forward(self, pixel_values):
        x = self.patch(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position
        return self.head(self.ln(self.encoder(x)[:, 0]))


class LlamaMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, HIDDEN), nn.Linear(HIDDEN, VOCAB)
        self.query, self.key, self.value = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids)
        lowest = torch.finfo(torch.float32).min
        causal = torch.triu(torch.full((input_ids.shape[1],) * 2, lowest), diagonal=1)
        causal = causal[None, None].expand(input_ids.shape[0], 1, -1, -1).clone()
        padding = (causal + attention_mask[:, None, None, :].to(torch.float32)) == 0
        causal = causal.masked_fill(padding, lowest)
        causal = causal.mul(~torch.all(causal == lowest, dim=-1, keepdim=True))
        scores = self.query(x)[:, None] @ self.key(x)[:, None].transpose(-1, -2) / math.sqrt(HIDDEN) + causal
        return self.head((torch.softmax(scores, dim=-1) @ self.value(x)[:, None])[:, 0])


def _t5_buckets(relative: torch.Tensor, buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    half = buckets // 2
    exact, distance = half // 2, torch.abs(relative)
    large = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    large = torch.min(large, torch.full_like(large, half - 1))
    return (relative > 0).long() * half + torch.where(distance < exact, distance, large)


class T5(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.relative_bias = nn.Embedding(VOCAB, HIDDEN), nn.Embedding(32, HEADS)
        self.query, self.key, self.value, self.out = (nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in range(4))
        self.norm = nn.Parameter(torch.ones(HIDDEN))
        self.head = nn.Linear(HIDDEN, 5)

    def forward(self, input_ids, attention_mask):
        x, tokens = self.embed(input_ids), input_ids.shape[1]
        positions = torch.arange(tokens, dtype=torch.long)
        bias = self.relative_bias(_t5_buckets(positions[None, :] - positions[:, None])).permute(2, 0, 1)[None]
        mask = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        h = self.norm * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        q, k, v = _heads(self.query(h)), _heads(self.key(h)), _heads(self.value(h))
        x = x + self.out(_merge(torch.softmax(q @ k.transpose(-1, -2) + bias + mask, dim=-1) @ v))
        return self.head(x.mean(1))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rope(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, HIDDEN), nn.Linear(HIDDEN, VOCAB, bias=False)
        self.query, self.key, self.value, self.out = (nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in range(4))
        dims = HIDDEN // HEADS
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dims, 2).float() / dims)))

    def forward(self, input_ids, position_ids):
        x = self.embed(input_ids)
        inv_freq = self.inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1)
        angles = (inv_freq @ position_ids[:, None, :].float()).transpose(1, 2)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        q, k, v = _heads(self.query(x)), _heads(self.key(x)), _heads(self.value(x))
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        scores = q @ k.transpose(-1, -2) / math.sqrt(HIDDEN // HEADS)
        return self.head(x + self.out(_merge(torch.softmax(scores, dim=-1) @ v)))


_MODULES = {"bert": Bert, "gpt2": Gpt2, "vit": Vit, "llama_mask": LlamaMask, "t5": T5, "rope": Rope}
#: The inputs of each model, in the order its forward takes them.
HF_INPUTS = {"bert": ("input_ids", "attention_mask", "token_type_ids"), "gpt2": ("input_ids",),
             "vit": ("pixel_values",), "llama_mask": ("input_ids", "attention_mask"),
             "t5": ("input_ids", "attention_mask"), "rope": ("input_ids", "position_ids")}


def hf_samples(name: str, count: int, seed: int = 0, *, tokens: int | None = None) -> list[dict[str, np.ndarray]]:
    """``count`` batch-1 samples: 5 to 16 tokens each (``tokens`` fixes it), the last ones of a BERT
    sample padding (id 0, mask 0), its second half token type 1, the first ones of a llama_mask sample
    masked, rope positions starting anywhere below 200; ViT images 3x16x16."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        if name == "vit":
            samples.append({"pixel_values": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)})
            continue
        length = tokens or int(rng.integers(5, 17))
        ids = rng.integers(1, VOCAB, (1, length)).astype(np.int64)
        if name == "gpt2":
            samples.append({"input_ids": ids})
            continue
        if name == "rope":  # a prompt continued from a cache: positions from 0 to about 250
            start = int(rng.integers(0, 200))
            samples.append({"input_ids": ids, "position_ids": np.arange(start, start + length)[None]})
            continue
        if name == "llama_mask":  # left padding, as decoders batch prompts
            mask = np.ones_like(ids)
            mask[:, :int(rng.integers(1, length // 2))] = 0
            samples.append({"input_ids": ids, "attention_mask": mask})
            continue
        mask, types = np.ones_like(ids), np.zeros_like(ids)
        if name == "t5":
            mask[:, length - int(rng.integers(0, length // 2)):] = 0
            samples.append({"input_ids": ids, "attention_mask": mask})
            continue
        padding = int(rng.integers(0, length // 2))
        mask[:, length - padding:], ids[:, length - padding:], types[:, length // 2:] = 0, 0, 1
        samples.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    return samples


def _export(module: nn.Module, name: str, path: pathlib.Path, opset: int) -> None:
    example = tuple(torch.from_numpy(array) for array in hf_samples(name, 1, tokens=8)[0].values())
    inputs = list(HF_INPUTS[name])
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.TransformerEncoderLayer's inference fast path (the ViT's) is one fused op TorchScript cannot export
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        _export_unfused(module, name, path, opset, example, inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _export_unfused(module: nn.Module, name: str, path: pathlib.Path, opset: int, example: tuple,
                    inputs: list[str]) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if name == "llama_mask":
            torch.onnx.export(module, example, str(path), dynamo=False, opset_version=opset, input_names=inputs,
                              output_names=["logits"])
            return
        if opset < 18:
            axes = {n: {0: "batch"} if name == "vit" else {0: "batch", 1: "tokens"} for n in inputs}
            axes["logits"] = {0: "batch", 1: "tokens"} if name == "gpt2" else {0: "batch"}
            torch.onnx.export(module, example, str(path), dynamo=False, opset_version=opset, input_names=inputs,
                              output_names=["logits"], dynamic_axes=axes)
            return
        batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens", min=2, max=64)
        shapes = {n: {0: batch} if name == "vit" else {0: batch, 1: tokens} for n in inputs}
        torch.onnx.export(module, example, str(path), dynamo=True, opset_version=opset, input_names=inputs,
                          output_names=["logits"], dynamic_shapes=shapes, external_data=False)


@functools.cache
def _hf_bytes(name: str, opset: int) -> bytes:
    torch.manual_seed(0)
    module = _MODULES[name]().eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "m.onnx"
        with torch.no_grad():
            _export(module, name, path, opset)
        return path.read_bytes()


def build_hf(name: str, tmp_dir, opset: int = 17) -> pathlib.Path:
    """Export ``name`` (bert, gpt2, vit, llama_mask, t5, rope) to ``tmp_dir/<name>_op<opset>.onnx``: TorchScript below
    opset 18, dynamo from 18; batch and token dims dynamic (llama_mask: 1 x 8, TorchScript)."""
    path = pathlib.Path(tmp_dir) / f"{name}_op{opset}.onnx"
    path.write_bytes(_hf_bytes(name, opset))
    return path

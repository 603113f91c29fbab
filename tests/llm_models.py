"""Small decoder-only language models with a KV cache, in plain torch (no downloads).

* ``llama``: input_ids, position_ids (int64), past key/value per layer -> logits, present key/value.
  RMSNorm written ``x * rsqrt(mean(x^2) + eps) * w``, rotary embeddings as Hugging Face computes them
  (``inv_freq @ position_ids``, ``cat(f, f)``, cos, sin, ``rotate_half``), grouped-query attention
  (4 query heads, 2 key/value heads, ``repeat_interleave``), a causal mask over past + new tokens, a
  SwiGLU MLP, an LM head tied to the embedding (``tied=False``: its own Linear).
* ``gpt2``: input_ids, position_ids -> learned positions, pre-norm LayerNorm blocks, tanh GELU, the
  same cache layout (4 heads).

Hidden 64, vocabulary 128, 2 layers, seeded random weights. The cache tensors are
``past_{key,value}_{i}`` [batch, kv_heads, past, head_dim] in and ``present_{key,value}_{i}`` out.
``export_decoder`` writes TorchScript (opset < 18, batch / sequence / past dynamic) or dynamo
(opset >= 18); ``decoder_samples`` gives prompts of varying lengths with caches of varying lengths;
``greedy`` decodes step by step with the cache in ONNX Runtime; ``train`` teaches a module arithmetic
progressions in a few seconds, so that greedy decoding has something to agree on.
(``tests/hf_models.py`` holds the cache-less Hugging Face-style models; ``rotate_half`` is its.)
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import warnings

import numpy as np
import torch
from torch import nn

from tests.hf_models import _rotate_half

__all__ = ["Decoder", "decoder_names", "decoder_samples", "export_decoder", "greedy", "progression", "train",
           "with_outlier_channels"]

VOCAB, HIDDEN, HEADS, LAYERS = 128, 64, 4, 2
HEAD_DIM = HIDDEN // HEADS


class _RmsNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(HIDDEN))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class _Block(nn.Module):
    def __init__(self, llama: bool, kv_heads: int):
        super().__init__()
        self.llama, self.kv_heads = llama, kv_heads
        self.norm_1, self.norm_2 = (_RmsNorm(), _RmsNorm()) if llama else (nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN))
        self.q = nn.Linear(HIDDEN, HIDDEN, bias=not llama)
        self.k = nn.Linear(HIDDEN, kv_heads * HEAD_DIM, bias=not llama)
        self.v = nn.Linear(HIDDEN, kv_heads * HEAD_DIM, bias=not llama)
        self.o = nn.Linear(HIDDEN, HIDDEN, bias=not llama)
        if llama:
            self.gate, self.up = nn.Linear(HIDDEN, 128, bias=False), nn.Linear(HIDDEN, 128, bias=False)
            self.down = nn.Linear(128, HIDDEN, bias=False)
        else:
            self.fc, self.proj = nn.Linear(HIDDEN, 4 * HIDDEN), nn.Linear(4 * HIDDEN, HIDDEN)

    def forward(self, x, cos, sin, mask, past_key, past_value):
        batch, tokens, _ = x.shape
        h = self.norm_1(x)
        q = self.q(h).view(batch, tokens, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k(h).view(batch, tokens, self.kv_heads, HEAD_DIM).transpose(1, 2)
        v = self.v(h).view(batch, tokens, self.kv_heads, HEAD_DIM).transpose(1, 2)
        if self.llama:
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        key, value = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
        groups = HEADS // self.kv_heads
        k_all = key.repeat_interleave(groups, dim=1) if groups > 1 else key
        v_all = value.repeat_interleave(groups, dim=1) if groups > 1 else value
        scores = q @ k_all.transpose(-1, -2) / HEAD_DIM ** 0.5 + mask
        attended = (torch.softmax(scores, dim=-1) @ v_all).transpose(1, 2).reshape(batch, tokens, HIDDEN)
        x = x + self.o(attended)
        h = self.norm_2(x)
        if self.llama:
            x = x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))
        else:
            x = x + self.proj(nn.functional.gelu(self.fc(h), approximate="tanh"))
        return x, key, value


class Decoder(nn.Module):
    def __init__(self, kind: str = "llama", *, tied: bool = True, kv_heads: int = 2):
        super().__init__()
        self.llama = kind == "llama"
        kv_heads = kv_heads if self.llama else HEADS
        self.kv_heads = kv_heads
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        if not self.llama:
            self.positions = nn.Embedding(256, HIDDEN)
        self.blocks = nn.ModuleList([_Block(self.llama, kv_heads) for _ in range(LAYERS)])
        self.norm = _RmsNorm() if self.llama else nn.LayerNorm(HIDDEN)
        self.tied = tied
        if not tied:
            self.head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)))

    def forward(self, input_ids, position_ids, *past):
        x = self.embed(input_ids)
        if self.llama:
            inv_freq = self.inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1)
            angles = (inv_freq @ position_ids[:, None, :].float()).transpose(1, 2)
            angles = torch.cat((angles, angles), dim=-1)
            cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        else:
            x = x + self.positions(position_ids)
            cos = sin = None
        tokens, total = input_ids.shape[1], input_ids.shape[1] + past[0].shape[2]
        rows = torch.arange(tokens)[:, None] + (total - tokens)
        mask = torch.where(torch.arange(total)[None, :] <= rows, 0.0, torch.finfo(torch.float32).min)
        presents = []
        for i, block in enumerate(self.blocks):
            x, key, value = block(x, cos, sin, mask, past[2 * i], past[2 * i + 1])
            presents += [key, value]
        x = self.norm(x)
        logits = x @ self.embed.weight.t() if self.tied else self.head(x)
        return (logits, *presents)


def decoder_names() -> tuple[list[str], list[str]]:
    """The graph's input and output names, in forward order."""
    past = [f"past_{kind}_{i}" for i in range(LAYERS) for kind in ("key", "value")]
    present = [f"present_{kind}_{i}" for i in range(LAYERS) for kind in ("key", "value")]
    return ["input_ids", "position_ids", *past], ["logits", *present]


def _empty_past(kv_heads: int, past: int, rng=None) -> list[np.ndarray]:
    shape = (1, kv_heads, past, HEAD_DIM)
    make = (lambda: rng.standard_normal(shape).astype(np.float32)) if rng is not None and past else \
        (lambda: np.zeros(shape, np.float32))
    return [make() for _ in range(2 * LAYERS)]


def decoder_samples(count: int, kv_heads: int = 2, seed: int = 0, *, past: bool = True) -> list[dict]:
    """``count`` batch-1 samples: 3 to 16 new tokens; with ``past`` a random cache of 0 to 20 positions
    (positions continue after it), else an empty cache."""
    rng = np.random.default_rng(seed)
    inputs, _ = decoder_names()
    samples = []
    for _ in range(count):
        tokens = int(rng.integers(3, 17))
        cached = int(rng.integers(0, 21)) if past else 0
        ids = rng.integers(0, VOCAB, (1, tokens)).astype(np.int64)
        positions = np.arange(cached, cached + tokens, dtype=np.int64)[None]
        samples.append(dict(zip(inputs, [ids, positions, *_empty_past(kv_heads, cached, rng)])))
    return samples


def export_decoder(module: Decoder, path, opset: int = 17) -> pathlib.Path:
    """TorchScript below opset 18 (batch, sequence and past dims dynamic), dynamo from 18."""
    path = pathlib.Path(path)
    inputs, outputs = decoder_names()
    example = tuple(torch.from_numpy(a) for a in decoder_samples(1, module.kv_heads, seed=1)[0].values())
    example = (example[0][:, :4], example[1][:, :4], *(torch.randn(1, module.kv_heads, 3, HEAD_DIM)
                                                        for _ in range(2 * LAYERS)))
    example = (example[0], torch.arange(3, 7)[None], *example[2:])
    module.eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        if opset < 18:
            axes = {name: {0: "batch", 1: "tokens"} for name in inputs[:2]}
            axes.update({name: {0: "batch", 2: "past"} for name in inputs[2:]})
            axes["logits"] = {0: "batch", 1: "tokens"}
            axes.update({name: {0: "batch", 2: "total"} for name in outputs[1:]})
            torch.onnx.export(module, example, str(path), dynamo=False, opset_version=opset, input_names=inputs,
                              output_names=outputs, dynamic_axes=axes)
            return path
        batch, tokens, past = torch.export.Dim("batch"), torch.export.Dim("tokens", max=64), \
            torch.export.Dim("past", max=256)
        shapes = ({0: batch, 1: tokens}, {0: batch, 1: tokens}, tuple({0: batch, 2: past} for _ in range(2 * LAYERS)))
        torch.onnx.export(module, example, str(path), dynamo=True, opset_version=opset, input_names=inputs,
                          output_names=outputs, dynamic_shapes=shapes, external_data=False)
    return path


def greedy(session, prompt: np.ndarray, steps: int, kv_heads: int = 2) -> list[int]:
    """Greedy decoding with ONNX Runtime ``session``: the prompt, then one token a step through the cache."""
    inputs, _ = decoder_names()
    past = _empty_past(kv_heads, 0)
    ids, start, generated = prompt, 0, []
    for _ in range(steps):
        positions = np.arange(start, start + ids.shape[1], dtype=np.int64)[None]
        logits, *past = session.run(None, dict(zip(inputs, [ids, positions, *past])))
        start += ids.shape[1]
        generated.append(int(logits[0, -1].argmax()))
        ids = np.array([[generated[-1]]], np.int64)
    return generated


def progression(batch: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """Token sequences ``t0 + i * step (mod VOCAB)``, step 1 to 4: what ``train`` teaches."""
    start, step = rng.integers(0, VOCAB, (batch, 1)), rng.integers(1, 5, (batch, 1))
    return (start + step * np.arange(length)[None]) % VOCAB


def train(module: Decoder, steps: int = 300, seed: int = 0) -> Decoder:
    """A few hundred Adam steps on ``progression`` (next-token loss), so greedy decoding means something."""
    rng, torch_rng = np.random.default_rng(seed), torch.manual_seed(seed)
    del torch_rng
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    module.train()
    for _ in range(steps):
        ids = torch.from_numpy(progression(32, 24, rng))
        past = [torch.zeros(32, module.kv_heads, 0, HEAD_DIM) for _ in range(2 * LAYERS)]
        logits = module(ids[:, :-1], torch.arange(23)[None].expand(32, -1), *past)[0]
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return module.eval()


def with_outlier_channels(module: Decoder, channels=(3, 17, 40), factor: float = 30.0) -> Decoder:
    """LLM-style activation outliers, same float function: RMSNorm weights of ``channels`` x ``factor``
    in every block, the rows of the q/k/v and gate/up weights reading them / ``factor``."""
    with torch.no_grad():
        for block in module.blocks:
            for norm, readers in ((block.norm_1, (block.q, block.k, block.v)), (block.norm_2, (block.gate, block.up))):
                norm.weight[list(channels)] *= factor
                for linear in readers:
                    linear.weight[:, list(channels)] /= factor
    return module

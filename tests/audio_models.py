"""Small audio / sequence models that embedded engineers bring, with a dynamic time axis.

* ``kws_tcn``: keyword spotting on [N, 40 mel, T]: Conv1d stem, depthwise-separable Conv1d, dilated
  residual Conv1d blocks (TCN), BatchNorm1d, ReLU, AvgPool1d, AdaptiveAvgPool1d, Linear head.
* ``kws_cnn2d``: [N, 1, 40, T] spectrogram CNN (Conv2d, BatchNorm2d, ReLU, global pool, Linear).
* ``gru``: 2-layer batch-first GRU over [N, T, 40], Linear head on the last step.
* ``lstm``: 1-layer bidirectional batch-first LSTM over [N, T, 40], mean over time, Linear head.
* ``conformer``: one Conformer block on [N, T, 40]: half-step feed-forward (LayerNorm, Linear, SiLU),
  multi-head self-attention (op by op; ``conformer_mha``: nn.MultiheadAttention, dynamo opsets only),
  convolution module (pointwise Conv1d, GLU, depthwise Conv1d, BatchNorm1d,
  SiLU, pointwise Conv1d), final LayerNorm, all with residuals; Linear head on the time mean.

``build_audio(name, tmp_dir, opset)`` seeds, gives the norms trained-looking statistics, exports
(TorchScript below opset 18, dynamo from 18) with batch and time dynamic and returns the path.
``audio_samples(name, count)`` draws calibration samples whose time length differs (50..120 frames).
"""

from __future__ import annotations

import contextlib
import functools
import io
import pathlib
import tempfile
import warnings

import numpy as np
import torch
from torch import nn

__all__ = ["AUDIO_MODELS", "audio_samples", "build_audio", "build_audio_torch"]

MELS = 40


class _TcnBlock(nn.Module):
    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.norm = nn.BatchNorm1d(channels)

    def forward(self, x):
        return torch.relu(x + self.norm(self.conv(x)))


class KwsTcn(nn.Module):
    def __init__(self, channels: int = 24, classes: int = 12):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(MELS, channels, 5, padding=2, bias=False), nn.BatchNorm1d(channels),
                                  nn.ReLU())
        self.separable = nn.Sequential(
            nn.Conv1d(channels, channels, 5, padding=2, groups=channels, bias=False), nn.BatchNorm1d(channels),
            nn.ReLU(), nn.Conv1d(channels, channels, 1, bias=False), nn.BatchNorm1d(channels), nn.ReLU())
        self.pool = nn.AvgPool1d(2)
        self.blocks = nn.Sequential(_TcnBlock(channels, 1), _TcnBlock(channels, 2), _TcnBlock(channels, 4))
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        x = self.blocks(self.pool(self.separable(self.stem(x))))
        return self.head(nn.functional.adaptive_avg_pool1d(x, 1).flatten(1))


class KwsCnn2d(nn.Module):
    def __init__(self, channels: int = 16, classes: int = 12):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, 2 * channels, 1), nn.ReLU())
        self.head = nn.Linear(2 * channels, classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


class GruModel(nn.Module):
    def __init__(self, hidden: int = 32, classes: int = 12):
        super().__init__()
        self.rnn = nn.GRU(MELS, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


class LstmModel(nn.Module):
    def __init__(self, hidden: int = 24, classes: int = 12):
        super().__init__()
        self.rnn = nn.LSTM(MELS, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y.mean(dim=1))


class _SelfAttention(nn.Module):
    """Multi-head self-attention written op by op (TorchScript bakes nn.MultiheadAttention's time length
    into its Reshapes)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        batch, _, dim = x.shape
        q, k, v = (t.reshape(batch, -1, self.heads, dim // self.heads).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (self.heads / dim) ** 0.5
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.out(context.transpose(1, 2).reshape(batch, -1, dim))


class ConformerBlock(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, classes: int = 12, torch_attention: bool = False):
        super().__init__()
        self.torch_attention = torch_attention
        self.project = nn.Linear(MELS, dim)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = (nn.MultiheadAttention(dim, heads, batch_first=True) if torch_attention
                     else _SelfAttention(dim, heads))
        self.conv_norm = nn.LayerNorm(dim)
        self.pointwise_in = nn.Conv1d(dim, 2 * dim, 1)
        self.glu = nn.GLU(dim=1)
        self.depthwise = nn.Conv1d(dim, dim, 7, padding=3, groups=dim)
        self.bn = nn.BatchNorm1d(dim)
        self.pointwise_out = nn.Conv1d(dim, dim, 1)
        self.out_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.project(x)
        x = x + 0.5 * self.ff(x)
        a = self.attn_norm(x)
        x = x + (self.attn(a, a, a, need_weights=False)[0] if self.torch_attention else self.attn(a))
        c = self.conv_norm(x).transpose(1, 2)
        c = self.glu(self.pointwise_in(c))
        c = self.pointwise_out(nn.functional.silu(self.bn(self.depthwise(c))))
        x = self.out_norm(x + c.transpose(1, 2))
        return self.head(x.mean(dim=1))


# name -> (module class, example shape with time 80, time axis)
AUDIO_MODELS = {
    "kws_tcn": (KwsTcn, (1, MELS, 80), 2),
    "kws_cnn2d": (KwsCnn2d, (1, 1, MELS, 80), 3),
    "gru": (GruModel, (1, 80, MELS), 1),
    "lstm": (LstmModel, (1, 80, MELS), 1),
    "conformer": (ConformerBlock, (1, 80, MELS), 1),
    "conformer_mha": (functools.partial(ConformerBlock, torch_attention=True), (1, 80, MELS), 1),  # dynamo only
}


def _randomize_norms(module: nn.Module) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)


def build_audio_torch(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The seeded eval-mode module ``name`` and an example input of 80 frames."""
    cls, shape, _ = AUDIO_MODELS[name]
    torch.manual_seed(0)
    module = cls()
    _randomize_norms(module)
    return module.eval(), torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _export(module: nn.Module, example: torch.Tensor, time_axis: int, path: pathlib.Path, opset: int) -> None:
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            if opset < 18:
                torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                                  input_names=["input"], output_names=["output"],
                                  dynamic_axes={"input": {0: "N", time_axis: "T"}, "output": {0: "N"}},
                                  training=torch.onnx.TrainingMode.PRESERVE)
            else:
                dims = {0: torch.export.Dim("batch", max=64), time_axis: torch.export.Dim("time", min=8, max=4096)}
                torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=opset,
                                  input_names=["input"], output_names=["output"], dynamic_shapes=(dims,),
                                  external_data=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


@functools.lru_cache(maxsize=None)
def _audio_bytes(name: str, opset: int) -> bytes:
    module, example = build_audio_torch(name)
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "m.onnx"
        _export(module, example, AUDIO_MODELS[name][2], path, opset)
        return path.read_bytes()


def build_audio(name: str, tmp_dir, opset: int = 17) -> pathlib.Path:
    """Export ``name`` to ``tmp_dir/<name>_op<opset>.onnx`` (batch and time dynamic); cached per process."""
    path = pathlib.Path(tmp_dir) / f"{name}_op{opset}.onnx"
    path.write_bytes(_audio_bytes(name, opset))
    return path


def audio_samples(name: str, count: int, seed: int = 0, *, frames: tuple[int, int] = (50, 120)
                  ) -> list[dict[str, np.ndarray]]:
    """``count`` batch-1 samples for ``name`` whose time length is drawn from ``frames`` (inclusive):
    log-mel-like values (a per-band offset plus noise)."""
    _, shape, time_axis = AUDIO_MODELS[name]
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        sample_shape = list(shape)
        sample_shape[time_axis] = int(rng.integers(frames[0], frames[1] + 1))
        x = rng.standard_normal(sample_shape).astype(np.float32)
        samples.append({"input": x})
    return samples

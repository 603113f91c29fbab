"""Classic vision architectures not in :mod:`tests.models` / :mod:`tests.vision_models`, in miniature.

Each is a 3x32x32 -> 10-class classifier (the U-Net: per-pixel logits) written the way torchvision or
timm writes it, so its export holds the ops users bring:

* ``squeezenet``: fire modules (1x1 squeeze, Concat of 1x1 and 3x3 expands), ceil-mode MaxPool, a conv
  classifier averaged to logits.
* ``shufflenet``: ShuffleNetV2 units: ``chunk`` -> Split, channel shuffle as Reshape/Transpose/Reshape.
* ``densenet``: pre-activation BN-ReLU-Conv layers whose input is the Concat of all previous outputs
  (BN before the conv: it cannot fold into it), transition with AvgPool.
* ``inception``: GoogLeNet blocks: 1x1, 1x1->3x3, 1x1->5x5 and a MaxPool->1x1 branch, one Concat.
* ``resnext``: ResNeXt/RegNet bottlenecks with a grouped 3x3 conv (groups of 4 channels).
* ``convnext``: ConvNeXt blocks: 7x7 depthwise, LayerNorm over channels (permute to NHWC, ``nn.LayerNorm``,
  back; the downsample uses a channels_first LN written out as mean/var arithmetic), Linear-GELU-Linear,
  layer-scale gamma Mul.
* ``mobilevit``: conv stem and MobileNet blocks, then a transformer over unfolded 2x2 patches, fused back
  by a Concat with the local features.
* ``ghostnet``: Ghost modules (primary 1x1 conv, cheap depthwise conv, Concat, Slice to the out width).
* ``nhwc``: a Keras-style model taking NHWC input (a Transpose at the input) and writing NHWC features.
"""

from __future__ import annotations

import functools
import pathlib
import tempfile

import torch
from torch import nn
from torch.nn import functional as F

from tests.models import ConvBNAct, _randomize_normalization, export_onnx

__all__ = ["ZOO_MODELS", "build_zoo", "build_zoo_torch"]


class Fire(nn.Module):
    def __init__(self, cin, squeeze, expand):
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU())
        self.expand1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU())
        self.expand3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU())

    def forward(self, x):
        x = self.squeeze(x)
        return torch.cat([self.expand1(x), self.expand3(x)], 1)


class SqueezeNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(16, 8, 16), Fire(32, 8, 16), nn.MaxPool2d(3, 2, ceil_mode=True), Fire(32, 12, 24))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(48, classes, 1), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


def channel_shuffle(x, groups):
    batch, channels, height, width = x.shape
    x = x.view(batch, groups, channels // groups, height, width).transpose(1, 2).contiguous()
    return x.view(batch, channels, height, width)


class ShuffleUnit(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(ConvBNAct(cin, cin, 3, stride, groups=cin, act=None),
                                         ConvBNAct(cin, half, 1))
        branch_in = cin if stride > 1 else half
        self.branch2 = nn.Sequential(ConvBNAct(branch_in, half, 1), ConvBNAct(half, half, 3, stride, groups=half,
                                                                                 act=None), ConvBNAct(half, half, 1))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(ConvBNAct(3, 16, 3, 2), nn.MaxPool2d(3, 2, 1))
        self.stages = nn.Sequential(ShuffleUnit(16, 32, 2), ShuffleUnit(32, 32, 1), ShuffleUnit(32, 64, 2),
                                    ShuffleUnit(64, 64, 1))
        self.last = ConvBNAct(64, 96, 1)
        self.fc = nn.Linear(96, classes)

    def forward(self, x):
        x = self.last(self.stages(self.stem(x)))
        return self.fc(x.mean([2, 3]))


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(4 * growth), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        x = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(x)))


class DenseBlock(nn.Module):
    def __init__(self, cin, growth, layers):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth) for i in range(layers))

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    def __init__(self, classes=10, growth=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        self.block1 = DenseBlock(16, growth, 3)
        c1 = 16 + 3 * growth
        self.transition = nn.Sequential(nn.BatchNorm2d(c1), nn.ReLU(), nn.Conv2d(c1, c1 // 2, 1, bias=False),
                                        nn.AvgPool2d(2, 2))
        self.block2 = DenseBlock(c1 // 2, growth, 3)
        c2 = c1 // 2 + 3 * growth
        self.norm = nn.BatchNorm2d(c2)
        self.fc = nn.Linear(c2, classes)

    def forward(self, x):
        x = self.block2(self.transition(self.block1(self.stem(x))))
        x = F.adaptive_avg_pool2d(F.relu(self.norm(x)), 1)
        return self.fc(torch.flatten(x, 1))


class InceptionBlock(nn.Module):
    def __init__(self, cin, c1, c3r, c3, c5r, c5, pool):
        super().__init__()
        self.b1 = ConvBNAct(cin, c1, 1)
        self.b2 = nn.Sequential(ConvBNAct(cin, c3r, 1), ConvBNAct(c3r, c3, 3))
        self.b3 = nn.Sequential(ConvBNAct(cin, c5r, 1), ConvBNAct(c5r, c5, 5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), ConvBNAct(cin, pool, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class PooledClassifier(nn.Module):
    """``stem`` -> ``blocks`` -> global average pool -> a Linear from ``width`` features to the classes."""

    def __init__(self, stem: nn.Module, blocks: nn.Module, width: int, classes: int):
        super().__init__()
        self.stem, self.blocks, self.fc = stem, blocks, nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


class GoogLeNet(PooledClassifier):
    def __init__(self, classes=10):
        super().__init__(nn.Sequential(ConvBNAct(3, 16, 3, 2), nn.MaxPool2d(3, 2, ceil_mode=True)),
                         nn.Sequential(InceptionBlock(16, 8, 8, 16, 4, 8, 8), InceptionBlock(40, 16, 12, 24, 4, 8, 8),
                                       nn.MaxPool2d(3, 2, ceil_mode=True), InceptionBlock(56, 16, 12, 24, 4, 8, 8)),
                         56, classes)


class ResNeXtBlock(nn.Module):
    def __init__(self, cin, width, cout, stride, group_width=4):
        super().__init__()
        self.body = nn.Sequential(ConvBNAct(cin, width, 1),
                                  ConvBNAct(width, width, 3, stride, groups=width // group_width),
                                  ConvBNAct(width, cout, 1, act=None))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else ConvBNAct(cin, cout, 1, stride, act=None)

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class ResNeXt(PooledClassifier):
    def __init__(self, classes=10):
        super().__init__(ConvBNAct(3, 16, 3, 2), nn.Sequential(ResNeXtBlock(16, 16, 32, 1), ResNeXtBlock(32, 32, 64, 2),
                                                               ResNeXtBlock(64, 32, 64, 1)), 64, classes)


class LayerNorm2d(nn.Module):
    """timm/ConvNeXt's channels_first LayerNorm written out: (x - mean) / sqrt(var + eps) * w + b over dim 1."""

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels)), eps

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, classes=10, dims=(16, 32)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0]))
        self.stage1 = ConvNeXtBlock(dims[0])
        self.down = nn.Sequential(LayerNorm2d(dims[0]), nn.Conv2d(dims[0], dims[1], 2, 2))
        self.stage2 = ConvNeXtBlock(dims[1])
        self.norm = nn.LayerNorm(dims[1], eps=1e-6)
        self.head = nn.Linear(dims[1], classes)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(x.mean([-2, -1])))


class MobileViTBlock(nn.Module):
    """Local 3x3 + 1x1 convs, unfold 2x2 patches, transformer layer, fold, 1x1, Concat with input, 3x3 fuse."""

    def __init__(self, channels, dim, heads=2):
        super().__init__()
        self.local = nn.Sequential(ConvBNAct(channels, channels, 3, act="silu"),
                                   nn.Conv2d(channels, dim, 1, bias=False))
        self.norm1, self.attn = nn.LayerNorm(dim), nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))
        self.project = ConvBNAct(dim, channels, 1, act="silu")
        self.fuse = ConvBNAct(2 * channels, channels, 3, act="silu")

    def forward(self, x):
        y = self.local(x)
        batch, dim, height, width = y.shape
        patches = y.reshape(batch, dim, height // 2, 2, width // 2, 2).permute(0, 3, 5, 2, 4, 1)
        patches = patches.reshape(batch * 4, (height // 2) * (width // 2), dim)
        z = self.norm1(patches)
        patches = patches + self.attn(z, z, z, need_weights=False)[0]
        patches = patches + self.mlp(self.norm2(patches))
        y = patches.reshape(batch, 2, 2, height // 2, width // 2, dim).permute(0, 5, 3, 1, 4, 2)
        y = self.project(y.reshape(batch, dim, height, width))
        return self.fuse(torch.cat([x, y], 1))


class MobileViT(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = ConvBNAct(3, 16, 3, 2, act="silu")
        self.local = nn.Sequential(ConvBNAct(16, 16, 3, 1, groups=16, act="silu"), ConvBNAct(16, 24, 1, act=None),
                                   ConvBNAct(24, 24, 3, 2, act="silu"))
        self.vit = MobileViTBlock(24, 32)
        self.fc = nn.Linear(24, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.vit(self.local(self.stem(x))), 1), 1))


class GhostModule(nn.Module):
    def __init__(self, cin, cout, relu=True):
        super().__init__()
        self.cout = cout
        init = (cout + 1) // 2
        act = "relu" if relu else None
        self.primary = ConvBNAct(cin, init, 1, act=act)
        self.cheap = ConvBNAct(init, init, 3, groups=init, act=act)

    def forward(self, x):
        x1 = self.primary(x)
        return torch.cat([x1, self.cheap(x1)], 1)[:, :self.cout]


class GhostBottleneck(nn.Module):
    def __init__(self, cin, hidden, cout, stride):
        super().__init__()
        self.ghost1 = GhostModule(cin, hidden)
        self.dw = ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act=None) if stride > 1 else nn.Identity()
        self.ghost2 = GhostModule(hidden, cout, relu=False)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            ConvBNAct(cin, cin, 3, stride, groups=cin, act=None), ConvBNAct(cin, cout, 1, act=None))

    def forward(self, x):
        return self.ghost2(self.dw(self.ghost1(x))) + self.shortcut(x)


class GhostNet(PooledClassifier):
    def __init__(self, classes=10):
        super().__init__(ConvBNAct(3, 16, 3, 2), nn.Sequential(GhostBottleneck(16, 24, 15, 1),
                                                               GhostBottleneck(15, 36, 24, 2),
                                                               GhostBottleneck(24, 36, 24, 1)), 24, classes)


class KerasNHWC(nn.Module):
    """Input NHWC (as Keras feeds it): Transpose to NCHW, conv stack, pooled Dense logits."""

    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(ConvBNAct(3, 16, 3, 2, act="relu6"),
                                      ConvBNAct(16, 16, 3, groups=16, act="relu6"),
                                      ConvBNAct(16, 32, 1, act="relu6"),
                                      ConvBNAct(32, 32, 3, 2, groups=32, act="relu6"),
                                      ConvBNAct(32, 32, 1, act="relu6"))
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.features(x.permute(0, 3, 1, 2))
        return self.fc(x.mean([2, 3]))


class UNetCT(nn.Module):
    """Three-level U-Net: two ConvTranspose2d upsamples (per-channel weight axis 1) and skip Concats."""

    def __init__(self, classes=3):
        super().__init__()
        self.enc1, self.enc2 = ConvBNAct(3, 8, 3), ConvBNAct(8, 16, 3, 2)
        self.enc3 = ConvBNAct(16, 32, 3, 2)
        self.up2, self.dec2 = nn.ConvTranspose2d(32, 16, 2, 2), ConvBNAct(32, 16, 3)
        self.up1, self.dec1 = nn.ConvTranspose2d(16, 8, 2, 2), ConvBNAct(16, 8, 3)
        self.out = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        d2 = self.dec2(torch.cat([self.up2(self.enc3(e2)), e2], 1))
        return self.out(self.dec1(torch.cat([self.up1(d2), e1], 1)))


# name -> (builder, example input shape)
ZOO_MODELS = {
    "squeezenet": (SqueezeNet, (1, 3, 32, 32)),
    "shufflenet": (ShuffleNetV2, (1, 3, 32, 32)),
    "densenet": (DenseNet, (1, 3, 32, 32)),
    "inception": (GoogLeNet, (1, 3, 32, 32)),
    "resnext": (ResNeXt, (1, 3, 32, 32)),
    "convnext": (ConvNeXt, (1, 3, 32, 32)),
    "mobilevit": (MobileViT, (1, 3, 32, 32)),
    "ghostnet": (GhostNet, (1, 3, 32, 32)),
    "nhwc": (KerasNHWC, (1, 32, 32, 3)),
    "unet_ct": (UNetCT, (1, 3, 32, 32)),
}


def build_zoo_torch(name: str) -> nn.Module:
    """The seeded eval-mode module ``name`` with trained-looking norm statistics."""
    torch.manual_seed(0)
    module = ZOO_MODELS[name][0]()
    _randomize_normalization(module)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, LayerNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    return module.eval()


@functools.cache
def _zoo_bytes(name: str, opset: int, dynamic_batch: bool) -> bytes:
    module = build_zoo_torch(name)
    example = torch.randn(*ZOO_MODELS[name][1], generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(module, (example,), pathlib.Path(tmp) / "m.onnx", opset=opset, dynamic_batch=dynamic_batch)
        return path.read_bytes()


def build_zoo(name: str, tmp_dir, opset: int = 17, *, dynamic_batch: bool = False) -> pathlib.Path:
    """Export zoo model ``name`` (TorchScript exporter) to ``tmp_dir/<name>_op<opset>.onnx``, cached per process."""
    suffix = "_dyn" if dynamic_batch else ""
    path = pathlib.Path(tmp_dir) / f"{name}_op{opset}{suffix}.onnx"
    path.write_bytes(_zoo_bytes(name, opset, dynamic_batch))
    return path

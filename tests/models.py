"""Small real architectures that the test suite runs every feature on.

Two families:

* torch builders (``mobilenet_v3_like`` ... ``unet_decoder``): the building
  blocks of the networks people ship to edge devices -- depthwise-separable
  inverted residuals, squeeze-and-excitation, residual adds, explicit
  multi-head attention with LayerNorm and GELU, ConvTranspose and Resize with
  concat skips -- at a width that exports and runs in well under a second.
  ``build_onnx(name, tmp_dir, opset)`` seeds, randomizes the normalization
  statistics (so they look trained and BatchNorm folding is not a no-op),
  exports and returns the path.
* ``onnx.helper`` builders (no torch) for the odd graphs users bring: weights
  in ``Constant`` nodes, external data, symbolic input dims, initializers
  shadowed by graph inputs, and tf2onnx-style NHWC transposes.

Export uses torch's TorchScript exporter (``dynamo=False``): it writes the
requested opset exactly (11..20), while the torch.export-based exporter in
torch 2.13 builds opset 18 or later and cannot down-convert. Exports run in
training mode ``PRESERVE`` so an eval-mode model keeps its
``BatchNormalization`` nodes instead of having them folded into the Conv.
``build_dynamo``/``export_dynamo`` export the same modules with the dynamo
exporter (torch's default, ``dynamo=True``, needs onnxscript), whose graphs
users bring too: native LayerNormalization, ``node_*`` names, opset 18-21.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import pathlib
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.nn import functional as F

__all__ = [
    "TORCH_MODELS",
    "build_dynamo",
    "build_onnx",
    "build_torch",
    "constant_weights_model",
    "dynamic_input_model",
    "efficientnet_like",
    "export_dynamo",
    "export_onnx",
    "external_data_model",
    "mobilenet_v2_like",
    "mobilenet_v3_like",
    "ort_qdq_model",
    "depthwise_separable_spread",
    "resnet_like",
    "shadowed_initializer_model",
    "se_gated_convs",
    "tanh_gelu_mlp",
    "tanh_loop_body",
    "tf_style_model",
    "transformer_encoder",
    "unet_decoder",
]


# --------------------------------------------------------------------------
# torch building blocks
# --------------------------------------------------------------------------


def _activation(kind: str) -> nn.Module:
    return {
        "relu": nn.ReLU,
        "relu6": nn.ReLU6,
        "hardswish": nn.Hardswish,
        "silu": nn.SiLU,
    }[kind]()


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> activation (or none)."""

    def __init__(self, cin, cout, kernel=3, stride=1, groups=1, act="relu"):
        layers = [
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act is not None:
            layers.append(_activation(act))
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """Global pool -> 1x1 reduce -> act -> 1x1 expand -> gate -> scale input."""

    def __init__(self, channels, squeeze, act="relu", gate="hardsigmoid"):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.act = _activation(act)
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Hardsigmoid() if gate == "hardsigmoid" else nn.Sigmoid()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.expand(self.act(self.reduce(s))))


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 block and EfficientNet's MBConv.

    1x1 expand (skipped when expanded == cin) -> kxk depthwise -> optional
    SE -> 1x1 linear project; the input is added back when stride is 1 and
    the channel count is unchanged.
    """

    def __init__(self, cin, expanded, cout, *, kernel=3, stride=1, act="relu6", se=None):
        super().__init__()
        layers = []
        if expanded != cin:
            layers.append(ConvBNAct(cin, expanded, 1, act=act))
        layers.append(ConvBNAct(expanded, expanded, kernel, stride, groups=expanded, act=act))
        if se is not None:
            layers.append(se(expanded))
        layers.append(ConvBNAct(expanded, cout, 1, act=None))
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


class _Classifier(nn.Module):
    """features -> global average pool -> flatten -> head."""

    def __init__(self, features, head):
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x):
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class BasicBlock(nn.Module):
    """ResNet basic block: conv-bn-relu-conv-bn + shortcut, ReLU after the add."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = ConvBNAct(cin, cout, 3, stride, act="relu")
        self.conv2 = ConvBNAct(cout, cout, 3, act=None)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = ConvBNAct(cin, cout, 1, stride, act=None)

    def forward(self, x):
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class MultiHeadSelfAttention(nn.Module):
    """Scaled dot-product attention written out op by op."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x):  # (B, S, E) -> (B, H, S, D)
        return x.reshape(x.shape[0], -1, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x):
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        context = context.transpose(1, 2).reshape(x.shape[0], -1, self.heads * self.head_dim)
        return self.out(context)


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + MHSA(LN(x)); x + MLP(LN(x)) with GELU."""

    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), MultiHeadSelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerEncoder(nn.Module):
    def __init__(self, features=32, seq=16, dim=64, heads=4, depth=2, classes=10):
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.position = nn.Parameter(torch.randn(1, seq, dim) * 0.02)
        self.layers = nn.Sequential(*[EncoderLayer(dim, heads, 2 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.layers(self.embed(x) + self.position)
        return self.head(self.norm(x).mean(dim=1))


class UNet(nn.Module):
    """Two-level U-Net: one ConvTranspose upsample, one Resize upsample."""

    def __init__(self, cin=3, classes=2):
        super().__init__()
        self.enc1 = nn.Sequential(ConvBNAct(cin, 8), ConvBNAct(8, 8))
        self.enc2 = nn.Sequential(ConvBNAct(8, 16), ConvBNAct(16, 16))
        self.bottleneck = nn.Sequential(ConvBNAct(16, 32, stride=2), ConvBNAct(32, 32))
        self.up2 = nn.ConvTranspose2d(32, 16, kernel_size=2, stride=2)
        self.dec2 = ConvBNAct(32, 16)
        self.up1 = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec1 = ConvBNAct(16 + 8, 8)
        self.final = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)  # 32x32
        e2 = self.enc2(F.max_pool2d(e1, 2))  # 16x16
        b = self.bottleneck(e2)  # 8x8
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))  # 16x16
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))  # 32x32
        return self.final(d1)


# --------------------------------------------------------------------------
# torch builders
# --------------------------------------------------------------------------


def mobilenet_v3_like(num_classes: int = 10) -> nn.Module:
    """MobileNetV3-small in miniature: hardswish stem, SE with hardsigmoid gate."""
    se = _se_hardsigmoid
    features = nn.Sequential(
        ConvBNAct(3, 16, 3, 2, act="hardswish"),  # 16x16
        InvertedResidual(16, 16, 16, stride=2, act="relu", se=se),  # 8x8, no expand conv
        InvertedResidual(16, 48, 24, stride=2, act="relu6"),  # 4x4
        InvertedResidual(24, 72, 24, act="relu"),  # residual
        InvertedResidual(24, 96, 40, kernel=5, act="hardswish", se=se),
        InvertedResidual(40, 120, 40, kernel=5, act="hardswish", se=se),  # residual
        ConvBNAct(40, 96, 1, act="hardswish"),
    )
    head = nn.Sequential(nn.Linear(96, 128), nn.Hardswish(), nn.Linear(128, num_classes))
    return _Classifier(features, head)


def _se_hardsigmoid(channels: int) -> nn.Module:
    return SqueezeExcite(channels, _make_divisible(channels // 4), act="relu", gate="hardsigmoid")


def _se_sigmoid(channels: int) -> nn.Module:
    return SqueezeExcite(channels, max(4, channels // 8), act="silu", gate="sigmoid")


def _make_divisible(value: int, divisor: int = 8) -> int:
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


def mobilenet_v2_like(num_classes: int = 10) -> nn.Module:
    """MobileNetV2 in miniature: ReLU6 inverted residuals with linear bottlenecks."""
    features = nn.Sequential(
        ConvBNAct(3, 16, 3, 2, act="relu6"),  # 16x16
        InvertedResidual(16, 16, 8),  # t=1
        InvertedResidual(8, 48, 16, stride=2),  # 8x8
        InvertedResidual(16, 96, 16),  # residual
        InvertedResidual(16, 96, 24, stride=2),  # 4x4
        InvertedResidual(24, 144, 24),  # residual
        ConvBNAct(24, 64, 1, act="relu6"),
    )
    return _Classifier(features, nn.Linear(64, num_classes))


def efficientnet_like(num_classes: int = 10) -> nn.Module:
    """EfficientNet-B0 in miniature: SiLU MBConv blocks with sigmoid-gated SE."""
    features = nn.Sequential(
        ConvBNAct(3, 16, 3, 2, act="silu"),  # 16x16
        InvertedResidual(16, 16, 8, act="silu", se=_se_sigmoid),
        InvertedResidual(8, 48, 16, stride=2, act="silu", se=_se_sigmoid),  # 8x8
        InvertedResidual(16, 96, 16, kernel=5, act="silu", se=_se_sigmoid),  # residual
        InvertedResidual(16, 96, 24, kernel=5, stride=2, act="silu", se=_se_sigmoid),  # 4x4
        ConvBNAct(24, 64, 1, act="silu"),
    )
    return _Classifier(features, nn.Linear(64, num_classes))


def resnet_like(num_classes: int = 10) -> nn.Module:
    """ResNet-18 in miniature: conv+maxpool stem, basic blocks, 1x1 downsample shortcuts."""
    features = nn.Sequential(
        ConvBNAct(3, 16, 3, act="relu"),
        nn.MaxPool2d(3, stride=2, padding=1),  # 16x16
        BasicBlock(16, 16),
        BasicBlock(16, 16),
        BasicBlock(16, 32, stride=2),  # 8x8
        BasicBlock(32, 64, stride=2),  # 4x4
    )
    return _Classifier(features, nn.Linear(64, num_classes))


def transformer_encoder(num_classes: int = 10) -> nn.Module:
    """Two pre-norm encoder layers over a 16x32 feature sequence, mean-pooled."""
    return TransformerEncoder(features=32, seq=16, dim=64, heads=4, depth=2, classes=num_classes)


def unet_decoder(num_classes: int = 2) -> nn.Module:
    """Segmentation U-Net: 3x32x32 image -> per-pixel class logits."""
    return UNet(3, num_classes)


# name -> (builder, example input shape); every model has one input "input"
# and one output "output".
TORCH_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mobilenet_v3": (mobilenet_v3_like, (1, 3, 32, 32)),
    "mobilenet_v2": (mobilenet_v2_like, (1, 3, 32, 32)),
    "efficientnet": (efficientnet_like, (1, 3, 32, 32)),
    "resnet": (resnet_like, (1, 3, 32, 32)),
    "transformer": (transformer_encoder, (1, 16, 32)),
    "unet": (unet_decoder, (1, 3, 32, 32)),
}


def build_torch(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The seeded eval-mode module and a seeded example input for ``name``."""
    builder, shape = TORCH_MODELS[name]
    torch.manual_seed(0)
    module = builder()
    _randomize_normalization(module)
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    return module.eval(), example


def _randomize_normalization(module: nn.Module) -> None:
    """Give norms trained-looking affine params and running stats.

    Fresh BatchNorm/LayerNorm parameters are all ones and zeros: folding them
    is the identity, and the exporter would deduplicate them into Identity
    nodes. Draws come from the global RNG, which the caller seeded.
    """
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)


@functools.cache
def _onnx_bytes(name: str, opset: int, dynamic_batch: bool) -> bytes:
    module, example = build_torch(name)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(module, (example,), pathlib.Path(tmp) / "m.onnx",
                           opset=opset, dynamic_batch=dynamic_batch)
        return path.read_bytes()


def build_onnx(name: str, tmp_dir, opset: int = 17, *, dynamic_batch: bool = False) -> pathlib.Path:
    """Export the registered model ``name`` to ``tmp_dir/<name>_op<opset>.onnx``.

    Exports are cached per process; each call writes a fresh file so a test
    may modify its copy.
    """
    suffix = "_dyn" if dynamic_batch else ""
    path = pathlib.Path(tmp_dir) / f"{name}_op{opset}{suffix}.onnx"
    path.write_bytes(_onnx_bytes(name, opset, dynamic_batch))
    return path


# --------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------


def export_onnx(
    module: nn.Module,
    example_inputs,
    path,
    *,
    opset: int = 17,
    dynamic_batch: bool = False,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> pathlib.Path:
    """Export ``module`` in eval mode with weights as initializers.

    Defaults name a single input ``input`` and a single output ``output``
    (``input_0``.., ``output_0``.. when there are several). With
    ``dynamic_batch`` dim 0 of every input and output is the symbol ``N``;
    ``dynamic_axes`` (torch's ``{name: {dim: symbol}}``) names others.
    The module's train/eval flag is restored afterwards.
    """
    path = pathlib.Path(path)
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    input_names = list(input_names or _default_names("input", len(example_inputs)))
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            outputs = module(*example_inputs)
        count = len(outputs) if isinstance(outputs, (tuple, list)) else 1
        output_names = list(output_names or _default_names("output", count))
        if dynamic_batch:
            dynamic_axes = {name: {0: "N"} for name in [*input_names, *output_names]}
        with warnings.catch_warnings():
            # Deprecation of the TorchScript exporter, and its advice against
            # constant folding with TrainingMode.PRESERVE (harmless in eval).
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, example_inputs, str(path), dynamo=False, opset_version=opset,
                input_names=input_names, output_names=output_names,
                dynamic_axes=dynamic_axes, do_constant_folding=True,
                training=torch.onnx.TrainingMode.PRESERVE,
            )
    finally:
        module.train(was_training)
    model = onnx.load(str(path))
    _materialize_identity_initializers(model.graph)
    onnx.save(model, str(path))
    return path


def export_dynamo(module: nn.Module, example_inputs, path, *, opset: int = 18, optimize: bool = True,
                  dynamic_batch: bool = False) -> pathlib.Path:
    """Export ``module`` in eval mode with torch's dynamo exporter, weights inside the file.

    One input ``input`` (``input_0``.. for several), one output ``output``; ``optimize=False``
    keeps the graph as torchlib translates it (BatchNormalization unfolded, zero biases computed
    by CastLike/Expand). With ``dynamic_batch`` dim 0 of every input is dynamic.
    """
    path = pathlib.Path(path)
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    input_names = _default_names("input", len(example_inputs))
    dynamic_shapes = tuple({0: torch.export.Dim("batch")} for _ in example_inputs) if dynamic_batch else None
    was_training = module.training
    module.eval()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, example_inputs, str(path), dynamo=True, opset_version=opset,
                              input_names=input_names, output_names=["output"], optimize=optimize,
                              dynamic_shapes=dynamic_shapes, external_data=False)
    finally:
        module.train(was_training)
    return path


@functools.cache
def _dynamo_bytes(name: str, opset: int, optimize: bool) -> bytes:
    module, example = build_torch(name)
    with tempfile.TemporaryDirectory() as tmp:
        return export_dynamo(module, (example,), pathlib.Path(tmp) / "m.onnx", opset=opset,
                             optimize=optimize).read_bytes()


def build_dynamo(name: str, tmp_dir, opset: int = 18, *, optimize: bool = True) -> pathlib.Path:
    """``build_onnx`` with the dynamo exporter: ``tmp_dir/<name>_dynamo<opset>.onnx`` (a few seconds,
    cached per process)."""
    suffix = "" if optimize else "_unoptimized"
    path = pathlib.Path(tmp_dir) / f"{name}_dynamo{opset}{suffix}.onnx"
    path.write_bytes(_dynamo_bytes(name, opset, optimize))
    return path


def _default_names(prefix: str, count: int) -> list[str]:
    return [prefix] if count == 1 else [f"{prefix}_{i}" for i in range(count)]


def _materialize_identity_initializers(graph: onnx.GraphProto) -> None:
    """Replace ``y = Identity(initializer)`` by an initializer ``y``.

    The TorchScript exporter deduplicates equal parameters and re-creates the
    duplicates through Identity nodes; real weights should be initializers.
    """
    initializers = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    keep = []
    for node in graph.node:
        source = node.input[0] if node.op_type == "Identity" else None
        if source in initializers and node.output[0] not in outputs:
            copy = onnx.TensorProto()
            copy.CopyFrom(initializers[source])
            copy.name = node.output[0]
            graph.initializer.append(copy)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


# --------------------------------------------------------------------------
# onnx.helper builders: the odd graphs users bring
# --------------------------------------------------------------------------


def _weights(seed: int, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) * 0.2).astype(np.float32) for s in shapes]


def tanh_loop_body(weight: np.ndarray) -> onnx.GraphProto:
    """A Loop body holding its own weight ``wl`` (a merged decoder's layers sit in such subgraphs):
    state <- tanh(state @ wl), for a [2, width] state; the loop condition is passed on."""
    value = helper.make_tensor_value_info
    width = weight.shape[1]
    return helper.make_graph([helper.make_node("MatMul", ["state", "wl"], ["mm"], name="body_mm"),
                              helper.make_node("Tanh", ["mm"], ["state_out"]),
                              helper.make_node("Identity", ["cond"], ["cond_out"])],
                             "body", [value("i", TensorProto.INT64, []), value("cond", TensorProto.BOOL, []),
                                      value("state", TensorProto.FLOAT, [2, width])],
                             [value("cond_out", TensorProto.BOOL, []),
                              value("state_out", TensorProto.FLOAT, [2, width])],
                             initializer=[numpy_helper.from_array(weight, "wl")])


def _finish(graph: onnx.GraphProto, opset: int) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="edgeopt-tests",
                              ir_version=helper.find_min_ir_version_for(opsets))
    onnx.checker.check_model(model)
    return model


def _conv_gemm_nodes(weight_names: Sequence[str]) -> list[onnx.NodeProto]:
    """input[1,3,8,8] -> Conv 3x3/2 (4ch) -> Relu -> Flatten -> Gemm -> output[1,10]."""
    conv_w, conv_b, fc_w, fc_b = weight_names
    return [
        helper.make_node("Conv", ["input", conv_w, conv_b], ["conv"], name="conv",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("Flatten", ["relu"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", fc_w, fc_b], ["output"], name="fc", transB=1),
    ]


_CONV_GEMM_SHAPES = ((4, 3, 3, 3), (4,), (10, 64), (10,))
_CONV_GEMM_IO = (
    [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
    [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 10])],
)


def constant_weights_model(path) -> pathlib.Path:
    """Conv -> Relu -> Flatten -> Gemm with every weight in a ``Constant`` node.

    input ``input`` [1,3,8,8] -> output ``output`` [1,10]; opset 17.
    """
    names = ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]
    constants = [
        helper.make_node("Constant", [], [name], name=f"{name}_const",
                         value=numpy_helper.from_array(array, name))
        for name, array in zip(names, _weights(0, *_CONV_GEMM_SHAPES))
    ]
    graph = helper.make_graph(constants + _conv_gemm_nodes(names), "constant_weights",
                              *_CONV_GEMM_IO)
    return _save(_finish(graph, 17), path)


def external_data_model(path) -> pathlib.Path:
    """Conv -> Relu -> Flatten -> Gemm whose weights live in ``<file>.data``.

    input ``input`` [1,3,8,8] -> output ``output`` [1,10]; opset 17. Every
    initializer is external (size_threshold=0), all in one file next to the
    model.
    """
    path = pathlib.Path(path)
    names = ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]
    initializers = [numpy_helper.from_array(a, n)
                    for n, a in zip(names, _weights(1, *_CONV_GEMM_SHAPES))]
    graph = helper.make_graph(_conv_gemm_nodes(names), "external_data", *_CONV_GEMM_IO,
                              initializer=initializers)
    onnx.save(_finish(graph, 17), str(path), save_as_external_data=True,
              all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=0)
    return path


def dynamic_input_model(path) -> pathlib.Path:
    """Conv 3x3 -> Relu -> Conv 1x1 on input ``input`` ['N', 3, 'H', 'W'].

    output ``output`` ['N', 4, 'H', 'W']; opset 17.
    """
    w1, b1, w2, b2 = _weights(2, (8, 3, 3, 3), (8,), (4, 8, 1, 1), (4,))
    initializers = [numpy_helper.from_array(a, n) for n, a in
                    [("conv1.weight", w1), ("conv1.bias", b1), ("conv2.weight", w2), ("conv2.bias", b2)]]
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["c1"], name="conv1",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["output"], name="conv2",
                         kernel_shape=[1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "dynamic_input",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4, "H", "W"])],
        initializer=initializers)
    return _save(_finish(graph, 17), path)


def shadowed_initializer_model(path) -> pathlib.Path:
    """Conv -> Relu where the conv weight and bias are also graph inputs.

    Old exporters (``keep_initializers_as_inputs``) list every initializer as
    a graph input, which makes it overridable at run time, so not a constant.
    There is also an initializer ``unused_table`` [16,16] that no node reads.
    input ``input`` [1,3,8,8] (+ ``conv.weight`` [8,3,3,3], ``conv.bias`` [8])
    -> output ``output`` [1,8,8,8]; opset 11.
    """
    weight, bias, table = _weights(3, (8, 3, 3, 3), (8,), (16, 16))
    initializers = [numpy_helper.from_array(weight, "conv.weight"),
                    numpy_helper.from_array(bias, "conv.bias"),
                    numpy_helper.from_array(table, "unused_table")]
    inputs = [
        helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8]),
        helper.make_tensor_value_info("conv.weight", TensorProto.FLOAT, [8, 3, 3, 3]),
        helper.make_tensor_value_info("conv.bias", TensorProto.FLOAT, [8]),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["conv"], name="conv",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["output"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes, "shadowed_initializer", inputs,
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 8, 8, 8])],
        initializer=initializers)
    return _save(_finish(graph, 11), path)


def tf_style_model(path) -> pathlib.Path:
    """NHWC in and out around an NCHW Conv -> Relu, as tf2onnx writes it.

    input ``input_1`` [1,16,16,3] -> Transpose(0,3,1,2) -> Conv 3x3 (8ch)
    -> Relu -> Transpose(0,2,3,1) -> output ``Identity`` [1,16,16,8]; opset 13.
    """
    weight, bias = _weights(4, (8, 3, 3, 3), (8,))
    prefix = "StatefulPartitionedCall/model/conv2d"
    initializers = [numpy_helper.from_array(weight, f"{prefix}/Conv2D/ReadVariableOp:0"),
                    numpy_helper.from_array(bias, f"{prefix}/BiasAdd/ReadVariableOp:0")]
    nodes = [
        helper.make_node("Transpose", ["input_1"], [f"{prefix}/Conv2D__6:0"],
                         name=f"{prefix}/Conv2D__6", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", [f"{prefix}/Conv2D__6:0", initializers[0].name, initializers[1].name],
                         [f"{prefix}/BiasAdd:0"], name=f"{prefix}/BiasAdd",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1]),
        helper.make_node("Relu", [f"{prefix}/BiasAdd:0"], [f"{prefix}/Relu:0"], name=f"{prefix}/Relu"),
        helper.make_node("Transpose", [f"{prefix}/Relu:0"], ["Identity"],
                         name=f"{prefix}/Relu__8", perm=[0, 2, 3, 1]),
    ]
    graph = helper.make_graph(
        nodes, "tf2onnx",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, [1, 16, 16, 3])],
        [helper.make_tensor_value_info("Identity", TensorProto.FLOAT, [1, 16, 16, 8])],
        initializer=initializers)
    model = _finish(graph, 13)
    model.producer_name, model.producer_version = "tf2onnx", "1.16.1"
    return _save(model, path)


def _save(model: onnx.ModelProto, path) -> pathlib.Path:
    path = pathlib.Path(path)
    onnx.save(model, str(path))
    return path


# --------------------------------------------------------------------------
# other tools' output, for tests that read models edgeopt did not write
# --------------------------------------------------------------------------


def ort_qdq_model(float_path, quant_path, samples) -> pathlib.Path:
    """ONNX Runtime's static QDQ quantizer on ``samples`` ({input: array} dicts): per-channel int8
    weights, uint8 activations."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._samples = iter(samples)

        def get_next(self):
            return next(self._samples, None)

    quantize_static(str(float_path), str(quant_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return pathlib.Path(quant_path)


def depthwise_separable_spread() -> nn.Module:
    """A depthwise-separable CNN whose BatchNorm gammas spread over 2.5 decades (input 1x3x16x16).

    After BN folding its per-channel weight ranges differ by the same factor: the case
    cross-layer equalization and bias correction exist for. Seeded with torch.manual_seed(0).
    """
    def conv_bn_relu(cin: int, cout: int, kernel: int, groups: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU()]

    torch.manual_seed(0)
    module = nn.Sequential(
        *conv_bn_relu(3, 16, 3, 1), *conv_bn_relu(16, 16, 3, 16), *conv_bn_relu(16, 32, 1, 1),
        *conv_bn_relu(32, 32, 3, 32), *conv_bn_relu(32, 24, 1, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))
    with torch.no_grad():
        for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.copy_(10 ** torch.empty(bn.num_features).uniform_(-1.5, 1.0))
            bn.bias.normal_(0, 0.3)
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return module.eval()


def tanh_gelu_mlp(dim: int = 16, hidden: int = 64) -> nn.Module:
    """A transformer's MLP block, Linear -> GELU(approximate='tanh') -> Linear, input [..., dim].

    Below opset 20 torch writes the GELU out: ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x * (x * x))))``.
    Seeded with torch.manual_seed(0).
    """
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)).eval()


class _GeluNew(nn.Module):
    """Hugging Face's gelu_new, the cube as ``torch.pow(x, 3)``."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def gelu_new_mlp(dim: int = 16, hidden: int = 64) -> nn.Module:
    """Linear -> Hugging Face's gelu_new -> Linear, input [..., dim]: below opset 20 the tanh-GELU with its cube
    exported as ``Pow(x, 3)``. Seeded with torch.manual_seed(0)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(dim, hidden), _GeluNew(), nn.Linear(hidden, dim)).eval()


def se_gated_convs() -> nn.Module:
    """Conv -> ReLU -> a squeeze-and-excitation block gated by nn.Hardsigmoid -> 1x1 Conv, input [1, 3, H, W].

    From opset 14 torch writes the gate as one HardSigmoid(alpha=1/6, beta=0.5) after the expanding 1x1 Conv.
    Seeded with torch.manual_seed(0).
    """
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), SqueezeExcite(16, 8), nn.Conv2d(16, 8, 1)).eval()

"""Small detection, segmentation and super-resolution models, and graphs as non-PyTorch exporters write them.

torch builders (exported with :func:`tests.models.export_onnx` / :func:`tests.models.export_dynamo`):

* ``yolo``: Conv+BN+SiLU, C2f blocks (``chunk`` -> Split, Concat), SPPF (three chained MaxPool k5 s1 p2
  + Concat), an FPN with nearest upsampling (``nn.Upsample`` and ``F.interpolate(scale_factor=2)``),
  three heads whose boxes are decoded in the graph: a grid built from the feature map's Shape by
  Range arithmetic, ``sigmoid`` centres and ``exp`` sizes times the stride (pixels), sigmoid scores
  ([0, 1]) and one Concat of all levels. Input [N, 3, H, W] with dynamic H, W (multiples of 32).
* ``deeplab``: dilated convs, ASPP with a global-average-pooling branch resized (bilinear) back to the
  feature map's dynamic size, ``F.interpolate`` to the input size (align_corners False, then True).
* ``super_resolution``: PReLU, LeakyReLU, InstanceNorm and GroupNorm, a ConvTranspose2d and a
  PixelShuffle (DepthToSpace), x4 in all.
* ``coordconv``: coordinates in [-1, 1] computed from the feature map's run-time size, concatenated as
  channels (CoordConv, SOLO): positions that, unlike a detector's, do not grow with the image.

``onnx.helper`` builders write what tf2onnx/keras2onnx and old exporters write; see
:func:`tf_detector_graph`.
"""

from __future__ import annotations

import functools
import pathlib
import tempfile

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.nn import functional as F

from tests.models import ConvBNAct, _randomize_normalization, export_dynamo, export_onnx

__all__ = ["VISION_MODELS", "build_vision", "build_vision_torch", "tf_detector_graph", "vision_inputs"]


# --------------------------------------------------------------------------
# YOLO-style detector
# --------------------------------------------------------------------------


class C2f(nn.Module):
    """YOLOv8's C2f: 1x1 conv, chunk in two, n bottlenecks on the second half, concat all, 1x1 conv."""

    def __init__(self, cin, cout, blocks=1):
        super().__init__()
        self.hidden = cout // 2
        self.cv1 = ConvBNAct(cin, 2 * self.hidden, 1, act="silu")
        self.blocks = nn.ModuleList(
            nn.Sequential(ConvBNAct(self.hidden, self.hidden, 3, act="silu"),
                          ConvBNAct(self.hidden, self.hidden, 3, act="silu")) for _ in range(blocks))
        self.cv2 = ConvBNAct((2 + blocks) * self.hidden, cout, 1, act="silu")

    def forward(self, x):
        parts = list(self.cv1(x).chunk(2, 1))
        for block in self.blocks:
            parts.append(parts[-1] + block(parts[-1]))
        return self.cv2(torch.cat(parts, 1))


class SPPF(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.cv1 = ConvBNAct(cin, cin // 2, 1, act="silu")
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.cv2 = ConvBNAct(cin * 2, cout, 1, act="silu")

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat([x, y1, y2, self.pool(y2)], 1))


class DetectHead(nn.Module):
    """Per level: conv -> 1x1 to (4 + 1 + classes); decode boxes in pixels, sigmoid scores."""

    def __init__(self, channels, classes, strides):
        super().__init__()
        self.outputs = 5 + classes
        self.strides = strides
        self.convs = nn.ModuleList(
            nn.Sequential(ConvBNAct(c, c, 3, act="silu"), nn.Conv2d(c, self.outputs, 1)) for c in channels)

    def _decode(self, p, stride):
        batch, _, height, width = p.shape
        p = p.reshape(batch, self.outputs, height * width)
        ys = torch.arange(height, dtype=torch.float32)
        xs = torch.arange(width, dtype=torch.float32)
        grid_y = ys.reshape(height, 1).expand(height, width).reshape(1, 1, height * width)
        grid_x = xs.reshape(1, width).expand(height, width).reshape(1, 1, height * width)
        grid = torch.cat([grid_x, grid_y], 1)
        xy = (p[:, :2].sigmoid() * 2.0 - 0.5 + grid) * stride
        wh = torch.exp(p[:, 2:4].clamp(max=4.0)) * stride
        return torch.cat([xy, wh, p[:, 4:].sigmoid()], 1)

    def forward(self, features):
        return torch.cat([self._decode(conv(x), s) for conv, x, s in zip(self.convs, features, self.strides)], 2)


class TinyYolo(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Sequential(ConvBNAct(3, 8, 3, 2, act="silu"), ConvBNAct(8, 16, 3, 2, act="silu"))  # /4
        self.stage3 = nn.Sequential(ConvBNAct(16, 16, 3, 2, act="silu"), C2f(16, 16))  # /8
        self.stage4 = nn.Sequential(ConvBNAct(16, 32, 3, 2, act="silu"), C2f(32, 32))  # /16
        self.stage5 = nn.Sequential(ConvBNAct(32, 32, 3, 2, act="silu"), C2f(32, 32), SPPF(32, 32))  # /32
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.top_down4 = C2f(64, 32)
        self.top_down3 = C2f(48, 16)
        self.down3 = ConvBNAct(16, 16, 3, 2, act="silu")
        self.bottom_up4 = C2f(48, 32)
        self.down4 = ConvBNAct(32, 32, 3, 2, act="silu")
        self.bottom_up5 = C2f(64, 32)
        self.head = DetectHead((16, 32, 32), classes, (8.0, 16.0, 32.0))

    def forward(self, x):
        p3 = self.stage3(self.stem(x))
        p4 = self.stage4(p3)
        p5 = self.stage5(p4)
        n4 = self.top_down4(torch.cat([self.up(p5), p4], 1))
        n3 = self.top_down3(torch.cat([F.interpolate(n4, scale_factor=2.0, mode="nearest"), p3], 1))
        n4 = self.bottom_up4(torch.cat([self.down3(n3), n4], 1))
        n5 = self.bottom_up5(torch.cat([self.down4(n4), p5], 1))
        return self.head([n3, n4, n5])


# --------------------------------------------------------------------------
# DeepLab-style segmenter and a super-resolution net
# --------------------------------------------------------------------------


class ASPP(nn.Module):
    def __init__(self, cin, cout, rates=(2, 4)):
        super().__init__()
        self.branches = nn.ModuleList([ConvBNAct(cin, cout, 1)] + [
            nn.Sequential(nn.Conv2d(cin, cout, 3, padding=r, dilation=r, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
            for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                                  nn.ReLU())
        self.project = ConvBNAct(cout * (len(rates) + 2), cout, 1)

    def forward(self, x):
        pooled = F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], 1))


class TinyDeepLab(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.low = nn.Sequential(ConvBNAct(3, 16, 3, 2), ConvBNAct(16, 16, 3))  # /2
        self.high = nn.Sequential(ConvBNAct(16, 32, 3, 2),  # /4
                                  nn.Conv2d(32, 32, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(32),
                                  nn.ReLU())
        self.aspp = ASPP(32, 16)
        self.reduce = ConvBNAct(16, 8, 1)
        self.decode = ConvBNAct(24, 16, 3)
        self.classify = nn.Conv2d(16, classes, 1)

    def forward(self, x):
        low = self.low(x)
        high = self.aspp(self.high(low))
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=True)
        y = self.classify(self.decode(torch.cat([high, self.reduce(low)], 1)))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class TinySuperResolution(nn.Module):
    def __init__(self, channels=16):
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(3, channels, 5, padding=2), nn.PReLU(channels))
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.InstanceNorm2d(channels, affine=True),
                                  nn.LeakyReLU(0.1), nn.Conv2d(channels, channels, 3, padding=1),
                                  nn.GroupNorm(4, channels), nn.PReLU())
        self.up1 = nn.Sequential(nn.ConvTranspose2d(channels, channels, 4, 2, 1), nn.LeakyReLU(0.2))
        self.up2 = nn.Sequential(nn.Conv2d(channels, 3 * 4, 3, padding=1), nn.PixelShuffle(2))

    def forward(self, x):
        features = self.head(x)
        return self.up2(self.up1(features + self.body(features)))


class CoordConv(nn.Module):
    """Conv -> ReLU, concatenated with two channels of coordinates normalized to [-1, 1] by the feature map's
    run-time size (``arange(w) / (w - 1) * 2 - 1``) -> Conv: positions that do not grow with the image."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(10, 4, 3, padding=1)

    def forward(self, x):
        f = self.features(x)
        batch, _, height, width = f.shape
        xs = torch.arange(width, dtype=torch.float32) / (width - 1) * 2.0 - 1.0
        ys = torch.arange(height, dtype=torch.float32) / (height - 1) * 2.0 - 1.0
        grid_x = xs.reshape(1, 1, 1, width).expand(batch, 1, height, width)
        grid_y = ys.reshape(1, 1, height, 1).expand(batch, 1, height, width)
        return self.head(torch.cat([f, grid_x, grid_y], 1))


# name -> (builder, example input shape, dims of the input that are dynamic)
VISION_MODELS = {
    "yolo": (lambda: TinyYolo(3), (1, 3, 64, 64), {0: "N", 2: "H", 3: "W"}),
    "deeplab": (lambda: TinyDeepLab(4), (1, 3, 32, 32), {0: "N", 2: "H", 3: "W"}),
    "super_resolution": (TinySuperResolution, (1, 3, 16, 16), {0: "N", 2: "H", 3: "W"}),
    "coordconv": (CoordConv, (1, 3, 16, 16), {0: "N", 2: "H", 3: "W"}),
}


def build_vision_torch(name: str) -> nn.Module:
    torch.manual_seed(0)
    module = VISION_MODELS[name][0]()
    _randomize_normalization(module)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.GroupNorm, nn.InstanceNorm2d)) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
            if isinstance(m, nn.PReLU):
                m.weight.uniform_(0.05, 0.4)
    return module.eval()


@functools.cache
def _vision_bytes(name: str, opset: int) -> bytes:
    module = build_vision_torch(name)
    _, shape, dims = VISION_MODELS[name]
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "m.onnx"
        if opset >= 18:
            export_dynamo_dynamic(module, example, path, opset, dims)
        else:
            export_onnx(module, (example,), path, opset=opset, dynamic_axes={"input": dims})
        return path.read_bytes()


def export_dynamo_dynamic(module, example, path, opset, dims):
    shapes = ({axis: torch.export.Dim(f"d{axis}", min=1 if axis == 0 else 8, max=1024 if axis else 64)
               for axis in dims},)
    import contextlib
    import io
    import warnings
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=opset, input_names=["input"],
                          output_names=["output"], dynamic_shapes=shapes, external_data=False)
    return path


def build_vision(name: str, tmp_dir, opset: int = 17) -> pathlib.Path:
    """``tmp_dir/<name>_op<opset>.onnx``: TorchScript below opset 18, dynamo at 18+."""
    if name in HELPER_MODELS:
        path = pathlib.Path(tmp_dir) / f"{name}_op{opset}.onnx"
        onnx.save(HELPER_MODELS[name](opset), str(path))
        return path
    path = pathlib.Path(tmp_dir) / f"{name}_op{opset}.onnx"
    path.write_bytes(_vision_bytes(name, opset))
    return path


def vision_inputs(name: str, count: int, seed: int, size: tuple[int, int] | None = None) -> list[dict]:
    """``count`` random-normal samples for ``name`` (at ``size`` (H, W) where its H, W are dynamic)."""
    rng = np.random.default_rng(seed)
    if name in HELPER_MODELS:
        shape = HELPER_SHAPES[name]
    else:
        shape = VISION_MODELS[name][1]
        if size is not None:
            shape = (*shape[:2], *size)
    return [{"input": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


# --------------------------------------------------------------------------
# onnx.helper graphs, as tf2onnx / keras2onnx / old exporters write them
# --------------------------------------------------------------------------


def _init(rng, name, *shape, scale=None):
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    scale = scale if scale is not None else 1.0 / np.sqrt(fan_in)
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _const(name, array):
    return helper.make_node("Constant", [], [name], name="", value=numpy_helper.from_array(np.asarray(array), name))


def _clip(opset, x, y, low, high, name):
    if opset < 11:
        return [helper.make_node("Clip", [x], [y], name=name, min=low, max=high)]
    return [_const(f"{y}_min", np.float32(low)), _const(f"{y}_max", np.float32(high)),
            helper.make_node("Clip", [x, f"{y}_min", f"{y}_max"], [y], name=name)]


def _axes_node(op, opset, x, y, axes, name, **attrs):
    """Squeeze/Unsqueeze/ReduceMean with axes as an attribute (older opsets) or an input."""
    axes_input_from = {"Squeeze": 13, "Unsqueeze": 13, "ReduceMean": 18}[op]
    if opset < axes_input_from:
        return [helper.make_node(op, [x], [y], name=name, axes=axes, **attrs)]
    return [_const(f"{y}_axes", np.array(axes, np.int64)), helper.make_node(op, [x, f"{y}_axes"], [y], name=name,
                                                                             **attrs)]


def tf_detector_graph(opset: int) -> onnx.ModelProto:
    """A tf2onnx-like detector/segmenter: NHWC input [1, 32, 32, 3] -> Transpose -> explicit Pad -> Conv
    -> Clip(0, 6) -> Conv -> Add -> BatchNormalization (after the Add) -> Relu -> Resize x2 (scales) ->
    Conv -> Resize back to a size -> Transpose to NHWC ("seg"); and a classifier branch: ReduceMean
    (keepdims) -> Squeeze -> MatMul + Add -> Reshape to [1, 2, 5] with a shape computed by
    Shape/Gather/Concat -> Softmax on the 3-D tensor (axis -1 from opset 13; opset 11's default
    axis 1 coerces to 2-D) ("scores"). Weights are Constant nodes and initializers, some
    initializers are graph inputs too, some node names are empty (ONNX Runtime refuses repeated non-empty names).
    """
    rng = np.random.default_rng(opset)
    inits = [_init(rng, "c1_w", 16, 3, 3, 3), _init(rng, "c1_b", 16, scale=0.1), _init(rng, "c2_w", 16, 16, 3, 3),
             _init(rng, "c2_b", 16, scale=0.1), _init(rng, "c3_w", 8, 16, 1, 1), _init(rng, "c3_b", 8, scale=0.1),
             _init(rng, "fc_b", 10, scale=0.1)]
    bn = [numpy_helper.from_array(rng.uniform(0.5, 1.5, 16).astype(np.float32), "bn_scale"),
          numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "bn_bias"),
          numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "bn_mean"),
          numpy_helper.from_array(rng.uniform(0.5, 1.5, 16).astype(np.float32), "bn_var")]
    fc_w = (rng.standard_normal((16, 10)) / 4).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["input"], ["nchw"], name="transpose_in", perm=[0, 3, 1, 2]),
        _const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
        helper.make_node("Pad", ["nchw", "pads"], ["padded"], name="pad", mode="constant"),
        helper.make_node("Conv", ["padded", "c1_w", "c1_b"], ["c1"], name="conv", kernel_shape=[3, 3],
                         strides=[2, 2]),
        *_clip(opset, "c1", "r1", 0.0, 6.0, ""),
        helper.make_node("Conv", ["r1", "c2_w", "c2_b"], ["c2"], name="", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["sum"], name=""),
        helper.make_node("BatchNormalization", ["sum", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn"],
                         name="bn", epsilon=1e-3),
        helper.make_node("Relu", ["bn"], ["features"], name=""),
        _const("roi", np.array([], np.float32)),
        _const("scales", np.array([1, 1, 2, 2], np.float32)),
        helper.make_node("Resize", ["features", "roi", "scales"], ["up"], name="resize_up", mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        helper.make_node("Conv", ["up", "c3_w", "c3_b"], ["logits"], name="head", kernel_shape=[1, 1]),
        _const("sizes", np.array([1, 8, 32, 32], np.int64)),
        _const("no_scales", np.array([], np.float32)),
        helper.make_node("Resize", ["logits", "roi", "no_scales" if opset < 13 else "", "sizes"], ["seg_nchw"],
                         name="resize_out", mode="linear", coordinate_transformation_mode="half_pixel"),
        helper.make_node("Transpose", ["seg_nchw"], ["seg"], name="transpose_out", perm=[0, 2, 3, 1]),
        *_axes_node("ReduceMean", opset, "features", "pooled", [2, 3], "mean", keepdims=1),
        *_axes_node("Squeeze", opset, "pooled", "flat", [2, 3], "squeeze"),
        _const("fc_w", fc_w),
        helper.make_node("MatMul", ["flat", "fc_w"], ["fc_mm"], name="fc"),
        helper.make_node("Add", ["fc_mm", "fc_b"], ["fc"], name="fc_bias"),
        helper.make_node("Shape", ["fc"], ["fc_shape"], name="shape"),
        _const("zero", np.array([0], np.int64)),
        helper.make_node("Gather", ["fc_shape", "zero"], ["batch"], name="gather", axis=0),
        _const("rest", np.array([2, 5], np.int64)),
        helper.make_node("Concat", ["batch", "rest"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["fc", "target"], ["grouped"], name="reshape"),
        helper.make_node("Softmax", ["grouped"], ["scores"], name="softmax", **({} if opset < 13 else {"axis": -1})),
    ]
    graph_inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 32, 32, 3]),
                    helper.make_tensor_value_info("c3_w", TensorProto.FLOAT, [8, 16, 1, 1]),
                    helper.make_tensor_value_info("c3_b", TensorProto.FLOAT, [8])]
    graph = helper.make_graph(
        nodes, "tf_detector", graph_inputs,
        [helper.make_tensor_value_info("seg", TensorProto.FLOAT, [1, 32, 32, 8]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 2, 5])],
        initializer=inits + bn)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset < 15 else 8 if opset < 19 else 10
    model.producer_name, model.producer_version = "tf2onnx", "1.9.3"
    onnx.checker.check_model(model)
    return model


def upsample9_graph(opset: int = 9) -> onnx.ModelProto:
    """An opset-9 graph: Conv -> Clip(min/max attributes) -> Upsample(scales input) -> Conv, NCHW [1,3,16,16]."""
    rng = np.random.default_rng(9)
    inits = [_init(rng, "w1", 8, 3, 3, 3), _init(rng, "b1", 8, scale=0.1), _init(rng, "w2", 4, 8, 3, 3),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "up_scales")]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c1"], ["r1"], name="clip", min=0.0, max=6.0),
             helper.make_node("Upsample", ["r1", "up_scales"], ["up"], name="up", mode="nearest"),
             helper.make_node("Conv", ["up", "w2"], ["output"], name="conv2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "upsample9", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                    [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 32, 32])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 4
    onnx.checker.check_model(model)
    return model


HELPER_MODELS = {"tf_detector": tf_detector_graph, "upsample9": lambda opset: upsample9_graph()}
HELPER_SHAPES = {"tf_detector": (1, 32, 32, 3), "upsample9": (1, 3, 16, 16)}

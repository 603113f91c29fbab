"""Small float ONNX models and their QDQ versions made by ONNX Runtime's quantizer.

Until edgeopt's own quantizer exists, ``onnxruntime.quantization.quantize_static``
(QDQ format, per-channel int8 weights, 8-bit activations) makes the QDQ models
the reference interpreter and the C generator are tested on; it follows the
same scheme (symmetric per-channel weights, asymmetric activations, int32 bias).
"""

from __future__ import annotations

import pathlib
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["CONV_TRANSPOSE_CASES", "FLOAT_BUILDERS", "calibration_batches", "float_model", "integer_conv_transposes",
           "integer_feeds", "quantize_with_ort"]

_OPSET = 17


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


class _Builder:
    """Tiny graph builder: each call adds a node and returns its output name."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, array: np.ndarray, prefix: str = "c") -> str:
        name = self._name(prefix)
        self.inits.append(_init(name, array))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out + "_node", **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1,
             dilation: int = 1, pad: int | None = None, bias: bool = True) -> str:
        pad = (k // 2) * dilation if pad is None else pad
        weight = (self.rng.standard_normal((cout, cin // group, k, k)) * (1.0 / np.sqrt(cin // group * k * k)))
        inputs = [x, self.const(weight.astype(np.float32), "w")]
        if bias:
            inputs.append(self.const((self.rng.standard_normal(cout) * 0.1).astype(np.float32), "b"))
        return self.node("Conv", inputs, kernel_shape=[k, k], strides=[stride, stride], group=group,
                         dilations=[dilation, dilation], pads=[pad] * 4)

    def conv_transpose(self, x: str, cin: int, cout: int, k: int = 2, stride: int = 2, group: int = 1,
                       bias: bool = True, **attrs) -> str:
        """ConvTranspose, weight [cin, cout / group, k, k]; ``attrs`` are its others (pads, auto_pad ...)."""
        fan_in = cin // group * k * k / stride**2  # the taps that reach one output pixel, on average
        weight = self.rng.standard_normal((cin, cout // group, k, k)) / np.sqrt(fan_in)
        inputs = [x, self.const(weight.astype(np.float32), "w")]
        if bias:
            inputs.append(self.const((self.rng.standard_normal(cout) * 0.1).astype(np.float32), "b"))
        return self.node("ConvTranspose", inputs, kernel_shape=[k, k], strides=[stride, stride], group=group,
                         **attrs)

    def gemm(self, x: str, cin: int, cout: int) -> str:
        weight = (self.rng.standard_normal((cout, cin)) / np.sqrt(cin)).astype(np.float32)
        bias = (self.rng.standard_normal(cout) * 0.1).astype(np.float32)
        return self.node("Gemm", [x, self.const(weight, "w"), self.const(bias, "b")], transB=1)

    def model(self, output: str, input_shape: tuple[int, ...], output_shape=None) -> onnx.ModelProto:
        self.nodes[-1].output[0] = "output" if self.nodes[-1].output[0] == output else self.nodes[-1].output[0]
        graph = helper.make_graph(
            self.nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(input_shape))],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, output_shape)], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], ir_version=8)
        model = onnx.shape_inference.infer_shapes(model)
        onnx.checker.check_model(model)
        return model


def conv_relu() -> onnx.ModelProto:
    b = _Builder(1)
    x = b.node("Relu", [b.conv("input", 3, 8, stride=2)])
    x = b.node("Relu", [b.conv(x, 8, 16, k=3, dilation=2)])
    x = b.node("Clip", [b.conv(x, 16, 8, k=1), b.const(np.float32(0.0)), b.const(np.float32(6.0))])
    return b.model(b.conv(x, 8, 4, k=3, pad=0), (1, 3, 16, 16))


def depthwise_separable() -> onnx.ModelProto:
    b = _Builder(2)
    x = b.node("Relu", [b.conv("input", 3, 16, stride=2)])
    x = b.node("Clip", [b.conv(x, 16, 16, group=16), b.const(np.float32(0.0)), b.const(np.float32(6.0))])
    x = b.node("Relu", [b.conv(x, 16, 24, k=1)])
    x = b.conv(x, 24, 24, k=5, stride=2, group=24)
    return b.model(b.conv(x, 24, 8, k=1), (1, 3, 16, 16))


def residual_add() -> onnx.ModelProto:
    b = _Builder(3)
    stem = b.node("Relu", [b.conv("input", 3, 16)])
    y = b.conv(b.node("Relu", [b.conv(stem, 16, 16)]), 16, 16)
    x = b.node("Relu", [b.node("Add", [stem, y])])
    gate = b.node("Sigmoid", [b.conv(x, 16, 16, k=1)])
    x = b.node("Mul", [x, gate])
    return b.model(b.conv(x, 16, 8, k=1), (1, 3, 12, 12))


def concat_pools() -> onnx.ModelProto:
    b = _Builder(4)
    stem = b.node("Relu", [b.conv("input", 3, 8)])
    left = b.node("MaxPool", [stem], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    right = b.node("AveragePool", [b.conv(stem, 8, 12)], kernel_shape=[2, 2], strides=[2, 2])
    mid = b.node("AveragePool", [stem], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    x = b.node("Concat", [left, right, mid], axis=1)
    x = b.node("GlobalAveragePool", [b.conv(x, 28, 16, k=1)])
    x = b.node("Flatten", [x], axis=1)
    return b.model(b.gemm(x, 16, 10), (1, 3, 16, 16))


def gemm_classifier() -> onnx.ModelProto:
    b = _Builder(5)
    x = b.node("Relu", [b.gemm("input", 32, 64)])
    x = b.node("Relu", [b.gemm(x, 64, 32)])
    return b.model(b.gemm(x, 32, 10), (4, 32))


def lut_activations() -> onnx.ModelProto:
    b = _Builder(6)
    x = b.node("HardSwish", [b.conv("input", 3, 16, stride=2)])
    x = b.node("Sigmoid", [b.conv(x, 16, 16, k=1)])
    x = b.node("Tanh", [b.conv(x, 16, 16, group=16)])
    x = b.node("HardSigmoid", [b.conv(x, 16, 8, k=1)])
    x = b.node("Reshape", [x, b.const(np.array([1, 8, -1], dtype=np.int64))])
    x = b.node("Transpose", [x], perm=[0, 2, 1])
    return b.model(b.node("Softmax", [x], axis=-1), (1, 3, 8, 8))


def pad_resize_reduce() -> onnx.ModelProto:
    b = _Builder(7)
    x = b.node("Relu", [b.conv("input", 3, 8, stride=2)])
    x = b.node("Pad", [x, b.const(np.array([0, 0, 1, 2, 0, 0, 2, 1], dtype=np.int64))])
    x = b.conv(x, 8, 8, k=3, pad=0)
    x = b.node("Resize", [x, "", b.const(np.array([1, 1, 2, 2], dtype=np.float32))], mode="nearest")
    x = b.node("ReduceMean", [b.conv(x, 8, 8, k=1)], axes=[2, 3], keepdims=1)
    x = b.node("Squeeze", [x, b.const(np.array([2, 3], dtype=np.int64))])
    return b.model(b.gemm(x, 8, 4), (1, 3, 16, 16))


def conv_transpose() -> onnx.ModelProto:
    """A decoder: stride 2 kernel 2 (+ Relu, folded), stride 2 kernel 3 pad 1 output_padding 1 without bias,
    stride 1 kernel 3 pad 1 (+ Clip 0..6, folded)."""
    b = _Builder(8)
    x = b.node("Relu", [b.conv("input", 3, 8, k=3)])
    x = b.node("Relu", [b.conv_transpose(x, 8, 8, k=2, stride=2)])
    x = b.conv_transpose(x, 8, 6, k=3, stride=2, bias=False, pads=[1, 1, 1, 1], output_padding=[1, 1])
    x = b.conv_transpose(x, 6, 6, k=3, stride=1, pads=[1, 1, 1, 1])
    return b.model(b.node("Clip", [x, b.const(np.float32(0.0)), b.const(np.float32(6.0))]), (1, 3, 5, 5))


def conv_transpose_padding() -> onnx.ModelProto:
    """Dilation 2 with asymmetric pads, auto_pad SAME_UPPER (odd total padding: the extra one at the end),
    a depthwise (group = channels) SAME_LOWER one (odd: the extra one at the start) and one sized by
    output_shape (total padding 1 and 2)."""
    b = _Builder(9)
    x = b.conv("input", 3, 6, k=1)
    x = b.conv_transpose(x, 6, 6, k=3, stride=2, dilations=[2, 2], pads=[1, 0, 0, 2])
    x = b.node("Relu", [b.conv_transpose(x, 6, 5, k=3, stride=2, auto_pad="SAME_UPPER")])
    x = b.conv_transpose(x, 5, 5, k=2, stride=1, group=5, auto_pad="SAME_LOWER", dilations=[1, 2])
    return b.model(b.conv_transpose(x, 5, 4, k=3, stride=2, output_shape=[40, 35]), (1, 3, 4, 4))


FLOAT_BUILDERS = {
    "conv_relu": conv_relu,
    "depthwise_separable": depthwise_separable,
    "residual_add": residual_add,
    "concat_pools": concat_pools,
    "gemm_classifier": gemm_classifier,
    "lut_activations": lut_activations,
    "pad_resize_reduce": pad_resize_reduce,
    "conv_transpose": conv_transpose,
    "conv_transpose_padding": conv_transpose_padding,
}


def integer_conv_transposes(cases: list[dict], in_channels: int = 3, in_hw=(5, 4), seed: int = 0) -> onnx.ModelProto:
    """Hand-made QDQ ConvTransposes at scale 1, zero point 0, weights in {-1, 0, 1} and integer biases: with
    integer inputs every float ONNX Runtime computes is an exact integer inside int8, so it is the integer
    result. ``cases``: one branch from the input each, output ``y<i>``; a case's ``out_channels`` (default 4),
    ``kernel`` (3), ``relu`` and ``bias`` (True) are taken out, the rest are the node's attributes."""
    rng = np.random.default_rng(seed)
    inits = [_init("one", np.float32(1.0)), _init("zero", np.int8(0))]
    nodes = [helper.make_node("QuantizeLinear", ["input", "one", "zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "one", "zero"], ["x"])]
    outputs = []
    for index, case in enumerate(cases):
        attrs, name = dict(case), f"deconv{index}"
        out_channels, kernel = attrs.pop("out_channels", 4), attrs.pop("kernel", 3)
        relu, bias = attrs.pop("relu", False), attrs.pop("bias", True)
        group = attrs.get("group", 1)
        weight = rng.integers(-1, 2, (in_channels, out_channels // group, kernel, kernel)).astype(np.int8)
        inits.append(_init(f"{name}_wq", weight))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_wq", "one", "zero"], [f"{name}_w"]))
        inputs = ["x", f"{name}_w"]
        if bias:
            inits.append(_init(f"{name}_b", rng.integers(-3, 4, out_channels).astype(np.float32)))
            inputs.append(f"{name}_b")
        nodes.append(helper.make_node("ConvTranspose", inputs, [f"{name}_out"], name=name, **attrs))
        result = f"{name}_out"
        if relu:
            nodes.append(helper.make_node("Relu", [result], [f"{name}_relu"], name=f"{name}_relu"))
            result = f"{name}_relu"
        nodes += [helper.make_node("QuantizeLinear", [result, "one", "zero"], [f"{name}_q"]),
                  helper.make_node("DequantizeLinear", [f"{name}_q", "one", "zero"], [f"y{index}"])]
        outputs.append(helper.make_tensor_value_info(f"y{index}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "deconvs", [helper.make_tensor_value_info(
        "input", TensorProto.FLOAT, [1, in_channels, *in_hw])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], ir_version=8)


# integer_conv_transposes cases on its default input [1, 3, 5, 4]; kernel 3, 4 output channels unless said
CONV_TRANSPOSE_CASES = {
    "stride2_kernel2": dict(kernel=2, strides=[2, 2]),
    "stride2_kernel3_pad1_output_padding1": dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),
    "stride1_kernel3_pad1": dict(pads=[1, 1, 1, 1]),
    "dilation2": dict(strides=[2, 2], dilations=[2, 2]),
    "stride4_dilation2": dict(kernel=4, strides=[4, 4], dilations=[2, 2]),  # every other tap reaches a pixel
    "asymmetric": dict(strides=[2, 3], dilations=[1, 2], pads=[0, 2, 1, 0]),
    "same_upper": dict(strides=[2, 2], auto_pad="SAME_UPPER"),  # total padding 1: the extra one at the end
    "same_lower": dict(strides=[2, 2], auto_pad="SAME_LOWER"),  # ... at the start
    "same_upper_kernel1": dict(kernel=1, strides=[2, 2], auto_pad="SAME_UPPER"),  # in * stride > full: no pads
    "valid_output_padding": dict(strides=[3, 2], auto_pad="VALID", output_padding=[2, 1]),
    "output_shape": dict(strides=[2, 2], output_shape=[10, 8]),
    "output_shape_same_upper": dict(strides=[2, 2], output_shape=[10, 8], auto_pad="SAME_UPPER"),
    "kernel1_stride2": dict(kernel=1, strides=[2, 2]),  # pixels no tap reaches hold the bias
    "kernel4_stride2_pad1": dict(kernel=4, strides=[2, 2], pads=[1, 1, 1, 1]),
    "relu_without_bias": dict(strides=[2, 2], relu=True, bias=False),
    "depthwise": dict(group=3, out_channels=3, strides=[2, 2], pads=[1, 1, 1, 1]),
}


def integer_feeds(count: int = 2, in_channels: int = 3, in_hw=(5, 4)) -> list[dict[str, np.ndarray]]:
    """Inputs of integer_conv_transposes: integers in [-2, 2], exact at scale 1."""
    rng = np.random.default_rng(7)
    return [{"input": rng.integers(-2, 3, (1, in_channels, *in_hw)).astype(np.float32)} for _ in range(count)]


def float_model(name: str) -> onnx.ModelProto:
    return FLOAT_BUILDERS[name]()


def calibration_batches(model: onnx.ModelProto, count: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    value = model.graph.input[0]
    shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
    return [{value.name: rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


class _Reader:
    def __init__(self, batches):
        self._iter = iter(batches)

    def get_next(self):
        return next(self._iter, None)


def quantize_with_ort(model: onnx.ModelProto, *, activation: str = "int8", batches=None,
                      preprocess: bool = False) -> onnx.ModelProto:
    """QDQ-quantize ``model`` with ONNX Runtime: per-channel int8 weights, int8/uint8 activations."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    reader_type = type("Reader", (_Reader, CalibrationDataReader), {})
    batches = batches if batches is not None else calibration_batches(model)
    activation_type = QuantType.QInt8 if activation == "int8" else QuantType.QUInt8
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = pathlib.Path(tmp) / "f.onnx", pathlib.Path(tmp) / "q.onnx"
        onnx.save(model, str(src))
        if preprocess:
            from onnxruntime.quantization.shape_inference import quant_pre_process
            pre = pathlib.Path(tmp) / "p.onnx"
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            src = pre
        quantize_static(str(src), str(dst), reader_type(batches), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=activation_type, weight_type=QuantType.QInt8)
        return onnx.load(str(dst))


def to_ir(model: onnx.ModelProto):
    """Load a QDQ proto through edgeopt's loader (shape inference included)."""
    from edgeopt.io.load import load_model

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "m.onnx"
        onnx.save(model, str(path))
        return load_model(path)


def torch_qdq_model(name: str, *, activation: str = "int8") -> onnx.ModelProto:
    """A tests/models.py architecture, exported, BN-folded by ORT's pre-processing, QDQ-quantized."""
    import models

    with tempfile.TemporaryDirectory() as tmp:
        float_proto = onnx.load(str(models.build_onnx(name, tmp)))
    return quantize_with_ort(float_proto, activation=activation, preprocess=True,
                             batches=calibration_batches(float_proto, 8))


def agreement(reference, session, batches) -> tuple[float, float, int]:
    """(fraction within 1 LSB, fraction exact, max LSB difference) of reference vs ORT int8 outputs.

    ORT's float output is quantized back with the output's scale and zero point
    (exact, since it is the DequantizeLinear of ORT's int8 result).
    """
    within = exact = total = 0
    worst = 0
    for batch in batches:
        ours = reference.run(batch)
        theirs = session.run(batch)
        for name, q in ours.items():
            info = reference.output_info(name)
            ort_q = np.clip(np.rint(theirs[name] / np.float32(info.scale)) + info.zero_point, -128, 127)
            diff = np.abs(q.astype(np.int64) - ort_q.astype(np.int64))
            within += int((diff <= 1).sum())
            exact += int((diff == 0).sum())
            total += diff.size
            worst = max(worst, int(diff.max()))
    return within / total, exact / total, worst

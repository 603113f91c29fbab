"""Lower a QDQ ONNX model to an integer :class:`Program`.

The graph is walked once in order. Every float value that is exactly an int8
tensor -- the output of a ``DequantizeLinear`` of an activation, or of a data
movement op on such a value -- is mapped to a program tensor. A compute node
(``Conv``, ``Add``, ``Sigmoid`` ...) must read only such values and constant
``DequantizeLinear`` weights, and its output must reach a ``QuantizeLinear``
through at most a chain of ``Relu``/``Clip`` (folded into the clamp) and data
movement ops; the node then becomes one integer op whose output has that
``QuantizeLinear``'s scale and zero point. Anything else is a float island
and is refused with every offending node named.

uint8 tensors (the ONNX Runtime target's activations) are moved exactly to
int8: ``q8 = q - 128`` with zero point ``zp - 128``, the same real values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.errors import ModelError, UnsupportedOpError
from edgeopt.metrics import count_of
from edgeopt.runtime.reference.fixed_point import quantize_multiplier
from edgeopt.runtime.reference.fuse import fuse_conv_add
from edgeopt.runtime.reference.lift_1d import lift_1d
from edgeopt.runtime.reference.program import (
    IntOp,
    Program,
    ProgramIO,
    RequantizeParams,
    ReshapeParams,
    TensorInfo,
    stored_layout,
)
from edgeopt.runtime.reference.transposes import compose_transposes

__all__ = ["QParams", "lower"]

CLAMP_OPS = ("Relu", "Clip")
MOVEMENT_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "DepthToSpace", "SpaceToDepth")


class _Skip(Exception):
    """An input failed upstream; that failure was already reported."""


@dataclass(frozen=True)
class QParams:
    """Per-tensor int8 quantization: real = scale * (q - zero_point)."""

    scale: float
    zero_point: int


@dataclass(frozen=True)
class OutputPlan:
    """Where a compute node's result goes: its quantization, clamp and absorbed clamp nodes."""

    value: ir.Value
    qparams: QParams
    act_min: int
    act_max: int
    absorbed: tuple[ir.Node, ...]


def _shift_to_int8(zero_point: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    if dtype == np.uint8:
        return zero_point.astype(np.int64) - 128
    if dtype == np.int8:
        return zero_point.astype(np.int64)
    raise UnsupportedOpError(f"{what}: {dtype} quantization; only int8 and uint8 are supported")


def node_label(node: ir.Node) -> str:
    return f"{node.op_type} ({node.name or 'unnamed'})"


def attribute(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def text_attribute(node: ir.Node, name: str, default: str) -> str:
    """A string attribute (``mode``, ``auto_pad`` ...) as text, ``default`` when absent."""
    value = attribute(node, name)
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else str(value)


def real_multiplier(real: float) -> tuple[int, int]:
    return quantize_multiplier(real) if real > 0 else (0, 0)


def conv_pads(node: ir.Node, in_hw, kernel, strides, dilations) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) padding of a Conv or pool: its ``pads``, or what ``auto_pad`` implies."""
    auto_pad = attribute(node, "auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("NOTSET", "VALID"):
        pads = list(attribute(node, "pads", [0, 0, 0, 0])) if auto_pad == "NOTSET" else [0, 0, 0, 0]
        return pads[0], pads[1], pads[2], pads[3]
    begin, end = [], []
    for size, k, s, d in zip(in_hw, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return begin[0], begin[1], end[0], end[1]


def clamp_range(qparams: QParams, low: float, high: float) -> tuple[int, int]:
    """The int8 range a fused activation with real range [low, high] leaves."""
    act_min, act_max = -128, 127
    if low > -math.inf:
        act_min = max(act_min, qparams.zero_point + int(np.rint(low / qparams.scale)))
    if high < math.inf:
        act_max = min(act_max, qparams.zero_point + int(np.rint(high / qparams.scale)))
    return act_min, max(act_min, act_max)


class Lowering:
    """The state of one lowering: program tensors, the value -> tensor map, and errors."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.opset = eir.default_opset(model)
        self.tensors: dict[str, TensorInfo] = {}
        self.constants: dict[str, np.ndarray] = {}
        self.ops: list[IntOp] = []
        self.inputs: list[ProgramIO] = []
        self.tensor_of: dict[str, str] = {}
        self.absorbed: set[int] = set()
        self.claimed: dict[int, Callable[[Lowering, ir.Node], None]] = {}  # a group's first node -> its lowering
        self.failed: set[str] = set()
        self.errors: list[str] = []

    # -- quantization parameters ------------------------------------------------

    def qdq_params(self, node: ir.Node) -> QParams:
        """Per-tensor int8 parameters of a QuantizeLinear/DequantizeLinear node."""
        scale = eir.constant_array(node.inputs[1])
        zp_value = node.inputs[2] if len(node.inputs) > 2 else None
        zero_point = eir.constant_array(zp_value) if zp_value is not None else np.zeros((), np.uint8)
        if scale is None or zero_point is None:
            raise UnsupportedOpError(f"{node_label(node)}: scale and zero point must be constants")
        if scale.size != 1:
            raise UnsupportedOpError(f"{node_label(node)}: per-axis activation quantization is not supported")
        zero_point = _shift_to_int8(zero_point, zero_point.dtype, node_label(node))
        return QParams(float(scale.reshape(())), int(zero_point.reshape(())))

    def params_of(self, tensor: str) -> QParams:
        info = self.tensors[tensor]
        return QParams(info.scale, info.zero_point)

    # -- tensors ------------------------------------------------------------------

    def logical_shape(self, value: ir.Value) -> tuple[int, ...]:
        shape = eir.static_shape(value)
        if shape is None:
            raise ModelError(f"value {value.name!r} has no static shape: load the model with edgeopt "
                             "(it infers shapes) and fix dynamic inputs with --input-shape")
        return shape

    def add_tensor(self, name: str, logical_shape, qparams: QParams) -> str:
        layout = stored_layout(len(logical_shape))
        shape = tuple(int(logical_shape[i]) for i in layout)
        self.tensors[name] = TensorInfo(name=name, shape=shape, scale=qparams.scale,
                                        zero_point=qparams.zero_point, layout=layout)
        return name

    def add_stored_tensor(self, name: str, shape, qparams: QParams, layout) -> str:
        self.tensors[name] = TensorInfo(name=name, shape=tuple(int(d) for d in shape), scale=qparams.scale,
                                        zero_point=qparams.zero_point, layout=tuple(layout))
        return name

    def activation(self, value: ir.Value | None, node: ir.Node) -> str:
        """The program tensor behind a float input of ``node``, or refuse the float island."""
        if value is None:
            raise UnsupportedOpError(f"{node_label(node)}: missing input")
        if value.name in self.tensor_of:
            return self.tensor_of[value.name]
        if value.name in self.failed:
            raise _Skip()
        if eir.is_quantized_constant(value):
            raise UnsupportedOpError(f"{node_label(node)} reads the constant {value.name!r} where the kernel takes "
                                     "an activation (a weight is input B of MatMul/Gemm, W of Conv): swap the "
                                     "operands (x @ W, not W @ x) or keep the node float")
        raise UnsupportedOpError(f"{node_label(node)} reads float value {value.name!r} that is not "
                                 "quantized (a float island): quantize it or remove the op")

    # -- emitting -----------------------------------------------------------------

    def emit(self, kind: str, inputs, output: str, params, node: ir.Node, scratch: str | None = None) -> str:
        self.ops.append(IntOp(kind=kind, inputs=tuple(inputs), output=output, params=params,
                              node=node.name or node.op_type, scratch=scratch))
        return output

    def bind(self, value: ir.Value, tensor: str) -> None:
        self.tensor_of[value.name] = tensor

    def finish(self, kind: str, inputs, plan: OutputPlan, params, node: ir.Node, scratch: str | None = None) -> str:
        """Emit a compute op writing ``plan``'s tensor and bind its value and absorbed clamps."""
        name = self.add_tensor(plan.value.name, self.logical_shape(plan.value), plan.qparams)
        self.emit(kind, inputs, name, params, node, scratch)
        self.bind(plan.value, name)
        for clamp in plan.absorbed:
            self.absorbed.add(id(clamp))
            self.bind(clamp.outputs[0], name)
        return name

    def finish_as_reshape(self, source: str, plan: OutputPlan, node: ir.Node) -> str:
        """Bind ``plan``'s value (and its absorbed clamps) to ``source``'s bytes under the value's own shape: a
        reshape, which the planner writes in place."""
        logical = self.logical_shape(plan.value)
        shape = tuple(int(logical[axis]) for axis in stored_layout(len(logical)))
        return self.finish("reshape", [source], plan, ReshapeParams(shape=shape), node)

    def requantize(self, source: str, target: QParams, output: str, node: ir.Node,
                   act_range: tuple[int, int] = (-128, 127)) -> str:
        """Emit ``output = source`` moved to ``target`` quantization (and clamped)."""
        info, src = self.tensors[source], self.params_of(source)
        multiplier, shift = real_multiplier(src.scale / target.scale)
        self.add_stored_tensor(output, info.shape, target, info.layout)
        params = RequantizeParams(input_zero_point=src.zero_point, output_zero_point=target.zero_point,
                                  multiplier=multiplier, shift=shift, act_min=act_range[0], act_max=act_range[1])
        return self.emit("requantize", [source], output, params, node)

    def reinterpret(self, source: str, target: QParams, output: str, node: ir.Node) -> str:
        """Emit ``output``: ``source``'s integers unchanged, read at ``target``'s scale and zero point."""
        info = self.tensors[source]
        multiplier, shift = real_multiplier(1.0)
        self.add_stored_tensor(output, info.shape, target, info.layout)
        params = RequantizeParams(input_zero_point=0, output_zero_point=0, multiplier=multiplier, shift=shift,
                                  act_min=-128, act_max=127)
        return self.emit("requantize", [source], output, params, node)

    # -- looking ahead from a compute node -----------------------------------------

    def clip_bounds(self, node: ir.Node) -> tuple[float, float]:
        if node.op_type == "Relu":
            return 0.0, math.inf
        if self.opset < 11:
            return float(attribute(node, "min", -math.inf)), float(attribute(node, "max", math.inf))
        bounds = []
        for index, default in ((1, -math.inf), (2, math.inf)):
            value = node.inputs[index] if len(node.inputs) > index else None
            array = eir.constant_array(value) if value is not None else None
            if value is not None and array is None:
                raise UnsupportedOpError(f"{node_label(node)}: Clip bounds must be constants")
            if array is not None and array.size != 1:  # ONNX Runtime also accepts shape [1]; any size-1 array
                which = "min" if index == 1 else "max"
                raise UnsupportedOpError(f"{node_label(node)}: Clip {which} must be a scalar (or a one-element "
                                         f"array), got shape {list(array.shape)}")
            bounds.append(default if array is None else float(array.item()))
        return bounds[0], bounds[1]

    def output_plan(self, node: ir.Node, value: ir.Value | None = None) -> OutputPlan:
        """Follow ``node``'s output (``value``, else its first) through Relu/Clip and data movement to its
        QuantizeLinear."""
        value = value if value is not None else node.outputs[0]
        low, high, absorbed, current, absorbing = -math.inf, math.inf, [], value, True
        while True:
            users = [use.node for use in current.uses()]
            quantizers = [user for user in users if user.op_type == "QuantizeLinear"]
            if quantizers:
                qparams = self.qdq_params(quantizers[0])
                return OutputPlan(value, qparams, *clamp_range(qparams, low, high), tuple(absorbed))
            if current.is_graph_output() or len(users) != 1:
                break
            user = users[0]
            if absorbing and user.op_type in CLAMP_OPS:
                user_low, user_high = self.clip_bounds(user)
                low, high = max(low, user_low), min(high, user_high)
                absorbed.append(user)
            elif user.op_type in MOVEMENT_OPS:
                absorbing = False
            else:
                break
            current = user.outputs[0]
        raise UnsupportedOpError(f"{node_label(node)}: {FLOAT_ISLAND}")

    # -- constants --------------------------------------------------------------------

    def dequantize_constant(self, value: ir.Value | None, node: ir.Node):
        """(int8 values, per-axis scale, zero point, axis) of a constant DequantizeLinear."""
        producer = value.producer() if value is not None else None
        data = eir.constant_array(producer.inputs[0]) if producer is not None and producer.inputs else None
        if producer is None or producer.op_type != "DequantizeLinear" or data is None:
            raise UnsupportedOpError(f"{node_label(node)}: input {value.name if value else '?'!r} must be a "
                                     "constant DequantizeLinear (a quantized weight or constant operand)")
        scale = eir.constant_array(producer.inputs[1]).astype(np.float64)
        zp_value = producer.inputs[2] if len(producer.inputs) > 2 else None
        zero_point = eir.constant_array(zp_value) if zp_value is not None else np.zeros_like(scale, data.dtype)
        if data.dtype in (np.int8, np.uint8):
            shifted = data.astype(np.int64) - (128 if data.dtype == np.uint8 else 0)
            zero_point = _shift_to_int8(zero_point, data.dtype, node_label(node))
        else:
            shifted, zero_point = data.astype(np.int64), zero_point.astype(np.int64)
        axis = int(attribute(producer, "axis", 1)) % max(data.ndim, 1)
        return shifted, scale, zero_point, axis

    def real_constant(self, value: ir.Value | None, node: ir.Node) -> np.ndarray:
        """A constant's real values, whether stored float or quantized behind a DequantizeLinear."""
        array = eir.constant_array(value)
        if array is not None:
            return array.astype(np.float64)
        data, scale, zero_point, axis = self.dequantize_constant(value, node)
        shape = [1] * data.ndim
        if scale.size > 1:
            shape[axis] = scale.size
        return (data - zero_point.reshape(shape)) * scale.reshape(shape)

    def weight(self, value: ir.Value, node: ir.Node, channel_axis: int) -> tuple[np.ndarray, np.ndarray]:
        """Symmetric int8 weights and their per-output-channel scale."""
        data, scale, zero_point, axis = self.dequantize_constant(value, node)
        if np.any(zero_point != 0):
            raise UnsupportedOpError(f"{node_label(node)}: weights must be symmetric (zero point 0)")
        if data.dtype != np.int64 or data.min() < -128 or data.max() > 127:
            raise UnsupportedOpError(f"{node_label(node)}: weights must be 8-bit integers")
        channels = data.shape[channel_axis]
        if scale.size > 1 and axis != channel_axis:
            raise UnsupportedOpError(f"{node_label(node)}: weights are quantized per axis {axis}, "
                                     f"expected per output channel (axis {channel_axis})")
        return data.astype(np.int8), np.broadcast_to(scale.reshape(-1), (channels,)).astype(np.float64)

    def bias(self, value: ir.Value | None, node: ir.Node, bias_scale: np.ndarray) -> np.ndarray:
        """int32 bias at ``input_scale * weight_scale`` (exact when the model's bias already is)."""
        if value is None or not value.name:
            return np.zeros(bias_scale.shape, np.int32)
        real = np.broadcast_to(self.real_constant(value, node).reshape(-1), bias_scale.shape)
        quantized = np.rint(real / bias_scale)
        return np.clip(quantized, -(2**31), 2**31 - 1).astype(np.int32)

    def per_channel_multipliers(self, reals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pairs = [real_multiplier(float(r)) for r in reals]
        return (np.array([m for m, _ in pairs], dtype=np.int32), np.array([s for _, s in pairs], dtype=np.int8))

    # -- program boundary ---------------------------------------------------------------

    def model_input(self, value: ir.Value, qparams: QParams, is_float: bool) -> str:
        name = self.add_tensor(value.name, self.logical_shape(value), qparams)
        self.inputs.append(ProgramIO(name=value.name, tensor=name, is_float=is_float))
        self.bind(value, name)
        return name

    def outputs(self) -> tuple[ProgramIO, ...]:
        outputs = []
        for value in self.model.graph.outputs:
            if value.name not in self.tensor_of:
                if value.name not in self.failed:
                    self.errors.append(f"output {value.name!r} is not quantized: "
                                       "it must come from a DequantizeLinear or QuantizeLinear")
                continue
            dtype = eir.numpy_dtype(value)
            is_float = dtype is None or np.issubdtype(dtype, np.floating)
            outputs.append(ProgramIO(name=value.name, tensor=self.tensor_of[value.name], is_float=is_float))
        return tuple(outputs)


FLOAT_ISLAND = "its output is not quantized (a float island)"

# What to do about a refused op, told once after the list (op type -> hint), where its refusal cannot say it
# alone (each Resize or PRelu refusal says what the kernel takes).
_OP_HINTS = {
    "Erf": "an Erf is a lookup table when its input and output are quantized, and a spelled-out GELU, "
           "0.5 * x * (1 + erf(x / sqrt(2))), one table when no QuantizeLinear sits between its steps "
           "(`edgeopt quantize --target mcu` places its Q/DQ so): quantize the float model so, or export at opset "
           "20 or later, where GELU is one Gelu op",
    "ArgMax": "an ArgMax of class scores needs no kernel: export the model without it and take the index of the "
              "largest int8 output in your C (a positive scale keeps the float scores' order; ties aside)",
    "ArgMin": "export the model without the ArgMin and take the index of the smallest int8 output in your C",
}


def _what_to_do(errors: list[str], model: ir.Model) -> str:
    """The advice for the refusals in ``errors``, each said once: the float-island rule, hints for the
    op types refused, and the ops the C kernels cover when one refused has no kernel at all."""
    from edgeopt.runtime.reference.handlers import HANDLERS

    refused = {node.op_type for node in model.graph if any(error.startswith(node_label(node)) for error in errors)}
    advice = [hint for op, hint in _OP_HINTS.items() if op in refused]
    if any(FLOAT_ISLAND in error for error in errors):
        advice.insert(0, "every op output must reach a QuantizeLinear: `edgeopt quantize --target mcu` quantizes "
                         "all it has kernels for (the ort target leaves a last Gemm/MatMul's output float), and "
                         "what it lists as kept float (an excluded node, an op without an int8 kernel) cannot be "
                         "compiled")
    if refused - HANDLERS.keys():  # an op with no kernel at all (else each refusal says what its op supports)
        supported = sorted(op for op in HANDLERS if op not in ("QuantizeLinear", "DequantizeLinear"))
        advice.append(f"the C kernels cover {', '.join(supported)}: replace the other ops in the model you export")
    return ". To fix: " + "; ".join(advice) if advice else ""


def _is_quantized(model: ir.Model) -> bool:
    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph)


def _run_node(lowering: Lowering, node: ir.Node, handlers) -> None:
    handler = lowering.claimed.get(id(node)) or (handlers.get(node.op_type) if node.domain in eir.ONNX_DOMAINS
                                                 else None)
    try:
        if handler is None:
            raise UnsupportedOpError(f"{node_label(node)}")
        handler(lowering, node)
    except _Skip:
        lowering.failed.update(v.name for v in node.outputs)
    except UnsupportedOpError as error:
        lowering.errors.append(str(error))
        lowering.failed.update(v.name for v in node.outputs)


# what a dynamic int8 model (edgeopt's int8-dynamic, ONNX Runtime's quantize_dynamic) computes with
_DYNAMIC_OPS = frozenset({"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM"})


def lower(model: ir.Model, *, fuse: bool = True) -> Program:
    """The integer program of a QDQ model; raises UnsupportedOpError listing every op it cannot lower.

    ``fuse``: replace each conv -> residual Add pair by one ``conv2d_add`` op (bit-identical results,
    one activation less live; see :mod:`edgeopt.runtime.reference.fuse`).
    """
    from edgeopt.runtime.reference.handlers import HANDLERS, PATTERNS

    if not _is_quantized(model):
        dynamic = sorted({node.op_type for node in model.graph if node.op_type in _DYNAMIC_OPS})
        if dynamic:
            raise ModelError(f"the model is a dynamic int8 one ({', '.join(dynamic)}): it quantizes activations "
                             "as ONNX Runtime runs it, and the C needs their ranges fitted ahead of time: quantize "
                             "the float model with `edgeopt quantize --scheme int8 --target mcu --data ...`")
        raise ModelError("the model has no QuantizeLinear/DequantizeLinear nodes: it is a float model; "
                         "run `edgeopt quantize` first")
    model = lift_1d(model)  # 1-D convolutions and pools run as 2-D ones over a height of 1
    lowering = Lowering(model)
    for claim in PATTERNS:
        claim(lowering)
    for node in model.graph:
        if id(node) not in lowering.absorbed:
            _run_node(lowering, node, HANDLERS)
    outputs = lowering.outputs()
    if lowering.errors:
        raise UnsupportedOpError(f"cannot lower {count_of(len(lowering.errors), 'op', 'ops')} to integer kernels: "
                                 + "; ".join(lowering.errors) + _what_to_do(lowering.errors, model))
    used = {t for op in lowering.ops for t in op.inputs}
    constants = {name: array for name, array in lowering.constants.items() if name in used}
    program = Program(tensors=lowering.tensors, constants=constants, ops=tuple(lowering.ops),
                      inputs=tuple(lowering.inputs), outputs=outputs)
    program = compose_transposes(program)
    return fuse_conv_add(program) if fuse else program

"""Which ops run in integer, and how their tensors are quantized: one table.

The QDQ builder reads this table and nothing else to decide placement. An
op is listed when ONNX Runtime fuses ``DequantizeLinear -> op ->
QuantizeLinear`` into an integer kernel (QLinearConv, QLinearMatMul, QGemm,
QLinearAdd, QLinearMul, QLinearConcat, QLinearAveragePool,
QLinearGlobalAveragePool, QLinearSigmoid, QLinearLeakyRelu, or the int8
version of a data-movement op) and the TFLite int8 scheme has the same
kernel; HardSwish and HardSigmoid too, which edgeopt rewrites into QLinearAdd
and QLinearMul (:mod:`edgeopt.quant.hard_activations`). Everything else
stays float and is reported. The microcontroller target
(:data:`MCU_OP_RULES`) adds the ops the C kernels compute from int8
(Softmax, the table ops of :data:`TABLE_OPS` (Tanh, Elu, Gelu, Softplus ...), Sub, ReduceMean, ReduceMax,
GlobalMaxPool, Pad, PRelu, DepthToSpace, SpaceToDepth, linear Resize, LayerNormalization, InstanceNormalization,
RMSNormalization, LpNormalization, RNN, GRU, LSTM, and the spelled-out GELU, LayerNorm, RMSNorm and L2
normalization groups of :data:`ONE_OP_PATTERNS`)
and ConvTranspose, which ONNX Runtime runs in float (it has no integer
ConvTranspose on the CPU), and keeps a Gather float unless its indices are
constant (the C copies int8 blocks; a lookup of token ids has no kernel).

Roles:

* ``WEIGHTED``: Conv, ConvTranspose, Gemm, MatMul -- input 0 is an activation,
  input 1 a weight (int8 symmetric, per output channel along
  ``weight_axis``), input 2 a bias (int32).
* ``ARITHMETIC``: inputs and output quantized with their own scales.
* ``SHARED``: data movement (pooling by max, reshapes, nearest resize (also linear on the MCU),
  concatenation, Split and Slice, Gather of rows -- an embedding table is then
  stored in int8; constant, reflect and edge Pad, DepthToSpace and SpaceToDepth on the MCU): the float inputs
  and the outputs share one scale, so the integer kernel copies values without requantizing
  (ONNX Runtime drops the Q/DQ pairs around Split, Slice, Reshape ... only
  when the scales are equal).
* ``ACTIVATION``: Relu and Clip are never quantized alone; after a
  quantized op whose only consumer they are, they fuse: the producer's
  output gets no Q/DQ, the activation's output does, and the clamp becomes
  the quantization range (ONNX Runtime drops the activation).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import onnx_ir as ir

from edgeopt import ir as eir

__all__ = ["DATA_MOVEMENT_OPS", "FUSED_BETWEEN_PAIRS", "MCU_OP_RULES", "ONE_OP_PATTERNS", "OP_RULES",
           "QDQ_DOMAINS", "OpRole", "OpRule", "QUANTIZED_OP_TYPES", "RECURRENT_MAX_HIDDEN", "RECURRENT_OPS",
           "TABLE_OPS", "WEIGHT_ONLY_OPS", "float_op_reason", "gather_refusal", "is_float16_cast", "is_qdq_op",
           "pad_refusal", "prelu_refusal", "recurrent_refusal", "resize_refusal", "slow_group_refusal", "weight_axis"]

# Ops ONNX Runtime's QDQ optimizer moves a DequantizeLinear past (they reorder values, not change them).
DATA_MOVEMENT_OPS = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather", "Split",
                     "Expand", "MaxPool", "Identity")


class OpRole(enum.Enum):
    WEIGHTED = "weighted"
    ARITHMETIC = "arithmetic"
    SHARED = "shared"
    ACTIVATION = "activation"


@dataclass(frozen=True, kw_only=True)
class OpRule:
    """``activation_inputs``: indices of the inputs that get Q/DQ (None: all of them);
    ``all_outputs``: every output gets one (Split), not only the first; ``modes``: the values of the
    node's ``mode`` attribute that run in integer (None: any); ``slow_group_channels``: the input channels
    per group of a grouped conv whose integer kernel is slower than float (it stays float);
    ``constant_indices``: a Gather runs in integer only at constant indices; ``fuses_clamp``: a Relu/Clip
    that alone reads its output folds into its range, as after the ops of :data:`FUSING_PRODUCERS`;
    ``standalone``: a Relu/Clip no op before it absorbs runs in integer by itself (a clamped requantization);
    ``weight_inputs``: constant inputs quantized as int8 weights along :func:`weight_axis` (a GRU's W and R)."""

    role: OpRole
    activation_inputs: tuple[int, ...] | None = (0,)
    all_outputs: bool = False
    modes: frozenset[str] | None = None
    slow_group_channels: frozenset[int] = frozenset()
    constant_indices: bool = False
    fuses_clamp: bool = False
    standalone: bool = False
    weight_inputs: tuple[int, ...] = ()


_WEIGHTED = OpRule(role=OpRole.WEIGHTED)
_UNARY = OpRule(role=OpRole.ARITHMETIC)
_BINARY = OpRule(role=OpRole.ARITHMETIC, activation_inputs=(0, 1))
_MOVE = OpRule(role=OpRole.SHARED)
_FUSED = OpRule(role=OpRole.ACTIVATION)
_NORMALIZATION = OpRule(role=OpRole.ARITHMETIC, fuses_clamp=True)
_RECURRENT = OpRule(role=OpRole.ARITHMETIC, weight_inputs=(1, 2), all_outputs=True)

#: The elementwise ops of one input the C computes by a 256-entry table (runtime/reference/tables.py): the
#: MCU target quantizes each like Sigmoid.
TABLE_OPS = ("Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Gelu", "Softplus", "Softsign",
             "Mish", "Abs", "Neg", "Exp", "Erf", "Selu", "Celu", "ThresholdedRelu")

# ONNX Runtime (1.32, x86) runs a grouped Conv with 2 to 4 input channels per group (ResNeXt's 32x4d) in int8
# 1.4x to 4.3x slower than in float, group by group (3x3, 64 to 256 channels; as a float layer between int8
# ones 1.8x to 3x faster than its QLinearConv); depthwise (1 per group) and 8 or more per group gain in int8.
# The ORT target keeps those float; the microcontroller's kernels have no such penalty.
OP_RULES: dict[str, OpRule] = {
    "Conv": OpRule(role=OpRole.WEIGHTED, slow_group_channels=frozenset({2, 3, 4})),
    "Gemm": _WEIGHTED,
    "MatMul": OpRule(role=OpRole.WEIGHTED, activation_inputs=(0, 1)),  # input 1: weight if constant
    "Add": _BINARY,
    "Mul": _BINARY,
    "AveragePool": _UNARY,
    "GlobalAveragePool": _UNARY,
    "Sigmoid": _UNARY,
    "LeakyRelu": _UNARY,
    # no integer kernel in ONNX Runtime: edgeopt writes them as QLinearAdd (+ QLinearMul) after placing
    # their Q/DQ pairs (edgeopt.quant.hard_activations); one it has no integer form for (int8 activations, a
    # HardSwish input under 6 wide) is placed as an op without a kernel (plan_qdq's no_kernel)
    "HardSigmoid": _UNARY,
    "HardSwish": _UNARY,
    "Concat": OpRule(role=OpRole.SHARED, activation_inputs=None),
    "MaxPool": _MOVE,
    "Reshape": _MOVE,
    "Flatten": _MOVE,
    "Transpose": _MOVE,
    "Squeeze": _MOVE,
    "Unsqueeze": _MOVE,
    # ONNX Runtime (1.32) runs DQ -> Resize -> Q as an int8 Resize for mode nearest only; a linear one it
    # interpolates in float between the DQ and the Q, whatever the coordinate_transformation_mode. Kept float,
    # its output gets a range of its own (+0.1 to +0.6 dB on Conv -> Resize x2 -> Conv), at the same cost.
    "Resize": OpRule(role=OpRole.SHARED, modes=frozenset({"nearest"})),
    "Slice": _MOVE,
    "Split": OpRule(role=OpRole.SHARED, all_outputs=True),
    "Gather": _MOVE,  # input 0 only (1 holds indices): an embedding table, or attention's q/k/v of qkv
    "Relu": _FUSED,
    "Clip": _FUSED,
}

# ONNX Runtime gathers int8 values at any indices; edgeopt's C copies int8 blocks at constant ones (attention's
# q, k, v = qkv[0], qkv[1], qkv[2]), as it slices and concatenates: the MCU target keeps a lookup by run-time
# indices (an embedding of token ids) float, and says so.

# ONNX Runtime has no integer ConvTranspose on the CPU: between Q/DQ pairs it ran the float kernel on
# weights dequantized on every run (slower than float, and the weights rounded), so the ORT target keeps
# it float. The microcontroller target quantizes it (TFLite Micro and edgeopt's C have integer kernels).
# The microcontroller target adds the ops its integer kernels (edgeopt's C, TFLite Micro / CMSIS-NN)
# compute from int8 but ONNX Runtime has no QDQ fusion for: there they would run in float between a
# DQ and a Q, so the ORT target keeps them float. A Softmax output gets the fixed range [0, 1). A constant
# Pad copies int8 values and fills with its value quantized at their scale; a reflect or edge Pad copies them.
MCU_OP_RULES: dict[str, OpRule] = OP_RULES | {
    "Gather": OpRule(role=OpRole.SHARED, constant_indices=True),
    # after a pool, a Slice, a Transpose ...: the C clamps while it requantizes (ONNX Runtime has no such kernel)
    "Relu": OpRule(role=OpRole.ACTIVATION, standalone=True),
    "Clip": OpRule(role=OpRole.ACTIVATION, standalone=True),
    "Conv": _WEIGHTED,
    "ConvTranspose": _WEIGHTED,  # edgeopt's C: 2-D, group 1 or depthwise
    "Softmax": _UNARY,
    **dict.fromkeys(TABLE_OPS, _UNARY),  # Sigmoid, LeakyRelu, HardSigmoid and HardSwish as for ORT
    "Sub": _BINARY,  # TFLite's
    "ReduceMean": _UNARY,
    "ReduceSum": _UNARY,  # the mean kernel without the count (SKNet's sum over branches)
    "GlobalMaxPool": _MOVE,
    "ReduceMax": _MOVE,  # tf2onnx's GlobalMaxPooling1D: a max pool over the reduced rows
    "Pad": OpRule(role=OpRole.SHARED, modes=frozenset({"constant", "reflect", "edge"})),
    "Resize": OpRule(role=OpRole.SHARED, modes=frozenset({"nearest", "linear"})),  # TFLite's int8 bilinear
    "PRelu": _UNARY,  # a constant slope (input 1 stays float: the C folds it into its multipliers)
    "DepthToSpace": _MOVE,
    "SpaceToDepth": _MOVE,
    # input 0 and the output: Scale and B stay float, folded by the C lowering, whose kernel also clamps
    "LayerNormalization": _NORMALIZATION,
    "InstanceNormalization": _NORMALIZATION,
    "RMSNormalization": _NORMALIZATION,  # opset 23; and spelled out (ONE_OP_PATTERNS)
    "LpNormalization": _NORMALIZATION,  # p = 2 only (the lowering refuses p = 1); and F.normalize spelled out
    # input X and the outputs read (Y, Y_h, an LSTM's Y_c); W and R int8 per gate row; B and the initial
    # states stay float (the C folds them)
    "RNN": _RECURRENT,
    "GRU": _RECURRENT,
    "LSTM": _RECURRENT,
}

# Spelled-out groups the float passes annotate (``edgeopt.pattern``) that a target computes as one integer op,
# where it has that op's kernel: an erf GELU (below opset 20) as a Gelu lookup table, a LayerNorm (below
# opset 17, or over the channels of NCHW, which no LayerNormalization expresses) as a LayerNormalization, an
# RMSNorm (below opset 23) as an RMSNormalization, F.normalize as an LpNormalization (the C's LayerNorm kernel
# with no mean subtracted, for both). Their input and output get a Q/DQ pair, the values between their steps none.
ONE_OP_PATTERNS = {"gelu": "Gelu", "layer_norm": "LayerNormalization", "rms_norm": "RMSNormalization",
                   "l2_norm": "LpNormalization"}

# Ops without a rule of their own on the ORT target that ONNX Runtime still runs as an integer kernel
# (QLinearSoftmax) when their input and output both have Q/DQ pairs, as an attention's Softmax between
# its quantized MatMuls: they are float only where that is not so (a model's output probabilities).
FUSED_BETWEEN_PAIRS = frozenset({"Softmax"})

QUANTIZED_OP_TYPES = frozenset(MCU_OP_RULES)

# ONNX Runtime's weight-only ops (com.microsoft): block-quantized weights, float compute; a MatMulNBits
# computes what a MatMul does, a GatherBlockQuantized what a Gather does.
WEIGHT_ONLY_OPS = frozenset({"MatMulNBits", "GatherBlockQuantized"})

# Ops that produce a quantized output a fused Relu/Clip can clamp.
FUSING_PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul"})


# Domains whose QuantizeLinear/DequantizeLinear (and QLinear*) ops a QDQ model may use: ONNX's and
# ONNX Runtime's contrib domain (written by other quantizers).
QDQ_DOMAINS = ("", "ai.onnx", "com.microsoft")


# What ONNX Runtime's graph optimizer writes into a model it saves (``SessionOptions.optimized_model_filepath``):
# its fused contrib ops and its blocked-layout domain. A layer folded into one is no Conv, Gemm or MatMul any more.
_RUNTIME_FUSIONS = frozenset({"FusedConv", "FusedGemm", "FusedMatMul", "NhwcConv", "NhwcFusedConv"})
_RUNTIME_LAYOUT_DOMAINS = frozenset({"com.microsoft.nchwc"})


def float_op_reason(node: ir.Node) -> str | None:
    """Why ``node``, an op without an integer kernel, stays float when more is to say than that: an op of ONNX
    Runtime's optimizer (what to do), control flow (what stays float with it); None for every other op."""
    if node.domain in _RUNTIME_LAYOUT_DOMAINS or (node.domain == "com.microsoft" and node.op_type in _RUNTIME_FUSIONS):
        return (f"{node.op_type} ({node.domain}) is ONNX Runtime's own fused or re-laid-out op, saved after its "
                "optimizations: quantize the model as exported instead")
    if node.op_type not in ("If", "Loop", "Scan"):
        return None
    layers = sum(each.op_type in _LAYERS for graph in eir.subgraphs(node) for each in graph.all_nodes())
    return (f"control flow: int8 quantizes the main graph, so the {layers} Conv/Gemm/MatMul of its subgraphs "
            "stay float too (bf16 stores their weights low, int4-weight those of MatMul/Gemm)")


_LAYERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def is_qdq_op(node: ir.Node | None, op_type: str) -> bool:
    """True when ``node`` is ``op_type`` in one of the QDQ domains."""
    return node is not None and node.op_type == op_type and node.domain in QDQ_DOMAINS


def is_float16_cast(node: ir.Node | None) -> bool:
    """True when ``node`` casts to float16: in an int8 model, ``--fallback fp16``'s join between the float32
    side of a Q/DQ pair and a node computing in float16."""
    return (node is not None and node.op_type == "Cast" and node.domain in ("", "ai.onnx")
            and node.attributes.get_int("to") == ir.DataType.FLOAT16)


def resize_refusal(node: ir.Node, rule: OpRule) -> str | None:
    """Why a Resize stays float: its mode has no integer kernel (cubic), or not one the target runs, or it
    shrinks with antialias (the integer bilinear kernel reads two neighbours, not a filter stretched by 1/scale)."""
    mode = node.attributes.get_string("mode", "nearest")
    if mode == "cubic":
        return "cubic Resize has no integer kernel"
    if rule.modes is not None and mode not in rule.modes:
        return (f"ONNX Runtime interpolates a {mode} Resize in float between its DequantizeLinear and "
                "QuantizeLinear (it runs nearest on int8): kept float, its output quantized with a range of its own")
    if mode == "linear" and node.attributes.get_int("antialias", 0) and _may_shrink(node):
        return "a linear Resize with antialias=1 that shrinks has no integer kernel"
    return None


def _may_shrink(node: ir.Node) -> bool:
    """Whether a Resize makes an axis smaller, by its constant scales or sizes (True when it cannot tell)."""
    inputs = list(node.inputs) + [None] * 4
    scales = eir.constant_array(inputs[2]) if inputs[2] is not None else None
    if scales is not None and scales.size:
        return bool((scales < 1).any())
    sizes = eir.constant_array(inputs[3]) if inputs[3] is not None else None
    shape = inputs[0].shape if inputs[0] is not None else None
    if sizes is None or shape is None or len(sizes) != len(shape) or not all(isinstance(d, int) for d in shape):
        return True
    return any(int(size) < dim for size, dim in zip(sizes, shape))


def prelu_refusal(node: ir.Node) -> str | None:
    """Why a PRelu stays float: the integer kernel folds a constant slope into its multipliers."""
    if len(node.inputs) < 2 or node.inputs[1] is None or not eir.is_constant(node.inputs[1]):
        return "its slope is not a constant"
    return None


def gather_refusal(node: ir.Node, rule: OpRule) -> str | None:
    """Why a Gather stays float: the target's kernels gather at constant indices only, and these are not."""
    if rule.constant_indices and (len(node.inputs) < 2 or not eir.is_constant(node.inputs[1])):
        return ("a Gather at run-time indices (an embedding lookup) has no integer kernel in the C, which gathers "
                "at constant indices only")
    return None


#: The recurrent ops the MCU target quantizes (W and R per gate row) and the C runs.
RECURRENT_OPS = ("RNN", "GRU", "LSTM")
#: The widest cell the C kernels take: R's int8 times the int16 hidden state, summed over H, stays in int32.
RECURRENT_MAX_HIDDEN = 512
_DEFAULT_ACTIVATIONS = {"RNN": ["tanh"], "GRU": ["sigmoid", "tanh"], "LSTM": ["sigmoid", "tanh", "tanh"]}


def recurrent_refusal(node: ir.Node, *, float_weights: bool = True) -> str | None:
    """Why an RNN, GRU or LSTM stays float: the integer kernels take constant weights and bias, the default
    activations, no clip, peepholes or coupled input-forget gate, all sequences at full length, ONNX's
    default layout and a hidden size of at most :data:`RECURRENT_MAX_HIDDEN`. ``float_weights``: check
    that W, R and B are float constants (not yet quantized)."""
    inputs = list(node.inputs) + [None] * (8 - len(node.inputs))
    for index, label in ((1, "W"), (2, "R"), (3, "B")):
        value = inputs[index]
        if float_weights and value is not None and value.name and not eir.is_constant(value):
            return f"its {label} is not a constant"
    if node.attributes.get_int("layout", 0) != 0:
        return "layout=1 (batch-first): the integer kernel takes ONNX's default layout, as ONNX Runtime does"
    if inputs[4] is not None and inputs[4].name:
        return "it has a sequence_lens input (the integer kernel runs every sequence to its full length)"
    if inputs[7] is not None and inputs[7].name:
        return "it has peepholes (input P): the integer kernel has none"
    if node.attributes.get_int("input_forget", 0):
        return "input_forget=1 (coupled input and forget gates): the integer kernel computes them apart"
    activations = node.attributes.get_strings("activations", None)
    default = _DEFAULT_ACTIVATIONS[node.op_type]
    if activations and [a.lower() for a in activations] != default * (len(activations) // len(default)):
        named = " and ".join(filter(None, (", ".join(name.capitalize() for name in default[:-1]),
                                          default[-1].capitalize())))
        return f"activations {list(activations)}: the integer kernel computes the default {named}"
    if node.attributes.get("clip") is not None:
        return "clip is set: the integer kernel does not clip the gates' inputs"
    hidden = node.attributes.get_int("hidden_size", 0)
    if hidden > RECURRENT_MAX_HIDDEN:
        return f"hidden_size {hidden}: the integer kernel takes at most {RECURRENT_MAX_HIDDEN}"
    return None


def pad_refusal(node: ir.Node, rule: OpRule) -> str | None:
    """Why a Pad stays float: it copies int8 values only in a mode of ``rule``'s, by constant,
    non-negative amounts, with a constant padding value."""
    mode = node.attributes.get_string("mode", "constant")
    if rule.modes is not None and mode not in rule.modes:
        *others, last = sorted(rule.modes)
        kernels = f"{', '.join(others)} and {last} padding have" if others else f"{last} padding has"
        return f"{mode} Pad has no integer kernel ({kernels})"
    amounts = [eir.constant_array(v) for v in node.inputs[1:2] if v is not None]
    if amounts and (amounts[0] is None or (amounts[0] < 0).any()):
        return "its pads are not constant and non-negative"
    if len(node.inputs) > 2 and node.inputs[2] is not None and not eir.is_constant(node.inputs[2]):
        return "its padding value is not a constant"
    if len(node.inputs) > 3 and node.inputs[3] is not None:  # left when the rank is unknown
        return "it pads some axes (an axes input) of a tensor of unknown rank"
    return None


def slow_group_refusal(node: ir.Node, rule: OpRule) -> str | None:
    """Why a grouped Conv stays float: its groups are ``rule.slow_group_channels`` input channels wide."""
    groups = node.attributes.get_int("group", 1)
    weight_shape = node.inputs[1].shape if len(node.inputs) > 1 and node.inputs[1] is not None else None
    per_group = weight_shape[1] if weight_shape is not None and len(weight_shape) > 1 else None
    if groups <= 1 or not isinstance(per_group, int) or per_group not in rule.slow_group_channels:
        return None
    return (f"a grouped Conv with {per_group} input channels per group: ONNX Runtime's int8 kernel runs it slower "
            "than its float Conv (depthwise convs and groups of 8 or more channels run faster in int8)")


def weight_axis(node: ir.Node, weight_rank: int) -> int | None:
    """The output-channel axis of ``node``'s weight, or None when per-channel does not apply.

    Conv [Cout, Cin/g, k...]: 0. ConvTranspose [Cin, Cout/g, k...]: 1 when
    group == 1 (with groups, axis 1 does not index output channels). Gemm:
    0 with transB (weight [N, K]) else 1. RNN/GRU/LSTM W/R [D, G*H, K]: 1 (per gate row). MatMul [K, N]: 1; a
    batched MatMul weight [..., K, N] is quantized per tensor, since ONNX Runtime's integer MatMul takes
    per-column zero points for a 2-D weight only (it refuses the model otherwise).
    """
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1 if node.attributes.get_int("group", 1) == 1 else None
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    if node.op_type in RECURRENT_OPS:  # W [D, G*H, I], R [D, G*H, H]: per gate row
        return 1
    if node.op_type == "MatMul":  # a batched weight [B, K, N]: per tensor (see the docstring)
        return 1 if weight_rank == 2 else None
    return None

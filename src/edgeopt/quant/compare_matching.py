"""Which tensor of the float model each quantized activation of a QDQ model stands for.

Matching works on any QDQ graph (edgeopt's or another quantizer's). For every
``DequantizeLinear`` whose input comes from a ``QuantizeLinear`` of an
activation ``T`` (not a constant), the DQ output is what the quantized model's
consumers read in place of ``T``; its float counterpart is

1. ``T`` itself when the float model has a tensor of that name, else the DQ
   output's name (a quantizer renames a quantized graph output's producer and
   gives the DQ the output's name);
2. then followed through single ``Relu``/``Clip`` consumers that the quantized
   model no longer has: a quantizer drops them because the Q range clamps.

The float model is compared after the float passes edgeopt's quantizer runs
(BatchNorm folded into the conv, whose output keeps the conv's name but now
holds the normalized values; MatMul + Add made one Gemm). Another quantizer
may keep the graph as given: ONNX Runtime's quantizes a conv's output before
its BatchNormalization, and a MatMul's before its bias Add. Given the
``original`` float model too, a tensor is compared with the original's when
the optimized model has no tensor of that name, or when the quantized model
still reads it with the op that the passes folded away (a BatchNormalization
reading the conv's output): the same name, the original's values.

Tensors found in neither have no counterpart and are only counted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.quant.compare_dynamic import dynamic_kind
from edgeopt.quant.ops import WEIGHT_ONLY_OPS, is_float16_cast, is_qdq_op
from edgeopt.quant.placement import DATA_MOVEMENT_OPS

__all__ = [
    "OutputCodes",
    "TensorMatch",
    "activation_pairs",
    "below_float32",
    "carried_value",
    "compared_by_name",
    "computed_before_quantizing",
    "computed_from",
    "dequantizes_constant",
    "fused_chain",
    "match_names",
    "match_tensors",
    "match_pairs",
    "may_hold_original",
    "missing_qdq_note",
    "output_codes",
    "quantized_input_names",
    "reads_quantized_constant",
    "value_names",
]

logger = logging.getLogger(__name__)

_RANGE_CLAMPS = ("Relu", "Clip")  # a quantizer may drop these: the Q range clamps instead


@dataclass(frozen=True, kw_only=True)
class TensorMatch:
    """A float-model tensor and the DequantizeLinear output standing in for it in the QDQ model.

    ``scale`` is the DQ node's, the step the tensor is read at (the largest one per axis: the coarsest), which
    is the Q's but where edgeopt quantizes at another (a lowered HardSigmoid's Q at the step over ``alpha``);
    ``zero_point`` is None when a per-axis Q has several.
    """

    float_name: str
    quant_name: str
    op_type: str
    scale: float
    zero_point: int | None
    zero_point_dtype: str
    original: bool = False  # a tensor of the float model as given, not of its optimized form


def value_names(graph: ir.Graph) -> dict[str, ir.Value]:
    """The graph's inputs and node outputs by name."""
    values = {v.name: v for v in graph.inputs if v.name}
    values.update((v.name, v) for node in graph for v in node.outputs if v.name)
    return values


def activation_pairs(model: ir.Model) -> list[tuple[ir.Node, ir.Node]]:
    """(QuantizeLinear, DequantizeLinear) pairs on activations, in graph order."""
    pairs = []
    for node in model.graph:
        if not is_qdq_op(node, "DequantizeLinear") or node.inputs[0] is None:
            continue
        quantize = node.inputs[0].producer()
        if is_qdq_op(quantize, "QuantizeLinear") and not eir.is_constant(quantize.inputs[0]):
            pairs.append((quantize, node))
    return pairs


def _follow_clamps(value: ir.Value, quant_names: set[str]) -> ir.Value:
    while True:
        users = eir.consumers(value)
        if len(users) != 1 or users[0].op_type not in _RANGE_CLAMPS or not users[0].outputs:
            return value
        clamped = users[0].outputs[0]
        if clamped.name in quant_names:
            return value
        value = clamped


def _zero_point(quantize: ir.Node) -> tuple[int | None, str]:
    zero_value = quantize.inputs[2] if len(quantize.inputs) > 2 else None
    array = eir.constant_array(zero_value)
    if array is None:
        dtype_attr = quantize.attributes.get("output_dtype")
        dtype = ir.DataType(dtype_attr.value).name.lower() if dtype_attr is not None else "uint8"
        return 0, dtype
    values = np.unique(array)
    return (int(values[0]) if values.size == 1 else None), str(array.dtype)


def _scale(quantize: ir.Node) -> float:
    array = eir.constant_array(quantize.inputs[1])
    return float(np.max(array)) if array is not None and array.size else math.nan


def _reader_ops(value: ir.Value) -> set[str]:
    return {use.node.op_type for use in value.uses()}


def _quantized_reader_ops(value: ir.Value) -> set[str]:
    """The op types reading ``value`` in a QDQ model, through its QuantizeLinear -> DequantizeLinear pairs."""
    ops = set()
    for use in value.uses():
        if not is_qdq_op(use.node, "QuantizeLinear"):
            ops.add(use.node.op_type)
            continue
        for dequantize in (u.node for u in use.node.outputs[0].uses() if is_qdq_op(u.node, "DequantizeLinear")):
            ops |= _reader_ops(dequantize.outputs[0])
    return ops


def _kept_as_given(name: str, quantized: ir.Value, float_values: Mapping[str, ir.Value],
                   original_values: Mapping[str, ir.Value]) -> bool:
    """Whether the quantized model holds the original float model's ``name`` rather than the optimized
    model's: the optimized model has no such tensor, or the quantized model reads it with an op the float
    passes removed there (the BatchNormalization after a conv, whose output then carries the conv's name)."""
    if name not in original_values:
        return False
    if name not in float_values:
        return True
    given, optimized = _reader_ops(original_values[name]), _reader_ops(float_values[name])
    return given != optimized and bool(_quantized_reader_ops(quantized) & (given - optimized))


def may_hold_original(float_model: ir.Model, quant_model: ir.Model) -> bool:
    """Whether an activation pair of ``quant_model`` may stand for a tensor of the float model as given
    rather than of its optimized form (:func:`_kept_as_given`): no tensor of its names in the optimized
    model, or one that the quantized model reads with an op the optimized model does not read it with.
    A model edgeopt quantized has neither, and the model as given (its weights) is not read at all."""
    float_values = value_names(float_model.graph)
    pairs = activation_pairs(quant_model)
    if not pairs:  # tensors matched by name: one the optimized model computes otherwise may be the given one's
        return compared_by_name(quant_model) and any(not _same_tensor(value, float_values.get(value.name))
                                                     for value in _named_tensors(quant_model))
    for quantize, dequantize in pairs:
        value = float_values.get(quantize.inputs[0].name) or float_values.get(dequantize.outputs[0].name)
        if value is None or not _quantized_reader_ops(quantize.inputs[0]) <= _reader_ops(value):
            return True
    return False


def _half_behind(value: ir.Value) -> ir.Value | None:
    """The float16 value ``value`` is a Cast to float32 of (a node computing in float16 under ``--fallback
    fp16`` writes it under the float model's name), else None."""
    cast = value.producer()
    if cast is None or cast.op_type != "Cast" or cast.attributes.get_int("to") != ir.DataType.FLOAT:
        return None
    return cast.inputs[0] if cast.inputs[0] is not None and cast.inputs[0].dtype == ir.DataType.FLOAT16 else None


def _counterpart(quantize: ir.Node, dequantize: ir.Node, float_values: Mapping[str, ir.Value],
                 original_values: Mapping[str, ir.Value]) -> tuple[ir.Value, bool] | None:
    """The float value the pair stands in for, and whether it is the original model's (a value a node
    computing in float16 writes is quantized through a Cast to float32, named otherwise: the cast value's
    name is the one to look for)."""
    quantized = quantize.inputs[0]
    half = _half_behind(quantized)
    for name in ((half.name,) if half is not None else ()) + (quantized.name, dequantize.outputs[0].name):
        if _kept_as_given(name, quantize.inputs[0], float_values, original_values):
            return original_values[name], True
        if name in float_values:
            return float_values[name], False
    return None


def _match(quantize: ir.Node, dequantize: ir.Node, float_values: Mapping[str, ir.Value],
           original_values: Mapping[str, ir.Value], quant_names: set[str]) -> TensorMatch | None:
    found = _counterpart(quantize, dequantize, float_values, original_values)
    if found is None:
        return None
    value = _follow_clamps(found[0], quant_names)
    # the op the user's model writes it with (an Add the passes made a Gemm -> Reshape is still an Add)
    producer = original_values.get(value.name, value).producer()
    zero_point, zero_point_dtype = _zero_point(quantize)
    return TensorMatch(float_name=value.name, quant_name=dequantize.outputs[0].name,
                       op_type=producer.op_type if producer is not None else "input",
                       scale=_scale(dequantize), zero_point=zero_point, zero_point_dtype=zero_point_dtype,
                       original=found[1])


def match_pairs(float_model: ir.Model, quant_model: ir.Model,
             original: ir.Model | None = None) -> tuple[list[TensorMatch], list[str], int]:
    """Matches (one per float tensor), names of unmatched DQ outputs, number of activation pairs."""
    float_values = value_names(float_model.graph)
    original_values = value_names(original.graph) if original is not None else {}
    quant_values = value_names(quant_model.graph)
    quant_names = set(quant_values)
    matched: dict[str, TensorMatch] = {}
    unmatched = []
    pairs = activation_pairs(quant_model)
    for quantize, dequantize in pairs:
        match = _match(quantize, dequantize, float_values, original_values, quant_names)
        if match is None or _shapes_differ(float_values.get(match.float_name), quant_values.get(match.quant_name)):
            # another network's tensor of the same name (a float twin built on it would not even load)
            unmatched.append(dequantize.outputs[0].name)
        else:
            matched.setdefault(match.float_name, match)
    return list(matched.values()), unmatched, len(pairs)


def _shapes_differ(float_value: ir.Value | None, quant_value: ir.Value | None) -> bool:
    """Whether both values have static shapes, and not the same one."""
    shapes = [None if v is None or v.shape is None else v.shape.dims for v in (float_value, quant_value)]
    static = all(dims is not None and all(isinstance(d, int) for d in dims) for dims in shapes)
    return static and tuple(shapes[0]) != tuple(shapes[1])


# ---------------------------------------------------------- a model without Q/DQ pairs: tensors by name

#: Ops whose output rearranges their input's values, so that a row for it repeats its input's: placement's data
#: movement, and Concat and Cast (a float16 model's joins), which change no value either.
DATA_MOVES = frozenset({*DATA_MOVEMENT_OPS, "Concat", "Cast"})


#: Ops that compute what another op computes in the float model (a weight-only model's MatMulNBits, a dynamic
#: int8 model's MatMulInteger), by the name of what they compute: a MatMul, a Gemm and a MatMulNBits are all a
#: matrix product.
_COMPUTES_AS = {"MatMulNBits": "MatMul", "Gemm": "MatMul", "GatherBlockQuantized": "Gather",
                "QAttention": "Attention", "MatMulInteger": "MatMul"}


def _kind(op_type: str) -> str:
    return _COMPUTES_AS.get(op_type, op_type)


def _written_as(value: ir.Value) -> str:
    """What computes ``value``: its producer's kind, a dynamic int8 chain's as the product it replaces."""
    producer = value.producer()
    return dynamic_kind(producer) or _kind(producer.op_type)


def _smoothing_mul(node: ir.Node) -> bool:
    """A Mul by a constant whose output only DynamicQuantizeLinear nodes read: SmoothQuant's ``X / s`` before a
    dynamic int8 model's products."""
    uses = node.outputs[0].uses() if node.op_type == "Mul" else ()
    return (bool(uses) and any(map(eir.is_constant, node.inputs))
            and all(use.node.op_type == "DynamicQuantizeLinear" for use in uses))


def _readers(value: ir.Value) -> frozenset[str]:
    """What the ops reading ``value`` compute, past the Casts a float16 conversion put before them and the
    DynamicQuantizeLinear of a dynamic int8 model's products (and the Mul by 1 / s SmoothQuant puts before
    that where it cannot fold)."""
    ops = set()
    for use in value.uses():
        if use.node.op_type in ("Cast", "DynamicQuantizeLinear") or _smoothing_mul(use.node):
            ops |= _readers(use.node.outputs[0])
        else:
            ops.add(_kind(use.node.op_type))
    return frozenset(ops)


def _same_tensor(quantized: ir.Value, candidate: ir.Value | None) -> bool:
    """Whether ``candidate`` of a float model is computed as ``quantized`` is: the same op writes it and the
    same ops read it (an unoptimized model's conv output, read by a BatchNormalization, is not the
    optimized model's conv output of that name, which holds the normalized values)."""
    if candidate is None or candidate.producer() is None or candidate.dtype not in _FLOAT_TYPES:
        return False
    return (_kind(candidate.producer().op_type) == _written_as(quantized)
            and _readers(candidate) == _readers(quantized))


def _named_tensors(quant_model: ir.Model) -> list[ir.Value]:
    """The float tensors computing ops of ``quant_model`` write, graph outputs aside (compared as outputs), and
    those of unknown type (a MatMulNBits output, which ONNX shape inference does not type)."""
    outputs = {value.name for value in quant_model.graph.outputs}
    return [value for node in quant_model.graph
            if node.op_type not in DATA_MOVES and not is_qdq_op(node, "DequantizeLinear")
            and not is_qdq_op(node, "QuantizeLinear")
            for value in node.outputs
            if value.name not in outputs and (value.dtype is None or value.dtype in _FLOAT_TYPES)]


def computed_from(value: ir.Value | None) -> ir.Value | None:
    """The tensor ``value`` carries, past data movement and Casts (a float16 model's). A data move's data is
    its first input (a Reshape's computed shape, a Slice's bounds are not); a Concat's, all of them."""
    while value is not None and value.producer() is not None and value.producer().op_type in DATA_MOVES:
        producer = value.producer()
        data = producer.inputs if producer.op_type == "Concat" else producer.inputs[:1]
        fed = [v for v in data if v is not None and not eir.is_constant(v)]
        if len(fed) != 1:
            break
        value = fed[0]
    return value


_LOW_TYPES = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.INT8, ir.DataType.UINT8,
                        ir.DataType.INT4, ir.DataType.UINT4})


def compared_by_name(model: ir.Model) -> bool:
    """Whether ``model``'s tensors are matched by name (:func:`match_names`): it has no activation Q/DQ pair
    and no integer operator (ONNX Runtime's QOperator format passes activations on as integers: only its
    float islands would be compared), and stores or computes something in less than float32 (a float16
    value or weight, an int4/int8 weight, a MatMulNBits), or it is a dynamic int8 model (DynamicQuantizeLinear
    and MatMulInteger only); a float32 model's tensors would all be exact."""
    if activation_pairs(model) or set(_integer_operators(model)) - _DYNAMIC_OPERATORS:
        return False
    if _integer_operators(model):  # a dynamic int8 model: its products are float tensors named as in float
        return True
    if any(node.op_type in WEIGHT_ONLY_OPS for node in model.graph):
        return True
    values = [*model.graph.initializers.values(), *(v for node in model.graph for v in node.outputs)]
    return any(value.dtype in _LOW_TYPES for value in values)


def match_names(float_model: ir.Model, quant_model: ir.Model,
                original: ir.Model | None = None) -> list[TensorMatch]:
    """For a model without activation Q/DQ pairs (float16, bfloat16, int4 weight-only, as edgeopt's or
    another converter writes them): each float tensor a computing op of ``quant_model`` writes under the
    name, op and readers of a tensor of ``float_model`` (or, failing that, of ``original``, the float
    model as given). Graph outputs are compared as outputs; data movement repeats its input's row.
    ``scale`` is NaN and ``zero_point_dtype`` the tensor's type there (``float16`` ...)."""
    float_values = value_names(float_model.graph)
    original_values = value_names(original.graph) if original is not None else {}
    matches = []
    for value in _named_tensors(quant_model):
        if _same_tensor(value, float_values.get(value.name)):
            kept_as_given = False
        elif _same_tensor(value, original_values.get(value.name)):
            kept_as_given = True
        else:
            continue
        float_op = (original_values if kept_as_given else float_values)[value.name].producer().op_type
        op_type = f"{float_op} (int8)" if dynamic_kind(value.producer()) else value.producer().op_type
        matches.append(TensorMatch(float_name=value.name, quant_name=value.name, op_type=op_type, scale=math.nan,
                                   zero_point=None,
                                   zero_point_dtype=(value.dtype or ir.DataType.FLOAT).name.lower(),
                                   original=kept_as_given))
    return matches


_INTEGER_OPERATORS = ("ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "QGemm", "DynamicQuantizeLinear")
#: The integer operators of a dynamic int8 model (edgeopt's int8-dynamic, ONNX Runtime's quantize_dynamic), whose
#: products are rescaled to float tensors under the float model's names: compared by name.
_DYNAMIC_OPERATORS = frozenset({"MatMulInteger", "DynamicQuantizeLinear"})


def _integer_operators(model: ir.Model) -> list[str]:
    """The op types of ``model`` that compute on integer activations (QLinearConv, MatMulInteger ...)."""
    return sorted({node.op_type for node in model.graph
                   if node.op_type.startswith("QLinear") or node.op_type in _INTEGER_OPERATORS})


def below_float32(model: ir.Model) -> str | None:
    """What makes ``model`` no float32 model, in words (QuantizeLinear/DequantizeLinear nodes, integer
    operators, float16/bfloat16 or low-bit values), or None for a float32 model."""
    if any(is_qdq_op(node, op) for node in model.graph for op in ("QuantizeLinear", "DequantizeLinear")):
        return "QuantizeLinear/DequantizeLinear nodes"
    if integer_ops := _integer_operators(model):
        return f"integer operators ({', '.join(integer_ops[:4])})"
    if compared_by_name(model):
        return "float16, bfloat16 or low-bit weights"
    return None


def missing_qdq_note(model: ir.Model) -> str | None:
    """Why ``model`` has no per-layer rows, told when it has none: no QuantizeLinear -> DequantizeLinear pair
    carries an activation (a float model, the two models given in the wrong order, or ONNX Runtime's
    QOperator or dynamic format, whose integer ops pass activations on as integers) and, for a model
    whose tensors are matched by name (:func:`compared_by_name`), none matched; None for a QDQ model."""
    if activation_pairs(model):
        return None
    if compared_by_name(model):
        return ("no tensor of the second model (float16, bfloat16 or weight-only, without Q/DQ pairs) is computed "
                "as a tensor of the float model of its name is, with the same op and readers: only its outputs are "
                "compared, no layer (was it made from this float model, and are its tensors named as there?)")
    what = ("(per-layer rows need an int8 QDQ model, as edgeopt quantize writes, or a float16, bfloat16 or "
            "weight-only one, given second)")
    integer_ops = _integer_operators(model)
    if integer_ops:
        return (f"the second model computes with integer operators ({', '.join(integer_ops[:4])}: ONNX Runtime's "
                "QOperator or dynamic format), which pass activations on as integers with no "
                "QuantizeLinear -> DequantizeLinear pair to compare: only its outputs are compared, no layer "
                f"{what[:-1]}; ONNX Runtime's quantize_static writes one with quant_format=QuantFormat.QDQ)")
    if not any(is_qdq_op(node, op) for node in model.graph for op in ("QuantizeLinear", "DequantizeLinear")):
        return ("the second model has no QuantizeLinear/DequantizeLinear node: only its outputs are compared, "
                f"no layer {what}")
    return ("the second model quantizes no activation (its DequantizeLinear nodes read constant weights: a "
            f"weight-only model): only its outputs are compared, no layer {what}")


def match_tensors(float_model: ir.Model, quant_model: ir.Model) -> tuple[TensorMatch, ...]:
    """The quantized activations of ``quant_model`` that have a counterpart in ``float_model``."""
    return tuple(match_pairs(float_model, quant_model)[0])


# ---------------------------------------------------------- walking a QDQ graph


def carried_value(value: ir.Value | None) -> ir.Value | None:
    """The float value a QuantizeLinear -> DequantizeLinear pair carries to ``value``, if it is one (through
    the Cast to float16 ``--fallback fp16`` puts between the pair and a node computing in float16)."""
    cast = value.producer() if value is not None else None
    if is_float16_cast(cast):
        value = cast.inputs[0]
    dequantize = value.producer() if value is not None else None
    quantize_node = dequantize.inputs[0].producer() if is_qdq_op(dequantize, "DequantizeLinear") else None
    if not is_qdq_op(quantize_node, "QuantizeLinear"):
        return None
    return _half_behind(quantize_node.inputs[0]) or quantize_node.inputs[0]


def computed_before_quantizing(quant_model: ir.Model, matches: list[TensorMatch]) -> dict[str, str | None]:
    """Float name -> the quantized model's name of what the node writing that tensor computes before its
    Q/DQ pair, for each match written by a node (and its fused chain) that reads no quantized constant
    and computes in float32: a Gather of the class token, a Concat, a LayerNorm kept float, an Add of two
    activations. What such a node writes there is its float arithmetic on its quantized inputs, exactly,
    so the error it holds came in with them; the node loses only what its output's pair rounds. Not when
    the match is a Relu or Clip whose clamping the pair's range does instead (:func:`_follow_clamps`).

    None for a data-movement node (a Reshape, a Gather) whose input's pair has the scale and zero point
    of its output's: the values it writes lie on that grid, so the pair changes none (nothing to run).
    But when reshapes on one grid carry the values of a node that has no row of its own (the Softmax an
    opset conversion wrapped in Flatten and Reshape), that node's tensor before its pair, in another shape
    of the same values in the same order (:func:`reshaped_from`)."""
    values = value_names(quant_model.graph)
    matched = {match.quant_name for match in matches}
    computed: dict[str, str | None] = {}
    for match in matches:
        before = carried_value(values.get(match.quant_name))
        node = before.producer() if before is not None else None
        if node is None or not before.name or before.dtype == ir.DataType.FLOAT16:
            continue
        if match.op_type in _RANGE_CLAMPS and node.op_type not in _RANGE_CLAMPS:
            continue  # a Relu the quantizer dropped (ORT's after an Add): what comes before the pair is unclamped
        if not any(map(reads_quantized_constant, fused_chain(node) or [node])):
            exact = _moves_on_one_grid(node, values[match.quant_name].producer())
            computed[match.float_name] = reshaped_from(node, matched) if exact else before.name
    return computed


_ORDER_KEEPING = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")


def reshaped_from(node: ir.Node, matched: Collection[str]) -> str | None:
    """The tensor, before its Q/DQ pair, of the node whose values ``node`` and the order-keeping reshapes
    before it (each on its input's grid) pass on, when that node reads no quantized constant and the
    tensors between have no row (``matched``: the DQ outputs with one); else None."""
    while eir.is_op(node, *_ORDER_KEEPING):
        source = next((v for v in node.inputs if v is not None and not eir.is_constant(v)), None)
        if source is None or source.name in matched:
            return None
        before = carried_value(source)
        node = before.producer() if before is not None else None
        if node is None or before.dtype == ir.DataType.FLOAT16:
            return None
        if not _moves_on_one_grid(node, source.producer()):
            computes = not any(map(reads_quantized_constant, fused_chain(node) or [node]))
            return before.name if computes and not eir.is_op(node, *DATA_MOVEMENT_OPS) else None
    return None


def _moves_on_one_grid(node: ir.Node, dequantize: ir.Node | None) -> bool:
    """Whether ``node`` only moves values (:data:`DATA_MOVEMENT_OPS`) of one input that a DequantizeLinear
    with the same scale, zero point and axis as ``dequantize`` (its output's) writes."""
    fed = [value for value in node.inputs if value is not None and not eir.is_constant(value)]
    if not eir.is_op(node, *DATA_MOVEMENT_OPS) or len(fed) != 1 or not is_qdq_op(dequantize, "DequantizeLinear"):
        return False
    source = fed[0].producer()
    return is_qdq_op(source, "DequantizeLinear") and _same_grid(source, dequantize)


def _same_grid(first: ir.Node, second: ir.Node) -> bool:
    if first.attributes.get_int("axis", 1) != second.attributes.get_int("axis", 1):
        return False
    for index in (1, 2):  # scale, zero point (absent from both: the same default)
        given = [node.inputs[index] if len(node.inputs) > index else None for node in (first, second)]
        if given == [None, None]:
            continue
        a, b = map(eir.constant_array, given)
        if a is None or b is None or a.dtype != b.dtype or not np.array_equal(a, b):
            return False
    return True


def reads_quantized_constant(node: ir.Node) -> bool:
    """Whether ``node`` reads a weight, bias or other constant quantized (through a DequantizeLinear, or a
    packed weight-only op's): its own output then carries that constant's rounding."""
    if node.op_type in WEIGHT_ONLY_OPS or node.domain not in ("", "ai.onnx"):
        return True
    return any(map(dequantizes_constant, node.inputs))


def dequantizes_constant(value: ir.Value | None) -> bool:
    """Whether ``value`` is a quantized constant, dequantized (through the Cast to float16 of
    ``--fallback fp16``): an int8 initializer's DequantizeLinear, or a Q -> DQ pair of a float one."""
    dequantize = value.producer() if value is not None else None
    if is_float16_cast(dequantize):
        dequantize = dequantize.inputs[0].producer()
    if not is_qdq_op(dequantize, "DequantizeLinear"):
        return False
    source = dequantize.inputs[0]
    quantize_node = source.producer()
    return eir.is_constant(source) or (is_qdq_op(quantize_node, "QuantizeLinear")
                                       and eir.is_constant(quantize_node.inputs[0]))


def quantized_input_names(node: ir.Node) -> list[str]:
    """Float names of a node's inputs that arrive through a Q -> DQ pair."""
    return [carried.name for carried in map(carried_value, node.inputs) if carried is not None]


def fused_chain(node: ir.Node | None, stop: Collection[str] = ()) -> list[ir.Node]:
    """``[head, ..., node]`` when ``node`` (a Relu, a Clip) reads no quantized input but, alone,
    the float output of a node fused with it (a conv) that reads quantized inputs: the error
    measured at ``node``'s output arises in the head. ``[]`` otherwise, and when the walk meets a
    node named in ``stop`` (one already float)."""
    chain = [node] if node is not None else []
    while chain and not quantized_input_names(chain[0]):
        fed = [v for v in chain[0].inputs if v is not None and not eir.is_constant(v)]
        producer = fed[0].producer() if len(fed) == 1 and len(fed[0].uses()) == 1 else None
        if producer is None or producer.name in stop or is_qdq_op(producer, "DequantizeLinear"):
            return []
        chain.insert(0, producer)
    return chain if len(chain) > 1 else []


_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
_CODE_TYPES = frozenset({ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16,
                         ir.DataType.INT4, ir.DataType.UINT4})


@dataclass(frozen=True)
class OutputCodes:
    """An integer graph output a QuantizeLinear writes (a model with int8 outputs): real = (q - zp) * scale."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        shape = [1] * codes.ndim
        if self.scale.size > 1:  # per axis
            shape[self.axis % codes.ndim] = -1
        scale, zero_point = self.scale.reshape(shape), self.zero_point.reshape(shape)
        return (codes.astype(np.float32) - zero_point.astype(np.float32)) * scale.astype(np.float32)


def output_codes(float_model: ir.Model, quant_model: ir.Model, outputs: list[str]) -> dict[str, OutputCodes]:
    """The quantized model's integer outputs, of float outputs of the float model, that a QuantizeLinear with
    constant scale and zero point writes: compared in real units, not as raw codes against real values."""
    float_types = {v.name: v.dtype for v in float_model.graph.outputs}
    codes = {}
    for value in quant_model.graph.outputs:
        node = value.producer()
        if (value.name not in outputs or float_types[value.name] not in _FLOAT_TYPES or value.dtype not in _CODE_TYPES
                or node is None or node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx")
                or node.attributes.get_int("block_size", 0)):
            continue
        scale = node.inputs[1].const_value
        zero_point = node.inputs[2] if len(node.inputs) > 2 else None
        if scale is None or (zero_point is not None and zero_point.const_value is None):
            continue
        codes[value.name] = OutputCodes(scale.numpy(), np.zeros(1) if zero_point is None
                                         else zero_point.const_value.numpy(), node.attributes.get_int("axis", 1))
        logger.info("output %s of the quantized model is %s codes: compared dequantized with the scale and zero "
                    "point of %s", value.name, value.dtype.name.lower(), node.name)
    return codes

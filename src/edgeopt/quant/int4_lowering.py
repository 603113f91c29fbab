"""How an int4 weight-only model is written: the MatMul/Gemm nodes chosen, their new constants, the rewrite.

A weight quantized in blocks (:mod:`edgeopt.quant.int4_blocks`) replaces its node in one of three ways
(:class:`Lowering`): ONNX Runtime's ``com.microsoft.MatMulNBits`` for a 2-D weight (``bits`` 4, or 8 for a
layer the 8-bit fallback holds), the standard ``DequantizeLinear(weight, scale, zero_point, axis,
block_size)`` feeding the MatMul for a weight of higher rank (opset 21), or ``com.microsoft.GatherBlockQuantized``
for a Gather's embedding table ``E [rows, D]``: quantized as the ``[D, rows]`` weight ``E^T`` is (blocks along
D), its codes are MatMulNBits' B with each row's blocks laid end to end, ``[rows, D * bits / 8]``, and its
scales and zero points ``[rows, ...]`` likewise. A weight read by several nodes (a
tied embedding) gets its constants once; the old float weight goes once nothing reads it.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.quant.float16 import UniqueNames
from edgeopt.quant.formats import Format
from edgeopt.quant.int4_blocks import BlockQuantizedWeight, encode_matmul_nbits, pack_nibbles

__all__ = [
    "MS_DOMAIN",
    "EncodedWeight",
    "GemmAsMatMul",
    "Lowering",
    "ReadConstant",
    "WeightTarget",
    "block_bytes",
    "dequantize_linear_constants",
    "drop_unread",
    "gather_block_quantized_constants",
    "gemm_as_matmul",
    "lower_dequantize_linear",
    "lower_gather_block_quantized",
    "lower_matmul_nbits",
    "matmul_nbits_constants",
    "read_constant",
    "uncovered_weights_note",
]

MS_DOMAIN = "com.microsoft"


class Lowering(enum.Enum):
    MATMUL_NBITS = "MatMulNBits"
    DEQUANTIZE_LINEAR = "DequantizeLinear"
    GATHER_BLOCK_QUANTIZED = "GatherBlockQuantized"  # an embedding table's rows, for a Gather


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightTarget:
    """A MatMul/Gemm whose weight is quantized: the effective ``[..., K, N]`` weight, the format it is held in
    (int4/uint4, or the 8-bit fallback's) and its extras."""

    node: ir.Node
    weight_value: ir.Value
    weight: np.ndarray
    weight_axis: int  # the K axis of the weight as stored (for the report)
    lowering: Lowering
    weight_format: Format | None = None  # set once the node is matched against the config

    @property
    def activation(self) -> ir.Value | None:
        """What the weight multiplies (whose channels weigh its rounding), None for a Gather's table."""
        return None if self.lowering is Lowering.GATHER_BLOCK_QUANTIZED else self.node.inputs[0]
    bias: np.ndarray | None = None  # [N], MatMulNBits' bias input
    addend: ir.Value | np.ndarray | None = None  # added after the product when it is not a row bias


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncodedWeight:
    """A quantized weight's new constants (quantized values, scales, zero points or None), shared by
    every node that reads the same weight, and their bytes."""

    values: tuple[ir.Value, ir.Value, ir.Value | None]
    nbytes: int
    k: int = 0  # MatMulNBits' attributes
    n: int = 0
    block_size: int = 0
    bits: int = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReadConstant:
    """A constant as a node reads it: directly, or through Transpose/Identity nodes."""

    value: ir.Value  # the constant itself
    array: np.ndarray  # what the node reads
    axes: tuple[int, ...]  # axes[i]: the axis of the stored constant that read axis i comes from


def read_constant(value: ir.Value | None) -> ReadConstant | None:
    """``value`` as a constant, looking through Transpose/Identity (a tied weight's ``Transpose(E)``,
    left unfolded so that E is stored once), or None."""
    array = eir.constant_array(value)
    if array is not None:
        return ReadConstant(value=value, array=array, axes=tuple(range(array.ndim)))
    producer = value.producer() if value is not None else None
    if not eir.is_op(producer, "Transpose", "Identity") or producer.inputs[0] is None:
        return None
    source = read_constant(producer.inputs[0])
    if source is None or producer.op_type == "Identity":
        return source
    perm = producer.attributes.get_ints("perm", None) or tuple(reversed(range(source.array.ndim)))
    return ReadConstant(value=source.value, array=np.transpose(source.array, perm),
                        axes=tuple(source.axes[axis] for axis in perm))


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmAsMatMul:
    """A Gemm ``alpha * A @ op(B) + beta * C`` with a constant B as ``A @ weight`` plus a row ``bias`` or an
    ``addend`` (a constant or a tensor, added after the product)."""

    weight: np.ndarray  # [K, N], alpha folded in
    k_axis: int  # the K axis of B as stored (1 when transB)
    bias: np.ndarray | None = None  # [N]
    addend: ir.Value | np.ndarray | None = None


def gemm_as_matmul(node: ir.Node, weight: np.ndarray) -> GemmAsMatMul | str:
    """The Gemm ``node`` (B = ``weight``) as a product by a ``[K, N]`` weight, or why it cannot be one."""
    attributes = node.attributes
    if attributes.get_int("transA", 0):
        return "transA=1: its input would need a Transpose"
    alpha, beta = attributes.get_float("alpha", 1.0), attributes.get_float("beta", 1.0)
    transposed = bool(attributes.get_int("transB", 0))
    effective = np.ascontiguousarray((weight.T if transposed else weight) * np.float32(alpha), np.float32)
    k_axis = 1 if transposed else 0
    c_value = node.inputs[2] if len(node.inputs) > 2 else None
    if c_value is None:
        return GemmAsMatMul(weight=effective, k_axis=k_axis)
    c = eir.constant_array(c_value)
    if c is None:
        if beta != 1.0:
            return f"non-constant C with beta={beta}: it would need a Mul"
        return GemmAsMatMul(weight=effective, k_axis=k_axis, addend=c_value)
    c = (np.asarray(c, dtype=np.float32) * np.float32(beta)).astype(np.float32)
    if c.ndim <= 1 or (c.ndim == 2 and c.shape[0] == 1):  # broadcasts along rows: a bias
        return GemmAsMatMul(weight=effective, k_axis=k_axis,
                            bias=np.broadcast_to(c.reshape(-1), (effective.shape[1],)).copy())
    return GemmAsMatMul(weight=effective, k_axis=k_axis, addend=c)


def drop_unread(value: ir.Value | None) -> None:
    """Remove ``value`` once nothing reads it, with the Transpose/Identity chain that made it from a constant
    (each from the graph, main or subgraph, that holds it)."""
    while value is not None and not value.uses() and not value.is_graph_output():
        producer = value.producer()
        if not eir.is_op(producer, "Transpose", "Identity"):
            if value.graph is not None:
                eir.drop_if_unused(value.graph, value)
            return
        value = producer.inputs[0]
        producer.graph.remove(producer, safe=True)


def block_bytes(shape: tuple[int, ...], block_size: int, fmt: Format, lowering: Lowering) -> int:
    """Bytes of a ``[..., K, N]`` weight quantized in blocks along K in ``fmt``: codes, scales, zero points."""
    *batch, k, n = shape
    matrices, blocks, per_byte = int(np.prod(batch, dtype=np.int64)), -(-k // block_size), 8 // fmt.bits
    zero_points = not fmt.symmetric
    if lowering is not Lowering.DEQUANTIZE_LINEAR:  # K padded to whole blocks; zero points packed per column
        return n * blocks * (block_size // per_byte + 4) + zero_points * n * -(-blocks // per_byte)
    codes, scales = matrices * k * n, matrices * blocks * n
    return -(-codes // per_byte) + 4 * scales + zero_points * -(-scales // per_byte)


def _initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))
    graph.register_initializer(value)
    return value


def _typed_initializer(graph: ir.Graph, name: str, values: np.ndarray, fmt: Format) -> ir.Value:
    """An ONNX tensor of ``fmt``: INT4/UINT4 flattened and packed two per byte, 8-bit as they are."""
    if fmt.bits == 8:
        return eir.register_array(graph, name, values.astype(fmt.numpy_dtype))
    packed = pack_nibbles(values.reshape(-1), fmt)
    return _initializer(graph, name, ir.PackedTensor(packed, fmt.onnx_type, shape=values.shape, name=name))


def _addend_value(graph: ir.Graph, names: UniqueNames, target: WeightTarget) -> ir.Value | None:
    if isinstance(target.addend, np.ndarray):
        return eir.register_array(graph, names(f"{target.node.name or 'gemm'}_C"), target.addend)
    return target.addend


def matmul_nbits_constants(graph: ir.Graph, names: UniqueNames, base: str,
                           quantized: BlockQuantizedWeight) -> EncodedWeight:
    encoded = encode_matmul_nbits(quantized)
    zero_points = (None if encoded.zero_points is None
                   else eir.register_array(graph, names(f"{base}_zero_points"), encoded.zero_points))
    values = (eir.register_array(graph, names(f"{base}_Q{encoded.bits}"), encoded.packed),
              eir.register_array(graph, names(f"{base}_scales"), encoded.scales), zero_points)
    return EncodedWeight(values=values, nbytes=sum(v.const_value.nbytes for v in values if v is not None),
                         k=encoded.k, n=encoded.n, block_size=encoded.block_size, bits=encoded.bits)


def lower_matmul_nbits(graph: ir.Graph, names: UniqueNames, target: WeightTarget, accuracy_level: int | None,
                       encoded: EncodedWeight) -> None:
    """Replace the node by MatMulNBits (+ Add) reading the ``encoded`` weight."""
    node = target.node
    inputs: list[ir.Value | None] = [node.inputs[0], *encoded.values, None, None]
    if target.bias is not None:
        inputs[5] = eir.register_array(graph, names(f"{node.name or target.weight_value.name}_bias"), target.bias)
    while inputs[-1] is None:
        inputs.pop()
    attributes = [ir.AttrInt64("K", encoded.k), ir.AttrInt64("N", encoded.n),
                  ir.AttrInt64("bits", encoded.bits), ir.AttrInt64("block_size", encoded.block_size)]
    if accuracy_level is not None:
        attributes.append(ir.AttrInt64("accuracy_level", accuracy_level))
    nbits = ir.Node(MS_DOMAIN, "MatMulNBits", inputs, attributes, num_outputs=1,
                    name=names(f"{node.name or 'matmul'}_Q{encoded.bits}"), version=1)
    new_nodes, result = [nbits], nbits.outputs[0]
    addend = _addend_value(graph, names, target)
    if addend is not None:
        result.name, result.type = names(f"{node.outputs[0].name}_product"), ir.TensorType(ir.DataType.FLOAT)
        add = ir.Node("", "Add", [result, addend], num_outputs=1, name=names(f"{node.name or 'gemm'}_add"))
        new_nodes.append(add)
        result = add.outputs[0]
    # the node's own graph (a subgraph's MatMul is replaced there); the new constants are the main graph's
    ir.convenience.replace_nodes_and_values(node.graph, node, [node], new_nodes, [node.outputs[0]], [result])


def dequantize_linear_constants(graph: ir.Graph, names: UniqueNames, base: str,
                                quantized: BlockQuantizedWeight) -> EncodedWeight:
    fmt = quantized.format
    values = (_typed_initializer(graph, names(f"{base}_{fmt.name}"), quantized.q, fmt),
              eir.register_array(graph, names(f"{base}_scale"), quantized.scale),
              None if fmt.symmetric else _typed_initializer(graph, names(f"{base}_zero_point"),
                                                            quantized.zero_point, fmt))
    per_byte = 8 // fmt.bits
    zero_point_bytes = 0 if fmt.symmetric else -(-quantized.zero_point.size // per_byte)
    return EncodedWeight(values=values, bits=fmt.bits,
                         nbytes=-(-quantized.q.size // per_byte) + quantized.scale.nbytes + zero_point_bytes)


def gather_block_quantized_constants(graph: ir.Graph, names: UniqueNames, base: str,
                                     quantized: BlockQuantizedWeight) -> EncodedWeight:
    """The constants of GatherBlockQuantized for a table quantized as its transpose ``[D, rows]``."""
    encoded = encode_matmul_nbits(quantized)  # [rows, D / b, b * bits / 8]: each row's blocks in order
    rows = encoded.n
    arrays = (encoded.packed.reshape(rows, -1), encoded.scales.reshape(rows, -1),
              None if encoded.zero_points is None else encoded.zero_points.reshape(rows, -1))
    values = tuple(None if array is None else eir.register_array(graph, names(f"{base}_{suffix}"), array)
                   for array, suffix in zip(arrays, (f"rows_Q{encoded.bits}", "row_scales", "row_zero_points")))
    return EncodedWeight(values=values, nbytes=sum(v.const_value.nbytes for v in values if v is not None),
                         k=encoded.k, n=rows, block_size=encoded.block_size, bits=encoded.bits)


def lower_gather_block_quantized(graph: ir.Graph, names: UniqueNames, target: WeightTarget,
                                 encoded: EncodedWeight) -> None:
    """Replace the Gather by GatherBlockQuantized reading the ``encoded`` table (rows along axis 0)."""
    node = target.node
    data, scales, zero_points = encoded.values
    inputs = [data, node.inputs[1], scales, *([zero_points] if zero_points is not None else [])]
    attributes = [ir.AttrInt64("gather_axis", 0), ir.AttrInt64("quantize_axis", 1),
                  ir.AttrInt64("block_size", encoded.block_size), ir.AttrInt64("bits", encoded.bits)]
    gather = ir.Node(MS_DOMAIN, "GatherBlockQuantized", inputs, attributes, num_outputs=1,
                     name=names(f"{node.name or 'gather'}_Q{encoded.bits}"), version=1)
    ir.convenience.replace_nodes_and_values(node.graph, node, [node], [gather], [node.outputs[0]], [gather.outputs[0]])


def lower_dequantize_linear(names: UniqueNames, target: WeightTarget, quantized: BlockQuantizedWeight,
                            encoded: EncodedWeight) -> None:
    """Feed the MatMul from DequantizeLinear of the ``encoded`` (INT4, UINT4 or 8-bit) weight."""
    node, base = target.node, target.weight_value.name
    inputs = [v for v in encoded.values if v is not None]
    dequantize_node = ir.Node("", "DequantizeLinear", inputs,
                              [ir.AttrInt64("axis", quantized.axis), ir.AttrInt64("block_size", quantized.block_size)],
                              num_outputs=1, name=names(f"{base}_DequantizeLinear"))
    output = dequantize_node.outputs[0]
    output.name, output.type = names(f"{base}_dequantized"), ir.TensorType(ir.DataType.FLOAT)
    output.shape = ir.Shape(quantized.q.shape)
    node.graph.insert_before(node, dequantize_node)
    node.replace_input_with(1, output)


#: The readers of a weight int4-weight rewrites, or reports when it leaves their weight float (``_kept_note``).
_INT4_READERS = frozenset({"MatMul", "Gemm", "Gather"})


#: What int4-weight writes (com.microsoft): their float inputs are its scales, not weights left float.
_INT4_WRITTEN = frozenset({"MatMulNBits", "GatherBlockQuantized"})


def uncovered_weights_note(graph: ir.Graph, scheme: str = "int4-weight") -> list[str]:
    """The float weights (constants of rank >= 2) that nodes int4 (or int8-dynamic, ``scheme``) never rewrites
    read (Conv, GRU, LSTM...; the fused Attention and EmbedLayerNormalization of ONNX Runtime's transformer
    optimizer): the size line counts their bytes, and without this note nothing said why the file stayed that
    large."""
    readers: dict[str, int] = {}
    nbytes, fused, seen = 0, set(), set()
    for node in graph:
        if node.op_type in (_INT4_READERS if node.domain in ("", "ai.onnx") else _INT4_WRITTEN):
            continue
        weights = [value for value in node.inputs if value is not None and value.const_value is not None
                   and len(value.shape or ()) >= 2 and value.dtype in (ir.DataType.FLOAT, ir.DataType.DOUBLE)]
        if weights:
            readers[node.op_type] = readers.get(node.op_type, 0) + 1
            fused.update({node.op_type} if node.domain not in ("", "ai.onnx") else set())
        nbytes += sum(value.const_value.nbytes for value in weights if id(value) not in seen)
        seen.update(id(value) for value in weights)
    if not readers:
        return []
    ops = ", ".join(f"{op} x{count}" for op, count in sorted(readers.items()))
    smaller = ("--scheme int8 stores them in a quarter of that, fp16 in half" if set(readers) <= {"Conv"}
               else "--scheme fp16 stores them in half of that")  # int8 keeps a GRU/LSTM float: no integer kernel
    if fused:  # fp16 and int8 keep these contrib ops float32 too
        smaller = (f"ONNX Runtime's fused {', '.join(sorted(fused))} (com.microsoft) "
                   f"{'reads' if len(fused) == 1 else 'read'} them as float32 inputs, "
                   f"with no {scheme.removesuffix('-weight')} form: optimize the model with those fusions off (its "
                   f"FusionOptions) for MatMul and Gather nodes {scheme.removesuffix('-weight')} rewrites")
    return [f"{scheme} rewrites MatMul/Gemm weights only: those of {ops} stay float32 ({nbytes:,} bytes); "
            + smaller]

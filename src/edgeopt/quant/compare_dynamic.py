"""How compare reads a dynamic int8 model (edgeopt's int8-dynamic, ONNX Runtime's ``quantize_dynamic``): its
products are float tensors under the float model's names, each the end of a chain that quantized its input as
the model ran."""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["DYNAMIC_OPS", "DYNAMIC_PRODUCTS", "dynamic_kind", "dynamic_product_input", "is_dynamic_model"]


# A dynamic int8 model's product: DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul (rescale) [-> Add
# (bias)]; its embedding lookup: Gather (int8 rows) -> Cast -> Mul (row scales); an LSTM: one
# DynamicQuantizeLSTM (com.microsoft), quantizing each step's input and hidden state inside; ONNX Runtime's fused
# Attention: DynamicQuantizeLinear -> QAttention (com.microsoft).
DYNAMIC_PRODUCTS = {"MatMulInteger": "MatMul", "Gather": "Gather"}
DYNAMIC_OPS = {"DynamicQuantizeLSTM": "LSTM", "QAttention": "Attention"}


def dynamic_kind(node: ir.Node) -> str | None:
    """What a dynamic int8 model's rescaling Mul (or the bias Add after it), or its one-node quantized op
    (DynamicQuantizeLSTM), computes, else None."""
    if node.op_type in DYNAMIC_OPS:
        return DYNAMIC_OPS[node.op_type]
    if node.op_type == "Add":
        return next((kind for value in node.inputs if value is not None and value.producer() is not None
                     and value.producer().op_type == "Mul" and (kind := dynamic_kind(value.producer()))), None)
    if node.op_type != "Mul":
        return None
    for value in node.inputs:
        cast = value.producer() if value is not None else None
        if cast is not None and cast.op_type == "Cast" and cast.inputs[0] is not None:
            source = cast.inputs[0].producer()
            if source is not None and (source.op_type == "MatMulInteger" or (
                    source.op_type == "Gather" and _integer_table(source))):
                return DYNAMIC_PRODUCTS[source.op_type]
    return None


def _integer_table(gather: ir.Node) -> bool:
    table = gather.inputs[0] if gather.inputs else None
    return table is not None and table.const_value is not None and table.const_value.dtype in (
        ir.DataType.INT8, ir.DataType.UINT8)


def dynamic_product_input(node: ir.Node | None) -> ir.Value | None | bool:
    """For the last node of a dynamic int8 chain (its rescaling Mul or bias Add): what it quantized as it ran
    (the MatMul's activation, a table lookup's indices); False for any other node."""
    if node is None or dynamic_kind(node) is None:
        return False
    if node.op_type in DYNAMIC_OPS:  # an LSTM's sequence input, quantized step by step inside; a QAttention's
        quantize = node.inputs[0].producer() if node.inputs[0] is not None else None
        return quantize.inputs[0] if quantize is not None and quantize.op_type == "DynamicQuantizeLinear" \
            else node.inputs[0]
    if node.op_type == "Add":
        node = next(v.producer() for v in node.inputs if v is not None and v.producer() is not None
                    and v.producer().op_type == "Mul" and dynamic_kind(v.producer()))
    source = next(v.producer().inputs[0].producer() for v in node.inputs
                  if v is not None and v.producer() is not None and v.producer().op_type == "Cast")
    if source.op_type == "Gather":
        return source.inputs[1]
    quantize = source.inputs[0].producer() if source.inputs[0] is not None else None
    return quantize.inputs[0] if quantize is not None and quantize.op_type == "DynamicQuantizeLinear" else None


def is_dynamic_model(model: ir.Model) -> bool:
    """Whether ``model`` quantizes activations as it runs (DynamicQuantizeLinear, DynamicQuantizeLSTM)."""
    return any(node.op_type == "DynamicQuantizeLinear" or node.op_type in DYNAMIC_OPS for node in model.graph)

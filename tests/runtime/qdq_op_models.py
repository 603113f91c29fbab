"""One op between Q/DQ pairs, built with onnx.helper: ``input -> Q -> DQ -> op -> Q -> DQ -> output``.

For ops ONNX Runtime's quantizer does not place Q/DQ pairs around (PRelu, DepthToSpace, a linear Resize):
the scales are chosen here, int8 activations. ``float_twin`` drops the output's Q/DQ pair, so ONNX Runtime
computes the op in float on the dequantized input (what the integer result is measured against).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

__all__ = ["float_twin", "op_model", "random_feeds"]

INPUT_QUANTIZATION = (0.03, 5)  # scale, int8 zero point: inputs drawn from N(0, 1) use most of the range


def _initializers(constants: dict[str, np.ndarray]) -> list[onnx.TensorProto]:
    return [numpy_helper.from_array(np.asarray(array), name) for name, array in constants.items()]


def op_model(op: str, input_shape, output_shape, *, inputs=(), constants=None, output_quantization=None,
             opset: int = 19, **attributes) -> ir.Model:
    """``op`` reading the dequantized input then ``inputs`` (names of ``constants``, or "" for absent ones);
    its output quantized with ``output_quantization`` (default: the input's, as for data movement)."""
    constants = dict(constants or {})
    in_scale, in_zero = INPUT_QUANTIZATION
    out_scale, out_zero = output_quantization or INPUT_QUANTIZATION
    constants |= {"s_in": np.float32(in_scale), "z_in": np.int8(in_zero),
                  "s_out": np.float32(out_scale), "z_out": np.int8(out_zero)}
    nodes = [helper.make_node("QuantizeLinear", ["input", "s_in", "z_in"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "s_in", "z_in"], ["x"]),
             helper.make_node(op, ["x", *inputs], ["y"], name=f"the_{op.lower()}", **attributes),
             helper.make_node("QuantizeLinear", ["y", "s_out", "z_out"], ["y_q"]),
             helper.make_node("DequantizeLinear", ["y_q", "s_out", "z_out"], ["output"])]
    graph = helper.make_graph(nodes, op.lower(), [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                list(input_shape))],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, list(output_shape))],
                              _initializers(constants))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    onnx.checker.check_model(proto)
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


def float_twin(model: ir.Model) -> ir.Model:
    """``model`` without its output Q/DQ pair: the op's float result on the dequantized input."""
    proto = ir.to_proto(model)
    kept = [node for node in proto.graph.node if "y_q" not in node.input and "y_q" not in node.output]
    for node in kept:
        node.output[:] = ["output" if name == "y" else name for name in node.output]
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    return ir.from_proto(proto)


def random_feeds(shape, count: int = 2, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]

"""Small QDQ graphs around LayerNorm and an erf GELU, written with onnx.helper, for the reference and the C.

``qdq_graph(body, ...)`` wraps float nodes between ``x -> Q -> DQ -> xd`` and ``y -> Q -> DQ -> out``: the
body reads ``xd`` and writes ``y`` (both float); input and output scales are given, zero points nonzero.
The bodies: ``layer_norm_op`` (ONNX LayerNormalization), ``spelled_layer_norm`` (ReduceMean/Sub/Pow/...
in the variants exporters write) and ``spelled_gelu`` (Div/Erf/Add/Mul in several associations).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper, shape_inference


def constant(name: str, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def qdq_graph(body, initializers, shape, *, in_scale=0.05, out_scale=0.03, opset=17, zero_points=(3, -5)):
    """An ir.Model: x -> Q/DQ -> body (reads "xd", writes "y") -> Q/DQ -> out."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s_in", "z_in"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s_in", "z_in"], ["xd"]),
             *body,
             helper.make_node("QuantizeLinear", ["y", "s_out", "z_out"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s_out", "z_out"], ["out"])]
    scalars = [constant("s_in", in_scale), constant("s_out", out_scale), constant("z_in", zero_points[0], np.int8),
               constant("z_out", zero_points[1], np.int8)]
    graph = helper.make_graph(nodes, "body", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, list(shape))],
                              [*scalars, *initializers])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    return ir.from_proto(shape_inference.infer_shapes(model, strict_mode=True))


def layer_norm_op(gamma: np.ndarray, beta: np.ndarray | None, *, axis=-1, epsilon=1e-5):
    inputs = ["xd", "gamma"] + (["beta"] if beta is not None else [])
    initializers = [constant("gamma", gamma)] + ([constant("beta", beta)] if beta is not None else [])
    return [helper.make_node("LayerNormalization", inputs, ["y"], axis=axis, epsilon=epsilon)], initializers


def spelled_layer_norm(axes, gamma=None, beta=None, *, epsilon=1e-5, square="Pow", divide="Div", twin=False):
    """mean/var over ``axes`` (ReduceMean with an axes attribute: opset < 18), optional gamma Mul (constant first,
    as torch writes ``weight[:, None, None] * x``) and beta Add."""
    nodes = [helper.make_node("ReduceMean", ["xd"], ["mean"], axes=list(axes), keepdims=1),
             helper.make_node("Sub", ["xd", "mean"], ["d"])]
    if twin:
        nodes.append(helper.make_node("Sub", ["xd", "mean"], ["d2"]))
    d_square = "d2" if twin else "d"
    nodes.append(helper.make_node("Pow", [d_square, "two"], ["sq"]) if square == "Pow"
                 else helper.make_node("Mul", [d_square, d_square], ["sq"]))
    nodes += [helper.make_node("ReduceMean", ["sq"], ["var"], axes=list(axes), keepdims=1),
              helper.make_node("Add", ["eps", "var"], ["var_eps"]),
              helper.make_node("Sqrt", ["var_eps"], ["std"])]
    if divide == "Div":
        nodes.append(helper.make_node("Div", ["d", "std"], ["n"]))
    else:
        nodes += [helper.make_node("Reciprocal", ["std"], ["inv"]), helper.make_node("Mul", ["inv", "d"], ["n"])]
    initializers = [constant("two", 2.0), constant("eps", epsilon)]
    last = "n"
    if gamma is not None:
        nodes.append(helper.make_node("Mul", ["gamma", last], ["scaled"]))
        initializers.append(constant("gamma", gamma))
        last = "scaled"
    if beta is not None:
        nodes.append(helper.make_node("Add", [last, "beta"], ["shifted"]))
        initializers.append(constant("beta", beta))
        last = "shifted"
    nodes[-1].output[0] = "y"
    return nodes, initializers


def spelled_gelu(variant: str):
    """0.5 * x * (1 + erf(x / sqrt(2))) in the associations exporters write."""
    scale = (helper.make_node("Div", ["xd", "sqrt2"], ["a"]) if variant != "mul_inverse"
             else helper.make_node("Mul", ["inv_sqrt2", "xd"], ["a"]))
    nodes = [scale, helper.make_node("Erf", ["a"], ["e"]), helper.make_node("Add", ["one", "e"], ["p"])]
    if variant == "half_x_first":  # torch: x * 0.5 * (1 + erf(...))
        nodes += [helper.make_node("Mul", ["xd", "half"], ["hx"]), helper.make_node("Mul", ["hx", "p"], ["y"])]
    elif variant == "half_last":  # (x * (1 + erf)) * 0.5
        nodes += [helper.make_node("Mul", ["xd", "p"], ["xp"]), helper.make_node("Mul", ["xp", "half"], ["y"])]
    else:  # 0.5 * ((1 + erf) * x)
        nodes += [helper.make_node("Mul", ["p", "xd"], ["px"]), helper.make_node("Mul", ["half", "px"], ["y"])]
    initializers = [constant("sqrt2", math.sqrt(2.0)), constant("inv_sqrt2", 1 / math.sqrt(2.0)),
                    constant("one", 1.0), constant("half", 0.5)]
    return nodes, initializers

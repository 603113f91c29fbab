"""Helpers over ``onnx_ir`` that every stage needs.

The in-memory model type of edgeopt is :class:`onnx_ir.Model`; this package
adds the small queries passes and analyses share: the constant behind a value
(initializer or ``Constant`` node), static shapes and numpy dtypes, the model's
real inputs, and the default-domain opset.
"""

from __future__ import annotations

from edgeopt.ir.values import (
    ONNX_DOMAINS,
    InputSpec,
    constant_array,
    default_opset,
    index_arithmetic_values,
    index_limits,
    infer_shapes,
    is_constant,
    is_op,
    is_quantized_constant,
    model_inputs,
    numpy_dtype,
    outer_reads,
    reduce_axes,
    run_time_grid_values,
    shape_derived_values,
    static_shape,
    subgraphs,
    value_bytes,
    values_by_name,
)

__all__ = [
    "ONNX_DOMAINS",
    "InputSpec",
    "constant_array",
    "default_opset",
    "index_arithmetic_values",
    "index_limits",
    "infer_shapes",
    "is_constant",
    "is_op",
    "is_quantized_constant",
    "model_inputs",
    "numpy_dtype",
    "outer_reads",
    "reduce_axes",
    "run_time_grid_values",
    "shape_derived_values",
    "static_shape",
    "subgraphs",
    "value_bytes",
    "values_by_name",
]

from edgeopt.ir.rewrite import (  # noqa: E402  (appended: graph-rewrite builders)
    add_initializer,
    consumers,
    drop_if_unused,
    node_label,
    other_input,
    register_array,
    remove_nodes,
    replace_constant_input,
    replace_nodes,
    replace_value,
    replace_value_refusal,
    sole_consumer,
    unique_value_name,
)

__all__ += [
    "add_initializer",
    "consumers",
    "drop_if_unused",
    "node_label",
    "other_input",
    "register_array",
    "remove_nodes",
    "replace_constant_input",
    "replace_nodes",
    "replace_value",
    "replace_value_refusal",
    "sole_consumer",
    "unique_value_name",
]

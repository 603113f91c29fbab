"""Lowering of the ops image-to-image networks (super-resolution, segmentation) end with.

* **PRelu** ``y = x if x >= 0 else slope * x``, the slope a constant. One value (any size-1 array): a lookup
  table, as LeakyRelu, exact (the float op evaluated for the 256 int8 inputs). A slope along one axis (a
  channel's, ``[C, 1, 1]`` on NCHW): TFLite's int8 PRelu, two requantizations of ``d = x - zp_in``:
  ``zp_out + requant(d, s_in / s_out)`` where ``d >= 0`` and ``zp_out + requant(sign(slope[c]) * d,
  |slope[c]| * s_in / s_out)`` below, the slope folded into the Q31 multiplier (relative error 2**-31), so
  the result is within half a step of ``slope * x`` with single rounding, and within three quarters with
  TFLite's double rounding (its high multiply rounds first, to ``2**shift`` of a step); ONNX Runtime's float
  PRelu between the Q/DQ pairs agrees to one step.
* **DepthToSpace** (modes DCR and CRD) and **SpaceToDepth**: int8 data movement that keeps the input's
  quantization. On the NHWC storage each is a reshape to six axes (free), one transpose and a reshape back;
  with ``b`` the block size, DCR reads channel ``(i * b + j) * C' + c``, CRD ``c * b * b + i * b + j``, into
  ``out[n, h * b + i, w * b + j, c]``, and SpaceToDepth is DCR's inverse.
* **Resize mode=linear** (and Upsample's linear), over H and W of NCHW, scales or sizes constant:
  TFLite's int8 ResizeBilinear. Each output row ``i`` reads rows ``r0 = floor(u)``, ``r1 = min(r0 + 1, H - 1)``
  of the source coordinate ``u`` (``coordinate_transformation_mode`` as ONNX defines it, clamped to
  ``[0, H - 1]`` as ONNX Runtime does) with weights ``(1024 - f, f)``, ``f = round(1024 * (u - r0))``, columns
  alike; the Q20 sum of the four int8 neighbours is rounded once, so the output, at the input's scale, is
  within ``0.5 + 2 * 255 / 2048`` (under 0.75) steps of the exact interpolation. Nearest is
  :func:`edgeopt.runtime.reference.same_scale.lower_resize`.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.errors import UnsupportedOpError
from edgeopt.runtime.reference.lower import (
    Lowering,
    attribute,
    node_label,
    real_multiplier,
    text_attribute,
)
from edgeopt.runtime.reference.program import (
    LutParams,
    PReluParams,
    ReshapeParams,
    ResizeBilinearParams,
    TransposeParams,
)
from edgeopt.runtime.reference.same_scale import lower_resize as lower_resize_nearest
from edgeopt.runtime.reference.same_scale import rank4_input, resize_scales
from edgeopt.runtime.reference.tables import linear_weights, lut_table

__all__ = ["lower_depth_to_space", "lower_prelu", "lower_resize"]


# -- PRelu ------------------------------------------------------------------------------------------


def _constant_slope(lo: Lowering, node: ir.Node) -> np.ndarray:
    value = node.inputs[1] if len(node.inputs) > 1 else None
    if value is None or (eir.constant_array(value) is None and not eir.is_quantized_constant(value)):
        raise UnsupportedOpError(f"{node_label(node)}: its slope must be a constant (an initializer)")
    return lo.real_constant(value, node)


def lower_prelu(lo: Lowering, node: ir.Node) -> None:
    x = lo.activation(node.inputs[0], node)
    slope, info, plan = _constant_slope(lo, node), lo.tensors[x], lo.output_plan(node)
    rank = len(info.shape)
    if slope.ndim > rank:
        raise UnsupportedOpError(f"{node_label(node)}: its slope has more axes than its input")
    aligned = slope.reshape((1,) * (rank - slope.ndim) + slope.shape)
    varying = [axis for axis, size in enumerate(aligned.shape) if size > 1]
    if not varying:
        alpha = np.float32(aligned.reshape(-1)[0])
        table = lut_table(lambda v: np.where(v >= 0, v, v * alpha), lo.params_of(x), plan)
        lo.finish("lut", [x], plan, LutParams(table=table), node)
        return
    if len(varying) > 1:
        raise UnsupportedOpError(f"{node_label(node)}: a slope varying along {len(varying)} axes is not supported "
                                 "(one value, or one per channel, is)")
    source, slopes = lo.params_of(x), aligned.reshape(-1)
    multiplier, shift = lo.per_channel_multipliers(np.abs(slopes) * source.scale / plan.qparams.scale)
    positive_multiplier, positive_shift = real_multiplier(source.scale / plan.qparams.scale)
    params = PReluParams(axis=info.layout.index(varying[0]), input_zero_point=source.zero_point,
                         output_zero_point=plan.qparams.zero_point, positive_multiplier=positive_multiplier,
                         positive_shift=positive_shift, negative_multiplier=multiplier, negative_shift=shift,
                         negative_sign=np.sign(slopes).astype(np.int8), act_min=plan.act_min, act_max=plan.act_max)
    lo.finish("prelu", [x], plan, params, node)


# -- DepthToSpace / SpaceToDepth ----------------------------------------------------------------------


def _blocks(node: ir.Node, shape: tuple[int, ...], block: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The six-axis view of the NHWC input and the transpose that moves its blocks."""
    n, h, w, c = shape
    if node.op_type == "SpaceToDepth":
        if h % block or w % block:
            raise UnsupportedOpError(f"{node_label(node)}: H and W must be multiples of the block size {block}")
        return (n, h // block, block, w // block, block, c), (0, 1, 3, 2, 4, 5)
    mode = text_attribute(node, "mode", "DCR")
    if c % (block * block):
        raise UnsupportedOpError(f"{node_label(node)}: C must be a multiple of the block size squared")
    if mode == "DCR":
        return (n, h, w, block, block, c // block ** 2), (0, 1, 3, 2, 4, 5)
    if mode == "CRD":
        return (n, h, w, c // block ** 2, block, block), (0, 1, 4, 2, 5, 3)
    raise UnsupportedOpError(f"{node_label(node)}: DepthToSpace mode={mode} is not supported (DCR and CRD are)")


def lower_depth_to_space(lo: Lowering, node: ir.Node) -> None:
    """DepthToSpace and SpaceToDepth: reshape (aliased by the planner), six-axis transpose, reshape."""
    x = rank4_input(lo, node, "only rank-4 (NCHW) tensors are supported")
    view, perm = _blocks(node, lo.tensors[x].shape, int(attribute(node, "blocksize")))
    qparams, value = lo.params_of(x), node.outputs[0]
    blocks = lo.add_stored_tensor(f"{value.name}__blocks", view, qparams, range(6))
    lo.emit("reshape", [x], blocks, ReshapeParams(shape=view), node)
    moved_shape = tuple(view[axis] for axis in perm)
    moved = lo.add_stored_tensor(f"{value.name}__moved", moved_shape, qparams, range(6))
    lo.emit("transpose", [blocks], moved, TransposeParams(perm=perm), node)
    name = lo.add_tensor(value.name, lo.logical_shape(value), qparams)
    if lo.tensors[name].size != lo.tensors[moved].size:
        raise UnsupportedOpError(f"{node_label(node)}: its output shape does not match its block size")
    lo.bind(value, lo.emit("reshape", [moved], name, ReshapeParams(shape=lo.tensors[name].shape), node))


# -- Resize, mode linear ---------------------------------------------------------------------------------


def _check_bilinear(node: ir.Node, in_shape, out_shape) -> None:
    if in_shape[:2] != out_shape[:2]:
        raise UnsupportedOpError(f"{node_label(node)}: Resize may only scale H and W")
    if attribute(node, "antialias", 0) and any(o < i for o, i in zip(out_shape[2:], in_shape[2:])):
        raise UnsupportedOpError(f"{node_label(node)}: a linear Resize with antialias=1 that shrinks is not "
                                 "supported (export it with antialias=0)")
    policy = text_attribute(node, "keep_aspect_ratio_policy", "stretch")
    if policy != "stretch":
        raise UnsupportedOpError(f"{node_label(node)}: keep_aspect_ratio_policy={policy} is not supported")


def _lower_bilinear(lo: Lowering, node: ir.Node) -> None:
    x = rank4_input(lo, node, "only rank-4 (NCHW) tensors are supported")
    in_shape, value = lo.tensors[x].logical_shape, node.outputs[0]
    out_shape = lo.logical_shape(value)
    _check_bilinear(node, in_shape, out_shape)
    scales = resize_scales(lo, node, 4)
    try:
        (row_low, row_high, row_fraction), (col_low, col_high, col_fraction) = (
            linear_weights(node, lo.opset, in_shape[a], out_shape[a], None if scales is None else scales[a])
            for a in (2, 3))
    except UnsupportedOpError as error:
        raise UnsupportedOpError(f"{node_label(node)}: {error}") from None
    params = ResizeBilinearParams(row_low=row_low, row_high=row_high, row_fraction=row_fraction,
                                  col_low=col_low, col_high=col_high, col_fraction=col_fraction)
    name = lo.add_tensor(value.name, out_shape, lo.params_of(x))
    lo.bind(value, lo.emit("resize_bilinear", [x], name, params, node))


def lower_resize(lo: Lowering, node: ir.Node) -> None:
    """Resize and Upsample: nearest (a gather of rows and columns) or linear (bilinear); cubic is refused."""
    mode = text_attribute(node, "mode", "nearest")
    if mode in ("linear", "bilinear"):
        _lower_bilinear(lo, node)
    elif mode == "nearest":
        lower_resize_nearest(lo, node)
    else:
        raise UnsupportedOpError(f"{node_label(node)}: Resize mode={mode} is not supported (nearest and linear are)")

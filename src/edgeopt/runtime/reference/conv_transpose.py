"""Lower a 2-D ONNX ConvTranspose (group 1, or depthwise) to the ``conv_transpose2d`` integer op.

Per spatial axis, ConvTranspose scatters input index ``i`` through tap ``k`` onto position
``i * stride + k * dilation`` of an uncropped output of ``full = stride * (in - 1) + dilation * (kernel - 1)
+ 1`` positions; the output starts ``begin`` positions in and is ``out`` long (ONNX spec):

* ``pads`` (auto_pad NOTSET): ``begin = pads[start]``, ``out = full + output_padding - pads[start] - pads[end]``;
* ``output_shape`` given, or auto_pad SAME_UPPER / SAME_LOWER (which ask for ``out = in * stride``): the total
  padding ``full + output_padding - out`` is split in two, the odd one at the end for SAME_UPPER and at the
  start otherwise. A negative total is refused for ``output_shape``, as ONNX Runtime does, and is 0 for
  SAME_* (a stride longer than the dilated kernel), as ONNX Runtime and ONNX's shape inference make it;
* VALID: ``begin = 0``, ``out = full + output_padding``.

The output pixel ``o`` then reads, in gather form, every tap whose ``o + begin - k * dilation`` is a multiple
of the stride landing inside the input. The weight ``W[C_in, C_out / group, kH, kW]`` is stored OHWI, as a
Conv's: group 1 transposes its two channel axes; depthwise (``group = C_in = C_out``) is ``W[C, 1, kH, kW]``,
output channel ``o`` reading input channel ``o`` alone. Per-channel scales index output channels: weight axis
1 with group 1, axis 0 for depthwise. The bias is int32 at ``input_scale * weight_scale``, and the
requantization and clamp (a following Relu/Clip folded in) are a Conv's.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgeopt.errors import UnsupportedOpError
from edgeopt.runtime.reference.lower import Lowering, attribute, node_label, text_attribute
from edgeopt.runtime.reference.program import ConvTranspose2dParams

__all__ = ["lower_conv_transpose", "transposed_geometry"]

_SUPPORTED = "1-D or 2-D ConvTranspose with group 1 or depthwise (group = input channels = output channels)"


def transposed_geometry(node: ir.Node, in_hw, kernel, strides, dilations) -> tuple[tuple[int, int], tuple[int, int]]:
    """((begin_h, begin_w), (out_h, out_w)) of a ConvTranspose, as the ONNX spec computes them (module doc)."""
    auto_pad = text_attribute(node, "auto_pad", "NOTSET")
    output_padding = list(attribute(node, "output_padding", [0, 0]))
    output_shape = attribute(node, "output_shape", None)
    pads = list(attribute(node, "pads", [0, 0, 0, 0]))
    begins, sizes = [], []
    for axis, (size, k, s, d) in enumerate(zip(in_hw, kernel, strides, dilations)):
        full = s * (size - 1) + d * (k - 1) + 1 + int(output_padding[axis])  # output_padding included
        if output_shape is not None:
            total = full - int(list(output_shape)[axis - 2])
            if total < 0:
                raise UnsupportedOpError(f"{node_label(node)}: output_shape {list(output_shape)} is larger than "
                                         "the transposed convolution computes (ONNX Runtime refuses it too)")
        elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            total = max(0, full - size * s)
        else:
            begin, end = (0, 0) if auto_pad == "VALID" else (int(pads[axis]), int(pads[axis + 2]))
            begins.append(begin)
            sizes.append(full - begin - end)
            continue
        begins.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
        sizes.append(full - total)
    return (begins[0], begins[1]), (sizes[0], sizes[1])


def _weight(lo: Lowering, node: ir.Node, in_channels: int, out_channels: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(int8 OHWI weight, per-output-channel scale, group), or refuse what the kernel does not take."""
    group = int(attribute(node, "group", 1))
    if group != 1 and not group == in_channels == out_channels:
        raise UnsupportedOpError(f"{node_label(node)}: ConvTranspose with group {group} over {in_channels} input "
                                 f"and {out_channels} output channels is not supported; the C kernel takes "
                                 f"{_SUPPORTED}: write it as one ConvTranspose per group, each on a Split of the "
                                 "input, joined by a Concat")
    weight, scale = lo.weight(node.inputs[1], node, channel_axis=1 if group == 1 else 0)
    if weight.ndim != 4:
        raise UnsupportedOpError(f"{node_label(node)}: a {weight.ndim - 2}-D ConvTranspose is not supported; "
                                 f"the C kernel takes {_SUPPORTED}")
    order = (1, 2, 3, 0) if group == 1 else (0, 2, 3, 1)  # to (O, KH, KW, I / group)
    return np.ascontiguousarray(weight.transpose(order)), scale, group


def lower_conv_transpose(lo: Lowering, node: ir.Node) -> None:
    x = lo.activation(node.inputs[0], node)
    in_shape = lo.tensors[x].shape
    if len(in_shape) != 4:
        raise UnsupportedOpError(f"{node_label(node)}: a rank-{len(in_shape)} input; the C kernel takes {_SUPPORTED}")
    plan, source = lo.output_plan(node), lo.params_of(x)
    recorded = lo.logical_shape(node.outputs[0])
    weight, weight_scale, group = _weight(lo, node, in_shape[3], recorded[1])
    strides = tuple(int(s) for s in attribute(node, "strides", [1, 1]))
    dilations = tuple(int(d) for d in attribute(node, "dilations", [1, 1]))
    begins, out_hw = transposed_geometry(node, in_shape[1:3], weight.shape[1:3], strides, dilations)
    if tuple(recorded[2:]) != out_hw or recorded[1] != weight.shape[0]:
        raise UnsupportedOpError(f"{node_label(node)}: the model records output shape {list(recorded)}, the ONNX "
                                 f"formula gives {[in_shape[0], weight.shape[0], *out_hw]} (ONNX's shape "
                                 "inference differs for auto_pad SAME_* with output_padding): give explicit pads")
    bias = lo.bias(node.inputs[2] if len(node.inputs) > 2 else None, node, source.scale * weight_scale)
    multiplier, shift = lo.per_channel_multipliers(source.scale * weight_scale / plan.qparams.scale)
    params = ConvTranspose2dParams(
        weight=weight, bias=bias, multiplier=multiplier, shift=shift, input_zero_point=source.zero_point,
        output_zero_point=plan.qparams.zero_point, strides=strides, dilations=dilations, pads=begins,
        output_hw=out_hw, group=group, act_min=plan.act_min, act_max=plan.act_max)
    lo.finish("conv_transpose2d", [x], plan, params, node)

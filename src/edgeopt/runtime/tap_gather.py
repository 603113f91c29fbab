"""Sampled taps gathered inside ONNX Runtime: a few positions of a large feature map, not the whole map.

A calibration hook that needs, per sample, a fixed set of positions of a
tensor (depthwise GPTQ's tap windows: 8 windows of 9 taps out of a 112x112
map) asks the range session for them with a :class:`TapGather`. The session
takes one more input, :data:`TAP_STREAM_INPUT`: the index in the calibration
stream of each row (sample) of the run. Row ``r`` of the gathered output holds
the values of the flattened map at ``table[stream[r] % len(table)]``, per
channel: ``[rows, C, len(table[0])]``, what ``x[r].reshape(C, -1)[:, table[p]]``
gives in numpy. So which positions a sample gives depends on its place in the
stream only, however samples are grouped into runs.

A tensor whose rows are not the run's rows (its batch does not follow the
inputs') fails to run or comes back with another number of rows, which the
hook checks against the stream it is given (:func:`check_stream`: a ModelError, one clear line).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from edgeopt.errors import ModelError

__all__ = ["TAP_STREAM_INPUT", "TapGather", "add_tap_gather_nodes", "check_stream"]

#: The int64 ``[rows]`` input of a session with tap gathers: each row's index in the calibration stream.
TAP_STREAM_INPUT = "edgeopt_tap_stream"


@dataclass(frozen=True, eq=False)
class TapGather:
    """Gather from tensor ``source`` (``[N, C, *spatial]``, spatial dims static) the flattened positions
    ``table[phase]`` (int64 ``[phases, T]``, each in ``[0, prod(spatial))``) of each row, its phase the
    row's stream index modulo ``phases``. (A convolution's zero padding is the caller's to apply: a tap
    on it points at some position of the map, whose value it gets.)"""

    source: str
    table: np.ndarray
    channels: int
    dtype: np.dtype = np.dtype(np.float32)  # the source's

    @property
    def row_bytes(self) -> int:
        """Bytes returned per row (sample)."""
        return self.channels * self.table.shape[1] * np.dtype(self.dtype).itemsize


def check_stream(stream: np.ndarray | None, gathered: np.ndarray, first: int, where: str, remedy: str) -> np.ndarray:
    """The stream indices of ``gathered``'s rows, checked: one per row, counting on from ``first``."""
    if stream is None or not np.array_equal(stream, np.arange(first, first + gathered.shape[0])):
        raise ModelError(f"the taps gathered from {where} do not match the rows of the run: its batch does not "
                         f"follow the model's inputs ({remedy})")
    return stream


def add_tap_gather_nodes(graph, gathers: Mapping[str, TapGather]) -> None:
    """For each gather (output name -> :class:`TapGather`): the nodes computing it from ``source`` and
    :data:`TAP_STREAM_INPUT`, added to the protobuf ``graph`` with the input and the outputs.

    ``table[stream % phases]`` is expanded over the channels to the source's own rows (``[N, C, T]``):
    a source with more rows than the stream (a batch not following the inputs) comes back with
    them, one with fewer fails to run.
    """
    if not gathers:
        return
    helper = onnx.helper
    graph.input.append(helper.make_tensor_value_info(TAP_STREAM_INPUT, onnx.TensorProto.INT64, ["edgeopt_rows"]))
    constant = _Constants(graph)
    start, one, two = constant("start", [0]), constant("one", [1]), constant("two", [2])

    def node(op_type: str, inputs: list[str], name: str, **attributes) -> None:
        graph.node.append(helper.make_node(op_type, inputs, [name], name=name, **attributes))

    phase_of = {}  # each row's phase, by number of phases: one node for the gathers sharing it
    for output, gather in gathers.items():
        phases, taps = gather.table.shape
        if phases not in phase_of:
            phase_of[phases] = f"__edgeopt_tap_phase_{phases}"
            node("Mod", [TAP_STREAM_INPUT, constant(f"phases_{phases}", phases)], phase_of[phases])
        stem = output + "__edgeopt_tap"
        table = constant(stem + "_table", gather.table)
        flat = constant(f"flat_{gather.channels}", [0, gather.channels, -1])
        node("Gather", [table, phase_of[phases]], stem + "_rows", axis=0)  # [stream rows, T]
        node("Reshape", [stem + "_rows", constant(f"rows_{taps}", [-1, 1, taps])], stem + "_index")
        node("Reshape", [gather.source, flat], stem + "_flat")  # [N, C, H W]
        node("Shape", [stem + "_flat"], stem + "_shape")
        node("Slice", [stem + "_shape", start, two], stem + "_rows_channels")
        node("Concat", [stem + "_rows_channels", one], stem + "_target", axis=0)  # [N, C, 1]
        node("Expand", [stem + "_index", stem + "_target"], stem + "_indices")
        node("GatherElements", [stem + "_flat", stem + "_indices"], output, axis=2)
        graph.output.append(onnx.ValueInfoProto(name=output))


class _Constants:
    """int64 initializers of a protobuf graph, each added once by name."""

    def __init__(self, graph) -> None:
        self.graph, self.names = graph, set()

    def __call__(self, name: str, value) -> str:
        name = "__edgeopt_tap_" + name
        if name not in self.names:
            self.names.add(name)
            self.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value, dtype=np.int64), name))
        return name


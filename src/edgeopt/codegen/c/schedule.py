"""The execution order of a lowered program, chosen to lower the peak of live activation bytes.

Any topological order of the ops computes the same tensors; on a branching
graph (residual, SE, concat branches) the orders differ in how many tensors
are live at once. The cost of an order is its *peak*: the maximum over its
steps of the bytes live during the step -- the tensors produced earlier and
still to be read (model outputs to the end), plus the op's output, minus the
input the op overwrites in place (see :func:`in_place_input`).

The search is exact on graphs whose set of reachable *states* (the sets of
ops already run, i.e. the down-sets of the graph) stays small: a bottleneck
shortest path (Dijkstra on the running max) from the empty set to the full
set; ``live(S)`` depends on ``S`` only, so the best peak to reach each state
is all the search needs to keep. A chain has ``n + 1`` states and a residual
or SE block adds a handful, so real CNNs stay small; when the state budget
runs out, the model's own order is kept.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, replace

from edgeopt.runtime.reference.ops import OPS
from edgeopt.runtime.reference.program import IntOp, Program

__all__ = ["MAX_STATES", "Schedule", "choose_schedule", "in_place_input", "reorder"]

MAX_STATES = 20_000


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """Op indices of the original program in execution order, with the peak before and after."""

    order: tuple[int, ...]
    graph_order_peak_bytes: int
    peak_bytes: int
    method: str  # "searched" (optimal order), "graph order" (kept: already optimal or search too large)


def in_place_input(op: IntOp, program: Program, dies_here) -> str | None:
    """The input ``op`` may overwrite: at a position the kernel allows (``OPS[kind].in_place``), not also
    read at another position, the output's size, not a constant or model output, dying at ``op``."""
    allowed = OPS[op.kind].in_place
    outputs = {io.tensor for io in program.outputs}
    size = program.tensors[op.output].size
    for position in allowed:
        name = op.inputs[position]
        read_elsewhere = any(other == name for index, other in enumerate(op.inputs) if index not in allowed)
        if (not read_elsewhere and name not in program.constants and name not in outputs
                and program.tensors[name].size == size and dies_here(name)):
            return name
    return None


class _Graph:
    """Bitmask view of the program: predecessors and consumers of every op and tensor."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.ops = program.ops
        producer = {op.output: index for index, op in enumerate(self.ops)}
        self.predecessors = [0] * len(self.ops)
        self.consumers: dict[str, int] = {}
        for index, op in enumerate(self.ops):
            for name in op.inputs:
                if name in producer:
                    self.predecessors[index] |= 1 << producer[name]
                if name not in program.constants:
                    self.consumers[name] = self.consumers.get(name, 0) | (1 << index)
        self.outputs = {io.tensor for io in program.outputs}
        self.size = {name: info.size for name, info in program.tensors.items()}
        self.initial_live = sum(self.size[io.tensor] for io in program.inputs)

    def dies_after(self, name: str, done: int) -> bool:
        return name not in self.outputs and self.consumers.get(name, 0) & ~done == 0

    def step(self, done: int, live: int, index: int) -> tuple[int, int]:
        """(bytes live during op ``index`` run after ``done``, bytes live after it)."""
        op, after = self.ops[index], done | (1 << index)
        overwritten = in_place_input(op, self.program, lambda name: self.dies_after(name, after))
        during = live + self.size[op.output] - (self.size[overwritten] if overwritten else 0)
        freed = sum(self.size[name] for name in set(op.inputs) - set(self.program.constants)
                    if self.dies_after(name, after))
        if self.dies_after(op.output, after):
            freed += self.size[op.output]
        return during, live + self.size[op.output] - freed

    def peak_of(self, order: Sequence[int]) -> int:
        done, live, peak = 0, self.initial_live, self.initial_live
        for index in order:
            during, live = self.step(done, live, index)
            done, peak = done | (1 << index), max(peak, during)
        return peak


def _search(graph: _Graph) -> tuple[int, ...] | None:
    """The order of least peak, or None when more than MAX_STATES states were reached."""
    full = (1 << len(graph.ops)) - 1
    best = {0: graph.initial_live}
    live_of = {0: graph.initial_live}
    parent: dict[int, tuple[int, int]] = {}
    queue = [(graph.initial_live, 0, 0)]  # (peak, -ops done, state); deeper states first among equal peaks
    while queue:
        peak, _, done = heapq.heappop(queue)
        if done == full:
            order = []
            while done:
                done, index = parent[done]
                order.append(index)
            return tuple(reversed(order))
        if peak > best[done]:
            continue
        for index in range(len(graph.ops)):
            if done >> index & 1 or graph.predecessors[index] & ~done:
                continue
            during, live = graph.step(done, live_of[done], index)
            state, new_peak = done | (1 << index), max(peak, during)
            if new_peak < best.get(state, new_peak + 1):
                if state not in best and len(best) >= MAX_STATES:
                    return None
                best[state], live_of[state], parent[state] = new_peak, live, (done, index)
                heapq.heappush(queue, (new_peak, -state.bit_count(), state))
    return None


def choose_schedule(program: Program) -> Schedule:
    """The order of least peak live bytes (exact search), or the model's order when the search is too large."""
    graph = _Graph(program)
    natural = tuple(range(len(program.ops)))
    natural_peak = graph.peak_of(natural)
    found = _search(graph) if program.ops else None
    if found is None or graph.peak_of(found) >= natural_peak:
        return Schedule(order=natural, graph_order_peak_bytes=natural_peak, peak_bytes=natural_peak,
                        method="graph order")
    return Schedule(order=found, graph_order_peak_bytes=natural_peak, peak_bytes=graph.peak_of(found),
                    method="searched")


def reorder(program: Program, order: Sequence[int]) -> Program:
    """``program`` with its ops run in ``order`` (indices into ``program.ops``; must be topological)."""
    if sorted(order) != list(range(len(program.ops))):
        raise ValueError(f"schedule {list(order)} is not a permutation of the {len(program.ops)} ops")
    ready = {io.tensor for io in program.inputs} | set(program.constants)
    for index in order:
        op = program.ops[index]
        missing = [name for name in op.inputs if name not in ready]
        if missing:
            raise ValueError(f"schedule runs {op.node} before its input(s) {', '.join(missing)} are written")
        ready.add(op.output)
    return replace(program, ops=tuple(program.ops[index] for index in order))

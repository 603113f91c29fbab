"""The static arena of a lowered program: tensor lifetimes, in-place aliasing, placement, bounds.

Step ``i`` is the ``i``-th op of the schedule (see :mod:`.schedule`, which
picks the order); model inputs live from step 0. A tensor lives from the step
that writes it to the last step that reads it; model outputs live to the last
step (the caller reads them after the run). Constants are ``const`` arrays in
flash and take no arena space. The kernels need no scratch memory
(convolutions accumulate straight from the input), except a recurrent cell's state: its
op's ``scratch`` tensor, which lives during that step only.

In place: when an op's kernel may overwrite an input (``OPS[kind].in_place``
lists the positions: elementwise requantize/LUT/Add/Mul/Softmax, Reshape, and
the shortcut -- never the conv input -- of a fused ``conv2d_add``) and an input
of the output's size at such a position is read for the last time by that op,
output and input share one *buffer*. Buffers, not tensors, are placed; a buffer lives from its first
tensor's start to its last tensor's end and is as large as its largest.

Placement: the greedy best-fit planner of :mod:`edgeopt.analysis.memory`
(largest first, lowest free aligned offset), then, for at most
``EXACT_SEARCH_MAX_BUFFERS`` buffers, an exact branch-and-bound search over
the offsets where a buffer can touch an already placed one (every optimal
plan can be shifted down onto such offsets), bounded by the best arena so far
and stopped at the lower bound ``max_step(sum of live buffer bytes)``, or
after ``SEARCH_NODE_LIMIT`` nodes / ``SEARCH_TIME_LIMIT_S`` seconds (then the
best plan found is kept, and it is not proven optimal).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from edgeopt.analysis.memory import (
    ArenaPlan,
    TensorLifetime,
    check_no_overlap,
    greedy_arena_plan,
)
from edgeopt.codegen.c.schedule import in_place_input
from edgeopt.runtime.reference.program import Program

__all__ = ["EXACT_SEARCH_MAX_BUFFERS", "MemoryPlan", "exact_arena_plan", "plan_memory", "program_lifetimes"]

EXACT_SEARCH_MAX_BUFFERS = 48
SEARCH_NODE_LIMIT = 200_000
SEARCH_TIME_LIMIT_S = 2.0


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    """Arena offsets of every activation tensor, with the bounds the plan is judged by."""

    plan: ArenaPlan  # offsets of buffers, keyed by buffer name (its first tensor)
    lifetimes: tuple[TensorLifetime, ...]  # of tensors
    buffers: tuple[TensorLifetime, ...]
    buffer_of: dict[str, str]  # tensor -> buffer name
    in_place: tuple[tuple[str, str], ...]  # (input, output) pairs sharing a buffer
    greedy_bytes: int
    method: str  # "greedy", "branch and bound"
    optimal: bool  # arena == lower bound, or the search finished

    @property
    def arena_bytes(self) -> int:
        return self.plan.arena_bytes

    @property
    def lower_bound_bytes(self) -> int:
        return self.plan.lower_bound_bytes

    def offset(self, tensor: str) -> int:
        return self.plan.offsets[self.buffer_of[tensor]]


def program_lifetimes(program: Program) -> tuple[TensorLifetime, ...]:
    last_step = max(len(program.ops) - 1, 0)
    start = {io.tensor: 0 for io in program.inputs}
    end = dict(start)
    for step, op in enumerate(program.ops):
        start.setdefault(op.output, step)
        end[op.output] = max(end.get(op.output, step), step)
        if op.scratch is not None:  # the kernel's working memory, during its op only
            start[op.scratch] = end[op.scratch] = step
        for name in op.inputs:
            if name not in program.constants:
                end[name] = max(end.get(name, step), step)
    for io in program.outputs:
        end[io.tensor] = last_step
    return tuple(TensorLifetime(name=name, size_bytes=program.tensors[name].size, start=start[name], end=end[name])
                 for name in start)


def _in_place_pairs(program: Program, lifetimes: Sequence[TensorLifetime]) -> tuple[tuple[str, str], ...]:
    end = {t.name: t.end for t in lifetimes}
    pairs = []
    for step, op in enumerate(program.ops):
        source = in_place_input(op, program, lambda name, step=step: end[name] == step)
        if source is not None:
            pairs.append((source, op.output))
    return tuple(pairs)


def _buffers(lifetimes: Sequence[TensorLifetime], pairs) -> tuple[tuple[TensorLifetime, ...], dict[str, str]]:
    """Merge in-place chains into buffers named after their first tensor."""
    buffer_of = {t.name: t.name for t in lifetimes}
    for source, target in pairs:
        buffer_of[target] = buffer_of[source]
    members: dict[str, list[TensorLifetime]] = {}
    for lifetime in lifetimes:
        members.setdefault(buffer_of[lifetime.name], []).append(lifetime)
    buffers = tuple(TensorLifetime(name=name, size_bytes=max(t.size_bytes for t in group),
                                   start=min(t.start for t in group), end=max(t.end for t in group))
                    for name, group in members.items())
    return buffers, buffer_of


def _align(offset: int, alignment: int) -> int:
    return -(-offset // alignment) * alignment


class _Search:
    """Branch and bound over the order in which buffers are stacked from offset 0 upwards.

    Take any plan and let every buffer fall down (to the lowest aligned offset
    free of the buffers below it that share a step with it): the arena does not
    grow, and each buffer now rests at ``align(max end)`` of the conflicting
    buffers below it (or at 0). Listing buffers by offset, each one's offset is
    thus fixed by those before it, so searching the lists whose offsets never
    decrease (equal offsets in index order) finds an optimal plan. Bound: every
    unplaced buffer ends at least at ``max(last offset, its resting offset now)
    + size``, since later placements only push it up.
    """

    def __init__(self, lifetimes: Sequence[TensorLifetime], alignment: int, best: int, target: int) -> None:
        self.items = [t for t in sorted(lifetimes, key=lambda t: (-t.size_bytes, t.start, t.name)) if t.size_bytes]
        self.conflicts = [[j for j, other in enumerate(self.items) if j != i and item.overlaps_in_time(other)]
                          for i, item in enumerate(self.items)]
        self.alignment, self.best, self.target = alignment, best, target
        self.best_offsets: dict[str, int] | None = None
        self.offsets: dict[int, int] = {}
        self.visited = 0
        self.deadline = time.monotonic() + SEARCH_TIME_LIMIT_S
        self.stopped = False

    def _resting(self, index: int) -> int:
        ends = [self.offsets[j] + self.items[j].size_bytes for j in self.conflicts[index] if j in self.offsets]
        return _align(max(ends, default=0), self.alignment)

    def _out_of_budget(self) -> bool:
        if self.visited > SEARCH_NODE_LIMIT or (self.visited % 1024 == 0 and time.monotonic() > self.deadline):
            self.stopped = True
        return self.stopped

    def run(self, last: tuple[int, int] = (0, -1), top: int = 0) -> None:
        self.visited += 1
        if self.best <= self.target or self._out_of_budget():
            return
        if len(self.offsets) == len(self.items):
            self.best = top
            self.best_offsets = {self.items[i].name: offset for i, offset in self.offsets.items()}
            return
        candidates = []
        for index in range(len(self.items)):
            if index in self.offsets:
                continue
            offset = max(self._resting(index), last[0])
            if offset + self.items[index].size_bytes >= self.best:
                return  # this buffer cannot be placed below the best arena any more
            candidates.append((offset, index))
        for offset, index in sorted(candidates):
            if (offset, index) < last:
                continue
            self.offsets[index] = offset
            self.run((offset, index), max(top, offset + self.items[index].size_bytes))
            del self.offsets[index]


def exact_arena_plan(lifetimes: Sequence[TensorLifetime], greedy: ArenaPlan, alignment: int) -> ArenaPlan:
    """Branch and bound from the greedy plan; returns the greedy plan when nothing smaller exists."""
    return _exact_search(lifetimes, greedy, alignment)[0]


def _exact_search(lifetimes, greedy: ArenaPlan, alignment: int) -> tuple[ArenaPlan, bool]:
    """(best plan, whether it is proven optimal)."""
    search = _Search(lifetimes, alignment, greedy.arena_bytes, greedy.lower_bound_bytes)
    search.run()
    optimal = not search.stopped or search.best <= search.target
    if search.best_offsets is None:
        return greedy, optimal
    offsets = {t.name: search.best_offsets.get(t.name, 0) for t in lifetimes}
    return ArenaPlan(offsets=offsets, arena_bytes=search.best,
                     lower_bound_bytes=greedy.lower_bound_bytes, alignment=alignment), optimal


def plan_memory(program: Program, *, alignment: int = 16, in_place: bool = True) -> MemoryPlan:
    """Place every activation of ``program`` (in its op order) in one arena; raises if the plan overlaps (a bug)."""
    lifetimes = program_lifetimes(program)
    pairs = _in_place_pairs(program, lifetimes) if in_place else ()
    buffers, buffer_of = _buffers(lifetimes, pairs)
    greedy = greedy_arena_plan(buffers, alignment=alignment)
    plan, method, optimal = greedy, "greedy", greedy.arena_bytes <= greedy.lower_bound_bytes
    if not optimal and len(buffers) <= EXACT_SEARCH_MAX_BUFFERS:
        plan, optimal = _exact_search(buffers, greedy, alignment)
        method = "branch and bound"
    if check_no_overlap(plan, buffers):
        raise RuntimeError(f"bug: arena plan overlaps: {check_no_overlap(plan, buffers)[:3]}")
    return MemoryPlan(plan=plan, lifetimes=lifetimes, buffers=buffers, buffer_of=buffer_of, in_place=pairs,
                      greedy_bytes=greedy.arena_bytes, method=method, optimal=optimal)

"""The static arena of a lowered program: tensor lifetimes, placement, bounds.

Step ``i`` is the ``i``-th op of the schedule; model inputs live from step 0.
A tensor lives from the step that writes it to the last step that reads it;
model outputs live to the last step (the caller reads them after the run).
Constants are ``const`` arrays in flash and take no arena space. The kernels
need no scratch memory (convolutions accumulate straight from the input).

Placement: the greedy best-fit planner of :mod:`edgeopt.analysis.memory`
(largest first, lowest free aligned offset), then, for graphs of at most
``EXACT_SEARCH_MAX_TENSORS`` tensors, an exact branch-and-bound search over
the offsets where a tensor can touch an already placed one (every optimal
plan can be shifted down onto such offsets); it stops as soon as it reaches
the lower bound ``max_step(sum of live bytes)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgeopt.analysis.memory import (
    ArenaPlan,
    TensorLifetime,
    check_no_overlap,
    greedy_arena_plan,
)
from edgeopt.runtime.reference.program import Program

__all__ = ["EXACT_SEARCH_MAX_TENSORS", "MemoryPlan", "exact_arena_plan", "plan_memory", "program_lifetimes"]

EXACT_SEARCH_MAX_TENSORS = 12
_SEARCH_NODE_LIMIT = 200_000


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    """Arena offsets of every activation tensor, with the bounds the plan is judged by."""

    plan: ArenaPlan
    lifetimes: tuple[TensorLifetime, ...]
    greedy_bytes: int
    method: str  # "greedy" or "exact"

    @property
    def arena_bytes(self) -> int:
        return self.plan.arena_bytes

    @property
    def lower_bound_bytes(self) -> int:
        return self.plan.lower_bound_bytes


def program_lifetimes(program: Program) -> tuple[TensorLifetime, ...]:
    last_step = max(len(program.ops) - 1, 0)
    start = {io.tensor: 0 for io in program.inputs}
    end = dict(start)
    for step, op in enumerate(program.ops):
        start.setdefault(op.output, step)
        end[op.output] = max(end.get(op.output, step), step)
        for name in op.inputs:
            if name not in program.constants:
                end[name] = max(end.get(name, step), step)
    for io in program.outputs:
        end[io.tensor] = last_step
    return tuple(TensorLifetime(name=name, size_bytes=program.tensors[name].size, start=start[name], end=end[name])
                 for name in start)


def _align(offset: int, alignment: int) -> int:
    return -(-offset // alignment) * alignment


class _Search:
    """Depth-first placement in greedy order with bound = best arena found so far."""

    def __init__(self, lifetimes: Sequence[TensorLifetime], alignment: int, best: int, target: int) -> None:
        self.items = sorted(lifetimes, key=lambda t: (-t.size_bytes, t.start, t.name))
        self.alignment, self.best, self.target = alignment, best, target
        self.best_offsets: dict[str, int] | None = None
        self.offsets: dict[str, int] = {}
        self.visited = 0

    def _fits(self, item: TensorLifetime, offset: int) -> bool:
        for other in self.items[: len(self.offsets)]:
            placed = self.offsets[other.name]
            if (other.overlaps_in_time(item) and other.size_bytes and item.size_bytes
                    and offset < placed + other.size_bytes and placed < offset + item.size_bytes):
                return False
        return True

    def _candidates(self, item: TensorLifetime) -> list[int]:
        ends = {0} | {_align(self.offsets[o.name] + o.size_bytes, self.alignment)
                      for o in self.items[: len(self.offsets)] if o.overlaps_in_time(item)}
        return sorted(offset for offset in ends if self._fits(item, offset))

    def run(self, depth: int = 0, top: int = 0) -> None:
        self.visited += 1
        if top >= self.best or self.visited > _SEARCH_NODE_LIMIT or self.best <= self.target:
            return
        if depth == len(self.items):
            self.best, self.best_offsets = top, dict(self.offsets)
            return
        item = self.items[depth]
        for offset in self._candidates(item):
            self.offsets[item.name] = offset
            self.run(depth + 1, max(top, offset + item.size_bytes))
            del self.offsets[item.name]


def exact_arena_plan(lifetimes: Sequence[TensorLifetime], greedy: ArenaPlan, alignment: int) -> ArenaPlan:
    """Branch and bound from the greedy plan; returns the greedy plan when nothing smaller exists."""
    search = _Search(lifetimes, alignment, greedy.arena_bytes, greedy.lower_bound_bytes)
    search.run()
    if search.best_offsets is None:
        return greedy
    return ArenaPlan(offsets=search.best_offsets, arena_bytes=search.best,
                     lower_bound_bytes=greedy.lower_bound_bytes, alignment=alignment)


def plan_memory(program: Program, *, alignment: int = 16) -> MemoryPlan:
    """Place every activation of ``program`` in one arena; raises if the plan overlaps (a bug)."""
    lifetimes = program_lifetimes(program)
    greedy = greedy_arena_plan(lifetimes, alignment=alignment)
    plan, method = greedy, "greedy"
    if len(lifetimes) <= EXACT_SEARCH_MAX_TENSORS and greedy.arena_bytes > greedy.lower_bound_bytes:
        plan = exact_arena_plan(lifetimes, greedy, alignment)
        method = "exact" if plan is not greedy else "greedy"
    if check_no_overlap(plan, lifetimes):
        raise RuntimeError(f"bug: arena plan overlaps: {check_no_overlap(plan, lifetimes)[:3]}")
    return MemoryPlan(plan=plan, lifetimes=lifetimes, greedy_bytes=greedy.arena_bytes, method=method)

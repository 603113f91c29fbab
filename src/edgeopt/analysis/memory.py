"""Activation lifetimes and a static arena plan for them.

Steps number the nodes in execution order (see ``_graph``). A tensor is live
on the closed interval ``[start, end]`` of steps:

* a graph input lives from step 0; a node output from its producer's step;
* it lives until its last consumer's step (a consumer inside an If/Loop body
  counts at its owner's step); a graph output lives to the last step; a tensor
  nobody reads still lives during the step that writes it.

Constants and weights are not activations (they live in flash / the weight
blob), so they have no lifetime.

Two tensors *conflict* when their intervals intersect; an arena plan gives
each tensor a byte offset such that conflicting tensors occupy disjoint
``[offset, offset + size)`` ranges. Bounds:

* ``lower_bound_bytes = max_t sum(size of tensors live at step t)``: at that
  step all those tensors are pairwise disjoint inside the arena, so no plan
  can be smaller;
* ``naive_bytes = sum(all sizes)``: every tensor in its own buffer.

The greedy planner (as TFLite Micro's ``GreedyMemoryPlanner``) places tensors
largest first (ties: earlier start, then name), each at the lowest
``alignment``-aligned offset where it overlaps no already placed conflicting
tensor. Lifetimes are plain data, so kernel scratch buffers or in-place
aliases can be planned by adding their own ``TensorLifetime``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import onnx_ir as ir

from edgeopt.analysis._graph import execution_steps, step_of_nodes
from edgeopt.analysis.cost import analyze_cost
from edgeopt.errors import ConfigError
from edgeopt.ir import is_constant, value_bytes

__all__ = [
    "ArenaPlan",
    "MemoryReport",
    "TensorLifetime",
    "check_no_overlap",
    "greedy_arena_plan",
    "live_bytes_by_step",
    "lower_bound_bytes",
    "memory_report",
    "tensor_lifetimes",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TensorLifetime:
    """A buffer of ``size_bytes`` live from step ``start`` to step ``end``, inclusive."""

    name: str
    size_bytes: int
    start: int
    end: int

    def __post_init__(self) -> None:
        if self.size_bytes < 0 or self.start > self.end:
            raise ValueError(f"tensor {self.name!r}: need size >= 0 and start <= end, got {self}")

    def overlaps_in_time(self, other: TensorLifetime) -> bool:
        return self.start <= other.end and other.start <= self.end


@dataclass(frozen=True, kw_only=True)
class ArenaPlan:
    """Byte offset of every tensor in one arena of ``arena_bytes``."""

    offsets: dict[str, int]
    arena_bytes: int
    lower_bound_bytes: int
    alignment: int


@dataclass(frozen=True, kw_only=True)
class MemoryReport:
    """Activation memory of a model run in graph order, and its weight bytes."""

    peak_activation_bytes: int
    lower_bound_bytes: int
    naive_bytes: int
    largest_tensor: str
    largest_tensor_bytes: int
    peak_step: int
    peak_node: str
    weight_bytes: int
    param_bytes_fp32: int
    param_bytes_fp16: int
    param_bytes_int8: int
    unknown_tensors: tuple[str, ...]
    lifetimes: tuple[TensorLifetime, ...]
    plan: ArenaPlan


# ---------------------------------------------------------------- lifetimes


def _last_use(value: ir.Value, step_of: dict[int, int], default: int, last_step: int) -> int:
    if value.is_graph_output():
        return last_step
    return max((step_of[id(node)] for node, _ in value.uses() if id(node) in step_of), default=default)


def _activations(model: ir.Model) -> list[tuple[ir.Value, int]]:
    """Every non-constant tensor with the step it is written at."""
    values = [(value, 0) for value in model.graph.inputs if not is_constant(value)]
    for step, (_, node) in enumerate(execution_steps(model.graph)):
        values.extend((value, step) for value in node.outputs if value.name)
    return values


def tensor_lifetimes(model: ir.Model) -> tuple[TensorLifetime, ...]:
    """Lifetimes of graph inputs and node outputs; unknown sizes count as 0 bytes (logged)."""
    steps = execution_steps(model.graph)
    step_of, last_step = step_of_nodes(steps), max(len(steps) - 1, 0)
    lifetimes, unknown = [], []
    for value, start in _activations(model):
        size = value_bytes(value)
        if size is None:
            unknown.append(value.name)
        end = _last_use(value, step_of, start, last_step)
        lifetimes.append(TensorLifetime(name=value.name, size_bytes=size or 0, start=start, end=end))
    if unknown:
        logger.warning("%d tensors have unknown size and count as 0 bytes: %s", len(unknown), ", ".join(unknown[:5]))
    return tuple(lifetimes)


# ---------------------------------------------------------------- bounds


def live_bytes_by_step(lifetimes: Sequence[TensorLifetime]) -> dict[int, int]:
    """Sum of the sizes of the tensors live at each step from the first start to the last end."""
    if not lifetimes:
        return {}
    delta: dict[int, int] = defaultdict(int)
    for lifetime in lifetimes:
        delta[lifetime.start] += lifetime.size_bytes
        delta[lifetime.end + 1] -= lifetime.size_bytes
    live, by_step = 0, {}
    for step in range(min(delta), max(delta)):
        live += delta.get(step, 0)
        by_step[step] = live
    return by_step


def lower_bound_bytes(lifetimes: Sequence[TensorLifetime]) -> int:
    """``max_t`` of the bytes live at step ``t``: no arena plan can be smaller."""
    return max(live_bytes_by_step(lifetimes).values(), default=0)


# ---------------------------------------------------------------- greedy plan


def _align_up(offset: int, alignment: int) -> int:
    return -(-offset // alignment) * alignment


def _lowest_free_offset(size: int, busy: list[tuple[int, int]], alignment: int) -> int:
    """Lowest aligned offset where ``size`` bytes avoid every ``(offset, end)`` range in ``busy``."""
    candidate = 0
    for offset, end in sorted(busy):
        if candidate + size <= offset:
            return candidate
        candidate = max(candidate, _align_up(end, alignment))
    return candidate


def _conflicts(lifetimes: Sequence[TensorLifetime]) -> list[list[int]]:
    """For each tensor (by index), the tensors of non-zero size live at a common step.

    A sweep over start steps: O(T log T + number of conflicting pairs).
    """
    by_start = sorted((i for i, t in enumerate(lifetimes) if t.size_bytes), key=lambda i: lifetimes[i].start)
    conflicts: list[list[int]] = [[] for _ in lifetimes]
    for position, first in enumerate(by_start):
        end = lifetimes[first].end
        for later in range(position + 1, len(by_start)):
            second = by_start[later]
            if lifetimes[second].start > end:
                break
            conflicts[first].append(second)
            conflicts[second].append(first)
    return conflicts


def _placement_order(lifetimes: Sequence[TensorLifetime]) -> list[int]:
    """Largest first; ties by earlier start, then name (deterministic plans)."""
    return sorted(range(len(lifetimes)),
                  key=lambda i: (-lifetimes[i].size_bytes, lifetimes[i].start, lifetimes[i].name))


def _check_unique_names(lifetimes: Sequence[TensorLifetime]) -> None:
    names: set[str] = set()
    for lifetime in lifetimes:
        if lifetime.name in names:
            raise ValueError(f"tensor {lifetime.name!r} appears twice: lifetime names must be unique")
        names.add(lifetime.name)


def greedy_arena_plan(lifetimes: Sequence[TensorLifetime], *, alignment: int = 16) -> ArenaPlan:
    """Place tensors largest first, each at the lowest aligned offset free for its whole lifetime."""
    if alignment < 1:
        raise ConfigError(f"arena alignment must be a positive number of bytes, got {alignment}")
    _check_unique_names(lifetimes)
    conflicts = _conflicts(lifetimes)
    offsets: dict[int, int] = {}
    for index in _placement_order(lifetimes):
        size = lifetimes[index].size_bytes
        busy = [(offsets[other], offsets[other] + lifetimes[other].size_bytes)
                for other in conflicts[index] if other in offsets]
        offsets[index] = _lowest_free_offset(size, busy, alignment) if size else 0
    arena_bytes = max((offsets[i] + t.size_bytes for i, t in enumerate(lifetimes)), default=0)
    return ArenaPlan(offsets={lifetimes[i].name: offset for i, offset in sorted(offsets.items())},
                     arena_bytes=arena_bytes, lower_bound_bytes=lower_bound_bytes(lifetimes), alignment=alignment)


def check_no_overlap(plan: ArenaPlan, lifetimes: Sequence[TensorLifetime]) -> tuple[tuple[str, str], ...]:
    """Pairs of tensors live at a common step whose byte ranges in ``plan`` intersect; () when valid."""
    violations = []
    for first, others in enumerate(_conflicts(lifetimes)):
        a, low = lifetimes[first], plan.offsets[lifetimes[first].name]
        for second in (o for o in others if o > first):
            b, other = lifetimes[second], plan.offsets[lifetimes[second].name]
            if low < other + b.size_bytes and other < low + a.size_bytes:
                violations.append((a.name, b.name))
    return tuple(violations)


# ---------------------------------------------------------------- report


def _peak_step(lifetimes: Sequence[TensorLifetime]) -> int:
    by_step = live_bytes_by_step(lifetimes)
    return max(by_step, key=lambda step: (by_step[step], -step), default=0)


def memory_report(model: ir.Model, *, alignment: int = 16) -> MemoryReport:
    """Peak activation RAM (greedy arena), its lower bound, the naive sum, and weight bytes."""
    lifetimes = tensor_lifetimes(model)
    plan = greedy_arena_plan(lifetimes, alignment=alignment)
    largest = max(lifetimes, key=lambda t: t.size_bytes, default=TensorLifetime(name="", size_bytes=0, start=0, end=0))
    cost = analyze_cost(model)
    peak_step = _peak_step(lifetimes)
    return MemoryReport(
        peak_activation_bytes=plan.arena_bytes, lower_bound_bytes=plan.lower_bound_bytes,
        naive_bytes=sum(t.size_bytes for t in lifetimes),
        largest_tensor=largest.name, largest_tensor_bytes=largest.size_bytes,
        peak_step=peak_step, peak_node=cost.nodes[peak_step].name if cost.nodes else "",
        weight_bytes=cost.weight_bytes, param_bytes_fp32=cost.param_bytes_fp32,
        param_bytes_fp16=cost.param_bytes_fp16, param_bytes_int8=cost.param_bytes_int8,
        unknown_tensors=tuple(value.name for value, _ in _activations(model) if value_bytes(value) is None),
        lifetimes=lifetimes, plan=plan,
    )

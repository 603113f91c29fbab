"""Pure functions ``Model -> results``: compute cost, parameters and activation memory.

* :mod:`~edgeopt.analysis.cost` — MACs, other FLOPs, parameters and activation
  bytes per node, with totals (:func:`analyze_cost`);
* :mod:`~edgeopt.analysis.memory` — tensor lifetimes over the execution order,
  the live-bytes lower bound and a greedy static arena plan (:func:`memory_report`).
"""

from __future__ import annotations

from edgeopt.analysis.cost import CostReport, NodeCost, analyze_cost
from edgeopt.analysis.memory import (
    ArenaPlan,
    MemoryReport,
    TensorLifetime,
    check_no_overlap,
    greedy_arena_plan,
    live_bytes_by_step,
    lower_bound_bytes,
    memory_report,
    tensor_lifetimes,
)

__all__ = [
    "ArenaPlan",
    "CostReport",
    "MemoryReport",
    "NodeCost",
    "TensorLifetime",
    "analyze_cost",
    "check_no_overlap",
    "greedy_arena_plan",
    "live_bytes_by_step",
    "lower_bound_bytes",
    "memory_report",
    "tensor_lifetimes",
]

"""The driver: graph + target -> checked plan, by planner name.

Planner names:
  baseline                  every reference pipeline; the best checked plan wins
  ORDER+ALLOCATOR+POLICY    one reference pipeline (see planner.baselines.PIPELINES)
  schedule / joint / remat  the exact formulations (formulations/*), when present
  auto                      the strongest planner for the situation

Each formulation module exposes `plan(graph, target, *, time_limit, **options) -> Plan`
(already checked); they are imported only when named, so `import planner` stays light.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

from planner import baselines, bounds
from planner.check import check
from planner.graph import LifetimeGraph
from planner.plan import Plan
from planner.target import Target, get_target, parse_size

FORMULATIONS = {
    "schedule": "formulations.schedule",
    "joint": "formulations.joint",
    "remat": "formulations.remat",
}
BUDGET_NAMES = ("M_R", "M_H", "M_P")


def planner_names() -> list[str]:
    names = ["auto", "baseline", *baselines.PIPELINES]
    names += [n for n, mod in FORMULATIONS.items() if importlib.util.find_spec(mod) is not None]
    return names


def resolve_target(target: Target | str | int | None = None, capacity: str | int | None = None,
                   graph: LifetimeGraph | None = None, include_weights: bool | None = None,
                   alignment: int | None = None) -> Target:
    """A Target from a preset or object, with the capacity given as bytes, a size
    string ('512KiB') or a budget name (M_R, M_H, M_P, computed for `graph`)."""
    if isinstance(target, Target):
        base = target
    elif isinstance(target, str):
        base = get_target(target)
    elif target is None:
        base = get_target("npu")
    else:
        base = get_target("npu", capacity=int(target))
    changes: dict[str, Any] = {}
    if include_weights is not None:
        changes["include_weights"] = include_weights
    if alignment is not None:
        changes["alignment"] = alignment
    base = base.with_(**changes)
    if capacity is None:
        return base
    if isinstance(capacity, str) and capacity.upper().replace("-", "_") in BUDGET_NAMES:
        if graph is None:
            raise ValueError(f"budget {capacity} needs a graph to be computed on")
        return base.with_(capacity=budget(graph, capacity.upper().replace("-", "_"), base))
    if isinstance(capacity, str) and capacity.lower() in ("none", "unbounded", "inf"):
        return base.with_(capacity=None)
    return base.with_(capacity=parse_size(capacity))


def budget(graph: LifetimeGraph, name: str, target: Target) -> int:
    """COSMA's budgets: M_R (largest working set), M_P (minimum peak over orders:
    the schedule formulation's optimum when present, else the best heuristic
    order's peak), M_H = (M_R + M_P) / 2, rounded to the alignment."""
    w, a = target.include_weights, target.alignment
    mr = bounds.m_r(graph, w, a)
    if name == "M_R":
        return mr
    mp = min_peak(graph, target)
    if name == "M_P":
        return mp
    return (mr + mp) // 2 // a * a


def min_peak(graph: LifetimeGraph, target: Target) -> int:
    if importlib.util.find_spec(FORMULATIONS["schedule"]) is not None:
        schedule = importlib.import_module(FORMULATIONS["schedule"])
        return schedule.solve(graph, time_limit=30.0, include_weights=target.include_weights,
                              alignment=target.alignment).peak
    orders = [baselines.order_by_name(graph, o, target) for o in baselines.ORDERS]
    return min(bounds.max_live(graph, o, target.include_weights, target.alignment) for o in orders)


def compile(graph: LifetimeGraph | Any, target: Target | str | int | None = None, *, capacity=None,
            planner: str = "auto", time_limit: float = 60.0, progress: Callable[[str], None] | None = None,
            **options) -> Plan:
    """Plan `graph` (a LifetimeGraph or a frontends.Lowered) for `target`; return a checked plan."""
    graph = getattr(graph, "graph", graph)
    target = resolve_target(target, capacity, graph)
    bounds.require_capacity(graph, target.capacity, target.include_weights, target.alignment)
    if planner == "auto":
        planner = _auto(graph, target)
    if planner == "baseline":
        plan = baselines.best(graph, target)
    elif planner in baselines.PIPELINES:
        order, policy, allocator = baselines.PIPELINES[planner]
        plan = baselines.pipeline(graph, target, order, policy, allocator, name=f"baseline:{planner}")
    elif planner in FORMULATIONS:
        if importlib.util.find_spec(FORMULATIONS[planner]) is None:
            raise ValueError(f"planner {planner!r} is not available in this build; "
                             f"available: {', '.join(planner_names())}")
        module = importlib.import_module(FORMULATIONS[planner])
        plan = module.plan(graph, target, time_limit=time_limit, progress=progress, **options)
    else:
        raise ValueError(f"unknown planner {planner!r}; available: {', '.join(planner_names())}")
    return check(graph, plan, target)  # the checker is the judge of every plan, whoever made it


def _auto(graph: LifetimeGraph, target: Target) -> str:
    """Joint planning when spills are needed, schedule when the capacity is ample."""
    available = set(planner_names())
    fits = target.capacity is None or target.capacity >= bounds.max_live(
        graph, None, target.include_weights, target.alignment)
    if fits and "schedule" in available:
        return "schedule"
    if not fits and "joint" in available:
        return "joint"
    return "baseline"

"""Rematerialisation under a peak budget: which tensors to keep, recompute or reload.

Given the graph's program order (the first compute of every op stays in that order), choose
for every tensor a read needs whether it is still resident, recomputed (op time) or reloaded
from an off-chip copy (bytes / bandwidth), so that the peak of the live buffers stays within
`budget`, at least cost. The objective (`objective=`) is recompute FLOPs (`recompute`: reloads
off), off-chip bytes (`traffic`: recomputes off) or estimated seconds (`time`: both); see
remat_problem.py. Budgets follow Moccasin: bytes, or a fraction of the peak of the program
order without rematerialisation (`reference_peak`), counting node outputs (and inputs the
target holds), no in-place reuse.

Backends:
  cpsat  retention intervals in CP-SAT (remat_cpsat.py), hinted with the greedy sequence and
         any `hints` (sequences of other methods); scales to graphs of hundreds of nodes
  milp   Checkmate's MILP (Jain et al., MLSys 2020) through PuLP/CBC (remat_milp.py): O(n^2)
         variables, for comparison on small graphs
  lns    large-neighbourhood search over the CP-SAT model from the best heuristic plan
         (remat_lns.py): windows of stages re-solved with the rest fixed
  auto   (default) cpsat below LNS_NODES nodes, lns from there (cpsat when LNS cannot start)
All keep the given order of first computes; "optimal" means optimal within that model.
Heuristics first: the eviction greedy (remat_heuristics.py) and a portfolio of the
live-range-splitting greedy (remat_split.py: the retention intervals built directly, seconds
on 1000 nodes); the cheapest sequence that fits is the answer unless the solver improves on it,
and the solver is hinted with it (every variable). Bounds: the solver's, and the per-stage
knapsack and gap-LP bounds of remat_bounds.py (CP-SAT's own bound is ~0 past a few hundred nodes).
The budget bounds the plan's peak (the checker's `peak_bytes`, what Checkmate and Moccasin
bound); offsets then minimise the arena (planner.remat_plan). A target with a capacity is a hard
arena limit as well: if fragmentation makes the placement overshoot it, the peak budget is
lowered by the overshoot and the solve repeated (the first bound stays the reported bound).
Every plan is checked before it is returned.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from formulations import remat_bounds, remat_cpsat, remat_heuristics, remat_split
from formulations.remat_problem import OBJECTIVES, RematProblem, build_problem
from planner import remat_plan
from planner.bounds import InfeasibleError
from planner.graph import LifetimeGraph
from planner.plan import Plan, SolverRecord
from planner.remat_plan import Item
from planner.target import Target

BACKENDS = ("auto", "cpsat", "lns", "milp")
LNS_NODES = 400  # auto: CP-SAT on the whole model below this many nodes, LNS from the best heuristic above
MAX_INTERVALS = 4  # CP-SAT: retention intervals per op tried before an infeasible verdict stands


@dataclass(frozen=True)
class RematResult:
    plan: Plan  # checked, within the budget
    sequence: list[Item]
    cost: float  # objective value of the plan's sequence, in the objective's unit
    bound: float  # proven lower bound on the cost (within the model)
    status: str  # "optimal" | "feasible" | "heuristic"
    budget: int  # peak budget in bytes
    reference_peak: int  # peak of the program order without rematerialisation
    seconds: float  # everything: heuristics, solver, placement, check
    solve_seconds: float  # until the sequence was chosen (before offsets were placed)
    found_by: str  # "program", "greedy", "split", "hint", "cpsat", "lns", "milp"

    @property
    def gap(self) -> float:
        return 0.0 if self.cost <= 0 else max(0.0, (self.cost - self.bound) / self.cost)


def minimum_budget(graph: LifetimeGraph, target: Target) -> int:
    """Least peak any sequence can have: one op with its inputs and outputs resident."""
    from planner.bounds import m_r

    return m_r(graph, target.include_weights, target.alignment)


def reference_peak(graph: LifetimeGraph, target: Target) -> int:
    """Peak of the program order with every tensor kept until its last read."""
    return remat_plan.peak(graph, target, list(range(len(graph.ops))))


def resolve_budget(graph: LifetimeGraph, target: Target, budget: int | float | str | None) -> int:
    """Bytes from bytes, a size string, a fraction of the reference peak (0 < f <= 1), or
    target.capacity when None."""
    from planner.target import parse_size

    if budget is None:
        if target.capacity is None:
            raise ValueError("remat needs a budget (bytes, a size or a fraction of the no-remat peak) "
                             "or a target capacity")
        return target.capacity
    if isinstance(budget, str):
        text = budget.strip()
        try:
            budget = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
        except ValueError:
            return parse_size(text)
    if isinstance(budget, float) and 0 < budget <= 1:
        return int(budget * reference_peak(graph, target)) // target.alignment * target.alignment
    if budget <= 0:
        raise ValueError(f"budget {budget} must be positive")
    return int(budget)


def split_portfolio(p: RematProblem, cap: int) -> list[list[Item]]:
    """The live-range-splitting greedy's sequences under a few settings (each a second or less on
    1000 nodes); the settings that win differ from graph to graph."""
    out = []
    for early in (True, False):
        for power in (1, 2):
            for shrink in (0.0, 0.04):
                seq = remat_split.split_greedy(p, int(cap * (1 - shrink)), early=early, power=power,
                                               max_escapes=10)
                if seq is not None:
                    out.append(seq)
    return out


def least_heuristic_budget(graph: LifetimeGraph, target: Target, steps: int = 12) -> int:
    """The least peak budget (to within reference_peak / 2**steps) where the split greedy's
    portfolio finds a plan: a bisection between the largest working set and the reference peak."""
    p = build_problem(graph, target)
    lo, hi = minimum_budget(graph, target) - 1, reference_peak(graph, target)  # lo fails, hi holds
    for _ in range(steps):
        if hi - lo <= target.alignment:
            break
        mid = (lo + hi) // 2
        ok = any(remat_plan.peak(graph, target, s) <= mid for s in split_portfolio(p, mid))
        lo, hi = (lo, mid) if ok else (mid, hi)
    return hi


def sequence_cost(p: RematProblem, sequence: Sequence[Item]) -> float:
    """Cost of `sequence` in the problem's objective (inf if it uses what the objective forbids)."""
    seen: set[int] = set()
    stored: set[int] = set()
    producer = p.graph.producer
    loaded: set[tuple[int, int]] = set()
    total = 0.0
    for pos, item in enumerate(sequence):
        if isinstance(item, tuple):
            v = producer.get(item[1])
            if v is None:
                continue  # reloading a graph input: compulsory traffic in every plan
            if (v, pos - 1) not in loaded:  # several outputs of one op reload as one event
                total += p.reload_cost[v] + (0.0 if v in stored else p.store_cost[v])
                stored.add(v)
            loaded.add((v, pos))
            continue
        if item in seen:
            total += p.recompute_cost[item]
        seen.add(item)
    return total


def solve(graph: LifetimeGraph, target: Target, *, budget: int | float | str | None = None,
          time_limit: float = 60.0, backend: str = "auto", objective: str = "recompute",
          intervals: int = 2, hints: Sequence[Sequence[Item]] = (), presolve: bool = True,
          placement_seconds: float = 1.0, progress: Callable[[str], None] | None = None) -> RematResult:
    t0 = time.perf_counter()
    if backend not in BACKENDS:
        raise ValueError(f"unknown remat backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown remat objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    ref = reference_peak(graph, target)
    peak_budget = resolve_budget(graph, target, budget)
    cap = peak_budget if target.capacity is None else min(peak_budget, target.capacity)
    if cap < (least := minimum_budget(graph, target)):
        raise InfeasibleError(f"remat: a peak budget of {cap} bytes is below {least}, the largest working set "
                              "of one op (its inputs and outputs)")
    log = progress or (lambda _msg: None)
    known_bound: float | None = None  # the bound at the user's budget stays valid when we lower ours
    for _attempt in range(8):
        out = _solve_once(graph, target, cap, ref, t0, time_limit - placement_seconds, backend, objective,
                          intervals, hints, presolve, placement_seconds, log, known_bound)
        if isinstance(out, RematResult):
            return out
        overshoot, bound = out
        known_bound = bound if known_bound is None else known_bound
        log(f"remat: the placement needs {overshoot} bytes more than {cap}; lowering the peak budget")
        cap -= overshoot
    raise InfeasibleError(f"remat: no placement within {peak_budget} bytes after lowering the peak budget 8 times")


def _solve_once(graph, target, cap, ref, t0, time_limit, backend, objective, intervals, hints, presolve,
                placement_seconds, log, known_bound) -> RematResult | tuple[int, float]:
    p = build_problem(graph, target, objective)
    program = list(range(len(graph.ops)))
    candidates: list[tuple[float, str, list[Item]]] = []
    hints_ok: list[tuple[float, list[Item]]] = []  # sequences the solver model can take as a hint
    if ref <= cap:
        candidates.append((0.0, "program", program))
    else:
        tries = [("greedy", remat_heuristics.greedy(p, int(cap * (1 - 0.03 * k)))) for k in range(4)]
        tries += [("split", seq) for seq in split_portfolio(p, cap)]
        for name, seq in [*tries, *(("hint", list(h)) for h in hints)]:
            if seq is None or (cost := sequence_cost(p, seq)) == math.inf:
                continue
            if remat_plan.peak(graph, target, seq) <= cap:
                candidates.append((cost, name, seq))
            if backend != "milp":  # CP-SAT times the repeats of a stage in node order
                seq = remat_cpsat.model_order(p, seq)
                cost = sequence_cost(p, seq)
            if remat_plan.peak(graph, target, seq) <= cap:
                hints_ok.append((cost, seq))
    candidates.sort(key=lambda c: c[0])
    stage_bound = remat_bounds.stage_lower_bound(p, cap)
    if stage_bound == math.inf and not candidates:
        raise InfeasibleError(f"remat: no plan that keeps the given order has a peak within {cap} bytes: "
                              "at some stage what must stay resident already exceeds it")
    lp_bound = remat_bounds.gap_lp_bound(p, cap, time_limit=min(10.0, time_limit / 6)) if stage_bound > 0 else None
    if lp_bound == math.inf and not candidates:
        raise InfeasibleError(f"remat: no plan that keeps the given order has a peak within {cap} bytes: "
                              "at some stage what must stay resident already exceeds it")
    if math.inf in (stage_bound, lp_bound):
        stage_bound = 0.0  # a checked sequence fits, so the bounds' count disagrees: claim nothing
    else:
        stage_bound = max(stage_bound, lp_bound or 0.0)
    bound = stage_bound
    used = "milp" if backend == "milp" else "cpsat"  # the solver that runs (auto: by graph size)
    if not candidates or candidates[0][0] > 0:
        left = time_limit - (time.perf_counter() - t0)
        hint = min(hints_ok, key=lambda h: h[0])[1] if hints_ok else None
        res = None
        if hint is not None and (backend == "lns" or (backend == "auto" and p.n >= LNS_NODES)):
            from formulations import remat_lns

            lns = remat_lns.improve(p, cap, hint, time_limit=left, stop_at=stage_bound, log=log)
            left = time_limit - (time.perf_counter() - t0)
            if lns is not None:  # else CP-SAT could not take the hint: the whole model gets the time
                used = "lns"
                if remat_plan.peak(graph, target, lns.sequence) <= cap:
                    candidates.append((sequence_cost(p, lns.sequence), "lns", lns.sequence))
                    candidates.sort(key=lambda c: c[0])
        if used == "cpsat":
            # infeasible with C intervals per op says nothing about C + 1: widen while time remains
            for count in range(intervals, MAX_INTERVALS + 1):
                res = remat_cpsat.solve(p, cap, time_limit=left, intervals=count, hint=hint, presolve=presolve,
                                        log=log)
                left = time_limit - (time.perf_counter() - t0)
                if res.status != "infeasible" or left < 1.0:
                    break
            scope = f"with at most {count - 1} recomputes or reloads per op"
        elif used == "milp":
            from formulations import remat_milp

            res = remat_milp.solve(p, cap, time_limit=left, hint=hint, log=log)
            scope = "that keeps the given order"
        if res is not None:
            if res.status == "infeasible" and not candidates:
                raise InfeasibleError(f"remat: no plan {scope} has a peak within {cap} bytes "
                                      f"(the no-remat peak is {ref})")
            bound = max(stage_bound, res.bound if res.bound < math.inf else 0.0)
            if res.sequence is not None and remat_plan.peak(graph, target, res.sequence) <= cap:
                candidates.append((sequence_cost(p, res.sequence), used, res.sequence))
                candidates.sort(key=lambda c: c[0])
        if not candidates:
            raise InfeasibleError(f"remat: no plan within a peak of {cap} bytes found in {time_limit:.0f} s "
                                  f"({used}: {res.status if res else '-'}; the no-remat peak is {ref})")
    cost, found_by, seq = candidates[0]
    solved = time.perf_counter() - t0
    bound = bound if known_bound is None else known_bound
    slack = 1.0 / p.scale + 1e-9 * cost  # integer rounding of the solver's costs
    heuristic = found_by in ("greedy", "split", "hint")
    status = "optimal" if bound >= cost - slack else ("heuristic" if heuristic else "feasible")
    record = SolverRecord(f"remat:{used}", used if found_by == used else "heuristic", status,
                          objective=cost, bound=min(bound, cost), gap=None, seconds=time.perf_counter() - t0,
                          params={"budget": cap, "reference_peak": ref, "objective": objective,
                                  "intervals": intervals, "found_by": found_by})
    try:
        plan = remat_plan.to_plan(graph, target, seq, record, time_limit=placement_seconds)
    except remat_plan.PlacementError as e:
        return max(e.arena - cap, target.alignment), bound
    gap = 0.0 if cost <= 0 else max(0.0, (cost - min(bound, cost)) / cost)
    plan = plan.with_(solver=dataclasses.replace(record, gap=gap, seconds=time.perf_counter() - t0))
    return RematResult(plan, seq, cost, min(bound, cost), status, cap, ref, time.perf_counter() - t0, solved,
                       found_by)


def plan(graph: LifetimeGraph, target: Target, *, time_limit: float = 60.0, budget=None,
         progress: Callable[[str], None] | None = None, **options) -> Plan:
    """planner.compile's entry point: the checked plan of `solve`."""
    return solve(graph, target, budget=budget, time_limit=time_limit, progress=progress, **options).plan

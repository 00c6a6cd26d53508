"""A per-stage lower bound on the cost of any rematerialisation plan that keeps the given order.

When node s runs for the first time, its output and every node it reads are resident. Every
other node v < s that some stage after s reads (and every source read before and after s) is
either resident as well, or gone and brought back after s, which costs at least
    c_v = min(recompute cost, reload cost)        (a source: its reload cost).
So with excess_s = size(s) + size(reads of s) + sum of those sizes - budget, some set D_s of them
with sum_{v in D_s} size_v >= excess_s is brought back, and the cost is at least the least
fractional knapsack cover of excess_s:  LB_s = min sum c_v x_v, sum size_v x_v >= excess_s,
0 <= x_v <= 1 (cheapest cost per byte first). The bound is max_s LB_s (one stage: a recompute
may serve several stages, so the stage bounds do not add up). inf when some excess_s cannot be
covered at all (the budget is infeasible in this model). Size: O(n * live) after one sweep.
Omits: interactions between stages (a node brought back before stage s must be resident there,
and the producers of a recompute must be resident when it runs).
"""

from __future__ import annotations

import math

from formulations.remat_problem import RematProblem


def stage_lower_bound(p: RematProblem, budget: int) -> float:
    """max over stages of the fractional knapsack bound above, in the objective's unit."""
    n = p.n
    last_read = [max(us, default=-1) for us in p.users]
    src_reads = {s: sorted(us) for s, us in p.source_users().items() if us}
    best = 0.0
    for s in range(n):
        must = set(p.deps[s])
        held = p.size[s] + sum(p.size[d] for d in must) + sum(p.source_size[x] for x in p.sources[s])
        items: list[tuple[float, int]] = []  # (cost, size) of what may be gone at s
        for v in range(s):
            if v not in must and last_read[v] > s and p.size[v] > 0:
                held += p.size[v]
                items.append((min(p.recompute_cost[v], p.reload_cost[v]), p.size[v]))
        for x, reads in src_reads.items():
            if x not in p.sources[s] and reads[0] < s < reads[-1] and p.source_size[x] > 0:
                held += p.source_size[x]
                items.append((p.source_reload_cost[x], p.source_size[x]))
        excess = held - budget
        if excess <= 0:
            continue
        cost = 0.0
        for c, size in sorted(items, key=lambda it: it[0] / it[1]):
            if c == math.inf:
                break
            take = min(size, excess)
            cost += c * take / size
            excess -= take
            if excess <= 0:
                break
        if excess > 0:
            return math.inf
        best = max(best, cost)
    return best


def gap_lp_bound(p: RematProblem, budget: int, time_limit: float = 10.0) -> float | None:
    """The LP relaxation of dropping nodes within the gaps between their reads (GLOP):

        min sum_{v,g} c_v y_vg   s.t.  sum_v size_v z_vs >= excess_s   (every stage s over the budget)
                                       0 <= z_vs <= y_vg <= 1          (s inside gap g of v)

    where gap g of node v is a maximal run of stages strictly between two of its reads (or its
    compute and first read), excess_s and c_v are those of stage_lower_bound, and z_vs says v is
    gone at s. Gone anywhere in a gap means one fetch before the gap's closing read, so the fetches
    of different gaps are different events and their costs add up: at least as strong as
    stage_lower_bound, and it counts a node evicted across several reads once per read. None when
    GLOP does not prove the LP optimal in `time_limit`; inf when some excess cannot be covered.
    Size: one z per (live node, stage over the budget)."""
    from ortools.linear_solver import pywraplp

    n = p.n
    reads = [sorted(set(us)) for us in p.users]
    src_reads = {s: sorted(set(us)) for s, us in p.source_users().items() if us}
    excess: dict[int, float] = {}
    live: dict[int, list[tuple[tuple, int, float]]] = {}  # stage -> [(gap key, size, cost)]
    for s in range(n):
        held = p.size[s] + sum(p.size[d] for d in p.deps[s]) + sum(p.source_size[x] for x in p.sources[s])
        items = []
        for v in range(s):
            if s in reads[v] or not reads[v] or reads[v][-1] <= s or p.size[v] == 0:
                continue
            g = next(r for r in reads[v] if r > s)  # the read that closes the gap
            held += p.size[v]
            items.append((("v", v, g), p.size[v], min(p.recompute_cost[v], p.reload_cost[v])))
        for x, rs in src_reads.items():
            if x in p.sources[s] or not rs[0] < s < rs[-1] or p.source_size[x] == 0:
                continue
            g = next(r for r in rs if r > s)
            held += p.source_size[x]
            items.append((("s", x, g), p.source_size[x], p.source_reload_cost[x]))
        if held > budget:
            excess[s] = held - budget
            live[s] = items
    if not excess:
        return 0.0
    solver = pywraplp.Solver.CreateSolver("GLOP")
    solver.set_time_limit(int(time_limit * 1000))
    scale = max(excess.values())  # bytes scaled to O(1) for the LP's tolerances
    gap_var: dict[tuple, object] = {}
    objective = solver.Objective()
    for s, items in live.items():
        row = solver.Constraint(excess[s] / scale, solver.infinity(), f"stage_{s}")
        finite = [(key, size, cost) for key, size, cost in items if cost < math.inf]
        if sum(size for _, size, _ in finite) < excess[s]:
            return math.inf
        for key, size, cost in finite:
            if key not in gap_var:
                gap_var[key] = solver.NumVar(0.0, 1.0, f"gone_{key[0]}{key[1]}_{key[2]}")
                objective.SetCoefficient(gap_var[key], cost)
            z = solver.NumVar(0.0, 1.0, f"gone_{key[0]}{key[1]}_at_{s}")
            solver.Add(z <= gap_var[key])
            row.SetCoefficient(z, size / scale)
    objective.SetMinimization()
    if solver.Solve() != pywraplp.Solver.OPTIMAL:
        return None
    return max(0.0, objective.Value() * (1 - 1e-7))

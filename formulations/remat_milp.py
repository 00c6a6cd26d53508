"""Checkmate's rematerialisation MILP (Jain et al., MLSys 2020), through PuLP (CBC by default).

Stage t computes node t for the first time and may recompute earlier nodes before it.
  R[t,i]  node i is computed in stage t (i <= t; R[t,t] = 1)
  S[t,i]  node i is resident when stage t begins (i < t)
  F[t,i,k] node i (a producer of k, or k itself) is freed right after k is computed in stage t
  U[t,k]  bytes resident right after k is computed in stage t
Constraints:
  R[t,k] <= R[t,i] + S[t,i]                    for every producer i of k (inputs present)
  S[t+1,i] <= S[t,i] + R[t,i]                  (only what exists can be kept)
  U[t,0] = src + sum_i m_i S[t,i] + m_0 R[t,0]
  U[t,k] = U[t,k-1] + m_k R[t,k] - sum_{i in deps(k-1)+{k-1}} m_i F[t,i,k-1]
  F[t,i,k] = R[t,k] (1 - S[t+1,i]) prod_{j in users(i), k<j<=t} (1 - R[t,j])   (linearised by its
           hazard count h: 1 - F <= h and H (1 - F) >= h, H the number of hazards)
  U[t,k] <= budget
Objective: sum_t sum_i<t cost_i R[t,i].
Size: about n^2 binaries in R and S, n * (sum of in-degrees) in F, n^2 / 2 continuous U. This is
what makes it slow beyond a few hundred nodes: it is here for comparison with remat_cpsat.
  H[t,s]  source s is held in stage t: from its first reader's stage to the last stage reading it
Omits: reloads (recompute only); a source is held for whole stages.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from formulations.remat_cpsat import CpsatResult
from formulations.remat_problem import RematProblem
from planner.remat_plan import Item


def solve(p: RematProblem, budget: int, *, time_limit: float = 60.0, hint: Sequence[Item] | None = None,
          solver=None, log: Callable[[str], None] | None = None) -> CpsatResult:
    import pulp

    from formulations.offsets_solvers import _cbc, _var

    t0 = time.perf_counter()
    n = p.n
    users = p.users
    m = p.size
    first_read: dict[int, int] = {}
    for v, ss in enumerate(p.sources):
        for s in ss:
            first_read.setdefault(s, v)
    cost = [p.int_cost(c) if c < math.inf else None for c in p.recompute_cost]

    prob = pulp.LpProblem("checkmate", pulp.LpMinimize)
    R = {(t, i): _var(prob, f"R_{t}_{i}", cat="Binary") for t in range(n) for i in range(t + 1)
         if i == t or (cost[i] is not None and users[i])}
    S = {(t, i): _var(prob, f"S_{t}_{i}", cat="Binary") for t in range(1, n) for i in range(t)}
    # sources: held from the stage of their first reader to the last stage that reads them
    H = {(t, s): _var(prob, f"H_{t}_{s}", cat="Binary") for s, f in first_read.items() for t in range(f, n)}
    for (t, s), h in H.items():
        if (t + 1, s) in H:
            prob += h >= H[t + 1, s]
    for (t, v) in R:
        for s in p.sources[v]:
            prob += H[t, s] >= R[t, v]
    src = [pulp.lpSum(p.source_size[s] * H[t, s] for s in first_read if (t, s) in H) for t in range(n)]
    for t in range(n):
        prob += R[t, t] == 1
    for (t, k), r in R.items():
        for i in p.deps[k]:
            prob += r <= R.get((t, i), 0) + S.get((t, i), 0)
    for (t, i), s in S.items():
        prob += s <= S.get((t - 1, i), 0) + R.get((t - 1, i), 0)
    n_free = 0
    for t in range(n):
        prev = src[t] + pulp.lpSum(m[i] * S[t, i] for i in range(t) if m[i])
        for k in range(t + 1):
            here = prev + (m[k] * R[t, k] if (t, k) in R and m[k] else 0)
            if (t, k) in R:
                prob += here <= budget
            freed = []
            if (t, k) in R:
                for i in (*p.deps[k], k):
                    if not m[i]:
                        continue
                    later = [R[t, j] for j in users[i] if k < j <= t and (t, j) in R]
                    hazards = (1 - R[t, k]) + S.get((t + 1, i), 0) + pulp.lpSum(later)
                    f = _var(prob, f"F_{t}_{i}_{k}", cat="Binary")
                    n_free += 1
                    prob += 1 - f <= hazards
                    prob += (2 + len(later)) * (1 - f) >= hazards
                    freed.append(m[i] * f)
            u = _var(prob, f"U_{t}_{k}", 0)
            prob += u == here - pulp.lpSum(freed)
            prev = u
    prob += pulp.lpSum(cost[i] * r for (t, i), r in R.items() if i < t)
    warm = hint is not None and _warm_start(p, hint, R, S, H)
    stats = {"nodes": n, "R": len(R), "S": len(S), "F": n_free, "constraints": prob.numConstraints()}
    left = max(1.0, time_limit - (time.perf_counter() - t0))
    status_code = prob.solve(solver or _cbc(timeLimit=left, threads=2, warmStart=warm))
    status = pulp.LpStatus[status_code]
    have = all(v.varValue is not None for v in R.values())
    objective = pulp.value(prob.objective) if have else None
    # CBC through PuLP: "Optimal" also when a time limit stopped it with a solution; check the bound
    name = {"Optimal": "optimal", "Infeasible": "infeasible"}.get(status, "unknown")
    if name == "optimal" and time.perf_counter() - t0 >= time_limit:
        name = "feasible"
    if log:
        log(f"remat milp: {status} ({name}), objective {objective}, {stats}")
    if not have or name == "infeasible":
        return CpsatResult(None, name, None, math.inf if name == "infeasible" else 0.0,
                           time.perf_counter() - t0, stats)
    seq: list[Item] = []
    for t in range(n):
        seq.extend(i for i in range(t + 1) if (t, i) in R and R[t, i].varValue > 0.5)
    bound = objective / p.scale if name == "optimal" else 0.0
    return CpsatResult(seq, name, objective / p.scale, bound, time.perf_counter() - t0, stats)


def _warm_start(p: RematProblem, hint: Sequence[Item], R: dict, S: dict, H: dict) -> bool:
    """Initial values of R, S and H from a hint sequence (CBC completes the rest); False if the hint
    does not fit this model (out-of-order first computes, reloads)."""
    from formulations.remat_cpsat import _hint_intervals

    if any(isinstance(i, tuple) for i in hint):
        return False
    events = _hint_intervals(p, hint)
    if events is None:
        return False
    n = p.n
    last_read: dict[tuple[int, int], int] = {}  # (node, instance stage) -> last stage reading it
    src_last: dict[int, int] = {}
    for v in range(n):
        for stage, _ in events[v]:
            for u in p.deps[v]:
                made = max(st for st, _ in events[u] if st < stage or (st == stage and u < v))
                last_read[u, made] = max(last_read.get((u, made), made), stage)
            for s in p.sources[v]:
                src_last[s] = max(src_last.get(s, 0), stage)
    for var in R.values():
        var.setInitialValue(0)
    for v in range(n):
        for stage, _ in events[v]:
            if (stage, v) not in R:
                return False
            R[stage, v].setInitialValue(1)
    for var in S.values():
        var.setInitialValue(0)
    for (u, made), last in last_read.items():
        for t in range(made + 1, last + 1):
            S[t, u].setInitialValue(1)
    for (t, s), var in H.items():
        var.setInitialValue(1 if t <= src_last.get(s, -1) else 0)
    return True

"""Rematerialisation as a CP-SAT interval model (retention intervals, in the spirit of Moccasin,
Bartan et al., ICML 2023), extended with reloads from off-chip copies.

Time. Stage s (0..n-1) computes node s for the first time; a recompute or reload of node v
(v < s) may happen in stage s before it. Event (s, v) happens at time tau(s, v) = 2(sn + v) + 1
(odd), so the events of a stage run in node order, which is topological. Sources (graph inputs)
become resident at even times.

Variables. Node v has C_v retention intervals [start_vi, end_vi]:
  i = 0      its first compute: start = tau(v, v), present;
  i >= 1     optional (a_vi), stage st_vi in (v, n), start = tau(st_vi, v); r_vi = 1 when the
             interval is a reload of v's stored outputs instead of a recompute (stored_v >= r_vi).
  a_vi -> a_v(i-1) and start_vi > end_v(i-1): intervals of one node are ordered and disjoint.
A source has one interval covering all its readers.
Dependencies. For every edge u -> v and every interval i of v that computes (a_vi - r_vi = 1),
some interval j of u covers its start:  start_uj < start_vi <= end_uj  (booleans b_viuj).
Memory. cumulative(intervals, sizes) <= budget: the bytes that planner.remat_plan.peak counts.
Objective. sum_i>=1 rc_v (a_vi - r_vi) + lc_v r_vi + sc_v stored_v, with rc, lc, sc in the
problem's objective (remat_problem.py); a recompute or a reload that is not allowed has no
variable.
Size. sum_v C_v intervals, about sum over edges of C_u C_v booleans; C = 2 by default (more for
nodes a hint recomputes more often).
Omits: reordering first computes (the given order is kept, as in Checkmate and Moccasin), and
recomputing a node more than C_v - 1 times.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from formulations.remat_problem import RematProblem
from planner.remat_plan import Item


@dataclass(frozen=True)
class CpsatResult:
    sequence: list[Item] | None  # None: no solution found
    status: str  # "optimal" | "feasible" | "infeasible" | "unknown"
    objective: float | None  # in the problem's cost unit
    bound: float  # proven lower bound, same unit
    seconds: float
    size: dict  # model statistics


def _tau(s: int, v: int, n: int) -> int:
    return 2 * (s * n + v) + 1


def model_order(p: RematProblem, sequence: Sequence[Item]) -> list[Item]:
    """`sequence` with the repeats of each stage sorted by node, as this model times them (a
    topological order still; the peak may differ)."""
    producer = p.graph.producer
    out: list[Item] = []
    block: list[Item] = []
    seen: set[int] = set()
    for item in sequence:
        if isinstance(item, int) and item not in seen:
            seen.add(item)
            out.extend(sorted(block, key=lambda x: x if isinstance(x, int) else producer.get(x[1], -1)))
            out.append(item)
            block = []
        else:
            block.append(item)
    return out + block


def _hint_intervals(p: RematProblem, hint: Sequence[Item]) -> dict[int, list[tuple[int, bool]]] | None:
    """node -> [(stage, is_reload)] of its events in `hint`, first compute first (None if the
    hint computes nodes for the first time out of program order)."""
    out: dict[int, list[tuple[int, bool]]] = {v: [] for v in range(p.n)}
    producer = p.graph.producer
    stage = 0
    seen_load: set[tuple[int, int]] = set()
    for item in hint:
        if isinstance(item, tuple):
            v = producer.get(item[1])
            if v is not None and out[v] and (v, stage) not in seen_load:  # one reload event per node and stage
                seen_load.add((v, stage))
                out[v].append((stage, True))
            continue
        if not out[item]:
            if item != stage:
                return None  # first computes out of program order: not a hint for this model
            stage += 1
            out[item].append((item, False))
        else:
            out[item].append((stage, False))
    return out


@dataclass(frozen=True)
class CpsatModel:
    """The model and its variables, by node and interval (remat_lns fixes and frees them)."""
    model: object  # cp_model.CpModel
    start: list  # [v][i]: model time of interval i of v (an int for i = 0, else an expression)
    stage: list  # [v][i]: stage variable (an int for i = 0)
    active: list  # [v][i]: literal (1 for i = 0)
    reload: list  # [v][i]: literal, the active one for reload-only nodes, or None
    src_start: dict  # source -> [start variable per interval]
    src_act: dict  # source -> [literal per interval] (1 for the first)
    stats: dict


def build(p: RematProblem, budget: int, *, intervals: int = 2, hint: Sequence[Item] | None = None) -> CpsatModel:
    """The retention-interval model of the module docstring, hinted with `hint` (every variable)."""
    from ortools.sat.python import cp_model

    n = p.n
    horizon = _tau(n, 0, n) + 1
    users = p.users
    events = _hint_intervals(p, hint) if hint is not None else None
    src_events = _source_events(p, hint, n) if events is not None else None
    m = cp_model.CpModel()
    inf = math.inf

    start: list[list] = []
    end: list[list] = []
    active: list[list] = []
    reload: list[list] = []
    stage_var: list[list] = []
    stored: dict[int, object] = {}
    objective = []
    mem_intervals, mem_demands = [], []
    for v in range(n):
        can_recompute = p.recompute_cost[v] < inf
        can_reload = p.reload_cost[v] < inf
        repeatable = p.size[v] > 0 and users[v] and (can_recompute or can_reload) and v < n - 1
        count = max(intervals, len(events[v]) if events else 0) if repeatable else 1
        s0 = _tau(v, v, n)
        starts, ends, acts, rels, stages = [s0], [m.new_int_var(s0, horizon, f"end_{v}_0")], [1], [None], [v]
        for i in range(1, count):
            st = m.new_int_var(v + 1, n - 1, f"stage_{v}_{i}")
            a = m.new_bool_var(f"active_{v}_{i}")
            if can_reload and can_recompute:
                r = m.new_bool_var(f"reload_{v}_{i}")
                m.add_implication(r, a)
            else:
                r = a if can_reload else None  # reload-only: every repeat is a reload
            s = 2 * n * st + (2 * v + 1)
            e = m.new_int_var(_tau(v + 1, v, n), horizon, f"end_{v}_{i}")
            m.add(e >= s)
            if i > 1:
                m.add_implication(a, acts[-1])
            m.add(s >= ends[-1] + 1).only_enforce_if(a)
            m.add(st == n - 1).only_enforce_if(~a)  # canonical form of an unused interval
            m.add(e == s).only_enforce_if(~a)
            starts.append(s)
            ends.append(e)
            acts.append(a)
            rels.append(r)
            stages.append(st)
            if r is not None:
                if v not in stored:
                    stored[v] = m.new_bool_var(f"stored_{v}")
                    objective.append(p.int_cost(p.store_cost[v]) * stored[v])
                m.add_implication(r, stored[v])
                objective.append(p.int_cost(p.reload_cost[v]) * r)
            if can_recompute:
                objective.append(p.int_cost(p.recompute_cost[v]) * (a - r if r is not None else a))
        start.append(starts)
        end.append(ends)
        active.append(acts)
        reload.append(rels)
        stage_var.append(stages)
        if p.size[v] > 0:
            for i in range(count):
                if i == 0:
                    iv = m.new_interval_var(starts[0], ends[0] + 1 - starts[0], ends[0] + 1, f"iv_{v}_0")
                else:
                    length = m.new_int_var(1, horizon, f"len_{v}_{i}")
                    iv = m.new_optional_interval_var(starts[i], length, ends[i] + 1, acts[i], f"iv_{v}_{i}")
                mem_intervals.append(iv)
                mem_demands.append(p.size[v])

    def computes(v: int, i: int):
        """1, or the literal/expression that says interval i of v is a compute (None: never)."""
        if i == 0:
            return 1
        a, r = active[v][i], reload[v][i]
        if r is None:
            return a
        return None if r is a else a - r

    # dependencies: every computing interval of v is covered by an interval of each producer
    n_bools = 0
    cover: dict[tuple[int, int, int, int], object] = {}  # (v, i, u, j) -> interval j of u covers i of v
    for v in range(n):
        for i in range(len(start[v])):
            need = computes(v, i)
            if need is None:
                continue
            for u in p.deps[v]:
                choices = []
                for j in range(len(start[u])):
                    if i == 0 and j > 0 and _tau(u + 1, u, n) > _tau(v, v, n):
                        continue  # a repeat of u starts after v's first compute
                    b = m.new_bool_var(f"cover_{v}_{i}_{u}_{j}")
                    cover[(v, i, u, j)] = b
                    n_bools += 1
                    if j > 0:
                        m.add_implication(b, active[u][j])
                        m.add(start[u][j] <= start[v][i] - 1).only_enforce_if(b)
                    m.add(end[u][j] >= start[v][i]).only_enforce_if(b)
                    choices.append(b)
                m.add(sum(choices) >= need)
    # sources: up to C intervals (the first a load, the others reloads), each covering its readers
    src_start: dict[int, list] = {}
    src_end: dict[int, list] = {}
    src_act: dict[int, list] = {}
    for s, readers in p.source_users().items():
        if not readers:
            continue
        count = max(intervals, len(src_events[s]) if src_events else 0)
        src_start[s], src_end[s], src_act[s] = [], [], []
        for j in range(count):
            lo = m.new_int_var(0, horizon, f"src_start_{s}_{j}")
            hi = m.new_int_var(0, horizon, f"src_end_{s}_{j}")
            a = 1 if j == 0 else m.new_bool_var(f"src_active_{s}_{j}")
            m.add(hi >= lo)
            if j > 0:
                m.add(lo >= src_end[s][-1] + 1).only_enforce_if(a)
                m.add(lo == horizon).only_enforce_if(~a)
                m.add(hi == horizon).only_enforce_if(~a)
                if j > 1:
                    m.add_implication(a, src_act[s][-1])
                objective.append(p.int_cost(p.source_reload_cost[s]) * a)
            length = m.new_int_var(1, horizon + 1, f"src_len_{s}_{j}")
            if j == 0:
                mem_intervals.append(m.new_interval_var(lo, length, hi + 1, f"src_iv_{s}_{j}"))
            else:
                mem_intervals.append(m.new_optional_interval_var(lo, length, hi + 1, a, f"src_iv_{s}_{j}"))
            mem_demands.append(p.source_size[s])
            src_start[s].append(lo)
            src_end[s].append(hi)
            src_act[s].append(a)
        for v in readers:
            for i in range(len(start[v])):
                need = computes(v, i)
                if need is None:
                    continue
                choices = []
                for j in range(count):
                    b = m.new_bool_var(f"src_cover_{v}_{i}_{s}_{j}")
                    n_bools += 1
                    if j > 0:
                        m.add_implication(b, src_act[s][j])
                    m.add(src_start[s][j] <= start[v][i] - 1).only_enforce_if(b)
                    m.add(src_end[s][j] >= start[v][i]).only_enforce_if(b)
                    choices.append(b)
                m.add(sum(choices) >= need)
    m.add_cumulative(mem_intervals, mem_demands, budget)
    m.minimize(sum(objective))

    if events is not None:
        _add_hint(m, p, events, stage_var, active, reload, end, start, cover, n)
        for s, evs in src_events.items():
            for j, (lo, hi) in enumerate(evs[: len(src_start.get(s, ()))]):
                m.add_hint(src_start[s][j], lo)
                m.add_hint(src_end[s][j], hi)
                if j > 0:
                    m.add_hint(src_act[s][j], 1)
            for j in range(len(evs), len(src_start.get(s, ()))):
                m.add_hint(src_act[s][j], 0)
                m.add_hint(src_start[s][j], horizon)
                m.add_hint(src_end[s][j], horizon)
    stats = {"nodes": n, "intervals": len(mem_intervals), "cover_bools": n_bools,
             "variables": len(m.proto.variables), "constraints": len(m.proto.constraints)}
    return CpsatModel(m, start, stage_var, active, reload, src_start, src_act, stats)


def solve(p: RematProblem, budget: int, *, time_limit: float = 60.0, intervals: int = 2,
          hint: Sequence[Item] | None = None, workers: int = 2, presolve: bool = True,
          log: Callable[[str], None] | None = None) -> CpsatResult:
    from ortools.sat.python import cp_model

    t0 = time.perf_counter()
    built = build(p, budget, intervals=intervals, hint=hint)
    m = built.model
    inf = math.inf
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.1, time_limit - (time.perf_counter() - t0))
    solver.parameters.num_workers = workers
    if presolve:  # one round: CP-SAT's full presolve spends minutes on these models (probing)
        solver.parameters.max_presolve_iterations = 1
    else:
        solver.parameters.cp_model_presolve = False
    status = solver.solve(m)
    name = {cp_model.OPTIMAL: "optimal", cp_model.FEASIBLE: "feasible", cp_model.INFEASIBLE: "infeasible"}.get(
        status, "unknown")
    stats = built.stats
    if log:
        log(f"remat cpsat: {name}, objective {solver.objective_value if name in ('optimal', 'feasible') else '-'}, "
            f"bound {solver.best_objective_bound}, {stats}")
    if name not in ("optimal", "feasible"):
        return CpsatResult(None, name, None, 0.0 if name != "infeasible" else inf, time.perf_counter() - t0, stats)

    seq = extract(p, built, solver.value)
    return CpsatResult(seq, name, solver.objective_value / p.scale, solver.best_objective_bound / p.scale,
                       time.perf_counter() - t0, stats)


def extract(p: RematProblem, built: CpsatModel, value: Callable[[object], int]) -> list[Item]:
    """The sequence of an assignment; `value` maps a variable of built.model to its value."""
    n = p.n
    evs: list[tuple[int, int, Item]] = []  # (time, 0 for loads of sources / 1 for the rest, item)
    for v in range(n):
        for i in range(len(built.start[v])):
            if i > 0 and not value(built.active[v][i]):
                continue
            t = _tau(value(built.stage[v][i]), v, n) if i > 0 else built.start[v][0]
            rel = built.reload[v][i]
            if i > 0 and rel is not None and value(rel):
                evs.extend((t, 1, ("load", x)) for x in p.graph.ops[v].outputs
                           if p.graph.is_buffer(x, p.target.include_weights))
            else:
                evs.append((t, 1, v))
    for s, acts in built.src_act.items():
        for j in range(1, len(acts)):
            if value(acts[j]):
                evs.append((value(built.src_start[s][j]), 0, ("load", s)))
    evs.sort(key=lambda e: (e[0], e[1]))
    return [item for _, _, item in evs]


def _source_events(p: RematProblem, hint: Sequence[Item], n: int) -> dict[int, list[tuple[int, int]]]:
    """source -> [(start, end)] model times of its instances in `hint`: an explicit load (or the
    first read) opens one; it reaches its last read before the next."""
    out: dict[int, list[list[int]]] = {s: [] for s in p.source_size}
    stage = 0
    seen: set[int] = set()
    pending: set[int] = set(p.source_size)  # sources whose next read opens an instance
    for item in hint:
        if isinstance(item, tuple):
            if item[1] in out:
                pending.add(item[1])
            continue
        if item not in seen:
            seen.add(item)
            t = _tau(item, item, n)
            stage = item + 1  # the stage of the recomputes that follow
        else:
            t = _tau(stage, item, n)
        for s in p.sources[item]:
            if s in pending:
                out[s].append([t - 1, t])
                pending.discard(s)
            out[s][-1][1] = t
    return {s: [tuple(x) for x in evs] for s, evs in out.items()}


def _add_hint(m, p: RematProblem, events, stage_var, active, reload, end, start, cover, n: int) -> None:
    """Hint every decision variable with the hint sequence's intervals (ends: last covered read),
    the cover booleans included, so that a complete hint is a feasible solution as it stands."""
    times = {v: [_tau(s, v, n) for s, _ in events[v]] for v in range(n)}
    last = {v: list(ts) for v, ts in times.items()}
    chosen: set[tuple[int, int, int, int]] = set()
    for v in range(n):
        for i, t in enumerate(times[v][: len(start[v])]):
            if i > 0 and events[v][i][1]:
                continue  # a reload reads nothing
            for u in p.deps[v]:
                us = times[u][: len(start[u])]
                j = max((k for k, s in enumerate(us) if s < t), default=0)
                last[u][j] = max(last[u][j], t)
                chosen.add((v, i, u, j))
    for key, b in cover.items():
        m.add_hint(b, key in chosen)
    for v in range(n):
        ts = times[v][: len(start[v])]
        for i in range(len(start[v])):
            if i == 0:
                m.add_hint(end[v][0], last[v][0])
                continue
            used = i < len(ts)
            m.add_hint(active[v][i], used)
            if reload[v][i] is not None and reload[v][i] is not active[v][i]:
                m.add_hint(reload[v][i], used and events[v][i][1])
            m.add_hint(stage_var[v][i], events[v][i][0] if used else n - 1)
            m.add_hint(end[v][i], last[v][i] if used else _tau(n - 1, v, n))

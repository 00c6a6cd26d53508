"""CP-SAT model of the min-peak order of one segment (COSMA's MPMF without spills).

Data: the ops X of a segment (k of them, run after the op set `start`), every counted
root buffer t with size w_t, its producer and readers.
Variables: pos_o in [asap_o, alap_o] (ops before / after o inside X prune the window),
all different; pos_p < pos_o for every edge p -> o inside X.
Buffers: t is resident from s_t to e_t (steps, inclusive):
  s_t = pos(producer), 0 if it exists before X, min over readers for a graph input;
  e_t = max over its readers in X, k - 1 if read after X, s_t if nobody reads it.
In-place: d_{o,t} = 1 when o is t's last reader (e_t = pos_o) and t is o's first such
in-place input big enough for o's output; then t's interval ends one step earlier (the
output takes its buffer over): interval [s_t, e_t + 1 - d_t).
Objective: min P with cumulative(intervals, w, P - C) where C are the bytes resident
through the whole segment.
Size: k position variables, one interval (and one max/min) per buffer, one Boolean per
(op, in-place input). Exact as long as every op with in-place inputs has one counted
output (otherwise its in-place reuse is left out: an upper model, no proof).
Warm start: the best known order (add_hint).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from formulations.schedule_dp import Problem


@dataclass(frozen=True, slots=True)
class SegmentSolution:
    order: tuple[int, ...] | None  # ops of the segment in order (None when none was found)
    peak: float  # its peak (profile-checked), inf when order is None
    bound: int  # proven lower bound on the segment's peak (0 when the model is not exact)
    optimal: bool  # CP-SAT proved its objective optimal
    exact: bool  # the model counts exactly what bounds.live_profile counts
    seconds: float


def solve_segment(prob: Problem, ops: Sequence[int], start: int, *, hint: Sequence[int] | None = None,
                  floor: int = 0, deadline: float, workers: int = 2) -> SegmentSolution:
    from ortools.sat.python import cp_model

    t0 = time.perf_counter()
    xs = list(ops)
    k = len(xs)
    inside = sum(1 << o for o in xs)
    end = start | inside
    model = cp_model.CpModel()
    # ---- variables: positions, pruned by ancestors / descendants inside the segment
    pos = {o: model.new_int_var((prob.anc[o] & inside).bit_count(), k - 1 - (prob.desc[o] & inside).bit_count(),
                                f"pos_{o}") for o in xs}
    model.add_all_different(list(pos.values()))
    for o in xs:
        for p in prob.preds[o]:
            if p in pos:
                model.add(pos[p] < pos[o])
    # ---- buffers
    const = 0
    first: dict[int, object] = {}
    last: dict[int, object] = {}
    sizes: dict[int, int] = {}
    read_later: dict[int, bool] = {}
    for t, size, users, prod in prob.roots:
        if size == 0:
            continue
        readers = [pos[o] for o in xs if (users >> o) & 1]
        later = bool(users & ~end)
        before = (prod is not None and (start >> prod) & 1) or (prod is None and users & start)
        if before:
            if not users & ~start:
                continue
            if later:
                const += size
                continue
            s = 0
        elif prod is not None and (inside >> prod) & 1:
            s = pos[prod]
        elif prod is None and readers:
            s = model.new_int_var(0, k - 1, f"first_{t}")
            model.add_min_equality(s, readers)
        else:
            continue
        if later:
            e = k - 1
        elif readers:
            e = model.new_int_var(0, k - 1, f"last_{t}")
            model.add_max_equality(e, readers)
        else:
            e = s
        first[t], last[t], sizes[t], read_later[t] = s, e, size, later
    # ---- in-place reuse: first big-enough input whose last reader is this op
    donated: dict[int, list] = {t: [] for t in sizes}
    exact = True
    for o in xs:
        e = prob.effects[o]
        if not e.donors:
            continue
        if len(e.out_sizes) != 1:
            exact = False
            continue
        earlier = []
        for r, size, _ in e.donors:
            if r not in sizes or size < e.out_sizes[0] or read_later[r]:
                continue
            is_last = model.new_bool_var(f"last_{o}_{r}")
            model.add(last[r] <= pos[o]).only_enforce_if(is_last)
            model.add(last[r] >= pos[o] + 1).only_enforce_if(~is_last)
            took = model.new_bool_var(f"takes_{o}_{r}")
            model.add_bool_and([is_last, *(~x for x in earlier)]).only_enforce_if(took)
            model.add_bool_or([~is_last, *earlier, took])
            donated[r].append(took)
            earlier.append(is_last)
    intervals, demands = [], []
    for t, size in sizes.items():
        stop = model.new_int_var(0, k, f"stop_{t}")
        model.add(stop == last[t] + 1 - sum(donated[t]))
        length = model.new_int_var(0, k, f"len_{t}")
        intervals.append(model.new_interval_var(first[t], length, stop, f"live_{t}"))
        demands.append(size)
    everything = sum(sizes.values()) + const
    hint_peak = max(prob.profile(hint, start)) if hint and exact else everything
    cap = model.new_int_var(max(0, floor - const), max(0, hint_peak - const, floor - const), "peak")
    model.add_cumulative(intervals, demands, cap)
    model.minimize(cap)
    if hint:
        for i, o in enumerate(hint):
            model.add_hint(pos[o], i)
    # ---- solve
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.1, deadline - time.perf_counter())
    solver.parameters.num_workers = workers
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return SegmentSolution(None, float("inf"), 0, False, exact, time.perf_counter() - t0)
    order = tuple(sorted(xs, key=lambda o: solver.value(pos[o])))
    peak = max(prob.profile(order, start))
    bound = int(solver.best_objective_bound) + const if exact else 0
    return SegmentSolution(order, peak, bound, status == cp_model.OPTIMAL and exact, exact,
                           time.perf_counter() - t0)

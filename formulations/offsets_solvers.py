"""Buffer placement with off-the-shelf solvers, in solver units (see formulations/offsets.py).

CP-SAT. Data: per buffer a fixed time interval [first, last) in section numbers and a size w.
Variables: offset x_b in [0, U - w_b] (x_b = a_b k_b when aligned), U the capacity or the best
arena known; for minimisation an arena variable A >= x_b + w_b, minimised. Constraints: one
NoOverlap2D over (time interval, [x_b, x_b + w_b)), plus the redundant cumulative over time with
demands w_b and capacity U (it gives the peak-live reasoning directly). Search: with
`Options.cpsat_strategy`, a fixed decision strategy that places the buffer with the lowest
possible offset at that offset, ties to the widest lifetime: the canonical placements of the
exact search, with CP-SAT's propagation and clause learning behind it. Sizes arrive already
divided by their common factor, which is what makes the offsets' domains small.
Size: n offset variables, one 2-D no-overlap and one cumulative constraint.

MILP (PuLP/CBC), kept for comparison: continuous offsets (integer multiples when aligned),
one binary z_ij per pair whose lifetimes overlap, x_i + w_i <= x_j + U (1 - z_ij) and
x_j + w_j <= x_i + U z_ij, A >= x_i + w_i. Size: n + P variables, 2P + n constraints; its
big-M relaxation is weak, which is why it is no match for the other two.
"""

from __future__ import annotations

import time

from formulations.offsets import Instance, Options, Outcome, Stop, outcome

ORDERS = ("widest", "start", "largest")


def cpsat(inst: Instance, cap: int | None, deadline: float, options: Options, incumbent: Outcome,
          order: str = "widest", stop: Stop | None = None) -> Outcome:
    """CP-SAT on the NoOverlap2D model; `order` ranks the buffers for the decision strategy."""
    from ortools.sat.python import cp_model

    if order not in ORDERS:
        raise ValueError(f"unknown CP-SAT buffer order {order!r}; choose one of {', '.join(ORDERS)}")
    left = deadline - time.perf_counter()
    lb = inst.lower_bound()
    ub = cap if cap is not None else (incumbent.arena if incumbent.offsets is not None else sum(inst.size))
    if left <= 0 or lb > ub:
        return Outcome(None, "infeasible" if lb > ub else "unknown", lb, "cpsat")
    span = [inst.times[inst.last[b]] - inst.times[inst.first[b]] for b in range(inst.n)]

    model = cp_model.CpModel()
    times, spaces, offsets = [], [], []
    for b in range(inst.n):
        w, a = inst.size[b], inst.align[b]
        name = f"b{b}"
        if w > ub:
            return Outcome(None, "infeasible", lb, "cpsat")
        if a > 1:
            k = model.new_int_var(0, (ub - w) // a, f"k_{name}")
            x = model.new_int_var(0, ub - w, f"off_{name}")
            model.add(x == a * k)
        else:
            x = model.new_int_var(0, ub - w, f"off_{name}")
        offsets.append(x)
        times.append(model.new_fixed_size_interval_var(inst.first[b], inst.last[b] - inst.first[b], f"t_{name}"))
        spaces.append(model.new_fixed_size_interval_var(x, w, f"s_{name}"))
    model.add_no_overlap_2d(times, spaces)
    model.add_cumulative(times, list(inst.size), ub)
    if cap is None:
        arena = model.new_int_var(lb, ub, "arena")
        for x, w in zip(offsets, inst.size):
            model.add(x + w <= arena)
        model.minimize(arena)
    if options.cpsat_strategy:
        key = {"widest": lambda b: (-span[b], -inst.size[b], b), "start": lambda b: (inst.first[b], -inst.size[b], b),
               "largest": lambda b: (-inst.size[b], -span[b], b)}[order]
        ranked = sorted(range(inst.n), key=key)
        model.add_decision_strategy([offsets[b] for b in ranked], cp_model.CHOOSE_LOWEST_MIN,
                                    cp_model.SELECT_MIN_VALUE)
    if incumbent.offsets is not None and inst.arena(incumbent.offsets) <= ub:
        for x, o in zip(offsets, incumbent.offsets):
            model.add_hint(x, o)

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = left
    solver.parameters.num_workers = max(1, options.cpsat_workers)
    if options.cpsat_strategy and options.cpsat_fixed:
        solver.parameters.search_branching = cp_model.FIXED_SEARCH
    if stop is not None and not stop.attach(solver):
        return Outcome(None, "unknown", lb, f"cpsat:{order}")
    status = solver.solve(model)
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        found = [int(solver.value(x)) for x in offsets]
        bound = int(solver.best_objective_bound) if cap is None else lb
        return outcome(inst, found, cap, f"cpsat:{order}", bound, proven=status == cp_model.OPTIMAL and cap is None)
    if status == cp_model.INFEASIBLE:
        return Outcome(None, "infeasible", ub + 1, f"cpsat:{order}")
    return Outcome(None, "unknown", lb, f"cpsat:{order}")


def milp(inst: Instance, cap: int | None, deadline: float, options: Options, incumbent: Outcome) -> Outcome:
    import pulp

    left = deadline - time.perf_counter()
    lb = inst.lower_bound()
    ub = cap if cap is not None else (incumbent.arena if incumbent.offsets is not None else sum(inst.size))
    if left <= 0 or lb > ub:
        return Outcome(None, "infeasible" if lb > ub else "unknown", lb, "milp")
    prob = pulp.LpProblem("offsets", pulp.LpMinimize)
    x = []
    for b in range(inst.n):
        w, a = inst.size[b], inst.align[b]
        if a > 1:
            k = _var(prob, f"k_{b}", 0, (ub - w) // a, cat="Integer")
            x.append(a * k)
        else:
            x.append(_var(prob, f"off_{b}", 0, ub - w))
    arena = _var(prob, "arena", lb, ub)
    prob += arena
    for b in range(inst.n):
        prob += x[b] + inst.size[b] <= arena
    for i in range(inst.n):
        for j in inst.overlaps[i]:
            if j > i:
                z = _var(prob, f"z_{i}_{j}", cat="Binary")  # 1: i below j
                prob += x[i] + inst.size[i] <= x[j] + ub * (1 - z)
                prob += x[j] + inst.size[j] <= x[i] + ub * z
    warm = incumbent.offsets is not None and inst.arena(incumbent.offsets) <= ub
    if warm:
        for b, o in enumerate(incumbent.offsets):
            if inst.align[b] == 1:
                x[b].setInitialValue(o)
        arena.setInitialValue(inst.arena(incumbent.offsets))
        for v in prob.variables():
            if v.name.startswith("z_"):
                i, j = map(int, v.name[2:].split("_"))
                v.setInitialValue(int(incumbent.offsets[i] < incumbent.offsets[j]))
    left = deadline - time.perf_counter()  # building the pairs took some of it
    if left < 0.5:
        return Outcome(None, "unknown", lb, "milp")
    solver = _cbc(msg=False, timeLimit=max(1, int(0.6 * left)), threads=1, warmStart=warm)  # file I/O takes the rest
    prob.solve(solver)
    state = pulp.LpStatus[prob.status]
    if state == "Infeasible":
        return Outcome(None, "infeasible", ub + 1, "milp")
    values = [pulp.value(v) for v in x]
    if any(v is None for v in values):
        return Outcome(None, "unknown", lb, "milp")
    found = [int(round(v)) for v in values]
    bound = lb
    proven = prob.sol_status == pulp.LpSolutionOptimal and cap is None  # not when stopped by the clock
    if _valid(inst, found):
        return outcome(inst, found, cap, "milp", bound, proven=proven)
    return Outcome(None, "unknown", lb, "milp")


def _var(prob, name: str, low: float | None = None, up: float | None = None, cat: str = "Continuous"):
    """A PuLP variable of `prob` (PuLP 3 attaches it to the problem; older ones take LpVariable)."""
    import pulp

    if hasattr(prob, "add_variable"):
        return prob.add_variable(name, low, up, cat=cat)
    return pulp.LpVariable(name, low, up, cat=cat)


def _cbc(**params):
    """CBC through COIN_CMD, with the binary that ships inside PuLP when there is one."""
    import os

    import pulp
    from pulp.apis import coin_api

    bundled = getattr(coin_api, "pulp_cbc_path", None)
    if bundled and os.path.exists(bundled):
        return pulp.COIN_CMD(path=bundled, **params)
    return pulp.COIN_CMD(**params)


def _valid(inst: Instance, offsets: list[int]) -> bool:
    """Rounded LP values can be off by a rounding error; keep only clean placements."""
    for i in range(inst.n):
        if offsets[i] < 0 or offsets[i] % inst.align[i]:
            return False
        for j in inst.overlaps[i]:
            if offsets[i] < offsets[j] + inst.size[j] and offsets[j] < offsets[i] + inst.size[i]:
                return False
    return True

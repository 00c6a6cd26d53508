"""Large-neighbourhood search over the retention-interval model (remat_cpsat), from a plan.

On graphs of a few hundred nodes and more, CP-SAT on the whole model neither improves a hinted
plan nor moves its bound within a minute (RL500 at 90%, 2 workers). LNS keeps its strength
local: build the model once, get the full assignment of the incumbent sequence (CP-SAT with every
variable fixed to the hint), then repeatedly free a window of consecutive stages: all intervals
of the nodes first computed there, of the nodes they read and of the nodes recomputed or
reloaded there (and the cover booleans that read or are read by them); fix every other variable
to the incumbent and re-solve that neighbourhood for `round_seconds`; a better solution becomes
the incumbent. Windows are drawn at random (seeded) around a recompute or reload of the
incumbent (or anywhere, one round in five); they start at `window` stages, grow by 20% after a
round solved to optimality in under half its time and shrink by 20% otherwise. Stops at
`time_limit`.
Every accepted incumbent is a solution of the full model, so its sequence keeps the budget.
Never worse than its start: the start is returned when no round improves it.
Omits: a bound (see remat_bounds) and moving first computes (the model keeps the order).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from formulations import remat_cpsat
from formulations.remat_problem import RematProblem
from planner.remat_plan import Item

_NODE_OF = re.compile(r"^(?:stage|active|reload|end|len|stored|iv)_(\d+)")
_COVER = re.compile(r"^cover_(\d+)_\d+_(\d+)_\d+$")


@dataclass(frozen=True)
class LnsResult:
    sequence: list[Item]
    objective: float  # in the problem's cost unit
    start_objective: float  # of the sequence LNS started from (after CP-SAT's own ordering)
    rounds: int
    improvements: int
    seconds: float


def improve(p: RematProblem, budget: int, sequence: Sequence[Item], *, time_limit: float = 60.0,
            window: float = 120, round_seconds: float = 6.0, seed: int = 0, workers: int = 2,
            stop_at: float = 0.0, log: Callable[[str], None] | None = None) -> LnsResult | None:
    """LNS from `sequence` (model-ordered, within `budget`); None when CP-SAT cannot take it as a
    solution (it breaks the model's rules) within the time limit. Stops early once the objective
    reaches `stop_at` (a known lower bound, in the problem's cost unit)."""
    from ortools.sat.python import cp_model

    t0 = time.perf_counter()
    built = remat_cpsat.build(p, budget, intervals=2, hint=sequence)
    proto = built.model.proto
    owner: list[tuple[int, ...]] = []  # variable index -> nodes whose window frees it (empty: always free)
    for var in proto.variables:
        if (mt := _COVER.match(var.name)) is not None:
            owner.append((int(mt.group(1)), int(mt.group(2))))
        elif (mt := _NODE_OF.match(var.name)) is not None:
            owner.append((int(mt.group(1)),))
        else:
            owner.append(())  # sources: few, always free
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = workers
    solver.parameters.max_presolve_iterations = 1
    solver.parameters.fix_variables_to_their_hinted_value = True
    solver.parameters.max_time_in_seconds = max(1.0, time_limit - (time.perf_counter() - t0))
    status = solver.solve(built.model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        if log:
            log(f"remat lns: the start is not a solution of the model ({solver.status_name(status)})")
        return None
    values = list(solver.response_proto.solution)
    best = solver.objective_value
    start = best
    solver.parameters.fix_variables_to_their_hinted_value = False
    rng = random.Random(seed)
    rounds = improvements = 0
    n = p.n
    while time.perf_counter() - t0 < time_limit - 0.5 and best > p.int_cost(stop_at) + 0.5:
        rounds += 1
        seq = remat_cpsat.extract(p, built, _value_of(values))
        repeats = _repeated_nodes(seq)
        centre = rng.choice(repeats) if repeats and rng.random() < 0.8 else rng.randrange(n)
        size = min(n, int(window))
        lo = max(0, min(n - size, centre - rng.randrange(size)))
        free = _neighbourhood(p, seq, lo, lo + size)
        sub = built.model.clone()
        sub.clear_hints()
        for k, var in enumerate(sub.proto.variables):
            if owner[k] and not any(v in free for v in owner[k]):
                var.domain.clear()
                var.domain.extend([values[k], values[k]])
        sub.proto.solution_hint.vars.extend(range(len(values)))
        sub.proto.solution_hint.values.extend(values)
        solver.parameters.max_time_in_seconds = max(0.2, min(round_seconds, time_limit - (time.perf_counter() - t0)))
        status = solver.solve(sub)
        # grow the window while its rounds are solved to optimality quickly, shrink it when they time out
        fast = status == cp_model.OPTIMAL and solver.wall_time < round_seconds / 2
        window = min(n, window * 1.2) if fast else max(8, window * 0.8)
        if status in (cp_model.OPTIMAL, cp_model.FEASIBLE) and solver.objective_value < best - 0.5:
            best = solver.objective_value
            values = list(solver.response_proto.solution)
            improvements += 1
            if log:
                log(f"remat lns: round {rounds}, stages {lo}-{lo + size - 1} ({len(free)} nodes free): "
                    f"objective {best / p.scale:.6g}")
    seq = remat_cpsat.extract(p, built, _value_of(values))
    return LnsResult(seq, best / p.scale, start / p.scale, rounds, improvements, time.perf_counter() - t0)


def _value_of(values: list[int]) -> Callable[[object], int]:
    return lambda var: values[var.index]


def _neighbourhood(p: RematProblem, seq: Sequence[Item], lo: int, hi: int) -> set[int]:
    """Nodes whose intervals can change the memory of stages lo..hi-1: the nodes computed first
    there, the nodes they read, and the nodes recomputed or reloaded in those stages."""
    free = set(range(lo, hi))
    for v in range(lo, hi):
        free.update(p.deps[v])
    producer = p.graph.producer
    stage = 0
    seen: set[int] = set()
    for item in seq:
        node = item if isinstance(item, int) else producer.get(item[1])
        if isinstance(item, int) and item not in seen:
            seen.add(item)
            stage = item + 1
            continue
        if node is not None and lo <= stage < hi:
            free.add(node)
    return free


def _repeated_nodes(seq: Sequence[Item]) -> list[int]:
    seen: set[int] = set()
    out: list[int] = []
    for item in seq:
        if isinstance(item, int):
            if item in seen:
                out.append(item)
            seen.add(item)
    return out

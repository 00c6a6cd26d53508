"""Joint schedule + tensor replacement (spill / reload) + offsets, minimising the
non-compulsory off-chip traffic at a scratchpad capacity C (COSMA's problem).

Our model is a logic-based Benders loop:
  master  residency (and, unless the order is given, the schedule) with the capacity as an
          aggregate constraint per step and no offsets: formulations.joint_models
          (GapMaster for a fixed order: one keep/evict binary per gap between two uses of a
          tensor; StepMaster for a free order: time-indexed within ASAP/ALAP windows);
  slave   formulations.offsets packs the master's buffers (one per residency interval, split at
          reloads, joined by in-place takeovers) into [0, C);
  cut     when the packing fails, the smallest step window [l, r] whose clipped buffers still do
          not pack is found by bisection, and a no-good cut forbids keeping those buffers
          together in that window (any superset of an unpackable occupancy is unpackable, so
          the cut removes no packable plan); then the master is solved again.
The master's bound is a lower bound on the true optimum; a master optimum that packs is
optimal. Every plan is emitted as instructions (joint_residency) and checked by
planner.check; the best checked plan is kept, starting from the best baseline pipeline, and
returned with its gap when time runs out.

Flow of `solve` with a free order: (1) warm start: the baseline pipelines with the TFLite
allocator, every order and policy (zero traffic ends the search); (2) the fixed-order loop on
the program order, the lpmf order and the incumbent's order, for incumbents; (3) the
order-free live-across bound (formulations.joint_bound), which often meets the incumbent and
proves it optimal; (4) the time-indexed master with its cut loop, hinted with the incumbent.
With `schedule` given, only the fixed-order loop runs and the bound holds for that order.

COSMA's published monolithic model (per-step offsets with pairwise big-M) is
formulations.joint_cosma, selected by model="cosma" (free order) or "cosma_fs" (order given).

Omits: recomputation (formulations.remat); in-place takeover of a donor of another size;
cuts are proven only when formulations.offsets proves the window infeasible (an "unknown"
window still cuts, and the result's bound then stops being claimed).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from formulations.joint_bound import across_bound
from formulations.joint_models import GapMaster, StepMaster
from formulations.joint_residency import Choice, Timeline, order_of, requests
from planner import baselines, bounds
from planner.check import PlanError, check
from planner.graph import LifetimeGraph
from planner.plan import Plan, SolverRecord
from planner.target import Target

MODELS = ("ours", "cosma", "cosma_fs")


class JointInputError(ValueError):
    """Options the joint formulation cannot run with; the message names the value."""


@dataclass(frozen=True)
class JointResult:
    plan: Plan | None  # best checked plan (None only when no plan exists or none was found)
    status: str  # "optimal" | "feasible" | "infeasible" | "unknown"
    objective: int | None  # non-compulsory bytes of `plan` (the checker's noncompulsory_bytes)
    bound: float  # proven lower bound on the optimum over the plans the model covers
    gap: float | None  # (objective - bound) / objective; 0 when proven optimal
    seconds: float
    iterations: int  # master solves
    cuts: int  # packing cuts added
    model: str
    backend: str
    fixed_order: bool  # True when the order was given (the bound holds for that order only)
    log: tuple[str, ...] = field(default=(), repr=False)


class _Run:
    """Shared state of one solve: deadline, incumbent, bound, progress lines."""

    def __init__(self, graph: LifetimeGraph, target: Target, time_limit: float, label: str,
                 progress: Callable[[str], None] | None):
        self.graph, self.target, self.label = graph, target, label
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + time_limit
        self.best: Plan | None = None
        self.bound = 0.0
        self.proven = True  # False once a cut rests on an unproven packing verdict
        self.iterations = self.cuts = 0
        self.lines: list[str] = []
        self.progress = progress

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def say(self, text: str) -> None:
        line = f"[joint {self.label} {time.perf_counter() - self.t0:6.1f}s] {text}"
        self.lines.append(line)
        if self.progress:
            self.progress(line)

    def cost(self) -> float:
        return math.inf if self.best is None else self.best.metrics["noncompulsory_bytes"]

    def offer(self, plan: Plan, source: str) -> bool:
        if plan.metrics["noncompulsory_bytes"] < self.cost():
            self.best = plan
            self.say(f"incumbent {int(self.cost())} B from {source}")
            return True
        return False

    def done(self) -> bool:
        return self.best is not None and self.cost() <= self.bound + 1e-6


def solve(graph: LifetimeGraph, target: Target, *, time_limit: float = 60.0, backend: str = "cpsat",
          model: str = "ours", schedule: Sequence[int] | None = None, warm_start: bool = True,
          progress: Callable[[str], None] | None = None, threads: int = 4,
          pack_limit: float = 2.0) -> JointResult:
    """Minimise non-compulsory traffic at target.capacity; see the module docstring."""
    if model not in MODELS:
        raise JointInputError(f"unknown joint model {model!r}; choose one of {', '.join(MODELS)}")
    if target.capacity is None:
        raise JointInputError("the joint formulation needs a target capacity (got an unbounded target)")
    if model == "cosma_fs" and schedule is None:
        schedule = baselines.program_order(graph)
    if schedule is not None:
        bounds.check_order(graph, schedule)
    run = _Run(graph, target, time_limit, f"{model}:{backend}", progress)
    least = bounds.m_r(graph, target.include_weights, target.alignment)
    if target.capacity < least:
        run.say(f"capacity {target.capacity} is below M_R = {least}: no plan fits")
        return _result(run, model, backend, schedule is not None, infeasible=True)
    if warm_start:
        _warm(run, schedule)
    if run.cost() == 0 and model == "ours":  # nothing beats zero traffic
        return _result(run, model, backend, schedule is not None)
    if model in ("cosma", "cosma_fs"):
        from formulations import joint_cosma

        joint_cosma.run(run, schedule, backend, threads)
    elif schedule is not None:
        _fixed_order(run, list(schedule), backend, threads, pack_limit, run.deadline)
    else:
        _free_order(run, backend, threads, pack_limit)
    return _result(run, model, backend, schedule is not None)


def plan(graph: LifetimeGraph, target: Target, *, time_limit: float = 60.0,
         progress: Callable[[str], None] | None = None, **options) -> Plan:
    """The best checked plan of `solve`, with its SolverRecord (raises if none exists)."""
    result = solve(graph, target, time_limit=time_limit, progress=progress, **options)
    if result.plan is None:
        raise baselines.InfeasibleError(f"joint: no plan fits {graph.name!r} into {target.capacity} bytes "
                                        f"({result.status})")
    return result.plan


# ---------------------------------------------------------------- the loops
def _warm(run: _Run, schedule: Sequence[int] | None) -> None:
    """The best baseline pipeline (on the given order, when there is one) as first incumbent."""
    try:
        if schedule is None:  # every order x policy with the TFLite allocator (the bench's pipelines among them)
            names = [n for n, (_, _, a) in baselines.PIPELINES.items() if a == "greedy_size"]
            run.offer(baselines.best(run.graph, run.target, names), "baselines")
        else:
            for policy in baselines.POLICIES:
                run.offer(baselines.pipeline(run.graph, run.target, list(schedule), policy, "greedy_size"),
                          f"baseline given+greedy_size+{policy}")
    except baselines.InfeasibleError as e:
        run.say(f"no baseline plan: {e}")


def _fixed_order(run: _Run, order: list[int], backend: str, threads: int, pack_limit: float,
                 deadline: float, set_bound: bool = True) -> float:
    """Benders loop on one order; returns the master's bound for that order."""
    tl = Timeline(run.graph, run.target, order)
    master = GapMaster(tl, run.target.capacity, backend, threads)
    hint = tl.choice_from_plan(run.best) if run.best is not None else None
    bound = 0.0
    while deadline - time.perf_counter() > 0.05:
        if hint is not None:
            master.hint(hint)
        solved = master.model.solve(deadline - time.perf_counter())
        run.iterations += 1
        if solved.status == "infeasible":
            bound = math.inf
            run.say("fixed order: no residency plan fits")
            break
        if solved.objective is None:
            break
        bound = max(bound, solved.bound)
        if set_bound and run.proven:
            run.bound = max(run.bound, bound)
        choice = master.choice(solved.values)
        cost = tl.traffic(choice)
        run.say(f"fixed-order master {solved.status}: {cost} B (bound {solved.bound:.0f}) in {solved.seconds:.1f}s")
        if cost >= run.cost() and solved.status == "optimal":
            break  # nothing better than the incumbent on this order
        placed = _place(run, tl, choice, pack_limit, deadline, lambda c, w: master.cut(c, w))
        if placed and solved.status == "optimal":
            bound = max(bound, cost)
            break
        hint = choice if placed else (tl.choice_from_plan(run.best) if run.best is not None else None)
    if set_bound and run.proven:
        run.bound = max(run.bound, min(bound, run.cost()))
    return bound


def _free_order(run: _Run, backend: str, threads: int, pack_limit: float) -> None:
    """Fast fixed-order runs on candidate orders for incumbents, then the time-indexed master."""
    g, target = run.graph, run.target
    orders = {"program": baselines.program_order(g),
              "lpmf": baselines.lpmf_order(g, target.include_weights, target.alignment)}
    if run.best is not None:
        orders["incumbent"] = order_of(run.best)
    seen: set[tuple[int, ...]] = set()
    for name, order in orders.items():
        if tuple(order) in seen or run.left() < 1:
            continue
        seen.add(tuple(order))
        run.say(f"fixed order {name}")
        _fixed_order(run, order, backend, threads, pack_limit,
                     time.perf_counter() + min(run.left() * 0.25, 15.0), set_bound=False)
    if run.left() < 1 or run.cost() == 0:
        run.bound = 0.0 if run.cost() == 0 else run.bound
        return
    across = across_bound(g, target, backend, min(run.left() * 0.3, 20.0), threads)
    run.say(f"live-across bound {across.status}: {across.bound:.0f} in {across.seconds:.1f}s")
    run.bound = max(run.bound, across.bound)
    if run.done() or run.left() < 1:
        return
    master = StepMaster(g, target, target.capacity, backend, threads)
    run.say(f"free-order master: {master.size_info()}")
    hint_plan = run.best
    while run.left() > 0.05:
        if hint_plan is not None:
            tl = Timeline(g, target, order_of(hint_plan))
            master.hint(tl, tl.choice_from_plan(hint_plan))
        solved = master.model.solve(run.left())
        run.iterations += 1
        if solved.status == "infeasible":
            run.bound = math.inf if run.proven else run.bound
            run.say("free-order master infeasible: no plan fits")
            return
        if solved.objective is None:
            run.say(f"free-order master {solved.status} without a solution")
            if run.proven:
                run.bound = max(run.bound, solved.bound)
            return
        if run.proven:
            run.bound = max(run.bound, solved.bound)
        tl = Timeline(g, target, master.order(solved.values))
        choice = master.choice(tl, solved.values)
        cost = tl.traffic(choice)
        run.say(f"free-order master {solved.status}: {cost} B (bound {solved.bound:.0f}) in {solved.seconds:.1f}s")
        if cost >= run.cost():
            if solved.status == "optimal":
                run.bound = max(run.bound, run.cost()) if run.proven else run.bound
            return
        placed = _place(run, tl, choice, pack_limit, run.deadline, lambda c, w, tl=tl: master.cut(tl, c, w))
        if placed and solved.status == "optimal" and run.proven:
            run.bound = max(run.bound, cost)
        if run.done() or solved.status != "optimal":
            return
        hint_plan = run.best


def _place(run: _Run, tl: Timeline, choice: Choice, pack_limit: float, deadline: float,
           add_cut: Callable[[Choice, tuple[int, int]], None]) -> bool:
    """Pack a master solution; on success offer its checked plan, on failure add a cut."""
    from formulations import offsets

    bufs, _, _ = tl.buffers(choice)
    cap, align = run.target.capacity, run.target.alignment

    def packs(window: tuple[int, int] | None) -> tuple[bool, dict | None, str]:
        limit = max(0.05, min(pack_limit, deadline - time.perf_counter()))
        placed = offsets.solve(requests(bufs, window), capacity=cap, alignment=align, time_limit=limit)
        return placed.status in ("optimal", "feasible"), placed.offsets, placed.status

    ok, offs, status = packs(None)
    if ok:
        instrs = tl.instructions(choice, [offs.get(str(k), 0) for k in range(len(bufs))])
        record = SolverRecord(f"joint:{run.label}", run.label.split(":")[1], "feasible",
                              objective=tl.traffic(choice))
        try:
            plan = check(run.graph, Plan(run.graph.name, run.graph.fingerprint, run.target, instrs, solver=record))
        except PlanError as e:  # a bug in emission: never return it, say so
            run.say(f"emitted plan rejected by the checker: {e}")
            return False
        run.offer(plan, "packed master solution")
        return True
    window = _smallest_window(tl.steps, lambda w: not packs(w)[0])
    if status != "infeasible" or window is None:
        run.proven = False  # the packing was not proven impossible: the cut is a heuristic one
        window = window or (0, tl.steps - 1)
    add_cut(choice, window)
    run.cuts += 1
    run.say(f"packing failed ({status}); cut on steps {window[0]}..{window[1]}")
    return False


def _smallest_window(steps: int, fails: Callable[[tuple[int, int]], bool]) -> tuple[int, int] | None:
    """A step window [l, r] that fails with no failing window inside it (by bisection; a larger
    window fails whenever a smaller one does)."""
    if not fails((0, steps - 1)):
        return None
    lo, hi = 0, steps - 1  # smallest r with [0, r] failing
    while lo < hi:
        mid = (lo + hi) // 2
        if fails((0, mid)):
            hi = mid
        else:
            lo = mid + 1
    r = lo
    lo, hi = 0, r  # largest l with [l, r] failing
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fails((mid, r)):
            lo = mid
        else:
            hi = mid - 1
    return lo, r


def _result(run: _Run, model: str, backend: str, fixed: bool, infeasible: bool = False) -> JointResult:
    seconds = time.perf_counter() - run.t0
    if infeasible or (run.best is None and run.bound == math.inf):
        return JointResult(None, "infeasible", None, math.inf, None, seconds, run.iterations, run.cuts, model,
                           backend, fixed, tuple(run.lines))
    if run.best is None:
        return JointResult(None, "unknown", None, run.bound, None, seconds, run.iterations, run.cuts, model,
                           backend, fixed, tuple(run.lines))
    obj = int(run.cost())
    bound = min(run.bound, obj)
    status = "optimal" if obj <= bound + 1e-6 else "feasible"
    gap = 0.0 if status == "optimal" else (obj - bound) / obj
    record = SolverRecord(f"joint:{model}", backend, status, objective=obj, bound=bound, gap=gap, seconds=seconds,
                          params={"model": model, "fixed_order": fixed, "iterations": run.iterations,
                                  "cuts": run.cuts, "source": run.best.solver.formulation})
    run.say(f"done: {status} {obj} B, bound {bound:.0f}, gap {gap:.3f}")
    return JointResult(run.best.with_(solver=record), status, obj, bound, gap, seconds, run.iterations, run.cuts,
                       model, backend, fixed, tuple(run.lines))

"""Minimum peak memory order (COSMA's MPMF: no spills, minimise the peak footprint).

Model. Choose a topological order pi of the ops. Running pi with every buffer freed after
its last reader, graph inputs loaded at first use and in-place reuse of dying inputs, the
bytes resident while op pi_i runs are

    live_i = sum over counted roots t with first(t) <= i <= last(t) of size(t)  (- dying in-place inputs)

and the objective is  M_P = min over pi of max_i live_i,  counted exactly as
planner.bounds.live_profile (weights counted or not, sizes aligned). It is the M_P budget
of COSMA and the M_P of planner.compile.budget.

Every method first splits the graph at cut vertices (schedule_dp: segments whose best orders
are independent), runs program order and Inductor's orders, and keeps per segment the best
part; all returned orders are re-checked by bounds.max_live. Methods (`solve(method=...)`):
  program, bfs, dfs, lpmf  only that order (planner.baselines: program order, PyTorch
            Inductor's breadth-first, depth-first and least-peak-memory-first)
  hier      plus the hierarchical heuristic in the spirit of HMCOS on every segment above the
            lower bound (schedule_heuristics.py)
  dp        plus exact search over sets of done ops (Serenity; schedule_dp.py) on the segments
            that decide the peak, pruned by the best peak known (schedule_dp.descend);
            "gave_up" at its state cap or time limit
  cpsat     plus a CP-SAT model per segment (schedule_cpsat.py), warm-started with the best order
  milp      plus a time-indexed MILP per segment through PuLP/CBC (schedule_milp.py), for comparison
  auto      hier, then a relaxation where the graph has tiny buffers (those under `relax_below`
            bytes count 0: the relaxed problem has more lazy ops and far fewer states; its exact
            optimum bounds the real one from below and its order is a candidate), then dp.
            Segment by segment, the state cap and the clock decide how far it gets: narrow
            segments are settled exactly, wide ones keep the best heuristic order with a gap.
Lower bound: max over segments of a min-cut bound (schedule_bounds.cut_lower_bound) and M_R,
raised by every segment an exact method settles. gap = (peak - bound) / peak.

Size: exact search is exponential in the width of a segment (number of down-sets);
CP-SAT has one position variable per op and one interval per buffer. Omits: spills and
recomputation (formulations.joint, formulations.remat), offsets (formulations.offsets).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from formulations.schedule_bounds import cut_lower_bound
from formulations.schedule_dp import INF, Problem, bits, descend, search
from formulations.schedule_heuristics import hierarchical, neutral_units, normalize
from planner import baselines, bounds
from planner.check import check
from planner.graph import LifetimeGraph
from planner.plan import Plan, SolverRecord
from planner.target import Target

METHODS = ("auto", "dp", "cpsat", "milp", "hier", "program", "bfs", "dfs", "lpmf")
INDUCTOR = ("bfs", "dfs", "lpmf")


class ScheduleOptionError(ValueError):
    """An unknown method or option; the message lists what exists."""


@dataclass(frozen=True, slots=True)
class Options:
    state_cap: int = 2_000_000  # exact search gives up past this many stored states (per segment)
    beam: int = 128  # states kept per layer by the beam searches of `hier`
    hier_share: float = 0.2  # share of the time limit the hierarchical heuristic may use
    relax_below: int | None = None  # relaxation threshold in bytes; None: largest buffer // 1024
    relax: bool = True  # `auto`: run the relaxation when some buffer is under the threshold
    cpsat_workers: int = 2  # CP-SAT search workers (the machines here have two cores)
    engine: str = "auto"  # exact search: "scalar" (schedule_dp), "vector" (schedule_vec), "auto" (by size)
    vector_units: int = 24  # "auto": the vector engine from this many units up
    vector_state_cap: int = 60_000_000  # the vector engine gives up past this many stored states
    guide: bool = True  # vector probes on the real sizes are guided by the relaxation (schedule_guide)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One line of the log: what a method gave on the whole graph."""

    method: str  # "program", "lpmf", "hier", "relaxed", "dp", "cpsat", ...
    peak: int | None  # max_live of its order (None when it produced none)
    bound: int | None  # the lower bound it proved (None when none)
    status: str  # "heuristic", "optimal", "feasible", "gave_up", "no_better", "skipped"
    seconds: float
    note: str = ""


@dataclass(frozen=True)
class ScheduleResult:
    order: tuple[int, ...]  # op ids, a topological order
    peak: int  # bounds.max_live of `order` (same accounting)
    lower_bound: int  # proven: no order has a smaller peak
    status: str  # "optimal" (peak == lower_bound) | "feasible" | "gave_up" (an exact method hit its cap)
    method: str  # the method whose order won
    seconds: float
    gap: float  # (peak - lower_bound) / peak
    log: tuple[Attempt, ...] = field(default_factory=tuple)

    def attempt(self, method: str) -> Attempt | None:
        return next((a for a in self.log if a.method == method), None)


@dataclass
class Segment:
    units: list[int]  # non-lazy ops, program order
    ops: list[int]  # all ops run in it (lazy ones included)
    start: int  # op set done before it
    order: list[int]  # best order so far
    peak: int  # its peak
    source: str  # method that gave `order`
    bound: int = 0  # proven lower bound on its peak
    proven: bool = False  # exact search settled max(floor, peak)


def solve(graph: LifetimeGraph, *, time_limit: float = 60.0, method: str = "auto", include_weights: bool = False,
          alignment: int = 1, progress: Callable[[str], None] | None = None, **options) -> ScheduleResult:
    """Minimum-peak order of `graph` by `method` within `time_limit` seconds."""
    if method not in METHODS:
        raise ScheduleOptionError(f"unknown schedule method {method!r}; choose one of {', '.join(METHODS)}")
    unknown = set(options) - set(Options.__slots__)
    if unknown:
        raise ScheduleOptionError(f"unknown schedule option {', '.join(sorted(unknown))}; "
                                  f"options: {', '.join(Options.__slots__)}")
    opts = Options(**options)
    if opts.engine not in ("auto", "scalar", "vector"):
        raise ScheduleOptionError(f"unknown schedule engine {opts.engine!r}; choose one of auto, scalar, vector")
    t0 = time.perf_counter()
    deadline = t0 + time_limit
    note = progress or (lambda _msg: None)
    if not graph.ops:
        return ScheduleResult((), 0, 0, "optimal", method, 0.0, 0.0)
    prob = Problem(graph, include_weights, alignment)
    log: list[Attempt] = []
    segs = split_segments(prob)
    for s in segs:  # a segment of one op has one order
        if len(s.ops) == 1:
            s.bound, s.proven = s.peak, True
    for name in (method,) if method in ("program", *INDUCTOR) else ("program", *INDUCTOR):
        t1 = time.perf_counter()
        order = _baseline_order(graph, name, include_weights, alignment)
        peak = bounds.max_live(graph, order, include_weights, alignment)
        log.append(Attempt(name, peak, None, "heuristic", time.perf_counter() - t1))
        _adopt(prob, segs, normalize(prob, order), name)
    if method in ("auto", "dp", "cpsat", "milp", "hier"):
        t1 = time.perf_counter()
        floor = max(s.bound for s in segs)
        for s in segs:
            if not s.proven and s.peak > floor:
                s.bound = max(s.bound, cut_lower_bound(prob, s.ops, s.start))
        log.append(Attempt("cut_bound", None, max(s.bound for s in segs), "optimal", time.perf_counter() - t1))
        note("hierarchical heuristic")
        t1 = time.perf_counter()
        floor = max(s.bound for s in segs)
        todo = [s for s in segs if s.peak > floor and len(s.units) > 1]
        share = time_limit * (opts.hier_share if method != "hier" else 0.9) / max(1, len(todo))
        order = []
        for s in segs:
            found = hierarchical(prob, s.units, s.start, floor=floor, budget=s.peak, seconds=share,
                                 beam=opts.beam)[0] if s in todo else None
            order += s.order if found is None else found
        log.append(Attempt("hier", bounds.max_live(graph, order, include_weights, alignment), None, "heuristic",
                           time.perf_counter() - t1, "best baseline order where hier found nothing lower"))
        _adopt(prob, segs, order, "hier")
    floor = max(s.bound for s in segs)
    relaxed = relaxation(graph, prob, opts) if method == "auto" and opts.relax else None
    if relaxed is not None:
        floor = max(floor, _relaxed(graph, prob, relaxed, segs, opts, floor, t0 + (deadline - t0) * 0.6, log, note))
    if method in ("auto", "dp"):
        floor = _exact(prob, segs, opts, floor, deadline, log, note, relaxed)
    elif method in ("cpsat", "milp"):
        floor = _solver_model(prob, segs, opts, floor, deadline, log, note, method)
    return _result(graph, prob, segs, floor, log, t0, include_weights, alignment, method)


# ------------------------------------------------------------------ pieces
def _baseline_order(graph: LifetimeGraph, name: str, include_weights: bool, alignment: int) -> list[int]:
    if name == "lpmf":
        return baselines.lpmf_order(graph, include_weights, alignment)
    return {"program": baselines.program_order, "bfs": baselines.bfs_order, "dfs": baselines.dfs_order}[name](graph)


def split_segments(prob: Problem) -> list[Segment]:
    """Segments between cut vertices, each lazy op with the segment of its first owner."""
    parts = prob.segments()
    where = {x: k for k, part in enumerate(parts) for x in part}
    extra: list[list[int]] = [[] for _ in parts]
    for o in range(prob.n):
        if prob.lazy[o]:
            extra[min(where[x] for x in bits(prob.owners[o]))].append(o)
    segs, start = [], 0
    for part, more in zip(parts, extra):
        ops = sorted(part + more)
        segs.append(Segment(part, ops, start, [], INF, "none"))
        start |= sum(1 << o for o in ops)
    _adopt(prob, segs, normalize(prob, range(prob.n)), "program")
    return segs


def _adopt(prob: Problem, segs: list[Segment], order: Sequence[int], source: str) -> None:
    """Take, segment by segment, the parts of a normal-form `order` that lower its peak."""
    profile = prob.profile(order)
    at = 0
    for s in segs:
        part, steps = list(order[at:at + len(s.ops)]), profile[at:at + len(s.ops)]
        at += len(s.ops)
        if sorted(part) != s.ops:
            raise AssertionError(f"{source}: order is not in normal form at a segment boundary")
        if max(steps) < s.peak:
            s.order, s.peak, s.source = part, max(steps), source


def _relaxed(graph: LifetimeGraph, prob: Problem, relaxed: Problem, segs: list[Segment], opts: Options, floor: int,
             deadline: float, log: list[Attempt], note: Callable[[str], None]) -> int:
    """Exact search with buffers under the threshold counted as 0 bytes: a lower bound and a candidate."""
    if max(s.peak for s in segs) <= floor:
        return floor
    below = relaxed.ignore_below
    t1 = time.perf_counter()
    note(f"relaxation: buffers under {below} bytes count 0")
    rsegs = split_segments(relaxed)
    _adopt(relaxed, rsegs, normalize(relaxed, [o for s in segs for o in s.order]), "best")
    for s in rsegs:
        s.bound = s.peak if len(s.ops) == 1 else cut_lower_bound(relaxed, s.ops, s.start)
    bound, complete = max(s.bound for s in rsegs), True  # relaxed optimum >= bound; real optimum >= relaxed
    for s in sorted(rsegs, key=lambda s: -s.peak):
        if s.peak <= bound or len(s.ops) == 1:
            continue
        units = neutral_units(relaxed, s.units)
        wide = search(relaxed, units, s.start, floor=bound, budget=s.peak, beam=4 * opts.beam, deadline=deadline)
        if wide.order is not None:
            s.order, s.peak = list(wide.order), max(relaxed.profile(wide.order, s.start))
        s.order, s.peak, proven, status = descend(relaxed, units, s.start, s.order, s.peak, bound=bound,
                                                  state_cap=opts.state_cap, deadline=deadline,
                                                  probe=_probe(relaxed, units, s.start, opts, None))
        complete = complete and status == "optimal"
        bound = max(bound, proven if status == "optimal" else 0)
    order = normalize(prob, [o for s in rsegs for o in s.order])
    _adopt(prob, segs, order, "relaxed")
    log.append(Attempt("relaxed", bounds.max_live(graph, order, prob.include_weights, prob.alignment), bound,
                       "optimal" if complete else "gave_up", time.perf_counter() - t1,
                       f"buffers < {below} B as 0 B; its optimum bounds the real one"))
    return bound


def relaxation(graph: LifetimeGraph, prob: Problem, opts: Options) -> Problem | None:
    """The relaxation `auto` uses: buffers under `relax_below` (default: the largest // 1024) count
    0 bytes; None when no buffer is that small."""
    biggest = max((sz for _, sz, _, _ in prob.roots), default=0)
    below = opts.relax_below if opts.relax_below is not None else biggest // 1024
    if below <= 1 or not any(0 < sz < below for _, sz, _, _ in prob.roots):
        return None
    return Problem(graph, prob.include_weights, prob.alignment, ignore_below=below)


def _probe(prob: Problem, units: list[tuple[int, ...]], start: int, opts: Options, relaxed: Problem | None):
    """descend's probe: None (the scalar search) or the vector engine, guided by `relaxed`."""
    if opts.engine == "scalar" or (opts.engine == "auto" and len(units) < opts.vector_units):
        return None
    from formulations.schedule_guide import vector_probe

    return vector_probe(prob, units, start, relaxed=relaxed if opts.guide else None, state_cap=opts.vector_state_cap)


def _exact(prob: Problem, segs: list[Segment], opts: Options, floor: int, deadline: float,
           log: list[Attempt], note: Callable[[str], None], relaxed: Problem | None = None) -> int:
    """Exact search on the segments that can still lower the peak, the highest first."""
    t1 = time.perf_counter()
    gave_up = 0
    for s in sorted(segs, key=lambda s: -s.peak):
        if s.peak <= floor or s.proven:
            continue
        note(f"exact search on a segment of {len(s.ops)} ops")
        units = neutral_units(prob, s.units)
        order, peak, bound, status = descend(prob, units, s.start, s.order, s.peak, bound=floor,
                                             state_cap=opts.state_cap, deadline=deadline,
                                             probe=_probe(prob, units, s.start, opts, relaxed))
        if peak < s.peak:
            s.order, s.peak, s.source = order, peak, "dp"
        if status == "gave_up":
            gave_up += 1
            continue
        s.proven = True
        floor = max(floor, bound)
    peak = max(s.peak for s in segs)
    status = "optimal" if peak <= floor else "gave_up" if gave_up else "feasible"
    log.append(Attempt("dp", peak, floor, status, time.perf_counter() - t1,
                       f"{gave_up} segment(s) over the state cap or time"))
    return floor


def _solver_model(prob: Problem, segs: list[Segment], opts: Options, floor: int, deadline: float,
                  log: list[Attempt], note: Callable[[str], None], method: str) -> int:
    """CP-SAT (or the MILP) on the segments that can still lower the peak, warm-started."""
    if method == "cpsat":
        from formulations.schedule_cpsat import solve_segment

        run = lambda s: solve_segment(prob, s.ops, s.start, hint=s.order, floor=floor, deadline=deadline,
                                      workers=opts.cpsat_workers)
    else:
        from formulations.schedule_milp import solve_segment as milp_segment

        run = lambda s: milp_segment(prob, s.ops, s.start, hint=s.order, floor=floor, deadline=deadline)
    t1 = time.perf_counter()
    for s in sorted(segs, key=lambda s: -s.peak):
        if s.peak <= floor or s.proven or time.perf_counter() > deadline:
            continue
        note(f"{method} on a segment of {len(s.ops)} ops")
        got = run(s)
        if got.order is not None and got.peak < s.peak:
            s.order, s.peak, s.source = list(got.order), int(got.peak), method
        s.bound = max(s.bound, got.bound)
        s.proven = got.optimal
        if s.proven:
            floor = max(floor, s.peak)
    peak = max(s.peak for s in segs)
    log.append(Attempt(method, peak, floor, "optimal" if peak <= floor else "feasible", time.perf_counter() - t1))
    return floor


def _result(graph: LifetimeGraph, prob: Problem, segs: list[Segment], floor: int, log: list[Attempt],
            t0: float, include_weights: bool, alignment: int, method: str) -> ScheduleResult:
    order = tuple(o for s in segs for o in s.order)
    peak = bounds.max_live(graph, order, include_weights, alignment)  # the one accounting, re-checked
    bound = min(max(floor, bounds.m_r(graph, include_weights, alignment)), peak)
    winner = max(segs, key=lambda s: s.peak).source
    exact_methods = ("auto", "dp", "cpsat", "milp")
    if peak <= bound:
        status = "optimal"
    elif any(a.status == "gave_up" for a in log):
        status = "gave_up"
    else:
        status = "feasible"
    return ScheduleResult(order, peak, bound, status, winner if method in exact_methods else method,
                          time.perf_counter() - t0, (peak - bound) / peak if peak else 0.0, tuple(log))


# ------------------------------------------------------------------ plans
def plan(graph: LifetimeGraph, target: Target, *, time_limit: float = 60.0,
         progress: Callable[[str], None] | None = None, method: str = "auto", allocator: str = "auto",
         **options) -> Plan:
    """The min-peak order, placed by formulations.offsets (`allocator`), as a checked plan.

    With a capacity below the order's peak the plan spills (Belady), as baselines.pipeline does."""
    res = solve(graph, time_limit=time_limit, method=method, include_weights=target.include_weights,
                alignment=target.alignment, progress=progress, **options)
    if progress:
        progress(f"placing buffers ({allocator})")
    made = baselines.pipeline(graph, target, list(res.order), allocator=allocator, name=f"schedule:{res.method}")
    record = SolverRecord(f"schedule:{method}", "dp" if method in ("auto", "dp") else method, res.status,
                          objective=res.peak, bound=res.lower_bound, gap=res.gap,
                          seconds=res.seconds + made.solver.seconds,
                          params={"method": method, "order_from": res.method, "allocator": allocator,
                                  "time_limit": time_limit, **options, "log": [asdict(a) for a in res.log],
                                  "residency": dict(made.solver.params)})
    return check(graph, made.with_(solver=record), target)

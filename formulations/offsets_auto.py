"""`auto`: how formulations/offsets.py combines its methods for one placement request.

1. The greedy placements (offsets_heuristics). Done if one fits the capacity, or, when
   minimising, reaches the lower bound.
2. A short local repair, only when minimising or when the best greedy arena is within 5% of
   the capacity (on the MiniMalloc suite greedy ends 12-40% above it, where repair never helps).
3. A race until the deadline: the exact search (offsets_exact) in this thread against one
   CP-SAT run per buffer order in `Options.cpsat_orders`, each in its own thread (CP-SAT
   releases the GIL while it solves). The first to settle the question (a placement that fits,
   a proof of infeasibility, a proven optimum) stops the others; otherwise the best placement
   and the highest bound of all are kept. The methods are complementary: on the MiniMalloc
   suite exact search alone solves A B C D J, CP-SAT by earliest start A B C E G H, CP-SAT by
   widest lifetime C F G I K. The exact search, which solves its instances fast or not at all,
   takes a third of the CPU after `Options.exact_alone` seconds, and every CP-SAT run but the
   last stops at `Options.early_share` of the time: three solvers share two cores, and each
   solves its instances fast or not at all.
   With `Options.race` off, and always when minimising, they run one after the other instead:
   exact probes (offsets_exact.minimise) for half the time left, then CP-SAT minimisation
   from the best placement so far (raced, the probes starve: J ended at 1268 KiB, not 1022).
4. When minimising, before step 3: the same race at the lower bound as capacity, for
   `Options.bound_share` of the time left. A placement there is optimal; a proof that none
   exists raises the bound. On DNN buffer sets the bound is usually the optimum, and deciding
   it is far easier than minimising: on AmoebaNet-D (450 buffers, greedy 8.3% above the peak,
   the repair 2.4%) CP-SAT fits the peak in 0.1 s, while CP-SAT minimisation from the greedy
   arena was still 4-5% above it after 5 s and exact search found nothing in 30 s (its floor
   is global over time, so a conflict in one cell backtracks through unrelated decisions in
   the others; CP-SAT's clause learning jumps over them).
"""

from __future__ import annotations

import threading
import time

from formulations.offsets import Instance, Options, Outcome, Stop, better, outcome


def run(inst: Instance, cap: int | None, deadline: float, options: Options) -> Outcome:
    """Greedy placements; if not settled, a short repair; then exact search raced against CP-SAT
    runs (one thread each: CP-SAT releases the GIL while it solves), the first verdict wins.
    Minimising: first that race at the lower bound, then exact probes and CP-SAT minimisation."""
    from formulations import offsets_exact, offsets_heuristics, offsets_solvers

    greedy = offsets_heuristics.best_greedy(inst, None)
    best = outcome(inst, greedy.offsets, cap, greedy.method)
    if _settled(best, cap):
        return best
    if options.improve and (cap is None or greedy.arena * 20 <= 21 * cap):  # repair closes small gaps only
        repair = time.perf_counter() + min(0.3, 0.03 * (deadline - time.perf_counter()))
        best = better(best, offsets_heuristics.improve(inst, cap, repair, best))
        if _settled(best, cap):
            return best
    if cap is None and options.bound_share > 0:  # does the bound itself fit? (usually, on DNNs)
        bound = max(inst.lower_bound(), best.bound)
        end = time.perf_counter() + options.bound_share * (deadline - time.perf_counter())
        probe = race(inst, bound, end, options, best)
        if probe.offsets is not None:
            return better(best, probe)
        if probe.status == "infeasible":  # the bound does not fit: it rises by one unit at least
            lifted = max(best.bound, probe.bound)
            status = "optimal" if best.arena <= lifted else best.status
            best = Outcome(best.offsets, status, best.arena if status == "optimal" else lifted, best.method,
                           best.arena)
            if _settled(best, cap):
                return best
    if not options.race or cap is None:  # minimising: racing starves the probes (J: 1268 KiB vs 1022)
        share = time.perf_counter() + 0.5 * (deadline - time.perf_counter())
        best = better(best, offsets_exact.run(inst, cap, share, options, best))
        for order in options.cpsat_orders:
            if _settled(best, cap) or time.perf_counter() >= deadline:
                break
            end = time.perf_counter() + (deadline - time.perf_counter()) / len(options.cpsat_orders)
            best = better(best, offsets_solvers.cpsat(inst, cap, end, options, best, order))
        return best
    return better(best, race(inst, cap, deadline, options, best))


def race(inst: Instance, cap: int, deadline: float, options: Options, incumbent: Outcome) -> Outcome:
    """Decide `cap`: exact search in this thread against one CP-SAT run per order in
    `Options.cpsat_orders`, each in its own thread; the first verdict stops the others.
    Returns the best placement and the highest bound of all (a placement fits `cap`)."""
    from formulations import offsets_exact, offsets_solvers

    stop = Stop()
    results: list[Outcome] = []
    lock = threading.Lock()

    def record(out: Outcome) -> None:
        with lock:
            results.append(out)
        if _settled(out, cap):
            stop.set()

    # importing OR-Tools takes ~0.5 s of CPU; in a thread it would also fight the exact search for
    # the GIL (AmoebaNet-D: CP-SAT's answer after 1.3 s instead of 0.3 s)
    from ortools.sat.python import cp_model  # noqa: F401

    now = time.perf_counter()
    early = now + options.early_share * (deadline - now)
    ends = [early] * (len(options.cpsat_orders) - 1) + [deadline]
    threads = [threading.Thread(target=lambda o=order, e=end: record(offsets_solvers.cpsat(
        inst, cap, e, options, incumbent, o, stop)), daemon=True) for order, end in zip(options.cpsat_orders, ends)]
    for t in threads:
        t.start()
    polite = time.perf_counter() + options.exact_alone if threads else None
    record(offsets_exact.run(inst, cap, deadline, options, incumbent, stop.event, polite))
    for t in threads:
        t.join(max(0.0, deadline - time.perf_counter()) + 5.0)
    stop.set()
    with lock:
        outs = list(results)
    best = outs[0] if outs else Outcome(None, "unknown", inst.lower_bound(), "auto")
    for out in outs[1:]:
        best = better(best, out)
    return best


def _settled(out: Outcome, cap: int | None) -> bool:
    """Nothing left to do: proven, or (with a capacity) a placement that fits."""
    return out.status in ("optimal", "infeasible") or (cap is not None and out.offsets is not None)



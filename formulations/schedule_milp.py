"""Time-indexed MILP of the min-peak order of one segment (PuLP/CBC), kept for comparison.

Variables: x_{o,p} = 1 when op o runs at step p (p in its ASAP/ALAP window), each op one
step, each step one op; C_{o,p} = sum_{q <= p} x_{o,q} (o done by step p). Edges a -> b:
C_{b,p} <= C_{a,p-1}. Buffer t with producer a is resident at step p when
    l_{t,p} >= C_{a,p} - C_{r,p-1}   for every reader r inside the segment,
    l_{t,p} >= C_{a,p}               when it is read after the segment,
    l_{t,p} >= x_{a,p}               when nobody reads it;
(a buffer that exists before the segment has C_a = 1; a graph input becomes resident with
its first reader: one inequality per pair of readers). Objective: min P with
P >= const + sum_t w_t l_{t,p} for every step p.
Size: up to k^2 binaries, (buffers x readers x k) inequalities. Omits in-place reuse (an
upper model when the segment has in-place inputs: then it proves nothing).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from formulations.schedule_cpsat import SegmentSolution
from formulations.schedule_dp import Problem


def solve_segment(prob: Problem, ops: Sequence[int], start: int, *, hint: Sequence[int] | None = None,
                  floor: int = 0, deadline: float) -> SegmentSolution:
    import pulp

    from formulations.offsets_solvers import _cbc, _var  # the one PuLP/CBC set-up of the project

    t0 = time.perf_counter()
    xs = list(ops)
    k = len(xs)
    inside = sum(1 << o for o in xs)
    end = start | inside
    exact = not any(prob.effects[o].donors for o in xs)
    lp = pulp.LpProblem("schedule", pulp.LpMinimize)
    window = {o: range((prob.anc[o] & inside).bit_count(), k - (prob.desc[o] & inside).bit_count()) for o in xs}
    x = {(o, p): _var(lp, f"x_{o}_{p}", cat="Binary") for o in xs for p in window[o]}
    for o in xs:
        lp += pulp.lpSum(x[o, p] for p in window[o]) == 1
    for p in range(k):
        lp += pulp.lpSum(x[o, p] for o in xs if p in window[o]) == 1

    def done_by(o: int, p: int):  # C_{o,p}; 1 for ops before the segment
        if o not in window:
            return 1
        return pulp.lpSum(x[o, q] for q in window[o] if q <= p)

    for o in xs:
        for a in prob.preds[o]:
            if a in window:
                for p in range(k):
                    lp += done_by(o, p) <= done_by(a, p - 1)
    hint_peak = max(prob.profile(hint, start)) if hint else sum(sz for _, sz, _, _ in prob.roots)
    peak = _var(lp, "peak", floor, max(floor, hint_peak))
    lp += peak
    const, live = 0, {p: [] for p in range(k)}
    for t, size, users, prod in prob.roots:
        readers = [o for o in xs if (users >> o) & 1]
        later = bool(users & ~end)
        before = (prod is not None and (start >> prod) & 1) or (prod is None and users & start)
        if size == 0 or (before and not users & ~start) or (prod is not None and not before
                                                             and not (inside >> prod) & 1):
            continue
        if before and later:
            const += size
            continue
        if prod is None and not before and not readers:
            continue
        makers = [prod] if prod is not None and not before else readers if prod is None and not before else []
        for p in range(k):
            level = _var(lp, f"l_{t}_{p}", 0, 1)
            live[p].append((size, level))
            for maker in makers or [None]:
                made = 1 if maker is None else done_by(maker, p)
                if later:
                    lp += level >= made
                elif readers:
                    for r in readers:
                        lp += level >= made - done_by(r, p - 1)
                else:
                    lp += level >= x[maker, p] if (maker, p) in x else level >= 0
    for p in range(k):
        lp += peak >= const + pulp.lpSum(size * level for size, level in live[p])
    if hint:
        for i, o in enumerate(hint):
            for p in window[o]:
                x[o, p].setInitialValue(int(p == i))
    left = deadline - time.perf_counter()
    if left < 1:
        return SegmentSolution(None, float("inf"), 0, False, exact, time.perf_counter() - t0)
    lp.solve(_cbc(msg=False, timeLimit=max(1, int(0.8 * left)), threads=1, warmStart=bool(hint)))
    steps = {o: next((p for p in window[o] if (pulp.value(x[o, p]) or 0) > 0.5), None) for o in xs}
    if any(s is None for s in steps.values()):
        return SegmentSolution(None, float("inf"), 0, False, exact, time.perf_counter() - t0)
    order = tuple(sorted(xs, key=lambda o: steps[o]))
    proven = lp.sol_status == pulp.LpSolutionOptimal and exact
    real = max(prob.profile(order, start))
    return SegmentSolution(order, real, int(round(pulp.value(peak))) if proven else 0, proven, exact,
                           time.perf_counter() - t0)

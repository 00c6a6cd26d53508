"""Guided walk: an order under a budget found depth-first along a relaxation guide (schedule_guide.py).

The guide at budget B holds the relaxed sets from which the end is reachable with every relaxed step,
tight steps with their certainly resident small buffers, under B. On RandWire stages that bound is
often the real step exactly, so a path through admitted sets usually lifts to a real order under B:
where the layered search stores 10^8 states to find such an order, a walk visits about one set per
unit. A walk proves nothing when it fails (the bound is a lower bound only): the layered search
still answers the probe then.

The walk moves the relaxed set T and the real set S together. At each step it tries the relaxed units
that may run next whose child's high (the least highest relaxed step of its completions) is under B,
the lowest high first, keeping those whose relaxed step (plus the small buffers at a tight step)
stays under B; it runs the real unit of that relaxed
unit after the real units it needs (relaxed-lazy units: the products of a weighted sum that take a
dying input in place), every real step under B. Between units it runs each ready relaxed-lazy real
unit that neither raises a step above the bytes resident nor raises them (schedule_dp's commit rule:
the last product of a weighted sum, freeing its sigmoid(w)), so a node's small buffer dies as early
as it can. Dead ends backtrack, within a time limit and VISITS_PER_UNIT sets per unit.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from formulations.schedule_dp import bits
from formulations.schedule_units import UnitTables, column

VISITS_PER_UNIT = 2  # a walk gives up after this many relaxed sets per unit: one that finds an order
# rarely backtracks (RandWire ER seed 1 stage 2: 104 visits for 104 units at every level it succeeds),
# one that fails spends ~15 ms a visit there, and without a cap it backtracks through an exponential tree


def walk(guides, real: UnitTables, budget: int, *, deadline: float) -> list[int] | None:
    """Real units of `real` in an order whose every step is under `budget`, found along the guide of
    `guides` (a schedule_guide.RelaxedGuides over the same units, its backward search at a budget no
    lower already run); None when the walk finds none before `deadline` or within its visits."""
    tab, small = guides.tables, guides.tables.small
    prob, rprob = real.prob, tab.prob
    real_of, lazy = guides.real_of, guides.lazy_units
    rpred = [sum(int(msk) << (64 * w) for w, msk in pw) for pw in tab.pred_words]  # unit bit-sets
    upred = [sum(int(msk) << (64 * w) for w, msk in pw) for pw in real.pred_words]
    full = (1 << tab.m) - 1
    visits = VISITS_PER_UNIT * max(1, tab.m)
    seq: list[int] = []
    ticks = [0]

    def commits(S: int, done: int, mem: int) -> tuple[int, int, int]:
        """Run every ready relaxed-lazy unit that raises neither a step above mem nor mem."""
        changed = True
        while changed:
            changed = False
            for u in lazy:
                if (S >> u) & 1 or upred[u] & ~S:
                    continue
                dp, dm = real.delta(u, done)
                if dp <= 0 and dm <= 0 and mem + dp < budget:
                    S, done, mem = S | (1 << u), done | real.run[u], mem + dm
                    seq.append(u)
                    changed = True
        return S, done, mem

    def need(u: int, S: int, done: int, mem: int) -> tuple[int, int, int] | None:
        """Run u after the real units it still needs, every step under the budget."""
        for p in bits(upred[u] & ~S):
            got = need(p, S, done, mem)
            if got is None:
                return None
            S, done, mem = got
        if (S >> u) & 1:
            return S, done, mem
        S, done, mem = commits(S, done, mem)
        if (S >> u) & 1:
            return S, done, mem
        dp, dm = real.delta(u, done)
        if mem + dp >= budget:
            return None
        seq.append(u)
        return commits(S | (1 << u), done | real.run[u], mem + dm)

    def rec(T: int, rdone: int, rmem: int, S: int, done: int, mem: int, key: np.uint64) -> bool:
        if T == full:
            for u in range(real.m):
                got = need(u, S, done, mem)
                if got is None:
                    return False
                S, done, mem = got
            return True
        ticks[0] += 1
        if ticks[0] < 0 or ticks[0] > visits or ticks[0] & 15 == 0 and time.perf_counter() > deadline:
            ticks[0] = -1 << 62  # past the deadline or the visits: every caller unwinds at once
            return False
        ready = [u for u in range(tab.m) if not (T >> u) & 1 and not rpred[u] & ~T]
        highs = guides.highs_of(key ^ tab.zobrist[ready])
        for high, u in sorted(zip(highs.tolist(), ready)):  # the most slack first
            if ticks[0] < 0 or high >= budget:
                return False
            key2 = key ^ tab.zobrist[u]
            dp, dm = tab.delta(u, rdone)
            step = rmem + dp
            if step >= budget:
                continue
            T2 = T | (1 << u)
            if small is not None and budget - step <= small.large:
                after = column(T2, tab.width)
                step += int(small.forced(after)[0] if len(tab.units[u]) == 1 else
                            small.forced(after, column(T, tab.width))[0])
                if step >= budget:
                    continue
            mark = len(seq)
            got = need(real_of[u], S, done, mem)
            if got is not None and rec(T2, rdone | tab.run[u], rmem + dm, *got, key2):
                return True
            del seq[mark:]
        return False

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * (tab.m + real.m) + 100))
    try:
        start = tab.done_of(0)
        S, done, mem = commits(0, real.done_of(0), prob.mem(real.done_of(0)))
        found = rec(0, start, rprob.mem(start), S, done, mem, np.uint64(0))
    finally:
        sys.setrecursionlimit(limit)
    return seq if found else None

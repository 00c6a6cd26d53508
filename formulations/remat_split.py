"""Live-range splitting: a greedy that builds the retention intervals of remat_cpsat directly.

Model. Stage s (0..n-1) computes node s for the first time; a recompute or reload of node v
runs in a stage c > v, before node c and in node order. Node v holds intervals of stages
[start, end]: the first starts at v, a later one at its recompute (or reload) stage; each ends
at the last stage that reads v through it (node c, or a recompute in stage c). The memory of
stage s is the sum of the sizes of the intervals covering s (sources: one interval from their
first to their last read); it bounds the checked peak of every position in the stage, so a
profile within the budget is a sequence within it.

Greedy. Start from the program order (one interval per node). While the profile's peak stage
s* is over the budget, look at every interval covering s* of a node not read at s*: drop it
between its last read r_p before s* and its next read r_n after, and bring the node back in a
stage c in (s*, r_n]: by a recompute, which extends every producer (and source) whose intervals
do not cover c up to c, or by a reload (objectives that allow it) at c = r_n. c ranges over r_n
and the stages where a producer's interval ends; a recompute may instead recompute a producer
that is gone in the same stage too (one level). The move with the largest decrease of the total
excess sum_s max(0, mem_s - budget) per unit of cost is applied (a zero-cost move first); when no
move at s* lowers it, the next fullest stages are searched; when none does either, up to
`max_escapes` times the move that lowers s* most per unit of cost is applied anyway. The search
stops when the peak fits, or returns None when no move is left.
Every recompute reads producers that are resident (chains of one level at most), as in the
C-interval model, so the result is a full hint for remat_cpsat. Cost: O(live * span) numpy work
per move; about a second per run on 1000 nodes. Incomplete: with remat.split_portfolio it
found no plan for 7 of 12 (graph, budget) pairs of random layered graphs of 120-200 nodes at 80%
and 85% (picked where an earlier version failed), e.g. RL120 seed 1 at 80%, which CP-SAT solves
to optimality; remat.solve then relies on CP-SAT alone.
Omits: reloads of graph inputs (a source holds one interval), recompute chains deeper than one
level, moving a recompute once placed.
"""

from __future__ import annotations

import bisect
import math

import numpy as np

from formulations.remat_problem import RematProblem
from planner.remat_plan import Item


def split_greedy(problem: RematProblem, budget: int, *, max_moves: int | None = None, early: bool = True,
                 power: int = 1, chains: bool = True, stages_tried: int = 8,
                 max_escapes: int = 0) -> list[Item] | None:
    """The sequence whose stage profile fits `budget` (None when no move lowers the excess).
    `early`: also try recomputes before the next read, where producers are still resident;
    `power`: the excess of a stage counts as max(0, mem - budget) ** power; `chains`: a recompute
    may recompute producers that are gone in the same stage instead of keeping them;
    `stages_tried`: over-budget stages searched for a move, fullest first; `max_escapes`: moves
    allowed that lower the fullest stage while raising the total excess (when nothing lowers it)."""
    p = problem
    n = p.n
    if n == 0:
        return []
    users = p.users
    src_users = p.source_users()
    reads = [list(us) for us in users]  # stages reading each node, sorted (repeats allowed)
    iv = [[[v, max(users[v], default=v), False]] for v in range(n)]  # [start, end, is_reload]
    src_iv = {s: [min(us), max(us)] for s, us in src_users.items() if us}
    stored = [False] * n
    mem = np.zeros(n + 1, dtype=np.int64)
    for v in range(n):
        mem[v] += p.size[v]
        mem[iv[v][0][1] + 1] -= p.size[v]
    for s, (lo, hi) in src_iv.items():
        mem[lo] += p.source_size[s]
        mem[hi + 1] -= p.source_size[s]
    mem = np.cumsum(mem)[:n]
    limit = max_moves if max_moves is not None else 20 * n

    def cover_end(d: int, c: int) -> tuple[int, int]:
        """(index, end) of d's latest interval starting at or before c."""
        starts = [x[0] for x in iv[d]]
        k = bisect.bisect_right(starts, c) - 1
        return k, iv[d][k][1]

    def excess_change(changes: list[tuple[int, int, int]]) -> tuple[float, int]:
        """(change of the total excess, of the excess at s*) for +size on stages [lo, hi]."""
        lo = min(c[0] for c in changes)
        hi = max(c[1] for c in changes)
        if lo > hi:
            return 0, 0
        delta = np.zeros(hi - lo + 2, dtype=np.int64)
        for a, b, size in changes:
            if a <= b:
                delta[a - lo] += size
                delta[b - lo + 1] -= size
        delta = np.cumsum(delta)[:-1]
        old = mem[lo:hi + 1]
        new = np.maximum(old + delta - budget, 0).astype(np.float64)
        before = np.maximum(old - budget, 0).astype(np.float64)
        gain = float((new ** power).sum() - (before ** power).sum())
        return gain, 0

    def _cover(x: int, c: int) -> None:
        """Make x's producers and sources resident in stage c (extend their intervals)."""
        for d in p.deps[x]:
            kd, e = cover_end(d, c)
            if e < c:
                mem[e + 1:c + 1] += p.size[d]
                iv[d][kd][1] = c
            bisect.insort(reads[d], c)
        for s in p.sources[x]:
            if src_iv[s][1] < c:
                mem[src_iv[s][1] + 1:c + 1] += p.source_size[s]
                src_iv[s][1] = c

    def _evaluate(v: int, r_p: int, c: int, is_reload: bool, nested: bool, at: int):
        """(gain, cost, producers recomputed too) of dropping v after r_p and bringing it back in c."""
        changes = [(r_p + 1, c - 1, -p.size[v])]
        if is_reload:
            return (_gain(changes), p.reload_cost[v] + (0.0 if stored[v] else p.store_cost[v]), (),
                    _change_at(changes, at))
        cost = p.recompute_cost[v]
        twice: list[int] = []
        extended: dict[int, int] = {}  # node -> stage its interval is extended from
        sources: dict[int, int] = {}
        for d in p.deps[v]:
            e = cover_end(d, c)[1]
            if e >= c:
                continue
            if nested and p.recompute_cost[d] < math.inf and c - e > 1:
                twice.append(d)
                cost += p.recompute_cost[d]
                changes.append((c, c, p.size[d]))
                for dd in p.deps[d]:
                    ee = cover_end(dd, c)[1]
                    if ee < c:
                        extended[dd] = ee
                for s in p.sources[d]:
                    if src_iv[s][1] < c:
                        sources[s] = src_iv[s][1]
            else:
                extended[d] = e
        if nested and not twice:
            return None
        for s in p.sources[v]:
            if src_iv[s][1] < c:
                sources[s] = src_iv[s][1]
        changes += [(e + 1, c, p.size[d]) for d, e in extended.items() if d not in twice]
        changes += [(e + 1, c, p.source_size[s]) for s, e in sources.items()]
        return _gain(changes), cost, tuple(twice), _change_at(changes, at)

    def _change_at(changes, at: int) -> int:
        return sum(size for a, b, size in changes if a <= at <= b)

    def _gain(changes) -> float:
        return -excess_change(changes)[0]

    escapes = 0
    for _move in range(limit):
        over = np.flatnonzero(mem > budget)
        if len(over) == 0:
            break
        best = escape = None  # (score, v, k, r_p, c, reload, producers recomputed too)
        # the fullest stage first; when nothing helps there, the next fullest ones
        order = over[np.argsort(-mem[over], kind="stable")][:stages_tried].tolist()
        over_first = order[0]
        for peak_stage in order:
            for v in range(min(peak_stage, n)):
                if p.size[v] == 0:
                    continue
                for k, (a, b, _r) in enumerate(iv[v]):
                    if not a < peak_stage <= b:
                        continue
                    rs = reads[v]
                    i = bisect.bisect_left(rs, peak_stage)
                    if i < len(rs) and rs[i] == peak_stage:
                        continue  # read at s*: must be resident there
                    r_n = rs[i]
                    r_p = max(a, rs[i - 1] if i > 0 else a)
                    options: list[tuple[int, bool]] = []
                    if p.reload_cost[v] < math.inf:
                        options.append((r_n, True))
                    if p.recompute_cost[v] < math.inf:
                        cs = {r_n}
                        for d in p.deps[v] if early else ():
                            e = cover_end(d, r_n)[1]
                            if peak_stage < e < r_n:
                                cs.add(e)
                        for s in p.sources[v] if early else ():
                            if peak_stage < src_iv[s][1] < r_n:
                                cs.add(src_iv[s][1])
                        options.extend((c, False) for c in sorted(cs))
                    for c, is_reload in options:
                        for nested in ((False, True) if not is_reload and chains else (False,)):
                            found = _evaluate(v, r_p, c, is_reload, nested, peak_stage)
                            if found is None:
                                continue
                            gain, cost, twice, at_peak = found
                            if gain <= 0:  # an escape: lowers the fullest stage, fills others
                                if at_peak < 0 and peak_stage == over_first and (
                                        escape is None or -at_peak / max(cost, 1e-12) > escape[0]):
                                    escape = (-at_peak / max(cost, 1e-12), v, k, r_p, c, is_reload, twice)
                                continue
                            score = gain / cost if cost > 0 else math.inf
                            if best is None or score > best[0]:
                                best = (score, v, k, r_p, c, is_reload, twice)
            if best is not None:
                break
        if best is None and escapes < max_escapes:
            best, escapes = escape, escapes + 1
        if best is None:
            return None
        _score, v, k, r_p, c, is_reload, twice = best
        a, b, r = iv[v][k]
        iv[v][k] = [a, r_p, r]
        iv[v].insert(k + 1, [c, b, is_reload])
        mem[r_p + 1:c] -= p.size[v]
        if is_reload:
            stored[v] = True
            continue
        for d in twice:  # producers recomputed in stage c as well, for this read only
            kd, _e = cover_end(d, c)
            iv[d].insert(kd + 1, [c, c, False])
            mem[c] += p.size[d]
        for x in (*twice, v):
            _cover(x, c)
    else:
        return None
    if mem.max() > budget:
        return None
    return _sequence(p, iv)


def _sequence(p: RematProblem, iv: list[list[list]]) -> list[Item]:
    """Stage by stage: the recomputes and reloads of the stage in node order, then its node."""
    repeats: list[list[tuple[int, bool]]] = [[] for _ in range(p.n)]
    for v, intervals in enumerate(iv):
        for start, _end, is_reload in intervals[1:]:
            repeats[start].append((v, is_reload))
    outputs = [tuple(t for t in p.graph.ops[v].outputs if p.graph.is_buffer(t, p.target.include_weights))
               for v in range(p.n)]
    seq: list[Item] = []
    for stage in range(p.n):
        for v, is_reload in sorted(repeats[stage]):
            if is_reload:
                seq.extend(("load", t) for t in outputs[v])
            else:
                seq.append(v)
        seq.append(stage)
    return seq

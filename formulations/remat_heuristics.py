"""A greedy rematerialiser: the given order, evicting under a peak budget, recomputing on demand.

Runs the ops in program order. Before op t runs, every node it reads is made resident: kept,
recomputed (its own missing inputs first, recursively) or reloaded, whichever the objective
allows and prices lower. When the resident bytes would exceed the budget, the resident node
with the least  cost / (size * distance to its next read)  is evicted (the offline, Belady-like
form of DTR's h = cost / (size * staleness); Kirisame et al., ICLR 2021). Nodes no later op
reads are freed at once. The budget counts what planner.remat_plan.peak counts, so the
sequence's checked peak is at most the budget (a tensor is freed no later than it is evicted).
Returns None when everything resident is pinned and the budget still does not hold.
"""

from __future__ import annotations

import bisect
import math

from formulations.remat_problem import RematProblem
from planner.remat_plan import Item


class _Stuck(Exception):
    pass


def greedy(problem: RematProblem, budget: int, max_chain: int | None = None) -> list[Item] | None:
    """The greedy sequence within `budget` (None if it gets stuck). `max_chain` bounds how many
    evicted nodes in a row a recompute may have to redo (None: no bound): short chains keep the
    pinned working set of a recompute small at tight budgets."""
    p = problem
    n = p.n
    users = p.users
    src_last = {s: max(u) for s, u in p.source_users().items() if u}
    outputs = [tuple(t for t in p.graph.ops[v].outputs if p.graph.is_buffer(t, p.target.include_weights))
               for v in range(n)]
    seq: list[Item] = []
    resident: set[int] = set()
    src_resident: set[int] = set()
    stored: set[int] = set()
    spilled: set[int] = set()  # evicted, comes back by a reload
    evicted: set[int] = set()  # evicted, comes back by a recompute (its producers stay needed)
    need_at = [users[v][0] if users[v] else -1 for v in range(n)]  # stage of the next read, -1: none
    pinned: set[int] = set()
    mem = 0
    stage = 0

    def refresh_needs() -> None:
        """need_at for the stages after `stage`: real readers, and producers of evicted nodes."""
        for u in range(min(stage, n - 1), -1, -1):
            i = bisect.bisect_right(users[u], stage)
            nxt = users[u][i] if i < len(users[u]) else -1
            for c in users[u]:
                if c <= stage and c in evicted and need_at[c] >= 0 and (nxt < 0 or need_at[c] < nxt):
                    nxt = need_at[c]
            need_at[u] = nxt
        evicted.difference_update([u for u in evicted if need_at[u] < 0])
        spilled.difference_update([u for u in spilled if need_at[u] < 0])

    def chain_cost(u: int, memo: dict[int, float]) -> float:
        """Recompute cost of u plus that of its missing producers (DTR's evicted neighbourhood)."""
        if u not in memo:
            memo[u] = math.inf  # guards the recursion; overwritten below
            memo[u] = p.recompute_cost[u] + sum(chain_cost(d, memo) for d in p.deps[u]
                                                if d not in resident and d not in spilled)
        return memo[u]

    def chain_up(u: int, memo: dict[int, int]) -> int:
        if u not in memo:
            memo[u] = 1 + max((chain_up(d, memo) for d in p.deps[u] if d not in resident and d not in spilled),
                              default=0)
        return memo[u]

    def chain_down(u: int, memo: dict[int, int]) -> int:
        if u not in memo:
            memo[u] = max((1 + chain_down(c, memo) for c in users[u] if c in evicted), default=0)
        return memo[u]

    def make_room(need: int) -> None:
        nonlocal mem
        memo: dict[int, float] = {}
        ups: dict[int, int] = {}
        downs: dict[int, int] = {}
        while mem + need > budget:
            best, best_score, best_reload = -1, math.inf, False
            for u in resident:
                if u in pinned or p.size[u] == 0:
                    continue
                if need_at[u] < 0 or need_at[u] < stage:  # nothing reads it again
                    best, best_score, best_reload = u, -1.0, False
                    break
                # its own chain, plus what it adds to recomputing evicted readers (DTR counts both sides)
                recompute = chain_cost(u, memo) * (1 + sum(1 for c in users[u] if c in evicted))
                reload = p.reload_cost[u] + (0 if u in stored else p.store_cost[u])
                cost = min(recompute, reload)
                if cost == math.inf:
                    continue
                if max_chain is not None and reload >= recompute and \
                        chain_up(u, ups) + chain_down(u, downs) > max_chain:
                    continue
                score = cost / (p.size[u] * (need_at[u] - stage + 1))
                if score < best_score:
                    best, best_score, best_reload = u, score, reload < recompute
            if best < 0:
                raise _Stuck
            if best_score >= 0:
                (spilled if best_reload else evicted).add(best)
                if best_reload:
                    stored.add(best)
            resident.discard(best)
            mem -= p.size[best]
            memo.clear()  # chain costs change with what is resident
            ups.clear()
            downs.clear()

    def ensure_source(s: int) -> None:
        nonlocal mem
        if s in src_resident:
            return
        make_room(p.source_size[s])
        if any(isinstance(i, int) and s in p.sources[i] for i in seq):
            seq.append(("load", s))  # read again after its last in-order reader freed it
        src_resident.add(s)
        mem += p.source_size[s]

    def ensure(v: int) -> None:
        """Make v resident (the caller pins it); what is made resident on the way is pinned
        only while the node that reads it is computed."""
        nonlocal mem
        if v in resident:
            return
        if v in spilled:
            make_room(p.size[v])
            seq.extend(("load", t) for t in outputs[v])
            spilled.discard(v)
        else:
            local = []
            for u in p.deps[v]:
                ensure(u)
                if u not in pinned:
                    pinned.add(u)
                    local.append(u)
            for s in p.sources[v]:
                ensure_source(s)
            make_room(p.size[v])
            seq.append(v)
            pinned.difference_update(local)
            evicted.discard(v)
        resident.add(v)
        mem += p.size[v]

    try:
        for stage in range(n):
            pinned.clear()
            for u in p.deps[stage]:
                ensure(u)
                pinned.add(u)
            for s in p.sources[stage]:
                ensure_source(s)
            make_room(p.size[stage])
            seq.append(stage)
            resident.add(stage)
            mem += p.size[stage]
            refresh_needs()
            for u in [u for u in resident if need_at[u] < 0]:
                resident.discard(u)  # nothing reads it again, directly or through a recompute
                mem -= p.size[u]
            for s in [s for s in src_resident if src_last.get(s, -1) <= stage]:
                src_resident.discard(s)
                mem -= p.source_size[s]
    except _Stuck:
        return None
    return seq

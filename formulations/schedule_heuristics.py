"""Heuristic orders for the min-peak schedule, all in the normal form the exact search uses.

- `normalize(prob, order)`: every lazy op moved to just before its first consumer (never
  raises a step, see formulations.schedule_dp), so segments become contiguous and
  their peaks separable.
- `neutral_units`: chains of "neutral" ops (one dying input, one output of the same size,
  nothing else touched: conv -> conv -> BN inside a RandWire node) glued into units. The
  rest of the graph sees the same bytes wherever such a chain runs and each of its
  steps only wants the least-loaded moment of the chain's window, so running the chain
  back to back loses nothing: the glue is exact.
- `hierarchical`: in the spirit of HMCOS (Wang et al., CGO 2022). Sequential blocks:
  a unit whose one consumer has no other producer joins that consumer (a chain);
  parallel blocks: the units strictly between a unit d and its immediate
  post-dominator p, when d dominates p (a single-entry single-exit region such as
  the branches of an Inception module), are ordered on their own by exact search and
  contracted into one unit, innermost first. The contracted graph is ordered by exact
  search under a state cap (beam search past it), then the flat graph is re-searched by
  beam search under the tightening limit of the best peak so far.
Everything returned is a valid order; peaks are checked by the caller against
planner.bounds.max_live.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from formulations.schedule_dp import INF, Problem, SearchResult, search


def normalize(prob: Problem, order: Sequence[int]) -> list[int]:
    """The same order with each lazy op right before its first consumer (peak never higher)."""
    return prob.with_pending([o for o in order if not prob.lazy[o]])


def _neutral(prob: Problem, x: int) -> bool:
    e = prob.effects[x]
    if prob.lazy[x] or e.src_reads or len(e.reads) != 1:
        return False
    _, size, readers = e.reads[0]
    outs = [s for s in e.out_sizes if s]
    return readers == 1 << x and outs == [size] and not (e.donors and len(e.out_sizes) != 1)


def neutral_units(prob: Problem, ops: Sequence[int]) -> list[tuple[int, ...]]:
    """Non-lazy `ops` (program order) as units: neutral chains glued, other ops alone."""
    units: list[list[int]] = []
    unit_of: dict[int, int] = {}
    for x in ops:
        if _neutral(prob, x) and not prob.pending[x]:
            prod = prob.graph.producer.get(prob.effects[x].reads[0][0])
            u = unit_of.get(prod)
            if u is not None and units[u][-1] == prod and _neutral(prob, prod):
                units[u].append(x)
                unit_of[x] = u
                continue
        unit_of[x] = len(units)
        units.append([x])
    return [tuple(u) for u in units]


def _unit_graph(prob: Problem, units: Sequence[Sequence[int]]) -> tuple[list[set[int]], list[set[int]]]:
    unit_of = {op: u for u, ops in enumerate(units) for op in ops}
    preds: list[set[int]] = [set() for _ in units]
    succs: list[set[int]] = [set() for _ in units]
    for u, ops in enumerate(units):
        for op in ops:
            mask = prob.eff_pred[op]
            while mask:
                low = mask & -mask
                mask ^= low
                v = unit_of.get(low.bit_length() - 1)
                if v is not None and v != u:
                    preds[u].add(v)
                    succs[v].add(u)
    return preds, succs


def sequential_blocks(prob: Problem, units: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Merge chains: a unit whose one consumer has no other producer runs right before it."""
    groups = [list(u) for u in units]
    preds, succs = _unit_graph(prob, units)
    alive = [True] * len(groups)
    changed = True
    while changed:
        changed = False
        for u in range(len(groups)):
            if alive[u] and len(succs[u]) == 1 and len(preds[next(iter(succs[u]))]) == 1:
                v = next(iter(succs[u]))
                groups[v] = groups[u] + groups[v]
                alive[u] = False
                for p in preds[u]:
                    succs[p].discard(u)
                    succs[p].add(v)
                preds[v] |= preds[u]
                preds[v].discard(u)
                changed = True
    merged = [tuple(g) for g, a in zip(groups, alive) if a]
    return sorted(merged, key=lambda g: g[-1])


def parallel_blocks(prob: Problem, units: list[tuple[int, ...]], start: int, *, floor: int,
                    deadline: float, state_cap: int) -> list[tuple[int, ...]]:
    """Contract single-entry single-exit regions, innermost first, each ordered by exact search."""
    import networkx as nx

    for _ in range(len(units)):
        preds, succs = _unit_graph(prob, units)
        g = nx.DiGraph()
        g.add_nodes_from(range(len(units) + 2))
        src, snk = len(units), len(units) + 1
        for u in range(len(units)):
            g.add_edges_from((p, u) for p in preds[u])
            if not preds[u]:
                g.add_edge(src, u)
            if not succs[u]:
                g.add_edge(u, snk)
        idom = nx.immediate_dominators(g, src)
        ipdom = nx.immediate_dominators(g.reverse(copy=False), snk)
        regions = []
        for d in range(len(units)):
            p = ipdom.get(d)
            if p is None or p == snk or idom.get(p) != d:
                continue
            inside = (nx.descendants(g, d) & nx.ancestors(g, p))
            if len(inside) >= 2:
                regions.append(sorted(inside))
        if not regions:
            return units
        inner = min(regions, key=len)
        body = [units[u] for u in inner]
        own = 0  # a lazy op pending for several ops (sigmoid(w) of a weighted sum) counts once
        for o in {o for u in body for x in u for o in (x, *prob.pending[x])}:
            own |= 1 << o
        context = start
        for u in body:  # the region runs as early as it can: after its ancestors only
            for x in u:
                context |= prob.anc[x] & ~own
        res = search(prob, body, context, floor=floor, state_cap=state_cap, deadline=deadline)
        if res.order is None:
            res = search(prob, body, context, floor=floor, beam=64)
        merged = tuple(o for o in res.order if not prob.lazy[o])
        keep = [u for i, u in enumerate(units) if i not in set(inner)]
        units = sorted(keep + [merged], key=lambda g: min(g))
    return units


def hierarchical(prob: Problem, ops: Sequence[int], start: int, *, floor: int = 0, budget: float = INF,
                 seconds: float = 5.0, state_cap: int = 100_000, beam: int = 64) -> tuple[list[int] | None, int]:
    """Order of one segment's non-lazy `ops` (with their lazy ops) after `start`: (order, peak), or
    (None, budget) when nothing under `budget` turned up. Peaks under `floor` (a proven bound of
    the whole graph) count as `floor`."""
    deadline = time.perf_counter() + seconds
    base = neutral_units(prob, ops)
    blocks = sequential_blocks(prob, base)
    blocks = parallel_blocks(prob, blocks, start, floor=floor, deadline=deadline, state_cap=state_cap // 10)
    order, peak = None, budget

    def take(res: SearchResult) -> bool:
        nonlocal order, peak
        if res.order is None:
            return False
        new_peak = int(max(prob.profile(res.order, start), default=0))
        if new_peak >= peak:
            return False
        order, peak = list(res.order), new_peak
        return True

    for width in (8, beam):  # the blocks by beam search, narrow first so that there is an answer early
        take(search(prob, blocks, start, floor=floor, budget=peak, beam=width, deadline=deadline))
    if peak > floor:  # the blocks exactly, under the best peak so far
        take(search(prob, blocks, start, floor=floor, budget=peak, state_cap=state_cap, deadline=deadline))
    # tightening limit: the flat units by ever wider beams, pruning every state at or above the best peak
    width = beam
    while peak > floor and time.perf_counter() < deadline and width <= 16 * beam:
        take(search(prob, base, start, floor=floor, budget=peak, beam=width, deadline=deadline))
        width *= 4
    return order, peak

"""The layered search of formulations/schedule_dp.py, vectorised with numpy, with stronger exact rules.

Model (as schedule_dp): a state is a down-set S of units; layer k holds the sets of k units, each with
the lowest peak that reaches it, peak(S + u) = max(peak(S), mem(S) + dpeak(S, u)), mem(S + u) =
mem(S) + dmem(S, u), peaks under `floor` counted as `floor`, states at `budget` or above dropped.

Vectorised: a layer is an array of unit bit-sets (W words of 64 units, stored (W, n) uint64 so that a
word of every state is one contiguous row) with int64 peaks and mem (class Layer). For each unit u
that some state may run: a mask of the states where u is ready (word tests of upred(u)), then
(dpeak, dmem) from the unit's code table (formulations/schedule_units.py: Problem.step's numbers by
construction). Children are merged by Zobrist key (xor of unit keys), sorted, the lowest peak of each
set kept; equal keys are checked word by word. Per layer only (parent, unit) is kept (6 bytes a
state) to rebuild the order. Layers are expanded in chunks of states.

Exact rules (each keeps some optimal order reachable; tests check them against brute force):
- commit (schedule_dp's rule): a ready unit whose steps stay at or under the state's peak and that
  does not raise mem is the state's only successor. Needs monotone in-place savings only.
- set commit: a sequence P + c (c's missing predecessors P, one or two, all ready, then c) whose
  steps stay at or under the peak and whose final mem is no higher than after any sub-set of P
  that may run first: moved to the front of any completion it raises no step (what it frees is
  freed earlier; what it allocates nobody before it reads; with more done, a set frees at least as
  much). The state's child is P's first unit with the rest queued (forced successors).
- defer: a unit u run that frees nothing (its steps peak at its final mem, dpeak == dmem >= 0) must
  be followed right away by a unit that reads or writes one of its tensors or succeeds it ("near"),
  or by a unit with a higher index that frees nothing either. Any order can be put in that form by
  swapping such a u with the unit z after it while z is neither near u nor a higher-index unit that
  frees nothing: they share no tensor, so their deltas do not change, z's step drops by what u
  holds, and u's new step, mem + dmem(z) + dmem(u), is no more than z's old one (dmem(z) <= dpeak(z))
  or u's (dmem(z) <= 0). Each swap lowers the number of such pairs in the wrong order, so it ends.
  (Requiring a near unit alone is not exact: two units that free nothing, independent of each other,
  before one near unit cannot both be followed by it.) A commit may override the constraint (it
  needs only that some completion exists); merged duplicates with different constraints keep none.
- guide (formulations/schedule_guide.py): states whose relaxed projection cannot reach the end under
  the budget are dropped.

Kernel: formulations/schedule_native.c runs this search state by state in C (same states, same
answers; tests compare them) whenever a C compiler builds it; the numpy code here is the fallback.

Size: states as schedule_dp (down-sets, exponential in the width), W * 8 + 40 bytes each while the
layer lives; work per layer about (units that may run) x (states) word operations plus a sort.
Omits the beam (schedule_dp.search keeps it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from formulations import schedule_native
from formulations.schedule_dp import INF, Problem, SearchResult
from formulations.schedule_units import UnitTables

if TYPE_CHECKING:
    from formulations.schedule_guide import Guide

CHUNK = 1 << 19  # states expanded at once
NONE = -1  # no queued unit / no constraint


@dataclass(frozen=True, slots=True)
class Layer:
    """The states of one layer, as columns."""

    states: np.ndarray  # (W, n) uint64 unit bit-sets
    key: np.ndarray  # (n,) uint64 Zobrist keys of the sets
    rkey: np.ndarray  # (n,) uint64 Zobrist keys of their relaxed projections (Guide)
    peak: np.ndarray  # (n,) int64 lowest peak reaching the set (at least the floor)
    mem: np.ndarray  # (n,) int64 bytes resident after the set
    queue: np.ndarray  # (n, 2) int16 units still to run of a committed sequence (NONE: none)
    after: np.ndarray  # (n,) int16 defer: the next unit must be near this one (NONE: any)

    def part(self, cut: slice) -> Layer:
        return Layer(self.states[:, cut], self.key[cut], self.rkey[cut], self.peak[cut], self.mem[cut],
                     self.queue[cut], self.after[cut])


@dataclass(frozen=True, slots=True)
class Rules:
    """Which exact rules a search uses (each one flag, for ablations)."""

    commit: bool = True
    set_commit: bool = True
    defer: bool = True


def search(prob: Problem, units: Sequence[Sequence[int]], start: int = 0, *, budget: float = INF,
           floor: int = 0, state_cap: int = 2_000_000, deadline: float = INF,
           tables: UnitTables | None = None, guide: Guide | None = None, rules: Rules = Rules()) -> SearchResult:
    """Best order of `units` after the ops in `start`, as schedule_dp.search (exact, no beam), within
    `budget`: "optimal" with an order, "no_better" when none is under the budget, "gave_up" past
    `state_cap` stored states or the deadline. On the C kernel (schedule_native) when it is
    available, else with numpy."""
    t0 = time.perf_counter()
    tab = tables if tables is not None else UnitTables(prob, units, start)
    kernel = schedule_native.Kernel.of(tab)
    if kernel is not None:
        return schedule_native.forward(kernel, prob, start, budget=budget, floor=floor, state_cap=state_cap,
                                       deadline=deadline, guide=guide, rules=rules)
    limit = np.iinfo(np.int64).max if budget == INF else int(budget)
    layer = Layer(np.zeros((tab.width, 1), np.uint64), np.zeros(1, np.uint64), np.zeros(1, np.uint64),
                  np.array([floor], np.int64), np.array([prob.mem(start)], np.int64),
                  np.full((1, 2), NONE, np.int16), np.full(1, NONE, np.int16))
    history: list[tuple[np.ndarray, np.ndarray]] = []  # per layer: parent index, unit added
    stored = 1

    def result(order, best, status) -> SearchResult:
        return SearchResult(order, best, status, stored, time.perf_counter() - t0)

    if guide is not None and not guide.admits(layer.rkey)[0]:
        return result(None, INF, "no_better")
    for _ in range(tab.m):
        parts = []
        for lo in range(0, layer.states.shape[1], CHUNK):
            if time.perf_counter() > deadline:
                return result(None, INF, "gave_up")
            got = _expand(tab, layer.part(slice(lo, lo + CHUNK)), limit, rules, guide)
            parts.append((got[0] + lo, *got[1:]))
        parent, unit, peak, mem, key, rkey, queue, after = (np.concatenate([p[i] for p in parts]) for i in range(8))
        if len(parts) > 1:  # chunks were merged on their own: merge across them
            keep, mixed = _merge(key, peak, parent, unit, layer.states, _tag(queue, after))
            parent, unit, peak, mem, key, rkey, queue, after = (
                a[keep] for a in (parent, unit, peak, mem, key, rkey, queue, after))
            queue[mixed], after[mixed] = NONE, NONE
        layer = Layer(_children(layer.states, parent, unit), key, rkey, peak, mem, queue, after)
        history.append((parent.astype(np.int32), unit.astype(np.int16)))
        stored += parent.size
        if not parent.size:
            return result(None, INF, "no_better")
        if stored > state_cap:
            return result(None, INF, "gave_up")
    seq, at = [], 0
    for parent, unit in reversed(history):
        seq.append(int(unit[at]))
        at = int(parent[at])
    order = prob.with_pending([op for u in reversed(seq) for op in tab.units[u]])
    return result(tuple(o for o in order if not (start >> o) & 1), int(layer.peak[0]), "optimal")


def _tag(queue: np.ndarray, after: np.ndarray) -> np.ndarray:
    """One number per state for its forced queue and its defer constraint."""
    q = queue.astype(np.int64) + 1
    return (after.astype(np.int64) + 1) | (q[:, 0] << 16) | (q[:, 1] << 32)


def _children(states: np.ndarray, parent: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """The bit-sets of parent + unit (unit xor-ed in: the backward search removes it the same way)."""
    out = states[:, parent]
    out[unit >> 6, np.arange(parent.size)] ^= np.left_shift(np.uint64(1), (unit & 63).astype(np.uint64))
    return out


def _merge(key: np.ndarray, peak: np.ndarray, parent: np.ndarray, unit: np.ndarray, states: np.ndarray,
           tag: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices of one lowest-peak child of every distinct set among children (parent, unit) of
    `states` with Zobrist keys `key`, and per kept child whether its set had children of another
    `tag`; children of one key are compared word by word."""
    n = key.size
    if n <= 1:
        return np.arange(n), np.zeros(n, bool)
    signed = key.view(np.int64)
    order = np.argsort(signed) if peak[0] == peak.min() == peak.max() else np.lexsort((peak, signed))
    sorted_key = signed[order]
    first = np.empty(n, bool)
    first[0] = True
    np.not_equal(sorted_key[1:], sorted_key[:-1], out=first[1:])
    dup = np.flatnonzero(~first)
    mixed = np.zeros(int(first.sum()), bool)
    if dup.size:  # S + u == S' + u' exactly when S xor S' == {u} xor {u'}
        group = np.cumsum(first)[dup] - 1
        lead = order[np.flatnonzero(first)[group]]
        dup = order[dup]
        p, q, u, v = parent[dup], parent[lead], unit[dup], unit[lead]
        one = np.uint64(1)
        for w in range(states.shape[0]):
            flip = np.where(u >> 6 == w, one << (u & 63).astype(np.uint64), 0) ^ \
                np.where(v >> 6 == w, one << (v & 63).astype(np.uint64), 0)
            if not np.array_equal(states[w, p] ^ states[w, q], flip.astype(np.uint64)):
                raise AssertionError("Zobrist key collision between two different unit sets")
        if tag is not None:
            mixed[group[tag[dup] != tag[lead]]] = True
    return order[first], mixed


def _test(states: np.ndarray, need: tuple, absent: tuple, where: np.ndarray | None = None) -> np.ndarray:
    """States (columns, or those of `where`) holding every unit of `need` and none of `absent`."""
    ok = None
    for pairs, full in ((need, True), (absent, False)):
        for w, msk in pairs:
            row = states[w] if where is None else states[w, where]
            t = (row & msk) == (msk if full else 0)
            ok = t if ok is None else ok & t
    return ok


def _expand(tab: UnitTables, layer: Layer, limit: int, rules: Rules, guide: Guide | None) -> tuple[np.ndarray, ...]:
    """Children of a chunk of states, merged: (parent, unit, peak, mem, key, rkey, queue, after) arrays.
    A state inside a committed sequence has one child, its next queued unit; a free state gets one
    child per ready unit under the limit (near its constraint), unless a commit rule applies."""
    states, peak, mem, queue = layer.states, layer.peak, layer.mem, layer.queue
    # a probe (floor = budget - 1): every peak is the floor, a child under the limit keeps it
    flat = peak[0] >= limit - 1 and peak.min() == peak.max()
    free = queue[:, 0] < 0
    all_free = bool(free.all())
    parts: list[tuple] = []  # (parent, unit, peak or None (flat), mem, committed, queue or None, after)

    def add(idx, u, after, mem2, committed, rest, then):
        parts.append((idx, np.full(idx.size, u, np.int16), after, mem2, committed, rest, then))

    if not free.all():  # states inside a committed sequence: its next unit
        forced = np.flatnonzero(~free)
        for u in np.unique(queue[forced, 0]).tolist():
            idx = forced[queue[forced, 0] == u]
            dpeak, dmem = tab.deltas(u, states, idx)
            rest = np.full((idx.size, 2), NONE, np.int16)
            rest[:, 0] = queue[idx, 1]
            add(idx, u, None if flat else np.maximum(peak[idx], mem[idx] + dpeak), mem[idx] + dmem,
                np.ones(idx.size, bool), rest, np.full(idx.size, NONE, np.int16))
    any_has = np.bitwise_or.reduce(states, axis=1).tolist()
    all_have = np.bitwise_and.reduce(states, axis=1).tolist()
    for u in range(tab.m):
        w, bit = u >> 6, 1 << (u & 63)
        if all_have[w] & bit or any(any_has[pw] & int(pm) != int(pm) for pw, pm in tab.pred_words[u]):
            continue
        ready = _test(states, tab.pred_words[u], ((w, np.uint64(bit)),))
        idx = np.flatnonzero(ready if all_free else ready & free)
        if not idx.size:
            continue
        dpeak, dmem = tab.deltas(u, states, idx)
        base = mem[idx]
        step = base + dpeak
        if flat:
            ok = np.flatnonzero(step < limit)
            after = None
        else:
            before = peak[idx]
            after = np.maximum(before, step)
            ok = np.flatnonzero(after < limit)
        if ok.size < idx.size:
            idx, base, step, dpeak, dmem = idx[ok], base[ok], step[ok], dpeak[ok], dmem[ok]
            after = None if flat else after[ok]
        if rules.commit and tab.commit[u]:
            committed = dmem <= 0 if flat else (step <= peak[idx]) & (dmem <= 0)
        else:
            committed = np.zeros(idx.size, bool)
        # defer: u freed nothing (its peak is its final mem), so a later place is never worse
        if rules.defer and tab.deferrable[u]:
            then = np.where((dpeak == dmem) & (dmem >= 0), u, NONE).astype(np.int16)
        else:
            then = np.full(idx.size, NONE, np.int16)
        add(idx, u, after, base + dmem, committed, None, then)
    if rules.commit and rules.set_commit and tab.set_commits and parts:
        open_ = free.copy()
        for p in parts:
            open_[p[0][p[4]]] = False
        _set_commit_children(tab, layer, open_, add, flat)
    if not parts:
        empty = np.zeros(0, np.int64)
        return (empty, empty, empty, empty, np.zeros(0, np.uint64), np.zeros(0, np.uint64),
                np.zeros((0, 2), np.int16), np.zeros(0, np.int16))
    parent, unit, mem2, committed, then = (np.concatenate([p[i] for p in parts]) for i in (0, 1, 3, 4, 6))
    peak2 = np.full(parent.size, peak[0]) if flat else np.concatenate([p[2] for p in parts])
    rest = np.concatenate([np.full((p[0].size, 2), NONE, np.int16) if p[5] is None else p[5] for p in parts])
    anchor = layer.after[parent]
    # defer: near the anchor, or itself deferred with a higher index (a run of deferred units in index order)
    keep = tab.near[np.where(anchor < 0, tab.m, anchor), unit] | ((then >= 0) & (unit > anchor))
    if committed.any():  # a state with a commit keeps only its first (single units before sequences)
        chosen = np.flatnonzero(committed)
        _, first = np.unique(parent[chosen], return_index=True)
        chosen = chosen[first]
        taken = np.zeros(states.shape[1], bool)
        taken[parent[chosen]] = True
        then[chosen] = NONE
        keep &= ~taken[parent]
        keep[chosen] = True
    child_rkey = layer.rkey[parent] ^ guide.unit_keys[unit] if guide is not None else None
    if guide is not None:  # the relaxation cannot finish from the child's projection: neither can we
        keep &= guide.admits(child_rkey)
    keep = np.flatnonzero(keep)
    parent, unit, peak2, mem2, rest, then = (a[keep] for a in (parent, unit, peak2, mem2, rest, then))
    child_rkey = child_rkey[keep] if guide is not None else np.zeros(keep.size, np.uint64)
    child_key = layer.key[parent] ^ tab.zobrist[unit]
    keep, mixed = _merge(child_key, peak2, parent, unit, states, _tag(rest, then))
    rest, then = rest[keep], then[keep]
    rest[mixed], then[mixed] = NONE, NONE
    return parent[keep], unit[keep], peak2[keep], mem2[keep], child_key[keep], child_rkey[keep], rest, then


def _set_commit_children(tab: UnitTables, layer: Layer, open_: np.ndarray, add, flat: bool) -> None:
    """The first unit of a committable sequence P + c for each open state that has one."""
    where = np.flatnonzero(open_)
    if not where.size:
        return
    states, peak, mem = layer.states[:, where], layer.peak[where], layer.mem[where]
    alive = np.ones(where.size, bool)
    any_has = np.bitwise_or.reduce(states, axis=1).tolist()
    all_have = np.bitwise_and.reduce(states, axis=1).tolist()
    for seq, need, absent in tab.set_commits:
        if any(all_have[w] & int(m) for w, m in absent) or any(any_has[w] & int(m) != int(m) for w, m in need):
            continue
        idx = np.flatnonzero(_test(states, need, absent) & alive)
        if not idx.size:
            continue
        rows, cur, top = states[:, idx], mem[idx], peak[idx]
        ok, lowest, first_mem = np.ones(idx.size, bool), cur, cur
        at = np.arange(idx.size)
        for j, u in enumerate(seq):
            dpeak, dmem = tab.deltas(u, rows, at)
            ok &= cur + dpeak <= top
            cur = cur + dmem
            if j == 0:
                first_mem = cur
            if j < len(seq) - 1:
                lowest = np.minimum(lowest, cur)
                rows = rows.copy() if j == 0 else rows
                rows[u >> 6] |= np.uint64(1 << (u & 63))
        if len(seq) == 3:  # the other order's first set: the second of P alone
            lowest = np.minimum(lowest, mem[idx] + tab.deltas(seq[1], states, idx)[1])
        ok &= cur <= lowest
        if ok.any():
            hit = idx[ok]
            alive[hit] = False
            rest = np.full((hit.size, 2), NONE, np.int16)
            rest[:, :len(seq) - 1] = seq[1:]
            add(where[hit], seq[0], None if flat else peak[hit], first_mem[ok], np.ones(hit.size, bool), rest,
                np.full(hit.size, NONE, np.int16))

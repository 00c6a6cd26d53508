"""Relaxation guides for the vectorised schedule search (formulations/schedule_vec.py).

A relaxation of a min-peak problem: the same graph with buffers under a threshold counted as 0 bytes
(schedule_dp.Problem(ignore_below=...)). Its steps are no larger than the real ones for the same
order, and it has more lazy ops (a mul that takes a dying input in place and reads a 16-byte
sigmoid(w) is lazy once the sigmoid counts 0), so its search space is far smaller.

Guide: for a probe at budget B, the relaxed sets of units from which every remaining unit can run
with all relaxed steps under B (the co-reachable sets), found by a backward layered search from the
full set: a set T' gives T = T' - u for each unit u with no successor in T' when running u last from T
keeps the step under B (mem(T) = mem(T') - dmem(T, u)). A real state whose projection (the relaxed
part of each of its units: the real units minus their relaxed-lazy ops) is not co-reachable has no
completion under B either: take any real completion under B, move its relaxed-lazy ops to just
before their first consumers (that raises no relaxed step: schedule_dp's lazy rule), and it is a
relaxed completion of the projection whose steps are no higher than the real ones.

Size: the co-reachable relaxed sets (10^5 - 10^7 on RandWire stages); their Zobrist keys go into a
one-hash Bloom table of 16 bits per key (at most 128 MiB), one lookup per state. A false positive or a
key collision only admits a state, never prunes one wrongly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from formulations import schedule_native
from formulations.schedule_dp import INF, Problem, SearchResult
from formulations.schedule_units import UnitTables
from formulations.schedule_vec import CHUNK, _children, _merge, search

MAX_TABLE_BITS = 30  # the Bloom table of a guide: at most 2^30 bits (128 MiB), 16 bits per key below that

@dataclass(frozen=True, slots=True)
class Guide:
    """Relaxed sets from which the end is reachable under the budget, as a one-hash Bloom filter:
    bit (key >> shift) is set for each co-reachable key. A key it admits may be a false positive
    (at most `states` / 2^bits of the others): that only prunes less."""

    unit_keys: np.ndarray  # per unit of the guided search: Zobrist key of its relaxed unit (0: none)
    table: np.ndarray  # uint64 words of the bit table
    shift: np.uint64  # 64 - log2(bits in the table)
    states: int  # relaxed sets stored by the backward search
    seconds: float

    @classmethod
    def of(cls, unit_keys: np.ndarray, keys: np.ndarray, states: int, seconds: float) -> Guide:
        bits = int(min(MAX_TABLE_BITS, max(12, (16 * keys.size - 1).bit_length())))
        shift = np.uint64(64 - bits)
        table = np.zeros(1 << (bits - 6), np.uint64)
        at = keys >> shift
        np.bitwise_or.at(table, (at >> np.uint64(6)).astype(np.int64), np.uint64(1) << (at & np.uint64(63)))
        return cls(unit_keys, table, shift, states, seconds)

    def admits(self, key: np.ndarray) -> np.ndarray:
        """Whether each relaxed key may be co-reachable (no co-reachable key is ever refused)."""
        at = key >> self.shift
        return (self.table[(at >> np.uint64(6)).astype(np.int64)] >> (at & np.uint64(63))) & np.uint64(1) != 0


def coreachable(tab: UnitTables, budget: int, *, deadline: float = INF, state_cap: int = 20_000_000) -> \
        tuple[np.ndarray | None, int]:
    """Zobrist keys of every set of `tab`'s units from which all of them can be finished with
    every step under `budget`, and the number of sets stored; None past the deadline or the cap.
    On the C kernel (schedule_native) when it is available, else with numpy."""
    kernel = schedule_native.Kernel.of(tab)
    if kernel is not None:
        return schedule_native.backward(kernel, budget, deadline=deadline, state_cap=state_cap)
    m = tab.m
    full = (1 << m) - 1
    states = np.array([[(full >> (64 * w)) & (2**64 - 1)] for w in range(tab.width)], np.uint64)
    key = np.bitwise_xor.reduce(tab.zobrist, keepdims=True) if m else np.zeros(1, np.uint64)
    mem = np.array([tab.prob.mem(tab.done_of(full))], np.int64)
    found, stored = [key], 1
    for _ in range(m):
        parts = []
        for lo in range(0, states.shape[1], CHUNK):
            if time.perf_counter() > deadline:
                return None, stored
            cut = slice(lo, lo + CHUNK)
            got = _shrink(tab, states[:, cut], key[cut], mem[cut], budget)
            parts.append((got[0] + lo, *got[1:]))
        parent, unit, mem, key = (np.concatenate([p[i] for p in parts]) for i in range(4))
        if len(parts) > 1:
            keep, _ = _merge(key, np.zeros(key.size, np.int64), parent, unit, states)
            parent, unit, mem, key = parent[keep], unit[keep], mem[keep], key[keep]
        states = _children(states, parent, unit)
        found.append(key)
        stored += key.size
        if not key.size:
            break
        if stored > state_cap:
            return None, stored
    return np.concatenate(found), stored


def _shrink(tab: UnitTables, states: np.ndarray, key: np.ndarray, mem: np.ndarray, limit: int) -> \
        tuple[np.ndarray, ...]:
    """Backward children of a chunk: the sets minus one last unit run under `limit`, merged."""
    any_has = np.bitwise_or.reduce(states, axis=1).tolist()
    parents, units, mems = [], [], []
    for u in range(tab.m):
        w, bit = u >> 6, 1 << (u & 63)
        if not any_has[w] & bit:
            continue
        last = (states[w] & np.uint64(bit)) != 0
        for sw, sm in tab.succ_words[u]:
            last &= (states[sw] & sm) == 0
        idx = np.flatnonzero(last)
        if not idx.size:
            continue
        dpeak, dmem = tab.deltas(u, states, idx)
        before = mem[idx] - dmem
        ok = before + dpeak < limit
        parents.append(idx[ok])
        units.append(np.full(int(ok.sum()), u, np.int64))
        mems.append(before[ok])
    if not parents:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, np.zeros(0, np.uint64)
    parent, unit, mem2 = (np.concatenate(x) for x in (parents, units, mems))
    child_key = key[parent] ^ tab.zobrist[unit]
    keep, _ = _merge(child_key, np.zeros(parent.size, np.int64), parent, unit, states)
    return parent[keep], unit[keep], mem2[keep], child_key[keep]


class RelaxedGuides:
    """Guides for searching `units` of `prob` from `relaxed` (the same graph, sizes no larger, every
    lazy op of `prob` lazy there too), one per budget; the relaxed tables are compiled once."""

    def __init__(self, prob: Problem, relaxed: Problem, units: Sequence[Sequence[int]], start: int) -> None:
        self.fits = not any(prob.lazy[o] and not relaxed.lazy[o] for o in range(prob.n))
        parts = [tuple(x for x in u if not relaxed.lazy[x]) for u in units]
        kept = list(dict.fromkeys(p for p in parts if p))
        self.tables = UnitTables(relaxed, kept, start)
        index = {p: k for k, p in enumerate(kept)}
        self.unit_keys = np.array([self.tables.zobrist[index[p]] if p else 0 for p in parts], np.uint64)
        self.last: tuple[int, Guide] | None = None  # the tightest guide built so far, with its budget

    def at(self, budget: int, *, deadline: float = INF, state_cap: int = 20_000_000) -> Guide | None:
        """The guide at `budget`; when its search gives up, the last one built at a budget no lower
        (co-reachable under a higher budget is a superset: still sound), else None."""
        if not self.fits:
            return None
        t0 = time.perf_counter()
        keys, stored = coreachable(self.tables, budget, deadline=deadline, state_cap=state_cap)
        if keys is None:
            return self.last[1] if self.last is not None and self.last[0] >= budget else None
        guide = Guide.of(self.unit_keys, keys, stored, time.perf_counter() - t0)
        if self.last is None or budget <= self.last[0]:
            self.last = (budget, guide)
        return guide


def vector_probe(prob: Problem, units: Sequence[Sequence[int]], start: int, *, relaxed: Problem | None,
                 state_cap: int, guide_share: float = 1 / 2) -> Callable[[int, int, float], SearchResult]:
    """A probe for schedule_dp.descend: schedule_vec.search of `units` (tables compiled once), guided
    by `relaxed` when given (its backward search gets `guide_share` of each probe's time)."""
    tables = UnitTables(prob, units, start)
    guides = RelaxedGuides(prob, relaxed, units, start) if relaxed is not None else None

    def probe(budget: int, floor: int, deadline: float) -> SearchResult:
        guide = None
        if guides is not None:
            now = time.perf_counter()
            guide = guides.at(budget, deadline=now + (deadline - now) * guide_share)
        return search(prob, units, start, budget=budget, floor=floor, state_cap=state_cap, deadline=deadline,
                      tables=tables, guide=guide)

    return probe

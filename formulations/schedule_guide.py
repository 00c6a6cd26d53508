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

Tight steps: the relaxed optimum misses the real one by the small buffers resident at its highest
steps (RandWire: the sigmoid(w) of each weighted sum in progress, 8-40 bytes each). A relaxed step of
(T, u) within `large` (the smallest buffer the relaxation counts) of the budget is tight: in a real
order under the budget whose projection runs u from T, no relaxed-lazy op whose owner is not in
T' = T + u has allocated a counted buffer early (it would still be resident: step + large >= budget),
so the real step of u's highest op is at least the relaxed step plus every small buffer that is
certainly resident then: one of its readers has run or is running (an op of a unit of T'; of T when
u has several ops, the highest maybe before that reader; a unit of one op has its highest step at that
op, its lazy ops only add bytes before it) and one has
certainly not (its unit is not in T'; or it is a relaxed-lazy op whose owners are not in T' and that
either allocates a counted buffer with no donor, or cannot run yet: the producer of a counted input,
or another reader of its in-place donor, certainly has not run either). The backward search drops a
tight transition whose step plus these bytes (SmallBuffers.forced, a function of T') reaches the
budget, so the guide admits fewer sets, and none when no real order fits: the probe then answers at once.

Highs: the backward search also keeps, per set, the least highest step (tight steps with their small
buffers) of a completion from it: its `high` (merged sets keep the lowest, a DP as the forward search's
peaks). So one search at the best peak serves the whole bisection below it: the guide at B is the sets
whose high is under B, and the empty set's high is a lower bound of the real optimum (RelaxedGuides.
bound; every real order under the budget has its projection's steps, plus the resident small bytes at
tight ones, at or under its own steps). Within `large` less the small buffers of the search's budget the
tight steps are the same, so that guide is the one a search at B would build; further down it is weaker
than a search at B (fewer steps are tight) but still sound (a real order under B is under the search's
budget, where its tight-step bound holds), and probes filter it rather than search anew: a new search
costs about as much as the first (RandWire ER seed 2 stage 2: 27 s), more than the probes it serves.

Size: the co-reachable relaxed sets (10^5 - 10^7 on RandWire stages); their Zobrist keys go into a
one-hash Bloom table of 16 bits per key (at most 128 MiB), one lookup per state. A false positive or a
key collision only admits a state, never prunes one wrongly. The keys and highs of the last search stay
(16 bytes a set) for the next budget and for the guided walk (schedule_walk.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from formulations import schedule_native
from formulations.schedule_dp import INF, Problem, SearchResult, bits
from formulations.schedule_units import UnitTables, column
from formulations.schedule_vec import CHUNK, _children, _merge, search
from formulations.schedule_walk import walk

GUIDE_CAP = 60_000_000  # relaxed sets a guide's backward search may store (16 bytes each: key and high)
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
    def of(cls, unit_keys: np.ndarray, keys: np.ndarray, highs: np.ndarray, budget: int, states: int,
           seconds: float) -> Guide:
        """The guide at `budget` of a backward search's keys and highs (coreachable): its sets whose high
        is under the budget."""
        below = highs < budget
        count = int(np.count_nonzero(below))
        bits = int(min(MAX_TABLE_BITS, max(12, (16 * count - 1).bit_length())))
        shift = np.uint64(64 - bits)
        table = np.zeros(1 << (bits - 6), np.uint64)
        if not schedule_native.bloom(keys, highs, budget, table, shift):
            at = keys[below] >> shift
            np.bitwise_or.at(table, (at >> np.uint64(6)).astype(np.int64), np.uint64(1) << (at & np.uint64(63)))
        return cls(unit_keys, table, shift, states, seconds)

    def admits(self, key: np.ndarray) -> np.ndarray:
        """Whether each relaxed key may be co-reachable (no co-reachable key is ever refused)."""
        at = key >> self.shift
        return (self.table[(at >> np.uint64(6)).astype(np.int64)] >> (at & np.uint64(63))) & np.uint64(1) != 0


@dataclass(frozen=True, slots=True)
class SmallBuffers:
    """Buffers the relaxation counts as 0 that are certainly resident at a tight step (module docstring),
    over the relaxed units: per buffer its real size, `done` (a unit of it in T': a reader has run or is
    running; None: always) and witnesses (a, bs): no unit of `a` in T' and (bs None, or no unit of some b
    of bs in T') prove a reader still to run."""

    sizes: tuple[int, ...]
    done: tuple[int | None, ...]
    witnesses: tuple[tuple[tuple[int, tuple[int, ...] | None], ...], ...]
    large: int  # the smallest buffer the relaxation counts: a step within it of the budget is tight

    @classmethod
    def of(cls, prob: Problem, relaxed: Problem, tab: UnitTables) -> SmallBuffers:
        rsize = {t: sz for t, sz, _, _ in relaxed.roots}
        done_by = lambda o: tab.done_by.get(o, 0)  # noqa: E731 - units after which op o is done
        started = lambda o: (tab.start >> o) & 1  # noqa: E731

        def witness(r: int) -> tuple[int, tuple[int, ...] | None] | None:
            """Why reader op r has certainly not run at a tight step with none of `a` in T'."""
            if not relaxed.lazy[r]:
                return done_by(r), None
            e = relaxed.effects[r]
            donors = [users for _, sz, users in e.donors if sz]
            if any(e.out_sizes) and not donors:
                return done_by(r), None  # run early, its counted output would still be resident
            bs = [done_by(p) for t, sz, _ in e.reads if sz
                  for p in [relaxed.graph.producer.get(t)] if p is not None and not relaxed.lazy[p] and not started(p)]
            for users in donors:  # taken over in place only after every other reader ran
                bs += [done_by(q) for q in bits(users & ~(1 << r))
                       if not started(q) and (not relaxed.lazy[q] or any(relaxed.effects[q].out_sizes))]
            return (done_by(r), tuple(bs)) if bs else None

        sizes, done, witnesses = [], [], []
        for t, sz, users, _ in prob.roots:
            if not sz or rsize.get(t, 0):
                continue
            readers = list(bits(users))
            ran = [r for r in readers if started(r)]
            found = tuple(w for r in readers if not started(r) for w in [witness(r)] if w is not None)
            if not found:
                continue
            any_done = 0
            for r in readers:
                any_done |= done_by(r)
            sizes.append(sz)
            done.append(None if ran else any_done)
            witnesses.append(found)
        large = min((sz for _, sz, _, _ in relaxed.roots if sz), default=0)
        return cls(tuple(sizes), tuple(done), tuple(witnesses), large)

    def forced(self, states: np.ndarray, ran: np.ndarray | None = None) -> np.ndarray:
        """Bytes certainly resident at a tight step into each set of `states` ((W, n) unit bit-sets),
        a reader having run when it is in `ran` (default: `states`; T' less a unit of several ops)."""
        def meets(mask: int, sets: np.ndarray = states) -> np.ndarray:
            hit = np.zeros(sets.shape[1], bool)
            for w in range(sets.shape[0]):
                part = (mask >> (64 * w)) & (2**64 - 1)
                if part:
                    hit |= (sets[w] & np.uint64(part)) != 0
            return hit

        total = np.zeros(states.shape[1], np.int64)
        for sz, done, found in zip(self.sizes, self.done, self.witnesses):
            pending = np.zeros(states.shape[1], bool)
            for a, bs in found:
                why = np.ones(states.shape[1], bool) if bs is None else np.zeros(states.shape[1], bool)
                for b in bs or ():
                    why |= ~meets(b)
                pending |= ~meets(a) & why
            if done is not None:
                pending &= meets(done, states if ran is None else ran)
            total += sz * pending
        return total


def coreachable(tab: UnitTables, budget: int, *, deadline: float = INF, state_cap: int = GUIDE_CAP) -> \
        tuple[np.ndarray | None, np.ndarray | None, int]:
    """Zobrist keys of every set of `tab`'s units from which all of them can be finished with
    every step under `budget`, the least highest step of such a completion from each (its `high`:
    tight steps with their certainly resident small buffers; the full set's is INT64_MIN), and the
    number of sets stored; None past the deadline or the cap. On the C kernel (schedule_native)
    when it is available, else with numpy."""
    kernel = schedule_native.Kernel.of(tab)
    if kernel is not None:
        return schedule_native.backward(kernel, budget, deadline=deadline, state_cap=state_cap)
    m = tab.m
    full = (1 << m) - 1
    states = column(full, tab.width)
    key = np.bitwise_xor.reduce(tab.zobrist, keepdims=True) if m else np.zeros(1, np.uint64)
    mem = np.array([tab.prob.mem(tab.done_of(full))], np.int64)
    high = np.array([np.iinfo(np.int64).min], np.int64)
    found, highs, stored = [key], [high], 1
    for _ in range(m):
        parts = []
        for lo in range(0, states.shape[1], CHUNK):
            if time.perf_counter() > deadline:
                return None, None, stored
            cut = slice(lo, lo + CHUNK)
            got = _shrink(tab, states[:, cut], key[cut], mem[cut], high[cut], budget)
            parts.append((got[0] + lo, *got[1:]))
        parent, unit, mem, high, key = (np.concatenate([p[i] for p in parts]) for i in range(5))
        if len(parts) > 1:
            keep, _ = _merge(key, high, parent, unit, states)
            parent, unit, mem, high, key = parent[keep], unit[keep], mem[keep], high[keep], key[keep]
        states = _children(states, parent, unit)
        found.append(key)
        highs.append(high)
        stored += key.size
        if not key.size:
            break
        if stored > state_cap:
            return None, None, stored
    return np.concatenate(found), np.concatenate(highs), stored


def _shrink(tab: UnitTables, states: np.ndarray, key: np.ndarray, mem: np.ndarray, high: np.ndarray, limit: int) -> \
        tuple[np.ndarray, ...]:
    """Backward children of a chunk: the sets minus one last unit run under `limit`, merged (the
    lowest `high` kept: the highest step of the best completion, tight steps with their small buffers)."""
    any_has = np.bitwise_or.reduce(states, axis=1).tolist()
    parents, units, mems, highs = [], [], [], []
    small = tab.small
    forced = small.forced(states) if small is not None else None  # units of one op: u's readers count
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
        step = before + dpeak
        if forced is not None:  # a tight step: the small buffers certainly resident count too
            tight = np.flatnonzero((step < limit) & (limit - step <= small.large))
            at = idx[tight]
            if len(tab.units[u]) == 1:
                extra = forced[at]
            else:  # the highest step may come before u's reader: readers of T only
                ran = states[:, at].copy()
                ran[w] &= ~np.uint64(bit)
                extra = small.forced(states[:, at], ran)
            step[tight] += extra
        ok = step < limit
        parents.append(idx[ok])
        units.append(np.full(int(ok.sum()), u, np.int64))
        mems.append(before[ok])
        highs.append(np.maximum(step[ok], high[idx[ok]]))
    if not parents:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, empty, np.zeros(0, np.uint64)
    parent, unit, mem2, high2 = (np.concatenate(x) for x in (parents, units, mems, highs))
    child_key = key[parent] ^ tab.zobrist[unit]
    keep, _ = _merge(child_key, high2, parent, unit, states)
    return parent[keep], unit[keep], mem2[keep], high2[keep], child_key[keep]


class RelaxedGuides:
    """Guides for searching `units` of `prob` from `relaxed` (the same graph, sizes no larger, every
    lazy op of `prob` lazy there too); the relaxed tables are compiled once. One backward search at
    the highest budget asked serves every lower one: a set's `high` (coreachable) is the least highest
    step of its completions, so the guide at B <= that budget is the sets whose high is under B (a real
    order under B is under the higher budget too, where the tight-step bound holds)."""

    def __init__(self, prob: Problem, relaxed: Problem, units: Sequence[Sequence[int]], start: int) -> None:
        self.fits = not any(prob.lazy[o] and not relaxed.lazy[o] for o in range(prob.n))
        parts = [tuple(x for x in u if not relaxed.lazy[x]) for u in units]
        kept = list(dict.fromkeys(p for p in parts if p))
        self.tables = UnitTables(relaxed, kept, start)
        self.tables.small = SmallBuffers.of(prob, relaxed, self.tables)
        index = {p: k for k, p in enumerate(kept)}
        self.unit_keys = np.array([self.tables.zobrist[index[p]] if p else 0 for p in parts], np.uint64)
        self.real_of = {index[p]: k for k, p in enumerate(parts) if p}  # relaxed unit -> its real unit
        self.lazy_units = [k for k, p in enumerate(parts) if not p]  # real units of relaxed-lazy ops only
        self.top: tuple[int, np.ndarray, np.ndarray, int] | None = None  # budget, keys, highs, sets stored
        self.highs: tuple | None = None  # (top, a lookup of its highs) for highs_of

    def at(self, budget: int, *, deadline: float = INF, state_cap: int = GUIDE_CAP) -> Guide | None:
        """The guide at `budget`, from the backward search at a budget no lower (run now when there is
        none); None when that search gives up."""
        t0 = time.perf_counter()
        if not self._search(budget, deadline, state_cap):
            return None
        _, keys, highs, stored = self.top
        return Guide.of(self.unit_keys, keys, highs, budget, stored, time.perf_counter() - t0)

    def refutes(self, budget: int, *, deadline: float = INF) -> bool:
        """Whether the guide at `budget` leaves out the empty set (no order peaks under the budget), from
        the highs alone (no table); False when the backward search gives up."""
        return self._search(budget, deadline, GUIDE_CAP) and not self.bound() < budget

    def _search(self, budget: int, deadline: float, state_cap: int) -> bool:
        """Make self.top a backward search at `budget` or above; False when the guide cannot be used or
        the search gives up."""
        if not self.fits:
            return False
        if self.top is None or self.top[0] < budget:  # one at a higher budget serves (module docstring)
            keys, highs, stored = coreachable(self.tables, budget, deadline=deadline, state_cap=state_cap)
            if keys is None:
                return False
            self.top = (budget, keys, highs, stored)
        return True

    def highs_of(self, keys: np.ndarray) -> np.ndarray:
        """The high (coreachable) of each relaxed set key in the last backward search; the int64 maximum
        for a set it did not store (none of its completions fits). Highs far under the search's budget
        (2^32 bytes) read as that, and a key may rarely take another's high (the kernel's table keeps a
        31-bit fingerprint): the walk only orders and skips by them, and checks every real step."""
        if self.highs is None or self.highs[0] is not self.top:
            budget, top_keys, top_highs, _ = self.top
            table = schedule_native.HighTable.of(top_keys, top_highs, budget)
            if table is None:  # numpy: the keys sorted
                order = np.argsort(top_keys)
                skeys, shighs = top_keys[order], np.maximum(top_highs[order], budget - (2**32 - 1))

                def table(keys: np.ndarray) -> np.ndarray:
                    at = np.minimum(np.searchsorted(skeys, keys), skeys.size - 1)
                    return np.where(skeys[at] == keys, shighs[at], np.iinfo(np.int64).max)
            self.highs = (self.top, table)
        return self.highs[1](keys)

    def bound(self) -> int | None:
        """The least budget at which the last backward search's guide admits the empty set, less one:
        no order peaks under it (that search's budget when even it does not); None before any."""
        if self.top is None:
            return None
        budget, keys, highs, _ = self.top
        empty = np.flatnonzero(keys == 0)
        return int(highs[empty[0]]) if empty.size else budget


class VectorProbe:
    """A probe for schedule_dp.descend: schedule_vec.search of `units` (tables compiled once), guided
    by `relaxed` when given (its backward search gets `guide_share` of each probe's time). With a guide
    that admits the empty set, a guided walk (schedule_walk.py, `walk_share` of the time) looks for an
    order under the budget first: status "found" (an order, not proven the least) when it has one."""

    def __init__(self, prob: Problem, units: Sequence[Sequence[int]], start: int, *, relaxed: Problem | None,
                 state_cap: int, guide_share: float = 3 / 4, walk_share: float = 1 / 4) -> None:
        self.prob, self.units, self.start, self.state_cap, self.guide_share = prob, units, start, state_cap, guide_share
        self.walk_share = walk_share
        self.tables = UnitTables(prob, units, start)
        self.guides = RelaxedGuides(prob, relaxed, units, start) if relaxed is not None else None

    def __call__(self, budget: int, floor: int, deadline: float) -> SearchResult:
        guide = None
        if self.guides is not None:
            now = time.perf_counter()
            guide = self.guides.at(budget, deadline=now + (deadline - now) * self.guide_share)
        if guide is not None and guide.admits(np.zeros(1, np.uint64))[0] and self.walk_share:
            now = time.perf_counter()
            found = self.walk(budget, now + (deadline - now) * self.walk_share)
            if found is not None:
                return replace(found, peak=max(floor, found.peak))
        return search(self.prob, self.units, self.start, budget=budget, floor=floor, state_cap=self.state_cap,
                      deadline=deadline, tables=self.tables, guide=guide)

    def walk(self, budget: int, deadline: float) -> SearchResult | None:
        """An order under `budget` by the guided walk (status "found": not proven the least; its own peak), on the
        guides' last backward search (None without one at `budget` or above, or when the walk fails)."""
        t0 = time.perf_counter()
        guides = self.guides
        if guides is None or guides.top is None or guides.top[0] < budget or not guides.bound() < budget:
            return None
        seq = walk(guides, self.tables, budget, deadline=deadline)
        if seq is None:
            return None
        order = [o for o in self.prob.with_pending([op for u in seq for op in self.units[u]])
                 if not (self.start >> o) & 1]
        peak = max(self.prob.profile(order, self.start))
        if peak >= budget:  # the walk checks every step with the same Problem.step
            raise AssertionError(f"guided walk returned an order of peak {peak}, budget {budget}")
        return SearchResult(tuple(order), peak, "found", len(seq), time.perf_counter() - t0)

    def refutes(self, budget: int, deadline: float) -> bool:
        """Whether the guide at `budget` alone proves that no order peaks under it (its backward search
        never reaches the empty set); False without a guide or past the deadline."""
        return self.guides is not None and self.guides.refutes(budget, deadline=deadline)

    def bound(self) -> int | None:
        """A lower bound on the peak from the guides built so far (RelaxedGuides.bound); None without."""
        return self.guides.bound() if self.guides is not None else None


def vector_probe(prob: Problem, units: Sequence[Sequence[int]], start: int, *, relaxed: Problem | None,
                 state_cap: int, guide_share: float = 3 / 4, walk_share: float = 1 / 4) -> VectorProbe:
    """descend's probe on the vector engine (VectorProbe)."""
    return VectorProbe(prob, units, start, relaxed=relaxed, state_cap=state_cap, guide_share=guide_share,
                       walk_share=walk_share)

"""Exact buffer placement: branch and bound over canonical placements (after MiniMalloc,
Moffitt, ASPLOS 2023; our own implementation), in solver units (see formulations/offsets.py).

Canonical placements. Push every buffer of a solution down until it rests on offset 0 or on a
buffer that shares time with it; list the buffers by offset. Taken in that order each buffer sits
at `low(b)`, the highest top among the buffers listed before it that share time with it. So
the search builds placements bottom-up behind a floor f that never decreases: only buffers with
low(b) = f can be placed, at f; when none can (or none is wanted) f rises to the next low(b).

Branching. At floor f the bottom sections (time sections whose skyline h(s) <= f and that still
hold unplaced buffers) must each be filled from f by one of the buffers placeable at f, or be
left empty there. By section (the default): take the bottom section with the fewest such
buffers (full sections, which may not be left empty, first) and branch on which one fills it,
then on leaving it empty. By buffer (every other restart): the first placeable buffer in the
order either goes at f or not. Both are partitions: no placement is reached twice.

Pruning (each a flag of offsets.Options):
- section inference: in every section the unplaced units U(s) must fit above the lowest offset
  any of its unplaced buffers can still take: min_c eff(c) + U(s) <= C, with eff(c) = f for a
  buffer placeable at f and max(low(c), f + 1) otherwise. A full section (no slack) whose bottom
  no placeable buffer covers is dead at once; a rise to f' needs f' + U(s) <= C wherever h(s) <= f'.
- dominance: a rise to f' is pruned if an unplaced buffer would fit under it (low(c) + w_c <= f'):
  dropping that buffer to low(c) gives a placement with a smaller sum of offsets, never pruned.
- symmetry: buffers of one lifetime (and alignment 1) that touch can swap places without
  changing anything else; only the larger-below order is kept (among equal sizes the lower
  rank below), and of several identical buffers only the first is tried. Both rules decrease the same potential as
  dominance (sum of size^2 * offset, then sum of (n - rank) * offset), so together they are sound.
- decomposition: when no unplaced buffer crosses a time boundary, the sides share only placed
  buffers; each side is solved on its own, and one failing side fails the node.
- several orders: runs with growing node budgets over (order, branching) pairs, then jittered
  orders; a run that finishes within its budget is a proof.
- memo: failed subproblems are remembered by their unplaced buffers, skyline, floor, exclusions
  and resting buffers, per (order, branching) since the symmetry rules depend on the order.
  Within one run it finds no repeats on the MiniMalloc suite, but a restart of the same order
  with a larger budget skips what the last one finished (an 8-buffer proof: 26086 -> 1368 nodes).
Completeness: every canonical placement not excluded by these sound rules is reached, so a
search that finishes without a placement proves infeasibility. Minimisation probes capacities.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time

import numpy as np

from formulations.offsets import Instance, Options, Outcome, better, outcome


class _Timeout(Exception):
    """The deadline passed, or another method of the race finished first."""


class _Budget(Exception):
    """The node budget of this order ran out: restart with the next one."""


_INF = 1 << 60


class _Search:
    """The state of one search: skyline, unplaced units per section, lowest offsets, a trail."""

    def __init__(self, inst: Instance, cap: int, options: Options, deadline: float, rank: np.ndarray,
                 budget: float, memo: set[bytes], stop: threading.Event | None = None, by_buffer: bool = False):
        self.inst, self.cap, self.opt, self.deadline = inst, cap, options, deadline
        self.rank, self.budget, self.memo, self.stop = rank, budget, memo, stop
        n, sections = inst.n, len(inst.live)
        self.size = np.asarray(inst.size, dtype=np.int64)
        self.align = np.asarray(inst.align, dtype=np.int64)
        self.aligned = bool((self.align > 1).any())
        self.first = np.asarray(inst.first, dtype=np.int64)
        self.last = np.asarray(inst.last, dtype=np.int64)
        self.nbrs = [np.asarray(x, dtype=np.int64) for x in inst.overlaps]
        self.h = np.zeros(sections, dtype=np.int64)  # top of the placed buffers live in each section
        self.unplaced = np.asarray(inst.live, dtype=np.int64).copy()  # unplaced units in each section
        cross = np.zeros(sections + 2, dtype=np.int64)  # cross[k]: unplaced buffers live in k-1 and k
        np.add.at(cross, self.first + 1, 1)
        np.add.at(cross, self.last, -1)
        self.cross = np.cumsum(cross)[: sections + 1]
        self.low = np.zeros(n, dtype=np.int64)  # max top of the placed buffers sharing time with it
        self.offset = [-1] * n
        self.top = np.full(n, -1, dtype=np.int64)  # offset + size once placed
        self.excluded = np.zeros(n, dtype=bool)  # may not go exactly at the current floor
        self.eff = np.empty(n, dtype=np.int64)  # scratch for sections_fit
        self.trail: list[tuple[int, np.ndarray, np.ndarray]] = []
        self.nodes = 0
        self.polite_after: float | None = None  # see checkpoint()
        self.last_check = time.perf_counter()
        self.by_buffer = by_buffer  # branch on one buffer (at the floor or not) instead of on a section
        # the symmetry rules depend on the order: failures are remembered per (order, branching)
        self.config = hashlib.blake2b(rank.tobytes() + bytes([by_buffer]), digest_size=8).digest()
        spans = self.last - self.first
        sections_of = np.repeat(self.first, spans) + _ramp(spans)
        by_section = np.argsort(sections_of, kind="stable")
        self.inc_buffer = np.repeat(np.arange(n, dtype=np.int64), spans)[by_section]  # (section, buffer) pairs
        self.inc_start = np.searchsorted(sections_of[by_section], np.arange(sections + 1))
        twins: dict[tuple[int, int, int], list[int]] = {}  # one lifetime and one alignment
        for b in range(n):
            twins.setdefault((inst.first[b], inst.last[b], inst.align[b]), []).append(b)
        self.twins = [[d for d in twins[(inst.first[b], inst.last[b], inst.align[b])] if d != b] for b in range(n)]

    # ---- state changes ------------------------------------------------------------------------
    def place(self, b: int, o: int) -> None:
        s0, s1, w, nb = self.inst.first[b], self.inst.last[b], self.inst.size[b], self.nbrs[b]
        self.trail.append((b, self.h[s0:s1].copy(), self.low[nb]))
        self.h[s0:s1] = o + w  # everything below was at most low(b) <= o
        self.unplaced[s0:s1] -= w
        self.cross[s0 + 1:s1] -= 1
        self.low[nb] = np.maximum(self.low[nb], o + w)
        self.offset[b] = o
        self.top[b] = o + w

    def undo(self, mark: int) -> None:
        while len(self.trail) > mark:
            b, h, low = self.trail.pop()
            s0, s1 = self.inst.first[b], self.inst.last[b]
            self.h[s0:s1] = h
            self.unplaced[s0:s1] += self.inst.size[b]
            self.cross[s0 + 1:s1] += 1
            self.low[self.nbrs[b]] = low
            self.offset[b] = -1
            self.top[b] = -1

    def checkpoint(self) -> None:
        """Stop at the deadline or when the race is over; past `polite_after`, sleep twice as long
        as the search ran since the last checkpoint (most of the CPU for the CP-SAT threads)."""
        now = time.perf_counter()
        if now > self.deadline or (self.stop is not None and self.stop.is_set()):
            raise _Timeout
        if self.polite_after is not None and now > self.polite_after:
            if self.stop is not None and self.stop.wait(min(2 * (now - self.last_check), self.deadline - now)):
                raise _Timeout
            now = time.perf_counter()
        self.last_check = now

    # ---- search -------------------------------------------------------------------------------
    def solve(self) -> bool:
        comp = np.arange(self.inst.n, dtype=np.int64)
        return self.node(comp, int(self.first.min(initial=0)), int(self.last.max(initial=0)), 0)

    def node(self, comp: np.ndarray, lo: int, hi: int, floor: int) -> bool:
        """Place the unplaced buffers `comp` (their sections lie in [lo, hi)) at offsets >= floor;
        buffers marked in self.excluded may not go exactly at the floor."""
        if comp.size == 0:
            return True
        self.nodes += 1
        if self.nodes > self.budget:
            raise _Budget
        if not self.nodes & 127:
            self.checkpoint()
        opt = self.opt
        if opt.decomposition and comp.size > 1:
            parts = self.split(comp, lo, hi, floor)
            if parts is not None:
                mark = len(self.trail)
                for part, plo, phi in parts:
                    if not self.node(part, plo, phi, floor):
                        self.undo(mark)
                        return False
                return True
        key = None
        if opt.memo:
            lo, hi = int(self.first[comp].min()), int(self.last[comp].max())
            srt = np.sort(comp)
            resting = np.nonzero(self.top == floor)[0]  # what the twin rule looks at
            key = hashlib.blake2b(b"".join((self.config, srt.tobytes(), srt[self.excluded[srt]].tobytes(),
                                            resting.tobytes(), self.h[lo:hi].tobytes(),
                                            repr((lo, hi, floor)).encode())), digest_size=16).digest()
            if key in self.memo:
                return False
        found = self.branch(comp, lo, hi, floor)
        if not found and key is not None:
            self.memo.add(key)
        return found

    def branch(self, comp: np.ndarray, lo: int, hi: int, floor: int) -> bool:
        """Pick the bottom section with the fewest ways to fill it at the floor; branch on which
        buffer fills it, or (where its slack allows) on leaving it empty at this floor."""
        opt = self.opt
        low = self.low[comp]
        if self.aligned:
            a = self.align[comp]
            low = -(-low // a) * a
        at_floor = (low == floor) & ~self.excluded[comp]
        if opt.section_inference and not self.sections_fit(comp, lo, hi, floor, low, at_floor):
            return False
        if not at_floor.any():
            return self.rise(comp, lo, hi, floor, low)
        h, left = self.h[lo:hi], self.unplaced[lo:hi]
        bottom = (h <= floor) & (left > 0)
        slack = self.cap - floor - left
        cands = comp[at_floor]
        span = hi - lo + 1
        cover = np.cumsum(np.bincount(self.first[cands] - lo, minlength=span)
                          - np.bincount(self.last[cands] - lo, minlength=span))[:-1]
        if (bottom & (slack == 0) & (cover == 0)).any():
            return False  # a full section whose bottom nobody can fill
        if self.by_buffer:  # the first candidate in rank order: at the floor, or not
            first = int(cands[self.rank[cands].argmin()])
            return self.branch_buffer(comp, lo, hi, floor, first)
        choice = np.where(bottom & (cover > 0), (slack > 0) * (1 << 40) + cover * (1 << 20) + slack, 1 << 62)
        s = int(choice.argmin()) + lo
        here = cands[(self.first[cands] <= s) & (self.last[cands] > s)]
        here = here[np.argsort(self.rank[here], kind="stable")]
        mark = len(self.trail)
        tried: set[tuple[int, int, int, int]] = set()
        for b in here.tolist():
            if opt.symmetry and self.stacked_wrongly(b, floor, tried):
                continue
            self.place(b, floor)
            if self.node(comp[comp != b], lo, hi, floor):
                return True
            self.undo(mark)
        if slack[s - lo] > 0:  # or leave the bottom of section s empty at this floor
            self.excluded[here] = True
            found = self.node(comp, lo, hi, floor)
            self.excluded[here] = False
            return found
        return False

    def branch_buffer(self, comp: np.ndarray, lo: int, hi: int, floor: int, b: int) -> bool:
        inst = self.inst
        twins = [d for d in self.twins[b] if inst.size[d] == inst.size[b] and self.top[d] < 0]
        if not (self.opt.symmetry and self.stacked_wrongly(b, floor, set())):
            mark = len(self.trail)
            self.place(b, floor)
            if self.node(comp[comp != b], lo, hi, floor):
                return True
            self.undo(mark)
        out = [b] + [d for d in twins if not self.excluded[d]]  # a twin at the floor is the same story
        self.excluded[out] = True
        found = self.node(comp, lo, hi, floor)
        self.excluded[out] = False
        return found

    def stacked_wrongly(self, b: int, floor: int, tried: set[tuple[int, int, int, int]]) -> bool:
        """Buffers of one lifetime that touch can swap places: keep only the order with the smaller
        (sum of size^2 * offset, sum of (n - rank) * offset): the larger one below, among equals the
        lower rank below; of several identical buffers try only the first."""
        inst = self.inst
        twin = (inst.first[b], inst.last[b], inst.size[b], inst.align[b])
        if twin in tried:
            return True
        tried.add(twin)
        if inst.align[b] > 1:
            return False  # a swap could move the upper one off its alignment grid
        w, r = inst.size[b], self.rank[b]
        for d in self.twins[b]:
            if self.top[d] == floor and (inst.size[d] < w or (inst.size[d] == w and self.rank[d] > r)):
                return True
        return False

    def sections_fit(self, comp: np.ndarray, lo: int, hi: int, floor: int, low: np.ndarray,
                     at_floor: np.ndarray) -> bool:
        """In every section the unplaced units fit above the lowest offset that any of its unplaced
        buffers can still take (the floor for those that may go there, else above it)."""
        eff = self.eff
        eff.fill(_INF)
        lowest = np.maximum(low, floor + 1)
        lowest[at_floor] = floor
        eff[comp] = lowest
        a, b = self.inc_start[lo], self.inc_start[hi]
        starts = self.inc_start[lo:hi] - a
        lowest = np.minimum.reduceat(eff[self.inc_buffer[a:b]], np.minimum(starts, max(b - a - 1, 0)))
        left = self.unplaced[lo:hi]
        return not ((lowest + left > self.cap) & (left > 0)).any()

    def rise(self, comp: np.ndarray, lo: int, hi: int, floor: int, low: np.ndarray) -> bool:
        """Nothing more goes at this floor: move to the next offset some buffer can take."""
        higher = low > floor
        if not higher.any():
            return False  # the rest can only go at this floor, and may not
        new_floor = int(low[higher].min())
        if self.opt.dominance and (low + self.size[comp] <= new_floor).any():
            return False  # a buffer would fit under the new floor: a lower placement dominates
        if self.opt.section_inference:
            h, left = self.h[lo:hi], self.unplaced[lo:hi]
            below = left[h <= new_floor]
            if below.size and new_floor + int(below.max()) > self.cap:
                return False
        excluded = comp[self.excluded[comp]]
        self.excluded[excluded] = False
        found = self.node(comp, lo, hi, new_floor)
        self.excluded[excluded] = True
        return found

    def split(self, comp: np.ndarray, lo: int, hi: int, floor: int) -> list | None:
        """The independent time ranges of `comp`, most constrained first; None if just one."""
        cuts = np.nonzero(self.cross[lo + 1:hi] == 0)[0]
        if cuts.size == 0:
            return None
        piece = np.searchsorted(cuts + lo + 1, self.first[comp], side="right")
        if piece.min() == piece.max():
            return None
        order = np.argsort(piece, kind="stable")
        groups = np.split(comp[order], np.nonzero(np.diff(piece[order]))[0] + 1)
        parts = []
        for g in groups:
            plo, phi = int(self.first[g].min()), int(self.last[g].max())
            slack = self.cap - np.maximum(self.h[plo:phi], floor) - self.unplaced[plo:phi]
            parts.append((int(slack.min()), -g.size, plo, g, phi))
        parts.sort(key=lambda p: p[:3])
        return [(g, plo, phi) for _, _, plo, g, phi in parts]


def _ramp(spans: np.ndarray) -> np.ndarray:
    """0, 1, ..., k-1 for each k in spans, concatenated."""
    ends = np.cumsum(spans)
    return np.arange(ends[-1] if len(ends) else 0) - np.repeat(ends - spans, spans)


def orders(inst: Instance) -> list[np.ndarray]:
    """Buffer ranks for choosing among the buffers that fill one section: widest lifetime first,
    largest first, largest area first, earliest start first."""
    t = np.asarray(inst.times, dtype=np.int64)
    span = t[np.asarray(inst.last)] - t[np.asarray(inst.first)]
    size = np.asarray(inst.size, dtype=np.int64)
    keys = [(-span, -size), (-size, -span), (-size * span, -size), (np.asarray(inst.first), -size)]
    return [_rank(np.lexsort((np.arange(inst.n), minor, major))) for major, minor in keys]


def _rank(order: np.ndarray) -> np.ndarray:
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


def decide(inst: Instance, cap: int, deadline: float, options: Options, stop: threading.Event | None = None,
           polite_after: float | None = None) -> tuple[str, list[int] | None, int]:
    """Fit into `cap` units: ("feasible", offsets), ("infeasible", None) or ("unknown", None); and nodes.
    With several orders: runs of growing node budgets, first the plain orders, then jittered ones."""
    if inst.lower_bound() > cap:
        return "infeasible", None, 0
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20 * inst.n + 1000))
    ranks = orders(inst) if options.several_orders else orders(inst)[:1]
    # each run: (rank, branch by buffer?); the two branchings solve different instances
    base = [(r, False) for r in ranks] + ([(r, True) for r in ranks] if options.several_orders else [])
    rng = np.random.default_rng(0)
    memo: set[bytes] = set()
    budget = float(max(1000, 3 * inst.n)) if options.several_orders else float("inf")  # ~3 nodes a buffer
    nodes, run = 0, 0
    while True:
        rank, by_buffer = base[run % len(base)]
        if run >= 2 * len(base) and (run // len(base)) % 2:  # odd later rounds: orders shuffled locally
            rank = _rank(np.argsort(rank + rng.normal(0.0, 0.05 * inst.n, inst.n), kind="stable"))
        search = _Search(inst, cap, options, deadline, rank, budget, memo, stop, by_buffer)
        search.polite_after = polite_after
        try:
            found = search.solve()
        except _Budget:
            nodes += search.nodes
            run += 1
            if run % len(base) == 0:
                budget *= 2
            continue
        except _Timeout:
            return "unknown", None, nodes + search.nodes
        nodes += search.nodes
        return ("feasible", list(search.offset), nodes) if found else ("infeasible", None, nodes)


def run(inst: Instance, cap: int | None, deadline: float, options: Options, incumbent: Outcome,
        stop: threading.Event | None = None, polite_after: float | None = None) -> Outcome:
    """Decide a capacity, or (cap None) minimise the arena by probes below the incumbent.
    `stop` ends the search early; past `polite_after` it uses a third of the CPU (see checkpoint)."""
    if cap is not None:
        status, offsets, _ = decide(inst, cap, deadline, options, stop, polite_after)
        if status == "infeasible":
            return Outcome(None, "infeasible", cap + 1, "exact")
        return outcome(inst, offsets, cap, "exact")
    return minimise(inst, deadline, options, incumbent, stop, polite_after)


def minimise(inst: Instance, deadline: float, options: Options, incumbent: Outcome,
             stop: threading.Event | None = None, polite_after: float | None = None) -> Outcome:
    """Probe capacities between the proven bound and the best arena: the bound itself first (often
    the answer), then bisection. A probe that runs out of its time share moves the search up
    without raising the proven bound."""
    best = incumbent
    proven = max(inst.lower_bound(), incumbent.bound)
    lo, hi = proven, incumbent.arena if incumbent.offsets is not None else sum(inst.size)
    first = True
    while lo < hi and time.perf_counter() < deadline and not (stop and stop.is_set()):
        mid = lo if first else (lo + hi) // 2
        first = False
        probes = max(1, (hi - lo).bit_length()) * (3 if mid == proven else 1)  # the bound: a short look
        share = time.perf_counter() + (deadline - time.perf_counter()) / probes
        status, offsets, _ = decide(inst, mid, min(deadline, share), options, stop, polite_after)
        if status == "feasible":
            best = better(best, outcome(inst, offsets, None, "exact"))
            hi = best.arena
        else:
            lo = mid + 1
            if status == "infeasible":
                proven = max(proven, lo)
    if best.offsets is not None and proven >= best.arena:
        return Outcome(best.offsets, "optimal", best.arena, best.method, best.arena)
    return Outcome(best.offsets, best.status, max(proven, best.bound), best.method, best.arena)

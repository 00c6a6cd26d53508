"""Per-unit tables of the vectorised schedule search (formulations/schedule_vec.py).

A unit (schedule_dp: a fixed sequence of non-lazy ops, each with its lazy ops before it) run from a
down-set S of units changes resident bytes by (dpeak, dmem) that depend on S only through a few
predicates of Problem.step:
  - is a lazy op of the unit already done (another owner ran it),
  - has a graph input been read already (it is loaded by its first reader),
  - does a tensor that an op of the unit reads die at that op (every other reader done).
Each predicate is an AND over terms "some unit of this mask is in S" (an op is done when a unit
that runs it is in S). Predicates that are constant wherever the unit is ready (ops of ancestor
units are done, ops only descendants run are not) are dropped; the rest give each state a code, and
(dpeak, dmem) is evaluated once per code by Problem.step on the done set of a state that has it, so
equal codes give Problem.step's numbers by construction (tests compare them on random states).

The tables also hold what the search rules need: predecessor and successor masks as 64-bit words,
Zobrist keys, the commit sequences P + c (schedule_vec), and for the defer rule the units that
touch a unit's tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np

from formulations.schedule_dp import Problem, bits, unit_dag

ALWAYS = -1  # a done mask: the op is done in every state where the unit can run
DENSE_BITS = 12  # units with at most this many predicate bits keep a dense table of deltas
UNSET = np.iinfo(np.int64).min


def words(mask: int, width: int) -> tuple[tuple[int, np.uint64], ...]:
    """A unit bit-set as its nonzero (word, mask) pairs."""
    return tuple((w, np.uint64((mask >> (64 * w)) & (2**64 - 1))) for w in range(width)
                 if (mask >> (64 * w)) & (2**64 - 1))


def column(state: int, width: int) -> np.ndarray:
    """A unit bit-set as one (width, 1) uint64 column (the vector engine's layout of a state)."""
    return np.array([[(state >> (64 * w)) & (2**64 - 1)] for w in range(width)], np.uint64)


def closure(preds: list[int]) -> list[int]:
    """Transitive closure of a DAG given as predecessor bit-sets."""
    out: list[int | None] = [None] * len(preds)
    for u in range(len(preds)):
        stack = [u]
        while stack:
            x = stack[-1]
            todo = [p for p in bits(preds[x]) if out[p] is None]
            if todo:
                stack.extend(todo)
                continue
            stack.pop()
            if out[x] is None:
                acc = preds[x]
                for p in bits(preds[x]):
                    acc |= out[p]
                out[x] = acc
    return out


class UnitTables:
    """Everything the vector engine needs about `units` run after the ops in `start`, compiled once."""

    def __init__(self, prob: Problem, units: Sequence[Sequence[int]], start: int) -> None:
        self.prob, self.units, self.start = prob, [tuple(u) for u in units], start
        self.m = m = len(units)
        self.width = max(1, (m + 63) // 64)
        upred, usucc, _ = unit_dag(prob, units)
        # commit needs monotone in-place savings only: a lazy op run early with a committed unit adds
        # its output to the unit's mem change, which the rule requires <= 0, so schedule_dp's extra
        # condition on other owners is not needed here (it blocked every mul of a weighted sum)
        self.commit = [prob.monotone] * m
        self.pred_words = [words(p, self.width) for p in upred]
        self.succ_words = [words(sum(1 << v for v in usucc[u]), self.width) for u in range(m)]
        # run[v]: ops unit v runs (its lazy ops included); done_by[o]: units after which op o is done
        self.run = [sum(1 << o for x in u for o in (*prob.pending[x], x)) for u in units]
        self.done_by: dict[int, int] = {}
        for v, ops in enumerate(self.run):
            for o in bits(ops):
                self.done_by[o] = self.done_by.get(o, 0) | (1 << v)
        self.below = closure(upred)
        self.above = closure([sum(1 << v for v in usucc[u]) for u in range(m)])
        self.tests = [self._predicates(u) for u in range(m)]  # per unit, per code bit: (AND mask, OR masks)
        self.dense: dict[int, np.ndarray] = {}  # unit -> (2, 2^bits) dpeak, dmem by code (UNSET: unseen)
        self.sparse: dict[int, dict[tuple[int, ...], tuple[int, int]]] = {}  # units with more bits
        self.set_commits = self._set_commits(upred)
        self.near, self.deferrable = self._neighbours(usucc)
        self.small = None  # schedule_guide.SmallBuffers when these are a relaxation's tables (a guide's)
        rng = np.random.default_rng(5)  # Zobrist keys: a set's key is the xor of its units' keys
        self.zobrist = rng.integers(1, 2**63, m, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)

    # ---- structure ------------------------------------------------------------------
    def _set_commits(self, upred: list[int]) -> list[tuple[tuple[int, ...], tuple, tuple]]:
        """Sequences P + (c,): c's missing predecessors P (one or two, each ready) then c, with the
        (word, mask) pairs that must be in S (c's other predecessors, P's predecessors) and out of it (P)."""
        found = []
        for c in range(self.m):
            preds = list(bits(upred[c]))
            if not self.commit[c] or not preds or len(preds) > 3:
                continue
            for k in (1, 2):
                for missing in combinations(preds, k):
                    if not all(self.commit[p] for p in missing):
                        continue
                    absent = sum(1 << p for p in missing)
                    need = upred[c] & ~absent
                    for p in missing:
                        need |= upred[p]
                    if need & absent:  # one missing predecessor needs the other: not both ready
                        continue
                    found.append(((*missing, c), words(need, self.width), words(absent, self.width)))
        return found

    def _neighbours(self, usucc: list[set[int]]) -> tuple[np.ndarray, np.ndarray]:
        """near[u, v]: v succeeds u, or runs an op that reads or writes a tensor u reads or writes,
        except the other readers of u's in-place input when u is one op taking over an input of its
        one output's size (passing them only moves that input's death to u, whose output it becomes:
        no step rises); deferrable[u]: u has a successor (a later place for u exists)."""
        prob, m = self.prob, self.m
        touched: dict[int, int] = {}  # root -> units that read it or write it
        uses: list[set[int]] = [set() for _ in range(m)]  # roots each unit reads or writes
        for v in range(m):
            for o in bits(self.run[v]):
                for r, _, _ in prob.effects[o].reads:
                    touched[r] = touched.get(r, 0) | (1 << v)
                    uses[v].add(r)
        for t, _, _, prod in prob.roots:
            if prod is not None and prod in self.done_by:
                touched[t] = touched.get(t, 0) | self.done_by[prod]
                for v in bits(self.done_by[prod]):
                    uses[v].add(t)
        near = np.zeros((m + 1, m), bool)  # row m: no constraint (every unit allowed)
        near[m] = True
        for u in range(m):
            near[u, list(usucc[u])] = True
            for r in uses[u] - {self._taken_over(u)}:
                near[u, [v for v in bits(touched[r]) if v != u]] = True
        deferrable = np.array([bool(usucc[u]) for u in range(m)], bool)
        return near, deferrable

    def _taken_over(self, u: int) -> int | None:
        """The input root that unit u takes over in place, when u is one op with one output of the
        same size as that (its only) in-place input; else None."""
        if len(self.units[u]) != 1:
            return None
        x = self.units[u][0]
        e = self.prob.effects[x]
        if len(e.out_sizes) != 1 or len(e.donors) != 1 or e.donors[0][1] != e.out_sizes[0]:
            return None
        t = e.donors[0][0]
        if any(r == t for o in self.prob.pending[x] for r, _, _ in self.prob.effects[o].reads):
            return None  # a lazy op of u reads it too
        return t

    def _done_mask(self, u: int, op: int) -> int:
        """When `op` is done as u becomes ready: ALWAYS, 0 (never), or the units of which one is in S."""
        if (self.start >> op) & 1:
            return ALWAYS
        by = self.done_by.get(op, 0)
        if by & self.below[u]:
            return ALWAYS
        return by & ~self.above[u] & ~(1 << u)

    def _predicates(self, u: int) -> list[tuple[tuple, tuple]]:
        """The varying predicates of unit u's steps, each as (AND words, OR-mask words)."""
        prob, found = self.prob, {}
        seq = [o for x in self.units[u] for o in (*prob.pending[x], x)]
        before = 0
        for o in seq:
            preds: list[list[int]] = []  # each predicate: AND over terms, a term = OR over a unit mask
            if o not in self.units[u]:  # a lazy op of u: skipped when another owner ran it
                preds.append([self._done_mask(u, o)])
            e = prob.effects[o]
            for _, users in e.src_reads:  # a graph input is loaded by its first reader
                if not users & before:
                    union = 0
                    for q in bits(users & ~before & ~(1 << o)):
                        union |= self._done_mask(u, q)  # ALWAYS (-1) absorbs the rest
                    preds.append([union])
            upto = before | (1 << o)
            for _, _, users in (*e.reads, *e.donors):  # dies at o: every other reader done
                preds.append([self._done_mask(u, q) for q in bits(users & ~upto)])
            for terms in preds:
                if 0 not in terms:
                    masks = tuple(sorted({x for x in terms if x != ALWAYS}))
                    if masks:
                        found[masks] = None
            before = upto
        tests = []
        for masks in found:
            single = sum(x for x in masks if not x & (x - 1))
            tests.append((words(single, self.width), tuple(words(x, self.width) for x in masks if x & (x - 1))))
        return tests

    # ---- steps -------------------------------------------------------------------------
    def done_of(self, state: int) -> int:
        """The op set done after the units of `state` (a unit bit-set)."""
        done = self.start
        for v in bits(state):
            done |= self.run[v]
        return done

    def delta(self, u: int, done: int) -> tuple[int, int]:
        """(peak - mem before, mem after - mem before) of running unit u after the ops `done`."""
        step, pending, peak, mem = self.prob.step, self.prob.pending, None, 0
        for x in self.units[u]:
            for o in (*pending[x], x):
                if o == x or not (done >> o) & 1:
                    s, mem = step(done, mem, o)
                    done |= 1 << o
                    peak = s if peak is None else max(peak, s)
        return peak, mem

    def codes(self, u: int, states: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Predicate bits of unit u at the states `idx` of `states` (W, n): (n, ceil(bits / 63)) int64."""
        tests = self.tests[u]
        out = np.zeros((idx.size, max(1, (len(tests) + 62) // 63)), np.int64)
        cols: dict[int, np.ndarray] = {}

        def col(w: int) -> np.ndarray:
            got = cols.get(w)
            if got is None:
                got = cols[w] = states[w, idx]
            return got

        for j, (every, anys) in enumerate(tests):
            bit = None
            for w, msk in every:
                t = (col(w) & msk) == msk
                bit = t if bit is None else bit & t
            for term in anys:
                hit = None
                for w, msk in term:
                    t = (col(w) & msk) != 0
                    hit = t if hit is None else hit | t
                bit = hit if bit is None else bit & hit
            out[:, j // 63] |= bit.astype(np.int64) << (j % 63)
        return out

    def deltas(self, u: int, states: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """dpeak and dmem of running u from the states `idx` of `states` (W, n). u's own bit is
        ignored: a state holding u gives the deltas of running u last (the backward search)."""
        nbits = len(self.tests[u])
        if nbits <= DENSE_BITS:
            code = self.codes(u, states, idx)[:, 0] if nbits else np.zeros(idx.size, np.int64)
            dense = self.dense.get(u)
            if dense is None:
                dense = self.dense[u] = np.full((2, 1 << nbits), UNSET, np.int64)
            missing = dense[0, code] == UNSET
            if missing.any():
                seen, first = np.unique(code[missing], return_index=True)
                for c, at in zip(seen.tolist(), idx[np.flatnonzero(missing)[first]].tolist()):
                    dense[:, c] = self._delta_at(u, states, at)
            return dense[0, code], dense[1, code]
        codes = self.codes(u, states, idx)
        uniq, first, inverse = np.unique(codes, axis=0, return_index=True, return_inverse=True)
        table = self.sparse.setdefault(u, {})
        got = np.empty((2, len(uniq)), np.int64)
        for i, row in enumerate(uniq.tolist()):
            hit = table.get(tuple(row))
            if hit is None:
                hit = table[tuple(row)] = self._delta_at(u, states, int(idx[first[i]]))
            got[:, i] = hit
        inverse = inverse.reshape(-1)
        return got[0, inverse], got[1, inverse]

    def _delta_at(self, u: int, states: np.ndarray, at: int) -> tuple[int, int]:
        """Problem.step's deltas of u at the state in column `at` (a code seen for the first time)."""
        row = sum(int(states[w, at]) << (64 * w) for w in range(states.shape[0])) & ~(1 << u)
        return self.delta(u, self.done_of(row))

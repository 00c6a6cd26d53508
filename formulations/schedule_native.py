"""The C kernel of the vectorised schedule search (formulations/schedule_native.c).

schedule_vec.search and schedule_guide.coreachable call `forward` and `backward` here when the kernel
is available: the same states, rules and answers, one state at a time in C instead of numpy columns
(a RandWire-ER stage: 19.4M states in 17.8 s on two threads, numpy about 0.25M a second). The kernel is
compiled on first use with the system's C compiler into ~/.cache/memplan/native (named by the
source's hash, written atomically); without a compiler, or when a unit has more than MAX_BITS
predicate bits, callers keep the numpy path. Unit steps are filled lazily: the kernel calls back into
Python (UnitTables.delta, Problem.step's numbers) for a predicate code it has not seen.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from formulations.schedule_dp import INF, Problem, SearchResult
from formulations.schedule_units import UnitTables, words

SOURCE = Path(__file__).with_name("schedule_native.c")
CACHE = Path.home() / ".cache" / "memplan" / "native"
MAX_BITS = 16  # predicate bits per unit the kernel keeps a dense table for
UNSET = np.iinfo(np.int64).min
STATUS = ("optimal", "no_better", "gave_up")
FILL = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int32, ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_int64))

enabled = True  # False: callers take the numpy path (tests run both)
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet


class _Tables(ctypes.Structure):
    _fields_ = [("m", ctypes.c_int32), ("W", ctypes.c_int32),
                *((name, ctypes.c_void_p) for name in (
                    "pred", "succ", "zob", "succ_start", "succ_list", "pred_start", "pred_list", "commit",
                    "deferrable", "near", "test_start", "test_and", "term_start",
                    "term_or", "dense_off", "dense", "sc_start", "sc_seq", "sc_need", "sc_absent", "sm_size",
                    "sm_always", "sm_single", "sm_done", "sm_wit", "wit_a", "wit_b", "wit_bmask", "ukey", "gtable")),
                ("gshift", ctypes.c_uint64), ("fill", FILL),
                ("set_commit", ctypes.c_int32), ("defer", ctypes.c_int32), ("commit_rule", ctypes.c_int32),
                ("sm_n", ctypes.c_int32), ("sm_large", ctypes.c_int64)]


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None when no C compiler builds it (then the numpy path runs)."""
    global _lib
    if _lib is not False:
        return _lib
    _lib = None
    source = SOURCE.read_bytes()
    target = CACHE / f"schedule_native-{hashlib.sha256(source).hexdigest()[:16]}.so"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not target.exists() and compiler:
        tmp = None
        try:  # an unwritable cache or a failing compiler leaves the numpy path
            CACHE.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=CACHE)
            os.close(fd)
            done = subprocess.run([compiler, "-O3", "-shared", "-fPIC", "-pthread", "-o", tmp, str(SOURCE)],
                                  capture_output=True, timeout=120)
            if done.returncode == 0:
                os.replace(tmp, target)
        except (OSError, subprocess.SubprocessError):
            pass
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    if target.exists():
        lib = ctypes.CDLL(str(target))
        lib.forward.restype = ctypes.c_int
        lib.forward.argtypes = [ctypes.POINTER(_Tables), ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                ctypes.c_int64, ctypes.c_double, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64),
                                ctypes.POINTER(ctypes.c_int64)]
        lib.backward.restype = ctypes.c_int64
        lib.backward.argtypes = [ctypes.POINTER(_Tables), ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                 ctypes.c_double, ctypes.c_void_p, ctypes.c_void_p]
        lib.bloom.restype = None
        lib.bloom.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                              ctypes.c_uint64]
        lib.high_table.restype = None
        lib.high_table.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                   ctypes.c_int64, ctypes.c_uint64]
        lib.high_lookup.restype = None
        lib.high_lookup.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p,
                                    ctypes.c_int64, ctypes.c_void_p]
        _lib = lib
    return _lib


def _rows(pairs_list, width: int) -> np.ndarray:
    """Unit bit-sets given as (word, mask) pairs, as (len, width) uint64 rows."""
    out = np.zeros((max(1, len(pairs_list)), width), np.uint64)
    for i, pairs in enumerate(pairs_list):
        for w, msk in pairs:
            out[i, w] |= np.uint64(msk)
    return out


def _masks(masks: list[int], width: int) -> np.ndarray:
    """Unit bit-sets given as ints, as (len, width) uint64 rows."""
    return _rows([words(mask, width) for mask in masks], width)


class Kernel:
    """A UnitTables compiled for the kernel (cached on it: `Kernel.of(tab)`), with its step tables."""

    def __init__(self, tab: UnitTables) -> None:
        m, width = tab.m, tab.width
        self.tab = tab
        self.keep: list = []  # arrays the struct points into
        nbits = [len(t) for t in tab.tests]
        preds = [p for t in tab.tests for p in t]
        test_start = np.cumsum([0, *nbits]).astype(np.int32)
        terms = [term for _, anys in preds for term in anys]
        term_start = np.cumsum([0, *(len(anys) for _, anys in preds)]).astype(np.int32)
        dense_off = np.cumsum([0, *(2 << b for b in nbits)])[:-1].astype(np.int64)
        self.dense = np.full(int(sum(2 << b for b in nbits)), UNSET, np.int64)
        order = sorted(range(len(tab.set_commits)), key=lambda c: tab.set_commits[c][0][0])
        commits = [tab.set_commits[c] for c in order]
        sc_start = np.searchsorted([c[0][0] for c in commits], np.arange(m + 1), side="left").astype(np.int32)
        sc_seq = np.full((max(1, len(commits)), 3), -1, np.int16)
        for i, (seq, _, _) in enumerate(commits):
            sc_seq[i, :len(seq)] = seq
        self.fill = FILL(self._fill)
        succ, pred = ([[64 * w + b for w, msk in pairs for b in range(64) if int(msk) >> b & 1] for pairs in rows]
                      for rows in (tab.succ_words, tab.pred_words))
        self.struct = _Tables(
            m, width,
            *(self._ptr(a) for a in (
                _rows(tab.pred_words, width), _rows(tab.succ_words, width), tab.zobrist,
                np.cumsum([0, *(len(v) for v in succ)]).astype(np.int32),
                np.array([x for v in succ for x in v] or [0], np.int16),
                np.cumsum([0, *(len(v) for v in pred)]).astype(np.int32),
                np.array([x for v in pred for x in v] or [0], np.int16),
                np.array(tab.commit, np.uint8), tab.deferrable.astype(np.uint8), tab.near.astype(np.uint8),
                test_start, _rows([every for every, _ in preds], width), term_start, _rows(terms, width),
                dense_off, self.dense, sc_start, sc_seq, _rows([c[1] for c in commits], width),
                _rows([c[2] for c in commits], width),
                *self._small(tab, width))),
            None, None, 0, self.fill, 1, 1, 1,
            len(tab.small.sizes) if tab.small is not None else 0, tab.small.large if tab.small is not None else 0)
        self.fits = max(nbits, default=0) <= MAX_BITS and m < 2**15

    @classmethod
    def of(cls, tab: UnitTables) -> Kernel | None:
        """The kernel for `tab` (built once), or None when the kernel is unavailable or does not fit."""
        if not enabled or library() is None:
            return None
        got = getattr(tab, "_kernel", None)
        if got is None:
            got = tab._kernel = cls(tab)
        return got if got.fits else None

    @staticmethod
    def _small(tab: UnitTables, width: int) -> tuple[np.ndarray, ...]:
        """The arrays of a guide's schedule_guide.SmallBuffers (empty ones when there is none)."""
        small = tab.small
        single = np.array([len(u) == 1 for u in tab.units] or [False], np.uint8)
        if small is None:
            return (np.zeros(1, np.int64), np.zeros(1, np.uint8), single, np.zeros((1, width), np.uint64),
                    np.zeros(1, np.int32), np.zeros((1, width), np.uint64), np.zeros(1, np.int32),
                    np.zeros((1, width), np.uint64))
        wits = [w for found in small.witnesses for w in found]
        return (np.array(small.sizes, np.int64), np.array([d is None for d in small.done], np.uint8), single,
                _masks([d or 0 for d in small.done], width),
                np.cumsum([0, *(len(found) for found in small.witnesses)]).astype(np.int32),
                _masks([a for a, _ in wits], width),
                np.cumsum([0, *(len(bs or ()) for _, bs in wits)]).astype(np.int32),
                _masks([b for _, bs in wits for b in bs or ()], width))

    def _ptr(self, a: np.ndarray) -> int:
        a = np.ascontiguousarray(a)
        self.keep.append(a)
        return a.ctypes.data

    def _fill(self, u: int, words, out) -> int:
        """The kernel's call back: UnitTables.delta of unit u at the set `words` (u's own bit ignored)."""
        try:
            tab = self.tab
            row = sum(int(words[w]) << (64 * w) for w in range(tab.width)) & ~(1 << u)
            out[0], out[1] = tab.delta(u, tab.done_of(row))
            return 1
        except Exception:  # noqa: BLE001 - a C caller cannot take a Python exception: report failure
            return 0

    def configure(self, rules, guide) -> None:
        s = self.struct
        s.commit_rule, s.set_commit, s.defer = int(rules.commit), int(rules.set_commit), int(rules.defer)
        if guide is None:
            s.ukey = s.gtable = None
            s.gshift = 0
        else:
            self._guide = (np.ascontiguousarray(guide.unit_keys, np.uint64), guide.table)
            s.ukey, s.gtable = self._guide[0].ctypes.data, self._guide[1].ctypes.data
            s.gshift = int(guide.shift)


def _seconds(deadline: float) -> float:
    return 1e9 if deadline == INF else max(0.0, deadline - time.perf_counter())


def forward(kernel: Kernel, prob: Problem, start: int, *, budget: float, floor: int, state_cap: int,
            deadline: float, guide, rules) -> SearchResult:
    """schedule_vec.search on the kernel."""
    t0 = time.perf_counter()
    tab = kernel.tab
    kernel.configure(rules, guide)
    limit = np.iinfo(np.int64).max if budget == INF else int(budget)
    order = np.zeros(max(1, tab.m), np.int16)
    best, stored = ctypes.c_int64(0), ctypes.c_int64(0)
    status = library().forward(ctypes.byref(kernel.struct), limit, int(floor), int(prob.mem(start)), int(state_cap),
                               _seconds(deadline), order.ctypes.data, ctypes.byref(best), ctypes.byref(stored))
    if status > 2:
        raise RuntimeError("schedule kernel failed (out of memory or a step table error)")
    seconds = time.perf_counter() - t0
    if STATUS[status] != "optimal":
        return SearchResult(None, INF, STATUS[status], stored.value, seconds)
    ops = prob.with_pending([op for u in order[:tab.m].tolist() for op in tab.units[u]])
    return SearchResult(tuple(o for o in ops if not (start >> o) & 1), best.value, "optimal", stored.value, seconds)


def backward(kernel: Kernel, budget: int, *, deadline: float, state_cap: int) -> \
        tuple[np.ndarray | None, np.ndarray | None, int]:
    """schedule_guide.coreachable on the kernel: (keys, highs, stored), None past the deadline or the cap."""
    tab = kernel.tab
    kernel.configure(_NO_RULES, None)
    full = (1 << tab.m) - 1
    keys = np.empty(state_cap + 1, np.uint64)
    highs = np.empty(state_cap + 1, np.int64)
    got = library().backward(ctypes.byref(kernel.struct), int(budget), int(tab.prob.mem(tab.done_of(full))),
                             int(state_cap), _seconds(deadline), keys.ctypes.data, highs.ctypes.data)
    if got == -3:
        raise RuntimeError("schedule kernel failed (out of memory or a step table error)")
    if got < 0:
        return None, None, state_cap
    return keys[:got].copy(), highs[:got].copy(), int(got)


def bloom(keys: np.ndarray, highs: np.ndarray, below: int, table: np.ndarray, shift: np.uint64) -> bool:
    """Set bit key >> shift of `table` for each key whose high is under `below` (schedule_guide.Guide.of);
    False without the kernel (the caller sets them with numpy)."""
    if not enabled or library() is None:
        return False
    keys, highs = np.ascontiguousarray(keys, np.uint64), np.ascontiguousarray(highs, np.int64)
    library().bloom(keys.ctypes.data, highs.ctypes.data, keys.size, int(below), table.ctypes.data, int(shift))
    return True


class HighTable:
    """The keys and highs of a backward search in an open-addressing table in C (high_table in the
    kernel), for schedule_guide.RelaxedGuides.highs_of: 8 bytes a slot, at least twice the keys."""

    def __init__(self, keys: np.ndarray, highs: np.ndarray, budget: int) -> None:
        bits = max(12, (2 * keys.size).bit_length())
        self.slots, self.shift, self.base = 1 << bits, np.uint64(64 - bits), budget - (2**32 - 1)
        self.table = np.zeros(self.slots, np.uint64)
        keys, highs = np.ascontiguousarray(keys, np.uint64), np.ascontiguousarray(highs, np.int64)
        library().high_table(keys.ctypes.data, highs.ctypes.data, keys.size, self.base, self.table.ctypes.data,
                             self.slots, int(self.shift))

    @classmethod
    def of(cls, keys: np.ndarray, highs: np.ndarray, budget: int) -> HighTable | None:
        """The table (highs at or above budget - 2^32 + 1 exact, lower ones reported as that), None
        without the kernel."""
        return cls(keys, highs, budget) if enabled and library() is not None else None

    def __call__(self, keys: np.ndarray) -> np.ndarray:
        keys = np.ascontiguousarray(keys, np.uint64)
        out = np.empty(keys.size, np.int64)
        library().high_lookup(self.table.ctypes.data, self.slots, int(self.shift), self.base, keys.ctypes.data,
                              keys.size, out.ctypes.data)
        return out


class _NoRules:
    commit = set_commit = defer = False


_NO_RULES = _NoRules()

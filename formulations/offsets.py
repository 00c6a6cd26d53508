"""Buffer placement (dynamic storage allocation): an offset for every buffer of fixed lifetime.

Model. Buffer i lives over the half-open time range [s_i, e_i), needs w_i bytes and an offset
x_i that is a multiple of its alignment a_i. Two buffers whose lifetimes intersect must not
share a byte:  x_i + w_i <= x_j  or  x_j + w_j <= x_i.  Either fit a capacity C
(x_i + w_i <= C for all i, or prove that no placement does) or minimise the arena
max_i (x_i + w_i). Lower bound: the peak live bytes L = max_t sum_{i live at t} w_i.

Solver units. Sizes and alignments are divided by their greatest common divisor (1024 on the
MiniMalloc suite) and times are replaced by section numbers (a section is a maximal time range
in which the live set does not change; S <= 2n - 1). Nothing is lost: in a solution pushed
down as far as it goes every offset is a sum of sizes and alignment round-ups.

Methods (`solve(method=...)`):
  greedy_size  TFLite: largest first, each at the lowest offset free over its lifetime
  first_fit    by start time, lowest free offset
  best_fit     XLA heap-simulator style: by start time, the tightest free gap that fits
  improve      greedy in several orders, then a local repair of the buffers at the top (<= 2 s)
  exact        branch and bound in the spirit of MiniMalloc (offsets_exact.py)
  cpsat        OR-Tools CP-SAT with NoOverlap2D (offsets_solvers.py)
  milp         PuLP/CBC with one order binary per overlapping pair (offsets_solvers.py)
  auto         heuristics; done if they fit (or reach the bound); else exact search raced
               against CP-SAT runs in threads (offsets_auto.py)
Size: n buffers, S sections, P overlapping pairs (P binaries in the MILP, none elsewhere).
Omits: MiniMalloc's `gaps` (a buffer read with gaps is treated as live throughout: safe,
possibly larger) and fixed offsets (an `offset` column is read as a hint).

Every placement is checked by planner.check.placement_violation before it is returned.
"""

from __future__ import annotations

import csv
import io
import math
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from planner.check import Placement as CheckedItem
from planner.check import placement_violation
from planner.plan import write_atomic
from planner.target import align_up

METHODS = ("auto", "greedy_size", "first_fit", "best_fit", "improve", "exact", "cpsat", "milp")
STATUSES = ("optimal", "feasible", "infeasible", "unknown")
IMPROVE_SECONDS = 2.0  # the `improve` method's own time cap


class OffsetsInputError(ValueError):
    """Requests or a CSV file that cannot be placed as given; the message names the culprit."""


@dataclass(frozen=True, slots=True)
class Request:
    id: str  # unique name
    start: int  # first time step it is live
    end: int  # first time step it is dead again: the lifetime is [start, end)
    size: int  # bytes
    alignment: int = 1  # its offset must be a multiple of this (besides the global alignment)
    hint: int | None = None  # a suggested offset (warm start), not binding


@dataclass(frozen=True)
class Placement:
    offsets: dict[str, int]  # request id -> byte offset (empty unless a placement was found)
    arena: int  # max(offset + size); 0 without a placement
    lower_bound: int  # proven lower bound on the arena, in bytes
    status: str  # "optimal" | "feasible" | "infeasible" | "unknown"
    method: str  # which method produced the placement (or the verdict)
    seconds: float  # wall seconds spent in solve()
    gap: float | None  # (arena - lower_bound) / arena; None without a placement


@dataclass(frozen=True, slots=True)
class Options:
    """One switch per search technique, so that an ablation is one flag."""

    section_inference: bool = True  # exact: each section's unplaced units must fit above its floor
    dominance: bool = True  # exact: never leave room under the floor for a buffer still to place
    symmetry: bool = True  # exact: touching buffers of one lifetime keep one order; twins tried once
    decomposition: bool = True  # exact: split into independent time ranges and solve them apart
    several_orders: bool = True  # exact: restarts with other buffer orders, node budgets doubling
    memo: bool = True  # exact: remember failed subproblems (pays off across restarts)
    improve: bool = True  # auto: local repair after the greedy placements
    race: bool = True  # auto: CP-SAT in threads alongside exact search (else: exact, then CP-SAT)
    exact_alone: float = 2.0  # auto: seconds of full CPU for exact search in the race, then a third
    cpsat_orders: tuple[str, ...] = ("start", "widest")  # auto: one CP-SAT run per buffer order
    early_share: float = 0.4  # auto: CP-SAT runs but the last stop at this share of the time left
    bound_share: float = 0.3  # auto, minimising: share of the time left for the race at the lower bound
    cpsat_strategy: bool = True  # cpsat: lowest offset first, in the given buffer order
    cpsat_fixed: bool = False  # cpsat: only that strategy (FIXED_SEARCH) instead of mixing in its own
    cpsat_workers: int = 1  # cpsat: search workers per run


class Stop:
    """Tells racing methods to give up: an event for the exact search, stop_search for CP-SAT."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._solvers: list = []
        self._lock = threading.Lock()

    def attach(self, solver: object) -> bool:
        """Register a CP-SAT solver; False if the race is already over."""
        with self._lock:
            if self.event.is_set():
                return False
            self._solvers.append(solver)
            return True

    def set(self) -> None:
        with self._lock:
            self.event.set()
            for solver in self._solvers:
                solver.stop_search()


@dataclass(frozen=True)
class Instance:
    """Requests in solver units: only buffers that occupy space, times as section numbers."""

    ids: tuple[str, ...]  # request ids of the buffers placed by the methods
    first: tuple[int, ...]  # first section the buffer is live in
    last: tuple[int, ...]  # one past its last section
    size: tuple[int, ...]  # size in units
    align: tuple[int, ...]  # offset alignment in units
    hint: tuple[int | None, ...]  # offset hint in units, None where absent or not on the unit grid
    live: tuple[int, ...]  # units live in each section
    overlaps: tuple[tuple[int, ...], ...]  # per buffer: the buffers whose lifetimes intersect it
    unit: int  # bytes per unit
    times: tuple[int, ...] = field(default=(), repr=False)  # section boundaries in request time

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def peak(self) -> int:
        return max(self.live, default=0)

    def lower_bound(self) -> int:
        return max(self.peak, max(self.size, default=0))

    def arena(self, offsets: Sequence[int]) -> int:
        return max((o + w for o, w in zip(offsets, self.size)), default=0)


@dataclass(frozen=True)
class Outcome:
    """What one method returns, in solver units."""

    offsets: list[int] | None  # a placement, or None
    status: str  # "optimal" | "feasible" | "infeasible" | "unknown"
    bound: int  # proven lower bound on the arena (units)
    method: str  # which method found it (or proved the verdict)
    arena: int = 0  # arena of `offsets` (units); 0 without a placement


def outcome(inst: Instance, offsets: list[int] | None, cap: int | None, method: str, bound: int = 0,
            proven: bool = False, infeasible: bool = False) -> Outcome:
    """Wrap a method's result: its arena, and a status from the bound (or the method's proof)."""
    bound = max(bound, inst.lower_bound())
    if offsets is None or (cap is not None and inst.arena(offsets) > cap):
        return Outcome(None, "infeasible" if infeasible else "unknown", bound, method)
    arena = inst.arena(offsets)
    status = "optimal" if proven or arena <= bound else "feasible"
    return Outcome(offsets, status, arena if status == "optimal" else bound, method, arena)


def lower_bound(requests: Iterable[Request], alignment: int = 1) -> int:
    """Peak live bytes over time, each size rounded up to `alignment`."""
    events: dict[int, int] = {}
    for r in requests:
        if r.end > r.start:
            w = align_up(r.size, alignment)
            events[r.start] = events.get(r.start, 0) + w
            events[r.end] = events.get(r.end, 0) - w
    live = peak = 0
    for t in sorted(events):
        live += events[t]
        peak = max(peak, live)
    return peak


def solve(requests: Iterable[Request], *, capacity: int | None = None, alignment: int = 1,
          time_limit: float = 10.0, method: str = "auto", options: Options = Options()) -> Placement:
    """Place `requests`: fit `capacity` (or prove it impossible), or minimise the arena."""
    t0 = time.perf_counter()
    deadline = t0 + time_limit
    if method not in METHODS:
        raise OffsetsInputError(f"unknown placement method {method!r}; choose one of {', '.join(METHODS)}")
    if capacity is not None and capacity < 0:
        raise OffsetsInputError(f"capacity {capacity} is negative")
    if alignment < 1:
        raise OffsetsInputError(f"alignment {alignment} must be at least 1")
    requests = list(requests)
    inst, idle = _instance(requests, alignment)
    idle_need = max((align_up(r.size, alignment) for r in idle), default=0)
    lb_bytes = max(inst.lower_bound() * inst.unit, idle_need)
    cap = None if capacity is None else capacity // inst.unit
    if capacity is not None and lb_bytes > capacity:
        out = Outcome(None, "infeasible", inst.lower_bound(), "lower_bound")
    else:
        out = _run(inst, method, cap, deadline, options)
    return _finish(requests, inst, idle, out, capacity, alignment, lb_bytes, t0)


def _run(inst: Instance, method: str, cap: int | None, deadline: float, options: Options) -> Outcome:
    from formulations import offsets_exact, offsets_heuristics, offsets_solvers

    if inst.n == 0:
        return Outcome([], "optimal", 0, method)
    if method in offsets_heuristics.ORDERED:
        return offsets_heuristics.run(inst, method, cap)
    if method == "improve":  # a quick step: at most IMPROVE_SECONDS
        return offsets_heuristics.improve(inst, cap, min(deadline, time.perf_counter() + IMPROVE_SECONDS))
    if method == "exact":
        best = offsets_heuristics.best_greedy(inst, cap)
        return offsets_exact.run(inst, cap, deadline, options, best)
    if method == "cpsat":
        incumbent = offsets_heuristics.best_greedy(inst, cap)
        return offsets_solvers.cpsat(inst, cap, deadline, options, incumbent, options.cpsat_orders[-1])
    if method == "milp":
        return offsets_solvers.milp(inst, cap, deadline, options, offsets_heuristics.best_greedy(inst, cap))
    from formulations import offsets_auto

    return offsets_auto.run(inst, cap, deadline, options)


def better(a: Outcome, b: Outcome) -> Outcome:
    """The outcome with a placement and the smaller arena; bounds and proofs are merged."""
    bound = max(a.bound, b.bound)
    if b.status == "infeasible" or a.status == "infeasible":
        return Outcome(None, "infeasible", bound, b.method if b.status == "infeasible" else a.method)
    placed = [o for o in (a, b) if o.offsets is not None]
    if not placed:
        return Outcome(None, "unknown", bound, b.method)
    pick = min(placed, key=lambda o: o.arena)
    status = "optimal" if pick.status == "optimal" or pick.arena <= bound else "feasible"
    return Outcome(pick.offsets, status, pick.arena if status == "optimal" else bound, pick.method, pick.arena)


def _instance(requests: Sequence[Request], alignment: int) -> tuple[Instance, list[Request]]:
    """Validate the requests; return the busy ones in solver units and the idle ones (no space)."""
    seen: set[str] = set()
    for k, r in enumerate(requests):
        if not isinstance(r, Request):
            raise OffsetsInputError(f"request {k} is a {type(r).__name__}, not an offsets.Request")
        for name in ("start", "end", "size", "alignment"):
            v = getattr(r, name)
            if not isinstance(v, int | np.integer) or isinstance(v, bool):
                raise OffsetsInputError(f"request {r.id!r}: {name} {v!r} is not an integer")
        if r.id in seen:
            raise OffsetsInputError(f"request id {r.id!r} appears twice")
        seen.add(r.id)
        if r.size < 0 or r.alignment < 1:
            raise OffsetsInputError(f"request {r.id!r}: size {r.size} must be >= 0 and alignment "
                                    f"{r.alignment} >= 1")
        if r.hint is not None and (not isinstance(r.hint, int | np.integer) or r.hint < 0):
            raise OffsetsInputError(f"request {r.id!r}: hint {r.hint!r} is not a non-negative integer")
    busy = [r for r in requests if r.end > r.start and r.size > 0]
    idle = [r for r in requests if not (r.end > r.start and r.size > 0)]
    sizes = [align_up(r.size, alignment) for r in busy]
    aligns = [math.lcm(alignment, r.alignment) for r in busy]
    unit = _unit(sizes, aligns)
    times = sorted({r.start for r in busy} | {r.end for r in busy})
    pos = {t: i for i, t in enumerate(times)}
    first = np.array([pos[r.start] for r in busy], dtype=np.int64)
    last = np.array([pos[r.end] for r in busy], dtype=np.int64)
    size_u = [w // unit for w in sizes]
    delta = np.zeros(len(times) + 1, dtype=np.int64)
    np.add.at(delta, first, size_u)
    np.add.at(delta, last, [-w for w in size_u])
    live = np.cumsum(delta)[: max(len(times) - 1, 0)]
    hints = tuple(None if r.hint is None or r.hint % a or r.hint % unit else r.hint // unit
                  for r, a in zip(busy, aligns))
    return Instance(
        ids=tuple(r.id for r in busy), first=tuple(first.tolist()), last=tuple(last.tolist()),
        size=tuple(size_u), align=tuple(max(1, a // unit) for a in aligns), hint=hints, live=tuple(live.tolist()),
        overlaps=_overlaps(first, last), unit=unit, times=tuple(times)), idle


def _unit(sizes: Sequence[int], aligns: Sequence[int]) -> int:
    """The largest unit that every size is a multiple of and that every alignment divides or is a
    multiple of: then rounding a multiple of the unit up to an alignment stays on the unit grid."""
    unit = math.gcd(*sizes) or 1
    while (bad := next((a for a in aligns if unit % a and a % unit), None)) is not None:
        unit = math.gcd(unit, bad)
    return unit


def _overlaps(first: np.ndarray, last: np.ndarray, block: int = 1024) -> tuple[tuple[int, ...], ...]:
    """For each buffer, the others whose section ranges intersect it (blocks bound the memory)."""
    n = len(first)
    out: list[tuple[int, ...]] = []
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        m = (first[lo:hi, None] < last[None, :]) & (first[None, :] < last[lo:hi, None])
        m[np.arange(hi - lo), np.arange(lo, hi)] = False
        out.extend(tuple(np.nonzero(row)[0].tolist()) for row in m)
    return tuple(out)


def _finish(requests: list[Request], inst: Instance, idle: list[Request], out: Outcome, capacity: int | None,
            alignment: int, lb_bytes: int, t0: float) -> Placement:
    """Bytes, the independent check, and the status from the bounds."""
    lb = max(lb_bytes, out.bound * inst.unit)
    if out.offsets is None:
        return Placement({}, 0, lb, out.status, out.method, time.perf_counter() - t0, None)
    offsets = {i: o * inst.unit for i, o in zip(inst.ids, out.offsets)}
    offsets.update((r.id, 0) for r in idle)
    items = [CheckedItem(r.id, r.start, r.end, offsets[r.id], align_up(r.size, alignment)) for r in requests]
    bad = placement_violation(items, capacity, alignment)
    bad = bad or next((f"buffer {r.id} at offset {offsets[r.id]} is not a multiple of its alignment "
                       f"{r.alignment}" for r in requests if offsets[r.id] % r.alignment), None)
    if bad:
        raise RuntimeError(f"offsets method {out.method!r} produced an invalid placement: {bad}")
    arena = max((it.offset + it.size for it in items), default=0)
    if out.status == "optimal":
        lb = max(lb, arena)
    status = "optimal" if arena <= lb else "feasible"
    gap = (arena - lb) / arena if arena else 0.0
    return Placement(offsets, arena, lb, status, out.method, time.perf_counter() - t0, gap)


# ---- MiniMalloc CSV ------------------------------------------------------------------------------
_START_COLUMNS = ("lower", "start", "begin")


def read_csv(path: str | Path) -> list[Request]:
    """Read MiniMalloc's CSV: `id,lower,upper,size` (upper exclusive) or `start`/`begin` and an
    inclusive `end`; optional `alignment` and `hint`; an `offset` column becomes the hint.
    A `gaps` column is ignored, which treats the buffer as live throughout (safe)."""
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise OffsetsInputError(f"{p}: cannot read it ({e})") from None
    rows = csv.reader(io.StringIO(text))
    header = [h.strip().lower() for h in next(rows, [])]
    col = {h: k for k, h in enumerate(header)}
    start_col = next((c for c in _START_COLUMNS if c in col), None)
    end_col = "upper" if "upper" in col else "end" if "end" in col else None
    if "id" not in col or "size" not in col or start_col is None or end_col is None:
        raise OffsetsInputError(f"{p}:1: header {','.join(header) or '(empty)'} lacks id, size, a start "
                                f"(lower/start/begin) and an end (upper/end)")
    requests: list[Request] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise OffsetsInputError(f"{p}:{line}: {len(row)} fields, the header has {len(header)}")
        field = _CsvRow(p, line, row, col)
        rid = row[col["id"]].strip()
        start, end, size = field.number(start_col), field.number(end_col), field.number("size")
        end += end_col == "end"  # an inclusive end
        alignment = field.number("alignment", 1)
        hint = field.number("hint", -1)
        hint = field.number("offset", -1) if hint == -1 else hint
        if rid in seen:
            raise OffsetsInputError(f"{p}:{line}: id {rid!r} already used on line {seen[rid]}")
        if end < start or size < 0 or alignment < 1 or hint < -1:
            raise OffsetsInputError(f"{p}:{line}: buffer {rid!r} has lifetime [{start}, {end}), size {size}, "
                                    f"alignment {alignment}, offset {hint}: need start <= end, size >= 0, "
                                    "alignment >= 1, offset >= 0")
        seen[rid] = line
        requests.append(Request(rid, start, end, size, alignment, None if hint == -1 else hint))
    return requests


@dataclass(frozen=True)
class _CsvRow:
    path: Path
    line: int
    row: list[str]
    col: dict[str, int]

    def number(self, name: str, default: int | None = None) -> int:
        """The integer in column `name`; `default` when absent or empty (required if None)."""
        v = self.row[self.col[name]].strip() if name in self.col else ""
        if v == "":
            if default is None:
                raise OffsetsInputError(f"{self.path}:{self.line}: {name} is empty")
            return default
        try:
            return int(v)
        except ValueError:
            raise OffsetsInputError(f"{self.path}:{self.line}: {name} {v!r} is not an integer") from None


def write_csv(path: str | Path, requests: Sequence[Request], placement: Placement | None = None) -> None:
    """Write MiniMalloc's CSV (upper exclusive), with an `offset` column when a placement is given."""
    header = ["id", "lower", "upper", "size"]
    with_align = any(r.alignment != 1 for r in requests)
    with_hint = any(r.hint is not None for r in requests)
    with_offset = placement is not None and bool(placement.offsets)
    header += ["alignment"] * with_align + ["hint"] * with_hint + ["offset"] * with_offset
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(header)
    for r in requests:
        row: list[object] = [r.id, r.start, r.end, r.size]
        row += [r.alignment] * with_align + (["" if r.hint is None else r.hint] if with_hint else [])
        row += [placement.offsets[r.id]] if with_offset else []
        w.writerow(row)
    write_atomic(path, out.getvalue())

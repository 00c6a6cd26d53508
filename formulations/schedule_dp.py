"""Search over sets of executed ops (Serenity-style DP) for the minimum-peak order.

State: the set S of ops already run (a down-set of the DAG). The bytes resident after
S, mem(S), depend on S alone: a counted root tensor is resident when it exists (its
producer is in S, or an op of S has read it, for graph inputs and counted weights)
and some reader is not in S. Running op o from S costs the step

    step(S, o) = mem(S) + inputs loaded now + outputs of o - dying in-place inputs it takes over

exactly as planner.bounds.live_profile counts it. The peak of an order is the max of its
steps. The DP keeps, for every set, the lowest peak that reaches it, layer by layer
(layer k holds the sets of k units): peak(S + u) = min over S of max(peak(S), steps of u).

Exact reductions (each keeps at least one optimal order reachable):
- lazy ops: an op whose inputs cannot die at it (they have a reader among its
  descendants) or whose one dying input is an in-place donor of its one output's size
  can always be moved later, up to its first consumer, without raising any step (its
  outputs are held for less time, and what it frees is freed no later). Lazy ops are
  therefore run only right before their first consumer that runs ("owner"), in program
  order. This absorbs weight-only ops (sigmoid(w), views of weights, ...).
- budget: a state whose peak reaches the best known peak is dropped; an empty last layer
  proves that peak optimal.
- floor: the objective is max(floor, peak) with floor a proven lower bound of the whole
  graph, so peaks under it are equal.
- commit: if a ready unit has every step <= the state's peak and does not raise mem, running
  it now is never worse (moving it to the front only frees its inputs earlier and holds
  its outputs no longer than needed), so it is the state's only successor. Needs in-place
  savings that can only grow as more ops are done (`Problem.monotone`).
- divide and conquer: a non-lazy op comparable with every other non-lazy op (a cut vertex,
  e.g. between two ResNet blocks) sits at the same place in every order, so each segment
  between two cuts has a best order of its own; the peak is the max over segments
  (tensors that cross a cut stay in mem(S)).

`descend` drives the search as a sequence of probes: "is there an order under B?" with the
floor just under B (where the commit rule prunes the most), first at the best peak known,
then bisecting between the bound and the peak when that is too hard.

Units generalise ops: a unit is a fixed sequence of non-lazy ops run back to back (the
hierarchical heuristic contracts regions into units). Size: the number of down-sets,
exponential in the width of the graph; `state_cap` bounds it and the search says
"gave_up" when it is hit. With `beam`, each layer keeps its best states: a heuristic.

Lower bounds: formulations/schedule_bounds.py.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from planner.bounds import buffer_size
from planner.graph import LifetimeGraph

INF = float("inf")


@dataclass(frozen=True, slots=True)
class OpEffect:
    """What running one op does to resident bytes; masks are op bit-sets of readers."""

    src_reads: tuple[tuple[int, int], ...]  # (size, readers) of counted graph inputs/weights it reads
    reads: tuple[tuple[int, int, int], ...]  # (root, size, readers) of every counted root it reads
    out_sizes: tuple[int, ...]  # sizes of its counted outputs, in order
    dead_out: int  # bytes of counted outputs nobody reads (freed right after the step)
    donors: tuple[tuple[int, int, int], ...]  # (root, size, readers) of in-place inputs, in order


def bits(mask: int):
    """The set bits of `mask` (op or unit ids), lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


class Problem:
    """A graph compiled to bit-sets: steps, lazy ops, segments and bounds."""

    def __init__(self, graph: LifetimeGraph, include_weights: bool = False, alignment: int = 1,
                 ignore_below: int = 0) -> None:
        self.graph = graph
        self.n = n = len(graph.ops)
        self.include_weights = include_weights
        self.alignment = alignment
        self.ignore_below = ignore_below  # a relaxation: buffers smaller than this count as 0 bytes
        counted = lambda t: graph.is_buffer(t, include_weights)
        size = lambda t: 0 if buffer_size(graph, t, alignment) < ignore_below else buffer_size(graph, t, alignment)
        readers = {t: sum(1 << o for o in users) for t, users in graph.storage_users.items()}
        self.preds = [tuple(graph.predecessors(o)) for o in range(n)]
        self.succs = [tuple(s) for s in graph.successors]
        effects = []
        for op in graph.ops:
            roots = [r for r in dict.fromkeys(graph.root(t) for t in op.inputs) if counted(r)]
            outs = [t for t in op.outputs if counted(t)]
            src = tuple((size(r), readers[r]) for r in roots if r not in graph.producer)
            donors = tuple((i, size(i), readers[i]) for i in dict.fromkeys(op.inplace_inputs)
                           if graph.tensors[i].alias_of is None and counted(i))
            effects.append(OpEffect(src, tuple((r, size(r), readers[r]) for r in roots),
                                    tuple(size(t) for t in outs), sum(size(t) for t in outs if not readers[t]),
                                    donors))
        self.effects = effects
        self.monotone = all(not e.donors or (len(e.out_sizes) <= 1 and len({s for _, s, _ in e.donors}) <= 1)
                            for e in effects)
        self.roots = [(t.id, size(t.id), readers[t.id], graph.producer.get(t.id)) for t in graph.tensors
                      if counted(t.id)]
        anc = [0] * n
        for o in range(n):  # program order is topological
            for p in self.preds[o]:
                anc[o] |= anc[p] | (1 << p)
        desc = [0] * n
        for o in reversed(range(n)):
            for s in self.succs[o]:
                desc[o] |= desc[s] | (1 << s)
        self.anc, self.desc = anc, desc
        self._find_lazy(readers)

    # ---- lazy ops ------------------------------------------------------------
    def _is_lazy(self, o: int, readers: dict[int, int]) -> bool:
        e = self.effects[o]
        if not self.succs[o] or any(not readers[t] for t in self.graph.ops[o].outputs
                                    if self.graph.is_buffer(t, self.include_weights)):
            return False
        dying = [(r, sz) for r, sz, users in e.reads if sz and not users & self.desc[o]]  # 0 bytes: harmless
        if not dying:
            return True
        if len(dying) > 1 or len(e.out_sizes) != 1:
            return False
        r, sz = dying[0]
        return r in self.graph.producer and sz == e.out_sizes[0] and any(d == r for d, _, _ in e.donors)

    def _find_lazy(self, readers: dict[int, int]) -> None:
        self.lazy = [self._is_lazy(o, readers) for o in range(self.n)]
        lazy_mask = sum(1 << o for o in range(self.n) if self.lazy[o])
        # pending[x]: lazy ops reached backwards from non-lazy x through lazy ops only
        pending: list[tuple[int, ...]] = [()] * self.n
        eff_pred = [0] * self.n  # non-lazy ops that must be done before x (and its pending) can run
        owners = [0] * self.n
        for x in range(self.n):
            if self.lazy[x]:
                continue
            seen, stack = 0, [p for p in self.preds[x] if self.lazy[p]]
            while stack:
                p = stack.pop()
                if not (seen >> p) & 1:
                    seen |= 1 << p
                    stack.extend(q for q in self.preds[p] if self.lazy[q])
            pending[x] = tuple(bits(seen))
            for p in (x, *pending[x]):
                eff_pred[x] |= sum(1 << q for q in self.preds[p]) & ~lazy_mask
            for p in pending[x]:
                owners[p] |= 1 << x
        self.lazy_mask, self.pending, self.eff_pred, self.owners = lazy_mask, pending, eff_pred, owners

    # ---- memory ----------------------------------------------------------------
    def mem(self, done: int) -> int:
        """Resident bytes after the ops in `done` have run."""
        total = 0
        for _, sz, users, prod in self.roots:
            exists = (done >> prod) & 1 if prod is not None else users & done
            if exists and users & ~done:
                total += sz
        return total

    def step(self, done: int, mem: int, op: int) -> tuple[int, int]:
        """(bytes resident while `op` runs after `done`, bytes resident after it)."""
        e = self.effects[op]
        after = done | (1 << op)
        live = mem
        for sz, users in e.src_reads:
            if not users & done:
                live += sz
        donated: list[int] = []
        for out in e.out_sizes:
            live += out
            for r, sz, users in e.donors:
                if sz >= out and r not in donated and not users & ~after:
                    donated.append(r)
                    live -= sz
                    break
        freed = e.dead_out
        for r, sz, users in e.reads:
            if not users & ~after and r not in donated:
                freed += sz
        return live, live - freed

    def profile(self, order: Sequence[int], start: int = 0) -> list[int]:
        """Step bytes of `order` run after the ops in `start` (same numbers as bounds.live_profile)."""
        done, mem, out = start, self.mem(start), []
        for op in order:
            s, mem = self.step(done, mem, op)
            done |= 1 << op
            out.append(s)
        return out

    def with_pending(self, units: Sequence[int]) -> list[int]:
        """Non-lazy ops in order -> the full order, each lazy op right before its first owner."""
        done, order = 0, []
        for x in units:
            for p in self.pending[x]:
                if not (done >> p) & 1:
                    done |= 1 << p
                    order.append(p)
            done |= 1 << x
            order.append(x)
        return order

    def context_mask(self, ops: Sequence[int]) -> int:
        """Ops whose done-ness can change the steps of running `ops` (with their lazy ops)."""
        mask = 0
        for x in ops:
            for o in (*self.pending[x], x):
                mask |= 1 << o
                e = self.effects[o]
                for _, users in e.src_reads:
                    mask |= users
                for _, _, users in (*e.reads, *e.donors):
                    mask |= users
        return mask

    def grain(self, ops: Sequence[int], start: int) -> int:
        """A number dividing every step of any order of `ops` run after `start`: the gcd of the sizes
        of the buffers that can be resident then (RandWire stages: the smallest feature map)."""
        end = start | sum(1 << o for o in set(ops))  # ops may repeat (a lazy op of several owners)
        found = 0
        for _, sz, users, prod in self.roots:
            exists = (end >> prod) & 1 if prod is not None else users & end
            if sz and exists and (users & ~start or not users):
                found = math.gcd(found, sz)
        return found or 1

    # ---- divide and conquer ------------------------------------------------------
    def segments(self) -> list[list[int]]:
        """Non-lazy ops between consecutive cut vertices (each segment ends with its cut)."""
        solid = [o for o in range(self.n) if not self.lazy[o]]
        full = len(solid) - 1
        lazy = self.lazy_mask
        cuts = {o for o in solid if (self.anc[o] & ~lazy).bit_count() + (self.desc[o] & ~lazy).bit_count() == full}
        segs: list[list[int]] = [[]]
        for o in solid:
            segs[-1].append(o)
            if o in cuts:
                segs.append([])
        return [s for s in segs if s]


@dataclass(frozen=True, slots=True)
class SearchResult:
    order: tuple[int, ...] | None  # every op run (lazy ones included); None when nothing beat the budget
    peak: float  # max(floor, peak of order); INF when order is None
    status: str  # "optimal" | "no_better" (the budget is optimal) | "gave_up" | "beam" | "found" (an order under
    # the budget, not proven the least: schedule_guide.VectorProbe's walk)
    states: int  # states stored
    seconds: float


def unit_dag(prob: Problem, units: Sequence[Sequence[int]]) -> tuple[list[int], list[set[int]], list[bool]]:
    """(predecessor unit bit-sets, successor unit sets, whether the commit rule may run each unit)."""
    m = len(units)
    unit_of = {op: u for u, ops in enumerate(units) for op in ops}
    upred = [0] * m
    usucc: list[set[int]] = [set() for _ in range(m)]
    commit = [prob.monotone] * m
    for u, ops in enumerate(units):
        below = above = 0
        for op in ops:
            below |= prob.desc[op] | (1 << op)
            above |= prob.anc[op]
            for p in bits(prob.eff_pred[op]):
                v = unit_of.get(p)
                if v is not None and v != u:
                    upred[u] |= 1 << v
                    usucc[v].add(u)
        # lazy ops run with u only if every owner runs with or after u; one owned by an ancestor already ran
        commit[u] = commit[u] and all(not prob.owners[p] & ~below or prob.owners[p] & above
                                      for op in ops for p in prob.pending[op])
    return upred, usucc, commit


def search(prob: Problem, units: Sequence[Sequence[int]], start: int = 0, *, budget: float = INF,
           floor: int = 0, state_cap: int = 2_000_000, beam: int | None = None,
           deadline: float = INF) -> SearchResult:
    """Best order of `units` (tuples of non-lazy ops, each run back to back, its lazy
    ops right before it) after the ops in `start`. Exact unless `beam` is set."""
    t0 = time.perf_counter()
    m = len(units)
    upred, usucc, commit = unit_dag(prob, units)
    step, pending = prob.step, prob.pending
    # a unit's steps depend on `done` only through the readers of what it touches: memoise on that
    context = [prob.context_mask(ops) for ops in units]
    memo: dict[tuple[int, int], tuple[int, int, int]] = {}

    def run(done: int, mem: int, u: int) -> tuple[int, int, int]:
        key = (u, done & context[u])
        hit = memo.get(key)
        if hit is not None:
            return mem + hit[0], mem + hit[1], done | hit[2]
        peak, mem0, done0 = -1, mem, done
        for op in units[u]:
            for p in pending[op]:
                if not (done >> p) & 1:
                    s, mem = step(done, mem, p)
                    done |= 1 << p
                    peak = max(peak, s)
            s, mem = step(done, mem, op)
            done |= 1 << op
            peak = max(peak, s)
        if len(memo) > 4 * state_cap:
            memo.clear()
        memo[key] = (peak - mem0, mem - mem0, done & ~done0)
        return peak, mem, done

    def result(order, peak, status, stored) -> SearchResult:
        return SearchResult(order, peak, status, stored, time.perf_counter() - t0)

    def chain_commit(umask: int, peak: int, mem: int, u: int, s: int, mem2: int, done2: int):
        """Follow u's single-successor chain while every step stays under `peak`; the first
        prefix whose mem is the least seen so far (start included) can be committed."""
        seq, least, got = [u], min(mem, mem2), umask | (1 << u)
        while len(seq) < 32 and commit[seq[-1]] and len(usucc[seq[-1]]) == 1:
            v = next(iter(usucc[seq[-1]]))
            if upred[v] & ~got or not commit[v]:
                return None
            s, mem2, done2 = run(done2, mem2, v)
            if s > peak:
                return None
            seq.append(v)
            got |= 1 << v
            if mem2 <= least:
                return tuple(seq), mem2, done2, got
            least = min(least, mem2)
        return None

    memo_get = memo.get
    single = [next(iter(usucc[u])) if len(usucc[u]) == 1 else -1 for u in range(m)]  # a unit's one successor
    ready0 = sum(1 << u for u in range(m) if not upred[u])
    layers: list[dict[int, tuple[int, int, int, int]]] = [{} for _ in range(m + 1)]
    layers[0][0] = (floor, prob.mem(start), start, ready0)  # unit set -> (peak, mem, op set, ready units)
    parents: list[dict[int, int | tuple[int, ...]]] = [{} for _ in range(m + 1)]  # unit set -> units added
    stored, expanded = 1, 0
    for k in range(m):
        layer = layers[k]
        if beam is not None and len(layer) > beam:
            layer = dict(heapq.nsmallest(beam, layer.items(), key=lambda kv: (kv[1][0], kv[1][1])))
        if not layer:
            continue
        for umask, (peak, mem, done, ready) in layer.items():
            expanded += 1
            if expanded & 255 == 0 and time.perf_counter() > deadline:  # a beam stops too: it has no answer yet
                return result(None, INF, "gave_up", stored)
            moves = []
            rest = ready
            while rest:
                low = rest & -rest
                rest ^= low
                u = low.bit_length() - 1
                hit = memo_get((u, done & context[u]))
                if hit is None:
                    s, mem2, done2 = run(done, mem, u)
                else:
                    s, mem2, done2 = mem + hit[0], mem + hit[1], done | hit[2]
                p2 = peak if s <= peak else s
                if p2 >= budget:
                    continue
                if commit[u] and p2 == peak:
                    if mem2 <= mem:
                        moves = [((u,), p2, mem2, done2, umask | (1 << u))]
                        break
                    v = single[u]  # chain_commit's first test, inline: most chains stop there
                    chain = None if v < 0 or upred[v] & ~(umask | low) or not commit[v] else \
                        chain_commit(umask, peak, mem, u, s, mem2, done2)
                    if chain is not None:
                        moves = [(chain[0], p2, *chain[1:])]
                        break
                moves.append(((u,), p2, mem2, done2, umask | (1 << u)))
            for seq, p2, mem2, done2, key in moves:
                nxt = layers[k + len(seq)]
                old = nxt.get(key)
                if old is not None and old[0] <= p2:
                    continue
                if old is None:
                    stored += 1
                rdy = ready
                for u in seq:
                    rdy &= ~(1 << u)
                    for v in usucc[u]:
                        if not upred[v] & ~key:
                            rdy |= 1 << v
                nxt[key] = (p2, mem2, done2, rdy)
                parents[k + len(seq)][key] = seq[0] if len(seq) == 1 else seq
        layers[k] = {}  # expanded states are no longer needed, only their parents
        if beam is None and stored > state_cap:
            return result(None, INF, "gave_up", stored)
    if not layers[m]:
        return result(None, INF, "no_better" if beam is None else "beam", stored)
    (umask, (peak, _, done, _)), = layers[m].items()
    seq, k = [], m
    while k:
        step_units = parents[k][umask]
        step_units = (step_units,) if isinstance(step_units, int) else step_units
        seq.extend(reversed(step_units))
        for u in step_units:
            umask ^= 1 << u
        k -= len(step_units)
    order = prob.with_pending([op for u in reversed(seq) for op in units[u]])
    return result(tuple(o for o in order if not (start >> o) & 1), peak, "optimal" if beam is None else "beam",
                  stored)


CLOSE = 100  # descend: a probe whose level is within 1/CLOSE of the bound searches for the optimum itself


def descend(prob: Problem, units: Sequence[Sequence[int]], start: int, order: Sequence[int], peak: int, *,
            bound: int, state_cap: int, deadline: float,
            probe: Callable[[int, int, float], SearchResult] | None = None,
            close: int = CLOSE) -> tuple[list[int], int, int, str]:
    """Close the gap between `order`'s peak and the proven lower bound `bound` by exact probes.

    A probe at level B asks whether any order peaks under B (budget B, floor B - 1: the
    commit rule then prunes the most): "no_better" proves B a lower bound, an order lowers the
    peak. Within 1/`close` of the bound (after the relaxation, RandWire stages: 0.01%) a probe
    takes the bound as its floor instead: its order is then the optimum under B, proven in one
    search instead of bisecting bytes, with nine tenths of the time left. There a probe that has
    `refutes(level, deadline)` (schedule_guide.VectorProbe) first tries to prove the peak optimal from
    its guide alone (three quarters of the time left: that one backward search also serves the probes
    below; an unguided one answers False at once), and takes the guide's
    own bound (`bound()`: no order peaks under it) when that is higher; a probe with `walk(level,
    deadline)` (the guided walk alone) then tries levels from just over the bound up, the step
    doubling (half the time left, half of what remains each); then the first probe sits in
    the middle of the gap (two thirds of the time left). A probe may answer "found": an order under
    the level that is not proven the least (the guided walk): the peak drops, the bound stays.
    Farther from the bound the first probe sits just under the peak (it proves the peak optimal or
    improves it) with two thirds of the time left; after it, probes bisect the gap between bound
    and peak, each with half the time left (a probe at a lower level stores no more states).
    Every step is a multiple of `Problem.grain`, so the bound rounds up to one and probes bisect
    multiples of it (RandWire: a handful of feature-map sizes between bound and peak, not bytes).
    `probe(budget, floor, deadline)`: the exact search that answers a probe (default: this module's
    search of `units` with `state_cap`; formulations.schedule_guide.vector_probe: the vector engine).
    Returns (order, peak, bound, "optimal" | "gave_up")."""
    order = list(order)
    if probe is None:
        probe = lambda budget, floor, until: search(prob, units, start, budget=budget, floor=floor,
                                                    state_cap=state_cap, deadline=until)
    grain = prob.grain([o for u in units for x in u for o in (*prob.pending[x], x)], start)
    if peak % grain:  # a grain that does not divide the peak would be a bug: bisect bytes instead
        grain = 1
    bound = -(-bound // grain) * grain
    half = lambda lo, hi: lo + grain * ((hi - lo) // grain // 2)  # a multiple of grain in [lo, hi]
    level, top_failed = peak, False
    refutes = getattr(probe, "refutes", None)
    if refutes is not None and peak > bound and peak - bound <= peak // close:
        # close to the bound: a guide's tight-step bound (formulations/schedule_guide.py) may prove the
        # peak optimal alone; else start in the middle: a lower probe stores fewer states, its guide
        # often refutes it at once, and a probe that finds an order finds the optimum
        now = time.perf_counter()
        if refutes(peak, now + (deadline - now) * 3 / 4):
            bound = peak
        found = getattr(probe, "bound", lambda: None)()  # the guide's own lower bound, below the peak
        if found is not None and found > bound:
            bound = min(peak, -(-found // grain) * grain)
        walk = getattr(probe, "walk", None)
        if walk is not None and peak > bound:  # the guided walk from just over the bound up: an order it
            # finds there is optimal, and it often does (RandWire ER seed 2 stage 2: 3 s, where a layered
            # search at the first level of the bisection gives up)
            now = time.perf_counter()
            until, at, step = now + (deadline - now) / 2, bound + grain, grain
            while at <= peak and (now := time.perf_counter()) < until:
                got = walk(at, now + (until - now) / 2)
                if got is not None:
                    order, peak = list(got.order), max(prob.profile(got.order, start))
                    grain = grain if peak % grain == 0 else 1
                    break
                at, step = at + step, 2 * step
        level = half(bound, peak + grain)
    while peak > bound and bound < level <= peak:
        now = time.perf_counter()
        if now >= deadline:
            break
        top = level == peak
        # floor at the bound when it is close: the answer is then the optimum under the level, not only
        # some order under it (the states are the same sets; the commit rule is a little weaker)
        exact = level - bound <= level // close
        res = probe(level, bound if exact else max(bound, level - 1),
                    now + (deadline - now) * (0.9 if exact and top else 2 / 3 if exact or top else 1 / 2))
        if res.status == "no_better":
            bound = level
            level = half(bound, peak + grain)
        elif res.status == "gave_up":
            top_failed = top_failed or top
            level = half(bound, level)  # closer to the bound: a cheaper question
        else:
            order, peak = list(res.order), max(prob.profile(res.order, start))
            if peak % grain:  # as above: never skip a level
                grain = 1
            if exact and res.status == "optimal":  # the least peak of any order (max(floor, optimum), floor the bound)
                bound = max(bound, res.peak)
            level = half(bound, peak + grain)  # bisect: a lower probe costs no more than one at the peak
    return order, peak, bound, "optimal" if peak <= bound else "gave_up"

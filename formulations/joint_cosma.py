"""COSMA's monolithic model (Li et al., COSMA), for comparison with our Benders loop.

Steps s = 0..n-1, one op per step. Per (tensor t, step s):
  x[o,s]   op o runs at step s                      sum_s x[o,s] = 1, sum_o x[o,s] = 1
  c[t,s]   t is created at s (= x[producer, s])
  k[t,s]   t is kept from s-1                       k[t,s] <= r[t,s-1]
  l[t,s]   t is (re)loaded at s                     l[t,s] <= sum_{s'<s} sp[t,s'] (activations, outputs)
  sp[t,s]  t is spilled (stored) at s               sp[t,s] <= r[t,s], sum_s sp[t,s] <= 1 (== 1 for outputs)
  r[t,s] = c + k + l <= 1 resident;  r[t,s] >= x[o,s] for every reader o
  off[t,s] in [0, C - w_t] (in units of the alignment);  |off[t,s] - off[t,s-1]| <= C (1 - k[t,s])
  for t, u both possibly resident at s, y[t,u,s] in {0,1}:
    off_t + w_t <= off_u + C (1 - y) + C (2 - r_t - r_u)
    off_u + w_u <= off_t + C y       + C (2 - r_t - r_u)
  min sum b_t sp[t,s] (activations) + sum b_t l[t,s] - sum_{inputs} b_t
Precedence: sum_s s x[p,s] + 1 <= sum_s s x[o,s] on every edge.
Additions needed to compare on the same plans: in-place takeover (z = ip AND x[o,s] lets the
pair overlap at s, forces equal offsets and ends the donor), and, so that the model can be built
at all on real networks, variables only inside ASAP/ALAP windows (the published model indexes
every tensor at every step). model="cosma_fs" fixes the order (windows of width one).
Size: per step, one offset and four binaries per candidate tensor and one binary per pair of
candidate tensors: O(n T + n T_s^2) with T_s the tensors that may be resident at a step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from formulations.joint_models import BackendUnavailable, LinearModel, windows
from formulations.joint_residency import Choice, Timeline, order_of
from planner.check import PlanError, check
from planner.plan import Plan, SolverRecord
from planner.target import align_up


class _Deadline(Exception):
    """Model building ran past the time limit."""


def run(state, schedule: Sequence[int] | None, backend: str, threads: int) -> None:
    """Build and solve COSMA's model within the run's deadline; offer its plan to `state`."""
    g, target, cap = state.graph, state.target, state.target.capacity
    t0 = time.perf_counter()
    try:
        built = _build(g, target, cap, schedule, backend, threads, state.deadline)
    except _Deadline:
        state.proven = False
        state.say(f"model not built within the time limit ({time.perf_counter() - t0:.1f}s)")
        return
    except BackendUnavailable:
        raise
    m, x, r, k, ld, sp, off, z, pairs = built
    state.say(f"model built: {len(m.vars)} variables in {time.perf_counter() - t0:.1f}s")
    if state.best is not None:
        _hint(m, g, target, state.best, x, r, k, ld, sp, off, z, pairs)
    solved = m.solve(state.left())
    state.iterations += 1
    state.say(f"solver {solved.status}: objective {solved.objective} bound {solved.bound:.0f} in {solved.seconds:.1f}s")
    if solved.status == "infeasible":
        state.bound = math.inf
        return
    state.bound = max(state.bound, solved.bound)
    if solved.objective is None:
        return
    v = solved.values
    at = {s: o for (o, s), var in x.items() if v[var]}
    order = [at[s] for s in range(len(g.ops))]
    tl = Timeline(g, target, order)
    kept = [i for i, gap in enumerate(tl.gaps)
            if all(v[k[gap.tensor, s]] for s in range(gap.lo + 1, gap.hi + 1) if (gap.tensor, s) in k)
            and all((gap.tensor, s) in k for s in range(gap.lo + 1, gap.hi + 1))]
    index = {(p.step, p.out, p.donor): i for i, p in enumerate(tl.pairs)}
    taken = [index[(s, pairs[p][1], pairs[p][2])] for (p, s), var in z.items() if v[var]
             and (s, pairs[p][1], pairs[p][2]) in index]
    choice = Choice(frozenset(kept), frozenset(taken))
    bufs, buffer_of, pieces = tl.buffers(choice)
    offsets = [0] * len(bufs)
    for piece, (t, a, _) in enumerate(pieces):
        offsets[buffer_of[piece]] = target.alignment * int(v[off[t, a]]) if (t, a) in off else 0
    record = SolverRecord(f"joint:{state.label}", backend, solved.status, objective=tl.traffic(choice))
    try:
        plan = check(g, Plan(g.name, g.fingerprint, target, tl.instructions(choice, offsets), solver=record))
    except PlanError as e:
        state.say(f"COSMA solution rejected by the checker: {e}")
        return
    state.offer(plan, "COSMA model")


def _build(g, target, cap: int, schedule, backend: str, threads: int, deadline: float):
    n = len(g.ops)
    if schedule is None:
        asap, alap = windows(g, n)
    else:
        pos = {o: s for s, o in enumerate(schedule)}
        asap = alap = [pos[o] for o in range(n)]
    m = LinearModel(backend, threads)
    x = {(o, s): m.bool(f"x_{o}_{s}") for o in range(n) for s in range(asap[o], alap[o] + 1)}
    for o in range(n):
        m.add(m.dot((1, x[o, s]) for s in range(asap[o], alap[o] + 1)) == 1)
    at: list[list[int]] = [[] for _ in range(n)]
    for (o, s) in x:
        at[s].append(o)
    for s in range(n):
        m.add(m.dot((1, x[o, s]) for o in at[s]) == 1)
    step = [m.dot((s, x[o, s]) for s in range(asap[o], alap[o] + 1)) for o in range(n)]
    for o in range(n):
        for p in g.predecessors(o):
            m.add(step[p] + 1 <= step[o])
    counted = lambda t: g.is_buffer(t, target.include_weights)
    readers: dict[int, set[int]] = {}
    for op in g.ops:
        for t in op.inputs:
            if counted(g.root(t)):
                readers.setdefault(g.root(t), set()).add(op.id)
    tensors = sorted(set(readers) | {t for op in g.ops for t in op.outputs if counted(t)})
    unit = target.alignment  # offsets and sizes in units of the alignment: every offset is then aligned
    size = {t: align_up(g.tensors[t].nbytes, unit) // unit for t in tensors}
    cap = cap // unit
    r, k, ld, sp, off = {}, {}, {}, {}, {}
    alive: list[list[int]] = [[] for _ in range(n)]
    cost, constant = [], 0
    for t in tensors:
        if time.perf_counter() > deadline:
            raise _Deadline
        prod, users, kind, nb = g.producer.get(t), readers.get(t, set()), g.tensors[t].kind, g.tensors[t].nbytes
        lo = asap[prod] if prod is not None else min(asap[o] for o in users)
        hi = max([alap[o] for o in users] + ([alap[prod]] if prod is not None else []))
        if prod is None:
            constant -= nb
        stored = []
        for s in range(lo, hi + 1):
            alive[s].append(t)
            kk = k[t, s] = m.bool(f"k_{t}_{s}")
            ll = ld[t, s] = m.bool(f"l_{t}_{s}")
            ss = sp[t, s] = m.bool(f"sp_{t}_{s}")
            off[t, s] = m.integer(0, max(0, cap - size[t]), f"off_{t}_{s}")
            made = [(1, x[prod, s])] if (prod, s) in x else []
            r[t, s] = m.dot([(1, kk), (1, ll), *made])
            m.add(r[t, s] <= 1)
            if s == lo:
                m.add(kk == 0)
            else:
                m.add(kk <= r[t, s - 1])
                m.add(off[t, s] - off[t, s - 1] <= cap * (1 - kk))
                m.add(off[t, s - 1] - off[t, s] <= cap * (1 - kk))
            for o in users:
                if (o, s) in x:
                    m.add(r[t, s] >= x[o, s])
            m.add(ss <= r[t, s])
            if prod is not None:
                m.add(ll <= m.dot((1, v) for v in stored) if stored else ll == 0)
            stored.append(ss)
            cost.append((nb, ll))
            if kind == "activation":
                cost.append((nb, ss))
        m.add(m.dot((1, v) for v in stored) <= 1)
        if kind == "output":
            m.add(m.dot((1, v) for v in stored) == 1)
    pairs = [(op.id, t, i) for op in g.ops for t in op.outputs for i in dict.fromkeys(op.inplace_inputs)
             if counted(t) and counted(i) and g.tensors[i].alias_of is None and i not in op.outputs
             and size[t] == size[i] > 0]
    z, merged = {}, {}
    ip = [m.bool(f"ip_{p}") for p in range(len(pairs))]
    for p, (o, t, i) in enumerate(pairs):
        for s in range(asap[o], alap[o] + 1):
            zz = z[p, s] = m.bool(f"z_{p}_{s}")
            m.add(zz <= x[o, s])
            m.add(zz <= ip[p])
            m.add(zz >= x[o, s] + ip[p] - 1)
            m.add(off[t, s] - off[i, s] <= cap * (1 - zz))
            m.add(off[i, s] - off[t, s] <= cap * (1 - zz))
            if (i, s + 1) in k:
                m.add(k[i, s + 1] + zz <= 1)
            merged.setdefault((s, min(t, i), max(t, i)), []).append(zz)
    for s in range(n):
        if time.perf_counter() > deadline:
            raise _Deadline
        here = alive[s]
        for a_ in range(len(here)):
            for b_ in range(a_ + 1, len(here)):
                t, u = here[a_], here[b_]
                y = m.bool(f"y_{t}_{u}_{s}")
                loose = m.dot([(-cap, r[t, s]), (-cap, r[u, s])] + [(cap, v) for v in merged.get((s, t, u), ())],
                              2 * cap)  # 0 when both are resident and not merged in place
                m.add(off[t, s] + size[t] <= off[u, s] + cap - cap * y + loose)
                m.add(off[u, s] + size[u] <= off[t, s] + cap * y + loose)
    m.minimize(m.dot(cost, constant))
    return m, x, r, k, ld, sp, off, z, pairs


def _hint(m, g, target, plan: Plan, x, r, k, ld, sp, off, z, pairs) -> None:
    """The incumbent plan as a solution hint (order, residency, offsets, spills)."""
    order = order_of(plan)
    computes = [i for i, ins in enumerate(plan.instructions) if ins.kind == "compute"]
    step_of = {o: s for s, o in enumerate(order)}
    for (o, s), v in x.items():
        m.hint(v, step_of[o] == s)
    cover: dict[tuple[int, int], tuple[int, int]] = {}  # (tensor, step) -> (buffer start, offset)
    for b in plan.buffers:
        for s, i in enumerate(computes):
            if b.start <= i < b.end or (b.end == i and b.start < i):
                cover.setdefault((b.tensor, s), (b.start, b.offset))
    for (t, s), v in k.items():
        here, prev = cover.get((t, s)), cover.get((t, s - 1))
        m.hint(v, here is not None and prev is not None and here[0] == prev[0])
        m.hint(off[t, s], here[1] // target.alignment if here else 0)
        born = (g.producer.get(t), s) in x and step_of.get(g.producer.get(t)) == s
        m.hint(ld[t, s], here is not None and not born and (prev is None or here[0] != prev[0]))
    stores = {(ins.ref, sum(1 for i in computes if i < idx) - 1) for idx, ins in enumerate(plan.instructions)
              if ins.kind == "store"}
    for (t, s), v in sp.items():
        m.hint(v, (t, s) in stores)
    for (p, s), v in z.items():
        o, t, i = pairs[p]
        m.hint(v, step_of[o] == s and cover.get((t, s), (None, -1))[1] == cover.get((i, s), (None, -2))[1])

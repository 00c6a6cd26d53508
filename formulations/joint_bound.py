"""An order-free lower bound on non-compulsory traffic: tensors that are live across an op in
every order.

For an op o, L_o is the set of counted tensors that some ancestor of o produces or reads and
some descendant of o reads, and that o itself does not touch: in any order they exist before o
runs and are needed after it. While o runs its working set W_o (bounds.op_working_set, with
in-place savings taken) is resident, so
    W_o + sum_{t in L_o} w_t k[t,o] <= C,   k[t,o] = 1 iff t stays resident while o runs.
An op o where t is evicted needs a reload of t before the next reader after o. Group the ops
of L^-1(t) by the readers of t necessarily before and after them; group g1 precedes g2 when a
reader of t necessarily lies between them; then evictions in a chain g1 < g2 < ... need that
many distinct reloads:
    y_g >= 1 - k[t,o] (o in g),  y_g2 >= y_g1 + 1 - k[t,o] (o in g2, g1 < g2),  loads_t >= y_g
    min sum_t b_t loads_t + sum_{t activation} b_t spill_t,  spill_t >= 1 - k[t,o].
Every plan, whatever its order, maps onto a feasible point of this model with no more cost,
so its optimum (or its proven bound) is a lower bound for the joint problem.
Size: one binary per (op, tensor live across it), one integer per (tensor, group).
Omits: tensors live across o in some orders only, and the memory an order adds beyond L_o.
"""

from __future__ import annotations

from formulations.joint_models import LinearModel, Solved, ancestry
from planner.bounds import op_working_set
from planner.graph import LifetimeGraph
from planner.target import Target, align_up


def across_bound(graph: LifetimeGraph, target: Target, backend: str, time_limit: float,
                 threads: int = 4) -> Solved:
    """Solve the live-across relaxation; its `bound` is a valid lower bound (0 if trivial)."""
    w, a, cap = target.include_weights, target.alignment, target.capacity
    anc, desc = ancestry(graph)
    uses: dict[int, int] = {}  # tensor -> bitset of ops that produce or read it
    readers: dict[int, int] = {}
    touched: list[set[int]] = []
    for op in graph.ops:
        here = {graph.root(t) for t in op.inputs if graph.is_buffer(graph.root(t), w)}
        for t in here:
            readers[t] = readers.get(t, 0) | (1 << op.id)
            uses[t] = uses.get(t, 0) | (1 << op.id)
        outs = {t for t in op.outputs if graph.is_buffer(t, w)}
        for t in outs:
            uses[t] = uses.get(t, 0) | (1 << op.id)
        touched.append(here | outs)
    m = LinearModel(backend, threads)
    keep: dict[tuple[int, int], object] = {}
    groups: dict[int, dict[tuple[int, int], list[int]]] = {}
    rows = 0
    for op in graph.ops:
        o = op.id
        live = [t for t, r in readers.items()
                if t not in touched[o] and anc[o] & uses[t] and desc[o] & r]
        size = {t: align_up(graph.tensors[t].nbytes, a) for t in live}
        work = op_working_set(graph, o, w, a)
        if work + sum(size.values()) <= cap:
            continue  # nothing has to leave while o runs
        rows += 1
        terms = []
        for t in live:
            v = keep[t, o] = m.bool(f"k_{t}_{o}")
            terms.append((size[t], v))
            key = (anc[o] & uses[t], desc[o] & readers[t])
            groups.setdefault(t, {}).setdefault(key, []).append(o)
        m.add(m.dot(terms, work) <= cap)
    cost = []
    for t, by_key in groups.items():
        nb = graph.tensors[t].nbytes
        loads = m.integer(0, len(by_key), f"loads_{t}")
        cost.append((nb, loads))
        spill = m.bool(f"spill_{t}") if graph.tensors[t].kind == "activation" else None
        if spill is not None:
            cost.append((nb, spill))
        y = {key: m.integer(0, len(by_key), f"y_{t}_{k}") for k, key in enumerate(by_key)}
        for key, ops in by_key.items():
            m.add(loads >= y[key])
            for o in ops:
                m.add(y[key] + keep[t, o] >= 1)
                if spill is not None:
                    m.add(spill + keep[t, o] >= 1)
            for prev in by_key:
                if prev[1] & key[0]:  # a reader of t necessarily runs between the two groups
                    for o in ops:
                        m.add(y[key] >= y[prev] + 1 - keep[t, o])
    if not cost:
        return Solved("optimal", 0.0, 0.0, {}, 0.0)
    m.minimize(m.dot(cost))
    return m.solve(time_limit)

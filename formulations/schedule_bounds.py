"""Lower bounds on the minimum peak of a segment, for formulations/schedule.py.

`cut_lower_bound`: before op o runs, the ops done form a down-set holding o's ancestors
and none of its descendants; the least resident bytes over such sets is a minimum s-t cut
(a tensor costs its size when its producer is inside the set and a reader outside), so

    LB = max over o of ( min cut before o + bytes of o's outputs - its best in-place saving )

bounds every order from below. One max-flow per op (OR-Tools SimpleMaxFlow, arcs re-armed
per op); it ignores that the down-sets of consecutive ops are nested, which is what makes
it weaker than the optimum on wide graphs.
"""

from __future__ import annotations

from collections.abc import Sequence

from formulations.schedule_dp import Problem


def cut_lower_bound(prob: Problem, ops: Sequence[int], start: int) -> int:
    """Least possible step over the ops `ops` (all ops of a segment, lazy ones included)
    run after the ops in `start`: max over o of a min cut before o (see module doc)."""
    from ortools.graph.python import max_flow

    xs = list(ops)
    end = start | sum(1 << o for o in xs)
    node = {o: i + 2 for i, o in enumerate(xs)}
    src_node: dict[int, int] = {}
    big = sum(sz for _, sz, _, _ in prob.roots) + 1
    arcs: list[tuple[int, int, int]] = []
    nodes, const = 2 + len(xs), 0

    def new_node() -> int:
        nonlocal nodes
        nodes += 1
        return nodes - 1

    for t, sz, users, prod in prob.roots:
        inside = [o for o in xs if (users >> o) & 1]
        later = bool(users & ~end)
        if (prod is not None and (start >> prod) & 1) or (prod is None and users & start):
            if not users & ~start:
                continue
            if later:  # resident through the whole segment
                const += sz
                continue
            tail = 0
        elif prod is not None and not (end >> prod) & 1 or not (inside or later):
            continue
        elif prod is None:  # a graph input / weight: resident once any reader has run
            tail = src_node[t] = new_node()
            arcs += [(node[o], tail, big) for o in inside]
        else:
            tail = node[prod]
        aux = new_node()
        arcs.append((tail, aux, sz))
        arcs += [(aux, node[o], big) for o in inside]
        if later:
            arcs.append((aux, 1, big))
    arcs += [(node[o], node[p], big) for o in xs for p in prob.preds[o] if p in node]  # down-set
    flow = max_flow.SimpleMaxFlow()
    for a in arcs:
        flow.add_arc_with_capacity(*a)
    to_source = {o: flow.add_arc_with_capacity(0, node[o], 0) for o in xs}
    to_sink = {o: flow.add_arc_with_capacity(node[o], 1, 0) for o in xs}
    loaded = {t: flow.add_arc_with_capacity(0, v, 0) for t, v in src_node.items()}
    best = 0
    for o in xs:
        e = prob.effects[o]
        forced = ([to_source[u] for u in xs if (prob.anc[o] >> u) & 1]
                  + [to_sink[u] for u in xs if (prob.desc[o] >> u) & 1] + [to_sink[o]]
                  + [loaded[r] for r, _, _ in e.reads if r in loaded])
        for arc in forced:
            flow.set_arc_capacity(arc, big)
        if flow.solve(0, 1) != flow.OPTIMAL:
            raise RuntimeError(f"max-flow failed on the cut bound of op {prob.graph.ops[o].name!r}")
        saving = sum(sorted((sz for _, sz, _ in e.donors), reverse=True)[:len(e.out_sizes)])
        best = max(best, const + flow.optimal_flow() + sum(e.out_sizes) - saving)
        for arc in forced:
            flow.set_arc_capacity(arc, 0)
    return best


"""Reference pipelines: order x replacement policy x allocator -> checked plan.

These are the heuristics COSMA compared against ({program order, min-peak
order} x TFLite allocator x {Belady, greedy}) and what compilers ship today.
A pipeline runs in three passes:

1. order: `program`, `bfs`, `dfs` or `lpmf` (PyTorch Inductor's three
   reordering heuristics: least-peak-memory-first, BFS, DFS).
2. residency: walk the order with an aggregate capacity; load inputs just
   before use, free buffers after their last use, let an output take over a
   dying in-place input, and when bytes run short evict by `belady` (the
   resident tensor whose next use is furthest) or `lru`; a victim with no
   off-chip copy is stored first (a spill).
3. offsets: the buffers' lifetimes go to an allocator of formulations.offsets
   (`greedy_size` as TFLite, `best_fit` as XLA's heap simulator, `first_fit`).
   When fragmentation makes the arena exceed the capacity, residency is redone
   at a lower aggregate capacity until the placement fits: the baseline spills
   more instead of failing.

Every returned plan has passed planner.check.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from planner.bounds import InfeasibleError, buffer_size, check_order, m_r, require_capacity  # noqa: F401 (re-export)
from planner.check import check
from planner.graph import LifetimeGraph
from planner.plan import Instr, Plan, SolverRecord
from planner.target import Target

ORDERS = ("program", "bfs", "dfs", "lpmf")
POLICIES = ("belady", "lru")
ALLOCATORS = ("greedy_size", "best_fit", "first_fit")


# ---------------------------------------------------------------- orders
def program_order(graph: LifetimeGraph) -> list[int]:
    return list(range(len(graph.ops)))


def bfs_order(graph: LifetimeGraph) -> list[int]:
    """Kahn's algorithm with a FIFO queue: ops level by level."""
    indeg = [len(graph.predecessors(o.id)) for o in graph.ops]
    queue = [o.id for o in graph.ops if indeg[o.id] == 0]
    order: list[int] = []
    head = 0
    while head < len(queue):
        op = queue[head]
        head += 1
        order.append(op)
        for s in graph.successors[op]:
            indeg[s] -= 1
            if indeg[s] == 0:
                queue.append(s)
    return order


def dfs_order(graph: LifetimeGraph) -> list[int]:
    """Post-order DFS from the sinks, visiting the larger producer first (as Inductor does)."""
    produced = [sum(graph.tensors[t].nbytes for t in op.outputs) for op in graph.ops]
    done = [False] * len(graph.ops)
    order: list[int] = []
    for sink in (o.id for o in graph.ops if not graph.successors[o.id]):
        stack = [(sink, iter(sorted(graph.predecessors(sink), key=lambda p: (-produced[p], p))))]
        done[sink] = True
        while stack:
            node, preds = stack[-1]
            nxt = next((p for p in preds if not done[p]), None)
            if nxt is None:
                stack.pop()
                order.append(node)
            else:
                done[nxt] = True
                stack.append((nxt, iter(sorted(graph.predecessors(nxt), key=lambda p: (-produced[p], p)))))
    return order


def lpmf_order(graph: LifetimeGraph, include_weights: bool = False, alignment: int = 1) -> list[int]:
    """Least-peak-memory-first: among ready ops, run the one whose step peak
    (live + outputs) is lowest, breaking ties by the memory it leaves behind."""
    counted = lambda t: graph.is_buffer(t, include_weights)
    size = lambda t: buffer_size(graph, t, alignment)
    remaining = {t: len(u) for t, u in graph.storage_users.items()}
    indeg = [len(graph.predecessors(o.id)) for o in graph.ops]
    ready = {o.id for o in graph.ops if indeg[o.id] == 0}
    live = 0
    resident: set[int] = set()
    order: list[int] = []

    def effect(op_id: int) -> tuple[int, int, int]:
        op = graph.ops[op_id]
        ins = {graph.root(t) for t in op.inputs if counted(graph.root(t))}
        load = sum(size(t) for t in ins if t not in resident)
        out = sum(size(t) for t in op.outputs if counted(t))
        freed = sum(size(t) for t in ins if remaining[t] == 1)
        return live + load + out, load + out - freed, op_id

    while ready:
        op_id = min(ready, key=effect)
        ready.discard(op_id)
        order.append(op_id)
        op = graph.ops[op_id]
        ins = {graph.root(t) for t in op.inputs}
        for t in ins:
            if counted(t) and t not in resident:
                resident.add(t)
                live += size(t)
        for t in op.outputs:
            if counted(t):
                resident.add(t)
                live += size(t)
        for t in ins:
            remaining[t] -= 1
            if remaining[t] == 0 and t in resident:
                resident.discard(t)
                live -= size(t)
        for s in graph.successors[op_id]:
            indeg[s] -= 1
            if indeg[s] == 0:
                ready.add(s)
    return order


def order_by_name(graph: LifetimeGraph, name: str, target: Target) -> list[int]:
    if name == "program":
        return program_order(graph)
    if name == "bfs":
        return bfs_order(graph)
    if name == "dfs":
        return dfs_order(graph)
    if name == "lpmf":
        return lpmf_order(graph, target.include_weights, target.alignment)
    raise ValueError(f"unknown order {name!r}; known: {', '.join(ORDERS)}")


# ------------------------------------------------------------- residency
@dataclass
class _Slot:
    start: int  # first step
    end: int  # exclusive; set when released
    size: int


def residency(graph: LifetimeGraph, order: Sequence[int], target: Target, capacity: int | None,
              policy: str = "belady", isolate: bool = False) -> tuple[list[tuple], list[_Slot]]:
    """Pass 2: instructions whose offsets are slot numbers, and the slots' lifetimes.

    `isolate` empties the scratchpad before every op (storing what is still
    needed): each op's buffers then live alone, so any packing allocator fits
    them into M_R. The last resort when fragmentation defeats the allocator."""
    if policy not in POLICIES:
        raise ValueError(f"unknown replacement policy {policy!r}; known: {', '.join(POLICIES)}")
    check_order(graph, order)
    counted = lambda t: graph.is_buffer(t, target.include_weights)
    size = lambda t: buffer_size(graph, t, target.alignment)
    uses: dict[int, list[int]] = {}
    for pos, op_id in enumerate(order):
        for t in dict.fromkeys(graph.root(x) for x in graph.ops[op_id].inputs):
            uses.setdefault(t, []).append(pos)
    cursor = {t: 0 for t in uses}  # index into uses[t] of the next use
    offchip = {t.id for t in graph.tensors if t.kind in ("input", "weight")}
    resident: dict[int, int] = {}  # root -> slot
    last_touch: dict[int, int] = {}
    slots: list[_Slot] = []
    prog: list[tuple] = []
    used = 0

    def next_use(t: int) -> float:
        u, c = uses.get(t, []), cursor.get(t, 0)
        return u[c] if c < len(u) else float("inf")

    def release(t: int) -> None:
        nonlocal used
        slots[resident.pop(t)].end = len(prog)
        prog.append(("free", t))
        used -= size(t)

    def make_room(need: int, keep: set[int], pos: int, everything: bool = False) -> None:
        while (capacity is not None and used + need > capacity) or (everything and resident):
            victims = [t for t in resident if t not in keep]
            if not victims:
                raise InfeasibleError(f"op {graph.ops[order[pos]].name!r} needs more than {capacity} bytes")
            if policy == "belady":
                victim = max(victims, key=lambda t: (next_use(t), size(t), t))
            else:
                victim = min(victims, key=lambda t: (last_touch.get(t, -1), -size(t), t))
            if victim not in offchip:
                prog.append(("store", victim))
                offchip.add(victim)
            release(victim)

    def place(t: int, kind: str, pos: int, keep: set[int]) -> None:
        nonlocal used
        make_room(size(t), keep, pos)
        resident[t] = len(slots)
        slots.append(_Slot(len(prog), -1, size(t)))
        prog.append((kind, t, resident[t]))
        used += size(t)

    for pos, op_id in enumerate(order):
        op = graph.ops[op_id]
        ins = [t for t in dict.fromkeys(graph.root(x) for x in op.inputs) if counted(t)]
        outs = [t for t in op.outputs if counted(t)]
        keep = set(ins)
        if isolate and capacity is not None:
            make_room(0, set(), pos, everything=True)
        for t in ins:
            if t not in resident:
                place(t, "load", pos, keep)
        for t in ins:
            cursor[t] += 1
            last_touch[t] = pos
        # outputs: take over a dying in-place input, or get a fresh slot
        out_slots: dict[int, int] = {}
        donors = [i for i in op.inplace_inputs if i in resident and next_use(i) == float("inf")]
        need = 0
        for t in outs:
            donor = next((d for d in donors if slots[resident[d]].size >= size(t) > 0), None)
            if donor is not None:
                donors.remove(donor)
                out_slots[t] = resident.pop(donor)
                used -= size(donor)
            else:
                need += size(t)
        make_room(need, keep | set(out_slots), pos)
        for t in outs:
            if t not in out_slots:
                out_slots[t] = len(slots)
                slots.append(_Slot(len(prog), -1, size(t)))
        prog.append(("compute", op_id, [out_slots.get(t, -1) for t in op.outputs]))
        for t in outs:
            resident[t] = out_slots[t]
            used += size(t)
            last_touch[t] = pos
            if graph.tensors[t].kind == "output":
                prog.append(("store", t))
                offchip.add(t)
        for t in list(resident):
            if next_use(t) == float("inf"):
                release(t)
    return prog, slots


def emit(prog: list[tuple], slot_offsets: Sequence[int]) -> tuple[Instr, ...]:
    out = []
    for row in prog:
        kind, ref = row[0], row[1]
        if kind == "compute":
            out.append(Instr("compute", ref, tuple(-1 if s < 0 else slot_offsets[s] for s in row[2])))
        elif kind == "load":
            out.append(Instr("load", ref, (slot_offsets[row[2]],)))
        else:
            out.append(Instr(kind, ref))
    return tuple(out)


# --------------------------------------------------------------- pipeline
def place_slots(slots: Sequence[_Slot], alignment: int, allocator: str) -> tuple[list[int], int]:
    from formulations import offsets

    reqs = [offsets.Request(str(i), s.start, s.end, s.size) for i, s in enumerate(slots)]
    placed = offsets.solve(reqs, capacity=None, alignment=alignment, method=allocator, time_limit=10.0)
    return [placed.offsets[str(i)] for i in range(len(slots))], placed.arena


def pipeline(graph: LifetimeGraph, target: Target, order: str | Sequence[int] = "program",
             policy: str = "belady", allocator: str = "greedy_size", name: str | None = None) -> Plan:
    """Run one reference pipeline and return its checked plan (or raise InfeasibleError)."""
    t0 = time.perf_counter()
    seq = order_by_name(graph, order, target) if isinstance(order, str) else list(order)
    label = name or f"baseline:{order if isinstance(order, str) else 'given'}+{allocator}+{policy}"
    require_capacity(graph, target.capacity, target.include_weights, target.alignment)
    least = m_r(graph, target.include_weights, target.alignment)
    cap = target.capacity
    isolate = False
    for attempt in range(64):
        prog, slots = residency(graph, seq, target, cap, policy, isolate)
        offs, arena = place_slots(slots, target.alignment, allocator)
        if target.capacity is None or arena <= target.capacity:
            plan = Plan(graph.name, graph.fingerprint, target, emit(prog, offs),
                        solver=SolverRecord(label, "heuristic", "heuristic", seconds=time.perf_counter() - t0,
                                            params={"order": label, "aggregate_capacity": cap,
                                                    "attempts": attempt + 1, "isolated": isolate}))
            return check(graph, plan)
        # fragmentation: shrink the aggregate capacity by the overshoot and spill more
        if isolate:
            break
        cap = min(cap, target.capacity) - max(arena - target.capacity, target.alignment)
        if cap < least:  # last resort: every op alone in the scratchpad
            cap, isolate = target.capacity, True
    raise InfeasibleError(f"{label}: the allocator could not fit the buffers into {target.capacity} bytes")


PIPELINES: dict[str, tuple[str, str, str]] = {
    f"{o}+{a}+{p}": (o, p, a) for o in ORDERS for p in POLICIES for a in ALLOCATORS
}


def run_all(graph: LifetimeGraph, target: Target, names: Sequence[str] | None = None,
            progress: Callable[[str], None] | None = None) -> dict[str, Plan | InfeasibleError]:
    """Run pipelines by name; each result is a checked plan or the reason it failed."""
    results: dict[str, Plan | InfeasibleError] = {}
    for n in names or PIPELINES:
        o, p, a = PIPELINES[n]
        if progress:
            progress(n)
        try:
            results[n] = pipeline(graph, target, o, p, a, name=f"baseline:{n}")
        except InfeasibleError as e:
            results[n] = e
    return results


def plan_rank(plan: Plan) -> tuple:
    """Better plans sort first: less non-compulsory traffic, then smaller arena, then faster."""
    m = plan.metrics
    return (m["noncompulsory_bytes"], m["arena_bytes"], m["est_seconds"])


def best(graph: LifetimeGraph, target: Target, names: Sequence[str] | None = None) -> Plan:
    results = run_all(graph, target, names)
    plans = [r for r in results.values() if isinstance(r, Plan)]
    if not plans:
        raise next(iter(results.values()))  # type: ignore[misc]
    return min(plans, key=plan_rank)

"""Execution sequences with recomputes and reloads, and the plans they make.

Every rematerialisation method (formulations.remat, the baselines in planner.baselines_remat,
PyTorch's own partition) answers with a *sequence*: op ids in execution order, where an op
that appears again is a recompute, and `("load", t)` items reload a tensor from its off-chip
copy. This module turns a sequence into a checked plan, one way for all of them:

  * instances: every compute of a buffer-owning tensor, and every load, starts an instance
    of that tensor; the instance lives until its last read before the next instance starts
    (or, with no read, just that step). Graph inputs (and counted weights) get a load just
    before their first read when the sequence does not load them itself.
  * stores: a graph output is stored right after its first compute; a tensor the sequence
    reloads is stored right after the compute before its first reload.
  * offsets: the instances are placed by formulations.offsets (the target's capacity must
    hold, else PlacementError: the caller may tighten its peak budget and try again).

Views own no storage: a view op runs once (the executor derives a view again for every
instance of its root) and reads resolve to the root. In-place takeover is not used: each
compute gets a buffer of its own, which is what the peak budgets of the remat literature
count (node outputs only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from planner.check import check
from planner.graph import LifetimeGraph
from planner.plan import Instr, Plan, SolverRecord, compute, free, load, store
from planner.target import Target, align_up

Item = int | tuple[str, int]  # op id (compute) or ("load", tensor id)


class SequenceError(ValueError):
    """A sequence that cannot run: the message names the op or tensor."""


class PlacementError(ValueError):
    """The sequence's instances do not fit the capacity (fragmentation); `arena` is the best found."""

    def __init__(self, message: str, arena: int):
        super().__init__(message)
        self.arena = arena


@dataclass(frozen=True, slots=True)
class Instance:
    tensor: int  # root tensor id
    start: int  # sequence position that creates it (compute or load)
    end: int  # position after its last read: the lifetime is [start, end)
    size: int  # aligned bytes


def counted(graph: LifetimeGraph, target: Target) -> list[bool]:
    return [graph.is_buffer(t.id, target.include_weights) for t in graph.tensors]


def instances(graph: LifetimeGraph, target: Target, sequence: Sequence[Item]) -> list[Instance]:
    """The buffer instances of `sequence` (raises SequenceError if it reads what does not exist)."""
    owns = counted(graph, target)
    size = [align_up(t.nbytes, target.alignment) for t in graph.tensors]
    open_: dict[int, list[int]] = {}  # root -> [start, last read]
    done: list[Instance] = []
    offchip = {t.id for t in graph.tensors if t.kind in ("input", "weight")}

    def close(t: int) -> None:
        start, last = open_.pop(t)
        done.append(Instance(t, start, max(last, start) + 1, size[t]))

    for pos, item in enumerate(sequence):
        if isinstance(item, tuple):
            kind, t = item
            if kind != "load" or not 0 <= t < len(graph.tensors) or not owns[t]:
                raise SequenceError(f"item {item!r} at position {pos} is not a load of a buffer")
            if t in open_:
                close(t)
            open_[t] = [pos, pos]
            continue
        if not 0 <= item < len(graph.ops):
            raise SequenceError(f"position {pos} names op {item}, which does not exist")
        op = graph.ops[item]
        for x in op.inputs:
            r = graph.root(x)
            if not owns[r]:
                continue
            if r not in open_:
                if r not in offchip or any(i.tensor == r for i in done):
                    raise SequenceError(f"op {op.name!r} at position {pos} reads {graph.tensors[x].name!r}, "
                                        "which is not resident (computed or loaded earlier and not since)")
                open_[r] = [pos, pos]  # lazy first load of an input or weight
            open_[r][1] = pos
        for t in op.outputs:
            if owns[t]:
                if t in open_:
                    close(t)
                open_[t] = [pos, pos]
    for t in list(open_):
        close(t)
    return sorted(done, key=lambda i: (i.start, i.tensor))


def peak(graph: LifetimeGraph, target: Target, sequence: Sequence[Item]) -> int:
    """Largest sum of live instance sizes over the sequence."""
    delta = [0] * (len(sequence) + 1)
    for i in instances(graph, target, sequence):
        delta[i.start] += i.size
        delta[i.end] -= i.size
    best = live = 0
    for d in delta:
        live += d
        best = max(best, live)
    return best


def recompute_flops(graph: LifetimeGraph, sequence: Sequence[Item]) -> float:
    """FLOPs of every compute after an op's first."""
    seen: set[int] = set()
    total = 0.0
    for item in sequence:
        if isinstance(item, int):
            if item in seen:
                total += graph.ops[item].flops
            seen.add(item)
    return total


def to_plan(graph: LifetimeGraph, target: Target, sequence: Sequence[Item], solver: SolverRecord,
            *, time_limit: float = 5.0) -> Plan:
    """A checked plan that runs `sequence` within target.capacity (PlacementError if it cannot)."""
    from formulations import offsets

    missing = set(range(len(graph.ops))) - {i for i in sequence if isinstance(i, int)}
    if missing:
        raise SequenceError(f"op {graph.ops[min(missing)].name!r} is never computed")
    inst = instances(graph, target, sequence)
    requests = [offsets.Request(str(k), i.start, i.end, i.size) for k, i in enumerate(inst)]
    placed = offsets.solve(requests, capacity=target.capacity, alignment=target.alignment,
                           time_limit=time_limit)
    if not placed.offsets:
        best = offsets.solve(requests, alignment=target.alignment, time_limit=min(2.0, time_limit))
        raise PlacementError(f"the sequence's buffers do not fit {target.capacity} bytes (peak "
                             f"{placed.lower_bound}, smallest arena found {best.arena})", best.arena)
    offset_at = {(i.tensor, i.start): placed.offsets[str(k)] for k, i in enumerate(inst)}
    ends: dict[int, list[int]] = {}
    for i in inst:
        ends.setdefault(i.end - 1, []).append(i.tensor)
    reloaded = {item[1] for item in sequence if isinstance(item, tuple)}
    stored: set[int] = set()
    owns = counted(graph, target)
    instrs: list[Instr] = []
    for pos, item in enumerate(sequence):
        if isinstance(item, tuple):
            instrs.append(load(item[1], offset_at[(item[1], pos)]))
        else:
            op = graph.ops[item]
            for x in dict.fromkeys(graph.root(x) for x in op.inputs):
                if (x, pos) in offset_at:  # lazy first load
                    instrs.append(load(x, offset_at[(x, pos)]))
            instrs.append(compute(item, *(offset_at[(t, pos)] if owns[t] else -1 for t in op.outputs)))
            for t in op.outputs:
                keep = graph.tensors[t].kind == "output" or t in reloaded
                if owns[t] and keep and t not in stored:
                    instrs.append(store(t))
                    stored.add(t)
        for t in ends.get(pos, ()):
            instrs.append(free(t))
    plan = Plan(graph.name, graph.fingerprint, target, tuple(instrs), solver=solver)
    return check(graph, plan, target)

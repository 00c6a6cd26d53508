"""The checker: re-simulates a plan against its graph and target, shares no code
with any solver, and names the first step that breaks a rule.

Semantics (see planner/plan.py for the instructions):
- A tensor occupies scratchpad space when `graph.is_buffer(t, target.include_weights)`;
  views use their root's buffer; weights not counted are always readable.
- Inputs (and counted weights) start off-chip; `store` creates an off-chip copy
  that persists; every output must have one at the end.
- Buffer sizes are nbytes rounded up to the target alignment; offsets are
  multiples of it; offset + size <= capacity.
- Live buffers never overlap. The one exception is in-place reuse: an op output
  placed at exactly the offset of one of the op's `inplace_inputs` (no larger
  than it) takes that buffer over; the input's buffer ends at that step.
- Every op runs at least once; a later run is a recompute and its FLOPs count.

Metrics: peak bytes in use, arena bytes, loaded/stored bytes split into
compulsory (first load of each input/weight, first store of each output) and
non-compulsory, recompute FLOPs and the estimated time
(flops / compute_rate + transfer bytes / offchip_bandwidth).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from planner.graph import LifetimeGraph
from planner.plan import INSTRUCTION_KINDS, Buffer, Plan
from planner.target import Target, align_up


class PlanError(ValueError):
    """A plan that breaks a rule. `step` is the offending instruction index (or None)."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message if step is None else f"step {step}: {message}")
        self.step = step


@dataclass(frozen=True, slots=True)
class Placement:
    """One buffer for the placement check: half-open lifetime [start, end)."""

    id: object  # anything that names it in messages
    start: int
    end: int
    offset: int
    size: int


def placement_violation(items: Iterable[Placement], capacity: int | None, alignment: int = 1) -> str | None:
    """The independent overlap / capacity / alignment check shared by the plan
    checker and the offsets formulations. Returns the first violation or None."""
    items = sorted(items, key=lambda b: (b.start, b.offset))
    active: list[Placement] = []
    for b in items:
        if b.offset < 0 or b.offset % alignment:
            return f"buffer {b.id!r} at offset {b.offset} is not a non-negative multiple of {alignment}"
        if capacity is not None and b.offset + b.size > capacity:
            return f"buffer {b.id!r} ends at {b.offset + b.size}, beyond the capacity {capacity}"
        if b.end <= b.start or b.size == 0:
            continue
        active = [a for a in active if a.end > b.start]
        for a in active:
            if a.offset < b.offset + b.size and b.offset < a.offset + a.size:
                return (f"buffer {b.id!r} [{b.offset}, {b.offset + b.size}) overlaps live buffer {a.id!r} "
                        f"[{a.offset}, {a.offset + a.size}) at step {b.start}")
        active.append(b)
    return None


def check(graph: LifetimeGraph, plan: Plan, target: Target | None = None) -> Plan:
    """Validate `plan`; return it with checked buffers and metrics, or raise PlanError."""
    if plan.fingerprint != graph.fingerprint:
        raise PlanError(f"plan is for graph {plan.graph_name!r} ({plan.fingerprint[:12]}), "
                        f"not {graph.name!r} ({graph.fingerprint[:12]})")
    target = target or plan.target
    buffers, metrics = simulate(graph, plan.instructions, target)
    return plan.with_(buffers=tuple(buffers), metrics=metrics)


def simulate(graph: LifetimeGraph, instructions: Sequence, target: Target) -> tuple[list[Buffer], dict]:
    align = target.alignment
    counted = [graph.is_buffer(t.id, target.include_weights) for t in graph.tensors]
    size = [align_up(t.nbytes, align) for t in graph.tensors]
    name = [t.name for t in graph.tensors]
    offchip = {t.id for t in graph.tensors if t.kind in ("input", "weight") and counted[t.id]}
    exists = set(offchip) | {t.id for t in graph.tensors if not counted[t.id] and t.alias_of is None}
    resident: dict[int, tuple[int, int]] = {}  # root tensor -> (offset, start step)
    buffers: list[Buffer] = []
    loaded_once: set[int] = set()
    stored_once: set[int] = set()
    runs = [0] * len(graph.ops)
    m = dict(load_bytes=0, store_bytes=0, compulsory_bytes=0, noncompulsory_bytes=0,
             compute_flops=0.0, recompute_flops=0.0, peak_bytes=0)
    in_use = 0

    def release(t: int, step: int) -> None:
        nonlocal in_use
        off, start = resident.pop(t)
        buffers.append(Buffer(t, off, size[t], start, step))
        in_use -= size[t]

    def allocate(t: int, off: int, step: int) -> None:
        nonlocal in_use
        if off < 0 or off % align:
            raise PlanError(f"{name[t]!r} placed at {off}, not a non-negative multiple of {align}", step)
        if target.capacity is not None and off + size[t] > target.capacity:
            raise PlanError(f"{name[t]!r} at [{off}, {off + size[t]}) exceeds the capacity {target.capacity}",
                            step)
        resident[t] = (off, step)
        in_use += size[t]

    def need(t: int, step: int, what: str) -> None:
        r = graph.root(t)
        if not counted[r] or r in resident:
            return
        if r not in exists:
            raise PlanError(f"{what} reads {name[t]!r} before it exists", step)
        raise PlanError(f"{what} reads {name[t]!r}, which is not resident", step)

    def run() -> None:
        for step, ins in enumerate(instructions):
            if ins.kind not in INSTRUCTION_KINDS:
                raise PlanError(f"unknown instruction {ins.kind!r}", step)
            if ins.kind == "compute":
                if not 0 <= ins.ref < len(graph.ops):
                    raise PlanError(f"compute names op {ins.ref}, which does not exist", step)
                op = graph.ops[ins.ref]
                what = f"op {op.name!r}"
                for t in op.inputs:
                    need(t, step, what)
                if len(ins.offsets) != len(op.outputs):
                    raise PlanError(f"{what} has {len(op.outputs)} outputs but {len(ins.offsets)} offsets", step)
                for t, off in zip(op.outputs, ins.offsets):
                    if not counted[t]:
                        if off != -1:
                            raise PlanError(f"{what} output {name[t]!r} owns no buffer; its offset must be -1", step)
                        continue
                    if t in resident:
                        raise PlanError(f"{what} writes {name[t]!r}, which is already resident", step)
                    taken = [i for i in op.inplace_inputs
                             if i in resident and resident[i][0] == off and 0 < size[t] <= size[i]]
                    if taken:  # in-place reuse: the output takes the input's buffer over
                        release(taken[0], step)
                    allocate(t, off, step)
                    exists.add(t)
                runs[op.id] += 1
                m["compute_flops"] += op.flops
                if runs[op.id] > 1:
                    m["recompute_flops"] += op.flops
            else:
                t = ins.ref
                if not 0 <= t < len(graph.tensors):
                    raise PlanError(f"{ins.kind} names tensor {t}, which does not exist", step)
                if not counted[t]:
                    raise PlanError(f"{ins.kind} of {name[t]!r}, which owns no scratchpad buffer", step)
                if ins.kind == "load":
                    if t in resident:
                        raise PlanError(f"load of {name[t]!r}, which is already resident", step)
                    if t not in offchip:
                        raise PlanError(f"load of {name[t]!r}, which has no off-chip copy", step)
                    if len(ins.offsets) != 1:
                        raise PlanError(f"load of {name[t]!r} needs exactly one offset", step)
                    allocate(t, ins.offsets[0], step)
                    m["load_bytes"] += graph.tensors[t].nbytes
                    first = t not in loaded_once and graph.tensors[t].kind in ("input", "weight")
                    m["compulsory_bytes" if first else "noncompulsory_bytes"] += graph.tensors[t].nbytes
                    loaded_once.add(t)
                elif ins.kind == "store":
                    if t not in resident:
                        raise PlanError(f"store of {name[t]!r}, which is not resident", step)
                    m["store_bytes"] += graph.tensors[t].nbytes
                    first = t not in stored_once and graph.tensors[t].kind == "output"
                    m["compulsory_bytes" if first else "noncompulsory_bytes"] += graph.tensors[t].nbytes
                    stored_once.add(t)
                    offchip.add(t)
                else:  # free
                    if t not in resident:
                        raise PlanError(f"free of {name[t]!r}, which is not resident", step)
                    release(t, step)
            m["peak_bytes"] = max(m["peak_bytes"], in_use)

        end = len(instructions)
        for op in graph.ops:
            if runs[op.id] == 0:
                raise PlanError(f"op {op.name!r} is never computed", end)
        for t in graph.tensors_of("output"):
            if graph.root(t.id) not in offchip:
                raise PlanError(f"output {t.name!r} is never stored off-chip", end)
        for t in list(resident):
            release(t, end)

    def overlap() -> PlanError | None:
        bad = placement_violation(
            (Placement(name[b.tensor], b.start, b.end, b.offset, b.size) for b in buffers), target.capacity, align)
        return PlanError(bad.rsplit(" at step ", 1)[0], _overlap_step(bad)) if bad else None

    try:
        run()
    except PlanError as e:
        # an overlap at an earlier step is the first violation, whatever broke later
        for t, (off, start) in list(resident.items()):
            buffers.append(Buffer(t, off, size[t], start, e.step if e.step is not None else len(instructions)))
        early = overlap()
        if early is not None and early.step is not None and (e.step is None or early.step < e.step):
            raise early from None
        raise
    err = overlap()
    if err:
        raise err
    m["arena_bytes"] = max((b.offset + b.size for b in buffers), default=0)
    m["steps"] = len(instructions)
    m["est_seconds"] = (m["compute_flops"] / target.compute_rate
                        + (m["load_bytes"] + m["store_bytes"]) / target.offchip_bandwidth)
    buffers.sort(key=lambda b: (b.start, b.offset))
    return buffers, m


def _overlap_step(message: str) -> int | None:
    tail = message.rsplit("at step ", 1)
    return int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else None

"""Lower bounds and live-byte profiles, used to report gaps and to size budgets.

- M_R: the largest single-op working set (its inputs and outputs resident at
  once, less what in-place reuse saves). No plan fits in less.
- live profile / max-live of an order: bytes resident when the ops run in that
  order with no spills, every buffer freed right after its last use and
  in-place reuse taken where the IR allows it. Its maximum is the order's peak.
- M_P lower bound: what is cheap to prove about the best order: max(M_R, bytes
  that every order holds at once: graph inputs still needed by the first ops ...).

Sizes are aligned to the target alignment, like the checker's.
"""

from __future__ import annotations

from collections.abc import Sequence

from planner.graph import LifetimeGraph
from planner.target import align_up


class InfeasibleError(ValueError):
    """No plan exists (or the planner found none) at the requested capacity."""


def require_capacity(graph: LifetimeGraph, capacity: int | None, include_weights: bool, alignment: int) -> None:
    """Raise InfeasibleError, naming the least feasible capacity, when capacity < M_R."""
    least = m_r(graph, include_weights, alignment)
    if capacity is not None and capacity < least:
        raise InfeasibleError(f"capacity {capacity} is below M_R = {least} bytes, the largest single-op working "
                              f"set of {graph.name!r}; no plan fits (use --capacity {least} or more)")


def buffer_size(graph: LifetimeGraph, tid: int, alignment: int) -> int:
    return align_up(graph.tensors[tid].nbytes, alignment)


def op_working_set(graph: LifetimeGraph, op_id: int, include_weights: bool, alignment: int) -> int:
    """Bytes that must be resident while op `op_id` runs."""
    op = graph.ops[op_id]
    ins = {graph.root(t) for t in op.inputs if graph.is_buffer(graph.root(t), include_weights)}
    outs = [t for t in op.outputs if graph.is_buffer(t, include_weights)]
    total = sum(buffer_size(graph, t, alignment) for t in ins | set(outs))
    # an output may take over one in-place input of at least its size (that input dies here at best)
    free_inputs = sorted((buffer_size(graph, t, alignment) for t in set(op.inplace_inputs) if t in ins),
                         reverse=True)
    for size in sorted((buffer_size(graph, t, alignment) for t in outs), reverse=True):
        fit = [s for s in free_inputs if s >= size]
        if fit:
            free_inputs.remove(min(fit))
            total -= size
    return total


def m_r(graph: LifetimeGraph, include_weights: bool = False, alignment: int = 1) -> int:
    """Largest single-op working set: the least capacity any plan can use."""
    return max((op_working_set(graph, o.id, include_weights, alignment) for o in graph.ops), default=0)


def last_uses(graph: LifetimeGraph, order: Sequence[int]) -> dict[int, int]:
    """root tensor -> position in `order` of its last reader (graph outputs never die)."""
    last: dict[int, int] = {}
    for pos, op_id in enumerate(order):
        for t in graph.ops[op_id].inputs:
            last[graph.root(t)] = pos
    return last


def live_profile(graph: LifetimeGraph, order: Sequence[int], include_weights: bool = False,
                 alignment: int = 1, outputs_stay: bool = False) -> list[int]:
    """Resident bytes while each op of `order` runs (no spills).

    Inputs and counted weights become resident just before their first use;
    every buffer is freed after its last use; an output leaves right after it is
    produced and stored unless it is read later (or `outputs_stay`).
    """
    check_order(graph, order)
    last = last_uses(graph, order)
    first_use: dict[int, int] = {}
    for pos, op_id in enumerate(order):
        for t in graph.ops[op_id].inputs:
            first_use.setdefault(graph.root(t), pos)
    counted = lambda t: graph.is_buffer(t, include_weights)
    size = lambda t: buffer_size(graph, t, alignment)
    live = 0
    resident: set[int] = set()
    profile: list[int] = []
    for pos, op_id in enumerate(order):
        op = graph.ops[op_id]
        for t in op.inputs:
            r = graph.root(t)
            if counted(r) and r not in resident:
                resident.add(r)
                live += size(r)
        taken = set()
        for t in op.outputs:
            if not counted(t):
                continue
            donor = next((i for i in op.inplace_inputs if i in resident and i not in taken
                          and last.get(i) == pos and size(i) >= size(t)), None)
            if donor is not None:  # the output takes the dying input's buffer over
                taken.add(donor)
                resident.discard(donor)
                live -= size(donor)
            resident.add(t)
            live += size(t)
        profile.append(live)
        for r in list(resident):
            dead = last.get(r, -1) <= pos and not (outputs_stay and graph.tensors[r].kind == "output")
            if dead:
                resident.discard(r)
                live -= size(r)
    return profile


def max_live(graph: LifetimeGraph, order: Sequence[int] | None = None, include_weights: bool = False,
             alignment: int = 1) -> int:
    """Peak of the live profile of `order` (program order by default)."""
    order = list(range(len(graph.ops))) if order is None else order
    return max(live_profile(graph, order, include_weights, alignment), default=0)


def m_p_lower_bound(graph: LifetimeGraph, include_weights: bool = False, alignment: int = 1) -> int:
    """A cheap lower bound on the minimum peak over all orders."""
    return m_r(graph, include_weights, alignment)


def check_order(graph: LifetimeGraph, order: Sequence[int]) -> None:
    """Raise ValueError unless `order` runs every op once, after its producers."""
    if sorted(order) != list(range(len(graph.ops))):
        raise ValueError("order must list every op exactly once")
    pos = {op_id: i for i, op_id in enumerate(order)}
    for op_id in order:
        for p in graph.predecessors(op_id):
            if pos[p] > pos[op_id]:
                raise ValueError(f"order runs {graph.ops[op_id].name!r} before its producer {graph.ops[p].name!r}")

"""Rematerialisation baselines: what users get today, as sequences for planner.remat_plan.

  checkpoint_all  keep every activation (the program order, no recompute)
  chen_sqrt       Chen et al. 2016: cut the forward pass into sqrt(n) segments, keep each
                  segment's last output, recompute the rest when the backward pass reads it
  chen_greedy     Chen et al. 2016, Algorithm 1: walk the forward pass summing activation bytes
                  and checkpoint whenever the sum passes b; b swept over a grid, the cheapest
                  sequence within the peak budget wins
  pytorch         PyTorch's min-cut partition with `activation_memory_budget`
                  (frontends.training.TrainingGraph.pytorch_partition), swept the same way
The Chen baselines need a training graph (ops tagged attrs["phase"] = "forward"/"backward");
a graph without phases has no forward pass to checkpoint and they return None.
The sequence of a checkpoint set runs the program order; in the backward pass a forward
tensor that is neither checkpointed nor recomputed yet is recomputed right before its first
backward reader (its own missing inputs first) and kept until its last reader. Ops that cannot
be recomputed are always checkpoints; random ones are recomputed with their first run's numbers,
as torch.utils.checkpoint does (preserve_rng_state). PyTorch's partition recomputes them with
fresh numbers instead (wrong gradients), so its sequences that do are left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from planner import remat_plan
from planner.graph import LifetimeGraph
from planner.remat_plan import Item
from planner.target import Target

REMAT_BASELINES = ("checkpoint_all", "chen_sqrt", "chen_greedy", "pytorch")


def forward_ops(graph: LifetimeGraph) -> list[int] | None:
    """Ops of the forward pass that own a buffer, in order (None without phase tags)."""
    if not any("phase" in op.attrs for op in graph.ops):
        return None
    return [op.id for op in graph.ops if op.attrs.get("phase") == "forward"]


def checkpoint_all(graph: LifetimeGraph) -> list[Item]:
    return list(range(len(graph.ops)))


def sequence_from_checkpoints(graph: LifetimeGraph, target: Target, keep: Iterable[int]) -> list[Item]:
    """The sequence that keeps the outputs of the forward ops in `keep` and recomputes the others."""
    from formulations.remat_problem import build_problem

    p = build_problem(graph, target)
    keep = set(keep) | {op.id for op in graph.ops if not op.recomputable}
    forward = set(forward_ops(graph) or ())
    seq: list[Item] = []
    ready: set[int] = set()  # forward ops recomputed in the backward pass (or kept)

    def materialise(u: int) -> None:
        if u in ready or u not in forward or u in keep or p.size[u] == 0:
            return
        for d in p.deps[u]:
            materialise(d)
        seq.append(u)
        ready.add(u)

    for op in graph.ops:
        if op.id not in forward:
            for d in p.deps[op.id]:
                materialise(d)
        seq.append(op.id)
    return seq


def chen_sqrt(graph: LifetimeGraph, target: Target) -> list[Item] | None:
    fwd = [v for v in forward_ops(graph) or () if graph.ops[v].outputs]
    if not fwd:
        return None
    k = max(1, math.isqrt(len(fwd)))
    step = math.ceil(len(fwd) / k)
    keep = {fwd[i] for i in range(step - 1, len(fwd), step)} | {fwd[-1]}
    return sequence_from_checkpoints(graph, target, keep)


def chen_greedy_checkpoints(graph: LifetimeGraph, target: Target, b: int) -> set[int]:
    """Algorithm 1 of Chen et al.: checkpoint when the running activation sum exceeds b."""
    from formulations.remat_problem import build_problem

    p = build_problem(graph, target)
    keep: set[int] = set()
    x = 0
    for v in forward_ops(graph) or ():
        x += p.size[v]
        if x > b:
            keep.add(v)
            x = 0
    return keep


def best_within(graph: LifetimeGraph, target: Target, budget: int,
                candidates: Iterable[list[Item] | None]) -> list[Item] | None:
    """The candidate with the least recompute FLOPs whose peak is within `budget`."""
    best, best_cost = None, math.inf
    for seq in candidates:
        if seq is None or remat_plan.peak(graph, target, seq) > budget:
            continue
        cost = remat_plan.recompute_flops(graph, seq)
        if cost < best_cost:
            best, best_cost = seq, cost
    return best


def recomputes_random(graph: LifetimeGraph, sequence: Sequence[Item]) -> bool:
    """Whether `sequence` runs an op that draws random numbers twice (a fresh dropout mask in the
    backward pass: wrong gradients; PyTorch's partition does this below budget 1, pytorch#190758)."""
    seen: set[int] = set()
    for item in sequence:
        if isinstance(item, int) and graph.ops[item].attrs.get("random"):
            if item in seen:
                return True
            seen.add(item)
    return False


def chen_greedy(graph: LifetimeGraph, target: Target, budget: int, steps: int = 24) -> list[Item] | None:
    """Chen's greedy with b swept geometrically from one buffer to the whole forward pass."""
    from formulations.remat_problem import build_problem

    fwd = forward_ops(graph)
    if not fwd:
        return None
    sizes = [s for s in (build_problem(graph, target).size[v] for v in fwd) if s]
    lo, hi = max(1, min(sizes, default=1)), max(1, sum(sizes))
    grid = sorted({int(lo * (hi / lo) ** (i / (steps - 1))) for i in range(steps)})
    return best_within(graph, target, budget,
                       (sequence_from_checkpoints(graph, target, chen_greedy_checkpoints(graph, target, b))
                        for b in grid))


def pytorch_minimal(partition: Callable[[float], Sequence[Item]], graph: LifetimeGraph, target: Target,
                    budget: int, fractions: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2,
                                                                 0.1, 0.05, 0.0)) -> list[Item] | None:
    """PyTorch's min-cut partition at each activation_memory_budget of `fractions`; the cheapest
    sequence within the peak budget."""
    return best_within(graph, target, budget, (seq for f in fractions
                                               if not recomputes_random(graph, seq := list(partition(f)))))

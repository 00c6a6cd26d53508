"""The rematerialisation problem every remat method reads: nodes, sizes, costs, dependencies.

Node v is op v of the graph (program order is the given topological order, as in Checkmate
and Moccasin). Its size is the aligned bytes of its buffer-owning outputs (0 for views and
ops that write nothing the scratchpad holds). Its dependencies are the producers of the roots
of the tensors it reads (a view read needs the view's root). Graph inputs (and weights a
target counts) are `sources`: loaded before their first read; loading one again costs its bytes (traffic, time)
or nothing (recompute: graph inputs live off-chip in every plan).

Costs, in one unit per objective (`objective`):
  recompute  recompute FLOPs (reloads not allowed)
  traffic    off-chip bytes (recompute not allowed); a reload also costs the one store before
  time       FLOPs / compute_rate + bytes / off-chip bandwidth (both allowed), in seconds
Solvers need integers: `scale` turns costs into integers of at most ~1e6 (exact for the
integer costs of random layered graphs, which stay below that).
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.graph import LifetimeGraph
from planner.target import Target, align_up

OBJECTIVES = ("recompute", "traffic", "time")
COST_CEILING = 1_000_000  # largest integer cost handed to a solver


@dataclass(frozen=True)
class RematProblem:
    graph: LifetimeGraph
    target: Target
    objective: str
    size: tuple[int, ...]  # per node: aligned bytes of its buffer-owning outputs
    deps: tuple[tuple[int, ...], ...]  # per node: producer nodes of the roots it reads
    sources: tuple[tuple[int, ...], ...]  # per node: source tensors (inputs, counted weights) it reads
    source_size: dict[int, int]  # source tensor id -> aligned bytes
    source_reload_cost: dict[int, float]  # source tensor id -> cost of loading it again (0 for `recompute`)
    recompute_cost: tuple[float, ...]  # per node, in the objective's unit (inf: not allowed)
    reload_cost: tuple[float, ...]  # per node: the reload itself (inf: not allowed)
    store_cost: tuple[float, ...]  # per node: the one store a reload needs first
    scale: float  # integer cost = round(cost * scale)

    @property
    def n(self) -> int:
        return len(self.size)

    def int_cost(self, cost: float) -> int:
        return round(cost * self.scale)

    @property
    def users(self) -> tuple[tuple[int, ...], ...]:
        out: list[list[int]] = [[] for _ in range(self.n)]
        for v, ds in enumerate(self.deps):
            for u in ds:
                out[u].append(v)
        return tuple(tuple(u) for u in out)

    def source_users(self) -> dict[int, tuple[int, ...]]:
        out: dict[int, list[int]] = {s: [] for s in self.source_size}
        for v, ss in enumerate(self.sources):
            for s in ss:
                out[s].append(v)
        return {s: tuple(u) for s, u in out.items()}


def build_problem(graph: LifetimeGraph, target: Target, objective: str = "recompute") -> RematProblem:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown remat objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    owns = [graph.is_buffer(t.id, target.include_weights) for t in graph.tensors]
    aligned = [align_up(t.nbytes, target.alignment) for t in graph.tensors]
    producer = graph.producer
    size, deps, sources, rc, lc, sc = [], [], [], [], [], []
    source_size: dict[int, int] = {}
    inf = float("inf")
    for op in graph.ops:
        outs = [t for t in op.outputs if owns[t]]
        size.append(sum(aligned[t] for t in outs))
        d: dict[int, None] = {}
        s: dict[int, None] = {}
        for x in op.inputs:
            r = graph.root(x)
            if not owns[r]:
                continue
            if r in producer:
                d[producer[r]] = None
            else:
                s[r] = None
                source_size[r] = aligned[r]
        deps.append(tuple(d))
        sources.append(tuple(s))
        nbytes = sum(graph.tensors[t].nbytes for t in outs)
        flops_cost = op.flops if objective == "recompute" else op.flops / target.compute_rate
        byte_cost = nbytes if objective == "traffic" else nbytes / target.offchip_bandwidth
        rc.append(inf if objective == "traffic" or not op.recomputable else flops_cost)
        lc.append(inf if objective == "recompute" or not outs else byte_cost)
        sc.append(0.0 if objective == "recompute" else byte_cost)
    finite = [c for c in (*rc, *lc, *sc) if c != inf and c > 0]
    top = max(finite, default=1.0)
    scale = 1.0 if top <= COST_CEILING and all(float(c).is_integer() for c in finite) else COST_CEILING / top
    per_byte = {"recompute": 0.0, "traffic": 1.0, "time": 1.0 / target.offchip_bandwidth}[objective]
    source_reload = {t: graph.tensors[t].nbytes * per_byte for t in source_size}
    return RematProblem(graph, target, objective, tuple(size), tuple(deps), tuple(sources), source_size,
                        source_reload, tuple(rc), tuple(lc), tuple(sc), scale)

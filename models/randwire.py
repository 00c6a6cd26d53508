"""Randomly wired networks (Xie et al. 2019, "Exploring Randomly Wired Neural Networks").

Graph generators (our own, seeded `random.Random`; same seed -> same edges):
  ws_graph(n, k, p)  Watts-Strogatz: a ring where every node links to its k/2 clockwise
                     neighbours; then, for i = 1..k/2 and every node v in ring order, the edge
                     (v, v+i) is rewired with probability p to (v, w), w uniform among nodes that
                     are neither v nor already linked to v. n*k/2 edges.
  er_graph(n, p)     Erdos-Renyi: every pair linked with probability p. ~p*n(n-1)/2 edges.
  ba_graph(n, m)     Barabasi-Albert: m seed nodes without edges; each later node links to m
                     distinct earlier nodes drawn with probability proportional to degree (the
                     first one to all m seeds). m*(n-m) edges.
Each undirected edge is oriented from the lower to the higher node index, which makes a DAG.

Network (small regime of the paper, the variant HMCOS benchmarks: N nodes in every stage):
  conv 3x3/2 C/2 - BN; ReLU - conv 3x3/2 C - BN;  three random stages of n nodes with C, 2C, 4C
  channels; ReLU - conv 1x1 1280 - BN; global average pool; fc.
  Node: sigmoid-weighted sum of its inputs (a node with one input takes it as is) -> ReLU ->
  depthwise 3x3 -> pointwise 1x1 -> BN. Nodes without predecessors read the stage input with
  stride 2; the stage output is the mean of the nodes without successors.
The paper's first random stage has N/2 nodes; here every stage has n (as HMCOS uses it).
Parameters at C=78, n=32, seed 0: WS 5,640,454 (paper: 5.6M), ER 5,727,843, BA 5,677,900.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from models.registry import ModelSpecError, register


@dataclass(frozen=True)
class RandomDAG:
    n: int  # nodes 0..n-1; index order is a topological order
    edges: tuple[tuple[int, int], ...]  # (u, v) with u < v, sorted, no repeats

    @cached_property
    def predecessors(self) -> tuple[tuple[int, ...], ...]:
        preds: list[list[int]] = [[] for _ in range(self.n)]
        for u, v in self.edges:
            preds[v].append(u)
        return tuple(tuple(p) for p in preds)

    @cached_property
    def sources(self) -> tuple[int, ...]:
        """Nodes that read the stage input."""
        return tuple(v for v in range(self.n) if not self.predecessors[v])

    @cached_property
    def sinks(self) -> tuple[int, ...]:
        """Nodes whose mean is the stage output."""
        has_successor = {u for u, _ in self.edges}
        return tuple(v for v in range(self.n) if v not in has_successor)


def _dag(n: int, undirected: set[tuple[int, int]]) -> RandomDAG:
    return RandomDAG(n, tuple(sorted((min(a, b), max(a, b)) for a, b in undirected)))


def ws_graph(n: int, k: int = 4, p: float = 0.75, seed: int = 0) -> RandomDAG:
    """Watts-Strogatz small-world graph WS(n, k, p), oriented low -> high."""
    if k % 2 or not 0 < k < n:
        raise ModelSpecError(f"WS graph: k={k} must be even and in 2..{n - 1} for n={n}")
    rng = random.Random(seed)
    neighbours = [set() for _ in range(n)]
    for v in range(n):
        for i in range(1, k // 2 + 1):
            w = (v + i) % n
            neighbours[v].add(w)
            neighbours[w].add(v)
    for i in range(1, k // 2 + 1):
        for v in range(n):
            w = (v + i) % n
            if w not in neighbours[v] or rng.random() >= p:
                continue
            choices = [u for u in range(n) if u != v and u not in neighbours[v]]
            if not choices:
                continue
            new = rng.choice(choices)
            neighbours[v].discard(w)
            neighbours[w].discard(v)
            neighbours[v].add(new)
            neighbours[new].add(v)
    return _dag(n, {(v, w) for v in range(n) for w in neighbours[v] if v < w})


def er_graph(n: int, p: float = 0.2, seed: int = 0) -> RandomDAG:
    """Erdos-Renyi graph ER(n, p), oriented low -> high."""
    if not 0 <= p <= 1:
        raise ModelSpecError(f"ER graph: p={p} is not a probability")
    rng = random.Random(seed)
    return _dag(n, {(u, v) for u in range(n) for v in range(u + 1, n) if rng.random() < p})


def ba_graph(n: int, m: int = 5, seed: int = 0) -> RandomDAG:
    """Barabasi-Albert preferential attachment graph BA(n, m), oriented low -> high."""
    if not 0 < m < n:
        raise ModelSpecError(f"BA graph: m={m} must be in 1..{n - 1} for n={n}")
    rng = random.Random(seed)
    edges: set[tuple[int, int]] = set()
    endpoints: list[int] = []  # every node once per incident edge: uniform draws are degree-proportional
    targets = list(range(m))
    for v in range(m, n):
        edges.update((t, v) for t in targets)
        endpoints += targets + [v] * m
        chosen: set[int] = set()
        while len(chosen) < m:
            chosen.add(rng.choice(endpoints))
        targets = sorted(chosen)
    return _dag(n, edges)


GENERATORS: dict[str, Callable[..., RandomDAG]] = {"ws": ws_graph, "er": er_graph, "ba": ba_graph}


def stage_graphs(kind: str, n: int = 32, seed: int = 0, stages: int = 3, **graph_params) -> list[RandomDAG]:
    """The DAG of every random stage of a RandWire network; stage s uses seed*1000 + s."""
    if kind not in GENERATORS:
        raise ModelSpecError(f"unknown random graph kind {kind!r}; known: {', '.join(GENERATORS)}")
    return [GENERATORS[kind](n, seed=seed * 1000 + s, **graph_params) for s in range(stages)]


class Node(nn.Module):
    """Weighted sum -> ReLU -> separable 3x3 -> BN."""

    def __init__(self, inputs: int, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(inputs)) if inputs > 1 else None
        self.conv = nn.Sequential(nn.ReLU(), nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
                                  nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        if self.weights is None:
            return self.conv(xs[0])
        w = torch.sigmoid(self.weights)
        total = xs[0] * w[0]
        for i in range(1, len(xs)):
            total = total + xs[i] * w[i]
        return self.conv(total)


class RandomStage(nn.Module):
    def __init__(self, dag: RandomDAG, c_in: int, c_out: int):
        super().__init__()
        self.dag = dag
        self.nodes = nn.ModuleList(
            Node(1, c_in, c_out, 2) if not preds else Node(len(preds), c_out, c_out, 1)
            for preds in dag.predecessors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs: list[torch.Tensor] = []
        for node, preds in zip(self.nodes, self.dag.predecessors):
            outs.append(node([outs[p] for p in preds] if preds else [x]))
        total = outs[self.dag.sinks[0]]
        for v in self.dag.sinks[1:]:
            total = total + outs[v]
        return total / len(self.dag.sinks)


class RandWire(nn.Module):
    def __init__(self, dags: list[RandomDAG], channels: int, classes: int):
        super().__init__()
        c = channels
        self.stem = nn.Sequential(
            nn.Conv2d(3, c // 2, 3, 2, 1, bias=False), nn.BatchNorm2d(c // 2),
            nn.ReLU(), nn.Conv2d(c // 2, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c))
        widths = [c * 2 ** s for s in range(len(dags))]
        self.stages = nn.Sequential(*(RandomStage(d, w_in, w) for d, w_in, w in zip(dags, [c, *widths], widths)))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(widths[-1], 1280, 1, bias=False), nn.BatchNorm2d(1280))
        self.classifier = nn.Linear(1280, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.stages(self.stem(images))).mean(dim=(2, 3)))


def _build(kind: str, batch: int, res: int, n: int, channels: int, seed: int, classes: int, **graph_params):
    if channels < 2 or res < 32:
        raise ModelSpecError(f"channels={channels}, res={res}: need channels >= 2 and res >= 32")
    module = RandWire(stage_graphs(kind, n, seed, **graph_params), channels, classes)
    return module, (torch.randn(batch, 3, res, res),)


_SMALL = dict(batch=2, res=32, n=8, channels=8, classes=10)


@register("randwire_ws", small=_SMALL, family="randwire")
def randwire_ws(batch: int = 1, res: int = 224, n: int = 32, channels: int = 78, seed: int = 0, k: int = 4,
                p: float = 0.75, classes: int = 1000):
    """RandWire-WS(4, 0.75), small regime C=78, 32 nodes per stage (Xie et al. 2019)."""
    return _build("ws", batch, res, n, channels, seed, classes, k=k, p=p)


@register("randwire_er", small=_SMALL, family="randwire")
def randwire_er(batch: int = 1, res: int = 224, n: int = 32, channels: int = 78, seed: int = 0, p: float = 0.2,
                classes: int = 1000):
    """RandWire-ER(0.2), small regime C=78, 32 nodes per stage (Xie et al. 2019)."""
    return _build("er", batch, res, n, channels, seed, classes, p=p)


@register("randwire_ba", small=_SMALL, family="randwire")
def randwire_ba(batch: int = 1, res: int = 224, n: int = 32, channels: int = 78, seed: int = 0, m: int = 5,
                classes: int = 1000):
    """RandWire-BA(5), small regime C=78, 32 nodes per stage (Xie et al. 2019)."""
    return _build("ba", batch, res, n, channels, seed, classes, m=m)

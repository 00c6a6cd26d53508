"""Random layered DAGs for rematerialisation studies, in the style of the "random layered"
graphs of Gagrani et al. 2022 (neural topological ordering) that Moccasin (Bartan et al.,
ICML 2023) also solves. Produces a planner.graph.LifetimeGraph directly; no torch involved.

Model (all draws from one `random.Random(seed)`, so a seed fixes the graph):
  * n_nodes - 1 nodes are cut into layers whose widths are uniform in width=(lo, hi)
    (the last layer takes what is left); one more node, the sink, forms the final layer.
  * Layer-0 nodes read the single graph input tensor.
  * A node of layer l >= 1 reads each node of layer l-1 with probability edge_density
    (at least one: drawn uniformly if none was picked) and, with probability skip_prob,
    one extra node drawn uniformly from layers 0..l-2 (a skip connection).
  * A node that nobody reads gets a reader drawn uniformly from the next layer; the sink
    reads every node of the last regular layer, so every tensor reaches the output.
  * Every node writes one tensor of uniform integer size in size_range bytes; its op costs a
    uniform integer number of FLOPs in cost_range. The sink's tensor is the graph output.
Units and defaults are ours (the papers sample unitless costs and sizes).
"""

from __future__ import annotations

import random

from models.registry import ModelSpecError
from planner.graph import LifetimeGraph, Op, Tensor


def _check_range(name: str, value: tuple[int, int], low: int) -> None:
    lo, hi = value
    if not low <= lo <= hi:
        raise ModelSpecError(f"{name}={value}: need {low} <= lo <= hi")


def random_layered(n_nodes: int, *, width: tuple[int, int] = (2, 8), edge_density: float = 0.3,
                   skip_prob: float = 0.1, cost_range: tuple[int, int] = (1_000, 1_000_000),
                   size_range: tuple[int, int] = (1 << 10, 1 << 20), seed: int = 0) -> LifetimeGraph:
    """A random layered DAG of n_nodes ops, one output tensor each, plus one input tensor."""
    if n_nodes < 1:
        raise ModelSpecError(f"n_nodes={n_nodes}: need at least 1")
    _check_range("width", width, 1)
    _check_range("cost_range", cost_range, 0)
    _check_range("size_range", size_range, 0)
    for name, p in (("edge_density", edge_density), ("skip_prob", skip_prob)):
        if not 0.0 <= p <= 1.0:
            raise ModelSpecError(f"{name}={p} is not a probability")
    rng = random.Random(seed)

    layers: list[list[int]] = []
    placed = 0
    while placed < n_nodes - 1:
        w = min(rng.randint(*width), n_nodes - 1 - placed)
        layers.append(list(range(placed, placed + w)))
        placed += w
    sink = n_nodes - 1
    layers.append([sink])

    preds: list[set[int]] = [set() for _ in range(n_nodes)]
    for li in range(1, len(layers) - 1):
        below = layers[li - 1]
        earlier = [v for layer in layers[: li - 1] for v in layer]
        for v in layers[li]:
            preds[v].update(u for u in below if rng.random() < edge_density)
            if not preds[v]:
                preds[v].add(rng.choice(below))
            if earlier and rng.random() < skip_prob:
                preds[v].add(rng.choice(earlier))
        read = set().union(*(preds[v] for v in layers[li]))
        for u in below:
            if u not in read:
                preds[rng.choice(layers[li])].add(u)
    if len(layers) > 1:
        preds[sink].update(layers[-2])

    # tensor 0 is the graph input, tensor v + 1 the output of node v
    input_bytes = rng.randint(*size_range)
    tensors = [Tensor(0, "input", input_bytes, "uint8", (input_bytes,), "input")]
    ops: list[Op] = []
    layer_of = {v: li for li, layer in enumerate(layers) for v in layer}
    for v in range(n_nodes):
        nbytes = rng.randint(*size_range)
        kind = "output" if v == sink else "activation"
        tensors.append(Tensor(v + 1, f"n{v}", nbytes, "uint8", (nbytes,), kind))
        inputs = tuple(u + 1 for u in sorted(preds[v])) or (0,)
        ops.append(Op(v, f"node{v}", "layered", inputs, (v + 1,), float(rng.randint(*cost_range)),
                      attrs={"layer": layer_of[v]}))
    return LifetimeGraph(f"layered-n{n_nodes}-s{seed}", tuple(tensors), tuple(ops))

"""Undo exporter decompositions that PyTorch (and ONNX runtimes) execute as one kernel.

The TorchScript exporter at opset 17 writes `nn.Linear` on a 3-D input as
MatMul + Add, `nn.GELU` as 5 (erf) or 9 (tanh) element-wise nodes and `nn.SiLU`
as Sigmoid + Mul. Planned node by node, each intermediate is a full-size
activation that neither eager PyTorch nor onnxruntime ever allocates (BERT:
twice the activation bytes of the fx lowering). Two rewrites, both checked:
  - MatMul -> Add(bias weight broadcast along the last dim), the MatMul result
    read by nothing else, becomes one `memplan::MatMulAdd(A, B, C) = A @ B + C`;
  - an element-wise region around one Erf / Tanh / Sigmoid whose only outside
    input is x and only outside output is y becomes `Gelu(x)` (approximate
    "none" or "tanh") or `Swish(x)` (alpha 1) — standard ONNX ops of opsets 20
    and 24 — but only after evaluating the region on sample points and finding
    it equal to that function.
Everything else is left as exported.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import onnx
from onnx import helper

from frontends.onnx_fold import KeptNode, StaticGraph

_POINTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Erf", "Tanh", "Sigmoid", "Neg", "Sqrt"})
_CORES = frozenset({"Erf", "Tanh", "Sigmoid"})
_WINDOW = 32  # nodes scanned after a candidate input: exporters write these patterns contiguously
_SAMPLES = np.linspace(-5.0, 5.0, 81, dtype=np.float32)


def _gelu_erf(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _swish(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


_FUNCTIONS = (  # (op_type, attributes, reference); the two GELUs differ by > 1e-4 somewhere in [-5, 5]
    ("Gelu", {"approximate": "none"}, _gelu_erf),
    ("Gelu", {"approximate": "tanh"}, _gelu_tanh),
    ("Swish", {"alpha": 1.0}, _swish),
)


def fuse(static: StaticGraph, opset: int) -> StaticGraph:
    nodes = _fuse_bias(list(static.nodes), static)
    nodes = _fuse_activations(nodes, static, opset)
    return replace(static, nodes=tuple(nodes))


def _consumers(nodes: list[KeptNode]) -> dict[str, list[int]]:
    users: dict[str, list[int]] = {}
    for i, k in enumerate(nodes):
        for x in dict.fromkeys(k.node.input):
            if x:
                users.setdefault(x, []).append(i)
    return users


def _fuse_bias(nodes: list[KeptNode], s: StaticGraph) -> list[KeptNode]:
    users = _consumers(nodes)
    drop: set[int] = set()
    for i, k in enumerate(nodes):
        if k.node.op_type != "MatMul" or k.node.domain not in ("", "ai.onnx"):
            continue
        y = k.node.output[0]
        if y in s.outputs or len(users.get(y, ())) != 1:
            continue
        j = users[y][0]
        add = nodes[j].node
        if add.op_type != "Add" or len(add.input) != 2 or add.input[0] == add.input[1]:
            continue
        bias = add.input[1] if add.input[0] == y else add.input[0]
        b, out = s.values[bias], s.values[y].shape
        is_weight = b.weight is not None or b.const is not None
        along_last = len(b.shape) <= len(out) and all(d == 1 for d in b.shape[:-1]) and \
            (not b.shape or b.shape[-1] in (1, out[-1]))
        if not (is_weight and along_last and s.values[add.output[0]].shape == out):
            continue
        fused = helper.make_node("MatMulAdd", [*k.node.input, bias], [add.output[0]], name=k.name,
                                 domain="memplan")
        nodes[i] = KeptNode(fused, k.name, (k.name, nodes[j].name))  # A and B exist here; the bias always does
        drop.add(j)
    return [k for i, k in enumerate(nodes) if i not in drop]


def _fuse_activations(nodes: list[KeptNode], s: StaticGraph, opset: int) -> list[KeptNode]:
    users = _consumers(nodes)
    producer = {x: i for i, k in enumerate(nodes) for x in k.node.output if x}
    taken: set[int] = set()
    replacements: dict[int, KeptNode] = {}
    for c, core in enumerate(nodes):
        if core.node.op_type not in _CORES or c in taken:
            continue
        for x in _candidates(nodes, producer, s, c):
            region = _region(nodes, users, s, x, start=min(users[x]))
            if c not in region or taken & set(region):
                continue
            y = _single_output(nodes, users, s, region)
            if y is None:
                continue
            match = _identify(nodes, s, region, x, y, opset)
            if match is None:
                continue
            op_type, attrs = match
            last = max(region)
            fused = helper.make_node(op_type, [x], [y], name=nodes[last].name, **attrs)
            replacements[last] = KeptNode(fused, nodes[last].name, tuple(nodes[r].name for r in region))
            taken.update(region)
            break
    return [replacements.get(i, k) for i, k in enumerate(nodes) if i not in taken or i in replacements]


def _candidates(nodes: list[KeptNode], producer: dict[str, int], s: StaticGraph, core: int) -> list[str]:
    """Non-constant values up to 6 element-wise steps before the core, nearest first."""
    found: list[str] = []
    frontier = [core]
    for _ in range(6):
        nxt = []
        for i in frontier:
            for x in nodes[i].node.input:
                if x and s.values[x].const is None and x not in found:
                    found.append(x)
                    p = producer.get(x)
                    if p is not None and nodes[p].node.op_type in _POINTWISE:
                        nxt.append(p)
        frontier = nxt
    return found


def _region(nodes: list[KeptNode], users: dict[str, list[int]], s: StaticGraph, x: str, start: int) -> list[int]:
    """Element-wise nodes after `start` computing from x and constants only."""
    inside, region = {x}, []
    for i in range(start, min(len(nodes), start + _WINDOW)):
        n = nodes[i].node
        if n.op_type not in _POINTWISE or n.domain not in ("", "ai.onnx"):
            continue
        live = [v for v in n.input if v and s.values[v].const is None]
        if live and all(v in inside for v in live):
            region.append(i)
            inside.update(o for o in n.output if o)
    return region


def _single_output(nodes, users, s: StaticGraph, region: list[int]) -> str | None:
    members = set(region)
    escaping = {o for i in region for o in nodes[i].node.output
                if o and (o in s.outputs or any(u not in members for u in users.get(o, ())))}
    return escaping.pop() if len(escaping) == 1 else None


def _identify(nodes, s: StaticGraph, region: list[int], x: str, y: str, opset: int):
    """Evaluate the region on sample points; (op_type, attributes) of the function it computes, or None."""
    from onnx.reference import ReferenceEvaluator

    if s.values[x].elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                      onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE):
        return None
    if s.values[x].shape != s.values[y].shape:
        return None
    env = {x: _SAMPLES}
    try:
        for i in region:
            n = nodes[i].node
            feeds = {v: env[v] if v in env else s.values[v].const for v in n.input if v}
            outs = ReferenceEvaluator(n, opsets={"": opset}).run(None, feeds)
            env.update(zip(n.output, outs))
    except Exception:  # constants that do not broadcast against a sample vector: not one of ours
        return None
    got = np.asarray(env[y], dtype=np.float64)
    if got.shape != _SAMPLES.shape:
        return None
    for op_type, attrs, reference in _FUNCTIONS:
        if np.allclose(got, reference(_SAMPLES.astype(np.float64)), rtol=1e-5, atol=2e-6):
            return op_type, attrs
    return None

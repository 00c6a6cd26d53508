"""Undo exporter decompositions that PyTorch (and ONNX runtimes) execute as one kernel.

The TorchScript exporter writes `nn.Linear` on a 3-D input as MatMul + Add,
`nn.GELU` as 5 (erf) or 9 (tanh) element-wise nodes, `nn.SiLU` as Sigmoid +
Mul and, before opset 17, `nn.LayerNorm` as 9 nodes (ReduceMean, Sub, Pow,
ReduceMean, Add, Sqrt, Div, Mul, Add). Planned node by node, each intermediate
is a full-size activation that neither eager PyTorch nor onnxruntime allocates
(BERT: twice the activation bytes of the fx lowering). The rewrites, all checked:
  - MatMul -> Add(bias weight broadcast along the last dim), the MatMul result
    read by nothing else, becomes one `memplan::MatMulAdd(A, B, C) = A @ B + C`;
  - a region around one Erf / Tanh / Sigmoid / ReduceMean that reads only x,
    constants and (LayerNorm) per-channel weights, and whose only value read
    outside is y, becomes `Gelu(x)` (approximate "none" / "tanh"), `Swish(x)`
    (alpha 1) or `LayerNormalization(x, gamma, beta)` over the last axis
    (standard ONNX ops of opsets 20, 24 and 17) -- but only after evaluating the
    region on sample inputs, with random stand-ins for the weights, and finding
    it equal to that function (the two GELUs differ by up to 4.7e-4 on [-5, 5];
    the tolerance is 2e-6);
  - MatMul(Q, K^T) -> [Mul | Div by a constant scalar] -> [Add(mask) |
    Where(cond, -inf, .)] -> Softmax(last axis) -> [Casts to its own type] ->
    MatMul(., V) over 4-D (batch, heads, seq, head) values, each intermediate read
    only by the next, becomes the standard `Attention(Q, K, V, mask)` (opset 23,
    `scale`, `is_causal`), as frontends.fx_attention fuses the same pattern into
    aten.scaled_dot_product_attention: neither lowering allocates the scores. K is
    K^T's Transpose input re-permuted (a view) or a new Transpose of K^T; a Where
    condition becomes a boolean mask of the allowed positions (Not(cond), folded when
    cond is a constant), or is_causal=1 when cond is the constant strict upper triangle.
Everything else is left as exported.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import onnx
from onnx import helper

from frontends.onnx_attention import fuse_attention
from frontends.onnx_fold import KeptNode, StaticGraph, Value, evaluate

_POINTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Erf", "Tanh", "Sigmoid", "Neg", "Sqrt", "Reciprocal"})
_LN_OPS = _POINTWISE | {"ReduceMean"}
_CORES = {"Erf": "activation", "Tanh": "activation", "Sigmoid": "activation", "ReduceMean": "layernorm"}
_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                          onnx.TensorProto.DOUBLE})
_WINDOW = 32  # nodes scanned after a candidate input: exporters write these patterns contiguously
_SAMPLES = np.linspace(-5.0, 5.0, 81, dtype=np.float32)


def _gelu_erf(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _swish(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


_FUNCTIONS = (  # (op_type, attributes, reference)
    ("Gelu", {"approximate": "none"}, _gelu_erf),
    ("Gelu", {"approximate": "tanh"}, _gelu_tanh),
    ("Swish", {"alpha": 1.0}, _swish),
)


def fuse(static: StaticGraph, opset: int) -> StaticGraph:
    nodes = _fuse_bias(list(static.nodes), static)
    nodes = _fuse_regions(nodes, static, opset)
    nodes, values = fuse_attention(nodes, static, opset)
    static = replace(static, values=values)
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


def _fuse_regions(nodes: list[KeptNode], s: StaticGraph, opset: int) -> list[KeptNode]:
    """Replace each verified activation / LayerNorm region by one node (see the module docstring)."""
    users = _consumers(nodes)
    producer = {x: i for i, k in enumerate(nodes) for x in k.node.output if x}
    taken: set[int] = set()
    replacements: dict[int, KeptNode] = {}
    for c, core in enumerate(nodes):
        family = _CORES.get(core.node.op_type)
        if family is None or c in taken:
            continue
        for x in _candidates(nodes, producer, s, c):
            region = _region(nodes, s, x, min(users[x]), family)
            if c not in region or taken & set(region):
                continue
            found = _best_subregion(nodes, users, s, region, c, x, family, opset)
            if found is None:
                continue
            sub, y, op_type, side, attrs = found
            last = max(sub)
            fused = helper.make_node(op_type, [x, *side], [y], name=nodes[last].name, **attrs)
            replacements[last] = KeptNode(fused, nodes[last].name, tuple(nodes[r].name for r in sub))
            taken.update(sub)
            break
    return [replacements.get(i, k) for i, k in enumerate(nodes) if i not in taken or i in replacements]


def _candidates(nodes: list[KeptNode], producer: dict[str, int], s: StaticGraph, core: int) -> list[str]:
    """Non-constant values up to 8 steps before the core through fusable nodes, nearest first."""
    found: list[str] = []
    frontier = [core]
    for _ in range(8):
        nxt = []
        for i in frontier:
            for x in nodes[i].node.input:
                if x and s.values[x].const is None and s.values[x].weight is None and x not in found:
                    found.append(x)
                    p = producer.get(x)
                    if p is not None and nodes[p].node.op_type in _LN_OPS:
                        nxt.append(p)
        frontier = nxt
    return found


def _side_ok(v: Value, x: Value, family: str) -> bool:
    """Inputs a region may read besides x: constants; for LayerNorm also per-channel weights."""
    if v.const is not None and v.weight is None:
        return True
    return family == "layernorm" and v.weight is not None and v.shape == x.shape[-1:]


def _region(nodes: list[KeptNode], s: StaticGraph, x: str, start: int, family: str) -> list[int]:
    """The nodes after `start` that compute from x (and side inputs) alone, in program order."""
    ops = _POINTWISE if family == "activation" else _LN_OPS
    inside, region = {x}, []
    for i in range(start, min(len(nodes), start + _WINDOW)):
        n = nodes[i].node
        if n.op_type not in ops or n.domain not in ("", "ai.onnx"):
            continue
        live = [v for v in n.input if v and not _side_ok(s.values[v], s.values[x], family)]
        if live and all(v in inside for v in live):
            region.append(i)
            inside.update(o for o in n.output if o)
    return region


def _best_subregion(nodes, users, s: StaticGraph, region: list[int], core: int, x: str, family: str, opset: int):
    """The largest part of the region ending in one value y that is closed and computes a known function."""
    members = set(region)
    producer = {o: i for i in region for o in nodes[i].node.output if o}
    for end in reversed(region):
        y = nodes[end].node.output[0]
        if s.values[y].shape != s.values[x].shape:
            continue
        sub, stack = set(), [end]
        while stack:  # the ancestors of y inside the region
            i = stack.pop()
            if i not in sub:
                sub.add(i)
                stack.extend(producer[v] for v in nodes[i].node.input if v in producer)
        inner = {o for i in sub for o in nodes[i].node.output if o} - {y}
        if core not in sub or any(o in s.outputs or set(users.get(o, ())) - sub for o in inner):
            continue
        ordered = sorted(sub & members)
        match = _identify(nodes, s, ordered, x, y, family, opset)
        if match is not None:
            return (ordered, y, *match)
    return None


def _identify(nodes, s: StaticGraph, region: list[int], x: str, y: str, family: str, opset: int):
    """Evaluate the region on sample data: (op_type, side inputs, attributes) of what it computes, or None."""
    xv = s.values[x]
    if xv.elem_type not in _FLOAT_TYPES or not xv.shape:
        return None
    rng = np.random.default_rng(0)
    if family == "activation":
        sample = _SAMPLES.reshape((1,) * (len(xv.shape) - 1) + (-1,))
    else:
        sample = rng.standard_normal((3,) + (1,) * (len(xv.shape) - 2) + xv.shape[-1:]).astype(np.float32)
    env: dict[str, np.ndarray] = {x: sample}
    weights: list[str] = []
    try:
        for i in region:
            n = nodes[i].node
            for v in n.input:
                if v and v not in env:
                    if s.values[v].weight is not None:  # stand-in values: the identity must hold for any weights
                        env[v] = rng.standard_normal(s.values[v].shape).astype(np.float32)
                        weights.append(v)
                    else:
                        env[v] = s.values[v].const
            outs = evaluate(n, {v: env[v] for v in n.input if v}, opset)
            env.update(zip(n.output, outs))
    except Exception:  # side inputs that do not broadcast against the sample: not one of ours
        return None
    got = np.asarray(env[y], dtype=np.float64)
    if got.shape != sample.shape:
        return None
    if family == "activation":
        for op_type, attrs, reference in _FUNCTIONS:
            if np.allclose(got, reference(sample.astype(np.float64)), rtol=1e-5, atol=2e-6):
                return op_type, [], attrs
        return None
    return _identify_layernorm(got, sample.astype(np.float64), env, weights, nodes, region, s)


def _identify_layernorm(got, sample, env, weights: list[str], nodes, region, s: StaticGraph):
    """(x - mean) / sqrt(var + eps) * gamma + beta over the last axis, for some eps among the constants."""
    eps_candidates = {float(s.values[v].const.reshape(-1)[0]) for i in region for v in nodes[i].node.input
                      if v and s.values[v].weight is None and s.values[v].const is not None
                      and s.values[v].const.size == 1 and s.values[v].const.dtype.kind == "f"}
    centred = sample - sample.mean(axis=-1, keepdims=True)
    variance = (centred**2).mean(axis=-1, keepdims=True)
    orders = [(weights[0], weights[1]), (weights[1], weights[0])] if len(weights) == 2 else \
        [(weights[0], None)] if len(weights) == 1 else []
    for eps in sorted(eps_candidates):
        normed = centred / np.sqrt(variance + eps)
        for gamma, beta in orders:
            ref = normed * env[gamma] + (env[beta] if beta is not None else 0.0)
            if np.allclose(got, ref, rtol=1e-4, atol=1e-5):
                return "LayerNormalization", [gamma, *([beta] if beta else [])], {"axis": -1, "epsilon": eps}
    return None

"""Attention exported as MatMul -> Softmax -> MatMul, fused into the standard ONNX Attention op (opset 23).

The TorchScript exporter writes `softmax(q @ k^T * s [+ mask | masked_fill]) @ v` as
    M = MatMul(Q, KT)        KT: (B, H, D, S), usually Transpose(X, perm) of the key projection
    S = Mul(M, s) | Mul(s, M) | Div(M, d) | M          s, d: constant scalars
    X = Add(S, mask) | Add(mask, S) | Where(cond, -inf, S) | Where(cond, S, -inf) | S
    P = Softmax(X, axis=-1) [-> Casts to its own type]
    Y = MatMul(P, V)
over 4-D values with equal (batch, heads) dimensions. When every intermediate
(M, S, X, P) is read by the next node only and is no graph output, the nodes become
    Y = Attention(Q, K, V[, mask]; scale, is_causal)
(ONNX Attention: softmax(Q K^T * scale + mask) V, a boolean mask True where
attention is allowed; the runtime's ONNX table replays it through
F.scaled_dot_product_attention, as the fx frontend's aten.scaled_dot_product_attention
-- frontends.fx_attention -- so both lowerings plan the same buffers). K is
Transpose(X, perm with its last two entries swapped) when KT is a Transpose (the
identity permutation: X itself), else Transpose(KT) over the last two axes: a view
either way. A Where mask becomes cond (masked where False) or Not(cond), folded when
cond is a constant; a constant cond equal to the strict upper triangle becomes
is_causal=1 (top-left aligned, as ATen's). Additive masks must broadcast to the
scores without enlarging them. Anything else stays as exported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from frontends.onnx_fold import KeptNode, StaticGraph, Value

_RANK = 4  # ONNX Attention reads 4-D inputs as (batch, heads, sequence, head size)


@dataclass(frozen=True)
class _Match:
    nodes: tuple[int, ...]  # indices of the nodes the fused op replaces (the last is the second MatMul)
    q: str
    k_transposed: str
    v: str
    y: str
    mask: str | None
    negate_mask: bool  # mask is a condition marking masked positions
    scale: float
    is_causal: bool


def fuse_attention(nodes: list[KeptNode], s: StaticGraph, opset: int) -> tuple[list[KeptNode], dict[str, Value]]:
    """The node list with every matched attention fused, and the values with the new ones added.
    Before opset 13 Softmax flattens its input to 2-D at `axis` (default 1): over the last axis that is
    the same softmax, so only a last-axis Softmax matches, in every opset."""
    values = dict(s.values)
    users: dict[str, list[int]] = {}
    producer: dict[str, int] = {}
    for i, k in enumerate(nodes):
        for x in dict.fromkeys(k.node.input):
            if x:
                users.setdefault(x, []).append(i)
        for x in k.node.output:
            if x:
                producer[x] = i
    drop: set[int] = set()
    inserted: dict[int, list[KeptNode]] = {}  # node index -> nodes placed before it
    for i, k in enumerate(nodes):
        if k.node.op_type != "Softmax" or k.node.domain not in ("", "ai.onnx"):
            continue
        m = _match(i, nodes, s, users, producer, -1 if opset >= 13 else 1)
        if m is None or drop & set(m.nodes):
            continue
        last = m.nodes[-1]
        name = nodes[last].name
        new: list[KeptNode] = []  # nodes placed before the fused one (K's Transpose, the mask's Not)
        k_name = _untranspose(m.k_transposed, nodes, s, users, producer, values, drop, name, new)
        mask = m.mask
        if mask is not None and m.negate_mask:
            cond = values[mask]
            mask = f"{name}/allowed"
            if cond.const is not None:
                values[mask] = Value(cond.shape, cond.elem_type, np.logical_not(cond.const))
            else:
                values[mask] = Value(cond.shape, cond.elem_type)
                new.append(KeptNode(helper.make_node("Not", [m.mask], [mask], name=mask), mask))
        attrs = {"scale": m.scale, "is_causal": int(m.is_causal)}
        fused = helper.make_node("Attention", [m.q, k_name, m.v, *([mask] if mask else [])], [m.y],
                                 name=name, **attrs)
        inserted[last] = [*new, KeptNode(fused, name, tuple(nodes[j].name for j in m.nodes))]
        drop.update(m.nodes)
    out: list[KeptNode] = []
    for i, k in enumerate(nodes):
        out.extend(inserted.get(i, []))
        if i not in drop:
            out.append(k)
    return out, values


def _only_user(x: str, users: dict[str, list[int]], s: StaticGraph) -> int | None:
    found = users.get(x, [])
    return found[0] if len(found) == 1 and x not in s.outputs else None


def _scalar(x: str, s: StaticGraph) -> float | None:
    v = s.values[x]
    return float(v.const.reshape(-1)[0]) if v.const is not None and v.const.size == 1 and v.weight is None \
        else None


def _match(i: int, nodes: list[KeptNode], s: StaticGraph, users, producer, default_axis: int) -> _Match | None:
    softmax = nodes[i].node
    x, p = softmax.input[0], softmax.output[0]
    shape = s.values[p].shape
    axis = next((a.i for a in softmax.attribute if a.name == "axis"), default_axis)
    if len(shape) != _RANK or axis % _RANK != _RANK - 1 or s.values[p].elem_type != s.values[x].elem_type:
        return None
    chain = [i]
    j = _only_user(p, users, s)  # down: Casts to the same type (transformers writes two), the second MatMul
    while j is not None and nodes[j].node.op_type == "Cast" and \
            s.values[nodes[j].node.output[0]].elem_type == s.values[p].elem_type:
        chain.append(j)
        p = nodes[j].node.output[0]
        j = _only_user(p, users, s)
    if j is None or nodes[j].node.op_type != "MatMul" or list(nodes[j].node.input[:1]) != [p] \
            or nodes[j].node.input[1] == p:
        return None
    chain.append(j)
    v, y = nodes[j].node.input[1], nodes[j].node.output[0]
    mask, negate = None, False
    up = producer.get(x)  # up: an optional mask, an optional scale, the first MatMul
    if up is None or _only_user(x, users, s) != i:
        return None
    node = nodes[up].node
    scores = x
    if node.op_type == "Add":
        a, b = node.input
        scores, mask = (a, b) if _scores(a, nodes, s, producer) else (b, a)
        mv = s.values[mask]
        if mv.elem_type != s.values[x].elem_type or not _broadcasts_into(mv.shape, shape):
            return None
    elif node.op_type == "Where":
        cond, a, b = node.input
        if _scalar(a, s) == -np.inf:
            scores, negate = b, True
        elif _scalar(b, s) == -np.inf:
            scores = a
        else:
            return None
        mask = cond
        if s.values[cond].elem_type != onnx.TensorProto.BOOL or not _broadcasts_into(s.values[cond].shape, shape):
            return None
    if scores != x:
        chain.append(up)
        up = producer.get(scores)
        if up is None or _only_user(scores, users, s) is None:
            return None
    node, scale = nodes[up].node, 1.0
    if node.op_type in ("Mul", "Div"):
        a, b = node.input
        c, mm = (_scalar(b, s), a) if node.op_type == "Div" or _scalar(b, s) is not None else (_scalar(a, s), b)
        if c is None or (node.op_type == "Div" and c == 0.0):
            return None
        scale = 1.0 / c if node.op_type == "Div" else c
        chain.append(up)
        up = producer.get(mm)
        if up is None or _only_user(mm, users, s) is None:
            return None
    node = nodes[up].node
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
        return None
    chain.append(up)
    q, kt = node.input
    batch = shape[:-2]
    operands = [s.values[t] for t in (q, kt, v, y)]
    if any(len(val.shape) != _RANK or val.shape[:-2] != batch for val in operands) \
            or len({val.elem_type for val in operands}) != 1 or s.values[y].shape[-2] != shape[-2]:
        return None
    is_causal = False
    if mask is not None and negate and s.values[mask].const is not None:
        cond = s.values[mask].const
        upper = np.triu(np.ones(shape[-2:], dtype=bool), 1)
        if np.array_equal(np.broadcast_to(cond, shape), np.broadcast_to(upper, shape)):
            mask, negate, is_causal = None, False, True
    return _Match(tuple(sorted(chain)), q, kt, v, y, mask, negate, scale, is_causal)


def _scores(x: str, nodes: list[KeptNode], s: StaticGraph, producer: dict[str, int]) -> bool:
    """Whether x is a MatMul's result, or one scaled by a constant scalar."""
    node = nodes[producer[x]].node if x in producer else None
    if node is not None and node.op_type in ("Mul", "Div"):
        operands = [t for t in node.input if _scalar(t, s) is None]
        node = nodes[producer[operands[0]]].node if len(operands) == 1 and operands[0] in producer else None
    return node is not None and node.op_type == "MatMul"


def _broadcasts_into(small: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    return len(small) <= len(shape) and all(d in (1, e) for d, e in zip(reversed(small), reversed(shape)))


def _untranspose(kt: str, nodes: list[KeptNode], s: StaticGraph, users, producer, values: dict[str, Value],
                 drop: set[int], name: str, new: list[KeptNode]) -> str:
    """The name of K (K^T with its last two axes swapped back), adding a Transpose view to `new`."""
    t = values[kt]
    j = producer.get(kt)
    source, perm = kt, list(range(_RANK - 2)) + [_RANK - 1, _RANK - 2]
    if j is not None and nodes[j].node.op_type == "Transpose" and _only_user(kt, users, s) is not None:
        given = next((list(a.ints) for a in nodes[j].node.attribute if a.name == "perm"), None)
        if given is not None and len(given) == _RANK:
            source, perm = nodes[j].node.input[0], given[:-2] + [given[-1], given[-2]]
            drop.add(j)  # K^T's Transpose: read by the first MatMul only, which goes
    if perm == list(range(_RANK)):
        return source
    k = f"{name}/key"
    values[k] = Value(t.shape[:-2] + (t.shape[-1], t.shape[-2]), t.elem_type)
    new.append(KeptNode(helper.make_node("Transpose", [source], [k], name=k, perm=perm), k))
    return k

"""Attention written as matmul -> softmax -> matmul, recognised in a core-ATen fx graph and fused into SDPA.

Models that spell attention out (the zoo's transformers, transformers' "eager"
attention) export as
    scores = bmm(view(q), view(k^T))           (batch..., L, S)
    scores = scores * s   (or / d)             optional
    scores = scores + mask   |   where(cond, -inf, scores)   |   where(cond, scores, -inf)   optional
    probs  = _softmax(scores, -1)
    out    = view(bmm(view(probs), view(v)))    (batch..., L, Dv)
with views, no-op expands and contiguous clones around each bmm operand. The
scores and the probabilities are each a buffer of batch x L x S elements (BERT-base
at batch 8, sequence 512: 96 MiB each per layer) that Inductor's pattern matcher
(torch/_inductor/fx_passes/fuse_attention.py) and ONNX runtimes never allocate. When
every node from the first bmm to the second is read only by the next one (run-time
assertions aside), `out` becomes
    aten.scaled_dot_product_attention.default(q, k, v, attn_mask, 0.0, is_causal, scale=s)
(s = 1 without a scale op; ATen computes q k^T * s + mask, the same order). q, k, v are
the deepest nodes, walking back from each bmm operand through views, clones and no-op
expands (each keeps the row-major element order), that have the 4-D (or N-D) shape;
k^T's permute (or transpose) of the last two dims is undone, or a transpose view is
added when k^T has no such producer. A where-mask becomes a boolean mask that is True
where attention is allowed: cond itself, or its logical_not (a new L x S-sized op); a
cond that is input-independent and equal to the strict upper triangle becomes
is_causal=True (ATen's top-left causal mask) and no mask at all. Nodes the fusion
leaves unread (the clones feeding the bmms, the causal-mask arithmetic) are erased.
Not matched: a scale applied to q or k before the bmm (the product is then not q k^T),
scores scaled after the mask is added, masks that enlarge the scores' shape, a
finite fill value, softmax in another dtype than its input (half_to_float), and any
intermediate with another reader (a training graph's backward reads the
probabilities: there it never fires).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_VIEWS = frozenset({"aten.view.default", "aten._unsafe_view.default"})
_COPIES = frozenset({"aten.clone.default", "aten.expand.default"}) | _VIEWS  # value-preserving steps
_BMM = "aten.bmm.default"
_SOFTMAX = "aten._softmax.default"
_MULS = frozenset({"aten.mul.Tensor", "aten.mul.Scalar"})
_DIVS = frozenset({"aten.div.Tensor", "aten.div.Scalar"})
_ADD = "aten.add.Tensor"
_WHERE = "aten.where.self"

# node -> its value when it is computed from no input and no weight (evaluated on the CPU), else None
ConstantValue = Callable[[Any], Any]


@dataclass(frozen=True)
class _Match:
    q: Any  # fx nodes
    k_transposed: Any  # k^T: (batch..., D, S)
    v: Any
    out: Any  # the node whose value the fused op takes over
    mask: Any  # None, a float mask node (added) or a boolean cond node
    negate_mask: bool  # cond marks the masked positions: the op reads logical_not(cond)
    is_causal: bool
    scale: float


def fuse_attention(graph, constant_value: ConstantValue) -> int:
    """Replace every spelled-out attention whose intermediates nothing else reads; returns how many."""
    fused = 0
    for softmax in [n for n in graph.nodes if _target(n) == _SOFTMAX]:
        match = _match(softmax, constant_value)
        if match is not None:
            _replace(graph, match)
            fused += 1
    return fused


# SDPA kernels that take a mask: op -> (mask argument, grad_input_mask position of the mask's gradient)
_MASKED_SDPA = {
    "aten.scaled_dot_product_attention.default": ("attn_mask", None),
    "aten._scaled_dot_product_efficient_attention.default": ("attn_bias", None),
    "aten._scaled_dot_product_efficient_attention_backward.default": ("attn_bias", 3),
    "aten._scaled_dot_product_flash_attention_for_cpu.default": ("attn_mask", None),
    "aten._scaled_dot_product_flash_attention_for_cpu_backward.default": ("attn_mask", None),
    "aten._scaled_dot_product_cudnn_attention.default": ("attn_bias", None),
    "aten._scaled_dot_product_cudnn_attention_backward.default": ("attn_bias", None),
}


def causal_masks(graph, constant_value: ConstantValue) -> int:
    """SDPA calls whose mask is input-independent and exactly ATen's top-left causal mask (boolean:
    True on and below the diagonal; additive: 0 there and -inf, or the dtype's lowest value, above)
    become is_causal=True without a mask; returns how many. Libraries build such masks when they
    trace (transformers does under torch.compile before torch 2.14); the kernels then read a
    batch x L x S bias and skip no masked block (GPT-2 small, batch 8, sequence 1024 on an H100:
    memory-efficient attention's forward 1.1 ms instead of 0.64, its backward 2.4 instead of 1.4).
    A backward that computes the mask's gradient keeps it."""
    import torch

    changed, masks = 0, set()
    for node in [n for n in graph.nodes if _target(n) in _MASKED_SDPA]:
        mask_name, grad_slot = _MASKED_SDPA[_target(node)]
        args = _named_args(node)
        mask = args.get(mask_name)
        if not isinstance(mask, torch.fx.Node) or args.get("is_causal") or not _is_causal_mask(mask, constant_value):
            continue
        if grad_slot is not None:
            if any(u.target is operator.getitem and u.args[1] == grad_slot and u.users for u in node.users):
                continue
            args["grad_input_mask"] = [*args["grad_input_mask"][:grad_slot], False,
                                       *args["grad_input_mask"][grad_slot + 1:]]
        args[mask_name], args["is_causal"] = None, True
        schema = node.target._schema.arguments
        node.args = tuple(args[a.name] for a in schema if not a.kwarg_only)
        node.kwargs = {a.name: args[a.name] for a in schema if a.kwarg_only and a.name in args}
        masks.add(mask)
        changed += 1
    for mask in masks:
        _erase_dead(graph, mask)
    return changed


def _named_args(node) -> dict:
    """The call's arguments by schema name (defaults filled in)."""
    out = {}
    for i, a in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def _is_causal_mask(mask, constant_value: ConstantValue) -> bool:
    import torch

    shape = tuple(_val(mask).shape)
    while _target(mask) == "aten.expand.default":  # broadcasting: the pattern is the source's
        mask = mask.args[0]
    value = constant_value(mask)
    if not isinstance(value, torch.Tensor) or len(shape) < 2:
        return False
    allowed = torch.ones(shape[-2:], dtype=torch.bool).tril().broadcast_to(shape)
    try:
        value = value.broadcast_to(shape)
    except RuntimeError:
        return False
    if value.dtype == torch.bool:
        return bool(torch.equal(value, allowed))
    if not value.is_floating_point():
        return False
    return bool(torch.equal(value == 0, allowed)) and bool((value[~allowed] <= torch.finfo(value.dtype).min).all())


def _target(node) -> str:
    return str(node.target) if getattr(node, "op", None) == "call_function" else ""


def _val(node):
    return node.meta.get("val") if hasattr(node, "meta") else None


def _readers(node) -> list:
    """node's users, run-time assertions (nodes of no value and no reader) left out."""
    return [u for u in node.users if not (u.op == "call_function" and _val(u) is None and not u.users)]


def _only_reader(node):
    readers = _readers(node)
    return readers[0] if len(readers) == 1 else None


def _copy_step(node) -> bool:
    """Whether node only re-presents its input's elements in row-major order (a view, a contiguous
    clone, an expand that broadcasts nothing)."""
    t = _target(node)
    if t not in _COPIES:
        return False
    if t == "aten.expand.default":
        return tuple(_val(node).shape) == tuple(_val(node.args[0]).shape)
    if t == "aten.clone.default":
        import torch
        return node.kwargs.get("memory_format") in (None, torch.contiguous_format, torch.preserve_format)
    return True


def _source(node, shape: tuple) -> Any:
    """The deepest node, back from `node` through copy steps, whose value has `shape` (None if none)."""
    found = None
    while True:
        if _val(node) is not None and tuple(_val(node).shape) == shape:
            found = node
        if not _copy_step(node):
            return found
        node = node.args[0]


def _is_minus_inf(value) -> bool:
    if isinstance(value, float):
        return value == -math.inf
    return _target(value) == "aten.scalar_tensor.default" and value.args[0] == -math.inf


def _scale_chain(node):
    """(the bmm, scale, nodes between) when node is bmm's result through views and at most one
    multiplication or division by a number; each node on the way read only by the one after it."""
    scale, chain = None, []
    while _target(node) != _BMM:
        t = _target(node)
        if t in _VIEWS:
            nxt = node.args[0]
        elif t in _MULS and scale is None:
            a, b = node.args[:2]
            nxt, c = (a, b) if isinstance(b, (int, float)) else (b, a)
            if not isinstance(c, (int, float)) or isinstance(c, bool) or not hasattr(nxt, "meta"):
                return None
            scale = float(c)
        elif t in _DIVS and scale is None:
            nxt, c = node.args[:2]
            if not isinstance(c, (int, float)) or isinstance(c, bool) or not c:
                return None
            scale = 1.0 / float(c)
        else:
            return None
        chain.append(node)
        if _only_reader(nxt) is not node:
            return None
        node = nxt
    return node, (1.0 if scale is None else scale), chain


def _masked_scores(x):
    """(bmm, scale, mask, negate, chain) for softmax's argument x, or None."""
    t = _target(x)
    if t == _ADD and x.kwargs.get("alpha", 1) == 1:
        for scores, mask in (x.args[:2], x.args[1::-1]):
            found = _scale_chain(scores) if hasattr(mask, "meta") and _only_reader(scores) is x else None
            mv, sv = _val(mask), _val(x)
            if found and mv is not None and mv.dtype == sv.dtype and mv.dim() <= sv.dim():
                return found[0], found[1], mask, False, [x, *found[2]]
        return None
    if t == _WHERE:
        cond, a, b = x.args[:3]
        for scores, fill, negate in ((b, a, True), (a, b, False)):
            if not _is_minus_inf(fill) or not hasattr(scores, "meta") or _only_reader(scores) is not x:
                continue
            found = _scale_chain(scores)
            if found and _val(cond) is not None and _val(cond).dim() <= _val(x).dim():
                return found[0], found[1], cond, negate, [x, *found[2]]
        return None
    found = _scale_chain(x)
    return None if found is None else (found[0], found[1], None, False, found[2])


def _match(softmax, constant_value: ConstantValue) -> _Match | None:
    import torch

    x, dim, half_to_float = softmax.args[:3]
    sv = _val(softmax)
    if half_to_float or sv is None or not sv.dtype.is_floating_point or dim % sv.dim() != sv.dim() - 1:
        return None
    batch, (length, source_length) = tuple(sv.shape[:-2]), tuple(sv.shape[-2:])
    node, bmm2 = softmax, None  # down: copy steps to the second bmm's first operand
    while bmm2 is None:
        reader = _only_reader(node)
        if reader is None:
            return None
        if _target(reader) == _BMM and reader.args[0] is node and reader.args[1] is not node:
            bmm2 = reader
        elif _copy_step(reader):
            node = reader
        else:
            return None
    out = bmm2
    reader = _only_reader(bmm2)
    if reader is not None and _target(reader) in _VIEWS and tuple(_val(reader).shape[:-1]) == batch + (length,):
        out = reader
    head_dim_v = _val(bmm2).shape[-1]
    if tuple(_val(out).shape) != batch + (length, head_dim_v):
        return None
    found = _masked_scores(x) if _only_reader(x) is softmax else None
    if found is None:
        return None
    bmm1, scale, mask, negate, _ = found
    head_dim = _val(bmm1.args[0]).shape[-1]
    q = _source(bmm1.args[0], batch + (length, head_dim))
    k_transposed = _source(bmm1.args[1], batch + (head_dim, source_length))
    v = _source(bmm2.args[1], batch + (source_length, head_dim_v))
    if q is None or k_transposed is None or v is None:
        return None
    if len({_val(n).dtype for n in (q, k_transposed, v, out)}) != 1:
        return None
    if mask is not None and tuple(torch.broadcast_shapes(_val(mask).shape, sv.shape)) != tuple(sv.shape):
        return None
    is_causal = False
    if mask is not None and negate and _val(mask).dtype == torch.bool:
        value = constant_value(mask)
        if value is not None and _strict_upper_triangle(value, tuple(sv.shape)):
            mask, negate, is_causal = None, False, True
    return _Match(q, k_transposed, v, out, mask, negate, is_causal, scale)


def _strict_upper_triangle(value, shape: tuple) -> bool:
    """Whether a boolean value, broadcast to shape (..., L, S), is True exactly above the diagonal."""
    import torch

    if value.dtype != torch.bool:
        return False
    upper = torch.ones(shape[-2:], dtype=torch.bool).triu(1)
    return bool(torch.equal(value.broadcast_to(shape), upper.broadcast_to(shape)))


def _fake(op, *args):
    """A new node's fake value: the op run on its arguments' fake values."""
    import torch

    return op(*(_val(a) if isinstance(a, torch.fx.Node) else a for a in args))


def _replace(graph, m: _Match) -> None:
    import torch

    aten = torch.ops.aten
    with graph.inserting_before(m.out):
        kt = m.k_transposed
        rank = _val(kt).dim()
        swaps_last_two = list(range(rank - 2)) + [rank - 1, rank - 2]
        if _target(kt) == "aten.permute.default" and [d % rank for d in kt.args[1]] == swaps_last_two:
            k = kt.args[0]
        elif _target(kt) == "aten.transpose.int" and sorted(d % rank for d in kt.args[1:3]) == [rank - 2, rank - 1]:
            k = kt.args[0]
        else:  # k^T has no transpose to undo: a view that transposes it back
            k = graph.call_function(aten.transpose.int, (kt, -2, -1))
            k.meta["val"] = _fake(aten.transpose.int, kt, -2, -1)
        mask = m.mask
        if mask is not None and m.negate_mask:
            mask = graph.call_function(aten.logical_not.default, (m.mask,))
            mask.meta["val"] = _fake(aten.logical_not.default, m.mask)
        sdpa = graph.call_function(aten.scaled_dot_product_attention.default,
                                   (m.q, k, m.v, mask, 0.0, m.is_causal), {"scale": m.scale})
    sdpa.meta.update(m.out.meta)  # the output's fake value (contiguous), source location
    m.out.replace_all_uses_with(sdpa)
    _erase_dead(graph, m.out)


def _erase_dead(graph, start) -> None:
    """Erase start and, transitively, the pure ops that nothing reads any more (their assertions too)."""
    import torch

    stack, erased = [start], set()
    while stack:
        n = stack.pop()
        if n in erased or n.op != "call_function" or _readers(n):
            continue
        if n.target is not operator.getitem:
            if not isinstance(n.target, torch._ops.OpOverload) or n.target._schema.is_mutable \
                    or torch.Tag.nondeterministic_seeded in n.target.tags:
                continue
        for u in list(n.users):
            graph.erase_node(u)
            erased.add(u)
        inputs = n.all_input_nodes
        graph.erase_node(n)
        erased.add(n)
        stack.extend(inputs)

"""Inference rewrites of an exported program's graph, applied before it is lowered.

An eval-mode module exported with torch.export still computes what only training
needs, and computes twice what its code writes twice. The TorchScript ONNX
exporter (CSE, constant folding) and Inductor (AOTAutograd's CSE, freezing, its
low-memory max-pool) remove both; so do these rewrites, in this order:
  - cse: nodes calling the same op on the same arguments (same types, values
    and nodes) collapse into the first; random ops never do (NAS cells apply
    ReLU to one input in several branches);
  - drop_clones: aten.clone of a contiguous value (eval-mode Dropout exports as
    one) is that value, in a functional graph: readers read it directly. A clone
    of a strided view (core ATen's reshape = clone + _unsafe_view) stays, and so
    does any clone whose storage root is not contiguous, since replay lays out
    every root contiguously;
  - fold_batchnorm: convolution -> _native_batch_norm_legit_no_training, where the
    convolution's output is read by nothing else, BatchNorm's saved statistics are
    read by nobody, the convolution is not transposed and every weight involved is
    a constant of the program (a parameter, buffer or lifted constant, never a
    tensor the caller feeds), becomes one convolution with
        W' = W * g,   b' = (b - mean) * g + beta,   g = gamma / sqrt(var + eps)
    per output channel (torch.nn.utils.fusion.fuse_conv_bn_weights). W' and b'
    are new weights; weights nothing reads any more drop out of the lowering.
  - drop_pool_indices: max_pool{2,3}d_with_indices whose indices nobody reads
    becomes max_pool{2,3}d (same arguments, values only; the replay writes them
    with the *_with_indices.out kernel and a transient indices workspace, since
    ATen has no values-only kernel on CUDA).
  - fuse_gelu: GELU spelled out in element-wise arithmetic (transformers' gelu_new:
    8 ops, each a buffer of x's size) becomes one aten.gelu (frontends.fx_fuse);
  - drop_zero_adds: add / sub of a value that is all zeros, computed from no
    input and no weight (factories such as arange and full, and ops on them; a
    parameter that happens to be zero is not constant), is the other operand:
    readers read it directly when the sum has its shape, dtype, strides and
    storage offset (-0.0 + 0.0 is +0.0: equal values, not always equal bits).
    The constant is evaluated on the CPU (values of up to `_MAX_FOLD_ELEMENTS`
    elements), only to be tested; input-independent values that stay are still
    computed at run time, as eager PyTorch does. Under torch.export, transformers'
    ViT gets an all-zero additive attention mask that every layer adds to its scores.
  - fuse_attention: matmul -> (scale) -> (mask) -> softmax -> matmul, each
    intermediate read only by the next, becomes one
    aten.scaled_dot_product_attention (frontends.fx_attention): the scores and the
    probabilities (batch x heads x L x S each) are never allocated.
Training graphs never get the BatchNorm and max-pool rewrites: `lower_module` refuses them for a module
in training mode (its BatchNorm is another op, and its forward graph returns the
pooling indices for the backward); CSE and dropping clones are valid on any
functional graph, and so are the last three (GELU and attention fuse only where
nothing else reads their intermediates, which a training graph's backward does). Each
rewrite is one switch of `InferenceRewrites`; `rewrite` mutates the fx graph in
place and returns the new weights by placeholder name.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from frontends.fx_attention import ConstantValue, causal_masks, fuse_attention
from frontends.fx_fuse import fuse_gelu

_CONV = "aten.convolution.default"
_BN = "aten._native_batch_norm_legit_no_training.default"
_ZERO_ADDS = {"aten.add.Tensor": True, "aten.sub.Tensor": False}  # op -> commutative
_UNINITIALISED = ("aten::empty", "aten::new_empty")  # factories whose values are whatever memory held
_MAX_FOLD_ELEMENTS = 1 << 24  # larger constants are not evaluated (64 MiB of float32)
_POOLS = {"aten.max_pool2d_with_indices.default": "max_pool2d",
          "aten.max_pool3d_with_indices.default": "max_pool3d"}


@dataclass(frozen=True)
class InferenceRewrites:
    cse: bool = True  # common subexpressions computed once
    drop_clones: bool = True  # clones of contiguous values (eval Dropout) read the value itself
    fold_batchnorm: bool = True  # BatchNorm after a convolution folded into its weights
    drop_pool_indices: bool = True  # max-pool indices nobody reads are not computed
    fuse_gelu: bool = True  # GELU written as arithmetic (8 element-wise ops) is one aten.gelu
    drop_zero_adds: bool = True  # x + (a constant that is all zeros) is x
    fuse_attention: bool = True  # matmul -> softmax -> matmul is one scaled_dot_product_attention

    @classmethod
    def none(cls) -> InferenceRewrites:
        return cls(cse=False, drop_clones=False, fold_batchnorm=False, drop_pool_indices=False,
                   fuse_gelu=False, drop_zero_adds=False, fuse_attention=False)

    def any(self) -> bool:
        return self.cse or self.drop_clones or self.fuse_gelu or self.drop_zero_adds or self.fuse_attention \
            or self.inference_only()

    def inference_only(self) -> bool:
        """Whether a rewrite that is wrong for training graphs is on."""
        return self.fold_batchnorm or self.drop_pool_indices


@dataclass(frozen=True)
class NewWeight:
    name: str  # weight name in the lowered graph
    value: Any  # torch.Tensor


# placeholder node -> (parameter / buffer name, value) when it is a constant of the program, else None
ConstantOf = Callable[[Any], "tuple[str, Any] | None"]


def rewrite(graph, constant_of: ConstantOf, passes: InferenceRewrites) -> dict[str, NewWeight]:
    """Apply the enabled rewrites to the fx graph; new weights by the name of their placeholder node."""
    new: dict[str, NewWeight] = {}
    if passes.cse:
        _eliminate_common_subexpressions(graph)
    if passes.drop_clones:
        _drop_clones(graph)
    if passes.fold_batchnorm:
        new.update(_fold_batchnorm(graph, constant_of))
    if passes.drop_pool_indices:
        _drop_pool_indices(graph)
    if passes.drop_zero_adds:
        _drop_zero_adds(graph)
    if passes.fuse_gelu:
        fuse_gelu(graph)
    if passes.fuse_attention:
        fuse_attention(graph, constant_values(graph))
        causal_masks(graph, constant_values(graph))
    return new


def constant_values(graph) -> ConstantValue:
    """node -> its value when it depends on no input, no weight and no random op (evaluated on the
    CPU, memoised), else None."""
    constant, values = _input_independent(graph), {}
    return lambda node: _evaluate(node, constant, values) if node in constant else None


def _target(node) -> str:
    return str(node.target) if node.op == "call_function" else ""


def _read_positions(node) -> set[int] | None:
    """Tuple positions of a multi-output node that something reads; None if a user is not a getitem."""
    read: set[int] = set()
    for u in node.users:
        if u.target is not operator.getitem:
            return None
        if u.users:
            read.add(u.args[1])
    return read


def _arg(node, i: int, name: str, default=None):
    return node.args[i] if i < len(node.args) else node.kwargs.get(name, default)


def _key(value):
    """A hashable form of an fx argument that tells 1 from 1.0 and True; None if there is none."""
    if isinstance(value, (list, tuple)):
        parts = tuple(_key(v) for v in value)
        return None if None in parts else (type(value).__name__, parts)
    if isinstance(value, dict):
        parts = tuple((k, _key(v)) for k, v in sorted(value.items()))
        return None if any(p[1] is None for p in parts) else ("dict", parts)
    if value is None:
        return ("none",)
    try:
        hash(value)
    except TypeError:
        return None
    return (type(value).__name__, value)


def _eliminate_common_subexpressions(graph) -> None:
    import torch

    first: dict = {}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags:
            continue
        key = (node.target, _key(node.args), _key(dict(node.kwargs)))
        if None in key[1:]:
            continue
        if key in first:
            node.replace_all_uses_with(first[key])
            graph.erase_node(node)
        else:
            first[key] = node


def _drop_clones(graph) -> None:
    import torch

    keep_layout = (None, torch.contiguous_format, torch.preserve_format)
    for node in [n for n in graph.nodes if _target(n) == "aten.clone.default"]:
        src = node.args[0]
        if node.kwargs.get("memory_format") in keep_layout and _contiguous(src) and _contiguous(_storage_root(src)):
            node.replace_all_uses_with(src)
            graph.erase_node(node)


def _contiguous(node) -> bool:
    val = node.meta.get("val")
    return hasattr(val, "is_contiguous") and val.is_contiguous()


def _storage_root(node):
    """The node whose result owns the storage `node` views (following alias-annotated first arguments)."""
    import torch

    while node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.args:
        returns = node.target._schema.returns
        if not (returns and returns[0].alias_info is not None) and str(node.target) != "aten._unsafe_view.default":
            break
        node = node.args[0]
    return node


def _replace_by(node, replacement, graph) -> None:
    """Point every reader of node's getitems at `replacement`; remove the getitems (dead ones too)."""
    for getitem in list(node.users):
        getitem.replace_all_uses_with(replacement)
        graph.erase_node(getitem)


def _fold_batchnorm(graph, constant_of: ConstantOf) -> dict[str, NewWeight]:
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    new: dict[str, NewWeight] = {}
    last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for bn in [n for n in graph.nodes if _target(n) == _BN]:
        conv = bn.args[0]
        if _target(conv) != _CONV or len(conv.users) != 1 or _read_positions(bn) != {0}:
            continue
        if _arg(conv, 6, "transposed", False):  # a transposed weight is (in, out/groups, ...): not folded
            continue
        args = list(conv.args) + [None] * (3 - len(conv.args))
        found = {key: constant_of(node) if node is not None else (None, None)
                 for key, node in (("w", args[1]), ("b", args[2]), ("gamma", bn.args[1]),
                                   ("beta", bn.args[2]), ("mean", bn.args[3]), ("var", bn.args[4]))}
        if any(v is None for v in found.values()):  # a weight the caller feeds: its value is not known here
            continue
        value = {key: v[1] for key, v in found.items()}
        with torch.no_grad():
            w, b = fuse_conv_bn_weights(value["w"], value["b"], value["mean"], value["var"],
                                        float(_arg(bn, 6, "eps")), value["gamma"], value["beta"])
        w_name = found["w"][0]
        stem = w_name[: -len("weight")] if w_name.endswith("weight") else w_name + "."
        with graph.inserting_after(last_placeholder):
            w_node = graph.placeholder(f"{args[1].name}_bn_weight")
            last_placeholder = w_node
        with graph.inserting_after(last_placeholder):
            b_node = graph.placeholder(f"{args[1].name}_bn_bias")
            last_placeholder = b_node
        for node, name, v in ((w_node, f"{w_name}+bn", w), (b_node, f"{stem}bias+bn", b)):
            node.meta["val"] = v.detach()
            new[node.name] = NewWeight(name, v.detach())
        args[1], args[2] = w_node, b_node
        conv.args = tuple(args)
        _replace_by(bn, conv, graph)
        graph.erase_node(bn)
    return new


def _drop_pool_indices(graph) -> None:
    import torch

    for node in [n for n in graph.nodes if _target(n) in _POOLS]:
        if _read_positions(node) not in ({0}, set()):
            continue
        node.target = getattr(torch.ops.aten, _POOLS[_target(node)]).default
        node.meta["val"] = node.meta["val"][0]
        _replace_by(node, node, graph)


def _drop_zero_adds(graph) -> None:
    import torch

    constant = _input_independent(graph)
    values: dict = {}
    for node in [n for n in graph.nodes if _target(n) in _ZERO_ADDS]:
        a, b = node.args[:2]
        alpha = node.kwargs.get("alpha", 1)
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha)):
            continue
        pairs = [(a, b), (b, a)] if _ZERO_ADDS[_target(node)] else [(a, b)]
        for kept, zero in pairs:  # (the operand that stays, the one that may be all zeros)
            if not isinstance(kept, torch.fx.Node) or not _same_layout(node, kept) \
                    or any(u.op == "output" for u in node.users):
                continue
            if isinstance(zero, torch.fx.Node):
                value = _evaluate(zero, constant, values) if zero in constant else None
                if value is None or value.is_complex() or not bool((value == 0).all()):
                    continue
            elif not (isinstance(zero, (int, float)) and zero == 0):
                continue
            node.replace_all_uses_with(kept)
            graph.erase_node(node)
            if isinstance(zero, torch.fx.Node):
                _erase_unread(zero, graph, constant)
            break


def _same_layout(node, other) -> bool:
    """Whether other's value can stand for node's: same shape, dtype, device, strides and storage offset."""
    v, w = node.meta.get("val"), other.meta.get("val")
    return hasattr(v, "stride") and hasattr(w, "stride") and v.shape == w.shape and v.dtype == w.dtype \
        and v.device == w.device and v.stride() == w.stride() and v.storage_offset() == w.storage_offset()


def _input_independent(graph) -> set:
    """Nodes whose value depends on no placeholder (no input, no weight) and on no random op."""
    import torch

    constant: set = set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is operator.getitem:
            pure = True
        elif isinstance(node.target, torch._ops.OpOverload):
            schema = node.target._schema
            pure = not schema.is_mutable and torch.Tag.nondeterministic_seeded not in node.target.tags \
                and not schema.name.startswith(_UNINITIALISED)
        else:
            pure = False
        if pure and all(a in constant for a in node.all_input_nodes):
            constant.add(node)
    return constant


def _evaluate(node, constant: set, values: dict):
    """The value of an input-independent node, computed on the CPU (memoised in `values`); None when a
    value on the way is too large or its op fails."""
    import torch

    needed, stack = [], [node]
    while stack:
        n = stack.pop()
        if n in values or n in needed:
            continue
        needed.append(n)
        stack.extend(n.all_input_nodes)
    position = {n: i for i, n in enumerate(node.graph.nodes)}
    cpu = torch.device("cpu")

    def value_of(v):
        if isinstance(v, torch.fx.Node):
            return values[v]
        return cpu if isinstance(v, torch.device) else v
    for n in sorted(needed, key=position.__getitem__):
        if n not in constant:
            return None
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and val.numel() > _MAX_FOLD_ELEMENTS:
            values[n] = None
        if values.get(n, 0) is None or any(values.get(a, 0) is None for a in n.all_input_nodes):
            values[n] = None
            continue
        args = torch.utils._pytree.tree_map(value_of, n.args)
        kwargs = torch.utils._pytree.tree_map(value_of, dict(n.kwargs))
        try:
            values[n] = n.target(*args, **kwargs)
        except Exception:  # an op that does not run here (a device-only kernel): the value stays unknown
            values[n] = None
    return values[node]


def _erase_unread(node, graph, constant: set) -> None:
    """Erase node and the input-independent nodes only it read, once nothing reads them (run-time
    assertions on them, nodes of no value and no reader, go with them)."""
    erased: set = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in erased or n not in constant:
            continue
        asserts = [u for u in n.users if u in constant and not u.users and u.meta.get("val") is None]
        if len(asserts) != len(n.users):
            continue
        for u in asserts:
            graph.erase_node(u)
            erased.add(u)
        stack.extend(n.all_input_nodes)
        graph.erase_node(n)
        erased.add(n)

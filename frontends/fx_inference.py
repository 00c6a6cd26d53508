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
Training graphs never get the last two: `lower_module` refuses them for a module
in training mode (its BatchNorm is another op, and its forward graph returns the
pooling indices for the backward); CSE and dropping clones are valid on any
functional graph. Each
rewrite is one switch of `InferenceRewrites`; `rewrite` mutates the fx graph in
place and returns the new weights by placeholder name.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_CONV = "aten.convolution.default"
_BN = "aten._native_batch_norm_legit_no_training.default"
_POOLS = {"aten.max_pool2d_with_indices.default": "max_pool2d",
          "aten.max_pool3d_with_indices.default": "max_pool3d"}


@dataclass(frozen=True)
class InferenceRewrites:
    cse: bool = True  # common subexpressions computed once
    drop_clones: bool = True  # clones of contiguous values (eval Dropout) read the value itself
    fold_batchnorm: bool = True  # BatchNorm after a convolution folded into its weights
    drop_pool_indices: bool = True  # max-pool indices nobody reads are not computed

    @classmethod
    def none(cls) -> InferenceRewrites:
        return cls(cse=False, drop_clones=False, fold_batchnorm=False, drop_pool_indices=False)

    def any(self) -> bool:
        return self.cse or self.drop_clones or self.inference_only()

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
    return new


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

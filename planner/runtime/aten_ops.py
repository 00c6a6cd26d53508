"""Replaying fx-lowered ops (frontends.fx attrs) through ATen kernels that write into arena buffers.

An fx op's attrs hold `target` ("aten.convolution.default"), encoded `args` and
`kwargs`, and `results` (tuple position of each op output, or None for a lone
tensor). Binding an op picks, once, the cheapest way to write its outputs:
  direct     a few ops whose out= variant ATen only emulates are rewritten into
             kernels that write the buffer themselves (clone -> copy_, relu ->
             clamp_min, full -> fill_, embedding -> index_select);
  out        the op's `out=` overload, found from the schema: same arguments plus
             kwarg-only written tensors, one per return (tensor-option kwargs such
             as dtype/device, implied by the buffer, may be dropped);
  composite  an out= overload that has no kernel for this device: ATen computes
             into a temporary and copies, so the executor counts it;
  fallback   no out= overload: call the functional op, then copy_ into the buffer.
Views (outputs that alias an input) are derived by calling the op itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

TENSOR_OPTIONS = frozenset({"dtype", "layout", "device", "pin_memory", "memory_format"})


class ReplayError(ValueError):
    """An op the replay cannot run; the message names the op and why."""


@dataclass(frozen=True, slots=True)
class Ref:
    tid: int  # a tensor of the graph, resolved by the executor


@dataclass(frozen=True, slots=True)
class Dyn:
    slot: int  # a per-run value: the executor's dyn[slot]


def op_by_name(name: str) -> torch._ops.OpOverload:
    """'aten.add.Tensor' -> torch.ops.aten.add.Tensor."""
    ns, _, rest = name.partition(".")
    packet, _, overload = rest.rpartition(".")
    try:
        return getattr(getattr(getattr(torch.ops, ns), packet), overload)
    except (AttributeError, RuntimeError):
        raise ReplayError(f"ATen op {name!r} does not exist in torch {torch.__version__}") from None


def decode(value: Any, device: torch.device) -> Any:
    """frontends.fx's JSON encoding -> Python values; tensors become Ref, devices become `device`."""
    if isinstance(value, list):
        return [decode(v, device) for v in value]
    if isinstance(value, dict):
        if len(value) == 1 and not isinstance(next(iter(value.values())), (dict, list, type(None))):
            (key, inner), = value.items()
            if key == "t":
                return Ref(int(inner))
            if key == "dtype":
                return getattr(torch, inner)
            if key == "device":
                return device  # the graph was traced elsewhere; factories run where the arena is
            if key == "layout":
                return getattr(torch, inner.removeprefix("torch."))
            if key == "memory_format":
                return getattr(torch, inner.removeprefix("torch."))
            if key == "float":
                return float(inner)
        return {k: decode(v, device) for k, v in value.items()}
    return value


def decode_kwargs(kwargs: dict, device: torch.device) -> dict:
    """The top level of attrs["kwargs"] is always a dict of keyword arguments, never an encoded value."""
    return {k: decode(v, device) for k, v in kwargs.items()}


def substitute(value: Any, get: Callable[[int], Any]) -> Any:
    """Replace every Ref by get(tid): a tensor, or a Dyn for values known only at run time."""
    if isinstance(value, Ref):
        return get(value.tid)
    if isinstance(value, list):
        return [substitute(v, get) for v in value]
    if isinstance(value, tuple):
        return tuple(substitute(v, get) for v in value)
    if isinstance(value, dict):
        return {k: substitute(v, get) for k, v in value.items()}
    return value


def has_dyn(value: Any) -> bool:
    if isinstance(value, Dyn):
        return True
    if isinstance(value, (list, tuple)):
        return any(has_dyn(v) for v in value)
    if isinstance(value, dict):
        return any(has_dyn(v) for v in value.values())
    return False


def materializer(value: Any) -> Callable[[list], Any]:
    """A function dyn -> value with every Dyn filled in (built once, called every run)."""
    if isinstance(value, Dyn):
        slot = value.slot
        return lambda dyn: dyn[slot]
    if not has_dyn(value):
        return lambda dyn: value
    if isinstance(value, (list, tuple)):
        parts = [materializer(v) for v in value]
        kind = type(value)
        return lambda dyn: kind(p(dyn) for p in parts)
    items = [(k, materializer(v)) for k, v in value.items()]
    return lambda dyn: {k: p(dyn) for k, p in items}


# ------------------------------------------------------------- out overloads
@dataclass(frozen=True)
class OutVariant:
    op: torch._ops.OpOverload
    out_names: tuple[str, ...]  # kwarg names of the written tensors, in return order
    keep_kwargs: frozenset[str]  # functional kwargs the out overload also takes
    native: dict[str, bool]  # device type -> has a kernel of its own (not compute + copy)


@cache
def out_variant(op: torch._ops.OpOverload) -> OutVariant | None:
    """The out= overload of a functional op, from the schemas; None when there is none."""
    schema = op._schema
    if any(r.alias_info is not None for r in schema.returns):
        return None
    functional = [(a.name, str(a.type)) for a in schema.arguments]
    names = {a.name for a in schema.arguments}
    packet = getattr(getattr(torch.ops, schema.name.split("::")[0]), schema.name.split("::")[1])
    for overload in packet.overloads():
        cand = getattr(packet, overload)
        s = cand._schema
        writes = [a for a in s.arguments if a.kwarg_only and a.alias_info is not None and a.alias_info.is_write]
        if not writes or len(writes) != len(schema.returns) or len(s.returns) != len(writes):
            continue
        rest = [(a.name, str(a.type)) for a in s.arguments if a not in writes]
        rest_names = {n for n, _ in rest}
        dropped = [a for a in schema.arguments if a.name not in rest_names]
        if [x for x in functional if x[0] in rest_names] != rest or not rest_names <= names:
            continue
        if any(a.name not in TENSOR_OPTIONS or not a.kwarg_only for a in dropped):
            continue
        by_set = {frozenset(a.alias_info.before_set): a.name for a in writes}
        order = tuple(by_set.get(frozenset(r.alias_info.before_set), "") if r.alias_info else ""
                      for r in s.returns)
        if "" in order:
            order = tuple(a.name for a in writes)
        qual = f"{s.name}.{s.overload_name}" if s.overload_name else s.name
        native = {d: torch._C._dispatch_has_kernel_for_dispatch_key(qual, k)
                  for d, k in (("cpu", "CPU"), ("cuda", "CUDA"))}
        return OutVariant(cand, order, frozenset(rest_names), native)
    return None


# ------------------------------------------------------------ direct writers
def _copy_into(args, kwargs, outs):  # aten.copy(self, src): self's shape, src's values
    outs[0].copy_(args[1])


def _relu(args, kwargs, outs):
    torch.clamp_min(args[0], 0, out=outs[0])


def _fill(pos: int):
    def fill(args, kwargs, outs):
        outs[0].fill_(kwargs["fill_value"] if "fill_value" in kwargs else args[pos])
    return fill


def _fill_const(value: float):
    return lambda args, kwargs, outs: outs[0].fill_(value)


def _embedding(args, kwargs, outs):
    weight, indices = args[0], args[1]
    torch.index_select(weight, 0, indices.reshape(-1), out=outs[0].view(-1, weight.shape[-1]))


_DIRECT: dict[str, Callable[[Sequence, dict, Sequence[torch.Tensor]], None]] = {
    "aten.clone.default": lambda a, k, o: o[0].copy_(a[0]),
    "aten._to_copy.default": lambda a, k, o: o[0].copy_(a[0]),
    "aten.lift_fresh_copy.default": lambda a, k, o: o[0].copy_(a[0]),
    "aten.copy.default": _copy_into,
    "aten.relu.default": _relu,
    "aten.full.default": _fill(1),
    "aten.full_like.default": _fill(1),
    "aten.scalar_tensor.default": _fill(0),
    "aten.zeros.default": _fill_const(0.0),
    "aten.zeros_like.default": _fill_const(0.0),
    "aten.ones.default": _fill_const(1.0),
    "aten.ones_like.default": _fill_const(1.0),
    "aten.embedding.default": _embedding,
}


@dataclass(frozen=True, slots=True)
class Bound:
    run: Callable[[], None]  # writes the op's outputs into their buffers
    how: str  # "direct" | "out" | "composite" | "fallback"


def bind_compute(name: str, attrs: dict, args: list, kwargs: dict, outs: Sequence[torch.Tensor],
                 device_type: str, dyn: list) -> Bound:
    """A closure computing op `name` (decoded, substituted args) into `outs`."""
    target = attrs["target"]
    op = op_by_name(target)
    results = attrs.get("results")
    positions = [0] if results is None else list(results)
    dynamic = has_dyn(args) or has_dyn(kwargs)
    get_args, get_kwargs = materializer(args), materializer(kwargs)

    if target in _DIRECT and len(outs) == 1:
        fn = _DIRECT[target]
        if dynamic:
            return Bound(lambda: fn(get_args(dyn), get_kwargs(dyn), outs), "direct")
        return Bound(lambda: fn(args, kwargs, outs), "direct")

    variant = out_variant(op)
    if variant is not None and sorted(positions) == list(range(len(op._schema.returns))):
        out_kw = {variant.out_names[p]: o for p, o in zip(positions, outs)}
        keep = variant.keep_kwargs
        call = variant.op
        how = "out" if variant.native.get(device_type, False) else "composite"
        if dynamic:
            def run_dyn() -> None:
                kw = {k: v for k, v in get_kwargs(dyn).items() if k in keep}
                call(*get_args(dyn), **kw, **out_kw)
            return Bound(run_dyn, how)
        kw = {**{k: v for k, v in kwargs.items() if k in keep}, **out_kw}
        return Bound(lambda: call(*args, **kw), how)

    def run_fallback() -> None:
        a, k = (get_args(dyn), get_kwargs(dyn)) if dynamic else (args, kwargs)
        res = op(*a, **k)
        if results is None:
            outs[0].copy_(res)
        else:
            for p, o in zip(positions, outs):
                o.copy_(res[p])
    return Bound(run_fallback, "fallback")


def derive_views(attrs: dict, args: list, kwargs: dict) -> list[torch.Tensor]:
    """The view outputs of a view op applied to (already resolved) tensors, in op-output order."""
    res = op_by_name(attrs["target"])(*args, **kwargs)
    results = attrs.get("results")
    return [res] if results is None else [res[p] for p in results]


def check_bytes(name: str, nbytes: int, shape: Sequence[int], dtype: torch.dtype) -> None:
    """A graph lowered with elem_size != the dtype's size cannot be replayed."""
    want = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes != want:
        raise ReplayError(f"tensor {name!r} has {nbytes} bytes but {tuple(shape)} x {dtype} needs {want}; "
                          "a graph lowered with --elem-size cannot be replayed")

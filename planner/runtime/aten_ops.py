"""Replaying fx-lowered ops (frontends.fx attrs) through ATen kernels that write into arena buffers.

An fx op's attrs hold `target` ("aten.convolution.default"), encoded `args` and
`kwargs`, and `results` (tuple position of each op output, or None for a lone
tensor). Binding an op picks, once, the cheapest way to write its outputs:
  direct     a few ops whose out= variant ATen only emulates are rewritten into
             kernels that write the buffer themselves (clone -> copy_, relu ->
             clamp_min, full -> fill_, embedding -> index_select, inference
             batch norm -> native_batch_norm.out, CUDA convolution ->
             cudnn_convolution.out + bias, as at::convolution does it,
             values-only max-pool -> max_pool*_with_indices.out);
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
import warnings
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
# A writer factory gets the op's outputs (indexed by result position) and the device type and
# returns fn(args, kwargs) writing them, or None when it does not apply there.
Writer = Callable[[Sequence, dict], None]


def _copy(outs, dev):
    return lambda a, k: outs[0].copy_(a[0])


def _copy_into(outs, dev):  # aten.copy(self, src): self's shape, src's values
    return lambda a, k: outs[0].copy_(a[1])


def _relu(outs, dev):  # ATen's relu is clamp_min(x, 0); its out= variant is only emulated
    return lambda a, k: torch.clamp_min(a[0], 0, out=outs[0])


def _slice_backward(outs, dev):  # zeros with the gradient in the slice; the out= variant is only emulated
    def run(a, k):
        grad, _, dim, start, end, step = a[:6]
        outs[0].zero_()
        torch.ops.aten.slice.Tensor(outs[0], dim, start, end, step).copy_(grad)
    return run


def _mul_scalar(outs, dev):  # mul.Scalar's out= variant is emulated; mul.out takes the scalar wrapped
    return lambda a, k: torch.mul(a[0], a[1], out=outs[0])


def _fill(pos: int):
    def factory(outs, dev):
        return lambda a, k: outs[0].fill_(k["fill_value"] if "fill_value" in k else a[pos])
    return factory


def _fill_const(value: float):
    return lambda outs, dev: (lambda a, k: outs[0].fill_(value))


def _embedding(outs, dev):
    def run(a, k):
        weight, indices = a[0], a[1]
        torch.index_select(weight, 0, indices.reshape(-1), out=outs[0].view(-1, weight.shape[-1]))
    return run


def _batch_norm_inference(outs, dev):
    """_native_batch_norm_legit_no_training -> native_batch_norm.out (eval). The saved statistics
    go to scratch tensors of their own: a kernel may resize them, which an arena view must never be."""
    if len(outs) != 3 or outs[0] is None:
        return None
    scratch = [torch.empty(0, device=outs[0].device), torch.empty(0, device=outs[0].device)]

    def run(a, k):
        x, w, b, mean, var, momentum, eps = a[:7]
        torch.ops.aten.native_batch_norm.out(x, w, b, mean, var, False, momentum, eps, out=outs[0],
                                             save_mean=scratch[0], save_invstd=scratch[1])
    return run


def _max_pool_values(with_indices: str):
    """max_pool{2,3}d without indices (frontends.fx_inference drops unread ones): the *_with_indices.out
    kernel writes the values into the buffer, its indices go to a workspace freed at once (ATen has no
    values-only kernel on CUDA; at::max_pool2d allocates the same there)."""
    kernel = getattr(torch.ops.aten, with_indices).out

    def factory(outs, dev):
        o = outs[0]
        return lambda a, k: kernel(*a, **k, out=o, indices=torch.empty(o.shape, dtype=torch.int64, device=o.device))
    return factory


def direct_convolution(outs, dev):
    """CUDA: at::convolution's cuDNN path (cudnn_convolution, then the bias added in place) written
    straight into the buffer; convolution.out would compute into a temporary and copy. Used when
    at::convolution itself would pick cuDNN for a plain 2-D convolution; otherwise, or if the call
    fails, the composite out= kernel."""
    if dev != "cuda" or len(outs) != 1:
        return None
    o = outs[0]
    state = {"direct": None}

    def usable(x, w, transposed, groups) -> bool:
        cudnn = torch.backends.cudnn
        return (cudnn.enabled and cudnn.is_available() and not transposed and x.dim() == 4
                and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and x.is_contiguous()
                and w.is_contiguous() and not (groups > 1 and groups == x.shape[1]))  # depthwise: ATen's own

    def run(a, k):
        x, w, bias, stride, padding, dilation, transposed, output_padding, groups = a[:9]
        if state["direct"] is None:
            state["direct"] = usable(x, w, transposed, groups)
        if state["direct"]:
            cudnn = torch.backends.cudnn
            try:
                torch.ops.aten.cudnn_convolution.out(
                    x, w, padding, stride, dilation, groups, cudnn.benchmark,
                    cudnn.deterministic or torch.are_deterministic_algorithms_enabled(), cudnn.allow_tf32, out=o)
                if bias is not None:
                    o.add_(bias.view(1, -1, 1, 1))
                return
            except RuntimeError as e:  # this build's cuDNN binding refuses: use ATen's own path from now on
                state["direct"] = False
                warnings.warn(f"memplan: cudnn_convolution.out failed ({str(e).splitlines()[0]}); "
                              "this convolution now computes into a temporary and copies", stacklevel=2)
        torch.ops.aten.convolution.out(x, w, bias, stride, padding, dilation, transposed, output_padding, groups,
                                       out=o)
    return run


_DIRECT: dict[str, Callable[[Sequence[torch.Tensor], str], Writer | None]] = {
    "aten.clone.default": _copy,
    "aten._to_copy.default": _copy,
    "aten.lift_fresh_copy.default": _copy,
    "aten.alias_copy.default": _copy,
    "aten.copy.default": _copy_into,
    "aten.relu.default": _relu,
    "aten.slice_backward.default": _slice_backward,
    "aten.mul.Scalar": _mul_scalar,
    "aten.full.default": _fill(1),
    "aten.full_like.default": _fill(1),
    "aten.scalar_tensor.default": _fill(0),
    "aten.zeros.default": _fill_const(0.0),
    "aten.zeros_like.default": _fill_const(0.0),
    "aten.ones.default": _fill_const(1.0),
    "aten.ones_like.default": _fill_const(1.0),
    "aten.embedding.default": _embedding,
    "aten._native_batch_norm_legit_no_training.default": _batch_norm_inference,
    "aten.convolution.default": direct_convolution,
    "aten.max_pool2d.default": _max_pool_values("max_pool2d_with_indices"),
    "aten.max_pool3d.default": _max_pool_values("max_pool3d_with_indices"),
}


@dataclass(frozen=True, slots=True)
class Bound:
    run: Callable[[], None]  # writes the op's outputs into their buffers
    how: str  # "direct" | "out" | "composite" | "fallback"


def how_computed(attrs: dict, device_type: str, kept: bool = False, direct: bool = True) -> str:
    """How the executor writes an op's outputs on `device_type`: "direct" (a writer of ours), "out"
    (ATen's out= kernel), "composite" (an out= overload ATen emulates: a temporary and a copy) or
    "fallback" (the functional op, then a copy). `kept`: some result is kept as the kernel returns it."""
    target = attrs["target"]
    if direct and target in _DIRECT and not kept:
        return "direct"
    op = op_by_name(target)
    variant = out_variant(op)
    positions = [0] if attrs.get("results") is None else list(attrs["results"])
    if variant is None or kept or sorted(positions) != list(range(len(op._schema.returns))):
        return "fallback"
    return "out" if variant.native.get(device_type, False) else "composite"


def temporary_bytes(graph, device_type: str) -> int:
    """The most bytes one op computes into a temporary beside the arena on `device_type` (composite
    and fallback ops: their outputs exist twice until the copy), views and ONNX ops aside."""
    worst = 0
    for op in graph.ops:
        if "target" not in op.attrs or all(graph.tensors[t].alias_of is not None for t in op.outputs):
            continue
        if how_computed(op.attrs, device_type, bool(op.attrs.get("host_outputs"))) in ("composite", "fallback"):
            worst = max(worst, sum(graph.tensors[t].nbytes for t in op.outputs))
    return worst


def bind_compute(name: str, attrs: dict, args: list, kwargs: dict, outs: Sequence[torch.Tensor],
                 device_type: str, dyn: list) -> Bound:
    """A closure computing op `name` (decoded, substituted args) into `outs`."""
    target = attrs["target"]
    op = op_by_name(target)
    if attrs.get("result_shapes"):  # a reshaped graph output written by its producer (frontends.fx)
        outs = [o if shape is None else o.view(shape) for o, shape in zip(outs, attrs["result_shapes"])]
    results = attrs.get("results")
    positions = [0] if results is None else list(results)
    dynamic = has_dyn(args) or has_dyn(kwargs)
    get_args, get_kwargs = materializer(args), materializer(kwargs)

    by_position: list = [None] * (max(positions) + 1)
    for p, o in zip(positions, outs):
        by_position[p] = o
    kept = any(isinstance(o, Dyn) for o in outs)  # results kept as returned (host_outputs): no out= kernel
    how = how_computed(attrs, device_type, kept)
    writer = _DIRECT[target](by_position, device_type) if how == "direct" else None
    if writer is not None:
        if dynamic:
            return Bound(lambda: writer(get_args(dyn), get_kwargs(dyn)), "direct")
        return Bound(lambda: writer(args, kwargs), "direct")
    if how == "direct":  # the writer does not apply here: ATen's out= kernel, or compute + copy
        how = how_computed(attrs, device_type, kept, direct=False)

    variant = out_variant(op)
    if how in ("out", "composite"):
        out_kw = {variant.out_names[p]: o for p, o in zip(positions, outs)}
        keep = variant.keep_kwargs
        call = variant.op
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
                if isinstance(o, Dyn):
                    dyn[o.slot] = res[p]
                else:
                    o.copy_(res[p])
    return Bound(run_fallback, "fallback")


def derive_views(attrs: dict, args: list, kwargs: dict) -> list[torch.Tensor]:
    """The view outputs of a view op applied to (already resolved) tensors, in op-output order."""
    res = op_by_name(attrs["target"])(*args, **kwargs)
    results = attrs.get("results")
    return [res] if results is None else [res[p] for p in results]


def check_bytes(name: str, nbytes: int, shape: Sequence[int], dtype: torch.dtype) -> None:
    """A graph lowered with elem_size != the dtype's size cannot be replayed."""
    want = math.prod(shape) * dtype.itemsize
    if nbytes != want:
        raise ReplayError(f"tensor {name!r} has {nbytes} bytes but {tuple(shape)} x {dtype} needs {want}; "
                          "a graph lowered with --elem-size cannot be replayed")

"""ONNX pooling, reductions, resizing and data-movement ops, registered into onnx_ops.TABLE.

Same contract as onnx_ops: a binder reads attributes and constant inputs once and
returns a closure writing the output buffers, plus "out" or "fallback".
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from planner.runtime.aten_ops import ReplayError
from planner.runtime.onnx_ops import floats, ints, known_input, optional, register, scalar


# ------------------------------------------------------------------ pooling
def _pool_args(a: dict, nd: int, node: str) -> tuple[list[int], list[int], list[int], bool]:
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID", ""):
        raise ReplayError(f"pooling node {node!r}: auto_pad={a['auto_pad']!r} is not supported")
    k = list(a["kernel_shape"])
    s = list(a.get("strides", [1] * nd))
    pads = list(a.get("pads", [0] * (2 * nd)))
    if pads[:nd] != pads[nd:]:
        raise ReplayError(f"pooling node {node!r} has asymmetric pads {pads}; not supported")
    return k, s, pads[:nd], bool(a.get("ceil_mode", 0))


@register("MaxPool")
def _maxpool(op, ins, outs, a, node, known):
    if len(outs) != 1:
        raise ReplayError(f"MaxPool node {node!r}: the Indices output is not supported")
    x, o = ins[0], outs[0]
    nd = x.dim() - 2
    k, s, p, ceil = _pool_args(a, nd, node)
    d = list(a.get("dilations", [1] * nd))
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
    return (lambda: o.copy_(fn(x, k, s, p, d, ceil_mode=ceil))), "fallback"


@register("AveragePool")
def _avgpool(op, ins, outs, a, node, known):
    x, o = ins[0], outs[0]
    nd = x.dim() - 2
    k, s, p, ceil = _pool_args(a, nd, node)
    include = bool(a.get("count_include_pad", 0))
    if nd == 2:
        return (lambda: torch.ops.aten.avg_pool2d.out(x, k, s, p, ceil, include, None, out=o)), "out"
    if nd == 3:
        return (lambda: torch.ops.aten.avg_pool3d.out(x, k, s, p, ceil, include, None, out=o)), "out"
    return (lambda: o.copy_(F.avg_pool1d(x, k, s, p, ceil, include))), "fallback"


@register("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(op, ins, outs, a, node, known):
    x, o = ins[0], outs[0]
    dims = tuple(range(2, x.dim()))
    if op == "GlobalAveragePool":
        return (lambda: torch.mean(x, dims, keepdim=True, out=o)), "out"
    return (lambda: torch.amax(x, dims, keepdim=True, out=o)), "out"


@register("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")
def _reduce(op, ins, outs, a, node, known):
    x, o = ins[0], outs[0]
    axes = ints(known_input(ins, 1, known, node)) if optional(ins, 1) is not None else a.get("axes")
    keep = bool(a.get("keepdims", 1))
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            return (lambda: o.copy_(x)), "out"
        axes = list(range(x.dim()))
    fn = {"ReduceMean": torch.mean, "ReduceSum": torch.sum, "ReduceMax": torch.amax,
          "ReduceMin": torch.amin}[op]
    dims = tuple(axes)
    return (lambda: fn(x, dims, keepdim=keep, out=o)), "out"


# ------------------------------------------------------------------ data movement
@register("Concat")
def _concat(op, ins, outs, a, node, known):
    xs, o, axis = [x for x in ins if x is not None], outs[0], int(a["axis"])
    return (lambda: torch.cat(xs, axis, out=o)), "out"


@register("Transpose")
def _transpose(op, ins, outs, a, node, known):
    x, o = ins[0], outs[0]
    perm = list(a.get("perm", reversed(range(x.dim()))))
    v = x.permute(perm)
    return (lambda: o.copy_(v)), "out"


@register("Slice")
def _slice(op, ins, outs, a, node, known):
    x, o = ins[0], outs[0]
    starts = ints(known_input(ins, 1, known, node)) if optional(ins, 1) is not None else a["starts"]
    ends = ints(known_input(ins, 2, known, node)) if optional(ins, 2) is not None else a["ends"]
    axes = ints(known_input(ins, 3, known, node)) if optional(ins, 3) is not None else a.get(
        "axes", list(range(len(starts))))
    steps = ints(known_input(ins, 4, known, node)) if optional(ins, 4) is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * x.dim()
    for st, en, ax, sp in zip(starts, ends, axes, steps):
        if sp <= 0:
            raise ReplayError(f"Slice node {node!r} has step {sp}; only positive steps are supported")
        index[ax % x.dim()] = slice(st, en, sp)  # Python slicing clamps exactly as ONNX does for step > 0
    v = x[tuple(index)]
    return (lambda: o.copy_(v)), "out"


@register("Gather")
def _gather(op, ins, outs, a, node, known):
    x, idx, o = ins[0], ins[1], outs[0]
    axis = int(a.get("axis", 0)) % x.dim()
    n = x.shape[axis]
    if idx.dim() == 0 and 1 in known:
        v = x.select(axis, int(idx.item()) % n)
        return (lambda: o.copy_(v)), "out"
    flat_out = o.view(tuple(x.shape[:axis]) + (idx.numel(),) + tuple(x.shape[axis + 1:]))
    flat_idx = idx.reshape(-1)

    def run():  # ONNX allows negative indices; index_select does not
        i = torch.where(flat_idx < 0, flat_idx + n, flat_idx)
        torch.index_select(x, axis, i, out=flat_out)
    return run, "out"


@register("Split")
def _split(op, ins, outs, a, node, known):
    x = ins[0]
    axis = int(a.get("axis", 0)) % x.dim()
    sizes = ints(known_input(ins, 1, known, node)) if optional(ins, 1) is not None else a.get("split")
    if sizes is None:
        n = len(outs)
        chunk = -(-x.shape[axis] // n)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(n)]
    views, start = [], 0
    for s in sizes:
        views.append(x.narrow(axis, start, s))
        start += s
    pairs = list(zip(outs, views))

    def run():
        for o, v in pairs:
            o.copy_(v)
    return run, "out"


@register("Pad")
def _pad(op, ins, outs, a, node, known):
    x, o = ins[0], outs[0]
    if a.get("mode", "constant") != "constant":
        raise ReplayError(f"Pad node {node!r}: mode {a['mode']!r} is not supported")
    pads = ints(known_input(ins, 1, known, node)) if optional(ins, 1) is not None else a["pads"]
    value = scalar(known_input(ins, 2, known, node)) if optional(ins, 2) is not None else 0
    nd = x.dim()
    if len(pads) != 2 * nd or min(pads) < 0:
        raise ReplayError(f"Pad node {node!r}: pads {pads} (axes input or negative pads) not supported")
    inner = o[tuple(slice(pads[i], pads[i] + x.shape[i]) for i in range(nd))]

    def run():
        o.fill_(value)
        inner.copy_(x)
    return run, "out"


@register("ConstantOfShape")
def _constant_of_shape(op, ins, outs, a, node, known):
    o = outs[0]
    enc = a.get("value")
    value = floats(enc["value"])[0] if isinstance(enc, dict) else 0
    return (lambda: o.fill_(value)), "out"


@register("Resize", "Upsample")
def _resize(op, ins, outs, a, node, known):
    x, o = ins[0], outs[0]
    mode = a.get("mode", "nearest")
    coord = a.get("coordinate_transformation_mode", "half_pixel")
    nearest = a.get("nearest_mode", "round_prefer_floor")
    nd = x.dim() - 2
    size = list(o.shape[2:])
    if mode == "nearest" and (op == "Upsample" or (coord == "asymmetric" and nearest == "floor")):
        fn = {1: torch.ops.aten.upsample_nearest1d.out, 2: torch.ops.aten.upsample_nearest2d.out,
              3: torch.ops.aten.upsample_nearest3d.out}[nd]
        return (lambda: fn(x, size, out=o)), "out"
    if mode == "nearest" and coord == "half_pixel" and nearest == "round_prefer_ceil":
        fn = {1: torch.ops.aten._upsample_nearest_exact1d.out, 2: torch.ops.aten._upsample_nearest_exact2d.out,
              3: torch.ops.aten._upsample_nearest_exact3d.out}[nd]
        return (lambda: fn(x, size, out=o)), "out"
    if mode == "linear" and coord in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        align = coord == "align_corners"
        fn = {1: torch.ops.aten.upsample_linear1d.out, 2: torch.ops.aten.upsample_bilinear2d.out,
              3: torch.ops.aten.upsample_trilinear3d.out}[nd]
        return (lambda: fn(x, size, align, out=o)), "out"
    raise ReplayError(f"Resize node {node!r}: mode={mode!r}, coordinate_transformation_mode={coord!r}, "
                      f"nearest_mode={nearest!r} is not supported")


@register("CumSum")
def _cumsum(op, ins, outs, a, node, known):
    x, o = ins[0], outs[0]
    axis = int(scalar(known_input(ins, 1, known, node)))
    if a.get("exclusive", 0) or a.get("reverse", 0):
        raise ReplayError(f"CumSum node {node!r}: exclusive / reverse are not supported")
    return (lambda: torch.cumsum(x, axis, out=o)), "out"


@register("ArgMax", "ArgMin")
def _argmax(op, ins, outs, a, node, known):
    x, o = ins[0], outs[0]
    axis, keep = int(a.get("axis", 0)), bool(a.get("keepdims", 1))
    fn = torch.argmax if op == "ArgMax" else torch.argmin
    return (lambda: fn(x, axis, keep, out=o)), "out"


@register("Tile")
def _tile(op, ins, outs, a, node, known):
    x, o, reps = ins[0], outs[0], ints(known_input(ins, 1, known, node))
    return (lambda: o.copy_(x.repeat(reps))), "fallback"


@register("Einsum")
def _einsum(op, ins, outs, a, node, known):
    xs, o, eq = [x for x in ins if x is not None], outs[0], a["equation"]
    return (lambda: o.copy_(torch.einsum(eq, *xs))), "fallback"

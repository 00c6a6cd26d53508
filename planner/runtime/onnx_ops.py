"""ONNX ops replayed through ATen kernels that write straight into arena buffers.

`bind(op_type, attributes, ins, outs, node)` runs once per compute step at
executor init: it reads the attributes and constant inputs, prepares what does
not change between runs (views of static buffers, BatchNorm's folded scale and
shift) and returns a closure plus how it writes:
  out       an ATen out= kernel, or copy_ from a view, writes the buffer itself;
  fallback  the op is computed into a temporary and copied (counted by the executor).
`ins` is indexed by ONNX input position (None for an absent optional input);
constant inputs arrive as tensors. Semantics follow the ONNX operator
specification at opset 13 and later (Softmax over one axis, Split sizes as an
input). An op outside the table is a ReplayError naming the op and the node.
This module holds the table, element-wise ops, linear algebra and normalisation;
onnx_data_ops registers pooling, reductions, resizing and data movement into it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from planner.runtime import aten_ops
from planner.runtime.aten_ops import ReplayError

Closure = Callable[[], None]
# (op, ins, outs, attributes, node, known): `known` holds the input positions whose values are fixed at
# init (constants and weights outside the arena); only those may be read while binding
Binder = Callable[[str, list, list, dict, str, frozenset], tuple[Closure, str]]
TABLE: dict[str, Binder] = {}


def register(*names: str):
    def deco(fn: Binder) -> Binder:
        for n in names:
            TABLE[n] = fn
        return fn
    return deco


def supported_ops() -> list[str]:
    return sorted(TABLE)


def bind(op_type: str, attributes: dict, ins: list, outs: list, node: str,
         known: frozenset[int] = frozenset()) -> tuple[Closure, str]:
    if op_type not in TABLE:
        raise ReplayError(f"ONNX op {op_type!r} (node {node!r}) has no replay kernel; "
                          f"supported: {', '.join(supported_ops())}")
    return TABLE[op_type](op_type, ins, outs, attributes, node, known)


def view(op_type: str, x: torch.Tensor, out_shape: Sequence[int]) -> torch.Tensor:
    """The view output of Reshape / Flatten / Squeeze / Unsqueeze / Identity over x."""
    return x if op_type == "Identity" else x.view(tuple(out_shape))


def view_outputs(attrs: dict, x: torch.Tensor, out_shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """The outputs of an ONNX op lowered as views of x (frontends.onnx_layout decides which are):
    Transpose permutes, Split and Slice narrow, Gather of a scalar selects, Expand broadcasts,
    the reshapes view. Parameters come from the op's constant inputs or attributes."""
    op, a = attrs["onnx_op"], attrs.get("attributes", {})
    if op == "Transpose":
        return [x.permute(list(a.get("perm", reversed(range(x.dim())))))]
    if op == "Split":
        axis = int(a.get("axis", 0)) % x.dim()
        positions = attrs.get("output_positions", list(range(len(out_shapes))))
        sizes = attrs.get("const_inputs", {}).get("1", {}).get("value") or a.get("split")
        if sizes is None:  # equal pieces, the last one smaller
            n = int(a.get("num_outputs", max(positions) + 1))
            pieces = torch.split(x, -(-x.shape[axis] // n), axis)
        else:
            pieces = torch.split(x, [int(v) for v in sizes], axis)
        return [pieces[p] for p in positions]
    consts = {int(k): torch.tensor(floats(v["value"])).reshape(-1).tolist()
              for k, v in attrs.get("const_inputs", {}).items()}
    if op == "Slice":
        starts, ends = consts.get(1, a.get("starts")), consts.get(2, a.get("ends"))
        axes = consts.get(3, a.get("axes", list(range(len(starts)))))
        index = [slice(None)] * x.dim()
        for st, en, ax, sp in zip(starts, ends, axes, consts.get(4, [1] * len(starts))):
            index[ax % x.dim()] = slice(st, en, sp)  # positive steps: Python clamps as ONNX does
        return [x[tuple(index)]]
    if op == "Gather":  # one scalar index: select
        axis = int(a.get("axis", 0)) % x.dim()
        return [x.select(axis, int(consts[1][0]) % x.shape[axis])]
    if op == "Expand":
        return [x.expand(tuple(out_shapes[0]))]
    return [view(op, x, out_shapes[0])]


def const_tensor(enc: dict, device: torch.device) -> torch.Tensor:
    """frontends.onnx.encode_array's JSON -> tensor on `device`."""
    values = floats(enc["value"])
    return torch.tensor(values, dtype=getattr(torch, enc["dtype"]), device=device).reshape(enc["shape"])


def floats(x):
    if isinstance(x, list):
        return [floats(e) for e in x]
    if isinstance(x, dict) and "float" in x:
        return float(x["float"])
    return x


def ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def scalar(t: torch.Tensor | None):
    return None if t is None else t.reshape(-1)[0].item()


def optional(ins: list, i: int):
    return ins[i] if i < len(ins) else None


def known_input(ins: list, i: int, known: frozenset[int], node: str):
    """Input i when its value is fixed at init (None when absent); a run-time value is an error."""
    x = optional(ins, i)
    if x is not None and i not in known:
        raise ReplayError(f"node {node!r}: input {i} must be a constant or a weight (it is computed at run time)")
    return x


def _attr_float(a: dict, key: str, default: float) -> float:
    v = a.get(key, default)
    return float(v["float"]) if isinstance(v, dict) else float(v)


# ----------------------------------------------------------------- element-wise
_UNARY = {
    "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf, "Sqrt": torch.sqrt, "Exp": torch.exp,
    "Log": torch.log, "Neg": torch.neg, "Abs": torch.abs, "Reciprocal": torch.reciprocal, "Floor": torch.floor,
    "Ceil": torch.ceil, "Sin": torch.sin, "Cos": torch.cos, "Sign": torch.sign, "Not": torch.logical_not,
    "Round": torch.round,
}
_BINARY = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Pow": torch.pow, "Equal": torch.eq,
    "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge,
    "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor, "Max": torch.maximum,
    "Min": torch.minimum, "Sum": torch.add,
}


@register(*_UNARY)
def _unary(op, ins, outs, a, node, known):
    fn, x, o = _UNARY[op], ins[0], outs[0]
    return (lambda: fn(x, out=o)), "out"


@register(*_BINARY)
def _binary(op, ins, outs, a, node, known):
    xs, o = [x for x in ins if x is not None], outs[0]
    if len(xs) == 1:  # variadic Max/Min/Sum of one input
        x = xs[0]
        return (lambda: o.copy_(x)), "out"
    if len(xs) > 2:  # a takeover of a later input would be overwritten before it is read
        fn = _BINARY[op]

        def many():
            acc = fn(xs[0], xs[1])
            for x in xs[2:]:
                acc = fn(acc, x)
            o.copy_(acc)
        return many, "fallback"
    fn, x, y = _BINARY[op], xs[0], xs[1]
    if op == "Pow" and y.dim() == 0 and 1 in known:
        y = y.item()
    return (lambda: fn(x, y, out=o)), "out"


@register("Div")
def _div(op, ins, outs, a, node, known):
    x, y, o = ins[0], ins[1], outs[0]
    if o.dtype.is_floating_point:
        return (lambda: torch.div(x, y, out=o)), "out"
    return (lambda: torch.div(x, y, rounding_mode="trunc", out=o)), "out"


@register("Relu")
def _relu(op, ins, outs, a, node, known):
    x, o = ins[0], outs[0]
    return (lambda: torch.clamp_min(x, 0, out=o)), "out"


@register("LeakyRelu")
def _leaky(op, ins, outs, a, node, known):
    x, o, alpha = ins[0], outs[0], _attr_float(a, "alpha", 0.01)
    return (lambda: torch.ops.aten.leaky_relu.out(x, alpha, out=o)), "out"


@register("Clip")
def _clip(op, ins, outs, a, node, known):
    x, o = ins[0], outs[0]
    lo = scalar(known_input(ins, 1, known, node)) if optional(ins, 1) is not None else a.get("min")
    hi = scalar(known_input(ins, 2, known, node)) if optional(ins, 2) is not None else a.get("max")
    lo = float(lo["float"]) if isinstance(lo, dict) else lo
    hi = float(hi["float"]) if isinstance(hi, dict) else hi
    if lo is None and hi is None:
        return (lambda: o.copy_(x)), "out"
    return (lambda: torch.clamp(x, lo, hi, out=o)), "out"


@register("HardSigmoid")
def _hardsigmoid(op, ins, outs, a, node, known):
    x, o = ins[0], outs[0]
    alpha, beta = _attr_float(a, "alpha", 0.2), _attr_float(a, "beta", 0.5)

    def run():  # reads x once, then works on o only: safe when o took x's buffer over
        torch.mul(x, alpha, out=o)
        o.add_(beta).clamp_(0.0, 1.0)
    return run, "out"


@register("HardSwish")
def _hardswish(op, ins, outs, a, node, known):
    x, o = ins[0], outs[0]
    return (lambda: torch.ops.aten.hardswish.out(x, out=o)), "out"


@register("Gelu")
def _gelu(op, ins, outs, a, node, known):
    x, o, approx = ins[0], outs[0], a.get("approximate", "none")
    return (lambda: torch.ops.aten.gelu.out(x, approximate=approx, out=o)), "out"


@register("Swish")
def _swish(op, ins, outs, a, node, known):
    x, o, alpha = ins[0], outs[0], _attr_float(a, "alpha", 1.0)
    if alpha == 1.0:
        return (lambda: torch.ops.aten.silu.out(x, out=o)), "out"
    return (lambda: o.copy_(x * torch.sigmoid(alpha * x))), "fallback"


@register("Where")
def _where(op, ins, outs, a, node, known):
    c, x, y, o = ins[0], ins[1], ins[2], outs[0]
    return (lambda: torch.where(c, x, y, out=o)), "out"


@register("Cast", "Identity", "Dropout", "Expand", "Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _copy(op, ins, outs, a, node, known):
    # a copy into a buffer of its own (views are handled by `view`); copy_ broadcasts for Expand
    x, o = ins[0], outs[0]
    if x.numel() == o.numel() and x.shape != o.shape:  # a reshape of a strided x: one copy, no temporary
        o = o.view(x.shape)
    return (lambda: o.copy_(x)), "out"


# ------------------------------------------------------------------ linear algebra
def _conv_pads(a: dict, x: torch.Tensor, w: torch.Tensor, nd: int, transposed: bool) -> list[int]:
    """ONNX pads [begin..., end...] honouring auto_pad."""
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", "") or transposed:
        return list(a.get("pads", [0] * (2 * nd)))
    if auto == "VALID":
        return [0] * (2 * nd)
    strides, dil = a.get("strides", [1] * nd), a.get("dilations", [1] * nd)
    pads_b, pads_e = [], []
    for i in range(nd):
        size, k = x.shape[2 + i], w.shape[2 + i]
        out = math.ceil(size / strides[i])
        total = max(0, (out - 1) * strides[i] + (k - 1) * dil[i] + 1 - size)
        small, big = total // 2, total - total // 2
        pads_b.append(small if auto == "SAME_UPPER" else big)
        pads_e.append(big if auto == "SAME_UPPER" else small)
    return pads_b + pads_e


@register("Conv", "ConvTranspose")
def _conv(op, ins, outs, a, node, known):
    x, w, b, o = ins[0], ins[1], optional(ins, 2), outs[0]
    transposed = op == "ConvTranspose"
    nd = w.dim() - 2
    strides, dil = list(a.get("strides", [1] * nd)), list(a.get("dilations", [1] * nd))
    group = int(a.get("group", 1))
    pads = _conv_pads(a, x, w, nd, transposed)
    out_pad = list(a.get("output_padding", [0] * nd))
    conv = torch.ops.aten.convolution.out
    how = "out" if _native(conv, o) else "composite"
    if pads[:nd] == pads[nd:]:
        p = pads[:nd]
        direct = aten_ops.direct_convolution([o], o.device.type)  # CUDA: cuDNN into the buffer
        if direct is not None:
            args = (x, w, b, strides, p, dil, transposed, out_pad, group)
            return (lambda: direct(args, {})), "out"
        return (lambda: conv(x, w, b, strides, p, dil, transposed, out_pad, group, out=o)), how
    if transposed:
        raise ReplayError(f"ConvTranspose node {node!r} has asymmetric pads {pads}; not supported")
    pad_arg = [v for i in reversed(range(nd)) for v in (pads[i], pads[nd + i])]
    zero = [0] * nd
    return (lambda: conv(F.pad(x, pad_arg), w, b, strides, zero, dil, False, out_pad, group, out=o)), "fallback"


def _native(op, o: torch.Tensor) -> bool:
    s = op._schema
    qual = f"{s.name}.{s.overload_name}" if s.overload_name else s.name
    return torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CUDA" if o.is_cuda else "CPU")


@register("Gemm")
def _gemm(op, ins, outs, a, node, known):
    x, y, c, o = ins[0], ins[1], optional(ins, 2), outs[0]
    x = x.t() if a.get("transA", 0) else x
    y = y.t() if a.get("transB", 0) else y
    alpha, beta = _attr_float(a, "alpha", 1.0), _attr_float(a, "beta", 1.0)
    if c is None or beta == 0.0:
        def mm():
            torch.mm(x, y, out=o)
            if alpha != 1.0:
                o.mul_(alpha)
        return mm, "out"
    return (lambda: torch.addmm(c, x, y, beta=beta, alpha=alpha, out=o)), "out"


@register("MatMul")
def _matmul(op, ins, outs, a, node, known):
    x, y, o = ins[0], ins[1], outs[0]
    return (lambda: torch.matmul(x, y, out=o)), "out"


@register("MatMulAdd")  # memplan::MatMulAdd(A, B, C) = A @ B + C (frontends.onnx_fuse)
def _matmul_add(op, ins, outs, a, node, known):
    x, y, c, o = ins[0], ins[1], ins[2], outs[0]

    def run():
        torch.matmul(x, y, out=o)
        o.add_(c)
    return run, "out"


@register("BatchNormalization")
def _batchnorm(op, ins, outs, a, node, known):
    if len(outs) != 1 or a.get("training_mode", 0):
        raise ReplayError(f"BatchNormalization node {node!r} in training mode is not supported")
    x, scale, bias, mean, var = ins[:5]
    o, eps = outs[0], _attr_float(a, "epsilon", 1e-5)
    shape = (1, -1) + (1,) * (x.dim() - 2)

    def terms():  # y = x * k + c: the same terms ATen's inference kernel computes
        k = scale / torch.sqrt(var + eps)
        return k.reshape(shape), (bias - mean * k).reshape(shape)

    if {1, 2, 3, 4} <= known:  # weights outside the arena: fold once
        k, c = terms()

        def run():
            torch.mul(x, k, out=o)
            o.add_(c)
        return run, "out"

    def run_loaded():  # weights streamed through the arena: their values exist only at run time
        k, c = terms()
        torch.mul(x, k, out=o)
        o.add_(c)
    return run_loaded, "out"


@register("LayerNormalization")
def _layernorm(op, ins, outs, a, node, known):
    if len(outs) != 1:
        raise ReplayError(f"LayerNormalization node {node!r}: only the normalised output is supported")
    x, w, b, o = ins[0], optional(ins, 1), optional(ins, 2), outs[0]
    axis, eps = int(a.get("axis", -1)), _attr_float(a, "epsilon", 1e-5)
    shape = tuple(x.shape[axis:])
    return (lambda: o.copy_(F.layer_norm(x, shape, w, b, eps))), "fallback"


@register("Softmax", "LogSoftmax")
def _softmax(op, ins, outs, a, node, known):
    x, o, axis = ins[0], outs[0], int(a.get("axis", -1))
    fn = torch.ops.aten._softmax.out if op == "Softmax" else torch.ops.aten._log_softmax.out
    return (lambda: fn(x, axis, False, out=o)), "out"



@register("Attention")  # ONNX Attention over 4-D (batch, heads, seq, head) inputs (frontends.onnx_attention)
def _attention(op, ins, outs, a, node, known):
    if len(outs) != 1 or any(x is not None for x in ins[4:]) or ins[0].dim() != 4:
        raise ReplayError(f"Attention node {node!r}: only 4-D Q, K, V with an optional mask and one output "
                          "are supported (no past key / value)")
    if a.get("softcap", 0.0) or a.get("qk_matmul_output_mode", 0):
        raise ReplayError(f"Attention node {node!r}: softcap and qk_matmul_output_mode are not supported")
    q, k, v, mask, o = ins[0], ins[1], ins[2], optional(ins, 3), outs[0]
    scale = _attr_float(a, "scale", 1.0 / math.sqrt(q.shape[-1]))
    causal = bool(a.get("is_causal", 0))
    # the same call as the fx lowering's aten.scaled_dot_product_attention: computed, then copied
    return (lambda: o.copy_(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                           scale=scale))), "fallback"

from planner.runtime import onnx_data_ops  # noqa: E402,F401  (registers pooling, reductions, data movement)

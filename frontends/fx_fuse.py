"""GELU written as element-wise arithmetic, recognised in a core-ATen fx graph and fused into aten.gelu.

Python code that spells GELU out (transformers' `gelu_new` for GPT-2,
`0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`) exports as 8
element-wise ATen ops, each writing a buffer of x's size, where the ONNX
frontend fuses the same nodes into one Gelu (frontends.onnx_fuse) and ATen has
one kernel for it. Matching is algebraic, not by op sequence: every value built
from leaves by add / sub (with alpha), mul, neg, division by a number and pow
with a small integer exponent is read as a polynomial in those leaves, so
`x*x*x` and `pow(x, 3)`, either operand order, any association and constants
that differ within `REL_TOL` all match. For each aten.tanh (aten.erf) node T:
  - x: the first node, breadth-first from T's argument down its arithmetic, for
    which T's argument is a polynomial in x alone equal to
        tanh: k x + k 0.044715 x^3,  k = sqrt(2/pi)      erf: x / sqrt(2)
  - G: the first node, breadth-first up T's arithmetic readers, that is a
    polynomial in (x, T) equal to 0.5 x + 0.5 x T;
  - every node of both trees but G is read only inside them, G has x's shape
    and dtype, and that dtype is floating point.
Then G becomes `aten.gelu.default(x, approximate="tanh")` (erf: the default,
exact GELU) and the other nodes go. Valid on any functional graph, since it
fires only when nothing else reads the intermediates. A joint training graph's
backward reads them, so there it never fires; training fuses the Dynamo graph
before AOTAutograd differentiates it (frontends.training.lower_joint: its
torch-level operators map to the same ATen names), and the backward becomes one
gelu_backward reading x alone instead of the eight intermediates (GPT-2 small at
batch 8, sequence 1024: 96 MiB each per layer) and their derivatives' kernels.
"""

from __future__ import annotations

import math
from collections import deque

REL_TOL = 1e-6  # constants written with fewer digits (0.7978845608) still match; float32 eps is 1.2e-7
_MAX_DEGREE = 6  # a GELU polynomial has degree 3 in x (4 counting T)
_MAX_DEPTH = 8  # arithmetic nodes searched from T, each way

Poly = dict[tuple[int, ...], float]  # exponent of each leaf -> coefficient

_ADD = {"aten.add.Tensor", "aten.add.Scalar"}
_SUB = {"aten.sub.Tensor", "aten.sub.Scalar"}
_MUL = {"aten.mul.Tensor", "aten.mul.Scalar"}
_DIV = {"aten.div.Tensor", "aten.div.Scalar"}
_NEG = {"aten.neg.default"}
_POW = {"aten.pow.Tensor_Scalar"}
_ARITHMETIC = _ADD | _SUB | _MUL | _DIV | _NEG | _POW

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
# activation -> (its argument as a polynomial in x, the approximate= kwarg of aten.gelu)
_INNER: dict[str, tuple[Poly, str | None]] = {
    "aten.tanh.default": ({(1,): _SQRT_2_OVER_PI, (3,): _SQRT_2_OVER_PI * 0.044715}, "tanh"),
    "aten.erf.default": ({(1,): 1.0 / math.sqrt(2.0)}, None),
}
_OUTER: Poly = {(1, 0): 0.5, (1, 1): 0.5}  # 0.5 x + 0.5 x T


def fuse_gelu(graph) -> int:
    """Replace every GELU spelled out in arithmetic by one aten.gelu node; returns how many."""
    fused = 0
    for act in [n for n in graph.nodes if _target(n) in _INNER]:
        match = _match(act)
        if match is None:
            continue
        x, out, nodes, approximate = match
        _replace(graph, x, out, nodes, approximate)
        fused += 1
    return fused


def _target(node) -> str:
    """The ATen name of a call: as is in ATen graphs, mapped for the torch-level calls of a Dynamo graph."""
    if getattr(node, "op", None) != "call_function":
        return ""
    return _torch_level().get(node.target) or str(node.target)


_TORCH_LEVEL: dict = {}


def _torch_level() -> dict:
    """Python operators and torch functions of a Dynamo graph -> the ATen op with the same arguments."""
    if not _TORCH_LEVEL:
        import operator

        import torch

        _TORCH_LEVEL.update({
            operator.add: "aten.add.Tensor", torch.add: "aten.add.Tensor", operator.sub: "aten.sub.Tensor",
            torch.sub: "aten.sub.Tensor", operator.mul: "aten.mul.Tensor", torch.mul: "aten.mul.Tensor",
            operator.truediv: "aten.div.Tensor", operator.neg: "aten.neg.default", torch.neg: "aten.neg.default",
            torch.pow: "aten.pow.Tensor_Scalar", torch.tanh: "aten.tanh.default", torch.erf: "aten.erf.default"})
    return _TORCH_LEVEL


def _value(node):
    """A node's fake value: meta "val" in ATen graphs, "example_value" in Dynamo's."""
    return node.meta.get("val", node.meta.get("example_value"))


def _match(act):
    """(x, the output node, every node the GELU replaces, approximate=) or None."""
    inner, approximate = _INNER[_target(act)]
    x = inner_nodes = None
    for candidate in _arithmetic_below(act.args[0]):
        seen: set = set()
        if _equal(_poly(act.args[0], (candidate,), seen, _MAX_DEPTH), inner):
            x, inner_nodes = candidate, seen
            break
    if x is None:
        return None
    for out in _arithmetic_above(act):
        outer_nodes: set = set()
        if not _equal(_poly(out, (x, act), outer_nodes, _MAX_DEPTH), _OUTER):
            continue
        nodes = inner_nodes | outer_nodes | {act}
        if any(u not in nodes for n in nodes - {out} for u in n.users):
            return None  # an intermediate has another reader: it must stay, and fusing saves nothing
        xv, ov = _value(x), _value(out)
        if xv is None or ov is None or not xv.dtype.is_floating_point or xv.dtype != ov.dtype \
                or tuple(xv.shape) != tuple(ov.shape):
            return None
        return x, out, nodes, approximate
    return None


def _arithmetic_below(node):
    """node and the nodes its arithmetic reads, breadth-first (arithmetic only is entered)."""
    seen, queue = {node}, deque([(node, 0)])
    while queue:
        n, depth = queue.popleft()
        yield n
        if _target(n) in _ARITHMETIC and depth < _MAX_DEPTH:
            for a in n.all_input_nodes:
                if a not in seen:
                    seen.add(a)
                    queue.append((a, depth + 1))


def _arithmetic_above(node):
    """The arithmetic readers of node and of theirs, breadth-first."""
    seen, queue = {node}, deque([(node, 0)])
    while queue:
        n, depth = queue.popleft()
        if n is not node:
            yield n
        if depth < _MAX_DEPTH:
            for u in n.users:
                if u not in seen and _target(u) in _ARITHMETIC:
                    seen.add(u)
                    queue.append((u, depth + 1))


def _poly(value, leaves: tuple, seen: set, depth: int) -> Poly | None:
    """`value` as a polynomial in `leaves` (fx nodes); None if it reads anything else. Adds every
    arithmetic node it goes through to `seen`."""
    n = len(leaves)
    for i, leaf in enumerate(leaves):
        if value is leaf:
            return {tuple(int(j == i) for j in range(n)): 1.0}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {(0,) * n: float(value)} if value else {}
    target = _target(value)
    if target not in _ARITHMETIC or depth == 0:
        return None
    args = value.args

    def sub(v) -> Poly | None:
        return _poly(v, leaves, seen, depth - 1)

    result: Poly | None = None
    if target in _ADD or target in _SUB:
        alpha = value.kwargs.get("alpha", 1)
        a, b = sub(args[0]), sub(args[1])
        if a is not None and b is not None and isinstance(alpha, (int, float)):
            result = _add(a, _scale(b, alpha if target in _ADD else -alpha))
    elif target in _MUL:
        a, b = sub(args[0]), sub(args[1])
        result = _mul(a, b) if a is not None and b is not None else None
    elif target in _DIV:
        a = sub(args[0])
        if a is not None and isinstance(args[1], (int, float)) and args[1]:
            result = _scale(a, 1.0 / args[1])
    elif target in _NEG:
        a = sub(args[0])
        result = _scale(a, -1.0) if a is not None else None
    elif target in _POW:
        a, e = sub(args[0]), args[1]
        if a is not None and isinstance(e, (int, float)) and float(e).is_integer() and 0 <= e <= _MAX_DEGREE:
            result = {(0,) * n: 1.0}
            for _ in range(int(e)):
                result = _mul(result, a)
    if result is None or any(sum(k) > _MAX_DEGREE for k in result):
        return None
    seen.add(value)
    return result


def _add(a: Poly, b: Poly) -> Poly:
    out = dict(a)
    for k, c in b.items():
        out[k] = out.get(k, 0.0) + c
    return {k: c for k, c in out.items() if c != 0.0}


def _scale(a: Poly, s: float) -> Poly:
    return {k: c * s for k, c in a.items() if c * s != 0.0}


def _mul(a: Poly, b: Poly) -> Poly:
    out: Poly = {}
    for ka, ca in a.items():
        for kb, cb in b.items():
            k = tuple(i + j for i, j in zip(ka, kb))
            out[k] = out.get(k, 0.0) + ca * cb
    return {k: c for k, c in out.items() if c != 0.0}


def _equal(p: Poly | None, want: Poly) -> bool:
    return p is not None and p.keys() == want.keys() and all(
        math.isclose(p[k], want[k], rel_tol=REL_TOL) for k in want)


def _replace(graph, x, out, nodes: set, approximate: str | None) -> None:
    import torch

    kwargs = {} if approximate is None else {"approximate": approximate}
    with graph.inserting_before(out):
        gelu = graph.call_function(torch.ops.aten.gelu.default, (x,), kwargs)
    gelu.meta.update(out.meta)  # its fake value (shape, dtype, strides) and source location
    out.replace_all_uses_with(gelu)
    position = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(nodes, key=position.__getitem__, reverse=True):  # readers before what they read
        graph.erase_node(n)

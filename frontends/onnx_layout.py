"""Which ONNX nodes are views: the strides ATen would give every value.

ONNX has no strides, so exporters write each of ATen's views (view / reshape,
permute, split, squeeze, unsqueeze) as a node that a runtime may or may not
copy. Planned as copies they cost what the fx lowering of the same model does
not (BERT-base: q, k, v and the attention context transposed, +11%). One pass
in program order gives every value a layout, its shape and its strides in the
storage of its root (roots are contiguous), and decides per node:
  - Transpose: a view (permuted strides);
  - Split, and Slice with positive steps, with constant parameters: views
    (strides scaled by the steps; offsets do not matter to what follows);
  - Gather of one constant scalar index: a view (ATen's select);
  - Expand to a constant shape: a view (broadcast dimensions get stride 0);
  - Reshape / Flatten / Squeeze / Unsqueeze: a view when ATen's `view` accepts
    the input's layout (`view_strides`, at::detail::computeStride's rule), else
    a copy into a buffer of its own, as core ATen decomposes `reshape` of a
    permuted tensor (clone + _unsafe_view);
  - Identity, inference-mode Dropout and a Cast to the input's own type: views.
A consumer can need a layout too. ATen's matmul folds an operand with batch
dimensions into a matrix, or expands both to the broadcast batch shape and
reshapes them to 3-D; where that reshape cannot be a view it copies (in fx
graphs: clone + _unsafe_view before bmm). A MatMul / memplan::MatMulAdd operand
that ATen would copy makes the view node that produced it a copy instead (same
bytes, allocated one node earlier), and the pass runs again until no node
changes. Other ops read strided inputs as they are (ATen kernels do, and any
copy they make inside is as invisible in the fx lowering).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from frontends.onnx_fold import KeptNode, StaticGraph

_RESHAPES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
_MATMULS = frozenset({"MatMul", "MatMulAdd"})


@dataclass(frozen=True)
class Layout:
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in elements of the root's storage


def contiguous(shape: tuple[int, ...]) -> Layout:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return Layout(tuple(shape), tuple(reversed(strides)))


def is_contiguous(lay: Layout) -> bool:
    """Strides of a contiguous tensor, size-1 dimensions ignored (as ATen's is_contiguous does)."""
    want = contiguous(lay.shape).strides
    return all(s == w for d, s, w in zip(lay.shape, lay.strides, want) if d != 1)


def view_strides(lay: Layout, new_shape: tuple[int, ...]) -> Layout | None:
    """The layout `view(new_shape)` gives, or None where ATen's view refuses (reshape then copies).

    Dimensions are matched in chunks, right to left: a chunk is a run of input
    dimensions that are contiguous with each other; the output dimensions that
    cover exactly one chunk take strides inside it."""
    shape, strides = lay.shape or (1,), lay.strides or (1,)
    if math.prod(shape) == 0:
        return contiguous(new_shape)
    out = [0] * len(new_shape)
    view_d = len(new_shape) - 1
    base, chunk_numel, view_numel = strides[-1], 1, 1
    for d in range(len(shape) - 1, -1, -1):
        chunk_numel *= shape[d]
        if d == 0 or (shape[d - 1] != 1 and strides[d - 1] != chunk_numel * base):  # the chunk ends here
            while view_d >= 0 and (view_numel < chunk_numel or new_shape[view_d] == 1):
                out[view_d] = view_numel * base
                view_numel *= new_shape[view_d]
                view_d -= 1
            if view_numel != chunk_numel:
                return None
            if d > 0:
                base, chunk_numel, view_numel = strides[d - 1], 1, 1
    return Layout(tuple(new_shape), tuple(out)) if view_d == -1 else None


def expand(lay: Layout, shape: tuple[int, ...]) -> Layout:
    """ATen's expand: new leading dimensions and broadcast size-1 dimensions get stride 0."""
    lead = len(shape) - len(lay.shape)
    strides = [0] * lead + [s if d == n else 0 for d, n, s in zip(lay.shape, shape[lead:], lay.strides)]
    return Layout(tuple(shape), tuple(strides))


def matmul_copies(a: Layout, b: Layout) -> tuple[bool, bool]:
    """Whether ATen's matmul(a, b) copies a, b (a reshape to a matrix or a 3-D batch that is no view)."""
    if len(a.shape) <= 2 and len(b.shape) <= 2:
        return False, False  # mm / mv / dot read strided operands as they are
    if len(a.shape) >= 3 and len(b.shape) <= 2 and _foldable(a):
        return False, False  # folded into a (rows, k) matrix by a view
    if len(b.shape) >= 3 and len(a.shape) == 1 and _foldable(_mT(b)):
        return False, False
    a2 = a if len(a.shape) >= 2 else Layout((1,) + a.shape, (0,) + a.strides)
    b2 = b if len(b.shape) >= 2 else Layout(b.shape + (1,), b.strides + (0,))
    batch = _broadcast(a2.shape[:-2], b2.shape[:-2])
    n_batch = math.prod(batch)
    copies = []
    for x in (a2, b2):
        full = expand(x, batch + x.shape[-2:])
        copies.append(view_strides(full, (n_batch,) + x.shape[-2:]) is None)
    return copies[0], copies[1]


def _foldable(t: Layout) -> bool:
    """ATen's should_fold: the leading dimensions of t merge into its rows without a copy."""
    return all(t.strides[i] == t.strides[i + 1] * t.shape[i + 1] for i in range(len(t.shape) - 2))


def _mT(t: Layout) -> Layout:
    return Layout(t.shape[:-2] + t.shape[-1:] + t.shape[-2:-1], t.strides[:-2] + t.strides[-1:] + t.strides[-2:-1])


def _broadcast(x: tuple[int, ...], y: tuple[int, ...]) -> tuple[int, ...]:
    n = max(len(x), len(y))
    x, y = (1,) * (n - len(x)) + x, (1,) * (n - len(y)) + y
    return tuple(max(p, q) if 1 in (p, q) else p for p, q in zip(x, y))


@dataclass(frozen=True)
class Views:
    nodes: frozenset[int]  # indices into StaticGraph.nodes of the nodes whose outputs are views of their first input
    contiguous: frozenset[str]  # the view values laid out contiguously (a full one covers its root in order)


def view_nodes(s: StaticGraph) -> Views:
    """The view nodes of `s` and which of their outputs are contiguous (see the module docstring)."""
    forced: set[int] = set()  # view candidates that a consumer needs as copies
    while True:
        views, needed, layouts = _propagate(s, forced)
        if needed <= forced:
            return Views(frozenset(views), frozenset(x for x, lay in layouts.items() if is_contiguous(lay)))
        forced |= needed


def _propagate(s: StaticGraph, forced: set[int]) -> tuple[set[int], set[int], dict[str, Layout]]:
    """One pass: (view nodes, view nodes whose output a MatMul would copy, layouts of the view outputs)."""
    layouts: dict[str, Layout] = {}
    producer: dict[str, int] = {}
    views: set[int] = set()
    needed: set[int] = set()

    def layout(x: str) -> Layout:
        return layouts.get(x) or contiguous(s.values[x].shape)

    for i, kept in enumerate(s.nodes):
        node = kept.node
        outs = [x for x in node.output if x]
        for x in outs:
            producer[x] = i
        if node.op_type in _MATMULS and node.domain in ("", "ai.onnx", "memplan"):
            for x, copy in zip(node.input[:2], matmul_copies(layout(node.input[0]), layout(node.input[1]))):
                if copy and x in producer and producer[x] in views:
                    needed.add(producer[x])
        if i in forced:
            continue
        out_layouts = _view_layouts(kept, s, layout)
        if out_layouts is not None:
            views.add(i)
            layouts.update(zip(outs, out_layouts))
    return views, needed, layouts


def _view_layouts(kept: KeptNode, s: StaticGraph, layout) -> list[Layout] | None:
    """The layouts of the node's outputs if it is a view, else None."""
    node = kept.node
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or not node.input or not node.input[0]:
        return None
    x = node.input[0]
    if s.values[x].const is not None and s.values[x].weight is None:
        return None  # a constant input travels in attrs: there is no tensor to view
    outs = [s.values[o].shape for o in node.output if o]
    lay = layout(x)
    if op in _RESHAPES:
        new = view_strides(lay, outs[0])
        return None if new is None else [new]
    if op == "Identity" or (op == "Dropout" and _inference_dropout(node, s)):
        return [lay]
    if op == "Cast" and _attr(node, "to") == s.values[x].elem_type:  # ATen's .to(its own dtype) returns self
        return [lay]
    if op == "Transpose":
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        perm = perm if perm is not None else list(reversed(range(len(lay.shape))))
        return [Layout(tuple(lay.shape[p] for p in perm), tuple(lay.strides[p] for p in perm))]
    if op == "Split" and _const_inputs(node, s, 1):
        return [Layout(shape, lay.strides) for shape in outs]
    if op == "Slice" and _const_inputs(node, s, 1):
        steps = _const_values(node, s, 4) or [1] * len(_const_values(node, s, 1) or _attr(node, "starts"))
        axes = _const_values(node, s, 3) or _attr(node, "axes") or list(range(len(steps)))
        if min(steps) <= 0:
            return None  # a reversed slice is a copy in ATen too (flip)
        strides = list(lay.strides)
        for axis, step in zip(axes, steps):
            strides[axis % len(strides)] *= step
        return [Layout(outs[0], tuple(strides))]
    if op == "Gather" and _const_inputs(node, s, 1) and s.values[node.input[1]].shape == ():
        axis = (_attr(node, "axis") or 0) % len(lay.shape)  # a scalar index: ATen's select
        return [Layout(outs[0], lay.strides[:axis] + lay.strides[axis + 1:])]
    if op == "Expand" and _const_inputs(node, s, 1):
        return [expand(lay, outs[0])] if len(outs[0]) >= len(lay.shape) else None
    return None


def _const_inputs(node, s: StaticGraph, first: int) -> bool:
    """Every input from position `first` on is absent or a known constant (it travels in attrs)."""
    return all(not x or (s.values[x].const is not None and s.values[x].weight is None) for x in node.input[first:])


def _const_values(node, s: StaticGraph, pos: int) -> list[int] | None:
    if pos >= len(node.input) or not node.input[pos]:
        return None
    return [int(v) for v in s.values[node.input[pos]].const.reshape(-1)]


def _attr(node, name: str):
    for a in node.attribute:
        if a.name == name:
            return list(a.ints) if a.ints else a.i
    return None


def _inference_dropout(node, s: StaticGraph) -> bool:
    """Dropout is the identity without a mask output and with training_mode absent or constant false."""
    if any(node.output[1:]):
        return False
    if len(node.input) > 2 and node.input[2]:
        mode = s.values[node.input[2]].const
        return mode is not None and not bool(mode.reshape(-1)[0])
    return True

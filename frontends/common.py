"""What every frontend shares: the `Lowered` result, `FrontendError`, and `GraphBuilder`.

`GraphBuilder` collects tensors and ops in program order and applies the IR
rules that do not depend on the source format when it finishes:
  - views point at root tensors only (a view of a view is a view of its root);
  - graph outputs own storage: an output that is a view, a graph input or a
    weight gets a copy op after it;
  - element-wise ops list as in-place candidates the inputs that are roots,
    not weights, not graph outputs, and have the output's shape, dtype and size;
    an input that is a `full_view` (a reshape covering its root contiguously, as
    the 3-D view of a 2-D linear output) offers its root the same way (the root
    is added to the op's inputs), unless another input views that root otherwise;
  - `elem_size` (int8 studies) overrides every tensor's bytes per element
    (`with_elem_size` applies it to a finished lowering: one lowering, both sizes).
Nothing here imports torch or onnx.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from planner.graph import LifetimeGraph, Op, Tensor

# torch-style dtype name -> bytes per element
DTYPE_BYTES: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "complex64": 8, "complex128": 16,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1,
    "bool": 1, "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1,
}


class FrontendError(ValueError):
    """A model the frontends cannot lower; the message names the file, node or input."""


@dataclass(frozen=True)
class Lowered:
    graph: LifetimeGraph
    weights: dict[str, Any]  # tensor name -> torch.Tensor (fx) or numpy array (ONNX with data); empty when not loaded
    inputs: tuple[int, ...]  # graph input tensor ids in call order
    outputs: tuple[int, ...]  # output tensor ids in return order
    source: str  # "fx" | "onnx"
    # returns that are not tensors (AOTAutograd backward graphs return None for inputs without grad):
    # position in the flat return tuple -> value; `outputs` fills the other positions in order
    output_constants: dict[int, Any] = field(default_factory=dict)


def json_float(x: float) -> float | dict[str, str]:
    """Floats for attrs: strict JSON has no inf/nan, so those become {"float": "inf"}."""
    return x if math.isfinite(x) else {"float": repr(float(x))}


def dtype_bytes(dtype: str, where: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise FrontendError(f"{where}: dtype {dtype!r} has no known element size")
    return DTYPE_BYTES[dtype]


def tensor_nbytes(shape: Sequence[int], dtype: str, elem_size: int | None) -> int:
    """Bytes of a tensor: its element count times elem_size, or its dtype's size when elem_size is None."""
    return math.prod(shape) * (elem_size or DTYPE_BYTES[dtype])


def with_elem_size(lowered: Lowered, elem_size: int | None) -> Lowered:
    """The lowering as if made with `elem_size` (None: every dtype's own size); graph and fingerprint
    equal to lowering again with that elem_size, weights unchanged."""
    if elem_size is not None and elem_size <= 0:
        raise FrontendError(f"elem_size must be positive, got {elem_size}")
    g = lowered.graph
    tensors = tuple(replace(t, nbytes=tensor_nbytes(t.shape, t.dtype, elem_size)) for t in g.tensors)
    return replace(lowered, graph=LifetimeGraph(g.name, tensors, g.ops))


@dataclass
class _TensorDraft:  # mutable until finish(): kinds of outputs change late
    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str
    alias_of: int | None
    full_view: bool = False  # a view covering all of its root in the root's element order


@dataclass
class _OpDraft:
    name: str
    op_type: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    flops: float
    elementwise: bool
    recomputable: bool
    attrs: dict[str, Any] = field(default_factory=dict)


# (output tensor id to copy, id of its fresh copy) -> (op_type, attrs) of the copy op
CopyOpFactory = Callable[[int, int], tuple[str, dict[str, Any]]]


class GraphBuilder:
    """Accumulates a lifetime graph in program order; `finish` applies the IR rules."""

    def __init__(self, name: str, elem_size: int | None = None) -> None:
        if elem_size is not None and elem_size <= 0:
            raise FrontendError(f"elem_size must be positive, got {elem_size}")
        self.name = name
        self.elem_size = elem_size
        self._tensors: list[_TensorDraft] = []
        self._ops: list[_OpDraft] = []
        self._names: set[str] = set()

    def tensor(self, name: str, shape: Sequence[int], dtype: str, kind: str, alias_of: int | None = None,
               full_view: bool = False) -> int:
        """Add a tensor; `alias_of` may name any tensor, the root is stored. Returns its id.

        full_view: the view covers its root contiguously (the frontend knows its strides)."""
        dtype_bytes(dtype, f"tensor {name!r}")
        shape = tuple(int(d) for d in shape)
        if alias_of is not None:
            alias_of = self.root(alias_of)
            root = self._tensors[alias_of]
            full_view = full_view and math.prod(shape) == math.prod(root.shape) and dtype == root.dtype
        self._tensors.append(_TensorDraft(self._unique(name), shape, dtype, kind, alias_of,
                                          full_view and alias_of is not None))
        return len(self._tensors) - 1

    def op(self, name: str, op_type: str, inputs: Sequence[int], outputs: Sequence[int], *, flops: float,
           elementwise: bool = False, recomputable: bool = True, attrs: Mapping[str, Any] | None = None) -> int:
        self._ops.append(_OpDraft(name, op_type, tuple(inputs), tuple(outputs), float(flops), elementwise,
                                  recomputable, dict(attrs or {})))
        return len(self._ops) - 1

    def root(self, tid: int) -> int:
        alias = self._tensors[tid].alias_of
        return tid if alias is None else alias

    def shape(self, tid: int) -> tuple[int, ...]:
        return self._tensors[tid].shape

    def dtype(self, tid: int) -> str:
        return self._tensors[tid].dtype

    def kind(self, tid: int) -> str:
        return self._tensors[tid].kind

    def tensor_name(self, tid: int) -> str:
        return self._tensors[tid].name

    def nbytes(self, tid: int) -> int:
        t = self._tensors[tid]
        return tensor_nbytes(t.shape, t.dtype, self.elem_size)

    def finish(self, outputs: Sequence[int], copy_op: CopyOpFactory) -> tuple[LifetimeGraph, tuple[int, ...]]:
        """Mark graph outputs, copy those that own no storage, fill in-place candidates.

        Returns the graph and the output ids in return order (copies replace the originals).
        """
        final: list[int] = []
        copies: dict[int, int] = {}
        inserts: list[tuple[int, _OpDraft]] = []  # (position in program order, copy op)
        producer = {t: i for i, o in enumerate(self._ops) for t in o.outputs}
        for tid in outputs:
            t = self._tensors[tid]
            if t.alias_of is None and t.kind in ("activation", "output"):
                t.kind = "output"
                final.append(tid)
                continue
            if tid not in copies:  # a view, a graph input or a weight: give the output a buffer of its own
                copies[tid] = self.tensor(f"{t.name}_out", t.shape, t.dtype, "output")
                op_type, attrs = copy_op(tid, copies[tid])
                # right after the producer, so the copied root need not stay alive to the end
                where = producer[tid] + 1 if tid in producer else 0
                inserts.append((where, _OpDraft(f"{t.name}_copy", op_type, (tid,), (copies[tid],),
                                                float(math.prod(t.shape)), False, True, attrs)))
            final.append(copies[tid])
        # insert back to front; among equal positions the later copy goes in first so return order holds
        for k in sorted(range(len(inserts)), key=lambda k: (inserts[k][0], k), reverse=True):
            self._ops.insert(*inserts[k])
        tensors = tuple(
            Tensor(i, t.name, self.nbytes(i), t.dtype, t.shape, t.kind, t.alias_of) for i, t in enumerate(self._tensors)
        )
        ops = []
        for i, o in enumerate(self._ops):
            inplace = self._inplace(o)
            inputs = o.inputs + tuple(t for t in inplace if t not in o.inputs)  # roots offered by full views
            ops.append(Op(i, o.name, o.op_type, inputs, o.outputs, o.flops, inplace, o.recomputable, o.attrs))
        return LifetimeGraph(self.name, tensors, tuple(ops)), tuple(final)

    def _inplace(self, o: _OpDraft) -> tuple[int, ...]:
        if not o.elementwise or len(o.outputs) != 1:
            return ()
        out = self._tensors[o.outputs[0]]
        if out.alias_of is not None:
            return ()
        size = self.nbytes(o.outputs[0])
        found = []
        for tid in dict.fromkeys(o.inputs):
            t = self._tensors[tid]
            if t.alias_of is None and t.shape == out.shape:
                root = tid
            elif t.full_view and t.shape == out.shape:
                root = t.alias_of
            else:
                continue
            r = self._tensors[root]
            # weights are read-only and graph outputs must survive: neither may be overwritten; nor may a
            # root another input reads in another element order (x + x.t())
            strided = any(self._tensors[u].alias_of == root and not self._tensors[u].full_view for u in o.inputs)
            if r.kind not in ("weight", "output") and r.dtype == out.dtype and self.nbytes(root) == size \
                    and not strided and root not in found:
                found.append(root)
        return tuple(found)

    def _unique(self, name: str) -> str:
        base, n = name, 1
        while name in self._names:
            name, n = f"{base}_{n}", n + 1
        self._names.add(name)
        return name

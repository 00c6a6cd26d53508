"""Tensor lifetime graph: the IR every frontend produces and every planner reads.

A `LifetimeGraph` is a DAG of `Op`s over `Tensor`s. Ops are listed in program
order (a valid topological order). Tensors that are views of another tensor
(`alias_of`) own no storage: they live in the buffer of their root tensor, and
using one means using that root. Nothing here imports torch, onnx or a solver.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

TENSOR_KINDS = ("input", "weight", "activation", "output")


class GraphError(ValueError):
    """A graph that breaks the IR's rules; the message names the op or tensor."""


@dataclass(frozen=True, slots=True)
class Tensor:
    id: int  # index into LifetimeGraph.tensors
    name: str  # name in the source model (ONNX value name, fx node name)
    nbytes: int  # exact size in bytes; alignment is the target's business
    dtype: str  # torch-style dtype name, e.g. "float32"
    shape: tuple[int, ...]  # static shape
    kind: str  # one of TENSOR_KINDS
    alias_of: int | None = None  # root tensor whose buffer this view shares


@dataclass(frozen=True, slots=True)
class Op:
    id: int  # index into LifetimeGraph.ops (program order)
    name: str  # node name in the source model
    op_type: str  # "aten.convolution.default", "Conv", ...
    inputs: tuple[int, ...]  # tensor ids read (may repeat)
    outputs: tuple[int, ...]  # tensor ids produced
    flops: float = 0.0  # arithmetic cost, for recompute and time estimates
    inplace_inputs: tuple[int, ...] = ()  # inputs whose buffer an output may take over at their last use
    recomputable: bool = True  # False for side effects; random ops (attrs["random"]) replay their numbers
    attrs: Mapping[str, Any] = field(default_factory=dict)  # JSON-able data a replay needs


@dataclass(frozen=True)  # no slots: cached_property needs __dict__
class LifetimeGraph:
    name: str
    tensors: tuple[Tensor, ...]
    ops: tuple[Op, ...]

    def __post_init__(self) -> None:
        validate(self)

    # ---- structure -----------------------------------------------------
    def root(self, tid: int) -> int:
        """The tensor that owns the storage of `tid` (itself unless a view)."""
        alias = self.tensors[tid].alias_of
        return tid if alias is None else alias

    @cached_property
    def producer(self) -> dict[int, int]:
        """tensor id -> id of the op that writes it (inputs and weights have none)."""
        return {t: op.id for op in self.ops for t in op.outputs}

    @cached_property
    def consumers(self) -> dict[int, tuple[int, ...]]:
        """tensor id -> ids of ops that read it, in program order, without repeats."""
        users: dict[int, list[int]] = {t.id: [] for t in self.tensors}
        for op in self.ops:
            for t in dict.fromkeys(op.inputs):
                users[t].append(op.id)
        return {t: tuple(u) for t, u in users.items()}

    @cached_property
    def storage_users(self) -> dict[int, tuple[int, ...]]:
        """root tensor id -> ids of ops that read it directly or through a view."""
        users: dict[int, set[int]] = {t.id: set() for t in self.tensors if t.alias_of is None}
        for op in self.ops:
            for t in op.inputs:
                users[self.root(t)].add(op.id)
        return {t: tuple(sorted(u)) for t, u in users.items()}

    def predecessors(self, op_id: int) -> tuple[int, ...]:
        """Ops whose outputs `op_id` reads (directly or through a view)."""
        prods = self.producer
        found: dict[int, None] = {}
        for t in self.ops[op_id].inputs:
            for tid in (t, self.root(t)):
                if tid in prods and prods[tid] != op_id:
                    found[prods[tid]] = None
        return tuple(found)

    @cached_property
    def successors(self) -> tuple[tuple[int, ...], ...]:
        succ: list[list[int]] = [[] for _ in self.ops]
        for op in self.ops:
            for p in self.predecessors(op.id):
                succ[p].append(op.id)
        return tuple(tuple(dict.fromkeys(s)) for s in succ)

    def tensors_of(self, kind: str) -> list[Tensor]:
        return [t for t in self.tensors if t.kind == kind]

    def is_buffer(self, tid: int, include_weights: bool) -> bool:
        """Whether `tid` occupies scratchpad space of its own under a weight setting."""
        t = self.tensors[tid]
        if t.alias_of is not None:
            return False
        return include_weights or t.kind != "weight"

    def to_networkx(self):  # -> networkx.DiGraph
        """Op-level DAG with edges labelled by the tensor ids they carry."""
        import networkx as nx

        g = nx.DiGraph()
        for op in self.ops:
            g.add_node(op.id, name=op.name, op_type=op.op_type)
        for op in self.ops:
            for t in op.inputs:
                p = self.producer.get(self.root(t)) if t not in self.producer else self.producer[t]
                if p is not None and p != op.id:
                    g.add_edge(p, op.id)
                    g.edges[p, op.id].setdefault("tensors", set()).add(t)
        return g

    # ---- identity ------------------------------------------------------
    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the canonical form: plans carry it so they never meet another graph."""
        canon = {
            "tensors": [[t.nbytes, t.dtype, list(t.shape), t.kind, t.alias_of] for t in self.tensors],
            "ops": [[o.op_type, list(o.inputs), list(o.outputs), list(o.inplace_inputs)] for o in self.ops],
        }
        blob = json.dumps(canon, separators=(",", ":"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def summary(self) -> dict[str, Any]:
        kinds = {k: 0 for k in TENSOR_KINDS}
        for t in self.tensors:
            if t.alias_of is None:
                kinds[t.kind] += t.nbytes
        return {
            "name": self.name,
            "ops": len(self.ops),
            "tensors": len(self.tensors),
            "views": sum(t.alias_of is not None for t in self.tensors),
            **{f"{k}_bytes": v for k, v in kinds.items()},
            "flops": sum(o.flops for o in self.ops),
        }

    # ---- (de)serialisation ---------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tensors": [
                {"name": t.name, "nbytes": t.nbytes, "dtype": t.dtype, "shape": list(t.shape),
                 "kind": t.kind, "alias_of": t.alias_of}
                for t in self.tensors
            ],
            "ops": [
                {"name": o.name, "op_type": o.op_type, "inputs": list(o.inputs), "outputs": list(o.outputs),
                 "flops": o.flops, "inplace_inputs": list(o.inplace_inputs), "recomputable": o.recomputable,
                 "attrs": dict(o.attrs)}
                for o in self.ops
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LifetimeGraph:
        tensors = tuple(
            Tensor(i, t["name"], int(t["nbytes"]), t["dtype"], tuple(t["shape"]), t["kind"], t.get("alias_of"))
            for i, t in enumerate(d["tensors"])
        )
        ops = tuple(
            Op(i, o["name"], o["op_type"], tuple(o["inputs"]), tuple(o["outputs"]), float(o.get("flops", 0.0)),
               tuple(o.get("inplace_inputs", ())), bool(o.get("recomputable", True)), dict(o.get("attrs", {})))
            for i, o in enumerate(d["ops"])
        )
        return cls(d["name"], tensors, ops)


def validate(g: LifetimeGraph) -> None:
    """Check the IR's rules; raise GraphError naming the first offender."""
    n = len(g.tensors)
    for i, t in enumerate(g.tensors):
        if t.id != i:
            raise GraphError(f"tensor {t.name!r} has id {t.id}, expected {i}")
        if t.kind not in TENSOR_KINDS:
            raise GraphError(f"tensor {t.name!r} has unknown kind {t.kind!r}")
        if t.nbytes < 0:
            raise GraphError(f"tensor {t.name!r} has negative size {t.nbytes}")
        if t.alias_of is not None:
            if not 0 <= t.alias_of < n or g.tensors[t.alias_of].alias_of is not None:
                raise GraphError(f"tensor {t.name!r} must alias a root tensor, not {t.alias_of}")
    written: set[int] = set()
    for i, op in enumerate(g.ops):
        if op.id != i:
            raise GraphError(f"op {op.name!r} has id {op.id}, expected {i}")
        for t in (*op.inputs, *op.outputs):
            if not 0 <= t < n:
                raise GraphError(f"op {op.name!r} names tensor {t}, which does not exist")
        for t in op.inputs:
            kind = g.tensors[t].kind
            if kind in ("activation", "output") and t not in written:
                raise GraphError(f"op {op.name!r} reads {g.tensors[t].name!r} before any op writes it")
        for t in op.outputs:
            if t in written:
                raise GraphError(f"tensor {g.tensors[t].name!r} is written twice (second time by {op.name!r})")
            if g.tensors[t].kind in ("input", "weight"):
                raise GraphError(f"op {op.name!r} writes {g.tensors[t].kind} {g.tensors[t].name!r}")
            written.add(t)
        for t in op.inplace_inputs:
            if t not in op.inputs:
                raise GraphError(f"op {op.name!r} lists in-place input {t} that it does not read")
    for t in g.tensors:
        if t.kind in ("activation", "output") and t.id not in written:
            raise GraphError(f"{t.kind} {t.name!r} is never written")


def build(name: str, tensors: Iterable[tuple], ops: Iterable[tuple]) -> LifetimeGraph:
    """Small graphs by hand (tests, examples).

    tensors: (name, nbytes, kind) or (name, nbytes, kind, alias_of_name)
    ops: (name, [input names], [output names]) optionally followed by flops and
    in-place input names.
    """
    ts: list[Tensor] = []
    ids: dict[str, int] = {}
    for spec in tensors:
        tname, nbytes, kind = spec[:3]
        alias = ids[spec[3]] if len(spec) > 3 and spec[3] is not None else None
        ids[tname] = len(ts)
        ts.append(Tensor(len(ts), tname, int(nbytes), "uint8", (int(nbytes),), kind, alias))
    os_: list[Op] = []
    for spec in ops:
        oname, ins, outs = spec[:3]
        flops = float(spec[3]) if len(spec) > 3 else float(sum(ts[ids[o]].nbytes for o in outs))
        inplace = tuple(ids[x] for x in spec[4]) if len(spec) > 4 else ()
        os_.append(Op(len(os_), oname, "custom", tuple(ids[x] for x in ins), tuple(ids[x] for x in outs),
                      flops, inplace))
    return LifetimeGraph(name, tuple(ts), tuple(os_))

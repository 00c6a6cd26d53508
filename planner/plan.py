"""Plans: a straight-line program over a LifetimeGraph, and the plan file.

Instructions (one per step):
  compute op      run op; inputs resident; outputs placed at `offsets` (one per op
                  output, -1 for views and for outputs that take no buffer)
  load t @off     copy t from off-chip into the scratchpad (an off-chip copy must exist)
  store t         copy resident t off-chip (the copy persists)
  free t          release t's buffer

Buffers and metrics are derived by planner.check, never trusted from a solver;
a Plan carries the checked values so that the file is self-describing.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from planner.target import Target

FORMAT = "memplan.plan/1"
VERSION = "0.1.0"
INSTRUCTION_KINDS = ("compute", "load", "store", "free")


class PlanFileError(ValueError):
    """A plan file that cannot be read; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class Instr:
    kind: str  # one of INSTRUCTION_KINDS
    ref: int  # op id for compute, tensor id otherwise
    offsets: tuple[int, ...] = ()  # compute: per output (-1 = no buffer); load: (offset,)

    def to_json(self) -> list:
        return [self.kind, self.ref, list(self.offsets)] if self.offsets else [self.kind, self.ref]

    @classmethod
    def from_json(cls, row: list) -> Instr:
        return cls(row[0], int(row[1]), tuple(int(x) for x in row[2]) if len(row) > 2 else ())


def compute(op: int, *offsets: int) -> Instr:
    return Instr("compute", op, tuple(offsets))


def load(tensor: int, offset: int) -> Instr:
    return Instr("load", tensor, (offset,))


def store(tensor: int) -> Instr:
    return Instr("store", tensor)


def free(tensor: int) -> Instr:
    return Instr("free", tensor)


@dataclass(frozen=True, slots=True)
class Buffer:
    tensor: int  # root tensor id resident in this buffer
    offset: int  # byte offset in the arena
    size: int  # aligned size in bytes
    start: int  # step that allocates it (compute or load)
    end: int  # step that releases it (free, or an in-place overwrite); exclusive


@dataclass(frozen=True, slots=True)
class SolverRecord:
    formulation: str  # "baseline:program+tflite+belady", "offsets:exact", "joint:cpsat", ...
    backend: str = "none"  # "cpsat", "cbc", "highs", "gurobi", "heuristic"
    status: str = "feasible"  # "optimal", "feasible", "heuristic", "timeout"
    objective: float | None = None  # the solver's own objective value
    bound: float | None = None  # best proven lower bound on that objective
    gap: float | None = None  # (objective - bound) / objective, 0 when proven optimal
    seconds: float = 0.0  # wall seconds spent
    params: Mapping[str, Any] = field(default_factory=dict)  # options that shaped the run


@dataclass(frozen=True, slots=True)
class Plan:
    graph_name: str
    fingerprint: str  # LifetimeGraph.fingerprint of the graph this plan is for
    target: Target
    instructions: tuple[Instr, ...]
    buffers: tuple[Buffer, ...] = ()  # filled by planner.check
    metrics: Mapping[str, float] = field(default_factory=dict)  # filled by planner.check
    solver: SolverRecord = SolverRecord("unknown")

    def with_(self, **changes) -> Plan:
        return replace(self, **changes)

    # ---- plan file ------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "producer": f"memplan {VERSION}",
            "graph": self.graph_name,
            "fingerprint": self.fingerprint,
            "target": self.target.to_dict(),
            "metrics": dict(self.metrics),
            "solver": {**{k: getattr(self.solver, k) for k in SolverRecord.__slots__ if k != "params"},
                       "params": dict(self.solver.params)},
            "buffers": [[b.tensor, b.offset, b.size, b.start, b.end] for b in self.buffers],
            "instructions": [i.to_json() for i in self.instructions],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        if d.get("format") != FORMAT:
            raise PlanFileError(f"not a {FORMAT} plan (format field is {d.get('format')!r})")
        solver = dict(d.get("solver", {"formulation": "unknown"}))
        return cls(
            graph_name=d["graph"],
            fingerprint=d["fingerprint"],
            target=Target.from_dict(d["target"]),
            instructions=tuple(Instr.from_json(r) for r in d["instructions"]),
            buffers=tuple(Buffer(*b) for b in d.get("buffers", [])),
            metrics=dict(d.get("metrics", {})),
            solver=SolverRecord(**solver),
        )

    def save(self, path: str | os.PathLike) -> None:
        write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        p = Path(path)
        if not p.is_file():
            raise PlanFileError(f"{p}: no such plan file")
        try:
            data = json.loads(p.read_text())
            return cls.from_dict(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanFileError(f"{p}: not JSON ({e})") from None
        except (KeyError, TypeError, IndexError, ValueError) as e:
            if isinstance(e, PlanFileError):
                raise PlanFileError(f"{p}: {e}") from None
            raise PlanFileError(f"{p}: malformed plan file ({type(e).__name__}: {e})") from None

    # ---- interchange ----------------------------------------------------
    def to_minimalloc_csv(self) -> str:
        """Buffers as MiniMalloc's `id,lower,upper,size,offset` (upper exclusive)."""
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["id", "lower", "upper", "size", "offset"])
        for i, b in enumerate(self.buffers):
            w.writerow([f"b{i}_t{b.tensor}", b.start, b.end, b.size, b.offset])
        return out.getvalue()

    def to_tflm_offsets(self) -> list[int]:
        """TFLite-Micro style offset vector: one arena offset per tensor id, -1 if never
        placed. Only defined for plans where each tensor has a single buffer (no reloads)."""
        n = 1 + max((b.tensor for b in self.buffers), default=-1)
        offsets = [-1] * n
        for b in self.buffers:
            if offsets[b.tensor] not in (-1, b.offset):
                raise ValueError(f"tensor {b.tensor} has several offsets (it is reloaded); "
                                 "a TFLite-Micro offset vector cannot express that")
            offsets[b.tensor] = b.offset
        return offsets


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see either the old or the whole new content."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a plan file is as readable as any other
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

"""The plan executor: one arena on the device, every buffer a typed view of it.

At init the plan is checked (planner.check), the arena (uint8, the plan's arena
size) is allocated once, and the instruction list is compiled into closures:
  compute  an ATen out= kernel writing into the output buffers (aten_ops / onnx_ops
           choose how; ops that must compute into a temporary and copy are counted);
           view ops cost nothing at run time: their outputs are derived once per
           buffer instance of their root (a reload to a new offset is a new instance);
           an in-place takeover needs nothing, the output view is the input's memory;
  load     copy from the off-chip copy (call input, weight, spill buffer) into the arena;
  store    graph outputs: a fresh device tensor (what run() returns), or with output_views=True
           the arena view itself where no later step reuses its bytes (valid until the next run);
           spills: a copy into a pinned host buffer allocated once at init;
  free     nothing at run time (offsets are fixed by the plan).
On CUDA, loads and spill stores run on a transfer stream of their own. Waits are
computed at init from which arena regions and off-chip copies each step reads and
writes: a step waits (GPU-side, by event) for the last step of the other stream
that touched an overlapping region, so a freed region is never overwritten while
a store still reads it and no op reads a buffer before its load lands. Each run
starts with the transfer stream waiting for the caller's stream and ends the other
way round. On the CPU the same program runs with plain copies.

`phase_starts` splits the program at instruction indices: `run_phase(k, inputs)` runs one phase
with more inputs bound and returns the outputs it stores, while what earlier phases bound or left
in the arena stays (a training step's forward and backward, planner.runtime.training).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from planner.check import check
from planner.graph import LifetimeGraph
from planner.plan import Plan
from planner.runtime import aten_ops, onnx_ops
from planner.runtime.aten_ops import Dyn, ReplayError
from planner.runtime.rng import RngReplay
from planner.target import align_up

Access = tuple[str, int, int, bool]  # (space "arena" | "offchip", lo, hi, writes)


@dataclass(frozen=True, slots=True)
class ExecutorStats:
    arena_bytes: int  # the one device allocation the plan needs
    kernels: int  # compute steps that launch work (views excluded), per run
    out_kernels: int  # of those, written by an out= kernel or a direct copy/fill
    composite_out: int  # out= kernels ATen emulates (compute into a temporary + copy)
    fallback_copies: int  # ops computed into a temporary and copied by the executor
    views: int  # view steps (free at run time)
    loads: int
    stores: int
    load_bytes: int
    store_bytes: int
    waits: int  # cross-stream event waits per run (CUDA)
    output_views: int  # outputs returned as arena views (output_views=True and no later step reuses their bytes)


class _Flags:
    """Switches the transfer closures read at run time (timing and the compute-only baseline)."""

    def __init__(self) -> None:
        self.skip_transfers = False
        self.timing: list | None = None


@dataclass
class _Step:
    stream: str  # "C" (compute: the caller's stream) or "T" (transfers)
    fn: Callable[[], None]
    accesses: list[Access]
    label: str = ""  # "compute <op>", "load <tensor>", "store <tensor>": for measure_workspace


class Executor:
    def __init__(self, graph: LifetimeGraph, plan: Plan, weights: Mapping[str, Any] | None = None,
                 device: str | torch.device = "cpu", *, inputs: Sequence[int] | None = None,
                 outputs: Sequence[int] | None = None, output_views: bool = False,
                 phase_starts: Sequence[int] = (0,)) -> None:
        self.graph = graph
        self.output_views = output_views  # return outputs as arena views, valid until the next run
        self.plan = check(graph, plan)  # never replay a plan the checker rejects
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        target = self.plan.target
        self._counted = [graph.is_buffer(t.id, target.include_weights) for t in graph.tensors]
        self._size = [align_up(t.nbytes, target.alignment) for t in graph.tensors]
        self.arena_bytes = int(max((b.offset + b.size for b in self.plan.buffers), default=0))
        self.arena = torch.empty(self.arena_bytes, dtype=torch.uint8, device=self.device)
        self.input_ids = tuple(inputs) if inputs is not None else tuple(t.id for t in graph.tensors_of("input"))
        self.output_ids = tuple(outputs) if outputs is not None else tuple(
            t.id for t in graph.tensors_of("output"))
        self._dyn: list[Any] = []
        self._input_slots = {tid: self._new_slot() for tid in dict.fromkeys(self.input_ids)}
        self._output_slots: dict[int, int] = {}
        self._flags = _Flags()
        self._cstream: list[Any] = [None]
        self._tstream = torch.cuda.Stream(self.device) if self.cuda else None
        if self.cuda and self.arena_bytes:
            self.arena.record_stream(self._tstream)
        self._static = self._static_weights(weights or {})
        self._current: dict[int, torch.Tensor] = {}  # root -> buffer instance, during compilation
        self._where: dict[int, int] = {}  # root -> offset of that instance
        self._offchip: dict[int, Any] = {}  # root -> off-chip copy (tensor or Dyn)
        self._spill: dict[int, torch.Tensor] = {}  # root -> host buffer, allocated once
        self._views: dict[tuple[int, Any], Any] = {}  # (view id, root instance) -> tensor or Dyn
        self._instances: list[torch.Tensor] = []  # keeps instances alive so their ids stay unique
        self._written: list[tuple[torch.Tensor, tuple[int, ...]]] = []  # (instance, shape) checked after run 1
        self._counts = dict(kernels=0, out_kernels=0, composite_out=0, fallback_copies=0, views=0, loads=0,
                            stores=0, load_bytes=0, store_bytes=0, output_views=0)
        if list(phase_starts[:1]) != [0] or list(phase_starts) != sorted(set(phase_starts)):
            raise ValueError(f"phase_starts must be increasing instruction indices from 0, not {phase_starts}")
        self._phase_starts = tuple(phase_starts)
        self.store_phase: dict[int, int] = {}  # output tensor id -> the phase whose steps store it
        steps = self._compile()
        self._program, waits = self._schedule(steps)
        self.stats = ExecutorStats(arena_bytes=self.arena_bytes, waits=waits, **self._counts)
        self._verified = False
        self._arena_ptr = self.arena.data_ptr()

    @classmethod
    def from_lowered(cls, lowered, plan: Plan, device: str | torch.device = "cpu", *,
                     output_views: bool = False) -> Executor:
        """An executor for a frontends.Lowered (its weights, inputs and outputs in call order)."""
        return cls(lowered.graph, plan, lowered.weights, device, inputs=lowered.inputs, outputs=lowered.outputs,
                   output_views=output_views)

    # ------------------------------------------------------------ run time
    def run(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_ids):
            raise ReplayError(f"{self.graph.name}: expected {len(self.input_ids)} inputs, got {len(inputs)}")
        for tid, x in zip(self.input_ids, inputs):
            self._bind(tid, x)
        self._execute(0, len(self._program))
        dyn = self._dyn
        outs = tuple(dyn[self._output_slots[t]] for t in self.output_ids)
        self._finish()
        return outs

    def run_phase(self, phase: int, inputs: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Run the instructions of one phase (phase_starts) with `inputs` (tensor id -> value) bound;
        returns the outputs this phase stores, by tensor id. Values bound or stored by earlier phases
        stay bound (a training step: the forward phase, then the backward phase with the tangents)
        until the last phase ends."""
        for tid, x in inputs.items():
            self._bind(tid, x)
        self._execute(*self._phase_range[phase])
        dyn = self._dyn
        outs = {}
        for t, p in self.store_phase.items():
            if p == phase:
                outs[t] = dyn[self._output_slots[t]]
                dyn[self._output_slots[t]] = None
        if phase == len(self._phase_starts) - 1:
            self._finish()
        return outs

    def _bind(self, tid: int, x: torch.Tensor) -> None:
        if tid not in self._input_slots:
            raise ReplayError(f"{self.graph.name}: {self.graph.tensors[tid].name!r} is not an input of the plan")
        t = self.graph.tensors[tid]
        if tuple(x.shape) != t.shape:
            raise ReplayError(f"{self.graph.name}: input {t.name!r} has shape {tuple(x.shape)}, "
                              f"the plan is for {t.shape}")
        if not self._counted[tid] and x.device != self.device:
            x = x.to(self.device)
        self._dyn[self._input_slots[tid]] = x

    def _in_arena(self, x: torch.Tensor) -> bool:
        lo = self.arena.data_ptr()
        return lo <= x.data_ptr() < lo + self.arena_bytes

    def _execute(self, lo: int, hi: int, probe: Callable[[int], None] | None = None) -> None:
        with torch.no_grad():
            if self.cuda:
                cs = torch.cuda.current_stream(self.device)
                self._cstream[0] = cs
                self._tstream.wait_stream(cs)  # inputs are ready; the previous run's reads are done
            for k in range(lo, hi):
                self._program[k]()
                if probe is not None:
                    probe(k)
            if self.cuda:
                cs.wait_stream(self._tstream)

    def _finish(self) -> None:
        dyn = self._dyn
        for i in range(len(dyn)):
            dyn[i] = None
        if not self._verified:
            self._verify()

    __call__ = run

    def _verify(self) -> None:
        """After the first run: no out= kernel resized a buffer (that would move it out of the arena)."""
        if self.arena.data_ptr() != self._arena_ptr or self.arena.numel() != self.arena_bytes:
            raise ReplayError(f"{self.graph.name}: an out= kernel reallocated the arena")
        for inst, shape in self._written:
            if tuple(inst.shape) != shape:
                raise ReplayError(f"{self.graph.name}: an out= kernel resized a buffer from {shape} "
                                  f"to {tuple(inst.shape)}")
        self._verified = True
        self._written = []

    # ------------------------------------------------------------ compilation
    def _new_slot(self) -> int:
        self._dyn.append(None)
        return len(self._dyn) - 1

    def _static_weights(self, weights: Mapping[str, Any]) -> dict[int, torch.Tensor]:
        """Weights not fed by the caller: on the device, or on (pinned) host when the plan loads them."""
        out: dict[int, torch.Tensor] = {}
        missing = []
        for t in self.graph.tensors_of("weight"):
            if t.id in self._input_slots or not self.graph.consumers[t.id]:
                continue
            if t.name not in weights:
                missing.append(t.name)
                continue
            value = weights[t.name]  # a torch tensor (fx) or a numpy array, maybe read-only (ONNX)
            w = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(value)
            if self._counted[t.id]:  # lives off-chip: loads copy it into the arena
                w = w.to("cpu")
                out[t.id] = w.pin_memory() if self.cuda else w
            else:
                out[t.id] = w.to(self.device)
        if missing:
            raise ReplayError(f"{self.graph.name}: no value for weight(s) {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}")
        return out

    def _instance(self, tid: int, offset: int) -> torch.Tensor:
        t = self.graph.tensors[tid]
        dtype = getattr(torch, t.dtype)
        aten_ops.check_bytes(t.name, t.nbytes, t.shape, dtype)
        itemsize = dtype.itemsize
        if offset % itemsize:
            raise ReplayError(f"{t.name!r} at offset {offset} is not aligned to its {itemsize}-byte {t.dtype}")
        flat = self.arena.narrow(0, offset, t.nbytes).view(dtype)
        strides = self._strides(tid)
        inst = flat.view(t.shape) if strides is None else flat.as_strided(t.shape, strides, flat.storage_offset())
        self._instances.append(inst)
        return inst

    def _strides(self, tid: int) -> list[int] | None:
        """The permuted layout the frontend recorded for the op output `tid` (attrs["strides"]), if any."""
        producer = self.graph.producer.get(tid)
        layouts = self.graph.ops[producer].attrs.get("strides") if producer is not None else None
        return layouts[self.graph.ops[producer].outputs.index(tid)] if layouts else None

    def _region(self, tid: int, write: bool) -> Access:
        off = self._where[tid]
        return ("arena", off, off + self._size[tid], write)

    def _place(self, tid: int, offset: int) -> torch.Tensor:
        self._current[tid] = self._instance(tid, offset)
        self._where[tid] = offset
        return self._current[tid]

    def get(self, tid: int) -> Any:
        """The value of tensor `tid` at this point of the program: a tensor, or Dyn for per-run values."""
        root = self.graph.root(tid)
        if tid == root:
            if tid in self._current:
                return self._current[tid]
            if tid in self._input_slots and not self._counted[tid]:
                return Dyn(self._input_slots[tid])
            if tid in self._static:
                return self._static[tid]
            raise ReplayError(f"{self.graph.name}: {self.graph.tensors[tid].name!r} is read but not resident")
        base = self.get(root)
        instance = ("dyn", base.slot) if isinstance(base, Dyn) else id(base)
        key = (tid, instance)
        if key not in self._views:
            op = self.graph.ops[self.graph.producer[tid]]
            values = self._derive(op)
            for out, v in zip(op.outputs, values):
                self._views[(out, instance)] = v
        return self._views[key]

    def _derive(self, op) -> list[Any]:
        """View outputs of `op` from its current inputs; Dyn slots (filled at run time) when they
        depend on per-run values."""
        if "onnx_op" in op.attrs:
            x = self.get(op.inputs[0])
            if isinstance(x, Dyn):
                raise ReplayError(f"ONNX view {op.name!r} of a per-run value is not supported")
            return onnx_ops.view_outputs(op.attrs, x, [self.graph.tensors[t].shape for t in op.outputs])
        args = aten_ops.substitute(aten_ops.decode(op.attrs["args"], self.device), self.get)
        kwargs = aten_ops.substitute(aten_ops.decode_kwargs(op.attrs["kwargs"], self.device), self.get)
        if not (aten_ops.has_dyn(args) or aten_ops.has_dyn(kwargs)):
            return aten_ops.derive_views(op.attrs, args, kwargs)
        return [Dyn(self._new_slot()) for _ in op.outputs]

    def _compile(self) -> list[_Step]:
        steps: list[_Step] = []
        self._step_phase: list[int] = []
        loaded_later = {i.ref for i in self.plan.instructions if i.kind == "load"}
        computes = Counter(i.ref for i in self.plan.instructions if i.kind == "compute")
        self._rerun = {o for o, k in computes.items() if k > 1 and self.graph.ops[o].attrs.get("random")}
        self._rng = RngReplay(self.device) if self._rerun else None
        phase = 0
        for step_index, ins in enumerate(self.plan.instructions):
            self._step_index = step_index
            while phase + 1 < len(self._phase_starts) and step_index >= self._phase_starts[phase + 1]:
                phase += 1
            self._phase = phase
            if ins.kind == "compute":
                step = self._compile_compute(self.graph.ops[ins.ref], ins.offsets)
            elif ins.kind == "load":
                step = self._compile_load(ins.ref, ins.offsets[0])
            elif ins.kind == "store":
                step = self._compile_store(ins.ref, ins.ref in loaded_later)
            else:
                self._current.pop(ins.ref, None)
                continue
            if step is not None:
                name = (self.graph.ops[ins.ref] if ins.kind == "compute" else self.graph.tensors[ins.ref]).name
                steps.append(replace(step, label=f"{ins.kind} {name}"))
                self._step_phase.append(phase)
        return steps

    def _compile_compute(self, op, offsets: Sequence[int]) -> _Step | None:
        g = self.graph
        views = [g.tensors[t].alias_of is not None for t in op.outputs]
        if any(views) and not all(views):
            raise ReplayError(f"op {op.name!r} ({op.op_type}) returns both views and new tensors; not supported")
        if all(views) and op.outputs:
            self._counts["views"] += 1
            return self._compile_dynamic_view(op)
        reads = [self._region(r, False) for r in dict.fromkeys(g.root(t) for t in op.inputs) if r in self._current]
        if "onnx_op" in op.attrs:
            ins_by_pos, known = self._onnx_inputs(op)
        else:
            args = aten_ops.substitute(aten_ops.decode(op.attrs["args"], self.device), self.get)
            kwargs = aten_ops.substitute(aten_ops.decode_kwargs(op.attrs["kwargs"], self.device), self.get)
        outs = []
        host = set(op.attrs.get("host_outputs", ()))
        for k, (t, off) in enumerate(zip(op.outputs, offsets)):
            if k in host:  # kept as the kernel returns it (host or device): its readers get that tensor
                outs.append(Dyn(self._new_slot()))
                self._current[t], self._where[t] = outs[-1], off
                continue
            taken = [i for i in op.inplace_inputs if i in self._current and self._where[i] == off
                     and 0 < self._size[t] <= self._size[i]]
            if taken:  # in-place takeover: the input's buffer becomes the output's
                self._current.pop(taken[0])
            outs.append(self._place(t, off))
            self._written.append((outs[-1], g.tensors[t].shape))
        if "onnx_op" in op.attrs:
            fn, how = onnx_ops.bind(op.attrs["onnx_op"], dict(op.attrs.get("attributes", {})), ins_by_pos,
                                    outs, op.name, known)
        else:
            bound = aten_ops.bind_compute(op.name, op.attrs, args, kwargs, outs, self.device.type, self._dyn)
            fn, how = bound.run, bound.how
        if op.id in self._rerun:  # a random op run again: the numbers of its first run
            fn = self._rng.wrap(fn, op.id, op.name)
        self._counts["kernels"] += 1
        key = {"out": "out_kernels", "direct": "out_kernels", "composite": "composite_out",
               "fallback": "fallback_copies"}[how]
        self._counts[key] += 1
        writes = [self._region(t, True) for t in op.outputs]
        return _Step("C", _named(fn, op), reads + writes)

    def _onnx_inputs(self, op) -> tuple[list, frozenset[int]]:
        """Inputs by ONNX position, and the positions whose values are fixed at init."""
        positions = op.attrs.get("input_positions", list(range(len(op.inputs))))
        consts = {int(k): onnx_ops.const_tensor(v, self.device) for k, v in op.attrs.get("const_inputs", {}).items()}
        n = max([*positions, *consts, -1]) + 1
        ins: list = [None] * n
        known = set(consts)
        for pos, tid in zip(positions, op.inputs):
            ins[pos] = self.get(tid)
            if isinstance(ins[pos], Dyn):
                raise ReplayError(f"ONNX op {op.name!r}: per-run weights are not supported")
            if tid in self._static and not self._counted[tid]:
                known.add(pos)
        for pos, value in consts.items():
            ins[pos] = value
        return ins, frozenset(known)

    def _compile_dynamic_view(self, op) -> _Step | None:
        base = self.get(self.graph.root(op.outputs[0]))
        values = [self.get(t) for t in op.outputs] if not isinstance(base, Dyn) else None
        if values is not None and not any(isinstance(v, Dyn) for v in values):
            return None  # derived once at init from the static buffer instance
        slots = [v.slot for v in (values or [self.get(t) for t in op.outputs])]
        args = aten_ops.substitute(aten_ops.decode(op.attrs["args"], self.device), self.get)
        kwargs = aten_ops.substitute(aten_ops.decode_kwargs(op.attrs["kwargs"], self.device), self.get)
        get_args, get_kwargs = aten_ops.materializer(args), aten_ops.materializer(kwargs)
        dyn, attrs = self._dyn, op.attrs

        def view() -> None:
            for slot, v in zip(slots, aten_ops.derive_views(attrs, get_args(dyn), get_kwargs(dyn))):
                dyn[slot] = v
        return _Step("C", view, [])

    def _compile_load(self, tid: int, offset: int) -> _Step:
        src = self._offchip.get(tid)
        if src is None:
            src = Dyn(self._input_slots[tid]) if tid in self._input_slots else self._static[tid]
        dst = self._place(tid, offset)
        self._counts["loads"] += 1
        self._counts["load_bytes"] += self.graph.tensors[tid].nbytes
        dyn = self._dyn
        get_src = (lambda: dyn[src.slot]) if isinstance(src, Dyn) else (lambda: src)
        if not self.cuda:
            fn = lambda: dst.copy_(get_src())
        else:
            fn = self._transfer(lambda: dst.copy_(get_src(), non_blocking=True))
        return _Step("T", fn, [("offchip", tid, tid + 1, False), self._region(tid, True)])

    def _compile_store(self, tid: int, reloaded: bool) -> _Step:
        src = self._current[tid]
        self._counts["stores"] += 1
        self._counts["store_bytes"] += self.graph.tensors[tid].nbytes
        accesses = [self._region(tid, False), ("offchip", tid, tid + 1, True)]
        if tid in self.output_ids or self.graph.tensors[tid].kind == "output":
            slot = self._output_slots.setdefault(tid, self._new_slot())
            self.store_phase.setdefault(tid, self._phase)
            self._offchip[tid] = Dyn(slot)
            dyn, ts = self._dyn, self._tstream
            if self.output_views and self._untouched_after(tid, self._step_index):
                self._counts["output_views"] += 1

                def store_view() -> None:
                    dyn[slot] = src
                return _Step("C", store_view, accesses)

            def store_output() -> None:
                out = src.clone()
                if reloaded and ts is not None:
                    out.record_stream(ts)
                dyn[slot] = out
            return _Step("C", store_output, accesses)
        if tid not in self._spill:
            t = self.graph.tensors[tid]
            host = torch.empty(t.shape, dtype=getattr(torch, t.dtype), pin_memory=self.cuda)
            self._spill[tid] = host
        host = self._spill[tid]
        self._offchip[tid] = host
        if not self.cuda:
            return _Step("T", lambda: host.copy_(src), accesses)
        return _Step("T", self._transfer(lambda: host.copy_(src, non_blocking=True)), accesses)

    def _untouched_after(self, tid: int, step: int) -> bool:
        """No buffer allocated after `step` overlaps tid's bytes: its arena view stays valid to the end."""
        _, lo, hi, _ = self._region(tid, False)
        return not any(b.start > step and b.offset < hi and lo < b.offset + b.size for b in self.plan.buffers)

    def _transfer(self, copy: Callable[[], Any]) -> Callable[[], None]:
        """A copy on the transfer stream, skippable and timed on request (measure_overlap)."""
        flags, ts = self._flags, self._tstream

        def transfer() -> None:
            if flags.skip_transfers:
                return
            with torch.cuda.stream(ts):
                if flags.timing is None:
                    copy()
                    return
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record(ts)
                copy()
                b.record(ts)
                flags.timing.append((a, b))
        return transfer

    def _schedule(self, steps: list[_Step]) -> tuple[list[Callable[[], None]], int]:
        """The program: on CUDA each step preceded by its event wait (event_waits) and followed by
        the record of an event some later step waits for. Returns (program, waits per run)."""
        self.sync_steps = [(s.stream, s.accesses) for s in steps]  # kept for inspection and tests
        starts = [next((i for i, p in enumerate(self._step_phase) if p >= k), len(steps))
                  for k in range(len(self._phase_starts))]
        if not self.cuda:
            self._phase_range = list(zip(starts, [*starts[1:], len(steps)]))
            return [s.fn for s in steps], 0
        wait_for = event_waits(self.sync_steps)
        events = {j: torch.cuda.Event() for j in set(wait_for.values())}
        program: list[Callable[[], None]] = []
        cell, ts = self._cstream, self._tstream
        begins = []  # program index of each step (its wait included)
        self._program_ops: list[str | None] = []
        for i, s in enumerate(steps):
            begins.append(len(program))
            self._program_ops.extend([None] * (len(program) - len(self._program_ops)))
            if i in wait_for:
                ev = events[wait_for[i]]
                program.append((lambda ev=ev: ts.wait_event(ev)) if s.stream == "T"
                               else (lambda ev=ev: cell[0].wait_event(ev)))
            self._program_ops.extend([None] * (len(program) - len(self._program_ops)))
            program.append(s.fn)
            self._program_ops.append(s.label)
            if i in events:
                ev = events[i]
                program.append((lambda ev=ev: ev.record(ts)) if s.stream == "T"
                               else (lambda ev=ev: ev.record(cell[0])))
        begins.append(len(program))
        self._program_ops.extend([None] * (len(program) - len(self._program_ops)))
        lo = [begins[k] for k in starts]
        self._phase_range = list(zip(lo, [*lo[1:], len(program)]))
        return program, len(wait_for)


def event_waits(steps: Sequence[tuple[str, list[Access]]]) -> dict[int, int]:
    """step -> the step of the other stream it must wait for: the latest one that touched an
    overlapping region (arena bytes or an off-chip copy) where either of the two writes it.
    Streams run in order, so one wait covers everything before it on that stream, and a wait
    already implied by an earlier one is left out."""
    history: dict[str, list[int]] = {"C": [], "T": []}
    waited = {"C": -1, "T": -1}  # latest step of the other stream each stream has waited for
    wait_for: dict[int, int] = {}
    for i, (stream, accesses) in enumerate(steps):
        other = "T" if stream == "C" else "C"
        for j in reversed(history[other]):
            if j <= waited[stream]:
                break
            if _conflict(accesses, steps[j][1]):
                wait_for[i] = waited[stream] = j
                break
        history[stream].append(i)
    return wait_for


def _conflict(a: list[Access], b: list[Access]) -> bool:
    """Some byte both touch, and one of them writes it."""
    return any(space_a == space_b and lo_a < hi_b and lo_b < hi_a and (write_a or write_b)
               for space_a, lo_a, hi_a, write_a in a for space_b, lo_b, hi_b, write_b in b)


def _named(fn: Callable[[], None], op) -> Callable[[], None]:
    """Errors at run time name the op that raised them; MEMPLAN_TRACE=1 prints each op before it runs
    (an op that crashes the process names itself)."""
    if os.environ.get("MEMPLAN_TRACE"):
        inner = fn

        def fn() -> None:
            print(f"memplan: run {op.name} ({op.op_type})", file=sys.stderr, flush=True)
            inner()

    def run() -> None:
        try:
            fn()
        except ReplayError:
            raise
        except Exception as e:
            raise ReplayError(f"op {op.name!r} ({op.op_type}) failed: {type(e).__name__}: {e}") from e
    return run

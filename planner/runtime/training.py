"""A training step replayed from one joint plan: forward and backward phases over one arena.

A rematerialisation plan (formulations.remat) covers the joint forward + backward graph of a
step (frontends.training): what the backward reads is kept in the arena across the two
phases, or recomputed there, or reloaded from the host. `TrainingStep` runs such a plan
as two phases of one Executor: the forward phase (every instruction before the first
backward op, or the first load of a tangent) with the primals bound, and the backward phase
with the tangents bound. Nothing is copied between the phases: the arena holds what the
plan keeps, so the memory between forward and backward is the plan's, not a partition's
saved tensors on top of two arenas. `step(*primals)` goes through a torch.autograd.Function,
so `loss.backward()` runs the backward phase and autograd receives one gradient per primal.

One step at a time: a second forward before the first step's backward would overwrite the
arena the backward needs, so it is refused (ReplayError) instead of computing wrong gradients.
"""

from __future__ import annotations

from typing import Any

import torch

from planner.plan import Plan
from planner.runtime.aten_ops import ReplayError
from planner.runtime.executor import Executor


class TrainingStep:
    """The joint plan of `tg` (a frontends.training.TrainingGraph) on `device`, in two phases."""

    def __init__(self, tg, plan: Plan, device: str | torch.device = "cpu") -> None:
        from frontends.training import flat_outputs

        lowered = tg.lowered
        g = lowered.graph
        if len(lowered.inputs) != len(tg.joint_inputs):
            raise ReplayError(f"{g.name}: {len(lowered.inputs)} inputs for {len(tg.joint_inputs)} joint inputs")
        self.n_primals = len(tg.joint_inputs) - sum(name.startswith("tangent") for name in tg.input_names)
        self.primal_ids = lowered.inputs[:self.n_primals]
        self.tangent_ids = lowered.inputs[self.n_primals:]
        tangents = set(self.tangent_ids)
        boundary = next((k for k, ins in enumerate(plan.instructions)
                         if (ins.kind == "compute" and g.ops[ins.ref].attrs.get("phase") == "backward")
                         or (ins.kind == "load" and ins.ref in tangents)), len(plan.instructions))
        self.executor = Executor(g, plan, lowered.weights, device, inputs=lowered.inputs,
                                 outputs=lowered.outputs, phase_starts=(0, boundary))
        flat = flat_outputs(lowered)
        self.forward_outputs = flat[:tg.num_fwd_outputs]
        self.gradients = flat[tg.num_fwd_outputs:]  # one per primal: a tensor id, or None
        late = [g.tensors[t].name for t in self.forward_outputs
                if t is not None and self.executor.store_phase.get(t) != 0]
        if late:
            raise ReplayError(f"{g.name}: forward output(s) {', '.join(late)} are stored after the backward starts")
        reason = self.unsupported(tg)
        if reason:
            raise ReplayError(reason)
        if len(self.gradients) != self.n_primals:
            raise ReplayError(f"{g.name}: {len(self.gradients)} gradient outputs for {self.n_primals} primals")
        self._pending = False

    @staticmethod
    def unsupported(tg) -> str | None:
        """Why the joint graph `tg` cannot run as a TrainingStep (None if it can): AOTAutograd gives
        tangents to differentiable outputs only, so with updated buffers or integer outputs among the
        forward outputs the autograd.Function could not tell which gradient is which."""
        tangents = sum(name.startswith("tangent") for name in tg.input_names)
        if tangents and tangents != tg.num_fwd_outputs:
            return (f"{tg.graph.name}: {tg.num_fwd_outputs} forward outputs but {tangents} tangents (outputs "
                    "without gradients, e.g. updated BatchNorm statistics, are not supported here)")
        return None

    def forward(self, primals: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, ...]:
        if self._pending:
            raise ReplayError(f"{self.executor.graph.name}: a second forward before the backward of the "
                              "first would overwrite what that backward reads (one step at a time)")
        outs = self.executor.run_phase(0, dict(zip(self.primal_ids, primals)))
        self._pending = bool(self.tangent_ids)
        return tuple(None if t is None else outs[t] for t in self.forward_outputs)

    def backward(self, tangents: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, ...]:
        if not self._pending:
            raise ReplayError(f"{self.executor.graph.name}: backward without a pending forward")
        outs = self.executor.run_phase(1, dict(zip(self.tangent_ids, tangents)))
        self._pending = False
        return tuple(None if t is None else outs[t] for t in self.gradients)

    def __call__(self, *primals: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _StepFunction.apply(self, *primals)


class _StepFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, step: TrainingStep, *primals: torch.Tensor) -> tuple[Any, ...]:
        ctx.step = step
        outs = step.forward(primals)
        ctx.tangent_like = [(o.shape, o.dtype, o.device) for o in outs[:len(step.tangent_ids)]]
        return outs

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        step = ctx.step
        # tangents: one per differentiable forward output (AOTAutograd's order); an unused output gets zeros
        tangents = tuple(g if g is not None else torch.zeros(shape, dtype=dtype, device=device)
                         for g, (shape, dtype, device) in zip(grads, ctx.tangent_like))
        return (None, *step.backward(tangents))

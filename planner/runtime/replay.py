"""Replay a plan and measure it: `replay()` for Python, `memplan replay` for the shell.

`replay(lowered, plan, inputs, device, runs)` builds an Executor, runs it once to
warm up, then measures: on CUDA the peak device memory of a run (the arena plus
whatever the run allocates above the memory held before it: fallback temporaries
and the returned outputs), the median time per run, and how much of the
transfer time the compute hides; on the CPU the time per run. With a reference
(eager outputs) it reports the largest relative error: max |a - b| / max |b|
per output.

`memplan replay PLAN MODEL` lowers MODEL the way the plan file records, takes
weights and inputs from the registry model (zoo:) or the ONNX file (random
inputs, seeded), compares with eager PyTorch (zoo:) or onnxruntime (ONNX, when
installed; otherwise the comparison is skipped with a note), and exits 1 when
outputs differ beyond the tolerance.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from planner.plan import Plan
from planner.runtime.executor import Executor, ExecutorStats
from planner.runtime.profile import measure_overlap

TOLERANCE = {"cpu": 1e-4, "cuda": 1e-3}  # max relative error accepted by --check, per device type


@dataclass(frozen=True)
class ReplayReport:
    graph: str
    device: str
    arena_bytes: int  # the executor's one allocation
    plan_peak_bytes: int  # peak scratchpad use according to the checker
    measured_peak_bytes: int | None  # CUDA: arena + peak allocated above the pre-run level
    run_extra_bytes: int | None  # CUDA: that excess alone (temporaries and returned outputs)
    seconds_per_run: float  # median over `runs`
    runs: int
    stats: ExecutorStats
    overlap: dict[str, float] = field(default_factory=dict)  # CUDA with transfers: profile.measure_overlap
    max_rel_error: float | None = None  # vs the reference outputs, when given
    outputs: tuple = field(default=(), repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("outputs", "stats")}
        d.update({f"exec_{k}": v for k, v in asdict(self.stats).items() if k != "arena_bytes"})
        return d


def max_rel_error(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """max over outputs of max |a - b| / max |b| (0 when both are exactly zero)."""
    if len(outputs) != len(reference):
        raise ValueError(f"{len(outputs)} outputs but {len(reference)} reference tensors")
    worst = 0.0
    for a, b in zip(outputs, reference):
        a, b = a.detach().to("cpu", torch.float64), torch.as_tensor(b).detach().to("cpu", torch.float64)
        if a.shape != b.shape:
            return float("inf")
        if a.numel() == 0:
            continue
        diff = (a - b).abs().max().item()
        scale = b.abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def replay(lowered, plan: Plan, inputs: Sequence[torch.Tensor], device: str = "cpu", runs: int = 5,
           reference: Sequence[torch.Tensor] | None = None, output_views: bool = False) -> ReplayReport:
    """Run `plan` for `lowered` (a frontends.Lowered) on `device` and measure it. With output_views
    the outputs are arena views where the plan allows (see Executor), not fresh tensors."""
    dev = torch.device(device)
    ex = Executor.from_lowered(lowered, plan, dev, output_views=output_views)
    xs = tuple(x.to(dev) for x in inputs)
    cuda = dev.type == "cuda"
    outs = ex.run(*xs)  # warm-up: kernels load, allocator caches fill
    extra = None
    if cuda:
        del outs
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        outs = ex.run(*xs)
        torch.cuda.synchronize(dev)
        extra = torch.cuda.max_memory_allocated(dev) - before
    times = []
    for _ in range(max(1, runs)):
        if cuda:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        outs = ex.run(*xs)
        if cuda:
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    overlap = measure_overlap(ex, *xs, runs=max(1, runs)) if cuda and (ex.stats.loads + ex.stats.stores) else {}
    err = None if reference is None else max_rel_error(outs, reference)
    return ReplayReport(graph=lowered.graph.name, device=str(dev), arena_bytes=ex.arena_bytes,
                        plan_peak_bytes=int(ex.plan.metrics["peak_bytes"]),
                        measured_peak_bytes=None if extra is None else ex.arena_bytes + extra,
                        run_extra_bytes=extra, seconds_per_run=statistics.median(times), runs=len(times),
                        stats=ex.stats, overlap=overlap, max_rel_error=err, outputs=tuple(outs))


# ------------------------------------------------------------------ CLI
def replay_command(args: argparse.Namespace) -> int:
    """`memplan replay PLAN MODEL [--device cpu|cuda] [--check] [--runs N] [--json]`."""
    from planner.check import PlanError
    from planner.cli import UsageError, apply_lowering_record, print_report
    from planner.runtime.aten_ops import ReplayError

    plan = Plan.load(args.plan)
    apply_lowering_record(args, plan)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    lowered, inputs, reference, note = _model_and_reference(args, device)
    try:
        rep = replay(lowered, plan, inputs, str(device), args.runs, reference if args.check else None)
    except PlanError as e:
        print(f"INVALID: {e}")
        return 1
    except ReplayError as e:
        raise UsageError(str(e)) from None
    out = rep.to_dict()
    tol = TOLERANCE.get(device.type, 1e-4)
    if args.check:
        out["tolerance"] = tol
        out["outputs_match"] = None if rep.max_rel_error is None else rep.max_rel_error <= tol
        if note:
            out["note"] = note
    overlap = out.pop("overlap") if not args.json else {}
    print_report({k: v for k, v in out.items() if v is not None}, args.json)
    if overlap:
        print("overlap".ljust(24) + ", ".join(f"{k}={v:.4g}" for k, v in overlap.items()))
    if note and not args.check:
        print(f"note  {note}", file=sys.stderr)
    if args.check and rep.max_rel_error is not None and rep.max_rel_error > tol:
        print(f"MISMATCH: outputs differ from the reference by {rep.max_rel_error:.3g} (tolerance {tol:g})")
        return 1
    return 0


def _model_and_reference(args: argparse.Namespace, device: torch.device):
    """(lowered with weights, inputs, reference outputs or None, note about the reference)."""
    from planner.cli import lower

    model = args.model
    if model.startswith("zoo:"):
        import models

        name, params = models.parse_spec(model)
        if args.via == "onnx":  # the planning export drops weights; replay needs them
            from frontends.onnx import lower_onnx

            with tempfile.TemporaryDirectory(prefix="memplan-") as tmp:
                path = os.path.join(tmp, f"{name}.onnx")
                models.export_onnx(name, path, weights=True, **params)
                lowered = lower_onnx(path, elem_size=args.elem_size, name=model, load_weights=True)
        else:
            lowered = lower(args, model)
        module, inputs = models.build(name, **params)
        if not args.check:
            return lowered, inputs, None, ""
        module = module.to(device)
        with torch.no_grad():
            ref = module(*(x.to(device) for x in inputs))
        return lowered, inputs, _as_tuple(ref), ""
    lowered = lower(args, model)
    from frontends.onnx import onnx_weights

    weights = {**onnx_weights(model), **lowered.weights}
    lowered = type(lowered)(lowered.graph, weights, lowered.inputs, lowered.outputs, lowered.source)
    gen = torch.Generator().manual_seed(0)
    inputs = tuple(_random_input(lowered.graph.tensors[t], gen) for t in lowered.inputs)
    if not args.check:
        return lowered, inputs, None, ""
    try:
        import onnxruntime as ort
    except ImportError:
        return lowered, inputs, None, "onnxruntime is not installed: outputs not compared"
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    feed = {lowered.graph.tensors[t].name: x.numpy() for t, x in zip(lowered.inputs, inputs)}
    ref = sess.run(None, feed)
    return lowered, inputs, tuple(torch.from_numpy(r) for r in ref), "reference: onnxruntime (CPU)"


def _random_input(t, gen: torch.Generator) -> torch.Tensor:
    dtype = getattr(torch, t.dtype)
    if dtype.is_floating_point:
        return torch.randn(t.shape, generator=gen, dtype=dtype)
    return torch.zeros(t.shape, dtype=dtype)  # index-like inputs: 0 is valid for every table


def _as_tuple(x) -> tuple:
    if isinstance(x, torch.Tensor):
        return (x,)
    if isinstance(x, dict):
        return tuple(v for v in x.values() if isinstance(v, torch.Tensor))
    return tuple(v for v in x if isinstance(v, torch.Tensor))

"""The torch.compile backend `memplan`: plan every Dynamo graph and replay the plan.

    torch.compile(model, backend="memplan", options={"capacity": "6GiB", "time_limit": 30})

torch.compile hands `options` to a registered backend as the keyword argument
`options` (torch._TorchCompileWrapper). For each graph:
  inference  (grad disabled, or nothing requires grad): lower the Dynamo graph
             (frontends.fx.lower_graph_module), plan it, return a callable that
             replays the plan on the graph's device;
  training   with a `budget` (options={"budget": 0.5 | "80%" | "6GiB"}): the joint forward +
             backward graph (frontends.training.lower_joint) gets one rematerialisation plan
             (formulations.remat: keep, recompute or reload what the backward reads, under
             the peak budget; a size covers the gradients the step returns and the
             largest kernel temporary too, so the plan's share is the size less those)
             and runs as one TrainingStep (planner.runtime.training): its forward phase
             in the compiled call, its backward phase in loss.backward();
             without a budget, through AOTAutograd's default partition: the forward and
             the backward graphs are each lowered, planned and replayed like inference.
Parameters and buffers arriving as graph inputs (nn.Parameter, or marked static
by Dynamo) become weights: read where they are, never copied into the arena.
Plans are cached per (graph fingerprint, which carries the input shapes; target;
planner options) in memory and on disk ($MEMPLAN_CACHE_DIR or ~/.cache/memplan),
written atomically, so a second run does not solve again. A graph the frontend
or the executor cannot handle runs eagerly with a one-line note on stderr
(options={"fallback": False} raises instead).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from planner.check import PlanError, check
from planner.graph import LifetimeGraph
from planner.plan import VERSION, Plan, PlanFileError
from planner.runtime.aten_ops import ReplayError
from planner.runtime.executor import Executor
from planner.target import Target

STATS = {"solves": 0, "memory_hits": 0, "disk_hits": 0, "eager_fallbacks": 0}  # process-wide counters
_MEMORY: dict[str, Plan] = {}


@dataclass(frozen=True)
class BackendOptions:
    capacity: str | int | None = None  # device bytes for the arena ("6GiB", M_R, ...); None: minimise the arena
    planner: str = "auto"  # any planner.compile planner name
    time_limit: float = 30.0  # solver seconds per graph
    target: str | None = None  # preset; default "h100" for CUDA graphs, "cpu" otherwise
    alignment: int | None = None  # buffer alignment in bytes (default: the preset's)
    include_weights: bool = False  # weights also live in the arena (loaded from host)
    cache: bool = True  # reuse plans from memory and disk
    cache_dir: str | None = None  # default $MEMPLAN_CACHE_DIR or ~/.cache/memplan
    fallback: bool = True  # run a graph eagerly when it cannot be planned or replayed
    budget: str | float | int | None = None  # training: remat peak budget (fraction, "80%", bytes, "6GiB")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> BackendOptions:
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"memplan backend: unknown option(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        return cls(**d)

    def cache_path(self) -> Path:
        base = self.cache_dir or os.environ.get("MEMPLAN_CACHE_DIR") or Path.home() / ".cache" / "memplan"
        return Path(base)


def memplan_backend(gm: torch.fx.GraphModule, example_inputs: list, options: dict | None = None,
                    **_: Any) -> Callable:
    """Dynamo backend entry point (registered as "memplan")."""
    opts = BackendOptions.from_dict(options)
    static = _static_inputs(gm, example_inputs)
    training = torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)
    if not training:
        return _compile_graph(gm, example_inputs, opts, static, boxed=False)
    if opts.budget is not None:
        step = _training_step(gm, example_inputs, opts, static)
        if step is not None:
            return step
    from torch._dynamo.backends.common import aot_autograd

    n_dynamo = len(example_inputs)

    def forward(fw_gm, fw_inputs):
        return _compile_graph(fw_gm, fw_inputs, opts, _aot_static(fw_inputs, static, n_dynamo), boxed=True)

    def backward(bw_gm, bw_inputs):
        return _compile_graph(bw_gm, bw_inputs, opts, set(), boxed=True)

    return aot_autograd(fw_compiler=forward, bw_compiler=backward)(gm, example_inputs)


def _training_step(gm: torch.fx.GraphModule, example_inputs: list, opts: BackendOptions,
                   static: set[int]) -> Callable | None:
    """The joint graph's remat plan as one TrainingStep; None (AOTAutograd's path) when it cannot be."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from frontends.common import FrontendError
    from frontends.training import lower_joint
    from planner.runtime.training import TrainingStep

    name = f"{type(gm).__name__}_{len(gm.graph.nodes)}_train"
    try:
        tg = lower_joint(gm, example_inputs, static, name=name)
        reason = TrainingStep.unsupported(tg)
        if reason:  # before any solve
            raise ReplayError(reason)
        device = next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
        plan = plan_cached(tg.graph, opts, device, planner="remat", budget=_plan_budget(tg, opts.budget, device))
        with unset_fake_temporarily():
            step = TrainingStep(tg, plan, device)
    except (FrontendError, ReplayError, PlanError, PlanFileError, ImportError, ValueError) as e:
        if not opts.fallback:
            raise
        STATS["eager_fallbacks"] += 1
        print(f"memplan: {name}: {e}; training through AOTAutograd's partition instead", file=sys.stderr)
        return None
    return (lambda *args: step(*args)[0]) if _returns_bare_tensor(gm) else step


def _plan_budget(tg, budget: str | float | int, device: torch.device) -> str | float | int:
    """A size budget covers the step's device memory beyond weights and inputs. Beside the arena
    there are the gradients the step returns (fresh tensors: they outlive the step) and the largest
    temporary of an op without an out= kernel on the device (aten_ops.temporary_bytes), so the plan
    gets the size less both. A fraction stays a fraction of the joint graph's own peak."""
    from frontends.training import flat_outputs
    from planner.runtime.aten_ops import temporary_bytes
    from planner.target import parse_size

    if isinstance(budget, float) or (isinstance(budget, str) and budget.strip().endswith("%")):
        return budget
    try:
        if isinstance(budget, str) and float(budget) <= 1:
            return budget
    except ValueError:
        pass
    size = parse_size(budget) if isinstance(budget, str) else int(budget)
    g = tg.lowered.graph
    grads = sum(g.tensors[t].nbytes for t in flat_outputs(tg.lowered)[tg.num_fwd_outputs:] if t is not None)
    beside = grads + temporary_bytes(g, device.type)
    if size <= beside:
        raise ValueError(f"a budget of {size} bytes is below the {beside} bytes beside the arena (the {grads} "
                         "bytes of gradients the step returns and the largest kernel temporary)")
    return size - beside


def _returns_bare_tensor(gm: torch.fx.GraphModule) -> bool:
    """A graph returning one tensor, not a tuple: its runner returns that one output."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    return isinstance(out_node.args[0], torch.fx.Node)


def _static_inputs(gm: torch.fx.GraphModule, example_inputs: list) -> set[int]:
    """Indices of inputs that are module state: parameters, or tensors Dynamo marked static."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = set()
    for i, x in enumerate(example_inputs):
        meta = placeholders[i].meta.get("tensor_dict", {}) if i < len(placeholders) else {}
        if isinstance(x, torch.nn.Parameter) or getattr(x, "_dynamo_static_input_type", None) \
                or meta.get("_dynamo_static_input_type"):
            found.add(i)
    return found


def _aot_static(fw_inputs: list, dynamo_static: set[int], n_dynamo: int) -> set[int]:
    """Static inputs of an AOT forward graph: AOT's own record, else Dynamo's when the inputs line up."""
    try:
        from torch._guards import TracingContext

        ctx = TracingContext.try_get()
        meta = getattr(ctx, "fw_metadata", None) if ctx is not None else None
        if meta is not None and getattr(meta, "static_input_indices", None) is not None:
            return set(meta.static_input_indices)
    except ImportError:
        pass
    return set(dynamo_static) if len(fw_inputs) == n_dynamo else set()


def _compile_graph(gm: torch.fx.GraphModule, example_inputs: list, opts: BackendOptions, static: set[int],
                   boxed: bool) -> Callable:
    from frontends.common import FrontendError

    name = f"{type(gm).__name__}_{len(gm.graph.nodes)}"
    try:
        runner = _build_runner(gm, example_inputs, opts, static, name)
    except (FrontendError, ReplayError, PlanError, PlanFileError, ImportError) as e:
        if not opts.fallback:
            raise
        STATS["eager_fallbacks"] += 1
        symbolic = any(not isinstance(x, torch.Tensor) for x in example_inputs)
        hint = " (symbolic shapes: torch.compile(..., dynamic=False) plans static ones)" if symbolic else ""
        print(f"memplan: {name}: {e}; running this graph eagerly{hint}", file=sys.stderr)
        runner = gm.forward
    if not boxed:
        return runner

    def boxed_call(args: list):
        xs = list(args)
        args.clear()  # AOT's boxed convention: the callee owns (and may drop) the inputs
        return runner(*xs)
    boxed_call._boxed_call = True  # type: ignore[attr-defined]
    return boxed_call


def _build_runner(gm, example_inputs, opts: BackendOptions, static: set[int], name: str) -> Callable:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from frontends.fx import lower_graph_module

    lowered = lower_graph_module(gm, example_inputs, name=name, weight_inputs=static)
    device = next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
    plan = plan_cached(lowered.graph, opts, device)
    with unset_fake_temporarily():  # AOT compiles under a fake mode; the arena must be real memory
        ex = Executor.from_lowered(lowered, plan, device)
    if _returns_bare_tensor(gm):
        return lambda *args: ex.run(*args)[0]
    constants = dict(getattr(lowered, "output_constants", {}))
    if not constants:
        return ex.run
    n = len(lowered.outputs) + len(constants)

    def run(*args):  # non-tensor returns (AOT backward: None for inputs without gradients) put back
        tensors = iter(ex.run(*args))
        return tuple(constants[i] if i in constants else next(tensors) for i in range(n))
    return run


# ------------------------------------------------------------------ plans and the cache
def target_for(graph: LifetimeGraph, opts: BackendOptions, device: torch.device) -> Target:
    from planner.compile import resolve_target

    preset = opts.target or ("h100" if device.type == "cuda" else "cpu")
    capacity = "none" if opts.capacity is None else opts.capacity
    return resolve_target(preset, capacity, graph, opts.include_weights, opts.alignment)


def cache_key(graph: LifetimeGraph, target: Target, opts: BackendOptions, planner: str, **options) -> str:
    record = {"fingerprint": graph.fingerprint, "target": target.to_dict(), "planner": planner,
              "time_limit": opts.time_limit, "memplan": VERSION, **options}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]


def plan_cached(graph: LifetimeGraph, opts: BackendOptions, device: torch.device, planner: str | None = None,
                **options) -> Plan:
    """A checked plan for `graph`: from memory, from disk, or solved (and then stored in both).
    `planner` and `options` (e.g. remat's budget) default to the backend options' planner."""
    target = target_for(graph, opts, device)
    planner = planner or opts.planner
    key = cache_key(graph, target, opts, planner, **options)
    if opts.cache and key in _MEMORY:
        STATS["memory_hits"] += 1
        return _MEMORY[key]
    path = opts.cache_path() / f"{key}.plan.json"
    if opts.cache and path.is_file():
        try:
            plan = check(graph, Plan.load(path))
            STATS["disk_hits"] += 1
            _MEMORY[key] = plan
            return plan
        except (PlanFileError, PlanError):
            pass  # stale or damaged: solve again and overwrite it
    plan = _solve(graph, target, opts, planner, **options)
    if opts.cache:
        _MEMORY[key] = plan
        try:
            plan.save(path)
        except OSError as e:  # a read-only home still gets the in-memory cache
            print(f"memplan: cannot write the plan cache {path}: {e.strerror}", file=sys.stderr)
    return plan


def _solve(graph: LifetimeGraph, target: Target, opts: BackendOptions, planner: str, **options) -> Plan:
    from planner.compile import compile as compile_plan

    STATS["solves"] += 1
    try:
        return compile_plan(graph, target, planner=planner, time_limit=opts.time_limit, **options)
    except ImportError as e:  # a formulation whose solver is not installed here (no ortools / pulp)
        if planner not in ("auto",):
            raise
        print(f"memplan: planner 'auto' unavailable ({e}); using 'baseline'", file=sys.stderr)
        return compile_plan(graph, target, planner="baseline", time_limit=opts.time_limit)

"""One GPU measurement in one call: eager vs torch.compile (inductor) vs memplan replay.

Two steps, because the GPU machine has torch but no ortools / pulp:

  here:  python bench/gpu.py --plan-only [--dir bench/gpu_plans] [--planner baseline]
         lowers ResNet-50 b32, MobileNetV2 b32, BERT-base b8 s512 and GPT-2 small b8 s1024
         (our registry definitions, fx frontend), plans each with no capacity (minimise the
         arena) and ResNet-50 also at 50% of that arena or M_R, whichever is larger (a plan
         with spills), and writes per model the lowered graph (LifetimeGraph.to_dict + call
         order) and the plan files. No weights travel: they are rebuilt from the seed there,
         and weights the frontend derives (folded BatchNorm) by lowering again there;
  there: python bench/gpu.py --run [--dir bench/gpu_plans] [--out $OUT] [--models ...] [--methods ...]
         rebuilds each registry model from its seed (weights random, the same names and shapes),
         and measures inference (torch.no_grad) of
           eager, inductor (torch.compile default), memplan (Executor on the plan; outputs fresh
           tensors, and again with output_views: outputs returned as arena views, no copy),
           memplan at 50% capacity (ResNet-50: outputs equal, arena within the capacity,
           transfer/compute overlap), and, where installed, torchvision resnet50 /
           mobilenet_v2 and transformers BertModel(BertConfig()) / GPT2LMHeadModel(GPT2Config())
           in eager and inductor, the models the published reference numbers used.
         Peak activation memory = max allocated during a call minus memory held before it
         (for memplan the arena, allocated at init, is added back). Step time = median over
         timed calls after warm-up. Results: $OUT/gpu_results.json and $OUT/gpu_results.md.

Every measurement is its own try/except (a failure is recorded, the rest go on) and a time
budget (--budget-s, default 400 s) skips what would not finish: inductor compiles start only
with enough time left. `--models` / `--methods` split a run over several calls; `--small`
runs the registry's CI sizes on any device (a smoke test of this script).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet50_b32": ("resnet50", {"batch": 32}),
    "mobilenet_v2_b32": ("mobilenet_v2", {"batch": 32}),
    "bert_b8_s512": ("bert", {"batch": 8, "seq": 512}),
    "gpt2_b8_s1024": ("gpt2", {"batch": 8, "seq": 1024}),
}
CAPPED = {"resnet50_b32": 0.5}  # config -> capacity as a fraction of the no-spill arena (at least M_R)
ALIGNMENT = 512  # bytes; the h100 preset's alignment
DEFAULT_DIR = ROOT / "bench" / "gpu_plans"


# ------------------------------------------------------------------ here: plans
def plan_only(folder: Path, planner: str, time_limit: float, names: list[str]) -> None:
    import models
    from frontends.fx import lower_module
    from planner import bounds
    from planner.compile import compile as compile_plan
    from planner.target import align_up, get_target

    folder.mkdir(parents=True, exist_ok=True)
    for cfg in names:
        name, params = CONFIGS[cfg]
        t0 = time.perf_counter()
        module, inputs = models.build(name, **params)
        lowered = lower_module(module, inputs, name=cfg)
        graph = lowered.graph
        doc = {"config": cfg, "model": name, "params": params, "graph": graph.to_dict(),
               "inputs": list(lowered.inputs), "outputs": list(lowered.outputs),
               "fingerprint": graph.fingerprint, "torch": torch.__version__}
        (folder / f"{cfg}.graph.json").write_text(json.dumps(doc))
        lowered_s = time.perf_counter() - t0
        target = get_target("h100", capacity=None, alignment=ALIGNMENT)
        plan = compile_plan(graph, target, planner=planner, time_limit=time_limit)
        plan.save(folder / f"{cfg}.plan.json")
        line = (f"{cfg}: {len(graph.ops)} ops, lowered in {lowered_s:.0f}s, arena "
                f"{plan.metrics['arena_bytes'] / 2**20:.1f} MiB ({plan.solver.formulation})")
        if cfg in CAPPED:
            # no plan fits below M_R (one op's inputs + outputs); when the fraction is below it, M_R it is
            wanted = int(plan.metrics["arena_bytes"] * CAPPED[cfg])
            m_r = bounds.m_r(graph, False, ALIGNMENT)
            cap = align_up(max(wanted, m_r), ALIGNMENT)
            capped = compile_plan(graph, target.with_(capacity=cap), planner=planner, time_limit=time_limit)
            capped = capped.with_(solver=dataclasses.replace(capped.solver, params={
                **capped.solver.params, "capacity_fraction": CAPPED[cfg], "wanted_capacity": wanted, "M_R": m_r}))
            capped.save(folder / f"{cfg}.cap.plan.json")
            line += (f"; {CAPPED[cfg]:.0%} of it is {wanted / 2**20:.1f} MiB, M_R {m_r / 2**20:.1f} MiB: at "
                     f"{cap / 2**20:.1f} MiB the arena is {capped.metrics['arena_bytes'] / 2**20:.1f} MiB, "
                     f"spill traffic {capped.metrics['noncompulsory_bytes'] / 2**20:.1f} MiB")
        print(line, flush=True)


# ------------------------------------------------------------------ there: measurements
class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(fn: Callable[[], Any], iters: int, warmup: int = 3, extra_held: int = 0) -> dict[str, float]:
    """Peak activation bytes (max allocated during one call minus memory held before it, plus
    `extra_held` for memory the method keeps between calls) and the median step time.
    Without CUDA (a smoke test of this script) the peak is not measured."""
    cuda = torch.cuda.is_available()
    with torch.no_grad():
        for _ in range(warmup):
            out = fn()
            del out
        _sync()
        gc.collect()
        peak = None
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            out = fn()
            _sync()
            peak = torch.cuda.max_memory_allocated() - before + extra_held
            del out
        times = []
        for _ in range(iters):
            _sync()
            t0 = time.perf_counter()
            out = fn()
            _sync()
            times.append(time.perf_counter() - t0)
            del out
    return {"peak_activation_bytes": None if peak is None else int(peak), "median_ms": 1e3 * statistics.median(times),
            "min_ms": 1e3 * min(times), "iters": iters}


def first_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, dict) or hasattr(x, "values"):
        x = list(x.values())
    return next(first_tensor(v) for v in x if isinstance(v, (torch.Tensor, tuple, list, dict)))


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def load_case(folder: Path, cfg: str, device: str) -> dict[str, Any]:
    """Our model rebuilt from its seed, with the graph and the weights its plans need.

    Weights the frontend made (BatchNorm folded into convolutions) are not in the module's state:
    the model is lowered again here and they are taken from that lowering when its graph is the
    one planned; otherwise (another torch lowers differently) the new graph is used and planned
    here with the baseline planner (needs no solver), and the result says so."""
    import models
    from planner.graph import LifetimeGraph

    doc = json.loads((folder / f"{cfg}.graph.json").read_text())
    graph = LifetimeGraph.from_dict(doc["graph"])
    module, inputs = models.build(doc["model"], **doc["params"])
    weights = {**dict(module.named_parameters(remove_duplicate=False)),
               **dict(module.named_buffers(remove_duplicate=False))}
    case = {"graph": graph, "inputs_ids": tuple(doc["inputs"]), "outputs_ids": tuple(doc["outputs"]),
            "weights_from": "module state", "replan": False}
    missing = [t.name for t in graph.tensors_of("weight") if t.name not in weights and graph.consumers[t.id]]
    if missing:
        from frontends.fx import lower_module

        lowered = lower_module(module, inputs, name=cfg)
        weights.update(lowered.weights)
        case["weights_from"] = "lowered again here"
        if lowered.graph.fingerprint != graph.fingerprint:
            case.update(graph=lowered.graph, inputs_ids=lowered.inputs, outputs_ids=lowered.outputs, replan=True)
    case["module"] = module.to(device).eval()
    case["inputs"] = tuple(x.to(device) for x in inputs)
    case["weights"] = {k: v.to(device) for k, v in weights.items()}
    return case


def plan_for(case: dict[str, Any], path: Path):
    """The saved plan, or (when the graph here differs) the baseline plan for the same target."""
    from planner.plan import Plan

    plan = Plan.load(path)
    if not case["replan"]:
        return plan
    from planner.compile import compile as compile_plan

    return compile_plan(case["graph"], plan.target, planner="baseline")


def reference_model(cfg: str, device: str):
    """torchvision / transformers model with the same configuration, or None when not installed."""
    name, params = CONFIGS[cfg]
    torch.manual_seed(0)
    if name in ("resnet50", "mobilenet_v2"):
        import torchvision

        model = getattr(torchvision.models, name)()
        x = torch.randn(params["batch"], 3, 224, 224)
        return model.to(device).eval(), (x.to(device),)
    import transformers

    if name == "bert":
        model = transformers.BertModel(transformers.BertConfig())
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    ids = torch.randint(0, model.config.vocab_size, (params["batch"], params["seq"]))
    return model.to(device).eval(), (ids.to(device),)


METHODS = ("eager", "memplan", "inductor", "reference", "reference_inductor")


def run_all(folder: Path, out_dir: Path, names: list[str], budget_s: float, iters: int,
            methods: set[str]) -> dict:
    from planner.runtime.executor import Executor
    from planner.runtime.profile import measure_overlap, measure_workspace

    budget = Budget(budget_s)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "cudnn_tf32": torch.backends.cudnn.allow_tf32, "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "iters": iters, "models": {}}
    cases: dict[str, Any] = {}

    def attempt(cfg: str, key: str, fn: Callable[[], dict], need_s: float = 5.0) -> None:
        group = "reference_inductor" if key == "reference_inductor" else key.split("_")[0]
        if group not in methods:
            return
        entry = results["models"].setdefault(cfg, {})
        if budget.left() < need_s:
            entry[key] = {"skipped": f"time budget ({budget.left():.0f}s left, needs ~{need_s:.0f}s)"}
            return
        t0 = time.perf_counter()
        try:
            entry[key] = fn()
        except Exception as e:  # one failure must not lose the other measurements
            entry[key] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=4)}
        entry[key]["wall_s"] = round(time.perf_counter() - t0, 1)
        torch._dynamo.reset()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"{cfg:18s} {key:22s} {summary(entry[key])}", flush=True)
        write(results, out_dir)

    def case(cfg: str) -> dict[str, Any]:
        """Our model, graph and weights, and eager's output (loaded once)."""
        if cfg not in cases:
            c = load_case(folder, cfg, device)
            with torch.no_grad():
                c["ref"] = first_tensor(c["module"](*c["inputs"])).detach().clone()
            cases[cfg] = c
        return cases[cfg]

    # 1. what needs no compiler: eager and memplan on our models, the capped plan
    for cfg in names:
        def eager(cfg=cfg):
            module, inputs = case(cfg)["module"], case(cfg)["inputs"]
            return measure(lambda: module(*inputs), iters)
        attempt(cfg, "eager", eager)

        def replay(cfg=cfg, plan_file=f"{cfg}.plan.json", views=False):
            c = case(cfg)
            plan = plan_for(c, folder / plan_file)
            t0 = time.perf_counter()
            ex = Executor(c["graph"], plan, c["weights"], device, inputs=c["inputs_ids"], outputs=c["outputs_ids"],
                          output_views=views)
            init_s = time.perf_counter() - t0
            inputs = c["inputs"]
            res = measure(lambda: ex.run(*inputs), iters, extra_held=ex.arena_bytes)
            with torch.no_grad():
                got = ex.run(*inputs)[0]
            res.update(arena_bytes=ex.arena_bytes, capacity=plan.target.capacity, init_s=round(init_s, 2),
                       plan_peak_bytes=int(plan.metrics["peak_bytes"]), planner=plan.solver.formulation,
                       spill_bytes=int(plan.metrics["noncompulsory_bytes"]),
                       max_rel_error=rel_error(got, c["ref"]), weights_from=c["weights_from"],
                       replanned_here=c["replan"],
                       **{f"exec_{k}": v for k, v in vars_of(ex.stats).items() if k != "arena_bytes"})
            res["matches_eager"] = res["max_rel_error"] <= 1e-3
            if device == "cuda":  # what the measured peak holds beyond the arena: outputs, kernel workspace
                res.update(measure_workspace(ex, *inputs))
                beyond = res["peak_activation_bytes"] - ex.arena_bytes - res["output_bytes"]
                res["beyond_arena_and_outputs_bytes"] = beyond
                res["within_1pct_plus_workspace"] = beyond <= 0.01 * ex.arena_bytes + res["workspace_bytes"]
            for key in ("capacity_fraction", "wanted_capacity", "M_R"):
                if key in plan.solver.params:
                    res[key] = plan.solver.params[key]
            if plan.target.capacity is not None:
                res["arena_within_capacity"] = ex.arena_bytes <= plan.target.capacity
                res["overlap"] = measure_overlap(ex, *inputs, runs=5)
            return res
        attempt(cfg, "memplan", replay)
        attempt(cfg, "memplan_output_views", lambda cfg=cfg: replay(cfg, views=True))
        if (folder / f"{cfg}.cap.plan.json").is_file():
            attempt(cfg, "memplan_cap50", lambda cfg=cfg: replay(cfg, f"{cfg}.cap.plan.json"))

    # 2. inductor on our models, then the torchvision / transformers reference models
    for cfg in names:
        def compiled(cfg=cfg):
            module, inputs = case(cfg)["module"], case(cfg)["inputs"]
            fn = torch.compile(module)
            t0 = time.perf_counter()
            with torch.no_grad():
                fn(*inputs)
            res = measure(lambda: fn(*inputs), iters)
            res["compile_s"] = round(time.perf_counter() - t0, 1)
            return res
        attempt(cfg, "inductor", compiled, need_s=150.0)
    for cfg in names:
        def ref_eager(cfg=cfg):
            model, inputs = reference_model(cfg, device)
            cases[cfg + ":hf"] = (model, inputs)
            return measure(lambda: model(*inputs), iters)
        attempt(cfg, "reference_eager", ref_eager)
    for cfg in names:
        def ref_compiled(cfg=cfg):
            model, inputs = cases.get(cfg + ":hf") or reference_model(cfg, device)
            fn = torch.compile(model)
            t0 = time.perf_counter()
            with torch.no_grad():
                fn(*inputs)
            res = measure(lambda: fn(*inputs), iters)
            res["compile_s"] = round(time.perf_counter() - t0, 1)
            return res
        attempt(cfg, "reference_inductor", ref_compiled, need_s=150.0)
    results["budget_left_s"] = round(budget.left(), 1)
    write(results, out_dir)
    return results


def vars_of(stats) -> dict[str, Any]:
    return {k: getattr(stats, k) for k in stats.__slots__}


def summary(r: dict) -> str:
    if "error" in r:
        return "ERROR " + r["error"][:160]
    if "skipped" in r:
        return "skipped: " + r["skipped"]
    parts = [f"{r['median_ms']:.2f} ms", f"peak {mib(r['peak_activation_bytes'])} MiB"]
    if "arena_bytes" in r:
        parts.append(f"arena {r['arena_bytes'] / 2**20:.0f} MiB, err {r['max_rel_error']:.1e}")
    if "compile_s" in r:
        parts.append(f"compile {r['compile_s']}s")
    return ", ".join(parts)


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def write(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_results.json").write_text(json.dumps(results, indent=1, default=str))
    (out_dir / "gpu_results.md").write_text(markdown(results))


def markdown(results: dict) -> str:
    lines = [f"# GPU inference: eager vs inductor vs memplan ({results['device']}, torch {results['torch']})", "",
             "Peak activation memory = max allocated during one call minus memory held before it "
             "(memplan: plus its arena). Median of the timed calls after warm-up.", "",
             "| model | method | median ms | peak activation MiB | arena MiB | max rel err | note |",
             "|---|---|---:|---:|---:|---:|---|"]
    for cfg, entries in results["models"].items():
        for key, r in entries.items():
            if "median_ms" not in r:
                note = r.get("skipped") or r.get("error", "")[:80]
                lines.append(f"| {cfg} | {key} | | | | | {note} |")
                continue
            arena = mib(r["arena_bytes"]) if "arena_bytes" in r else ""
            err = f"{r['max_rel_error']:.1e}" if "max_rel_error" in r else ""
            note = []
            if r.get("capacity"):
                note.append(f"capacity {mib(r['capacity'])} MiB, within: {r.get('arena_within_capacity')}")
            if r.get("wanted_capacity"):
                note.append(f"{r['capacity_fraction']:.0%} of the arena ({mib(r['wanted_capacity'])} MiB) is "
                            f"below M_R ({mib(r['M_R'])} MiB)" if r["wanted_capacity"] < r["M_R"] else "")
            if r.get("overlap"):
                note.append(f"transfers {r['overlap'].get('transfer_busy_ms', 0):.1f} ms, hidden "
                            f"{100 * r['overlap'].get('hidden_fraction', 0):.0f}%")
            if "workspace_bytes" in r:
                note.append(f"outputs {mib(r['output_bytes'])} MiB, kernel workspace {mib(r['workspace_bytes'])} MiB "
                            f"({r['workspace_op']}): peak - arena - outputs = "
                            f"{r['beyond_arena_and_outputs_bytes'] / 2**20:.1f} MiB, within 1% + workspace: "
                            f"{r['within_1pct_plus_workspace']}")
            if "compile_s" in r:
                note.append(f"compile {r['compile_s']} s")
            lines.append(f"| {cfg} | {key} | {r['median_ms']:.2f} | {mib(r['peak_activation_bytes'])} | "
                         f"{arena} | {err} | {'; '.join(note)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--plan-only", action="store_true", help="lower and plan here (needs the solvers)")
    mode.add_argument("--run", action="store_true", help="measure on the GPU (needs torch only)")
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="folder of graphs and plans")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench" / "results")))
    ap.add_argument("--models", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    ap.add_argument("--planner", default="baseline", help="planner for --plan-only (default baseline)")
    ap.add_argument("--time-limit", type=float, default=60.0, help="solver seconds per plan")
    ap.add_argument("--budget-s", type=float, default=400.0, help="--run: stop starting measurements after this")
    ap.add_argument("--iters", type=int, default=10, help="timed calls per measurement")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated subset of " + ",".join(METHODS) + " (memplan includes its variants)")
    ap.add_argument("--small", action="store_true", help="the registry's CI sizes (a smoke test; any device)")
    args = ap.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"unknown config(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    if args.small:
        import models

        for cfg in names:
            CONFIGS[cfg] = (CONFIGS[cfg][0], models.spec(CONFIGS[cfg][0]).small)
    if args.plan_only:
        plan_only(args.dir, args.planner, args.time_limit, names)
        return 0
    if not torch.cuda.is_available() and not args.small:
        print("--run needs a CUDA device (without one, only --small runs, as a smoke test)", file=sys.stderr)
        return 2
    methods = {m for m in args.methods.split(",") if m}
    if methods - set(METHODS):
        print(f"unknown method(s) {', '.join(sorted(methods - set(METHODS)))}; known: {', '.join(METHODS)}",
              file=sys.stderr)
        return 2
    run_all(args.dir, args.out, names, args.budget_s, args.iters, methods)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPT-2 small training steps on one GPU: what PyTorch offers against the memplan backend with a budget.

One call of the device tool does the whole measurement. Plans are made there (the joint graph
depends on the device's attention kernels), so the solver travels as wheels for its Python 3.12:
here `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform
manylinux_2_28_x86_64 -d .whl ortools==9.15.* "protobuf==6.33.*" immutabledict` (absl-py, numpy,
pandas are there), and the committed tree as `.snap` (`git archive HEAD | tar -x -C .snap`, both in
.git/info/exclude, both carried); there:

    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    cd .snap && python3 bench/gpu_train.py --out $OUT [--budgets 6000MiB,3000MiB] [--batch 8 --seq 1024]

Model: transformers' GPT2LMHeadModel(GPT2Config()) with random weights, train mode (dropout 0.1
as configured), batch 8 x 1024 tokens. One step = forward, the causal-LM loss (cross-entropy of
the shifted logits in fp32, as transformers' ForCausalLMLoss computes it; written in the step so
that Dynamo sees one graph), backward, gradients set to None. Every method runs the same step:
  eager          the module as it is
  eager_ckpt     transformers' gradient_checkpointing_enable() (per-block checkpointing)
  inductor       torch.compile default
  inductor_b0.5, inductor_b0.3   torch._functorch.config.activation_memory_budget = 0.5 / 0.3
  memplan_<B>    torch.compile(backend="memplan", options={"budget": B}): one rematerialisation
                 plan of the joint forward + backward graph under a peak budget of B
                 (formulations.remat), replayed by planner.runtime.training
Peak activation memory = max allocated during a timed step minus the memory held before the
method was set up (weights and inputs): what a method holds between steps (memplan's arena)
counts. Step time = median over --iters steps after warm-up (the first includes compilation).
`check` runs first: a small GPT-2 with dropout, memplan at 60% against eager from the same seed,
gradients compared. Every method runs in a process of its own (a crashing kernel loses that method only).
Results: $OUT/gpu_train.json and $OUT/gpu_train.md after every method.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MIB = 2**20


def gpt2(device: str, small: bool = False, dropout: bool = True):
    import transformers

    torch.manual_seed(0)
    kw = {} if dropout else {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    if small:
        kw.update(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=256)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw)).to(device).train()


def step_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(model, fn, ids: torch.Tensor, iters: int, baseline: int, profile_to: Path | None = None) -> dict:
    def one() -> float:
        _sync()
        t0 = time.perf_counter()
        fn(model, ids).backward()
        model.zero_grad(set_to_none=True)
        _sync()
        return time.perf_counter() - t0
    t0 = time.perf_counter()
    first = one()
    one()
    warm_s = time.perf_counter() - t0
    peak = None
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        one()
        peak = torch.cuda.max_memory_allocated() - baseline
    times = [one() for _ in range(iters)]
    res = {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
           "peak_activation_mib": None if peak is None else round(peak / MIB, 1),
           "first_step_s": round(first, 1), "warmup_s": round(warm_s, 1), "iters": iters}
    if profile_to is not None and torch.cuda.is_available():
        res.update(profiled(one, profile_to))
    return res


def profiled(one, path: Path) -> dict:
    """One more step under torch.profiler: the GPU's busy time (kernels and copies; the median step
    minus it is time the GPU waited for the host) and the ops by device and by host time, to `path`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        one()
    ops = prof.key_averages()
    busy_us = sum(e.self_device_time_total for e in ops if e.device_type == torch.autograd.DeviceType.CUDA)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(ops.table(sort_by="self_device_time_total", row_limit=40) + "\n\n"
                    + ops.table(sort_by="self_cpu_time_total", row_limit=25) + "\n")
    return {"gpu_busy_ms": round(busy_us / 1e3, 1), "profile": path.name}


def memplan_fn(budget: str, time_limit: float, cache: str):
    from torch._dynamo.backends.registry import lookup_backend, register_backend

    try:
        lookup_backend("memplan")
    except Exception:  # a source tree (the GPU machine): no installed entry point
        from planner.runtime.backend import memplan_backend

        register_backend(memplan_backend, name="memplan")
    return torch.compile(step_loss, backend="memplan", fullgraph=True,
                         options={"budget": budget, "time_limit": time_limit, "cache_dir": cache})


def plan_record(cache: str) -> dict:
    """What the backend planned: the remat plan in its cache folder (one per method)."""
    from planner.plan import Plan

    plans = sorted(Path(cache).glob("*.plan.json"))
    if not plans:
        return {"plan": None}
    plan = Plan.load(plans[-1])
    m = plan.metrics
    return {"plan_peak_mib": round(m["peak_bytes"] / MIB, 1), "arena_mib": round(m["arena_bytes"] / MIB, 1),
            "recompute_flops": m.get("recompute_flops"), "planner": plan.solver.formulation,
            "plan_status": plan.solver.status, "solve_s": plan.solver.seconds,
            "plan_params": {k: v for k, v in plan.solver.params.items() if isinstance(v, (int, float, str))}}


def check(device: str, time_limit: float) -> dict:
    """Small GPT-2 with dropout: memplan (60% budget) gradients against eager's from the same seed. The
    joint plan's first runs of random ops come in eager's order, and a recompute replays its first
    run's numbers (planner.runtime.rng), so the masks are eager's."""
    import copy

    model = gpt2(device, small=True)
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 512, (2, 256), device=device)
    with tempfile.TemporaryDirectory() as cache:
        torch.manual_seed(1)
        loss = memplan_fn("60%", time_limit, cache)(model, ids)
        loss.backward()
        rec = plan_record(cache)
    torch.manual_seed(1)
    ref_loss = step_loss(ref, ids)
    ref_loss.backward()
    err = max(((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-30)).item()
              for p, q in zip(model.parameters(), ref.parameters()))
    return {"loss": loss.item(), "eager_loss": ref_loss.item(), "max_grad_rel_error": err, **rec}


def method_keys(args) -> list[str]:
    keys = [k for k in ("check", "eager", "eager_ckpt") if k in args.methods]
    if "inductor" in args.methods:
        keys += ["inductor", *(f"inductor_b{b:g}" for b in args.inductor_budgets)]
    if "memplan" in args.methods:
        keys += [f"memplan_{b}" for b in args.budgets]
    return keys


def run(args) -> dict:
    """Every method in a process of its own: a crash (a segmentation fault in a kernel) loses that
    method only, and each starts from an empty CUDA allocator."""
    import subprocess

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                 "torch": torch.__version__, "python": platform.python_version(), "batch": args.batch,
                 "seq": args.seq, "methods": {}}
    import transformers

    out["transformers"] = transformers.__version__
    deadline = time.monotonic() + args.budget_s
    for key in method_keys(args):
        left = deadline - time.monotonic()
        if left <= 0:
            out["methods"][key] = {"skipped": "time budget"}
            continue
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            argv = [a for a in sys.argv[1:]] + ["--one", key, "--result", str(result)]
            try:
                proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], capture_output=True,
                                      text=True, timeout=left + 60)
                if result.is_file():
                    out["methods"][key] = json.loads(result.read_text())
                else:
                    tail = [ln for ln in proc.stderr.splitlines() if "Warning" not in ln][-12:]
                    out["methods"][key] = {"error": f"the process ended with rc {proc.returncode} and no result",
                                           "stderr_tail": tail}
            except subprocess.TimeoutExpired:
                out["methods"][key] = {"error": "time budget: the process was stopped"}
        out["methods"][key]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(key, json.dumps(out["methods"][key])[:1500], flush=True)
        write(out, args.out)
    return out


def run_one(key: str, args) -> dict:
    """One method of `run`, in this process."""
    from planner.runtime import backend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if key == "check":
        return check(device, args.time_limit)

    def measured(make) -> dict:
        model = gpt2(device, small=args.small)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
        _sync()
        baseline = torch.cuda.memory_allocated() if device == "cuda" else 0
        fn, extra = make(model)
        res = measure(model, fn, ids, args.iters, baseline,
                      args.out / f"profile_{key}.txt" if key in args.profile else None)
        res.update(extra() if callable(extra) else {})
        res["memplan_fallbacks"] = backend.STATS["eager_fallbacks"]
        return res

    if key == "eager":
        return measured(lambda m: (step_loss, None))
    if key == "eager_ckpt":
        def ckpt(m):
            m.gradient_checkpointing_enable()
            return step_loss, None
        return measured(ckpt)
    if key.startswith("inductor"):
        import torch._functorch.config as fconfig

        fconfig.activation_memory_budget = float(key.removeprefix("inductor_b")) if "_b" in key else 1.0
        return measured(lambda m: (torch.compile(step_loss), None))
    budget = key.removeprefix("memplan_")
    cache = tempfile.mkdtemp(prefix="memplan_")
    return measured(lambda m: (memplan_fn(budget, args.time_limit, cache), lambda: plan_record(cache)))


def write(out: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gpu_train.json").write_text(json.dumps(out, indent=1, default=str))
    lines = [f"# GPT-2 small training step, batch {out['batch']} x {out['seq']} ({out['device']}, torch "
             f"{out['torch']}, transformers {out.get('transformers')})", "",
             "Peak activation = max allocated during a step minus weights and inputs (what a method holds "
             "between steps counts). Median step time after warm-up.", "",
             "| method | peak activation MiB | median ms | plan peak MiB | arena MiB | planner | note |",
             "|---|---:|---:|---:|---:|---|---|"]
    for key, r in out["methods"].items():
        if "error" in r or "skipped" in r:
            lines.append(f"| {key} | | | | | | {r.get('error', r.get('skipped'))[:120]} |")
            continue
        if key == "check":
            lines.append(f"| check (small, dropout, 60%) | | | {r.get('plan_peak_mib')} | {r.get('arena_mib')} | "
                         f"{r.get('planner')} | max grad rel error {r['max_grad_rel_error']:.1e} |")
            continue
        note = f"first step {r['first_step_s']} s"
        if r.get("memplan_fallbacks"):
            note += f"; {r['memplan_fallbacks']} graph(s) fell back to AOTAutograd's partition"
        lines.append(f"| {key} | {r['peak_activation_mib']} | {r['median_ms']:.1f} | {r.get('plan_peak_mib', '')} | "
                     f"{r.get('arena_mib', '')} | {r.get('planner', '')} | {note} |")
    (folder / "gpu_train.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench" / "results")))
    ap.add_argument("--budgets", default="6000MiB,3000MiB", help="memplan peak budgets (sizes or fractions)")
    ap.add_argument("--inductor-budgets", default="0.5,0.3", help="activation_memory_budget values")
    ap.add_argument("--methods", default="check,eager,eager_ckpt,inductor,memplan")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--time-limit", type=float, default=60.0, help="remat solver seconds per plan")
    ap.add_argument("--budget-s", type=float, default=520.0, help="start no method after this many seconds")
    ap.add_argument("--profile", default="", help="methods to profile one more step of (CUDA): "
                    "$OUT/profile_<method>.txt and the GPU's busy time")
    ap.add_argument("--small", action="store_true", help="a 2-layer GPT-2 (a smoke test; any device)")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # run: one method in a child process
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.budgets = [b for b in args.budgets.split(",") if b]
    args.inductor_budgets = [float(b) for b in args.inductor_budgets.split(",") if b]
    args.methods = set(args.methods.split(","))
    args.profile = set(args.profile.split(","))
    if args.one:
        try:
            res = run_one(args.one, args)
        except Exception as e:  # recorded as this method's result; the others go on
            res = {"error": f"{type(e).__name__}: {e}"[:500], "trace": traceback.format_exc(limit=6)}
        Path(args.result).write_text(json.dumps(res, default=str))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

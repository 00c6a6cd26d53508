"""Rematerialisation benchmark: recompute overhead under peak budgets, every method side by side.

Graphs: training graphs (joint forward + backward, frontends.training) of VGG-16, ResNet-50,
MobileNetV2, U-Net and a GPT-2-style stack, and random layered graphs (models.layered) of 100,
250, 500 and 1000 nodes. Budgets: 90, 80, 60 and 40% of the reference peak (the program order
keeping everything, planner.remat_plan's count: node outputs and held inputs, no in-place
reuse), and `min`: the least peak any baseline reached (the lowest budget where users get a plan
today) and half of it; on graphs no baseline applies to (random layered), `min` is the least budget
where the split greedy finds a plan (a bisection, formulations.remat.least_heuristic_budget).
Methods: ours (formulations.remat, backend auto: CP-SAT on the whole model below 400 nodes, LNS
over it from the best heuristic above; hinted with every baseline's sequence), the eviction
greedy and the live-range-splitting greedy (best of its portfolio) alone, Checkmate's MILP (CBC;
graphs of at most --milp-nodes nodes), checkpoint-all, Chen's sqrt(n) and greedy checkpointing,
and PyTorch's min-cut partition swept over its activation_memory_budget (training graphs only).
A baseline "has a plan" at a budget when its checked peak fits; its overhead is its recompute
FLOPs over the graph's FLOPs.
Writes bench/results/remat.{md,json}; progress on stderr. Timings are wall seconds here, with the
1-minute load average when the solve ended (the machine is shared).

    .venv/bin/python -m bench.remat                                  # everything, 60 s per solve
    .venv/bin/python -m bench.remat --graphs rl100,resnet50 --budgets 0.9,0.8 --time-limit 30
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

TRAINING = {"vgg16": {"batch": 1}, "resnet50": {"batch": 1}, "mobilenet_v2": {"batch": 1},
            "unet": {"batch": 1}, "gpt2": {"batch": 4, "seq": 1024, "layers": 12}}
RANDOM = {"rl100": 100, "rl250": 250, "rl500": 500, "rl1000": 1000}
BUDGETS = (0.9, 0.8, 0.6, 0.4)
OUT = Path(__file__).resolve().parent / "results"


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def load(name: str):
    """(graph, PyTorch partition callable or None)."""
    if name in RANDOM:
        from models.layered import random_layered

        return random_layered(RANDOM[name], seed=0), None
    import models
    from frontends.training import lower_training

    module, inputs = models.build(name, **TRAINING[name])
    tg = lower_training(module.train(), inputs, name=f"{name}-train")
    return tg.graph, tg.pytorch_partition


def baselines(graph, target, partition, budget: int) -> dict[str, list | None]:
    from formulations.remat import split_portfolio
    from formulations.remat_heuristics import greedy
    from formulations.remat_problem import build_problem
    from planner import baselines_remat as br
    from planner import remat_plan

    p = build_problem(graph, target)
    splits = [s for s in split_portfolio(p, budget) if remat_plan.peak(graph, target, s) <= budget]
    seqs = {"checkpoint_all": br.checkpoint_all(graph), "chen_sqrt": br.chen_sqrt(graph, target),
            "chen_greedy": br.chen_greedy(graph, target, budget),
            "greedy": greedy(p, budget),
            "split": min(splits, key=lambda s: remat_plan.recompute_flops(graph, s)) if splits else None}
    if partition is not None:
        seqs["pytorch"] = br.pytorch_minimal(partition, graph, target, budget)
    return seqs


def row_for(graph, target, method: str, seq, budget: int, seconds: float, extra=None) -> dict:
    from planner import remat_plan

    total = sum(op.flops for op in graph.ops) or 1.0
    if seq is None:
        return {"method": method, "plan": False, "seconds": round(seconds, 2), **(extra or {})}
    peak = remat_plan.peak(graph, target, seq)
    flops = remat_plan.recompute_flops(graph, seq)
    return {"method": method, "plan": peak <= budget, "peak": peak, "overhead": flops / total,
            "recompute_flops": flops, "seconds": round(seconds, 2), **(extra or {})}


def run_graph(name: str, fractions, time_limit: float, milp_nodes: int, with_min: bool = True) -> list[dict]:
    from formulations import remat
    from planner import baselines_remat as br
    from planner import remat_plan
    from planner.bounds import InfeasibleError
    from planner.target import get_target

    t0 = time.perf_counter()
    graph, partition = load(name)
    target = get_target("npu", capacity=None)
    ref = remat.reference_peak(graph, target)
    least = remat.minimum_budget(graph, target)
    say(f"{name}: {len(graph.ops)} ops, reference peak {ref}, least working set {least} "
        f"({time.perf_counter() - t0:.1f} s to build)")
    # the least peak a baseline reaches: Chen's sqrt(n), and PyTorch's tightest partition
    lows = [remat_plan.peak(graph, target, s) for s in (br.chen_sqrt(graph, target),) if s]
    if partition is not None:
        lows.append(min(remat_plan.peak(graph, target, partition(f)) for f in (0.0, 0.1)))
    budgets = [(f"{int(f * 100)}%", int(f * ref)) for f in fractions]
    if lows:
        budgets += [("min", min(lows)), ("min/2", max(least, min(lows) // 2))]
    elif with_min:  # no baseline applies (no forward pass): the least budget the split greedy reaches
        budgets.append(("min", remat.least_heuristic_budget(graph, target)))
    rows = []
    for label, budget in budgets:
        base = {"graph": name, "ops": len(graph.ops), "budget": label, "budget_bytes": budget,
                "reference_peak": ref}
        if budget < least:
            rows.append({**base, "method": "all", "plan": False, "note": "below the largest working set"})
            continue
        tb = time.perf_counter()
        seqs = baselines(graph, target, partition, budget)
        tb = time.perf_counter() - tb
        for method, seq in seqs.items():
            rows.append({**base, **row_for(graph, target, method, seq, budget, tb / len(seqs))})
        hints = [s for m, s in seqs.items() if s is not None and m not in ("greedy", "split")]  # solve runs both
        backends = ["auto"] + (["milp"] if len(graph.ops) <= milp_nodes else [])
        for backend in backends:
            ts = time.perf_counter()
            try:
                res = remat.solve(graph, target, budget=budget, time_limit=time_limit, backend=backend,
                                  hints=hints if backend != "milp" else ())
                rows.append({**base, **row_for(graph, target, f"ours:{backend}", res.sequence, budget,
                                               time.perf_counter() - ts,
                                               {"status": res.status, "gap": res.gap, "found_by": res.found_by,
                                                "solve_seconds": round(res.solve_seconds, 2),
                                                "load": round(os.getloadavg()[0], 1),
                                                "arena": res.plan.metrics["arena_bytes"]})})
            except InfeasibleError as e:
                rows.append({**base, "method": f"ours:{backend}", "plan": False,
                             "seconds": round(time.perf_counter() - ts, 2), "note": str(e)})
            say(f"  {label}: {rows[-1]['method']} plan={rows[-1]['plan']} "
                f"overhead={rows[-1].get('overhead', '-')} status={rows[-1].get('status', '-')} "
                f"{rows[-1]['seconds']} s")
    return rows


def write(rows: list[dict], command: str) -> None:
    """Results of this run, merged with the recorded rows of the (graph, budget) pairs it did not run."""
    from planner.plan import write_atomic

    OUT.mkdir(exist_ok=True)
    path = OUT / "remat.json"
    ran = {(r["graph"], r["budget"]) for r in rows}
    old = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    old_rows = old["rows"] if isinstance(old, dict) else old
    commands = [c for c in (old.get("commands", []) if isinstance(old, dict) else []) if c != command]
    rows = [r for r in old_rows if (r["graph"], r["budget"]) not in ran] + rows
    commands.append(command)
    write_atomic(path, json.dumps({"commands": commands, "rows": rows}, indent=1) + "\n")
    methods = [m for m in ("ours", "ours:milp", "split", "greedy", "checkpoint_all", "chen_sqrt", "chen_greedy",
                           "pytorch") if any(r["method"] == m or r["method"].startswith(f"{m}:") for r in rows)]
    lines = ["# Rematerialisation under peak budgets", "",
             "Commands: " + ", ".join(f"`{c}`" for c in commands) + " (wall seconds on a shared 2-core "
             "machine while other work ran on it).", "",
             "Each cell: recompute overhead (recompute FLOPs / graph FLOPs, %) of a plan whose checked peak "
             "fits the budget, `-` when the method has none. Ours: status (opt = proven optimal within the "
             "model), gap to the proven bound, seconds to the chosen sequence (placing offsets and checking "
             "add up to a second more; `seconds` in the JSON).", "",
             "| graph | ops | budget | MiB | " + " | ".join(methods) + " |",
             "|---|---:|---|---:|" + "---|" * len(methods)]
    keys = list(dict.fromkeys((r["graph"], r["budget"]) for r in rows))  # in run order
    for graph, budget in keys:
        rs = {r["method"]: r for r in rows if r["graph"] == graph and r["budget"] == budget}
        rs.setdefault("ours", rs.get("ours:auto") or rs.get("ours:cpsat"))  # rows before auto: cpsat
        first = next(iter(rs.values()))
        cells = []
        for m in methods:
            r = rs.get(m) or rs.get("all")
            if r is None or not r.get("plan"):
                cells.append("-")
            elif m.startswith("ours"):
                load = f", load {r['load']}" if "load" in r else ""
                by = f", {r['found_by']}" if r.get("found_by") in ("lns", "split") else ""
                cells.append(f"{100 * r['overhead']:.2f} ({r['status'][:3]}{by}, gap {100 * r['gap']:.1f}%, "
                             f"{r['solve_seconds']:.1f} s{load})")
            else:
                cells.append(f"{100 * r['overhead']:.2f}")
        lines.append(f"| {graph} | {first['ops']} | {budget} | {first['budget_bytes'] / 2**20:.1f} | "
                     + " | ".join(cells) + " |")
    write_atomic(OUT / "remat.md", "\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--graphs", default=",".join([*RANDOM, *TRAINING]))
    ap.add_argument("--budgets", default=",".join(str(b) for b in BUDGETS))
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--no-min", action="store_true", help="skip the `min` budget rows")
    ap.add_argument("--milp-nodes", type=int, default=0,
                    help="run Checkmate's MILP on graphs of at most this many ops (CBC overran its time limit "
                         "by minutes on a 100-node graph, so it is off by default)")
    args = ap.parse_args(argv)
    fractions = [float(x) for x in args.budgets.split(",") if x]
    rows: list[dict] = []
    command = "python -m bench.remat " + " ".join(argv if argv is not None else sys.argv[1:])
    for name in [g for g in args.graphs.split(",") if g]:
        rows += run_graph(name, fractions, args.time_limit, args.milp_nodes, not args.no_min)
        write(rows, command.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())

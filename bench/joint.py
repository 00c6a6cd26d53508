"""Joint planning benchmark: non-compulsory off-chip traffic at COSMA's budgets.

For each network (int8, batch 1) x budget (M_R, M_H, M_P) x setting (activations only,
weights counted): the four baseline pipelines ({program, lpmf} order x greedy_size (TFLite)
allocator x {belady, lru}), COSMA's monolithic model and our Benders model
(formulations.joint), each with a time limit per solve. Writes bench/results/joint.json
(every row, with the solver logs' last lines) and bench/results/joint.md (the table).

    .venv/bin/python -m bench.joint                          # the full grid, 60 s per solve
    .venv/bin/python -m bench.joint --models resnet50 --budgets M_R --time-limit 20

Progress goes to stderr. Timings are wall seconds on whatever machine runs it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

NETWORKS = ("resnet50", "densenet121", "resnext50_32x4d", "r2plus1d_18", "s3d", "fcn_resnet50",
            "lraspp_mobilenet_v3_large", "deeplabv3_resnet50", "transformer", "vit_b_16")
BUDGETS = ("M_R", "M_H", "M_P")
SETTINGS = {"acts": False, "weights": True}
PIPELINES = ("program+greedy_size+belady", "program+greedy_size+lru", "lpmf+greedy_size+belady",
             "lpmf+greedy_size+lru")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def load_graph(name: str, cache: Path, reuse: bool = False):
    """Lower a registry network (int8) once; the cache key covers the frontend and model sources
    (`reuse`: take the newest cached lowering whatever the sources, so that runs compare alike)."""
    import hashlib

    from planner.graph import LifetimeGraph

    cached = sorted(cache.glob(f"{name}.*.graph.json"), key=lambda p: p.stat().st_mtime)
    if reuse and cached:
        return LifetimeGraph.from_dict(json.loads(cached[-1].read_text()))
    root = Path(__file__).resolve().parent.parent
    sources = sorted([*root.glob("frontends/*.py"), *root.glob("models/*.py")])
    key = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:12]
    path = cache / f"{name}.{key}.graph.json"
    if path.is_file():
        return LifetimeGraph.from_dict(json.loads(path.read_text()))
    from frontends import load_model

    graph = load_model(f"zoo:{name}", elem_size=1).graph
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(graph.to_dict()))
    return graph


def run_instance(graph, target, time_limit: float, backend: str, solvers: list[str]) -> dict:
    from formulations import joint
    from planner import baselines

    row: dict = {"capacity": target.capacity, "baselines": {}, "solvers": {}}
    for name in PIPELINES:
        order, policy, allocator = baselines.PIPELINES[name]
        t0 = time.perf_counter()
        try:
            plan = baselines.pipeline(graph, target, order, policy, allocator, name=f"baseline:{name}")
            row["baselines"][name] = {"traffic": plan.metrics["noncompulsory_bytes"],
                                      "seconds": time.perf_counter() - t0}
        except baselines.InfeasibleError as e:
            row["baselines"][name] = {"traffic": None, "error": str(e), "seconds": time.perf_counter() - t0}
    for model in solvers:  # "ours_fs" / "cosma_fs": the order fixed to program order
        schedule = baselines.program_order(graph) if model.endswith("_fs") else None
        result = joint.solve(graph, target, time_limit=time_limit, backend=backend,
                             model="ours" if model == "ours_fs" else model, schedule=schedule,
                             progress=lambda line: say("    " + line))
        row["solvers"][model] = {
            "capacity": target.capacity, "traffic": result.objective, "status": result.status,
            "bound": _num(result.bound),
            "gap": result.gap, "seconds": result.seconds, "iterations": result.iterations, "cuts": result.cuts,
            "source": result.plan.solver.params.get("source") if result.plan else None,
            "log_tail": list(result.log[-4:])}
    return row


def _num(x: float) -> float | None:
    return None if x != x or x in (float("inf"), float("-inf")) else x


SOLVER_ORDER = ("cosma_fs", "cosma", "ours_fs", "ours")


def table(rows: list[dict]) -> str:
    solvers = [m for m in SOLVER_ORDER if any(m in r["solvers"] for r in rows)]
    head = ["network", "budget", "weights", "capacity", *(p.replace("+greedy_size", "") for p in PIPELINES)]
    for m in solvers:
        head += [m, f"{m} s"]
    head += ["ours status", "ours gap"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["network"], r["budget"], "yes" if r["weights"] else "no", str(r["capacity"])]
        cells += [_fmt(r["baselines"].get(p, {}).get("traffic")) for p in PIPELINES]
        for m in solvers:
            entry = r["solvers"].get(m)
            cells += ["" if entry is None else _fmt(entry["traffic"]) + _mark(entry),
                      "" if entry is None else f"{entry['seconds']:.1f}"]
        ours = r["solvers"].get("ours", {})
        cells += [ours.get("status", ""), "" if ours.get("gap") is None else f"{ours['gap']:.3f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _fmt(x) -> str:
    return "fail" if x is None else f"{int(x):,}"


def _mark(entry: dict) -> str:
    return "" if not entry or entry.get("status") == "optimal" else f" ({entry.get('status')})"


def summary(rows: list[dict]) -> str:
    ours = [r["solvers"]["ours"] for r in rows if "ours" in r["solvers"]]
    lines = [f"instances: {len(rows)}"]
    if ours:
        proven = sum(o["status"] == "optimal" for o in ours)
        median = statistics.median(o["seconds"] for o in ours)
        lines.append(f"ours proven optimal: {proven}/{len(ours)}; median solve {median:.1f} s")
    worse = [f"{r['network']}/{r['budget']}/{'w' if r['weights'] else 'a'}" for r in rows if "ours" in r["solvers"]
             and any(b.get("traffic") is not None and (r["solvers"]["ours"]["traffic"] is None
                                                       or r["solvers"]["ours"]["traffic"] > b["traffic"])
                     for b in r["baselines"].values())]
    lines.append(f"instances where ours is above a baseline: {len(worse)} {' '.join(worse)}")
    mp = [r["solvers"]["ours"] for r in rows if r["budget"] == "M_P" and "ours" in r["solvers"]]
    if mp:
        zero = sum(o["traffic"] == 0 for o in mp)
        proven = sum(o["traffic"] != 0 and (o["bound"] or 0) > 0 for o in mp)
        lines.append(f"at M_P: zero traffic on {zero}/{len(mp)}, no zero-traffic plan proven on {proven}")
    both = [(r["solvers"]["cosma"]["seconds"], r["solvers"]["ours"]["seconds"]) for r in rows
            if r["solvers"].get("cosma", {}).get("status") == "optimal" and r["solvers"].get("ours", {}).get("status")
            == "optimal"]
    if both:
        lines.append(f"both proven: {len(both)}; median COSMA/ours time ratio "
                     f"{statistics.median(c / max(o, 1e-3) for c, o in both):.1f}")
    hard = [(r["solvers"]["cosma"]["seconds"], r["solvers"]["ours"]["seconds"]) for r in rows
            if r["solvers"].get("cosma", {}).get("status") == "optimal"
            and r["solvers"].get("ours", {}).get("status") == "optimal" and r["solvers"]["ours"]["traffic"] > 0]
    if hard:
        lines.append(f"both proven with non-zero optimum: {len(hard)}; median COSMA/ours time ratio "
                     f"{statistics.median(c / max(o, 1e-3) for c, o in hard):.1f}")
    return "\n".join(f"- {x}" for x in lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(NETWORKS), help="comma-separated registry names")
    ap.add_argument("--budgets", default=",".join(BUDGETS), help="comma-separated: M_R, M_H, M_P")
    ap.add_argument("--settings", default="acts,weights", help="acts (activations only), weights, or both")
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds per solve")
    ap.add_argument("--backend", default="cpsat", help="cpsat | cbc | highs | gurobi")
    ap.add_argument("--solvers", default="ours,cosma", help="comma-separated joint models to run")
    ap.add_argument("--out", default="bench/results/joint", help="output path without extension")
    ap.add_argument("--update", action="store_true",
                    help="merge into the existing results (keep rows and solver entries not rerun)")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "memplan_graphs"),
                    help="folder for lowered graphs")
    ap.add_argument("--reuse-graphs", action="store_true", help="take the newest cached lowering of each network")
    ap.add_argument("--report", action="store_true", help="only rewrite the markdown from the JSON results")
    args = ap.parse_args(argv)
    cmd = ("python -m bench.joint " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    if args.report:
        rows, commands = _read(Path(args.out).with_suffix(".json"))
        Path(args.out).with_suffix(".md").write_text(report(rows, commands))
        return 0
    from planner.compile import budget
    from planner.target import get_target

    out = Path(args.out)
    rows, commands = _read(out.with_suffix(".json")) if args.update else ([], [])
    commands.append(cmd)
    index = {(r["network"], r["budget"], r["weights"]): r for r in rows}
    for name in args.models.split(","):
        say(f"{name}: lowering")
        graph = load_graph(name, Path(args.cache), args.reuse_graphs)
        for setting in args.settings.split(","):
            for bname in args.budgets.split(","):
                target = get_target("npu", include_weights=SETTINGS[setting])
                target = target.with_(capacity=budget(graph, bname, target))
                say(f"{name} {bname} {setting}: capacity {target.capacity}")
                fresh = {"network": name, "budget": bname, "weights": SETTINGS[setting], "ops": len(graph.ops),
                         **run_instance(graph, target, args.time_limit, args.backend, args.solvers.split(","))}
                row = index.get((name, bname, SETTINGS[setting]))
                if row is None:
                    row = index[name, bname, SETTINGS[setting]] = fresh
                    rows.append(row)
                else:
                    row["solvers"].update(fresh["solvers"])
                    row.update({k: v for k, v in fresh.items() if k != "solvers"})
                out.parent.mkdir(parents=True, exist_ok=True)
                out.with_suffix(".json").write_text(json.dumps({"commands": commands, "rows": rows}, indent=1))
                say(f"  ours {row['solvers'].get('ours', {}).get('traffic')} "
                    f"({row['solvers'].get('ours', {}).get('status')}), baselines "
                    f"{[b.get('traffic') for b in row['baselines'].values()]}")
    out.with_suffix(".md").write_text(report(rows, commands))
    return 0


def _read(path: Path) -> tuple[list[dict], list[str]]:
    """Rows and the commands that made them (an older file is a bare list of rows)."""
    if not path.is_file():
        return [], []
    data = json.loads(path.read_text())
    return (data, []) if isinstance(data, list) else (data["rows"], data["commands"])


def report(rows: list[dict], commands: list[str]) -> str:
    cmds = "\n".join(f"    {c}" for c in commands)
    return (f"# Joint planning: non-compulsory traffic (bytes)\n\nMade by:\n\n{cmds}\n\n"
            "Timings are wall seconds with a 60 s limit per solve on a shared 2-core machine (not precise).\n\n"
            + summary(rows) + "\n" + table(rows))


if __name__ == "__main__":
    raise SystemExit(main())

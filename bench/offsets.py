"""Placement methods of formulations/offsets.py on benchmark instances.

Every source is a function returning (name, requests, capacity) triples; SOURCES names them
and more plug in there (the zoo models at program order are meant to come next). For each
instance and method: the arena, whether the capacity is met, the wall seconds; for the
MiniMalloc suite next to MiniMalloc's reference seconds (its README: 10 s per instance, one
thread, a 2-core machine like ours; sum 24.3 s). Then the minimisation runs (no capacity) on the
instances that have slack. Results: bench/results/offsets_minimalloc.{md,json}.

    .venv/bin/python -m bench.offsets                      # everything, 10 s per run
    .venv/bin/python -m bench.offsets --methods auto --instances A,E
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from formulations import offsets
from planner.plan import write_atomic

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "minimalloc-benchmarks"  # shared/ beside the checkout
RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("greedy_size", "best_fit", "first_fit", "improve", "exact", "cpsat", "milp", "auto")
MINIMISE = ("C", "D", "J")  # the MiniMalloc instances whose peak is below the capacity
# MiniMalloc (C++, one thread), seconds to solve at capacity 1048576, from the data's README
REFERENCE_SECONDS = {"A": 3.88, "B": 2.80, "C": 0.56, "D": 2.00, "E": 2.96, "F": 4.71, "G": 1.06, "H": 1.75,
                     "I": 2.99, "J": 0.79, "K": 0.75}

Case = tuple[str, list[offsets.Request], int | None]


def minimalloc_instances(data: Path = DATA) -> Iterable[Case]:
    """The 11 'challenging' MiniMalloc instances A..K at the capacity in their file names."""
    for path in sorted(data.glob("[A-K].*.csv")):
        name, capacity = path.name.split(".")[:2]
        yield name, offsets.read_csv(path), int(capacity)


SOURCES: dict[str, Callable[[], Iterable[Case]]] = {"minimalloc": minimalloc_instances}


HEURISTICS = ("greedy_size", "best_fit", "first_fit", "improve")


def run_case(name: str, requests: list[offsets.Request], capacity: int | None, method: str,
             time_limit: float) -> dict:
    # heuristics cannot aim at a capacity: they run free and are judged by their arena
    free = method in HEURISTICS
    before = resource.getrusage(resource.RUSAGE_SELF)
    placed = offsets.solve(requests, capacity=None if free else capacity, method=method, time_limit=time_limit)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime  # all threads of this process
    solved = placed.status in ("optimal", "feasible") and (capacity is None or placed.arena <= capacity)
    return {"instance": name, "buffers": len(requests), "capacity": capacity,
            "lower_bound": placed.lower_bound, "method": method, "status": placed.status,
            "found_by": placed.method, "arena": placed.arena if placed.offsets else None, "solved": solved,
            "proven": placed.status in ("optimal", "infeasible"), "gap": placed.gap,
            "seconds": round(placed.seconds, 3), "cpu_seconds": round(cpu, 3),
            "reference_seconds": REFERENCE_SECONDS.get(name)}


def _kib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:g}"


def markdown(runs: list[dict], minimised: list[dict], methods: list[str], time_limit: float, command: str) -> str:
    lines = ["# Buffer placement on the MiniMalloc suite", "",
             f"`{command}` ({time_limit:g} s per run; {platform.node()}, {platform.processor() or platform.machine()};"
             " a shared 2-core machine: timings are noisy).", "",
             "Each cell: arena in KiB, `ok` if it fits the capacity (1048576 B = 1024 KiB), wall seconds."
             " The totals add CPU seconds (all threads): the machine is shared, so wall time depends on"
             " what else runs; CPU time much less.", ""]
    names = list(dict.fromkeys(r["instance"] for r in runs))
    cell = {(r["instance"], r["method"]): r for r in runs}
    lines.append("| instance | buffers | lower bound KiB | MiniMalloc s | " + " | ".join(methods) + " |")
    lines.append("|---|---:|---:|---:|" + "---|" * len(methods))
    for name in names:
        any_run = next(r for r in runs if r["instance"] == name)
        row = [name, str(any_run["buffers"]), _kib(min(r["lower_bound"] for r in runs if r["instance"] == name)),
               f"{any_run['reference_seconds']:.2f}" if any_run["reference_seconds"] else "-"]
        for m in methods:
            r = cell.get((name, m))
            row.append("" if r is None else f"{_kib(r['arena'])} {'ok' if r['solved'] else '--'} {r['seconds']:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    ref = sum(REFERENCE_SECONDS.get(n, 0.0) for n in names)
    totals = ["total", "", "", f"{ref:.1f}"]
    for m in methods:
        rs = [cell[(n, m)] for n in names if (n, m) in cell]
        totals.append(f"{sum(r['solved'] for r in rs)}/{len(rs)} solved, {sum(r['seconds'] for r in rs):.1f} s "
                      f"(CPU {sum(r['cpu_seconds'] for r in rs):.1f} s)")
    lines.append("| " + " | ".join(totals) + " |")
    if minimised:
        lines += ["", "## Smallest arena (no capacity)", "",
                  "| instance | method | best arena KiB | lower bound KiB | proven optimal | found by | seconds |",
                  "|---|---|---:|---:|---|---|---:|"]
        for r in minimised:
            lines.append(f"| {r['instance']} | {r['method']} | {_kib(r['arena'])} | {_kib(r['lower_bound'])} | "
                         f"{'yes' if r['status'] == 'optimal' else 'no'} | {r['found_by']} | {r['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="minimalloc", choices=sorted(SOURCES))
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods of offsets.solve")
    ap.add_argument("--instances", default="", help="comma-separated instance names (default: all)")
    ap.add_argument("--time-limit", type=float, default=10.0, help="seconds per run")
    ap.add_argument("--minimise", default=",".join(MINIMISE), help="instances to minimise ('' for none)")
    ap.add_argument("--minimise-methods", default="auto", help="methods for the minimisation runs")
    ap.add_argument("--out", default=str(RESULTS / "offsets_minimalloc"), help="output path without suffix")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods + args.minimise_methods.split(",") if m and m not in offsets.METHODS]
    if bad:
        ap.error(f"unknown method {bad[0]!r}; choose from {', '.join(offsets.METHODS)}")
    wanted = {n for n in args.instances.split(",") if n}
    cases = [c for c in SOURCES[args.source]() if not wanted or c[0] in wanted]
    if not cases:
        ap.error(f"no instances selected from source {args.source!r}")
    runs, minimised = [], []
    todo = len(cases) * len(methods)
    for k, (name, requests, capacity) in enumerate(cases):
        for j, method in enumerate(methods):
            r = run_case(name, requests, capacity, method, args.time_limit)
            runs.append(r)
            print(f"[{k * len(methods) + j + 1}/{todo}] {name} {method}: {r['status']} arena {_kib(r['arena'])} KiB "
                  f"in {r['seconds']:.2f} s", file=sys.stderr, flush=True)
    for name, requests, _ in cases:
        if name in args.minimise.split(","):
            for method in [m for m in args.minimise_methods.split(",") if m]:
                r = run_case(name, requests, None, method, args.time_limit)
                minimised.append(r)
                print(f"minimise {name} {method}: arena {_kib(r['arena'])} KiB, bound {_kib(r['lower_bound'])} KiB,"
                      f" {r['status']}", file=sys.stderr, flush=True)
    command = "python -m bench.offsets " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    write_atomic(out.with_suffix(".json"), json.dumps(
        {"command": command.strip(), "time_limit": args.time_limit, "host": platform.node(),
         "date": time.strftime("%Y-%m-%d %H:%M"), "runs": runs, "minimise": minimised}, indent=1) + "\n")
    write_atomic(out.with_suffix(".md"), markdown(runs, minimised, methods, args.time_limit, command.strip()))
    print(f"wrote {out}.md and {out}.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

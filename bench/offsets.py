"""Placement methods of formulations/offsets.py on benchmark instances.

Every source is a function returning (name, requests, capacity) triples; SOURCES names them.
For each instance and method: the arena, whether the capacity is met, wall and CPU seconds.

- `minimalloc` (the default): the 11 MiniMalloc instances at their capacities, next to
  MiniMalloc's reference seconds (its README: 10 s per instance, one thread, a 2-core machine
  like ours; sum 24.3 s); then the minimisation runs (no capacity) on the instances with slack.
  Results: bench/results/offsets_minimalloc.{md,json}.
- `zoo`: every registry model (less the optional `hf` family) at its published size, batch 1
  and 32, fp32 and int8 (one lowering per batch, frontends.with_elem_size for int8): the
  buffers of program order with no capacity (planner.baselines.residency with the npu target's
  alignment, weights excluded), minimised. Lowerings run in a child process with a time limit
  and are cached on disk (bench.schedule.load_graph). Results: bench/results/offsets_zoo.{md,json}.

    .venv/bin/python -m bench.offsets                      # the MiniMalloc suite, 10 s per run
    .venv/bin/python -m bench.offsets --methods auto --instances A,E
    .venv/bin/python -m bench.offsets --source zoo --time-limit 5
    .venv/bin/python -m bench.offsets --source zoo --models resnet50 --batches 1 --methods auto
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
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


ROOT = Path(__file__).resolve().parents[1]
ZOO_METHODS = ("auto", "greedy_size", "best_fit", "first_fit", "improve", "exact", "cpsat")
ZOO_BATCHES = (1, 32)
ZOO_ELEM_SIZES = {"fp32": None, "int8": 1}  # None: every dtype its own size
ZOO_TARGET = "npu"  # its alignment (64 B) rounds every size and offset
LOWER_SECONDS = 900.0  # a lowering that takes longer is reported as timed out


def lower_cached(spec: str, timeout: float = LOWER_SECONDS) -> dict:
    """Lower `spec` in a child process (so that a slow one can be stopped) into the disk cache of
    bench.schedule.load_graph; then load it here. A record: graph (None on failure), wall and CPU
    seconds of the child, whether it lowered (False: the cache had it), the error's first line."""
    from bench.schedule import CACHE, load_graph

    prefix = spec.replace(":", "_").replace(",", "_")
    t0, before = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    code = "import sys; from bench.schedule import load_graph; load_graph(sys.argv[1])"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    record: dict = {"spec": spec, "graph": None, "error": None}
    try:
        done = subprocess.run([sys.executable, "-c", code, spec], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode:
            lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
            record["error"] = (lines or [f"exit status {done.returncode}"])[-1][:200]
    except subprocess.TimeoutExpired:
        record["error"] = f"not lowered in {timeout:g} s (stopped)"
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    record["lowering_seconds"] = round(time.time() - t0, 1)
    record["lowering_cpu_seconds"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)
    record["lowered_now"] = any(p.stat().st_mtime >= t0 - 1 for p in CACHE.glob(prefix + ".*.json"))
    record["lowered_on"] = time.strftime("%Y-%m-%d %H:%M", time.localtime(t0)) if record["lowered_now"] else None
    if record["error"] is None:
        record["graph"] = load_graph(spec)
    return record


def program_order_requests(graph, alignment: int) -> list[offsets.Request]:
    """The buffers of program order with no capacity, as planner.baselines.pipeline places them."""
    from planner import baselines
    from planner.target import get_target

    target = get_target(ZOO_TARGET, capacity=None, alignment=alignment)
    _, slots = baselines.residency(graph, baselines.program_order(graph), target, None)
    return [offsets.Request(str(i), s.start, s.end, s.size) for i, s in enumerate(slots)]


def zoo_instances(names: Iterable[str] | None = None, batches: Iterable[int] = ZOO_BATCHES,
                  timeout: float = LOWER_SECONDS, lowerings: list[dict] | None = None) -> Iterable[Case]:
    """Every registry model (full size) at each batch, fp32 and int8: program-order buffers, no
    capacity. Each lowering's record (seconds, error) is appended to `lowerings`; a model that
    fails to lower yields no case, its record says why."""
    import models
    from frontends import Lowered, with_elem_size
    from planner.target import get_target

    alignment = get_target(ZOO_TARGET).alignment
    # as bench.zoo_table: the Hugging Face builds are an optional extra, not the zoo (Llama-2-7B alone
    # would draw 27 GB of random weights); --models names them
    for name in names or [n for n in models.names() if models.spec(n).family != "hf"]:
        for batch in batches:
            spec = f"zoo:{name}" + (f":batch={batch}" if batch != 1 else "")  # batch 1: the registry default
            print(f"zoo: lowering {spec}", file=sys.stderr, flush=True)
            record = lower_cached(spec, timeout)
            graph = record.pop("graph")
            if lowerings is not None:
                lowerings.append({"model": name, "batch": batch, **record})
            if graph is None:
                print(f"zoo: {spec}: {record['error']}", file=sys.stderr, flush=True)
                continue
            lowered = Lowered(graph, {}, (), (), "fx")
            for dtype, elem in ZOO_ELEM_SIZES.items():
                g = with_elem_size(lowered, elem).graph
                yield f"{name} b{batch} {dtype}", program_order_requests(g, alignment), None


SOURCES: dict[str, Callable[[], Iterable[Case]]] = {"minimalloc": minimalloc_instances, "zoo": zoo_instances}


HEURISTICS = ("greedy_size", "best_fit", "first_fit", "improve")
# omnimalloc (optional bench extra): its allocators side by side, as "omnimalloc:<name>"; the ones
# that take a time budget get the run's limit. Its "minimalloc" wraps google/minimalloc, not on PyPI.
OMNIMALLOC = ("omni", "greedy_by_size", "best_fit", "telamalloc", "supermalloc", "genetic", "simulated_annealing",
              "tabu_search", "hill_climb")
OMNI_PREFIX = "omnimalloc:"


def omnimalloc_methods() -> tuple[str, ...]:
    """The omnimalloc allocators this machine can run (none without the package)."""
    try:
        from omnimalloc.allocators import BaseAllocator
    except ImportError:
        return ()
    have = []
    for name in OMNIMALLOC:
        try:  # some need packages of their own (genetic: deap)
            BaseAllocator.registry()[name]()
        except (ImportError, KeyError):
            continue
        have.append(OMNI_PREFIX + name)
    return tuple(have)


def run_omnimalloc(requests: list[offsets.Request], allocator: str, time_limit: float) -> offsets.Placement:
    """Arena of one omnimalloc allocator (no capacity: they minimise), checked by our overlap check."""
    import inspect

    from omnimalloc import Allocation
    from omnimalloc.allocators import BaseAllocator

    from planner.check import Placement as CheckedItem
    from planner.check import placement_violation

    t0 = time.perf_counter()
    cls = BaseAllocator.registry()[allocator]
    kwargs = {"timeout": time_limit} if "timeout" in inspect.signature(cls.__init__).parameters else {}
    placed = cls(**kwargs).allocate(tuple(Allocation(r.id, r.size, r.start, r.end) for r in requests))
    offset = {a.id: a.offset for a in placed}
    items = [CheckedItem(r.id, r.start, r.end, offset[r.id], r.size) for r in requests]
    bad = placement_violation(items, None, 1)
    if bad:
        raise RuntimeError(f"omnimalloc {allocator} produced an invalid placement: {bad}")
    arena = max((it.offset + it.size for it in items), default=0)
    bound = offsets.lower_bound(requests)
    return offsets.Placement(offset, arena, bound, "feasible", OMNI_PREFIX + allocator, time.perf_counter() - t0,
                             (arena - bound) / arena if arena else 0.0)


def run_case(name: str, requests: list[offsets.Request], capacity: int | None, method: str,
             time_limit: float) -> dict:
    # heuristics cannot aim at a capacity: they run free and are judged by their arena
    free = method in HEURISTICS
    before = resource.getrusage(resource.RUSAGE_SELF)
    if method.startswith(OMNI_PREFIX):
        placed = run_omnimalloc(requests, method[len(OMNI_PREFIX):], time_limit)
    else:
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


def _earlier_lowerings(lowerings: list[dict], path: Path) -> None:
    """A lowering found in the cache gets the seconds that an earlier run (results at `path`) measured."""
    try:
        earlier_run = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    earlier = {r["spec"]: r for r in earlier_run.get("lowerings", []) if r.get("lowered_now") or r.get("lowered_on")}
    for r in lowerings:
        e = earlier.get(r["spec"])
        if not r["lowered_now"] and not r["error"] and e is not None:
            r.update(lowering_seconds=e["lowering_seconds"], lowering_cpu_seconds=e["lowering_cpu_seconds"],
                     lowered_on=e.get("lowered_on") or earlier_run.get("date"))


def _over(arena: int | None, bound: int) -> str:
    """An arena against the lower bound: `LB` when equal, else the excess in percent."""
    if arena is None:
        return "none"
    return "LB" if arena <= bound else f"+{100 * (arena - bound) / bound:.2f}%"


def zoo_markdown(runs: list[dict], lowerings: list[dict], methods: list[str], time_limit: float, command: str,
                 load: tuple[tuple[float, ...], tuple[float, ...]]) -> str:
    """One row per instance: bound, each method's arena against it and its seconds, auto's finisher."""
    lines = ["# Buffer placement on the model zoo (program order, no capacity)", "",
             f"`{command}` ({time_limit:g} s per run; {platform.node()}, a shared 2-core machine; load average"
             f" {' / '.join(f'{x:.1f}' for x in load[0])} at the start, {' / '.join(f'{x:.1f}' for x in load[1])}"
             " at the end: wall seconds are noisy, CPU seconds (all threads of the process) less so).", "",
             "Instances: every registry model but the optional Hugging Face family, at its published size, lowered"
             " through fx (torch.export) once per"
             " batch; int8 = the same lowering at one byte per element. Buffers: planner.baselines.residency of"
             f" program order with no capacity, weights off-chip, sizes rounded to the {ZOO_TARGET} target's"
             " 64 B alignment (graph inputs and outputs counted). LB = peak live bytes (KiB); each method's"
             " cell: its arena against LB (`LB` = equal) and its wall seconds. `auto via` = the method whose"
             " placement auto returned; `optimal` = at LB or proven optimal. `exact` and `cpsat` start from"
             " the best greedy placement and stop at once where it reaches LB. OR-Tools is imported before"
             " anything is timed.", "",
             "| instance | buffers | LB KiB | " + " | ".join(methods) + " | auto via | optimal | auto s | auto CPU s |",
             "|---|---:|---:|" + "---|" * len(methods) + "---|---|---:|---:|"]
    cell = {(r["instance"], r["method"]): r for r in runs}
    for name in dict.fromkeys(r["instance"] for r in runs):
        any_run = next(r for r in runs if r["instance"] == name)
        bound = max(r["lower_bound"] for r in runs if r["instance"] == name)
        row = [name, str(any_run["buffers"]), _kib(bound)]
        for m in methods:
            r = cell.get((name, m))
            row.append("" if r is None else f"{_over(r['arena'], bound)} {r['seconds']:.2f}")
        auto = cell.get((name, "auto"))
        row += ["-", "-", "-", "-"] if auto is None else [
            auto["found_by"], "yes" if auto["status"] == "optimal" else "**no**", f"{auto['seconds']:.2f}",
            f"{auto['cpu_seconds']:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    for r in (r for r in lowerings if r["error"]):  # models that did not lower get rows, not silence
        for dtype in ZOO_ELEM_SIZES:
            lines.append(f"| {r['model']} b{r['batch']} {dtype} | lowering failed: {r['error']} |" +
                         " |" * (len(methods) + 5))
    autos = [r for r in runs if r["method"] == "auto"]
    if autos:
        lines += ["", f"auto: {sum(r['status'] == 'optimal' for r in autos)}/{len(autos)} optimal; slowest "
                  f"{max(r['seconds'] for r in autos):.2f} s wall, {max(r['cpu_seconds'] for r in autos):.2f} s CPU;"
                  f" {sum(r['seconds'] >= 1.0 for r in autos)} took 1 s or more."]
    lines += ["", "## Lowerings", "",
              "Wall and CPU seconds of the child process that lowered each model through fx. Lowerings are cached"
              " (bench.schedule.load_graph: ~/.cache/memplan/graphs, keyed by the frontend and model sources);"
              " a cached one shows the seconds of the run that lowered it. Total: "
              f"{sum(r['lowering_seconds'] for r in lowerings):.0f} s wall, "
              f"{sum(r['lowering_cpu_seconds'] for r in lowerings):.0f} s CPU.", "",
              "| model | batch | wall s | CPU s | result |", "|---|---:|---:|---:|---|"]
    for r in lowerings:
        result = f"failed: {r['error']}" if r["error"] else "lowered" if r["lowered_now"] else \
            f"cached: seconds of the lowering on {r['lowered_on']}" if r.get("lowered_on") else "cached"
        lines.append(f"| {r['model']} | {r['batch']} | {r['lowering_seconds']:.1f} | {r['lowering_cpu_seconds']:.1f}"
                     f" | {result} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="minimalloc", choices=sorted(SOURCES))
    ap.add_argument("--methods", default=None, help="comma-separated methods of offsets.solve (default: "
                    f"{','.join(METHODS)}; for the zoo {','.join(ZOO_METHODS)})")
    ap.add_argument("--instances", default="", help="comma-separated instance names (default: all)")
    ap.add_argument("--time-limit", type=float, default=10.0, help="seconds per run")
    ap.add_argument("--minimise", default=",".join(MINIMISE), help="instances to minimise ('' for none)")
    ap.add_argument("--minimise-methods", default="auto", help="methods for the minimisation runs")
    ap.add_argument("--models", default="", help="zoo: comma-separated registry names (default: all but the "
                    "optional Hugging Face family)")
    ap.add_argument("--batches", default=",".join(map(str, ZOO_BATCHES)), help="zoo: comma-separated batch sizes")
    ap.add_argument("--lower-timeout", type=float, default=LOWER_SECONDS, help="zoo: seconds per lowering")
    ap.add_argument("--out", default=None, help="output path without suffix (default: "
                    "bench/results/offsets_<source>)")
    args = ap.parse_args(argv)
    zoo = args.source == "zoo"
    extra = omnimalloc_methods()
    methods = [m for m in (args.methods or ",".join((ZOO_METHODS if zoo else METHODS) + extra)).split(",") if m]
    known = offsets.METHODS + extra
    bad = [m for m in methods + args.minimise_methods.split(",") if m and m not in known]
    if bad:
        ap.error(f"unknown method {bad[0]!r}; choose from {', '.join(known)}")
    wanted = {n for n in args.instances.split(",") if n}
    lowerings: list[dict] = []
    from ortools.sat.python import cp_model  # noqa: F401  (~0.5 s of CPU, once: not any one run's time)

    load_start = os.getloadavg()
    if zoo:
        try:
            batches = [int(b) for b in args.batches.split(",") if b]
        except ValueError:
            ap.error(f"--batches {args.batches!r} is not a comma-separated list of integers")
        source = zoo_instances([m for m in args.models.split(",") if m] or None, batches, args.lower_timeout,
                               lowerings)
    else:
        source = SOURCES[args.source]()
    cases = [c for c in source if not wanted or c[0] in wanted]
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
    out = Path(args.out or RESULTS / f"offsets_{args.source}")
    _earlier_lowerings(lowerings, out.with_suffix(".json"))
    load = (load_start, os.getloadavg())
    record = {"command": command.strip(), "time_limit": args.time_limit, "host": platform.node(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "load_average": load, "runs": runs}
    record.update({"lowerings": lowerings} if zoo else {"minimise": minimised})
    write_atomic(out.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    table = zoo_markdown(runs, lowerings, methods, args.time_limit, command.strip(), load) if zoo else \
        markdown(runs, minimised, methods, args.time_limit, command.strip())
    write_atomic(out.with_suffix(".md"), table)
    print(f"wrote {out}.md and {out}.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

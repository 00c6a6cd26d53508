"""Time one relaxation guide's backward search (formulations/schedule_guide.coreachable) on a segment.

The guide of a RandWire stage is what decides whether its exact proof fits in 60 s (bench/RESULTS.md,
"RandWire stages, exact"). This runs the backward search alone at the given budgets, on the segment as
`auto` relaxes it, and prints per budget the relaxed sets stored, the seconds, the lower bound it gives
(the empty set's high) and the seconds to make the guide's Bloom table and its highs lookup.

    .venv/bin/python -m bench.guide_build --graph zoo:randwire_ba:seed=1 --segment 2 --budgets 4402970
"""

from __future__ import annotations

import argparse
import os
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--graph", required=True, help="a model spec, as bench.schedule's graph names")
    ap.add_argument("--segment", type=int, required=True, help="segment index (schedule.split_segments)")
    ap.add_argument("--budgets", required=True, help="comma-separated budgets in bytes")
    args = ap.parse_args(argv)

    import numpy as np

    from bench.schedule import load_graph
    from formulations import schedule
    from formulations.schedule_dp import Problem
    from formulations.schedule_guide import RelaxedGuides
    from formulations.schedule_heuristics import neutral_units

    graph = load_graph(args.graph)
    prob = Problem(graph)
    relaxed = schedule.relaxation(graph, prob, schedule.Options())
    seg = schedule.split_segments(prob)[args.segment]
    units = neutral_units(prob, seg.units)
    guides = RelaxedGuides(prob, relaxed, units, seg.start)
    print(f"{args.graph} segment {args.segment}: {len(units)} units, {guides.tables.m} relaxed; "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    for budget in map(int, args.budgets.split(",")):
        guides.top = None  # each budget searched anew, not filtered from the last
        t0 = time.perf_counter()
        refuted = guides.refutes(budget)
        searched = time.perf_counter() - t0
        t0 = time.perf_counter()
        guides.at(budget)
        table = time.perf_counter() - t0
        t0 = time.perf_counter()
        guides.highs_of(np.zeros(1, np.uint64))
        lookup = time.perf_counter() - t0
        print(f"budget {budget}: {guides.top[3]:,} sets, {searched:.1f} s; "
              f"{'refuted' if refuted else f'bound {guides.bound()}'}; Bloom table {table:.1f} s, "
              f"highs lookup {lookup:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

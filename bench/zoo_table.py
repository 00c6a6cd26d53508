"""The zoo table: every registry model lowered through fx and through ONNX.

    .venv/bin/python -m bench.zoo_table [--models a,b] [--small] [-o bench/results/zoo.md]
    .venv/bin/python -m bench.zoo_table --from-json bench/results/zoo.json   # re-render only

Each model is built at batch 1 (with --small: its CI parameters) and lowered
once per frontend; the int8 figures (elem_size 1, as `memplan inspect
--elem-size 1` gives) come from the same lowering (frontends.with_elem_size).
Per frontend: ops, tensors, activation and weight bytes, M_R and max-live of
program order, fp32 and int8, and the ONNX/fx activation-byte ratio. Writes
markdown and JSON (one record per model, frontend and element size); progress
and lowering times on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import models
from frontends import load_model, with_elem_size
from planner import bounds
from planner.plan import write_atomic
from planner.target import format_size

ELEM_SIZES = (None, 1)  # fp32 (every dtype its own size), int8


def spec_of(name: str, params: dict) -> str:
    return "zoo:" + name + (":" + ",".join(f"{k}={v}" for k, v in params.items()) if params else "")


def rows_of(name: str, via: str, params: dict) -> list[dict]:
    """One record per element size for `name` lowered through `via`."""
    t0 = time.perf_counter()
    lowered = load_model(spec_of(name, params), via=via)
    seconds = round(time.perf_counter() - t0, 1)
    rows = []
    for elem in ELEM_SIZES:
        g = with_elem_size(lowered, elem).graph
        s = g.summary()
        rows.append({"model": name, "via": via, "elem_size": elem or 4, "params": params, "ops": s["ops"],
                     "tensors": s["tensors"], "activation_bytes": s["activation_bytes"] + s["output_bytes"],
                     "weight_bytes": s["weight_bytes"], "M_R": bounds.m_r(g), "max_live": bounds.max_live(g),
                     "lowering_seconds": seconds})
    return rows


def ratio(rows: list[dict], model: str, elem_size: int) -> float | None:
    """ONNX / fx total activation bytes, or None when a lowering failed."""
    acts = {r["via"]: r.get("activation_bytes") for r in rows if r["model"] == model and r["elem_size"] == elem_size}
    return acts["onnx"] / acts["fx"] if acts.get("onnx") and acts.get("fx") else None


def markdown(rows: list[dict]) -> str:
    lines = ["| model | via | ops | tensors | activations fp32 | weights fp32 | M_R fp32 | max-live fp32 | "
             "activations int8 | M_R int8 | max-live int8 | ONNX/fx activations fp32, int8 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by_key = {(r["model"], r["via"], r["elem_size"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        for via in ("fx", "onnx"):
            fp32, int8 = by_key.get((model, via, 4)), by_key.get((model, via, 1))
            if fp32 is None or "error" in fp32:
                error = (fp32 or {}).get("error", "not run")
                lines.append(f"| {model} | {via} | error: {error} |" + " |" * 9)
                continue
            r4, r1 = (ratio(rows, model, e) for e in (4, 1))
            ratios = f"{r4:.3f}, {r1:.3f}" if via == "onnx" and r4 and r1 else ""
            lines.append(f"| {model} | {via} | {fp32['ops']} | {fp32['tensors']} | "
                         f"{format_size(fp32['activation_bytes'])} | {format_size(fp32['weight_bytes'])} | "
                         f"{format_size(fp32['M_R'])} | {format_size(fp32['max_live'])} | "
                         f"{format_size(int8['activation_bytes'])} | {format_size(int8['M_R'])} | "
                         f"{format_size(int8['max_live'])} | {ratios} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="comma-separated registry names (default: all)")
    ap.add_argument("--small", action="store_true", help="use each model's small CI parameters")
    ap.add_argument("-o", "--output", default="bench/results/zoo.md")
    ap.add_argument("--from-json", default=None, help="render the table of an earlier run's JSON, lowering nothing")
    args = ap.parse_args(argv)
    if args.from_json:
        print(markdown(json.loads(Path(args.from_json).read_text())), end="")
        return 0
    names = args.models.split(",") if args.models else [n for n in models.names() if models.spec(n).family != "hf"]
    rows: list[dict] = []
    for name in names:
        params = {**(models.spec(name).small if args.small else {}), "batch": 1}
        for via in ("fx", "onnx"):
            print(f"zoo_table: {name} via {via}", file=sys.stderr, flush=True)
            try:
                rows.extend(rows_of(name, via, params))
            except Exception as e:  # one model's failure must not lose the table
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                rows.extend({"model": name, "via": via, "elem_size": elem or 4, "params": params, "error": first}
                            for elem in ELEM_SIZES)
            print(f"zoo_table: {name} via {via}: {rows[-1].get('lowering_seconds', 'failed')} s",
                  file=sys.stderr, flush=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out.with_suffix(".json"), json.dumps(rows, indent=1))
    table = markdown(rows)
    write_atomic(out, table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

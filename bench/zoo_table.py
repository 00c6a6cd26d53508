"""The zoo table: every registry model lowered through fx and through ONNX.

    .venv/bin/python -m bench.zoo_table [--models a,b] [--small] [-o bench/results/zoo.md]

For batch 1, fp32 and int8 (--elem-size 1): ops, tensors, activation / weight bytes,
M_R and max-live of program order, per frontend, and the fx/ONNX activation-byte
ratio. Writes markdown + JSON; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import models
from frontends import load_model
from planner import bounds
from planner.plan import write_atomic
from planner.target import format_size


def row(name: str, via: str, elem_size: int | None, params: dict) -> dict:
    spec = "zoo:" + name + (":" + ",".join(f"{k}={v}" for k, v in params.items()) if params else "")
    t0 = time.perf_counter()
    g = load_model(spec, via=via, elem_size=elem_size).graph
    s = g.summary()
    return {"model": name, "via": via, "elem_size": elem_size or 4, "ops": s["ops"], "tensors": s["tensors"],
            "activation_bytes": s["activation_bytes"] + s["output_bytes"], "weight_bytes": s["weight_bytes"],
            "M_R": bounds.m_r(g), "max_live": bounds.max_live(g), "seconds": round(time.perf_counter() - t0, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="comma-separated registry names (default: all)")
    ap.add_argument("--small", action="store_true", help="use each model's small CI parameters")
    ap.add_argument("-o", "--output", default="bench/results/zoo.md")
    args = ap.parse_args(argv)
    names = args.models.split(",") if args.models else [n for n in models.names() if models.spec(n).family != "hf"]
    rows = []
    with tempfile.TemporaryDirectory():
        for name in names:
            params = {"batch": 1, **(models.spec(name).small if args.small else {})}
            for via in ("fx", "onnx"):
                for elem in (None, 1):
                    print(f"zoo_table: {name} via {via} elem_size {elem or 4}", file=sys.stderr, flush=True)
                    try:
                        rows.append(row(name, via, elem, params))
                    except Exception as e:  # one model's failure must not lose the table
                        rows.append({"model": name, "via": via, "elem_size": elem or 4, "error": str(e)[:200]})
    out = Path(args.output)
    write_atomic(out.with_suffix(".json"), json.dumps(rows, indent=1))
    lines = ["| model | via | bytes/elem | ops | tensors | activations | weights | M_R | max-live (program) | "
             "fx/onnx activations |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fx_acts = {(r["model"], r["elem_size"]): r.get("activation_bytes") for r in rows if r["via"] == "fx"}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['via']} | {r['elem_size']} | error: {r['error']} |||||||")
            continue
        ratio = fx_acts.get((r["model"], r["elem_size"]))
        ratio_s = f"{ratio / r['activation_bytes']:.3f}" if r["via"] == "onnx" and ratio else ""
        lines.append(f"| {r['model']} | {r['via']} | {r['elem_size']} | {r['ops']} | {r['tensors']} | "
                     f"{format_size(r['activation_bytes'])} | {format_size(r['weight_bytes'])} | "
                     f"{format_size(r['M_R'])} | {format_size(r['max_live'])} | {ratio_s} |")
    write_atomic(out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

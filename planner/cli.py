"""`memplan` command line.

  memplan compile MODEL [--capacity SIZE|M_R|M_H|M_P] [--target NAME] [--planner NAME] -o plan.json
  memplan check PLAN MODEL [--json]
  memplan inspect MODEL [--json]
  memplan offsets FILE.csv --capacity N [-o placed.csv]
  memplan replay PLAN MODEL [--device cpu|cuda] [--check]

MODEL is an ONNX file or a registry model (`zoo:resnet50:batch=32,res=224`);
`--training` plans a torch model's training step (forward and backward) instead.
Exit codes: 0 success, 1 an invalid plan (check), 2 bad input. Reports go to
stdout (`--json` for machines); progress goes to stderr when it is a terminal.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from planner.target import format_size


class UsageError(ValueError):
    """Bad input from the user: printed as one line, exit code 2."""


def note(msg: str) -> None:
    if sys.stderr.isatty():
        print(f"memplan: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------- arguments
def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D0,D1,...",
                   help="fix an ONNX input's shape, e.g. input0:1,3,224,224 (repeatable)")
    p.add_argument("--elem-size", type=int, default=None, help="bytes per element for every tensor (int8: 1)")
    p.add_argument("--via", choices=("fx", "onnx"), default="fx", help="how a zoo: model is lowered")
    p.add_argument("--training", action="store_true",
                   help="the training step's graph: forward and backward of the mean of the output (fx only)")


def _target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="npu", help="preset: npu, mcu, h100, cpu (default npu)")
    p.add_argument("--capacity", default=None,
                   help="scratchpad bytes: 512KiB, 1.5MiB, a budget name M_R/M_H/M_P, or 'none' to minimise")
    p.add_argument("--include-weights", action="store_true", help="weights stream through the scratchpad")
    p.add_argument("--alignment", type=int, default=None, help="buffer alignment in bytes")


def parse_input_shapes(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise UsageError(f"--input-shape {item!r}: write NAME:D0,D1,... e.g. input0:1,3,224,224") from None
    return shapes


def lower(args: argparse.Namespace, model: str):
    from frontends import load_model

    if args.training and args.command == "replay":  # its inputs and reference are the inference ones
        raise UsageError(f"{model}: replay of training graphs is not supported yet")
    return load_model(model, input_shapes=parse_input_shapes(args.input_shape), elem_size=args.elem_size,
                      via=args.via, training=args.training)


def apply_lowering_record(args: argparse.Namespace, plan) -> None:
    """Lower the model the way the plan was made (elem_size, via, input shapes, training), unless told otherwise."""
    rec = plan.solver.params.get("lowering", {})
    args.training = args.training or bool(rec.get("training"))
    for key in ("elem_size", "via"):
        if getattr(args, key) in (None, "fx") and rec.get(key) is not None:
            setattr(args, key, rec[key])
    if not args.input_shape and rec.get("input_shape"):
        args.input_shape = rec["input_shape"]


def lowering_record(args: argparse.Namespace, model: str) -> dict[str, Any]:
    return {"model": model, "input_shape": list(args.input_shape), "elem_size": args.elem_size, "via": args.via,
            "training": args.training}


# --------------------------------------------------------------- reports
def plan_report(plan, graph) -> dict[str, Any]:
    m, s = plan.metrics, plan.solver
    return {"graph": graph.name, "ops": len(graph.ops), "tensors": len(graph.tensors),
            "target": plan.target.name, "capacity": plan.target.capacity,
            "include_weights": plan.target.include_weights, "planner": s.formulation, "status": s.status,
            "objective": s.objective, "bound": s.bound, "gap": s.gap, "solve_seconds": round(s.seconds, 3),
            **{k: m[k] for k in ("peak_bytes", "arena_bytes", "load_bytes", "store_bytes", "compulsory_bytes",
                                 "noncompulsory_bytes", "recompute_flops", "compute_flops", "est_seconds",
                                 "steps")}}


def print_report(rep: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rep, indent=1))
        return
    width = max(len(k) for k in rep)
    for k, v in rep.items():
        if k.endswith("_bytes") or k == "capacity":
            v = "unbounded" if v is None else f"{format_size(v)} ({v:,} B)"
        elif isinstance(v, float):
            v = f"{v:.6g}"
        print(f"{k.ljust(width)}  {v}")


# --------------------------------------------------------------- commands
def cmd_compile(args: argparse.Namespace) -> int:
    from planner.compile import compile as compile_plan
    from planner.compile import resolve_target

    options = remat_options(args)  # usage errors before the (slow) lowering
    t0 = time.perf_counter()
    lowered = lower(args, args.model)
    graph = lowered.graph
    note(f"lowered {graph.name}: {len(graph.ops)} ops, {len(graph.tensors)} tensors "
         f"({time.perf_counter() - t0:.1f}s)")
    # a remat budget bounds the peak; the preset's scratchpad applies only when --capacity says so
    capacity = "none" if options and args.capacity is None else args.capacity
    target = resolve_target(args.target, capacity, graph, args.include_weights or None, args.alignment)
    note(f"planning with {args.planner} at capacity "
         f"{'unbounded' if target.capacity is None else format_size(target.capacity)}")
    plan = compile_plan(graph, target, planner=args.planner, time_limit=args.time_limit, progress=note,
                        **options)
    plan = plan.with_(solver=dataclasses.replace(
        plan.solver, params={**plan.solver.params, "lowering": lowering_record(args, args.model)}))
    if args.output:
        plan.save(args.output)
        note(f"wrote {args.output}")
    print_report(plan_report(plan, graph), args.json)
    return 0


def remat_options(args: argparse.Namespace) -> dict:
    """--budget / --objective as planner options; they make the planner remat."""
    if args.budget is None and args.objective is None:
        if args.planner == "remat":
            raise UsageError("--planner remat needs --budget (bytes, a size, or a fraction of the no-remat peak)")
        return {}
    if args.planner not in ("auto", "remat"):
        raise UsageError(f"--budget and --objective belong to the remat planner, not {args.planner!r}")
    args.planner = "remat"
    options = {"budget": args.budget}
    if args.objective:
        options["objective"] = args.objective
    return options


def cmd_check(args: argparse.Namespace) -> int:
    from planner.check import PlanError, check
    from planner.plan import Plan

    plan = Plan.load(args.plan)
    apply_lowering_record(args, plan)
    graph = lower(args, args.model).graph
    try:
        checked = check(graph, plan)
    except PlanError as e:
        if args.json:
            print(json.dumps({"valid": False, "error": str(e), "step": e.step}))
        else:
            print(f"INVALID: {e}")
        return 1
    rep = {"valid": True, **plan_report(checked, graph)}
    print_report(rep, args.json)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from planner import bounds

    graph = lower(args, args.model).graph
    a = args.alignment or 1
    rep = {**graph.summary(),
           "M_R": bounds.m_r(graph, False, a), "max_live": bounds.max_live(graph, None, False, a),
           "M_R_with_weights": bounds.m_r(graph, True, a),
           "max_live_with_weights": bounds.max_live(graph, None, True, a),
           "fingerprint": graph.fingerprint}
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        for k, v in rep.items():
            shown = f"{format_size(v)} ({v:,} B)" if (k.endswith("bytes") or k.startswith(("M_", "max_"))) else v
            print(f"{k.ljust(22)}  {shown}")
    return 0


def cmd_offsets(args: argparse.Namespace) -> int:
    from formulations import offsets
    from planner.target import parse_size

    reqs = offsets.read_csv(args.file)
    cap = None if args.capacity in (None, "none") else parse_size(args.capacity)
    res = offsets.solve(reqs, capacity=cap, alignment=args.alignment or 1, time_limit=args.time_limit,
                        method=args.method)
    if args.output and res.status in ("optimal", "feasible"):
        offsets.write_csv(args.output, reqs, res)
    rep = {"file": args.file, "buffers": len(reqs), "capacity": cap, "status": res.status, "method": res.method,
           "arena": res.arena, "lower_bound": res.lower_bound, "gap": res.gap, "seconds": round(res.seconds, 3)}
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        for k, v in rep.items():
            print(f"{k.ljust(12)}  {v}")
    return 0 if res.status in ("optimal", "feasible") else 1


def cmd_replay(args: argparse.Namespace) -> int:
    from planner.runtime.replay import replay_command

    return replay_command(args)


# ------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="memplan", description="ILP/CP memory planning for DNN graphs")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="plan a model for a target and write the plan file")
    p.add_argument("model")
    _model_args(p)
    _target_args(p)
    p.add_argument("--planner", default="auto", help="auto, baseline, schedule, joint, remat, or a pipeline name")
    p.add_argument("--budget", default=None,
                   help="remat: peak budget, bytes / a size (6GiB) / a fraction of the no-remat peak (0.8, 80%%); "
                        "implies --planner remat")
    p.add_argument("--objective", choices=("recompute", "traffic", "time"), default=None,
                   help="remat: minimise recompute FLOPs (default), off-chip bytes, or estimated time (both)")
    p.add_argument("--time-limit", type=float, default=60.0, help="solver seconds (default 60)")
    p.add_argument("-o", "--output", help="plan file to write (atomically)")
    p.add_argument("--json", action="store_true", help="report as JSON")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("check", help="validate a plan against a model; exit 1 if invalid")
    p.add_argument("plan")
    p.add_argument("model")
    _model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("inspect", help="ops, tensors, bytes, M_R and max-live of a model")
    p.add_argument("model")
    _model_args(p)
    p.add_argument("--alignment", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("offsets", help="place buffers from a MiniMalloc CSV")
    p.add_argument("file")
    p.add_argument("--capacity", default=None)
    p.add_argument("--alignment", type=int, default=None)
    p.add_argument("--method", default="auto")
    p.add_argument("--time-limit", type=float, default=10.0)
    p.add_argument("-o", "--output")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_offsets)

    p = sub.add_parser("replay", help="run a plan (CPU or CUDA) and compare with eager PyTorch")
    p.add_argument("plan")
    p.add_argument("model")
    _model_args(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--check", action="store_true", help="compare outputs with eager")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_replay)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("memplan: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # user mistakes become one line and exit 2; bugs keep their traceback
        if _is_user_error(e):
            print(f"memplan: error: {e}", file=sys.stderr)
            return 2
        raise


def _is_user_error(e: Exception) -> bool:
    from planner.bounds import InfeasibleError
    from planner.graph import GraphError
    from planner.plan import PlanFileError

    user = (UsageError, InfeasibleError, GraphError, PlanFileError, FileNotFoundError, IsADirectoryError)
    try:
        from frontends.common import FrontendError
        from models.registry import ModelSpecError
        user += (FrontendError, ModelSpecError)
    except ImportError:
        pass
    try:
        from formulations.offsets import OffsetsInputError  # type: ignore[attr-defined]
        user += (OffsetsInputError,)
    except ImportError:
        pass
    if isinstance(e, user):
        return True
    # size strings, unknown planners, presets and budgets raise plain ValueError with a message for the user
    return type(e) is ValueError


if __name__ == "__main__":
    sys.exit(main())

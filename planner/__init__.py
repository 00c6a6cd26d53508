"""memplan: ILP/CP memory planning for DNN graphs. The public API lives here."""

from planner.graph import GraphError, LifetimeGraph, Op, Tensor
from planner.plan import Buffer, Instr, Plan, SolverRecord
from planner.target import PRESETS, Target, get_target, parse_size

__all__ = ["LifetimeGraph", "Op", "Tensor", "GraphError", "Plan", "Instr", "Buffer", "SolverRecord", "Target",
           "PRESETS", "get_target", "parse_size"]

"""Measurements of an Executor on CUDA: how much transfer time the compute hides, and how much
memory kernels take beyond the plan's buffers. Both run the executor's own program."""

from __future__ import annotations

from typing import Any

import torch

from planner.runtime.aten_ops import ReplayError
from planner.runtime.executor import Executor


def measure_overlap(ex: Executor, *inputs: torch.Tensor, runs: int = 5) -> dict[str, float]:
    """CUDA: how much transfer time the compute hides. Median wall time with and without the
    transfers (same kernels otherwise), and the busy time of the transfer stream."""
    if not ex.cuda:
        return {}

    def timed(skip: bool) -> tuple[float, float]:
        ex._flags.skip_transfers = skip
        ex._flags.timing = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        ex.run(*inputs)
        end.record()
        torch.cuda.synchronize(ex.device)
        busy = sum(a.elapsed_time(b) for a, b in ex._flags.timing)
        return start.elapsed_time(end), busy
    try:
        full = sorted(timed(False) for _ in range(runs))[runs // 2]
        bare = sorted(timed(True)[0] for _ in range(runs))[runs // 2]
    finally:
        ex._flags.skip_transfers, ex._flags.timing = False, None
    wall, busy = full
    exposed = max(0.0, wall - bare)
    return {"wall_ms": wall, "compute_only_ms": bare, "transfer_busy_ms": busy, "exposed_transfer_ms": exposed,
            "hidden_fraction": (1.0 - min(exposed, busy) / busy) if busy > 0 else 1.0}


def measure_workspace(ex: Executor, *inputs: torch.Tensor) -> dict[str, Any]:
    """CUDA memory beyond the plan's buffers, from one run synchronised after every step:
    `workspace_bytes`, the most any one step held transiently (cuDNN / cuBLAS workspaces, the
    temporary of an op computed then copied) and `workspace_op`, that step's op; `output_bytes`,
    the fresh output tensors the run returns. A run's peak is at most arena + both."""
    if not ex.cuda:
        raise ReplayError(f"{ex.graph.name}: measure_workspace needs a CUDA device")
    worst: dict[str, Any] = {"workspace_bytes": 0, "workspace_op": None}
    dev = ex.device

    def probe(k: int) -> None:
        torch.cuda.synchronize(dev)
        transient = torch.cuda.max_memory_allocated(dev) - torch.cuda.memory_allocated(dev)
        if transient > worst["workspace_bytes"]:
            worst.update(workspace_bytes=int(transient), workspace_op=ex._program_ops[k])
        torch.cuda.reset_peak_memory_stats(dev)

    for tid, x in zip(ex.input_ids, inputs):
        ex._bind(tid, x)
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    ex._execute(0, len(ex._program), probe)
    outs = [ex._dyn[ex._output_slots[t]] for t in ex.output_ids]
    worst["output_bytes"] = sum(o.numel() * o.element_size() for o in outs
                                if isinstance(o, torch.Tensor) and o.data_ptr() and not ex._in_arena(o))
    ex._finish()
    return worst

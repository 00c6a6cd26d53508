"""Random ops recomputed with the numbers their first run drew.

A plan may compute an op that draws random numbers (dropout, attention with dropout) a second
time: rematerialisation frees its output and computes it again for the backward pass. The
second run must reproduce the first's numbers, or the gradients use a different mask than the
forward did. As torch.utils.checkpoint does (preserve_rng_state), the executor records the
device generator's state right before the op's first run in each call and, for every later
run of that op, sets the generator to that state, runs the op and puts the state back, so the
numbers the rest of the program draws do not change either. A CUDA generator's state is its
seed and offset (host-side, no synchronisation); the CPU generator's is its Mersenne Twister state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def default_generator(device: torch.device) -> torch.Generator:
    """The generator ATen kernels on `device` draw from when none is passed."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    if device.type == "cpu":
        return torch.default_generator
    raise ValueError(f"no default generator known for device {device}")


class RngReplay:
    """Generator states of random ops' first runs, and the wrappers that record and replay them."""

    def __init__(self, device: torch.device) -> None:
        self.generator = default_generator(device)
        self.states: dict[int, torch.Tensor] = {}  # op id -> state before its first run in this call
        self._wrapped: set[int] = set()

    def wrap(self, fn: Callable[[], None], op_id: int, name: str) -> Callable[[], None]:
        """The op's first run in program order records the state, every later run replays it."""
        if op_id in self._wrapped:
            return self._replay(fn, op_id, name)
        self._wrapped.add(op_id)
        return self._record(fn, op_id)

    def _record(self, fn: Callable[[], None], op_id: int) -> Callable[[], None]:
        gen, states = self.generator, self.states

        def run() -> None:
            states[op_id] = gen.get_state()
            fn()
        return run

    def _replay(self, fn: Callable[[], None], op_id: int, name: str) -> Callable[[], None]:
        gen, states = self.generator, self.states

        def run() -> None:
            if op_id not in states:
                raise RuntimeError(f"recompute of random op {name!r} before its first run")
            now = gen.get_state()
            gen.set_state(states[op_id])
            try:
                fn()
            finally:
                gen.set_state(now)
        return run

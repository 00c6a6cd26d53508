"""Greedy buffer placement and a local repair, in solver units (see formulations/offsets.py).

A greedy pass takes the buffers in an order and puts each one into a gap that is free over
its whole lifetime among the buffers already placed: the lowest such gap (`greedy_size`,
`first_fit`) or the tightest one that fits (`best_fit`, as XLA's heap simulator does).
`improve` repairs the best greedy order: a buffer that reaches the top of the arena moves
to an earlier place in the order and the suffix is placed again (iterated greedy, ties
accepted so that the search can cross plateaus). None of these prove anything beyond the
lower bound; they are the incumbents the exact methods start from.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

from formulations.offsets import Instance, Outcome, better, outcome

ORDERED = ("greedy_size", "first_fit", "best_fit")


def place(inst: Instance, order: Sequence[int], tightest: bool = False, offsets: list[int] | None = None,
          start: int = 0) -> list[int]:
    """Place order[start:] one by one; the buffers before `start` keep `offsets`."""
    size, align, nbrs = inst.size, inst.align, inst.overlaps
    off = [-1] * inst.n if offsets is None else list(offsets)
    for b in order[start:]:
        off[b] = -1
    for b in order[start:]:
        w, a = size[b], align[b]
        busy = sorted([(off[c], off[c] + size[c]) for c in nbrs[b] if off[c] >= 0])
        pos, chosen, chosen_gap = 0, -1, 0
        for lo, hi in busy:
            x = pos if a == 1 else -(-pos // a) * a
            if x + w <= lo:
                if not tightest:
                    chosen = x
                    break
                if chosen < 0 or lo - pos < chosen_gap:
                    chosen, chosen_gap = x, lo - pos
            if hi > pos:
                pos = hi
        off[b] = chosen if chosen >= 0 else (pos if a == 1 else -(-pos // a) * a)
    return off


def orders(inst: Instance) -> dict[str, list[int]]:
    """The static orders: by size (TFLite), by start (first/best fit), by area, by lifetime."""
    t, n = inst.times, range(inst.n)
    span = [t[inst.last[b]] - t[inst.first[b]] for b in n]
    return {
        "size": sorted(n, key=lambda b: (-inst.size[b], -span[b], inst.first[b])),
        "start": sorted(n, key=lambda b: (inst.first[b], -inst.size[b], -span[b])),
        "area": sorted(n, key=lambda b: (-inst.size[b] * span[b], -inst.size[b])),
        "lifetime": sorted(n, key=lambda b: (-span[b], -inst.size[b])),
    }


def run(inst: Instance, method: str, cap: int | None) -> Outcome:
    """One of the published greedy allocators."""
    by = orders(inst)
    if method == "greedy_size":
        return outcome(inst, place(inst, by["size"]), cap, method)
    if method == "first_fit":
        return outcome(inst, place(inst, by["start"]), cap, method)
    if method == "best_fit":
        return outcome(inst, place(inst, by["start"], tightest=True), cap, method)
    raise ValueError(f"no greedy method {method!r}")


def _candidates(inst: Instance) -> list[tuple[int, list[int], str, list[int]]]:
    """(arena, offsets, name, order) for every static order, lowest and tightest fit, and the hints."""
    out = []
    for name, order in orders(inst).items():
        for tightest in (False, True):
            off = place(inst, order, tightest)
            out.append((inst.arena(off), off, f"{'best' if tightest else 'lowest'}_fit:{name}", order))
    if all(h is not None for h in inst.hint):
        hinted = list(inst.hint)
        order = sorted(range(inst.n), key=lambda b: (hinted[b], b))
        off = place(inst, order)  # the hints, pushed down where they leave room and moved where they clash
        out.append((inst.arena(off), off, "hint", order))
    return out


def best_greedy(inst: Instance, cap: int | None) -> Outcome:
    """The best of the greedy placements (the incumbent for the other methods)."""
    arena, off, name, _ = min(_candidates(inst), key=lambda c: c[0])
    return outcome(inst, off, cap, f"greedy:{name}")


def improve(inst: Instance, cap: int | None, deadline: float, start: Outcome | None = None,
            seed: int = 0, patience: int = 200) -> Outcome:
    """Iterated greedy from the best static order until the deadline, the bound, the capacity, or
    `patience` moves in a row that make nothing smaller."""
    rng = random.Random(seed)
    stale = 0
    arena, off, name, order = min(_candidates(inst), key=lambda c: c[0])
    goal = max(inst.lower_bound(), cap if cap is not None else 0)
    best_arena, best_off = arena, off
    order = list(order)
    where = {b: k for k, b in enumerate(order)}
    while best_arena > goal and stale < patience and time.perf_counter() < deadline:
        stale += 1
        top = [b for b in range(inst.n) if off[b] + inst.size[b] == arena]
        b = rng.choice(top)
        k = where[b]
        if k == 0:
            continue
        j = rng.randrange(0, k)
        trial = order[:j] + [b] + order[j:k] + order[k + 1:]
        trial_off = place(inst, trial, offsets=off, start=j)
        trial_arena = inst.arena(trial_off)
        if trial_arena <= arena:
            order, off, arena = trial, trial_off, trial_arena
            where = {c: i for i, c in enumerate(order)}
            if arena < best_arena:
                best_arena, best_off, stale = arena, off, 0
    found = outcome(inst, best_off, cap, "improve")
    return better(start, found) if start is not None else found

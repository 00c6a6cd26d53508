"""Residency plans for the joint formulations: for an order of the ops, which tensors stay on
chip between their uses, which are evicted (and reloaded), which outputs take a dying input's
buffer over in place; the buffers that follows, their packing, and the instruction list.

Vocabulary, for a fixed order (step s runs op order[s]):
- events of a counted root tensor t: its birth (producing step, or first use for an input or
  a counted weight) and the steps that read it (directly or through a view).
- gap k of t: the steps strictly between events k and k+1. Kept: t stays resident through it
  (one buffer); evicted: t is freed after event k and reloaded before event k+1 (traffic
  nbytes, plus one spill store for an activation; the off-chip copy persists). Evicting for
  part of a gap costs the same and frees less, so whole gaps are the only choices. Gaps of
  length zero (adjacent events) are choices too: evict-and-reload there moves a buffer.
- in-place pair (s, out, donor): op s writes `out` over `donor` (an in-place input of the op,
  of the same aligned size) whose residency ends at s; the two pieces share one offset.
- piece: one residency interval [a, b] (inclusive steps) of one tensor; in-place pairs join
  pieces into one buffer request [a, b + 1) for formulations.offsets.

Instruction layout per step s: stores of tensors evicted after s - 1 that need an off-chip
copy, frees, loads of pieces starting at s, stores of in-place donors reloaded later,
`compute`, stores of graph outputs. Two pieces overlap in instruction time exactly when their
step ranges intersect, so a packing of the requests is a valid placement for the checker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from planner.graph import LifetimeGraph
from planner.plan import Instr, Plan
from planner.target import Target, align_up


@dataclass(frozen=True, slots=True)
class Gap:
    tensor: int  # root tensor id
    lo: int  # step of the event before the gap
    hi: int  # step of the event after it (a use)


@dataclass(frozen=True, slots=True)
class InplacePair:
    step: int  # step of the op that writes in place
    out: int  # output tensor id
    donor: int  # in-place input whose buffer the output takes over


@dataclass(frozen=True)
class Choice:
    """A residency plan for one order: the gaps kept and the in-place pairs taken."""

    kept: frozenset[int]  # indices into Timeline.gaps
    inplace: frozenset[int]  # indices into Timeline.pairs


class Timeline:
    """The facts of one order that every residency model reads."""

    def __init__(self, graph: LifetimeGraph, target: Target, order: Sequence[int]):
        self.graph, self.target, self.order = graph, target, tuple(order)
        self.steps = len(self.order)
        step_of = {op: s for s, op in enumerate(self.order)}
        counted = [graph.is_buffer(t.id, target.include_weights) for t in graph.tensors]
        events: dict[int, set[int]] = {}
        self.forced: list[list[int]] = [[] for _ in self.order]  # tensors with an event at each step
        for s, op_id in enumerate(self.order):
            op = graph.ops[op_id]
            here = {graph.root(t) for t in op.inputs if counted[graph.root(t)]}
            here |= {t for t in op.outputs if counted[t]}
            for t in here:
                events.setdefault(t, set()).add(s)
            self.forced[s] = sorted(here)
        self.born = {t: (step_of[graph.producer[t]] if t in graph.producer else min(ev))
                     for t, ev in events.items()}
        self.events = {t: sorted(ev) for t, ev in sorted(events.items())}
        self.size = {t: align_up(graph.tensors[t].nbytes, target.alignment) for t in self.events}
        self.nbytes = {t: graph.tensors[t].nbytes for t in self.events}
        self.kind = {t: graph.tensors[t].kind for t in self.events}
        self.gaps: list[Gap] = []
        self.gaps_of: dict[int, list[int]] = {}
        for t, ev in self.events.items():
            self.gaps_of[t] = []
            for lo, hi in zip(ev, ev[1:]):
                self.gaps_of[t].append(len(self.gaps))
                self.gaps.append(Gap(t, lo, hi))
        self.gap_after = {(g.tensor, g.lo): i for i, g in enumerate(self.gaps)}
        self.pairs: list[InplacePair] = []
        for s, op_id in enumerate(self.order):
            op = graph.ops[op_id]
            outs = [t for t in op.outputs if counted[t] and self.size[t] > 0]
            donors = [i for i in dict.fromkeys(op.inplace_inputs)
                      if graph.tensors[i].alias_of is None and counted[i] and i not in op.outputs]
            for t in outs:
                for i in donors:
                    if self.size[i] == self.size[t] and self.born[i] < s:
                        self.pairs.append(InplacePair(s, t, i))

    # ---- costs and bounds ----------------------------------------------
    def spill_cost(self, t: int) -> int:
        """Bytes of the one spill store an eviction of t needs (0 when an off-chip copy exists anyway)."""
        return self.nbytes[t] if self.kind[t] == "activation" else 0

    def traffic(self, choice: Choice) -> int:
        """Non-compulsory bytes of a choice: one reload per evicted gap, one store per spilled activation."""
        total = 0
        spilled: set[int] = set()
        for i, g in enumerate(self.gaps):
            if i not in choice.kept:
                total += self.nbytes[g.tensor]
                spilled.add(g.tensor)
        for p in choice.inplace:  # a donor read again later was stored before being overwritten
            pair = self.pairs[p]
            if (pair.donor, pair.step) in self.gap_after:
                spilled.add(pair.donor)
        return total + sum(self.spill_cost(t) for t in spilled)

    def live_bytes(self, choice: Choice) -> list[int]:
        """Aggregate resident bytes at each step under a choice (in-place pairs share one buffer)."""
        live = [sum(self.size[t] for t in self.forced[s]) for s in range(self.steps)]
        for i in choice.kept:
            g = self.gaps[i]
            for s in range(g.lo + 1, g.hi):
                live[s] += self.size[g.tensor]
        for p in choice.inplace:
            live[self.pairs[p].step] -= self.size[self.pairs[p].out]
        return live

    # ---- pieces and requests -------------------------------------------
    def pieces(self, choice: Choice) -> list[tuple[int, int, int]]:
        """(tensor, first step, last step) of every residency interval."""
        out = []
        for t, ev in self.events.items():
            start = ev[0]
            for i in self.gaps_of[t]:
                if i not in choice.kept:
                    out.append((t, start, self.gaps[i].lo))
                    start = self.gaps[i].hi
            out.append((t, start, ev[-1]))
        return out

    def buffers(self, choice: Choice) -> tuple[list[tuple[int, int, int]], list[int], list[tuple[int, int, int]]]:
        """Pieces joined by in-place pairs: (first step, last step, size) per buffer, the buffer
        of each piece, and the pieces."""
        pieces = self.pieces(choice)
        index = {(t, a): k for k, (t, a, _) in enumerate(pieces)}
        ending = {(t, b): k for k, (t, _, b) in enumerate(pieces)}
        parent = list(range(len(pieces)))

        def find(k: int) -> int:
            while parent[k] != k:
                parent[k] = parent[parent[k]]
                k = parent[k]
            return k

        for p in choice.inplace:
            pair = self.pairs[p]
            donor_piece = ending.get((pair.donor, pair.step))
            out_piece = index.get((pair.out, pair.step))
            if donor_piece is None or out_piece is None:
                raise ValueError(f"in-place pair at step {pair.step}: donor does not end there")
            parent[find(out_piece)] = find(donor_piece)
        groups: dict[int, list[int]] = {}
        for k in range(len(pieces)):
            groups.setdefault(find(k), []).append(k)
        bufs: list[tuple[int, int, int]] = []
        buffer_of = [0] * len(pieces)
        for members in groups.values():
            for k in members:
                buffer_of[k] = len(bufs)
            bufs.append((min(pieces[k][1] for k in members), max(pieces[k][2] for k in members),
                         max(self.size[pieces[k][0]] for k in members)))
        return bufs, buffer_of, pieces

    # ---- plan extraction -------------------------------------------------
    def choice_from_plan(self, plan: Plan) -> Choice | None:
        """The choice a checked plan makes on this order (None if it runs another order)."""
        computes = [k for k, ins in enumerate(plan.instructions) if ins.kind == "compute"]
        if tuple(plan.instructions[k].ref for k in computes) != self.order:
            return None
        by_tensor: dict[int, list] = {}
        for b in plan.buffers:
            by_tensor.setdefault(b.tensor, []).append(b)

        def same_buffer(t: int, s1: int, s2: int) -> bool:
            i1, i2 = computes[s1], computes[s2]
            return any(b.start <= i1 and i2 <= b.end for b in by_tensor.get(t, ()))

        kept = frozenset(i for i, g in enumerate(self.gaps) if same_buffer(g.tensor, g.lo, g.hi))
        taken = set()
        for p, pair in enumerate(self.pairs):
            k = computes[pair.step]
            off = plan.instructions[k].offsets[self.graph.ops[self.order[pair.step]].outputs.index(pair.out)]
            if any(b.end == k and b.offset == off for b in by_tensor.get(pair.donor, ())):
                taken.add(p)
        return Choice(kept, frozenset(taken))

    def instructions(self, choice: Choice, offsets: Sequence[int]) -> tuple[Instr, ...]:
        """The instruction list of a choice, given an offset per buffer (as from `buffers`)."""
        g, n = self.graph, self.steps
        _, buffer_of, pieces = self.buffers(choice)
        offset_of = {(t, a): offsets[buffer_of[k]] for k, (t, a, _) in enumerate(pieces)}
        starts: list[list[int]] = [[] for _ in range(n)]
        ends: list[list[int]] = [[] for _ in range(n)]
        for t, a, b in pieces:
            starts[a].append(t)
            ends[b].append(t)
        later = {(t, b) for t, a, b in pieces if b < self.events[t][-1]}  # piece followed by a reload
        taken = {(self.pairs[p].donor, self.pairs[p].step) for p in choice.inplace}
        offchip = {t for t in self.events if self.kind[t] in ("input", "weight")}
        out: list[Instr] = []

        def store_if_needed(t: int) -> None:
            if t not in offchip:
                out.append(Instr("store", t))
                offchip.add(t)

        for s, op_id in enumerate(self.order):
            if s > 0:
                for t in ends[s - 1]:
                    if (t, s - 1) not in taken:
                        if (t, s - 1) in later:
                            store_if_needed(t)
                        out.append(Instr("free", t))
            for t in starts[s]:
                if self.born[t] != s or self.kind[t] in ("input", "weight"):
                    out.append(Instr("load", t, (offset_of[(t, s)],)))
            for t in ends[s]:
                if (t, s) in taken and (t, s) in later:
                    store_if_needed(t)
            op = g.ops[op_id]
            out.append(Instr("compute", op_id, tuple(offset_of[(t, s)] if (t, s) in offset_of and
                                                     self.born.get(t) == s else -1 for t in op.outputs)))
            for t in op.outputs:
                if g.tensors[t].kind == "output" and t in self.events:
                    store_if_needed(t)
        return tuple(out)


def requests(bufs: Sequence[tuple[int, int, int]], window: tuple[int, int] | None = None):
    """Offsets requests of the buffers (clipped to a step window [l, r] when given)."""
    from formulations.offsets import Request

    out = []
    for k, (a, b, size) in enumerate(bufs):
        if window is not None:
            a, b = max(a, window[0]), min(b, window[1])
            if a > b:
                continue
        out.append(Request(str(k), a, b + 1, size))
    return out


def order_of(plan: Plan) -> list[int]:
    return [ins.ref for ins in plan.instructions if ins.kind == "compute"]


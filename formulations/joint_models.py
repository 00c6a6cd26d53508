"""Residency masters of the joint formulation (our model), behind one small linear-model layer
that builds the same model for CP-SAT or for a MILP solver through PuLP.

Fixed order (`GapMaster`), per gap g of tensor t (see joint_residency) and in-place pair p:
    min  sum_g b_t (1 - keep_g) + sum_{t activation} b_t spill_t
    s.t. forced_s + sum_{g covers s} w_t keep_g - sum_{p at s} w_out ip_p <= C      per step s
         spill_t >= 1 - keep_g,  ip_p <= 1 - keep_{gap after the donor's use}
         at most one donor per output and one output per donor
         no-good cuts from the packing (joint.py)
  b = bytes, w = aligned size, forced_s = bytes of the op's inputs and outputs at step s.
  Size: one binary per gap (about one per graph edge), one per activation, one per pair.

Free order (`StepMaster`), time-indexed over steps restricted to ASAP/ALAP windows:
  x[o,s] op o at step s (s in [asap_o, alap_o]), one op per step, st_o = sum_s s x[o,s],
  st_p < st_o on every edge; r[t,s] resident, l[t,s] (re)load, for s in t's window
  [asap(producer), max alap(consumers)]; z[p,s] = ip_p AND x[op(p),s].
    r[t,s] >= x[o,s] for readers and the producer;  r[t,s] <= sum_{s'<=s} x[prod,s']
    l[t,s] >= r[t,s] - r[t,s-1] - x[prod,s] + z[p,s-1] (p with donor t)
    spill_t >= l[t,s];  sum_t w_t r[t,s] - sum_p w_out z[p,s] <= C
    min sum b_t l[t,s] + sum b_t spill_t - sum_{inputs} b_t  (an input's first load is compulsory)
  Size: sum of window lengths (x), twice the sum of tensor windows (r, l), pairs x windows (z).

Omitted on purpose: offsets (checked by formulations.offsets and fed back as cuts), in-place
over a donor of another size, recomputation (formulations.remat).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from formulations.joint_residency import Choice, Timeline

BACKENDS = ("cpsat", "cbc", "highs", "gurobi")


class BackendUnavailable(ValueError):
    """A solver backend that is not installed; the message says which and what exists."""


@dataclass(frozen=True)
class Solved:
    status: str  # "optimal" | "feasible" | "infeasible" | "unknown"
    objective: float | None  # objective of the solution found (None without one)
    bound: float  # proven lower bound on the objective
    values: dict  # variable -> 0/1 or int, for the solution found
    seconds: float


class LinearModel:
    """Variables, linear constraints and an objective for CP-SAT or PuLP, with hints."""

    def __init__(self, backend: str, threads: int = 4):
        if backend not in BACKENDS:
            raise BackendUnavailable(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.backend, self.threads = backend, threads
        self.vars: list = []
        self.hints: dict = {}
        if backend == "cpsat":
            from ortools.sat.python import cp_model

            self.cp = cp_model
            self.m = cp_model.CpModel()
        else:
            import pulp

            self.pulp = pulp
            self.m = pulp.LpProblem("joint", pulp.LpMinimize)
            self.solver_cls = {"cbc": pulp.PULP_CBC_CMD, "highs": pulp.HiGHS, "gurobi": pulp.GUROBI}[backend]
            if not self.solver_cls(msg=False).available():
                raise BackendUnavailable(f"backend {backend!r} is not installed here; "
                                         f"available: cpsat, {', '.join(pulp.listSolvers(onlyAvailable=True))}")

    def bool(self, name: str):
        v = self.m.new_bool_var(name) if self.backend == "cpsat" else self.pulp.LpVariable(name, cat="Binary")
        self.vars.append(v)
        return v

    def integer(self, lo: int, hi: int, name: str):
        if self.backend == "cpsat":
            v = self.m.new_int_var(lo, hi, name)
        else:
            v = self.pulp.LpVariable(name, lo, hi, cat="Integer")
        self.vars.append(v)
        return v

    def dot(self, terms: Iterable[tuple[int, object]], constant: int = 0):
        terms = list(terms)
        if self.backend == "cpsat":
            return self.cp.LinearExpr.weighted_sum([v for _, v in terms], [c for c, _ in terms]) + constant
        if all(isinstance(v, self.pulp.LpVariable) for _, v in terms):
            return self.pulp.LpAffineExpression([(v, c) for c, v in terms], constant=constant)
        return self.pulp.lpSum(c * v for c, v in terms) + constant

    def add(self, constraint) -> None:
        if self.backend == "cpsat":
            self.m.add(constraint)
        else:
            self.m += constraint

    def minimize(self, expr) -> None:
        if self.backend == "cpsat":
            self.m.minimize(expr)
        else:
            self.m.setObjective(expr)

    def hint(self, var, value: int) -> None:
        self.hints[var] = int(value)

    def solve(self, time_limit: float) -> Solved:
        t0 = time.perf_counter()
        if self.backend == "cpsat":
            return self._solve_cpsat(time_limit, t0)
        return self._solve_pulp(time_limit, t0)

    def _solve_cpsat(self, time_limit: float, t0: float) -> Solved:
        self.m.clear_hints()
        for v, x in self.hints.items():
            self.m.add_hint(v, x)
        solver = self.cp.CpSolver()
        solver.parameters.max_time_in_seconds = max(0.05, time_limit)
        solver.parameters.num_workers = self.threads
        code = solver.solve(self.m)
        cp = self.cp
        status = {cp.OPTIMAL: "optimal", cp.FEASIBLE: "feasible", cp.INFEASIBLE: "infeasible"}.get(code, "unknown")
        if status in ("optimal", "feasible"):
            values = {v: solver.value(v) for v in self.vars}
            return Solved(status, solver.objective_value, solver.best_objective_bound, values,
                          time.perf_counter() - t0)
        return Solved(status, None, math.inf if status == "infeasible" else 0.0, {}, time.perf_counter() - t0)

    def _solve_pulp(self, time_limit: float, t0: float) -> Solved:
        pulp = self.pulp
        for v, x in self.hints.items():
            v.setInitialValue(x)
        fd, log = tempfile.mkstemp(prefix="joint_cbc_", suffix=".log")
        os.close(fd)
        kwargs = dict(msg=False, timeLimit=max(1.0, time_limit))
        if self.backend == "cbc":
            kwargs.update(warmStart=bool(self.hints), logPath=log, threads=self.threads)
        try:
            self.m.solve(self.solver_cls(**kwargs))
            text = open(log).read() if self.backend == "cbc" else ""
        finally:
            os.unlink(log)
        has_solution = self.m.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
        if self.m.status == pulp.LpStatusInfeasible:
            return Solved("infeasible", None, math.inf, {}, time.perf_counter() - t0)
        logged = _cbc_bound(text)
        if logged is not None:  # CBC logs the objective without its constant term
            logged += self.m.objective.constant if self.m.objective is not None else 0.0
        if not has_solution:
            return Solved("unknown", None, logged if logged is not None else 0.0, {}, time.perf_counter() - t0)
        objective = pulp.value(self.m.objective) or 0.0
        optimal = self.m.sol_status == pulp.LpSolutionOptimal and "time limit" not in text.lower()
        native = self._native_bound()
        bound = objective if optimal else native if native is not None else logged if logged is not None else 0.0
        bound = min(bound, objective)
        values = {v: int(round(v.varValue or 0)) for v in self.vars}
        return Solved("optimal" if optimal else "feasible", objective, bound, values, time.perf_counter() - t0)

    def _native_bound(self) -> float | None:
        sm = getattr(self.m, "solverModel", None)
        try:
            if self.backend == "gurobi":
                return float(sm.ObjBound)
            if self.backend == "highs":
                return float(sm.getInfo().mip_dual_bound)
        except Exception:  # the solver kept no bound: report none rather than guess
            return None
        return None


def _cbc_bound(log: str) -> float | None:
    """CBC's best possible value from its log (PuLP does not expose it), without the constant."""
    for pattern in (r"Lower bound:\s*([-+0-9.eE]+)", r"best possible\s*([-+0-9.eE]+)"):
        found = re.findall(pattern, log)
        if found:
            return float(found[-1])
    return None


# ------------------------------------------------------------------ fixed order
class GapMaster:
    """Keep/evict per gap and in-place pairs for one order, with an aggregate capacity."""

    def __init__(self, tl: Timeline, capacity: int, backend: str, threads: int = 4):
        self.tl, self.capacity = tl, capacity
        m = self.model = LinearModel(backend, threads)
        gaps = tl.gaps
        self.keep = [m.bool(f"keep_{g.tensor}_{g.lo}") for g in gaps]
        self.ip = [m.bool(f"ip_{p.step}_{p.out}_{p.donor}") for p in tl.pairs]
        spill = {}
        for t, idx in tl.gaps_of.items():
            if idx and tl.spill_cost(t):
                spill[t] = m.bool(f"spill_{t}")
                for i in idx:
                    m.add(spill[t] + self.keep[i] >= 1)
        covering: list[list[int]] = [[] for _ in range(tl.steps)]
        for i, g in enumerate(gaps):
            for s in range(g.lo + 1, g.hi):
                covering[s].append(i)
        at_step: list[list[int]] = [[] for _ in range(tl.steps)]
        by_out: dict[tuple[int, int], list[int]] = {}
        by_donor: dict[tuple[int, int], list[int]] = {}
        for p, pair in enumerate(tl.pairs):
            at_step[pair.step].append(p)
            by_out.setdefault((pair.step, pair.out), []).append(p)
            by_donor.setdefault((pair.step, pair.donor), []).append(p)
            after = tl.gap_after.get((pair.donor, pair.step))
            if after is not None:
                m.add(self.ip[p] + self.keep[after] <= 1)
                if pair.donor in spill:
                    m.add(spill[pair.donor] >= self.ip[p])
        for group in (*by_out.values(), *by_donor.values()):
            if len(group) > 1:
                m.add(m.dot((1, self.ip[p]) for p in group) <= 1)
        for s in range(tl.steps):
            forced = sum(tl.size[t] for t in tl.forced[s])
            optional = sum(tl.size[gaps[i].tensor] for i in covering[s])
            if forced + optional <= capacity:
                continue  # this step can never overflow
            terms = [(tl.size[gaps[i].tensor], self.keep[i]) for i in covering[s]]
            terms += [(-tl.size[tl.pairs[p].out], self.ip[p]) for p in at_step[s]]
            m.add(m.dot(terms, forced) <= capacity)
        cost = [(-tl.nbytes[g.tensor], self.keep[i]) for i, g in enumerate(gaps)]
        cost += [(tl.nbytes[t], v) for t, v in spill.items()]
        self.constant = sum(tl.nbytes[g.tensor] for g in gaps)
        m.minimize(m.dot(cost, self.constant))

    def hint(self, choice: Choice) -> None:
        for i, v in enumerate(self.keep):
            self.model.hint(v, i in choice.kept)
        for p, v in enumerate(self.ip):
            self.model.hint(v, p in choice.inplace)

    def cut(self, choice: Choice, window: tuple[int, int]) -> None:
        """No choice that keeps these gaps and makes these in-place decisions inside `window` packs."""
        lits = [(-1, self.keep[i]) for i in window_gaps(self.tl, choice, window)]
        const = len(lits)
        for p, pair in enumerate(self.tl.pairs):
            if window[0] <= pair.step <= window[1]:
                if p in choice.inplace:
                    lits.append((-1, self.ip[p]))
                    const += 1
                else:
                    lits.append((1, self.ip[p]))
        self.model.add(self.model.dot(lits, const) >= 1)

    def choice(self, values: dict) -> Choice:
        return Choice(frozenset(i for i, v in enumerate(self.keep) if values[v]),
                      frozenset(p for p, v in enumerate(self.ip) if values[v]))


def window_gaps(tl: Timeline, choice: Choice, window: tuple[int, int]) -> list[int]:
    """Kept gaps whose keeping shapes the buffers inside the step window [l, r]."""
    lo_w, hi_w = window
    out = []
    for i in choice.kept:
        g = tl.gaps[i]
        inside = max(g.lo + 1, lo_w) <= min(g.hi - 1, hi_w)  # some resident step of the gap is in it
        joins = lo_w <= g.lo and g.hi <= hi_w  # or both ends are, joined into one buffer
        if inside or joins:
            out.append(i)
    return out


# ------------------------------------------------------------------ free order
def ancestry(graph) -> tuple[list[int], list[int]]:
    """Bitsets of every op's ancestors and descendants."""
    n = len(graph.ops)
    anc = [0] * n
    for op in graph.ops:  # ops are listed in a topological order
        for p in graph.predecessors(op.id):
            anc[op.id] |= anc[p] | (1 << p)
    desc = [0] * n
    for op in reversed(graph.ops):
        for s in graph.successors[op.id]:
            desc[op.id] |= desc[s] | (1 << s)
    return anc, desc


def windows(graph, order_len: int) -> tuple[list[int], list[int]]:
    """ASAP/ALAP step of every op: ancestors run before it, descendants after it."""
    anc, desc = ancestry(graph)
    return [a.bit_count() for a in anc], [order_len - 1 - d.bit_count() for d in desc]


class StepMaster:
    """Order, residency and in-place decisions, time-indexed within ASAP/ALAP windows."""

    def __init__(self, graph, target, capacity: int, backend: str, threads: int = 4):
        from planner.target import align_up

        self.graph, self.target, self.capacity = graph, target, capacity
        n = self.n = len(graph.ops)
        m = self.model = LinearModel(backend, threads)
        asap, alap = self.asap, self.alap = windows(graph, n)
        self.x = {(o, s): m.bool(f"x_{o}_{s}") for o in range(n) for s in range(asap[o], alap[o] + 1)}
        ops_at: list[list[int]] = [[] for _ in range(n)]
        for (o, s) in self.x:
            ops_at[s].append(o)
        for o in range(n):
            m.add(m.dot((1, self.x[o, s]) for s in range(asap[o], alap[o] + 1)) == 1)
        for s in range(n):
            m.add(m.dot((1, self.x[o, s]) for o in ops_at[s]) == 1)
        step = [m.dot((s, self.x[o, s]) for s in range(asap[o], alap[o] + 1)) for o in range(n)]
        for o in range(n):
            for p in graph.predecessors(o):
                m.add(step[p] + 1 <= step[o])
        counted = lambda t: graph.is_buffer(t, target.include_weights)
        readers: dict[int, set[int]] = {}
        for op in graph.ops:
            for t in op.inputs:
                if counted(graph.root(t)):
                    readers.setdefault(graph.root(t), set()).add(op.id)
        self.tensors = sorted(set(readers) | {t for op in graph.ops for t in op.outputs if counted(t)})
        self.size = {t: align_up(graph.tensors[t].nbytes, target.alignment) for t in self.tensors}
        self.r, self.load, self.window = {}, {}, {}
        self.pairs: list[tuple[int, int, int]] = []  # (op, out, donor)
        for op in graph.ops:
            for t in op.outputs:
                for i in dict.fromkeys(op.inplace_inputs):
                    if (counted(t) and graph.tensors[i].alias_of is None and counted(i) and i not in op.outputs
                            and self.size[t] == self.size[i] > 0):
                        self.pairs.append((op.id, t, i))
        self.ip = [m.bool(f"ip_{o}_{t}_{i}") for o, t, i in self.pairs]
        self.z = {}
        for p, (o, _, _) in enumerate(self.pairs):
            for s in range(asap[o], alap[o] + 1):
                z = self.z[p, s] = m.bool(f"z_{p}_{s}")
                m.add(z <= self.x[o, s])
                m.add(z <= self.ip[p])
                m.add(z >= self.x[o, s] + self.ip[p] - 1)
        for group in _groups(self.pairs):
            m.add(m.dot((1, self.ip[p]) for p in group) <= 1)
        takeover: dict[tuple[int, int], list] = {}  # (donor, step) -> z vars ending it there
        for p, (o, _, i) in enumerate(self.pairs):
            for s in range(asap[o], alap[o] + 1):
                takeover.setdefault((i, s), []).append(self.z[p, s])
        mem: list[list] = [[] for _ in range(n)]
        cost: list = []
        constant = 0
        for t in self.tensors:
            prod = graph.producer.get(t)
            users = readers.get(t, set())
            lo = asap[prod] if prod is not None else min(asap[o] for o in users)
            hi = max([alap[o] for o in users] + ([alap[prod]] if prod is not None else []))
            self.window[t] = (lo, hi)
            nb = graph.tensors[t].nbytes
            spill = m.bool(f"spill_{t}") if graph.tensors[t].kind == "activation" else None
            if spill is not None:
                cost.append((nb, spill))
            if prod is None:
                constant -= nb  # the first load of an input or weight is compulsory
            prev = None
            for s in range(lo, hi + 1):
                r = self.r[t, s] = m.bool(f"r_{t}_{s}")
                ld = self.load[t, s] = m.bool(f"l_{t}_{s}")
                mem[s].append((self.size[t], r))
                cost.append((nb, ld))
                for o in users | ({prod} if prod is not None else set()):
                    if (o, s) in self.x:
                        m.add(r >= self.x[o, s])
                born_now = self.x.get((prod, s)) if prod is not None else None
                if prod is not None:
                    m.add(r <= m.dot((1, self.x[prod, q]) for q in range(asap[prod], min(s, alap[prod]) + 1)))
                terms = [(1, r)] + ([(-1, prev)] if prev is not None else [])
                terms += [(-1, born_now)] if born_now is not None else []
                terms += [(1, z) for z in takeover.get((t, s - 1), ())]
                m.add(ld >= m.dot(terms))
                if spill is not None:
                    m.add(spill >= ld)
                prev = r
            if prod is None:
                m.add(m.dot((1, self.load[t, s]) for s in range(lo, hi + 1)) >= 1)
        for p, (o, t, _) in enumerate(self.pairs):
            for s in range(asap[o], alap[o] + 1):
                mem[s].append((-self.size[t], self.z[p, s]))
        for s in range(n):
            if sum(c for c, _ in mem[s] if c > 0) > capacity:
                m.add(m.dot(mem[s]) <= capacity)
        self.constant = constant
        m.minimize(m.dot(cost, constant))

    def size_info(self) -> dict[str, int]:
        return {"variables": len(self.model.vars), "x": len(self.x), "r": len(self.r), "z": len(self.z)}

    def order(self, values: dict) -> list[int]:
        at = {s: o for (o, s), v in self.x.items() if values[v]}
        return [at[s] for s in range(self.n)]

    def choice(self, tl: Timeline, values: dict) -> Choice:
        """The gaps of `tl` (built on this solution's order) that the solution keeps, trimmed."""
        kept = []
        for i, g in enumerate(tl.gaps):
            if all(values[self.r[g.tensor, s]] for s in range(g.lo, g.hi + 1)) and not any(
                    values[self.load[g.tensor, s]] for s in range(g.lo + 1, g.hi + 1)):
                kept.append(i)
        index = {(pair.step, pair.out, pair.donor): k for k, pair in enumerate(tl.pairs)}
        taken = [index[(s, t, i)] for (p, s), v in self.z.items() if values[v]
                 for (_, t, i) in [self.pairs[p]] if (s, t, i) in index]
        return Choice(frozenset(kept), frozenset(taken))

    def hint(self, tl: Timeline, choice: Choice) -> None:
        m = self.model
        step_of = {o: s for s, o in enumerate(tl.order)}
        for (o, s), v in self.x.items():
            m.hint(v, step_of[o] == s)
        resident = {(t, s) for t, a, b in tl.pieces(choice) for s in range(a, b + 1)}
        starts = {(t, a) for t, a, _ in tl.pieces(choice)
                  if tl.born[t] != a or tl.kind[t] in ("input", "weight")}
        for (t, s), v in self.r.items():
            m.hint(v, (t, s) in resident)
        for (t, s), v in self.load.items():
            m.hint(v, (t, s) in starts)
        taken = {(tl.order[tl.pairs[p].step], tl.pairs[p].out, tl.pairs[p].donor) for p in choice.inplace}
        for p, key in enumerate(self.pairs):
            m.hint(self.ip[p], key in taken)
            for s in range(self.asap[key[0]], self.alap[key[0]] + 1):
                m.hint(self.z[p, s], key in taken and step_of[key[0]] == s)

    def cut(self, tl: Timeline, choice: Choice, window: tuple[int, int]) -> None:
        """No solution resident on these cells, unsplit at these joins, with these in-place
        merges inside `window` packs (whatever its order)."""
        m, (lo_w, hi_w) = self.model, window
        lits, const = [], 0
        for t, a, b in tl.pieces(choice):
            for s in range(max(a, lo_w), min(b, hi_w) + 1):
                lits.append((-1, self.r[t, s]))
                const += 1
                if s > max(a, lo_w):
                    lits.append((1, self.load[t, s]))
        taken = {(tl.pairs[p].step, tl.order[tl.pairs[p].step], tl.pairs[p].out, tl.pairs[p].donor)
                 for p in choice.inplace}
        for (p, s), z in self.z.items():
            if lo_w <= s <= hi_w:
                if (s, *self.pairs[p]) in taken:
                    lits.append((-1, z))
                    const += 1
                else:
                    lits.append((1, z))
        m.add(m.dot(lits, const) >= 1)


def _groups(pairs: Sequence[tuple[int, int, int]]) -> list[list[int]]:
    by: dict[tuple, list[int]] = {}
    for p, (o, t, i) in enumerate(pairs):
        by.setdefault(("out", o, t), []).append(p)
        by.setdefault(("donor", o, i), []).append(p)
    return [g for g in by.values() if len(g) > 1]

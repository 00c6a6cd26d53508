"""The vectorised exact schedule search (formulations/schedule_vec.py, schedule_units.py, schedule_guide.py):
its step tables against Problem.step on random states of real graphs, its answers against brute force
and the reference DP, each exact rule alone, the relaxation guide, and the solve options that pick it."""

import ctypes
import random

import numpy as np
import pytest

from formulations import schedule, schedule_native
from formulations.schedule_dp import Problem, descend, unit_dag
from formulations.schedule_guide import RelaxedGuides, coreachable, vector_probe
from formulations.schedule_heuristics import neutral_units, normalize
from formulations.schedule_units import UnitTables
from formulations.schedule_vec import Rules, search
from planner import baselines, bounds
from tests.test_schedule import brute_force, exact_reference, random_graph, small_graphs, weighted_sum_graph

NATIVE = schedule_native.library() is not None
needs_kernel = pytest.mark.skipif(not NATIVE, reason="no C compiler builds formulations/schedule_native.c")


@pytest.fixture(params=["numpy", pytest.param("native", marks=needs_kernel)])
def engine(request, monkeypatch):
    """Both implementations of the vector engine: numpy columns and the C kernel (two threads from the
    first layer on, so that the merge of their tables is exercised on small graphs too)."""
    monkeypatch.setattr(schedule_native, "enabled", request.param == "native")
    if request.param == "native":
        split = ctypes.c_int64.in_dll(schedule_native.library(), "split_from")
        old, split.value = split.value, 1
        yield request.param
        split.value = old
    else:
        yield request.param


@pytest.fixture(scope="module")
def randwire():
    """A lowered RandWire-BA network, small enough for exact search of its whole graph."""
    from frontends import load_model

    return load_model("zoo:randwire_ba:n=10,channels=8,res=32,seed=1").graph


def unit_sets(graph):
    prob = Problem(graph)
    ops = [o for o in range(prob.n) if not prob.lazy[o]]
    return prob, [[(o,) for o in ops], neutral_units(prob, ops)]


def random_unit_order(prob: Problem, units, rng: random.Random) -> list[int]:
    """A uniformly chosen ready unit at every step."""
    upred, _, _ = unit_dag(prob, units)
    done, order = 0, []
    while len(order) < len(units):
        ready = [u for u in range(len(units)) if not (done >> u) & 1 and not upred[u] & ~done]
        u = rng.choice(ready)
        order.append(u)
        done |= 1 << u
    return order


def columns(tab: UnitTables, sets: list[int]) -> np.ndarray:
    return np.array([[(s >> (64 * w)) & (2**64 - 1) for s in sets] for w in range(tab.width)], np.uint64)


# ------------------------------------------------------------- step tables
def test_step_tables_are_problem_steps_on_random_states(randwire):
    """Along random orders of real and random graphs, the table deltas of every unit at every prefix
    (computed for all prefixes at once, as the engine does) give exactly planner.bounds.live_profile."""
    rng = random.Random(7)
    graphs = [randwire, *(weighted_sum_graph(s, 7) for s in range(6)), *(random_graph(s, 14) for s in range(6))]
    checked = 0
    for graph in graphs:
        prob, unit_lists = unit_sets(graph)
        for units in unit_lists:
            tab = UnitTables(prob, units, 0)
            for _ in range(4):
                order = random_unit_order(prob, units, rng)
                prefixes = [sum(1 << v for v in order[:k]) for k in range(len(order))]
                states = columns(tab, prefixes)
                ops = prob.with_pending([op for u in order for op in units[u]])
                profile = bounds.live_profile(graph, ops)
                assert prob.profile(ops) == profile
                mem, at, done = prob.mem(0), 0, 0
                for k, u in enumerate(order):
                    dpeak, dmem = tab.deltas(u, states, np.array([k]))
                    ran = [o for x in units[u] for o in (*prob.pending[x], x) if not (done >> o) & 1]
                    assert ops[at:at + len(ran)] == ran
                    assert int(dpeak[0]) + mem == max(profile[at:at + len(ran)]), (graph.name, k)
                    mem += int(dmem[0])
                    at += len(ran)
                    done |= sum(1 << o for o in ran)
                    checked += 1
                assert at == len(ops)
    assert checked > 2000


# ------------------------------------------------------------- exactness
@pytest.mark.parametrize("weights, alignment", [(False, 1), (True, 1), (False, 16)])
def test_vector_search_equals_brute_force(weights, alignment, engine):
    for g in small_graphs(40):
        best = brute_force(g, weights, alignment)
        prob = Problem(g, weights, alignment)
        for units in ([(o,) for o in range(prob.n) if not prob.lazy[o]],
                      neutral_units(prob, [o for o in range(prob.n) if not prob.lazy[o]])):
            free = search(prob, units)
            assert free.status == "optimal" and free.peak == best == max(prob.profile(free.order)), g.name
            bounds.check_order(g, free.order)
            assert search(prob, units, budget=best, floor=best - 1).status == "no_better", g.name
            at = search(prob, units, budget=best + 1, floor=best)
            assert at.status == "optimal" and max(prob.profile(at.order)) == best, g.name


RULES = [Rules(False, False, False), Rules(True, False, False), Rules(True, True, False), Rules(False, False, True),
         Rules()]


@pytest.mark.parametrize("rules", RULES, ids=lambda r: f"c{int(r.commit)}s{int(r.set_commit)}d{int(r.defer)}")
def test_each_rule_keeps_the_optimum(rules, engine):
    """Every rule alone and all together, on graphs too big to enumerate (the reference DP has no
    reductions), with shared lazy sigmoids, in-place muls and adds (weighted sums) among them."""
    for seed in range(40):
        g = weighted_sum_graph(seed, 6 + seed % 3) if seed % 2 else \
            random_graph(seed, random.Random(seed).randint(8, 16), [0, 8, 8, 16, 16, 32])
        best = exact_reference(g)
        prob, unit_lists = unit_sets(g)
        for units in unit_lists:
            assert search(prob, units, rules=rules).peak == best, g.name
            assert search(prob, units, budget=best, floor=best - 1, rules=rules).status == "no_better", g.name
            found = search(prob, units, budget=best + 1, floor=best, rules=rules)
            assert found.status == "optimal" and max(prob.profile(found.order)) == best, g.name


def test_defer_keeps_runs_of_independent_units(engine):
    """Two units that free nothing and share no tensor, before one unit near both: only one can be
    followed by it, so defer lets such units follow each other in index order. Weighted sum 376 has
    an optimum that requiring a near unit alone loses (found by a wider check than the one above)."""
    for seed in range(360, 400):
        g = weighted_sum_graph(seed, 7 + seed % 4)
        prob, unit_lists = unit_sets(g)
        for units in unit_lists:
            best = search(prob, units, rules=Rules(False, False, False)).peak
            for rules in (Rules(False, False, True), Rules()):
                found = search(prob, units, budget=best + 1, floor=best, rules=rules)
                assert found.status == "optimal" and max(prob.profile(found.order)) == best, (g.name, rules)
                assert search(prob, units, budget=best, floor=best - 1, rules=rules).status == "no_better"


def test_rules_prune_states(randwire):
    """On the stages of a lowered RandWire the commit rules and defer store fewer states than the plain
    search, for the same answer (the plain search: exact against brute force above)."""
    prob = Problem(randwire)
    plain = fewer = 0
    for seg in schedule.split_segments(prob):
        if len(seg.ops) < 20:
            continue
        units = neutral_units(prob, seg.units)
        best = search(prob, units, seg.start, rules=Rules(False, False, False)).peak
        a = search(prob, units, seg.start, budget=best, floor=best - 1, rules=Rules(False, False, False))
        b = search(prob, units, seg.start, budget=best, floor=best - 1)
        assert a.status == b.status == "no_better"
        plain, fewer = plain + a.states, fewer + b.states
    assert fewer * 3 < plain * 2  # measured: 27,311 -> 14,734 on its three stages


def test_zobrist_collision_is_caught_not_merged(monkeypatch):
    monkeypatch.setattr(schedule_native, "enabled", False)  # the kernel compares sets on equal keys instead
    g = weighted_sum_graph(3, 6)
    prob = Problem(g)
    units = [(o,) for o in range(prob.n) if not prob.lazy[o]]
    tab = UnitTables(prob, units, 0)
    tab.zobrist[2] = tab.zobrist[1]  # {.., 1} and {.., 2} now share a key
    with pytest.raises(AssertionError, match="Zobrist key collision"):
        search(prob, units, tables=tab, rules=Rules(False, False, False))


# ------------------------------------------------------------- guide
def test_relaxation_guide_is_sound_and_prunes(engine):
    pruned = 0
    for seed in range(30):
        g = weighted_sum_graph(seed, 6 + seed % 3)
        prob = Problem(g)
        relaxed = Problem(g, ignore_below=13)  # the 8-12 byte sigmoid(w) buffers count 0
        units = neutral_units(prob, [o for o in range(prob.n) if not prob.lazy[o]])
        best = search(prob, units).peak
        guides = RelaxedGuides(prob, relaxed, units, 0)
        assert guides.fits
        for level in (best, best + 1):
            guide = guides.at(level)
            plain = search(prob, units, budget=level, floor=level - 1)
            guided = search(prob, units, budget=level, floor=level - 1, guide=guide)
            assert guided.status == plain.status == ("no_better" if level == best else "optimal"), g.name
            pruned += guided.states < plain.states
    assert pruned >= 10


def test_tight_step_bound_is_sound_and_proves_more(engine):
    """The small buffers certainly resident at tight relaxed steps (SmallBuffers): on weighted sums and
    random graphs with 4-32 byte buffers the relaxation counts as 0, the guide at the real optimum + 1
    still leads to an order of that peak and the probe at the optimum finds none (the plain search's
    optimum: exact against brute force above); the guide alone refutes the optimum more often than
    without the bound (measured: 26 of 240 searches against 18)."""
    refuted, walked = {True: 0, False: 0}, 0
    for seed in range(30):
        g = weighted_sum_graph(seed, 6 + seed % 4) if seed % 3 else \
            random_graph(seed, random.Random(seed).randint(8, 14), [0, 4, 8, 8, 16, 16, 32])
        for weights in (False, True):
            prob = Problem(g, include_weights=weights)
            ops = [o for o in range(prob.n) if not prob.lazy[o]]
            for below in (13, 17):
                relaxed = Problem(g, include_weights=weights, ignore_below=below)
                for units in ([(o,) for o in ops], neutral_units(prob, ops)):
                    best = search(prob, units, rules=Rules(False, False, False)).peak
                    for small in (True, False):
                        probe = vector_probe(prob, units, 0, relaxed=relaxed, state_cap=10**6, walk_share=0)
                        assert probe.guides.fits
                        if not small:
                            probe.guides.tables.small = None
                        found = probe(best + 1, best, 1e18)
                        assert found.status == "optimal" and found.peak == best, g.name
                        assert max(prob.profile(found.order)) == best
                        assert probe(best, best - 1, 1e18).status == "no_better", g.name
                        refuted[small] += probe.refutes(best, 1e18)
                        assert probe.bound() <= best, g.name  # the guide's own bound
                        probe.walk_share = 1
                        got = probe(best + 1, best, 1e18)  # the walk first: an order under the budget
                        assert got.status in ("found", "optimal") and max(prob.profile(got.order)) == best
                        walked += got.status == "found"
    assert refuted[True] > refuted[False] > 0
    assert walked >= 300  # measured: 382 of 480, 408 without the walk's visit cap (the layered search answers the rest)


def test_descend_with_vector_probes_proves_the_optimum(randwire):
    prob = Problem(randwire)
    segs = schedule.split_segments(prob)
    relaxed = schedule.relaxation(randwire, prob, schedule.Options(relax_below=64))  # the sigmoid(w) buffers
    assert relaxed is not None
    for seg in segs:
        if len(seg.ops) < 2:
            continue
        units = neutral_units(prob, seg.units)
        start_order = [o for o in normalize(prob, baselines.program_order(randwire)) if o in set(seg.ops)]
        peak = max(prob.profile(start_order, seg.start))
        probe = vector_probe(prob, units, seg.start, relaxed=relaxed, state_cap=10**7)
        order, got, bound, status = descend(prob, units, seg.start, start_order, peak, bound=0, state_cap=10**7,
                                            deadline=1e18, probe=probe)
        scalar = descend(prob, units, seg.start, start_order, peak, bound=0, state_cap=10**7, deadline=1e18)
        assert (status, got, bound) == ("optimal", scalar[1], scalar[1]) == ("optimal", scalar[2], scalar[2])
        assert max(prob.profile(order, seg.start)) == got


# ------------------------------------------------------------- solve options
def test_engines_agree_on_a_lowered_randwire(randwire):
    scalar = schedule.solve(randwire, method="dp", engine="scalar", time_limit=60)
    vector = schedule.solve(randwire, method="dp", engine="vector", time_limit=60)
    auto = schedule.solve(randwire, method="auto", engine="vector", time_limit=60)
    assert scalar.status == vector.status == auto.status == "optimal"
    assert scalar.peak == vector.peak == auto.peak == bounds.max_live(randwire, vector.order)
    bounds.check_order(randwire, vector.order)


def test_unknown_engine_is_a_clear_error():
    with pytest.raises(schedule.ScheduleOptionError, match="unknown schedule engine 'gpu'"):
        schedule.solve(random_graph(1, 6), engine="gpu")


@needs_kernel
def test_kernel_and_numpy_store_the_same_states(monkeypatch):
    """The C kernel is the numpy engine state for state: the same answers and state counts, the guide's
    backward search the same key sets, Bloom table and highs; a key collision there costs a comparison,
    not a wrong merge."""
    for seed in range(12):
        g = weighted_sum_graph(seed, 7)
        prob, relaxed = Problem(g), Problem(g, ignore_below=13)
        units = neutral_units(prob, [o for o in range(prob.n) if not prob.lazy[o]])
        got = {}
        for native in (True, False):
            monkeypatch.setattr(schedule_native, "enabled", native)
            tab = UnitTables(prob, units, 0)
            best = search(prob, units, tables=tab)
            guides = RelaxedGuides(prob, relaxed, units, 0)
            keys, highs, stored = coreachable(guides.tables, best.peak + 1)
            guide = guides.at(best.peak + 1)
            probe = search(prob, units, budget=best.peak + 1, floor=best.peak, tables=tab, guide=guide)
            absent = np.array([2], np.uint64)  # a key no stored set has (but by a 2^-63 chance)
            got[native] = (best.peak, best.states, probe.status, probe.states,
                           sorted(zip(keys.tolist(), highs.tolist(), guides.highs_of(keys).tolist())), stored,
                           guide.table.tobytes(), guides.highs_of(absent).tolist())
            assert max(prob.profile(best.order)) == best.peak
        assert got[True] == got[False], g.name
    tab = UnitTables(prob, units, 0)
    tab.zobrist[2] = tab.zobrist[1]
    monkeypatch.setattr(schedule_native, "enabled", True)
    assert search(prob, units, tables=tab).peak == got[True][0]

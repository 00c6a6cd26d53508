"""IR, checker, bounds and baselines on graphs small enough to work out by hand."""

import pytest

from planner import baselines, bounds
from planner.check import PlanError, check
from planner.graph import GraphError, LifetimeGraph, build
from planner.plan import Plan, compute, free, load, store
from planner.target import Target, align_up, parse_size
from tests.graphs import chain, diamond, residual

T1 = Target("t", None, alignment=1, offchip_bandwidth=100.0, compute_rate=1000.0)


def make(graph, instrs, target=T1):
    return Plan(graph.name, graph.fingerprint, target, tuple(instrs))


# ------------------------------------------------------------------ sizes
def test_parse_size_and_alignment():
    assert parse_size("512KiB") == 512 * 1024
    assert parse_size("1.5MiB") == 1572864
    assert parse_size("8GiB") == 8 * 1024**3
    assert parse_size("4096") == 4096
    assert parse_size(7) == 7
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("12 parsecs")
    assert align_up(100, 64) == 128 and align_up(128, 64) == 128 and align_up(0, 64) == 0


# ------------------------------------------------------------------ graph
def test_graph_rules_name_the_offender():
    with pytest.raises(GraphError, match="'g' reads 'b' before any op writes it"):
        build("bad", [("x", 1, "input"), ("a", 1, "activation"), ("b", 1, "activation")],
              [("g", ["b"], ["a"]), ("f", ["x"], ["b"])])
    with pytest.raises(GraphError, match="'a' is never written"):
        build("bad", [("x", 1, "input"), ("a", 1, "activation"), ("y", 1, "output")], [("f", ["x"], ["y"])])


def test_fingerprint_is_stable_and_structural():
    g = chain()
    assert g.fingerprint == chain().fingerprint
    assert LifetimeGraph.from_dict(g.to_dict()).fingerprint == g.fingerprint
    assert diamond().fingerprint != g.fingerprint
    nx = g.to_networkx()
    assert sorted(nx.edges) == [(0, 1), (1, 2)]


# ------------------------------------------------------------------ bounds
def test_bounds_by_hand():
    g = chain()
    assert bounds.live_profile(g, [0, 1, 2]) == [300, 500, 400]
    assert bounds.m_r(g) == 500
    d = diamond()
    assert bounds.live_profile(d, [0, 1, 2, 3]) == [200, 300, 600, 600]
    assert bounds.m_r(d) == 600
    r = residual()
    # relu and add write over their dying in-place input: the profile never holds both
    assert bounds.live_profile(r, [0, 1, 2, 3]) == [200, 200, 300, 200]
    assert bounds.m_r(r) == 200
    with pytest.raises(ValueError, match="before its producer"):
        bounds.check_order(d, [0, 3, 1, 2])


# ------------------------------------------------------------------ checker
def chain_plan():
    return [load(0, 0), compute(0, 300), free(0), compute(1, 0), free(1), compute(2, 300), store(3),
            free(2), free(3)]


def test_checker_metrics_by_hand():
    g = chain()
    p = check(g, make(g, chain_plan()))
    m = p.metrics
    assert (m["peak_bytes"], m["arena_bytes"]) == (500, 500)
    assert (m["load_bytes"], m["store_bytes"]) == (100, 100)
    assert (m["compulsory_bytes"], m["noncompulsory_bytes"]) == (200, 0)
    assert m["compute_flops"] == 600.0 and m["recompute_flops"] == 0.0
    assert m["est_seconds"] == pytest.approx(600 / 1000 + 200 / 100)
    assert [(b.tensor, b.offset, b.start, b.end) for b in p.buffers] == [
        (0, 0, 0, 2), (1, 300, 1, 4), (2, 0, 3, 7), (3, 300, 5, 8)]


def test_checker_in_place_only_when_allowed():
    r = residual()
    ok = [load(0, 0), compute(0, 100), compute(1, 100), compute(2, 200), free(2), compute(3, 200), store(4),
          free(4), free(0)]
    p = check(r, make(r, ok))
    assert p.metrics["peak_bytes"] == 300 and p.metrics["arena_bytes"] == 300
    # conv2 is not element-wise: writing c over b is an overlap, named with its step
    bad = [load(0, 0), compute(0, 100), compute(1, 100), compute(2, 100)]
    with pytest.raises(PlanError, match="step 3: .*'c'.*overlaps.*'b'"):
        check(r, make(r, bad))


def test_checker_rejects_and_names_the_step():
    g = chain()
    good = chain_plan()
    moved = list(good)
    moved[3] = compute(1, 250)  # b onto a, which is still live
    with pytest.raises(PlanError) as e:
        check(g, make(g, moved))
    assert e.value.step == 3 and "overlaps" in str(e.value)
    dropped = good[:1] + good[2:]  # compute f removed
    with pytest.raises(PlanError, match="step 1: free of 'x'|step 2: op 'g' reads 'a' before it exists"):
        check(g, make(g, dropped))
    with pytest.raises(PlanError, match="step 0: load of 'a', which has no off-chip copy"):
        check(g, make(g, [load(1, 0)] + good))
    with pytest.raises(PlanError, match="output 'y' is never stored"):
        check(g, make(g, [i for i in good if i.kind != "store"]))
    with pytest.raises(PlanError, match="exceeds the capacity 400"):
        check(g, make(g, good, T1.with_(capacity=400)))
    with pytest.raises(PlanError, match="not a non-negative multiple of 64"):
        check(g, make(g, good, T1.with_(alignment=64)))
    with pytest.raises(PlanError, match="plan is for graph 'chain'"):
        check(diamond(), make(g, good))


def test_plan_file_round_trip(tmp_path):
    g = chain()
    p = check(g, make(g, chain_plan()))
    path = tmp_path / "p.json"
    p.save(path)
    q = Plan.load(path)
    assert q == p
    assert p.to_tflm_offsets() == [0, 300, 0, 300]
    assert p.to_minimalloc_csv().splitlines()[1] == "b0_t0,0,2,100,0"


# ------------------------------------------------------------------ baselines
@pytest.mark.parametrize("make_graph", [chain, diamond, residual])
@pytest.mark.parametrize("pipeline", sorted(baselines.PIPELINES))
def test_every_pipeline_gives_checked_plans(make_graph, pipeline):
    g = make_graph()
    o, p, a = baselines.PIPELINES[pipeline]
    mr = bounds.m_r(g)
    ml = bounds.max_live(g)
    for cap in (mr, (mr + ml) // 2, ml, None):
        plan = baselines.pipeline(g, T1.with_(capacity=cap), o, p, a)
        check(g, plan)
        assert cap is None or plan.metrics["arena_bytes"] <= cap


def test_belady_spills_what_is_needed_last():
    r = residual()
    plan = baselines.pipeline(r, T1.with_(capacity=200), "program", "belady", "greedy_size")
    # x must leave during conv2 and come back for the add: one reload of 100 bytes
    assert plan.metrics["noncompulsory_bytes"] == 100
    assert plan.metrics["load_bytes"] == 200 and plan.metrics["peak_bytes"] == 200


def test_capacity_below_m_r_is_infeasible():
    with pytest.raises(baselines.InfeasibleError, match="below M_R = 500"):
        baselines.pipeline(chain(), T1.with_(capacity=499))


def test_orders_are_topological():
    for g in (chain(), diamond(), residual()):
        for name in baselines.ORDERS:
            bounds.check_order(g, baselines.order_by_name(g, name, T1))

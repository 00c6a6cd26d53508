"""Joint schedule + replacement + offsets on graphs small enough to enumerate.

The brute force here is independent of the solvers: every topological order x every
keep/evict choice per gap x every in-place choice, packed by exhaustive lowest-fit over buffer
permutations (complete for placement: any packing pushed down is one of those), emitted and
judged by planner.check. The solvers must reach its optimum, and every plan must pass the
checker with the traffic the solver claims.
"""

import itertools

import pytest

from formulations import joint
from formulations.joint_models import BackendUnavailable
from formulations.joint_residency import Choice, Timeline
from planner import bounds
from planner.check import PlanError, check
from planner.graph import build
from planner.plan import Plan
from planner.target import Target
from tests.graphs import diamond, residual


def branches():
    # two branches that both read x and a long-lived skip tensor s; order decides what is live together
    return build("branches", [("x", 2, "input"), ("s", 3, "activation"), ("p", 4, "activation"),
                              ("q", 2, "activation"), ("r", 4, "activation"), ("u", 2, "activation"),
                              ("y", 1, "output")],
                 [("mk_s", ["x"], ["s"]), ("p1", ["x"], ["p"]), ("p2", ["p"], ["q"]), ("r1", ["x"], ["r"]),
                  ("r2", ["r"], ["u"]), ("cat", ["q", "u", "s"], ["y"])])


def fragmentation():
    # Every step holds exactly 5 units, yet these lifetimes cannot be packed into 5 (found by
    # search with formulations.offsets): the zero-traffic residency plan does not place.
    return build("frag", [("t0", 3, "output"), ("t1", 2, "activation"), ("t2", 1, "activation"),
                          ("t3", 2, "activation"), ("t4", 2, "output"), ("t5", 1, "output"),
                          ("t6", 1, "activation"), ("t7", 2, "activation"), ("t8", 3, "output")],
                 [("o0", [], ["t0", "t1"]), ("o1", ["t1"], ["t2", "t3"]), ("o2", [], ["t4"]),
                  ("o3", ["t2"], ["t5", "t6"]), ("o4", ["t3", "t6"], ["t7"]), ("o5", ["t7"], ["t8"])])


# ------------------------------------------------------------------ brute force
def topo_orders(g):
    preds = [set(g.predecessors(o.id)) for o in g.ops]
    for perm in itertools.permutations(range(len(g.ops))):
        pos = {o: k for k, o in enumerate(perm)}
        if all(pos[p] < pos[o] for o in perm for p in preds[o]):
            yield list(perm)


def lowest_fit(bufs, cap):
    """Exhaustive placement: some buffer order placed lowest-first reaches every packing
    (depth-first over orders; a buffer that does not fit ends that branch)."""
    busy = [k for k, b in enumerate(bufs) if b[2] > 0]
    offs: dict[int, int] = {}

    def lowest(k):
        a, b, w = bufs[k]
        off = 0
        for lo, hi in sorted((offs[j], offs[j] + bufs[j][2]) for j in offs
                             if not (bufs[j][1] < a or b < bufs[j][0])):
            if off + w <= lo:
                break
            off = max(off, hi)
        return off if off + w <= cap else None

    def place(left):
        if not left:
            return True
        for k in left:
            off = lowest(k)
            if off is not None:
                offs[k] = off
                if place([j for j in left if j != k]):
                    return True
                del offs[k]
        return False

    return [offs.get(k, 0) for k in range(len(bufs))] if place(busy) else None


_CACHE: dict = {}


def _brute(g, target, orders):
    candidates = []
    for order in orders or topo_orders(g):
        tl = Timeline(g, target, order)
        for kept in itertools.product((0, 1), repeat=len(tl.gaps)):
            for taken in itertools.product((0, 1), repeat=len(tl.pairs)):
                choice = Choice(frozenset(i for i, k in enumerate(kept) if k),
                                frozenset(p for p, k in enumerate(taken) if k))
                candidates.append((tl.traffic(choice), tl, choice))
    candidates.sort(key=lambda c: c[0])
    for cost, tl, choice in candidates:  # cheapest first: the first one that places and checks wins
        try:
            bufs, _, _ = tl.buffers(choice)
        except ValueError:  # an in-place pair whose donor lives on
            continue
        steps = range(min((b[0] for b in bufs), default=0), max((b[1] for b in bufs), default=0) + 1)
        if any(sum(w for a, b, w in bufs if a <= s <= b) > target.capacity for s in steps):
            continue  # more bytes live at some step than fit: no placement (cheap necessary test)
        offs = lowest_fit(bufs, target.capacity)
        if offs is None:
            continue
        try:
            plan = check(g, Plan(g.name, g.fingerprint, target, tl.instructions(choice, offs)))
        except PlanError:
            continue
        assert plan.metrics["noncompulsory_bytes"] == cost
        return cost
    return None


def brute_force(g, target, orders=None):
    """Least checked non-compulsory traffic over every plan of the search space, or None."""
    key = (g.fingerprint, target.capacity, target.alignment, None if orders is None else tuple(map(tuple, orders)))
    if key not in _CACHE:
        _CACHE[key] = _brute(g, target, orders)
    return _CACHE[key]


def assert_checked(g, result):
    assert result.plan is not None
    plan = check(g, result.plan)
    assert plan.metrics["noncompulsory_bytes"] == result.objective
    assert plan.solver.objective == result.objective and plan.solver.status == result.status
    return plan


CASES = [(diamond, [600, 700]), (residual, [200, 300]), (branches, [8, 9, 10]), (fragmentation, [5, 6])]


# ------------------------------------------------------------------ optimality
@pytest.mark.parametrize("make,capacities", CASES, ids=[c[0].__name__ for c in CASES])
@pytest.mark.parametrize("backend", ["cpsat", "cbc"])
def test_ours_reaches_the_brute_force_optimum(make, capacities, backend):
    g = make()
    for cap in capacities:
        target = Target("t", cap, alignment=1)
        expected = brute_force(g, target)
        for warm in (True, False):
            result = joint.solve(g, target, time_limit=30, backend=backend, warm_start=warm)
            assert result.status == "optimal", result.log
            assert result.objective == expected and result.bound == expected
            assert result.gap == 0.0
            assert_checked(g, result)


@pytest.mark.parametrize("make,capacities", CASES, ids=[c[0].__name__ for c in CASES])
def test_fixed_order_reaches_the_brute_force_optimum_of_that_order(make, capacities):
    g = make()
    order = list(range(len(g.ops)))
    for cap in capacities:
        target = Target("t", cap, alignment=1)
        expected = brute_force(g, target, [order])
        result = joint.solve(g, target, time_limit=30, schedule=order)
        assert (result.status, result.objective) == ("optimal", expected)
        assert result.fixed_order
        plan = assert_checked(g, result)
        assert [i.ref for i in plan.instructions if i.kind == "compute"] == order


@pytest.mark.parametrize("model", ["cosma", "cosma_fs"])
@pytest.mark.parametrize("backend", ["cpsat", "cbc"])
def test_cosma_model_agrees_with_the_brute_force(model, backend):
    for make, capacities in CASES[:3]:
        g = make()
        for cap in capacities[:2]:
            target = Target("t", cap, alignment=1)
            orders = [list(range(len(g.ops)))] if model == "cosma_fs" else None
            expected = brute_force(g, target, orders)
            # CBC on the big-M model is slow: a warm start and more time keep the proof within reach
            result = joint.solve(g, target, time_limit=30 if backend == "cpsat" else 90, backend=backend,
                                 model=model, warm_start=backend == "cbc")
            assert (result.status, result.objective) == ("optimal", expected), (g.name, cap, result.log)
            assert_checked(g, result)


def test_reordering_buys_traffic_that_no_residency_plan_of_the_program_order_reaches():
    g = branches()
    order = list(range(len(g.ops)))
    for cap, free, fixed in ((8, 4, 6), (9, 2, 6), (10, 0, 6)):  # the brute force's values
        target = Target("t", cap, alignment=1)
        assert (brute_force(g, target), brute_force(g, target, [order])) == (free, fixed)
        assert joint.solve(g, target, time_limit=30).objective == free
        assert joint.solve(g, target, time_limit=30, schedule=order).objective == fixed


def test_in_place_takeover_is_what_makes_m_r_feasible():
    g = residual()
    target = Target("t", bounds.m_r(g), alignment=1)  # 200: add's working set only with c taken over
    result = joint.solve(g, target, time_limit=30)
    plan = assert_checked(g, result)
    assert result.objective == 100  # x (100) must leave while conv2 runs: one reload
    add = next(i for i in plan.instructions if i.kind == "compute" and i.ref == 3)
    c_buf = next(b for b in plan.buffers if b.tensor == 3)
    assert add.offsets == (c_buf.offset,) and c_buf.end == plan.instructions.index(add)


def test_fragmentation_needs_the_cut_loop():
    g = fragmentation()
    target = Target("t", 5, alignment=1)
    assert bounds.m_r(g) == 5 and bounds.max_live(g) == 5  # the aggregate capacity admits zero traffic
    order = list(range(len(g.ops)))
    result = joint.solve(g, target, time_limit=30, schedule=order, warm_start=False)
    assert result.cuts >= 1 and result.iterations >= 2
    assert (result.status, result.objective) == ("optimal", 2) == ("optimal", brute_force(g, target, [order]))
    assert_checked(g, result)
    assert "packing failed (infeasible)" in "\n".join(result.log)


def test_time_limited_solve_returns_a_checked_plan_with_a_gap():
    # a chain of 40 convs with long skips: too large to prove in a fraction of a second
    tensors = [("x", 64, "input")] + [(f"a{k}", 64 * (1 + k % 3), "activation") for k in range(40)]
    tensors += [("y", 64, "output")]
    ops = []
    for k in range(40):
        ins = [f"a{k - 1}" if k else "x"] + ([f"a{k - 7}"] if k >= 7 and k % 2 else [])
        ops.append((f"op{k}", ins, [f"a{k}"]))
    ops.append(("head", ["a39", "a20"], ["y"]))
    g = build("long", tensors, ops)
    target = Target("t", bounds.m_r(g, alignment=64) + 64, alignment=64)
    result = joint.solve(g, target, time_limit=0.5)
    assert result.plan is not None
    assert_checked(g, result)
    assert result.status in ("optimal", "feasible")
    assert result.gap is not None and 0.0 <= result.gap <= 1.0
    assert result.bound <= result.objective


def test_plan_entry_point_and_errors():
    g = diamond()
    plan = joint.plan(g, Target("t", 600, alignment=1), time_limit=10)
    assert plan.solver.formulation == "joint:ours" and plan.solver.gap == 0.0
    assert check(g, plan).metrics["noncompulsory_bytes"] == 0
    below = joint.solve(g, Target("t", 599, alignment=1), time_limit=5)
    assert below.status == "infeasible" and below.plan is None
    with pytest.raises(ValueError, match="below|no plan"):
        joint.plan(g, Target("t", 10, alignment=1), time_limit=5)
    with pytest.raises(joint.JointInputError, match="capacity"):
        joint.solve(g, Target("t", None), time_limit=5)
    with pytest.raises(joint.JointInputError, match="unknown joint model"):
        joint.solve(g, Target("t", 600), model="magic")


@pytest.mark.parametrize("backend", ["highs", "gurobi"])
def test_missing_backends_are_refused_clearly(backend):
    import pulp

    solver = {"highs": pulp.HiGHS, "gurobi": pulp.GUROBI}[backend]
    if solver(msg=False).available():
        result = joint.solve(diamond(), Target("t", 600, alignment=1), time_limit=10, backend=backend)
        assert (result.status, result.objective) == ("optimal", 0)
    else:
        with pytest.raises(BackendUnavailable, match="not installed"):
            joint.solve(diamond(), Target("t", 700, alignment=1), time_limit=10, backend=backend,
                        warm_start=False)


def test_the_driver_runs_joint_by_name_and_picks_it_when_capacity_is_short():
    from planner import compile as driver

    g = residual()
    plan = driver.compile(g, Target("t", 200, alignment=1), planner="joint", time_limit=10)
    assert plan.solver.formulation == "joint:ours"
    assert plan.metrics["noncompulsory_bytes"] == 100
    assert driver._auto(g, Target("t", 200, alignment=1)) == "joint"  # below max-live (300)


@pytest.mark.parametrize("model", ["ours", "cosma", "cosma_fs"])
def test_aligned_offsets(model):
    g = residual()  # 100-byte tensors become 128-byte buffers at 64-byte alignment
    assert bounds.m_r(g, alignment=64) == 256 and bounds.max_live(g, alignment=64) == 384
    target = Target("t", 300, alignment=64)  # slack that an unaligned offset could use
    result = joint.solve(g, target, time_limit=30, model=model, warm_start=False)
    plan = assert_checked(g, result)
    assert (result.status, result.objective) == ("optimal", 100)
    assert all(b.offset % 64 == 0 for b in plan.buffers)


def random_graph(rng, n_ops):
    """A small random DAG: each op reads one or two earlier tensors, some element-wise in place."""
    sizes = {"x": rng.choice([1, 2, 3])}
    tensors, ops = [("x", sizes["x"], "input")], []
    for k in range(n_ops):
        ins = rng.sample(list(sizes), min(len(sizes), rng.choice([1, 1, 2])))
        out, size = f"t{k}", rng.choice([1, 2, 3, 4])
        inplace = [i for i in ins if i != "x" and sizes[i] == size and rng.random() < 0.5][:1]
        sizes[out] = size
        tensors.append((out, size, "activation"))
        ops.append((f"o{k}", ins, [out], 1.0, inplace))
    read = {i for _, ins, _, _, _ in ops for i in ins}
    tensors = [(n, s, "output" if k == "activation" and n not in read else k) for n, s, k in tensors]
    return build("random", tensors, ops)


def test_random_small_graphs_match_the_brute_force():
    import random

    rng = random.Random(11)
    checked = 0
    while checked < 20:
        g = random_graph(rng, rng.choice([4, 5, 6]))
        lo, hi = bounds.m_r(g), bounds.max_live(g)
        if hi <= lo:
            continue
        target = Target("t", rng.randint(lo, hi - 1), alignment=1)  # below max-live: some traffic or care
        order = list(range(len(g.ops))) if checked % 3 == 0 else None
        model = ("cosma_fs" if order else "cosma") if checked % 4 == 1 else "ours"
        result = joint.solve(g, target, time_limit=60, schedule=order, model=model, warm_start=checked % 2 == 0,
                             backend="cbc" if checked % 5 == 2 else "cpsat")
        assert (result.status, result.objective) == ("optimal", brute_force(g, target, order and [order])), \
            (checked, model, g.to_dict())
        assert_checked(g, result)
        checked += 1

"""Every baseline pipeline on real lowered models (ONNX and fx) at COSMA-style capacities."""

import pytest

from frontends import load_model
from planner import baselines, bounds
from planner.check import check
from planner.target import Target

MODELS = ["zoo:resnet50:res=32", "zoo:mobilenet_v2:res=32"]


@pytest.fixture(scope="module", params=[(m, via) for m in MODELS for via in ("fx", "onnx")],
                ids=lambda p: f"{p[0][4:].split(':')[0]}-{p[1]}")
def graph(request):
    model, via = request.param
    return load_model(model, via=via).graph


def test_every_pipeline_at_m_r_mid_and_max_live(graph):
    a = 64
    mr, ml = bounds.m_r(graph, False, a), bounds.max_live(graph, None, False, a)
    assert mr <= ml
    for cap in (mr, (mr + ml) // 2 // a * a, ml):
        target = Target("t", cap, alignment=a)
        results = baselines.run_all(graph, target)
        for name, plan in results.items():
            assert not isinstance(plan, Exception), f"{name} at {cap}: {plan}"
            check(graph, plan)  # the checker is the judge, again, independently
            assert plan.metrics["arena_bytes"] <= cap
    # unbounded: the checker's peak of the program-order plan is exactly the bound's max-live
    free = baselines.pipeline(graph, Target("t", None, alignment=a), "program", "belady", "greedy_size")
    assert free.metrics["peak_bytes"] == ml and free.metrics["noncompulsory_bytes"] == 0

"""A training step replayed from one joint remat plan (planner.runtime.training) and through the
torch.compile backend with a budget: gradients equal eager's, recomputes included."""

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("ortools")

from formulations import remat  # noqa: E402
from frontends.training import lower_training  # noqa: E402
from planner.runtime.aten_ops import ReplayError  # noqa: E402
from planner.runtime.training import TrainingStep  # noqa: E402
from planner.target import get_target  # noqa: E402

TARGET = get_target("cpu", capacity=None)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))


def assert_same_grads(params, ref: nn.Module) -> None:
    for p, (name, q) in zip(params, ref.named_parameters()):
        assert (p.grad - q.grad).abs().max().item() <= 1e-6 * q.grad.abs().max().item(), name


def test_two_steps_at_the_minimum_budget_accumulate_eager_gradients():
    module, x = mlp(), torch.randn(8, 16)
    tg = lower_training(module, (x,), name="mlp")
    res = remat.solve(tg.graph, TARGET, budget=remat.minimum_budget(tg.graph, TARGET), time_limit=30)
    assert res.plan.metrics["recompute_flops"] > 0  # the budget forces recomputes in the backward phase
    step = TrainingStep(tg, res.plan)
    assert step.executor.store_phase[tg.loss] == 0 and all(step.executor.store_phase[g] == 1
                                                           for g in tg.gradients.values())
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    for _ in range(2):
        (loss,) = step(*params, x)
        loss.backward()
    ref = copy.deepcopy(module)
    for _ in range(2):
        ref_loss = ref(x).mean()
        ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item())
    assert_same_grads(params, ref)


def test_dropout_recomputed_in_the_backward_draws_its_forward_mask():
    """At the least budget the plan recomputes the dropout op for the backward phase; the executor
    replays the generator state of its forward run, so the step equals eager's with the same seed
    (same mask), and the numbers drawn after the step are the ones eager leaves behind."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, 256), nn.Tanh(),
                           nn.Dropout(0.3), nn.Linear(256, 4))
    x = torch.randn(32, 16)
    tg = lower_training(module, (x,), name="dropout_mlp")
    res = remat.solve(tg.graph, TARGET, budget=remat.minimum_budget(tg.graph, TARGET), time_limit=30)
    seq = [i.ref for i in res.plan.instructions if i.kind == "compute"]
    random = [op.id for op in tg.graph.ops if op.attrs.get("random")]
    assert len(random) == 2 and any(seq.count(o) == 2 for o in random)  # a dropout op runs twice
    step = TrainingStep(tg, res.plan)
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    ref = copy.deepcopy(module)
    for seed in (1, 2):
        torch.manual_seed(seed)
        (loss,) = step(*params, x)
        loss.backward()
        after = torch.rand(3)
        torch.manual_seed(seed)
        ref_loss = ref(x).mean()
        ref_loss.backward()
        assert torch.equal(after, torch.rand(3))
        assert abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item())
    assert_same_grads(params, ref)


def test_a_second_forward_before_the_backward_is_refused():
    module, x = mlp(), torch.randn(8, 16)
    tg = lower_training(module, (x,), name="mlp")
    step = TrainingStep(tg, remat.solve(tg.graph, TARGET, budget=0.9, time_limit=30).plan)
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    step(*params, x)
    with pytest.raises(ReplayError, match="one step at a time"):
        step(*params, x)


def test_backend_with_a_budget_trains_from_one_joint_plan(tmp_path):
    from planner.runtime import backend

    module, x = mlp(), torch.randn(8, 16)
    ref = copy.deepcopy(module)
    before = dict(backend.STATS)
    torch._dynamo.reset()
    f = torch.compile(module, backend="memplan", options={"budget": 0.9, "cache_dir": str(tmp_path),
                                                          "time_limit": 10})
    for _ in range(2):
        f(x).square().mean().backward()
        ref(x).square().mean().backward()
    assert_same_grads(list(module.parameters()), ref)
    assert backend.STATS["solves"] - before["solves"] == 1  # one joint plan, not a forward and a backward one
    assert backend.STATS["eager_fallbacks"] == before["eager_fallbacks"]
    (cached,) = tmp_path.glob("*.plan.json")
    from planner.plan import Plan

    assert Plan.load(cached).solver.formulation.startswith("remat")


def test_a_size_budget_covers_the_gradients_the_step_returns(tmp_path):
    from planner.plan import Plan
    from planner.runtime import backend
    from planner.runtime.aten_ops import temporary_bytes

    module, x = mlp(), torch.randn(8, 16)
    tg = lower_training(module, (x,), name="mlp")
    grads = sum(p.numel() * 4 for p in module.parameters())
    size = grads + 1_000_000  # room for every activation
    cpu = torch.device("cpu")
    beside = grads + temporary_bytes(tg.graph, "cpu")
    assert backend._plan_budget(tg, f"{size}B", cpu) == backend._plan_budget(tg, size, cpu) == size - beside
    assert backend._plan_budget(tg, "80%", cpu) == "80%" and backend._plan_budget(tg, 0.8, cpu) == 0.8
    with pytest.raises(ValueError, match="gradients"):
        backend._plan_budget(tg, grads, cpu)
    torch._dynamo.reset()
    f = torch.compile(module, backend="memplan", options={"budget": size, "cache_dir": str(tmp_path),
                                                          "time_limit": 10})
    f(x).square().mean().backward()
    plans = [Plan.load(p) for p in tmp_path.glob("*.plan.json")]
    (plan,) = plans  # one joint remat plan; its share: the size less the gradients and a small temporary
    assert size - grads - 4096 <= plan.solver.params["budget"] <= size - grads


def test_backend_budget_below_the_minimum_falls_back_with_a_message(tmp_path, capsys):
    from planner.runtime import backend

    module, x = mlp(), torch.randn(8, 16)
    ref = copy.deepcopy(module)
    torch._dynamo.reset()
    before = backend.STATS["eager_fallbacks"]
    f = torch.compile(module, backend="memplan", options={"budget": 1000, "cache_dir": str(tmp_path)})
    f(x).mean().backward()
    ref(x).mean().backward()
    assert "below" in capsys.readouterr().err and backend.STATS["eager_fallbacks"] == before + 1
    assert_same_grads(list(module.parameters()), ref)


def test_hf_gpt2_step_from_a_joint_plan_equals_eager():
    """transformers' GPT-2 (SDPA attention, a lifted causal-mask constant) trained from one joint plan."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    module, ids = transformers.GPT2LMHeadModel(cfg), torch.randint(0, 128, (2, 16))
    loss_of = lambda out: out.logits.float().square().mean()  # noqa: E731
    tg = lower_training(module, (ids,), loss=loss_of, name="gpt2")
    res = remat.solve(tg.graph, TARGET, budget=0.8, time_limit=30)
    step = TrainingStep(tg, res.plan)
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    (loss,) = step(*params, ids)
    loss.backward()
    ref = copy.deepcopy(module).train()
    ref_loss = loss_of(ref(ids))
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert_same_grads(params, ref)


def test_results_kept_as_the_kernel_returns_them_replay_the_same():
    """host_outputs (a device kernel's host-side results, e.g. attention's dropout seed) are passed to
    their readers as returned, never copied into the arena: LayerNorm's mean / rstd marked so here."""
    from dataclasses import replace

    from planner.graph import LifetimeGraph

    torch.manual_seed(0)
    module, x = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4)), torch.randn(8, 16)
    tg = lower_training(module, (x,), name="ln")
    g = tg.graph
    marked = [op.id for op in g.ops if op.op_type == "aten.native_layer_norm.default"]
    assert marked
    ops = tuple(replace(op, attrs={**op.attrs, "host_outputs": [1, 2]}) if op.id in marked else op for op in g.ops)
    tg = replace(tg, lowered=replace(tg.lowered, graph=LifetimeGraph(g.name, g.tensors, ops)))
    step = TrainingStep(tg, remat.solve(tg.graph, TARGET, budget=1.0, time_limit=30).plan)
    assert step.executor.stats.fallback_copies >= len(marked)
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    (loss,) = step(*params, x)
    loss.backward()
    ref = copy.deepcopy(module)
    ref(x).mean().backward()
    assert_same_grads(params, ref)


def test_backend_budget_with_updated_buffers_falls_back_to_aot(tmp_path, capsys):
    """BatchNorm's updated statistics are forward outputs without tangents: not a TrainingStep (yet)."""
    from planner.runtime import backend

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(16, 32, bias=False), nn.BatchNorm1d(32), nn.Linear(32, 4))  # a bias before
    x = torch.randn(8, 16)  # BatchNorm has a zero gradient: only rounding noise to compare
    ref = copy.deepcopy(module)
    torch._dynamo.reset()
    before = backend.STATS["eager_fallbacks"]
    f = torch.compile(module, backend="memplan", options={"budget": 0.9, "cache_dir": str(tmp_path)})
    f(x).square().mean().backward()
    ref(x).square().mean().backward()
    assert "tangents" in capsys.readouterr().err and backend.STATS["eager_fallbacks"] == before + 1
    assert_same_grads(list(module.parameters()), ref)
    assert torch.allclose(module[1].running_mean, ref[1].running_mean)

"""Plan replay on the CPU: zoo models lowered through fx and ONNX, planned with and
without spills, a hand-made plan with a reload and a recompute, the torch.compile
backend (inference and training) and its plan cache. Outputs must equal eager
PyTorch within 1e-5 relative error (fp32). CUDA variants run only on a GPU."""

import dataclasses
import json

import pytest
import torch
from torch import nn

import models
from frontends.fx import lower_module
from frontends.onnx import lower_onnx
from planner import bounds
from planner.check import check
from planner.cli import main
from planner.compile import compile as plan_graph
from planner.graph import LifetimeGraph
from planner.plan import Plan, compute, free, load, store
from planner.runtime import backend
from planner.runtime.aten_ops import ReplayError
from planner.runtime.executor import Executor, event_waits
from planner.runtime.replay import max_rel_error, replay
from planner.target import Target, align_up

T64 = Target("cpu64", None, alignment=64)
ZOO = ["resnet50", "mobilenet_v2", "vit_b_16", "gpt2", "bert", "unet"]
SPILLED = ["resnet50", "gpt2", "bert"]  # zoo models whose baseline plan at 60% of the arena spills
_LOWERED: dict = {}


def zoo(name):
    """(lowered, module, inputs) of a small registry model, lowered once per session."""
    if name not in _LOWERED:
        module, inputs = models.build_small(name)
        _LOWERED[name] = (lower_module(module, inputs, name=name), module, inputs)
    return _LOWERED[name]


def eager(module, inputs):
    with torch.no_grad():
        out = module(*inputs)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_replay_equals_eager(name):
    lowered, module, inputs = zoo(name)
    plan = plan_graph(lowered.graph, T64, planner="baseline")
    ex = Executor.from_lowered(lowered, plan)
    out = ex.run(*inputs)
    assert max_rel_error(out, eager(module, inputs)) <= 1e-5
    assert ex.arena_bytes == plan.metrics["arena_bytes"] and ex.arena.numel() == ex.arena_bytes
    assert ex.stats.kernels + ex.stats.views == len(lowered.graph.ops)
    assert ex.stats.loads == len(lowered.inputs) and ex.stats.fallback_copies <= 1
    again = ex.run(*inputs)  # a second run reuses the arena and gives the same result
    assert all(torch.equal(a, b) for a, b in zip(out, again))


def spilled_plan(name):
    """A baseline plan at 60% of the no-spill arena (at least M_R), made once per session."""
    key = name + ":spilled"
    if key not in _LOWERED:
        lowered = zoo(name)[0]
        full = plan_graph(lowered.graph, T64, planner="baseline")
        cap = max(bounds.m_r(lowered.graph, False, 64), int(full.metrics["arena_bytes"] * 0.6) // 64 * 64)
        _LOWERED[key] = (plan_graph(lowered.graph, T64.with_(capacity=cap), planner="baseline"), cap)
    return _LOWERED[key]


@pytest.mark.parametrize("name", SPILLED)
def test_zoo_replay_with_spills(name):
    lowered, module, inputs = zoo(name)
    plan, cap = spilled_plan(name)
    assert plan.metrics["noncompulsory_bytes"] > 0 and plan.metrics["arena_bytes"] <= cap
    ex = Executor.from_lowered(lowered, plan)
    assert ex.arena_bytes <= cap and ex.stats.loads > len(lowered.inputs)
    assert max_rel_error(ex.run(*inputs), eager(module, inputs)) <= 1e-5


def hazard(a, b) -> bool:
    """Independent of the executor's own test: a shared byte (max of starts < min of ends), one write."""
    return any(x[0] == y[0] and max(x[1], y[1]) < min(x[2], y[2]) and (x[3] or y[3]) for x in a for y in b)


class Ladder(nn.Module):
    """Eight tensors made early and read late, each op's working set small: spills at M_R."""

    def forward(self, x):
        xs = [x]
        for i in range(8):
            xs.append(torch.sin(xs[-1]) * (i + 2.0))
        y = xs[-1]
        for t in reversed(xs[:-1]):
            y = y + t
        return y


def test_stream_waits_order_every_conflicting_pair():
    """The CUDA synchronisation, checked without a GPU: for every compute/transfer pair on different
    streams that touch overlapping bytes (one writing), some wait orders the later after the earlier."""
    x = torch.randn(4, 64)
    lowered = lower_module(Ladder(), (x,))
    plan = plan_graph(lowered.graph, T64.with_(capacity=bounds.m_r(lowered.graph, False, 64)), planner="baseline")
    ex = Executor.from_lowered(lowered, plan)
    assert max_rel_error(ex.run(x), (Ladder()(x),)) <= 1e-6
    steps = ex.sync_steps
    waits = event_waits(steps)
    assert ex.stats.loads > 4 and ex.stats.stores > 4 and len(waits) > ex.stats.loads
    for j, (sj, aj) in enumerate(steps):
        for i in range(j):
            if steps[i][0] != sj and hazard(steps[i][1], aj):
                assert any(steps[k][0] == sj and w >= i for k, w in waits.items() if k <= j), (i, j)


def test_stream_waits_by_hand():
    a = lambda lo, write: ("arena", lo, lo + 64, write)  # noqa: E731
    off = lambda t, write: ("offchip", t, t + 1, write)  # noqa: E731
    steps = [("T", [off(1, False), a(0, True)]),  # 0 load x @0
             ("C", [a(0, False), a(64, True)]),  # 1 y = f(x) @64: waits for the load
             ("T", [a(64, False), off(2, True)]),  # 2 spill y: waits for its producer
             ("C", [a(0, False), a(128, True)]),  # 3 reads x again: the wait at 1 covers it
             ("C", [a(64, True)]),  # 4 overwrites y's bytes: waits for the spill
             ("T", [off(2, False), a(0, True)])]  # 5 reload y over x: waits for x's last reader
    assert event_waits(steps) == {1: 0, 2: 1, 4: 2, 5: 3}


class ViewChain(nn.Module):
    def forward(self, x):
        a = torch.relu(x)
        v = a.t()
        b = torch.sigmoid(a)
        return b + v.t() * 2.0


def test_hand_made_plan_with_reload_and_recompute():
    x = torch.randn(4, 8)
    lowered = lower_module(ViewChain(), (x,))
    g = lowered.graph
    kinds = [o.op_type for o in g.ops]
    assert kinds == ["aten.relu.default", "aten.permute.default", "aten.sigmoid.default",
                     "aten.permute.default", "aten.mul.Tensor", "aten.add.Tensor"]
    relu, perm1, sig, perm2, mul, add = range(6)
    xt, a, b, y = lowered.inputs[0], g.ops[relu].outputs[0], g.ops[sig].outputs[0], g.ops[add].outputs[0]
    m = g.ops[mul].outputs[0]
    slot = align_up(4 * 8 * 4, 64)
    instrs = [load(xt, 0), compute(relu, slot), compute(perm1, -1), compute(sig, 2 * slot), free(xt),
              store(a), free(a), load(a, 3 * slot),  # a comes back at a new offset: views re-derived
              compute(perm2, -1), compute(mul, 0), free(b),
              compute(sig, slot),  # b recomputed from the reloaded a
              free(a), compute(add, 2 * slot), store(y), free(b), free(m), free(y)]
    plan = check(g, Plan(g.name, g.fingerprint, T64, tuple(instrs)))
    assert plan.metrics["recompute_flops"] > 0 and plan.metrics["noncompulsory_bytes"] > 0
    ex = Executor.from_lowered(lowered, plan)
    (out,) = ex.run(x)
    ref = ViewChain()(x)
    assert max_rel_error((out,), (ref,)) <= 1e-6
    assert (ex.stats.loads, ex.stats.stores, ex.stats.kernels, ex.stats.views) == (2, 2, 5, 2)


def test_output_views_point_into_the_arena():
    lowered, module, inputs = zoo("gpt2")
    plan = plan_graph(lowered.graph, T64, planner="baseline")
    ex = Executor.from_lowered(lowered, plan, output_views=True)
    (logits,) = ex.run(*inputs)
    assert ex.stats.output_views == 1
    assert ex.arena.data_ptr() <= logits.data_ptr() < ex.arena.data_ptr() + ex.arena_bytes
    assert max_rel_error((logits,), eager(module, inputs)) <= 1e-5


def test_wrong_input_shape_and_foreign_plan_are_rejected():
    lowered, _, inputs = zoo("unet")
    plan = plan_graph(lowered.graph, T64, planner="baseline")
    ex = Executor.from_lowered(lowered, plan)
    with pytest.raises(ReplayError, match="shape"):
        ex.run(torch.zeros(1, 1, 16, 16))
    other = zoo("gpt2")[0]
    with pytest.raises(ValueError, match="plan is for graph"):
        Executor.from_lowered(other, plan)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        a = torch.relu(self.bn(self.conv1(x)))
        b = nn.functional.hardswish(self.conv2(a)) + a
        c = self.pool(b)
        d = torch.cat([nn.functional.avg_pool2d(self.up(c), 2), torch.sigmoid(c)], dim=1)
        return torch.softmax(self.fc(self.pool(d).flatten(1)), dim=-1)


@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory):
    torch.manual_seed(0)
    module = SmallCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path_factory.mktemp("onnx") / "cnn.onnx"
    torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17, input_names=["input0"])
    return module, x, str(path)


def test_onnx_cnn_replays(cnn_onnx):
    module, x, path = cnn_onnx
    lowered = lower_onnx(path, load_weights=True)
    plan = plan_graph(lowered.graph, T64, planner="baseline")
    ex = Executor.from_lowered(lowered, plan)
    assert max_rel_error(ex.run(x), eager(module, (x,))) <= 1e-5
    types = {o.op_type for o in lowered.graph.ops}
    assert {"Conv", "MaxPool", "Concat", "Gemm", "Softmax"} <= types


class Mixer(nn.Module):
    """Exercises the ONNX table beyond CNNs: normalisation, slicing, gathers, selects, reductions, resize."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 16)
        self.register_buffer("table", torch.randn(10, 16))

    def forward(self, x, idx):
        h = nn.functional.gelu(self.fc(self.norm(x)))
        t = h.transpose(1, 2)[:, 2:10, 1:7]
        a, b = t.split([3, 5], dim=1)
        w = torch.where(a > 0, a, a * 0.5).pow(2).sqrt()
        m = w.mean(dim=-1, keepdim=True) / (b.abs().sum(1, keepdim=True) + 1)
        up = nn.functional.interpolate(t.unsqueeze(1), scale_factor=2.0, mode="bilinear", align_corners=False)
        return (m.double().float() * 2 - 1, self.table[idx].expand(3, 4, 16) + 0, up,
                torch.cat([a, b], 1).flatten(1).softmax(-1))


def test_onnx_table_beyond_cnns(tmp_path):
    torch.manual_seed(0)
    module, x, idx = Mixer().eval(), torch.randn(3, 12, 16), torch.tensor([[1, 2, 3, 9]] * 3)
    path = str(tmp_path / "mixer.onnx")
    torch.onnx.export(module, (x, idx), path, dynamo=False, opset_version=17, input_names=["x", "idx"])
    lowered = lower_onnx(path, load_weights=True)
    assert {"LayerNormalization", "MatMulAdd", "Gelu", "Transpose", "Slice", "Split", "Gather", "Where", "Pow",
            "Sqrt", "ReduceMean", "ReduceSum", "Div", "Resize", "Expand", "Concat", "Cast", "Softmax"} <= {
        o.op_type for o in lowered.graph.ops}
    ex = Executor.from_lowered(lowered, plan_graph(lowered.graph, T64, planner="baseline"))
    assert max_rel_error(ex.run(x, idx), eager(module, (x, idx))) <= 1e-5


def test_onnx_unknown_op_names_op_and_node(cnn_onnx):
    _, _, path = cnn_onnx
    lowered = lower_onnx(path, load_weights=True)
    g = lowered.graph
    k = next(i for i, o in enumerate(g.ops) if o.op_type == "Softmax")
    ops = list(g.ops)
    ops[k] = dataclasses.replace(ops[k], attrs={**ops[k].attrs, "onnx_op": "Hardmax"})
    bad = LifetimeGraph(g.name, g.tensors, tuple(ops))
    plan = plan_graph(bad, T64, planner="baseline")
    with pytest.raises(ReplayError, match=rf"'Hardmax' \(node '{ops[k].name}'\)"):
        Executor(bad, plan, lowered.weights, inputs=lowered.inputs, outputs=lowered.outputs)


def test_cli_replay_check(tmp_path, capsys):
    model = "zoo:gpt2:batch=2,seq=8,layers=1,d_model=32,heads=4,vocab=100,n_ctx=16"
    path = str(tmp_path / "plan.json")
    assert main(["compile", model, "--planner", "baseline", "--capacity", "none", "-o", path, "--json"]) == 0
    capsys.readouterr()
    assert main(["replay", path, model, "--check", "--runs", "2", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["outputs_match"] is True and rep["max_rel_error"] <= 1e-5
    assert rep["arena_bytes"] == Plan.load(path).metrics["arena_bytes"]
    other = "zoo:gpt2:batch=2,seq=4,layers=1,d_model=32,heads=4,vocab=100,n_ctx=16"
    assert main(["replay", path, other]) == 1
    assert "INVALID" in capsys.readouterr().out


def test_replay_report_cpu():
    lowered, module, inputs = zoo("bert")
    plan = plan_graph(lowered.graph, T64, planner="baseline")
    rep = replay(lowered, plan, inputs, "cpu", runs=2, reference=eager(module, inputs))
    assert rep.max_rel_error <= 1e-5 and rep.runs == 2 and rep.seconds_per_run > 0
    assert rep.arena_bytes == plan.metrics["arena_bytes"] and rep.measured_peak_bytes is None


# ------------------------------------------------------------------ torch.compile backend
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x).log_softmax(-1)


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMPLAN_CACHE_DIR", str(tmp_path / "cache"))
    backend._MEMORY.clear()
    torch._dynamo.reset()
    built = []
    original = Executor.from_lowered.__func__

    def spy(cls, lowered, plan, device="cpu"):
        built.append(original(cls, lowered, plan, device))
        return built[-1]
    monkeypatch.setattr(Executor, "from_lowered", classmethod(spy))
    yield built
    torch._dynamo.reset()


@pytest.mark.parametrize("cls, shape", [(MLP, (8, 16)), (TinyCNN, (2, 3, 8, 8))])
def test_backend_inference_equals_eager(cls, shape, cache_dir):
    torch.manual_seed(0)
    model, x = cls().eval(), torch.randn(shape)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend="memplan", options={"planner": "baseline"})(x)
    assert max_rel_error((out,), (ref,)) <= 1e-5
    (ex,) = cache_dir
    assert ex.stats.loads == 1  # only x enters the arena: parameters and buffers are read in place
    assert sum(t.kind == "weight" for t in ex.graph.tensors) >= 4


@pytest.mark.parametrize("cls, shape", [(MLP, (8, 16)), (TinyCNN, (2, 3, 8, 8))])
def test_backend_training_equals_eager(cls, shape, cache_dir):
    torch.manual_seed(0)
    ref_model, x = cls().train(), torch.randn(shape)
    model = cls().train()
    model.load_state_dict(ref_model.state_dict())
    compiled = torch.compile(model, backend="memplan", options={"planner": "baseline"})
    for _ in range(2):  # two steps: the second runs the cached executors
        ref_loss = ref_model(x).square().mean()
        ref_loss.backward()
        loss = compiled(x).square().mean()
        loss.backward()
        assert max_rel_error((loss,), (ref_loss,)) <= 1e-5
    # relative to the largest gradient: conv.bias before BatchNorm has a true gradient of 0 (rounding noise)
    scale = max(p.grad.abs().max().item() for p in ref_model.parameters())
    for (n, p), q in zip(ref_model.named_parameters(), model.parameters()):
        assert (q.grad - p.grad).abs().max().item() <= 1e-5 * scale, n
    for (n, b), c in zip(ref_model.named_buffers(), model.buffers()):
        assert torch.allclose(b.double(), c.double(), rtol=1e-5, atol=0), n
    assert len(cache_dir) == 2  # forward and backward graphs, each planned and replayed
    assert cache_dir[0].stats.loads == 1  # the forward graph reads parameters and buffers in place


def test_backend_training_at_capacity_m_r(cache_dir):
    """The capacity option reaches both AOT graphs: each is planned at its own M_R and still matches eager."""
    torch.manual_seed(0)
    ref_model, x = TinyCNN().train(), torch.randn(4, 3, 8, 8)
    model = TinyCNN().train()
    model.load_state_dict(ref_model.state_dict())
    compiled = torch.compile(model, backend="memplan", options={"planner": "baseline", "capacity": "M_R"})
    ref_loss = ref_model(x).square().mean()
    ref_loss.backward()
    loss = compiled(x).square().mean()
    loss.backward()
    assert max_rel_error((loss,), (ref_loss,)) <= 1e-5
    scale = max(p.grad.abs().max().item() for p in ref_model.parameters())
    for p, q in zip(ref_model.parameters(), model.parameters()):
        assert (q.grad - p.grad).abs().max().item() <= 1e-5 * scale
    assert len(cache_dir) == 2
    for ex in cache_dir:
        assert ex.arena_bytes <= ex.plan.target.capacity == bounds.m_r(ex.graph, False, ex.plan.target.alignment)


def test_backend_plan_cache_skips_the_solver(cache_dir, tmp_path):
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(8, 16)
    opts = {"planner": "baseline", "capacity": "1MiB"}
    solves = backend.STATS["solves"]
    with torch.no_grad():
        first = torch.compile(model, backend="memplan", options=opts)(x)
    assert backend.STATS["solves"] == solves + 1
    assert len(list((tmp_path / "cache").glob("*.plan.json"))) == 1
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="memplan", options=opts)(x)  # same graph: memory cache
    backend._MEMORY.clear()
    torch._dynamo.reset()
    disk = backend.STATS["disk_hits"]
    with torch.no_grad():
        again = torch.compile(model, backend="memplan", options=opts)(x)  # new process, in effect: disk
    assert backend.STATS["solves"] == solves + 1 and backend.STATS["disk_hits"] == disk + 1
    assert torch.equal(first, again)
    assert cache_dir[0].plan.target.capacity == 1024 * 1024


def test_backend_rejects_unknown_options():
    with pytest.raises(ValueError, match="unknown option"):
        backend.BackendOptions.from_dict({"capacty": "1GiB"})


# ------------------------------------------------------------------ CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("name", SPILLED)
def test_cuda_replay_with_spills(name):
    lowered, module, inputs = zoo(name)
    plan, cap = spilled_plan(name)
    module = module.to("cuda")
    ref = eager(module, tuple(x.cuda() for x in inputs))
    rep = replay(lowered, plan, inputs, "cuda", runs=3, reference=ref)
    assert rep.max_rel_error <= 1e-3
    assert rep.arena_bytes <= cap and rep.stats.waits > 0
    assert set(rep.overlap) >= {"wall_ms", "transfer_busy_ms", "hidden_fraction"}


@pytest.mark.cuda
@cuda
def test_cuda_backend_inference():
    torch.manual_seed(0)
    model, x = TinyCNN().eval().cuda(), torch.randn(2, 3, 8, 8, device="cuda")
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend="memplan", options={"planner": "baseline", "cache": False})(x)
    assert max_rel_error((out,), (ref,)) <= 1e-3


@pytest.mark.parametrize("target,args", [
    ("aten.slice_backward.default", (torch.randn(4, 5, 7), [4, 9, 7], 1, 2, 7, 1)),
    ("aten.slice_backward.default", (torch.randn(4, 3, 7), [4, 9, 7], 1, 1, 9, 3)),
    ("aten.mul.Scalar", (torch.randn(3, 4), 0.125)),
    ("aten.mul.Scalar", (torch.arange(12).reshape(3, 4), 3)),
    ("aten.relu.default", (torch.randn(5, 6),)),
])
def test_direct_writers_equal_the_aten_op(target, args):
    """Ops whose out= variant ATen only emulates are written into their buffer directly; the
    buffer holds garbage before (an arena is reused), and after it exactly what the op returns."""
    from planner.runtime import aten_ops

    ref = aten_ops.op_by_name(target)(*args)
    out = torch.full_like(ref, 7)
    aten_ops._DIRECT[target]([out], "cpu")(list(args), {})
    assert torch.equal(out, ref)

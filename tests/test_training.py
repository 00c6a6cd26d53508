"""Training graphs (frontends.training): phases as PyTorch's partitioner classifies them, the
tensors saved for backward, gradients as outputs, FLOPs, PyTorch's min-cut partition as an
execution order of our ops, every zoo model planned, and a replay equal to eager backward()."""

import collections
import copy
import json
import math

import pytest
import torch
from torch import nn

import frontends.training
import models
from frontends import FrontendError, load_model
from frontends.fx import decomposition_table, lower_graph_module
from frontends.training import _draws_random, _op_sequence, complete_sequence, lower_training
from planner import bounds
from planner.cli import main
from planner.compile import compile as plan_graph
from planner.graph import build
from planner.runtime.executor import Executor
from planner.runtime.replay import max_rel_error
from planner.target import Target, get_target

T64 = Target("cpu64", None, alignment=64)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x).log_softmax(-1)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


SHAPES = {"mlp": (MLP, (8, 16)), "conv": (ConvNet, (2, 3, 8, 8))}
_CACHE: dict = {}


def training(name):
    """(TrainingGraph, module, input) of a small test net, lowered once per session."""
    if name not in _CACHE:
        cls, shape = SHAPES[name]
        torch.manual_seed(0)
        module, x = cls(), torch.randn(shape)
        _CACHE[name] = (lower_training(module, (x,), name=name), module, x)
    return _CACHE[name]


def tangents(tg):
    return {t for n, t in zip(tg.input_names, tg.lowered.inputs) if n.startswith("tangent")}


def is_view(g, op):
    return all(g.tensors[t].alias_of is not None for t in op.outputs)


def assert_valid_sequence(g, seq):
    """Every op runs at least once and reads only inputs, weights and tensors written earlier."""
    ready = {t.id for t in g.tensors if t.kind in ("input", "weight")}
    for oid in seq:
        op = g.ops[oid]
        assert all(t in ready for t in op.inputs), f"{op.name} runs before its inputs exist"
        ready.update(op.outputs)
    assert set(seq) == set(range(len(g.ops)))


# ------------------------------------------------------------------ phases, saved tensors, gradients
@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_phases_follow_pytorchs_classification(name):
    from torch._functorch.partitioners import classify_nodes

    tg, _, _ = training(name)
    g = tg.graph
    loss = g.ops[g.producer[tg.loss]]
    assert loss.op_type == "aten.mean.default" and loss.attrs["phase"] == "forward"
    assert g.tensors[tg.loss].shape == () and g.tensors[tg.loss].kind == "output"
    for op in g.ops:
        if any(t in tangents(tg) or g.root(t) in tangents(tg) for t in op.inputs):
            assert op.attrs["phase"] == "backward", op.name
        if op.attrs["phase"] == "backward":
            assert all(g.ops[s].attrs["phase"] == "backward" for s in g.successors[op.id]), op.name
    info = classify_nodes(tg.joint_module, list(tg.weight_inputs), tg.num_fwd_outputs)
    backward = {n.name for n in info.required_bw_nodes}
    calls = {n.name for n in tg.joint_module.graph.nodes if n.op == "call_function"}
    mapped = [op for op in g.ops if op.name in calls]
    assert len(mapped) >= len(g.ops) - 3  # all but the copies of gradients that are views
    for op in mapped:
        assert (op.attrs["phase"] == "backward") == (op.name in backward), op.name
    assert all(op.recomputable for op in g.ops)


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_saved_for_backward(name):
    tg, _, _ = training(name)
    g = tg.graph
    phase = {op.id: op.attrs["phase"] for op in g.ops}
    assert tg.saved_for_backward
    for t in tg.saved_for_backward:
        assert g.tensors[t].alias_of is None and phase[g.producer[t]] == "forward"
        assert any(phase[o] == "backward" for o in g.storage_users[t]), g.tensors[t].name
    # complete: every buffer a backward op reads that a forward op wrote
    expected = {g.root(t) for op in g.ops if phase[op.id] == "backward" for t in op.inputs
                if g.root(t) in g.producer and phase[g.producer[g.root(t)]] == "forward"}
    assert set(tg.saved_for_backward) == expected
    names = {g.tensors[t].name for t in tg.saved_for_backward}
    # weight gradients need the layer inputs (gelu, relu); GELU's backward its input (addmm); log-softmax's
    # its output; ReLU's its output; BatchNorm's its input (convolution), batch mean and 1/std (getitem_1, 2)
    # and the updated running statistics it is passed (getitem_3, 4: forward outputs as well)
    assert names == {"mlp": {"addmm", "gelu", "relu", "_log_softmax"},
                     "conv": {"convolution", "getitem_1", "getitem_2", "getitem_3", "getitem_4", "relu"}}[name]


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_gradients_are_outputs_with_parameter_shapes(name):
    tg, module, x = training(name)
    g = tg.graph
    params = dict(module.named_parameters())
    assert set(tg.gradients) == set(params)
    for pname, t in tg.gradients.items():
        assert g.tensors[t].shape == tuple(params[pname].shape) and g.tensors[t].kind == "output"
        assert g.ops[g.producer[t]].attrs["phase"] == "backward"
    kinds = {n: g.tensors[t].kind for n, t in zip(tg.input_names, tg.lowered.inputs)}
    assert kinds == {**{n: "weight" for n, _ in module.named_parameters()},
                     **{n: "weight" for n, _ in module.named_buffers()}, "input0": "input", "tangent0": "input"}
    assert tg.joint_inputs[-1].shape == () and tg.joint_inputs[-1].item() == 1.0
    # tracing ran a training step on clones: the module's running statistics are as built
    assert all(torch.equal(b, fresh) for b, fresh in zip(module.buffers(), type(module)().buffers()))


def test_joint_graph_lowered_as_is_equals_the_traced_lowering(monkeypatch):
    # traced through the fx frontend's whole table, which is what the traced lowering decomposes with
    monkeypatch.setattr(frontends.training, "training_decompositions", lambda: dict(decomposition_table().items()))
    torch.manual_seed(0)
    tg = lower_training(ConvNet(), (torch.randn(2, 3, 8, 8),), name="conv")
    assert "aten.native_batch_norm_backward.default" not in {op.op_type for op in tg.graph.ops}
    traced = lower_graph_module(tg.joint_module, tg.joint_inputs, name="conv",
                                weight_inputs=tg.weight_inputs).graph
    assert traced.fingerprint == tg.graph.fingerprint
    assert [op.flops for op in traced.ops] == [op.flops for op in tg.graph.ops]
    assert [{k: v for k, v in op.attrs.items() if k != "phase"} for op in tg.graph.ops] == \
        [dict(op.attrs) for op in traced.ops]


def test_flops_of_forward_and_backward_ops():
    tg, _, _ = training("conv")
    g = tg.graph
    by_type = collections.defaultdict(list)
    for op in g.ops:
        by_type[op.op_type].append(op)
    conv_macs = 2 * 8 * 8 * 8 * 3 * 3 * 3  # batch x out channels x 8 x 8 pixels x (3 x 3 x 3 taps)
    assert [op.flops for op in by_type["aten.convolution.default"]] == [2 * conv_macs]
    # no gradient for the input: the weight gradient alone, as many MACs as the forward
    assert [op.flops for op in by_type["aten.convolution_backward.default"]] == [2 * conv_macs]
    assert [op.flops for op in by_type["aten.addmm.default"]] == [2 * 2 * 512 * 10]
    assert sorted(op.flops for op in by_type["aten.mm.default"]) == [2 * 2 * 10 * 512] * 2
    numel = {t.id: math.prod(t.shape) for t in g.tensors}
    for op in g.ops:
        if is_view(g, op):
            assert op.flops == 0
            continue
        assert op.flops > 0, op.name
        if op.op_type.split(".")[1] in ("relu", "le", "where", "mul", "sub", "add", "div"):
            assert op.flops == numel[op.outputs[0]], op.name
        if op.op_type.split(".")[1] in ("sum", "mean"):  # reductions read every input element
            assert op.flops == max(numel[t] for t in op.inputs), op.name


def test_random_ops_are_marked_random_and_recomputable():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2))
    tg = lower_training(module, (torch.randn(4, 8),))
    g = tg.graph
    random = [op for op in g.ops if op.attrs.get("random")]
    assert [op.op_type for op in random] == ["aten.native_dropout.default"]
    assert random[0].attrs["phase"] == "forward" and random[0].recomputable  # the executor replays its numbers
    # outside ATen (no tags) names decide: philox sampling draws, a mask's backward does not
    assert _draws_random("rngprims.philox_rand.default") and not _draws_random("aten.native_dropout_backward.default")
    assert collections.Counter(tg.pytorch_partition(1.0))[random[0].id] == 1
    # at budget 0 PyTorch recomputes it all the same, with a fresh mask (pytorch/pytorch#190758, open in
    # torch 2.13); pytorch_partition reports what PyTorch does: its repeats are its two graphs' common ops
    seq = tg.pytorch_partition(0.0)
    fw, bw = partition(tg, 0.0)
    common = {n.name for n in fw.graph.nodes if n.op == "call_function"} & \
        {n.name for n in bw.graph.nodes if n.op == "call_function"}
    again = {g.ops[o].name for o, n in collections.Counter(seq).items() if n > 1}
    assert again == {op.name for op in g.ops if op.name in common and not is_view(g, op)}


# ------------------------------------------------------------------ PyTorch's min-cut partition
def partition(tg, budget):
    """PyTorch's forward and backward graphs, called here directly (the oracle for pytorch_partition)."""
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    joint = tg.joint_module
    with torch._functorch.config.patch(activation_memory_budget=budget):
        return min_cut_rematerialization_partition(
            torch.fx.GraphModule(joint, copy.deepcopy(joint.graph)), None, num_fwd_outputs=tg.num_fwd_outputs,
            static_lifetime_input_indices=list(tg.weight_inputs))


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_pytorch_partition_at_full_budget_runs_every_op_once(name):
    tg, _, _ = training(name)
    seq = tg.pytorch_partition(1.0)
    assert_valid_sequence(tg.graph, seq)
    assert sorted(seq) == list(range(len(tg.graph.ops)))


@pytest.mark.parametrize("name, budget", [("mlp", 0.1), ("conv", 0.1), ("mlp", 0.0)])
def test_pytorch_partition_at_small_budget_recomputes_forward_ops(name, budget):
    tg, _, _ = training(name)
    g = tg.graph
    seq = tg.pytorch_partition(budget)
    assert_valid_sequence(g, seq)
    again = {g.ops[o].name for o, n in collections.Counter(seq).items() if n > 1}
    assert again
    assert all(g.ops[g_id].attrs["phase"] == "forward" and g.ops[g_id].recomputable
               for g_id, n in collections.Counter(seq).items() if n > 1)
    # the repeats are exactly the non-view ops that both of PyTorch's graphs compute
    fw, bw = partition(tg, budget)
    ops = {op.name: op for op in g.ops}
    calls = [{n.name for n in m.graph.nodes if n.op == "call_function" and n.name in ops} for m in (fw, bw)]
    assert again == {n for n in calls[0] & calls[1] if not is_view(g, ops[n])}
    assert len(seq) == len(g.ops) + len(again)


def test_renamed_partition_nodes_map_to_the_same_ops():
    tg, _, _ = training("conv")
    fw, bw = partition(tg, 0.1)
    before = _op_sequence(tg.graph, bw.graph)
    for node in bw.graph.nodes:
        if node.op == "call_function":
            node._rename(f"renamed_{node.name}")
    assert _op_sequence(tg.graph, bw.graph) == before


def test_complete_sequence_places_ops_the_order_leaves_out():
    g = build("chain", [("x", 4, "input"), ("a", 4, "activation"), ("b", 4, "activation"),
                        ("c", 4, "output"), ("d", 4, "output")],
              [("A", ["x"], ["a"]), ("B", ["a"], ["b"]), ("C", ["b"], ["c"]), ("D", ["b"], ["d"])])
    assert complete_sequence(g, [0, 2]) == [0, 1, 3, 2]  # B and D (unnamed) right after their inputs
    assert complete_sequence(g, [0, 2, 1]) == [0, 1, 3, 2, 1]  # C needs B first; B named later recomputes
    assert complete_sequence(g, [2]) == [0, 1, 3, 2]  # A and B are C's producers, run first


# ------------------------------------------------------------------ replay
@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_replay_equals_eager_backward(name):
    tg, module, x = training(name)
    plan = plan_graph(tg.graph, T64, planner="baseline")
    out = dict(zip(tg.lowered.outputs, Executor.from_lowered(tg.lowered, plan).run(*tg.joint_inputs)))
    ref = copy.deepcopy(module).train()
    loss = ref(x).mean()
    loss.backward()
    assert max_rel_error((out[tg.loss],), (loss,)) <= 1e-5
    # relative to the largest gradient: conv.bias before BatchNorm has a true gradient of 0 (rounding noise)
    scale = max(p.grad.abs().max().item() for p in ref.parameters())
    for pname, p in ref.named_parameters():
        got = out[tg.gradients[pname]]
        assert (got - p.grad).abs().max().item() <= 1e-5 * (scale if name == "conv" else p.grad.abs().max()), pname
    updated = [out[t] for t in tg.lowered.outputs[:tg.num_fwd_outputs - 1]]  # BatchNorm's running statistics
    assert max_rel_error(updated, list(ref.buffers())) <= 1e-6


# ------------------------------------------------------------------ the zoo, load_model and the CLI
# small sizes whose batch of 1 leaves BatchNorm one value per channel, which training mode rejects
TRAIN_SMALL = {n: {"batch": 2} for n in ("resnet50", "resnext50_32x4d", "mobilenet_v2", "densenet121",
                                        "inception_v3", "deeplabv3_resnet50", "s3d")}
# lowering + planning 9-70 s each on 2 shared cores (340-2,300 ops); the rest (ResNet-50 included) ~50 s in all
SLOW = {"amoebanet_d", "deeplabv3_resnet50", "densenet121", "fcn_resnet50", "inception_v3",
        "lraspp_mobilenet_v3_large", "mobilenet_v2", "nasnet_a", "pnasnet5", "r2plus1d_18", "randwire_ba",
        "randwire_er", "randwire_ws", "resnext50_32x4d", "s3d"}
_ZOO: dict = {}


def zoo_training(name):
    if name not in _ZOO:
        module, inputs = models.build_small(name, **TRAIN_SMALL.get(name, {}))
        _ZOO[name] = lower_training(module, inputs, name=name)
    return _ZOO[name]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in models.names()])
def test_zoo_training_graph_gets_a_checked_plan(name):
    tg = zoo_training(name)
    g = tg.graph
    # the npu preset's 4 MiB where a plan fits in it; else M_R (large weights have gradients as large)
    fits = bounds.m_r(g, False, get_target("npu").alignment) <= get_target("npu").capacity
    plan = plan_graph(g, "npu", capacity=None if fits else "M_R", planner="baseline")  # compile checks it
    assert plan.fingerprint == g.fingerprint and plan.metrics["recompute_flops"] == 0
    phases = collections.Counter(op.attrs["phase"] for op in g.ops)
    assert phases["forward"] > 0 and phases["backward"] > 0 and tg.saved_for_backward
    assert all(op.flops > 0 for op in g.ops if not is_view(g, op))
    heavy = [op for op in g.ops if op.op_type.split(".")[1] in ("convolution", "addmm", "mm", "bmm")]
    assert heavy and all(op.flops >= 2 * max(math.prod(g.tensors[t].shape) for t in op.outputs) for op in heavy)


def test_load_model_training_and_its_errors(tmp_path):
    tg = zoo_training("gpt2")
    spec = "zoo:gpt2:" + ",".join(f"{k}={v}" for k, v in models.spec("gpt2").small.items())
    lowered = load_model(spec, training=True, name="gpt2")
    assert lowered.graph.fingerprint == tg.graph.fingerprint and lowered.graph.name == "gpt2"
    module, inputs = models.build_small("gpt2")
    assert load_model(module, example_inputs=inputs, training=True).graph.fingerprint == tg.graph.fingerprint
    assert not module.training  # the caller's mode is restored
    with pytest.raises(FrontendError, match="through fx only"):
        load_model(spec, training=True, via="onnx")
    with pytest.raises(FrontendError, match="not from ONNX files"):
        load_model(str(tmp_path / "m.onnx"), training=True)


def test_cli_training_compile_check_inspect(tmp_path, capsys):
    spec = "zoo:gpt2:" + ",".join(f"{k}={v}" for k, v in models.spec("gpt2").small.items())
    tg = zoo_training("gpt2")
    assert main(["inspect", spec, "--training", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ops"] == len(tg.graph.ops)
    plan = tmp_path / "train.plan.json"
    assert main(["compile", spec, "--training", "--planner", "baseline", "-o", str(plan), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ops"] == len(tg.graph.ops)
    assert main(["check", str(plan), spec, "--json"]) == 0  # the plan records the training lowering
    assert json.loads(capsys.readouterr().out)["valid"] is True
    assert main(["replay", str(plan), spec]) == 2
    assert "replay of training graphs is not supported" in capsys.readouterr().err


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_backward_never_holds_three_logits(reduction):
    """frontends.fx_loss: nll_loss_backward -> _log_softmax_backward_data becomes exp, mul and
    scatter_add; no op then reads or writes more than two logits-sized tensors, and the gradients
    (ignored targets included) are eager's."""
    pytest.importorskip("ortools")
    from formulations import remat
    from planner.bounds import op_working_set
    from planner.runtime.training import TrainingStep
    from planner.target import get_target

    torch.manual_seed(0)
    n, v = 24, 300
    head = nn.Linear(16, v)
    target = torch.randint(0, v, (n,))
    target[::5] = -100  # ignored rows get no gradient

    class Loss(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head
            self.register_buffer("target", target)

        def forward(self, x):
            out = nn.functional.cross_entropy(self.head(x), self.target, reduction=reduction)
            return out if reduction != "none" else out.sum()

    module, x = Loss(), torch.randn(n, 16)
    tg = lower_training(module, (x,), loss=lambda out: out)
    kinds = collections.Counter(op.op_type for op in tg.graph.ops)
    assert kinds["aten.nll_loss_backward.default"] == kinds["aten._log_softmax_backward_data.default"] == 0
    assert kinds["aten.scatter_add.default"] == 1
    logits = n * v * 4
    target64 = get_target("cpu", capacity=None)
    assert max(op_working_set(tg.graph, op.id, False, 1) for op in tg.graph.ops) < 2.5 * logits
    step = TrainingStep(tg, remat.solve(tg.graph, target64, budget=1.0, time_limit=10).plan)
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    (loss,) = step(*params, module.target, x)
    loss.backward()
    ref = module(x)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for p, q in zip(params, module.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-5 * q.grad.abs().max()

"""fx and ONNX lowerings of the registry models agree on total activation bytes (within 5%).

What makes them agree, each checked against PyTorch itself: BatchNorm folded,
max-pool indices dropped, GELU written as arithmetic fused into aten.gelu and adds of
an all-zero constant mask dropped in fx eval graphs (frontends.fx_inference, fx_fuse); ONNX
Transpose / Split / Reshape as views exactly where ATen's view and matmul would
take views (frontends.onnx_layout, compared with torch on random layouts and with
the fx lowering of the same matmuls); fx graph outputs that reshape a fresh result
written by its op (no copy). Replays of both lowerings equal eager PyTorch.

Every registry model, at its small size in CI and at full size under `-m slow`, lowers through both
frontends, and each lowering gets a baseline plan at M_R that the checker accepts.
"""

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import models
from frontends import Lowered, load_model, with_elem_size
from frontends.fx import lower_module
from frontends.fx_inference import InferenceRewrites
from frontends.onnx import lower_onnx
from frontends.onnx_layout import Layout, contiguous, matmul_copies, view_strides
from planner import bounds
from planner.check import check
from planner.compile import compile as plan_graph
from planner.compile import resolve_target
from planner.graph import LifetimeGraph
from planner.runtime.executor import Executor
from planner.runtime.replay import max_rel_error
from planner.target import Target

T64 = Target("cpu64", None, alignment=64)


def activation_bytes(g: LifetimeGraph) -> int:
    return sum(t.nbytes for t in g.tensors if t.alias_of is None and t.kind in ("activation", "output"))


def zoo_spec(name: str, params: dict) -> str:
    return f"zoo:{name}:" + ",".join(f"{k}={v}" for k, v in params.items())


# ---- strides as ATen has them ---------------------------------------------------------------

def _layouts(rng, n):
    """Random strided tensors: a contiguous base, permuted, sometimes sliced along one dimension."""
    for _ in range(n):
        shape = tuple(int(d) for d in rng.choice([1, 2, 3, 4, 6], size=rng.integers(1, 5)))
        t = torch.empty(shape).permute(*rng.permutation(len(shape)).tolist())
        if rng.random() < 0.3:
            d = int(rng.integers(t.dim()))
            if t.shape[d] > 1:
                t = t.narrow(d, 0, t.shape[d] - 1)
        yield t


def _reshapes(shape, rng):
    numel = math.prod(shape)
    divisors = [d for d in range(1, numel + 1) if numel % d == 0]
    yield (numel,)
    yield tuple(shape) + (1,)
    yield (1,) + tuple(d for d in shape if d != 1)
    for _ in range(4):
        a = int(rng.choice(divisors))
        b = int(rng.choice([d for d in divisors if (numel // a) % d == 0]))
        yield (a, b, numel // (a * b))


def test_view_strides_match_aten():
    rng = np.random.default_rng(0)
    checked = refused = 0
    for t in _layouts(rng, 300):
        lay = Layout(tuple(t.shape), tuple(t.stride()))
        for new in _reshapes(t.shape, rng):
            got = view_strides(lay, new)
            try:
                want = t.view(new)
            except RuntimeError:
                assert got is None, (lay, new)
                refused += 1
                continue
            assert got is not None, (lay, new)
            # strides of size-1 dimensions carry no meaning; every other one must be ATen's
            assert [s for s, d in zip(got.strides, new) if d != 1] == \
                [s for s, d in zip(want.stride(), new) if d != 1], (lay, new)
            checked += 1
    assert checked > 500 and refused > 100  # both outcomes well covered


@pytest.mark.parametrize(("a_shape", "a_perm", "b_shape", "b_perm"), [
    ((2, 8, 4, 5), (0, 2, 1, 3), (2, 8, 4, 5), (0, 2, 3, 1)),  # BERT q @ k^T at batch 2: both copied
    ((1, 8, 4, 5), (0, 2, 1, 3), (1, 8, 4, 5), (0, 2, 3, 1)),  # at batch 1: views
    ((2, 8, 4, 5), (0, 1, 2, 3), (5, 7), (0, 1)),  # linear on a contiguous 4-D input: folded, a view
    ((2, 8, 4, 5), (0, 2, 1, 3), (5, 7), (0, 1)),  # linear on a permuted input: copied
    ((3, 1, 4, 5), (0, 1, 2, 3), (6, 5, 2), (0, 1, 2)),  # broadcast batch
    ((4, 5), (1, 0), (2, 4, 3), (0, 1, 2)),  # 2-D @ 3-D
])
def test_matmul_copies_agree_with_the_fx_lowering(a_shape, a_perm, b_shape, b_perm):
    """ATen's matmul decomposition copies an operand exactly where matmul_copies says (clone before bmm / mm)."""
    class MatMul(nn.Module):
        def forward(self, a, b):
            return torch.relu(a).permute(*a_perm) @ torch.relu(b).permute(*b_perm)

    a, b = torch.randn(a_shape), torch.randn(b_shape)
    g = lower_module(MatMul(), (a, b)).graph
    clones = sum(o.op_type == "aten.clone.default" and g.tensors[o.outputs[0]].kind != "output" for o in g.ops)

    def layout(shape, perm):
        base = contiguous(shape)
        return Layout(tuple(shape[p] for p in perm), tuple(base.strides[p] for p in perm))

    predicted = matmul_copies(layout(a_shape, a_perm), layout(b_shape, b_perm))
    assert clones == sum(predicted), (predicted, [o.op_type for o in g.ops])


# ---- the rewrites on real models -------------------------------------------------------------

def _onnx_lowering(name: str, params: dict):
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / f"{name}.onnx")
        models.export_onnx(name, path, **params)
        return lower_onnx(path, load_weights=True, name=name)


def _eager(module, inputs):
    with torch.no_grad():
        out = module(*inputs)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name", ["gpt2", "bert", "vit_b_16"])
def test_onnx_views_replay_equal_to_eager(name):
    """Transpose, Split and Reshape views (and Reshape copies of permuted tensors) replay through the executor."""
    params = models.spec(name).small
    module, inputs = models.build(name, **params)
    lo = _onnx_lowering(name, params)
    g = lo.graph
    view_types = {g.ops[g.producer[t.id]].op_type for t in g.tensors if t.alias_of is not None}
    assert {"Transpose", "Reshape"} <= view_types
    if name in ("gpt2", "vit_b_16"):  # fused QKV projections split in three
        assert "Split" in view_types
    # the attention context, a permuted view, reshaped: copied into a buffer of its own (clone + _unsafe_view)
    copies = [o for o in g.ops if o.op_type == "Reshape" and g.tensors[o.outputs[0]].alias_of is None]
    assert copies and all(g.tensors[o.inputs[0]].alias_of is not None
                          and g.ops[g.producer[o.inputs[0]]].op_type == "Transpose" for o in copies)
    plan = plan_graph(g, T64, planner="baseline")
    out = Executor.from_lowered(lo, plan).run(*inputs)
    assert max_rel_error(out, _eager(module, inputs)) <= 1e-5


def test_lm_head_output_is_written_in_its_shape():
    """fx: logits = mm(x2d, W^T) then _unsafe_view to (batch, seq, vocab). The mm writes the output's shape
    itself (result_shapes), so the graph output needs no copy; replay is unchanged."""
    params = models.spec("gpt2").small
    module, inputs = models.build("gpt2", **params)
    lo = lower_module(module, inputs)
    g = lo.graph
    (out,) = lo.outputs
    head = g.ops[g.producer[out]]
    vocab, batch, seq = params["vocab"], params["batch"], params["seq"]
    assert head.op_type == "aten.mm.default" and g.tensors[out].shape == (batch, seq, vocab)
    assert head.attrs["result_shapes"] == [[batch * seq, vocab]]
    assert not [o for o in g.ops if o.op_type == "aten.clone.default" and o.outputs[0] == out]
    assert not [o for o in g.ops if o.op_type == "aten._unsafe_view.default" and out in o.outputs]
    # split's outputs are views (its schema returns Tensor(a)[])
    (split,) = [o for o in g.ops if o.op_type == "aten.split_with_sizes.default"]
    assert all(g.tensors[t].alias_of == g.root(split.inputs[0]) for t in split.outputs)
    plan = plan_graph(g, T64, planner="baseline")
    assert max_rel_error(Executor.from_lowered(lo, plan).run(*inputs), _eager(module, inputs)) <= 1e-5


class Branches(nn.Module):
    """relu(x) written twice (as NAS cells do), an eval-mode Dropout, and a reshape of a permuted input."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        y = self.drop((torch.relu(x) + 1.0) * torch.relu(x))
        return y, x.permute(0, 2, 1).reshape(x.shape[0], -1) * 2.0


def test_cse_and_identity_clones():
    module, x = Branches().eval(), torch.randn(2, 3, 4)
    raw, lo = lower_module(module, (x,), rewrites=InferenceRewrites.none()), lower_module(module, (x,))

    def count(g, op_type):
        return sum(o.op_type == op_type for o in g.ops)
    assert count(raw.graph, "aten.relu.default") == 2 and count(lo.graph, "aten.relu.default") == 1
    # the Dropout's clone goes; the clone that materialises the permuted input for reshape stays
    assert count(raw.graph, "aten.clone.default") == 2 and count(lo.graph, "aten.clone.default") == 1
    (clone,) = [o for o in lo.graph.ops if o.op_type == "aten.clone.default"]
    assert lo.graph.tensors[clone.inputs[0]].alias_of == lo.inputs[0]
    assert activation_bytes(raw.graph) - activation_bytes(lo.graph) == 2 * (2 * 3 * 4 * 4)
    no_cse = lower_module(module, (x,), rewrites=InferenceRewrites(cse=False)).graph
    assert count(no_cse, "aten.relu.default") == 2 and count(no_cse, "aten.clone.default") == 1
    plan = plan_graph(lo.graph, T64, planner="baseline")
    assert max_rel_error(Executor.from_lowered(lo, plan).run(x), _eager(module, (x,))) <= 1e-6


def test_inplace_through_full_views_only():
    """An element-wise op may take over the root of a full (contiguous, whole) view it reads, never a root
    that another input reads in another element order."""
    class M(nn.Module):
        def forward(self, x):
            a, b = torch.relu(x), torch.exp(x)
            return a + a.t(), torch.sigmoid(b.view(-1)) * 3.0

    x = torch.randn(4, 4)
    lo = lower_module(M(), (x,))
    g = lo.graph
    (add,) = [o for o in g.ops if o.op_type == "aten.add.Tensor"]
    (sig,) = [o for o in g.ops if o.op_type == "aten.sigmoid.default"]
    assert add.inplace_inputs == ()  # a + a.t() written over a would read overwritten elements
    exp_out = next(o.outputs[0] for o in g.ops if o.op_type == "aten.exp.default")
    assert sig.inplace_inputs == (exp_out,) and exp_out in sig.inputs and g.tensors[sig.inputs[0]].alias_of == exp_out
    plan = plan_graph(g, T64, planner="baseline")
    offset = {b.tensor: b.offset for b in plan.buffers}
    assert offset[sig.outputs[0]] == offset[exp_out]  # the baseline takes exp's buffer over: replay does it
    assert max_rel_error(Executor.from_lowered(lo, plan).run(x), _eager(M(), (x,))) <= 1e-6


def test_batchnorm_folded_models_replay_equal_to_eager():
    params = models.spec("mobilenet_v2").small
    module, inputs = models.build("mobilenet_v2", **params)
    lo = lower_module(module, inputs)
    g = lo.graph
    assert not [o for o in g.ops if "batch_norm" in o.op_type]
    folded = [t for t in g.tensors if t.kind == "weight" and t.name.endswith("+bn")]
    assert len(folded) == 2 * sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    plan = plan_graph(g, T64, planner="baseline")
    assert max_rel_error(Executor.from_lowered(lo, plan).run(*inputs), _eager(module, inputs)) <= 1e-5


def test_with_elem_size_equals_lowering_again():
    spec = zoo_spec("bert", models.spec("bert").small)
    fp32 = load_model(spec)
    int8 = with_elem_size(fp32, 1)
    assert int8.graph.fingerprint == load_model(spec, elem_size=1).graph.fingerprint
    assert all(t.nbytes == math.prod(t.shape) for t in int8.graph.tensors)
    assert with_elem_size(int8, None).graph.fingerprint == fp32.graph.fingerprint
    assert int8.weights is fp32.weights and int8.inputs == fp32.inputs and int8.outputs == fp32.outputs


# ---- the acceptance: every registry model, both frontends, a checked baseline plan -------------------
# One lowering per model and frontend serves every assertion (a module-scoped fixture: pytest runs the
# tests of one model together). Full sizes are marked slow: .venv/bin/pytest -m slow tests/test_zoo_lowering.py

# full-size fp32 weights above this are not materialised: fx lowers the module built on the meta device
# (the same graph: tests/test_models_hf.py) and the TorchScript ONNX exporter, which runs it, is skipped
WEIGHT_LIMIT = 4 << 30


@dataclass(frozen=True)
class BothLowerings:
    name: str
    fx: Lowered
    onnx: Lowered | None  # None where the weights are over WEIGHT_LIMIT


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # small graphs on a shared 2-core machine: thread start-up and contention cost more than they give
    # (module scope: set before the module-scoped lowerings)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def lower_both(name: str, params: dict) -> BothLowerings:
    with torch.device("meta"):
        module, _ = models.build(name, **params)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    if weight_bytes <= WEIGHT_LIMIT:
        spec = zoo_spec(name, params)
        return BothLowerings(name, load_model(spec, via="fx"), load_model(spec, via="onnx"))
    with torch.device("meta"):
        module, inputs = models.build(name, **params)
    return BothLowerings(name, lower_module(module, inputs, name=zoo_spec(name, params)), None)


def interface(lo: Lowered) -> list[tuple]:
    g = lo.graph
    return [(g.tensors[t].shape, g.tensors[t].dtype) for t in (*lo.inputs, *lo.outputs)]


def assert_checked_baseline_plan_at_m_r(lo: Lowered) -> None:
    """The baseline pipelines plan the graph at M_R, the least capacity any plan can use; the checker,
    run again here, confirms the plan, which then fills exactly M_R at its peak."""
    target = resolve_target("npu", "M_R", lo.graph)
    plan = plan_graph(lo, target, planner="baseline")
    again = check(lo.graph, plan, target)
    assert again.metrics == plan.metrics
    assert plan.metrics["peak_bytes"] == target.capacity == bounds.m_r(lo.graph, target.include_weights,
                                                                      target.alignment)
    assert plan.metrics["arena_bytes"] <= target.capacity


def assert_frontends_agree(both: BothLowerings) -> None:
    assert interface(both.fx) == interface(both.onnx)  # same inputs and outputs: shapes and dtypes
    fx, onnx_ = activation_bytes(both.fx.graph), activation_bytes(both.onnx.graph)
    assert abs(onnx_ / fx - 1.0) <= 0.05, (both.name, fx, onnx_)


@pytest.fixture(scope="module", params=models.names())
def small(request) -> BothLowerings:
    return lower_both(request.param, models.spec(request.param).small)


def test_small_fx_lowering_gets_a_checked_baseline_plan(small):
    assert_checked_baseline_plan_at_m_r(small.fx)


def test_small_onnx_lowering_gets_a_checked_baseline_plan(small):
    assert_checked_baseline_plan_at_m_r(small.onnx)


def test_small_frontends_agree(small):
    assert_frontends_agree(small)


@pytest.mark.slow
@pytest.mark.parametrize("name", models.names())
def test_full_size_lowers_through_both_frontends_and_plans(name):
    both = lower_both(name, {})
    assert_checked_baseline_plan_at_m_r(both.fx)
    if both.onnx is None:
        pytest.skip(f"{name}: full-size fp32 weights over {WEIGHT_LIMIT >> 30} GiB; fx lowered on the meta device")
    assert_checked_baseline_plan_at_m_r(both.onnx)
    assert_frontends_agree(both)

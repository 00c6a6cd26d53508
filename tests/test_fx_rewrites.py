"""fx rewrites that make the fx lowering agree with ONNX on the Hugging Face models: GELU spelled out in
arithmetic fused into aten.gelu (frontends.fx_fuse), and adds of an all-zero input-independent constant
dropped (frontends.fx_inference). Every rewritten graph gets a checked plan and replays to eager."""

import math
from collections import Counter

import pytest
import torch
from torch import nn

import models
from frontends import Lowered
from frontends.fx import lower_module
from frontends.fx_inference import InferenceRewrites
from planner.compile import compile as plan_graph
from planner.runtime.aten_ops import out_variant
from planner.runtime.executor import Executor
from planner.runtime.replay import max_rel_error
from planner.target import Target

T64 = Target("cpu64", None, alignment=64)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


class GeluNew(nn.Module):
    """transformers' NewGELUActivation (GPT-2), between two linears."""

    def __init__(self, d=16):
        super().__init__()
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def act(self, x):
        return 0.5 * x * (1.0 + torch.tanh(SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3.0))))

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


class CubedReordered(GeluNew):
    """x*x*x, operands swapped, constants written with ten digits, the 0.5 applied last."""

    def act(self, x):
        return x * (torch.tanh((x * x * x * 0.044715 + x) * 0.7978845608) + 1.0) * 0.5


class FastGelu(GeluNew):
    """transformers' FastGELUActivation: the same polynomial, factored as x * (1 + 0.044715 x^2)."""

    def act(self, x):
        return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


class ErfGelu(GeluNew):
    def act(self, x):
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class NotGelu(GeluNew):
    """gelu_new with 0.05 for 0.044715: a different function, left alone."""

    def act(self, x):
        return 0.5 * x * (1.0 + torch.tanh(SQRT_2_OVER_PI * (x + 0.05 * torch.pow(x, 3.0))))


class TanhAlsoReturned(GeluNew):
    """gelu_new whose tanh is also an output: it must be computed, so nothing is fused."""

    def forward(self, x):
        h = self.fc(x)
        t = torch.tanh(SQRT_2_OVER_PI * (h + 0.044715 * torch.pow(h, 3.0)))
        return self.proj(0.5 * h * (1.0 + t)), t


def _ops(lo: Lowered) -> Counter:
    return Counter(o.op_type for o in lo.graph.ops)


def _activation_bytes(lo: Lowered) -> int:
    return sum(t.nbytes for t in lo.graph.tensors if t.alias_of is None and t.kind in ("activation", "output"))


def _eager(module, inputs):
    with torch.no_grad():
        out = module(*inputs)
    return out if isinstance(out, tuple) else (out,)


def _replay_error(lo: Lowered, module, inputs) -> float:
    plan = plan_graph(lo.graph, T64, planner="baseline")  # checked by the checker before it is returned
    return max_rel_error(Executor.from_lowered(lo, plan).run(*inputs), _eager(module, inputs))


@pytest.mark.parametrize(("cls", "approximate"), [(GeluNew, "tanh"), (CubedReordered, "tanh"),
                                                  (FastGelu, "tanh"), (ErfGelu, None)])
def test_gelu_arithmetic_fuses_into_one_gelu(cls, approximate):
    torch.manual_seed(0)
    module, x = cls().eval(), torch.randn(2, 5, 16)
    lo = lower_module(module, (x,))
    ops = _ops(lo)
    (gelu,) = [o for o in lo.graph.ops if o.op_type == "aten.gelu.default"]
    assert gelu.attrs["kwargs"] == ({} if approximate is None else {"approximate": approximate})
    assert ops["aten.tanh.default"] == ops["aten.erf.default"] == ops["aten.pow.Tensor_Scalar"] == 0
    assert ops["aten.mul.Tensor"] == ops["aten.add.Tensor"] == ops["aten.div.Tensor"] == 0
    # gelu reads the first linear's output (a 3-D view of addmm's) and writes one buffer of that size
    (fc,) = [o for o in lo.graph.ops if o.op_type == "aten.addmm.default" and o.outputs[0] != lo.outputs[0]]
    assert lo.graph.root(gelu.inputs[0]) == fc.outputs[0]
    raw = lower_module(module, (x,), rewrites=InferenceRewrites(fuse_gelu=False))
    arithmetic = sum(_ops(raw)[t] for t in ("aten.mul.Tensor", "aten.add.Tensor", "aten.div.Tensor",
                                            "aten.pow.Tensor_Scalar", "aten.tanh.default", "aten.erf.default"))
    assert _activation_bytes(raw) - _activation_bytes(lo) == (arithmetic - 1) * 2 * 5 * 64 * 4
    assert _replay_error(lo, module, (x,)) <= 1e-5


@pytest.mark.parametrize("cls", [NotGelu, TanhAlsoReturned])
def test_what_is_not_gelu_or_is_read_elsewhere_stays(cls):
    torch.manual_seed(0)
    module, x = cls().eval(), torch.randn(2, 5, 16)
    lo = lower_module(module, (x,))
    raw = lower_module(module, (x,), rewrites=InferenceRewrites(fuse_gelu=False))
    assert _ops(lo)["aten.gelu.default"] == 0 and _ops(lo)["aten.tanh.default"] == 1
    assert _ops(lo) == _ops(raw)
    assert _replay_error(lo, module, (x,)) <= 1e-5


def test_gelu_tanh_replays_through_its_out_kernel():
    variant = out_variant(torch.ops.aten.gelu.default)
    assert variant is not None and variant.native["cpu"] and "approximate" in variant.keep_kwargs
    x = torch.randn(3, 1000) * 4
    out = torch.empty_like(x)
    variant.op(x, approximate="tanh", out=out)
    assert torch.equal(out, torch.nn.functional.gelu(x, approximate="tanh"))
    assert max_rel_error((out,), (GeluNew().act(x),)) <= 1e-5


@pytest.mark.parametrize(("cls", "fused"), [(GeluNew, True), (ErfGelu, True), (NotGelu, False)])
def test_training_graphs_fuse_gelu_before_differentiating(cls, fused):
    """Through torch.compile, GELU spelled out in the Dynamo graph becomes one gelu whose backward is
    one gelu_backward; the step's gradients are eager's (arithmetic GELU) within float rounding."""
    pytest.importorskip("ortools")
    from formulations import remat
    from frontends.training import lower_joint
    from planner.runtime.training import TrainingStep

    torch.manual_seed(0)
    module, x = cls(), torch.randn(2, 5, 16)
    captured = {}

    def backend(gm, example_inputs):
        from planner.runtime.backend import _static_inputs

        captured["tg"] = lower_joint(gm, example_inputs, _static_inputs(gm, example_inputs), name=cls.__name__)
        return gm.forward
    torch.compile(lambda m, x: m(x).sum(), backend=backend)(module, x)
    tg = captured["tg"]
    ops = Counter(op.op_type for op in tg.graph.ops)
    assert (ops["aten.gelu.default"], ops["aten.gelu_backward.default"]) == ((1, 1) if fused else (0, 0))
    assert ops["aten.tanh.default"] + ops["aten.erf.default"] == (0 if fused else 1)
    step = TrainingStep(tg, remat.solve(tg.graph, T64, budget=1.0, time_limit=10).plan)
    n_primals = sum(not name.startswith("tangent") for name in tg.input_names)
    primals = [p.detach().clone().requires_grad_() if i in tg.weight_inputs else p
               for i, p in enumerate(tg.joint_inputs[:n_primals])]
    (loss,) = step(*primals)
    loss.backward()
    ref = module(x).sum()
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    by_ptr = {q.data_ptr(): q for q in module.parameters()}
    assert len(tg.weight_inputs) == len(by_ptr)
    for i in tg.weight_inputs:
        q = by_ptr[tg.joint_inputs[i].data_ptr()]
        assert (primals[i].grad - q.grad).abs().max() <= 1e-5 * q.grad.abs().max()


class MaskedScores(nn.Module):
    """Attention scores plus an additive mask built from factories alone, as transformers'
    create_bidirectional_mask does under torch.export: all zeros when `causal` is False."""

    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal

    def forward(self, q, k):
        n = q.shape[-2]
        pos = torch.arange(n)
        allowed = (pos[None, :] <= pos[:, None]) if self.causal else (pos[:, None] >= 0).expand(n, n)
        mask = torch.where(allowed, 0.0, torch.finfo(q.dtype).min)
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25 + mask, dim=-1)


def test_add_of_an_all_zero_constant_mask_disappears():
    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    module = MaskedScores(causal=False).eval()
    lo = lower_module(module, (q, k))
    raw = lower_module(module, (q, k), rewrites=InferenceRewrites(drop_zero_adds=False))
    assert _ops(raw)["aten.add.Tensor"] == 1 and _ops(raw)["aten.where.self"] == 1
    ops = _ops(lo)
    assert ops["aten.add.Tensor"] == ops["aten.where.self"] == ops["aten.arange.start_step"] == 0
    assert ops["aten.ge.Scalar"] == ops["aten.scalar_tensor.default"] == 0  # the mask's whole subgraph went too
    assert len(lo.graph.ops) == len(raw.graph.ops) - 8
    (softmax,) = [o for o in lo.graph.ops if o.op_type == "aten._softmax.default"]
    assert lo.graph.ops[lo.graph.producer[softmax.inputs[0]]].op_type == "aten.mul.Tensor"
    scores = 2 * 4 * 6 * 6 * 4
    # the sum, the mask, arange (int64), ge (bool, 6 x 1) and where's two 0-dim operands
    assert _activation_bytes(raw) - _activation_bytes(lo) == scores + 6 * 6 * 4 + 6 * 8 + 6 + 2 * 4
    assert _replay_error(lo, module, (q, k)) == 0.0


def test_nonzero_masks_and_zero_weights_stay():
    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    causal = MaskedScores(causal=True).eval()
    lo = lower_module(causal, (q, k))
    assert _ops(lo)["aten.add.Tensor"] == 1 and _ops(lo)["aten.where.self"] == 1
    assert _replay_error(lo, causal, (q, k)) <= 1e-6

    class ZeroBias(nn.Module):  # a parameter that is zero now may be loaded with other values: not a constant
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(8))

        def forward(self, x):
            return torch.relu(x) + self.bias

    lo = lower_module(ZeroBias().eval(), (q,))
    assert _ops(lo)["aten.add.Tensor"] == 1


def test_zero_add_stays_where_the_sum_has_another_layout_or_dtype():
    class M(nn.Module):
        def forward(self, x):
            same = torch.relu(x).t() + torch.zeros(6, 4)  # TensorIterator lays the sum out as x.t(): dropped
            other = torch.zeros(6, 4) + torch.exp(x).t()  # laid out as the contiguous zeros: x.t() is not
            promoted = torch.sigmoid(x).to(torch.float16) + torch.zeros(4, 6)  # float16 + float32 is float32
            return same.reshape(-1), other.reshape(-1), promoted

    x = torch.randn(4, 6)
    lo = lower_module(M().eval(), (x,))
    adds = [o for o in lo.graph.ops if o.op_type == "aten.add.Tensor"]
    producers = sorted(lo.graph.ops[lo.graph.producer[lo.graph.root(t)]].op_type for o in adds for t in o.inputs)
    assert producers == ["aten._to_copy.default", "aten.exp.default", "aten.full.default", "aten.full.default"]
    assert _replay_error(lo, M(), (x,)) == 0.0


@pytest.mark.skipif("hf_gpt2" not in models.names(), reason="needs the hf extra (transformers)")
def test_hf_models_lose_the_arithmetic_gelu_and_the_zero_mask():
    torch.manual_seed(0)
    params = models.spec("hf_gpt2").small
    module, inputs = models.build("hf_gpt2", **params)
    lo = lower_module(module, inputs)
    ops = _ops(lo)
    assert ops["aten.gelu.default"] == params["layers"] and ops["aten.tanh.default"] == 0
    assert _replay_error(lo, module, inputs) <= 1e-5

    params = models.spec("hf_vit").small
    module, inputs = models.build("hf_vit", **params)
    lo = lower_module(module, inputs, rewrites=InferenceRewrites(fuse_attention=False))
    softmax_inputs = [lo.graph.ops[lo.graph.producer[o.inputs[0]]].op_type
                      for o in lo.graph.ops if o.op_type == "aten._softmax.default"]
    assert softmax_inputs == ["aten.mul.Tensor"] * params["layers"]
    assert _ops(lo)["aten.where.self"] == 0
    assert _replay_error(lo, module, inputs) <= 1e-5
    fused = lower_module(module, inputs)  # with attention fused (frontends.fx_attention): no mask at all
    attention = [o for o in fused.graph.ops if o.op_type == "aten.scaled_dot_product_attention.default"]
    assert len(attention) == params["layers"] and all(o.attrs["args"][3] is None for o in attention)
    assert _replay_error(fused, module, inputs) <= 1e-5

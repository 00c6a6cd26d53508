"""Spelled-out attention fused into one op by both frontends (frontends.fx_attention, frontends.onnx_attention).

fx: aten.scaled_dot_product_attention.default; ONNX: the standard Attention op. Each fused graph has
no tensor of the scores' shape, replays equal to eager PyTorch and plans the same activation bytes in
both frontends; attention whose scores or probabilities something else reads is left alone.
"""

import math
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from frontends.fx import lower_module
from frontends.fx_inference import InferenceRewrites
from frontends.onnx import lower_onnx
from planner.compile import compile as plan_graph
from planner.runtime.executor import Executor
from planner.runtime.replay import max_rel_error
from planner.target import Target

T64 = Target("cpu64", None, alignment=64)
SDPA = "aten.scaled_dot_product_attention.default"
B, H, L, S, D = 2, 3, 5, 7, 4  # distinct sizes: a (B, H, L, S) tensor can only be scores or probabilities


class Attention(nn.Module):
    """q from x (B, L, H*D), k and v from memory (B, S, H*D); `form` picks how the scores are written."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.q, self.k, self.v = (nn.Linear(H * D, H * D) for _ in range(3))

    def forward(self, x, memory, mask):
        def heads(t):
            return t.unflatten(-1, (H, D)).transpose(1, 2)
        q, k, v = heads(self.q(x)), heads(self.k(memory)), heads(self.v(memory))
        scores = q @ k.transpose(-2, -1)
        if self.form == "div":
            scores = scores / math.sqrt(D)
        else:
            scores = scores * (1.0 / math.sqrt(D))
        if self.form == "additive":
            scores = scores + mask  # (B, 1, L, S) float
        elif self.form == "masked_fill":
            scores = scores.masked_fill(mask < 0, float("-inf"))  # a run-time condition
        elif self.form == "causal":
            future = torch.ones(L, S, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        elif self.form == "banded":  # an input-independent mask that is not causal
            far = torch.ones(L, S, dtype=torch.bool, device=x.device).triu(3)
            scores = scores.masked_fill(far, float("-inf"))
        elif self.form == "where":
            scores = torch.where(mask >= 0, scores, float("-inf"))
        probs = scores.softmax(dim=-1)
        return (probs @ v).transpose(1, 2).flatten(2) * 2.0


def inputs():
    gen = torch.Generator().manual_seed(0)
    mask = torch.randn(B, 1, L, S, generator=gen)
    mask[..., 0] = 1.0  # every row attends somewhere (an all -inf row is NaN in eager and fused alike)
    return torch.randn(B, L, H * D, generator=gen), torch.randn(B, S, H * D, generator=gen), mask


def eager(module, args):
    with torch.no_grad():
        out = module(*args)
    return out if isinstance(out, tuple) else (out,)


def replay(lo, args):
    plan = plan_graph(lo.graph, T64, planner="baseline")
    return Executor.from_lowered(lo, plan).run(*args)


def scores_tensors(g):
    """Activations that own storage and have the scores' shape (4-D, or bmm's 3-D)."""
    return [t for t in g.tensors if t.alias_of is None and t.kind in ("activation", "output")
            and tuple(t.shape) in ((B, H, L, S), (B * H, L, S))]


def activation_bytes(g) -> int:
    return sum(t.nbytes for t in g.tensors if t.alias_of is None and t.kind in ("activation", "output"))


def mask_bytes(g, tid: int) -> int:
    """Bytes of the activations that owned storage on the way to tensor `tid` (itself included)."""
    seen, stack = set(), [tid]
    while stack:
        t = stack.pop()
        if t in seen or g.tensors[t].kind != "activation":
            continue
        seen.add(t)
        stack.extend(g.ops[g.producer[t]].inputs)
    return sum(g.tensors[t].nbytes for t in seen if g.tensors[t].alias_of is None)


def onnx_lowering(module, args):
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "attention.onnx")
        with torch.no_grad():
            torch.onnx.export(module, args, path, dynamo=False, opset_version=17,
                              input_names=["x", "memory", "mask"])
        return lower_onnx(path, load_weights=True)


@pytest.mark.parametrize("form", ["mul", "div", "additive", "masked_fill", "causal", "banded", "where"])
def test_fused_attention_has_no_scores_buffer_and_replays_equal_to_eager(form):
    module, args = Attention(form).eval(), inputs()
    want = eager(module, args)
    raw = lower_module(module, args, rewrites=InferenceRewrites(fuse_attention=False))
    assert len(scores_tensors(raw.graph)) >= 2  # scores and probabilities, unfused
    lo = lower_module(module, args)
    g = lo.graph
    (op,) = [o for o in g.ops if o.op_type == SDPA]
    assert not [o for o in g.ops if "softmax" in o.op_type] and not scores_tensors(g)
    _, _, _, mask, dropout, is_causal = op.attrs["args"]
    assert dropout == 0.0 and op.attrs["kwargs"]["scale"] == pytest.approx(1.0 / math.sqrt(D), rel=1e-12)
    assert is_causal == (form == "causal")
    assert (mask is None) == (form in ("mul", "div", "causal"))
    if form in ("masked_fill", "banded"):  # the condition marks masked positions: the op reads its negation
        assert g.ops[g.producer[mask["t"]]].op_type == "aten.logical_not.default"
    assert max_rel_error(replay(lo, args), want) <= 1e-5

    onnx_lo = onnx_lowering(module, args)
    og = onnx_lo.graph
    (att,) = [o for o in og.ops if o.op_type == "Attention"]
    assert not [o for o in og.ops if o.op_type == "Softmax"] and not scores_tensors(og)
    assert att.attrs["attributes"]["is_causal"] == int(form == "causal")
    assert att.attrs["attributes"]["scale"] == pytest.approx(1.0 / math.sqrt(D), rel=1e-6)
    used = args[:len(onnx_lo.inputs)]  # the exporter leaves out the mask where nothing reads it
    assert max_rel_error(replay(onnx_lo, used), want) <= 1e-5
    # the same buffers in both frontends, but for a constant mask: fx computes it at run time (as eager
    # PyTorch does), ONNX folds it
    constant_mask = mask_bytes(g, mask["t"]) if form == "banded" else 0
    assert activation_bytes(og) == activation_bytes(g) - constant_mask


class Leaky(nn.Module):
    """Attention-shaped graphs that must stay as written: `reader` says what else reads the intermediates."""

    def __init__(self, reader: str):
        super().__init__()
        self.reader = reader

    def forward(self, q, k, v):
        scores = q @ k.transpose(-2, -1) * 0.5
        if self.reader == "scale_after_mask":  # (scores + mask) * s is not q k^T s + mask
            scores = (q @ k.transpose(-2, -1) + q[..., :1]) * 0.5
        probs = scores.softmax(dim=-1)
        if self.reader == "no_matmul":
            return probs * 2.0
        out = probs @ v
        if self.reader == "scores":
            return out, scores.amax(dim=-1)
        if self.reader == "probs":
            return out, probs
        return (out,)


@pytest.mark.parametrize("reader", ["no_matmul", "scores", "probs", "scale_after_mask"])
def test_attention_with_other_readers_is_left_alone(reader):
    module = Leaky(reader).eval()
    gen = torch.Generator().manual_seed(1)
    args = tuple(torch.randn(B, H, n, D, generator=gen) for n in (L, S, S))
    lo = lower_module(module, args)
    g = lo.graph
    assert not [o for o in g.ops if o.op_type == SDPA]
    assert [o for o in g.ops if o.op_type == "aten._softmax.default"]
    assert max_rel_error(replay(lo, args), eager(module, args)) <= 1e-5
    og = onnx_lowering_qkv(module, args).graph
    assert not [o for o in og.ops if o.op_type == "Attention"] and [o for o in og.ops if o.op_type == "Softmax"]


def onnx_lowering_qkv(module, args):
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "leaky.onnx")
        with torch.no_grad():
            torch.onnx.export(module, args, path, dynamo=False, opset_version=17, input_names=["q", "k", "v"])
        return lower_onnx(path, load_weights=True)


def test_switch_off_keeps_the_matmuls():
    module, args = Attention("mul").eval(), inputs()
    g = lower_module(module, args, rewrites=InferenceRewrites(fuse_attention=False)).graph
    assert not [o for o in g.ops if o.op_type == SDPA]
    assert sum(o.op_type == "aten.bmm.default" for o in g.ops) == 2


@pytest.mark.parametrize("name", ["bert", "gpt2", "vit_b_16", "transformer", "hf_bert", "hf_gpt2", "hf_vit",
                                  "hf_llama"])
def test_models_fuse_every_attention_in_both_frontends(name):
    if name not in models.names():
        pytest.skip(f"{name}: transformers is not installed")
    params = models.spec(name).small
    module, args = models.build(name, **params)
    module.eval()
    want = eager(module, args)
    lo = lower_module(module, args)
    fused = [o for o in lo.graph.ops if o.op_type == SDPA]
    assert fused and not [o for o in lo.graph.ops if "softmax" in o.op_type]
    causal = {"gpt2": True, "hf_gpt2": False, "hf_llama": False}  # transformers passes its causal mask as a tensor
    if name in causal:
        assert all(o.attrs["args"][5] == causal[name] for o in fused)
    assert max_rel_error(replay(lo, args), want) <= 1e-5
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / f"{name}.onnx")
        models.export_onnx(name, path, **params)
        onnx_lo = lower_onnx(path, load_weights=True, name=name)
    attention = [o for o in onnx_lo.graph.ops if o.op_type == "Attention"]
    assert len(attention) == len(fused) and not [o for o in onnx_lo.graph.ops if o.op_type == "Softmax"]
    assert max_rel_error(replay(onnx_lo, args), want) <= 1e-5


class MaskedSDPA(nn.Module):
    """SDPA with a mask built from positions inside the model, as libraries build one when they trace."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.qkv = nn.Linear(H * D, 3 * H * D)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.unflatten(-1, (H, D)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        pos = torch.arange(n, device=x.device)
        allowed = pos[None, :] <= pos[:, None]
        if self.kind == "window":  # not causal: only the last two positions
            allowed = allowed & (pos[:, None] - pos[None, :] < 2)
        mask = allowed[None, None].expand(b, 1, n, n)
        if self.kind == "additive_min":
            mask = torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
        elif self.kind in ("additive", "window"):
            mask = torch.where(mask, 0.0, float("-inf"))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("kind", ["bool", "additive", "additive_min", "window"])
def test_traced_causal_masks_become_is_causal(kind):
    """A training graph keeps SDPA as one kernel (forward and backward): a causal mask computed from
    positions becomes is_causal=True in both, other masks stay; either way the step gives eager's
    results."""
    from formulations import remat
    from frontends.training import lower_training
    from planner.runtime.training import TrainingStep

    torch.manual_seed(0)
    module, x = MaskedSDPA(kind), torch.randn(B, L, H * D)
    causal = kind != "window"
    tg = lower_training(module, (x,), name=f"masked_{kind}")
    kernels = [n for n in tg.joint_module.graph.nodes if "scaled_dot_product" in str(n.target)]
    assert len(kernels) == 2  # forward and backward
    for n in kernels:
        mask = n.kwargs.get("attn_mask", n.args[3] if "efficient" in str(n.target) else None)
        assert (mask is None and True in (*n.args, *n.kwargs.values())) == causal, n.format_node()
    step = TrainingStep(tg, remat.solve(tg.graph, T64, budget=1.0, time_limit=10).plan)
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    (loss,) = step(*params, x)
    loss.backward()
    ref = module(x).float().mean()
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for p, q in zip(params, module.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-5 * q.grad.abs().max()

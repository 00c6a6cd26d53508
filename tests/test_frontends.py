"""Frontends: torch modules (fx) and ONNX files lowered to the same LifetimeGraph IR.

Models are tiny and defined here; every ONNX file is exported into tmp_path with
the TorchScript exporter (opset 17), the way real-world files are made.
"""

import collections
import json
import math
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from frontends import FrontendError, load_model
from frontends.fx import lower_graph_module, lower_module
from frontends.fx_inference import InferenceRewrites
from frontends.onnx import lower_onnx, onnx_weights
from frontends.onnx_fold import evaluate
from planner.graph import LifetimeGraph


class SmallResNet(nn.Module):
    """Stem conv-BN-ReLU-maxpool, one basic block with a residual add, global pool, linear."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pool, self.fc = nn.MaxPool2d(2), nn.Linear(8, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn0(self.stem(x))))
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def _heads(t, b, s, h):  # (b, s, d) -> (b, h, s, d/h), shapes read at run time like HF models do
    return t.view(b, s, h, t.shape[-1] // h).transpose(1, 2)


class TinyBert(nn.Module):
    """BERT-style encoder: word + position embeddings, post-norm layers with q/k/v linears,
    erf GELU, and an additive padding mask built from a second input."""

    def __init__(self, vocab=50, d=32, heads=4, layers=2, ff=128, max_pos=64):
        super().__init__()
        self.heads = heads
        self.word, self.pos, self.ln = nn.Embedding(vocab, d), nn.Embedding(max_pos, d), nn.LayerNorm(d)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(
            q=nn.Linear(d, d), k=nn.Linear(d, d), v=nn.Linear(d, d), o=nn.Linear(d, d), ln1=nn.LayerNorm(d),
            ff1=nn.Linear(d, ff), ff2=nn.Linear(ff, d), ln2=nn.LayerNorm(d))) for _ in range(layers))
        self.act = nn.GELU()

    def forward(self, ids, mask):
        b, s = ids.shape
        x = self.ln(self.word(ids) + self.pos(torch.arange(s)))
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
        for L in self.layers:
            q, k, v = (_heads(L[n](x), b, s, self.heads) for n in "qkv")
            p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias, dim=-1)
            ctx = (p @ v).transpose(1, 2).reshape(b, s, -1)
            x = L["ln1"](x + L["o"](ctx))
            x = L["ln2"](x + L["ff2"](self.act(L["ff1"](x))))
        return x


class Conv1D(nn.Module):
    """GPT-2's linear layer: addmm over the flattened tokens, weight stored (in, out)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(d_in, d_out) * 0.02), nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class TinyGPT2(nn.Module):
    """GPT-2-style decoder: pre-norm blocks, fused QKV split in three, causal mask sliced from
    a registered buffer, tanh GELU, tied LM head."""

    def __init__(self, vocab=50, d=32, heads=4, layers=2, n_ctx=32):
        super().__init__()
        self.heads = heads
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(n_ctx, d)
        self.register_buffer("causal", torch.tril(torch.ones(n_ctx, n_ctx, dtype=torch.bool)))
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(d), attn=Conv1D(d, 3 * d), proj=Conv1D(d, d), ln2=nn.LayerNorm(d),
            fc=Conv1D(d, 4 * d), out=Conv1D(4 * d, d))) for _ in range(layers))
        self.ln_f, self.act = nn.LayerNorm(d), nn.GELU(approximate="tanh")

    def forward(self, ids):
        b, s = ids.shape
        x = self.wte(ids) + self.wpe(torch.arange(s))
        keep = self.causal[:s, :s]
        for B in self.blocks:
            q, k, v = (_heads(t, b, s, self.heads) for t in B["attn"](B["ln1"](x)).split(x.shape[-1], dim=-1))
            w = torch.where(keep, q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), torch.finfo(x.dtype).min)
            x = x + B["proj"]((torch.softmax(w, dim=-1) @ v).transpose(1, 2).reshape(b, s, -1))
            x = x + B["out"](self.act(B["fc"](B["ln2"](x))))
        return self.ln_f(x) @ self.wte.weight.t()


def activation_bytes(g: LifetimeGraph) -> int:
    """Bytes of every tensor computed by the graph that owns storage."""
    return sum(t.nbytes for t in g.tensors if t.alias_of is None and t.kind in ("activation", "output"))


def ops_of(g: LifetimeGraph, op_type: str):
    return [o for o in g.ops if o.op_type == op_type]


def export(module, inputs, path, dynamic=None, opset=17) -> str:
    names = [f"input{i}" for i in range(len(inputs))]
    with torch.no_grad():
        torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=opset, input_names=names,
                          dynamic_axes=dynamic)
    return str(path)


def assert_static_and_serialisable(g: LifetimeGraph, elem_size=None) -> None:
    item = {"float32": 4, "int64": 8, "bool": 1, "float64": 8, "int32": 4}
    for t in g.tensors:
        assert all(isinstance(d, int) and d >= 0 for d in t.shape), t
        assert t.nbytes == math.prod(t.shape) * (elem_size or item[t.dtype]), t
    blob = json.dumps(g.to_dict(), allow_nan=False)  # attrs must be strict JSON
    assert LifetimeGraph.from_dict(json.loads(blob)).fingerprint == g.fingerprint


def replay_fx(lo, inputs):
    """Run an fx lowering op by op from its attrs alone (the replay contract), on the CPU."""
    g = lo.graph
    env = dict(zip(lo.inputs, inputs))
    env.update({t.id: lo.weights[t.name] for t in g.tensors if t.name in lo.weights})

    def decode(v):
        if isinstance(v, list):
            return [decode(x) for x in v]
        if isinstance(v, dict):
            if set(v) == {"t"}:
                return env[v["t"]]
            if set(v) == {"dtype"}:
                return getattr(torch, v["dtype"])
            if set(v) == {"device"}:
                return torch.device(v["device"])
            if set(v) in ({"layout"}, {"memory_format"}):
                return getattr(torch, next(iter(v.values())).removeprefix("torch."))
            if set(v) == {"float"}:
                return float(v["float"])
            raise AssertionError(f"unknown encoding {v}")
        return v

    for op in g.ops:
        namespace, name, overload = op.attrs["target"].split(".")
        fn = getattr(getattr(getattr(torch.ops, namespace), name), overload)
        result = fn(*decode(op.attrs["args"]), **{k: decode(v) for k, v in op.attrs["kwargs"].items()})
        positions = op.attrs["results"]
        values = [result] if positions is None else [result[p] for p in positions]
        # result_shapes: the op writes a reshaped graph output, in the tensor's shape
        env.update((t, v.view(g.tensors[t].shape)) for t, v in zip(op.outputs, values))
    return [env[t] for t in lo.outputs]


def replay_onnx(lo, inputs, opset):
    """Run an ONNX lowering op by op from its attrs with onnx.reference (fused ops at their own opsets)."""
    g = lo.graph
    env = {t: np.asarray(x) for t, x in zip(lo.inputs, inputs)}
    env.update({t.id: lo.weights[t.name] for t in g.tensors if t.name in lo.weights})

    def array(enc):
        return np.array(enc["value"], dtype=enc["dtype"]).reshape(enc["shape"])

    for op in g.ops:
        a = op.attrs
        n_in = max([*a["input_positions"], *map(int, a["const_inputs"]), -1]) + 1
        feeds = [None] * n_in
        for tid, pos in zip(op.inputs, a["input_positions"]):
            feeds[pos] = env[tid]
        for pos, enc in a["const_inputs"].items():
            feeds[int(pos)] = array(enc)
        if a["onnx_op"] == "MatMulAdd":
            outs = [feeds[0] @ feeds[1] + feeds[2]]
        elif a["onnx_op"] == "Gelu":  # onnx.reference has no Gelu kernel
            outs = [nn.functional.gelu(torch.from_numpy(feeds[0]), approximate=a["attributes"]["approximate"]).numpy()]
        elif a["onnx_op"] == "Swish":
            outs = [nn.functional.silu(torch.from_numpy(feeds[0])).numpy()]
        else:
            attributes = {k: numpy_helper.from_array(array(v)) if isinstance(v, dict) else v
                          for k, v in a["attributes"].items()}
            names = [f"i{i}" if x is not None else "" for i, x in enumerate(feeds)]
            node = helper.make_node(a["onnx_op"], names, [f"o{p}" for p in a["output_positions"]], **attributes)
            version = 17 if a["onnx_op"] == "LayerNormalization" else opset
            outs = evaluate(node, {n: x for n, x in zip(names, feeds) if n}, version)
        env.update(zip(op.outputs, outs))
    return [env[t] for t in lo.outputs]


# ---- the CNN through both frontends -------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return SmallResNet().eval(), (torch.randn(2, 3, 16, 16),)


@pytest.fixture(scope="module")
def resnet_fx(resnet):
    return lower_module(*resnet)


@pytest.fixture(scope="module")
def resnet_fx_raw(resnet):  # as exported: no inference rewrites
    return lower_module(*resnet, rewrites=InferenceRewrites.none())


@pytest.fixture(scope="module")
def resnet_onnx_path(resnet, tmp_path_factory):
    return export(*resnet, tmp_path_factory.mktemp("cnn") / "resnet.onnx")


def test_cnn_fx_lowering(resnet, resnet_fx_raw):
    resnet_fx = resnet_fx_raw
    g, module = resnet_fx.graph, resnet[0]
    assert resnet_fx.source == "fx"
    counts = collections.Counter(o.op_type for o in g.ops)
    assert counts["aten.convolution.default"] == 3 and counts["aten.relu.default"] == 3
    assert counts["aten.add.Tensor"] == 1 and counts["aten.addmm.default"] == 1
    # parameters and used buffers are weights, by their module names; num_batches_tracked is never read
    assert set(resnet_fx.weights) == {k for k in module.state_dict() if "num_batches" not in k}
    for t in g.tensors:
        if t.name in resnet_fx.weights:
            assert t.kind == "weight" and resnet_fx.weights[t.name].shape == t.shape
    (x,) = resnet_fx.inputs
    assert g.tensors[x].kind == "input" and g.tensors[x].shape == (2, 3, 16, 16)
    (y,) = resnet_fx.outputs
    assert g.tensors[y].kind == "output" and g.tensors[y].shape == (2, 10) and g.tensors[y].alias_of is None
    # flatten and the transposed fc weight are views; the view of a weight is rooted at the weight
    views = {g.ops[g.producer[t.id]].op_type: t for t in g.tensors if t.alias_of is not None}
    assert set(views) == {"aten.view.default", "aten.permute.default"}
    assert g.tensors[views["aten.permute.default"].alias_of].name == "fc.weight"
    assert g.ops[g.producer[views["aten.view.default"].alias_of]].op_type == "aten.mean.dim"
    # in-place candidates: every relu over its input, the add over both summands; conv never
    for op in ops_of(g, "aten.relu.default"):
        assert op.inplace_inputs == op.inputs
    (add,) = ops_of(g, "aten.add.Tensor")
    assert set(add.inplace_inputs) == set(add.inputs) and len(add.inputs) == 2
    assert all(not o.inplace_inputs for o in ops_of(g, "aten.convolution.default"))
    # FLOPs: conv = 2 * output elements * (Cin * kh * kw); element-wise = output elements
    stem = ops_of(g, "aten.convolution.default")[0]
    assert stem.flops == 2 * (2 * 8 * 16 * 16) * (3 * 3 * 3)
    assert ops_of(g, "aten.relu.default")[0].flops == 2 * 8 * 16 * 16
    assert ops_of(g, "aten.addmm.default")[0].flops == 2 * 2 * 10 * 8
    # attrs carry what a replay needs
    assert stem.attrs == {"target": "aten.convolution.default",
                          "args": [{"t": x}, {"t": stem.inputs[1]}, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1],
                          "kwargs": {}, "results": None}
    (bn, *_) = ops_of(g, "aten._native_batch_norm_legit_no_training.default")
    assert bn.attrs["results"] == [0, 1, 2] and len(bn.outputs) == 3
    assert_static_and_serialisable(g)
    with torch.no_grad():
        (got,) = replay_fx(resnet_fx, resnet[1])
        assert torch.allclose(got, module(*resnet[1]), atol=1e-5)


def test_cnn_onnx_matches_fx(resnet_onnx_path, resnet_fx):
    model = onnx.load(resnet_onnx_path)
    identities = [n for n in model.graph.node if n.op_type == "Identity"]
    assert len(identities) == 2  # the exporter's copies of the (identical, zero) folded conv biases
    lo = lower_onnx(resnet_onnx_path)
    g, fx = lo.graph, resnet_fx.graph
    assert lo.source == "onnx" and not lo.weights  # not asked to load them
    assert not ops_of(g, "Identity")
    copied = {n.input[0] for n in identities}
    biases = [g.tensors[conv.inputs[2]] for conv in ops_of(g, "Conv")]
    assert all(b.kind == "weight" for b in biases)
    assert [b.name for b in biases] == [copied.pop()] * 3  # the copies were folded into the weight they copy
    assert {t.name for t in g.tensors if t.kind == "weight"} <= {t.name for t in model.graph.initializer}
    # same structure where the exporters agree (BatchNorm is folded into Conv by the ONNX exporter)
    for onnx_type, fx_type in [("Conv", "aten.convolution.default"), ("Relu", "aten.relu.default"),
                               ("Add", "aten.add.Tensor"), ("MaxPool", "aten.max_pool2d.default"),
                               ("Gemm", "aten.addmm.default")]:
        assert len(ops_of(g, onnx_type)) == len(ops_of(fx, fx_type)), onnx_type
    assert [o.flops for o in ops_of(g, "Conv")] == [o.flops for o in ops_of(fx, "aten.convolution.default")]
    assert [g.tensors[o.outputs[0]].shape for o in ops_of(g, "Relu")] == \
        [fx.tensors[o.outputs[0]].shape for o in ops_of(fx, "aten.relu.default")]
    assert g.tensors[lo.inputs[0]].shape == (2, 3, 16, 16) and g.tensors[lo.outputs[0]].shape == (2, 10)
    # with BatchNorm folded and max-pool's indices dropped in fx, both lowerings own the same buffers
    assert sorted(t.nbytes for t in g.tensors if t.alias_of is None and t.kind in ("activation", "output")) == \
        sorted(t.nbytes for t in fx.tensors if t.alias_of is None and t.kind in ("activation", "output"))
    # views and in-place candidates
    (flat,) = ops_of(g, "Flatten")
    assert g.tensors[flat.outputs[0]].alias_of == flat.inputs[0] and flat.flops == 0
    for op in ops_of(g, "Relu"):
        assert op.inplace_inputs == op.inputs
    (add,) = ops_of(g, "Add")
    assert set(add.inplace_inputs) == set(add.inputs)
    assert ops_of(g, "MaxPool")[0].attrs == {
        "onnx_op": "MaxPool", "attributes": {"ceil_mode": 0, "dilations": [1, 1], "kernel_shape": [2, 2],
                                             "pads": [0, 0, 0, 0], "strides": [2, 2]},
        "const_inputs": {}, "input_positions": [0], "output_positions": [0]}
    assert_static_and_serialisable(g)


def test_cnn_inference_rewrites(resnet, resnet_fx, resnet_fx_raw):
    """Eval graphs: BatchNorm folded into the convolution before it, unread max-pool indices not computed."""
    g, raw, module = resnet_fx.graph, resnet_fx_raw.graph, resnet[0]
    assert not ops_of(g, "aten._native_batch_norm_legit_no_training.default")
    assert len(ops_of(raw, "aten._native_batch_norm_legit_no_training.default")) == 3
    assert len(ops_of(g, "aten.convolution.default")) == 3 and len(g.ops) == len(raw.ops) - 3
    # folded weights replace the conv weights and the BatchNorm parameters and statistics
    assert set(resnet_fx.weights) == {f"{c}.{w}+bn" for c in ("stem", "conv1", "conv2") for w in ("weight", "bias")} \
        | {"fc.weight", "fc.bias"}
    for conv_name, bn in (("stem", module.bn0), ("conv1", module.bn1), ("conv2", module.bn2)):
        conv = getattr(module, conv_name)
        k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        assert torch.allclose(resnet_fx.weights[f"{conv_name}.weight+bn"], conv.weight * k[:, None, None, None])
        assert torch.allclose(resnet_fx.weights[f"{conv_name}.bias+bn"], bn.bias - bn.running_mean * k)
    stem = ops_of(g, "aten.convolution.default")[0]
    assert [g.tensors[t].name for t in stem.inputs[1:]] == ["stem.weight+bn", "stem.bias+bn"]
    assert stem.attrs["args"][2] == {"t": stem.inputs[2]}  # the folded bias is the convolution's bias argument
    # max-pool: values only, same arguments; 2 x 8 x 8 x 8 int64 indices and 6 BatchNorm outputs fewer
    (mp,) = ops_of(g, "aten.max_pool2d.default")
    (mp_raw,) = ops_of(raw, "aten.max_pool2d_with_indices.default")
    assert len(mp.outputs) == 1 and mp.attrs["args"][1:] == mp_raw.attrs["args"][1:] and mp.attrs["results"] is None
    bn_bytes = sum(raw.tensors[t].nbytes for o in ops_of(raw, "aten._native_batch_norm_legit_no_training.default")
                   for t in o.outputs)
    assert activation_bytes(raw) - activation_bytes(g) == bn_bytes + 2 * 8 * 8 * 8 * 8
    assert_static_and_serialisable(g)
    with torch.no_grad():
        (got,) = replay_fx(resnet_fx, resnet[1])
        assert torch.allclose(got, module(*resnet[1]), atol=1e-5)
    # training mode: none by default (its BatchNorm is another op), and asking for them is an error
    train = SmallResNet().train()
    lo = lower_module(train, resnet[1])
    assert ops_of(lo.graph, "aten.max_pool2d_with_indices.default") and not ops_of(lo.graph, "aten.max_pool2d.default")
    with pytest.raises(FrontendError, match="SmallResNet: the module is in training mode; inference rewrites"):
        lower_module(train, resnet[1], rewrites=InferenceRewrites(fold_batchnorm=False))
    # each rewrite is one switch
    only_pool = lower_module(*resnet, rewrites=InferenceRewrites(fold_batchnorm=False)).graph
    assert len(ops_of(only_pool, "aten._native_batch_norm_legit_no_training.default")) == 3
    assert ops_of(only_pool, "aten.max_pool2d.default")


def test_onnx_weights_optional(resnet, resnet_onnx_path, tmp_path):
    with_data = lower_onnx(resnet_onnx_path, load_weights=True)
    with torch.no_grad():
        expected = resnet[0](*resnet[1]).numpy()
    (got,) = replay_onnx(with_data, [x.numpy() for x in resnet[1]], opset=17)
    assert np.allclose(got, expected, atol=1e-5)
    arrays = onnx_weights(resnet_onnx_path)
    assert set(with_data.weights) == {t.name for t in with_data.graph.tensors if t.kind == "weight"}
    for name, value in with_data.weights.items():
        assert np.array_equal(value, arrays[name])
    # the same model with its weight data deleted still plans, to the same graph
    model = onnx.load(resnet_onnx_path)
    bare = str(tmp_path / "bare.onnx")
    onnx.save_model(model, bare, save_as_external_data=True, all_tensors_to_one_file=True, location="w.data",
                    size_threshold=0)
    os.remove(tmp_path / "w.data")
    without = lower_onnx(bare)
    assert without.graph.fingerprint == with_data.graph.fingerprint and not without.weights
    with pytest.raises(FrontendError, match="bare.onnx: weight data is missing"):
        lower_onnx(bare, load_weights=True)


def test_elem_size_and_stable_fingerprints(resnet, resnet_fx, resnet_onnx_path):
    again = lower_module(*resnet)
    assert again.graph.fingerprint == resnet_fx.graph.fingerprint
    assert lower_onnx(resnet_onnx_path).graph.fingerprint == lower_onnx(resnet_onnx_path).graph.fingerprint
    int8 = lower_onnx(resnet_onnx_path, elem_size=1).graph
    assert all(t.nbytes == math.prod(t.shape) for t in int8.tensors)
    assert_static_and_serialisable(int8, elem_size=1)


# ---- transformers: symbolic shapes, constant folding, fusions ---------------------------------

def _transformer_case(kind):
    torch.manual_seed(0)
    if kind == "bert":
        ids = torch.randint(0, 50, (2, 16))
        return TinyBert().eval(), (ids, torch.ones(2, 16, dtype=torch.int64)), {0: "batch", 1: "seq"}
    return TinyGPT2().eval(), (torch.randint(0, 50, (2, 16)),), {0: "batch", 1: "seq"}


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_transformer_onnx_every_size_known_and_matches_fx(kind, tmp_path):
    module, inputs, dyn = _transformer_case(kind)
    path = export(module, inputs, tmp_path / f"{kind}.onnx", {f"input{i}": dyn for i in range(len(inputs))})
    # ONNX's own inference leaves many values without a static shape once batch and seq are symbolic
    inferred = onnx.shape_inference.infer_shapes(onnx.load(path)).graph.value_info
    unknown = [v for v in inferred if any(not d.HasField("dim_value") for d in v.type.tensor_type.shape.dim)]
    assert len(unknown) >= 20
    with pytest.raises(FrontendError, match=r"input 'input0' has symbolic shape \[batch,seq\]; pass --input-shape"):
        lower_onnx(path)
    shapes = {f"input{i}": tuple(x.shape) for i, x in enumerate(inputs)}
    lo = lower_onnx(path, input_shapes=shapes)
    g = lo.graph
    assert_static_and_serialisable(g)
    assert [g.tensors[i].shape for i in lo.inputs] == [tuple(x.shape) for x in inputs]
    with torch.no_grad():
        expected = module(*inputs)
    assert g.tensors[lo.outputs[0]].shape == tuple(expected.shape)
    # shape arithmetic is gone: folded into constants the remaining ops carry
    assert not {o.op_type for o in g.ops} & {"Shape", "Concat", "Constant", "Range", "ConstantOfShape"}
    assert any(o.attrs["const_inputs"] for o in ops_of(g, "Reshape"))
    # Reshapes are views, except of the permuted attention context: a copy, as core ATen's clone + _unsafe_view
    for o in ops_of(g, "Reshape"):
        permuted = g.tensors[o.inputs[0]].alias_of is not None and g.ops[g.producer[o.inputs[0]]].op_type == "Transpose"
        assert (g.tensors[o.outputs[0]].alias_of is None) == permuted, o.name
    assert sum(g.tensors[o.outputs[0]].alias_of is None for o in ops_of(g, "Reshape")) == 2  # one per layer
    # the exporter's decompositions are fused back: one GELU per layer, linear = MatMul + bias
    gelu = ops_of(g, "Gelu")
    assert len(gelu) == 2
    assert {o.attrs["attributes"]["approximate"] for o in gelu} == {"none" if kind == "bert" else "tanh"}
    for o in gelu:  # in place over its input, or the root of its input where that is a full view
        x = g.tensors[o.inputs[0]]  # (GPT-2: the 2-D Gemm output reshaped to 3-D; the root joins the inputs)
        assert o.inplace_inputs == ((x.id,) if x.alias_of is None else (x.alias_of,))
        assert o.inputs == ((x.id,) if x.alias_of is None else (x.id, x.alias_of))
    fx_gelus = ops_of(lower_module(module, inputs).graph, "aten.gelu.default")  # same in fx: addmm, view, gelu
    assert len(fx_gelus) == 2 and all(len(o.inplace_inputs) == 1 for o in fx_gelus)
    fx = lower_module(module, inputs)
    assert [fx.graph.tensors[i].shape for i in fx.inputs] == [g.tensors[i].shape for i in lo.inputs]
    # both lowerings compute the model from their attrs alone (folded constants and fusions included)
    with torch.no_grad():
        assert torch.allclose(replay_fx(fx, inputs)[0], expected, atol=1e-5)
    with_data = lower_onnx(path, input_shapes=shapes, load_weights=True)
    assert with_data.graph.fingerprint == g.fingerprint
    (got,) = replay_onnx(with_data, [x.numpy() for x in inputs], opset=17)
    assert np.allclose(got, expected.numpy(), atol=1e-4)
    # Total activation bytes agree within 5%. What remains different: fx's LayerNorm also returns
    # mean and rstd; fx computes the position ids at run time where ONNX folded them to constants.
    act_fx, act_onnx = activation_bytes(fx.graph), activation_bytes(g)
    assert abs(act_onnx - act_fx) <= 0.05 * act_fx, (act_fx, act_onnx)
    unfused = lower_onnx(path, input_shapes=shapes, fuse=False).graph
    assert not ops_of(unfused, "Gelu") and not ops_of(unfused, "MatMulAdd")
    assert activation_bytes(unfused) > 1.3 * act_fx  # what planning the exported decomposition would cost


def test_opset11_layernorm_silu_and_dropout(tmp_path):
    """Before opset 17 LayerNorm is exported as 9 nodes (ReduceMean, Sub, Pow, ...): fused back after
    evaluation shows it is (x - mean) / sqrt(var + eps) * gamma + beta. SiLU = Sigmoid + Mul becomes
    Swish. Dropout in inference is a view."""
    module, inputs, _ = _transformer_case("bert")
    old = lower_onnx(export(module, inputs, tmp_path / "bert11.onnx", opset=11), load_weights=True)
    new = lower_onnx(export(module, inputs, tmp_path / "bert17.onnx"))
    assert len(ops_of(old.graph, "LayerNormalization")) == 5 and not ops_of(old.graph, "ReduceMean")
    assert {o.attrs["attributes"]["epsilon"] for o in ops_of(old.graph, "LayerNormalization")} == \
        {float(np.float32(1e-5))}
    types = [collections.Counter(o.op_type for o in lo.graph.ops) for lo in (old, new)]
    assert types[0] == types[1]
    assert activation_bytes(old.graph) == activation_bytes(new.graph)
    with torch.no_grad():
        expected = module(*inputs).numpy()
    assert np.allclose(replay_onnx(old, [x.numpy() for x in inputs], opset=11)[0], expected, atol=1e-4)
    silu, x = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8)).eval(), torch.randn(2, 5, 8)
    lo = lower_onnx(export(silu, (x,), tmp_path / "silu.onnx"), load_weights=True)
    g = lo.graph
    assert [o.op_type for o in g.ops] == ["MatMulAdd", "Swish", "MatMulAdd"]
    assert g.ops[1].attrs["fused_from"] == ["/1/Sigmoid", "/1/Mul"] and g.ops[1].inplace_inputs == g.ops[1].inputs
    with torch.no_grad():
        assert np.allclose(replay_onnx(lo, [x.numpy()], opset=17)[0], silu(x).numpy(), atol=1e-5)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph([helper.make_node("Dropout", ["x"], ["d"], name="drop"),
                               helper.make_node("Relu", ["d"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    path = str(tmp_path / "drop.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    g = lower_onnx(path).graph
    drop, relu = g.ops
    assert g.tensors[drop.outputs[0]].alias_of == drop.inputs[0] and drop.flops == 0 and drop.recomputable
    # its input is a full view (the identity) of x: x's buffer is offered, and x joins the inputs
    assert relu.inplace_inputs == drop.inputs and relu.inputs == drop.outputs + drop.inputs


# ---- a hand-made file: folding rules, views, output copies --------------------------------------

def _shape_graph(path, symbolic=True):
    """x[N,4,6] -> Shape -> Gather(0) -> Unsqueeze -> Concat([-1 ... ]) -> Reshape(x) -> Relu -> out,
    plus an Identity copy of a weight added to the reshaped x and a graph output that is a view."""
    batch = "N" if symbolic else 2
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4, 6])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "flat")]
    w = numpy_helper.from_array(np.arange(24, dtype=np.float32), "w")
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, dtype=np.int64))),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Constant", [], ["ax"], value=numpy_helper.from_array(np.array([0], dtype=np.int64))),
        helper.make_node("Unsqueeze", ["n", "ax"], ["n1"]),
        helper.make_node("Constant", [], ["rest"], value=numpy_helper.from_array(np.array([24], dtype=np.int64))),
        helper.make_node("Concat", ["n1", "rest"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("Identity", ["w"], ["w_copy"]),
        helper.make_node("Add", ["flat", "w_copy"], ["sum"]),
        helper.make_node("Relu", ["sum"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "shapes", [x], outs, [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


def test_constant_folding_views_and_output_copies(tmp_path):
    path = _shape_graph(tmp_path / "shapes.onnx")
    lo = lower_onnx(path, input_shapes={"x": (3, 4, 6)})
    g = lo.graph
    assert [o.op_type for o in g.ops] == ["Reshape", "Identity", "Add", "Relu"]
    reshape, copy, add, relu = g.ops
    assert reshape.attrs["const_inputs"] == {"1": {"value": [3, 24], "dtype": "int64", "shape": [2]}}
    assert reshape.attrs["input_positions"] == [0] and reshape.inputs == lo.inputs
    flat = g.tensors[reshape.outputs[0]]
    assert flat.shape == (3, 24) and flat.alias_of == lo.inputs[0]
    # the output "flat" is a view of the input, so a copy right after its producer gives it storage
    assert copy.inputs == (flat.id,) and g.tensors[copy.outputs[0]].kind == "output"
    assert g.tensors[copy.outputs[0]].alias_of is None
    assert lo.outputs == (relu.outputs[0], copy.outputs[0])
    # Identity of an initializer is that initializer; Add reads the weight directly
    w = g.tensors[add.inputs[1]]
    assert (w.name, w.kind, w.shape) == ("w", "weight", (24,))
    # in place: relu over the sum; add over the root of the full view (x, added to its inputs), never the weight
    assert relu.inplace_inputs == relu.inputs and add.inplace_inputs == lo.inputs
    assert add.inputs == (flat.id, w.id, *lo.inputs)
    assert [t.nbytes for t in g.tensors if t.kind == "output"] == [3 * 24 * 4, 3 * 24 * 4]


def test_bad_inputs(tmp_path):
    with pytest.raises(FrontendError, match="missing.onnx: no such file"):
        load_model(str(tmp_path / "missing.onnx"))
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    with pytest.raises(FrontendError, match="notes.onnx: not an ONNX model"):
        load_model(str(text))
    with pytest.raises(FrontendError, match=r"model.pt: unknown model format"):
        load_model(str(tmp_path / "model.pt"))
    path = _shape_graph(tmp_path / "shapes.onnx")
    with pytest.raises(FrontendError, match=r"input 'x' has symbolic shape \[N,4,6\]; pass --input-shape x:1,4,6"):
        load_model(path)
    with pytest.raises(FrontendError, match="names y0, but the graph inputs are x"):
        load_model(path, input_shapes={"y0": (1, 4, 6)})
    with pytest.raises(FrontendError, match=r"input 'x' has shape \[\?,4,6\], which the given shape \[1, 5, 6\]"):
        load_model(path, input_shapes={"x": (1, 5, 6)})
    # a value whose shape depends on data: NonZero of a runtime tensor
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    graph = helper.make_graph([helper.make_node("NonZero", ["x"], ["nz"], name="find")], "g", [x],
                              [helper.make_tensor_value_info("nz", TensorProto.INT64, None)])
    dyn = str(tmp_path / "dyn.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), dyn)
    with pytest.raises(FrontendError, match="node 'find' \\(NonZero\\): the shape of output 'nz' cannot be"):
        load_model(dyn)


def test_load_model_dispatch(resnet, resnet_fx, resnet_fx_raw, tmp_path):
    module, inputs = resnet
    via_module = load_model(module, example_inputs=inputs)
    assert via_module.graph.fingerprint == resnet_fx.graph.fingerprint
    as_exported = load_model(module, example_inputs=inputs, rewrites=InferenceRewrites.none())
    assert as_exported.graph.fingerprint == resnet_fx_raw.graph.fingerprint
    with pytest.raises(FrontendError, match="needs example_inputs"):
        load_model(module)
    path = _shape_graph(tmp_path / "fixed.onnx", symbolic=False)
    assert load_model(path, name="fixed").graph.name == "fixed"
    spec = "zoo:bert:batch=1,seq=8,layers=1,d_model=32,heads=4,d_ff=64,vocab=100"
    fx, via_onnx = load_model(spec), load_model(spec, via="onnx")
    assert (fx.source, via_onnx.source, fx.graph.name) == ("fx", "onnx", spec)
    assert [fx.graph.tensors[t].shape for t in fx.outputs] == [via_onnx.graph.tensors[t].shape
                                                                for t in via_onnx.outputs] == [(1, 8, 32), (1, 32)]
    with pytest.raises(FrontendError, match="unknown model 'nosuchnet'"):
        load_model("zoo:nosuchnet")
    with pytest.raises(FrontendError, match="input shapes apply to ONNX files"):
        load_model(spec, input_shapes={"input0": (1, 8)})


def test_outputs_that_alias_inputs_or_views_get_copies():
    class Views(nn.Module):
        def forward(self, x):
            y = torch.relu(x)
            return y.t(), x, y  # a view, the input itself, and a real activation

    x = torch.randn(3, 5)
    lo = lower_module(Views(), (x,))
    g = lo.graph
    kinds = [(g.tensors[t].kind, g.tensors[t].alias_of, g.tensors[t].shape) for t in lo.outputs]
    assert kinds == [("output", None, (5, 3)), ("output", None, (3, 5)), ("output", None, (3, 5))]
    clones = ops_of(g, "aten.clone.default")
    assert [g.tensors[c.inputs[0]].kind for c in clones] == ["input", "activation"]
    # the relu's output is a graph output, so it must not be listed as an in-place victim anywhere
    assert all(lo.outputs[2] not in o.inplace_inputs for o in g.ops)


def test_dynamo_and_aot_autograd_graph_modules():
    from torch._functorch.aot_autograd import aot_module_simplified

    torch.manual_seed(0)
    module, x = SmallResNet().eval(), torch.randn(2, 3, 16, 16)
    captured = {}

    def keep(key):
        def compiler(gm, example_inputs):
            captured[key] = (gm, list(example_inputs))
            return gm.forward
        return compiler

    def backend(gm, example_inputs):
        keep("dynamo")(gm, example_inputs)
        return aot_module_simplified(gm, example_inputs, fw_compiler=keep("fw"), bw_compiler=keep("bw"))

    torch._dynamo.reset()
    torch.compile(module, backend=backend)(x).sum().backward()
    lo = lower_graph_module(*captured["dynamo"])
    g, ref = lo.graph, lower_module(module, (x,), rewrites=InferenceRewrites.none()).graph
    # Dynamo passes parameters and buffers as inputs; they are weights, the image is the one input
    assert [g.tensors[t].kind for t in lo.inputs].count("input") == 1
    assert sum(t.kind == "weight" for t in g.tensors) == sum(t.kind == "weight" for t in ref.tensors)
    assert len(lo.weights) == sum(t.kind == "weight" for t in g.tensors)
    assert collections.Counter(o.op_type for o in g.ops) == collections.Counter(o.op_type for o in ref.ops)
    assert activation_bytes(g) == activation_bytes(ref)
    # asked for, the rewrites drop max-pool's indices; BatchNorm stays: its weights are fed by the caller
    rewritten = lower_graph_module(*captured["dynamo"], rewrites=InferenceRewrites()).graph
    assert len(ops_of(rewritten, "aten._native_batch_norm_legit_no_training.default")) == 3
    assert ops_of(rewritten, "aten.max_pool2d.default")
    assert not ops_of(rewritten, "aten.max_pool2d_with_indices.default")
    # AOTAutograd's backward returns one gradient per forward input: None where none is needed
    bw_gm, bw_inputs = captured["bw"]
    bw = lower_graph_module(bw_gm, bw_inputs, name="bw")
    returned = next(n for n in bw_gm.graph.nodes if n.op == "output").args[0]
    assert sorted(bw.output_constants) == [i for i, r in enumerate(returned) if r is None]
    assert set(bw.output_constants.values()) == {None} and len(bw.outputs) + len(bw.output_constants) == len(returned)
    grads = [tuple(p.shape) for p in module.parameters()]
    assert sorted(bw.graph.tensors[t].shape for t in bw.outputs) == sorted(grads)
    assert_static_and_serialisable(bw.graph)
    fw = lower_graph_module(*captured["fw"], name="fw", weight_inputs=range(len(grads)))
    assert [fw.graph.tensors[t].kind for t in fw.inputs[:len(grads)]] == ["weight"] * len(grads)

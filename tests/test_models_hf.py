"""Hugging Face architectures from configs (models/hf.py): the real transformers classes at their published
sizes, replays of both lowerings equal to eager, nothing downloaded, and a clear error without the extra.
Tests that build a model need transformers (pytest.importorskip); the others run everywhere."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
import torch
from onnx import helper

import models
from frontends.fx import lower_module
from frontends.onnx import lower_onnx
from frontends.onnx_fold import evaluate
from models.hf import NAMES, hf_bert, hf_gpt2, hf_llama, hf_vit, transformers_problem
from planner.compile import compile as plan_graph
from planner.runtime.executor import Executor
from planner.runtime.replay import max_rel_error
from planner.target import Target

FULL_SIZE_PARAMS = {
    "hf_gpt2": 124_439_808,  # GPT-2 small with its tied LM head: equal to the zoo's gpt2
    "hf_bert": 109_482_240,  # BERT-base with pooler: equal to the zoo's bert
    "hf_llama": 6_738_415_616,  # Llama-2-7B (Touvron et al. 2023), the count of Meta's 7B checkpoint
    "hf_vit": 86_389_248,  # ViT-B/16, pooler and no classifier: vit_b_16's 86,567,656 - 769,000 + 590,592
}
CLASSES = {"hf_gpt2": "GPT2LMHeadModel", "hf_bert": "BertModel", "hf_llama": "LlamaForCausalLM",
           "hf_vit": "ViTModel"}
SMALL_OUTPUT_SHAPES = {
    "hf_gpt2": [(2, 8, 100)],
    "hf_bert": [(2, 8, 32), (2, 32)],
    "hf_llama": [(2, 8, 100)],
    "hf_vit": [(2, 5, 64), (2, 64)],  # (32 / 16)^2 patches + the class token
}


@pytest.fixture
def tf():
    return pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _full_size(name: str):
    with torch.device("meta"):  # shapes and counts only: Llama-2-7B's fp32 weights are 25 GiB
        return models.build(name)


def _outputs(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


# ---- registry ---------------------------------------------------------------------------------------

def test_hf_names_are_listed_exactly_when_transformers_is_installed():
    problem = transformers_problem()
    if problem is None:
        assert models.names("hf") == sorted(NAMES) and set(NAMES) <= set(models.names())
    else:
        assert models.names("hf") == [] and not set(NAMES) & set(models.names())
        with pytest.raises(models.ModelSpecError, match=r"memplan\[hf\]"):
            models.spec("hf_gpt2")


def test_without_transformers_the_error_names_the_extra():
    """A process where `import transformers` fails (sys.modules entry None) stands for an install without it."""
    script = textwrap.dedent("""
        import sys
        sys.modules["transformers"] = None
        import models
        from frontends import FrontendError, load_model
        print(sorted(n for n in models.names() if n.startswith("hf_")))
        try:
            models.build("hf_llama", layers=1)
        except models.ModelSpecError as e:
            print(e)
        try:
            load_model("zoo:hf_gpt2:batch=1")
        except FrontendError as e:
            print(e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "[]",
        "model 'hf_llama' needs the optional extra hf: pip install 'memplan[hf]' "
        "(transformers>=4.40; transformers is not installed)",
        "model 'hf_gpt2' needs the optional extra hf: pip install 'memplan[hf]' "
        "(transformers>=4.40; transformers is not installed)",
    ]


@pytest.mark.parametrize(("builder", "params", "message"), [
    (hf_gpt2, {"seq": 2048}, "seq=2048 must lie in 1..n_ctx=1024"),
    (hf_bert, {"seq": 513}, "seq=513 must lie in 1..max_position_embeddings=512"),
    (hf_llama, {"heads": 32, "kv_heads": 5}, "heads=32 is not divisible by kv_heads=5"),
    (hf_llama, {"d_model": 100, "heads": 32}, "d_model=100 is not divisible by heads=32"),
    (hf_vit, {"res": 200}, "res=200 is not a positive multiple of the patch size 16"),
])
def test_bad_parameters_are_named_before_transformers_is_imported(builder, params, message):
    with pytest.raises(models.ModelSpecError, match=message.replace(".", r"\.")):
        builder(**params)


# ---- the models -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(FULL_SIZE_PARAMS))
def test_full_size_is_the_transformers_class_at_its_published_size(tf, name):
    module, inputs = _full_size(name)
    assert type(module.model) is getattr(tf, CLASSES[name])
    assert module.model.config._attn_implementation == "eager"
    assert sum(p.numel() for p in module.parameters()) == FULL_SIZE_PARAMS[name]
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    zoo_twin = {"hf_gpt2": "gpt2", "hf_bert": "bert"}.get(name)
    if zoo_twin:  # the same architecture written out in models/transformers.py
        twin, twin_inputs = _full_size(zoo_twin)
        assert sum(p.numel() for p in twin.parameters()) == FULL_SIZE_PARAMS[name]
        assert inputs[0].shape == twin_inputs[0].shape


def test_llama_config_has_llama2_7b_dimensions(tf):
    config = _full_size("hf_llama")[0].model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size, config.max_position_embeddings,
            config.rms_norm_eps, config.tie_word_embeddings) == (32, 4096, 11008, 32, 32, 32000, 4096, 1e-5, False)
    small = models.build_small("hf_llama")[0].model.config
    assert (small.num_hidden_layers, small.hidden_size, small.num_key_value_heads) == (1, 32, 2)  # grouped KV


@pytest.mark.parametrize("name", NAMES)
def test_small_forward_shapes(tf, name):
    module, inputs = models.build_small(name)
    assert not module.training
    with torch.no_grad():
        outs = _outputs(module(*inputs))
    assert [tuple(o.shape) for o in outs] == SMALL_OUTPUT_SHAPES[name]
    assert all(torch.isfinite(o).all() and o.std() > 0 for o in outs)


@pytest.mark.parametrize("name", ["hf_gpt2", "hf_llama"])
def test_causal_lms_ignore_the_future(tf, name):
    module, (ids, mask) = models.build_small(name)
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % 100
    with torch.no_grad():
        a, b = module(ids, mask), module(changed, mask)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("via", ["fx", "onnx"])
def test_lowerings_replay_equal_to_eager(tf, name, via):
    params = models.spec(name).small
    module, inputs = models.build(name, **params)
    if via == "fx":
        lo = lower_module(module, inputs, name=name)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{name}.onnx")
            models.export_onnx(name, path, **params)
            lo = lower_onnx(path, load_weights=True, name=name)
    plan = plan_graph(lo.graph, Target("cpu64", None, alignment=64), planner="baseline")
    with torch.no_grad():
        eager = _outputs(module(*inputs))
    assert max_rel_error(Executor.from_lowered(lo, plan).run(*inputs), eager) <= 1e-5


def test_weights_over_half_the_memory_are_refused_unless_on_meta(tf, monkeypatch):
    import models.hf

    monkeypatch.setattr(models.hf, "_memory_bytes", lambda: 1 << 20)  # a 1 MiB machine
    with pytest.raises(models.ModelSpecError, match=r"hf_gpt2: \S+ KiB of weights is more than half of this "
                                                    r"machine's 1\.00 MiB of memory; build it under torch\.device"):
        models.build_small("hf_gpt2", vocab=5000)  # 5000 x 32 x 4 bytes of embedding alone: 625 KiB
    with torch.device("meta"):
        module, _ = models.build_small("hf_gpt2", vocab=5000)
    assert sum(p.numel() for p in module.parameters()) > (1 << 20) // 2 // 4


def test_meta_device_lowering_is_the_same_graph(tf):
    """The full-size slow test lowers Llama-2-7B on the meta device; at the small size it is the same graph."""
    params = models.spec("hf_llama").small
    real = lower_module(*models.build("hf_llama", **params)).graph
    with torch.device("meta"):
        meta = lower_module(*models.build("hf_llama", **params)).graph
    assert meta.fingerprint == real.fingerprint


# ---- what the ONNX frontend needed --------------------------------------------------------------------

def test_gather_elements_folds_past_64_entries():
    """HF BERT's exported embeddings gather the token types from a (1, 512) buffer; onnx.reference's
    GatherElements fails past 64 entries along the axis, the frontend's own kernel does not."""
    node = helper.make_node("GatherElements", ["data", "index"], ["out"], axis=1)
    data = np.arange(3 * 512).reshape(3, 512)
    index = np.array([[0, 7, 511, -1], [3, -512, 100, 64]])  # shorter than data along axis 0
    (out,) = evaluate(node, {"data": data, "index": index}, 17)
    expected = [[data[i][j % 512] for j in row] for i, row in enumerate(index)]
    assert out.tolist() == expected
    (out0,) = evaluate(helper.make_node("GatherElements", ["data", "index"], ["out"]),
                       {"data": np.array([[1, 2], [3, 4]]), "index": np.array([[1, 0], [0, 0]])}, 17)
    assert out0.tolist() == [[3, 2], [1, 2]]


def test_cast_to_its_own_type_is_a_view(tmp_path):
    """transformers' attention casts its float32 softmax to the query's dtype: on float32 a no-op that
    torch.export drops and the TorchScript exporter writes as Cast. Lowered as a view, it costs no buffer;
    a Cast that changes the type stays a copy. Replay equals onnx.reference."""
    import onnx
    from onnx import TensorProto
    from onnx.reference import ReferenceEvaluator

    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Cast", ["r"], ["same"], to=TensorProto.FLOAT),
             helper.make_node("Exp", ["same"], ["e"]),
             helper.make_node("Cast", ["e"], ["half"], to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["half"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "casts", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    path = str(tmp_path / "casts.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    lo = lower_onnx(path)
    g = lo.graph
    by_name = {t.name: t for t in g.tensors}
    assert by_name["same"].alias_of == by_name["r"].id
    assert by_name["half"].alias_of is None and by_name["y"].alias_of is None
    assert by_name["half"].nbytes == 2 * 6
    plan = plan_graph(g, Target("cpu64", None, alignment=64), planner="baseline")
    x = torch.randn(2, 3)
    (out,) = Executor.from_lowered(lo, plan).run(x)
    (want,) = ReferenceEvaluator(path).run(None, {"x": x.numpy()})
    np.testing.assert_array_equal(out.numpy(), want)

"""Hugging Face architectures built from their configs: GPT-2, BERT, Llama, ViT (the optional extra `hf`).

Each builder writes a transformers config with the published dimensions (any of which a parameter
overrides), instantiates the model class on it with random weights, and wraps it in `PlainOutputs` so that
it is called positionally and returns plain tensors, as the frontends need:

  hf_gpt2   GPT2LMHeadModel(GPT2Config)   GPT-2 small: 12 layers, 768 wide, 12 heads, vocab 50257, 1024 positions
  hf_bert   BertModel(BertConfig)         BERT-base: 12 layers, 768 wide, 12 heads, FFN 3072, vocab 30522
  hf_llama  LlamaForCausalLM(LlamaConfig) Llama-2-7B: 32 layers, 4096 wide, 32 heads (32 KV heads), FFN 11008,
                                          vocab 32000, 4096 positions, RMSNorm eps 1e-5 (Touvron et al. 2023)
  hf_vit    ViTModel(ViTConfig)           ViT-B/16: 224x224, patch 16, 12 layers, 768 wide, 12 heads, MLP 3072

Text models take (input_ids, attention_mask) with an all-ones mask, which is what a tokenizer hands a
served model; without a mask, transformers 5 derives packed-sequence ids with torch.diff, an op the
TorchScript ONNX exporter cannot export. Causal LMs run with use_cache=False (no KV cache output) and
return the logits; BERT and ViT return (last hidden state, pooled output). Attention uses transformers'
"eager" implementation (matmul -> softmax -> matmul, as the zoo's own transformers in models/transformers.py)
rather than a fused SDPA kernel, so both frontends see the buffers a planner places.

Nothing is downloaded: configs are built in code, never fetched, and HF_HUB_OFFLINE=1 is set before
transformers is imported. A builder refuses weights over half the machine's memory (Llama-2-7B: 25.1 GiB
in fp32) unless it runs under torch.device("meta"), where the fx frontend still lowers the model.
transformers is imported only when a builder runs (it takes seconds); without transformers >= 4.40 the
names stay out of models.names() and asking for one raises ModelSpecError naming the extra to install.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from typing import Any

import torch
from torch import nn

from models.registry import ModelSpecError, register, unavailable
from planner.target import format_size

MIN_VERSION = (4, 40)
NAMES = ("hf_gpt2", "hf_bert", "hf_llama", "hf_vit")
TEXT_INPUTS = ("input_ids", "attention_mask")  # what a tokenizer hands the model (mask all ones)


def transformers_problem() -> str | None:
    """Why the hf models cannot be built here, or None when transformers >= 4.40 is installed."""
    try:
        found = importlib.util.find_spec("transformers") is not None
    except ValueError:  # sys.modules["transformers"] is None: imports of it are blocked
        found = False
    if not found:
        return "transformers is not installed"
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "transformers is not installed"
    parts = [int(p) for p in version.split(".")[:2] if p.isdigit()]
    if tuple(parts) < MIN_VERSION:
        return f"transformers {version} is older than {'.'.join(map(str, MIN_VERSION))}"
    return None


def _transformers():
    os.environ["HF_HUB_OFFLINE"] = "1"  # configs are built in code; never let anything reach the hub
    import transformers

    return transformers


class PlainOutputs(nn.Module):
    """A transformers model called positionally (inputs passed by keyword, in `input_names` order),
    returning its first `n_outputs` outputs as tensors instead of a ModelOutput."""

    def __init__(self, model: nn.Module, input_names: tuple[str, ...], n_outputs: int, **call_kwargs: Any):
        super().__init__()
        self.model = model
        self.input_names, self.n_outputs, self.call_kwargs = input_names, n_outputs, call_kwargs

    def forward(self, *inputs: torch.Tensor):
        out = self.model(**dict(zip(self.input_names, inputs)), return_dict=False, **self.call_kwargs)
        return out[0] if self.n_outputs == 1 else tuple(out[: self.n_outputs])


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _instantiate(name: str, model_class, config) -> nn.Module:
    """model_class(config), after a probe on the meta device finds its weights within half of this machine's
    memory (Llama-2-7B's 25 GiB of fp32 weights would otherwise be drawn until the machine runs out)."""
    if torch.get_default_device().type != "meta":
        with torch.device("meta"):
            probe = model_class(config)
        nbytes, limit = sum(p.numel() * p.element_size() for p in probe.parameters()), _memory_bytes() // 2
        if nbytes > limit:
            raise ModelSpecError(f"{name}: {format_size(nbytes)} of weights is more than half of this machine's "
                                 f"{format_size(2 * limit)} of memory; build it under torch.device('meta') "
                                 "(the fx frontend lowers it there) or with fewer layers or a smaller d_model")
    return model_class(config)


def _check_heads(d_model: int, heads: int, kv_heads: int | None = None) -> None:
    if heads <= 0 or d_model % heads:
        raise ModelSpecError(f"d_model={d_model} is not divisible by heads={heads}")
    if kv_heads is not None and (kv_heads <= 0 or heads % kv_heads):
        raise ModelSpecError(f"heads={heads} is not divisible by kv_heads={kv_heads}")


def _check_seq(seq: int, limit: int, what: str) -> None:
    if not 0 < seq <= limit:
        raise ModelSpecError(f"seq={seq} must lie in 1..{what}={limit}")


def _text_inputs(batch: int, seq: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, vocab, (batch, seq)), torch.ones(batch, seq, dtype=torch.long)


def hf_gpt2(batch: int = 1, seq: int = 1024, layers: int = 12, d_model: int = 768, heads: int = 12,
            vocab: int = 50257, n_ctx: int = 1024):
    """GPT-2 small as transformers' GPT2LMHeadModel (tied LM head); inputs (input_ids, attention_mask),
    output logits (batch, seq, vocab)."""
    _check_seq(seq, n_ctx, "n_ctx")
    _check_heads(d_model, heads)
    tf = _transformers()
    config = tf.GPT2Config(vocab_size=vocab, n_positions=n_ctx, n_embd=d_model, n_layer=layers, n_head=heads,
                           bos_token_id=vocab - 1, eos_token_id=vocab - 1,  # <|endoftext|> is the last token
                           use_cache=False, attn_implementation="eager")
    model = PlainOutputs(_instantiate("hf_gpt2", tf.GPT2LMHeadModel, config), TEXT_INPUTS, 1, use_cache=False)
    return model, _text_inputs(batch, seq, vocab)


def hf_bert(batch: int = 1, seq: int = 128, layers: int = 12, d_model: int = 768, heads: int = 12,
            d_ff: int = 3072, vocab: int = 30522):
    """BERT-base as transformers' BertModel (with pooler); inputs (input_ids, attention_mask),
    outputs (sequence output (batch, seq, d_model), pooled output (batch, d_model))."""
    _check_seq(seq, 512, "max_position_embeddings")
    _check_heads(d_model, heads)
    tf = _transformers()
    config = tf.BertConfig(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=d_ff, attn_implementation="eager")
    model = PlainOutputs(_instantiate("hf_bert", tf.BertModel, config), TEXT_INPUTS, 2)
    return model, _text_inputs(batch, seq, vocab)


def hf_llama(batch: int = 1, seq: int = 4096, layers: int = 32, d_model: int = 4096, heads: int = 32,
             kv_heads: int = 32, d_ff: int = 11008, vocab: int = 32000, max_positions: int = 4096):
    """Llama-2-7B's dimensions as transformers' LlamaForCausalLM (untied LM head, RoPE, SwiGLU, RMSNorm);
    inputs (input_ids, attention_mask), output logits (batch, seq, vocab)."""
    _check_seq(seq, max_positions, "max_positions")
    _check_heads(d_model, heads, kv_heads)
    tf = _transformers()
    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=d_ff,
                            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                            max_position_embeddings=max_positions, rms_norm_eps=1e-5,
                            bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                            use_cache=False, attn_implementation="eager")
    model = PlainOutputs(_instantiate("hf_llama", tf.LlamaForCausalLM, config), TEXT_INPUTS, 1, use_cache=False)
    return model, _text_inputs(batch, seq, vocab)


def hf_vit(batch: int = 1, res: int = 224, layers: int = 12, d_model: int = 768, heads: int = 12,
           d_mlp: int = 3072):
    """ViT-B/16 as transformers' ViTModel (with pooler, no classifier); input pixel_values (batch, 3, res, res),
    outputs (last hidden state (batch, (res/16)^2 + 1, d_model), pooled output (batch, d_model))."""
    if res <= 0 or res % 16:
        raise ModelSpecError(f"res={res} is not a positive multiple of the patch size 16")
    _check_heads(d_model, heads)
    tf = _transformers()
    config = tf.ViTConfig(image_size=res, patch_size=16, hidden_size=d_model, num_hidden_layers=layers,
                          num_attention_heads=heads, intermediate_size=d_mlp, attn_implementation="eager")
    model = PlainOutputs(_instantiate("hf_vit", tf.ViTModel, config), ("pixel_values",), 2)
    return model, (torch.randn(batch, 3, res, res),)


_SMALL = {
    "hf_gpt2": dict(batch=2, seq=8, layers=1, d_model=32, heads=4, vocab=100, n_ctx=16),
    "hf_bert": dict(batch=2, seq=8, layers=1, d_model=32, heads=4, d_ff=64, vocab=100),
    "hf_llama": dict(batch=2, seq=8, layers=1, d_model=32, heads=4, kv_heads=2, d_ff=64, vocab=100,
                     max_positions=16),
    "hf_vit": dict(batch=2, res=32, layers=1, d_model=64, heads=4, d_mlp=128),
}
_BUILDERS = {"hf_gpt2": hf_gpt2, "hf_bert": hf_bert, "hf_llama": hf_llama, "hf_vit": hf_vit}

_PROBLEM = transformers_problem()
for _name, _builder in _BUILDERS.items():
    if _PROBLEM is None:
        register(_name, small=_SMALL[_name], family="hf")(_builder)
    else:
        unavailable(_name, f"model {_name!r} needs the optional extra hf: pip install 'memplan[hf]' "
                           f"(transformers>=4.40; {_PROBLEM})")

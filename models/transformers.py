"""Transformer benchmark networks in plain torch: Transformer (base), ViT-B/16, GPT-2 small, BERT-base.

Every attention is written out as matmul -> softmax -> matmul over explicit head
reshapes (no nn.MultiheadAttention, no fused SDPA kernels), with no data-dependent
control flow, so that torch.export and the TorchScript ONNX exporter see the same
op graph a planner should see. Dropout is left out: the registry builds eval-mode
modules, where it is the identity. Random init; nothing is downloaded.

Full-size parameter counts (asserted in tests/test_models_seq_nas.py):
  transformer  63,082,496  (Vaswani et al. 2017 base, shared 37k vocabulary; paper says 65M)
  vit_b_16     86,567,656  (torchvision vit_b_16, 224x224, 1000 classes)
  gpt2        124,439,808  (GPT-2 small, vocab 50257, n_ctx 1024, tied LM head)
  bert        109,482,240  (BERT-base uncased, with pooler)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.registry import ModelSpecError, register


def _check_heads(d_model: int, heads: int) -> None:
    if heads <= 0 or d_model % heads:
        raise ModelSpecError(f"d_model={d_model} is not divisible by heads={heads}")


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
    """Scaled dot-product attention on (batch, seq, d_model) tensors, heads split out explicitly."""
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        tq, tk = scores.shape[-2], scores.shape[-1]
        future = torch.ones(tq, tk, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return (scores.softmax(dim=-1) @ v).transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """Multi-head self-attention; `fused` = one QKV projection (GPT-2, torchvision ViT) vs three (BERT)."""

    def __init__(self, d_model: int, heads: int, *, causal: bool = False, fused: bool = False):
        super().__init__()
        _check_heads(d_model, heads)
        self.heads, self.causal, self.d_model, self.fused = heads, causal, d_model, fused
        if fused:
            self.qkv = nn.Linear(d_model, 3 * d_model)
        else:
            self.q, self.k, self.v = (nn.Linear(d_model, d_model) for _ in range(3))
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            q, k, v = self.qkv(x).split(self.d_model, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        return self.out(_attend(q, k, v, self.heads, self.causal))


class CrossAttention(nn.Module):
    """Decoder-encoder attention: queries from the decoder, keys and values from the encoder memory."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        _check_heads(d_model, heads)
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.out(_attend(self.q(x), self.k(memory), self.v(memory), self.heads, causal=False))


def _mlp(d_model: int, d_ff: int, act: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_model, d_ff), act, nn.Linear(d_ff, d_model))


class PostNormBlock(nn.Module):
    """x = LN(x + Attn(x)); x = LN(x + FFN(x)) — the original Transformer and BERT layer."""

    def __init__(self, d_model: int, heads: int, d_ff: int, act: nn.Module, eps: float):
        super().__init__()
        self.attn = SelfAttention(d_model, heads)
        self.ln1 = nn.LayerNorm(d_model, eps=eps)
        self.ffn = _mlp(d_model, d_ff, act)
        self.ln2 = nn.LayerNorm(d_model, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.ffn(x))


class PreNormBlock(nn.Module):
    """x = x + Attn(LN(x)); x = x + MLP(LN(x)) — GPT-2 and ViT layer."""

    def __init__(self, d_model: int, heads: int, d_ff: int, *, causal: bool, act: nn.Module, eps: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, eps=eps)
        self.attn = SelfAttention(d_model, heads, causal=causal, fused=True)
        self.ln2 = nn.LayerNorm(d_model, eps=eps)
        self.mlp = _mlp(d_model, d_ff, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class DecoderBlock(nn.Module):
    """Post-norm decoder layer: masked self-attention, encoder-decoder attention, FFN."""

    def __init__(self, d_model: int, heads: int, d_ff: int):
        super().__init__()
        self.self_attn = SelfAttention(d_model, heads, causal=True)
        self.ln1 = nn.LayerNorm(d_model)
        self.cross_attn = CrossAttention(d_model, heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.ffn = _mlp(d_model, d_ff, nn.ReLU())
        self.ln3 = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.self_attn(x))
        x = self.ln2(x + self.cross_attn(x, memory))
        return self.ln3(x + self.ffn(x))


def _sinusoid_table(length: int, d_model: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


class Transformer(nn.Module):
    """Vaswani et al. 2017: post-norm encoder-decoder, sinusoidal positions, one embedding
    matrix shared by source, target and the pre-softmax projection (paper section 3.4)."""

    def __init__(self, vocab: int, d_model: int, heads: int, d_ff: int, layers: int, max_len: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.scale = math.sqrt(d_model)
        self.register_buffer("positions", _sinusoid_table(max_len, d_model), persistent=False)
        self.encoder = nn.ModuleList(PostNormBlock(d_model, heads, d_ff, nn.ReLU(), 1e-5) for _ in range(layers))
        self.decoder = nn.ModuleList(DecoderBlock(d_model, heads, d_ff) for _ in range(layers))

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids) * self.scale + self.positions[: ids.shape[1]]

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        memory = self._embed(src)
        for block in self.encoder:
            memory = block(memory)
        x = self._embed(tgt)
        for block in self.decoder:
            x = block(x, memory)
        return x @ self.embed.weight.t()  # tied pre-softmax projection, no bias


@register("transformer", small=dict(batch=2, seq=8, vocab=100, layers=1, d_model=32, heads=4, d_ff=64),
          family="transformer")
def transformer(batch: int = 1, seq: int = 128, vocab: int = 37000, layers: int = 6, d_model: int = 512,
                heads: int = 8, d_ff: int = 2048):
    """Transformer base (Vaswani et al. 2017), WMT14 EN-DE shared BPE vocabulary of 37000; inputs:
    source and target token ids (batch, seq); output: logits (batch, seq, vocab)."""
    module = Transformer(vocab, d_model, heads, d_ff, layers, max_len=seq)
    ids = torch.randint(0, vocab, (batch, seq))
    return module, (ids, ids.roll(1, dims=1))


class VisionTransformer(nn.Module):
    """torchvision's ViT: conv patch embedding, class token, learned positions, pre-norm encoder."""

    def __init__(self, res: int, patch: int, layers: int, d_model: int, heads: int, d_mlp: int, classes: int):
        super().__init__()
        if res % patch:
            raise ModelSpecError(f"res={res} is not a multiple of the patch size {patch}")
        self.patch_embed = nn.Conv2d(3, d_model, kernel_size=patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos_embedding = nn.Parameter(torch.randn(1, (res // patch) ** 2 + 1, d_model) * 0.02)
        self.blocks = nn.Sequential(*(PreNormBlock(d_model, heads, d_mlp, causal=False, act=nn.GELU(), eps=1e-6)
                                      for _ in range(layers)))
        self.ln = nn.LayerNorm(d_model, eps=1e-6)
        self.head = nn.Linear(d_model, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        x = self.ln(self.blocks(x))
        return self.head(x[:, 0])


@register("vit_b_16", small=dict(batch=2, res=32, layers=1, d_model=64, heads=4, d_mlp=128, classes=10),
          family="transformer")
def vit_b_16(batch: int = 1, res: int = 224, layers: int = 12, d_model: int = 768, heads: int = 12,
             d_mlp: int = 3072, classes: int = 1000):
    """ViT-B/16 (Dosovitskiy et al. 2021) as torchvision defines it; input (batch, 3, res, res)."""
    module = VisionTransformer(res, 16, layers, d_model, heads, d_mlp, classes)
    return module, (torch.randn(batch, 3, res, res),)


class GPT2(nn.Module):
    """GPT-2 decoder stack: token + learned position embeddings, pre-norm blocks, final LN, tied LM head."""

    def __init__(self, vocab: int, n_ctx: int, layers: int, d_model: int, heads: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, d_model)
        self.wpe = nn.Embedding(n_ctx, d_model)
        act = nn.GELU(approximate="tanh")  # GPT-2's gelu_new
        self.blocks = nn.Sequential(*(PreNormBlock(d_model, heads, 4 * d_model, causal=True, act=act, eps=1e-5)
                                      for _ in range(layers)))
        self.ln_f = nn.LayerNorm(d_model)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.ln_f(self.blocks(self.wte(ids) + self.wpe(positions)))
        return x @ self.wte.weight.t()


@register("gpt2", small=dict(batch=2, seq=8, layers=1, d_model=32, heads=4, vocab=100, n_ctx=16),
          family="transformer")
def gpt2(batch: int = 1, seq: int = 1024, layers: int = 12, d_model: int = 768, heads: int = 12,
         vocab: int = 50257, n_ctx: int = 1024):
    """GPT-2 small (Radford et al. 2019); input token ids (batch, seq <= n_ctx); output logits."""
    if not 0 < seq <= n_ctx:
        raise ModelSpecError(f"seq={seq} must lie in 1..n_ctx={n_ctx}")
    module = GPT2(vocab, n_ctx, layers, d_model, heads)
    return module, (torch.randint(0, vocab, (batch, seq)),)


class Bert(nn.Module):
    """BERT encoder: word + position + token-type embeddings, LN, post-norm GELU layers, tanh pooler."""

    def __init__(self, vocab: int, max_positions: int, type_vocab: int, layers: int, d_model: int, heads: int,
                 d_ff: int):
        super().__init__()
        self.word = nn.Embedding(vocab, d_model)
        self.position = nn.Embedding(max_positions, d_model)
        self.token_type = nn.Embedding(type_vocab, d_model)
        self.ln = nn.LayerNorm(d_model, eps=1e-12)
        self.layers = nn.Sequential(*(PostNormBlock(d_model, heads, d_ff, nn.GELU(), 1e-12) for _ in range(layers)))
        self.pooler = nn.Linear(d_model, d_model)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word(ids) + self.position(positions) + self.token_type(torch.zeros_like(ids))
        hidden = self.layers(self.ln(x))
        return hidden, torch.tanh(self.pooler(hidden[:, 0]))


@register("bert", small=dict(batch=2, seq=8, layers=1, d_model=32, heads=4, d_ff=64, vocab=100),
          family="transformer")
def bert(batch: int = 1, seq: int = 128, layers: int = 12, d_model: int = 768, heads: int = 12, d_ff: int = 3072,
         vocab: int = 30522):
    """BERT-base (Devlin et al. 2019), 512 positions, 2 token types; input token ids (batch, seq);
    outputs (sequence output (batch, seq, d_model), pooled output (batch, d_model))."""
    if not 0 < seq <= 512:
        raise ModelSpecError(f"seq={seq} must lie in 1..512 (BERT's position table)")
    module = Bert(vocab, 512, 2, layers, d_model, heads, d_ff)
    return module, (torch.randint(0, vocab, (batch, seq)),)

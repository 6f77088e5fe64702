"""Llama / Qwen2 forward over one flat batch (see batch.py) with a paged KV cache (see kv_cache.py).

Parameter names follow Hugging Face (``model.layers.0.self_attn.q_proj.weight`` ...), so a Hugging Face
state dict loads as is.
"""

from __future__ import annotations

import functools
import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .batch import FlatBatch
from .config import ModelConfig
from .kv_cache import BLOCK_SIZE, KVCache


# CPU linears through oneDNN with prepacked weights. MKL's fp32 GEMM (what F.linear uses on CPU) is
# slow for the few-row products of decoding and tree verification, notably on AMD CPUs: measured on the
# 2-core EPYC VM, SmolLM2's 30 layers of 576x1536 weights at 3 / 8 / 32 tokens take 14.7 / 11.9 / 23.3 ms
# with F.linear and 4.6 / 5.1 / 10.8 ms with oneDNN (docs/engine.md, "Speed"). The packed copy lives
# next to the parameter (state dicts, tying and loading are unchanged) and is rebuilt whenever the
# parameter is replaced or modified in place. ADASERVE_PREPACK=0 turns it off.
PACK_BATCH_HINT = 256
_packed: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


@functools.lru_cache(maxsize=None)
def prepack_available() -> bool:
    """Decided once per process, by trying it: oneDNN's prepacked linear works in this torch build
    (and ``ADASERVE_PREPACK`` is not 0)."""
    if os.environ.get("ADASERVE_PREPACK", "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 2), PACK_BATCH_HINT)
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2), w, None, "none", [], "")
        return True
    except (RuntimeError, AttributeError):
        return False


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters) whose CPU fp32 inference forward runs oneDNN on a prepacked weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (w.dtype == x.dtype == torch.float32 and w.device.type == "cpu" and not torch.is_grad_enabled()
                and prepack_available()):
            key = (w.data_ptr(), w._version, tuple(w.shape))
            hit = _packed.get(self)
            if hit is None or hit[0] != key:
                hit = _packed[self] = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_BATCH_HINT))
            return torch.ops.mkldnn._linear_pointwise(x, hit[1], self.bias, "none", [], "")
        return F.linear(x, w, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos, sin [T, 1, head_dim]."""
    return x * cos + rotate_half(x) * sin


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, bs, kv_heads, hd], block_tables [B, n] -> [B, kv_heads, n * bs, hd].

    Gathers into a reused buffer: fresh multi-megabyte CPU allocations cost more than the copy."""
    b, n = block_tables.shape
    out = buffer[: b * n * cache[0].numel()].view(b * n, *cache.shape[1:])
    torch.index_select(cache, 0, block_tables.view(-1), out=out)
    return out.view(b, n * cache.shape[1], *cache.shape[2:]).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x, cos, sin, batch: FlatBatch, k_cache: torch.Tensor, v_cache: torch.Tensor, workspace):
        t = x.shape[0]
        q = apply_rope(self.q_proj(x).view(t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(t, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        # write the new K/V first: every query then reads its keys (context + new tokens) from the cache
        k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, batch.slot_mapping, k)
        v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, batch.slot_mapping, v)
        out = q if len(batch.groups) == 1 else torch.empty_like(q)
        for g in batch.groups:
            b, nq = g.block_tables.shape[0], g.num_queries
            qg = q if g.all_rows else q[g.rows]
            if b * nq != qg.shape[0]:  # pad to [B * Q]
                qg = qg.new_zeros(b * nq, self.num_heads, self.head_dim).index_copy_(0, g.pad_index, qg)
            qg = qg.view(b, nq, self.num_heads, self.head_dim).transpose(1, 2)
            kg = gather_blocks(k_cache, g.block_tables, workspace[0])  # [B, kv_heads, S, head_dim]
            vg = gather_blocks(v_cache, g.block_tables, workspace[1])
            og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, enable_gqa=True)
            og = og.transpose(1, 2).reshape(b * nq, self.num_heads, self.head_dim)
            if b * nq != len(g.rows):
                og = og[g.pad_index]
            if g.all_rows:
                out = og
            else:
                out[g.rows] = og
        return self.o_proj(out.reshape(t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, batch, k_cache, v_cache, workspace):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, k_cache, v_cache, workspace)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """``forward(batch, cache) -> logits [len(batch.logits_rows), vocab]``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self._inv_freq = config.rope_inv_freq()  # fp32 on the CPU; a plain attribute so .to(dtype) leaves it alone

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        freqs = positions[:, None].float() * self._inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @torch.inference_mode()
    def forward(self, batch: FlatBatch, cache: KVCache) -> torch.Tensor:
        x = self.model.embed_tokens(batch.token_ids)
        cos, sin = self.rope(batch.positions, x.dtype)
        block_numel = cache.k[0, 0].numel()
        need = max(g.block_tables.numel() for g in batch.groups) * block_numel
        workspace = cache.workspace(2 * need).view(2, need)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, batch, cache.k[i], cache.v[i], workspace)
        x = self.model.norm(x[batch.logits_rows])
        return self.lm_head(x)

    def make_cache(self, num_blocks: int, block_size: int = BLOCK_SIZE) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, num_blocks, block_size, dtype=p.dtype, device=p.device)

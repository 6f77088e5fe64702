"""One-token decode of one sequence on the CPU as one compiled call per layer (fp32, numba).

A batch-1 decode step is memory-bound: it should cost about the time to read the weights once. With
PyTorch operators it paid ~1,250 operator calls on top (issue 12: 1.66x the weight-read floor on the
2-core VM, of which RMSNorm on one 576-wide row took ~26 us per call and SDPA over 128 keys ~59 us,
each a few hundred nanoseconds of arithmetic). Here each decoder layer is one compiled call: RMSNorm,
the fused q/k/v matrix-vector product, RoPE, the K/V write into the paged cache, attention read
straight from the cache blocks (no gather), the output projection, the residual adds and the MLP.
The matrix-vector products are ``matvec``, the loop ``Linear.gemv`` runs for one-row inputs.

Used by ``Transformer.hidden`` for a batch of one new token (``model.fused_cpu_decode`` decides:
fp32 on the CPU with numba, no tensor parallelism, and the load-time kernel measurement chose the
compiled one-row linear, or ``ADASERVE_CPU_DECODE=1``). Results match the operator path to fp32
rounding (sums run in a different order), tested in ``tests/test_cpu_decode.py``.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from adaserve.core import jit

EMPTY = np.zeros(0, np.float32)


@jit.njit(fastmath=True)
def matvec(w, x, bias, out):
    """out = w @ x (+ bias; empty: none); w row-major [N, K]. ``fastmath`` lets LLVM vectorize the
    dot products (sums then differ from a sequential sum in the last bits); memory-bound: one such
    loop read SmolLM2's weights at 18-21 GB/s on the 2-core VM."""
    n, k = w.shape
    for i in range(n):
        acc = np.float32(0.0)
        for j in range(k):
            acc += w[i, j] * x[j]
        out[i] = acc
    if len(bias):
        for i in range(n):
            out[i] += bias[i]


@jit.njit(fastmath=True)
def _rms_norm(x, w, eps, out):
    ss = np.float32(0.0)
    for j in range(len(x)):
        ss += x[j] * x[j]
    r = np.float32(1.0) / np.sqrt(ss / np.float32(len(x)) + np.float32(eps))
    for j in range(len(x)):
        out[j] = x[j] * r * w[j]


@jit.njit(fastmath=True)
def _attend(qkv, k_cache, v_cache, table, key_len, heads, kv_heads, out):
    """Attention of one query row (every head of ``qkv``) over the first ``key_len`` positions of
    the sequence whose blocks are ``table``; query head ``h`` reads KV head ``h // (heads //
    kv_heads)`` (``enable_gqa``), scale 1/sqrt(head_dim). Rows are taken as 1-D views so that the
    inner loops vectorize (indexing the 4-D cache element by element ran 3.5x slower)."""
    bs, hd = k_cache.shape[1], k_cache.shape[3]
    group = heads // kv_heads
    scale = np.float32(1.0 / np.sqrt(hd))
    scores = np.empty((group, key_len), np.float32)
    for g in range(kv_heads):
        for t in range(key_len):
            krow = k_cache[table[t // bs], t % bs, g]
            for r in range(group):
                q = qkv[(g * group + r) * hd:(g * group + r + 1) * hd]
                s = np.float32(0.0)
                for j in range(hd):
                    s += q[j] * krow[j]
                scores[r, t] = s * scale
        for r in range(group):
            sr = scores[r]
            m = sr.max()
            total = np.float32(0.0)
            for t in range(key_len):
                e = np.exp(sr[t] - m)
                sr[t] = e
                total += e
            inv = np.float32(1.0) / total
            for t in range(key_len):
                sr[t] *= inv
        for t in range(key_len):
            vrow = v_cache[table[t // bs], t % bs, g]
            for r in range(group):
                p = scores[r, t]
                o = out[(g * group + r) * hd:(g * group + r + 1) * hd]
                for j in range(hd):
                    o[j] += p * vrow[j]


@jit.njit(fastmath=True)
def _layer_kernel(x, w_in, w_post, eps, w_qkv, b_qkv, w_o, b_o, w_gu, b_gu, w_down, b_down, cos, sin,
                  k_cache, v_cache, table, key_len, slot, heads, kv_heads):
    """One decoder layer on the hidden row ``x`` (updated in place); writes the token's K/V at flat
    ``slot`` of this layer's cache [blocks, block_size, kv_heads, head_dim]."""
    bs, hd = k_cache.shape[1], k_cache.shape[3]
    xn = np.empty(len(x), np.float32)
    _rms_norm(x, w_in, eps, xn)
    qkv = np.empty(w_qkv.shape[0], np.float32)
    matvec(w_qkv, xn, b_qkv, qkv)
    half = hd // 2
    rot = np.empty(hd, np.float32)
    for h in range(heads + kv_heads):  # RoPE on q and k: x * cos + rotate_half(x) * sin (sin signed)
        base = h * hd
        for j in range(half):
            rot[j] = qkv[base + j] * cos[j] + qkv[base + j + half] * sin[j]
        for j in range(half, hd):
            rot[j] = qkv[base + j] * cos[j] + qkv[base + j - half] * sin[j]
        for j in range(hd):
            qkv[base + j] = rot[j]
    blk, off = slot // bs, slot % bs
    for g in range(kv_heads):
        for j in range(hd):
            k_cache[blk, off, g, j] = qkv[(heads + g) * hd + j]
            v_cache[blk, off, g, j] = qkv[(heads + kv_heads + g) * hd + j]
    att = np.zeros(heads * hd, np.float32)
    _attend(qkv, k_cache, v_cache, table, key_len, heads, kv_heads, att)
    o = np.empty(len(x), np.float32)
    matvec(w_o, att, b_o, o)
    for j in range(len(x)):
        x[j] += o[j]
    _rms_norm(x, w_post, eps, xn)
    gu = np.empty(w_gu.shape[0], np.float32)
    matvec(w_gu, xn, b_gu, gu)
    inter = w_gu.shape[0] // 2
    act = np.empty(inter, np.float32)
    for i in range(inter):
        g = gu[i]
        act[i] = g / (np.float32(1.0) + np.exp(-g)) * gu[inter + i]
    matvec(w_down, act, b_down, o)
    for j in range(len(x)):
        x[j] += o[j]


def _np(t: torch.Tensor | None) -> np.ndarray:
    return EMPTY if t is None else t.detach().numpy()


def layer_arrays(layer) -> tuple:
    """A decoder layer's parameters as the kernel takes them (views, no copies)."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv, gate_up = attn.qkv.fused(), mlp.gate_up.fused()
    return (_np(layer.input_layernorm.weight), _np(layer.post_attention_layernorm.weight),
            float(layer.input_layernorm.eps), _np(qkv.weight), _np(qkv.bias), _np(attn.o_proj.weight),
            _np(attn.o_proj.bias), _np(gate_up.weight), _np(gate_up.bias), _np(mlp.down_proj.weight),
            _np(mlp.down_proj.bias))


class _Arrays:
    """Every layer's ``layer_arrays``, kept between steps (making them costs ~1 ms a step: module
    attribute lookups) and made again when any parameter they came from was replaced on its module
    or given other storage: ``current`` checks each one through the modules' parameter dicts (no
    module attribute lookups), ~0.1 ms for SmolLM2's 30 layers."""

    def __init__(self, model):
        self.layers = [layer_arrays(layer) for layer in model.model.layers]
        self.sources = [(m._parameters, name, p, p.data_ptr())
                        for layer in model.model.layers for m in layer.modules()
                        for name, p in m._parameters.items() if p is not None]

    def current(self) -> bool:
        return all(d.get(name) is p and p.data_ptr() == ptr for d, name, p, ptr in self.sources)


_arrays: "weakref.WeakKeyDictionary[torch.nn.Module, _Arrays]" = weakref.WeakKeyDictionary()


def model_arrays(model) -> list[tuple]:
    """``layer_arrays`` of every layer of ``model``, cached while its parameters stay the same."""
    hit = _arrays.get(model)
    if hit is None or not hit.current():
        hit = _arrays[model] = _Arrays(model)
    return hit.layers


def decode_hidden(model, batch, cache) -> torch.Tensor:
    """``Transformer.hidden`` of a batch holding one new token: the last layer's output [1, hidden]."""
    cfg = model.config
    key_len = int(batch.entries[0].key_len)
    table = batch.groups[0].block_tables[0].numpy()
    slot = int(batch.slot_mapping[0])
    x = model.model.embed_tokens.weight[batch.token_ids].detach().clone()  # [1, hidden]
    xs = x.numpy()[0]
    cos, sin = model.rope(batch.positions, x.dtype)
    cos, sin = cos.numpy().reshape(-1), sin.numpy().reshape(-1)
    ks, vs = cache.k.numpy(), cache.v.numpy()
    for i, arrays in enumerate(model_arrays(model)):
        _layer_kernel(xs, *arrays, cos, sin, ks[i], vs[i], table, key_len, slot, cfg.num_heads, cfg.num_kv_heads)
    return x

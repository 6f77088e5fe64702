"""A step of a few tokens on the CPU as one compiled call per layer (fp32, numba).

A batch-1 decode step is memory-bound: it should cost about the time to read the weights once. With
PyTorch operators it paid ~1,250 operator calls on top (issue 12: 1.66x the weight-read floor on the
2-core VM, of which RMSNorm on one 576-wide row took ~26 us per call and SDPA over 128 keys ~59 us,
each a few hundred nanoseconds of arithmetic). Here each decoder layer is one compiled call: RMSNorm,
the fused q/k/v product, RoPE, the K/V writes into the paged cache, attention read straight from the
cache blocks (no gather), the output projection, the residual adds and the MLP. The products are
``matmul_rows`` (each weight row read once for all of the step's rows), the loop ``Linear.gemv``
runs for few-row inputs; so a step of two or four tokens (a small tree, two decoding requests) reads
the weights once too.

Used by ``Transformer.hidden`` for a batch of at most ``model.cpu_decode_limit`` tokens
(``model.fused_cpu_decode`` decides: fp32 on the CPU with numba, no tensor parallelism, and the
load-time kernel measurement chose the compiled linear up to that many rows, or
``ADASERVE_CPU_DECODE=1``). Each row attends where its batch mask says (``row_keys``), so decodes,
chunks and trees mix. Results match the operator path to fp32 rounding (sums run in a different
order), tested in ``tests/test_cpu_decode.py``.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from adaserve.core import jit
from adaserve.core.jit import prefetch

EMPTY = np.zeros(0, np.float32)
AHEAD = 16  # key positions between a K/V row's prefetch hint and its read: one block of 16 tokens


@jit.njit(fastmath=True)
def matmul_rows(w, x, bias, out):
    """out[t] = w @ x[t] (+ bias; empty: none) for the few rows of ``x`` [T, K]; w row-major [N, K],
    out [T, N]. Each weight row is read once from memory and dotted with every input row while it
    sits in L1, so a few rows cost little more than one. ``fastmath`` lets LLVM vectorize the dot
    products (sums then differ from a sequential sum in the last bits); one row read SmolLM2's
    weights at 18-21 GB/s on the 2-core VM."""
    n, k = w.shape
    for i in range(n):
        wi = w[i]
        for t in range(x.shape[0]):
            xt = x[t]
            acc = np.float32(0.0)
            for j in range(k):
                acc += wi[j] * xt[j]
            out[t, i] = acc
    if len(bias):
        for t in range(x.shape[0]):
            for i in range(n):
                out[t, i] += bias[i]


@jit.njit(fastmath=True)
def _rms_norm(x, w, eps, out):
    for t in range(x.shape[0]):
        xt, ot = x[t], out[t]
        ss = np.float32(0.0)
        for j in range(len(xt)):
            ss += xt[j] * xt[j]
        r = np.float32(1.0) / np.sqrt(ss / np.float32(len(xt)) + np.float32(eps))
        for j in range(len(xt)):
            ot[j] = xt[j] * r * w[j]


@jit.njit
def _prefetch_position(flat, table, p, bs, row):
    """Hint the cache lines of key position ``p``'s row (``row`` floats: every KV head) in ``flat``,
    one layer's K or V cache [blocks, block_size, kv_heads, head_dim] seen flat, for the sequence
    whose blocks are ``table``."""
    base = (table[p // bs] * bs + p % bs) * row
    for off in range(0, row, 16):  # one hint per 64-byte line of fp32
        prefetch(flat, base + off)


@jit.njit(fastmath=True)
def _attend(qkv, k_cache, v_cache, table, keys, heads, kv_heads, out):
    """Attention of one query row (every head of ``qkv``) over the key positions ``keys`` of the
    sequence whose blocks are ``table`` (position p: block ``table[p // block_size]``); query head
    ``h`` reads KV head ``h // (heads // kv_heads)`` (``enable_gqa``), scale 1/sqrt(head_dim).

    Key by key, every head at once: one pass over the keys' K rows (all KV heads of a position are
    contiguous), softmax per head, one pass over the V rows. Looping heads outside keys read each
    position's K/V once per KV head and took 1.7-2.5x as long over 128-1024 keys (same sums, same
    order: the results are bit-identical). Rows are 1-D views so that the inner loops vectorize
    (indexing the 4-D cache element by element ran 3.5x slower).

    Both passes hint the K or V row of the key ``AHEAD`` positions on (``_prefetch_position``): a
    sequence's blocks lie anywhere in the pool, and without the hints each block's first read
    stalled on its cache misses (a 1-token SmolLM2 step over 250 keys took 7-9% longer with its
    blocks scattered than with them consecutive, over 1,000 keys 28-31%; docs/engine.md)."""
    bs, hd = k_cache.shape[1], k_cache.shape[3]
    row = k_cache.shape[2] * hd
    kf, vf = k_cache.reshape(-1), v_cache.reshape(-1)
    group = heads // kv_heads
    scale = np.float32(1.0 / np.sqrt(hd))
    n = len(keys)
    scores = np.empty((heads, n), np.float32)
    for t in range(min(AHEAD, n)):
        _prefetch_position(kf, table, keys[t], bs, row)
    for t in range(n):
        if t + AHEAD < n:
            b = keys[t + AHEAD] // bs
            if b and table[b] != table[b - 1] + 1:  # a jump in the pool (checked inline: a call per key cost 5%)
                _prefetch_position(kf, table, keys[t + AHEAD], bs, row)
        p = keys[t]
        kb = k_cache[table[p // bs], p % bs]  # [kv_heads, head_dim]
        for h in range(heads):
            krow = kb[h // group]
            q = qkv[h * hd:(h + 1) * hd]
            s = np.float32(0.0)
            for j in range(hd):
                s += q[j] * krow[j]
            scores[h, t] = s * scale
    for t in range(min(AHEAD, n)):
        _prefetch_position(vf, table, keys[t], bs, row)
    for h in range(heads):
        sr = scores[h]
        m = sr.max()
        total = np.float32(0.0)
        for t in range(n):
            e = np.exp(sr[t] - m)
            sr[t] = e
            total += e
        inv = np.float32(1.0) / total
        for t in range(n):
            sr[t] *= inv
    for t in range(n):
        if t + AHEAD < n:
            b = keys[t + AHEAD] // bs
            if b and table[b] != table[b - 1] + 1:  # a jump in the pool (checked inline: a call per key cost 5%)
                _prefetch_position(vf, table, keys[t + AHEAD], bs, row)
        p = keys[t]
        vb = v_cache[table[p // bs], p % bs]
        for h in range(heads):
            vrow = vb[h // group]
            pr = scores[h, t]
            o = out[h * hd:(h + 1) * hd]
            for j in range(hd):
                o[j] += pr * vrow[j]


@jit.njit(fastmath=True)
def _layer_kernel(x, w_in, w_post, eps, w_qkv, b_qkv, w_o, b_o, w_gu, b_gu, w_down, b_down, cos, sin,
                  k_cache, v_cache, tables, keys, key_counts, slots, heads, kv_heads):
    """One decoder layer on the hidden rows ``x`` [T, hidden] (updated in place). Row ``t`` writes
    its K/V at flat ``slots[t]`` of this layer's cache [blocks, block_size, kv_heads, head_dim] (all
    rows first, as the operator path does), then attends to the positions ``keys[t, :key_counts[t]]``
    of the sequence whose blocks are ``tables[t]``."""
    bs, hd = k_cache.shape[1], k_cache.shape[3]
    rows, hidden = x.shape
    xn = np.empty((rows, hidden), np.float32)
    _rms_norm(x, w_in, eps, xn)
    qkv = np.empty((rows, w_qkv.shape[0]), np.float32)
    matmul_rows(w_qkv, xn, b_qkv, qkv)
    half = hd // 2
    rot = np.empty(hd, np.float32)
    for t in range(rows):
        qt, ct, st = qkv[t], cos[t], sin[t]
        for h in range(heads + kv_heads):  # RoPE on q and k: x * cos + rotate_half(x) * sin (sin signed)
            base = h * hd
            for j in range(half):
                rot[j] = qt[base + j] * ct[j] + qt[base + j + half] * st[j]
            for j in range(half, hd):
                rot[j] = qt[base + j] * ct[j] + qt[base + j - half] * st[j]
            for j in range(hd):
                qt[base + j] = rot[j]
        blk, off = slots[t] // bs, slots[t] % bs
        for g in range(kv_heads):
            for j in range(hd):
                k_cache[blk, off, g, j] = qt[(heads + g) * hd + j]
                v_cache[blk, off, g, j] = qt[(heads + kv_heads + g) * hd + j]
    att = np.zeros((rows, heads * hd), np.float32)
    for t in range(rows):
        _attend(qkv[t], k_cache, v_cache, tables[t], keys[t, :key_counts[t]], heads, kv_heads, att[t])
    o = np.empty((rows, hidden), np.float32)
    matmul_rows(w_o, att, b_o, o)
    x += o
    _rms_norm(x, w_post, eps, xn)
    gu = np.empty((rows, w_gu.shape[0]), np.float32)
    matmul_rows(w_gu, xn, b_gu, gu)
    inter = w_gu.shape[0] // 2
    act = np.empty((rows, inter), np.float32)
    for t in range(rows):
        for i in range(inter):
            g = gu[t, i]
            act[t, i] = g / (np.float32(1.0) + np.exp(-g)) * gu[t, inter + i]
    matmul_rows(w_down, act, b_down, o)
    x += o


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


def row_keys(batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per flat row of ``batch``: its sequence's block table ``[T, blocks]``, the key positions its
    mask lets it see ``[T, most keys]`` (left-aligned) and how many ``[T]``, from the attention
    groups (``batch.py``: key position p of a group's padded layout lies in table block p // block_size)."""
    t = batch.num_tokens
    per_row = [None] * t
    for g in batch.groups:
        q = g.num_queries
        tables, mask = g.block_tables.numpy(), g.mask.numpy()
        for row, pad in zip(g.rows.tolist(), g.pad_index.tolist()):
            b = pad // q
            per_row[row] = (tables[b], np.flatnonzero(mask[b, 0, pad % q]))
    width = max(len(tab) for tab, _ in per_row)
    most = max(len(k) for _, k in per_row)
    tables = np.zeros((t, width), np.int64)
    keys = np.zeros((t, most), np.int64)
    counts = np.empty(t, np.int64)
    for row, (tab, k) in enumerate(per_row):
        tables[row, :len(tab)], keys[row, :len(k)], counts[row] = tab, k, len(k)
    return tables, keys, counts


def step_hidden(model, batch, cache) -> torch.Tensor:
    """``Transformer.hidden`` of a batch of a few tokens: the last layer's output [T, hidden]."""
    cfg = model.config
    tables, keys, counts = row_keys(batch)
    slots = batch.slot_mapping.numpy()
    x = model.model.embed_tokens.weight[batch.token_ids].detach().clone()  # [T, hidden]
    xs = x.numpy()
    cos, sin = model.rope(batch.positions, x.dtype)
    cos, sin = cos.numpy()[:, 0], sin.numpy()[:, 0]
    ks, vs = cache.k.numpy(), cache.v.numpy()
    for i, arrays in enumerate(model_arrays(model)):
        _layer_kernel(xs, *arrays, cos, sin, ks[i], vs[i], tables, keys, counts, slots, cfg.num_heads,
                      cfg.num_kv_heads)
    return x

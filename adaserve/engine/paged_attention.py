"""Tree attention read straight from the paged KV cache: one Triton kernel per shared attention call.

Why: the operator path (``model.Attention.forward``) gathers every request's K/V blocks into a
contiguous buffer in each layer (``gather_blocks``: reads and writes all of it, padded to the
graph bucket's context), folds the query heads and runs SDPA over the copy with a dense mask
spelled out per key. For decode and tree steps that is three passes over the K/V where attention
needs one, and about six kernels per layer where this is one. This kernel reads each request's
blocks through its block table and the mask from its ``MaskWindow`` (context length per query row,
the tree's own keys as bits), with an online softmax in fp32 (flash-attention style).

Grid: (requests, KV heads, row tiles); a program holds up to ``MAX_ROWS`` of the ``G * Q`` query rows
of one request and KV head (G query heads per KV head, Q rows per request) and walks the request's keys ``KEY_TILE`` at a
time (several KV blocks, each found in the block table), up to the end of its window (its context
plus its tree). Used for attention groups whose requests have fewer than ``SOLO_QUERY_THRESHOLD``
new tokens each (decodes, trees, short prompt tails); prefill chunks keep SDPA. A step of few
requests splits each request's keys over several programs as well (``key_splits``, flash-decoding),
their partial results combined by ``combine_splits``.

Off unless ``ADASERVE_PAGED_ATTENTION=1`` (needs Triton and a CUDA device, or
``TRITON_INTERPRET=1`` on the CPU, as the tests run it): not yet measured on a GPU.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from adaserve.core.environment import env_switch

PAGED_ENV = "ADASERVE_PAGED_ATTENTION"
KEY_TILE = 64  # keys per iteration of the kernel (4 KV blocks of 16)
# query rows per program: a model with many query heads per KV head and large trees spreads its
# rows over more programs (a third grid axis) instead of holding them all in one program's registers
MAX_ROWS = 64
MAX_SPLITS = 16
SPLITS: int | None = None  # tests: key ranges per program row, whatever the device


@functools.cache
def _triton():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    return triton, tl


def paged_attention_enabled(device: torch.device) -> bool:
    """``ADASERVE_PAGED_ATTENTION=1`` and Triton importable, on CUDA (or the CPU under Triton's
    interpreter)."""
    if not env_switch(PAGED_ENV, "shared attention calls read the paged cache with a Triton kernel",
                      "gather + SDPA", "gather + SDPA"):
        return False
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return _triton() is not None and (device.type == "cuda" or interpreted)


@functools.cache
def _kernel():
    from .paged_attention_kernel import paged_tree_attention

    return paged_tree_attention


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                    prefix: torch.Tensor, start: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Attention of the padded queries ``q`` [B * Q, H, D] over the keys each row's mask window
    shows (``batch.MaskWindow``: ``prefix`` [B, Q], ``start`` [B], ``local`` [B, Q, W]), read from
    the layer's caches ``[blocks, block_size, KV, D]`` through ``tables`` [B, NB]: [B * Q, H, D]."""
    triton, _ = _triton()
    b, qn = prefix.shape
    h, dim = q.shape[1], q.shape[2]
    bs, kv = k_cache.shape[1], k_cache.shape[2]
    group = h // kv
    q = q.contiguous()
    block_m = min(max(16, triton.next_power_of_2(group * qn)), MAX_ROWS)
    block_n = max(bs, KEY_TILE)
    row_tiles = triton.cdiv(group * qn, block_m)
    key_tiles = triton.cdiv(tables.shape[1] * bs, block_n)
    splits = key_splits(q.device, b * kv * row_tiles, key_tiles)
    if splits == 1:
        out, m, l = torch.empty_like(q), q, q  # m, l unused
    else:
        out = q.new_empty(q.shape[0] * h, splits, dim, dtype=torch.float32)
        m = q.new_empty(q.shape[0] * h, splits, dtype=torch.float32)
        l = torch.empty_like(m)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # then every tile: a constant loop bound
    _kernel()[(b, kv, row_tiles * splits)](
        q, k_cache, v_cache, out, m, l, tables.contiguous(), prefix.contiguous(), start.contiguous(),
        local.contiguous(), 1.0 / math.sqrt(dim), qn, local.shape[2], tables.shape[1], H=h, KV=kv, G=group,
        D=dim, BS=bs, BLOCK_M=block_m, BLOCK_N=block_n, EVERY_TILE=key_tiles if interpreted else 0,
        SPLITS=splits, IEEE=q.dtype == torch.float32)
    return out if splits == 1 else combine_splits(out, m, l).view(q.shape).to(q.dtype)


def combine_splits(acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """The attention output from the key ranges' partials: ``acc`` [rows, S, D] (unnormalised),
    running maxima ``m`` and sums ``l`` [rows, S] (a range that saw no key: -inf and 0)."""
    top = m.max(dim=1, keepdim=True).values
    w = torch.exp(m - top)  # every row sees key 0, in the first range: ``top`` is finite
    return (w.unsqueeze(-1) * acc).sum(1) / (w * l).sum(1, keepdim=True)


def key_splits(device: torch.device, programs: int, key_tiles: int) -> int:
    """Key ranges per (request, KV head, row tile): 1 when the programs already fill the GPU, else
    a power of two up to ``MAX_SPLITS`` that brings them to about twice its multiprocessors
    (flash-decoding: a step of few requests over long contexts). ``SPLITS`` overrides (tests)."""
    if SPLITS is not None:
        return SPLITS
    if device.type != "cuda":
        return 1
    target = 2 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= target // 2:
        return 1
    want = min(-(-target // programs), key_tiles, MAX_SPLITS)
    return 1 << (want - 1).bit_length() if want > 1 else 1


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count

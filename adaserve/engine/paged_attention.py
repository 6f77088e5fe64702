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
from dataclasses import dataclass

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


@dataclass
class PagedCall:
    """One attention group's kernel launch, prepared once per forward (``paged_call``) and run in
    every layer: the per-step arithmetic and copies stay out of the layer loop."""

    tables: torch.Tensor  # [B, NB]
    prefix: torch.Tensor  # [B, Q]
    start: torch.Tensor  # [B]
    local: torch.Tensor  # [B, Q, W]
    grid: tuple[int, int, int]
    consts: dict
    splits: int

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """Attention of the padded queries ``q`` [B * Q, H, D] over the keys each row's mask window
        shows, read from the layer's caches ``[blocks, block_size, KV, D]``: [B * Q, H, D]."""
        q = q.contiguous()
        if self.splits == 1:
            out, m, l = torch.empty_like(q), q, q  # m, l unused
        else:
            rows, dim = q.shape[0] * q.shape[1], q.shape[2]
            out = q.new_empty(rows, self.splits, dim, dtype=torch.float32)
            m = q.new_empty(rows, self.splits, dtype=torch.float32)
            l = torch.empty_like(m)
        b, qn = self.prefix.shape
        _kernel()[self.grid](q, k_cache, v_cache, out, m, l, self.tables, self.prefix, self.start, self.local,
                             self.consts["scale"], qn, self.local.shape[2], self.tables.shape[1],
                             **{k: v for k, v in self.consts.items() if k != "scale"}, IEEE=q.dtype == torch.float32)
        return out if self.splits == 1 else combine_splits(out, m, l).view(q.shape).to(q.dtype)


def paged_call(tables: torch.Tensor, prefix: torch.Tensor, start: torch.Tensor, local: torch.Tensor,
               heads: int, kv_heads: int, head_dim: int, block_size: int) -> PagedCall:
    """The launch of one group's attention (its block ``tables`` [B, NB] and mask window ``prefix``
    [B, Q], ``start`` [B], ``local`` [B, Q, W], ``batch.MaskWindow``) for a model of these heads."""
    triton, _ = _triton()
    b, qn = prefix.shape
    group = heads // kv_heads
    block_m = min(max(16, triton.next_power_of_2(group * qn)), MAX_ROWS)
    block_n = max(block_size, KEY_TILE)
    row_tiles = triton.cdiv(group * qn, block_m)
    key_tiles = triton.cdiv(tables.shape[1] * block_size, block_n)
    splits = key_splits(tables.device, b * kv_heads * row_tiles, key_tiles)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # then every tile: a constant loop bound
    consts = dict(scale=1.0 / math.sqrt(head_dim), H=heads, KV=kv_heads, G=group, D=head_dim, BS=block_size,
                  BLOCK_M=block_m, BLOCK_N=block_n, EVERY_TILE=key_tiles if interpreted else 0, SPLITS=splits)
    return PagedCall(tables.contiguous(), prefix.contiguous(), start.contiguous(), local.contiguous(),
                     (b, kv_heads, row_tiles * splits), consts, splits)


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

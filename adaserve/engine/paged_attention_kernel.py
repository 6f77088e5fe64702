"""The Triton kernel of ``paged_attention.py`` (imported on first use: Triton decides at import
whether its kernels run compiled or, with ``TRITON_INTERPRET=1``, interpreted on the CPU)."""

import triton
import triton.language as tl


@triton.jit
def key_tile(t, lo, hi, q, k_ptr, v_ptr, tables_ptr, local_ptr, b, h, r, valid, prefix, start, m_i, l_i, acc,
             scale, Q, W, NB, KV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
             IEEE: tl.constexpr):
    """Keys ``t * BLOCK_N ...`` of the request (``BLOCK_N / BS`` KV blocks) into the online softmax
    (m_i, l_i, acc); nothing from a tile outside this program's ``[lo, hi)``."""
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    key = t * BLOCK_N + n
    in_table = (key < NB * BS) & (key >= lo * BLOCK_N) & (key < hi * BLOCK_N)  # this program's tiles only
    block = tl.load(tables_ptr + b * NB + key // BS, mask=in_table, other=0)
    slot = (block * BS + key % BS) * KV + h
    k = tl.load(k_ptr + slot[:, None] * D + d[None, :], mask=in_table[:, None], other=0.0)
    v = tl.load(v_ptr + slot[:, None] * D + d[None, :], mask=in_table[:, None], other=0.0)
    if IEEE:  # fp32 inputs: full precision, not tf32 (the fp32 tests compare at 1e-4)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [BLOCK_M, BS]
    else:
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
    rel = key[None, :] - start
    inside = (rel >= 0) & (rel < W) & valid[:, None]
    bits = tl.load(local_ptr + (b * Q + r)[:, None] * W + rel, mask=inside, other=0)
    seen = ((key[None, :] < prefix[:, None]) | (bits != 0)) & in_table[None, :]
    s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key seen yet
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["Q", "W", "NB"])  # one compiled kernel per block shape, not per size
def paged_tree_attention(q_ptr, k_ptr, v_ptr, out_ptr, m_ptr, l_ptr, tables_ptr, prefix_ptr, start_ptr, local_ptr,
                         scale, Q, W, NB,
                         H: tl.constexpr, KV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                         BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVERY_TILE: tl.constexpr,
                         SPLITS: tl.constexpr, IEEE: tl.constexpr):
    """With ``SPLITS`` > 1 each program takes one of that many ranges of the request's key tiles and
    writes its unnormalised partial (``out`` [rows, SPLITS, D] fp32, running max ``m`` and sum ``l``
    [rows, SPLITS]) for ``combine_splits``; with 1, the attention output itself."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2) % SPLITS
    m = (tl.program_id(2) // SPLITS) * BLOCK_M + tl.arange(0, BLOCK_M)  # row m = g * Q + r: head h * G + g
    g = m // Q
    r = m % Q
    valid = m < G * Q
    d = tl.arange(0, D)
    row = (b * Q + r) * H + h * G + g  # [B * Q, H, D] layout
    q = tl.load(q_ptr + row[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
    prefix = tl.load(prefix_ptr + b * Q + r, mask=valid, other=1)
    start = tl.load(start_ptr + b)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    tiles = tl.cdiv(tl.minimum(start + W, NB * BS), BLOCK_N)  # up to the end of the request's window
    per = tl.cdiv(tiles, SPLITS)
    lo = split * per
    hi = tl.minimum(lo + per, tiles)
    if EVERY_TILE > 0:  # Triton's interpreter (the CPU tests) takes constant loop bounds only
        for t in range(0, EVERY_TILE):
            m_i, l_i, acc = key_tile(t, lo, hi, q, k_ptr, v_ptr, tables_ptr, local_ptr, b, h, r, valid, prefix,
                                     start, m_i, l_i, acc, scale, Q, W, NB, KV, D, BS, BLOCK_N, IEEE)
    else:
        for t in range(lo, hi):
            m_i, l_i, acc = key_tile(t, lo, hi, q, k_ptr, v_ptr, tables_ptr, local_ptr, b, h, r, valid, prefix,
                                     start, m_i, l_i, acc, scale, Q, W, NB, KV, D, BS, BLOCK_N, IEEE)
    if SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(out_ptr + row[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=valid[:, None])
    else:
        part = row * SPLITS + split
        tl.store(out_ptr + part[:, None] * D + d[None, :], acc, mask=valid[:, None])
        tl.store(m_ptr + part, m_i, mask=valid)
        tl.store(l_ptr + part, l_i, mask=valid)

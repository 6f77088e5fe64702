"""Paged KV cache: a block allocator (pure bookkeeping) and the per-layer K/V storage.

Token position ``p`` of sequence ``s`` lives at slot ``table[s][p // bs] * bs + p % bs``. A sequence has a
*committed* length (KV that is final) and may own blocks beyond it: speculative tree nodes are written
at the tentative positions ``length + i`` (node ``i`` of the tree) and ``KVCache.commit`` later copies
the accepted nodes to ``length, length + 1, ...`` and releases everything after them.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch

from adaserve.core import jit

from adaserve.scheduling.admission import BLOCK_SIZE

from .config import ModelConfig

__all__ = ["BLOCK_SIZE", "BlockAllocator", "KVCache", "OutOfBlocks"]


class OutOfBlocks(RuntimeError):
    """Not enough free KV blocks; the allocator state is unchanged."""


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: pop() hands out low ids first
        self._tables: dict[Hashable, list[int]] = {}
        self._lengths: dict[Hashable, int] = {}

    # ---- queries -----------------------------------------------------------------------------

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    def seq_ids(self) -> list[Hashable]:
        return list(self._tables)

    def length(self, seq_id: Hashable) -> int:
        """Committed KV tokens of the sequence."""
        return self._lengths[self._check(seq_id)]

    def capacity(self, seq_id: Hashable) -> int:
        """Token positions covered by the sequence's blocks (committed + tentative room)."""
        return len(self._tables[self._check(seq_id)]) * self.block_size

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._tables[self._check(seq_id)])

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def slots(self, seq_id: Hashable, start: int, end: int) -> list[int]:
        """Slots of positions ``[start, end)``; they must lie inside the sequence's blocks."""
        table, bs = self._tables[self._check(seq_id)], self.block_size
        if start < 0 or end > len(table) * bs:
            raise IndexError(f"positions [{start}, {end}) outside the {len(table) * bs} reserved for {seq_id!r}")
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    # ---- updates -----------------------------------------------------------------------------

    def add(self, seq_id: Hashable) -> None:
        if seq_id in self._tables:
            raise KeyError(f"sequence {seq_id!r} already has a block table")
        self._tables[seq_id] = []
        self._lengths[seq_id] = 0

    def reserve(self, seq_id: Hashable, num_tokens: int) -> None:
        """Make the sequence's blocks cover ``num_tokens`` positions (raises ``OutOfBlocks``, changing nothing)."""
        table = self._tables[self._check(seq_id)]
        need = self.blocks_for(num_tokens) - len(table)
        if need > len(self._free):
            raise OutOfBlocks(
                f"sequence {seq_id!r} needs {need} more KV blocks for {num_tokens} tokens; {len(self._free)} free "
                f"of {self.num_blocks} (block size {self.block_size})")
        for _ in range(need):
            table.append(self._free.pop())

    def append(self, seq_id: Hashable, n: int) -> list[int]:
        """Reserve and commit ``n`` more positions; returns their slots."""
        start = self.length(seq_id)
        self.reserve(seq_id, start + n)
        self._lengths[seq_id] = start + n
        return self.slots(seq_id, start, start + n)

    def set_length(self, seq_id: Hashable, length: int) -> None:
        """Set the committed length inside the reserved blocks (blocks are kept)."""
        if not 0 <= length <= self.capacity(seq_id):
            raise IndexError(f"length {length} outside the {self.capacity(seq_id)} reserved for {seq_id!r}")
        self._lengths[seq_id] = length

    def truncate(self, seq_id: Hashable, length: int) -> None:
        """Set the committed length and release every block after it."""
        self.set_length(seq_id, length)
        table = self._tables[seq_id]
        keep = self.blocks_for(length)
        while len(table) > keep:
            self._free.append(table.pop())

    def free(self, seq_id: Hashable) -> None:
        table = self._tables.pop(self._check(seq_id))
        del self._lengths[seq_id]
        self._free.extend(reversed(table))

    def _check(self, seq_id: Hashable) -> Hashable:
        if seq_id not in self._tables:
            raise KeyError(f"unknown sequence {seq_id!r}")
        return seq_id


class KVCache:
    """K and V storage ``[layers, num_blocks, block_size, kv_heads, head_dim]`` plus its allocator."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int = BLOCK_SIZE,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.config = config
        self.alloc = BlockAllocator(num_blocks, block_size)
        shape = (config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._workspace = torch.empty(0, dtype=dtype, device=device)

    def workspace(self, numel: int) -> torch.Tensor:
        """A reused scratch buffer of at least ``numel`` elements (the model gathers K/V blocks into it)."""
        if self._workspace.numel() < numel:
            self._workspace = torch.empty(max(numel, 2 * self._workspace.numel()), dtype=self.dtype, device=self.device)
        return self._workspace[:numel]

    @property
    def block_size(self) -> int:
        return self.alloc.block_size

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def add(self, seq_id: Hashable) -> None:
        self.alloc.add(seq_id)

    def free(self, seq_id: Hashable) -> None:
        self.alloc.free(seq_id)

    def length(self, seq_id: Hashable) -> int:
        return self.alloc.length(seq_id)

    def truncate(self, seq_id: Hashable, length: int) -> None:
        """Drop committed KV after ``length`` and any tentative tree KV."""
        self.alloc.truncate(seq_id, length)

    def commit(self, seq_id: Hashable, path: Sequence[int]) -> None:
        """Keep the tree nodes ``path`` (indices of nodes written at tentative positions ``length + i``).

        Their K/V move to positions ``length, length + 1, ...`` (all layers), the committed length grows by
        ``len(path)`` and all other tentative KV is released. ``path`` is normally the accepted
        root-to-node path, e.g. ``[0, 2, 5]``.
        """
        self.commit_many({seq_id: path})

    def commit_many(self, paths: Mapping[Hashable, Sequence[int]]) -> None:
        """``commit`` for several sequences with one K and one V copy for all of them."""
        bs = self.block_size
        lens, flat, bases, caps, tables, nblk = [], [], [], [], [], []
        for seq_id, path in paths.items():
            base = self.alloc.length(seq_id)
            table = self.alloc.block_table(seq_id)[base // bs:]  # the blocks of its tentative positions
            lens.append(len(path))
            flat += path
            bases.append(base)
            caps.append((base // bs + len(table)) * bs)  # the positions its blocks cover
            tables += table
            nblk.append(len(table))
        if flat:
            arrays = [np.array(x, np.int64) for x in (flat, lens, bases, caps, tables, nblk)]
            src, dst, bad = (_commit_slots_kernel if jit.enabled() else _commit_slots_arrays)(*arrays, bs)
            if bad >= 0:
                seq_id, path = list(paths.items())[bad]
                path = [int(i) for i in path]
                if len(set(path)) != len(path) or min(path) < 0:
                    raise ValueError(f"path must hold distinct non-negative node indices, got {path}")
                raise IndexError(f"node {max(path)} of {seq_id!r} was never reserved")
            if len(src):
                self.move_slots(torch.from_numpy(src).to(self.device), torch.from_numpy(dst).to(self.device))
        for seq_id, n in zip(paths, lens):
            self.alloc.truncate(seq_id, self.alloc.length(seq_id) + n)

    def move_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the K/V of flat slots ``src`` to slots ``dst`` in every layer (the only place that
        writes storage outside the model's forward: a sharded cache replays it on every rank)."""
        for store in (self.k, self.v):
            flat = store.view(store.shape[0], -1, *store.shape[3:])
            flat.index_copy_(1, dst, flat.index_select(1, src))  # gathered first: overlaps are safe


def _commit_slots_arrays(paths: np.ndarray, lens: np.ndarray, bases: np.ndarray, caps: np.ndarray,
                         blocks: np.ndarray, nblk: np.ndarray, bs: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The slot copies of ``commit_many``: path ``s`` (``lens[s]`` nodes of ``paths``) of the
    sequence with committed length ``bases[s]`` moves node ``i`` (tentative position
    ``base + i``) to ``base + j`` for its ``j``-th node where ``i != j``; the sequence's blocks from
    its first tentative position on are ``blocks``' next ``nblk[s]``. Returns (src, dst, the first
    path with a repeated, negative or unreserved node, or -1)."""
    owner = np.repeat(np.arange(len(lens)), lens)
    j = np.arange(len(paths)) - np.repeat(np.cumsum(lens) - lens, lens)
    bad = np.zeros(len(lens), bool)
    bad[owner[(paths < 0) | (bases[owner] + paths >= caps[owner])]] = True
    o = np.lexsort((paths, owner))
    po, pp = owner[o], paths[o]
    bad[po[1:][(po[1:] == po[:-1]) & (pp[1:] == pp[:-1])]] = True  # a node twice in one path
    if bad.any():
        return paths[:0], paths[:0], int(np.argmax(bad))
    blk_start = np.repeat(np.cumsum(nblk) - nblk, lens)
    moved = paths != j
    rel_src = (bases % bs)[owner] + paths
    rel_dst = (bases % bs)[owner] + j
    slot = lambda rel: blocks[blk_start + rel // bs] * bs + rel % bs  # noqa: E731
    return slot(rel_src)[moved], slot(rel_dst)[moved], -1


@jit.njit
def _commit_slots_kernel(paths, lens, bases, caps, blocks, nblk, bs):
    """``_commit_slots_arrays`` compiled: one pass over the paths."""
    src = np.empty(len(paths), np.int64)
    dst = np.empty(len(paths), np.int64)
    m, at, blk = 0, 0, 0
    for s in range(len(lens)):
        for j in range(lens[s]):
            i = paths[at + j]
            if i < 0 or bases[s] + i >= caps[s]:
                return src[:0], dst[:0], s
            for k in range(j):
                if paths[at + k] == i:
                    return src[:0], dst[:0], s
            if i != j:
                a, b = bases[s] % bs + i, bases[s] % bs + j
                src[m] = blocks[blk + a // bs] * bs + a % bs
                dst[m] = blocks[blk + b // bs] * bs + b % bs
                m += 1
        at += lens[s]
        blk += nblk[s]
    return src[:m], dst[:m], -1

"""Paged KV cache: a block allocator (pure bookkeeping) and the per-layer K/V storage.

Token position ``p`` of sequence ``s`` lives at slot ``table[s][p // bs] * bs + p % bs``. A sequence has a
*committed* length (KV that is final) and may own blocks beyond it: speculative tree nodes are written
at the tentative positions ``length + i`` (node ``i`` of the tree) and ``KVCache.commit`` later copies
the accepted nodes to ``length, length + 1, ...`` and releases everything after them.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch

from adaserve.core import jit

from adaserve.scheduling.admission import BLOCK_SIZE

from .config import ModelConfig
from .staging import Staging

__all__ = ["BLOCK_SIZE", "BlockAllocator", "KVCache", "OutOfBlocks"]


class OutOfBlocks(RuntimeError):
    """Not enough free KV blocks; the allocator state is unchanged."""


class BlockAllocator:
    """Block tables as one 2-D array: sequence ``s`` owns row ``row_of(s)`` of ``tables`` (its block
    ids, ``nblocks[row]`` of them) and has the committed length ``lengths[row]``. The batch paths
    (``rows``, ``reserve_rows``, ``truncate_rows``) change many sequences with a few array
    operations; the per-sequence methods are the same operations on one row. Free blocks are a
    stack (``_free[:_nfree]``, top last): the lowest ids are handed out first, and released blocks
    are pushed last-first so that a sequence that gets them back gets them in the same order.

    A row may *claim* blocks ahead of its use (``claim``): ``tables[row, :nclaim[row]]`` stay its
    own whether or not ``nblocks`` covers them, so growing into them pops nothing and truncating
    keeps them. The executor claims each request's KV reservation when its prompt
    starts, in one pop, so a sequence's blocks stay consecutive in the pool however it grows and
    whatever grows beside it; blocks popped one step at a time by sequences growing side by side
    interleave, and on a CPU a step reading scattered blocks costs more (docs/engine.md, "KV
    blocks claimed ahead")."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = np.arange(num_blocks - 1, -1, -1, dtype=np.int64)
        self._nfree = num_blocks
        self._row: dict[Hashable, int] = {}
        self._spare: list[int] = []  # rows of freed sequences, reused by add()
        self.tables = np.zeros((4, 4), np.int64)  # [rows, width]: the block ids of each row
        self.nblocks = np.zeros(4, np.int64)  # blocks each row uses (positions it may write)
        self.nclaim = np.zeros(4, np.int64)  # blocks each row holds at least (claimed ahead of use)
        self.lengths = np.zeros(4, np.int64)  # committed KV tokens of each row

    # ---- queries -----------------------------------------------------------------------------

    @property
    def free_blocks(self) -> int:
        return self._nfree

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._row

    def seq_ids(self) -> list[Hashable]:
        return list(self._row)

    def row_of(self, seq_id: Hashable) -> int:
        """The sequence's row of ``tables`` / ``nblocks`` / ``lengths``."""
        row = self._row.get(seq_id)
        if row is None:
            raise KeyError(f"unknown sequence {seq_id!r}")
        return row

    def rows(self, seq_ids: Sequence[Hashable]) -> np.ndarray:
        """The rows of several sequences (KeyError naming the first unknown one)."""
        get = self._row.get
        rows = [get(s, -1) for s in seq_ids]
        out = np.array(rows, np.int64)
        if len(out) and out.min() < 0:
            raise KeyError(f"unknown sequence {seq_ids[rows.index(-1)]!r}")
        return out

    def length(self, seq_id: Hashable) -> int:
        """Committed KV tokens of the sequence."""
        return int(self.lengths[self.row_of(seq_id)])

    def capacity(self, seq_id: Hashable) -> int:
        """Token positions covered by the sequence's blocks (committed + tentative room)."""
        return int(self.nblocks[self.row_of(seq_id)]) * self.block_size

    def block_table(self, seq_id: Hashable) -> list[int]:
        row = self.row_of(seq_id)
        return self.tables[row, :self.nblocks[row]].tolist()

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def slots(self, seq_id: Hashable, start: int, end: int) -> list[int]:
        """Slots of positions ``[start, end)``; they must lie inside the sequence's blocks."""
        row, bs = self.row_of(seq_id), self.block_size
        cap = int(self.nblocks[row]) * bs
        if start < 0 or end > cap:
            raise IndexError(f"positions [{start}, {end}) outside the {cap} reserved for {seq_id!r}")
        p = np.arange(start, end)
        return (self.tables[row, p // bs] * bs + p % bs).tolist()

    # ---- updates -----------------------------------------------------------------------------

    def add(self, seq_id: Hashable) -> None:
        if seq_id in self._row:
            raise KeyError(f"sequence {seq_id!r} already has a block table")
        if self._spare:
            row = self._spare.pop()
        else:
            row = len(self._row)
            if row == len(self.lengths):
                self._grow(2 * row, self.tables.shape[1])
        self._row[seq_id] = row
        self.nblocks[row] = self.lengths[row] = self.nclaim[row] = 0

    def _grow(self, n_rows: int, width: int) -> None:
        """Room for ``n_rows`` rows of ``width`` blocks (the arrays are reallocated)."""
        tables = np.zeros((n_rows, width), np.int64)
        r, w = self.tables.shape
        tables[:r, :w] = self.tables
        self.tables = tables
        self.nblocks = np.concatenate([self.nblocks, np.zeros(n_rows - r, np.int64)])
        self.nclaim = np.concatenate([self.nclaim, np.zeros(n_rows - r, np.int64)])
        self.lengths = np.concatenate([self.lengths, np.zeros(n_rows - r, np.int64)])

    def reserve(self, seq_id: Hashable, num_tokens: int) -> None:
        """Make the sequence's blocks cover ``num_tokens`` positions (raises ``OutOfBlocks``, changing nothing)."""
        self.reserve_rows(np.array([self.row_of(seq_id)]), np.array([num_tokens]), [seq_id])

    def reserve_rows(self, rows: np.ndarray, num_tokens: np.ndarray, seq_ids: Sequence[Hashable] | None = None) -> None:
        """``reserve`` for distinct rows at once, in order (raises ``OutOfBlocks`` naming the first
        sequence that does not fit, changing nothing)."""
        if jit.enabled():
            nfree, bad, width = _reserve_kernel(self._free, self._nfree, self.tables, self.nblocks, self.nclaim, rows,
                                                num_tokens, self.block_size)
            if bad == -2:  # the table is too narrow: widen it, then reserve
                self._grow(len(self.lengths), max(width, 2 * self.tables.shape[1]))
                nfree, bad, _ = _reserve_kernel(self._free, self._nfree, self.tables, self.nblocks, self.nclaim, rows,
                                                num_tokens, self.block_size)
            self._nfree = nfree
            if bad < 0:
                return
        use = np.maximum(-(-num_tokens // self.block_size), self.nblocks[rows])
        self._hold(rows, use, num_tokens, seq_ids)
        self.nblocks[rows] = use

    def claim(self, seq_id: Hashable, num_tokens: int) -> None:
        """Hold blocks for ``num_tokens`` positions of the sequence ahead of their use, in one pop
        (consecutive where the top of the free stack is): later ``reserve`` calls grow into them and
        ``truncate`` keeps them; ``free`` releases them. Raises ``OutOfBlocks``, changing nothing."""
        row = self.row_of(seq_id)
        want = max(self.blocks_for(num_tokens), int(self.nclaim[row]))
        self._hold(np.array([row]), np.array([want]), np.array([num_tokens]), [seq_id])
        self.nclaim[row] = want

    def _hold(self, rows: np.ndarray, blocks: np.ndarray, num_tokens: np.ndarray,
              seq_ids: Sequence[Hashable] | None) -> None:
        """Pop what each of the distinct ``rows`` lacks to hold ``blocks[i]`` blocks (table columns
        filled in order), or raise ``OutOfBlocks`` naming the first that does not fit (for
        ``num_tokens[i]`` tokens), changing nothing."""
        held = np.maximum(self.nblocks[rows], self.nclaim[rows])
        need = np.maximum(blocks - held, 0)
        total = int(need.sum())
        if total == 0:
            return
        if total > self._nfree:
            i = int(np.argmax(np.cumsum(need) > self._nfree))
            seq = seq_ids[i] if seq_ids is not None else f"in row {int(rows[i])}"
            raise OutOfBlocks(
                f"sequence {seq!r} needs {int(need[i])} more KV blocks for {int(num_tokens[i])} tokens; "
                f"{self._nfree - int(need[:i].sum())} free of {self.num_blocks} (block size {self.block_size})")
        top = int((held + need).max())
        if top > self.tables.shape[1]:
            self._grow(len(self.lengths), max(top, 2 * self.tables.shape[1]))
        lo = self._nfree - total
        got = self._free[lo:self._nfree][::-1]  # popped: the top of the stack first
        self._nfree = lo
        owner = np.repeat(np.arange(len(rows)), need)
        col = np.repeat(held - (np.cumsum(need) - need), need) + np.arange(total)
        self.tables[rows[owner], col] = got

    def append(self, seq_id: Hashable, n: int) -> list[int]:
        """Reserve and commit ``n`` more positions; returns their slots."""
        start = self.length(seq_id)
        self.reserve(seq_id, start + n)
        self.lengths[self._row[seq_id]] = start + n
        return self.slots(seq_id, start, start + n)

    def set_length(self, seq_id: Hashable, length: int) -> None:
        """Set the committed length inside the reserved blocks (blocks are kept)."""
        if not 0 <= length <= self.capacity(seq_id):
            raise IndexError(f"length {length} outside the {self.capacity(seq_id)} reserved for {seq_id!r}")
        self.lengths[self._row[seq_id]] = length

    def truncate(self, seq_id: Hashable, length: int) -> None:
        """Set the committed length and release every block after it."""
        self.set_length(seq_id, length)
        self.truncate_rows(np.array([self._row[seq_id]]), np.array([length]))

    def truncate_rows(self, rows: np.ndarray, lengths: np.ndarray) -> None:
        """``truncate`` for distinct rows at once, in order (lengths must lie inside each row's blocks)."""
        if jit.enabled():
            self._nfree, bad = _truncate_kernel(self._free, self._nfree, self.tables, self.nblocks, self.nclaim,
                                                self.lengths, rows, lengths, self.block_size)
            if bad < 0:
                return
        have = self.nblocks[rows]
        if np.any((lengths < 0) | (lengths > have * self.block_size)):
            i = int(np.argmax((lengths < 0) | (lengths > have * self.block_size)))
            raise IndexError(f"length {int(lengths[i])} outside the {int(have[i]) * self.block_size} reserved "
                             f"in row {int(rows[i])}")
        self.lengths[rows] = lengths
        keep = -(-lengths // self.block_size)
        drop = np.maximum(have - np.maximum(keep, self.nclaim[rows]), 0)  # claimed blocks stay held
        total = int(drop.sum())
        if total:  # each row's dropped blocks pushed last first
            owner = np.repeat(np.arange(len(rows)), drop)
            col = np.repeat(have + (np.cumsum(drop) - drop), drop) - 1 - np.arange(total)
            self._free[self._nfree:self._nfree + total] = self.tables[rows[owner], col]
            self._nfree += total
        self.nblocks[rows] = np.minimum(keep, have)

    def free(self, seq_id: Hashable) -> None:
        row = self.row_of(seq_id)
        self.nblocks[row] = max(self.nblocks[row], self.nclaim[row])  # every held block, claimed or used
        self.nclaim[row] = 0
        self.truncate_rows(np.array([row]), np.array([0]))
        del self._row[seq_id]
        self._spare.append(row)


@jit.njit
def _reserve_kernel(free, nfree, tables, nblocks, nclaim, rows, num_tokens, bs):
    """``BlockAllocator.reserve_rows`` compiled: (free blocks left, -1) once done; (unchanged, i)
    if row ``i`` does not fit (nothing changed); (unchanged, -2, width) if ``tables`` must first be
    widened to ``width`` columns. Blocks a row claimed are used before any is popped."""
    total, width = 0, 0
    for i in range(len(rows)):
        row = rows[i]
        use = max(-(-num_tokens[i] // bs), nblocks[row])
        total += max(use - max(nblocks[row], nclaim[row]), 0)
        if total > nfree:
            return nfree, i, 0
        width = max(width, use)
    if width > tables.shape[1]:
        return nfree, -2, width
    for i in range(len(rows)):
        row = rows[i]
        use = max(-(-num_tokens[i] // bs), nblocks[row])
        for col in range(max(nblocks[row], nclaim[row]), use):
            nfree -= 1
            tables[row, col] = free[nfree]
        nblocks[row] = use
    return nfree, -1, 0


@jit.njit
def _truncate_kernel(free, nfree, tables, nblocks, nclaim, lengths, rows, new_lengths, bs):
    """``BlockAllocator.truncate_rows`` compiled: (free blocks, -1) once done; (unchanged, i) if
    row ``i``'s length lies outside its blocks (nothing changed). Claimed blocks stay held."""
    for i in range(len(rows)):
        if new_lengths[i] < 0 or new_lengths[i] > nblocks[rows[i]] * bs:
            return nfree, i
    for i in range(len(rows)):
        row = rows[i]
        lengths[row] = new_lengths[i]
        keep = -(-new_lengths[i] // bs)
        for col in range(nblocks[row] - 1, max(keep, nclaim[row]) - 1, -1):
            free[nfree] = tables[row, col]
            nfree += 1
        nblocks[row] = min(keep, nblocks[row])
    return nfree, -1


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
        self.staging = Staging(self.k.device)  # the steps' host arrays to the device (one copy on a GPU)

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
        seq_ids = list(paths)
        lens = np.fromiter((len(p) for p in paths.values()), np.int64, len(seq_ids))
        flat = np.fromiter(itertools.chain.from_iterable(paths.values()), np.int64, int(lens.sum()))
        self.commit_rows(self.alloc.rows(seq_ids), flat, lens, seq_ids)

    def commit_rows(self, rows: np.ndarray, paths: np.ndarray, lens: np.ndarray,
                    seq_ids: Sequence[Hashable] | None = None) -> None:
        """``commit_many`` by allocator rows (distinct): row ``rows[s]`` keeps the ``lens[s]`` nodes
        that follow in ``paths`` (one kernel for the slot copies, one array update of the tables).
        ``seq_ids`` (same order) name the sequences in errors."""
        a, bs = self.alloc, self.block_size
        bases = a.lengths[rows]
        if len(paths):
            kernel = _commit_slots_kernel if jit.enabled() else _commit_slots_arrays
            src, dst, bad = kernel(paths, lens, bases, a.nblocks[rows] * bs, a.tables, rows, bs)
            if bad >= 0:
                at = int(lens[:bad].sum())
                path = paths[at:at + int(lens[bad])].tolist()
                name = seq_ids[bad] if seq_ids is not None else f"row {int(rows[bad])}"
                if len(set(path)) != len(path) or min(path) < 0:
                    raise ValueError(f"path must hold distinct non-negative node indices, got {path}")
                raise IndexError(f"node {max(path)} of {name!r} was never reserved")
            if len(src):
                self.move_slots(*self.staging.to_device([src, dst]))
        a.truncate_rows(rows, bases + lens)

    def move_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the K/V of flat slots ``src`` to slots ``dst`` in every layer (the only place that
        writes storage outside the model's forward: a sharded cache replays it on every rank)."""
        for store in (self.k, self.v):
            flat = store.view(store.shape[0], -1, *store.shape[3:])
            flat.index_copy_(1, dst, flat.index_select(1, src))  # gathered first: overlaps are safe


def _commit_slots_arrays(paths: np.ndarray, lens: np.ndarray, bases: np.ndarray, caps: np.ndarray,
                         tables: np.ndarray, rows: np.ndarray, bs: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The slot copies of ``commit_rows``: path ``s`` (``lens[s]`` nodes of ``paths``) of the
    sequence in row ``rows[s]`` of ``tables``, committed length ``bases[s]``, moves node ``i``
    (tentative position ``base + i``) to ``base + j`` for its ``j``-th node where ``i != j``;
    ``caps[s]``: the positions its blocks cover. Returns (src, dst, the first path with a
    repeated, negative or unreserved node, or -1)."""
    owner = np.repeat(np.arange(len(lens)), lens)
    j = np.arange(len(paths)) - np.repeat(np.cumsum(lens) - lens, lens)
    bad = np.zeros(len(lens), bool)
    bad[owner[(paths < 0) | (bases[owner] + paths >= caps[owner])]] = True
    o = np.lexsort((paths, owner))
    po, pp = owner[o], paths[o]
    bad[po[1:][(po[1:] == po[:-1]) & (pp[1:] == pp[:-1])]] = True  # a node twice in one path
    if bad.any():
        return paths[:0], paths[:0], int(np.argmax(bad))
    moved = paths != j
    row, base = rows[owner], bases[owner]
    slot = lambda pos: tables[row, pos // bs] * bs + pos % bs  # noqa: E731
    return slot(base + paths)[moved], slot(base + j)[moved], -1


@jit.njit
def _commit_slots_kernel(paths, lens, bases, caps, tables, rows, bs):
    """``_commit_slots_arrays`` compiled: one pass over the paths."""
    src = np.empty(len(paths), np.int64)
    dst = np.empty(len(paths), np.int64)
    m, at = 0, 0
    for s in range(len(lens)):
        row = rows[s]
        for j in range(lens[s]):
            i = paths[at + j]
            if i < 0 or bases[s] + i >= caps[s]:
                return src[:0], dst[:0], s
            for k in range(j):
                if paths[at + k] == i:
                    return src[:0], dst[:0], s
            if i != j:
                a, b = bases[s] + i, bases[s] + j
                src[m] = tables[row, a // bs] * bs + a % bs
                dst[m] = tables[row, b // bs] * bs + b % bs
                m += 1
        at += lens[s]
    return src[:m], dst[:m], -1


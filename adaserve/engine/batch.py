"""One flat forward batch mixing prefill chunks, decode tokens and token trees of many sequences.

    b = BatchBuilder(cache)
    r0 = b.add_prefill("a", prompt_chunk)            # logits row of the chunk's last token
    r1 = b.add_decode("b", last_token)               # logits row of the decode token
    r2 = b.add_tree("c", tokens, parents)            # logits rows of every tree node
    logits = model(b.build(), cache)                 # [rows, vocab]; logits[r2] are the tree's
    cache.commit("c", accepted_path)                 # after verification

Prefill and decode tokens are committed to the cache when added. Tree node ``i`` is written at the
tentative position ``length + i`` (``position = length + depth`` for RoPE) until ``KVCache.commit``.
A tree can grow over several forwards (draft beam search): pass the whole tree each time and
``num_cached`` = how many of its first nodes earlier forwards already wrote.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .kv_cache import BlockAllocator, KVCache

PREFILL, DECODE, TREE = "prefill", "decode", "tree"
SOLO_QUERY_THRESHOLD = 32  # entries with this many new tokens get their own SDPA call (no padding)


@dataclass
class Entry:
    """The new tokens of one sequence in the batch."""

    seq_id: Hashable
    kind: str
    start: int  # first flat row
    num_new: int
    context_len: int  # committed KV before this entry
    key_len: int  # keys it attends over: context + (chain or whole tree)
    tree_mask: np.ndarray | None  # [num_new, key_len - context_len] for trees; None = causal chain
    logit_rows: range  # rows of the returned logits


@dataclass
class AttnGroup:
    """Entries attended in one padded SDPA call: queries ``[B, Q]``, keys ``[B, blocks * block_size]``."""

    rows: torch.Tensor  # [Tg] flat rows of the group's tokens
    pad_index: torch.Tensor  # [Tg] where each row sits in the padded [B * Q] query layout
    block_tables: torch.Tensor  # [B, max_blocks]
    mask: torch.Tensor  # [B, 1, Q, max_blocks * block_size] bool, True = may attend
    num_queries: int  # Q
    all_rows: bool = False  # rows == arange(T): skip the gather / scatter


@dataclass
class FlatBatch:
    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T]
    seq_index: torch.Tensor  # [T] index into entries
    logits_rows: torch.Tensor  # [R] flat rows whose logits the forward returns
    entries: list[Entry] = field(default_factory=list)
    groups: list[AttnGroup] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


def tree_ancestor_mask(parents: Sequence[int]) -> np.ndarray:
    """``mask[i, j]`` is True iff node ``j`` is node ``i`` or one of its ancestors (parents[i] < i, roots -1)."""
    n = len(parents)
    mask = np.zeros((n, n), dtype=bool)
    for i, p in enumerate(parents):
        p = int(p)
        if not -1 <= p < i:
            raise ValueError(f"parents must be topologically ordered (-1 <= parents[i] < i); node {i} has parent {p}")
        if p >= 0:
            mask[i] = mask[p]
        mask[i, i] = True
    return mask


def tree_depths(parents: Sequence[int]) -> np.ndarray:
    depth = np.zeros(len(parents), dtype=np.int64)
    for i, p in enumerate(parents):
        depth[i] = 0 if p < 0 else depth[p] + 1
    return depth


class BatchBuilder:
    def __init__(self, cache: KVCache | BlockAllocator, solo_threshold: int = SOLO_QUERY_THRESHOLD):
        self.alloc = cache.alloc if isinstance(cache, KVCache) else cache
        self.device = cache.device if isinstance(cache, KVCache) else torch.device("cpu")  # build()'s default
        self.solo_threshold = solo_threshold
        self._reset()

    def _reset(self) -> None:
        self.entries: list[Entry] = []
        self._tokens: list[int] = []
        self._positions: list[int] = []
        self._slots: list[int] = []
        self._logits_rows: list[int] = []
        self._undo: dict[Hashable, int | None] = {}  # length before this batch; None = added by this batch
        self._trees: set[Hashable] = set()

    # ---- adding work -------------------------------------------------------------------------

    def add_prefill(self, seq_id: Hashable, tokens: Sequence[int], logits: str = "last") -> range:
        """Append a chunk (causal); ``logits`` = "last" | "all" | "none". Registers unknown sequences."""
        return self._add_chain(seq_id, tokens, PREFILL, logits)

    def add_decode(self, seq_id: Hashable, token: int) -> int:
        """Append one token; returns its logits row."""
        return self._add_chain(seq_id, [int(token)], DECODE, "all")[0]

    def add_tree(self, seq_id: Hashable, tokens: Sequence[int], parents: Sequence[int],
                 num_cached: int = 0, logits: bool = True) -> range:
        """Tree nodes at tentative positions; ``tokens``/``parents`` describe the whole tree (node 0 = root,
        normally the last committed token), the nodes ``[num_cached, len)`` are computed now."""
        n_total = len(tokens)
        if len(parents) != n_total or not 0 <= num_cached < n_total:
            raise ValueError("tokens and parents must have the same length and num_cached < len(tokens)")
        if seq_id in self._trees:
            raise ValueError(f"sequence {seq_id!r} already has a tree in this batch")
        self._register(seq_id)
        base = self.alloc.length(seq_id)
        if num_cached and self.alloc.capacity(seq_id) < base + num_cached:
            raise ValueError(f"num_cached={num_cached} nodes of {seq_id!r} were never written")
        self.alloc.reserve(seq_id, base + n_total)
        self._trees.add(seq_id)
        depth = tree_depths(parents)
        mask = tree_ancestor_mask(parents)[num_cached:]
        new = range(num_cached, n_total)
        slots = self.alloc.slots(seq_id, base + num_cached, base + n_total)
        return self._push(Entry(seq_id, TREE, len(self._tokens), len(new), base, base + n_total, mask, range(0)),
                          [int(tokens[i]) for i in new], [base + int(depth[i]) for i in new], slots,
                          "all" if logits else "none")

    def _add_chain(self, seq_id, tokens, kind, logits) -> range:
        if not len(tokens):
            raise ValueError("empty chunk")
        if seq_id in self._trees:
            raise ValueError(f"sequence {seq_id!r} has a tree in this batch; add its chunk before the tree")
        self._register(seq_id)
        base = self.alloc.length(seq_id)
        slots = self.alloc.append(seq_id, len(tokens))
        n = len(tokens)
        entry = Entry(seq_id, kind, len(self._tokens), n, base, base + n, None, range(0))
        return self._push(entry, [int(t) for t in tokens], list(range(base, base + n)), slots, logits)

    def _register(self, seq_id):
        if seq_id not in self.alloc:
            self.alloc.add(seq_id)
            self._undo.setdefault(seq_id, None)
        else:
            self._undo.setdefault(seq_id, self.alloc.length(seq_id))

    def _push(self, entry: Entry, tokens, positions, slots, logits) -> range:
        if logits not in ("last", "all", "none"):
            raise ValueError(f"logits must be 'last', 'all' or 'none', got {logits!r}")
        n = entry.num_new
        first = len(self._logits_rows)
        picked = {"all": range(n), "last": range(n - 1, n), "none": range(0)}[logits]
        self._logits_rows.extend(entry.start + i for i in picked)
        entry.logit_rows = range(first, len(self._logits_rows))
        self.entries.append(entry)
        self._tokens += tokens
        self._positions += positions
        self._slots += slots
        return entry.logit_rows

    def abort(self) -> None:
        """Undo the cache changes of every add (committed lengths and tentative blocks)."""
        for seq_id, length in self._undo.items():
            if length is None:
                self.alloc.free(seq_id)
            else:
                self.alloc.truncate(seq_id, length)
        self._reset()

    # ---- building ----------------------------------------------------------------------------

    def build(self, device: str | torch.device | None = None) -> FlatBatch:
        """The batch's tensors on ``device`` (default: the KV cache's device)."""
        if not self.entries:
            raise ValueError("empty batch")
        device = self.device if device is None else device
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        seq_index = np.repeat(np.arange(len(self.entries)), [e.num_new for e in self.entries])
        solo = [e for e in self.entries if e.num_new >= self.solo_threshold]
        shared = [e for e in self.entries if e.num_new < self.solo_threshold]
        groups = [self._group([e], device) for e in solo] + ([self._group(shared, device)] if shared else [])
        if len(groups) == 1:
            groups[0].all_rows = True
        return FlatBatch(as_long(self._tokens), as_long(self._positions), as_long(self._slots),
                         torch.from_numpy(seq_index).to(device), as_long(self._logits_rows), self.entries, groups)

    def _group(self, entries: list[Entry], device) -> AttnGroup:
        bs = self.alloc.block_size
        q = max(e.num_new for e in entries)
        nblk = max(self.alloc.blocks_for(e.key_len) for e in entries)
        b = len(entries)
        tables = np.zeros((b, nblk), dtype=np.int64)
        mask = np.zeros((b, 1, q, nblk * bs), dtype=bool)
        rows, pad = [], []
        for i, e in enumerate(entries):
            table = self.alloc.block_table(e.seq_id)[: self.alloc.blocks_for(e.key_len)]
            tables[i, : len(table)] = table
            m = mask[i, 0]
            m[: e.num_new, : e.context_len] = True
            if e.tree_mask is None:
                m[: e.num_new, e.context_len: e.key_len] = np.tri(e.num_new, dtype=bool)
            else:
                m[: e.num_new, e.context_len: e.key_len] = e.tree_mask
            m[e.num_new:, 0] = True  # padded query rows attend somewhere (avoids NaN); their output is dropped
            rows.extend(range(e.start, e.start + e.num_new))
            pad.extend(range(i * q, i * q + e.num_new))
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        return AttnGroup(as_long(rows), as_long(pad), torch.from_numpy(tables).to(device),
                         torch.from_numpy(mask).to(device), q)

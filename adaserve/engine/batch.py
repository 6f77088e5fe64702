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

from adaserve.core import jit
from adaserve.core.environment import env_switch
from adaserve.scheduling.admission import SOLO_QUERY_THRESHOLD
from adaserve.scheduling.attention_calls import cpu_call_costs, padding_groups

from .kv_cache import BlockAllocator, KVCache

PREFILL, DECODE, TREE = "prefill", "decode", "tree"
DEVICE_MASK_ENV = "ADASERVE_DEVICE_MASK"


def window_masks(device: torch.device) -> bool:
    """Whether batches for ``device`` carry their attention masks as a ``MaskWindow`` (expanded on the
    device) rather than dense: off the CPU unless ``ADASERVE_DEVICE_MASK=0``; ``=1`` on the CPU too
    (tests). Why: a dense mask is [requests, queries, keys] bytes written on the host and copied to
    the device every step (1.8 MB for 64 trees of 25 nodes over 1,100 keys, growing with the
    context); its window is [requests, queries, tree size] and a length per row."""
    setting = env_switch(DEVICE_MASK_ENV, "masks expanded on the device, CPU too", "dense masks built on the host",
                         "expanded on the device off the CPU")
    return device.type != "cpu" if setting is None else setting


@dataclass
class Entry:
    """The new tokens of one sequence in the batch."""

    seq_id: Hashable
    kind: str
    start: int  # first flat row
    num_new: int
    context_len: int  # committed KV before this entry
    key_len: int  # keys it attends over: context + (chain or whole tree)
    tree_parents: np.ndarray | None  # trees: the whole tree's parents (local); None = causal chain
    logit_rows: range  # rows of the returned logits

    @property
    def tree_mask(self) -> np.ndarray | None:
        """[num_new, key_len - context_len]: which tree nodes each new node attends to."""
        if self.tree_parents is None:
            return None
        return tree_ancestor_mask(self.tree_parents)[len(self.tree_parents) - self.num_new:]


class Entries(Sequence[Entry]):
    """A batch's entries in order, the ``Entry`` objects of ``add_trees`` made on first access
    (the forward and CUDA-graph bucketing read the batch's arrays; only tests read entries, so a
    step does not pay one object per tree). ``parts``: entries and ``(seq_ids, base, first,
    first_logit, parents, offsets)`` tuples of whole ``add_trees`` calls."""

    def __init__(self, parts: list, n: int):
        self._parts, self._n = parts, n
        self._items: list[Entry] | None = None

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        return self._list()[i]

    def __iter__(self):
        return iter(self._list())

    def _list(self) -> list[Entry]:
        if self._items is None:
            self._items = []
            for part in self._parts:
                if isinstance(part, Entry):
                    self._items.append(part)
                else:
                    self._items += _tree_entries(*part)
        return self._items


def _tree_entries(seq_ids, base, first, first_logit, parents, offsets) -> list[Entry]:
    bounds, out = offsets.tolist(), []
    for i, (seq_id, b, t0, l0) in enumerate(zip(seq_ids, base.tolist(), first.tolist(), first_logit.tolist())):
        size = bounds[i + 1] - bounds[i]
        out.append(Entry(seq_id, TREE, t0, size, b, b + size, parents[bounds[i]:bounds[i + 1]], range(l0, l0 + size)))
    return out


@dataclass
class MaskWindow:
    """A group's attention mask in parts: query row ``r`` of entry ``b`` sees key ``k`` iff ``k <
    prefix[b, r]`` (its committed context; 1 for a padded row: key 0 only) or ``local[b, r, k -
    start[b]]`` (its tree's or chain's keys, which start after the entry's context). ``dense``
    spells it out, on the tensors' device."""

    prefix: torch.Tensor  # [B, Q] int64
    start: torch.Tensor  # [B] int64
    local: torch.Tensor  # [B, Q, W] bool

    def dense(self, keys: int) -> torch.Tensor:
        """The mask ``[B, 1, Q, keys]`` (a few elementwise operations; inside a CUDA graph when captured)."""
        b, q, w = self.local.shape
        k = torch.arange(keys, device=self.local.device)
        rel = k - self.start[:, None]  # [B, keys]: the key's place in the entry's window
        inside = (rel >= 0) & (rel < w)
        seen = self.local.gather(2, rel.clamp(0, w - 1)[:, None, :].expand(b, q, keys))
        return ((k < self.prefix[:, :, None]) | (seen & inside[:, None, :]))[:, None]


@dataclass
class AttnGroup:
    """Entries attended in one padded SDPA call: queries ``[B, Q]``, keys ``[B, blocks * block_size]``."""

    rows: torch.Tensor  # [Tg] flat rows of the group's tokens
    pad_index: torch.Tensor  # [Tg] where each row sits in the padded [B * Q] query layout
    block_tables: torch.Tensor  # [B, max_blocks]
    mask: torch.Tensor | None  # [B, 1, Q, max_blocks * block_size] bool, True = may attend; None: ``window``
    num_queries: int  # Q
    all_rows: bool = False  # rows == arange(T): skip the gather / scatter
    entry_index: np.ndarray | None = None  # host: the batch entries in the group, in row order
    num_new: np.ndarray | None = None  # host: their new tokens (what CUDA-graph bucketing reads)
    window_len: np.ndarray | None = None  # host: their keys after the context (a tree grown earlier: > num_new)
    window: MaskWindow | None = None  # the mask in parts, when ``mask`` is None (``window_masks``)

    def attention_mask(self, block_size: int) -> torch.Tensor:
        """The dense boolean mask ``[B, 1, Q, keys]``, spelled out from ``window`` if need be."""
        if self.mask is not None:
            return self.mask
        return self.window.dense(self.block_tables.shape[1] * block_size)


@dataclass
class FlatBatch:
    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T]
    seq_index: torch.Tensor  # [T] index into entries
    logits_rows: torch.Tensor  # [R] flat rows whose logits the forward returns
    entries: Sequence[Entry] = field(default_factory=list)
    groups: list[AttnGroup] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


def tree_ancestor_mask(parents: Sequence[int]) -> np.ndarray:
    """``mask[i, j]`` is True iff node ``j`` is node ``i`` or one of its ancestors (parents[i] < i, roots -1)."""
    parents = check_parents(parents)
    n = len(parents)
    mask = np.zeros((n, n), dtype=bool)
    node, anc = ancestor_pairs(parents)
    mask[node, anc] = True
    return mask


def check_parents(parents: Sequence[int]) -> np.ndarray:
    """``parents`` as an int64 array; raises unless topologically ordered (-1 <= parents[i] < i)."""
    p = np.asarray(parents, dtype=np.int64).reshape(-1)
    bad = np.flatnonzero((p < -1) | (p >= np.arange(len(p))))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"parents must be topologically ordered (-1 <= parents[i] < i); node {i} has parent {p[i]}")
    return p


def ancestor_pairs(parents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every ``(node, ancestor)`` pair of a forest, a node being its own ancestor: ``parents`` are
    indices into the same array (-1 for roots). One array step per tree level, no per-node Python."""
    nodes = np.arange(len(parents), dtype=np.int64)
    anc = nodes
    out_nodes, out_anc = [nodes], [anc]
    while len(anc):
        up = parents[anc]
        keep = up >= 0
        nodes, anc = nodes[keep], up[keep]
        out_nodes.append(nodes)
        out_anc.append(anc)
    return np.concatenate(out_nodes), np.concatenate(out_anc)


def tree_depths(parents: Sequence[int]) -> np.ndarray:
    """Depth of every node of a forest (roots 0; ``parents[i] < i``)."""
    p = np.asarray(parents, dtype=np.int64).reshape(-1)
    return np.bincount(ancestor_pairs(p)[0], minlength=len(p)) - 1


def _first_bad_parent(parents: np.ndarray, offsets: np.ndarray) -> int:
    """The first node of the trees ``[offsets[i], offsets[i+1])`` whose local parent is not in
    ``[-1, node)`` or that is a root (-1) but not its tree's first node, or the other way round; -1 if none."""
    local = np.arange(len(parents)) - np.repeat(offsets[:-1], np.diff(offsets))
    bad = np.flatnonzero((parents < -1) | (parents >= local) | ((parents == -1) != (local == 0)))
    return int(bad[0]) if len(bad) else -1


@jit.njit
def _first_bad_parent_kernel(parents, offsets):
    """``_first_bad_parent`` compiled."""
    for i in range(len(offsets) - 1):
        for j in range(offsets[i + 1] - offsets[i]):
            p = parents[offsets[i] + j]
            if p < -1 or p >= j or (p == -1) != (j == 0):
                return offsets[i] + j
    return -1


def _tree_rows_arrays(parents: np.ndarray, offsets: np.ndarray, base: np.ndarray, tables: np.ndarray,
                      rows: np.ndarray, bs: int) -> tuple[np.ndarray, np.ndarray]:
    """RoPE positions (``base + depth``) and KV slots (of the tentative positions ``base + node``)
    of the nodes of trees ``[offsets[i], offsets[i+1])`` with local ``parents``; tree ``i``'s
    block ids are row ``rows[i]`` of ``tables``."""
    sizes = np.diff(offsets)
    first = np.repeat(offsets[:-1], sizes)
    depth = tree_depths(np.where(parents >= 0, parents + first, -1))
    pos = np.repeat(base, sizes) + np.arange(len(parents)) - first  # tentative positions
    slots = tables[np.repeat(rows, sizes), pos // bs] * bs + pos % bs
    return np.repeat(base, sizes) + depth, slots


@jit.njit
def _tree_rows_kernel(parents, offsets, base, tables, rows, bs):
    """``_tree_rows_arrays`` compiled: one pass over the nodes (parents come before children)."""
    positions = np.empty(len(parents), np.int64)
    slots = np.empty(len(parents), np.int64)
    for i in range(len(offsets) - 1):
        lo, row = offsets[i], rows[i]
        for j in range(offsets[i + 1] - lo):
            p = parents[lo + j]
            positions[lo + j] = base[i] if p < 0 else positions[lo + p] + 1
            pos = base[i] + j
            slots[lo + j] = tables[row, pos // bs] * bs + pos % bs
    return positions, slots


class BatchBuilder:
    def __init__(self, cache: KVCache | BlockAllocator, solo_threshold: int = SOLO_QUERY_THRESHOLD,
                 split_padding: bool = True):
        """``split_padding``: on a CPU, split the shared attention call where padding every entry to
        the longest keys and queries would cost more than another call (``padding_groups``)."""
        self.alloc = cache.alloc if isinstance(cache, KVCache) else cache
        self.device = cache.device if isinstance(cache, KVCache) else torch.device("cpu")  # build()'s default
        self.staging = cache.staging if isinstance(cache, KVCache) else None
        self.solo_threshold = solo_threshold
        self.split_padding = split_padding
        config = cache.config if isinstance(cache, KVCache) else None
        self.group_costs = cpu_call_costs(config.num_heads, config.num_kv_heads) if config else cpu_call_costs()
        self._reset()

    def _reset(self) -> None:
        self._parts: list = []  # Entry objects and whole add_trees calls (see ``Entries``)
        self._n_entries = 0
        self._num_tokens = 0
        self._tokens: list[np.ndarray] = []  # chunks, concatenated by build()
        self._positions: list[np.ndarray] = []
        self._slots: list[np.ndarray] = []
        self._logits_rows: list[np.ndarray] = []
        self._num_logits = 0
        self._undo: dict[Hashable, int | None] = {}  # length before this batch; None = added by this batch
        self._trees: set[Hashable] = set()
        # per entry, in order, what build() needs as arrays: allocator row, committed context,
        # new tokens, first flat row, keys, and where its tree's parents sit in the concatenation
        # of ``_par`` (length 0: a causal chain)
        self._cols: list[list[int]] = [[], [], [], [], [], [], []]
        self._par: list[np.ndarray] = []
        self._npar = 0

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
        parents = check_parents(parents)
        if seq_id in self._trees:
            raise ValueError(f"sequence {seq_id!r} already has a tree in this batch")
        self._register(seq_id)
        base = self.alloc.length(seq_id)
        if num_cached and self.alloc.capacity(seq_id) < base + num_cached:
            raise ValueError(f"num_cached={num_cached} nodes of {seq_id!r} were never written")
        self.alloc.reserve(seq_id, base + n_total)
        self._trees.add(seq_id)
        depth = tree_depths(parents)[num_cached:]
        slots = np.asarray(self.alloc.slots(seq_id, base + num_cached, base + n_total), np.int64)
        entry = Entry(seq_id, TREE, self._num_tokens, n_total - num_cached, base, base + n_total, parents, range(0))
        return self._push(entry, np.asarray(tokens, np.int64)[num_cached:], base + depth, slots,
                          "all" if logits else "none")

    def add_trees(self, seq_ids: Sequence[Hashable], tokens: np.ndarray, parents: np.ndarray,
                  offsets: np.ndarray) -> np.ndarray:
        """Add one whole tree per sequence at once (``add_tree`` for many, without per-node Python):
        tree ``i`` is ``tokens[offsets[i]:offsets[i+1]]`` with local ``parents`` (node 0 = root,
        topologically ordered). Every node gets a logits row; returns the first row of every tree
        (tree ``i``'s node ``j`` is row ``first[i] + j``)."""
        offsets = np.asarray(offsets, np.int64)
        sizes = np.diff(offsets)
        n = len(sizes)
        tokens, parents = np.asarray(tokens, np.int64), np.asarray(parents, np.int64)
        if len(seq_ids) != n or len(tokens) != offsets[-1] or len(parents) != offsets[-1] or np.any(sizes < 1):
            raise ValueError("add_trees: one non-empty tree per sequence, tokens/parents as long as offsets say")
        bad = (_first_bad_parent_kernel if jit.enabled() else _first_bad_parent)(parents, offsets)
        if bad >= 0:
            tree = int(np.searchsorted(offsets, bad, 'right') - 1)
            raise ValueError(f"add_trees: node {bad - int(offsets[tree])} of tree {tree} has parent {int(parents[bad])}"
                             " (need -1 <= parent < node, one root first)")
        if len(set(seq_ids)) != n or not self._trees.isdisjoint(seq_ids):
            raise ValueError("add_trees: a sequence may have one tree per batch")
        alloc = self.alloc
        try:
            rows = alloc.rows(seq_ids)
        except KeyError:  # new sequences: registered first
            for seq_id in seq_ids:
                if seq_id not in alloc:
                    self._register(seq_id)
            rows = alloc.rows(seq_ids)
        base = alloc.lengths[rows]
        if self._undo:
            for seq_id, b in zip(seq_ids, base.tolist()):
                self._undo.setdefault(seq_id, b)
        else:
            self._undo = dict(zip(seq_ids, base.tolist()))
        alloc.reserve_rows(rows, base + sizes, seq_ids)
        self._trees.update(seq_ids)
        positions, slots = (_tree_rows_kernel if jit.enabled() else _tree_rows_arrays)(
            parents, offsets, base, alloc.tables, rows, alloc.block_size)
        first = self._num_tokens + offsets[:-1]
        first_logit = self._num_logits + offsets[:-1]
        self._parts.append((list(seq_ids), base, first, first_logit, parents, offsets))
        self._n_entries += n
        for col, values in zip(self._cols, (rows, base, sizes, first, base + sizes, self._npar + offsets[:-1], sizes)):
            col += values.tolist()
        self._par.append(parents)
        self._npar += len(parents)
        self._tokens.append(tokens)
        self._positions.append(positions)
        self._slots.append(slots)
        self._logits_rows.append(np.arange(self._num_tokens, self._num_tokens + len(tokens), dtype=np.int64))
        self._num_tokens += len(tokens)
        self._num_logits += len(tokens)
        return first_logit

    def _add_chain(self, seq_id, tokens, kind, logits) -> range:
        if not len(tokens):
            raise ValueError("empty chunk")
        if seq_id in self._trees:
            raise ValueError(f"sequence {seq_id!r} has a tree in this batch; add its chunk before the tree")
        self._register(seq_id)
        base = self.alloc.length(seq_id)
        slots = self.alloc.append(seq_id, len(tokens))
        n = len(tokens)
        entry = Entry(seq_id, kind, self._num_tokens, n, base, base + n, None, range(0))
        return self._push(entry, np.asarray(tokens, np.int64), np.arange(base, base + n, dtype=np.int64),
                          np.asarray(slots, np.int64), logits)

    def _register(self, seq_id) -> int:
        """Add the sequence to the allocator if new (remembering how to undo); its committed length."""
        if seq_id not in self.alloc:
            self.alloc.add(seq_id)
            self._undo.setdefault(seq_id, None)
            return 0
        length = self.alloc.length(seq_id)
        self._undo.setdefault(seq_id, length)
        return length

    def _push(self, entry: Entry, tokens: np.ndarray, positions: np.ndarray, slots: np.ndarray, logits) -> range:
        if logits not in ("last", "all", "none"):
            raise ValueError(f"logits must be 'last', 'all' or 'none', got {logits!r}")
        n = entry.num_new
        picked = {"all": range(n), "last": range(n - 1, n), "none": range(0)}[logits]
        first = self._num_logits
        self._logits_rows.append(entry.start + np.arange(picked.start, picked.stop, dtype=np.int64))
        self._num_logits += len(picked)
        entry.logit_rows = range(first, self._num_logits)
        self._parts.append(entry)
        self._n_entries += 1
        par = entry.tree_parents
        for col, value in zip(self._cols, (self.alloc.row_of(entry.seq_id), entry.context_len, n, entry.start,
                                           entry.key_len, self._npar, 0 if par is None else len(par))):
            col.append(value)
        if par is not None:
            self._par.append(par)
            self._npar += len(par)
        self._tokens.append(tokens)
        self._positions.append(positions)
        self._slots.append(slots)
        self._num_tokens += n
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
        """The batch's tensors on ``device`` (default: the KV cache's device), sent in one copy
        (``staging.py``) when the cache's own device is that device and not the CPU."""
        if not self._n_entries:
            raise ValueError("empty batch")
        device = torch.device(self.device if device is None else device)
        cols = np.array(self._cols, np.int64)
        num_new = cols[2]
        par = _joined(self._par)
        solo = np.flatnonzero(num_new >= self.solo_threshold)
        shared = np.flatnonzero(num_new < self.solo_threshold)
        members = [solo[k:k + 1] for k in range(len(solo))]
        if len(shared):
            parts = [shared]
            if self.split_padding and len(shared) > 1 and device.type == "cpu":
                bs = self.alloc.block_size
                keys = -(-cols[4, shared] // bs) * bs
                parts = [shared[p] for p in padding_groups(keys, num_new[shared], *self.group_costs)]
            members += parts
        # a group of every entry keeps the batch's order (padding_groups may hand them back permuted)
        members = [p if len(p) < self._n_entries else np.arange(self._n_entries) for p in members]
        windowed = window_masks(device)
        window_len = np.where(cols[6] > 0, cols[6], num_new)
        groups = [self._group_arrays(cols[:, p] if len(p) < self._n_entries else cols, par, windowed)
                  for p in members]
        arrays = [_joined(self._tokens), _joined(self._positions), _joined(self._slots),
                  np.repeat(np.arange(self._n_entries), num_new), _joined(self._logits_rows)]
        for g in groups:
            arrays += [*g[:3], *g[4]]
        staging = self.staging if self.staging is not None and self.staging.serves(device) else None
        tensors = staging.to_device(arrays) if staging is not None else [torch.from_numpy(a).to(device) for a in arrays]
        attn, at = [], 5
        for g, p in zip(groups, members):
            rows, pad, tables, *mask = tensors[at:at + 3 + len(g[4])]
            at += 3 + len(g[4])
            window = MaskWindow(*mask) if windowed else None
            attn.append(AttnGroup(rows, pad, tables, None if windowed else mask[0], g[3],
                                  entry_index=p, num_new=num_new[p], window=window, window_len=window_len[p]))
        if len(attn) == 1:
            attn[0].all_rows = True
        return FlatBatch(*tensors[:5], self.entries, attn)

    @property
    def entries(self) -> Entries:
        """The entries added so far, in batch order."""
        return Entries(list(self._parts), self._n_entries)

    def _group_arrays(self, cols: np.ndarray, par: np.ndarray, windowed: bool) -> tuple:
        """One padded attention call over the entries whose ``_cols`` are ``cols`` ([7, B]): its
        rows, padded positions, block tables, query count and mask (``[mask]``, or with ``windowed``
        its ``MaskWindow`` arrays). Every query row sees its sequence's committed context; a
        chain's rows see the chain up to themselves, a tree's rows their ancestors; padded rows see
        key 0 only. The mask is built by ``_group_mask_kernel`` / ``_group_window_kernel``
        (compiled) or array operations; the block tables are one gather from the allocator's table."""
        alloc = self.alloc
        bs = alloc.block_size
        if jit.enabled():
            # one memory layout, so one compiled signature: a group's columns picked from the batch's
            # are Fortran-ordered, and a layout the warm-up did not meet compiled mid-run
            cols = np.ascontiguousarray(cols)
            tables, q = _group_tables_kernel(cols, alloc.tables, alloc.nblocks, bs)
            ctx, nnew, start, par_start, par_len = cols[1], cols[2], cols[3], cols[5], cols[6]
            if windowed:
                prefix, local, rows, pad = _group_window_kernel(ctx, nnew, start, par, par_start, par_len, q)
                return rows, pad, tables, q, [prefix, ctx.copy(), local]
            mask, rows, pad = _group_mask_kernel(ctx, nnew, start, par, par_start, par_len, q, tables.shape[1] * bs)
            return rows, pad, tables, q, [mask]
        rows, ctx, nnew, start, key_len, par_start, par_len = cols
        q = int(nnew.max())
        nblk_each = -(-key_len // bs)
        nblk = int(nblk_each.max())
        tables = alloc.tables[rows[:, None], np.arange(nblk)]
        tables[np.arange(nblk) >= np.minimum(nblk_each, alloc.nblocks[rows])[:, None]] = 0
        prefix, local, rows, pad = _group_window_arrays(ctx, nnew, start, par, par_start, par_len, q)
        if windowed:
            return rows, pad, tables, q, [prefix, ctx.copy(), local]
        window = MaskWindow(*(torch.from_numpy(a) for a in (prefix, ctx, local)))
        return rows, pad, tables, q, [window.dense(nblk * bs).numpy()]


def _joined(chunks: list[np.ndarray]) -> np.ndarray:
    """The int64 chunks as one array (no copy for a single chunk)."""
    if len(chunks) == 1:
        return chunks[0].astype(np.int64, copy=False)
    return np.concatenate(chunks).astype(np.int64, copy=False) if chunks else np.zeros(0, np.int64)


@jit.njit
def _group_tables_kernel(cols, all_tables, nblocks, bs):
    """The group's block tables (each entry's allocator row up to its keys' blocks, zeros after)
    and query count."""
    rows, nnew, key_len = cols[0], cols[2], cols[4]
    q, nblk = 0, 0
    for i in range(len(rows)):
        q = max(q, nnew[i])
        nblk = max(nblk, -(-key_len[i] // bs))
    tables = np.zeros((len(rows), nblk), np.int64)
    for i in range(len(rows)):
        for j in range(min(-(-key_len[i] // bs), nblocks[rows[i]])):
            tables[i, j] = all_tables[rows[i], j]
    return tables, q


def _group_window_arrays(ctx: np.ndarray, nnew: np.ndarray, start: np.ndarray, tree_parents: np.ndarray,
                         tree_start: np.ndarray, tree_len: np.ndarray,
                         q: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The group's ``MaskWindow`` arrays but its starts (the contexts ``ctx``): ``prefix`` [B, Q],
    ``local`` [B, Q, W], and its rows and padded positions, with array operations over all entries
    (tree rows: ``ancestor_pairs``); entry ``i``'s whole tree has parents
    ``tree_parents[tree_start[i]:][:tree_len[i]]`` (length 0: a causal chain)."""
    b = len(ctx)
    w = int(np.max(np.where(tree_len > 0, tree_len, nnew)))
    qi = np.arange(q)[None, :, None]
    kj = np.arange(w)[None, None, :]
    valid = qi < nnew[:, None, None]
    local = np.zeros((b, q, w), bool)
    chain = np.flatnonzero(tree_len == 0)
    local[chain] = valid[chain] & (kj <= qi)  # a chain's rows see its tokens up to themselves
    trees = np.flatnonzero(tree_len > 0).tolist()
    if trees:
        par = [tree_parents[tree_start[i]:tree_start[i] + tree_len[i]] for i in trees]
        sizes = np.fromiter((len(p) for p in par), np.int64, len(par))
        off = np.zeros(len(par) + 1, np.int64)
        np.cumsum(sizes, out=off[1:])
        node_of = np.arange(off[-1]) - np.repeat(off[:-1], sizes)
        parents = np.concatenate(par)
        glob = np.where(parents >= 0, parents + np.repeat(off[:-1], sizes), -1)
        node, anc = ancestor_pairs(glob)
        owner = np.repeat(np.asarray(trees, np.int64), sizes)[node]
        cached = (sizes - nnew[trees])[np.repeat(np.arange(len(par)), sizes)][node]  # nodes not computed now
        row = node_of[node] - cached
        keep = row >= 0
        local[owner[keep], row[keep], node_of[anc[keep]]] = True
    prefix = np.where(valid[:, :, 0], ctx[:, None], 1)  # padded query rows see key 0 (no NaN); output dropped
    j = np.arange(int(nnew.sum())) - np.repeat(np.cumsum(nnew) - nnew, nnew)  # row within its entry
    rows = np.repeat(start, nnew) + j
    pad = np.repeat(np.arange(b) * q, nnew) + j
    return prefix, local, rows, pad


@jit.njit
def _group_window_kernel(ctx, nnew, start, tree_parents, tree_start, tree_len, q):
    """``_group_window_arrays`` compiled."""
    b = len(ctx)
    w = 0
    for i in range(b):
        w = max(w, tree_len[i] if tree_len[i] > 0 else nnew[i])
    prefix = np.ones((b, q), np.int64)
    local = np.zeros((b, q, w), np.bool_)
    rows = np.empty(nnew.sum(), np.int64)
    pad = np.empty(nnew.sum(), np.int64)
    at = 0
    for i in range(b):
        lo, cached = tree_start[i], tree_len[i] - nnew[i]
        for r in range(nnew[i]):
            prefix[i, r] = ctx[i]
            if tree_len[i] == 0:
                local[i, r, :r + 1] = True
            else:
                j = cached + r
                while j >= 0:
                    local[i, r, j] = True
                    j = tree_parents[lo + j]
            rows[at], pad[at] = start[i] + r, i * q + r
            at += 1
    return prefix, local, rows, pad


@jit.njit
def _group_mask_kernel(ctx, nnew, start, tree_parents, tree_start, tree_len, q, width):
    """The group's dense mask ``[B, 1, Q, width]``: ``_group_window_kernel``'s window spelled out
    (``MaskWindow.dense``, every byte written once), with its rows and padded positions."""
    prefix, local, rows, pad = _group_window_kernel(ctx, nnew, start, tree_parents, tree_start, tree_len, q)
    mask = np.empty((len(ctx), 1, q, width), np.bool_)  # every element is written below (no zeroing pass)
    for i in range(len(ctx)):
        c = ctx[i]
        for r in range(q):
            row = mask[i, 0, r]
            row[:prefix[i, r]] = True
            row[prefix[i, r]:] = False
            for j in range(min(local.shape[2], width - c)):
                if local[i, r, j]:
                    row[c + j] = True
    return mask, rows, pad

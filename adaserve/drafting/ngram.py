"""The n-gram (prompt / suffix lookup) drafter, torch-free: a node's continuations are the tokens
that followed the longest matching n-gram earlier in the request, with confidence
``count / (occurrences + prior)``. Where numba is available (``adaserve.core.jit``) its table
update and its whole draft are one compiled kernel each (``_table_update_kernel``,
``_draft_kernel``: the same trees as ``TreeSet`` growth, node by node); else numpy, per level.

The engine drafts with it (``adaserve.engine.drafters``); the simulator runs the same drafter over
a recorded run's token ids to replay that run's drafts exactly (``adaserve.sim.ngram_replay``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from adaserve.core import jit
from adaserve.drafting.trees import RECORD_K, Expansion, TreeSet, level_plan
from adaserve.scheduling.plan import SpecShape
from adaserve.scheduling.trees import CandidateForest


class TokenSeq(Protocol):
    """What the drafter reads of a request (the engine's ``SeqState``): its id, its token ids
    (prompt, then committed output) and the last of them (the tree's root)."""

    seq_id: int
    ids: list[int]

    @property
    def last(self) -> int: ...


WINDOW = 8  # probe slots an _IntMap looks at per round
_FIB = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: the maps' Fibonacci hashing
_WINDOW_STEPS = np.arange(WINDOW, dtype=np.int64)


class _IntMap:
    """int64 keys (>= 0) -> int64 values: open addressing with linear probing, every operation on
    arrays of keys at once (a round per probe step, not a Python step per key). A key and its value
    sit side by side (``kv``: [slots, 2]): a probe that finds its key reads its value from the same
    cache line (the compiled paths walk these maps one random slot at a time)."""

    def __init__(self, capacity: int = 1024):
        self._alloc(capacity)
        self.size = 0

    def _alloc(self, capacity: int) -> None:
        self.kv = np.zeros((capacity, 2), np.int64)  # a power of two (the compiled paths may replace it)
        self.kv[:, 0] = -1

    @property
    def keys(self) -> np.ndarray:
        return self.kv[:, 0]

    @property
    def vals(self) -> np.ndarray:
        return self.kv[:, 1]

    def _hash(self, keys: np.ndarray) -> np.ndarray:
        h = keys.astype(np.uint64) * np.uint64(_FIB)  # Fibonacci hashing (wraps mod 2**64)
        return (h >> np.uint64(65 - len(self.keys).bit_length())).astype(np.int64)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The slot of every key, -1 where absent. Each round looks at a window of ``WINDOW`` probe
        slots per key: a key is found before the first empty slot of its probe sequence or absent."""
        out = np.full(len(keys), -1, np.int64)
        slot = self._hash(keys)
        todo = np.arange(len(keys))
        mask = len(self.keys) - 1
        while len(todo):
            win = (slot[todo, None] + _WINDOW_STEPS) & mask
            k = self.keys[win]
            hit = k == keys[todo, None]
            stop = hit | (k < 0)
            first = stop.argmax(1)
            rows = np.arange(len(todo))
            done = stop[rows, first]
            found = done & hit[rows, first]
            out[todo[found]] = win[found, first[found]]
            todo = todo[~done]
            slot[todo] = (slot[todo] + WINDOW) & mask
        return out

    def insert(self, keys: np.ndarray) -> np.ndarray:
        """Add distinct keys that are not present (values 0); returns their slots. Each key takes the
        first free slot of its probe sequence (one key per slot per round; the others retry)."""
        if 2 * (self.size + len(keys)) > len(self.keys):
            self._rehash(2 * (self.size + len(keys)))
        out = np.empty(len(keys), np.int64)
        slot = self._hash(keys)
        todo = np.arange(len(keys))
        mask = len(self.keys) - 1
        while len(todo):
            win = (slot[todo, None] + _WINDOW_STEPS) & mask
            free = self.keys[win] < 0
            first = free.argmax(1)
            rows = np.arange(len(todo))
            has = free[rows, first]
            target = win[rows, first]
            claim = np.flatnonzero(has)
            won_slot, pick = np.unique(target[claim], return_index=True)  # one key per free slot
            won = claim[pick]
            self.keys[won_slot] = keys[todo[won]]
            out[todo[won]] = won_slot
            left = np.ones(len(todo), bool)
            left[won] = False
            slot[todo[~has]] = (slot[todo[~has]] + WINDOW) & mask  # a full window: probe further
            todo = todo[left]
        self.size += len(keys)
        return out

    def get_or_insert(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slots, inserted?) of distinct ``keys``, adding the absent ones."""
        if 2 * (self.size + len(keys)) > len(self.keys):  # grow first: slots found now stay valid
            self._rehash(2 * (self.size + len(keys)))
        slots = self.find(keys)
        new = slots < 0
        if new.any():
            slots[new] = self.insert(keys[new])
        return slots, new

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        used = self.keys >= 0
        return self.keys[used], self.vals[used]

    def _rehash(self, at_least: int) -> None:
        keys, vals = self.items()
        self._alloc(1 << max(10, (at_least - 1).bit_length()))
        self.size = 0
        if len(keys):
            slots = self.insert(keys)
            self.vals[slots] = vals


TOKEN_BITS = 21  # n-gram keys pack (id << TOKEN_BITS) | token: token ids below 2**21


class NgramTable:
    """n-gram -> {next token: count} for many sequences at once, on arrays.

    Every n-gram of a sequence has an id: the empty n-gram is the sequence's root id, and
    ``id(t1..tn) = grams[(id(t1..tn-1) << TOKEN_BITS) | tn]``. So the ids of the n-grams ending at a
    tree node come from its parent's in one step (``extend``): a whole tree level of every request
    is one hash-map probe. Per id: the total count of continuations and the top ``RECORD_K``
    continuations by (count desc, token asc), kept exact incrementally (counts only grow, so a
    token enters the top only when its own count grows). ``update`` indexes the tokens every
    sequence committed since its last call (one probe per n for all of them). Released sequences'
    entries are dropped by compaction once they outnumber the live ones."""

    def __init__(self, max_n: int):
        self.max_n = max_n
        self.seqs: dict = {}  # seq_id -> [root id, tokens indexed]
        self._reset()

    def _reset(self) -> None:
        self.grams = _IntMap()  # (prefix id << TOKEN_BITS) | last token -> gram id
        self.nexts = _IntMap()  # (gram id << TOKEN_BITS) | next token -> count
        self.n_ids = 0
        self.stats = _empty_stats(1024)  # per id: total, then the top list (``_empty_stats``)
        self.root_of = np.zeros(1024, np.int64)  # per id: its sequence's root id
        self.dead = 0  # ids of released sequences still stored

    @property
    def total(self) -> np.ndarray:
        """Per id: continuations counted (a view of ``stats``)."""
        return self.stats[:, 0]

    @property
    def top_tok(self) -> np.ndarray:
        """Per id: its top ``RECORD_K`` continuations, -1 padded (a view of ``stats``)."""
        return self.stats[:, 1::2]

    @property
    def top_cnt(self) -> np.ndarray:
        """Per id: the counts of ``top_tok`` (a view of ``stats``)."""
        return self.stats[:, 2::2]

    def _new_ids(self, roots: np.ndarray) -> np.ndarray:
        m = len(roots)
        ids = np.arange(self.n_ids, self.n_ids + m, dtype=np.int64)
        if self.n_ids + m > len(self.stats):
            cap = 2 * (self.n_ids + m)
            self.stats = np.concatenate([self.stats, _empty_stats(cap - len(self.stats))])
            self.root_of = np.concatenate([self.root_of, np.zeros(cap - len(self.root_of), np.int64)])
        self.root_of[ids] = np.where(roots < 0, ids, roots)
        self.n_ids += m
        return ids

    def root(self, seq_id) -> int:
        state = self.seqs.get(seq_id)
        if state is None:
            state = self.seqs[seq_id] = [int(self._new_ids(np.array([-1]))[0]), 0]
        return state[0]

    def extend(self, prefix: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """The ids of the n-grams ``prefix + token`` (-1 where the prefix is -1, the token < 0, or
        the n-gram was never seen)."""
        out = np.full(prefix.shape, -1, np.int64)
        ok = (prefix >= 0) & (tokens >= 0)
        slots = self.grams.find((prefix[ok] << TOKEN_BITS) | tokens[ok])
        out[ok] = np.where(slots >= 0, self.grams.vals[slots], -1)
        return out

    def update(self, seqs: Sequence[tuple[object, Sequence[int]]]) -> np.ndarray:
        """Index the tokens each ``(seq_id, ids)`` gained since its last update; returns the
        sequences' root ids."""
        tok, sizes, roots, new_from, all_roots = self._tails(seqs, every=False)
        if len(tok):
            (self._update_compiled if jit.enabled() else self._update_arrays)(tok, sizes, roots, new_from)
        return all_roots

    def update_with_roots(self, seqs: Sequence[tuple[object, Sequence[int]]]) -> np.ndarray:
        """``update`` (compiled path only), returning per sequence the ids of the n-grams that end
        at its last token ([S, max_n + 1]: column n the n-gram of its last n tokens, column 0 its
        root id; -1 never seen or longer than the sequence): ``suffix_ids`` of the draft's roots,
        found by the same pass that indexes the new tokens."""
        tok, sizes, roots, new_from, _ = self._tails(seqs, every=True)
        g, nx = self.grams, self.nexts
        out = np.empty((len(sizes), self.max_n + 1), np.int64)
        g.kv, g.size, nx.kv, nx.size, self.stats, self.root_of, self.n_ids = _table_update_kernel(
            tok, sizes, roots, new_from, self.max_n, g.kv, g.size, nx.kv, nx.size, self.stats, self.root_of,
            self.n_ids, out)
        return out

    def _tails(self, seqs: Sequence[tuple[object, Sequence[int]]], every: bool) -> tuple[np.ndarray, ...]:
        """What an update walks, marking the tokens indexed: per sequence its tail from ``max_n``
        tokens before its first new token (the n-grams before it start there), concatenated, with
        (sizes, root ids, where counting starts in the tail), and every sequence's root id.
        ``every``: a tail for every sequence, reaching ``max_n`` tokens before its last token at
        the latest (walked, not counted, when nothing is new); else only sequences with new tokens."""
        flat: list[int] = []
        sizes, roots, new_from, all_roots = [], [], [], []
        for seq_id, ids in seqs:
            state = self.seqs.get(seq_id)
            if state is None:
                self.root(seq_id)
                state = self.seqs[seq_id]
            all_roots.append(state[0])
            a, n = max(state[1], 1), len(ids)
            state[1] = max(state[1], n)
            if n <= a and not every:
                continue
            lo = max(min(a, n) - self.max_n, 0)
            flat += ids[lo:n]
            sizes.append(n - lo)
            roots.append(state[0])
            new_from.append(a - lo)
        as_array = lambda xs: np.array(xs, np.int64)  # noqa: E731
        return _token_array(flat), as_array(sizes), as_array(roots), as_array(new_from), as_array(all_roots)

    def _update_compiled(self, tok: np.ndarray, sizes: np.ndarray, roots: np.ndarray, new_from: np.ndarray) -> None:
        g, nx = self.grams, self.nexts
        g.kv, g.size, nx.kv, nx.size, self.stats, self.root_of, self.n_ids = _table_update_kernel(
            tok, sizes, roots, new_from, self.max_n, g.kv, g.size, nx.kv, nx.size, self.stats, self.root_of,
            self.n_ids, np.empty((0, self.max_n + 1), np.int64))

    def _update_arrays(self, tok: np.ndarray, sizes: np.ndarray, roots: np.ndarray, new_from: np.ndarray) -> None:
        """``update`` with numpy array operations (one probe per n for all positions)."""
        start = np.repeat(np.cumsum(sizes) - sizes, sizes)
        at = np.arange(len(tok)) - start  # position within its tail
        new = at >= np.repeat(new_from, sizes)  # positions whose continuations are new
        ids = np.repeat(roots, sizes)  # n = 0: the empty n-gram before every position
        owner = ids
        grams, conts = [], []
        for n in range(1, self.max_n + 1):
            # the n-gram ending just before position q is the (n-1)-gram before q-1 plus token q-1
            before = np.roll(ids, 1)
            q = np.flatnonzero((at >= n) & (before >= 0))
            keys = (before[q] << TOKEN_BITS) | tok[q - 1]
            uniq, inv = np.unique(keys, return_inverse=True)
            slots, fresh = self.grams.get_or_insert(uniq)
            if fresh.any():
                first_owner = np.empty(len(uniq), np.int64)
                first_owner[inv] = owner[q]
                self.grams.vals[slots[fresh]] = self._new_ids(first_owner[fresh])
            ids = np.full(len(tok), -1, np.int64)
            ids[q] = self.grams.vals[slots][inv]
            counted = q[new[q]]
            grams.append(ids[counted])
            conts.append(tok[counted])
        pair, counts = np.unique((np.concatenate(grams) << TOKEN_BITS) | np.concatenate(conts), return_counts=True)
        slots, _ = self.nexts.get_or_insert(pair)
        self.nexts.vals[slots] += counts
        gid = pair >> TOKEN_BITS
        np.add.at(self.total, gid, counts)
        self._update_top(gid, pair & ((1 << TOKEN_BITS) - 1), self.nexts.vals[slots])

    def _update_top(self, gid: np.ndarray, tok: np.ndarray, cnt: np.ndarray) -> None:
        """``(gid, tok)`` pairs sorted and distinct, ``cnt`` their new counts. Merge the grown counts into each gram's top list: the old top (with the grown counts)
        plus the grown tokens, ranked by (count desc, token asc), first ``RECORD_K`` kept."""
        ids = np.unique(gid)
        old_t, old_c = self.top_tok[ids].ravel(), self.top_cnt[ids].ravel()
        old_g = np.repeat(ids, RECORD_K)
        grown = (gid << TOKEN_BITS) | tok  # sorted (np.unique made the pairs)
        old_key = (old_g << TOKEN_BITS) | np.maximum(old_t, 0)
        at = np.minimum(np.searchsorted(grown, old_key), len(grown) - 1)
        stale = (old_t < 0) | (grown[at] == old_key)  # padding, or a count that grew (it comes anew)
        g = np.concatenate([old_g[~stale], gid])
        t = np.concatenate([old_t[~stale], tok])
        c = np.concatenate([old_c[~stale], cnt])
        order = np.lexsort((t, -c, g))
        g, t, c = g[order], t[order], c[order]
        rank = np.arange(len(g)) - np.searchsorted(g, g)
        keep = rank < RECORD_K
        row = np.searchsorted(ids, g[keep])
        top_t = np.full((len(ids), RECORD_K), -1, np.int64)
        top_c = np.zeros((len(ids), RECORD_K), np.int64)
        top_t[row, rank[keep]], top_c[row, rank[keep]] = t[keep], c[keep]
        self.top_tok[ids], self.top_cnt[ids] = top_t, top_c

    def suffix_ids(self, roots: np.ndarray, suffix: np.ndarray) -> np.ndarray:
        """[F, max_n + 1]: column n holds the id of the n-gram that ends ``suffix[row]`` ([F, m],
        left-padded with -1) in sequence ``roots[row]`` (column 0: the root; -1: never seen)."""
        f, m = suffix.shape
        out = np.full((f, self.max_n + 1), -1, np.int64)
        out[:, 0] = roots
        for k in range(m):  # the n-gram of length n starts at column m - n: extend all together
            ns = np.arange(max(1, m - k), min(self.max_n, m) + 1)
            prev = np.where(k == m - ns, np.asarray(roots)[:, None], out[:, ns])
            out[:, ns] = self.extend(prev, np.broadcast_to(suffix[:, k:k + 1], prev.shape))
        return out

    def child_ids(self, parent_ids: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """``suffix_ids`` of children from their parents' rows and their own tokens (one probe)."""
        out = np.empty_like(parent_ids)
        out[:, 0] = parent_ids[:, 0]
        out[:, 1:] = self.extend(parent_ids[:, :-1], np.broadcast_to(tokens[:, None], parent_ids[:, 1:].shape))
        return out

    def continuations(self, gram_ids: np.ndarray, min_n: int, prior: float) -> Expansion:
        """For every row of ``suffix_ids``: the continuations of its longest seen n-gram with
        ``n >= min_n``: tokens [F, RECORD_K] (-1: none) and ``count / (occurrences + prior)``."""
        f = len(gram_ids)
        n = (gram_ids[:, 1:] >= 0).sum(1)  # seen n-grams are suffix-closed: the longest is the count
        best = gram_ids[np.arange(f), n]
        rows = np.flatnonzero(n >= min_n)
        toks = np.full((f, RECORD_K), -1, np.int64)
        probs = np.zeros((f, RECORD_K), np.float64)
        g = best[rows]
        toks[rows] = self.top_tok[g]
        probs[rows] = self.top_cnt[g] / (self.total[g] + prior)[:, None]
        return toks, probs

    def lookup(self, roots: np.ndarray, suffix: np.ndarray, min_n: int, prior: float) -> Expansion:
        """``continuations`` of ``suffix_ids``."""
        return self.continuations(self.suffix_ids(roots, suffix), min_n, prior)

    def release(self, seq_id) -> None:
        state = self.seqs.pop(seq_id, None)
        if state is None:
            return
        if not self.seqs:
            self._reset()
            return
        self.dead += int((self.root_of[:self.n_ids] == state[0]).sum())
        if self.dead > self.n_ids // 2:
            self._compact()

    def _compact(self) -> None:
        """Drop the released sequences' ids and entries, renumbering the live ids densely."""
        live_roots = np.array(sorted(s[0] for s in self.seqs.values()), np.int64)
        live = np.isin(self.root_of[:self.n_ids], live_roots)
        new_id = np.cumsum(live) - 1
        stats, root_of = self.stats[:self.n_ids][live], self.root_of[:self.n_ids][live]
        gk, gv = self.grams.items()
        nk, nv = self.nexts.items()
        keep_g = live[gv]
        keep_n = live[nk >> TOKEN_BITS]
        mask = (1 << TOKEN_BITS) - 1
        gk = (new_id[gk[keep_g] >> TOKEN_BITS] << TOKEN_BITS) | (gk[keep_g] & mask)
        nk = (new_id[nk[keep_n] >> TOKEN_BITS] << TOKEN_BITS) | (nk[keep_n] & mask)
        self._reset()
        self._new_ids(new_id[root_of])
        self.stats[:len(stats)] = stats
        if len(gk):
            slots = self.grams.insert(gk)  # (may reallocate: index the arrays afterwards)
            self.grams.vals[slots] = new_id[gv[keep_g]]
        if len(nk):
            slots = self.nexts.insert(nk)
            self.nexts.vals[slots] = nv[keep_n]
        for state in self.seqs.values():
            state[0] = int(new_id[state[0]])


# ---- the n-gram drafter compiled (numba, adaserve.core.jit) -----------------------------------
# The same data structures as the numpy paths above (open-addressing maps with Fibonacci hashing
# and linear probing, per-id totals and exact top lists), walked one key at a time: a table may be
# updated by either path and read by the other. Used when ``jit.enabled()``.

def _token_array(tokens: list[int]) -> np.ndarray:
    tok = np.array(tokens, np.int64)
    if len(tok) and (tok.max() >= 1 << TOKEN_BITS or tok.min() < 0):
        raise ValueError(f"token ids must lie in [0, {1 << TOKEN_BITS})")
    return tok


def _empty_stats(rows: int) -> np.ndarray:
    """``NgramTable.stats`` rows: per id its total, then its top list as (token, count) pairs
    (tokens -1, counts 0): what a lookup or a count reads of one id is one contiguous row."""
    stats = np.zeros((rows, 1 + 2 * RECORD_K), np.int64)
    stats[:, 1::2] = -1
    return stats


@jit.njit
def _slot_for(kv: np.ndarray, shift: np.uint64, key: int) -> int:
    """The slot holding ``key`` in an ``_IntMap``'s ``kv``, else the empty slot where it would go
    (``shift``: ``_shift(kv)``)."""
    mask = len(kv) - 1
    s = np.int64((np.uint64(key) * np.uint64(_FIB)) >> shift)
    while kv[s, 0] != key and kv[s, 0] >= 0:
        s = (s + 1) & mask
    return s


@jit.njit
def _shift(kv: np.ndarray) -> np.uint64:
    """64 - log2(slots): Fibonacci hashing's shift for a map of ``len(kv)`` slots (a power of two)."""
    bits = 0
    while (1 << bits) < len(kv):
        bits += 1
    return np.uint64(64 - bits)


@jit.njit
def _map_grown(kv: np.ndarray) -> np.ndarray:
    """The map rehashed into twice the slots (``_IntMap._rehash``)."""
    new = np.zeros((2 * len(kv), 2), np.int64)
    new[:, 0] = -1
    shift = _shift(new)
    for j in range(len(kv)):
        if kv[j, 0] >= 0:
            s = _slot_for(new, shift, kv[j, 0])
            new[s, 0], new[s, 1] = kv[j, 0], kv[j, 1]
    return new


@jit.njit
def _stats_grown(stats: np.ndarray) -> np.ndarray:
    out = np.zeros((2 * stats.shape[0], stats.shape[1]), np.int64)
    out[:, 1::2] = -1
    out[:stats.shape[0]] = stats
    return out


@jit.njit
def _ids_grown(a: np.ndarray) -> np.ndarray:
    out = np.zeros(2 * len(a), np.int64)
    out[:len(a)] = a
    return out


@jit.njit
def _count_next(stats: np.ndarray, g: int, tok: int, count: int) -> None:
    """Gram ``g``'s continuation ``tok`` now has ``count``: keep its top list (``stats[g]``: tokens
    at 1, 3, ..., counts at 2, 4, ...) exact (count desc, token asc). Only this token's rank
    changes, so it moves up past the entries it now beats."""
    row = stats[g]
    pos = -1
    for j in range(RECORD_K):
        if row[1 + 2 * j] == tok:
            pos = j
            break
    last = RECORD_K - 1
    if pos < 0:
        t, c = row[1 + 2 * last], row[2 + 2 * last]
        if t >= 0 and (c > count or (c == count and t < tok)):
            return  # still outside the top
        pos = last
        row[1 + 2 * pos] = tok
    row[2 + 2 * pos] = count
    while pos > 0:
        t, c = row[2 * pos - 1], row[2 * pos]  # the entry above
        if not (c < count or (c == count and t > tok)):
            break
        row[2 * pos - 1], row[2 * pos], row[2 * pos + 1], row[2 * pos + 2] = tok, count, t, c
        pos -= 1


@jit.njit
def _table_update_kernel(tok, sizes, roots, new_from, max_n, gkv, g_size, nkv, n_size, stats, root_of, n_ids,
                         root_grams):
    """``NgramTable.update`` over the concatenated tails ``tok`` (tail ``s``: ``sizes[s]`` tokens of
    the sequence with root id ``roots[s]``, whose continuations count from ``new_from[s]`` on).
    Returns every array (grown ones are new) and the new sizes. ``root_grams`` with a row per
    tail: filled with the ids of the n-grams ending at each tail's last token
    (``NgramTable.update_with_roots``)."""
    prev = np.full(max_n + 1, -1, np.int64)  # ids of the n-grams ending before the previous position
    cur = np.full(max_n + 1, -1, np.int64)
    g_shift, n_shift = _shift(gkv), _shift(nkv)
    q = 0
    for s in range(len(sizes)):
        for a in range(sizes[s]):
            cur[0] = roots[s]
            for n in range(1, max_n + 1):
                cur[n] = -1
                if a < n or prev[n - 1] < 0:
                    continue
                key = (prev[n - 1] << TOKEN_BITS) | tok[q - 1]
                if 2 * (g_size + 1) > len(gkv):
                    gkv = _map_grown(gkv)
                    g_shift = _shift(gkv)
                slot = _slot_for(gkv, g_shift, key)
                if gkv[slot, 0] < 0:  # a new n-gram: a new id
                    if n_ids >= len(stats):
                        stats, root_of = _stats_grown(stats), _ids_grown(root_of)
                    gkv[slot, 0], gkv[slot, 1], root_of[n_ids] = key, n_ids, roots[s]
                    n_ids += 1
                    g_size += 1
                g = gkv[slot, 1]
                cur[n] = g
                if a >= new_from[s]:
                    pair = (g << TOKEN_BITS) | tok[q]
                    if 2 * (n_size + 1) > len(nkv):
                        nkv = _map_grown(nkv)
                        n_shift = _shift(nkv)
                    slot = _slot_for(nkv, n_shift, pair)
                    if nkv[slot, 0] < 0:
                        nkv[slot, 0], nkv[slot, 1] = pair, 0
                        n_size += 1
                    nkv[slot, 1] += 1
                    stats[g, 0] += 1
                    _count_next(stats, g, tok[q], nkv[slot, 1])
            prev[:] = cur
            q += 1
        if len(root_grams):  # prev: the n-grams before the last token; extend each by it
            root_grams[s, 0] = roots[s]
            for n in range(1, max_n + 1):
                g = -1
                if prev[n - 1] >= 0:
                    slot = _slot_for(gkv, g_shift, (prev[n - 1] << TOKEN_BITS) | tok[q - 1])
                    g = gkv[slot, 1] if gkv[slot, 0] >= 0 else -1
                root_grams[s, n] = g
    return gkv, g_size, nkv, n_size, stats, root_of, n_ids


def filler_hash(key, request, level, node, col):
    """The hash behind the filler token of column ``col`` of the ``node``-th frontier node of
    ``request`` at ``level`` (uint64 arrays, or scalars compiled; ``key`` mixes the seed and the
    draft call): the fields packed into one word, then splitmix64's finalizer."""
    u = np.uint64
    z = key ^ (request << u(32)) ^ (level << u(24)) ^ (node << u(8)) ^ col
    z = (z ^ (z >> u(30))) * u(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> u(27))) * u(0x94D049BB133111EB)
    return z ^ (z >> u(31))


_filler_hash_compiled = jit.njit(filler_hash)


@jit.njit
def _draft_kernel(root_tokens, root_grams, gkv, stats, min_n, prior, keeps, cols, max_nodes, fill_probs,
                  fill_low, fill_high, fill_key):
    """``NgramDrafter.draft`` of all requests (numpy path: ``TreeSet`` + ``NgramTable`` lookups),
    one request after the other, all its levels: the forest's arrays, each request's nodes root
    first, then level by level in the order beam search created them. ``keeps[l]`` < 0: keep all
    (static shapes); ``fill_probs`` non-empty: pad every expanded node's continuations to
    ``RECORD_K`` with filler tokens (``Filler``)."""
    n, max_n = root_grams.shape[0], root_grams.shape[1] - 1
    shift = _shift(gkv)
    cap = n * max_nodes
    offsets = np.zeros(n + 1, np.int64)
    parent = np.empty(cap, np.int64)
    token = np.empty(cap, np.int64)
    prob = np.empty(cap, np.float64)
    depth = np.empty(cap, np.int64)
    next_tokens = np.full((cap, RECORD_K), -1, np.int64)
    next_probs = np.zeros((cap, RECORD_K), np.float64)
    expanded = np.zeros(cap, np.bool_)
    grams = np.full((max_nodes, max_n + 1), -1, np.int64)  # per node of the current tree: n-gram ids
    frontier = np.empty(max_nodes, np.int64)
    cand_f = np.empty(max_nodes * RECORD_K, np.int64)
    cand_k = np.empty(max_nodes * RECORD_K, np.int64)
    cand_p = np.empty(max_nodes * RECORD_K, np.float64)
    at = 0
    for i in range(n):
        lo = at
        parent[at], token[at], prob[at], depth[at] = -1, root_tokens[i], 1.0, 0
        grams[0] = root_grams[i]  # column n: the n-gram of the last n committed tokens
        at += 1
        frontier[0], n_front = 0, 1
        for level in range(len(keeps)):
            if n_front == 0:
                break
            n_cand = 0
            for f in range(n_front):
                node = frontier[f]
                g_row = grams[node]
                seen = 0
                for length in range(1, max_n + 1):
                    if g_row[length] >= 0:
                        seen += 1
                best = g_row[seen]
                row = lo + node
                expanded[row] = True
                if seen >= min_n:
                    st = stats[best]
                    for k in range(RECORD_K):
                        next_tokens[row, k] = st[1 + 2 * k]
                        next_probs[row, k] = st[2 + 2 * k] / (st[0] + prior)
                if len(fill_probs):
                    for k in range(RECORD_K):
                        if next_tokens[row, k] < 0:
                            h = _filler_hash_compiled(fill_key, np.uint64(i), np.uint64(level), np.uint64(f), np.uint64(k))
                            next_tokens[row, k] = fill_low + np.int64(h % np.uint64(fill_high - fill_low))
                            next_probs[row, k] = fill_probs[k]
                for k in range(min(cols[level], RECORD_K)):
                    t, p = next_tokens[row, k], next_probs[row, k]
                    if p > 0 and t >= 0:
                        cand_f[n_cand], cand_k[n_cand], cand_p[n_cand] = f, k, prob[row] * p
                        n_cand += 1
            if keeps[level] >= 0:  # beam: the best ``keep`` by path probability (ties: frontier order, column)
                n_keep = min(keeps[level], n_cand)
                for r in range(n_keep):
                    b = r
                    for c in range(r + 1, n_cand):
                        if cand_p[c] > cand_p[b]:
                            b = c
                    for c in range(b, r, -1):  # move it to place r, keeping the others in order
                        cand_f[c], cand_f[c - 1] = cand_f[c - 1], cand_f[c]
                        cand_k[c], cand_k[c - 1] = cand_k[c - 1], cand_k[c]
                        cand_p[c], cand_p[c - 1] = cand_p[c - 1], cand_p[c]
                n_cand = n_keep
            for c in range(n_cand):
                par = frontier[cand_f[c]]
                node = at - lo
                t = next_tokens[lo + par, cand_k[c]]
                parent[at], token[at], prob[at], depth[at] = lo + par, t, cand_p[c], level + 1
                if level + 1 < len(keeps):  # a node of the last level is never expanded: no n-grams
                    grams[node, 0] = grams[par, 0]
                    for length in range(1, max_n + 1):  # a child's n-grams extend its parent's by its token
                        g = grams[par, length - 1]
                        if g >= 0:
                            s = _slot_for(gkv, shift, (g << TOKEN_BITS) | t)
                            g = gkv[s, 1] if gkv[s, 0] >= 0 else -1
                        grams[node, length] = g
                at += 1
            n_front = n_cand
            for c in range(n_cand):
                frontier[c] = at - n_cand + c - lo
        offsets[i + 1] = at
    return (offsets, parent[:at], token[:at], prob[:at], depth[:at], next_tokens[:at], next_probs[:at],
            expanded[:at])


class NgramIndex:
    """One sequence's n-gram index (an ``NgramTable`` holding that sequence alone), updated
    incrementally: ``counts`` is the n-gram -> {next token: count} mapping it holds."""

    def __init__(self, max_n: int):
        self.max_n = max_n
        self.table = NgramTable(max_n)
        self.root = self.table.root(0)

    @property
    def seen(self) -> int:
        return self.table.seqs[0][1]

    def update(self, ids: Sequence[int]) -> None:
        self.table.update([(0, ids)])

    def lookup(self, suffix: Sequence[int], min_n: int, prior: float) -> Expansion | None:
        """Continuations of the longest matching n-gram (tokens by count, ``count / (total + prior)``)."""
        tail = [int(t) for t in suffix][-self.max_n:]
        sfx = np.full((1, self.max_n), -1, np.int64)
        sfx[0, self.max_n - len(tail):] = tail
        toks, probs = self.table.lookup(np.array([self.root]), sfx, min_n, prior)
        k = int((toks[0] >= 0).sum())
        return (toks[0, :k], probs[0, :k]) if k else None

    @property
    def counts(self) -> dict[tuple[int, ...], dict[int, int]]:
        gk, gv = self.table.grams.items()
        gram = {self.root: ()}
        pending = dict(zip(gv.tolist(), zip((gk >> TOKEN_BITS).tolist(), (gk & ((1 << TOKEN_BITS) - 1)).tolist())))
        while pending:  # an n-gram's id comes from its (n-1)-gram's: resolve shortest first
            for gid, (prev, tok) in list(pending.items()):
                if prev in gram:
                    gram[gid] = gram[prev] + (tok,)
                    del pending[gid]
        out: dict[tuple[int, ...], dict[int, int]] = {}
        nk, nv = self.table.nexts.items()
        for g, t, c in zip((nk >> TOKEN_BITS).tolist(), (nk & ((1 << TOKEN_BITS) - 1)).tolist(), nv.tolist()):
            out.setdefault(gram[g], {})[t] = c
        return out


@dataclass(frozen=True)
class Filler:
    """Pads every expanded node's continuations to ``RECORD_K`` with pseudo-random tokens in
    ``[low, high)``, column ``k`` with confidence ``probs[k]``, so that beam search always finds
    full-width trees (benchmarks without a draft model). A token is a hash of ``seed``, the draft
    call, and the node's request, level, place in its request's frontier and column."""

    low: int
    high: int
    probs: tuple[float, ...]
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.low < self.high or len(self.probs) != RECORD_K:
            raise ValueError(f"Filler needs 0 <= low < high and {RECORD_K} probs, got {self}")

    def key(self, call: int) -> np.uint64:
        return np.uint64(((self.seed << 32) ^ call) & (2**64 - 1))

    def fill(self, toks: np.ndarray, ps: np.ndarray, owner: np.ndarray, level: int, call: int) -> None:
        """Fill the empty entries (token < 0) of a level's expansion in place (numpy path);
        ``owner``: the frontier nodes' requests, grouped ascending."""
        rows, cols = np.nonzero(toks < 0)
        node = np.arange(len(owner)) - np.searchsorted(owner, owner)  # place in its request's frontier
        u = np.uint64
        h = filler_hash(self.key(call), owner[rows].astype(u), u(level), node[rows].astype(u), cols.astype(u))
        toks[rows, cols] = self.low + (h % u(self.high - self.low)).astype(np.int64)
        ps[rows, cols] = np.asarray(self.probs, np.float64)[cols]


class NgramDrafter:
    """Prompt/suffix lookup trees; path probabilities are products of frequency confidences. One
    ``NgramTable`` holds every request's n-grams. Compiled (``jit.enabled()``): one kernel drafts
    every request's whole tree; else each level of all trees is one ``lookup`` (numpy)."""

    name = "ngram"

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, prior: float = 1.0, filler: Filler | None = None):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram, self.prior = max_ngram, min_ngram, prior
        self.table = NgramTable(max_ngram)
        self.filler = filler
        self.calls = 0  # draft calls so far (the filler's hash)

    @property
    def _index(self) -> dict:
        """The requests the table holds (empty once all are released)."""
        return self.table.seqs

    def draft(self, seqs: Sequence[TokenSeq], shape: SpecShape) -> CandidateForest:
        self.calls += 1
        if jit.enabled():  # one pass indexes the new tokens and finds the roots' n-grams
            grams = self.table.update_with_roots([(s.seq_id, s.ids) for s in seqs])
            return self._draft_compiled(np.array([s.last for s in seqs], np.int64), grams, shape)
        roots = self.table.update([(s.seq_id, s.ids) for s in seqs])  # only the tokens committed since the last call
        m = self.max_ngram
        flat: list[int] = []  # the roots' last m committed tokens, left-padded with -1
        for s in seqs:
            flat += s.ids[-m:] if len(s.ids) >= m else [-1] * (m - len(s.ids)) + s.ids
        suffix = np.array(flat, np.int64).reshape(len(seqs), m)
        trees = TreeSet(suffix[:, -1])
        grams = self.table.suffix_ids(roots, suffix)  # per frontier node: ids of the n-grams ending there
        for level in range(shape.depth):
            if not len(trees.frontier):
                break
            keep, cols = level_plan(shape, level)
            toks, ps = self.table.continuations(grams, self.min_ngram, self.prior)
            if self.filler is not None:
                self.filler.fill(toks, ps, trees.frontier_owner, level, self.calls)
            parent = trees.grow_level(toks, ps, keep, cols)
            grams = self.table.child_ids(grams[parent], trees.frontier_token)
        return trees.to_forest()

    def _draft_compiled(self, last: np.ndarray, root_grams: np.ndarray, shape: SpecShape) -> CandidateForest:
        plans = [level_plan(shape, level) for level in range(shape.depth)]
        keeps = np.array([-1 if k is None else k for k, _ in plans], np.int64)
        cols = np.array([c for _, c in plans], np.int64)
        max_nodes, front = 1, 1
        for keep, c in plans:
            front = front * min(c, RECORD_K) if keep is None else min(keep, front * min(c, RECORD_K))
            max_nodes += front
        f = self.filler
        t = self.table
        arrays = _draft_kernel(last, root_grams, t.grams.kv, t.stats, self.min_ngram, float(self.prior), keeps,
                               cols, max_nodes, np.asarray(f.probs if f else (), np.float64), f.low if f else 0,
                               f.high if f else 1, f.key(self.calls) if f else np.uint64(0))
        offsets, parent, token, prob, depth, next_tokens, next_probs, expanded = arrays
        return CandidateForest(offsets, parent, token, prob, depth,
                               {"next_tokens": next_tokens, "next_probs": next_probs, "expanded": expanded})

    def release(self, seq_id: int) -> None:
        self.table.release(seq_id)

"""Drafters: grow one candidate token tree per request and return them as a ``CandidateForest``.

Both drafters share the tree growth (``TreeSet``), level by level from the root (the last committed
token), and differ only in where a node's next-token distribution comes from:

* ``ModelDrafter``: a small draft LM with its own runner and paged KV cache; one batched forward per
  level over the frontier nodes of every request (docs/definitions.md §4, step 3).
* ``NgramDrafter``: prompt / suffix lookup over the request's own tokens; a node's continuations are
  the tokens that followed the longest matching n-gram earlier in the request, with confidence
  ``count / (occurrences + prior)``.

Shapes (``SpecShape``): beam search keeps, per request and level, the ``width`` children with the
highest path probability f̂ among the top-``width`` children of every frontier node; a static shape
expands every node of level ``l`` with its top ``widths[l]`` children (chains: ``(1,) * k``).

The forest's ``extra`` carries, for every node the drafter expanded, the draft's top-``RECORD_K``
next tokens and their (conditional) probabilities: the acceptance recorder reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from adaserve.scheduling.plan import SpecShape
from adaserve.scheduling.trees import CandidateForest

from .batch import BatchBuilder
from .kv_cache import BLOCK_SIZE, OutOfBlocks
from .model import Transformer
from .sequence import SeqState

RECORD_K = 8  # draft confidences kept per expanded node (the acceptance records' "probs")

Expansion = tuple[np.ndarray, np.ndarray]  # per frontier node: next tokens [F, K] (-1: none), probs [F, K]


class Drafter(Protocol):
    name: str

    def draft(self, seqs: Sequence[SeqState], shape: SpecShape) -> CandidateForest: ...

    def release(self, seq_id: int) -> None: ...


class TreeSet:
    """The candidate trees of one batch while they grow (per-request lists, local node ids)."""

    def __init__(self, roots: Sequence[int]):
        self.tokens = [[int(t)] for t in roots]
        self.parents: list[list[int]] = [[-1] for _ in roots]
        self.probs = [[1.0] for _ in roots]
        self.frontier: list[list[int]] = [[0] for _ in roots]
        self.expanded: list[dict[int, Expansion]] = [{} for _ in roots]

    def __len__(self) -> int:
        return len(self.tokens)

    def live(self) -> list[int]:
        return [i for i, f in enumerate(self.frontier) if f]

    def path_tokens(self, i: int, node: int) -> list[int]:
        """Tokens from the root (exclusive) down to ``node`` (inclusive)."""
        out = []
        while node > 0:
            out.append(self.tokens[i][node])
            node = self.parents[i][node]
        return out[::-1]

    def grow(self, i: int, exp: Expansion, keep: int | None, cols: int) -> None:
        """Add children of request ``i``'s frontier from ``exp``: the first ``cols`` of each node;
        ``keep``: beam search keeps that many highest-f̂ children overall, None keeps all."""
        toks, ps = exp
        frontier = self.frontier[i]
        for f, node in enumerate(frontier):
            self.expanded[i][node] = (toks[f, :RECORD_K], ps[f, :RECORD_K])
        toks, ps = toks[:, :cols], ps[:, :cols]
        path = np.asarray(self.probs[i])[frontier][:, None] * ps
        cand = np.flatnonzero(((ps > 0) & (toks >= 0)).ravel())
        if keep is not None:
            cand = cand[np.argsort(-path.ravel()[cand], kind="stable")][:keep]
        new = []
        for j in cand:
            f, k = divmod(int(j), toks.shape[1])
            new.append(len(self.tokens[i]))
            self.tokens[i].append(int(toks[f, k]))
            self.parents[i].append(frontier[f])
            self.probs[i].append(float(path[f, k]))
        self.frontier[i] = new

    def to_forest(self) -> CandidateForest:
        offsets = np.zeros(len(self) + 1, np.int64)
        np.cumsum([len(t) for t in self.tokens], out=offsets[1:])
        parent = np.concatenate([np.where(np.asarray(p) < 0, -1, np.asarray(p) + offsets[i])
                                 for i, p in enumerate(self.parents)]).astype(np.int64)
        depth = np.zeros(len(parent), np.int64)
        for g in range(len(parent)):  # parents precede children
            if parent[g] >= 0:
                depth[g] = depth[parent[g]] + 1
        n = int(offsets[-1])
        next_tokens = np.full((n, RECORD_K), -1, np.int64)
        next_probs = np.zeros((n, RECORD_K), np.float64)
        expanded = np.zeros(n, bool)
        for i, nodes in enumerate(self.expanded):
            for node, (t, p) in nodes.items():
                g = offsets[i] + node
                next_tokens[g, :len(t)], next_probs[g, :len(p)], expanded[g] = t, p, True
        return CandidateForest(offsets, parent, np.concatenate(self.tokens).astype(np.int64),
                               np.concatenate(self.probs).astype(np.float64), depth,
                               {"next_tokens": next_tokens, "next_probs": next_probs, "expanded": expanded})


def level_plan(shape: SpecShape, level: int) -> tuple[int | None, int]:
    """(beam keep, children per frontier node) at ``level`` (0 = expanding the roots)."""
    if shape.is_static:
        return None, shape.widths[level]
    return shape.width, shape.width


# ---- n-gram (prompt / suffix lookup) ----------------------------------------------------------

class NgramIndex:
    """n-gram -> {next token: count} over one request's committed tokens, updated incrementally."""

    def __init__(self, max_n: int):
        self.max_n = max_n
        self.counts: dict[tuple[int, ...], dict[int, int]] = {}
        self._top: dict[tuple[int, ...], Expansion] = {}
        self.seen = 0

    def update(self, ids: Sequence[int]) -> None:
        for j in range(max(self.seen, 1), len(ids)):
            nxt = ids[j]
            for n in range(1, min(self.max_n, j) + 1):
                key = tuple(ids[j - n:j])
                d = self.counts.setdefault(key, {})
                d[nxt] = d.get(nxt, 0) + 1
                self._top.pop(key, None)
        self.seen = max(self.seen, len(ids))

    def lookup(self, suffix: Sequence[int], min_n: int, prior: float) -> Expansion | None:
        """Continuations of the longest matching n-gram (tokens by count, ``count / (total + prior)``)."""
        for n in range(min(self.max_n, len(suffix)), min_n - 1, -1):
            key = tuple(suffix[-n:])
            if key in self.counts:
                return self._top.get(key) or self._rank(key, prior)
        return None

    def _rank(self, key: tuple[int, ...], prior: float) -> Expansion:
        d = self.counts[key]
        top = sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))[:RECORD_K]
        total = sum(d.values()) + prior
        out = (np.array([t for t, _ in top], np.int64), np.array([c / total for _, c in top], np.float64))
        self._top[key] = out
        return out


class NgramDrafter:
    """Prompt/suffix lookup trees; path probabilities are products of frequency confidences."""

    name = "ngram"

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, prior: float = 1.0):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram, self.prior = max_ngram, min_ngram, prior
        self._index: dict[int, NgramIndex] = {}

    def draft(self, seqs: Sequence[SeqState], shape: SpecShape) -> CandidateForest:
        trees = TreeSet([s.last for s in seqs])
        for s in seqs:
            self._index.setdefault(s.seq_id, NgramIndex(self.max_ngram)).update(s.ids)
        for level in range(shape.depth):
            keep, cols = level_plan(shape, level)
            for i in trees.live():
                trees.grow(i, self._expand(seqs[i], trees, i), keep, cols)
        return trees.to_forest()

    def _expand(self, seq: SeqState, trees: TreeSet, i: int) -> Expansion:
        index = self._index[seq.seq_id]
        toks = np.full((len(trees.frontier[i]), RECORD_K), -1, np.int64)
        ps = np.zeros(toks.shape, np.float64)
        head = seq.ids[-self.max_ngram:]
        for f, node in enumerate(trees.frontier[i]):
            found = index.lookup(head + trees.path_tokens(i, node), self.min_ngram, self.prior)
            if found is not None:
                toks[f, :len(found[0])], ps[f, :len(found[1])] = found
        return toks, ps

    def release(self, seq_id: int) -> None:
        self._index.pop(seq_id, None)


# ---- draft model ------------------------------------------------------------------------------

class ModelDrafter:
    """An independent small LM (same vocabulary as the target) with its own paged KV cache.

    The draft KV follows the committed tokens lazily: the first forward of every ``draft`` call
    prefixes each request's root with the committed tokens the draft has not seen yet (the whole
    prompt the first time, the accepted tokens after that). Tree nodes are tentative and released
    when ``draft`` returns."""

    name = "model"

    def __init__(self, model: Transformer, num_blocks: int, block_size: int = BLOCK_SIZE):
        self.model = model
        self.cache = model.make_cache(num_blocks, block_size)
        self.device = model.lm_head.weight.device

    def draft(self, seqs: Sequence[SeqState], shape: SpecShape) -> CandidateForest:
        trees = TreeSet([s.last for s in seqs])
        try:
            for level in range(shape.depth):
                live = trees.live()
                if not live:
                    break
                keep, cols = level_plan(shape, level)
                exps = self._expand(seqs, trees, live, level == 0, max(cols, RECORD_K))
                if exps is None:  # out of draft KV blocks: stop growing, the trees stay valid
                    break
                for i, exp in zip(live, exps):
                    trees.grow(i, exp, keep, cols)
        finally:
            for s in seqs:
                if s.seq_id in self.cache.alloc:
                    self.cache.truncate(s.seq_id, self.cache.length(s.seq_id))
        return trees.to_forest()

    def _expand(self, seqs: Sequence[SeqState], trees: TreeSet, live: list[int], catch_up: bool,
                k: int) -> list[Expansion] | None:
        b = BatchBuilder(self.cache)
        rows = []
        try:
            for i in live:
                s = seqs[i]
                if catch_up:
                    self._catch_up(b, s)
                cached = len(trees.tokens[i]) - len(trees.frontier[i])
                rows.append(b.add_tree(s.seq_id, trees.tokens[i], trees.parents[i], num_cached=cached))
        except OutOfBlocks:
            b.abort()
            return None
        logits = self.model(b.build(self.device), self.cache)
        p, t = torch.softmax(logits.float(), dim=-1).topk(min(k, logits.shape[-1]), dim=-1)
        p, t = p.cpu().numpy().astype(np.float64), t.cpu().numpy()
        return [(t[r.start:r.stop], p[r.start:r.stop]) for r in rows]

    def _catch_up(self, b: BatchBuilder, s: SeqState) -> None:
        """Committed tokens (all but the root) whose draft KV is missing go into the same forward."""
        have = self.cache.length(s.seq_id) if s.seq_id in self.cache.alloc else 0
        context = len(s.ids) - 1
        if context > have:
            b.add_prefill(s.seq_id, s.ids[have:context], logits="none")

    def release(self, seq_id: int) -> None:
        if seq_id in self.cache.alloc:
            self.cache.free(seq_id)

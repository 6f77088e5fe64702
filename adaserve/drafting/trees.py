"""Candidate trees while a drafter grows them (torch-free): ``TreeSet`` grows one level of every
request's tree at once from the frontier nodes' next-token distributions, with beam search or a
static shape (``level_plan``), and hands the result over as a ``CandidateForest``. Both drafters
use it: the engine's draft model (``adaserve.engine.drafters.ModelDrafter``) and the n-gram drafter
(``adaserve.drafting.ngram``), which the simulator also runs to replay an engine run's drafts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from adaserve.scheduling.plan import SpecShape
from adaserve.scheduling.trees import CandidateForest

RECORD_K = 8  # draft confidences kept per expanded node (the acceptance records' "probs")

Expansion = tuple[np.ndarray, np.ndarray]  # per frontier node: next tokens [F, K] (-1: none), probs [F, K]


class TreeSet:
    """The candidate trees of one batch while they grow, as flat arrays over all requests: each
    level is grown for every request at once (``grow_level``), with no per-node Python.

    Nodes get flat ids in creation order; the frontier (the last level's nodes) is kept grouped by
    request. ``to_forest`` orders each request's nodes root first, then level by level, in the
    order beam search created them."""

    def __init__(self, roots: Sequence[int]):
        n = len(roots)
        self.n_requests = n
        self._tok = [np.asarray(roots, np.int64).reshape(n)]
        self._par = [np.full(n, -1, np.int64)]
        self._prob = [np.ones(n, np.float64)]
        self._owner = [np.arange(n, dtype=np.int64)]
        self.size = n
        self.frontier = np.arange(n, dtype=np.int64)  # flat ids, grouped by request
        self.frontier_owner = np.arange(n, dtype=np.int64)
        self.frontier_prob = np.ones(n, np.float64)
        self.frontier_token = self._tok[0]
        self._expanded: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (ids, tokens, probs)

    def __len__(self) -> int:
        return self.n_requests

    def live(self) -> list[int]:
        """Requests with a non-empty frontier, ascending (the frontier's request order)."""
        return np.unique(self.frontier_owner).tolist()

    def local_trees(self, requests: Sequence[int]) -> list[tuple[list[int], list[int], int]]:
        """The trees so far of ``requests``: tokens, local parents (node 0 = root), and how many of
        each tree's nodes are not on the frontier (the draft model has their KV already)."""
        tok, par, own = (np.concatenate(x) for x in (self._tok, self._par, self._owner))
        order = np.argsort(own, kind="stable")  # per request: creation order
        where = np.empty(self.size, np.int64)
        where[order] = np.arange(self.size)
        offsets = np.zeros(self.n_requests + 1, np.int64)
        np.cumsum(np.bincount(own, minlength=self.n_requests), out=offsets[1:])
        local = where - offsets[own]
        parents = np.where(par >= 0, local[np.maximum(par, 0)], -1)[order].tolist()
        tokens = tok[order].tolist()
        on_frontier = np.bincount(self.frontier_owner, minlength=self.n_requests)
        return [(tokens[offsets[i]:offsets[i + 1]], parents[offsets[i]:offsets[i + 1]],
                 int(offsets[i + 1] - offsets[i] - on_frontier[i])) for i in requests]

    def grow_level(self, toks: np.ndarray, ps: np.ndarray, keep: int | None, cols: int) -> np.ndarray:
        """Add the next level: ``toks`` / ``ps`` [F, K] are the frontier nodes' next tokens (-1: none)
        and conditional probabilities. Each node contributes its first ``cols``; beam search
        (``keep``) then keeps, per request, the ``keep`` children with the highest path probability
        (ties: frontier order, then column), None keeps all. Returns, for every new node, its
        parent's position in the previous frontier."""
        self._expanded.append((self.frontier, toks[:, :RECORD_K], ps[:, :RECORD_K]))
        t, p = toks[:, :cols], ps[:, :cols]
        path = (self.frontier_prob[:, None] * p).ravel()
        cand = np.flatnonzero(((p > 0) & (t >= 0)).ravel())
        own = self.frontier_owner[cand // cols]
        if keep is not None and len(cand):
            order = np.lexsort((cand, -path[cand], own))
            cand, own = cand[order], own[order]
            first = np.searchsorted(own, own)  # own is sorted: index of each request's first candidate
            rank = np.arange(len(cand)) - first
            cand, own = cand[rank < keep], own[rank < keep]
        m = len(cand)
        ids = np.arange(self.size, self.size + m, dtype=np.int64)
        self.frontier_token = t.ravel()[cand].astype(np.int64)
        self.frontier_prob = path[cand]
        self._tok.append(self.frontier_token)
        self._par.append(self.frontier[cand // cols])
        self._prob.append(self.frontier_prob)
        self._owner.append(own)
        self.frontier, self.frontier_owner = ids, own
        self.size += m
        return cand // cols

    def to_forest(self) -> CandidateForest:
        tok, par, prob, own = (np.concatenate(x) for x in (self._tok, self._par, self._prob, self._owner))
        depth = np.concatenate([np.full(len(t), d, np.int64) for d, t in enumerate(self._tok)])
        order = np.argsort(own, kind="stable")  # per request: creation order (root, then by level)
        where = np.empty(self.size, np.int64)
        where[order] = np.arange(self.size)
        offsets = np.zeros(self.n_requests + 1, np.int64)
        np.cumsum(np.bincount(own, minlength=self.n_requests), out=offsets[1:])
        p = par[order]
        parent = np.where(p >= 0, where[np.maximum(p, 0)], -1)
        next_tokens = np.full((self.size, RECORD_K), -1, np.int64)
        next_probs = np.zeros((self.size, RECORD_K), np.float64)
        expanded = np.zeros(self.size, bool)
        for ids, t, q in self._expanded:
            g = where[ids]
            next_tokens[g, :t.shape[1]], next_probs[g, :q.shape[1]], expanded[g] = t, q, True
        return CandidateForest(offsets, parent, tok[order], prob[order].astype(np.float64), depth[order],
                               {"next_tokens": next_tokens, "next_probs": next_probs, "expanded": expanded})


def level_plan(shape: SpecShape, level: int) -> tuple[int | None, int]:
    """(beam keep, children per frontier node) at ``level`` (0 = expanding the roots)."""
    if shape.is_static:
        return None, shape.widths[level]
    return shape.width, shape.width


"""Verification of one request's selected token tree against the target's outputs at its nodes.

A walk starts at the root (node 0) and returns ``(path, out)``: ``path`` = the accepted nodes,
root first; ``out[j]`` = the token the target produces at ``path[j]``, so ``out[:-1]`` are the
accepted nodes' tokens and ``out[-1]`` is the correction / bonus token (``len(out) == len(path)``).

* Greedy: follow the child whose token equals the target's argmax; output identical to plain
  greedy decoding.
* Stochastic: multi-step speculative sampling over the tree (SpecInfer). Our drafters propose
  deterministic children (top-k / beam search), i.e. point-mass proposals q = δ(x): child x is
  accepted with probability min(1, p(x)/q(x)) = p(x) under the residual target distribution p;
  on rejection the residual becomes norm(max(p - q, 0)) = p with x removed. The next child is
  tried against that residual; when all are rejected the bonus token is sampled from it. Every
  emitted token is therefore distributed exactly as the target's (tested statistically).
* Seeded sampling: the token the target produces at output position k is ``argmax(z + g_k)``
  (Gumbel-max: exactly a sample of ``softmax(z)``) with ``z`` the request's restricted, scaled
  logits (``target_logits``) and ``g_k`` Gumbel noise drawn from ``(seed, k)`` only
  (``gumbel_noise``), so the tree is walked greedily against those tokens (``greedy_walk``) and the
  output does not depend on the trees or the batch. A draft child is accepted with probability
  p(x), as in the stochastic walk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from adaserve.core import jit


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def target_logits(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """``logits / temperature`` (float64) with the tokens outside the ``top_k`` most likely (0: no
    limit) and outside the nucleus of mass ``top_p`` set to -inf: ``softmax`` of it is the target
    distribution of a sampled request. The most likely token is always kept."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    if 0 < top_k < len(z):
        keep = np.argpartition(z, -top_k)[-top_k:]
        masked = np.full_like(z, -np.inf)
        masked[keep] = z[keep]
        z = masked
    if top_p < 1:
        p = softmax(z)
        order = np.argsort(-p, kind="stable")
        mass_before = np.cumsum(p[order]) - p[order]
        z[order[mass_before >= top_p]] = -np.inf
    return z


def gumbel_noise(seed: int, position: int, n: int) -> np.ndarray:
    """Standard Gumbel noise for output position ``position`` of a request seeded with ``seed``."""
    return np.random.default_rng([int(seed) % 2**64, int(position)]).gumbel(size=n)


def children_of(parents: Sequence[int]) -> list[list[int]]:
    kids: list[list[int]] = [[] for _ in parents]
    for i, p in enumerate(parents):
        if p >= 0:
            kids[p].append(i)
    return kids


def greedy_walk(tokens: Sequence[int], parents: Sequence[int], argmax: Sequence[int]
                ) -> tuple[list[int], list[int]]:
    kids = children_of(parents)
    path, out = [0], []
    while True:
        t = int(argmax[path[-1]])
        out.append(t)
        nxt = next((c for c in kids[path[-1]] if tokens[c] == t), None)
        if nxt is None:
            return path, out
        path.append(nxt)


@dataclass
class Walks:
    """Many trees' walks, concatenated: tree ``i``'s ``path`` (local nodes, root first) and ``out``
    (the target's token at each) are ``[bounds[i], bounds[i+1])``; an empty walk: not walked."""

    path: np.ndarray
    out: np.ndarray
    bounds: np.ndarray

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def walk(self, i: int) -> tuple[list[int], list[int]]:
        lo, hi = int(self.bounds[i]), int(self.bounds[i + 1])
        return self.path[lo:hi].tolist(), self.out[lo:hi].tolist()

    def lists(self) -> list[tuple[list[int], list[int]]]:
        b, path, out = self.bounds.tolist(), self.path.tolist(), self.out.tolist()
        return [(path[b[i]:b[i + 1]], out[b[i]:b[i + 1]]) for i in range(len(b) - 1)]

    @classmethod
    def from_lists(cls, walks: Sequence[tuple[Sequence[int], Sequence[int]] | None]) -> Walks:
        """From per-tree ``(path, out)`` (None: not walked)."""
        sizes = [0 if w is None else len(w[0]) for w in walks]
        bounds = np.zeros(len(walks) + 1, np.int64)
        np.cumsum(sizes, out=bounds[1:])
        flat = lambda k: np.fromiter((x for w in walks if w is not None for x in w[k]), np.int64, int(bounds[-1]))  # noqa: E731
        return cls(flat(0), flat(1), bounds)


def greedy_walks_flat(tokens: np.ndarray, parents: np.ndarray, offsets: np.ndarray, argmax: np.ndarray,
                      first_row: np.ndarray, walk: np.ndarray) -> Walks:
    """The greedy walks of the trees with ``walk[i]`` (the others: empty walks); node ``j`` of tree
    ``i`` has the target token ``argmax[first_row[i] + j]``. Compiled: every walk in one kernel
    (``_greedy_walks_kernel``); else array operations over all the walked trees' nodes. (Taking the
    argmax of the path's rows only, inside the kernel, was slower: numpy's vectorized argmax of all
    1,600 rows of 256 logits takes ~50 us, a compiled scalar one of the ~450 path rows ~90 us.)"""
    if jit.enabled():
        return Walks(*_greedy_walks_kernel(tokens, parents, offsets, argmax, first_row, walk))
    sizes = np.diff(offsets)
    plain = np.flatnonzero(walk)
    sub = np.zeros(len(plain) + 1, np.int64)
    np.cumsum(sizes[plain], out=sub[1:])
    within = np.arange(sub[-1]) - np.repeat(sub[:-1], sizes[plain])
    idx = np.repeat(offsets[plain], sizes[plain]) + within  # the walked trees' nodes
    rows = np.repeat(first_row[plain], sizes[plain]) + within
    path, out, b = _greedy_walks_arrays(tokens[idx], parents[idx], sub, argmax[rows])
    counts = np.zeros(len(sizes), np.int64)
    counts[plain] = np.diff(b)
    bounds = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(counts, out=bounds[1:])
    return Walks(path, out, bounds)


@jit.njit
def _greedy_walks_kernel(tokens, parents, offsets, argmax, first_row, walk):
    """Each walked tree's path (local nodes, root first) and the target's token at each,
    concatenated, with per-tree bounds. A node's children come after it: scan forward for the
    first child whose token is the node's target token."""
    n = len(offsets) - 1
    path = np.empty(len(tokens), np.int64)
    out = np.empty(len(tokens), np.int64)
    bounds = np.zeros(n + 1, np.int64)
    at = 0
    for i in range(n):
        if walk[i]:
            lo, size, node = offsets[i], offsets[i + 1] - offsets[i], 0
            while node >= 0:
                t = argmax[first_row[i] + node]
                path[at], out[at] = node, t
                at += 1
                nxt = -1
                for c in range(node + 1, size):
                    if parents[lo + c] == node and tokens[lo + c] == t:
                        nxt = c
                        break
                node = nxt
        bounds[i + 1] = at
    return path[:at], out[:at], bounds


def _greedy_walks_arrays(tokens: np.ndarray, parents: np.ndarray, offsets: np.ndarray, argmax: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A node is accepted when its token equals its parent's argmax, it is the first such child of
    its parent (as the one-tree walk picks it) and its parent is accepted; each tree's accepted
    nodes are then its path, root first. Same result as ``greedy_walk`` per tree, as
    ``_greedy_walks_kernel``'s arrays (local path, out, per-tree bounds)."""
    n, sizes = len(tokens), np.diff(offsets)
    start = np.repeat(offsets[:-1], sizes)
    up = np.where(parents >= 0, parents + start, np.arange(n))  # a root is its own parent
    child = np.flatnonzero(parents >= 0)
    hit = child[tokens[child] == argmax[up[child]]]  # ascending: the first hit of a parent comes first
    ok = np.zeros(n, bool)
    ok[offsets[:-1]] = True
    ok[hit[np.unique(up[hit], return_index=True)[1]]] = True
    acc = ok
    while True:  # accepted = ok along the whole way up: one step per tree level
        nxt = ok & acc[up]
        if np.array_equal(nxt, acc):
            break
        acc = nxt
    path = np.flatnonzero(acc)
    return path - start[path], argmax[path], np.searchsorted(path, offsets)


def stochastic_walk(tokens: Sequence[int], parents: Sequence[int],
                    target_probs: Callable[[int], np.ndarray], rng: np.random.Generator
                    ) -> tuple[list[int], list[int]]:
    """``target_probs(node)``: the target's (temperature-scaled) next-token distribution there."""
    kids = children_of(parents)
    path, out = [0], []
    while True:
        p = np.array(target_probs(path[-1]), dtype=np.float64)
        p /= p.sum()
        nxt = None
        for c in kids[path[-1]]:
            x = tokens[c]
            px = p[x]
            if px > 0 and rng.random() < px:
                nxt = c
                break
            p[x] = 0.0
            total = p.sum()
            if total <= 0:  # the children covered all the target's mass (can only happen at px == 1)
                break
            p /= total
        if nxt is None:
            out.append(int(rng.choice(len(p), p=p)) if p.sum() > 0 else int(tokens[kids[path[-1]][0]]))
            return path, out
        out.append(int(tokens[nxt]))
        path.append(nxt)


def cut_walks(walks: Walks, caps: np.ndarray, is_eos: np.ndarray) -> tuple[np.ndarray, Walks, np.ndarray]:
    """``cut`` of every walk at once: how many of walk ``i``'s tokens are committed (at most
    ``caps[i]``, at least 1 unless the walk is empty, up to its first token with ``is_eos``), the
    cut walks, and whether each cut walk ends with an EOS. Compiled: one kernel."""
    if jit.enabled():
        m, path, out, eos = _cut_kernel(walks.bounds, walks.path, walks.out, caps, is_eos)
    else:
        m, path, out, eos = _cut_arrays(walks.bounds, walks.path, walks.out, caps, is_eos)
    bounds = np.zeros(len(m) + 1, np.int64)
    np.cumsum(m, out=bounds[1:])
    return m, Walks(path, out, bounds), eos


def _cut_arrays(bounds, path, out, caps, is_eos):
    """``_cut_kernel`` with array operations."""
    lens = np.diff(bounds)
    m = np.where(lens > 0, np.minimum(lens, np.maximum(caps, 1)), 0)
    owner = np.repeat(np.arange(len(lens)), lens)
    j = np.arange(len(is_eos)) - bounds[owner]
    hit = np.flatnonzero(is_eos & (j < m[owner]))
    first, at = np.unique(owner[hit], return_index=True)  # the first EOS of each walk that has one
    m[first] = j[hit[at]] + 1
    keep = j < m[owner]
    eos = np.zeros(len(m), bool)
    eos[first] = True
    return m, path[keep], out[keep], eos


@jit.njit
def _cut_kernel(bounds, path, out, caps, is_eos):
    """Per walk: committed tokens ``m``; the kept nodes and tokens; whether the last is an EOS."""
    n = len(bounds) - 1
    m = np.zeros(n, np.int64)
    eos = np.zeros(n, np.bool_)
    kept_path = np.empty(len(path), np.int64)
    kept_out = np.empty(len(out), np.int64)
    at = 0
    for i in range(n):
        lo, size = bounds[i], bounds[i + 1] - bounds[i]
        k = min(size, max(caps[i], 1))
        for j in range(k):
            kept_path[at], kept_out[at] = path[lo + j], out[lo + j]
            at += 1
            if is_eos[lo + j]:
                k = j + 1
                eos[i] = True
                break
        m[i] = k
    return m, kept_path[:at], kept_out[:at], eos

"""Compiled twins of the acceptance model's per-iteration numpy code (``adaserve.core.jit``).

The simulator grows every iteration's candidate trees on small arrays, where numpy's cost is its
per-call overhead, not the arithmetic. These loops do the same work in one compiled call each and
give the same bits as their numpy twins in ``acceptance.py`` (``tests/test_sim_speed.py`` runs both).
Random draws and transcendental functions (``exp``, ``log1p``) stay in numpy, whose SIMD versions
may differ in the last bit from the C library's that compiled code calls; the kernels do only
arithmetic and comparisons, which IEEE 754 rounds the same everywhere (numba does not fuse or
reorder them without ``fastmath``).
"""

from __future__ import annotations

import numpy as np

from adaserve.core.jit import njit


@njit
def negative_logit(level, sigma, normal):  # pragma: no cover - compiled
    """``-(level + sigma * normal)`` (level, sigma: (n, 1)), the argument of the top-1
    confidence's ``exp``, which the caller takes in numpy."""
    out = np.empty_like(normal)
    for i in range(normal.shape[0]):
        for j in range(normal.shape[1]):
            out[i, j] = -(level[i, 0] + sigma[i, 0] * normal[i, j])
    return out


@njit
def top1_and_rank_log_arg(exp_term, u):  # pragma: no cover - compiled
    """In place, ``exp_term`` (``exp(negative_logit)``) becomes the top-1 confidence
    ``1 / (1 + exp_term)``; returns ``-v`` of ``sample_rank``, the argument of its ``log1p``,
    which the caller takes in numpy."""
    out = np.empty_like(exp_term)
    for i in range(exp_term.shape[0]):
        for j in range(exp_term.shape[1]):
            top1 = 1 / (1 + exp_term[i, j])
            exp_term[i, j] = top1
            v = (u[i, j] - top1) / max(1 - top1, 1e-12)
            out[i, j] = -min(max(v, 0.0), 1 - 1e-12)
    return out


@njit
def confidences_and_ranks(top1, u, log1p_arg, log_rho, tail):  # pragma: no cover - compiled
    """``child_confidences(top1, len(tail) + 1, rho)`` and ``sample_rank(top1, u, rho)``, given
    ``log1p_arg = np.log1p(top1_and_rank_log_arg(...))``, ``log_rho = math.log(rho)`` and
    ``tail = _tail(width, rho)``."""
    n, f = top1.shape
    q = np.empty((n, f, tail.shape[0] + 1))
    rank = np.empty((n, f), np.int64)
    for i in range(n):
        for j in range(f):
            q[i, j, 0] = top1[i, j]
            for k in range(tail.shape[0]):
                q[i, j, k + 1] = (1 - top1[i, j]) * tail[k]
            rank[i, j] = 0 if u[i, j] < top1[i, j] else 1 + np.int64(np.floor(log1p_arg[i, j] / log_rho))
    return q, rank


@njit
def grow(q, rank, levels, nodes):  # pragma: no cover - compiled (its twin: acceptance._grow_numpy)
    """The trees' flat arrays (prob, correct, parent, token, depth) from the draws (``q``,
    ``rank``: see ``LevelSource.draws``). ``levels``: per level (frontier start, frontier size,
    width, kept nodes); ``nodes``: per local node (its level's width, its parent level's first
    node, depth). Beam pruning keeps the ``kept`` most probable candidates by insertion, a
    candidate going after every kept one at least as probable: the order of numpy's stable
    argsort of ``-prob``. Last: whether a non-root node has a path probability that is not
    positive (``drop_impossible`` has nodes to drop)."""
    n, m = q.shape[0], nodes.shape[0]
    prob = np.empty(n * m)
    ok = np.empty(n * m, np.bool_)
    parent = np.empty(n * m, np.int64)
    token = np.empty(n * m, np.int64)
    depth = np.empty(n * m, np.int64)
    pos = np.empty(m, np.int64)  # a node's position among its level's candidates
    c_prob = np.empty(q.shape[1] * q.shape[2])
    c_ok = np.empty(q.shape[1] * q.shape[2], np.bool_)
    impossible = False
    for i in range(n):
        base = i * m
        prob[base], ok[base], pos[0] = 1.0, True, 0
        for lv in range(levels.shape[0]):
            lo, f, w, kept = levels[lv, 0], levels[lv, 1], levels[lv, 2], levels[lv, 3]
            for j in range(f):
                for k in range(w):
                    c_prob[j * w + k] = prob[base + lo + j] * q[i, lo + j, k]
                    c_ok[j * w + k] = ok[base + lo + j] and rank[i, lo + j] == k
            new = lo + f
            if kept == f * w:
                for c in range(kept):
                    pos[new + c] = c
            else:
                _keep_best(c_prob, f * w, kept, pos[new:new + kept])
            for r in range(kept):
                prob[base + new + r], ok[base + new + r] = c_prob[pos[new + r]], c_ok[pos[new + r]]
                impossible = impossible or not c_prob[pos[new + r]] > 0
        for v in range(m):
            width, start = nodes[v, 0], nodes[v, 1]
            parent[base + v] = -1 if v == 0 else base + start + pos[v] // width
            token[base + v] = pos[v] % width
            depth[base + v] = nodes[v, 2]
    return prob, ok, parent, token, depth, impossible


@njit
def _keep_best(c_prob, count, kept, out):  # pragma: no cover - compiled
    """The indices of the ``kept`` largest of ``c_prob[:count]``, largest first, ties in index
    order (stable), written to ``out``."""
    size = 0
    for c in range(count):
        p = c_prob[c]
        if size == kept and not p > c_prob[out[kept - 1]]:
            continue
        at = min(size, kept - 1)
        while at > 0 and c_prob[out[at - 1]] < p:
            out[at] = out[at - 1]
            at -= 1
        out[at] = c
        size = min(size + 1, kept)


@njit
def accepted_ends(correct, selected, depth, offsets):  # pragma: no cover - compiled
    """``accepted_lengths`` and, per request, the node its accepted path ends at (the selected
    correct node at that depth, or the root): ``acceptance.accepted_ends``."""
    lengths = accepted_lengths(correct, selected, depth, offsets)
    ends = offsets[:-1].copy()
    for i in range(lengths.shape[0]):
        if lengths[i] > 0:
            for v in range(offsets[i], offsets[i + 1]):
                if correct[v] and selected[v] and depth[v] == lengths[i]:
                    ends[i] = v
                    break
    return lengths, ends


@njit
def accepted_lengths(correct, selected, depth, offsets):  # pragma: no cover - compiled
    """``acceptance.accepted_lengths`` per request: the deepest selected correct node, cut just
    above the shallowest correct node that is not selected."""
    n = offsets.shape[0] - 1
    out = np.zeros(n, np.int64)
    for i in range(n):
        deepest, gap = 0, np.iinfo(np.int64).max
        for v in range(offsets[i], offsets[i + 1]):
            if correct[v] and selected[v]:
                deepest = max(deepest, depth[v])
            elif correct[v]:
                gap = min(gap, depth[v])
        out[i] = max(min(deepest, gap - 1), 0)
    return out

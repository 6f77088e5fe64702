"""Compiled twins of the token selection's numpy code (``selection.py``; ``adaserve.core.jit``).

AdaServe's selection runs every iteration on a few hundred candidates, where numpy's cost is its
per-call overhead (about 60 array calls per iteration), not the arithmetic. These loops do the same
work in a few compiled calls and give the same bits: they do only comparisons, integer arithmetic
and float additions and divisions in numpy's order (``np.cumsum`` accumulates left to right), with
numpy's NaN rules where numpy's functions have them (``np.minimum``, ``np.maximum``, ``np.argmax``,
``np.searchsorted``, ``np.argsort``: NaN after every number). Every sort is stable (ties keep node
order), so the order is a function of the keys alone, the same on every CPU (numpy's default
quicksort breaks ties by its SIMD dispatch: its AVX2 and baseline builds disagreed on one machine).
``tests/test_sim_speed.py`` runs both paths on the same forests.

Imported only when ``jit.enabled()`` (importing this module imports numba).
"""

from __future__ import annotations

import numpy as np

from adaserve.core.jit import njit


@njit
def _before(a, b):  # pragma: no cover - compiled
    """``a`` sorts before ``b`` in numpy's order (NaN last)."""
    return a < b or (b != b and a == a)


@njit
def _np_minimum(a, b):  # pragma: no cover - compiled
    """``np.minimum`` of two scalars (NaN propagates)."""
    if a != a:
        return a
    if b != b:
        return b
    return a if a <= b else b


@njit
def sorted_candidates(prob, depth, offsets, depth_tie):  # pragma: no cover - compiled
    """``SortedCandidates``' arrays (``group_by_request``): the best-first order is a stable sort
    of the keys (merge sort, NaN last: numpy's ``kind="stable"``), so tied keys keep node order."""
    idx, owner, key = sort_keys(prob, depth, offsets, depth_tie)
    return group_by_request(np.argsort(key, kind="mergesort"), idx, owner, prob, offsets)


@njit
def sort_keys(prob, depth, offsets, depth_tie):  # pragma: no cover - compiled
    """The non-root nodes (global indices, in node order), their requests, and their sort keys
    ``depth * depth_tie - prob`` (what ``SortedCandidates.build`` argsorts)."""
    n = offsets.shape[0] - 1
    count = prob.shape[0] - n
    idx = np.empty(count, np.int64)
    owner = np.empty(count, np.int64)
    key = np.empty(count)
    j = 0
    for i in range(n):
        for v in range(offsets[i] + 1, offsets[i + 1]):
            idx[j], owner[j] = v, i
            key[j] = depth[v] * depth_tie - prob[v]
            j += 1
    return idx, owner, key


@njit
def group_by_request(best_first, idx, owner, prob, offsets):  # pragma: no cover - compiled
    """``SortedCandidates``' arrays from the best-first order of the non-root nodes: a stable
    counting sort by request (numpy's stable argsort of the owners), the ranks, the cumulative
    path probabilities along the grouped order, and the best-first nodes and probabilities.
    Returned as two blocks (fewer arrays to hand back to Python): int rows order, rank, owner,
    best, global_pos, then start and length padded to the node count; float rows cumprob and
    the best-first probabilities."""
    n, count = offsets.shape[0] - 1, best_first.shape[0]
    ints = np.zeros((7, max(count, n)), np.int64)
    order, rank, group_owner, best, global_pos, start, length = (ints[0], ints[1], ints[2], ints[3],
                                                                 ints[4], ints[5], ints[6])
    floats = np.empty((2, count))
    cumprob, prob_best = floats[0], floats[1]
    filled = np.zeros(n, np.int64)
    total = 0
    for i in range(n):
        length[i] = offsets[i + 1] - offsets[i] - 1
        start[i] = total
        total += length[i]
    for j in range(count):
        o, node = owner[best_first[j]], idx[best_first[j]]
        p = start[o] + filled[o]
        order[p], rank[p], group_owner[p], global_pos[p] = node, filled[o], o, j
        filled[o] += 1
        best[j], prob_best[j] = node, prob[node]
    acc = 0.0
    for p in range(count):
        acc += prob[order[p]]
        cumprob[p] = acc
    return ints, floats


@njit
def best_rate(prob_best, n, times):  # pragma: no cover - compiled
    """``np.argmax((n + expected_tokens) / np.maximum(times, 1e-9))`` over budgets n + j,
    j = 0..len(times) - 1 (``choose_budget``)."""
    best_j, best = 0, 0.0
    gained = 0.0
    for j in range(times.shape[0]):
        if j > 0:
            gained += prob_best[j - 1]
        t = times[j]
        rate = (n + gained) / (t if t != t or t >= 1e-9 else 1e-9)  # np.maximum(t, 1e-9)
        if j == 0 or (best == best and (rate > best or rate != rate)):
            best_j, best = j, rate
    return best_j


@njit
def _search_left(sorted_values, value):  # pragma: no cover - compiled
    """``np.searchsorted(sorted_values, value, side="left")``."""
    lo, hi = 0, sorted_values.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        if _before(sorted_values[mid], value):
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit
def slo_wants(cumprob, start, length, need, cap, limit):  # pragma: no cover - compiled
    """``selection.slo_wants``: per request, the shortest best-first prefix whose 1 + Σf̂ reaches
    ``min(need, cap)`` (``prefix_to_reach``), at most ``limit``."""
    n = start.shape[0]
    out = np.zeros(n, np.int64)
    if cumprob.shape[0] == 0:
        return out
    for i in range(n):
        target = _np_minimum(need[i], cap[i])
        k = 0
        if not target <= 1.0:
            base = cumprob[start[i] - 1] if start[i] > 0 else 0.0
            k = _search_left(cumprob, base + (target - 1.0) - 1e-12) - start[i] + 1
        out[i] = min(min(max(k, 0), length[i]), limit)
    return out


@njit
def select(roots, n_nodes, order, rank, owner, best, global_pos, remaining, need, want,
           slo_phase):  # pragma: no cover - compiled
    """``selection.select`` once its early returns are passed (``remaining`` > 0 candidates)."""
    n = roots.shape[0]
    selected = np.zeros(n_nodes, np.bool_)
    for i in range(n):
        selected[roots[i]] = True
    take = np.zeros(n, np.int64)
    if slo_phase:
        visit = np.empty(n, np.int64)  # stable argsort of -need: insertion sort, NaN last
        for i in range(n):
            at = i
            while at > 0 and _before(-need[i], -need[visit[at - 1]]):
                visit[at] = visit[at - 1]
                at -= 1
            visit[at] = i
        before = 0
        for i in visit:
            take[i] = min(max(remaining - before, 0), want[i])
            before += want[i]
        for i in range(n):
            remaining -= take[i]
    taken = np.zeros(order.shape[0], np.bool_)
    for p in range(order.shape[0]):
        if rank[p] < take[owner[p]]:
            taken[global_pos[p]] = True
            selected[order[p]] = True
    for j in range(best.shape[0]):
        if remaining <= 0:
            break
        if not taken[j]:
            selected[best[j]] = True
            remaining -= 1
    return selected


@njit
def select_budgets(roots, n_nodes, order, rank, owner_sorted, best, global_pos, cumprob, start, length,
                   budgets, times, elapsed, slo, done, weight, cap, limits, node_owner, parent,
                   prob):  # pragma: no cover - compiled
    """``selection.select_budgets``: per budget, A(r) at its time, ``slo_wants`` and ``select``,
    and each request's 1 + Σ f̂ of its selected non-root nodes (``np.bincount``'s order)."""
    n, nb = roots.shape[0], budgets.shape[0]
    masks = np.zeros((nb, n_nodes), np.bool_)
    expected = np.empty((nb, n))
    need = np.empty(n)
    for j in range(nb):
        for i in range(n):
            need[i] = (elapsed[i] + times[j]) / slo[i] - done[i] if weight[i] > 0 else -np.inf
        remaining = budgets[j] - n
        if remaining <= 0 or order.shape[0] == 0:
            for i in range(n):
                masks[j, roots[i]] = True
        else:
            want = slo_wants(cumprob, start, length, need, cap, limits[j])
            masks[j] = select(roots, n_nodes, order, rank, owner_sorted, best, global_pos, remaining,
                              need, want, True)
        gained = np.zeros(n)
        for v in range(n_nodes):
            if masks[j, v] and parent[v] >= 0:
                gained[node_owner[v]] += prob[v]
        for i in range(n):
            expected[j, i] = 1.0 + gained[i]
    return masks, expected


@njit
def exact_end_weights(offsets, parent, token, selected, tokens, starts, lens):  # pragma: no cover - compiled
    """``calibration.exact_end_weights``: (1 at each walk's end node, whether every walk fit).
    Request ``i`` walks ``tokens[starts[i]:][:lens[i]]`` from its root (``lens[i]`` < 0: skipped),
    each step to the first selected child with that token."""
    w = np.zeros(parent.shape[0])
    for i in range(offsets.shape[0] - 1):
        if lens[i] < 0:
            continue
        node, hi = offsets[i], offsets[i + 1]
        for j in range(lens[i]):
            tok = tokens[starts[i] + j]
            nxt = -1
            for v in range(node + 1, hi):
                if parent[v] == node and selected[v] and token[v] == tok:
                    nxt = v
                    break
            if nxt < 0:
                return w, False
            node = nxt
        w[node] = 1.0
    return w, True


@njit
def _depth_row(depth, max_depth):  # pragma: no cover - compiled
    """The calibration tables' row of a node depth (``Calibrator._cells``: depths past
    ``max_depth`` share the last row, a root's the first)."""
    return min(max(depth, 1), max_depth) - 1


@njit
def calibrate(parent, depth, prob, ratio, n_bins, max_depth):  # pragma: no cover - compiled
    """``Calibrator.calibrate``: per node the calibrated conditional (siblings capped at a total of
    1) and path probability, with ``conditional_confidence``, ``ratio_at``, ``_cap_siblings`` and
    ``path_products``' operations in their order (nodes are stored parents first)."""
    n = parent.shape[0]
    p = np.ones(n)  # roots: 1
    for v in range(n):
        pa = parent[v]
        if pa < 0:
            continue
        pp = prob[pa]
        x = prob[v] / (pp if pp >= 1e-300 else 1e-300) if pp > 0 else 0.0
        if x == x:  # np.clip: NaN stays
            x = 0.0 if x < 0.0 else (1.0 if x > 1.0 else x)
        row = _depth_row(depth[v], max_depth)
        pos = x * n_bins - 0.5
        pos = 0.0 if pos < 0.0 else (n_bins - 1.0 if pos > n_bins - 1.0 else pos)
        lo = min(np.int64(pos), n_bins - 2)
        frac = pos - lo
        p[v] = _np_minimum(x * ((1.0 - frac) * ratio[row, lo] + frac * ratio[row, lo + 1]), 1.0)
    total = np.zeros(n)
    for v in range(n):
        if parent[v] >= 0:
            total[parent[v]] += p[v]
    out = p.copy()
    for v in range(n):
        if parent[v] >= 0:
            t = total[parent[v]]
            out[v] = p[v] / (t if t >= 1.0 or t != t else 1.0)
    path = out.copy()
    for v in range(n):
        if parent[v] >= 0:
            path[v] *= path[parent[v]]
    return out, path


@njit
def node_outcomes(parent, depth, end):  # pragma: no cover - compiled
    """``calibration.node_outcomes``: path-end mass summed up the tree level by level (deepest
    first, nodes in index order: ``np.add.at``'s order), then (tried, accepted) per node."""
    n = parent.shape[0]
    mass = end.copy()
    tried = np.zeros(n)
    accepted = np.zeros(n)
    deepest = 0
    for v in range(n):
        if parent[v] >= 0 and depth[v] > deepest:
            deepest = depth[v]
    for d in range(deepest, 0, -1):
        for v in range(n):
            if parent[v] >= 0 and depth[v] == d:
                mass[parent[v]] += mass[v]
    for v in range(n):
        if parent[v] >= 0:
            tried[v] = mass[parent[v]]
            accepted[v] = mass[v]
    return tried, accepted


@njit
def verified_options(expected, nodes, slack):  # pragma: no cover - compiled
    """``adaserve_plus._verified_options``: per depth, requests ranked by gain descending, then
    slack, then index (``np.lexsort``'s stable order, NaN last), and the options "the first k
    requests' trees verified" for k = 0..n: expected tokens (depths, n + 1, n), verified tokens
    (depths, n + 1)."""
    depths, n = expected.shape
    e = np.empty((depths, n + 1, n))
    tokens = np.empty((depths, n + 1))
    order = np.empty(n, np.int64)
    rank = np.empty(n, np.int64)
    for d in range(depths):
        for i in range(n):  # insertion sort: stable
            at = i
            gi = -(expected[d, i] - 1.0)
            while at > 0:
                j = order[at - 1]
                gj = -(expected[d, j] - 1.0)
                if _before(gi, gj) or (not _before(gj, gi) and _before(slack[i], slack[j])):
                    order[at] = j
                    at -= 1
                else:
                    break
            order[at] = i
        for pos in range(n):
            rank[order[pos]] = pos
        for k in range(n + 1):
            tokens[d, k] = n + k * nodes[d]
            for r in range(n):
                e[d, k, r] = 1.0 + (expected[d, r] - 1.0) * (1.0 if rank[r] < k else 0.0)
    return e, tokens


@njit
def deficit_terms(expected, t_ms, slo, slack, weight):  # pragma: no cover - compiled
    """``SloState.deficit`` before its sum over requests: weight · tokens behind schedule per
    (option, request), in numpy's order of operations (the caller sums each row with numpy)."""
    options, n = expected.shape
    out = np.empty((options, n))
    for r in range(n):
        finite = np.isfinite(slo[r])
        s = slo[r] if finite else 1.0
        sl = slack[r] if finite else 0.0
        w = weight[r] if finite else 0.0
        for o in range(options):
            x = t_ms[o] - sl - s * expected[o, r]
            if not (x >= 0.0 or x != x):
                x = 0.0
            out[o, r] = x / s * w
    return out


@njit
def calibration_counts(tried_c, predicted_c, accepted_c, depth, q, tried, accepted, n_bins,
                       max_depth):  # pragma: no cover - compiled
    """``Calibrator.update``'s three ``np.add.at`` over the nodes with ``tried`` > 1e-9, in place:
    each node's (depth, confidence bin) cell gains its tried mass, tried · q, and accepted mass."""
    for v in range(depth.shape[0]):
        if not tried[v] > 1e-9:
            continue
        row = _depth_row(depth[v], max_depth)
        col = min(np.int64(q[v] * n_bins), n_bins - 1)
        tried_c[row, col] += tried[v]
        predicted_c[row, col] += tried[v] * q[v]
        accepted_c[row, col] += accepted[v]

"""SLO-customized and throughput selection (docs/definitions.md §4) and the budget rule."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from adaserve.scheduling.selection import (SortedCandidates, choose_budget, select, select_equal,
                                           slo_budget)
from adaserve.scheduling.trees import CandidateForest, is_connected

# Paper Fig. 5. Local indices: 0 is the root, t_k is local index k.
R0 = [(0, 1, 0.7), (0, 2, 0.2), (1, 3, 0.42), (1, 4, 0.21), (3, 5, 0.294), (4, 6, 0.126)]
R1 = [(0, 1, 0.5), (0, 2, 0.4), (1, 3, 0.35), (2, 4, 0.24), (3, 5, 0.14), (3, 6, 0.14)]


def fig5():
    forest = CandidateForest.from_lists([R0, R1])
    forest.check()
    return forest, SortedCandidates.build(forest)


def picked(forest, mask):
    """Selected non-root tokens per request, as the t_k labels of the figure."""
    out = []
    for i in range(forest.n_requests):
        lo, hi = forest.offsets[i], forest.offsets[i + 1]
        out.append(sorted(int(t) for t in forest.token[lo + 1:hi][mask[lo + 1:hi]]))
    return out


def test_fig5_slo_phase_then_throughput_phase():
    forest, sc = fig5()
    # The figure's A_cap are 0.6 (r0) and 0.8 (r1) without the root; our sums count the root (1.0).
    need = np.array([1.6, 1.8])
    cap = np.array([4.0, 4.0])  # d + 1 with d = 3
    slo_only = select(forest, sc, budget=2 + 3, need=need, cap=cap, n_max=4)
    assert picked(forest, slo_only) == [[1], [1, 2]]
    full = select(forest, sc, budget=8, need=need, cap=cap, n_max=4)
    assert picked(forest, full) == [[1, 3, 5], [1, 2, 3]]
    assert full.sum() == 8


def test_fig5_greedy_ablation_takes_global_top():
    forest, sc = fig5()
    mask = select(forest, sc, 8, np.array([1.6, 1.8]), np.array([4.0, 4.0]), 4, slo_phase=False)
    # global top-6 f̂: .7 .5 .42 .4 .35 .294
    assert picked(forest, mask) == [[1, 3, 5], [1, 2, 3]]
    mask = select(forest, sc, 5, np.array([1.6, 1.8]), np.array([4.0, 4.0]), 4, slo_phase=False)
    assert picked(forest, mask) == [[1, 3], [1]]  # .7 .5 .42


def test_slo_phase_visits_most_behind_first_and_respects_budget():
    forest, sc = fig5()
    # r0 far behind (A = 3: even all six of its candidates reach only 2.95), r1 slightly
    # (A = 1.8). r0 is visited first and the 3 non-root tokens left go to its best: .7 .42 .294.
    mask = select(forest, sc, 5, np.array([3.0, 1.8]), np.array([4.0, 4.0]), n_max=10)
    assert picked(forest, mask) == [[1, 3, 5], []]


def test_n_max_limits_the_slo_phase():
    forest, sc = fig5()
    mask = select(forest, sc, 4, np.array([3.0, 1.0]), np.array([4.0, 4.0]), n_max=2)
    # r0 may hold 2 nodes incl. the root in the SLO phase; the last token goes to the global best.
    assert picked(forest, mask) == [[1], [1]]


def test_cap_bounds_need():
    forest, sc = fig5()
    # A = 50 capped at d + 1 = 2: r0 needs 1 + .7 >= 2? no: 1 + .7 + .42 = 2.12 -> two tokens.
    mask = select(forest, sc, 4, np.array([50.0, 0.0]), np.array([2.0, 2.0]), n_max=10)
    assert picked(forest, mask) == [[1, 3], []]


def test_equal_shares():
    forest, sc = fig5()
    mask = select_equal(forest, sc, 6)
    assert picked(forest, mask) == [[1, 3], [1, 2]]


def test_slo_budget_counts_roots_and_needs():
    forest, sc = fig5()
    assert slo_budget(sc, np.array([1.6, 1.8]), np.array([4.0, 4.0]), 10) == 2 + 1 + 2
    assert slo_budget(sc, np.array([0.5, -3.0]), np.array([4.0, 4.0]), 10) == 2


def test_budget_rule_maximizes_tokens_per_ms():
    forest, sc = fig5()
    # Flat cost: every extra token is free, so take everything.
    assert choose_budget(sc, 2, 100, lambda b: np.full(np.shape(b), 10.0)) == 14
    # Each token costs 1 ms on top of 1 ms: rate(b) = E(b) / (1 + b). E(2)=2, E(3)=2.7, E(4)=3.2,
    # E(5)=3.62, E(6)=4.02, E(7)=4.37 ... rates .667 .675 .64 ... -> best b = 3.
    assert choose_budget(sc, 2, 100, lambda b: 1.0 + np.asarray(b, float)) == 3
    # The cap on the budget wins.
    assert choose_budget(sc, 2, 2, lambda b: np.full(np.shape(b), 10.0)) == 2


@st.composite
def forests(draw):
    n = draw(st.integers(1, 6))
    trees = []
    for _ in range(n):
        size = draw(st.integers(0, 12))
        tree, probs = [], [1.0]
        for j in range(size):
            parent = draw(st.integers(0, j))
            q = draw(st.sampled_from([1.0, 0.5, 0.25, 0.9, 0.1, 0.33]))  # repeats make ties
            probs.append(probs[parent] * q)
            tree.append((parent, j + 1, probs[-1]))
        trees.append(tree)
    need = draw(st.lists(st.floats(-5, 12), min_size=n, max_size=n))
    budget = draw(st.integers(n, n + 40))
    n_max = draw(st.integers(1, 15))
    return CandidateForest.from_lists(trees), np.array(need), budget, n_max


@settings(max_examples=300, deadline=None)
@given(forests(), st.booleans())
def test_properties(case, slo_phase):
    forest, need, budget, n_max = case
    sc = SortedCandidates.build(forest)
    cap = np.full(forest.n_requests, 9.0)
    mask = select(forest, sc, budget, need, cap, n_max, slo_phase=slo_phase)
    # Budget never exceeded; everything selected when the budget covers every node.
    assert mask.sum() <= max(budget, forest.n_requests)
    assert mask.sum() == min(budget, forest.n_nodes)
    # Connected trees containing their roots (ties broken toward parents).
    assert is_connected(forest, mask)
    # When the budget covers every request's SLO need, every capped A(r) that its candidates can
    # reach within n_max is met.
    if slo_phase and budget >= slo_budget(sc, need, cap, n_max):
        for i in range(forest.n_requests):
            lo, hi = forest.offsets[i], forest.offsets[i + 1]
            acc = forest.prob[lo:hi][mask[lo:hi]].sum()
            reachable = 1 + np.sort(forest.prob[lo + 1:hi])[::-1][: max(n_max - 1, 0)].sum()
            assert acc >= min(need[i], cap[i], reachable) - 1e-9


def test_ties_break_toward_parents():
    # A chain of probability-1 nodes next to an equal-probability sibling: parents come first.
    forest = CandidateForest.from_lists([[(0, 1, 1.0), (1, 2, 1.0), (2, 3, 1.0), (0, 4, 1.0)]])
    sc = SortedCandidates.build(forest)
    for b in range(1, 6):
        mask = select(forest, sc, b, np.array([0.0]), np.array([9.0]), 9)
        assert is_connected(forest, mask)

"""SLO-customized and throughput-optimized token selection (docs/definitions.md §4,
steps 4-5), and the rule that
picks the verification budget, vectorized over flat candidate-tree arrays.

Every request's non-root candidates are sorted once by descending path probability f̂, ties broken
toward smaller depth (so a parent always precedes its children: f̂(child) <= f̂(parent)), then
toward the earlier node (request order, then the drafter's; a stable sort, the same on every CPU). Both
phases then take *prefixes* of these per-request orders, which is what the greedy loops of
Algorithm 2 do node by node:

* SLO phase: visiting requests by descending A(r), request r takes the shortest prefix whose
  cumulative f̂ (root counted as 1) reaches ``A_cap(r) = min(A(r), d + 1)``, at most ``n_max``
  nodes in its tree, while the budget lasts.
* Throughput phase: the remaining budget goes to the globally highest-f̂ remaining nodes. Since the
  sort key puts every parent strictly before its children, the top of that key is a connected set.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from adaserve.core import jit
from adaserve.scheduling.trees import CandidateForest

_DEPTH_TIE = 1e-12  # added per depth level to -f̂ so that equal probabilities favour parents


@dataclass
class SortedCandidates:
    """Non-root nodes in two orders: globally best-first, and grouped by request (best-first within
    each request). ``order``/``rank``/``owner``/``cumprob`` describe the per-request order."""

    order: np.ndarray       # global node indices, grouped by request, best first
    start: np.ndarray       # per request: first position in ``order``
    length: np.ndarray      # per request: number of non-root candidates
    rank: np.ndarray        # position of each node of ``order`` within its request
    owner: np.ndarray       # request of each node of ``order``
    cumprob: np.ndarray     # inclusive cumulative f̂ along ``order`` (all requests concatenated)
    best: np.ndarray        # global node indices, best first over all requests
    global_pos: np.ndarray  # for each position of ``order``: its position in ``best``

    @classmethod
    def build(cls, forest: CandidateForest) -> "SortedCandidates":
        kernels = compiled_kernels()
        if kernels is not None:
            return cls._from_blocks(forest, kernels)
        n = forest.n_requests
        length = np.diff(forest.offsets) - 1
        nonroot = np.ones(forest.n_nodes, bool)
        nonroot[forest.roots] = False
        idx = np.flatnonzero(nonroot)
        owner = np.repeat(np.arange(n, dtype=np.int16 if n < 2**15 else np.int64), length)
        best_first = np.argsort(forest.depth[idx] * _DEPTH_TIE - forest.prob[idx], kind="stable")
        global_pos = np.argsort(owner[best_first], kind="stable")  # radix sort on int16: ~10 us
        order = idx[best_first[global_pos]]
        start = np.zeros(n, np.int64)
        np.cumsum(length[:-1], out=start[1:])
        rank = np.arange(len(order)) - np.repeat(start, length)
        sc = cls(order, start, length, rank, owner, np.cumsum(forest.prob[order]),
                 idx[best_first], global_pos)
        sc._prob_best = forest.prob[sc.best]
        return sc

    @classmethod
    def _from_blocks(cls, forest: CandidateForest, kernels) -> "SortedCandidates":
        """``build`` by the compiled kernels."""
        ints, floats = kernels.sorted_candidates(forest.prob, forest.depth, forest.offsets, _DEPTH_TIE)
        n, count = len(forest.offsets) - 1, floats.shape[1]
        block = ints[:, :count]
        sc = cls(block[0], ints[5, :n], ints[6, :n], block[1], block[2], floats[0], block[3], block[4])
        sc._prob_best = floats[1]
        return sc

    def prefix_to_reach(self, target: np.ndarray) -> np.ndarray:
        """Per request: how many best candidates make 1 + Σf̂ reach ``target`` (the length of the
        request's list when even all of them do not)."""
        if len(self.order) == 0:
            return np.zeros(len(self.start), np.int64)
        base = np.where(self.start > 0, self.cumprob[np.maximum(self.start - 1, 0)], 0.0)
        pos = np.searchsorted(self.cumprob, base + (target - 1.0) - 1e-12, side="left")
        k = pos - self.start + 1
        k = np.where(target <= 1.0, 0, k)
        return np.minimum(np.maximum(k, 0), self.length)  # np.clip, without its call overhead

    def expected_tokens(self, max_extra: int) -> np.ndarray:
        """Σ of the ``j`` globally best non-root f̂, for j = 0..max_extra (E[accepted] gained)."""
        return np.concatenate(([0.0], np.cumsum(self._prob_best[:max_extra])))


def select(forest: CandidateForest, sorted_c: SortedCandidates, budget: int, need: np.ndarray,
           cap: np.ndarray, n_max: int, slo_phase: bool = True,
           want: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the nodes to verify.

    ``need``: A(r) per request (visiting order, descending); ``cap``: d + 1 per request (or any
    upper bound on A); ``budget`` counts roots, which are always verified; ``want``:
    ``slo_wants(sorted_c, need, cap, n_max)`` if the caller has it already.
    """
    n = forest.n_requests
    selected = np.zeros(forest.n_nodes, bool)
    selected[forest.roots] = True
    remaining = budget - n
    if remaining <= 0 or len(sorted_c.order) == 0:
        return selected
    kernels = compiled_kernels()
    if kernels is not None:
        if slo_phase and want is None:
            want = slo_wants(sorted_c, need, cap, n_max)
        unused = np.zeros(0)  # the SLO phase's inputs, when it does not run
        return kernels.select(forest.roots, forest.n_nodes, sorted_c.order, sorted_c.rank,
                              sorted_c.owner, sorted_c.best, sorted_c.global_pos, remaining,
                              np.asarray(need, np.float64) if slo_phase else unused,
                              np.asarray(want, np.int64) if slo_phase else unused.astype(np.int64),
                              slo_phase)
    take = np.zeros(n, np.int64)
    if slo_phase:
        if want is None:
            want = slo_wants(sorted_c, need, cap, n_max)
        visit = np.argsort(-need, kind="stable")
        before = np.concatenate(([0], np.cumsum(want[visit])[:-1]))
        take[visit] = np.minimum(np.maximum(remaining - before, 0), want[visit])
        remaining -= int(take.sum())
    taken = sorted_c.rank < take[sorted_c.owner]
    selected[sorted_c.order[taken]] = True
    if remaining > 0:
        taken_best = np.zeros(len(taken), bool)
        taken_best[sorted_c.global_pos] = taken
        selected[sorted_c.best[np.flatnonzero(~taken_best)[:remaining]]] = True
    return selected


def select_budgets(forest: CandidateForest, sorted_c: SortedCandidates, budgets: np.ndarray,
                   times: np.ndarray, terms: tuple[np.ndarray, np.ndarray, np.ndarray],
                   weight: np.ndarray, cap: np.ndarray, n_max: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``select`` (SLO phase on) for every budget ``budgets[j]``, with A(r) at that budget's
    predicted time ``times[j]`` (``terms``: ``need_terms``' (elapsed, slo, done)) for requests with
    ``weight`` > 0 and -inf for the others, and ``n_max[j]``. Returns the masks (budgets, nodes)
    and, per budget, each request's 1 + Σ f̂ of its selected non-root nodes (budgets, n).
    Compiled: one kernel call for all budgets."""
    elapsed, slo, done = terms
    kernels = compiled_kernels()
    if kernels is not None:
        return kernels.select_budgets(
            forest.roots, forest.n_nodes, sorted_c.order, sorted_c.rank, sorted_c.owner, sorted_c.best,
            sorted_c.global_pos, sorted_c.cumprob, sorted_c.start, sorted_c.length,
            np.asarray(budgets, np.int64), np.asarray(times, np.float64), elapsed, slo, done,
            np.asarray(weight, np.float64), np.asarray(cap, np.float64),
            np.maximum(np.asarray(n_max, np.int64) - 1, 0), forest.owner, forest.parent, forest.prob)
    n = forest.n_requests
    masks = np.empty((len(budgets), forest.n_nodes), bool)
    expected = np.empty((len(budgets), n))
    for j, b in enumerate(budgets):
        need = np.where(weight > 0, (elapsed + float(times[j])) / slo - done, -np.inf)
        masks[j] = select(forest, sorted_c, int(b), need, cap, int(n_max[j]))
        gained = np.bincount(forest.owner, weights=np.where(masks[j] & (forest.parent >= 0), forest.prob, 0.0),
                             minlength=n)
        expected[j] = 1.0 + gained
    return masks, expected


def select_equal(forest: CandidateForest, sorted_c: SortedCandidates, budget: int) -> np.ndarray:
    """Ablation ``equal``: every request gets the same share of the budget (its best nodes)."""
    n = forest.n_requests
    selected = np.zeros(forest.n_nodes, bool)
    selected[forest.roots] = True
    share = max(budget // max(n, 1) - 1, 0)
    selected[sorted_c.order[sorted_c.rank < share]] = True
    return selected


def choose_budget(sorted_c: SortedCandidates, n: int, max_budget: int, step_ms) -> int:
    """Verification budget (roots included) that maximizes expected committed tokens per ms.

    ``step_ms(b)`` predicts the iteration time (draft + target forward incl. any prefill) for a
    budget of b tokens, vectorized over an array of budgets. Expected committed tokens of a budget
    b is ``n + Σ`` of the b - n globally best f̂ (Theorem 3.1: E[accepted] = Σ f̂; plus one
    correction/bonus token per request). The SLO side is handled by :func:`slo_budget`.
    """
    extra = int(min(max(max_budget - n, 0), len(sorted_c.order)))
    if extra == 0:
        return n
    budgets = n + np.arange(extra + 1)
    times = np.asarray(step_ms(budgets), dtype=np.float64)
    kernels = compiled_kernels()
    if kernels is not None:
        return n + kernels.best_rate(sorted_c._prob_best, n, times)
    rate = (n + sorted_c.expected_tokens(extra)) / np.maximum(times, 1e-9)
    return int(budgets[int(np.argmax(rate))])


def slo_wants(sorted_c: SortedCandidates, need: np.ndarray, cap: np.ndarray, n_max: int) -> np.ndarray:
    """Per request: the candidates the SLO phase gives it with an unlimited budget (the shortest
    best-first prefix reaching ``A_cap = min(A, cap)``, at most ``n_max - 1``)."""
    kernels = compiled_kernels()
    if kernels is not None:
        return kernels.slo_wants(sorted_c.cumprob, sorted_c.start, sorted_c.length,
                                 np.asarray(need, np.float64), np.asarray(cap, np.float64),
                                 max(n_max - 1, 0))
    return np.minimum(sorted_c.prefix_to_reach(np.minimum(need, cap)), max(n_max - 1, 0))


def slo_budget(sorted_c: SortedCandidates, need: np.ndarray, cap: np.ndarray, n_max: int) -> int:
    """Tokens (roots included) the SLO phase would use with an unlimited budget."""
    return int(len(need) + slo_wants(sorted_c, need, cap, n_max).sum())


def compiled_kernels():
    """``scheduling.kernels`` when numba is enabled, else None: the numpy code runs."""
    return _kernel_module() if jit.enabled() else None


@functools.cache
def _kernel_module():
    """``scheduling.kernels``, imported on first use (importing it imports numba)."""
    from adaserve.scheduling import kernels
    return kernels

"""Online calibration of draft confidence to acceptance probability (adaserve_plus, issue 15).

AdaServe takes a draft node's path probability f̂ as the chance the target accepts it. That holds
for a calibrated draft model; n-gram "probabilities" are frequencies and small draft LMs are
over-confident. ``Calibrator`` learns, from every verification, how often a node whose
*conditional* draft confidence ``q = f̂(v) / f̂(parent)`` falls in a bin is accepted once its parent
is, per depth (one ``Calibrator`` per policy instance, i.e. per drafter). The calibrated path
probability is the product of the calibrated conditionals along the path, so it still never grows
with depth and the selection's prefix rules keep trees connected.

The estimate of bin b is multiplicative: ``p̂ = q · (s_b + κ) / (e_b + κ)`` with ``s_b`` the
accepted count and ``e_b`` the count the draft predicted (Σ q over the nodes tried). With no data
this is the identity — the paper's assumption — and ``κ`` pseudo-observations keep the start
stable. Counts decay (``max_weight``) so the estimate follows drift.

Which selected nodes were accepted follows from the step's outcome: a request commits its accepted
depth + 1 tokens. With token ids (the engine) the accepted path is walked exactly; without them
(the simulator) several selected nodes of one depth may fit, and each gets its posterior
probability of being on the accepted path under the current calibrated estimates (soft counts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from adaserve.scheduling.selection import compiled_kernels
from adaserve.scheduling.trees import CandidateForest

N_BINS = 10
MAX_DEPTH = 8               # depths beyond share the last row
PAPER_CHAIN_ACCEPTANCE = {"llama": 0.79, "qwen2": 0.74}
# ^ the per-token acceptance α that reproduces the paper's Figure 12 chain values (k = 4:
#   1 + α + … + α⁴ = 3.37 for Llama, 2.97 for Qwen): the prior of ``DepthAcceptance``.


def conditional_confidence(forest: CandidateForest) -> np.ndarray:
    """q(v) = f̂(v) / f̂(parent(v)) per node (1 for roots)."""
    q = np.ones(forest.n_nodes)
    nonroot = forest.parent >= 0
    parent_prob = forest.prob[forest.parent[nonroot]]
    q[nonroot] = np.where(parent_prob > 0, forest.prob[nonroot] / np.maximum(parent_prob, 1e-300), 0.0)
    return np.clip(q, 0.0, 1.0)


def path_products(forest: CandidateForest, cond: np.ndarray) -> np.ndarray:
    """Path probability from per-node conditionals (nodes are stored parents first)."""
    out = cond.astype(np.float64, copy=True)
    nonroot = np.flatnonzero(forest.parent >= 0)
    if len(nonroot) == 0:
        return out
    depth = forest.depth[nonroot]
    for d in range(1, int(depth.max()) + 1):  # one vectorized pass per level
        idx = nonroot[depth == d]
        out[idx] *= out[forest.parent[idx]]
    return out


@dataclass
class Calibrator:
    """Binned, per-depth multiplicative calibration of conditional draft confidences."""

    kappa: float = 5.0           # prior strength, in predicted acceptances
    max_weight: float = 20000.0  # per bin: older counts decay beyond this many predicted acceptances
    accepted: np.ndarray = field(default_factory=lambda: np.zeros((MAX_DEPTH, N_BINS)))
    predicted: np.ndarray = field(default_factory=lambda: np.zeros((MAX_DEPTH, N_BINS)))
    tried: np.ndarray = field(default_factory=lambda: np.zeros((MAX_DEPTH, N_BINS)))

    @staticmethod
    def _cells(depth: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        row = np.minimum(np.maximum(depth, 1), MAX_DEPTH) - 1
        col = np.minimum((q * N_BINS).astype(np.int64), N_BINS - 1)
        return row, col

    def ratio(self) -> np.ndarray:
        """Per (depth, bin): observed / predicted acceptances, shrunk toward 1."""
        return (self.accepted + self.kappa) / (self.predicted + self.kappa)

    def ratio_at(self, depth: np.ndarray, q: np.ndarray) -> np.ndarray:
        """``ratio`` interpolated linearly between bin centres (so p̂ is continuous in q)."""
        row = np.minimum(np.maximum(depth, 1), MAX_DEPTH) - 1
        pos = np.clip(q * N_BINS - 0.5, 0.0, N_BINS - 1.0)
        lo = np.minimum(pos.astype(np.int64), N_BINS - 2)
        frac = pos - lo
        ratio = self.ratio()
        return (1.0 - frac) * ratio[row, lo] + frac * ratio[row, lo + 1]

    def calibrate(self, forest: CandidateForest) -> tuple[np.ndarray, np.ndarray]:
        """(calibrated conditional p̂ per node, calibrated path probability per node). Siblings'
        p̂ are scaled down together where they would sum above 1 (they are exclusive events)."""
        kernels = compiled_kernels()
        if kernels is not None:
            return kernels.calibrate(forest.parent, forest.depth, forest.prob, self.ratio(), N_BINS, MAX_DEPTH)
        q = conditional_confidence(forest)
        nonroot = forest.parent >= 0
        p = q.copy()
        p[nonroot] = np.minimum(q[nonroot] * self.ratio_at(forest.depth[nonroot], q[nonroot]), 1.0)
        p = _cap_siblings(forest, p)
        return p, path_products(forest, p)

    def update(self, depth: np.ndarray, q: np.ndarray, tried: np.ndarray, accepted: np.ndarray) -> None:
        """Add (soft) observations: per node, the probability its parent was accepted (``tried``)
        and that it was (``accepted``)."""
        keep = tried > 1e-9
        if not keep.any():
            return
        kernels = compiled_kernels()
        if kernels is not None:  # the three np.add.at below, in one pass (each array in index order)
            kernels.calibration_counts(self.tried, self.predicted, self.accepted, depth, q, tried, accepted,
                                       N_BINS, MAX_DEPTH)
        else:
            row, col = self._cells(depth[keep], q[keep])
            np.add.at(self.tried, (row, col), tried[keep])
            np.add.at(self.predicted, (row, col), tried[keep] * q[keep])
            np.add.at(self.accepted, (row, col), accepted[keep])
        over = self.predicted > self.max_weight
        if over.any():
            scale = np.where(over, self.max_weight / np.maximum(self.predicted, 1e-12), 1.0)
            for a in (self.accepted, self.predicted, self.tried):
                a *= scale


def _cap_siblings(forest: CandidateForest, p: np.ndarray) -> np.ndarray:
    nonroot = np.flatnonzero(forest.parent >= 0)
    if len(nonroot) == 0:
        return p
    total = np.zeros(forest.n_nodes)
    np.add.at(total, forest.parent[nonroot], p[nonroot])
    scale = np.maximum(total[forest.parent[nonroot]], 1.0)
    out = p.copy()
    out[nonroot] = p[nonroot] / scale
    return out


# ---------------------------------------------------------------------------- step outcomes

def end_weights(forest: CandidateForest, selected: np.ndarray, accepted_depth: np.ndarray,
                cond: np.ndarray, path: np.ndarray) -> np.ndarray:
    """Per node: the posterior probability that the accepted path ends there. ``accepted_depth``
    per request (-1: unknown, the request is skipped). Candidates are the selected nodes at the
    accepted depth, weighted by P(path to u) · P(no selected child of u accepted)."""
    owner = forest.owner
    sel = np.asarray(selected, bool)
    child_mass = np.zeros(forest.n_nodes)
    kids = np.flatnonzero(sel & (forest.parent >= 0))
    np.add.at(child_mass, forest.parent[kids], cond[kids])
    a = accepted_depth[owner]
    cand = sel & (a >= 0) & (forest.depth == a)
    w = np.where(cand, path * np.maximum(1.0 - child_mass, 0.0) + 1e-12, 0.0)
    total = np.zeros(forest.n_requests)
    np.add.at(total, owner, w)
    return np.where(cand, w / np.maximum(total[owner], 1e-300), 0.0)


def exact_end_weights(forest: CandidateForest, selected: np.ndarray,
                      tokens: list[list[int] | None], accepted_depth: np.ndarray) -> np.ndarray | None:
    """End weights from committed token ids: walk each request's selected tree along its accepted
    draft tokens. None when a walk does not fit the tree (then the posterior is used). Compiled:
    every walk in one kernel call (it ran ~0.5 ms of Python for 64 full trees of 25 nodes)."""
    sel = np.asarray(selected, bool)
    kernels = compiled_kernels()
    if kernels is not None:
        lens = np.full(len(tokens), -1, np.int64)
        flat: list[int] = []
        for i, ids in enumerate(tokens):
            a = int(accepted_depth[i])
            if a >= 0 and ids is not None:
                walk = ids[:a]
                lens[i] = len(walk)
                flat += walk
        starts = np.zeros(len(tokens), np.int64)
        np.cumsum(np.maximum(lens, 0)[:-1], out=starts[1:])
        w, ok = kernels.exact_end_weights(forest.offsets, forest.parent, forest.token, sel,
                                          np.array(flat, np.int64), starts, lens)
        return w if ok else None
    w = np.zeros(forest.n_nodes)
    for i, ids in enumerate(tokens):
        a = int(accepted_depth[i])
        if a < 0 or ids is None:
            continue
        lo, hi = int(forest.offsets[i]), int(forest.offsets[i + 1])
        node = lo
        for tok in ids[:a]:
            kids = [v for v in range(node + 1, hi) if forest.parent[v] == node and sel[v]
                    and forest.token[v] == tok]
            if not kids:
                return None
            node = kids[0]
        w[node] = 1.0
    return w


def node_outcomes(forest: CandidateForest, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tried, accepted) per node from end-of-path weights: ``accepted(v)`` = mass of path ends in
    v's subtree (v on the path), ``tried(v)`` = that of its parent (the target looked at v)."""
    kernels = compiled_kernels()
    if kernels is not None:
        return kernels.node_outcomes(forest.parent, forest.depth, np.asarray(end, np.float64))
    mass = end.copy()
    nonroot = np.flatnonzero(forest.parent >= 0)
    if len(nonroot) == 0:
        return np.zeros(forest.n_nodes), np.zeros(forest.n_nodes)
    depth = forest.depth[nonroot]
    for d in range(int(depth.max()), 0, -1):
        idx = nonroot[depth == d]
        np.add.at(mass, forest.parent[idx], mass[idx])
    tried = np.zeros(forest.n_nodes)
    tried[nonroot] = mass[forest.parent[nonroot]]
    accepted = np.where(forest.parent >= 0, mass, 0.0)
    return tried, accepted


@dataclass
class DepthAcceptance:
    """For planning the speculation shape before any tree is drafted, per category with a global
    fallback: ρ_k = P(accepted depth >= k | the drafted trees reached depth k) and ν_k = the mean
    nodes the selection verifies at depth k then, both as our own selection runs. Prior: the
    paper's chain acceptance ρ_k = α^k and a width of ``prior_width``."""

    alpha: float = 0.79
    strength: float = 20.0
    prior_width: float = 2.0
    counts: dict = field(default_factory=dict)   # category ("" = all) -> (reached, drafted)
    width_sum: np.ndarray = field(default_factory=lambda: np.zeros(MAX_DEPTH))
    width_n: np.ndarray = field(default_factory=lambda: np.zeros(MAX_DEPTH))
    # category -> [0, ρ_1, ρ_1 + ρ_2, ...]: read several times an iteration, changed once (cleared
    # by ``update_many``)
    _cumulative: dict = field(default_factory=dict, repr=False, compare=False)

    def _arrays(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        if key not in self.counts:
            self.counts[key] = (np.zeros(MAX_DEPTH), np.zeros(MAX_DEPTH))
        return self.counts[key]

    def update_many(self, categories: list[str], depth: int, accepted: np.ndarray,
                    verified: np.ndarray) -> None:
        """One step: per request its category, accepted depth (-1: unknown, skipped) and nodes
        verified per depth ``verified`` (n, MAX_DEPTH); ``depth``: the drafted trees' depth."""
        k = min(depth, MAX_DEPTH)
        live = accepted >= 0
        if k <= 0 or not live.any():
            return
        self._cumulative.clear()
        n_live = int(live.sum())
        self.width_sum[:k] += verified[live, :k].sum(axis=0)
        self.width_n[:k] += n_live
        # per category, how many live requests reached each depth 1..k: a histogram of
        # min(accepted, k) summed from the top (integer counts: no order of additions matters)
        codes: dict[str, int] = {}
        code = np.array([codes.setdefault(c, len(codes)) for c in categories], np.int64)
        hist = np.zeros((len(codes), k + 1))
        np.add.at(hist, (code[live], np.minimum(accepted[live], k)), 1.0)
        reach = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]  # [c, j-1]: accepted >= j
        count = hist.sum(axis=1)
        for key, c in codes.items():
            reached, drafted = self._arrays(key)
            reached[:k] += reach[c]
            drafted[:k] += count[c]
        reached, drafted = self._arrays("")
        reached[:k] += reach.sum(axis=0)
        drafted[:k] += n_live

    def mean_width(self) -> np.ndarray:
        """ν_k for k = 1..MAX_DEPTH."""
        return (self.width_sum + self.strength * self.prior_width) / (self.width_n + self.strength)

    def cumulative(self, category: str) -> np.ndarray:
        """``[0, ρ_1, ρ_1 + ρ_2, ...]`` (MAX_DEPTH + 1 values): tokens expected beyond the first
        from a tree of each depth."""
        cum = self._cumulative.get(category)
        if cum is None:
            cum = self._cumulative[category] = np.concatenate(([0.0], np.cumsum(self.rho(category))))
        return cum

    def rho(self, category: str) -> np.ndarray:
        """ρ_k for k = 1..MAX_DEPTH."""
        prior = self.alpha ** np.arange(1, MAX_DEPTH + 1)
        reached, drafted = self._arrays("")
        glob = (reached + self.strength * prior) / (drafted + self.strength)
        if category not in self.counts:
            return glob
        reached, drafted = self.counts[category]
        return (reached + self.strength * glob) / (drafted + self.strength)

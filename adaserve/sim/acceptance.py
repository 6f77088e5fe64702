"""Acceptance models: the simulated drafter. They grow the candidate trees a policy asks for (with
path probabilities the scheduler sees) and decide, hidden from the scheduler, which nodes the
target would accept.

Both models share one tree-growing loop. At every frontier node the draft proposes its top-``w``
children with confidences ``q_1 >= q_2 >= ...``; at the node on the target's path the target's next
token is the draft's child of rank ``rank`` (or none of them). Nodes off that path are never right.

- ``SyntheticAcceptance``: the draft is *calibrated* — the target's token is the draft's rank-j
  child with probability ``q_j`` — so the path probability is informative, as the paper assumes.
  The top-1 confidence is logit-normal: a per-(request, step) level (``mu`` plus ``tau`` noise,
  so easy and hard stretches of text make acceptance correlated along a path) plus per-node noise
  ``sigma``. The remaining mass falls geometrically with ratio ``rho`` over lower ranks.
- ``RecordedAcceptance``: replays per-position draft confidences and target ranks recorded from
  real draft/target runs (the engine's ``--record-acceptance`` JSONL, format below).

Recorded format, one JSON object per line: ``{"rid": int, "category": str, "pos": int,
"probs": [draft top-K confidences, descending], "rank": int}`` where ``rank`` indexes ``probs``
(``-1``: the target's token is not among them).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from adaserve.core.request import Request
from adaserve.scheduling.plan import SpecShape
from adaserve.scheduling.trees import CandidateForest


class LevelSource(Protocol):
    def level(self, level: int, frontier: int, width: int, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
        """Children confidences ``q`` (n, frontier, width) and the target's rank (n, frontier)."""


def _keep_top(prob: np.ndarray, keep: int) -> np.ndarray:
    """Column indices of the ``keep`` highest values per row, best first (stable: ties keep the
    draft's order, i.e. toward earlier parents and higher-ranked children)."""
    order = np.argsort(-prob, axis=1, kind="stable")
    return order[:, :keep]


def grow_forest(source: LevelSource, n: int, shape: SpecShape, rng: np.random.Generator
                ) -> CandidateForest:
    """Candidate trees of ``shape`` for ``n`` requests, with ground truth in ``extra["correct"]``."""
    f_prob = np.ones((n, 1))
    f_ok = np.ones((n, 1), bool)
    f_local = np.zeros((n, 1), np.int64)
    parents, probs, oks, toks = [], [], [], []
    next_local = 1
    for level in range(shape.depth):
        width = shape.widths[level] if shape.is_static else shape.width
        frontier = f_prob.shape[1]
        q, rank = source.level(level, frontier, width, rng)
        c_prob = (f_prob[:, :, None] * q).reshape(n, -1)
        c_ok = (f_ok[:, :, None] & (np.arange(width)[None, None, :] == rank[:, :, None])).reshape(n, -1)
        c_parent = np.broadcast_to(f_local[:, :, None], (n, frontier, width)).reshape(n, -1)
        c_tok = np.broadcast_to(np.arange(width)[None, None, :], (n, frontier, width)).reshape(n, -1)
        if not shape.is_static and c_prob.shape[1] > shape.width:
            keep = _keep_top(c_prob, shape.width)
            c_prob, c_ok, c_parent, c_tok = (np.take_along_axis(a, keep, 1)
                                             for a in (c_prob, c_ok, c_parent, c_tok))
        size = c_prob.shape[1]
        parents.append(c_parent), probs.append(c_prob), oks.append(c_ok), toks.append(c_tok)
        f_prob, f_ok = c_prob, c_ok
        f_local = np.broadcast_to(np.arange(next_local, next_local + size), (n, size))
        next_local += size
    return drop_impossible(_assemble(n, next_local, parents, probs, oks, toks))


def drop_impossible(forest: CandidateForest) -> CandidateForest:
    """Remove nodes of path probability 0 (a drafter that has nothing to propose, e.g. an n-gram
    miss in recorded acceptance): real drafters do not emit them, so nobody should verify them.
    Their descendants have probability 0 too, so the remaining trees stay connected."""
    keep = forest.prob > 0
    keep[forest.roots] = True
    if keep.all():
        return forest
    new_index = np.cumsum(keep) - 1
    parent = forest.parent[keep]
    counts = np.add.reduceat(keep.astype(np.int64), forest.offsets[:-1])
    out = CandidateForest(offsets=np.concatenate(([0], np.cumsum(counts))).astype(np.int64),
                          parent=np.where(parent >= 0, new_index[np.maximum(parent, 0)], -1),
                          token=forest.token[keep], prob=forest.prob[keep], depth=forest.depth[keep])
    out.extra = {k: v[keep] for k, v in forest.extra.items()}
    return out


def _assemble(n: int, m: int, parents, probs, oks, toks) -> CandidateForest:
    """Flat forest arrays from per-level (n, size) arrays; request i owns nodes i*m:(i+1)*m."""
    col = lambda a, fill, dt: np.concatenate([np.full((n, 1), fill, dt)] + [x.astype(dt) for x in a], 1)
    parent_local = col(parents, -1, np.int64)
    depth = np.concatenate([np.zeros(1, np.int64)] +
                           [np.full(p.shape[1], d + 1, np.int64) for d, p in enumerate(parents)])
    base = (np.arange(n, dtype=np.int64) * m)[:, None]
    parent = np.where(parent_local >= 0, parent_local + base, -1)
    forest = CandidateForest(offsets=np.arange(n + 1, dtype=np.int64) * m, parent=parent.ravel(),
                             token=col(toks, 0, np.int64).ravel(), prob=col(probs, 1.0, np.float64).ravel(),
                             depth=np.tile(depth, n))
    forest.extra["correct"] = col(oks, True, bool).ravel()
    return forest


def accepted_lengths(forest: CandidateForest, selected: np.ndarray) -> np.ndarray:
    """Per request, the depth of the deepest selected node whose whole root path is selected and
    on the target's path: the tokens the target accepts (the bonus token not included)."""
    good = np.asarray(selected, bool) & forest.extra["correct"]
    reach = good.copy()
    for d in range(1, int(forest.depth.max(initial=0)) + 1):
        idx = np.flatnonzero(forest.depth == d)
        reach[idx] &= reach[forest.parent[idx]]
    return np.maximum.reduceat(np.where(reach, forest.depth, 0), forest.offsets[:-1])


# ------------------------------------------------------------------------------ synthetic model

@dataclass(frozen=True)
class AcceptanceParams:
    mu: float      # mean logit of the draft's top-1 confidence
    tau: float     # sd of the per-(request, step) logit level
    sigma: float   # sd of the per-node logit noise
    rho: float     # geometric ratio of the confidences of ranks 2, 3, ...

    def __post_init__(self) -> None:
        if not (self.tau >= 0 and self.sigma >= 0 and 0 < self.rho < 1 and math.isfinite(self.mu)):
            raise ValueError(f"invalid acceptance parameters {self}")


def child_confidences(top1: np.ndarray, width: int, rho: float) -> np.ndarray:
    """(…, width) confidences: ``q_1 = top1``, ``q_j = (1 - top1)(1 - rho) rho^(j-2)``."""
    tail = (1 - rho) * rho ** np.arange(width - 1)
    return np.concatenate([top1[..., None], (1 - top1)[..., None] * tail], -1)


def sample_rank(top1: np.ndarray, rho: float, rng: np.random.Generator) -> np.ndarray:
    """The target's rank among the draft's children, drawn from the calibrated distribution."""
    u = rng.random(top1.shape)
    v = np.clip((u - top1) / np.maximum(1 - top1, 1e-12), 0, 1 - 1e-12)
    rank = 1 + np.floor(np.log1p(-v) / math.log(rho)).astype(np.int64)
    return np.where(u < top1, 0, rank)


@dataclass
class _SyntheticLevels:
    params: list[AcceptanceParams]
    level_logit: np.ndarray

    def level(self, level: int, frontier: int, width: int, rng: np.random.Generator):
        n = len(self.params)
        sigma = np.array([p.sigma for p in self.params])[:, None]
        rho = self.params[0].rho
        top1 = 1 / (1 + np.exp(-(self.level_logit[:, None] + sigma * rng.standard_normal((n, frontier)))))
        return child_confidences(top1, width, rho), sample_rank(top1, rho, rng)


@dataclass
class SyntheticAcceptance:
    default: AcceptanceParams
    per_category: dict[str, AcceptanceParams] = field(default_factory=dict)
    name: str = "synthetic"

    def params_for(self, category: str) -> AcceptanceParams:
        return self.per_category.get(category, self.default)

    def draft(self, requests: list[Request], shape: SpecShape, rng: np.random.Generator
              ) -> CandidateForest:
        params = [self.params_for(r.category) for r in requests]
        mu = np.array([p.mu for p in params])
        tau = np.array([p.tau for p in params])
        levels = _SyntheticLevels(params, mu + tau * rng.standard_normal(len(requests)))
        return grow_forest(levels, len(requests), shape, rng)


# Calibrated against Figure 12's chain values (SPEC §6); see docs/simulator.md for the table and
# `python -m adaserve.sim.acceptance` for the command that prints it.
LLAMA_ACCEPTANCE = SyntheticAcceptance(AcceptanceParams(mu=3.0, tau=3.5, sigma=0.5, rho=0.5),
                                       name="llama-3.1-70b/llama-3.2-1b (synthetic)")
QWEN_ACCEPTANCE = SyntheticAcceptance(AcceptanceParams(mu=2.0, tau=3.5, sigma=0.5, rho=0.5),
                                      name="qwen2.5-32b/qwen2.5-0.5b (synthetic)")
FIG12_CHAIN = {"llama": {4: 3.37, 6: 5.0, 8: 6.6}, "qwen": {4: 2.97, 6: 4.36, 8: 5.73}}


def acceptance_for(profile_name: str) -> SyntheticAcceptance:
    """The calibrated model of a profile's model family (Qwen for ``qwen*``, else Llama)."""
    return QWEN_ACCEPTANCE if profile_name.lower().startswith("qwen") else LLAMA_ACCEPTANCE


def mean_committed(model, shape: SpecShape, samples: int = 20000, seed: int = 0,
                   category: str = "chat") -> float:
    """Mean tokens committed per step (accepted + bonus) when every drafted node is verified."""
    reqs = [Request(i, 0.0, 1, 1, 1.2, 30.0, category) for i in range(samples)]
    forest = model.draft(reqs, shape, np.random.default_rng(seed))
    return float(np.mean(accepted_lengths(forest, np.ones(forest.n_nodes, bool)) + 1))


# ------------------------------------------------------------------------------- recorded model

class AcceptanceRecordError(ValueError):
    pass


def load_records(path: str | Path) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """Recorded JSONL → {(category, rid): (probs (positions, K), rank (positions,))}, positions
    sorted. Raises ``AcceptanceRecordError`` naming the file, line and field."""
    rows: dict[tuple[str, int], list[tuple[int, list[float], int]]] = {}
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise AcceptanceRecordError(f"acceptance records '{path}': cannot be read ({e})") from None
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"acceptance records '{path}' line {no}"
        try:
            d = json.loads(line)
            key, pos = (str(d["category"]), int(d["rid"])), int(d["pos"])
            probs, rank = [float(p) for p in d["probs"]], int(d["rank"])
        except json.JSONDecodeError as e:
            raise AcceptanceRecordError(f"{where}: not JSON ({e.msg})") from None
        except (KeyError, TypeError, ValueError) as e:
            raise AcceptanceRecordError(f"{where}: needs rid, category, pos, probs, rank ({e!r})") from None
        if not probs or not all(0 <= p <= 1 for p in probs) or not -1 <= rank < len(probs):
            raise AcceptanceRecordError(f"{where}: probs must be in [0, 1] and rank in [-1, len(probs))")
        rows.setdefault(key, []).append((pos, probs, rank))
    if not rows:
        raise AcceptanceRecordError(f"acceptance records '{path}': no records")
    out = {}
    for key, rs in rows.items():
        rs.sort(key=lambda x: x[0])
        k = max(len(p) for _, p, _ in rs)
        probs = np.array([p + [0.0] * (k - len(p)) for _, p, _ in rs])
        out[key] = (probs, np.array([r for _, _, r in rs], np.int64))
    return out


@dataclass
class _RecordedLevels:
    sequences: list[tuple[np.ndarray, np.ndarray]]
    positions: np.ndarray

    def level(self, level: int, frontier: int, width: int, rng: np.random.Generator):
        n = len(self.sequences)
        q = np.zeros((n, frontier, width))
        rank = np.full((n, frontier), -1, np.int64)
        for i, (probs, ranks) in enumerate(self.sequences):
            p = (self.positions[i] + level) % len(ranks)
            k = min(width, probs.shape[1])
            q[i, :, :k] = probs[p, :k]
            rank[i, :] = ranks[p] if ranks[p] < width else -1
        return q, rank


class RecordedAcceptance:
    """Replays recorded acceptance: simulated request ``rid`` of a category follows recorded
    sequence ``rid mod count`` of that category (any category if it has none), at its current
    output position. Nodes off the target's path reuse the position's confidences (the record
    holds only the target's path)."""

    def __init__(self, records: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]], name: str = "recorded"):
        self.name = name
        self.by_category: dict[str, list] = {}
        for (cat, _), seq in sorted(records.items()):
            self.by_category.setdefault(cat, []).append(seq)
        self.all = [s for seqs in self.by_category.values() for s in seqs]

    @classmethod
    def load(cls, path: str | Path) -> "RecordedAcceptance":
        return cls(load_records(path), name=f"recorded:{path}")

    def draft(self, requests: list[Request], shape: SpecShape, rng: np.random.Generator
              ) -> CandidateForest:
        seqs = []
        for r in requests:
            pool = self.by_category.get(r.category) or self.all
            seqs.append(pool[r.rid % len(pool)])
        positions = np.array([max(r.generated - 1, 0) for r in requests], np.int64)
        return grow_forest(_RecordedLevels(seqs, positions), len(requests), shape, rng)


def calibration_table(samples: int = 20000) -> list[dict]:
    """Chain speculation k = 4/6/8 under the built-in models vs Figure 12 (SPEC §6)."""
    rows = []
    for family, model in (("llama", LLAMA_ACCEPTANCE), ("qwen", QWEN_ACCEPTANCE)):
        for k, paper in FIG12_CHAIN[family].items():
            ours = mean_committed(model, SpecShape.chain(k), samples)
            rows.append({"model": family, "k": k, "paper": paper, "ours": ours,
                         "error_pct": 100 * (ours - paper) / paper})
    return rows


if __name__ == "__main__":
    for row in calibration_table():
        print(f"{row['model']:<6} chain k={row['k']}: paper {row['paper']:.2f}  "
              f"simulated {row['ours']:.2f}  ({row['error_pct']:+.1f}%)")

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
(``-1``: the target's token is not among them); and, from recordings since 2026-11-27, ``{"rid":
int, "category": str, "pos": int, "tree": int}``: the drafter grew ``tree`` non-root nodes when the
request's output was ``pos`` tokens long (engine/recorder.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Protocol

import numpy as np

from adaserve.core import jit
from adaserve.core.errors import UserError
from adaserve.core.request import Request
from adaserve.scheduling.plan import SpecShape
from adaserve.scheduling.trees import CandidateForest


class LevelSource(Protocol):
    def draws(self, frontiers: list[int], widths: list[int], rng: np.random.Generator,
              compiled: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Every level's children confidences ``q`` (n, F, W) and the target's rank (n, F), with
        F = sum(frontiers) and W = max(widths): level l's frontier nodes are the columns
        ``sum(frontiers[:l]) : sum(frontiers[:l + 1])`` and their children the first
        ``widths[l]`` confidences. A rank of -1 or >= widths[l]: no child is right. Random draws
        are made level by level, in order. ``compiled``: the caller runs the compiled path (a
        source may use compiled helpers then; the result must be the same)."""


def grow_forest(source: LevelSource, n: int, shape: SpecShape, rng: np.random.Generator
                ) -> CandidateForest:
    """Candidate trees of ``shape`` for ``n`` requests, with ground truth in ``extra["correct"]``.

    Request i owns nodes ``i*m:(i+1)*m`` (m = nodes per tree), level by level; a level's frontier
    is the previous level. This runs every simulated iteration on small arrays: the source draws
    every level at once, then the per-level loop (candidates, beam pruning, parents) runs as one
    compiled call (``kernels.grow``) or, without numba (``ADASERVE_NUMBA=0``), as a few numpy
    calls per level (``_grow_numpy``); both give the same arrays bit for bit."""
    lay = _layout(shape)
    compiled = jit.enabled()
    q, rank = source.draws(lay.frontiers, lay.widths, rng, compiled)
    if compiled:  # the kernel also says whether any node is impossible (drop_impossible's test)
        prob, ok, parent, token, depth, impossible = _kernels().grow(q, rank, lay.level_table,
                                                                     lay.node_table)
    else:
        (prob, ok, parent, token, depth), impossible = _grow_numpy(q, rank, lay), True
    forest = CandidateForest(offsets=np.arange(0, (n + 1) * lay.m, lay.m, dtype=np.int64),
                             parent=parent, token=token, prob=prob, depth=depth)
    forest.extra["correct"] = ok
    return drop_impossible(forest) if impossible else forest


@cache
def _kernels():
    """``adaserve.sim.kernels``, imported on first use (importing it imports numba); cached, as
    this runs a few times per simulated iteration."""
    from adaserve.sim import kernels
    return kernels


def _grow_numpy(q: np.ndarray, rank: np.ndarray, lay: "_Layout") -> tuple[np.ndarray, ...]:
    """``kernels.grow`` in numpy: each level is written straight into preallocated (n, m)
    arrays; parents and tokens come from the kept candidates' positions at the end."""
    n = len(q)
    prob = np.empty((n, lay.m))
    ok = np.empty((n, lay.m), bool)
    prob[:, 0], ok[:, 0] = 1.0, True
    pos = np.empty((n, lay.m), np.int64)  # a node's position among its level's candidates
    pos[:] = lay.pos
    for width, (lo, hi, new) in zip(lay.widths, lay.slices):
        c_prob = (prob[:, lo:hi, None] * q[:, lo:hi, :width]).reshape(n, -1)
        c_ok = (ok[:, lo:hi, None] & (_ranks(width) == rank[:, lo:hi, None])).reshape(n, -1)
        if c_prob.shape[1] == new.stop - new.start:
            prob[:, new], ok[:, new] = c_prob, c_ok
            continue
        # beam search: keep the best candidates (stable: ties keep the draft's order)
        keep = np.argsort(-c_prob, axis=1, kind="stable")[:, :new.stop - new.start]
        flat = keep + _ranks(n)[:, None] * c_prob.shape[1]
        prob[:, new], ok[:, new], pos[:, new] = c_prob.ravel()[flat], c_ok.ravel()[flat], keep
    up, token = np.divmod(pos, lay.width)  # candidate j*width + k: child k of frontier node j
    parent = up + lay.frontier_start
    parent[:, 1:] += np.arange(0, n * lay.m, lay.m)[:, None]  # local -> global; roots stay -1
    return prob.ravel(), ok.ravel(), parent.ravel(), token.ravel(), np.tile(lay.depth, n)


@dataclass(frozen=True)
class _Layout:
    """Where each level of a tree shape lives among a request's m local nodes (root = node 0)."""

    frontiers: list[int]         # per level: frontier nodes (the previous level's)
    widths: list[int]            # per level: children per frontier node
    slices: list[tuple]          # per level: (frontier start, frontier end, slice of its nodes)
    m: int
    depth: np.ndarray            # per node
    width: np.ndarray            # per node: its level's width (1 for the root)
    frontier_start: np.ndarray   # per node: first node of its parent's level (-1 for the root)
    pos: np.ndarray              # per node: its position among the level's candidates, unpruned
    level_table: np.ndarray      # per level: frontier start, frontier size, width, kept nodes
    node_table: np.ndarray       # per node: width, frontier_start, depth (for kernels.grow)


@cache
def _layout(shape: SpecShape) -> _Layout:
    sizes = shape.level_sizes()
    widths = list(shape.widths) if shape.is_static else [shape.width] * shape.depth
    frontiers = [1] + sizes[:-1]
    depth, width, start, pos, slices, lo = [0], [1], [-1], [0], [], 0
    for level, (f, w, size) in enumerate(zip(frontiers, widths, sizes)):
        slices.append((lo, lo + f, slice(lo + f, lo + f + size)))
        depth += [level + 1] * size
        width += [w] * size
        start += [lo] * size
        pos += range(size)
        lo += f
    table = [(lo, f, w, size) for (lo, _, _), f, w, size in zip(slices, frontiers, widths, sizes)]
    arrays = [np.array(a, np.int64) for a in (depth, width, start, pos)]
    arrays.append(np.array(table, np.int64).reshape(-1, 4))
    arrays.append(np.array([width, start, depth], np.int64).T.copy())
    for a in arrays:
        a.flags.writeable = False
    return _Layout(frontiers, widths, slices, 1 + sum(sizes), *arrays)


@cache
def _ranks(width: int) -> np.ndarray:
    """0..width-1, read-only (cached: this sits on the simulator's hot path)."""
    out = np.arange(width)
    out.flags.writeable = False
    return out


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


PAD_PROB = 1e-6  # path probability of a padding node: below any real draft, so selected last


def pad_trees(forest: CandidateForest, sizes: list[int]) -> CandidateForest:
    """Request ``i``'s tree grown to ``sizes[i]`` non-root nodes (-1 or no more than it has: as
    is) with children of its root that are never right (``extra`` arrays padded with zeros, so
    ``correct`` is False). The replay's trees come from the target's path alone; the engine's
    drafter also grew nodes off it (n-gram continuations of drafted tokens), and a static shape
    verifies every one. Which nodes those were is not recorded: only their number counts here (a
    step's price is by tokens; acceptance is decided on the target's path)."""
    have = np.diff(forest.offsets) - 1
    add = np.maximum(np.asarray(sizes, np.int64) - have, 0)
    if not add.any():
        return forest
    n = forest.n_requests
    new_size = have + 1 + add
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(new_size, out=offsets[1:])
    shift = offsets[:-1] - forest.offsets[:-1]  # where each request's old nodes move
    old_at = np.arange(forest.n_nodes) + np.repeat(shift, have + 1)
    pad_owner = np.repeat(np.arange(n), add)
    pad_at = offsets[pad_owner] + have[pad_owner] + 1 + np.arange(int(add.sum())) - np.repeat(np.cumsum(add) - add, add)

    def grown(values: np.ndarray, pad) -> np.ndarray:
        out = np.empty(offsets[-1], values.dtype)
        out[old_at], out[pad_at] = values, pad
        return out

    parent = np.where(forest.parent >= 0, forest.parent + np.repeat(shift, have + 1), -1)
    out = CandidateForest(offsets, grown(parent, offsets[pad_owner]), grown(forest.token, 0),
                          grown(forest.prob, PAD_PROB), grown(forest.depth, 1))
    out.extra = {k: grown(v, 0) for k, v in forest.extra.items()}
    return out


def accepted_lengths(forest: CandidateForest, selected: np.ndarray) -> np.ndarray:
    """Per request, the depth of the deepest selected node whose whole root path is selected and
    on the target's path: the tokens the target accepts (the bonus token not included).

    The target's path is a chain (``extra["correct"]``: a correct node's parent is correct, at most
    one per depth), so this is the deepest selected correct node, cut just above the shallowest
    correct node that is not selected."""
    correct = forest.extra["correct"]
    sel = np.asarray(selected, bool)
    if jit.enabled():
        return _kernels().accepted_lengths(correct, sel, forest.depth, forest.offsets)
    starts = forest.offsets[:-1]
    deepest = np.maximum.reduceat(np.where(sel & correct, forest.depth, 0), starts)
    first_gap = np.minimum.reduceat(np.where(correct & ~sel, forest.depth, _NO_GAP), starts)
    return np.maximum(np.minimum(deepest, first_gap - 1), 0)


_NO_GAP = np.iinfo(np.int64).max


def accepted_ends(forest: CandidateForest, selected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``accepted_lengths`` and ``accepted_nodes`` (one compiled pass, or the numpy twins)."""
    sel = np.asarray(selected, bool)
    if jit.enabled():
        return _kernels().accepted_ends(forest.extra["correct"], sel, forest.depth, forest.offsets)
    lengths = accepted_lengths(forest, sel)
    return lengths, accepted_nodes(forest, sel, lengths)


def accepted_nodes(forest: CandidateForest, selected: np.ndarray, accepted: np.ndarray) -> np.ndarray:
    """Per request, the forest index of the node its accepted path ends at (``accepted``, from
    ``accepted_lengths``): the selected node on the target's path at that depth, or the root. What
    the engine's verification reports by token ids, so that a policy learning from outcomes
    (``adaserve_plus``) learns the same in both executors."""
    correct = forest.extra["correct"]
    ends = forest.offsets[:-1].copy()
    owner = np.repeat(np.arange(forest.n_requests), np.diff(forest.offsets))
    at_end = (forest.depth == accepted[owner]) & (forest.depth > 0)
    hit = np.flatnonzero(np.asarray(selected, bool) & correct & at_end)
    ends[owner[hit]] = hit  # at most one correct node per depth
    return ends


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
    q = np.empty(top1.shape + (width,))
    q[..., 0] = top1
    q[..., 1:] = (1 - top1)[..., None] * _tail(width, rho)
    return q


@cache
def _tail(width: int, rho: float) -> np.ndarray:
    """(1 - rho) rho^(j-2) for ranks j = 2..width."""
    out = (1 - rho) * rho ** np.arange(width - 1)
    out.flags.writeable = False
    return out


def sample_rank(top1: np.ndarray, u: np.ndarray, rho: float) -> np.ndarray:
    """The target's rank among the draft's children, drawn from the calibrated distribution with
    the uniform draws ``u`` (same shape as ``top1``)."""
    v = np.minimum(np.maximum((u - top1) / np.maximum(1 - top1, 1e-12), 0), 1 - 1e-12)  # clip
    rank = 1 + np.floor(np.log1p(-v) / math.log(rho)).astype(np.int64)
    return np.where(u < top1, 0, rank)


@dataclass
class _SyntheticLevels:
    level_logit: np.ndarray          # (n, 1): per-(request, step) logit level
    sigma: np.ndarray | float        # (n, 1) or one for all: per-node logit noise
    rho: float

    def draws(self, frontiers: list[int], widths: list[int], rng: np.random.Generator,
              compiled: bool = False):
        width = max(widths, default=1)
        normal, uniform = _standard_draws(rng, len(self.level_logit), frontiers)
        if compiled:  # the arithmetic in compiled loops; exp and log1p stay numpy's
            kernels = _kernels()
            sigma = (self.sigma if isinstance(self.sigma, np.ndarray)
                     else np.full(self.level_logit.shape, self.sigma))
            top1 = np.exp(kernels.negative_logit(self.level_logit, sigma, normal))
            log1p_arg = np.log1p(kernels.top1_and_rank_log_arg(top1, uniform))
            return kernels.confidences_and_ranks(top1, uniform, log1p_arg, math.log(self.rho),
                                                 _tail(width, self.rho))
        top1 = 1 / (1 + np.exp(-(self.level_logit + self.sigma * normal)))
        return child_confidences(top1, width, self.rho), sample_rank(top1, uniform, self.rho)


def _standard_draws(rng: np.random.Generator, n: int, frontiers: list[int]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per level, the nodes' logit noise (n, f) and then the target's rank draws (n, f), stacked
    by level into (n, F) arrays."""
    normal, uniform = [], []
    for f in frontiers:
        normal.append(rng.standard_normal((n, f)))
        uniform.append(rng.random((n, f)))
    return np.concatenate(normal, 1), np.concatenate(uniform, 1)


@dataclass
class SyntheticAcceptance:
    default: AcceptanceParams
    per_category: dict[str, AcceptanceParams] = field(default_factory=dict)
    name: str = "synthetic"

    def params_for(self, category: str) -> AcceptanceParams:
        return self.per_category.get(category, self.default)

    def draft(self, requests: list[Request], shape: SpecShape, rng: np.random.Generator
              ) -> CandidateForest:
        if self.per_category:
            params = [self.params_for(r.category) for r in requests]
            mu, tau, sigma = np.array([(p.mu, p.tau, p.sigma) for p in params]).T
            sigma, rho = sigma[:, None], params[0].rho  # rho: the first request's (one per batch)
        else:  # one parameter set: scalars broadcast to the same values, without the arrays
            mu, tau, sigma, rho = (self.default.mu, self.default.tau, self.default.sigma,
                                   self.default.rho)
        level_logit = mu + tau * rng.standard_normal(len(requests))
        levels = _SyntheticLevels(level_logit[:, None], sigma, rho)
        return grow_forest(levels, len(requests), shape, rng)


# Calibrated against Figure 12's chain values (docs/definitions.md §8); see docs/simulator.md for the table and
# `python -m adaserve.sim.acceptance` for the command that prints it.
LLAMA_ACCEPTANCE = SyntheticAcceptance(AcceptanceParams(mu=3.0, tau=3.5, sigma=0.5, rho=0.5),
                                       name="llama-3.1-70b/llama-3.2-1b (synthetic)")
QWEN_ACCEPTANCE = SyntheticAcceptance(AcceptanceParams(mu=2.0, tau=3.5, sigma=0.5, rho=0.5),
                                      name="qwen2.5-32b/qwen2.5-0.5b (synthetic)")
FIG12_CHAIN = {"llama": {4: 3.37, 6: 5.0, 8: 6.6}, "qwen2": {4: 2.97, 6: 4.36, 8: 5.73}}


# By the target's model_type (a latency profile's ``family``).
ACCEPTANCE: dict[str, SyntheticAcceptance] = {"llama": LLAMA_ACCEPTANCE, "qwen2": QWEN_ACCEPTANCE}


def acceptance_for(family: str | None) -> SyntheticAcceptance:
    """The calibrated model of a model family; Llama's for any other (or unknown) family."""
    return ACCEPTANCE.get(family or "llama", LLAMA_ACCEPTANCE)


def mean_committed(model, shape: SpecShape, samples: int = 20000, seed: int = 0,
                   category: str = "chat") -> float:
    """Mean tokens committed per step (accepted + bonus) when every drafted node is verified."""
    reqs = [Request(i, 0.0, 1, 1, 1.2, 30.0, category) for i in range(samples)]
    forest = model.draft(reqs, shape, np.random.default_rng(seed))
    return float(np.mean(accepted_lengths(forest, np.ones(forest.n_nodes, bool)) + 1))


# ------------------------------------------------------------------------------- recorded model

class AcceptanceRecordError(UserError):
    pass


def record_lines(path: Path):
    """(where, object) of every non-blank line of a recording; ``AcceptanceRecordError`` names the
    file and line of one that cannot be read or is not a JSON object."""
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
        except json.JSONDecodeError as e:
            raise AcceptanceRecordError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(d, dict):
            raise AcceptanceRecordError(f"{where}: not a JSON object")
        yield where, d


def load_records(path: str | Path, by_position: bool = False
                 ) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """Recorded JSONL → {(category, rid): (probs (positions, K), rank (positions,))}, positions
    sorted. ``by_position``: row ``pos`` holds the record of output position ``pos``, and a
    position without a record (the drafter never expanded a node there) reads as a miss (probs 0,
    rank -1). Tree-size lines are skipped (``load_tree_sizes``). Raises ``AcceptanceRecordError``
    naming the file, line and field."""
    rows: dict[tuple[str, int], list[tuple[int, list[float], int]]] = {}
    path = Path(path)
    for where, d in record_lines(path):
        if "tree" in d or "output" in d:
            continue
        try:
            key, pos = (str(d["category"]), int(d["rid"])), int(d["pos"])
            probs, rank = [float(p) for p in d["probs"]], int(d["rank"])
        except (KeyError, TypeError, ValueError) as e:
            raise AcceptanceRecordError(f"{where}: needs rid, category, pos, probs, rank ({e!r})") from None
        if not probs or not all(0 <= p <= 1 for p in probs) or not -1 <= rank < len(probs):
            raise AcceptanceRecordError(f"{where}: probs must be in [0, 1] and rank in [-1, len(probs))")
        if pos < 0:
            raise AcceptanceRecordError(f"{where}: pos must be >= 0 (0 is the prefill's token)")
        rows.setdefault(key, []).append((pos, probs, rank))
    if not rows:
        raise AcceptanceRecordError(f"acceptance records '{path}': no records")
    out = {}
    for key, rs in rows.items():
        rs.sort(key=lambda x: x[0])
        k = max(len(p) for _, p, _ in rs)
        if by_position:
            out[key] = _dense_by_position(rs, k)
            continue
        probs = np.array([p + [0.0] * (k - len(p)) for _, p, _ in rs])
        out[key] = (probs, np.array([r for _, _, r in rs], np.int64))
    return out


def load_tree_sizes(path: str | Path) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """The recording's tree-size lines → {(category, rid): (pos ascending, non-root nodes)}; empty
    for a recording without them (made before they were written)."""
    rows: dict[tuple[str, int], dict[int, int]] = {}
    for where, d in record_lines(Path(path)):
        if "tree" not in d:
            continue
        try:
            key, pos, nodes = (str(d["category"]), int(d["rid"])), int(d["pos"]), int(d["tree"])
        except (KeyError, TypeError, ValueError) as e:
            raise AcceptanceRecordError(f"{where}: needs rid, category, pos, tree ({e!r})") from None
        if pos < 0 or nodes < 0:
            raise AcceptanceRecordError(f"{where}: pos and tree must be >= 0")
        rows.setdefault(key, {})[pos] = nodes  # a position drafted twice (a capped step): the last
    return {key: (np.array(sorted(r), np.int64), np.array([r[p] for p in sorted(r)], np.int64))
            for key, r in rows.items()}


def load_tree_confidences(path: str | Path) -> dict[tuple[str, int], dict[int, np.ndarray]]:
    """The recording's tree lines that carry their nodes' confidences (``conf``, written since
    2026-11-27 night) → {(category, rid): {pos: the tree's confidences, descending}}; empty for a
    recording without them."""
    rows: dict[tuple[str, int], dict[int, np.ndarray]] = {}
    for where, d in record_lines(Path(path)):
        if "conf" not in d:
            continue
        try:
            key, pos = (str(d["category"]), int(d["rid"])), int(d["pos"])
            conf = np.array(sorted((float(c) for c in d["conf"]), reverse=True), np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise AcceptanceRecordError(f"{where}: conf needs rid, category, pos and a list of numbers "
                                        f"({e!r})") from None
        if not np.all((conf >= 0) & (conf <= 1)):
            raise AcceptanceRecordError(f"{where}: conf values must be in [0, 1]")
        rows.setdefault(key, {})[pos] = conf
    return rows


def with_confidences(forest: CandidateForest, confs: list[np.ndarray | None]) -> CandidateForest:
    """Request ``i``'s non-root nodes given the recorded confidences ``confs[i]`` (descending) in
    the order of their own (stable, best first); nodes beyond the recording keep their own, capped
    at its smallest. Order-preserving, so a child stays at most its parent. Why: the replay grows
    its trees from the target's path, whose drafter distribution at a position is what the drafter
    saw in the *true* context; the engine's drafter expands its own drafted tokens, and its nodes
    off the path (a confident wrong continuation) are what the selection takes too. Their number
    is padded in (``pad_trees``); their confidences come from here."""
    if not any(c is not None and len(c) for c in confs):
        return forest
    prob = forest.prob.copy()
    for i, conf in enumerate(confs):
        lo, hi = int(forest.offsets[i]) + 1, int(forest.offsets[i + 1])
        if conf is None or not len(conf) or hi <= lo:
            continue
        idx = lo + np.argsort(-forest.prob[lo:hi], kind="stable")
        k = min(len(conf), len(idx))
        prob[idx[:k]] = conf[:k]
        prob[idx[k:]] = np.minimum(forest.prob[idx[k:]], conf[k - 1])
    out = CandidateForest(forest.offsets, forest.parent, forest.token, prob, forest.depth)
    out.extra = forest.extra
    return out


def _dense_by_position(rows: list[tuple[int, list[float], int]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """One request's records (sorted by pos) as arrays indexed by pos; missing positions: misses."""
    probs = np.zeros((rows[-1][0] + 1, k))
    rank = np.full(len(probs), -1, np.int64)
    for pos, p, r in rows:
        probs[pos, :len(p)], rank[pos] = p, r
    return probs, rank


@dataclass
class _RecordedLevels:
    sequences: list[tuple[np.ndarray, np.ndarray]]  # per request: (probs, rank) indexed by pos
    positions: np.ndarray                            # per request: pos of the first level's token

    def draws(self, frontiers: list[int], widths: list[int], rng: np.random.Generator,
              compiled: bool = False):
        n, lo = len(self.sequences), 0
        q = np.zeros((n, sum(frontiers), max(widths, default=1)))
        rank = np.full((n, sum(frontiers)), -1, np.int64)
        for level, (f, w) in enumerate(zip(frontiers, widths)):
            for i, (probs, ranks) in enumerate(self.sequences):
                p = (self.positions[i] + level) % len(ranks)
                k = min(w, probs.shape[1])
                q[i, lo:lo + f, :k] = probs[p, :k]
                rank[i, lo:lo + f] = ranks[p] if ranks[p] < w else -1
            lo += f
        return q, rank


class RecordedAcceptance:
    """Replays recorded acceptance. A simulated request follows the record of the same
    (category, rid) — the engine's own request when the simulator replays the engine's requests
    (``adaserve.sim.compare.records_of_result``) — or, for a request the records do not hold,
    recorded sequence ``rid mod count`` of its category (any category if it has none). The level-1
    token of a request that has generated ``g`` tokens is output position ``g`` (the record's
    ``pos``: 0 is the prefill's token), level ``l`` reads position ``g + l - 1``; positions past
    the end wrap around. Nodes off the target's path reuse the position's confidences (the record
    holds only the target's path); where the recording holds the engine's node confidences for
    the draft, the tree's nodes take those instead (``with_confidences``)."""

    def __init__(self, records: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]], name: str = "recorded",
                 trees: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] | None = None,
                 confidences: dict[tuple[str, int], dict[int, np.ndarray]] | None = None):
        """``records``: as ``load_records(..., by_position=True)`` (row = output position);
        ``trees``: as ``load_tree_sizes`` (none: trees are not padded); ``confidences``: as
        ``load_tree_confidences`` (none: the nodes keep the replay's own)."""
        self.name = name
        self.trees = dict(trees or {})
        self.confidences = dict(confidences or {})
        self.by_key = dict(records)
        self.by_category: dict[str, list] = {}
        for (cat, _), seq in sorted(records.items()):
            self.by_category.setdefault(cat, []).append(seq)
        self.all = [s for seqs in self.by_category.values() for s in seqs]

    @classmethod
    def load(cls, path: str | Path) -> "RecordedAcceptance":
        return cls(load_records(path, by_position=True), name=f"recorded:{path}", trees=load_tree_sizes(path),
                   confidences=load_tree_confidences(path))

    def sequence(self, request: Request) -> tuple[np.ndarray, np.ndarray]:
        """The recorded (probs, rank) that ``request`` follows."""
        own = self.by_key.get((request.category, request.rid))
        if own is not None:
            return own
        pool = self.by_category.get(request.category) or self.all
        return pool[request.rid % len(pool)]

    def draft(self, requests: list[Request], shape: SpecShape, rng: np.random.Generator
              ) -> CandidateForest:
        seqs = [self.sequence(r) for r in requests]
        positions = np.array([r.generated for r in requests], np.int64)
        forest = grow_forest(_RecordedLevels(seqs, positions), len(requests), shape, rng)
        if not self.trees:
            return forest
        most = sum(shape.level_sizes())  # the engine drafted with this request's shape then
        forest = pad_trees(forest, [min(self.tree_size(r), most) for r in requests])
        return with_confidences(forest, [self.tree_confidences(r) for r in requests])

    def tree_confidences(self, request: Request) -> np.ndarray | None:
        """The node confidences of the draft ``tree_size`` reads; None where it recorded none."""
        key = (request.category, request.rid)
        pos = self._draft_pos(key, request.generated)
        return None if pos is None else self.confidences.get(key, {}).get(pos)

    def tree_size(self, request: Request) -> int:
        """The non-root nodes the engine's drafter grew for this request at its latest recorded
        draft at or before its current output length (the replay's steps need not fall on the
        engine's), or its first draft when none is that early; -1 without any."""
        key = (request.category, request.rid)
        pos = self._draft_pos(key, request.generated)
        if pos is None:
            return -1
        positions, sizes = self.trees[key]
        return int(sizes[int(np.searchsorted(positions, pos))])

    def _draft_pos(self, key: tuple[str, int], generated: int) -> int | None:
        rec = self.trees.get(key)
        if rec is None:
            return None
        i = int(np.searchsorted(rec[0], generated, side="right")) - 1
        return int(rec[0][max(i, 0)])


def calibration_table(samples: int = 20000) -> list[dict]:
    """Chain speculation k = 4/6/8 under the built-in models vs Figure 12 (docs/definitions.md §8)."""
    rows = []
    for family, model in ACCEPTANCE.items():
        for k, paper in FIG12_CHAIN[family].items():
            ours = mean_committed(model, SpecShape.chain(k), samples)
            rows.append({"model": family, "k": k, "paper": paper, "ours": ours,
                         "error_pct": 100 * (ours - paper) / paper})
    return rows


if __name__ == "__main__":
    for row in calibration_table():
        print(f"{row['model']:<6} chain k={row['k']}: paper {row['paper']:.2f}  "
              f"simulated {row['ours']:.2f}  ({row['error_pct']:+.1f}%)")

"""Candidate token trees of a batch of requests, held as flat arrays (no per-node objects).

Request ``i`` owns nodes ``offsets[i]:offsets[i+1]``; its first node is the root (the last
committed token, path probability 1, depth 0, parent -1). Nodes of a request are stored
parents-before-children; ``parent`` holds global indices. ``prob`` is the path probability
f̂(v) = product of draft probabilities from the root to v.

Executors may attach private per-node payload in ``extra`` (e.g. the simulator's ground truth),
which the scheduler never reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class CandidateForest:
    offsets: np.ndarray  # int64, n_requests + 1
    parent: np.ndarray   # int64, global index of the parent, -1 for roots
    token: np.ndarray    # int64
    prob: np.ndarray     # float64 path probability
    depth: np.ndarray    # int64
    extra: dict = field(default_factory=dict)

    @property
    def n_requests(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_nodes(self) -> int:
        return len(self.parent)

    @property
    def roots(self) -> np.ndarray:
        return self.offsets[:-1]

    def verifies_drafted(self, selected: np.ndarray) -> bool:
        """Whether the selection ``selected`` (a mask over the nodes) holds a drafted, non-root node:
        what the host rows of a profile tell apart (``LatencyProfile.host_ms(..., tree=...)``)."""
        sel = np.asarray(selected, bool)
        return bool(sel.any()) and int(sel.sum()) > int(sel[self.roots].sum())

    @property
    def owner(self) -> np.ndarray:
        """Request index of every node."""
        return np.repeat(np.arange(self.n_requests), np.diff(self.offsets))

    @classmethod
    def roots_only(cls, n: int, tokens: np.ndarray | None = None) -> "CandidateForest":
        idx = np.arange(n + 1, dtype=np.int64)
        return cls(idx, np.full(n, -1, np.int64),
                   np.zeros(n, np.int64) if tokens is None else np.asarray(tokens, np.int64),
                   np.ones(n), np.zeros(n, np.int64))

    @classmethod
    def from_lists(cls, trees: list[list[tuple[int, int, float]]]) -> "CandidateForest":
        """Build from per-request lists of (local parent, token, path prob) for non-root nodes,
        local indices counting the root as 0. Handy for tests and small examples."""
        offsets, parent, token, prob, depth = [0], [], [], [], []
        for tree in trees:
            base = offsets[-1]
            local_depth = [0]
            parent.append(-1), token.append(0), prob.append(1.0), depth.append(0)
            for p, t, f in tree:
                if not 0 <= p < len(local_depth):
                    raise ValueError(f"parent {p} must precede its child")
                parent.append(base + p), token.append(t), prob.append(f)
                local_depth.append(local_depth[p] + 1)
                depth.append(local_depth[-1])
            offsets.append(base + len(tree) + 1)
        return cls(np.array(offsets, np.int64), np.array(parent, np.int64),
                   np.array(token, np.int64), np.array(prob, np.float64), np.array(depth, np.int64))

    def check(self) -> None:
        """Raise if the structural invariants do not hold."""
        n = self.n_nodes
        for name in ("parent", "token", "prob", "depth"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, expected {n}")
        if self.offsets[0] != 0 or self.offsets[-1] != n or np.any(np.diff(self.offsets) < 1):
            raise ValueError("offsets must start at 0, end at n_nodes and give every request a root")
        roots = self.roots
        if np.any(self.parent[roots] != -1) or np.any(self.depth[roots] != 0):
            raise ValueError("the first node of every request must be a root")
        nonroot = np.ones(n, bool)
        nonroot[roots] = False
        idx = np.flatnonzero(nonroot)
        par = self.parent[idx]
        if np.any(par < 0) or np.any(par >= idx):
            raise ValueError("every non-root node needs an earlier parent")
        if np.any(self.owner[par] != self.owner[idx]):
            raise ValueError("a parent belongs to another request")
        if np.any(self.depth[idx] != self.depth[par] + 1):
            raise ValueError("depth must be parent depth + 1")


def is_connected(forest: CandidateForest, selected: np.ndarray) -> bool:
    """Every selected node's parent is selected, and every root is selected."""
    sel = np.asarray(selected, bool)
    if not sel[forest.roots].all():
        return False
    idx = np.flatnonzero(sel & (forest.parent >= 0))
    return bool(sel[forest.parent[idx]].all())

"""What a policy decides each iteration, and what it sees when deciding."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from adaserve.core.profile import LatencyProfile
from adaserve.core.request import Request
from adaserve.scheduling.trees import CandidateForest


@dataclass(frozen=True)
class SpecShape:
    """How the drafter grows candidate trees this iteration.

    ``depth == 0``: no speculation (incremental decoding: the root only).
    ``widths`` empty: beam search (docs/definitions.md §4, step 3) keeping the ``width``
    highest-f̂ nodes per level.
    ``widths`` given: a static tree, each node at level ``l`` expanded with its top ``widths[l]``
    children (``(1,)*k`` is chain speculation with k tokens).
    """

    depth: int = 0
    width: int = 1
    widths: tuple[int, ...] = ()

    @classmethod
    def chain(cls, k: int) -> "SpecShape":
        return cls(depth=k, width=1, widths=(1,) * k)

    @classmethod
    def static(cls, widths: tuple[int, ...]) -> "SpecShape":
        return cls(depth=len(widths), width=max(widths), widths=tuple(widths))

    @property
    def speculative(self) -> bool:
        return self.depth > 0

    @property
    def is_static(self) -> bool:
        return bool(self.widths)

    def level_sizes(self) -> list[int]:
        """Nodes per level (excluding the root) of one request's candidate tree."""
        if self.is_static:
            sizes, frontier = [], 1
            for w in self.widths:
                frontier *= w
                sizes.append(frontier)
            return sizes
        return [self.width] * self.depth

    def nodes_per_request(self) -> int:
        """Candidate nodes per request including the root."""
        return 1 + sum(self.level_sizes())

    def draft_tokens_per_step(self, n_requests: int) -> list[int]:
        """Tokens the draft model processes at each of its ``depth`` forward steps."""
        if not self.speculative:
            return []
        return [n_requests] + [n_requests * s for s in self.level_sizes()[:-1]]


@dataclass
class Plan:
    prefill: list[tuple[Request, int]] = field(default_factory=list)  # (request, chunk tokens)
    decode: list[Request] = field(default_factory=list)
    shape: SpecShape = SpecShape()


@dataclass
class Selection:
    selected: np.ndarray          # bool per forest node; roots always True
    budget: int                   # verification tokens the policy allowed (roots included)
    predicted_ms: float           # predicted time of this iteration (draft + target step)


@dataclass
class IterationView:
    """The state a policy sees. Lists are the iteration's own; policies must not mutate requests."""

    now_ms: float
    waiting: list[Request]        # arrived, prefill not finished (FIFO)
    running: list[Request]        # decoding
    latency: LatencyProfile
    kv_free_tokens: int

    @property
    def limits(self):
        return self.latency.limits


class Policy(Protocol):
    name: str

    def plan(self, view: IterationView) -> Plan:
        """Admission, prefill chunks, which requests decode, and the speculation shape."""

    def select(self, plan: Plan, forest: CandidateForest, view: IterationView) -> Selection:
        """Which candidate nodes the target verifies this iteration."""

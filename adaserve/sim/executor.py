"""An ``Executor`` whose clock is advanced by a latency profile and whose verification outcome is
decided by an acceptance model (the simulated drafter's hidden ground truth)."""

from __future__ import annotations

import numpy as np

from adaserve.core.profile import LatencyProfile
from adaserve.core.request import Request
from adaserve.iteration import StepOutput
from adaserve.scheduling.plan import SpecShape
from adaserve.scheduling.trees import CandidateForest
from adaserve.sim.acceptance import accepted_lengths


class SimExecutor:
    def __init__(self, latency: LatencyProfile, acceptance, seed: int = 0,
                 kv_capacity_tokens: int | None = None, draft_prefill: bool = False):
        """``draft_prefill``: the system runs a draft model, which must also prefill every prompt
        chunk (one draft forward over the chunk tokens after the target's step)."""
        self.latency = latency
        self.draft_prefill = draft_prefill
        self.acceptance = acceptance
        self.rng = np.random.default_rng(seed)
        self.kv_capacity_tokens = kv_capacity_tokens or latency.limits.kv_capacity_tokens
        self.clock = 0.0

    def now(self) -> float:
        return self.clock

    def wait_until(self, t_ms: float) -> None:
        self.clock = max(self.clock, t_ms)

    def speculate(self, requests: list[Request], shape: SpecShape) -> CandidateForest:
        forest = self.acceptance.draft(requests, shape, self.rng)
        steps = shape.draft_tokens_per_step(len(requests))
        ctx = sum(r.context_len for r in requests)
        self.clock += float(np.sum(self.latency.draft_ms(np.asarray(steps, np.float64), ctx)))
        return forest

    def execute(self, prefill: list[tuple[Request, int]], decode: list[Request],
                forest: CandidateForest, selected: np.ndarray, max_commit: np.ndarray) -> StepOutput:
        prefill_tokens = sum(c for _, c in prefill)
        if decode:
            ctx = sum(r.context_len for r in decode) + sum(r.prefilled for r, _ in prefill)
            self.clock += float(self.latency.verify_ms(prefill_tokens + int(selected.sum()), ctx))
            if forest.n_nodes > forest.n_requests:
                committed = accepted_lengths(forest, selected) + 1
            else:
                committed = np.ones(len(decode), np.int64)
            committed = np.minimum(committed, max_commit)
        else:
            ctx = sum(r.prefilled for r, _ in prefill)
            self.clock += float(self.latency.prefill_ms(prefill_tokens, ctx))
            committed = np.zeros(0, np.int64)
        if self.draft_prefill and prefill_tokens:
            self.clock += float(self.latency.draft_ms(prefill_tokens,
                                                      sum(r.prefilled for r, _ in prefill)))
        completes = sum(1 for r, c in prefill if r.prefilled + c >= r.input_len)
        return StepOutput(committed, np.zeros(len(decode), bool), [False] * completes)

    def release(self, request: Request) -> None:
        pass

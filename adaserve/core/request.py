"""A request's identity, SLO and progress. Times are milliseconds on the executor's clock."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

#: TTFT SLO (ms) of a request that gives none, by category (docs/adaserve_plus.md); other
#: categories get ``DEFAULT_TTFT_SLO_MS``, best-effort requests none.
TTFT_SLO_MS_BY_CATEGORY = {"coding": 1000.0, "chat": 1000.0, "summarization": 4000.0}
DEFAULT_TTFT_SLO_MS = 4000.0


class Phase(str, Enum):
    PENDING = "pending"      # not yet arrived
    WAITING = "waiting"      # arrived, prefill not finished
    DECODING = "decoding"    # prefill done, generating
    FINISHED = "finished"
    REJECTED = "rejected"    # cannot be served (e.g. prompt longer than the maximum sequence length)
    CANCELLED = "cancelled"  # withdrawn by its client (e.g. a disconnected stream)


@dataclass(eq=False)
class Request:
    rid: int
    arrival_ms: float
    input_len: int
    max_new_tokens: int
    slo_ratio: float
    slo_ms: float                       # math.inf for best effort
    category: str
    prompt: str = ""
    slo_ttft_ms: float | None = None    # TTFT SLO; None: the category's default (ttft_slo)
    phase: Phase = Phase.PENDING
    prefilled: int = 0                  # prompt tokens whose KV is computed
    generated: int = 0                  # decode_length: includes the token produced by prefill
    steps: int = 0                      # verification steps this request took part in
    admitted_ms: float | None = None    # first scheduled (prefill started)
    first_decode_ms: float | None = None  # prefill finished: t0 (docs/definitions.md §4)
    first_token_ms: float | None = None
    finish_ms: float | None = None
    finish_reason: str | None = None    # "length", "eos", "max_seq_len", "error", or a rejection reason
    error: str | None = None            # why the engine ended it (finish_reason "error")
    token_times_ms: list[float] = field(default_factory=list)  # time of each commit (for ITL; one per step, not per token)

    @property
    def context_len(self) -> int:
        """Tokens whose KV the request holds once prefill is done (prompt + generated but the last)."""
        return self.prefilled + max(self.generated - 1, 0)

    @property
    def remaining_prefill(self) -> int:
        return self.input_len - self.prefilled

    @property
    def remaining_tokens(self) -> int:
        return self.max_new_tokens - self.generated

    @property
    def decode_latency_ms(self) -> float | None:
        if self.finish_ms is None or self.first_decode_ms is None:
            return None
        return self.finish_ms - self.first_decode_ms

    @property
    def ttft_slo(self) -> float:
        """The TTFT SLO in ms: the request's own, else its category's default (inf for best effort)."""
        if self.slo_ttft_ms is not None:
            return self.slo_ttft_ms
        if math.isinf(self.slo_ms):
            return math.inf
        return TTFT_SLO_MS_BY_CATEGORY.get(self.category, DEFAULT_TTFT_SLO_MS)

    @property
    def ttft_deadline_ms(self) -> float:
        return self.arrival_ms + self.ttft_slo

    @property
    def ttft_attained(self) -> bool:
        """The first token came within the TTFT SLO (docs/adaserve_plus.md, "TTFT SLOs")."""
        if self.first_token_ms is None:
            return False
        return self.first_token_ms - self.arrival_ms <= self.ttft_slo

    @property
    def attained(self) -> bool:
        """docs/definitions.md §3: decode_latency <= slo_ms * decode_length (true without an SLO)."""
        lat = self.decode_latency_ms
        if lat is None:
            return False
        return lat <= self.slo_ms * self.generated


# ---- per-request latencies (docs/definitions.md §3; core/metrics.py aggregates them) -------------

def ttft_ms(r: Request) -> float | None:
    """Time to first token: first token − arrival (queueing and prefill included)."""
    return None if r.first_token_ms is None else r.first_token_ms - r.arrival_ms


def tpot_ms(r: Request) -> float | None:
    """Time per output token after the first: (finish − first token) / (generated − 1)."""
    if r.finish_ms is None or r.first_token_ms is None or r.generated <= 1:
        return None
    return (r.finish_ms - r.first_token_ms) / (r.generated - 1)


def itls_ms(r: Request) -> list[float]:
    """Inter-token latencies as a streaming client sees them: the gaps between consecutive commits.
    Tokens committed in the same step share a timestamp and arrive as one chunk, so zero gaps are
    not latencies (vLLM's ``bench serve`` also measures ITL per streamed chunk)."""
    return itl_gaps(r).tolist()


def itl_gaps(r: Request) -> np.ndarray:
    """``itls_ms`` as an array."""
    gaps = np.diff(np.asarray(r.token_times_ms, dtype=float))
    return gaps[gaps > 0]

"""Finished requests reduced to the numbers a run's summary needs (``metrics.summarize``).

Why: a simulation of a long trace must not keep every ``Request`` (with one commit time per step)
until the end. A ``Tally`` takes each request as it leaves the system and keeps a few numbers per
request in typed arrays (about 55 bytes), and the inter-token latencies as distinct values with
their counts (``ValueCounts``): all the requests of a step share its gap, so there are about as
many distinct gaps as iterations, not as tokens. A run that holds its requests anyway (the engine,
the HTTP benchmark) tallies them at the end (``Tally.of``): one summary code path for both.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable

import numpy as np

from adaserve.core.request import Phase, Request, itl_gaps, tpot_ms, ttft_ms

NAN = math.nan
# a request's phase in the columns
FINISHED, REJECTED, OTHER = 0, 1, 2  # OTHER: neither finished nor rejected (unfinished, cancelled)
PHASE_CODE = {Phase.FINISHED: FINISHED, Phase.REJECTED: REJECTED}


class ValueCounts:
    """A multiset of floats as sorted distinct values and counts, with the statistics numpy gives
    for the whole list: ``percentile`` (linear interpolation) and ``median`` equal numpy's bit for
    bit; ``mean`` and ``std`` differ from numpy's sums by rounding only (another summation order).

    Values are appended to a buffer and merged into the distinct ones when the buffer outgrows
    them (and at least ``MERGE_AT`` values): memory stays within a few times the distinct count."""

    MERGE_AT = 1 << 20

    def __init__(self) -> None:
        self._values = np.zeros(0)
        self._counts = np.zeros(0, np.int64)
        self._buffer = array("d")

    def add(self, values: np.ndarray) -> None:
        self._buffer.frombytes(np.ascontiguousarray(values, dtype=np.float64).tobytes())
        if len(self._buffer) >= max(self.MERGE_AT, len(self._values)):
            self._merge()

    def _merge(self) -> None:
        if not self._buffer:
            return
        new, counts = np.unique(np.frombuffer(self._buffer, dtype=np.float64), return_counts=True)
        self._buffer = array("d")
        values = np.concatenate([self._values, new])
        self._values, inverse = np.unique(values, return_inverse=True)
        self._counts = np.bincount(inverse, weights=np.concatenate([self._counts, counts]),
                                   minlength=len(self._values)).astype(np.int64)

    def distinct(self) -> tuple[np.ndarray, np.ndarray]:
        """The sorted distinct values and their counts."""
        self._merge()
        return self._values, self._counts

    @property
    def count(self) -> int:
        return int(self._counts.sum()) + len(self._buffer)

    def _at(self, ranks: np.ndarray) -> np.ndarray:
        """The values at these 0-based ranks of the sorted list."""
        values, counts = self.distinct()
        return values[np.searchsorted(np.cumsum(counts), ranks, side="right")]

    def percentile(self, q: float) -> float:
        """``np.percentile(all_values, q)`` (method "linear")."""
        n = self.count
        h = (q / 100.0) * (n - 1)
        lo = math.floor(h)
        a, b = self._at(np.array([lo, min(lo + 1, n - 1)]))
        t = h - lo
        return float(b - (b - a) * (1 - t)) if t >= 0.5 else float(a + (b - a) * t)  # numpy's _lerp

    def median(self) -> float:
        """``np.median(all_values)``: the middle value, or the mean of the middle two."""
        n = self.count
        a, b = self._at(np.array([(n - 1) // 2, n // 2]))
        return float(np.mean([a, b]))

    def mean(self) -> float:
        values, counts = self.distinct()
        return float(np.dot(values, counts) / counts.sum())

    def std(self) -> float:
        """Population standard deviation (numpy's default)."""
        values, counts = self.distinct()
        return float(np.sqrt(np.dot((values - self.mean()) ** 2, counts) / counts.sum()))


class Tally:
    """Per request (``add``): rid, category, phase, whether it attained its SLO and its TTFT SLO,
    output and prompt tokens, TTFT, TPOT and decode latency (NaN for none); per run: the first
    admission, the last finish, the rejected requests and the finished requests' inter-token
    latencies."""

    def __init__(self) -> None:
        self.categories: dict[str, int] = {}
        self._rid, self._cat, self._phase = array("q"), array("h"), array("b")
        self._attained, self._ttft_ok = array("b"), array("b")
        self._generated, self._input_len = array("q"), array("q")
        self._ttft, self._tpot, self._decode = array("d"), array("d"), array("d")
        self.first_admitted = math.inf
        self.last_finish = -math.inf
        self.rejected: list[dict] = []
        self.itls = ValueCounts()

    @classmethod
    def of(cls, requests: Iterable[Request]) -> Tally:
        tally = cls()
        for r in requests:
            tally.add(r)
        return tally

    def __len__(self) -> int:
        return len(self._rid)

    def add(self, r: Request) -> None:
        phase = PHASE_CODE.get(r.phase, OTHER)
        cat = self.categories.setdefault(r.category, len(self.categories))
        done = phase == FINISHED
        self._rid.append(r.rid)
        self._cat.append(cat)
        self._phase.append(phase)
        self._attained.append(done and r.attained)
        self._ttft_ok.append(done and r.ttft_attained)
        self._generated.append(r.generated)
        self._input_len.append(r.input_len)
        for col, v in ((self._ttft, ttft_ms(r)), (self._tpot, tpot_ms(r)), (self._decode, r.decode_latency_ms)):
            col.append(NAN if v is None else v)
        if r.admitted_ms is not None:
            self.first_admitted = min(self.first_admitted, r.admitted_ms)
        if done:
            if r.finish_ms is not None:
                self.last_finish = max(self.last_finish, r.finish_ms)
            self.itls.add(itl_gaps(r))
        elif phase == REJECTED:
            self.rejected.append({"rid": r.rid, "category": r.category, "reason": r.finish_reason or "unknown"})

    def columns(self) -> dict[str, np.ndarray]:
        """Every per-request column as an array, rows in rid order."""
        order = np.argsort(np.frombuffer(self._rid, np.int64), kind="stable") if len(self) else np.zeros(0, np.int64)
        cols = {"cat": (self._cat, np.int16), "phase": (self._phase, np.int8), "attained": (self._attained, np.int8),
                "ttft_ok": (self._ttft_ok, np.int8), "generated": (self._generated, np.int64),
                "input_len": (self._input_len, np.int64), "ttft": (self._ttft, np.float64),
                "tpot": (self._tpot, np.float64), "decode": (self._decode, np.float64)}
        return {k: np.frombuffer(a, dtype)[order] if len(a) else np.zeros(0, dtype) for k, (a, dtype) in cols.items()}

    def serving_time_ms(self) -> float:
        """Last finish among completed requests − first admission among all (0 if either is missing)."""
        if not (math.isfinite(self.first_admitted) and math.isfinite(self.last_finish)):
            return 0.0
        return float(max(self.last_finish - self.first_admitted, 0.0))

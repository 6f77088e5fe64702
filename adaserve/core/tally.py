"""Finished requests reduced to the numbers a run's summary needs (``metrics.summarize``), in
memory that does not grow with the trace.

Why: a simulation of a long trace must not keep every ``Request`` (with one commit time per step)
until the end, nor anything per request. A ``Tally`` takes each request as it leaves the system and
keeps, per category, counters (completed, attained, tokens, ...) and three ``Sample``s (TTFT, TPOT,
decode latency), plus the run's inter-token latencies as a ``ValueCounts``. Both are exact up to a
limit of values (summaries of runs of up to ~65,000 requests per category are numpy's, bit for
bit) and beyond it
*binned*: each value replaced by the centre of its bin on a grid of relative width ``REL_ERROR``,
so that their memory is bounded by the spread of the values, not by their number, and their
statistics are within ``REL_ERROR`` (relative). A run that holds its requests anyway (the engine,
the HTTP benchmark) tallies them at the end (``Tally.of``): one summary code path for both.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from adaserve.core.request import Phase, Request, itl_gaps, tpot_ms, ttft_ms

REL_ERROR = 1e-4  # a binned value is within this of the value it stands for (relative)
EXACT_LIMIT = 1 << 16  # values a Sample keeps exactly (with their rids) before it bins them
DISTINCT_LIMIT = 1 << 17  # distinct values a ValueCounts keeps exactly before it bins them


def binned(values: np.ndarray) -> np.ndarray:
    """Each value replaced by the centre of its bin: every binary octave [2^(e-1), 2^e) is cut
    into 5,000 bins of width 2^e · ``REL_ERROR``, so a centre is within ``REL_ERROR`` of every value
    in its bin (relative). Only exactly rounded operations (frexp, division, floor, ldexp): the same
    bins on every machine. Zeros and non-finite values stay as they are."""
    v = np.asarray(values, dtype=np.float64)
    mantissa, exponent = np.frexp(np.abs(v))  # |v| = mantissa · 2^exponent, 0.5 <= mantissa < 1
    centre = np.ldexp((np.floor(mantissa / REL_ERROR) + 0.5) * REL_ERROR, exponent)  # same octave
    return np.where(np.isfinite(v) & (v != 0), np.copysign(centre, v), v)


class ValueCounts:
    """A multiset of floats as sorted distinct values and counts, with the statistics numpy gives
    for the whole list: ``percentile`` (linear interpolation) and ``median`` equal numpy's bit for
    bit; ``mean`` and ``std`` differ from numpy's sums by rounding only (another summation order).
    Past ``limit`` distinct values it bins them (``binned``; ``exact`` turns False) and every value
    added after: the statistics are then within ``REL_ERROR``, and the distinct values are bounded
    by the spread of the values (5,000 per octave), not by their number.

    Values are appended to a buffer and merged into the distinct ones when the buffer outgrows
    them (and at least ``MERGE_AT`` values): memory stays within a few times the distinct count."""

    MERGE_AT = 1 << 16

    def __init__(self, limit: float | None = None) -> None:
        self.limit = DISTINCT_LIMIT if limit is None else limit
        self._exact = True
        self._values = np.zeros(0)
        self._counts = np.zeros(0, np.int64)
        self._buffer = array("d")

    def add(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=np.float64)
        self._buffer.frombytes((values if self._exact else binned(values)).tobytes())
        if len(self._buffer) >= max(self.MERGE_AT, len(self._values)):
            self._merge()

    def add_counts(self, other: ValueCounts) -> None:
        """Every value of ``other`` (which is left as it was), binned if either is."""
        values, counts = other.distinct()
        if other.exact and not self._exact:
            values = binned(values)
        self._merge()
        self._fold(values, counts)
        if not other.exact:
            self._bin()

    def _merge(self) -> None:
        if not self._buffer:
            return
        new, counts = np.unique(np.frombuffer(self._buffer, dtype=np.float64), return_counts=True)
        self._buffer = array("d")
        self._fold(new, counts)

    def _fold(self, values: np.ndarray, counts: np.ndarray) -> None:
        """Merge sorted distinct ``values`` with their ``counts`` into the distinct ones."""
        self._values, inverse = np.unique(np.concatenate([self._values, values]), return_inverse=True)
        self._counts = np.bincount(inverse, weights=np.concatenate([self._counts, counts]),
                                   minlength=len(self._values)).astype(np.int64)
        if self._exact and len(self._values) > self.limit:
            self._bin()

    def _bin(self) -> None:
        """From now on, values are binned (``binned``)."""
        if not self._exact:
            return
        self._exact = False
        self._merge()
        values, counts = self._values, self._counts
        self._values, self._counts = np.zeros(0), np.zeros(0, np.int64)
        self._fold(binned(values), counts)

    @property
    def exact(self) -> bool:
        """Whether every value is kept as it was (not binned)."""
        self._merge()
        return self._exact

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


class ExactValues:
    """A list of values with ``ValueCounts``' statistics, computed by numpy over the list."""

    exact = True

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    @property
    def count(self) -> int:
        return int(self.values.size)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.values, q))

    def median(self) -> float:
        return float(np.median(self.values))

    def mean(self) -> float:
        return float(self.values.mean())

    def std(self) -> float:
        return float(self.values.std())


class Sample:
    """One per-request quantity (TTFT, TPOT, decode latency) of the finished requests. Up to
    ``limit`` values it keeps each with its request's rid, and ``stats`` are numpy's over the values
    in rid order (the same bits as over a list of the requests); past ``limit`` it folds them into
    a binned ``ValueCounts``."""

    def __init__(self, limit: float | None = None) -> None:
        self.limit = EXACT_LIMIT if limit is None else limit
        self._rid, self._value = array("q"), array("d")
        self._binned: ValueCounts | None = None

    def add(self, rid: int, value: float) -> None:
        self._rid.append(rid)
        self._value.append(value)
        if len(self._value) > self.limit:
            self._fold()

    def _fold(self) -> None:
        if self._binned is None:
            self._binned = ValueCounts(limit=0)
        self._binned.add(np.frombuffer(self._value, np.float64))
        self._rid, self._value = array("q"), array("d")

    @property
    def exact(self) -> bool:
        return self._binned is None

    def stats(self) -> ValueCounts | ExactValues:
        if self._binned is not None:
            if self._value:
                self._fold()
            return self._binned
        rids = np.frombuffer(self._rid, np.int64) if self._rid else np.zeros(0, np.int64)
        values = np.frombuffer(self._value, np.float64) if self._value else np.zeros(0)
        return ExactValues(values[np.argsort(rids, kind="stable")])

    @classmethod
    def union(cls, samples: Iterable[Sample]) -> Sample:
        """Every value of ``samples``: exact if each of them is (however many), else binned."""
        samples = list(samples)
        out = cls(limit=math.inf)
        if all(s.exact for s in samples):
            for s in samples:
                out._rid.extend(s._rid)
                out._value.extend(s._value)
            return out
        out._binned = ValueCounts(limit=0)
        for s in samples:
            out._binned.add_counts(_counted(s._value) if s.exact else s.stats())
        return out


def _counted(values: array) -> ValueCounts:
    vc = ValueCounts()
    vc.add(np.frombuffer(values, np.float64) if values else np.zeros(0))
    return vc


@dataclass
class Group:
    """The requests of one category (or of all): counts and latency samples."""

    registered: int = 0
    completed: int = 0
    rejected: int = 0
    unfinished: int = 0  # neither finished nor rejected (a run cut short, cancelled)
    attained: int = 0
    ttft_attained: int = 0
    joint_attained: int = 0
    total_tokens: int = 0  # output tokens of the completed requests
    attained_tokens: int = 0
    input_tokens: int = 0  # prompt tokens of the completed requests
    ttft: Sample = field(default_factory=Sample)
    tpot: Sample = field(default_factory=Sample)
    decode: Sample = field(default_factory=Sample)

    COUNTS = ("registered", "completed", "rejected", "unfinished", "attained", "ttft_attained",
              "joint_attained", "total_tokens", "attained_tokens", "input_tokens")

    def add(self, r: Request) -> None:
        self.registered += 1
        if r.phase == Phase.REJECTED:
            self.rejected += 1
        if r.phase != Phase.FINISHED:
            self.unfinished += r.phase != Phase.REJECTED
            return
        self.completed += 1
        self.total_tokens += r.generated
        self.input_tokens += r.input_len
        attained, ttft_ok = bool(r.attained), bool(r.ttft_attained)
        self.attained += attained
        self.attained_tokens += r.generated if attained else 0
        self.ttft_attained += ttft_ok
        self.joint_attained += attained and ttft_ok
        for sample, value in ((self.ttft, ttft_ms(r)), (self.tpot, tpot_ms(r)), (self.decode, r.decode_latency_ms)):
            if value is not None and not math.isnan(value):
                sample.add(r.rid, value)

    @classmethod
    def union(cls, groups: Iterable[Group]) -> Group:
        groups = list(groups)
        out = cls(**{k: sum(getattr(g, k) for g in groups) for k in cls.COUNTS})
        for name in ("ttft", "tpot", "decode"):
            setattr(out, name, Sample.union(getattr(g, name) for g in groups))
        return out

    @property
    def exact(self) -> bool:
        return all(s.exact for s in (self.ttft, self.tpot, self.decode))


class Tally:
    """Per category (``groups``, in the order first met): a ``Group``; per run: the first
    admission, the last finish, the rejected requests (rid, category, reason: a few bytes each)
    and the finished requests' inter-token latencies."""

    def __init__(self) -> None:
        self.groups: dict[str, Group] = {}
        self.first_admitted = math.inf
        self.last_finish = -math.inf
        self._rejected = array("q")  # rid, category index, reason index, for each rejected request
        self._names: dict[str, int] = {}
        self.itls = ValueCounts()

    @classmethod
    def of(cls, requests: Iterable[Request]) -> Tally:
        tally = cls()
        for r in requests:
            tally.add(r)
        return tally

    def __len__(self) -> int:
        return sum(g.registered for g in self.groups.values())

    def add(self, r: Request) -> None:
        group = self.groups.get(r.category)
        if group is None:
            group = self.groups[r.category] = Group()
        group.add(r)
        if r.admitted_ms is not None:
            self.first_admitted = min(self.first_admitted, r.admitted_ms)
        if r.phase == Phase.FINISHED:
            if r.finish_ms is not None:
                self.last_finish = max(self.last_finish, r.finish_ms)
            self.itls.add(itl_gaps(r))
        elif r.phase == Phase.REJECTED:
            self._rejected.extend((r.rid, self._name(r.category), self._name(r.finish_reason or "unknown")))

    def _name(self, name: str) -> int:
        return self._names.setdefault(name, len(self._names))

    def rejected(self) -> list[dict]:
        """The rejected requests' rid, category and reason, by rid."""
        names = list(self._names)
        rows = np.frombuffer(self._rejected, np.int64).reshape(-1, 3) if self._rejected else np.zeros((0, 3), np.int64)
        rows = rows[np.argsort(rows[:, 0], kind="stable")]
        return [{"rid": rid, "category": names[cat], "reason": names[why]} for rid, cat, why in rows.tolist()]

    def overall(self) -> Group:
        return Group.union(self.groups.values())

    def serving_time_ms(self) -> float:
        """Last finish among completed requests − first admission among all (0 if either is missing)."""
        if not (math.isfinite(self.first_admitted) and math.isfinite(self.last_finish)):
            return 0.0
        return float(max(self.last_finish - self.first_admitted, 0.0))

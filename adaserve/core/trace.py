"""The artifact's "emission" trace format (docs/definitions.md §6): a JSON array of
``{emission_time_ms, input_length, output_length, prompt, slo_ratio}`` objects, plus our optional
``category`` string. Loading is all-or-nothing: every problem found (up to ``MAX_PROBLEMS``) is
reported in one ``TraceError`` so a user can fix a file in one go."""

from __future__ import annotations

import codecs
import json
import math
import os
import re
import reprlib
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from adaserve.core import slo
from adaserve.core.errors import UserError
from adaserve.core.files import JsonFileError, atomic_write_text, read_json
from adaserve.core.request import Request

MAX_PROBLEMS = 20
MAX_LENGTH = 2**31 - 1  # token counts beyond int32 are no real request (and overflow tensors)
REQUIRED_FIELDS = ("emission_time_ms", "input_length", "output_length", "prompt", "slo_ratio")


class TraceError(UserError):
    """A trace file that cannot be loaded; ``problems`` lists each issue (one per line in str())."""

    def __init__(self, path: str | os.PathLike, problems: Sequence[str], more: int = 0):
        self.path = str(path)
        self.problems = list(problems)
        lines = [f"trace file '{self.path}': {p}" for p in self.problems]
        if more:
            lines.append(f"trace file '{self.path}': ... and {more} more problem(s)")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class TraceRecord:
    emission_time_ms: float  # arrival, ms from the start of the trace
    input_length: int        # prompt tokens (may be unreliable: engines re-tokenize)
    output_length: int       # max new tokens
    prompt: str
    slo_ratio: float         # encoded as in docs/definitions.md §1
    category: str | None = None
    slo_ttft_ms: float | None = None  # optional TTFT SLO in ms (issue 15); None: category default

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"emission_time_ms": float(self.emission_time_ms),
                             "input_length": self.input_length,
                             "output_length": self.output_length,
                             "prompt": self.prompt, "slo_ratio": float(self.slo_ratio)}
        if self.category is not None:
            d["category"] = self.category
        if self.slo_ttft_ms is not None:
            d["slo_ttft_ms"] = float(self.slo_ttft_ms)
        return d


# what ``load_trace`` applies to each valid record as it is read: (index, record) -> record to keep
# (None: keep nothing, the hook took what it needs)
RecordHook = Callable[[int, TraceRecord], TraceRecord | None]


# ----------------------------------------------------------------------------------- validation

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _short_repr() -> reprlib.Repr:
    r = reprlib.Repr()  # attributes, not keywords: those need Python 3.12
    r.maxlevel, r.maxstring, r.maxother, r.maxlong = 3, 60, 60, 40
    return r


_short = _short_repr().repr  # a message quotes a value, never a megabyte prompt or 4,000 digits


def _check_text(v: Any) -> str | None:
    """Why the string ``v`` is not text that can be written back as UTF-8 (a lone surrogate from
    a ``\\ud800`` escape), or None."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"contains a lone surrogate {v[e.start]!r} at character {e.start} "
                "(not valid Unicode)")
    return None


def _check_number(v: Any) -> str | None:
    """Why ``v`` is not a finite JSON number, or None if it is."""
    if not _is_number(v):
        return f"must be a number, got {_type_name(v)} {_short(v)}"
    if isinstance(v, int) and abs(v) > 2**1023:  # math.isfinite would raise OverflowError
        return "is too large to be a float"
    if not math.isfinite(v):
        return f"must be finite, got {v!r}"
    return None


def _check_int(v: Any, minimum: int) -> str | None:
    if not _is_int(v):
        return f"must be an integer, got {_type_name(v)} {_short(v)}"
    if v < minimum:
        return f"must be >= {minimum}, got {_short(v)}"
    if v > MAX_LENGTH:
        return f"must be <= {MAX_LENGTH}, got {_short(v)}"
    return None


def _record_problems(i: int, obj: Any, prev: tuple[float, int] | None
                     ) -> tuple[list[str], TraceRecord | None]:
    """Problems of record ``i`` (each naming the index and field) and the record if it is valid.
    ``prev`` is the latest emission time seen so far and the index of its record."""
    if not isinstance(obj, dict):
        return [f"record {i}: must be a JSON object, got {_type_name(obj)}"], None
    missing = [f for f in REQUIRED_FIELDS if f not in obj]
    problems = [f"record {i}: missing field '{f}'" for f in missing]

    def bad(field: str, why: str | None) -> None:
        if why is not None and field in obj:
            problems.append(f"record {i}: field '{field}' {why}")

    t = obj.get("emission_time_ms")
    why = _check_number(t)
    if why is None and t < 0:
        why = f"must be >= 0, got {t}"
    if why is None and prev is not None and t < prev[0]:
        why = f"decreases: {t} is before {prev[0]} of record {prev[1]} (records must be sorted by time)"
    bad("emission_time_ms", why)
    bad("input_length", _check_int(obj.get("input_length"), 0))
    bad("output_length", _check_int(obj.get("output_length"), 1))
    p = obj.get("prompt")
    bad("prompt", f"must be a string, got {_type_name(p)}" if not isinstance(p, str)
        else ("must not be empty" if not p.strip() else _check_text(p)))
    r = obj.get("slo_ratio")
    why = _check_number(r)
    bad("slo_ratio", why if why is not None else ("must not be 0 (docs/definitions.md §1)" if r == 0 else None))
    c = obj.get("category")
    if c is not None and (not isinstance(c, str) or not c.strip()):
        problems.append(f"record {i}: field 'category' must be a non-empty string or null, "
                        f"got {_type_name(c)} {_short(c)}")
    elif c is not None:
        bad("category", _check_text(c))
    ttft = obj.get("slo_ttft_ms")
    if ttft is not None:
        bad("slo_ttft_ms", _check_number(ttft) or (None if ttft > 0 else f"must be > 0 ms, got {ttft}"))
    if problems:
        return problems, None
    return [], TraceRecord(float(t), obj["input_length"], obj["output_length"], p, float(r), c,
                           None if ttft is None else float(ttft))


def parse_records(data: Any, path: str | os.PathLike = "<memory>") -> list[TraceRecord]:
    """Validate decoded JSON ``data``; raise ``TraceError`` listing up to ``MAX_PROBLEMS`` issues."""
    if not isinstance(data, list):
        raise TraceError(path, [f"top level must be a JSON array of records, got {_type_name(data)}"])
    return _valid_records(data, path)


def _valid_records(items: Iterable[Any], path: str | os.PathLike, each: RecordHook | None = None,
                   keep_prompts: bool = True) -> list[TraceRecord]:
    """The records of the decoded ``items``, each passed through ``each`` and, without
    ``keep_prompts``, stripped of its prompt as soon as it is read; ``TraceError`` listing up to
    ``MAX_PROBLEMS`` issues if any record is invalid (all or nothing)."""
    problems: list[str] = []
    records: list[TraceRecord] = []
    prev: tuple[float, int] | None = None
    i = -1
    for i, obj in enumerate(items):
        probs, rec = _record_problems(i, obj, prev)
        problems.extend(probs)
        t = obj.get("emission_time_ms") if isinstance(obj, dict) else None
        if _check_number(t) is None and (prev is None or t >= prev[0]):
            prev = (float(t), i)
        if rec is not None:
            rec = rec if each is None else each(i, rec)
            if rec is not None:
                records.append(rec if keep_prompts else replace(rec, prompt=""))
    if i < 0:
        raise TraceError(path, ["contains no records"])
    if problems:
        raise TraceError(path, problems[:MAX_PROBLEMS], more=max(len(problems) - MAX_PROBLEMS, 0))
    return records


# ------------------------------------------------------------------------------------------- I/O

def load_trace(path: str | os.PathLike, *, keep_prompts: bool = True,
               each: RecordHook | None = None) -> list[TraceRecord]:
    """Load and validate a trace file: every record loads, or ``TraceError`` is raised.

    The file is decoded one record at a time (``_JsonArrayReader``), so a caller that needs no
    text (the simulator: ``keep_prompts=False``) never holds more than one record's prompt; the
    memory then grows by a few hundred bytes per record, not by the file's size. ``each(index,
    record)`` sees every valid record with its prompt before it is dropped and returns the record
    to keep (e.g. a checked or corrected one); it may see a record twice when the file has to be
    read again to report what is wrong with it. A file that is not a plain JSON array of values
    is read whole by ``read_json``, whose errors name the problem."""
    return _load(Path(path), each, keep_prompts)


def scan_trace(path: str | os.PathLike, each: RecordHook) -> None:
    """Validate a trace file as ``load_trace`` does, showing every record to ``each`` and keeping
    none (``stream_trace`` reads them again)."""
    _load(Path(path), lambda i, rec: each(i, rec) and None, keep_prompts=False)


def _load(p: Path, each: RecordHook | None, keep_prompts: bool) -> list[TraceRecord]:
    if not p.is_file():
        raise TraceError(p, ["not found" if not p.exists() else "is not a file"])
    try:
        with open(p, "rb") as f:
            return _valid_records(_JsonArrayReader(f).items(), p, each, keep_prompts)
    except (_NotStreamable, OSError):
        pass  # the whole-file path below names the problem
    try:
        data = read_json(p)
    except JsonFileError as e:
        raise TraceError(p, [e.reason]) from None
    if not isinstance(data, list):
        return parse_records(data, p)  # raises: the top level must be an array
    return _valid_records(data, p, each, keep_prompts)


def stream_trace(path: str | os.PathLike) -> Iterator[TraceRecord]:
    """The records of a file that ``scan_trace`` accepted, decoded again one at a time and without
    their prompts: a caller that reads them as it goes (a long simulation) never holds them all.
    (Every valid trace decodes record by record: ``load_trace`` reads a file whole only to name what
    is wrong with it.) A file that no longer reads or validates (changed since) raises
    ``TraceError``."""
    p = Path(path)
    prev: tuple[float, int] | None = None
    changed = "the file changed after it was checked"
    try:
        with open(p, "rb") as f:
            for i, obj in enumerate(_JsonArrayReader(f).items()):
                problems, rec = _record_problems(i, obj, prev)
                if rec is None:
                    raise TraceError(p, problems + [changed])
                prev = (rec.emission_time_ms, i)
                yield replace(rec, prompt="")
    except (_NotStreamable, OSError) as e:
        raise TraceError(p, [f"{changed}: it no longer reads record by record ({type(e).__name__})"]) from None


class _NotStreamable(Exception):
    """The file is not a UTF-8 JSON array that decodes element by element."""


class _JsonArrayReader:
    """The elements of a top-level JSON array, decoded one at a time from ``CHUNK``-byte reads
    with the standard decoder. Anything else (another top-level value, invalid JSON or UTF-8,
    UTF-16, trailing data) raises ``_NotStreamable``: the caller reads the file whole then."""

    CHUNK = 1 << 16
    _SPACE = re.compile(r"[ \t\n\r]*")

    def __init__(self, f: BinaryIO):
        self.f, self.text, self.pos, self.eof = f, "", 0, False
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.decoder = json.JSONDecoder()
        first = f.read(self.CHUNK)
        if first.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            raise _NotStreamable
        self._append(first[len(codecs.BOM_UTF8):] if first.startswith(codecs.BOM_UTF8) else first,
                     final=not first)

    def _append(self, raw: bytes, final: bool) -> None:
        try:
            more = self.utf8.decode(raw, final=final)
        except UnicodeDecodeError:
            raise _NotStreamable from None
        self.eof = final
        if self.pos > self.CHUNK:  # forget what was consumed
            self.text, self.pos = self.text[self.pos:], 0
        self.text += more

    def _fill(self) -> bool:
        """Read more of the file; False at its end."""
        if self.eof:
            return False
        raw = self.f.read(self.CHUNK)
        self._append(raw, final=not raw)
        return True

    def _peek(self) -> str:
        """The next character that is not whitespace ('' at the end), not consumed."""
        while True:
            self.pos = self._SPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self._fill():
                return ""

    def _value(self) -> Any:
        """The JSON value at the position; a value that ends where the text read so far ends is
        decoded again with more text (a number may go on)."""
        self._peek()
        while True:
            try:
                value, end = self.decoder.raw_decode(self.text, self.pos)
                if end < len(self.text) or self.eof:
                    self.pos = end
                    return value
            except json.JSONDecodeError:
                if self.eof:
                    raise _NotStreamable from None
            except (RecursionError, ValueError):  # nested too deep; an integer beyond the limit
                raise _NotStreamable from None
            self._fill()

    def items(self) -> Iterator[Any]:
        if self._peek() != "[":
            raise _NotStreamable
        self.pos += 1
        if self._peek() == "]":
            self.pos += 1
        else:
            while True:
                yield self._value()
                sep = self._peek()
                self.pos += 1
                if sep == "]":
                    break
                if sep != ",":
                    raise _NotStreamable
        if self._peek() != "":
            raise _NotStreamable


def save_trace(path: str | os.PathLike, records: Sequence[TraceRecord]) -> None:
    """Write records atomically (temp file + rename), one record per line.

    The records are validated first, so a saved file always loads back."""
    p = Path(path)
    parse_records([r.to_json() for r in records], p)
    lines = [json.dumps(r.to_json(), ensure_ascii=False, allow_nan=False) for r in records]
    atomic_write_text(p, "[\n" + ",\n".join(lines) + "\n]\n")


# ------------------------------------------------------------------------------------ conversion

def prepare_records(records: Sequence[TraceRecord], *, baseline_ms: float, scale_slos: bool = False,
                    max_requests: int | None = None, time_scale: float = 1.0,
                    output_len_cap: int | None = None) -> list[TraceRecord]:
    """The records as a run replays them: the first ``max_requests``, arrivals times
    ``time_scale``, output lengths capped at ``output_len_cap`` and, with ``scale_slos``, absolute
    SLOs hardware-scaled (``slo.hardware_scaled``). Categories keep the names of the unscaled SLOs."""
    return [prepare_record(r, baseline_ms=baseline_ms, scale_slos=scale_slos, time_scale=time_scale,
                           output_len_cap=output_len_cap) for r in records[:max_requests]]


def prepare_record(r: TraceRecord, *, baseline_ms: float, scale_slos: bool = False, time_scale: float = 1.0,
                   output_len_cap: int | None = None) -> TraceRecord:
    """One record of ``prepare_records``."""
    ratio = slo.hardware_scaled(r.slo_ratio, baseline_ms) if scale_slos else r.slo_ratio
    return replace(r, emission_time_ms=r.emission_time_ms * time_scale,
                   output_length=min(r.output_length, output_len_cap or r.output_length),
                   slo_ratio=ratio, category=slo.category_of(r.slo_ratio, r.category))


def to_requests(records: Sequence[TraceRecord], baseline_ms: float, *,
                input_lengths: Sequence[int] | None = None) -> list[Request]:
    """Requests for the records (rid = index). ``input_lengths`` overrides the records' lengths
    (engines re-tokenize the prompts: the fig14 trace's field is a character count)."""
    if input_lengths is not None and len(input_lengths) != len(records):
        raise ValueError(f"input_lengths has {len(input_lengths)} entries for {len(records)} records")
    return [to_request(i, rec, baseline_ms, None if input_lengths is None else int(input_lengths[i]))
            for i, rec in enumerate(records)]


def to_request(rid: int, rec: TraceRecord, baseline_ms: float, input_len: int | None = None) -> Request:
    """The request of one record (``to_requests``)."""
    return Request(rid=rid, arrival_ms=rec.emission_time_ms,
                   input_len=rec.input_length if input_len is None else input_len,
                   max_new_tokens=rec.output_length, slo_ratio=rec.slo_ratio,
                   slo_ms=slo.slo_ms(rec.slo_ratio, baseline_ms),
                   category=sys.intern(slo.category_of(rec.slo_ratio, rec.category)), prompt=rec.prompt,
                   slo_ttft_ms=rec.slo_ttft_ms)


class CompactRecords:
    """Records without prompts, kept as typed arrays (about 40 bytes a record instead of a
    ``TraceRecord``'s few hundred): what a long simulation holds of its trace. Indexing gives the
    record back (prompt "")."""

    def __init__(self, records: Iterable[TraceRecord] = ()) -> None:
        self.clear()
        for r in records:
            self.append(r)

    def clear(self) -> None:
        self._time, self._ratio, self._ttft = array("d"), array("d"), array("d")
        self._input, self._output, self._cat = array("q"), array("q"), array("h")
        self._categories: dict[str | None, int] = {}
        self._names: list[str | None] = []

    def append(self, r: TraceRecord) -> None:
        self._time.append(r.emission_time_ms)
        self._ratio.append(r.slo_ratio)
        self._ttft.append(math.nan if r.slo_ttft_ms is None else r.slo_ttft_ms)
        self._input.append(r.input_length)
        self._output.append(r.output_length)
        cat = self._categories.get(r.category)
        if cat is None:
            cat = self._categories[r.category] = len(self._names)
            self._names.append(r.category)
        self._cat.append(cat)

    def __len__(self) -> int:
        return len(self._time)

    def __getitem__(self, i: int) -> TraceRecord:
        ttft = self._ttft[i]
        return TraceRecord(self._time[i], self._input[i], self._output[i], "", self._ratio[i],
                           self._names[self._cat[i]], None if math.isnan(ttft) else ttft)

    def in_arrival_order(self) -> Iterator[tuple[int, TraceRecord]]:
        """(index, record) by emission time, ties by index."""
        order = self.arrival_order()
        for i in range(len(self)) if order is None else order:
            yield int(i), self[int(i)]

    def arrival_order(self) -> np.ndarray | None:
        """Indices by emission time, ties by index; None when that is the records' own order."""
        times = np.frombuffer(self._time, np.float64) if len(self) else np.zeros(0)
        if bool(np.all(times[1:] >= times[:-1])):
            return None
        return np.argsort(times, kind="stable")


# ----------------------------------------------------------------------------------- statistics

def length_stats(values: Sequence[int]) -> dict[str, float | None]:
    """mean, p50, p90 and max (linear-interpolated percentiles); None for no values."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return {"mean": None, "p50": None, "p90": None, "max": None}
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "max": float(a.max())}


def _arrival_stats(times: Sequence[float]) -> dict[str, float | None]:
    """duration_s (last − first arrival), actual RPS (requests / duration) and inter-arrival CV."""
    t = np.asarray(times, dtype=float)
    duration_s = float(t[-1] - t[0]) / 1000.0 if t.size else 0.0
    gaps = np.diff(t)
    cv = float(gaps.std() / gaps.mean()) if gaps.size >= 2 and gaps.mean() > 0 else None
    return {"duration_s": duration_s, "rps": t.size / duration_s if duration_s > 0 else None,
            "interarrival_cv": cv}


def category_sort_key(name: str) -> tuple[int, str]:
    """The paper's categories first (coding, chat, summarization), then the rest by name."""
    order = [c.name for c in slo.CATEGORIES]
    return (order.index(name), "") if name in order else (len(order), name)


def trace_stats(records: Sequence[TraceRecord]) -> dict[str, Any]:
    """Summary of a trace: counts and shares per category, duration, RPS, burstiness (inter-arrival
    CV; Poisson is 1), prompt/output length statistics overall and per category."""
    stats: dict[str, Any] = {"requests": len(records),
                             **_arrival_stats([r.emission_time_ms for r in records]),
                             "input_length": length_stats([r.input_length for r in records]),
                             "output_length": length_stats([r.output_length for r in records]),
                             "categories": {}}
    groups: dict[str, list[TraceRecord]] = {}
    for r in records:
        groups.setdefault(slo.category_of(r.slo_ratio, r.category), []).append(r)
    duration = stats["duration_s"]
    for name in sorted(groups, key=category_sort_key):
        rs = groups[name]
        stats["categories"][name] = {
            "count": len(rs), "share": len(rs) / len(records),
            "rps": len(rs) / duration if duration > 0 else None,
            "slo_ratios": sorted({r.slo_ratio for r in rs}),
            "input_length": length_stats([r.input_length for r in rs]),
            "output_length": length_stats([r.output_length for r in rs])}
    return stats

"""Result files (docs/definitions.md §7): the artifact's text file and a JSON beside it with the same numbers.

``PREFIX.txt`` ends with the artifact's statistics block, one `` name( value)`` line each;
``PREFIX.json`` holds ``{"complete": true, "meta", "summary", "requests"}`` where ``summary`` is
``metrics.summarize``'s dict (per-category breakdowns, vLLM ``bench serve`` fields under ``vllm``).

Both files are written to a temporary name and renamed, JSON first, text last: the text file is
the artifact's "this point is done" marker, so a run cut short never leaves one behind.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from adaserve.core.metrics import request_record
from adaserve.core.request import Request
from adaserve.core.files import atomic_write_chunks, atomic_write_text

STATS_LINE = re.compile(r"^ (\w+)\( (.*)\)$")
STATS_NAMES = ("total_time_ms", "total_requests", "total_tokens", "throughput_tokens_per_sec",
               "mean_generated_tokens_per_step", "slo_attainment", "goodput")


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "nan"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}"


def stats_block(summary: Mapping[str, Any]) -> list[str]:
    """The artifact's closing statistics lines (docs/definitions.md §7)."""
    lines = [
        f" total_time_ms( {_num(summary['total_time_ms'], 3)})",
        f" total_requests( {summary['completed']}/{summary['registered']})",
        f" total_tokens( {summary['total_tokens']})",
        f" throughput_tokens_per_sec( {_num(summary['throughput_tokens_per_sec'])})",
        f" mean_generated_tokens_per_step( {_num(summary['mean_generated_tokens_per_step'])})",
        f" slo_attainment( {_num(summary['slo_attainment'])})",
        f" goodput( {_num(summary['goodput'])})",
    ]
    overhead = summary.get("overhead")
    if overhead is not None:
        parts = ", ".join(f"{k}: {v:.1f} us" for k, v in overhead["us"].items())
        lines.append(f" eval_overhead_breakdown( {parts})")
    return lines


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _category_lines(summary: Mapping[str, Any]) -> list[str]:
    lines = ["per category:"]
    for cat, m in summary["per_category"].items():
        att = _pct(m["slo_attainment"])
        good = "-" if m["goodput"] is None else f"{m['goodput']:.1f}"
        lines.append(f"  {cat:<14} completed {m['completed']:>5}/{m['registered']:<5} "
                     f"attainment {att:>7}  TTFT att {_pct(m.get('ttft_attainment'))}  "
                     f"joint {_pct(m.get('joint_attainment'))}  goodput {good} tok/s  "
                     f"mean TPOT {_num(m['tpot_ms']['mean'], 2)} ms")
    if "joint_attainment" in summary:  # beside the paper's metric (issue 15); absent in old files
        lines.append(f"  {'all':<14} attainment {_pct(summary['slo_attainment']):>7}  TTFT att "
                     f"{_pct(summary.get('ttft_attainment'))}  joint {_pct(summary['joint_attainment'])}")
    if summary.get("rejected"):
        lines.append(f"  rejected: {summary['rejected']} {summary['rejected_reasons']}")
    if summary.get("exact_latency_stats") is False:
        lines.append("  latency statistics binned: within 0.01% of the exact ones (a long run: more than 65,536 "
                     "requests in a category or 131,072 distinct inter-token latencies; docs/definitions.md §3)")
    return lines


def format_text(summary: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """Header with the run's settings, a per-category table, then the statistics block."""
    head = [f"{k}: {v}" for k, v in meta.items()]
    return "\n".join(head + [""] + _category_lines(summary) + [""] + stats_block(summary)) + "\n"


def _clean(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become null (strict JSON has no NaN/inf)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


_STRICT = json.JSONEncoder(allow_nan=False)  # json.dumps(obj, allow_nan=False), without a new encoder per call


def _dump(obj: Any) -> str:
    return json.dumps(_clean(obj), allow_nan=False)


def _dump_record(r: Request) -> str:
    """``_dump(request_record(r))``; a record is flat, with string keys, and rarely holds a
    non-finite float, so it is dumped as is unless json refuses it."""
    record = request_record(r)
    try:
        return _STRICT.encode(record)
    except ValueError:
        return _dump(record)


class RecordSpool:
    """Request records (``request_record``, as JSON text) written to a temporary file in rid order
    as the requests leave the system: a record waits in memory only until every lower rid has left
    (about as many records as requests are in flight), so a long simulation keeps nothing per
    request for its result file. Rids must be ``0 .. n - 1``, each added once; rids never added
    are left out."""

    def __init__(self, n: int):
        self._file = tempfile.TemporaryFile()
        self._n = n
        self._next = 0  # every lower rid is written
        self._waiting: dict[int, bytes] = {}

    def add(self, r: Request) -> None:
        if not self._next <= r.rid < self._n or r.rid in self._waiting:
            raise ValueError(f"request {r.rid}: rids must be 0 .. {self._n - 1}, each spooled once")
        self._waiting[r.rid] = _dump_record(r).encode()
        while self._next in self._waiting:
            self._write(self._waiting.pop(self._next))
            self._next += 1

    def _write(self, data: bytes) -> None:
        self._file.write(data + b"\n")  # a JSON record holds no raw newline

    def texts(self) -> Iterator[str]:
        """Every spooled record's JSON text, by rid."""
        for rid in sorted(self._waiting):  # those behind a rid never added
            self._write(self._waiting.pop(rid))
        self._next = self._n
        self._file.seek(0)
        for line in self._file:
            yield line[:-1].decode()

    def close(self) -> None:
        self._file.close()


def write_results(prefix: str | Path, summary: Mapping[str, Any], requests: Iterable[Request] | RecordSpool,
                  meta: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``PREFIX.json`` then ``PREFIX.txt`` atomically; return their paths."""
    txt, js = _paths(prefix)
    texts = requests.texts() if isinstance(requests, RecordSpool) else (_dump_record(r) for r in requests)
    atomic_write_chunks(js, _result_json(summary, texts, meta))
    atomic_write_text(txt, format_text(summary, meta))
    return txt, js


def _result_json(summary: Mapping[str, Any], records: Iterable[str], meta: Mapping[str, Any]) -> Iterator[str]:
    """``json.dumps`` of ``{"complete", "meta", "summary", "requests"}`` (the same text), one
    request record (its JSON text) at a time: the records of a long trace are never all in memory
    at once."""
    yield f'{{"complete": true, "meta": {_dump(dict(meta))}, "summary": {_dump(dict(summary))}, "requests": ['
    for i, text in enumerate(records):
        yield (", " if i else "") + text
    yield "]}\n"


def read_stats_block(path: str | Path) -> dict[str, str]:
    """The `` name( value)`` lines of a result text file (ours or the artifact's), raw values."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        m = STATS_LINE.match(line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _paths(prefix: str | Path) -> tuple[Path, Path]:
    """``(PREFIX.txt, PREFIX.json)``; a prefix given with either suffix names the same pair."""
    prefix = Path(prefix)
    if prefix.suffix in (".txt", ".json"):
        prefix = prefix.with_suffix("")
    return prefix.with_name(prefix.name + ".txt"), prefix.with_name(prefix.name + ".json")


def result_complete(prefix: str | Path) -> bool:
    """A sweep point is done when its text file holds the whole statistics block (with
    ``eval_overhead_breakdown`` when the run measured overhead) and the JSON loads as complete."""
    txt, js = _paths(prefix)
    if not txt.is_file() or not js.is_file():
        return False
    try:
        doc = json.loads(js.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(doc, dict) or doc.get("complete") is not True:
        return False
    needed = set(STATS_NAMES)
    summary = doc.get("summary")
    if isinstance(summary, dict) and summary.get("overhead") is not None:
        needed.add("eval_overhead_breakdown")
    return needed <= read_stats_block(txt).keys()


def load_result(prefix: str | Path) -> dict[str, Any]:
    """The JSON document of a finished point."""
    return json.loads(_paths(prefix)[1].read_text(encoding="utf-8"))

"""Serving metrics as docs/definitions.md §3 defines them, from finished ``Request`` objects.

- completed = requests in phase FINISHED; rejected requests (phase REJECTED) are counted and listed
  but are not in the attainment denominator.
- total serving time = last finish − first admission (ms).
- ``slo_attainment`` = attained / completed (the paper's metric: decode time only);
  ``ttft_attainment`` = completed requests whose first token came within their TTFT SLO
  (``Request.ttft_slo``) / completed; ``joint_attainment`` = those attaining both / completed;
  ``goodput`` = Σ decode_length of attained requests per
  second of serving time; ``throughput_tokens_per_sec`` = Σ decode_length of completed requests per
  second of serving time. Per-category goodput uses the same (global) serving time, so the
  categories' goodputs sum to the overall goodput.
- ``mean_generated_tokens_per_step`` = committed tokens / request-steps, both counted by the
  iteration loop (not derived from requests).

Undefined values (no completed request, zero serving time) are ``None``."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from adaserve.core.request import Phase, Request
from adaserve.core.trace import category_sort_key

# Figure 15's breakdown of an iteration (how the serving loop measures each: adaserve/iteration.py)
OVERHEAD_COMPONENTS = ("speculation", "verification", "scheduling", "prefill", "other")


# --------------------------------------------------------------------------- per-request values

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
    return _itls(r).tolist()


def _itls(r: Request) -> np.ndarray:
    gaps = np.diff(np.asarray(r.token_times_ms, dtype=float))
    return gaps[gaps > 0]


def _all_itls(requests: Sequence[Request]) -> np.ndarray:
    """``itls_ms`` of every request, concatenated in request order, in one float64 array filled
    request by request (a list of Python floats, or of per-request arrays, would take several
    times the memory at ~50 gaps a request)."""
    out = np.empty(sum(max(len(r.token_times_ms) - 1, 0) for r in requests))
    at = 0
    for r in requests:
        gaps = _itls(r)
        out[at:at + len(gaps)] = gaps
        at += len(gaps)
    return out[:at]


def request_record(r: Request) -> dict[str, Any]:
    """One request's JSON record (``slo_ms`` is None for best effort)."""
    return {"rid": r.rid, "category": r.category, "phase": r.phase.value,
            "input_len": r.input_len, "max_new_tokens": r.max_new_tokens,
            "slo_ratio": r.slo_ratio, "slo_ms": r.slo_ms if math.isfinite(r.slo_ms) else None,
            "arrival_ms": r.arrival_ms, "admitted_ms": r.admitted_ms,
            "first_token_ms": r.first_token_ms, "first_decode_ms": r.first_decode_ms,
            "finish_ms": r.finish_ms, "generated": r.generated, "steps": r.steps,
            "attained": r.phase == Phase.FINISHED and r.attained,
            "ttft_slo_ms": r.ttft_slo if math.isfinite(r.ttft_slo) else None,
            "ttft_attained": r.phase == Phase.FINISHED and r.ttft_attained,
            "ttft_ms": ttft_ms(r), "tpot_ms": tpot_ms(r), "decode_latency_ms": r.decode_latency_ms,
            "finish_reason": r.finish_reason}


# ------------------------------------------------------------------------------------ aggregates

def distribution(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """count, mean, p50, p90, p99 (linear-interpolated percentiles) of the non-None values."""
    a = np.asarray([v for v in values if v is not None], dtype=float)
    if a.size == 0:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None}
    return {"count": int(a.size), "mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99))}


def serving_time_ms(requests: Sequence[Request]) -> float:
    """Last finish among completed requests − first admission among all requests (0 if none)."""
    admitted = [r.admitted_ms for r in requests if r.admitted_ms is not None]
    finished = [r.finish_ms for r in requests if r.phase == Phase.FINISHED and r.finish_ms is not None]
    if not admitted or not finished:
        return 0.0
    return float(max(max(finished) - min(admitted), 0.0))


def _per_second(amount: float, time_ms: float) -> float | None:
    return amount / (time_ms / 1000.0) if time_ms > 0 else None


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _group_metrics(group: Sequence[Request], time_ms: float) -> dict[str, Any]:
    """Counts, attainment, goodput and latency distributions of one group of requests."""
    done = [r for r in group if r.phase == Phase.FINISHED]
    attained = [r for r in done if r.attained]
    frac = _ratio(len(attained), len(done))
    ttft_ok = sum(r.ttft_attained for r in done)
    joint = sum(r.ttft_attained and r.attained for r in done)
    return {"registered": len(group), "completed": len(done),
            "rejected": sum(r.phase == Phase.REJECTED for r in group),
            "attained": len(attained), "slo_attainment": frac,
            "slo_attainment_pct": None if frac is None else 100.0 * frac,
            "ttft_attained": ttft_ok, "ttft_attainment": _ratio(ttft_ok, len(done)),
            "joint_attained": joint, "joint_attainment": _ratio(joint, len(done)),
            "total_tokens": sum(r.generated for r in done),
            "attained_tokens": sum(r.generated for r in attained),
            "goodput": _per_second(sum(r.generated for r in attained), time_ms),
            "throughput_tokens_per_sec": _per_second(sum(r.generated for r in done), time_ms),
            "ttft_ms": distribution(ttft_ms(r) for r in done),
            "tpot_ms": distribution(tpot_ms(r) for r in done),
            "decode_latency_ms": distribution(r.decode_latency_ms for r in done)}


def overhead_breakdown(overhead_ms: Mapping[str, float]) -> dict[str, Any]:
    """Per-component totals in microseconds and shares of their sum (Figure 15). The standard
    components come first, always present (0 if absent); extra components follow."""
    bad = {k: v for k, v in overhead_ms.items() if not (math.isfinite(v) and v >= 0)}
    if bad:
        raise ValueError(f"overhead times must be finite and >= 0 ms, got {bad}")
    names = list(OVERHEAD_COMPONENTS) + [k for k in overhead_ms if k not in OVERHEAD_COMPONENTS]
    ms = {k: float(overhead_ms.get(k, 0.0)) for k in names}
    total = sum(ms.values())
    return {"total_us": total * 1000.0,
            "us": {k: v * 1000.0 for k, v in ms.items()},
            "share": {k: _ratio(v, total) for k, v in ms.items()}}


def _rejections(requests: Sequence[Request]) -> dict[str, Any]:
    rejected = [r for r in requests if r.phase == Phase.REJECTED]
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[r.finish_reason or "unknown"] = reasons.get(r.finish_reason or "unknown", 0) + 1
    return {"rejected": len(rejected), "rejected_reasons": reasons,
            "rejected_requests": [{"rid": r.rid, "category": r.category,
                                   "reason": r.finish_reason or "unknown"} for r in rejected]}


def vllm_fields(requests: Sequence[Request], duration_s: float) -> dict[str, Any]:
    """The fields of vLLM's ``bench serve`` result JSON, computed as vLLM does (population std,
    0 for an empty list) over the completed requests, with our serving time as ``duration``."""
    done = [r for r in requests if r.phase == Phase.FINISHED]
    n_in = sum(r.input_len for r in done)
    n_out = sum(r.generated for r in done)
    rate = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    out: dict[str, Any] = {"duration": duration_s, "completed": len(done),
                           "total_input_tokens": n_in, "total_output_tokens": n_out,
                           "request_throughput": rate(len(done)), "output_throughput": rate(n_out),
                           "total_token_throughput": rate(n_in + n_out)}
    known = lambda xs: np.asarray([x for x in xs if x is not None], dtype=float)  # noqa: E731
    series = {"ttft": known(map(ttft_ms, done)), "tpot": known(map(tpot_ms, done)), "itl": _all_itls(done)}
    for name, a in series.items():
        a = a if a.size else np.zeros(1)
        out[f"mean_{name}_ms"] = float(a.mean())
        out[f"median_{name}_ms"] = float(np.median(a))
        out[f"std_{name}_ms"] = float(a.std())
        out[f"p99_{name}_ms"] = float(np.percentile(a, 99))
    return out


def summarize(requests: Sequence[Request], *, committed_tokens: int, request_steps: int,
              overhead_ms: Mapping[str, float] | None = None,
              registered: int | None = None) -> dict[str, Any]:
    """All metrics of a run (docs/definitions.md §3). ``registered`` defaults to
    ``len(requests)``; requests neither finished nor rejected (a run cut short) are counted as
    ``unfinished``."""
    time_ms = serving_time_ms(requests)
    overall = _group_metrics(requests, time_ms)
    by_cat: dict[str, list[Request]] = {}
    for r in requests:
        by_cat.setdefault(r.category, []).append(r)
    summary: dict[str, Any] = {
        "total_time_ms": time_ms,
        **overall,
        "registered": len(requests) if registered is None else registered,
        "unfinished": sum(r.phase not in (Phase.FINISHED, Phase.REJECTED) for r in requests),
        **_rejections(requests),
        "committed_tokens": committed_tokens, "request_steps": request_steps,
        "mean_generated_tokens_per_step": _ratio(committed_tokens, request_steps),
        "per_category": {c: _group_metrics(g, time_ms) for c, g in
                         sorted(by_cat.items(), key=lambda kv: category_sort_key(kv[0]))},
        "overhead": None if overhead_ms is None else overhead_breakdown(overhead_ms),
        "vllm": vllm_fields(requests, time_ms / 1000.0),
    }
    return summary

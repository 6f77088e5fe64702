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

from adaserve.core.request import Phase, Request, itl_gaps, itls_ms, tpot_ms, ttft_ms  # noqa: F401 - see below
from adaserve.core.tally import ExactValues, Group, Tally, ValueCounts
from adaserve.core.trace import category_sort_key

# Figure 15's breakdown of an iteration (how the serving loop measures each: adaserve/iteration.py)
OVERHEAD_COMPONENTS = ("speculation", "verification", "scheduling", "prefill", "other")


# --------------------------------------------------------------------------- per-request values
# ttft_ms, tpot_ms, itls_ms and itl_gaps are defined beside the request (core/request.py), which the
# tally (core/tally.py) reads too; they are this module's as well.

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

def serving_time_ms(requests: Sequence[Request]) -> float:
    """Last finish among completed requests − first admission among all requests (0 if none)."""
    return Tally.of(requests).serving_time_ms()


def _per_second(amount: float, time_ms: float) -> float | None:
    return amount / (time_ms / 1000.0) if time_ms > 0 else None


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _group_metrics(g: Group, time_ms: float) -> dict[str, Any]:
    """Counts, attainment, goodput and latency distributions of the requests of ``g``."""
    frac = _ratio(g.attained, g.completed)
    return {"registered": g.registered, "completed": g.completed, "rejected": g.rejected,
            "attained": g.attained, "slo_attainment": frac,
            "slo_attainment_pct": None if frac is None else 100.0 * frac,
            "ttft_attained": g.ttft_attained, "ttft_attainment": _ratio(g.ttft_attained, g.completed),
            "joint_attained": g.joint_attained, "joint_attainment": _ratio(g.joint_attained, g.completed),
            "total_tokens": g.total_tokens, "attained_tokens": g.attained_tokens,
            "goodput": _per_second(g.attained_tokens, time_ms),
            "throughput_tokens_per_sec": _per_second(g.total_tokens, time_ms),
            "ttft_ms": distribution(g.ttft.stats()),
            "tpot_ms": distribution(g.tpot.stats()),
            "decode_latency_ms": distribution(g.decode.stats())}


def distribution(s: ValueCounts | ExactValues) -> dict[str, float | int | None]:
    """count, mean, p50, p90, p99 (linear-interpolated percentiles) of a sample's values."""
    if s.count == 0:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None}
    return {"count": s.count, "mean": s.mean(), "p50": s.percentile(50), "p90": s.percentile(90),
            "p99": s.percentile(99)}


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


def vllm_fields(overall: Group, itls: ValueCounts, duration_s: float) -> dict[str, Any]:
    """The fields of vLLM's ``bench serve`` result JSON, computed as vLLM does (population std,
    0 for an empty list) over the completed requests (``overall``) and their inter-token
    latencies, with our serving time as ``duration``."""
    n_in, n_out = overall.input_tokens, overall.total_tokens
    rate = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    out: dict[str, Any] = {"duration": duration_s, "completed": overall.completed,
                           "total_input_tokens": n_in, "total_output_tokens": n_out,
                           "request_throughput": rate(overall.completed), "output_throughput": rate(n_out),
                           "total_token_throughput": rate(n_in + n_out)}
    for name, s in (("ttft", overall.ttft.stats()), ("tpot", overall.tpot.stats()), ("itl", itls)):
        s = s if s.count else ExactValues(np.zeros(1))
        out[f"mean_{name}_ms"] = s.mean()
        out[f"median_{name}_ms"] = s.median()
        out[f"std_{name}_ms"] = s.std()
        out[f"p99_{name}_ms"] = s.percentile(99)
    return out


def summarize(requests: Iterable[Request] | Tally, *, committed_tokens: int, request_steps: int,
              overhead_ms: Mapping[str, float] | None = None,
              registered: int | None = None) -> dict[str, Any]:
    """All metrics of a run (docs/definitions.md §3), from its requests or from the ``Tally`` they
    were added to as they left the system. ``registered`` defaults to the number of requests;
    requests neither finished nor rejected (a run cut short) are counted as ``unfinished``."""
    tally = requests if isinstance(requests, Tally) else Tally.of(requests)
    time_ms = tally.serving_time_ms()
    overall = tally.overall()
    reasons: dict[str, int] = {}
    rejected = tally.rejected()
    for x in rejected:
        reasons[x["reason"]] = reasons.get(x["reason"], 0) + 1
    return {
        "total_time_ms": time_ms,
        **_group_metrics(overall, time_ms),
        "registered": len(tally) if registered is None else registered,
        "unfinished": overall.unfinished,
        "rejected": len(rejected), "rejected_reasons": reasons, "rejected_requests": rejected,
        "committed_tokens": committed_tokens, "request_steps": request_steps,
        "mean_generated_tokens_per_step": _ratio(committed_tokens, request_steps),
        "per_category": {cat: _group_metrics(g, time_ms) for cat, g in
                         sorted(tally.groups.items(), key=lambda kv: category_sort_key(kv[0]))},
        "overhead": None if overhead_ms is None else overhead_breakdown(overhead_ms),
        "exact_latency_stats": overall.exact and tally.itls.exact,
        "vllm": vllm_fields(overall, tally.itls, time_ms / 1000.0),
    }

"""Replay a trace against any OpenAI-compatible server and write the result files
(docs/definitions.md §7).

Every record is sent at its ``emission_time_ms`` (from the start of the run) as a streaming
``/v1/completions`` request with ``max_tokens = output_length``, ``temperature = 0``,
``ignore_eos`` (dropped for the rest of the run if the server rejects it), the SLO as the body field
``slo_ratio`` and the header ``x-slo-tpot-ms`` (``slo_ms`` with ``--baseline-ms``), and
``stream_options`` asking for usage (vLLM's ``continuous_usage_stats`` gives the token count of
every chunk; without it a chunk with text counts as one token and the final usage corrects the total).

Timestamps (ms since the start of the run, the client's clock): arrival = admission = the send
time; the first token = the first chunk that carries tokens (= first decode step: the client sees
neither queueing nor prefill separately); finish = the last token chunk. Every token of a chunk is
stamped with the chunk's time. With these, ``core.metrics.summarize`` computes TTFT, TPOT, decode
latency, attainment and goodput exactly as for the in-process runs. Tokens per step: the server
streams one chunk per engine step (ours does), so committed tokens / request steps is measured as
(tokens − 1) / (token chunks − 1) summed over requests.

A failed request (HTTP error, error event, broken stream, timeout, no tokens) is kept as
``Phase.REJECTED`` with ``finish_reason = "failed: ..."``: counted in ``registered``, listed under
``rejected_reasons`` and in the meta's ``failed``, never silently dropped.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from adaserve.core.errors import UserError
from adaserve.core.metrics import summarize
from adaserve.core.progress import progress
from adaserve.core.request import Phase, Request
from adaserve.core.results import write_results
from adaserve.core.trace import TraceRecord, load_trace, prepare_records, to_requests

SLO_HEADER = "x-slo-tpot-ms"


@dataclass
class BenchConfig:
    endpoint: str                   # http://host:port (a trailing /v1 is accepted)
    baseline_ms: float
    model: str | None = None        # None: the first model of GET /v1/models
    api_key: str | None = None
    timeout_s: float = 600.0        # per request
    ignore_eos: bool = True
    send_slo: bool = True
    progress: bool = True
    max_requests: int | None = None  # replay only the first N records
    time_scale: float = 1.0         # multiply arrival times (a slower rate for CPU speed)
    output_len_cap: int | None = None
    scale_slos: bool = False        # absolute SLOs x baseline_ms / 30 (docs/definitions.md §1)

    @property
    def base_url(self) -> str:
        url = self.endpoint.rstrip("/")
        return url[:-3] if url.endswith("/v1") else url


@dataclass
class Outcome:
    """What the client observed for one request, besides the ``Request`` timestamps."""

    chunks: int = 0                 # chunks that carried tokens
    error: str | None = None
    text: str = ""


@dataclass
class RunState:
    t0: float
    ignore_eos: bool
    server_baseline_ms: float | None = None
    outcomes: dict[int, Outcome] = field(default_factory=dict)

    def now_ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1e3


class RequestFailed(Exception):
    pass


# ------------------------------------------------------------------------------------ one request

def _payload(rec: TraceRecord, model: str, ignore_eos: bool, send_slo: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "prompt": rec.prompt, "max_tokens": rec.output_length,
                            "temperature": 0.0, "stream": True,
                            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    if send_slo:
        body["slo_ratio"] = rec.slo_ratio
        if rec.category:
            body["slo_category"] = rec.category
    return body


def _error_text(status: int, raw: bytes) -> tuple[str, str | None]:
    """``(message, param)`` of an error response (OpenAI body or plain text)."""
    try:
        err = json.loads(raw).get("error", {})
        return f"HTTP {status}: {err.get('message', raw[:200])}", err.get("param")
    except (ValueError, AttributeError):
        return f"HTTP {status}: {raw[:200]!r}", None


def _chunk_tokens(obj: dict, counted: int) -> tuple[int, int | None]:
    """New tokens in a chunk and the server's cumulative count if it reports one."""
    u = obj.get("usage")
    total = u.get("completion_tokens") if isinstance(u, dict) else None
    if isinstance(total, int) and obj.get("choices"):
        return max(total - counted, 0), total
    choices = obj.get("choices") or []
    if not choices:
        return 0, total if isinstance(total, int) else None
    c = choices[0]
    ids = c.get("token_ids")
    if isinstance(ids, list):
        return len(ids), None
    return (1 if c.get("text") or (c.get("delta") or {}).get("content") else 0), None


async def _stream(client: httpx.AsyncClient, r: Request, body: dict, headers: dict, st: RunState,
                  out: Outcome) -> None:
    """Send one request and stamp ``r`` with what arrives; raises RequestFailed."""
    final_total = None
    async with client.stream("POST", "/v1/completions", json=body, headers=headers) as resp:
        if resp.status_code != 200:
            msg, param = _error_text(resp.status_code, await resp.aread())
            raise RequestFailed(msg if param != "ignore_eos" else "ignore_eos")
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if not isinstance(obj, dict):
                raise RequestFailed(f"malformed event: {data[:100]}")
            if "error" in obj:
                err = obj["error"]
                raise RequestFailed(f"error event: {err.get('message') if isinstance(err, dict) else err}")
            n, total = _chunk_tokens(obj, r.generated)
            final_total = total if total is not None else final_total
            for c in obj.get("choices") or []:
                out.text += c.get("text") or (c.get("delta") or {}).get("content") or ""
                r.finish_reason = c.get("finish_reason") or r.finish_reason
            u = obj.get("usage")
            if isinstance(u, dict) and isinstance(u.get("prompt_tokens"), int):
                r.input_len = u["prompt_tokens"]
            if n > 0:
                _stamp(r, n, st.now_ms(), out)
    if final_total is not None and final_total > r.generated and r.token_times_ms:
        _stamp(r, final_total - r.generated, r.token_times_ms[-1], out, chunk=False)


def _stamp(r: Request, n: int, t: float, out: Outcome, chunk: bool = True) -> None:
    if r.first_token_ms is None:
        r.first_token_ms = r.first_decode_ms = t
    r.generated += n
    r.token_times_ms.extend([t] * n)
    r.finish_ms = t
    out.chunks += chunk


async def _one(client: httpx.AsyncClient, rec: TraceRecord, r: Request, cfg: BenchConfig, model: str,
               st: RunState) -> None:
    await asyncio.sleep(max(0.0, rec.emission_time_ms / 1e3 - (time.perf_counter() - st.t0)))
    out = st.outcomes.setdefault(r.rid, Outcome())
    headers = {SLO_HEADER: f"{r.slo_ms:g}"} if cfg.send_slo and math.isfinite(r.slo_ms) else {}
    r.arrival_ms = r.admitted_ms = st.now_ms()
    try:
        try:
            await _stream(client, r, _payload(rec, model, st.ignore_eos, cfg.send_slo), headers, st, out)
        except RequestFailed as e:
            if str(e) != "ignore_eos":
                raise
            st.ignore_eos = False  # the server does not take it: stop sending it
            await _stream(client, r, _payload(rec, model, False, cfg.send_slo), headers, st, out)
        if r.generated == 0:
            raise RequestFailed("no tokens received")
        r.phase = Phase.FINISHED
        r.steps = max(out.chunks - 1, 0)
    except RequestFailed as e:
        _fail(r, out, str(e))
    except Exception as e:  # transport errors, timeouts, malformed streams: a failed request, not a crash
        _fail(r, out, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)


def _fail(r: Request, out: Outcome, message: str) -> None:
    out.error = message
    r.phase = Phase.REJECTED
    r.finish_reason = f"failed: {message[:160]}"


# ------------------------------------------------------------------------------------------ a run

async def _model_name(client: httpx.AsyncClient) -> str:
    resp = await client.get("/v1/models")
    if resp.status_code != 200:
        raise UserError(f"GET /v1/models: {_error_text(resp.status_code, resp.content)[0]}; pass --model")
    data = resp.json().get("data") or []
    if not data:
        raise UserError("GET /v1/models lists no model; pass --model")
    return str(data[0]["id"])


async def _server_baseline(client: httpx.AsyncClient) -> float | None:
    """The ``baseline_ms`` our server reports on /health (None for other servers)."""
    try:
        resp = await client.get("/health")
        v = resp.json().get("baseline_ms") if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


async def replay(records: Sequence[TraceRecord], cfg: BenchConfig) -> tuple[list[Request], RunState, str]:
    """Send every record at its time; returns the stamped requests, the run's state and the model.
    ``RunState.server_baseline_ms``: the server's own baseline if it reports one (ours does): relative
    SLOs (``slo_ratio > 0``) are scheduled with it, so it should equal ``--baseline-ms``."""
    requests = to_requests(records, cfg.baseline_ms)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    timeout = httpx.Timeout(cfg.timeout_s, connect=min(cfg.timeout_s, 30.0))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=cfg.base_url, headers=headers, timeout=timeout, limits=limits) as client:
        try:
            model = cfg.model or await _model_name(client)
        except httpx.HTTPError as e:
            raise UserError(f"cannot reach {cfg.base_url}: {type(e).__name__}: {e}") from None
        server_baseline = await _server_baseline(client)
        if server_baseline is not None and not math.isclose(server_baseline, cfg.baseline_ms, rel_tol=0.01):
            print(f"adaserve bench: warning: the server schedules relative SLOs with baseline {server_baseline:g} ms, "
                  f"this run evaluates them with --baseline-ms {cfg.baseline_ms:g}", file=sys.stderr)
        st = RunState(time.perf_counter(), cfg.ignore_eos, server_baseline_ms=server_baseline)
        bar = progress(len(records), "requests", "req", enabled=cfg.progress, leave=False)
        tasks = [asyncio.ensure_future(_one(client, rec, r, cfg, model, st)) for rec, r in zip(records, requests)]
        for fut in asyncio.as_completed(tasks):
            await fut
            bar.update(1)
            bar.set_postfix(failed=sum(o.error is not None for o in st.outcomes.values()), refresh=False)
        bar.close()
    return requests, st, model


def run_bench(trace: str | Path, out: str | Path, cfg: BenchConfig) -> tuple[Path, Path, dict]:
    """Replay ``trace`` and write ``OUT.txt`` / ``OUT.json``; returns their paths and the summary."""
    if not (cfg.baseline_ms > 0 and math.isfinite(cfg.baseline_ms)):
        raise UserError(f"--baseline-ms must be a positive number, got {cfg.baseline_ms}")
    if not cfg.base_url.startswith(("http://", "https://")):
        raise UserError(f"--endpoint must be an http(s):// URL, got {cfg.endpoint!r}")
    if not (cfg.time_scale > 0 and math.isfinite(cfg.time_scale)):
        raise UserError(f"--time-scale must be a positive number, got {cfg.time_scale}")
    records = prepare_records(load_trace(trace), baseline_ms=cfg.baseline_ms, scale_slos=cfg.scale_slos,
                              max_requests=cfg.max_requests, time_scale=cfg.time_scale,
                              output_len_cap=cfg.output_len_cap)
    requests, st, model = asyncio.run(replay(records, cfg))
    summary = _summary(requests)
    failures = Counter(o.error for o in st.outcomes.values() if o.error is not None)
    meta = {"system": "http", "backend": "http", "endpoint": cfg.base_url, "model": model,
            "trace": str(trace), "baseline_ms": cfg.baseline_ms, "server_baseline_ms": st.server_baseline_ms,
            "requests": len(records),
            "time_scale": cfg.time_scale, "output_len_cap": cfg.output_len_cap, "scale_slos": cfg.scale_slos,
            "failed": sum(failures.values()), "ignore_eos": st.ignore_eos, "slo_fields_sent": cfg.send_slo,
            "failure_reasons": dict(failures.most_common(10)),
            "tokens_per_step": "measured as tokens per streamed chunk (one chunk per engine step)"}
    txt, js = write_results(out, summary, requests, meta)
    return txt, js, summary


def _summary(requests: list[Request]) -> dict[str, Any]:
    done = [r for r in requests if r.phase == Phase.FINISHED]
    summary = summarize(requests, committed_tokens=sum(r.generated - 1 for r in done),
                        request_steps=sum(r.steps for r in done))
    failed = sum(r.phase == Phase.REJECTED for r in requests)
    summary["failed"] = failed
    summary["vllm"]["failed"] = failed
    summary["vllm"]["num_prompts"] = len(requests)
    return summary

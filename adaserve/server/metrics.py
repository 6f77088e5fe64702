"""Prometheus text exposition (format 0.0.4) of the server's metrics, without a client library.

Per category (the request's SLO class, ``core.slo.category_of``): finished requests, attained
requests and the attainment fraction (SPEC §2: attained / completed), TTFT and TPOT histograms
(``core.metrics`` definitions, seconds). Engine-wide: tokens per step, running and waiting
requests, KV blocks in use, iterations, cancelled / rejected / failed requests.

Updated from the engine thread, rendered on the event loop thread: one lock guards the counters.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Mapping, Sequence

from adaserve.core.metrics import tpot_ms, ttft_ms
from adaserve.core.request import Phase, Request

TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
MAX_CATEGORIES = 32  # label cardinality cap: further categories are reported as "other"
PREFIX = "adaserve"


class Histogram:
    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{_fmt(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        out.append(f"{name}_sum{{{labels}}} {_fmt(self.sum)}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _labels(d: Mapping[str, object]) -> str:
    return ",".join(f'{k}="{_escape(str(v))}"' for k, v in d.items())


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class ServerMetrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.finished: dict[str, int] = defaultdict(int)
        self.attained: dict[str, int] = defaultdict(int)
        self.ended: dict[tuple[str, str], int] = defaultdict(int)  # (category, outcome)
        self.ttft: dict[str, Histogram] = {}
        self.tpot: dict[str, Histogram] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.http_errors: dict[int, int] = defaultdict(int)
        self._categories: set[str] = set()

    def _category(self, name: str) -> str:
        if name in self._categories or len(self._categories) < MAX_CATEGORIES:
            self._categories.add(name)
            return name
        return "other"

    def request_done(self, r: Request) -> None:
        """A request left the engine (finished, cancelled or rejected)."""
        with self.lock:
            cat = self._category(r.category)
            outcome = {Phase.FINISHED: "finished", Phase.CANCELLED: "cancelled"}.get(r.phase, "rejected")
            self.ended[(cat, outcome)] += 1
            self.generation_tokens += r.generated
            if r.phase != Phase.REJECTED:
                self.prompt_tokens += r.input_len
            if r.phase != Phase.FINISHED:
                return
            self.finished[cat] += 1
            self.attained[cat] += bool(r.attained)
            t = ttft_ms(r)
            if t is not None:
                self.ttft.setdefault(cat, Histogram(TTFT_BUCKETS_S)).observe(t / 1e3)
            t = tpot_ms(r)
            if t is not None:
                self.tpot.setdefault(cat, Histogram(TPOT_BUCKETS_S)).observe(t / 1e3)

    def request_failed(self, r: Request) -> None:
        with self.lock:
            self.ended[(self._category(r.category), "failed")] += 1

    def http_error(self, status: int) -> None:
        with self.lock:
            self.http_errors[status] += 1

    def render(self, engine: Mapping[str, int], info: Mapping[str, str | float]) -> str:
        with self.lock:
            return "\n".join(self._lines(engine, info)) + "\n"

    def _lines(self, engine: Mapping[str, int], info: Mapping[str, str | float]) -> list[str]:
        p = PREFIX
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[str]) -> None:
            out.extend([f"# HELP {p}_{name} {help_}", f"# TYPE {p}_{name} {kind}"] + samples)

        cats = sorted(set(self.finished) | {c for c, _ in self.ended})
        metric("info", "gauge", "Server information.", [f"{p}_info{{{_labels(info)}}} 1"])
        metric("requests_finished_total", "counter", "Requests that finished (EOS or length), by SLO category.",
               [f'{p}_requests_finished_total{{category="{_escape(c)}"}} {self.finished[c]}' for c in cats])
        metric("requests_attained_total", "counter", "Finished requests that met their TPOT SLO (SPEC §2).",
               [f'{p}_requests_attained_total{{category="{_escape(c)}"}} {self.attained[c]}' for c in cats])
        metric("slo_attainment", "gauge", "Attained / finished requests per category (NaN before the first).",
               [f'{p}_slo_attainment{{category="{_escape(c)}"}} '
                f'{_fmt(self.attained[c] / self.finished[c]) if self.finished[c] else "NaN"}' for c in cats])
        metric("requests_ended_total", "counter", "Requests that left the engine, by category and outcome.",
               [f'{p}_requests_ended_total{{category="{_escape(c)}",outcome="{o}"}} {n}'
                for (c, o), n in sorted(self.ended.items())])
        metric("time_to_first_token_seconds", "histogram", "Arrival to first token, finished requests.",
               [x for c in sorted(self.ttft) for x in
                self.ttft[c].lines(f"{p}_time_to_first_token_seconds", f'category="{_escape(c)}"')])
        metric("time_per_output_token_seconds", "histogram", "(finish - first token) / (tokens - 1).",
               [x for c in sorted(self.tpot) for x in
                self.tpot[c].lines(f"{p}_time_per_output_token_seconds", f'category="{_escape(c)}"')])
        metric("prompt_tokens_total", "counter", "Prompt tokens of served requests.",
               [f"{p}_prompt_tokens_total {self.prompt_tokens}"])
        metric("generation_tokens_total", "counter", "Generated tokens.",
               [f"{p}_generation_tokens_total {self.generation_tokens}"])
        out.extend(self._engine_lines(engine))
        metric("http_errors_total", "counter", "Error responses by HTTP status.",
               [f'{p}_http_errors_total{{status="{s}"}} {n}' for s, n in sorted(self.http_errors.items())])
        return out

    def _engine_lines(self, e: Mapping[str, int]) -> list[str]:
        p = PREFIX
        steps = e.get("request_steps", 0)
        tps = e.get("committed_tokens", 0) / steps if steps else float("nan")
        rows = [
            ("num_requests_running", "gauge", "Requests decoding.", e.get("running", 0)),
            ("num_requests_waiting", "gauge", "Requests queued or prefilling.", e.get("waiting", 0)),
            ("kv_blocks_in_use", "gauge", "Target KV cache blocks allocated.", e.get("kv_blocks_in_use", 0)),
            ("kv_blocks_total", "gauge", "Target KV cache blocks.", e.get("kv_blocks_total", 0)),
            ("kv_reserved_tokens", "gauge", "KV tokens reserved by admitted requests.",
             e.get("kv_reserved_tokens", 0)),
            ("iterations_total", "counter", "Engine iterations.", e.get("iterations", 0)),
            ("committed_tokens_total", "counter", "Tokens committed in decode steps (accepted + bonus).",
             e.get("committed_tokens", 0)),
            ("request_steps_total", "counter", "Sum over decode steps of requests in the step.", steps),
            ("mean_generated_tokens_per_step", "gauge", "committed_tokens_total / request_steps_total.", tps),
            ("engine_failures_total", "counter", "Iterations that raised (their requests failed).",
             e.get("engine_failures", 0)),
        ]
        out = []
        for name, kind, help_, v in rows:
            out += [f"# HELP {p}_{name} {help_}", f"# TYPE {p}_{name} {kind}", f"{p}_{name} {_fmt(v)}"]
        return out


def parse_prometheus(text: str) -> dict[str, float]:
    """Samples of an exposition text as ``{'name{labels}': value}`` (for tests and the bench)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out

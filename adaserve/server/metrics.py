"""The server's Prometheus metrics, on ``prometheus_client`` with one ``CollectorRegistry`` per
``ServerMetrics`` (so one process can hold several apps, e.g. in tests).

Per category (the request's SLO class, ``core.slo.category_of``): finished requests, attained
requests and the attainment fraction (attained / finished, docs/definitions.md), TTFT and TPOT
histograms (``core.metrics`` definitions, seconds). Engine-wide, read from the engine thread's
snapshot at each scrape: tokens per step, running and waiting requests, KV blocks in use,
iterations, engine failures. HTTP side: error answers by status, clients that went away by stage.

Category labels: a client chooses ``slo_category`` freely, so only the known categories (the
paper's ``coding``/``chat``/``summarization``, ``best_effort``, and whatever the server was
configured with) become label values; every other category is counted under ``other``.

Updated from the engine thread and the event loop; ``prometheus_client`` metrics are thread-safe,
and one lock keeps the attainment gauge consistent with its two counts.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from adaserve.core.metrics import tpot_ms, ttft_ms
from adaserve.core.request import Phase, Request
from adaserve.core.slo import CATEGORIES

TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
KNOWN_CATEGORIES = (*(c.name for c in CATEGORIES), "best_effort")
OTHER = "other"
PREFIX = "adaserve"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (name, kind, help, snapshot key) of the engine-wide values
ENGINE_ROWS = (
    ("num_requests_running", "gauge", "Requests decoding.", "running"),
    ("num_requests_waiting", "gauge", "Requests queued or prefilling.", "waiting"),
    ("kv_blocks_in_use", "gauge", "Target KV cache blocks held by requests (their claimed reservations).",
     "kv_blocks_in_use"),
    ("kv_blocks_total", "gauge", "Target KV cache blocks.", "kv_blocks_total"),
    ("kv_reserved_tokens", "gauge", "KV tokens reserved by admitted requests.", "kv_reserved_tokens"),
    ("iterations", "counter", "Engine iterations.", "iterations"),
    ("committed_tokens", "counter", "Tokens committed in decode steps (accepted + bonus).", "committed_tokens"),
    ("request_steps", "counter", "Sum over decode steps of requests in the step.", "request_steps"),
    ("engine_failures", "counter", "Iterations that raised (their requests failed).", "engine_failures"),
)


class EngineCollector(Collector):
    """The engine thread's counters (``EngineThread.snapshot``), read at scrape time."""

    def __init__(self, snapshot: Callable[[], Mapping[str, float]]):
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        e = self.snapshot()
        for name, kind, help_, key in ENGINE_ROWS:
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            yield family(f"{PREFIX}_{name}", help_, value=e.get(key, 0))
        steps = e.get("request_steps", 0)
        yield GaugeMetricFamily(f"{PREFIX}_mean_generated_tokens_per_step",
                                "committed_tokens_total / request_steps_total (NaN before the first step).",
                                value=e.get("committed_tokens", 0) / steps if steps else math.nan)


class ServerMetrics:
    """Everything ``GET /metrics`` shows; ``bind`` attaches the engine snapshot and the server info."""

    def __init__(self, categories: Iterable[str] = KNOWN_CATEGORIES):
        self.categories = frozenset(categories)
        self.registry = r = CollectorRegistry()
        p = PREFIX
        self.info = Info(p, "Server information.", registry=r)
        self.finished = Counter(f"{p}_requests_finished", "Requests that finished (EOS or length), by SLO category.",
                                ["category"], registry=r)
        self.attained = Counter(f"{p}_requests_attained", "Finished requests that met their TPOT SLO.",
                                ["category"], registry=r)
        self.attainment = Gauge(f"{p}_slo_attainment", "Attained / finished requests per category "
                                "(NaN before the first).", ["category"], registry=r)
        self.ended = Counter(f"{p}_requests_ended", "Requests that left the engine, by category and outcome.",
                             ["category", "outcome"], registry=r)
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "Arrival to first token, finished requests.",
                              ["category"], buckets=TTFT_BUCKETS_S, registry=r)
        self.tpot = Histogram(f"{p}_time_per_output_token_seconds", "(finish - first token) / (tokens - 1).",
                              ["category"], buckets=TPOT_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens of served requests.", registry=r)
        self.generation_tokens = Counter(f"{p}_generation_tokens", "Generated tokens.", registry=r)
        self.http_errors = Counter(f"{p}_http_errors", "Error responses by HTTP status.", ["status"], registry=r)
        self.client_disconnects = Counter(
            f"{p}_client_disconnects", "Clients that went away before their answer was complete, by stage "
            "(body: during the upload; response: waiting for a non-streamed answer; stream: mid-stream).",
            ["stage"], registry=r)
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[int, int]] = {}  # category -> (finished, attained), for the gauge
        self._engine: EngineCollector | None = None

    def bind(self, snapshot: Callable[[], Mapping[str, float]], info: Mapping[str, object],
             categories: Iterable[str] | None = None) -> None:
        """Show the engine's counters (read at each scrape) and ``adaserve_info{...} 1``;
        ``categories``: the known categories (label values), if not the default ones."""
        if categories is not None:
            self.categories = frozenset(categories)
        if self._engine is not None:
            self.registry.unregister(self._engine)
        self._engine = EngineCollector(snapshot)
        self.registry.register(self._engine)
        self.info.info({k: str(v) for k, v in info.items()})

    def category(self, name: str) -> str:
        """The label value of a request's category: itself if known, else ``other``."""
        return name if name in self.categories else OTHER

    # ---- engine thread ------------------------------------------------------------------------
    def request_done(self, r: Request) -> None:
        """A request left the engine (finished, cancelled or rejected)."""
        cat = self.category(r.category)
        outcome = {Phase.FINISHED: "finished", Phase.CANCELLED: "cancelled"}.get(r.phase, "rejected")
        self.ended.labels(cat, outcome).inc()
        self.generation_tokens.inc(r.generated)
        if r.phase != Phase.REJECTED:
            self.prompt_tokens.inc(r.input_len)
        done = r.phase == Phase.FINISHED
        self._count(cat, int(done), int(done and r.attained))
        if not done:
            return
        t = ttft_ms(r)
        if t is not None:
            self.ttft.labels(cat).observe(t / 1e3)
        t = tpot_ms(r)
        if t is not None:
            self.tpot.labels(cat).observe(t / 1e3)

    def request_failed(self, r: Request) -> None:
        cat = self.category(r.category)
        self.ended.labels(cat, "failed").inc()
        self._count(cat, 0, 0)

    def _count(self, cat: str, finished: int, attained: int) -> None:
        """Every category that ended a request shows its two counts and its attainment (NaN at 0)."""
        with self._lock:
            f, a = self._counts.get(cat, (0, 0))
            f, a = f + finished, a + attained
            self._counts[cat] = (f, a)
            self.finished.labels(cat).inc(finished)
            self.attained.labels(cat).inc(attained)
            self.attainment.labels(cat).set(a / f if f else math.nan)

    # ---- HTTP side ----------------------------------------------------------------------------
    def http_error(self, status: int) -> None:
        self.http_errors.labels(str(status)).inc()

    def client_disconnect(self, stage: str) -> None:
        self.client_disconnects.labels(stage).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition (``CONTENT_TYPE``)."""
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated(Collector):
    """The registry's metrics without the ``*_created`` timestamps that ``prometheus_client`` adds
    to counters and histograms (an OpenMetrics notion; switching them off is process-wide)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for m in self.registry.collect():
            m.samples = [s for s in m.samples if s.name != m.name + "_created"]
            yield m


def parse_prometheus(text: str) -> dict[str, float]:
    """Samples of an exposition text as ``{'name{k="v",...}': value}`` (for tests and the bench)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in s.labels.items())
            out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
    return out


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

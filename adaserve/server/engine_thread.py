"""The serving loop on its own thread, fed through a queue.

Everything that touches the ``ServingLoop`` and the executor (submit, cancel, iterations) runs on
the engine thread. The HTTP side (the asyncio event loop) sends commands through a thread-safe
queue and receives each request's events (token ids, the end) on a per-request ``asyncio.Queue``;
the engine thread hands all events of one iteration to the event loop in one
``call_soon_threadsafe`` call.

A failing iteration (a bug, out of memory) does not kill the thread: the requests in flight are
cancelled (their KV freed), their clients receive an error event, and the loop serves new requests.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import queue
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any

from adaserve.core.request import Request
from adaserve.engine.sequence import SamplingOptions
from adaserve.iteration import ServingLoop
from adaserve.scheduling.admission import kv_reservation
from adaserve.server.metrics import ServerMetrics

log = logging.getLogger("adaserve.server")


@dataclass
class Tokens:
    ids: list[int]
    t_ms: float


@dataclass
class Finished:
    request: Request  # no longer touched by the engine thread


@dataclass
class Failed:
    message: str


@dataclass(eq=False)
class Job:
    """One HTTP request in the engine: its scheduler ``Request``, prompt ids, sampling options (None:
    the executor's defaults) and event queue."""

    request: Request
    prompt_ids: list[int]
    options: SamplingOptions | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    error: str | None = None  # set by the engine thread before a failure cancels the request

    @property
    def rid(self) -> int:
        return self.request.rid


class EngineThread:
    """Owns a ``ServingLoop`` (policy + executor) and runs it on a daemon thread."""

    def __init__(self, policy: Any, executor: Any, metrics: ServerMetrics | None = None):
        self.executor = executor
        self.loop = ServingLoop(policy, executor, on_finish=self._on_finish, on_commit=self._on_commit)
        self.metrics = metrics or ServerMetrics()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.jobs: dict[int, Job] = {}              # engine thread only
        self._out: list[tuple[Job, Any]] = []       # events of the current iteration
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self.initial_free_blocks = executor.cache.alloc.free_blocks
        self.failures = 0
        self.snapshot: dict[str, int] = {}
        self._publish()

    # ---- limits -------------------------------------------------------------------------------
    @property
    def max_seq_len(self) -> int:
        return self.executor.latency.limits.max_seq_len

    def fits_kv(self, input_len: int, max_new_tokens: int) -> bool:
        probe = Request(0, 0.0, input_len, max_new_tokens, 1000.0, math.inf, "probe")
        return kv_reservation(probe, self.max_seq_len) <= self.executor.kv_capacity_tokens

    # ---- life cycle (event loop side) -----------------------------------------------------------
    def start(self, aloop: asyncio.AbstractEventLoop) -> None:
        self._aloop = aloop
        self._thread = threading.Thread(target=self._run, name="adaserve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self.inbox.put(("stop", None))
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def now(self) -> float:
        return self.executor.now()

    def new_request(self, input_len: int, max_new_tokens: int, slo_ratio: float, slo_ms: float,
                    category: str) -> Request:
        return Request(rid=next(self._ids), arrival_ms=self.now(), input_len=input_len,
                       max_new_tokens=max_new_tokens, slo_ratio=slo_ratio, slo_ms=slo_ms, category=category)

    def submit(self, job: Job) -> None:
        self.inbox.put(("submit", job))

    def cancel(self, job: Job) -> None:
        """Withdraw the request (no-op once it has finished)."""
        self.inbox.put(("cancel", job))

    # ---- engine thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            if not self._drain(block=not self.loop.busy):
                break
            try:
                self.loop.run_once()
            except Exception:
                self._fail_all(traceback.format_exc())
            self._publish()
            self._flush()
        for job in list(self.jobs.values()):  # shutting down: end every open request
            job.error = "the server is shutting down"
            self._safe_cancel(job)
        self._flush()

    def _drain(self, block: bool) -> bool:
        """Apply queued commands (waiting for one if ``block``); False on stop."""
        try:
            cmd = self.inbox.get() if block else self.inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind, arg = cmd
            if kind == "stop":
                return False
            self._apply(kind, arg)
            try:
                cmd = self.inbox.get_nowait()
            except queue.Empty:
                break
        self._publish()
        self._flush()
        return True

    def _apply(self, kind: str, arg: Any) -> None:
        if kind == "submit":
            job: Job = arg
            r = job.request
            r.arrival_ms = min(r.arrival_ms, self.now())
            self.jobs[r.rid] = job
            self.executor.set_prompts({r.rid: job.prompt_ids})
            if job.options is not None:
                self.executor.set_options({r.rid: job.options})
            self.loop.submit(r)
        elif kind == "cancel":
            if arg.rid in self.jobs:
                self._safe_cancel(arg)

    def _safe_cancel(self, job: Job) -> None:
        try:
            self.loop.cancel(job.request)
        except Exception:
            log.exception("cancelling request %d failed", job.rid)
            self._finish_job(job.request)

    def _fail_all(self, tb: str) -> None:
        self.failures += 1
        log.error("engine iteration failed; cancelling %d request(s)\n%s", len(self.jobs), tb)
        reason = tb.strip().splitlines()[-1]
        for job in list(self.jobs.values()):
            job.error = f"engine failure: {reason}"
            self._safe_cancel(job)

    def _on_commit(self, r: Request, ids: list[int]) -> None:
        job = self.jobs.get(r.rid)
        if job is not None:
            self._out.append((job, Tokens(list(ids), self.now())))

    def _on_finish(self, r: Request) -> None:
        self._finish_job(r)

    def _finish_job(self, r: Request) -> None:
        # the request has left the loop and its tokens were streamed (on_commit): a long-running
        # server keeps nothing per request
        self.executor.forget(r.rid)
        job = self.jobs.pop(r.rid, None)
        if job is None:
            return
        if r.finish_reason == "error" and job.error is None:  # its own step failed (StepOutput.failed)
            job.error = r.error
        if job.error is not None:
            self.metrics.request_failed(r)
            self._out.append((job, Failed(job.error)))
        else:
            self.metrics.request_done(r)
            self._out.append((job, Finished(r)))

    def _publish(self) -> None:
        """Counters that /metrics and /health read from the event loop thread."""
        st = self.loop.stats
        self.snapshot = {
            "running": len(self.loop.running),
            "waiting": len(self.loop.waiting) + len(self.loop.pending),
            "kv_blocks_total": self.executor.num_blocks,
            "kv_blocks_in_use": self.executor.num_blocks - self.executor.cache.alloc.free_blocks,
            "kv_reserved_tokens": self.loop.kv_reserved,
            "iterations": st.iterations, "committed_tokens": st.committed_tokens,
            "request_steps": st.request_steps, "engine_failures": self.failures,
        }

    def _flush(self) -> None:
        if self._out and self._aloop is not None:
            batch, self._out = self._out, []
            try:
                self._aloop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass


def _deliver(batch: list[tuple[Job, Any]]) -> None:
    for job, event in batch:
        job.events.put_nowait(event)

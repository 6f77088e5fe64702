"""One serving iteration — plan, speculate, select, execute, commit — and the loop that repeats it
over a trace. The simulator and the torch engine are two ``Executor``s driven by this same code.

Time: the executor owns the clock (simulated or wall). The loop reads it to stamp requests and to
split the iteration into the Figure 15 components: speculation (the executor's drafting), prefill
and verification (its target step, split by token share) on the executor's clock; scheduling, the
*measured* time of ``Policy.plan`` + ``Policy.select``; other, the measured time of the loop's own
work (building the view, admission stamps, commit caps, committing). A simulated clock does not
advance by the measured parts (so runs are deterministic); a real clock does, since it is real time.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

import numpy as np

from adaserve.core.metrics import OVERHEAD_COMPONENTS
from adaserve.core.profile import LatencyProfile
from adaserve.core.request import Phase, Request
from adaserve.scheduling.admission import kv_reservation
from adaserve.scheduling.plan import IterationView, Plan, Policy, SpecShape
from adaserve.scheduling.trees import CandidateForest


@dataclass
class StepOutput:
    """What one step produced. Token ids come from executors that have them (the engine; the
    simulator has none): front ends read a request's new tokens here, never in executor state."""

    committed: np.ndarray          # per decoding request: tokens committed (accepted + 1), capped
    eos: np.ndarray                # per decoding request: the committed tokens end with EOS
    prefill_eos: list[bool] = field(default_factory=list)  # per prefill chunk that completed a prompt
    tokens: list[list[int]] | None = None        # per decoding request: the committed token ids
    first_tokens: list[int] | None = None        # per prefill chunk that completed a prompt: its token
    failed: dict[int, str] = field(default_factory=dict)  # rid -> why its own step failed (it ends)
    # per decoding request: the forest index of the deepest accepted node (its root if none), from
    # an executor that knows it without token ids (the simulator); the engine's ids say the same
    accepted_nodes: np.ndarray | None = None


class Executor(Protocol):
    latency: LatencyProfile        # what the policy predicts with
    kv_capacity_tokens: int

    def now(self) -> float: ...

    def wait_until(self, t_ms: float) -> None: ...

    def speculate(self, requests: list[Request], shape: SpecShape) -> CandidateForest: ...

    def execute(self, prefill: list[tuple[Request, int]], decode: list[Request],
                forest: CandidateForest, selected: np.ndarray, max_commit: np.ndarray) -> StepOutput:
        """One target forward: the prefill chunks and the verification of the selected nodes.
        Commits at most ``max_commit[i]`` tokens for decoding request i."""
        ...

    def release(self, request: Request) -> None: ...


@dataclass
class LoopStats:
    iterations: int = 0
    committed_tokens: int = 0      # tokens committed in decode steps (accepted + bonus)
    request_steps: int = 0         # Σ decoding requests per step
    overhead_ms: dict = field(default_factory=lambda: dict.fromkeys(OVERHEAD_COMPONENTS, 0.0))


class ServingLoop:
    """Drives a policy and an executor. Offline (``run``): every request is known up front, as a
    list (``requests``, kept) or as ``arrivals``, an iterator in arrival order that the loop reads
    as the clock reaches each request (a long simulation then never holds the requests that have
    not arrived or have left). Online (a server): ``submit`` and ``cancel`` between calls of
    ``run_once``, all from the one thread that owns the loop; ``on_commit(request, ids)`` fires after
    a request gains tokens (``ids``: their token ids, or ``[None] * n`` from an executor without ids,
    the simulator) and ``on_finish(request)`` when it leaves the system (finished, rejected or
    cancelled)."""

    def __init__(self, policy: Policy, executor: Executor, requests: list[Request] | None = None,
                 on_finish: Callable[[Request], None] | None = None,
                 on_commit: Callable[[Request, list], None] | None = None,
                 arrivals: Iterable[Request] | None = None):
        self.policy = policy
        self.executor = executor
        self.requests = sorted(requests or [], key=lambda r: (r.arrival_ms, r.rid))
        self.pending = deque(self.requests)
        self._arrivals = None if arrivals is None else iter(arrivals)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.kv_reserved = 0
        self.stats = LoopStats()
        self.on_finish = on_finish
        self.on_commit = on_commit

    # -- arrivals and bookkeeping -------------------------------------------------------------
    def _read_arrivals(self, now: float) -> None:
        """Move from ``arrivals`` into ``pending`` every request arrived by ``now`` and the next one
        (what ``run`` waits for)."""
        while self._arrivals is not None and not (self.pending and self.pending[-1].arrival_ms > now):
            r = next(self._arrivals, None)
            if r is None:
                self._arrivals = None
            elif self.pending and (r.arrival_ms, r.rid) < (self.pending[-1].arrival_ms, self.pending[-1].rid):
                raise ValueError(f"arrivals out of order: request {r.rid} at {r.arrival_ms} ms after request "
                                 f"{self.pending[-1].rid} at {self.pending[-1].arrival_ms} ms")
            else:
                self.pending.append(r)

    def admit_arrivals(self) -> None:
        now = self.executor.now()
        max_seq = self.executor.latency.limits.max_seq_len
        self._read_arrivals(now)
        while self.pending and self.pending[0].arrival_ms <= now:
            r = self.pending.popleft()
            if r.input_len + 1 > max_seq or kv_reservation(r, max_seq) > self.executor.kv_capacity_tokens:
                r.phase, r.finish_reason = Phase.REJECTED, "prompt_too_long"
                self._done(r)
                continue
            r.phase = Phase.WAITING
            self.waiting.append(r)

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.waiting or self.running or self._arrivals is not None)

    def view(self) -> IterationView:
        return IterationView(self.executor.now(), self.waiting, self.running, self.executor.latency,
                             self.executor.kv_capacity_tokens - self.kv_reserved)

    # -- one iteration ----------------------------------------------------------------------
    def step(self) -> None:
        ex = self.executor
        start = time.perf_counter()
        view = self.view()
        plan, sched_s = _timed(self.policy.plan, view)
        if not plan.prefill and not plan.decode:
            raise RuntimeError(f"policy {self.policy.name} planned an empty iteration with "
                               f"{len(self.waiting)} waiting and {len(self.running)} running")
        for r, _ in plan.prefill:
            if r.admitted_ms is None:
                r.admitted_ms = view.now_ms
                self.kv_reserved += kv_reservation(r, ex.latency.limits.max_seq_len)
        t0 = ex.now()
        if plan.decode and plan.shape.speculative:
            forest, executor_s = _timed(ex.speculate, plan.decode, plan.shape)
        else:
            forest, executor_s = CandidateForest.roots_only(len(plan.decode)), 0.0
        t1 = ex.now()
        selection, select_s = _timed(self.policy.select, plan, forest, view)
        sched_s += select_s
        verified = int(selection.selected.sum())
        max_commit = self._commit_caps(plan.decode)
        t2 = ex.now()  # after the selection: on a real clock its time is scheduling, not verification
        out, execute_s = _timed(ex.execute, plan.prefill, plan.decode, forest, selection.selected,
                                max_commit)
        executor_s += execute_s
        t3 = ex.now()
        self._commit(plan, out, t3)
        observe = getattr(self.policy, "observe", None)  # a policy that learns from outcomes
        if observe is not None:
            sched_s += _timed(observe, plan, forest, selection, out)[1]
        loop_s = time.perf_counter() - start - executor_s - sched_s
        self._account(plan, verified, t1 - t0, t3 - t2, sched_s * 1e3, loop_s * 1e3)

    # -- online use -------------------------------------------------------------------------
    def submit(self, r: Request) -> None:
        """Add a request (arrival on the executor's clock); it is not kept in ``requests``."""
        r.phase = Phase.PENDING
        keys = [(q.arrival_ms, q.rid) for q in self.pending]
        self.pending.insert(bisect.bisect_right(keys, (r.arrival_ms, r.rid)), r)

    def cancel(self, r: Request) -> bool:
        """Withdraw a request wherever it is, freeing its KV; False if it already left."""
        if r in self.pending:
            self.pending.remove(r)
        elif r in self.waiting or r in self.running:
            (self.waiting if r in self.waiting else self.running).remove(r)
            if r.admitted_ms is not None:
                self.kv_reserved -= kv_reservation(r, self.executor.latency.limits.max_seq_len)
                self.executor.release(r)
        else:
            return False
        r.phase, r.finish_reason, r.finish_ms = Phase.CANCELLED, "cancelled", self.executor.now()
        self._done(r)
        return True

    def run_once(self) -> bool:
        """Admit what has arrived and run one iteration if there is work; False if idle."""
        self.admit_arrivals()
        if not self.waiting and not self.running:
            return False
        self.step()
        return True

    def _commit_caps(self, decode: list[Request]) -> np.ndarray:
        """Per decoding request: the most tokens it may commit (its budget and the max length)."""
        max_seq = self.executor.latency.limits.max_seq_len
        return np.array([max(1, min(r.max_new_tokens - r.generated,  # r.remaining_tokens, inlined
                                    max_seq - r.input_len - r.generated)) for r in decode], np.int64)

    def _account(self, plan: Plan, verify_tokens: int, spec_ms: float, step_ms: float,
                 sched_ms: float, other_ms: float) -> None:
        o = self.stats.overhead_ms
        prefill_tokens = sum(c for _, c in plan.prefill)
        share = prefill_tokens / max(prefill_tokens + (verify_tokens if plan.decode else 0), 1)
        o["speculation"] += spec_ms
        o["prefill"] += step_ms * share
        o["verification"] += step_ms * (1 - share)
        o["scheduling"] += sched_ms
        o["other"] += other_ms
        self.stats.iterations += 1

    def _commit(self, plan: Plan, out: StepOutput, now: float) -> None:
        completed = iter(out.prefill_eos)
        first = iter(out.first_tokens if out.first_tokens is not None else ())
        max_seq = self.executor.latency.limits.max_seq_len
        for r, chunk in plan.prefill:
            r.prefilled += chunk
            if r.prefilled >= r.input_len:
                self.waiting.remove(r)
                r.phase = Phase.DECODING
                r.generated = 1
                r.first_token_ms = r.first_decode_ms = now
                r.token_times_ms.append(now)
                self.running.append(r)
                self._notify(r, [next(first, None)])
                reason = finish_reason(r, bool(next(completed, False)), out.failed.get(r.rid), max_seq)
                if reason is not None:
                    self._finish(r, reason, out.failed.get(r.rid))
        committed, eos = np.asarray(out.committed).tolist(), np.asarray(out.eos, bool).tolist()
        failed = out.failed
        for i, r in enumerate(plan.decode):
            c = committed[i]
            r.generated += c
            r.steps += 1
            if c:
                r.token_times_ms.append(now)  # one stamp per commit: tokens of a step arrive together
            if self.on_commit is not None:
                self._notify(r, out.tokens[i] if out.tokens is not None else [None] * c)
            error = failed.get(r.rid) if failed else None
            reason = finish_reason(r, eos[i], error, max_seq)
            if reason is not None:
                self._finish(r, reason, error)
        self.stats.committed_tokens += sum(committed)
        self.stats.request_steps += len(committed)

    def _finish(self, r: Request, reason: str, error: str | None) -> None:
        if error is not None:
            r.error = error
        r.finish_ms = self.executor.now()
        r.finish_reason = reason
        r.phase = Phase.FINISHED
        self.running.remove(r)
        self.kv_reserved -= kv_reservation(r, self.executor.latency.limits.max_seq_len)
        self.executor.release(r)
        self._done(r)

    def _notify(self, r: Request, ids: list) -> None:
        if self.on_commit is not None and ids:
            self.on_commit(r, ids)

    def _done(self, r: Request) -> None:
        if self.on_finish is not None:
            self.on_finish(r)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> list[Request]:
        """Serve every request; returns those given as ``requests`` (finished or rejected)."""
        while self.busy:
            if not self.run_once() and self.pending:
                self.executor.wait_until(self.pending[0].arrival_ms)
        return self.requests


def finish_reason(r: Request, eos: bool, error: str | None, max_seq: int) -> str | None:
    """Why ``r`` finishes after its latest tokens (error, EOS, its output length, the sequence
    limit), or None while it goes on. A plain function: it runs for every decoding request in
    every iteration."""
    if error is not None:
        return "error"
    if eos:
        return "eos"
    if r.generated >= r.max_new_tokens:
        return "length"
    if r.input_len + r.generated >= max_seq:
        return "max_seq_len"
    return None


def _timed(fn, *args):
    """``fn(*args)`` and the wall seconds it took."""
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start

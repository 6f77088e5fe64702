"""The serving loop used online (as a server drives it): submit, cancel, per-commit callbacks;
its overhead breakdown."""

import time

import pytest

from adaserve.core.metrics import OVERHEAD_COMPONENTS
from adaserve.core.request import Phase, Request
from adaserve.iteration import ServingLoop
from adaserve.scheduling.policies import make_policy
from adaserve.sim.acceptance import LLAMA_ACCEPTANCE
from adaserve.sim.executor import SimExecutor
from adaserve.sim.profiles import get_profile


class Recording(SimExecutor):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.released = []

    def release(self, request):
        self.released.append(request.rid)


def request(rid, arrival=0.0, out=40):
    return Request(rid, arrival, 100, out, 1.2, 36.0, "coding")


def online_loop(system="adaserve"):
    ex = Recording(get_profile("llama-3.1-70b"), LLAMA_ACCEPTANCE, seed=0)
    commits, finished = {}, []
    loop = ServingLoop(make_policy(system, "llama"), ex,
                       on_commit=lambda r, ids: commits.__setitem__(r.rid, commits.get(r.rid, 0) + len(ids)),
                       on_finish=finished.append)
    return loop, ex, commits, finished


def test_submit_and_run_once_until_idle():
    loop, ex, commits, finished = online_loop()
    assert not loop.run_once()  # nothing to do
    reqs = [request(i) for i in range(3)]
    for r in reqs:
        loop.submit(r)
    while loop.run_once():
        pass
    assert all(r.phase == Phase.FINISHED and r.generated == 40 for r in reqs)
    assert commits == {0: 40, 1: 40, 2: 40}
    assert len(finished) == 3
    assert loop.kv_reserved == 0 and sorted(ex.released) == [0, 1, 2]


def test_cancel_frees_the_reservation_and_others_finish():
    loop, ex, commits, finished = online_loop()
    a, b, later = request(0), request(1), request(2, arrival=1e9)
    for r in (a, b, later):
        loop.submit(r)
    for _ in range(3):
        loop.run_once()
    assert a.phase == Phase.DECODING and loop.kv_reserved > 0
    assert loop.cancel(a) and a.phase == Phase.CANCELLED and a.finish_reason == "cancelled"
    assert ex.released == [0]
    assert loop.cancel(later) and later.phase == Phase.CANCELLED   # still pending: nothing to free
    assert not loop.cancel(a)                                       # already gone
    while loop.run_once():
        pass
    assert b.phase == Phase.FINISHED and b.generated == 40
    assert loop.kv_reserved == 0 and not loop.busy
    assert {r.rid for r in finished} == {0, 1, 2}


def test_submit_keeps_arrival_order():
    loop, *_ = online_loop("vllm")
    for rid, t in ((0, 50.0), (1, 10.0), (2, 30.0)):
        loop.submit(request(rid, arrival=t))
    assert [r.rid for r in loop.pending] == [1, 2, 0]


class WallClock(SimExecutor):
    """A simulated executor on the wall clock, as the real engine is: work takes real time."""

    def now(self):
        return (time.perf_counter() - self.t0) * 1e3

    def wait_until(self, t_ms):
        pass


class SlowSelect:
    """A policy whose selection takes ``delay`` seconds of real time."""

    def __init__(self, policy, delay):
        self.policy, self.delay, self.name = policy, delay, policy.name

    def plan(self, view):
        return self.policy.plan(view)

    def select(self, plan, forest, view):
        time.sleep(self.delay)
        return self.policy.select(plan, forest, view)


def test_overhead_on_a_real_clock_counts_selection_as_scheduling_and_the_loop_as_other():
    ex = WallClock(get_profile("llama-3.1-70b"), LLAMA_ACCEPTANCE, seed=0)
    ex.t0 = time.perf_counter()
    loop = ServingLoop(SlowSelect(make_policy("vllm", "llama"), 0.05), ex, [request(0, out=3)],
                       on_commit=lambda r, ids: time.sleep(0.01))
    loop.run()
    o = loop.stats.overhead_ms
    assert loop.stats.iterations == 3  # one prefill, two decode steps
    assert o["scheduling"] >= 150
    assert o["verification"] + o["prefill"] < 50  # the selection is not the target's step
    assert o["other"] >= 30  # three commits, each with its front end's callback


def test_simulated_overhead_fills_every_component():
    loop, *_ = online_loop()
    for i in range(4):
        loop.submit(request(i))
    while loop.run_once():
        pass
    o = loop.stats.overhead_ms
    assert all(o[k] > 0 for k in OVERHEAD_COMPONENTS), o


def test_arrivals_read_lazily_serve_as_a_list_does():
    """``arrivals``: an iterator the loop reads as the clock reaches each request; the same run as
    the list, and no request is read long before it arrives."""
    def reqs():
        return [request(i, arrival=250.0 * (i // 2), out=8) for i in range(8)]

    ex = Recording(get_profile("llama-3.1-70b"), LLAMA_ACCEPTANCE, seed=0)
    listed = reqs()
    ServingLoop(make_policy("adaserve", "llama"), ex, listed).run()
    ex2 = Recording(get_profile("llama-3.1-70b"), LLAMA_ACCEPTANCE, seed=0)
    read_at = {}

    def source():
        for r in reqs():
            read_at[r.rid] = ex2.now()
            yield r

    done = []
    loop = ServingLoop(make_policy("adaserve", "llama"), ex2, on_finish=done.append, arrivals=source())
    assert loop.run() == [] and not loop.busy
    lazily = sorted(done, key=lambda r: r.rid)
    assert [(r.finish_ms, r.generated) for r in lazily] == [(r.finish_ms, r.generated) for r in listed]
    # each request read at most one arrival early (the one the loop waits for)
    assert all(read_at[i] >= 250.0 * (i // 2 - 1) for i in read_at)


def test_arrivals_out_of_order_are_refused():
    ex = Recording(get_profile("llama-3.1-70b"), LLAMA_ACCEPTANCE, seed=0)
    loop = ServingLoop(make_policy("vllm", "llama"), ex, arrivals=[request(0, 500.0), request(1, 100.0)])
    with pytest.raises(ValueError, match="out of order: request 1 at 100.0 ms after request 0 at 500.0 ms"):
        loop.run()

"""The serving loop used online (as a server drives it): submit, cancel, per-commit callbacks."""

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
    loop = ServingLoop(make_policy(system, "llama-3.1-70b"), ex,
                       on_commit=lambda r, n: commits.__setitem__(r.rid, commits.get(r.rid, 0) + n),
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

"""`adaserve run` with every iteration logged: what the step held and where its time went.

    python scripts/engine_steps.py STEPS.jsonl [--cpu-clock] -- run --trace T --system adaserve ... --out PREFIX

Runs the ``adaserve`` command given after ``--`` in this process, with the engine's executor and the
serving loop wrapped (nothing else changes), and writes one JSON object per iteration to
STEPS.jsonl: ``prefill`` [[chunk, tokens already prefilled], ...], ``decode`` [[context tokens,
tree tokens], ...] with ``rids`` the decoding requests' ids in the same order (to set a step's trees
beside the requests' acceptance records), and the wall / thread-CPU ms of the iteration, of drafting (``speculate``), of
the target step (``execute``) and of the forward inside it. The forward is the model call alone,
as ``adaserve profile`` times its step tables; the rest of the iteration (batch building included)
is host work, as the profile's ``host`` table counts it. ``scripts/engine_vs_sim.py steps`` prices
each logged step with a latency profile, to find the costs the simulator misses.

``--cpu-clock``: the engine's clock (arrivals, every timestamp, TPOT, TTFT) is this thread's CPU
time plus the idle time it would have waited for arrivals (skipped, not slept). On a CPU shared
with other jobs, wall time counts the time spent waiting for a core, which changes from one minute
to the next; with one torch thread the engine's work runs on this thread, so its CPU time leaves
that wait out. Compare such a run with a profile measured on the same clock
(``ADASERVE_PROFILE_CLOCK=cpu adaserve profile ...``).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


class StepLog:
    """Per-iteration records, filled by the wrappers ``instrument`` installs."""

    def __init__(self, path: str):
        self.f = open(path, "w", encoding="utf-8")
        self.cur: dict = {}

    def add(self, key: str, wall_s: float, cpu_s: float) -> None:
        self.cur[key + "_ms"] = self.cur.get(key + "_ms", 0.0) + 1e3 * wall_s
        self.cur[key + "_cpu_ms"] = self.cur.get(key + "_cpu_ms", 0.0) + 1e3 * cpu_s

    def flush(self) -> None:
        if self.cur:
            self.f.write(json.dumps(self.cur) + "\n")
        self.cur = {}


def _timed(log: StepLog, key: str, fn):
    def wrapped(*args, **kwargs):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            log.add(key, time.perf_counter() - t0, time.thread_time() - c0)
    return wrapped


def instrument(ex, log: StepLog) -> None:
    """Wrap one ``TorchExecutor``: drafting, the target step and its forward are timed, and each
    step's contents recorded."""
    ex.speculate = _timed(log, "speculate", ex.speculate)
    ex.model = _Forward(ex.model, log)
    execute = _timed(log, "execute", ex.execute)

    def logged_execute(prefill, decode, forest, selected, max_commit):
        sel = np.asarray(selected, bool).copy()
        sel[forest.offsets[:-1]] = True  # the engine always verifies the roots
        sizes = np.add.reduceat(sel, forest.offsets[:-1]) if len(decode) else np.zeros(0, int)
        log.cur["prefill"] = [[int(c), int(r.prefilled)] for r, c in prefill]
        log.cur["decode"] = [[int(r.context_len), int(n)] for r, n in zip(decode, sizes)]
        log.cur["rids"] = [int(r.rid) for r in decode]  # whose tree each ``decode`` entry is
        return execute(prefill, decode, forest, selected, max_commit)
    ex.execute = logged_execute


def cpu_clock(ex) -> None:
    """Put ``ex`` (a ``TorchExecutor``) on this thread's CPU time; waits for arrivals advance the
    clock without sleeping."""
    state = {"t0": time.thread_time(), "idle_ms": 0.0}

    def now() -> float:
        return (time.thread_time() - state["t0"]) * 1e3 + state["idle_ms"]

    def wait_until(t_ms: float) -> None:
        state["idle_ms"] += max(t_ms - now(), 0.0)

    def reset_clock() -> None:
        state["t0"], state["idle_ms"] = time.thread_time(), 0.0

    ex.now, ex.wait_until, ex.reset_clock = now, wait_until, reset_clock


class _Forward:
    """The target model with its forward timed (called exactly like the model)."""

    def __init__(self, model, log: StepLog):
        self.inner, self.log = model, log

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, batch, cache):
        return _timed(self.log, "forward", self.inner)(batch, cache)


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") not in (1, 2) or (argv.index("--") == 2 and argv[1] != "--cpu-clock"):
        print(__doc__, file=sys.stderr)
        return 2
    use_cpu_clock = argv.index("--") == 2
    from adaserve import iteration
    from adaserve.cli import main as cli_main
    from adaserve.runtime import replay as replay_mod

    log = StepLog(argv[0])
    original_replay, original_step = replay_mod.replay, iteration.ServingLoop.step

    def replay(cfg, ex, requests):
        instrument(ex, log)
        if use_cpu_clock:
            cpu_clock(ex)
        return original_replay(cfg, ex, requests)

    def step(self):
        t0, c0 = time.perf_counter(), time.thread_time()
        log.cur["t_ms"] = self.executor.now()
        original_step(self)
        log.add("iteration", time.perf_counter() - t0, time.thread_time() - c0)
        log.flush()

    replay_mod.replay, iteration.ServingLoop.step = replay, step
    try:
        return cli_main(argv[argv.index("--") + 1:])
    finally:
        log.f.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

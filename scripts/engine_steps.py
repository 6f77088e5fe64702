"""`adaserve run` with every iteration logged: what the step held and where its time went.

    python scripts/engine_steps.py STEPS.jsonl [--cpu-clock] [--sync-debug] [--trace-prefill N] -- run ...

Runs the ``adaserve`` command given after ``--`` in this process, with the engine's executor and the
serving loop wrapped (nothing else changes), and writes one JSON object per iteration to
STEPS.jsonl: ``prefill`` [[chunk, tokens already prefilled], ...], ``decode`` [[context tokens,
tree tokens], ...] with ``rids`` the decoding requests' ids in the same order (to set a step's trees
beside the requests' acceptance records), and the wall / thread-CPU ms of the iteration, of drafting (``speculate``), of
the target step (``execute``) and of the forward inside it. The forward is the model call alone,
as ``adaserve profile`` times its step tables; the rest of the iteration (batch building included)
is host work, as the profile's ``host`` table counts it. ``scripts/engine_vs_sim.py steps`` prices
each logged step with a latency profile, to find the costs the simulator misses.

On CUDA each record also holds ``forward_device_ms``: the forward's span on the GPU (CUDA events
recorded before and after the model call, read once the step has synchronised). ``forward_ms`` is
the host's time in the call, which on a GPU is the launch time (a CUDA graph's replay: ~0.5 ms); a
span well above it is device work, a span equal to it a host that cannot launch faster (or waits
inside the call). ``--sync-debug`` (CUDA): torch's sync debug mode warns on every operation that
makes the host wait for the GPU; each record counts those of its iteration (``syncs``) and the end
of the run prints the places in the package that waited, most frequent first. ``--trace-prefill N``:
the first N iterations begun with a prompt waiting (so, mostly, holding a prefill chunk) run under
``torch.profiler`` (CPU, and CUDA where it runs), marked ``"traced": true`` in their records (their
times include the profiler's); the end of the run prints their operators by self time, host and
device. Both diagnose (a run's prefill steps cost twice the profile's on an H200); neither times.

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
from collections import Counter

import numpy as np


class StepLog:
    """Per-iteration records, filled by the wrappers ``instrument`` installs."""

    def __init__(self, path: str):
        self.f = open(path, "w", encoding="utf-8")
        self.cur: dict = {}
        self.events: list = []  # (start, end) CUDA events of this iteration's forwards
        self.syncs: list[str] = []  # this iteration's sync warnings (--sync-debug)
        self.sync_sites: Counter = Counter()

    def add(self, key: str, wall_s: float, cpu_s: float) -> None:
        self.cur[key + "_ms"] = self.cur.get(key + "_ms", 0.0) + 1e3 * wall_s
        self.cur[key + "_cpu_ms"] = self.cur.get(key + "_cpu_ms", 0.0) + 1e3 * cpu_s

    def flush(self) -> None:
        if self.events:
            self.events[-1][1].synchronize()
            self.cur["forward_device_ms"] = sum(a.elapsed_time(b) for a, b in self.events)
        if self.syncs:
            self.cur["syncs"] = len(self.syncs)
            self.sync_sites.update(self.syncs)
        if self.cur:
            self.f.write(json.dumps(self.cur) + "\n")
        self.cur, self.events, self.syncs = {}, [], []


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
        if cache.device.type != "cuda":
            return _timed(self.log, "forward", self.inner)(batch, cache)
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = _timed(self.log, "forward", self.inner)(batch, cache)
        end.record()
        self.log.events.append((start, end))
        return out


def sync_site(message: str, stack) -> str:
    """The innermost frame of the package (else of any file) that made the host wait."""
    frames = [f for f in stack if "adaserve" in f.filename and "engine_steps" not in f.filename] or list(stack)
    f = frames[-1]
    return f"{f.filename.split('adaserve/', 1)[-1]}:{f.lineno} {f.name}: {message.splitlines()[0][:80]}"


def catch_syncs(log: StepLog) -> None:
    """torch's sync debug mode on, its warnings counted per iteration (not printed)."""
    import traceback
    import warnings

    import torch

    torch.cuda.set_sync_debug_mode("warn")

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            log.syncs.append(sync_site(str(message), traceback.extract_stack()[:-1]))
        else:
            previous(message, category, filename, lineno, file, line)

    previous = warnings.showwarning
    warnings.simplefilter("always")
    warnings.showwarning = show


def profiled(ex):
    """A ``torch.profiler`` context for one iteration: CPU, and CUDA when the engine runs there."""
    from torch.profiler import ProfilerActivity, profile

    cuda = ex.cache.device.type == "cuda"
    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))


def print_traces(traces: list) -> None:
    """Operators of the traced iterations by self time: host, then device (where traced)."""
    for i, prof in enumerate(traces):
        avg = prof.key_averages()
        print(f"traced iteration {i + 1} of {len(traces)} (a prompt waiting): operators by self CPU time",
              file=sys.stderr)
        print(avg.table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr)
        if any(getattr(e, "self_device_time_total", 0) for e in avg):
            print(avg.table(sort_by="self_device_time_total", row_limit=12), file=sys.stderr)


def main(argv: list[str]) -> int:
    flags = argv[1:argv.index("--")] if "--" in argv else None
    trace_prefill = 0
    if flags and "--trace-prefill" in flags:
        i = flags.index("--trace-prefill")
        value = flags[i + 1] if i + 1 < len(flags) else ""
        if not value.isdigit():
            print(f"engine_steps: --trace-prefill needs a count, got {value!r}", file=sys.stderr)
            return 2
        trace_prefill, flags = int(value), flags[:i] + flags[i + 2:]
    if not argv or flags is None or not set(flags) <= {"--cpu-clock", "--sync-debug"}:
        print(__doc__, file=sys.stderr)
        return 2
    use_cpu_clock, sync_debug = "--cpu-clock" in flags, "--sync-debug" in flags
    traces: list = []
    from adaserve import iteration
    from adaserve.cli import main as cli_main
    from adaserve.runtime import replay as replay_mod

    log = StepLog(argv[0])
    original_replay, original_step = replay_mod.replay, iteration.ServingLoop.step

    serving: list = []  # the run's executor, once instrumented (the warm-up's iterations are not logged)

    def replay(cfg, ex, requests):
        instrument(ex, log)
        serving.append(ex)
        if use_cpu_clock:
            cpu_clock(ex)
        if sync_debug and ex.cache.device.type == "cuda":
            catch_syncs(log)
        return original_replay(cfg, ex, requests)

    def step(self):
        if self.executor not in serving:  # the serving warm-up's throwaway requests
            return original_step(self)
        traced = bool(self.waiting) and len(traces) < trace_prefill
        prof = profiled(self.executor) if traced else None
        t0, c0 = time.perf_counter(), time.thread_time()
        log.cur["t_ms"] = self.executor.now()
        if prof is None:
            original_step(self)
        else:
            with prof:
                original_step(self)
            traces.append(prof)
            log.cur["traced"] = True
        log.add("iteration", time.perf_counter() - t0, time.thread_time() - c0)
        log.flush()

    replay_mod.replay, iteration.ServingLoop.step = replay, step
    try:
        return cli_main(argv[argv.index("--") + 1:])
    finally:
        replay_mod.replay, iteration.ServingLoop.step = original_replay, original_step
        log.f.close()
        if traces:
            print_traces(traces)
        if log.sync_sites:
            print(f"host waits for the GPU (--sync-debug), {sum(log.sync_sites.values())} in all:", file=sys.stderr)
            for site, n in log.sync_sites.most_common(15):
                print(f"  {n:6d}  {site}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

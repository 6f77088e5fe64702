"""Time the whole per-iteration decision of AdaServe (speculation parameters, budget rule, SLO
phase, throughput phase) on random candidate trees."""

from __future__ import annotations

import statistics
import time

import numpy as np

from adaserve.core.profile import LatencyProfile, Table
from adaserve.core.request import Phase, Request
from adaserve.scheduling.plan import IterationView, SpecShape
from adaserve.scheduling.policies import AdaServe, PolicyConfig
from adaserve.scheduling.speculation import LLAMA_SPEC, SpecParams
from adaserve.scheduling.trees import CandidateForest
from adaserve.sim.artifact import ARTIFACT_VERIFY_MS, FAMILIES

# The artifact's Llama-3.1-70B verification table, used only to price budgets here.
ARTIFACT_LLAMA = LatencyProfile(
    name="llama-3.1-70b-table",
    verify=Table(*(np.asarray(a, np.float64) for a in ARTIFACT_VERIFY_MS["llama-3.1-70b"])),
    draft=Table(np.array([0, 1024.0]), np.array([8.0, 9.0])),
    baseline_ms=FAMILIES["llama-3.1-70b"].baseline_ms)


def random_forest(n: int, depth: int, width: int, rng: np.random.Generator) -> CandidateForest:
    """Beam-shaped candidate trees: ``width`` nodes per level, each with a parent in the level above
    and a path probability that shrinks along the path."""
    per = 1 + depth * width
    local_parent = np.empty(per, np.int64)
    local_parent[0] = -1
    local_parent[1:1 + width] = 0
    for level in range(1, depth):
        lo = 1 + level * width
        prev = 1 + (level - 1) * width
        local_parent[lo:lo + width] = prev + np.sort(rng.integers(0, width, width))
    offsets = np.arange(n + 1, dtype=np.int64) * per
    parent = np.where(local_parent >= 0, local_parent[None, :] + offsets[:-1, None], -1).ravel()
    cond = rng.uniform(0.05, 1.0, (n, per))
    cond[:, 0] = 1.0
    prob = np.empty((n, per))
    prob[:, 0] = 1.0
    lp = local_parent
    for j in range(1, per):
        prob[:, j] = prob[:, lp[j]] * cond[:, j]
    depth_arr = np.concatenate(([0], np.repeat(np.arange(1, depth + 1), width)))
    return CandidateForest(offsets, parent, rng.integers(0, 32000, n * per), prob.ravel(),
                           np.tile(depth_arr, n))


def random_requests(n: int, now_ms: float, rng: np.random.Generator) -> list[Request]:
    reqs = []
    for i in range(n):
        slo = float(rng.choice([36.0, 50.0, 150.0]))
        r = Request(rid=i, arrival_ms=0.0, input_len=100, max_new_tokens=256, slo_ratio=-slo,
                    slo_ms=slo, category="bench", phase=Phase.DECODING)
        r.prefilled = 100
        r.first_decode_ms = now_ms - float(rng.uniform(100, 3000))
        r.generated = max(1, int((now_ms - r.first_decode_ms) / slo * rng.uniform(0.7, 1.3)))
        reqs.append(r)
    return reqs


def bench_scheduler(n: int, depth: int, width: int, iterations: int = 300, seed: int = 0,
                    spec: SpecParams = LLAMA_SPEC) -> dict:
    rng = np.random.default_rng(seed)
    # Pin d and w to the requested shape so the benchmark measures exactly N x D x W trees.
    spec = SpecParams(d_min=depth, d_max=depth, w_max=width, b1=spec.b1, b2=10**6, c1=spec.c1,
                      c2=width, n_max_factor=spec.n_max_factor)
    policy = AdaServe(PolicyConfig(spec=spec))
    cases = []
    for _ in range(16):
        reqs = random_requests(n, 10_000.0, rng)
        cases.append((reqs, random_forest(n, depth, width, rng)))
    times = []
    selected = []
    for i in range(iterations):
        reqs, forest = cases[i % len(cases)]
        view = IterationView(10_000.0, [], reqs, ARTIFACT_LLAMA, 10**9)
        t = time.perf_counter()
        plan = policy.plan(view)
        sel = policy.select(plan, forest, view)
        times.append((time.perf_counter() - t) * 1e3)
        selected.append(int(sel.selected.sum()))
        assert plan.shape == SpecShape(depth, width)
    return {"requests": n, "depth": depth, "width": width, "nodes": n * (1 + depth * width),
            "ms_per_iteration": round(statistics.median(times), 4),
            "p90_ms": round(float(np.percentile(times, 90)), 4),
            "mean_selected_tokens": round(statistics.mean(selected), 1), "iterations": iterations}

"""The simulator's hot path and memory (issue 12, item 5): the compiled tree growth gives the numpy
path's results bit for bit, the numpy path does not import numba, and trace loading for the
simulator keeps no prompts."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from adaserve.core.request import Request
from adaserve.core.trace import load_trace
from adaserve.scheduling.plan import SpecShape
from adaserve.sim.acceptance import (LLAMA_ACCEPTANCE, QWEN_ACCEPTANCE, AcceptanceParams,
                                     RecordedAcceptance, SyntheticAcceptance, accepted_lengths)
from adaserve.sim.run import simulate_records

pytest.importorskip("numba")

SHAPES = [SpecShape(depth=8, width=3), SpecShape(depth=5, width=4), SpecShape(depth=3, width=1),
          SpecShape.chain(6), SpecShape.static((1, 1, 3, 1)), SpecShape.static((2, 3, 1, 2))]


def reqs(n, categories=("chat",)):
    return [Request(i, 0.0, 10, 100, 1.2, 30.0, categories[i % len(categories)]) for i in range(n)]


def forest_arrays(f):
    return {"offsets": f.offsets, "parent": f.parent, "token": f.token, "prob": f.prob,
            "depth": f.depth, "correct": f.extra["correct"]}


def both_paths(monkeypatch, model, requests, shape, seed):
    """The forests (as arrays) and the generator's next draw, compiled and with ADASERVE_NUMBA=0."""
    out = []
    for flag in ("1", "0"):
        monkeypatch.setenv("ADASERVE_NUMBA", flag)
        rng = np.random.default_rng(seed)
        forests = [forest_arrays(model.draft(requests, shape, rng)) for _ in range(3)]
        out.append((forests, rng.random()))
    return out


def assert_same(compiled, numpy_path):
    (fc, next_c), (fn, next_n) = compiled, numpy_path
    assert next_c == next_n  # the same draws were consumed
    for a, b in zip(fc, fn):
        for name in a:
            assert a[name].dtype == b[name].dtype, name
            assert np.array_equal(a[name], b[name]), name


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 64])
def test_compiled_trees_equal_numpy_trees(monkeypatch, shape, n):
    for model, seed in ((LLAMA_ACCEPTANCE, 0), (QWEN_ACCEPTANCE, 1)):
        assert_same(*both_paths(monkeypatch, model, reqs(n), shape, seed))


def test_compiled_trees_equal_with_per_category_parameters(monkeypatch):
    model = SyntheticAcceptance(AcceptanceParams(mu=1.0, tau=2.0, sigma=0.8, rho=0.3),
                                {"coding": AcceptanceParams(mu=4.0, tau=1.0, sigma=0.2, rho=0.3)})
    assert_same(*both_paths(monkeypatch, model, reqs(9, ("coding", "chat")),
                            SpecShape(depth=6, width=3), 5))


def test_compiled_beam_keeps_ties_in_draft_order(monkeypatch, tmp_path):
    """Recorded confidences with equal children make every beam level a tie: the compiled
    selection must keep numpy's stable order (the first candidates), not any of the equals."""
    rows = [{"rid": r, "category": "chat", "pos": p, "probs": probs, "rank": rank}
            for r, (probs, rank) in enumerate([([0.4, 0.4, 0.2], 1), ([0.5, 0.5], 0),
                                              ([0.3, 0.3, 0.3], 2), ([0.0], -1)])
            for p in range(12)]
    path = tmp_path / "ties.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    model = RecordedAcceptance.load(path)
    for shape in (SpecShape(depth=5, width=2), SpecShape(depth=4, width=3), SpecShape.static((2, 2))):
        compiled, numpy_path = both_paths(monkeypatch, model, reqs(4), shape, 0)
        assert_same(compiled, numpy_path)
    # the tie is real: request 2's second level has 9 equal candidates and keeps the first 3
    monkeypatch.setenv("ADASERVE_NUMBA", "1")
    f = model.draft(reqs(4), SpecShape(depth=2, width=3), np.random.default_rng(0))
    lo = f.offsets[2]
    assert f.prob[lo + 4:lo + 7].tolist() == [0.3 * 0.3] * 3
    assert f.token[lo + 4:lo + 7].tolist() == [0, 1, 2] and f.parent[lo + 4:lo + 7].tolist() == [lo + 1] * 3


@pytest.mark.parametrize("shape", SHAPES[:3] + SHAPES[4:], ids=str)
def test_compiled_accepted_lengths_equal_numpy(monkeypatch, shape):
    rng = np.random.default_rng(2)
    for _ in range(10):
        forest = LLAMA_ACCEPTANCE.draft(reqs(9), shape, rng)
        selected = rng.random(forest.n_nodes) < rng.random()
        out = []
        for flag in ("1", "0"):
            monkeypatch.setenv("ADASERVE_NUMBA", flag)
            out.append(accepted_lengths(forest, selected))
        assert out[0].dtype == out[1].dtype and np.array_equal(*out)


def test_simulation_identical_with_and_without_numba(monkeypatch, artifact_traces):
    records = load_trace(artifact_traces.file("fig8,9/emission_rps4.8_ol256.json"))[:250]
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("ADASERVE_NUMBA", flag)
        res = simulate_records(records, "adaserve", "llama-3.1-70b", seed=3)
        summary = {k: v for k, v in res.summary.items() if k != "overhead"}  # measured CPU time
        results.append((summary, [(r.first_decode_ms, r.finish_ms, r.generated) for r in res.requests]))
    assert results[0] == results[1]


def test_numpy_path_does_not_import_numba():
    """ADASERVE_NUMBA=0 must not pay numba's import (~0.3 s, ~100 MB) in a simulation."""
    code = ("import sys; from adaserve.sim.run import simulate_records; "
            "from adaserve.core.trace import TraceRecord; "
            "recs = [TraceRecord(10.0 * i, 50, 20, 'p', 1.2) for i in range(20)]; "
            "simulate_records(recs, 'adaserve', 'llama-3.1-70b'); "
            "print('numba' in sys.modules)")
    def numba_imported(flag: str) -> str:
        env = {**os.environ, "ADASERVE_NUMBA": flag}
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              check=True).stdout.split()[-1]

    assert numba_imported("0") == "False"
    assert numba_imported("1") == "True"

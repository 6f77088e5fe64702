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
                                     RecordedAcceptance, SyntheticAcceptance, accepted_ends, accepted_lengths)
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
            out.append(accepted_ends(forest, selected))
        assert out[0].dtype == out[2].dtype and np.array_equal(out[0], out[2])
        assert all(np.array_equal(a, b) for a, b in zip(out[1], out[3]))  # lengths and end nodes
        assert np.array_equal(out[1][0], out[0])
        ends = out[1][1]
        assert np.array_equal(forest.depth[ends], out[0]) and forest.extra["correct"][ends].all()


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


# ---------------------------------------------------------------- compiled selection and lookups

def selection_outputs(forest, need, cap, n_max, budgets, predict):
    """Everything the selection building blocks return for one forest, as plain arrays."""
    from adaserve.scheduling.selection import (SortedCandidates, choose_budget, select,
                                               slo_wants)
    sc = SortedCandidates.build(forest)
    out = {name: np.asarray(getattr(sc, name)).astype(np.float64)
           for name in ("order", "start", "length", "rank", "owner", "cumprob", "best", "global_pos")}
    out["expected"] = sc.expected_tokens(len(sc.order))
    out["want"] = slo_wants(sc, need, cap, n_max)
    out["budget"] = np.array([choose_budget(sc, forest.n_requests, b, predict) for b in budgets])
    for b in budgets:
        for slo_phase in (True, False):
            out[f"select{b}{slo_phase}"] = select(forest, sc, b, need, cap, n_max, slo_phase)
    return out


def both_selections(monkeypatch, *args):
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("ADASERVE_NUMBA", flag)
        results.append(selection_outputs(*args))
    return results


def assert_same_selection(compiled, numpy_path):
    assert compiled.keys() == numpy_path.keys()
    for name in compiled:
        assert np.array_equal(compiled[name], numpy_path[name]), name


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 40])
def test_compiled_selection_equals_numpy(monkeypatch, shape, n):
    """SortedCandidates, choose_budget, slo_wants and select (both phases) give the numpy code's
    results on drafted forests, with needs above, below and at the root's 1, and -inf (a request
    that stops steering the choice, as AdaServe+ passes)."""
    rng = np.random.default_rng(n)
    for model in (LLAMA_ACCEPTANCE, QWEN_ACCEPTANCE):
        forest = model.draft(reqs(n), shape, rng)
        need = rng.choice([-np.inf, 0.5, 1.0, 1.7, 3.2, 9.0], n) + rng.random(n) * (rng.random(n) < 0.5)
        cap = np.full(n, shape.depth + 1.0)
        budgets = [n - 1, n, n + 3, forest.n_nodes // 2, forest.n_nodes + 5]
        slope = rng.random() * 0.1
        predict = lambda b: 20.0 + slope * np.asarray(b, np.float64)  # noqa: E731
        for n_max in (1, 3, 50):
            assert_same_selection(*both_selections(monkeypatch, forest, need, cap, n_max, budgets,
                                                   predict))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 40])
def test_select_budgets_is_select_at_every_budget_on_both_paths(monkeypatch, shape, n):
    """AdaServe+'s loop over budgets (``select_budgets``, one kernel compiled): per budget the mask
    ``select`` gives with A(r) at that budget's time (-inf where the weight is 0), and each
    request's 1 + Σ f̂ of its selected non-root nodes, bit for bit on both paths."""
    from adaserve.scheduling.selection import SortedCandidates, select, select_budgets
    rng = np.random.default_rng(10 + n)
    forest = LLAMA_ACCEPTANCE.draft(reqs(n), shape, rng)
    elapsed, slo, done = rng.random(n) * 900, rng.choice([30.0, 36.0, 50.0, np.inf], n), rng.integers(1, 40, n) * 1.0
    weight = (rng.random(n) < 0.8).astype(np.float64)
    cap = np.full(n, shape.depth + 1.0)
    budgets = np.array([n - 1, n, n + 3, forest.n_nodes // 2, forest.n_nodes + 5], np.int64)
    times = 20.0 + rng.random(len(budgets)) * 40
    n_max = np.array([1, 3, 50, 4, 2], np.int64)
    out = []
    for flag in ("1", "0"):
        monkeypatch.setenv("ADASERVE_NUMBA", flag)
        sc = SortedCandidates.build(forest)
        masks, expected = select_budgets(forest, sc, budgets, times, (elapsed, slo, done), weight, cap, n_max)
        for j, b in enumerate(budgets):
            need = np.where(weight > 0, (elapsed + times[j]) / slo - done, -np.inf)
            assert np.array_equal(masks[j], select(forest, sc, int(b), need, cap, int(n_max[j])))
            gained = np.bincount(forest.owner, weights=np.where(masks[j] & (forest.parent >= 0), forest.prob, 0.0),
                                 minlength=n)
            assert np.array_equal(expected[j], 1.0 + gained)
        out.append((masks, expected))
    assert np.array_equal(out[0][0], out[1][0]) and np.array_equal(out[0][1], out[1][1])


def test_tied_keys_keep_node_order_on_both_paths(monkeypatch):
    """Equal path probabilities at one depth tie the best-first sort key: both paths break the tie
    by node order (a stable sort; numpy's default quicksort would break it by the CPU's SIMD
    dispatch), so the selection is a function of the forest alone."""
    from adaserve.scheduling.trees import CandidateForest
    tree = [(0, 1, 0.5), (0, 2, 0.5), (1, 3, 0.25), (1, 4, 0.25), (2, 5, 0.25), (2, 6, 0.25)]
    forest = CandidateForest.from_lists([tree] * 5)
    need, cap = np.array([1.5, 2.6, 1.0, 3.0, 2.0]), np.full(5, 3.0)
    compiled, numpy_path = both_selections(monkeypatch, forest, need, cap, 4, [5, 9, 14, 40],
                                           lambda b: 10.0 + np.asarray(b, np.float64))
    assert_same_selection(compiled, numpy_path)
    from adaserve.scheduling.selection import SortedCandidates
    for flag in ("1", "0"):
        monkeypatch.setenv("ADASERVE_NUMBA", flag)
        sc = SortedCandidates.build(forest)
        nonroot = np.flatnonzero(forest.depth > 0)
        depth1 = nonroot[forest.depth[nonroot] == 1]
        assert sc.best[:len(depth1)].tolist() == depth1.tolist()  # all tied at 0.5: node order
        assert sc.best[len(depth1):].tolist() == nonroot[forest.depth[nonroot] == 2].tolist()
    nan_tree = [(0, 1, np.nan), (0, 2, 0.5), (1, 3, np.nan), (2, 4, 0.5), (2, 5, 0.25)]
    forest = CandidateForest.from_lists([nan_tree, tree, nan_tree])
    out = []
    for flag in ("1", "0"):  # NaN keys sort last on both paths, ties still in node order
        monkeypatch.setenv("ADASERVE_NUMBA", flag)
        out.append(SortedCandidates.build(forest).best.tolist())
    assert out[0] == out[1]


def test_compiled_table_lookup_equals_numpy(monkeypatch):
    """Array lookups run compiled (core/table_kernels.py): the same bits as the numpy path inside
    the table, at its grid points, past both ends, at NaN, with and without context."""
    from adaserve.core.profile import Table
    rng = np.random.default_rng(11)
    for _ in range(50):
        m = int(rng.integers(2, 12))
        xp = np.sort(rng.choice(np.arange(0, 3000), m, replace=False)).astype(float)
        table = Table(xp, rng.random(m) * 50, np.array([0.0, 2048.0, 16384.0]),
                      rng.random((3, m)) * 50)
        size = int(rng.integers(1, 800))
        x = np.concatenate([xp, [-5.0, xp[-1] * 1.5, np.nan], rng.random(size) * xp[-1] * 1.2])
        x = np.sort(x[:size]) if rng.random() < 0.5 else x[:size]
        for ctx in (None, float(rng.random() * 20000), -3.0):
            out = []
            for flag in ("1", "0"):
                monkeypatch.setenv("ADASERVE_NUMBA", flag)
                out.append(table(x, ctx))
            assert out[0].dtype == out[1].dtype and out[0].shape == out[1].shape
            assert np.array_equal(out[0], out[1], equal_nan=True), (x, ctx)


def test_context_tokens_matches_the_per_request_sum():
    """The summed-fields shortcut equals Σ context_len, also with a request not yet generating."""
    from adaserve.scheduling.policies import context_tokens
    rs = reqs(6)
    for i, r in enumerate(rs):
        r.prefilled, r.generated = 10 * i, i % 3
    assert context_tokens(rs) == sum(r.context_len for r in rs)
    for r in rs:
        r.generated += 1
    assert context_tokens(rs) == sum(r.context_len for r in rs)
    assert context_tokens([]) == 0


@pytest.mark.parametrize("system", ["adaserve_plus", "specinfer"])
def test_other_speculative_systems_identical_with_and_without_numba(monkeypatch, artifact_traces,
                                                                    system):
    records = load_trace(artifact_traces.file("fig8,9/emission_rps4.8_ol256.json"))[:120]
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("ADASERVE_NUMBA", flag)
        res = simulate_records(records, system, "llama-3.1-70b", seed=5)
        summary = {k: v for k, v in res.summary.items() if k != "overhead"}
        results.append((summary, [(r.first_decode_ms, r.finish_ms, r.generated) for r in res.requests]))
    assert results[0] == results[1]

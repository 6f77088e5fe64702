"""adaserve_plus (issue 15): online calibration, cost-aware speculation, TTFT deadlines, the observe
hook of the serving loop, TTFT and joint attainment in every result, the server's TTFT fields."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from adaserve.bench.scheduler import ARTIFACT_LLAMA
from adaserve.core.metrics import summarize
from adaserve.core.request import Phase, Request
from adaserve.core.results import format_text, load_result
from adaserve.core.trace import TraceError, parse_records, save_trace, to_requests
from adaserve.iteration import ServingLoop, StepOutput
from adaserve.scheduling.adaserve_plus import (AdaServePlus, DraftSwitch, SloState, _can_wait,
                                               _deadline_room, _deadline_view, _verified_options)
from adaserve.scheduling.calibration import (Calibrator, conditional_confidence, end_weights,
                                             exact_end_weights, node_outcomes, path_products)
from adaserve.scheduling.plan import IterationView, Plan, Selection, SpecShape
from adaserve.scheduling.policies import make_policy
from adaserve.scheduling.trees import CandidateForest, is_connected
from adaserve.sim.acceptance import (AcceptanceParams, SyntheticAcceptance, accepted_lengths)
from adaserve.sim.executor import SimExecutor
from adaserve.sim.profiles import get_profile
from adaserve.sim.run import simulate_file, simulate_records
from adaserve.workload.generate import generate_trace


def decoding(rid, slo=50.0, generated=10, behind_ms=0.0, now=10_000.0, category="chat"):
    """A decoding request ``behind_ms`` behind its SLO schedule."""
    r = Request(rid=rid, arrival_ms=0.0, input_len=100, max_new_tokens=256, slo_ratio=-slo,
                slo_ms=slo, category=category, phase=Phase.DECODING)
    r.prefilled, r.generated = 100, generated
    r.first_decode_ms = now - slo * generated - behind_ms
    return r


def waiting(rid, arrival, input_len=200, ttft=None, category="chat"):
    return Request(rid=rid, arrival_ms=arrival, input_len=input_len, max_new_tokens=64,
                   slo_ratio=-50.0, slo_ms=50.0, category=category, phase=Phase.WAITING,
                   slo_ttft_ms=ttft)


# ------------------------------------------------------------------------------- calibration

def overconfident(forest: CandidateForest, power: float = 0.5) -> CandidateForest:
    """The same trees with each conditional confidence q reported as q**power (> q)."""
    q = conditional_confidence(forest) ** power
    out = CandidateForest(forest.offsets, forest.parent, forest.token,
                          path_products(forest, q), forest.depth)
    out.extra = dict(forest.extra)
    return out


def test_calibration_converges_on_synthetic_acceptance():
    """A drafter reporting sqrt(q) for a true acceptance q: after a few hundred verifications the
    calibrated conditional is close to the truth, far closer than the reported one."""
    model = SyntheticAcceptance(AcceptanceParams(mu=1.0, tau=1.0, sigma=0.5, rho=0.5))
    rng = np.random.default_rng(0)
    policy = make_policy("adaserve_plus", "llama")
    reqs = [decoding(i) for i in range(32)]
    shape = SpecShape(4, 2)
    for _ in range(300):
        truth = model.draft(reqs, shape, rng)
        seen = overconfident(truth)
        selected = np.ones(seen.n_nodes, bool)
        committed = accepted_lengths(truth, selected) + 1
        out = StepOutput(committed, np.zeros(len(reqs), bool))
        policy.observe(Plan([], reqs, shape), seen, Selection(selected, seen.n_nodes, 0.0), out)
    truth = model.draft(reqs, shape, rng)
    seen = overconfident(truth)
    cond, _ = policy.calibrator.calibrate(seen)
    true_q = conditional_confidence(truth)
    nonroot = truth.parent >= 0
    err_raw = np.mean(np.abs(conditional_confidence(seen)[nonroot] - true_q[nonroot]))
    err_cal = np.mean(np.abs(cond[nonroot] - true_q[nonroot]))
    assert err_cal < 0.35 * err_raw, (err_cal, err_raw)
    # the planning statistics learned the same thing: far below the prior at depth 4
    assert policy.depths.rho("chat")[3] < 0.79 ** 4


def test_calibration_starts_as_the_identity_and_keeps_trees_monotone():
    forest = CandidateForest.from_lists([[(0, 5, 0.9), (1, 6, 0.6), (0, 7, 0.05)]])
    cond, path = Calibrator().calibrate(forest)
    assert path == pytest.approx(forest.prob)
    assert np.all(path[1:] <= path[forest.parent[1:]] + 1e-12)


def test_node_outcomes_exact_from_token_ids():
    """Tree: root -> a(5) -> b(6); root -> c(7). Committed ids [5, 6, 9]: a and b accepted, c
    tried and rejected; with [7, 1]: c accepted, a tried and rejected, b never tried."""
    forest = CandidateForest.from_lists([[(0, 5, 0.6), (1, 6, 0.4), (0, 7, 0.3)]])
    sel = np.ones(4, bool)
    end = exact_end_weights(forest, sel, [[5, 6, 9]], np.array([2]))
    tried, accepted = node_outcomes(forest, end)
    assert tried.tolist() == [0, 1, 1, 1] and accepted.tolist() == [0, 1, 1, 0]
    end = exact_end_weights(forest, sel, [[7, 1]], np.array([1]))
    tried, accepted = node_outcomes(forest, end)
    assert tried.tolist() == [0, 1, 0, 1] and accepted.tolist() == [0, 0, 0, 1]
    assert exact_end_weights(forest, sel, [[8, 1]], np.array([1])) is None  # not in the tree


@pytest.mark.parametrize("seed", range(6))
def test_exact_end_weights_compiled_equals_python(monkeypatch, seed):
    """The compiled walk gives the Python walk's weights, or None where it does: random trees with
    repeated tokens among siblings, unselected nodes, skipped requests (depth -1, no ids), walks that
    leave the tree, and accepted depths beyond the ids."""
    pytest.importorskip("numba")
    rng = np.random.default_rng(seed)
    trees = []
    for _ in range(rng.integers(1, 12)):
        nodes = []
        for v in range(1, rng.integers(1, 26)):
            nodes.append((int(rng.integers(0, v)), int(rng.integers(3, 7)), 0.5))
        trees.append(nodes)
    forest = CandidateForest.from_lists(trees)
    sel = rng.random(forest.n_nodes) < 0.8
    sel[forest.roots] = True
    def walk(i):  # the tokens of a random path down request i's selected tree, sometimes spoilt
        lo, hi = int(forest.offsets[i]), int(forest.offsets[i + 1])
        node, ids = lo, []
        while rng.random() < 0.8:
            kids = [v for v in range(node + 1, hi) if forest.parent[v] == node and sel[v]]
            if not kids:
                break
            node = kids[rng.integers(len(kids))]
            ids.append(int(forest.token[node]))
        if ids and rng.random() < 0.1:
            ids[rng.integers(len(ids))] = 2  # a token no node has
        return ids + rng.integers(3, 7, rng.integers(0, 3)).tolist()  # the bonus token(s) after the path

    fitted = 0
    for _ in range(40):
        tokens = [None if rng.random() < 0.1 else walk(i) for i in range(len(trees))]
        depth = np.array([rng.integers(-1, len(t) + 1) if t is not None else rng.integers(-1, 3) for t in tokens])
        out = []
        for flag in ("1", "0"):
            monkeypatch.setenv("ADASERVE_NUMBA", flag)
            out.append(exact_end_weights(forest, sel, tokens, depth))
        assert (out[0] is None) == (out[1] is None)
        if out[0] is not None:
            assert np.array_equal(out[0], out[1])
            fitted += 1
    assert 0 < fitted < 40  # both outcomes were checked


@pytest.mark.parametrize("seed", range(6))
def test_calibration_and_outcomes_compiled_equal_numpy(monkeypatch, seed):
    """``Calibrator.calibrate`` and ``node_outcomes`` compiled give the numpy code's bits: random
    forests (siblings whose calibrated conditionals sum above 1, zero probabilities, deep trees),
    a calibrator with random counts, random end weights."""
    pytest.importorskip("numba")
    rng = np.random.default_rng(100 + seed)
    trees = []
    for _ in range(rng.integers(1, 10)):
        nodes, prob = [], [1.0]
        for v in range(1, rng.integers(1, 30)):
            parent = int(rng.integers(max(0, v - 4), v))
            prob.append(prob[parent] * rng.choice([0.0, rng.random(), 1.0], p=[0.05, 0.9, 0.05]))
            nodes.append((parent, int(rng.integers(3, 50)), prob[-1]))
        trees.append(nodes)
    forest = CandidateForest.from_lists(trees)
    cal = Calibrator()
    cal.accepted[:] = rng.random(cal.accepted.shape) * 50
    cal.predicted[:] = rng.random(cal.predicted.shape) * 30
    end = np.where(rng.random(forest.n_nodes) < 0.3, rng.random(forest.n_nodes), 0.0)
    out = []
    for flag in ("1", "0"):
        monkeypatch.setenv("ADASERVE_NUMBA", flag)
        out.append((*cal.calibrate(forest), *node_outcomes(forest, end)))
    for a, b in zip(*out):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    capped = np.bincount(forest.parent[forest.parent >= 0], weights=out[0][0][forest.parent >= 0],
                         minlength=forest.n_nodes)
    assert capped.max() > 0.99 and (capped <= 1 + 1e-9).all()  # some siblings were capped at 1


def test_calibrator_update_compiled_equals_numpy(monkeypatch):
    """``Calibrator.update``'s counts compiled: the numpy code's bits, with masses at and below the
    1e-9 floor, every depth and confidence bin (q = 1 in the last), and the decay past
    ``max_weight``."""
    pytest.importorskip("numba")
    rng = np.random.default_rng(7)
    m = 500
    depth = rng.integers(0, 12, m)
    q = np.where(rng.random(m) < 0.1, 1.0, rng.random(m))
    tried = np.where(rng.random(m) < 0.2, rng.choice([0.0, 1e-10, 1e-9]), rng.random(m))
    accepted = tried * rng.random(m)
    out = []
    for flag in ("1", "0"):
        monkeypatch.setenv("ADASERVE_NUMBA", flag)
        cal = Calibrator(max_weight=40.0)
        for _ in range(3):
            cal.update(depth, q, tried, accepted)
        out.append((cal.tried, cal.predicted, cal.accepted))
    for a, b in zip(*out):
        assert np.array_equal(a, b)
    assert out[0][1].max() <= 40.0 + 1e-9 and out[0][0].sum() > 0  # the decay ran


def test_node_outcomes_without_ids_use_the_posterior():
    """Accepted depth 1 with two selected depth-1 siblings: each gets its posterior share; a
    chain is unambiguous."""
    forest = CandidateForest.from_lists([[(0, 5, 0.6), (0, 7, 0.2)], [(0, 1, 0.5), (1, 2, 0.4)]])
    sel = np.ones(forest.n_nodes, bool)
    cond = conditional_confidence(forest)
    end = end_weights(forest, sel, np.array([1, 1]), cond, forest.prob)
    tried, accepted = node_outcomes(forest, end)
    assert accepted[1] + accepted[2] == pytest.approx(1.0)
    assert accepted[1] == pytest.approx(0.75)  # 0.6 / (0.6 + 0.2): no selected children
    assert tried[[1, 2]].tolist() == [1.0, 1.0]
    assert accepted[4] == 1.0 and tried[5] == 1.0 and accepted[5] == 0.0  # chain: 1 accepted, 2 not


# ------------------------------------------------------------------------------- cost-aware

LLAMA = get_profile("llama-3.1-70b")  # the artifact's table, draft priced by its roofline


def view_of(running, waiting_=(), now=10_000.0):
    return IterationView(now, list(waiting_), list(running), LLAMA, 10**7)


def test_speculation_turns_itself_off_when_it_cannot_pay():
    policy = AdaServePlus(make_policy("adaserve", "llama").config, "llama")
    running = [decoding(i, behind_ms=20.0) for i in range(16)]
    assert policy.plan(view_of(running)).shape.speculative  # the prior: the paper's acceptance
    zero = np.zeros((16, 8))
    for _ in range(50):  # a drafter that is never right
        policy.depths.update_many(["chat"] * 16, 7, np.zeros(16, np.int64), zero + 2)
    assert policy.plan(view_of(running)).shape == SpecShape()


def test_a_useless_drafter_costs_nothing_end_to_end():
    """Simulated with a drafter whose tokens are almost never accepted: adaserve pays the draft
    phase for nothing; adaserve_plus stops speculating and serves like vLLM (no speculation)."""
    records = generate_trace("rps", rps=1.2, duration_s=20, seed=3, output_len=64, artifact_rounding=False)
    useless = SyntheticAcceptance(AcceptanceParams(mu=-6.0, tau=0.5, sigma=0.5, rho=0.5))
    plus = simulate_records(records, "adaserve_plus", "llama-3.1-70b", acceptance=useless,
                            pricing="shared")
    ada = simulate_records(records, "adaserve", "llama-3.1-70b", acceptance=useless,
                           pricing="shared")
    sarathi = simulate_records(records, "sarathi", "llama-3.1-70b", acceptance=useless,
                               pricing="shared")
    mean_tpot = lambda res: res.summary["tpot_ms"]["mean"]  # noqa: E731
    assert mean_tpot(plus) < 0.9 * mean_tpot(ada)
    assert mean_tpot(plus) <= 1.1 * mean_tpot(sarathi)
    assert plus.summary["slo_attainment"] >= ada.summary["slo_attainment"]


def test_selection_is_connected_and_spends_more_when_requests_fall_behind():
    rng = np.random.default_rng(2)
    policy = make_policy("adaserve_plus", "llama")
    from adaserve.bench.scheduler import random_forest
    forest = random_forest(8, 6, 2, rng)
    relaxed = [decoding(i, behind_ms=-2000.0) for i in range(8)]
    behind = [decoding(i, slo=36.0, behind_ms=300.0) for i in range(8)]
    plan = Plan([], relaxed, SpecShape(6, 2))
    easy = policy.select(plan, forest, view_of(relaxed))
    hard = policy.select(Plan([], behind, SpecShape(6, 2)), forest, view_of(behind))
    assert is_connected(forest, easy.selected) and is_connected(forest, hard.selected)
    assert hard.selected.sum() >= easy.selected.sum()


# ------------------------------------------------------------------------------- TTFT deadlines

def test_ttft_deadlines_order_prefills():
    """An earlier summarization prompt (4 s default) waits behind a later chat prompt (1 s); a
    prompt whose deadline already passed goes after the reachable ones; a started prompt keeps its
    place by its deadline (a long one due in 30 s does not hold back prompts due in 1 s)."""
    now = 5_000.0
    summ = waiting(0, 3_000.0, category="summarization")
    chat = waiting(1, 4_500.0)
    missed = waiting(2, 1_000.0, ttft=500.0)
    started = waiting(3, 4_900.0, ttft=30_000.0)
    started.admitted_ms, started.prefilled = 4_950.0, 100
    view = view_of([], [summ, chat, missed, started], now=now)
    assert [r.rid for r in _deadline_view(view).waiting] == [1, 0, 3, 2]
    policy = make_policy("adaserve_plus", "llama")
    plan = policy.plan(view_of([decoding(9)], [summ, chat, missed], now=now))
    assert [r.rid for r, _ in plan.prefill][:2] == [1, 0]


def test_started_prompts_go_on_when_a_new_one_due_sooner_has_no_slot():
    """Every batch slot held by started prompts and a new prompt due sooner ordered first: it
    waits for a slot, and the started prompts go on being prefilled. (Admission used to stop at
    the first prompt it could not admit: nothing was prefilled, nothing running, and the run
    stalled: "planned an empty iteration with 147 waiting and 0 running" on a CPU profile with 16
    slots.)"""
    now = 5_000.0
    slots = LLAMA.limits.max_batch_requests
    started = []
    for i in range(slots):
        r = waiting(i, 1_000.0, input_len=4_000, ttft=30_000.0)  # long prompts, due at 31 s
        r.admitted_ms, r.prefilled = 1_100.0, 64
        started.append(r)
    new = waiting(99, 4_900.0)  # a chat prompt, due at 5.9 s
    view = view_of([], [*started, new], now=now)
    order = [r.rid for r in _deadline_view(view).waiting]
    assert order.index(99) < order.index(0)  # the new prompt is due sooner: first in line
    plan = make_policy("adaserve_plus", "llama").plan(view)
    assert plan.prefill and 99 not in {r.rid for r, _ in plan.prefill}  # no slot for it yet
    assert {r.rid for r, _ in plan.prefill} <= set(range(slots))


def test_ttft_deadline_widens_the_prefill_room():
    """A long prompt due soon gets more prefill room than the decode slack alone allows."""
    policy = make_policy("adaserve_plus", "llama")
    running = [decoding(i, slo=36.0, behind_ms=-5.0) for i in range(8)]
    relaxed = [waiting(20, 9_900.0, input_len=1500, ttft=60_000.0)]
    urgent = [waiting(20, 9_900.0, input_len=1500, ttft=900.0)]
    room = lambda w: sum(c for _, c in policy.plan(view_of(running, w)).prefill)  # noqa: E731
    assert room(urgent) > room(relaxed)


def test_deadline_room_meets_the_most_deadlines():
    """Two short prompts due in 200 ms are met only by small rooms (short steps), a long one due
    in 800 ms only by large rooms: the room meets the two short ones. (Judging reachability by the
    largest room alone dropped them and sized the room for the long prompt.)"""
    now = 10_000.0
    short = [waiting(i, now - 800.0, input_len=32) for i in range(2)]  # 1 s TTFT: due in 200 ms
    long_ = waiting(2, now, input_len=900, ttft=800.0)
    view = view_of([], short + [long_], now=now)
    rooms = np.arange(128, 1025, 32)
    step = 150.0 + 0.2 * rooms  # ms per iteration with that much prefill
    room = _deadline_room(view, rooms, step)
    assert 150.0 + 0.2 * room <= 200.0  # both short prompts finish in the first step


def test_a_prompt_due_soon_is_prefilled_whole_when_it_fits():
    """1000 prompt tokens fit beside one decoding request (1024-token steps), but not in a room
    on the 32-token grid (992): the room that completes the prompt is an option, so its first
    token comes after one iteration, within its 350 ms TTFT, not two."""
    policy = make_policy("adaserve_plus", "llama")
    now = 10_000.0
    prompt = waiting(5, now, input_len=1000, ttft=350.0)
    plan = policy.plan(view_of([decoding(0, behind_ms=-5_000.0)], [prompt], now=now))
    assert plan.prefill == [(prompt, 1000)]


def test_ttft_room_leaves_decoding_requests_their_slo():
    """A prompt due in 260 ms needs its 900 tokens in one chunk now. A decoding request 6 tokens from its
    end with ~75 ms to spare must not pay for it (it would miss its TPOT SLO, lost on both
    metrics); when that request is well ahead, the prompt gets its chunk."""
    policy = make_policy("adaserve_plus", "llama")
    now = 10_000.0
    prompt = waiting(5, now, input_len=900, ttft=260.0)
    room = lambda behind: sum(c for _, c in policy.plan(view_of(  # noqa: E731
        [decoding(0, slo=36.0, generated=250, behind_ms=behind)], [prompt], now=now)).prefill)
    assert room(-5_000.0) == 900
    assert room(60.0) < 900


def test_prefill_waits_when_even_the_least_chunk_would_sink_a_request():
    """A coding request one token from its end with 26 ms left: the least prefill chunk (128
    tokens, +23 ms on this profile beside a ~32 ms step) would push it past its SLO, and the
    waiting prompt is due in 10 s, so the prefill waits an iteration; a 120-token prompt due in
    100 ms does not wait: with drafting an iteration predicts ~47 ms and one with the chunk ~77
    ms, so the prompt is met now and would not be after a wait (~124 ms)."""
    policy = make_policy("adaserve_plus", "llama")
    now = 10_000.0
    tight = decoding(0, slo=36.0, generated=255, behind_ms=10.0)
    far = waiting(5, now, input_len=300, ttft=10_000.0)
    near = waiting(5, now, input_len=120, ttft=100.0)
    assert policy.plan(view_of([tight], [far], now=now)).prefill == []
    assert policy.plan(view_of([tight], [near], now=now)).prefill != []


def test_can_wait_only_when_every_deadline_survives_the_wait():
    now = 10_000.0
    view = view_of([], [waiting(0, now, input_len=256, ttft=500.0),
                        waiting(1, now, input_len=256, ttft=2_000.0)], now=now)
    # one 50 ms decode step, then 256-token chunks of 100 ms: done at +150 and +250 ms
    assert _can_wait(view, 256, 50.0, 50.0)
    assert not _can_wait(view, 256, 300.0, 50.0)  # the first is done at 300 + 350 > 500 ms


def test_a_prompt_past_its_deadline_does_not_forbid_the_wait():
    """A late prompt has lost its TTFT either way; a prompt still on time behind it decides."""
    now = 10_000.0
    late = waiting(0, now - 5_000.0, input_len=64, ttft=1_000.0)
    assert _can_wait(view_of([], [late], now=now), 256, 1.0, 1.0)
    due = waiting(1, now, input_len=256, ttft=150.0)
    assert not _can_wait(view_of([], [due, late], now=now), 256, 100.0, 0.0)  # +100 now, +200 later
    assert _can_wait(view_of([], [due, late], now=now), 256, 50.0, 0.0)  # +50 now, +100 later


def test_verified_options_rank_requests_by_gain():
    expected = np.array([[1.0, 1.0, 1.0], [1.2, 1.9, 1.5]])  # depth 0, then a depth with 3 nodes
    e, tokens = _verified_options(expected, np.array([0.0, 3.0]), np.zeros(3))
    assert e.shape == (2, 4, 3) and tokens.tolist() == [[3, 3, 3, 3], [3, 6, 9, 12]]
    assert e[1, 1].tolist() == [1.0, 1.9, 1.0]       # the best request's tree first
    assert e[1, 2].tolist() == [1.0, 1.9, 1.5]
    assert e[1, 3].tolist() == expected[1].tolist()
    assert (e[0] == 1.0).all()


@pytest.mark.parametrize("seed", range(5))
def test_shape_scoring_compiled_equals_numpy(monkeypatch, seed):
    """``_verified_options`` and ``SloState.deficit`` compiled give the numpy code's bits: tied
    gains (ranked by slack, then request order), best-effort requests (infinite SLO and slack),
    requests behind and ahead of schedule."""
    pytest.importorskip("numba")
    rng = np.random.default_rng(seed)
    n, depths = int(rng.integers(1, 30)), int(rng.integers(1, 9))
    expected = 1.0 + np.round(np.cumsum(rng.random((depths, n)) * 0.6, axis=0), 1)  # ties
    nodes = np.concatenate(([0.0], np.cumsum(rng.random(depths - 1) * 3)))
    slo = rng.choice([30.0, 36.0, 50.0, np.inf], n)
    slack = np.where(np.isfinite(slo), np.round(rng.normal(0, 40, n)), np.inf)
    slack[rng.random(n) < 0.2] = 0.0  # ties in slack too
    state = SloState(slo, slack, slack + 500.0, np.full(n, 100.0), (None, None, None))
    weight = (rng.random(n) < 0.8).astype(np.float64)
    out = []
    for flag in ("1", "0"):
        monkeypatch.setenv("ADASERVE_NUMBA", flag)
        e, tokens = _verified_options(expected, nodes, slack)
        t = 30.0 + tokens.ravel() * 0.7
        out.append((e, tokens, state.deficit(e.reshape(-1, n), t, weight)))
    for a, b in zip(*out):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_an_ngram_drafter_drafts_the_deepest_tree():
    """Drafting with the n-gram table costs one call whatever the depth: the plan drafts the
    deepest tree and the selection decides what to verify (a prior that says speculation does
    not pay must not stop the drafting)."""
    from adaserve.core.profile import Table

    host = {"draft": Table(np.array([1.0, 64.0]), np.array([0.5, 2.0]))}
    profile = replace(LLAMA, host=host, measured_with={**LLAMA.measured_with, "drafter": "ngram"})
    policy = AdaServePlus(make_policy("adaserve", "llama").config, "llama")
    running = [decoding(i, behind_ms=20.0) for i in range(16)]
    zero = np.zeros((16, 8))
    for _ in range(50):  # the plan's own estimate: never right
        policy.depths.update_many(["chat"] * 16, 7, np.zeros(16, np.int64), zero + 2)
    assert policy.plan(view_of(running)).shape == SpecShape()  # a draft model: no speculation
    view = IterationView(10_000.0, [], running, profile, 10**7)
    assert policy.plan(view).shape == policy.shape_options(16)[-1]


def test_draft_switch_turns_drafting_off_while_it_does_not_pay_and_probes():
    sw = DraftSwitch()
    for _ in range(sw.min_seen):  # 16 requests commit 17 tokens in a 10% longer step: no gain
        assert sw.draft()
        sw.record(True, 17.0, 16, 11.0, 10.0)
    assert not sw.pays()
    drafted = []
    for _ in range(3 * sw.probe_every):
        d = sw.draft()
        drafted.append(d)
        sw.record(d, 17.0 if d else 16.0, 16, 11.0, 10.0)
    assert sum(drafted) == 3 and drafted[sw.probe_every - 1]  # a probe every probe_every iterations
    for _ in range(60):  # the traffic changes: 24 tokens for the 10% longer step
        sw.record(True, 24.0, 16, 11.0, 10.0)
    assert sw.pays() and sw.draft()


def test_predicted_iteration_time_is_the_simulated_one():
    """The selection's predicted iteration time equals the simulated clock's, prefill iterations
    included (the draft model's forward over the prefill chunks is part of the step)."""
    records = generate_trace("rps", rps=3.0, duration_s=15, seed=4, output_len=48,
                             artifact_rounding=False)
    policy = make_policy("adaserve_plus", "llama")
    predicted = []
    select = policy.select

    def recording(plan, forest, view):
        s = select(plan, forest, view)
        predicted.append((view.now_ms, s.predicted_ms, bool(plan.prefill and plan.decode)))
        return s

    policy.select = recording
    ex = SimExecutor(LLAMA, SyntheticAcceptance(AcceptanceParams(3.0, 3.5, 0.5, 0.5)),
                     draft_prefill=True)
    ServingLoop(policy, ex, to_requests(records, 30.0)).run()
    mixed = [(t1 - t0, p) for (t0, p, both), (t1, _, _) in zip(predicted, predicted[1:])
             if both and t1 - t0 < p + 1_000.0]  # the next iteration started at once
    assert len(mixed) > 5
    assert all(actual == pytest.approx(p, rel=1e-9) for actual, p in mixed)


def test_predicted_iteration_time_counts_host_work_and_ngram_drafting():
    """With a profile measured with the n-gram drafter, the prediction counts the drafting call per
    iteration, exactly as the simulator charges it; with the engine step model (a measured GPU or
    CPU profile) also the host work of the iteration's kind, as the simulator adds it."""
    from adaserve.core.profile import Table

    host = {"speculative": Table(np.array([1.0, 64.0]), np.array([3.0, 9.0])),
            "incremental": Table(np.array([1.0, 64.0]), np.array([1.0, 4.0])),
            "draft": Table(np.array([1.0, 64.0]), np.array([0.5, 2.0]))}
    profile = replace(LLAMA, host=host, measured_with={**LLAMA.measured_with, "drafter": "ngram"})
    records = generate_trace("rps", rps=3.0, duration_s=15, seed=4, output_len=48, artifact_rounding=False)
    policy = make_policy("adaserve_plus", "llama")
    predicted = []
    select = policy.select

    def recording(plan, forest, view):
        s = select(plan, forest, view)
        predicted.append((view.now_ms, s.predicted_ms, plan.shape.speculative, len(plan.decode)))
        return s

    policy.select = recording
    ex = SimExecutor(profile, SyntheticAcceptance(AcceptanceParams(3.0, 3.5, 0.5, 0.5)))
    ends = []
    execute = ex.execute

    def timed(*args):
        out = execute(*args)
        ends.append(ex.clock)  # the plan's view.now_ms + drafting + step: no idle wait inside
        return out

    ex.execute = timed
    ServingLoop(policy, ex, to_requests(records, 30.0)).run()
    assert len(ends) == len(predicted)  # every iteration selects (a prefill-only one an empty forest)
    steps = [(end - t0, p, spec) for (t0, p, spec, _), end in zip(predicted, ends)]
    assert any(spec for *_, spec in steps) and any(not spec for *_, spec in steps)
    bad = [(a, p, s) for a, p, s in steps if a != pytest.approx(p, rel=1e-9)]
    assert not bad, bad[:5]
    n = 8  # the overhead alone: host of the kind, plus the drafting call when speculating
    from adaserve.scheduling.adaserve_plus import overhead_ms
    running = [decoding(i, behind_ms=0.0) for i in range(n)]
    table = overhead_ms(IterationView(0.0, [], running, profile, 10**7), n, np.array([0, 3]), np.array([0.0, 99.0]))
    assert table.tolist() == pytest.approx([0.0, float(host["draft"](n))])
    engine = replace(profile, step_model="engine")
    got = overhead_ms(IterationView(0.0, [], running, engine, 10**7), n, np.array([0, 3]), np.array([0.0, 99.0]))
    assert got.tolist() == pytest.approx([float(host["incremental"](n)),
                                          float(host["speculative"](n)) + float(host["draft"](n))])


# ------------------------------------------------------------------------------- the loop hook

class Recording:
    """A policy with ``observe``: the loop must call it after every step."""

    def __init__(self):
        self.inner = make_policy("adaserve", "llama")
        self.name, self.drafts, self.calls = "rec", True, []

    def plan(self, view):
        return self.inner.plan(view)

    def select(self, plan, forest, view):
        return self.inner.select(plan, forest, view)

    def observe(self, plan, forest, selection, out):
        self.calls.append((len(plan.decode), forest.n_nodes, int(selection.selected.sum()),
                           np.asarray(out.committed).tolist()))


def test_the_loop_calls_observe_after_every_step():
    reqs = to_requests(generate_trace("rps", rps=2, duration_s=5, seed=1, output_len=16, artifact_rounding=False), 30.0)
    policy = Recording()
    ex = SimExecutor(ARTIFACT_LLAMA, SyntheticAcceptance(AcceptanceParams(3.0, 3.5, 0.5, 0.5)))
    loop = ServingLoop(policy, ex, reqs)
    loop.run()
    assert len(policy.calls) == loop.stats.iterations
    assert sum(sum(c[3]) for c in policy.calls) == loop.stats.committed_tokens


# ------------------------------------------------------------------------------- metrics

def finished(rid, arrival, first, finish, generated, slo=50.0, ttft=None, category="chat"):
    r = Request(rid=rid, arrival_ms=arrival, input_len=10, max_new_tokens=generated,
                slo_ratio=-slo, slo_ms=slo, category=category, phase=Phase.FINISHED,
                slo_ttft_ms=ttft)
    r.admitted_ms, r.first_token_ms, r.first_decode_ms, r.finish_ms = arrival, first, first, finish
    r.generated = generated
    return r


def test_ttft_and_joint_attainment_on_hand_made_requests():
    reqs = [finished(0, 0, 500, 500 + 40 * 10, 10),            # TTFT ok (1 s default), TPOT ok
            finished(1, 0, 1500, 1500 + 40 * 10, 10),          # TTFT missed, TPOT ok
            finished(2, 0, 200, 200 + 60 * 10, 10),            # TTFT ok, TPOT missed
            finished(3, 0, 3000, 3000 + 40 * 10, 10, ttft=5000.0),  # own TTFT SLO: ok
            finished(4, 0, 3000, 3000 + 10, 10, category="summarization")]  # 4 s default: ok
    s = summarize(reqs, committed_tokens=50, request_steps=50)
    assert s["slo_attainment"] == pytest.approx(4 / 5)
    assert s["ttft_attained"] == 4 and s["ttft_attainment"] == pytest.approx(4 / 5)
    assert s["joint_attained"] == 3 and s["joint_attainment"] == pytest.approx(3 / 5)
    assert s["per_category"]["chat"]["joint_attainment"] == pytest.approx(2 / 4)
    assert "TTFT att 80.0%  joint 60.0%" in format_text(s, {"system": "x"})
    best_effort = replace(finished(5, 0, 60_000, 60_100, 10), slo_ms=math.inf)
    assert best_effort.ttft_attained and best_effort.ttft_slo == math.inf


def test_trace_field_slo_ttft_ms_round_trips_and_is_validated(tmp_path):
    base = {"emission_time_ms": 0, "input_length": 5, "output_length": 4, "prompt": "p",
            "slo_ratio": -50}
    recs = parse_records([{**base, "slo_ttft_ms": 750}, base])
    assert [r.slo_ttft_ms for r in recs] == [750.0, None]
    save_trace(tmp_path / "t.json", recs)
    assert (tmp_path / "t.json").read_text().count("slo_ttft_ms") == 1
    reqs = to_requests(recs, 30.0)
    assert [r.ttft_slo for r in reqs] == [750.0, 1000.0]
    for bad in (0, -3, "fast", float("inf")):
        with pytest.raises(TraceError, match="record 0: field 'slo_ttft_ms'"):
            parse_records([{**base, "slo_ttft_ms": bad}])


# ------------------------------------------------------------------------------- end to end

def test_simulate_adaserve_plus_end_to_end(tmp_path):
    trace = tmp_path / "t.json"
    save_trace(trace, generate_trace("rps", rps=3.0, duration_s=20, seed=5, output_len=48, artifact_rounding=False))
    out = tmp_path / "plus"
    res = simulate_file(trace, "adaserve_plus", "llama-3.1-70b", out)
    doc = load_result(out)
    s = doc["summary"]
    assert doc["complete"] and s["completed"] == s["registered"] > 0
    assert 0 <= s["joint_attainment"] <= min(s["slo_attainment"], s["ttft_attainment"])
    assert s["mean_generated_tokens_per_step"] > 1.5  # the calibrated drafter is worth it
    assert {"ttft_slo_ms", "ttft_attained"} <= set(doc["requests"][0])
    assert "joint" in out.with_suffix(".txt").read_text()
    ada = simulate_records(parse_records_of(trace), "adaserve", "llama-3.1-70b")
    assert res.summary["slo_attainment"] >= ada.summary["slo_attainment"] - 0.02


def parse_records_of(path):
    from adaserve.core.trace import load_trace
    return load_trace(path)


# ------------------------------------------------------------------------------- server

@pytest.fixture(scope="module")
def srv():
    from test_server import BASELINE_MS, MODEL, LiveServer, make_engine
    import httpx
    from adaserve.engine.tokenizer import ByteTokenizer
    from adaserve.server import ServerConfig, create_app

    _, _, engine = make_engine(ignore_eos=True)
    live = LiveServer(create_app(engine, ByteTokenizer(), ServerConfig(MODEL, BASELINE_MS,
                                                                      ignore_eos=True)))
    live.client = httpx.Client(base_url=live.url, timeout=60)
    yield live
    live.client.close()
    live.stop()


@pytest.mark.parametrize("body, headers, want", [
    ({"slo_ttft_ms": 750}, {}, 750.0),
    ({"slo_ttft_ms": 750.5}, {"x-slo-ttft-ms": "10"}, 750.5),   # the body wins
    ({}, {"x-slo-ttft-ms": "2500"}, 2500.0),
    ({"slo_ratio": -50}, {}, 1000.0),                           # chat's default
    ({"slo_ratio": 1000}, {}, None),                            # best effort: none
])
def test_server_accepts_ttft_slo(srv, body, headers, want):
    r = srv.client.post("/v1/completions", json={"prompt": "ttft", "max_tokens": 3, **body},
                        headers=headers)
    assert r.status_code == 200, r.text
    u = r.json()["usage"]
    assert u["slo_ttft_ms"] == want
    assert u["ttft_attained"] == (want is None or u["ttft_ms"] <= want)


@pytest.mark.parametrize("body, headers, param", [
    ({"slo_ttft_ms": 0}, {}, "slo_ttft_ms"),
    ({"slo_ttft_ms": -1}, {}, "slo_ttft_ms"),
    ({"slo_ttft_ms": "soon"}, {}, "slo_ttft_ms"),
    ({}, {"x-slo-ttft-ms": "abc"}, "x-slo-ttft-ms"),
    ({}, {"x-slo-ttft-ms": "-5"}, "x-slo-ttft-ms"),
    ({}, {"x-slo-ttft-ms": "nan"}, "x-slo-ttft-ms"),
])
def test_server_refuses_bad_ttft_slo(srv, body, headers, param):
    r = srv.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, **body},
                        headers=headers)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == "invalid_value"


def test_the_simulator_reports_each_accepted_path_s_end_node():
    """What the engine's token ids name, the simulator reports as a node: the selected node on the
    target's path at the accepted depth, or the root; ``adaserve_plus`` then learns from exact
    outcomes in both executors, never from the posterior."""
    from adaserve.sim.acceptance import accepted_lengths, accepted_nodes

    f = CandidateForest.from_lists([[(0, 5, 0.9), (0, 6, 0.5), (1, 7, 0.8)], [(0, 8, 0.9)], []])
    f.extra["correct"] = np.array([True, True, False, True, True, False, True])
    everything = np.ones(f.n_nodes, bool)
    assert accepted_nodes(f, everything, accepted_lengths(f, everything)).tolist() == [3, 4, 6]
    only_roots_and_first = np.array([True, True, False, False, True, False, True])
    assert accepted_nodes(f, only_roots_and_first, accepted_lengths(f, only_roots_and_first)).tolist() == [1, 4, 6]
    records = generate_trace("rps", rps=4.8, duration_s=20, seed=0)
    seen = []
    real = AdaServePlus.observe

    def spy(self, *a):
        real(self, *a)
        seen.append(dict(self.outcomes))

    AdaServePlus.observe = spy
    try:
        simulate_records(records, "adaserve_plus", "llama-3.1-70b")
    finally:
        AdaServePlus.observe = real
    assert seen[-1]["exact"] > 0 and seen[-1]["posterior"] == 0


# ------------------------------------------------------------------------------- engine

def test_engine_outcomes_come_from_token_ids():
    """On the torch engine the accepted path is walked by token id (never the posterior) and the
    output stays that of plain greedy decoding."""
    from test_engine_serving import EOS, make_requests, noisy_copy, serve
    from engine_util import plain_greedy
    from adaserve.engine import ModelDrafter, tiny_random_model

    target = tiny_random_model("llama", seed=1)
    reqs, prompts = make_requests(6)
    ex, loop, reqs = serve(target, "adaserve_plus", ModelDrafter(noisy_copy(target), num_blocks=200),
                           prompts, reqs=reqs)
    policy = loop.policy
    assert policy.outcomes["exact"] > 0 and policy.outcomes["posterior"] == 0
    assert policy.calibrator.tried.sum() > 0
    for r in reqs:
        assert ex.outputs[r.rid] == plain_greedy(target, prompts[r.rid], r.max_new_tokens, (EOS,))


# ------------------------------------------------------------------------------- harness

def test_headline_table_shows_joint_attainment_beside_the_papers_metric(tmp_path):
    from test_plot import put, summary
    from adaserve.harness import headline as hl

    root = tmp_path / "results"
    for system, att, joint in (("adaserve", 0.9, 0.62), ("vllm", 0.5, 0.41)):
        s = summary(att, 500)
        s["joint_attainment"] = joint
        put(root, "fig8,9", "llama", system, "rps4.8_ol256", s)
    put(root, "fig8,9", "qwen", "adaserve", "rps4.8_ol256", summary(0.9, 500))  # an old result
    put(root, "fig8,9", "qwen", "vllm", "rps4.8_ol256", summary(0.5, 500))
    h = hl.headline(root, "8")
    rows = {r.model: r for r in h.rows}
    assert (rows["llama"].hardest.adaserve_joint, rows["llama"].hardest.baseline_joint) == (0.62, 0.41)
    assert math.isnan(rows["qwen"].hardest.adaserve_joint)
    text = hl.format_headline(h)
    llama = [line for line in text.splitlines() if line.startswith("8,9") and "llama" in line][0]
    assert "90.0%  62.0%" in llama and "50.0%  41.0%" in llama
    assert "joint" in text.splitlines()[2]


def test_adaserve_plus_is_selectable_by_its_switch():
    from adaserve.harness.sweep import SWITCHES, settings_from_env
    from adaserve.harness.plot import label_of

    assert SWITCHES["ADASERVE_PLUS"] == ("adaserve_plus",)
    s = settings_from_env("fig8,9", "llama", {"ADASERVE_PLUS": "ON"})
    assert s.systems == ["adaserve_plus"] and label_of("adaserve_plus") == "AdaServe+"


def test_replay_script_runs_systems_across_loads(tmp_path):
    """scripts/replay_acceptance.py: one row per (requests, scale, acceptance), one cell per system."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    try:
        import replay_acceptance
    finally:
        sys.path.pop(0)
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps([{"emission_time_ms": 500.0 * i, "input_length": 40, "output_length": 32,
                                  "slo_ratio": 1.2, "category": "coding", "prompt": "x"} for i in range(6)]))
    out = tmp_path / "rows.json"
    assert replay_acceptance.main(["--profile", "llama-3.1-70b", "--trace", str(trace), "--acceptance", "synthetic",
                                   "--requests", "4", "--scales", "1,2", "--systems", "vllm,adaserve_plus",
                                   "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["scale"], r["system"]) for r in rows] == [(1.0, "vllm"), (1.0, "adaserve_plus"),
                                                         (2.0, "vllm"), (2.0, "adaserve_plus")]
    assert all(0 <= r["joint"] <= r["attainment"] <= 1 for r in rows)
    assert all(r["tokens_per_step"] == 1.0 for r in rows if r["system"] == "vllm")
    with pytest.raises(SystemExit, match="NAME=FILE"):
        replay_acceptance.acceptance("nofile")


def test_depth_acceptance_cumulative_follows_every_update():
    """``DepthAcceptance.cumulative`` is read several times an iteration and cached: each update
    clears it, so it always equals [0, cumsum(rho)]."""
    from adaserve.scheduling.calibration import MAX_DEPTH, DepthAcceptance
    d = DepthAcceptance()
    fresh = lambda c: np.concatenate(([0.0], np.cumsum(d.rho(c))))  # noqa: E731
    before = d.cumulative("coding")
    assert np.array_equal(before, fresh("coding")) and d.cumulative("coding") is before
    d.update_many(["coding", "chat"], 3, np.array([2, 0]), np.ones((2, MAX_DEPTH)))
    for c in ("coding", "chat", "summarization"):
        assert np.array_equal(d.cumulative(c), fresh(c))
    assert not np.array_equal(d.cumulative("coding"), before)


def test_slo_state_is_read_once_per_iteration():
    """Plan and selection of one iteration share one ``SloState`` (same list of requests, same
    time); another list or another time reads the requests again."""
    p = make_policy("adaserve_plus", "llama")
    decode = [Request(0, 0.0, 10, 50, 1.2, 36.0, "coding", first_decode_ms=5.0, generated=3)]
    a = p.slo_state(decode, 100.0)
    assert p.slo_state(decode, 100.0) is a
    assert p.slo_state(decode, 140.0) is not a and p.slo_state(list(decode), 140.0) is not a
    fresh = SloState.of(decode, 100.0)
    assert np.array_equal(a.slack, fresh.slack) and np.array_equal(a.terms[0], fresh.terms[0])


@pytest.mark.parametrize("ngram", [False, True])
@pytest.mark.parametrize("step_model", ["table", "engine"])
def test_one_shape_s_overhead_is_the_vector_s_element(step_model, ngram):
    """``overhead_one_ms`` (what the plan and the selection ask a few times an iteration) gives the
    bits of ``overhead_ms`` for every shape, with and without the host rows and the n-gram row."""
    from adaserve.core.profile import Table
    from adaserve.scheduling.adaserve_plus import overhead_ms, overhead_one_ms
    from adaserve.scheduling.policies import context_tokens, draft_phase_ms

    def table(ms):
        return Table(np.array([1.0, 8.0, 64.0]), np.array(ms))

    host = {"speculative": table([0.71, 1.13, 2.9]), "incremental": table([0.52, 0.67, 1.3]),
            "draft": table([0.08, 0.13, 0.5])}
    lat = replace(LLAMA, step_model=step_model, host=host,
                  measured_with={"drafter": "ngram"} if ngram else {})
    policy = AdaServePlus(make_policy("adaserve", "llama").config, "llama")
    for n in (1, 3, 8, 40):
        running = [decoding(i) for i in range(n)]
        view = IterationView(10_000.0, [], running, lat, 10**7)
        ctx = context_tokens(running)
        for shape in policy.shape_options(n):
            level = draft_phase_ms(view, shape, n, ctx)
            want = overhead_ms(view, n, np.array([shape.depth]), np.array([level]))[0]
            assert overhead_one_ms(view, n, shape, ctx) == want, (n, shape)

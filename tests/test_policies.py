"""Speculation parameters and the policies' plans."""

import math

import numpy as np
import pytest

from adaserve.bench.scheduler import ARTIFACT_LLAMA, random_forest, random_requests
from adaserve.core.request import Phase, Request
from adaserve.scheduling.plan import IterationView, SpecShape
from adaserve.scheduling.policies import SYSTEMS, make_policy
from adaserve.scheduling.speculation import LLAMA_SPEC, QWEN_SPEC, SpecParams, spec_params_for
from adaserve.scheduling.trees import CandidateForest, is_connected


def test_speculation_parameters_follow_eq_8_9():
    # d = clip(floor(512/n) - 1, 4, 8); w = clip(floor(96/n) + 1, 1, 3)
    assert (LLAMA_SPEC.depth(1), LLAMA_SPEC.width(1)) == (8, 3)
    assert (LLAMA_SPEC.depth(64), LLAMA_SPEC.width(64)) == (7, 2)
    assert (LLAMA_SPEC.depth(100), LLAMA_SPEC.width(100)) == (4, 1)
    assert (LLAMA_SPEC.depth(57), LLAMA_SPEC.depth(56)) == (7, 8)
    assert (QWEN_SPEC.depth(80), QWEN_SPEC.width(80)) == (3, 2)
    custom = SpecParams(d_min=2, d_max=6, w_max=4, b1=100, b2=40, c1=10, c2=0)
    assert custom.depth(10) == 4 and custom.width(10) == 4 and custom.width(30) == 1
    with pytest.raises(ValueError):
        SpecParams(d_min=5, d_max=4, w_max=1, b1=1, b2=1)


def test_speculation_constants_follow_the_model_family_not_its_name():
    assert spec_params_for("qwen2") is QWEN_SPEC
    assert spec_params_for("llama") is spec_params_for(None) is LLAMA_SPEC
    assert spec_params_for("qwen2.5-32b") is LLAMA_SPEC  # a model name is not a family
    assert make_policy("adaserve", "qwen2").config.spec is QWEN_SPEC
    assert make_policy("vllm_spec_4", "llama").config.spec is LLAMA_SPEC


def test_shapes():
    assert SpecShape.chain(4).nodes_per_request() == 5
    assert SpecShape.static((1, 1, 3, 1, 1, 1, 1, 1)).nodes_per_request() == 1 + 1 + 1 + 3 * 6
    assert SpecShape(3, 2).draft_tokens_per_step(10) == [10, 20, 20]


def waiting_request(rid, input_len=300, arrival=0.0, slo=50.0):
    return Request(rid=rid, arrival_ms=arrival, input_len=input_len, max_new_tokens=64,
                   slo_ratio=-slo, slo_ms=slo, category="chat", phase=Phase.WAITING)


def view_with(waiting, running, kv=10**7, now=10_000.0):
    return IterationView(now, waiting, running, ARTIFACT_LLAMA, kv)


def test_unknown_system_lists_valid_ones():
    with pytest.raises(ValueError, match="vllm_spec_4"):
        make_policy("nope", "llama")


@pytest.mark.parametrize("system", SYSTEMS)
def test_every_policy_plans_and_selects_connected_trees(system):
    rng = np.random.default_rng(1)
    running = random_requests(8, 10_000.0, rng)
    policy = make_policy(system, "llama")
    view = view_with([waiting_request(100)], running)
    plan = policy.plan(view)
    assert plan.prefill or plan.decode
    if plan.decode:
        if plan.shape.speculative and plan.shape.is_static:
            per = plan.shape.nodes_per_request()
            forest = CandidateForest.from_lists([[(max(0, j - 1), j, 0.5 ** j)
                                                  for j in range(1, per)]] * len(plan.decode))
        elif plan.shape.speculative:
            forest = random_forest(len(plan.decode), plan.shape.depth, plan.shape.width, rng)
        else:
            forest = CandidateForest.roots_only(len(plan.decode))
        sel = policy.select(plan, forest, view)
        assert is_connected(forest, sel.selected)
        assert sel.selected.sum() <= max(sel.budget, len(plan.decode))
        assert sel.predicted_ms > 0


def test_prefill_first_baselines_do_not_mix():
    running = random_requests(4, 10_000.0, np.random.default_rng(0))
    for system in ("vllm", "vllm_spec_4"):
        plan = make_policy(system, "llama").plan(view_with([waiting_request(9)], running))
        assert [c for _, c in plan.prefill] == [300] and plan.decode == []
        plan = make_policy(system, "llama").plan(view_with([], running))
        assert len(plan.decode) == 4 and not plan.prefill
    assert make_policy("vllm_spec_6", "llama").plan(view_with([], running)).shape == SpecShape.chain(6)


def test_sarathi_chunks_within_token_budget():
    running = random_requests(48, 10_000.0, np.random.default_rng(0))
    waiting = [waiting_request(i, input_len=1500) for i in range(100, 103)]
    plan = make_policy("sarathi", "llama").plan(view_with(waiting, running))
    assert len(plan.decode) == 48
    assert sum(c for _, c in plan.prefill) == 2048 - 48
    assert [c for _, c in plan.prefill] == [1024, 2048 - 48 - 1024]


def test_admission_waits_for_kv_and_batch_slots():
    waiting = [waiting_request(i, input_len=100) for i in range(3)]
    # Room for exactly one reservation (100 + 64 + 64 headroom = 228 tokens).
    plan = make_policy("sarathi", "llama").plan(view_with(waiting, [], kv=300))
    assert [r.rid for r, _ in plan.prefill] == [0]
    running = random_requests(64, 10_000.0, np.random.default_rng(0))
    plan = make_policy("adaserve", "llama").plan(view_with(waiting, running))
    assert plan.prefill == []  # 64 requests per batch already decoding


def test_adaserve_prefill_room_follows_slack():
    rng = np.random.default_rng(0)
    running = random_requests(16, 10_000.0, rng)
    waiting = [waiting_request(99, input_len=2000)]
    policy = make_policy("adaserve", "llama", prefill_mode="slack")
    for r in running:  # far ahead of schedule: large chunks allowed
        r.generated = int((10_000.0 - r.first_decode_ms) / r.slo_ms) + 40
    big = policy.plan(view_with(waiting, running)).prefill[0][1]
    for r in running:  # behind schedule: only the minimum chunk
        r.generated = 1
    small = policy.plan(view_with(waiting, running)).prefill[0][1]
    assert small == policy.config.min_prefill_chunk < big


def test_adaserve_spends_more_when_requests_fall_behind():
    rng = np.random.default_rng(3)
    running = random_requests(32, 10_000.0, rng)
    forest = random_forest(32, 8, 3, rng)
    policy = make_policy("adaserve", "llama")
    for r in running:
        r.generated = 10**4  # far ahead: SLOs impose nothing
    relaxed = policy.select(policy.plan(view_with([], running)), forest, view_with([], running))
    for r in running:
        r.generated = 1      # all far behind
    urgent = policy.select(policy.plan(view_with([], running)), forest, view_with([], running))
    assert urgent.budget > relaxed.budget
    assert math.isfinite(urgent.predicted_ms) and urgent.predicted_ms > relaxed.predicted_ms


def test_priority_cuts_the_batch_for_urgent_requests():
    rng = np.random.default_rng(0)
    running = random_requests(60, 10_000.0, rng)
    for i, r in enumerate(running):
        r.slo_ms = 20.0 if i < 5 else 150.0  # 20 ms: 46 tokens fit in a step (55 ms per 128)
    plan = make_policy("priority", "llama").plan(view_with([], running))
    assert {r.rid for r in plan.decode} >= {0, 1, 2, 3, 4}
    assert ARTIFACT_LLAMA.verify_ms(len(plan.decode)) <= 20.0
    assert len(plan.decode) == 46


def test_priority_urgency_is_relative_to_the_tightest_slo():
    rng = np.random.default_rng(1)
    running = random_requests(60, 10_000.0, rng)
    for i, r in enumerate(running):
        r.slo_ms = 25.0 if i % 10 == 0 else 150.0   # the 25 ms requests are urgent
    plan = make_policy("priority", "llama").plan(view_with([], running))
    assert {r.rid for r in running if r.slo_ms == 25.0} <= {r.rid for r in plan.decode}
    assert len(plan.decode) < 60
    for r in running:
        r.slo_ms = float("inf")                       # best effort only: nobody is urgent
    assert len(make_policy("priority", "llama").plan(view_with([], running)).decode) == 60


def test_adaserve_eager_prefill_takes_a_full_chunk():
    rng = np.random.default_rng(0)
    running = random_requests(16, 10_000.0, rng)
    for r in running:
        r.generated = 1  # far behind: the slack mode would give only the minimum chunk
    plan = make_policy("adaserve", "llama").plan(view_with([waiting_request(99, input_len=2000)], running))
    assert plan.prefill[0][1] == ARTIFACT_LLAMA.limits.prefill_chunk
    with pytest.raises(ValueError, match="valid: eager, buffer, slack"):
        make_policy("adaserve", "llama", prefill_mode="lazy")


def test_adaserve_buffer_prefill_mixes_at_most_the_buffer():
    """Our reading of the artifact's --chunked-prefill-buffer-size 128 (docs/scheduler.md): at
    most 128 prefill tokens ride along while requests decode; a full batch when none decodes."""
    rng = np.random.default_rng(0)
    running = random_requests(16, 10_000.0, rng)
    waiting = [waiting_request(99, input_len=2000), waiting_request(100, input_len=50)]
    policy = make_policy("adaserve", "llama", prefill_mode="buffer")
    assert [c for _, c in policy.plan(view_with(waiting, running)).prefill] == [128]
    idle = policy.plan(view_with(waiting, []))
    assert sum(c for _, c in idle.prefill) == ARTIFACT_LLAMA.limits.max_batch_tokens
    small = make_policy("adaserve", "llama", prefill_mode="buffer", prefill_buffer=64)
    assert [c for _, c in small.plan(view_with(waiting, running)).prefill] == [64]


def test_which_policies_run_a_draft_model():
    drafts = {s: make_policy(s, "llama").drafts for s in SYSTEMS}
    assert drafts == {"adaserve": True, "adaserve_plus": True, "vllm": False, "sarathi": False, "vllm_spec_4": True,
                      "vllm_spec_6": True, "vllm_spec_8": True, "specinfer": True,
                      "priority": False, "greedy": True, "equal": True}

"""The simulator's model of our own engine (issue 14, item 6; docs/fidelity.md): the "engine" step
model, the optional profile fields it reads, the profiler tables behind them, and the
engine-vs-simulator comparison."""

import json

import numpy as np
import pytest

from adaserve.core.errors import UserError
from adaserve.core.profile import LatencyProfile, Limits, Table
from adaserve.core.request import Request
from adaserve.scheduling.admission import graph_rows
from adaserve.scheduling.plan import SpecShape
from adaserve.scheduling.trees import CandidateForest
from adaserve.sim import executor as sim_executor
from adaserve.sim.acceptance import acceptance_for
from adaserve.sim.compare import engine_vs_sim, records_of_result, tpot_error
from adaserve.sim.executor import SimExecutor, engine_step_ms, graph_parts, shared_attention_ms


def engine_profile(**extra) -> LatencyProfile:
    """verify: 10 ms + 1 ms per token, + 1 ms per 100 key slots; prefill: 2 ms per token + 1 ms per
    10 prefilled tokens per 100 chunk tokens."""
    tokens = [1.0, 1000.0]
    d = {"name": "fake", "baseline_ms": 11.0, "step_model": "engine",
         "verify": {"tokens": tokens, "ms": [11.0, 1010.0], "context_tokens": [0.0, 10000.0],
                    "ms_by_context": [[11.0, 1010.0], [111.0, 1110.0]]},
         "prefill": {"tokens": tokens, "ms": [2.0, 2000.0], "context_tokens": [0.0, 1000.0],
                     "ms_by_context": [[2.0, 2000.0], [3.0, 3000.0]]},
         "draft": {"tokens": tokens, "ms": [0.0, 0.0]}}
    d.update(extra)
    return LatencyProfile.from_dict(d)


def test_constants_match_the_engine():
    from adaserve.engine.batch import SOLO_QUERY_THRESHOLD
    from adaserve.engine.kv_cache import BLOCK_SIZE

    assert sim_executor.SOLO_QUERY_THRESHOLD == SOLO_QUERY_THRESHOLD
    assert sim_executor.BLOCK_SIZE == BLOCK_SIZE


def test_shared_attention_is_priced_at_the_padded_key_slots():
    """One long request pads every other request's keys: 4 x 1024 slots, not 1024 + 3 x 16."""
    p = engine_profile()
    uniform = shared_attention_ms(p, [(256, 1)] * 4)
    padded = shared_attention_ms(p, [(1023, 1)] + [(15, 1)] * 3)
    assert uniform == pytest.approx(4 * 272 / 100, rel=1e-6)  # 257 keys -> 17 blocks of 16
    assert padded == pytest.approx(4 * 1024 / 100, rel=1e-6)
    assert shared_attention_ms(p, []) == 0.0


def test_split_calls_are_priced_as_the_engine_cuts_them():
    """With ``attention_calls`` (a CPU profile) the long request gets a call of its own, as the
    engine's BatchBuilder does: 1024 + 3 x 16 slots plus the second call's fixed 170 slots, not
    4 x 1024; uniform requests stay in one call, priced as before."""
    p = engine_profile(attention_calls={"fixed_keys": 170.0, "query_key": 0.165})
    entries = [(1023, 1)] + [(15, 1)] * 3
    assert shared_attention_ms(p, entries) == pytest.approx((1024 + 3 * 16 + 170) / 100, rel=1e-6)
    assert shared_attention_ms(p, [(256, 1)] * 4) == pytest.approx(shared_attention_ms(engine_profile(), [(256, 1)] * 4))
    from adaserve.engine import tiny_random_model
    from adaserve.engine.batch import BatchBuilder
    from adaserve.engine.kv_cache import KVCache
    cache = KVCache(tiny_random_model("llama").config, num_blocks=200, block_size=16)
    b = BatchBuilder(cache)
    b.group_costs = p.attention_calls
    for s, (ctx, _) in enumerate(entries):
        cache.alloc.add(s)
        cache.alloc.append(s, ctx)
        b.add_decode(s, 5)
    assert sorted(len(g.block_tables) for g in b.build().groups) == [1, 3]  # the engine's cut


def test_simulating_with_a_cpu_profile_from_before_the_split_warns(tmp_path):
    """A CPU engine profile without ``attention_calls`` prices one padded call the engine no longer
    runs: ``simulate_file`` says so (once) and still simulates; with the field, no warning."""
    from adaserve.sim.run import simulate_file
    from adaserve.core.trace import TraceRecord, save_trace
    trace = tmp_path / "t.json"
    save_trace(trace, [TraceRecord(0.0, 40, 4, "x", 1.5, "coding")])
    for calls, expected in ((None, 1), ({"fixed_keys": 170.0, "query_key": 0.165}, 0)):
        extra = {"measured_with": {"device": "cpu"}, **({"attention_calls": calls} if calls else {})}
        engine_profile(**extra).save(tmp_path / "p.json")
        warnings = []
        res = simulate_file(trace, "vllm", str(tmp_path / "p.json"), None, warn=warnings.append)
        assert res.summary["completed"] == 1
        assert len([w for w in warnings if "predates the engine's split attention calls" in w]) == expected


def test_query_factor_scales_tree_attention():
    p = engine_profile(attention_queries={"tokens": [1, 4, 16], "ms": [10.0, 20.0, 60.0]})
    base = engine_profile()
    assert shared_attention_ms(p, [(100, 4)] * 2) == pytest.approx(2 * shared_attention_ms(base, [(100, 4)] * 2))
    assert p.query_factor(1) == 1.0 and p.query_factor(10) == pytest.approx(4.0)


def test_engine_step_parts():
    p = engine_profile()
    # a prefill-only step of one long chunk is the prefill table at its prefilled length
    assert engine_step_ms(p, [(256, 500)], []) == pytest.approx(float(p.prefill_ms(256, 500)))
    # decode only: all tokens at context 0 plus the padded attention
    trees = [(300, 4), (50, 2)]
    assert engine_step_ms(p, [], trees) == pytest.approx(float(p.verify_ms(6, 0)) + shared_attention_ms(p, trees))
    # mixed: the chunk's difference from as many verified tokens is added to the shared forward
    mixed = engine_step_ms(p, [(256, 500)], trees)
    excess = float(p.prefill_ms(256, 500)) - float(p.verify_ms(256, 0))
    assert mixed == pytest.approx(float(p.verify_ms(262, 0)) + excess + shared_attention_ms(p, trees))
    # a short chunk: priced from the prefill table too (one logits row), its attention in the padded call
    short = float(p.verify_ms(22, 0)) + float(p.prefill_ms(16, 0)) - float(p.verify_ms(16, 0))
    assert engine_step_ms(p, [(16, 0)], trees) == pytest.approx(short + shared_attention_ms(p, trees + [(0, 16)]))


def test_a_graphed_engine_step_of_several_calls_is_priced_as_one_forward_per_call():
    """With CUDA graphs the engine runs a chunk beside decoding rows as one graphed forward per
    attention call (engine/cuda_graphs.py): the sum of those, not one forward."""
    plain, graphed = engine_profile(), engine_profile(measured_with={"device": "cuda", "cuda_graphs": True})
    trees = [(300, 4), (50, 2)]
    alone = float(graphed.verify_ms(6, 0)) + shared_attention_ms(graphed, trees)
    assert engine_step_ms(graphed, [], trees) == pytest.approx(alone)  # one call: as before
    assert engine_step_ms(graphed, [(256, 500)], []) == pytest.approx(float(graphed.prefill_ms(256, 500)))
    assert engine_step_ms(graphed, [(256, 500)], trees) == pytest.approx(float(graphed.prefill_ms(256, 500)) + alone)
    assert engine_step_ms(graphed, [(256, 500), (40, 0)], trees) == pytest.approx(
        float(graphed.prefill_ms(256, 500)) + float(graphed.prefill_ms(40, 0)) + alone)
    short = engine_step_ms(plain, [(16, 0)], trees)  # a short chunk rides in the shared call
    assert engine_step_ms(graphed, [(256, 500), (16, 0)], trees) == pytest.approx(
        float(graphed.prefill_ms(256, 500)) + short)
    # beyond the graphs: one eager forward, priced as without graphs
    for chunks, tr in (([(1100, 0)], trees), ([(256, 0)] * 3, trees), ([(256, 0)], [(10, 1)] * 1100)):
        assert graph_parts(chunks, tr) is None
        assert engine_step_ms(graphed, chunks, tr) == pytest.approx(engine_step_ms(plain, chunks, tr))
    assert engine_step_ms(plain, [(256, 500)], trees) < engine_step_ms(graphed, [(256, 500)], trees)
    # trees with more padded rows than one graph: the graph runner's packs, a forward each
    big = [(100, 25)] * 30 + [(100, 3)] * 12  # 42 x 32 rows: 32 trees of 25 nodes, then the 12 small ones
    solo, packs = graph_parts([], big, max_rows=1024, max_requests=64)
    assert solo == [] and [len(t) for _, t in packs] == [30 + 2, 10]
    assert engine_step_ms(graphed, [], big) == pytest.approx(
        engine_step_ms(plain, [], big[:30] + big[30:32]) + engine_step_ms(plain, [], big[32:]))
    # an engine that never splits a step (ADASERVE_GRAPH_PARTS=1, recorded in the profile)
    unsplit = engine_profile(measured_with={"device": "cuda", "cuda_graphs": True, "graph_parts": 1})
    assert engine_step_ms(unsplit, [(256, 500)], trees) == pytest.approx(engine_step_ms(plain, [(256, 500)], trees))


def test_a_step_costs_at_least_each_of_its_parts():
    """A prefill table measured cheaper than the verify table (another moment's load) cannot price a
    mixed step below its trees alone."""
    p = engine_profile(prefill={"tokens": [1.0, 1000.0], "ms": [0.0, 0.0]})
    trees = [(10, 8)] * 4
    assert engine_step_ms(p, [(256, 0)], trees) == pytest.approx(
        float(p.verify_ms(32, 0)) + shared_attention_ms(p, trees))


def _step(ex: SimExecutor, decode: list[Request], sizes: list[int]) -> float:
    offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    n = int(offsets[-1])
    parent = np.full(n, -1, np.int64)
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        parent[lo + 1:hi] = np.arange(lo, hi - 1)
    forest = CandidateForest(offsets=offsets, parent=parent, token=np.zeros(n, np.int64),
                             prob=np.ones(n), depth=np.zeros(n, np.int64))
    forest.extra["correct"] = np.ones(n, bool)
    before = ex.now()
    ex.execute([], decode, forest, np.ones(n, bool), np.full(len(decode), 99))
    return ex.now() - before


def _decoding(rid: int, context: int) -> Request:
    r = Request(rid, 0.0, context, 100, 1.0, 50.0, "coding")
    r.prefilled, r.generated = context, 1
    return r


def test_sim_executor_uses_the_step_model_and_charges_host_work():
    host = {"speculative": {"tokens": [1, 16], "ms": [2.0, 17.0]},
            "incremental": {"tokens": [1, 16], "ms": [1.0, 1.0]}}
    p = engine_profile(host=host)
    decode = [_decoding(0, 1000), _decoding(1, 16)]
    ex = SimExecutor(p, acceptance_for(None))
    ms = _step(ex, decode, [3, 1])
    assert ms == pytest.approx(engine_step_ms(p, [], [(1000, 3), (16, 1)]) + 1.0)  # no drafting: incremental
    ex._speculated = True
    assert _step(ex, decode, [3, 1]) == pytest.approx(engine_step_ms(p, [], [(1000, 3), (16, 1)]) + 3.0)
    # the same profile as a plain table prices the whole step at the total context, without host work
    table = LatencyProfile.from_dict({**p.to_dict(), "step_model": "table"})
    assert _step(SimExecutor(table, acceptance_for(None)), decode, [3, 1]) == pytest.approx(
        float(table.verify_ms(4, 1016)))


def test_profile_fields_round_trip_and_old_profiles_still_load():
    p = engine_profile(host={"speculative": {"tokens": [1, 4], "ms": [1.0, 2.0]}},
                       attention_queries={"tokens": [1, 16], "ms": [1.0, 3.0]},
                       attention_calls={"fixed_keys": 170, "query_key": 0.5})
    q = LatencyProfile.from_dict(json.loads(json.dumps(p.to_dict())))
    assert q.attention_calls == (170.0, 0.5)
    assert q.step_model == "engine" and q.host_ms(4, True) == 2.0 and q.host_ms(4, False) == 0.0
    assert q.query_factor(16) == pytest.approx(3.0)
    old = {"name": "old", "verify": {"tokens": [1, 2], "ms": [1, 2]}, "draft": {"tokens": [1, 2], "ms": [0, 0]}}
    o = LatencyProfile.from_dict(old)
    assert o.step_model == "table" and o.host == {} and o.attention_queries is None and o.attention_calls is None
    assert "step_model" not in o.to_dict() and "host" not in o.to_dict()


def test_a_system_pays_its_own_host_row():
    """``host_systems``: a system with its own row pays it for its iterations that verify drafted
    nodes; vLLM-Spec(k) takes the measured k's row; its other speculative iterations, its
    incremental ones and systems without a row pay the shared tables."""
    host = {"speculative": {"tokens": [1, 16], "ms": [1.0, 1.0]}, "incremental": {"tokens": [1, 16], "ms": [0.5, 0.5]}}
    rows = {"adaserve_plus": {"tokens": [1, 16], "ms": [2.0, 5.0]}, "vllm_spec_4": {"tokens": [1, 16], "ms": [3.0, 3.0]}}
    p = LatencyProfile.from_dict(json.loads(json.dumps(engine_profile(host=host, host_systems=rows).to_dict())))
    assert p.host_systems["adaserve_plus"](16) == 5.0  # round trip
    plus = p.for_system("adaserve_plus")
    assert plus.host_ms(16, True, tree=True) == 5.0
    assert plus.host_ms(16, True) == 1.0 and plus.host_ms(16, False, tree=True) == 0.5
    assert p.host_ms(16, True, tree=True) == 1.0  # the profile itself is unchanged
    assert p.for_system("vllm_spec_8").host_ms(1, True, tree=True) == 3.0
    assert p.for_system("adaserve") is p and p.for_system("vllm") is p
    assert engine_profile().for_system("adaserve_plus").host_ms(4, True, tree=True) == 0.0


def test_the_simulator_charges_a_systems_row_for_steps_that_verify_drafted_nodes():
    host = {"speculative": {"tokens": [1, 16], "ms": [2.0, 2.0]}, "incremental": {"tokens": [1, 16], "ms": [1.0, 1.0]}}
    p = engine_profile(host=host, host_systems={"specinfer": {"tokens": [1, 16], "ms": [7.0, 7.0]}}).for_system("specinfer")
    decode = [_decoding(0, 1000), _decoding(1, 16)]
    ex = SimExecutor(p, acceptance_for(None))
    ex._speculated = True
    assert _step(ex, decode, [3, 1]) == pytest.approx(engine_step_ms(p, [], [(1000, 3), (16, 1)]) + 7.0)
    ex._speculated = True
    assert _step(ex, decode, [1, 1]) == pytest.approx(engine_step_ms(p, [], [(1000, 1), (16, 1)]) + 2.0)  # roots only


def test_a_selection_verifies_drafted_nodes_only_beyond_the_roots():
    forest = CandidateForest.from_lists([[(0, 5, 0.9)], []])  # request 0: root + one node; request 1: root
    assert forest.verifies_drafted(np.array([True, True, True]))
    assert not forest.verifies_drafted(np.array([True, False, True]))  # roots only
    assert not forest.verifies_drafted(np.zeros(3, bool))
    assert forest.verifies_drafted(np.array([False, True, False]))  # a node without its root marked


def test_simulator_and_engine_read_the_systems_host_row(tmp_path):
    from adaserve.config import EngineConfig
    from adaserve.engine.loader import tiny_random_model
    from adaserve.runtime.build import resolve_profile
    from adaserve.sim.profiles import system_profile

    host = {"speculative": {"tokens": [1, 16], "ms": [1.0, 1.0]}}
    path = tmp_path / "p.json"
    engine_profile(host=host, host_systems={"specinfer": {"tokens": [1, 16], "ms": [4.0, 4.0]}}).save(path)
    assert system_profile(path, "specinfer").host_ms(2, True, tree=True) == 4.0
    assert system_profile(path, "adaserve").host_ms(2, True, tree=True) == 1.0
    cfg = EngineConfig("tiny-llama", profile=str(path))
    model = tiny_random_model("llama")
    assert resolve_profile(cfg, model, None, say=lambda _: None, system="specinfer").host_ms(2, True, tree=True) == 4.0
    assert resolve_profile(cfg, model, None, say=lambda _: None).host_ms(2, True, tree=True) == 1.0


@pytest.mark.parametrize("field, value, needle", [
    ("step_model", "fast", "step_model"),
    ("host_systems", [1], "'host_systems'"),
    ("host_systems", {"adaserve_plus": {"tokens": [1], "ms": [1]}}, "host_systems.adaserve_plus"),
    ("host", {"busy": {"tokens": [1, 2], "ms": [1, 2]}}, "'host'"),
    ("host", {"speculative": {"tokens": [2, 1], "ms": [1, 2]}}, "host.speculative"),
    ("attention_queries", {"tokens": [1], "ms": [1]}, "attention_queries"),
    ("attention_calls", {"fixed_keys": 170}, "attention_calls"),
    ("attention_calls", {"fixed_keys": -1, "query_key": 0.1}, "attention_calls.fixed_keys"),
    ("attention_calls", {"fixed_keys": 1, "query_key": "x"}, "attention_calls.query_key"),
])
def test_bad_profile_fields_are_user_errors(field, value, needle):
    d = engine_profile().to_dict()
    d[field] = value
    with pytest.raises(UserError, match=needle):
        LatencyProfile.from_dict(d, "p.json")


def test_profiler_grid_and_prefill_context_table():
    from adaserve.runtime.profiler import Grid, prefill_table

    lim = Limits(max_batch_requests=16, max_batch_tokens=256, prefill_chunk=256, max_seq_len=2048)
    g = Grid.for_limits(lim)
    assert g.prefill[-1] == 2048  # whole prompts up to the maximum sequence length, not the chunk
    assert g.prefill_contexts == [0, 256, 512, 1024, 1536] and g.host == [1, 2, 4, 8, 16]
    points = {f"prefill:{t}": 2.0 * t for t in g.prefill}
    points.update({f"prefillctx:{p}": 100.0 + p / 10 for p in g.prefill_contexts})
    t = prefill_table(points, g)
    assert t(128, 0) == pytest.approx(256.0)
    assert t(128, 1024) == pytest.approx(256.0 + 102.4 * 128 / 256)  # the chunk's extra, per token
    points["prefillctx:1024"] = 100.0  # disturbed: measured below a shorter context
    assert prefill_table(points, g)(128, 1024) == pytest.approx(256.0 + 51.2 * 128 / 256)  # running max
    del points["prefillctx:512"]
    assert prefill_table(points, g).context_tokens is None  # incomplete: no context axis


def test_host_step_ms_measures_a_real_loop():
    import torch

    from adaserve.engine.loader import tiny_random_model
    from adaserve.runtime.profiler import host_step_ms

    torch.set_num_threads(1)
    lim = Limits(max_batch_requests=4, max_batch_tokens=128, prefill_chunk=128, max_seq_len=512)
    flat = Table(np.array([1.0, 128.0]), np.ones(2))
    prof = LatencyProfile("flat", verify=flat, draft=flat, prefill=flat, baseline_ms=1.0, limits=lim)
    model = tiny_random_model("llama")
    for system in ("adaserve", "vllm"):
        host, drafting = host_step_ms(model, prof, None, 2, system, steps=2)
        assert 0.0 < host < 5000.0
        assert (drafting > 0.0) == (system == "adaserve")  # vllm does not speculate
    host, drafting = host_step_ms(model, prof, None, 2, "adaserve", steps=2, trees_only=True)
    assert 0.0 < host < 5000.0 and drafting > 0.0  # iterations with trees: they drafted


def _engine_result(tmp_path, profile_path) -> str:
    """A result file shaped like `adaserve run`'s, whose numbers are the simulator's own."""
    from adaserve.core.metrics import request_record
    from adaserve.core.results import write_results
    from adaserve.core.trace import TraceRecord
    from adaserve.sim.run import simulate_records

    records = [TraceRecord(0.0, 40, 6, "", 1.5, "coding"), TraceRecord(30.0, 300, 5, "", -80.0, "chat")]
    res = simulate_records(records, "vllm", profile_path, baseline_ms=11.0)
    prefix = tmp_path / "vllm-0"
    write_results(prefix, res.summary, res.requests,
                  {"system": "vllm", "baseline_ms": 11.0, "iterations": res.iterations})
    assert [r.slo_ms for r in res.requests] == [16.5, 80.0]
    assert [request_record(r)["input_len"] for r in res.requests] == [40, 300]
    return str(prefix) + ".json"


def test_engine_vs_sim_replays_the_same_requests(tmp_path):
    prof = tmp_path / "p.json"
    engine_profile().save(prof)
    result = _engine_result(tmp_path, str(prof))
    engine, sim = engine_vs_sim(result, prof, None)
    for key in ("attainment", "goodput", "tokens_per_step", "tpot_mean", "iterations"):
        assert sim[key] == pytest.approx(engine[key]), key
    assert tpot_error(engine, sim) == pytest.approx(0.0)
    doc = json.loads(open(result).read())
    recs = records_of_result(doc)
    assert [(r.emission_time_ms, r.input_length, r.output_length, r.category) for r in recs] == [
        (0.0, 40, 6, "coding"), (30.0, 300, 5, "chat")]
    del doc["requests"][0]["input_len"]
    with pytest.raises(UserError, match="input_len"):
        records_of_result(doc)


@pytest.mark.parametrize("drafter, charged", [("ngram", False), ("model", True), (None, True)])
def test_no_draft_prefill_for_the_ngram_drafter(drafter, charged):
    p = engine_profile(measured_with={"drafter": drafter} if drafter else {})
    assert SimExecutor(p, acceptance_for(None), draft_prefill=True).draft_prefill is charged


def test_ngram_drafting_is_priced_per_iteration():
    """The n-gram drafter's measured cost per iteration replaces the per-level draft table."""
    host = {"draft": {"tokens": [1, 16], "ms": [3.0, 18.0]}}
    req = [_decoding(0, 100), _decoding(1, 100)]
    shape = SpecShape(depth=4, width=2)
    for drafter, expected in (("ngram", 4.0), ("model", None)):
        p = engine_profile(host=host, measured_with={"drafter": drafter},
                           draft={"tokens": [1.0, 1000.0], "ms": [0.5, 500.5]})
        ex = SimExecutor(p, acceptance_for(None))
        ex.speculate(req, shape)
        levels = float(np.sum(p.draft_ms(np.asarray(shape.draft_tokens_per_step(2), float), 200)))
        assert ex.now() == pytest.approx(expected if expected is not None else levels)


# ---- the recorded replay follows what the engine drafted (docs/fidelity.md, "Tokens per step") ----

def _write_records(path, rows) -> None:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _chain_accepted(model, requests, k: int = 3) -> list[int]:
    from adaserve.sim.acceptance import accepted_lengths

    f = model.draft(requests, SpecShape.chain(k), np.random.default_rng(0))
    return accepted_lengths(f, np.ones(f.n_nodes, bool)).tolist()


def test_recorded_replay_follows_each_requests_own_record(tmp_path):
    """The simulator replays the engine's own requests: request (chat, 2) must follow the record of
    (chat, 2), not the category's record number ``2 mod 2`` (= rid 0's), as the replay once did."""
    from adaserve.sim.acceptance import RecordedAcceptance

    easy = {"probs": [0.9], "rank": 0}
    hard = {"probs": [0.9], "rank": -1}
    rows = [{"rid": rid, "category": cat, "pos": p, **kind} for rid, cat, kind in
            ((0, "chat", easy), (1, "coding", easy), (2, "chat", hard)) for p in range(1, 30)]
    _write_records(tmp_path / "acc.jsonl", rows)
    model = RecordedAcceptance.load(tmp_path / "acc.jsonl")
    reqs = []
    for rid, cat in ((0, "chat"), (1, "coding"), (2, "chat"), (7, "chat")):
        r = Request(rid, 0.0, 10, 100, 1.2, 30.0, cat)
        r.generated = 5
        reqs.append(r)
    # rid 7 has no record: it falls back to the category's record 7 mod 2 = rid 2's
    assert _chain_accepted(model, reqs) == [3, 3, 0, 0]


def test_recorded_replay_reads_records_by_position(tmp_path):
    """The engine writes no record where it expanded no node (a leaf reached by an all-accepted
    chain): position 3 below. The level-1 token of a request that has generated 3 tokens is output
    position 3; the replay once read the records by their index and took position 4's instead."""
    from adaserve.sim.acceptance import RecordedAcceptance

    rows = [{"rid": 0, "category": "chat", "pos": p, "probs": [0.9], "rank": 0} for p in (1, 2, 4, 5, 6)]
    _write_records(tmp_path / "acc.jsonl", rows)
    model = RecordedAcceptance.load(tmp_path / "acc.jsonl")
    r = Request(0, 0.0, 10, 100, 1.2, 30.0, "chat")
    r.generated = 3
    assert _chain_accepted(model, [r]) == [0]  # position 3: no proposal recorded
    r.generated = 4
    assert _chain_accepted(model, [r]) == [3]  # positions 4, 5, 6


# ---- the profiler counts each cost once (docs/fidelity.md, "Batch building") ---------------------

def test_profile_steps_time_the_forward_and_host_work_holds_the_batch_build(monkeypatch):
    """Batch building is host work: slowed by 40 ms, it must not reach the step tables (which the
    engine's step log compares with the forward alone) and must reach the host table."""
    import time

    import torch

    from adaserve.engine import batch as engine_batch
    from adaserve.engine.loader import tiny_random_model
    from adaserve.runtime import profiler

    torch.set_num_threads(1)
    model = tiny_random_model("llama")
    bench = profiler.StepBench(model, 2048)
    build = engine_batch.BatchBuilder.build

    def slow_build(self, *args, **kwargs):
        time.sleep(0.04)
        return build(self, *args, **kwargs)

    fast = (bench.step_ms(2, 4, 64, 3), bench.prefill_ms(32, 3))
    lim = Limits(max_batch_requests=4, max_batch_tokens=128, prefill_chunk=128, max_seq_len=512)
    flat = Table(np.array([1.0, 128.0]), np.ones(2))
    prof = LatencyProfile("flat", verify=flat, draft=flat, prefill=flat, baseline_ms=1.0, limits=lim)
    monkeypatch.setattr(engine_batch.BatchBuilder, "build", slow_build)
    slow = (bench.step_ms(2, 4, 64, 3), bench.prefill_ms(32, 3))
    assert slow[0] < fast[0] + 20 and slow[1] < fast[1] + 20
    host, _ = profiler.host_step_ms(model, prof, None, 2, "vllm", steps=2)
    assert host >= 40.0


def test_median_ms_times_only_the_call():
    from adaserve.runtime.profiler import median_ms

    calls = []
    ms = median_ms(lambda x: calls.append(x), 3, setup=lambda: len(calls), teardown=lambda: calls.append("t"))
    assert calls == [0, "t", 2, "t", 4, "t", 6, "t"]  # one warm-up, then 3 timed calls
    assert ms >= 0.0


def test_context_axis_resolves_small_contexts():
    """Points below 1,024 context tokens (the decode steps of a few short requests); a profile
    measured before them still loads and prices by interpolation between its own points."""
    from adaserve.runtime.profiler import Grid

    lim = Limits(max_batch_requests=16, max_batch_tokens=256, prefill_chunk=256, max_seq_len=2048)
    assert [c for c in Grid.for_limits(lim).contexts if c < 1024] == [0, 128, 256, 512]
    old = engine_profile()  # context points 0 and 10,000 only
    assert float(old.verify_ms(1, 500)) == pytest.approx(11.0 + 5.0)


def engine_vs_sim_script():
    """scripts/engine_vs_sim.py as a module."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "engine_vs_sim.py"
    spec = importlib.util.spec_from_file_location("engine_vs_sim_script", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_table_covers_adaserve_plus_and_reports_attainment_in_points(tmp_path, capsys):
    """``scripts/engine_vs_sim.py table`` on a run directory holding an adaserve_plus result (here
    the simulator's own, so every error is zero); adaserve_plus is among the default systems."""

    from adaserve.core.results import write_results
    from adaserve.core.trace import TraceRecord
    from adaserve.sim.run import simulate_records

    mod = engine_vs_sim_script()
    assert "adaserve_plus" in mod.SYSTEMS.split(",")
    engine_profile().save(tmp_path / "profile-0.json")
    (tmp_path / "x4").mkdir()
    records = [TraceRecord(0.0, 40, 6, "", 1.5, "coding"), TraceRecord(30.0, 300, 5, "", 3.0, "chat")]
    res = simulate_records(records, "adaserve_plus", str(tmp_path / "profile-0.json"), baseline_ms=11.0)
    write_results(tmp_path / "x4" / "adaserve_plus-0", res.summary, res.requests,
                  {"system": "adaserve_plus", "baseline_ms": 11.0, "iterations": res.iterations})
    mod.main(["table", str(tmp_path)])
    row = [line for line in capsys.readouterr().out.splitlines() if "adaserve_plus" in line]
    assert len(row) == 1 and "(+0.0 pt)" in row[0] and "(+0%)" in row[0] and row[0].endswith("| 0% |")


def test_table_prices_a_bracketed_repeat_with_the_mean_of_its_two_profiles(tmp_path, capsys):
    """``run --bracket`` measures the profile again after a repeat's runs; ``table`` then prices them
    with the per-point mean of the two (``--before-only``: the first). Profiles of other grids or
    settings are refused, naming the field."""

    from adaserve.core.results import write_results
    from adaserve.core.trace import TraceRecord
    from adaserve.sim.run import simulate_records

    mod = engine_vs_sim_script()
    engine_profile().save(tmp_path / "profile-0.json")
    before = json.loads((tmp_path / "profile-0.json").read_text())
    after = json.loads(json.dumps(before))
    after["verify"]["ms"] = [3 * x for x in after["verify"]["ms"]]
    after["verify"]["ms_by_context"] = [[3 * x for x in row] for row in after["verify"]["ms_by_context"]]
    (tmp_path / "x4").mkdir()
    records = [TraceRecord(0.0, 40, 6, "", 1.5, "coding"), TraceRecord(30.0, 300, 5, "", 3.0, "chat")]
    res = simulate_records(records, "vllm", str(tmp_path / "profile-0.json"), baseline_ms=11.0)
    write_results(tmp_path / "x4" / "vllm-0", res.summary, res.requests,
                  {"system": "vllm", "baseline_ms": 11.0, "iterations": res.iterations})

    def tpot_cell(*flags) -> str:
        mod.main(["table", str(tmp_path), *flags])
        [row] = [line for line in capsys.readouterr().out.splitlines() if "| vllm |" in line]
        return row.split("|")[7]

    assert "(+0%)" in tpot_cell()  # no profile after the runs: the one before
    (tmp_path / "profile-0-after.json").write_text(json.dumps(after))
    mean = json.loads(json.dumps(before))
    mean["verify"]["ms"] = [2 * x for x in before["verify"]["ms"]]
    assert "(+0%)" not in tpot_cell() and "(+0%)" in tpot_cell("--before-only")
    bracket = json.loads((tmp_path / "profile-0-bracket.json").read_text())
    assert bracket["verify"]["ms"] == pytest.approx(mean["verify"]["ms"])
    assert bracket["verify"]["tokens"] == before["verify"]["tokens"] and bracket["limits"] == before["limits"]
    other = json.loads(json.dumps(before))
    other["verify"]["tokens"][-1] += 1
    with pytest.raises(ValueError, match="profile/verify/tokens: the profiles' grids differ"):
        mod.mean_profile([before, other])
    other = json.loads(json.dumps(before))
    other["limits"]["max_batch_requests"] += 1
    with pytest.raises(ValueError, match="profile/limits/max_batch_requests: the profiles differ"):
        mod.mean_profile([before, other])


def test_table_drift_scales_each_runs_profile_by_the_reference_steps_around_it(tmp_path, capsys):
    """``run --reference`` times a decode and a prefill reference step after each profile and
    around each run; ``table --drift`` prices each run with its repeat's profile scaled by the
    ratio of the references around the run to those after the profile: the decode timings by the
    decode reference's, the prefill table by the prefill one's, host work left as measured."""

    from adaserve.core.results import write_results
    from adaserve.core.trace import TraceRecord
    from adaserve.sim.run import simulate_records

    mod = engine_vs_sim_script()
    engine_profile().save(tmp_path / "profile-0.json")
    doc = json.loads((tmp_path / "profile-0.json").read_text())
    scaled = mod.scaled_profile(doc, 2.0, 3.0)
    assert scaled["verify"]["ms"] == pytest.approx([2 * x for x in doc["verify"]["ms"]])
    assert scaled["prefill"]["ms"] == pytest.approx([3 * x for x in doc["prefill"]["ms"]])
    assert scaled["baseline_ms"] == pytest.approx(2 * doc["baseline_ms"])
    assert scaled["verify"]["tokens"] == doc["verify"]["tokens"] and scaled.get("host") == doc.get("host")
    assert scaled["limits"] == doc["limits"] and doc == json.loads((tmp_path / "profile-0.json").read_text())

    (tmp_path / "x4").mkdir()
    records = [TraceRecord(0.0, 40, 6, "", 1.5, "coding"), TraceRecord(30.0, 300, 5, "", 3.0, "chat")]
    res = simulate_records(records, "vllm", str(tmp_path / "profile-0.json"), baseline_ms=11.0)
    write_results(tmp_path / "x4" / "vllm-0", res.summary, res.requests,
                  {"system": "vllm", "baseline_ms": 11.0, "iterations": res.iterations})

    def tpot_cell(refs: list[tuple[str, float, float]]) -> str:
        (tmp_path / "reference.jsonl").write_text("".join(
            json.dumps({"what": w, "phase": "after", "decode_ms": dec, "prefill_ms": pre}) + "\n"
            for w, dec, pre in refs))
        mod.main(["table", str(tmp_path), "--drift"])
        [row] = [line for line in capsys.readouterr().out.splitlines() if "| vllm |" in line]
        return row.split("|")[7]

    assert "(+0%)" in tpot_cell([("profile-0.json", 20.0, 100.0), ("x4/vllm-0", 20.0, 100.0)])
    slower = tpot_cell([("profile-0.json", 20.0, 100.0), ("x4/vllm-0", 19.0, 100.0), ("x4/vllm-0", 25.0, 100.0)])
    assert float(slower.split("(")[1].rstrip("%) ")) > 0  # the run's machine 10% slower: its price too
    drifted = json.loads((tmp_path / "drift" / "x4-vllm-0.json").read_text())
    assert drifted["verify"]["ms"] == pytest.approx([1.1 * x for x in doc["verify"]["ms"]])
    assert drifted["prefill"]["ms"] == pytest.approx(doc["prefill"]["ms"])
    with pytest.raises(SystemExit, match="no reference for x4/vllm-0"):
        tpot_cell([("profile-0.json", 20.0, 100.0)])


def test_reference_steps_print_one_json_line(capsys):
    """``engine_vs_sim.py reference``: the two reference steps, timed once, as one JSON line."""
    mod = engine_vs_sim_script()
    mod.main(["reference", "--model", "tiny-llama"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out) == {"decode_ms", "prefill_ms"} and 0 < out["decode_ms"] < out["prefill_ms"]


def test_retime_times_logged_steps_alone_beside_their_price(tmp_path, capsys):
    """``scripts/engine_vs_sim.py retime`` on a tiny model: one line per sampled decode-only step
    (prefill and mixed steps are skipped) with the logged, re-timed and priced ms, then the means;
    with ``--kind prefill``, the steps of a prompt's first chunk alone."""

    mod = engine_vs_sim_script()
    engine_profile().save(tmp_path / "p.json")
    steps = [{"prefill": [[16, 0]], "decode": [], "forward_ms": 9.0},
             {"prefill": [], "decode": [[40, 3], [7, 1]], "forward_ms": 2.0},
             {"prefill": [], "decode": [[100, 1]], "forward_ms": 1.5}]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    mod.main(["retime", str(tmp_path / "p.json"), str(tmp_path / "s.jsonl"), "--sample", "5",
              "--model", "tiny-llama"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[1:-1]]
    assert [r[:3] for r in rows] == [["2", "4", "47"], ["1", "1", "100"]] and lines[-1].startswith("means: logged")
    assert float(rows[0][5]) == pytest.approx(engine_step_ms(engine_profile(), [], [(40, 3), (7, 1)]), abs=0.05)
    mod.main(["retime", str(tmp_path / "p.json"), str(tmp_path / "s.jsonl"), "--kind", "prefill",
              "--model", "tiny-llama"])  # a prompt's first chunk alone: the first step only
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[1:-1]]
    assert [r[:4] for r in rows] == [["1", "16", "0", "9.0"]]
    assert float(rows[0][5]) == pytest.approx(engine_step_ms(engine_profile(), [(16, 0)], []), abs=0.05)


def test_negative_record_position_is_a_user_error(tmp_path):
    from adaserve.sim.acceptance import AcceptanceRecordError, RecordedAcceptance

    _write_records(tmp_path / "acc.jsonl", [{"rid": 0, "category": "chat", "pos": -1, "probs": [0.5], "rank": 0}])
    with pytest.raises(AcceptanceRecordError, match=r"acc.jsonl' line 1: pos must be >= 0"):
        RecordedAcceptance.load(tmp_path / "acc.jsonl")


def test_context_points_are_paired_with_a_context_zero_step():
    """A load that changes between points (+50 ms from one point to the next here) must not reach
    the context axis: each point is compared with a context-0 step timed right before it."""
    from adaserve.runtime.profiler import context_points

    class Bench:
        load = 0.0

        def step_ms(self, seqs, tokens, context, repeat):
            ms = 40.0 + context / 100 + Bench.load
            if context:  # the load changes after each point (unpaired, g(1024) - g(0) = 60.24)
                Bench.load += 50.0
            return ms

    points = dict(context_points(Bench(), 8, [0, 128, 1024, 4096], 5))
    g0 = points["context:0"]
    assert [points[f"context:{c}"] - g0 for c in (0, 128, 1024, 4096)] == pytest.approx([0, 1.28, 10.24, 40.96])


def test_engine_steps_logs_every_iteration_with_the_decoding_requests(tmp_path):
    """scripts/engine_steps.py's wrappers on a real executor and loop: one record per iteration,
    each ``decode`` entry beside the id of the request it belongs to."""
    import importlib.util
    from pathlib import Path

    import torch

    from adaserve.engine import NgramDrafter, TorchExecutor
    from adaserve.engine.loader import tiny_random_model
    from adaserve.iteration import ServingLoop
    from adaserve.scheduling.policies import make_policy

    spec = importlib.util.spec_from_file_location(
        "engine_steps_script", Path(__file__).resolve().parent.parent / "scripts" / "engine_steps.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.set_num_threads(1)
    lim = Limits(max_batch_requests=4, max_batch_tokens=128, prefill_chunk=32, max_seq_len=256)
    flat = Table(np.array([1.0, 128.0]), np.ones(2))
    prof = LatencyProfile("flat", verify=flat, draft=flat, prefill=flat, baseline_ms=1.0, limits=lim)
    ex = TorchExecutor(tiny_random_model("llama"), prof, NgramDrafter(), num_blocks=64, ignore_eos=True)
    rng = np.random.default_rng(0)
    ex.set_prompts({rid: rng.integers(3, 200, 20).tolist() for rid in (7, 9)})
    requests = [Request(rid=rid, arrival_ms=0.0, input_len=20, max_new_tokens=6, slo_ratio=2.0, slo_ms=10.0,
                        category="coding") for rid in (7, 9)]
    log = mod.StepLog(str(tmp_path / "steps.jsonl"))
    mod.instrument(ex, log)
    loop = ServingLoop(make_policy("adaserve", "llama"), ex, requests)
    while loop.run_once():
        log.add("iteration", 0.001, 0.001)
        log.flush()
    log.f.close()
    recs = [json.loads(x) for x in (tmp_path / "steps.jsonl").read_text().splitlines()]
    decoding = [r for r in recs if r["decode"]]
    assert len(recs) == loop.stats.iterations and decoding
    assert all(len(r["rids"]) == len(r["decode"]) and set(r["rids"]) <= {7, 9} for r in decoding)
    assert all(r["forward_ms"] > 0 for r in recs) and any("speculate_ms" in r for r in decoding)
    assert not any("forward_device_ms" in r or "syncs" in r for r in recs)  # CUDA only

    # --sync-debug: a wait's place is the innermost frame of the package; bad flags print the usage
    import traceback
    site = mod.sync_site("called a synchronizing CUDA operation\nmore", traceback.extract_stack())
    assert "test_fidelity.py:" in site and site.endswith(": called a synchronizing CUDA operation")
    assert mod.main(["x.jsonl", "--fast", "--", "run"]) == 2 and mod.main(["x.jsonl", "run"]) == 2
    assert mod.main(["x.jsonl", "--trace-prefill", "many", "--", "run"]) == 2
    # --trace-prefill: one iteration under the profiler, its operators printed at the end
    log2 = mod.StepLog(str(tmp_path / "traced.jsonl"))
    prof = mod.profiled(ex)
    with prof:
        torch.ones(3).sum()
    log2.f.close()
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        mod.print_traces([prof])
    assert "traced iteration 1 of 1" in err.getvalue() and "aten::" in err.getvalue()


COMPILED = {"max_tokens": 4, "keys": {"tokens": [0, 1000, 2000], "ms": [0.0, 2.0, 5.0]}}


def test_compiled_steps_are_priced_per_row_without_an_attention_call():
    """A step of at most ``max_tokens`` tokens runs compiled layers: the verify table at context 0
    plus, per row, the keys table at its committed keys (no padded call); a larger step is priced
    as before."""
    p = engine_profile(compiled_steps=COMPILED)
    keys = p.compiled_keys
    assert engine_step_ms(p, [], [(1000, 1)]) == pytest.approx(float(p.verify_ms(1, 0)) + 2.0)
    trees = [(1000, 2), (1500, 1), (0, 1)]
    assert engine_step_ms(p, [], trees) == pytest.approx(float(p.verify_ms(4, 0)) + 2 * 2.0 + 3.5 + 0.0)
    assert engine_step_ms(p, [(2, 500)], [(1000, 1)]) == pytest.approx(
        float(p.verify_ms(3, 0)) + 2 * float(keys(500)) + 2.0)
    big = [(1000, 3), (1500, 2)]
    assert engine_step_ms(p, [], big) == pytest.approx(engine_step_ms(engine_profile(), [], big))
    assert engine_step_ms(engine_profile(), [], [(1000, 1)]) == pytest.approx(
        float(p.verify_ms(1, 0)) + shared_attention_ms(p, [(1000, 1)]))


def test_compiled_steps_round_trip_and_bad_values_are_user_errors():
    p = engine_profile(compiled_steps=COMPILED)
    q = LatencyProfile.from_dict(json.loads(json.dumps(p.to_dict())))
    assert q.compiled_tokens == 4 and float(q.compiled_keys(1500)) == pytest.approx(3.5)
    assert engine_profile().compiled_keys is None and "compiled_steps" not in engine_profile().to_dict()
    for bad, needle in [({"max_tokens": 0, "keys": COMPILED["keys"]}, "max_tokens"),
                        ({"max_tokens": True, "keys": COMPILED["keys"]}, "max_tokens"),
                        ({"max_tokens": 4}, "compiled_steps"),
                        ({"max_tokens": 4, "keys": {"tokens": [0], "ms": [0]}}, "compiled_steps.keys")]:
        with pytest.raises(UserError, match=needle):
            engine_profile(compiled_steps=bad)


def test_compiled_key_points_and_table(monkeypatch):
    """``ckeys:C`` is paired with a context-0 step like the context axis; the table starts at 0
    and never decreases; only a model whose CPU steps run compiled layers gets the points."""
    from adaserve.engine import model as model_mod
    from adaserve.engine.loader import tiny_random_model
    from adaserve.runtime import profiler

    class Bench:
        load = 0.0
        calls = []

        def step_ms(self, seqs, tokens, context, repeat):
            Bench.calls.append((seqs, tokens, context))
            ms = 30.0 + context / 500 + Bench.load
            if context:
                Bench.load += 50.0
            return ms

    points = dict(profiler.compiled_key_points(Bench(), [0, 128, 1024], 5))
    assert points == pytest.approx({"ckeys:0": 0.0, "ckeys:128": 0.256, "ckeys:1024": 2.048})
    assert {c[:2] for c in Bench.calls} == {(1, 1)}
    lim = Limits(max_batch_requests=16, max_batch_tokens=256, prefill_chunk=256, max_seq_len=2048)
    g = profiler.Grid.for_limits(lim)
    assert g.compiled_keys == [0, 128, 256, 512, 1024, 2048]
    m = tiny_random_model("llama")
    points = {f"ckeys:{c}": c / 1000 for c in g.compiled_keys}
    points["ckeys:1024"] = 0.1  # disturbed
    monkeypatch.setenv(model_mod.CPU_DECODE_ENV, "1")
    if not model_mod.cpu_decode_limit(m.lm_head.weight):
        pytest.skip("numba disabled: no compiled steps")
    assert g.for_model(m).compiled_keys == g.compiled_keys
    assert 5 not in g.tokens and {4, 5} <= set(g.for_model(m).tokens)  # both sides of the compiled limit
    quick = profiler.Grid.for_limits(lim, quick=True)
    assert {4, 5} <= set(quick.for_model(m).tokens)
    t = profiler.compiled_keys_table(points, g, m)
    assert list(t.ms) == pytest.approx([0, 0.128, 0.256, 0.512, 0.512, 2.048])
    monkeypatch.setenv(model_mod.CPU_DECODE_ENV, "0")
    assert g.for_model(m).compiled_keys == [] and profiler.compiled_keys_table(points, g, m) is None
    assert g.for_model(m).tokens == g.tokens
    # with CUDA graphs: points on both sides of the largest graph, where steps turn eager
    big_limits = Limits(max_batch_requests=64, max_batch_tokens=2048, prefill_chunk=1024, max_seq_len=2048)
    big = profiler.Grid.for_limits(big_limits)
    graphed = big.for_model(m, graph_rows(big_limits.max_batch_tokens))
    assert 1025 not in big.tokens and {1024, 1025} <= set(graphed.tokens) and {1024, 1025} <= set(graphed.prefill)
    small = g.for_model(m, graph_rows(lim.max_batch_tokens))  # 256-token batches: graphs of 256 rows
    assert small.tokens == g.tokens and {256, 257} <= set(small.prefill)

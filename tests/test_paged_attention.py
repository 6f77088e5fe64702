"""The paged tree-attention kernel (engine/paged_attention.py) run by Triton's interpreter on the
CPU: the model's logits with it equal the gather + SDPA path's, for trees, decodes and short
prompt tails in one call, and serving with it (CUDA graphs' static buffers included) stays
lossless. On a GPU, tests/test_engine_cuda.py runs it compiled."""

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: its kernels are then interpreted

from adaserve.engine import BatchBuilder, NgramDrafter, TorchExecutor, tiny_random_model  # noqa: E402
from adaserve.engine.batch import DEVICE_MASK_ENV  # noqa: E402
from adaserve.engine.paged_attention import PAGED_ENV, paged_attention_enabled  # noqa: E402
from adaserve.iteration import ServingLoop  # noqa: E402
from adaserve.scheduling.policies import make_policy  # noqa: E402
from engine_util import plain_greedy  # noqa: E402
from test_cuda_graphs import repetitive_requests, tiny_profile  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_random_model("llama", seed=5)


def logits(model, contexts, trees, tails, paged: bool, seed: int) -> torch.Tensor:
    """One step of ``trees`` (parents) over sequences with ``contexts`` committed tokens, plus new
    prompts' first chunks of ``tails`` tokens, all in one attention call."""
    rng = np.random.default_rng(seed)
    os.environ[PAGED_ENV] = "1" if paged else "0"
    try:
        cache = model.make_cache(80, 16)
        b = BatchBuilder(cache)
        for i, n in enumerate(contexts):
            b.add_prefill(i, rng.integers(3, 256, n).tolist())
        model(b.build(), cache)
        b = BatchBuilder(cache, split_padding=False)
        for i, n in enumerate(tails):
            b.add_prefill(100 + i, rng.integers(3, 256, n).tolist(), logits="all")
        for i, parents in enumerate(trees):
            b.add_tree(i, rng.integers(3, 256, len(parents)).tolist(), parents)
        batch = b.build()
        assert len(batch.groups) == 1 and batch.groups[0].window is not None
        return model(batch, cache)
    finally:
        os.environ.pop(PAGED_ENV, None)


@st.composite
def steps(draw):
    n = draw(st.integers(1, 4))
    contexts = [draw(st.integers(1, 70)) for _ in range(n)]
    trees = []
    for _ in range(n):
        size = draw(st.integers(1, 9))
        trees.append([-1] + [draw(st.integers(0, j - 1)) for j in range(1, size)])
    tails = [draw(st.integers(1, 12)) for _ in range(draw(st.integers(0, 2)))]
    return contexts, trees, tails


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # one env for all
@given(steps(), st.integers(0, 1000))
def test_paged_kernel_gives_the_gather_and_sdpa_logits(monkeypatch, model, step, seed):
    monkeypatch.setenv(DEVICE_MASK_ENV, "1")  # mask windows on the CPU, as on a GPU
    assert paged_attention_enabled(torch.device("cpu")) is False  # off unless asked
    contexts, trees, tails = step
    want = logits(model, contexts, trees, tails, False, seed)
    got = logits(model, contexts, trees, tails, True, seed)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("heads", [(4, 4, 16), (8, 2, 32)], ids=["no-gqa", "gqa-4"])
def test_other_head_layouts(monkeypatch, heads):
    """One query head per KV head, and four (as Llama-3's): the same logits."""
    h, kv, dim = heads
    other = tiny_random_model("llama", seed=7, num_heads=h, num_kv_heads=kv, head_dim=dim)
    monkeypatch.setenv(DEVICE_MASK_ENV, "1")
    trees = [[-1, 0, 0, 1], [-1], [-1, 0, 1]]
    want = logits(other, [30, 7, 90], trees, [4], False, 11)
    torch.testing.assert_close(logits(other, [30, 7, 90], trees, [4], True, 11), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_rows_and_keys_spread_over_several_programs(monkeypatch, model, splits):
    """More query rows than one program holds (``MAX_ROWS``), and each request's keys in ``splits``
    ranges combined afterwards (flash-decoding, for steps of few requests): the same logits."""
    from adaserve.engine import paged_attention

    monkeypatch.setenv(DEVICE_MASK_ENV, "1")
    monkeypatch.setattr(paged_attention, "MAX_ROWS", 16)
    monkeypatch.setattr(paged_attention, "SPLITS", splits)
    trees = [[-1, 0, 1, 1, 2, 0, 5, 6, 2], [-1, 0], [-1]]  # 2 query heads per KV head x 9 rows > 16
    contexts = [20, 140, 3]  # 3 key tiles of 64 for the second request; the third's fit in one
    want = logits(model, contexts, trees, [5], False, 3)
    torch.testing.assert_close(logits(model, contexts, trees, [5], True, 3), want, atol=1e-5, rtol=0)


def test_key_splits_fill_the_gpu(monkeypatch):
    from adaserve.engine import paged_attention

    monkeypatch.setattr(paged_attention, "_multiprocessors", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert paged_attention.key_splits(cuda, 512, 32) == 1  # 64 requests x 8 KV heads fill 132 SMs
    assert paged_attention.key_splits(cuda, 8, 32) == 16  # one request: 8 programs -> 16 ranges each (max)
    assert paged_attention.key_splits(cuda, 32, 32) == 16  # 264 / 32 = 9 -> 16
    assert paged_attention.key_splits(cuda, 32, 3) == 4  # no more ranges than key tiles (rounded up to 2^k)
    assert paged_attention.key_splits(torch.device("cpu"), 8, 32) == 1


def test_the_switch(monkeypatch):
    for value, want in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv(PAGED_ENV, value)
        assert paged_attention_enabled(torch.device("cpu")) is want
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(PAGED_ENV, "1")
    assert paged_attention_enabled(torch.device("cpu")) is False  # compiled Triton needs a GPU


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_serving_with_the_paged_kernel_is_lossless(monkeypatch, model, graphs):
    monkeypatch.setenv(DEVICE_MASK_ENV, "1")
    monkeypatch.setenv(PAGED_ENV, "1")
    prompts, reqs = repetitive_requests(2, 4, 30, 10)
    ex = TorchExecutor(model, tiny_profile(), NgramDrafter(), cuda_graphs=graphs, ignore_eos=True)
    ex.set_prompts(prompts)
    ServingLoop(make_policy("adaserve", "tiny"), ex, copy.deepcopy(reqs)).run()
    monkeypatch.setenv(PAGED_ENV, "0")
    for r in reqs:
        assert ex.outputs[r.rid] == plain_greedy(model, prompts[r.rid], 10)
    if graphs:
        assert ex.graphs.stats["graph_steps"] > 0


COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from adaserve.engine.paged_attention_kernel import paged_tree_attention
for dt, ieee, splits in (("*bf16", False, 1), ("*fp32", True, 1), ("*bf16", False, 4)):
    sig = dict(q_ptr=dt, k_ptr=dt, v_ptr=dt, out_ptr=dt if splits == 1 else "*fp32", m_ptr="*fp32", l_ptr="*fp32",
               tables_ptr="*i64", prefix_ptr="*i64", start_ptr="*i64", local_ptr="*i1", scale="fp32", Q="i32",
               W="i32", NB="i32")
    consts = dict(H=32, KV=8, G=4, D=64, BS=16, BLOCK_M=64, BLOCK_N=64, EVERY_TILE=0, SPLITS=splits, IEEE=ieee)
    sig.update((k, "constexpr") for k in consts)
    kernel = triton.compile(ASTSource(fn=paged_tree_attention, signature=sig, constexprs=consts),
                            target=GPUTarget("cuda", 90, 32))
    print(dt, "mma" in kernel.asm["ptx"])
"""


def test_the_kernel_compiles_for_a_hopper_gpu():
    """The compiled path the interpreter does not take (a GPU's loop bound, bf16 and fp32 dots),
    compiled for sm_90 without a GPU: bf16 on the matrix units, fp32 at full precision."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, timeout=300, cwd=root,
                       env={**env, "PYTHONPATH": str(root)})
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ["*bf16", "True", "*fp32", "False", "*bf16", "True"], p.stdout

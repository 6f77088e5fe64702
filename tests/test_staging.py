"""``Staging`` (engine/staging.py): a step's host arrays packed into one buffer and sent in one copy.
On a GPU from pinned memory; here forced on the CPU, which runs the same packing and views."""

import copy

import numpy as np
import pytest
import torch

from adaserve.core.request import Request
from adaserve.engine import BatchBuilder, KVCache, NgramDrafter, TorchExecutor, tiny_random_model
from adaserve.engine.staging import RING, Staging
from adaserve.iteration import ServingLoop
from adaserve.scheduling.policies import make_policy
from engine_util import plain_greedy


def arrays(seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(-5, 1 << 40, 7), rng.random((2, 1, 3, 5)) < 0.5, np.zeros(0, np.int64),
            rng.integers(0, 9, (3, 4)).astype(np.int32), rng.random(3).astype(np.float32),
            np.asfortranarray(rng.integers(0, 9, (3, 2)))]


def test_arrays_come_back_equal_from_one_copy():
    staging = Staging("cpu", force=True)
    kept = []
    for seed in range(2 * RING + 1):  # past the ring: earlier results are untouched
        got = staging.to_device(arrays(seed))
        kept.append((seed, got))
    for seed, got in kept:
        for a, t in zip(arrays(seed), got):
            assert t.dtype == torch.from_numpy(np.ascontiguousarray(a)).dtype and tuple(t.shape) == a.shape
            assert np.array_equal(t.numpy(), a)
    assert staging.copies == 2 * RING + 1


def test_which_devices_a_staging_serves():
    staging = Staging(torch.device("cuda", 1), force=True)  # nothing is allocated until a copy
    assert staging.serves(torch.device("cuda", 1)) and staging.serves(torch.device("cuda"))
    assert not staging.serves(torch.device("cuda", 0)) and not staging.serves(torch.device("cpu"))


def test_staging_off_copies_each_array_and_a_bad_value_is_refused(monkeypatch):
    from adaserve.core.errors import UserError

    monkeypatch.setenv("ADASERVE_STAGING", "0")
    staging = Staging(torch.device("cuda", 0))  # nothing touches the GPU until a copy
    assert not staging.packs
    monkeypatch.setenv("ADASERVE_STAGING", "yes")
    with pytest.raises(UserError, match="ADASERVE_STAGING='yes'"):
        Staging("cpu")


def test_without_pinned_memory_the_copy_goes_from_pageable_memory(monkeypatch, caplog):
    """A container's locked-memory limit can refuse pinned buffers: one warning, then pageable ones."""
    staging = Staging("cpu", force=True)
    staging._pin = True  # as on a GPU
    real = torch.empty

    def no_pinning(*a, pin_memory=False, **kw):
        if pin_memory:
            raise RuntimeError("cudaHostAlloc failed")
        return real(*a, **kw)

    monkeypatch.setattr(torch, "empty", no_pinning)
    with caplog.at_level("WARNING", logger="adaserve.engine"):
        for seed in range(3):
            got = staging.to_device(arrays(seed))
            assert all(np.array_equal(t.numpy(), a) for a, t in zip(arrays(seed), got))
    assert not staging._pin and sum("pinned host memory unavailable" in r.message for r in caplog.records) == 1


def test_on_the_cpu_nothing_is_copied():
    staging = Staging("cpu")
    a = np.arange(5)
    [t] = staging.to_device([a])
    assert t.data_ptr() == a.ctypes.data and staging.copies == 0


def test_a_staged_batch_equals_the_plain_one():
    model = tiny_random_model("llama", seed=3)
    built = []
    for force in (False, True):
        cache = KVCache(model.config, num_blocks=64, block_size=16)
        cache.staging = Staging("cpu", force=force)
        b = BatchBuilder(cache)
        for i, n in enumerate((37, 5, 70)):
            b.add_prefill(i, list(range(3, 3 + n)))
        built.append(b.build())
        assert cache.staging.copies == int(force)
    plain, staged = built
    for name in ("token_ids", "positions", "slot_mapping", "seq_index", "logits_rows"):
        assert torch.equal(getattr(plain, name), getattr(staged, name)), name
    assert len(plain.groups) == len(staged.groups) > 1
    for g, h in zip(plain.groups, staged.groups):
        for name in ("rows", "pad_index", "block_tables", "mask"):
            assert torch.equal(getattr(g, name), getattr(h, name)), name
        assert g.num_queries == h.num_queries and g.entry_index.tolist() == h.entry_index.tolist()


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_serving_with_staged_copies_is_lossless(graphs):
    """Batches, the graph runner's row maps and the commit's slot lists all go through the staging."""
    model = tiny_random_model("llama", seed=1)
    rng = np.random.default_rng(0)
    prompts, reqs = {}, []
    for i in range(5):
        prompts[i] = (rng.integers(3, 256, 5).tolist() * 10)[: int(rng.integers(8, 40))]
        reqs.append(Request(rid=i, arrival_ms=0.0, input_len=len(prompts[i]), max_new_tokens=10, slo_ratio=1.5,
                            slo_ms=3.0, category="coding"))
    from test_cuda_graphs import tiny_profile

    ex = TorchExecutor(model, tiny_profile(), NgramDrafter(), cuda_graphs=graphs, ignore_eos=True)
    ex.cache.staging = Staging("cpu", force=True)
    ex.set_prompts(prompts)
    ServingLoop(make_policy("adaserve", "tiny"), ex, copy.deepcopy(reqs)).run()
    for r in reqs:
        assert ex.outputs[r.rid] == plain_greedy(model, prompts[r.rid], 10)
    assert ex.cache.staging.copies > 0

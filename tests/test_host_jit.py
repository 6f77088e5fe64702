"""The compiled host paths (numba through ``adaserve.core.jit``) against the numpy paths
(``ADASERVE_NUMBA=0``) and the per-node references of tests/test_engine_host.py, on random inputs:
n-gram drafting (whole trees, filler included), n-gram table updates (either path may update a
table the other reads), tree selection, batch rows and masks, greedy walks, the KV commit."""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_engine_host import (RefNgramIndex, RefTreeSet, connected_selection, random_forest, ref_group_mask,
                              ref_selected_trees)

from adaserve.core import jit
from adaserve.engine import tiny_random_model
from adaserve.engine.batch import BatchBuilder
from adaserve.drafting.ngram import Filler, NgramDrafter, NgramTable
from adaserve.drafting.trees import RECORD_K, level_plan
from adaserve.engine.executor import argmax_rows, select_trees
from adaserve.engine.kv_cache import KVCache
from adaserve.engine.sequence import SeqState
from adaserve.engine.verify import greedy_walk
from adaserve.scheduling.plan import SpecShape
from engine_util import greedy_walks

pytestmark = pytest.mark.skipif(jit._numba() is None, reason="numba is not installed")
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CONFIG = tiny_random_model("llama").config


@contextmanager
def switch(name: str, on: bool):
    """The 0/1 environment switch ``name`` set for the block (hypothesis examples cannot use ``monkeypatch``)."""
    old = os.environ.get(name)
    os.environ[name] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def compiled(on: bool):
    """``ADASERVE_NUMBA`` set for the block."""
    return switch(jit.ENV, on)


def both(fn, *args, **kwargs):
    """``fn`` run compiled and on the numpy paths: (compiled result, numpy result)."""
    with compiled(True):
        a = fn(*args, **kwargs)
    with compiled(False):
        b = fn(*args, **kwargs)
    return a, b


def forest_arrays(forest) -> list[np.ndarray]:
    return [forest.offsets, forest.parent, forest.token, forest.prob, forest.depth,
            *(forest.extra[k] for k in ("next_tokens", "next_probs", "expanded"))]


shapes = st.one_of(
    st.builds(SpecShape, depth=st.integers(1, 5), width=st.integers(1, 4)),
    st.lists(st.integers(1, 3), min_size=1, max_size=4).map(lambda w: SpecShape.static(tuple(w))),
    st.integers(1, 6).map(SpecShape.chain),
)
histories = st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=40), min_size=1, max_size=6)


def ref_draft(ids: list[int], shape: SpecShape, max_n: int) -> tuple[list[int], list[int], list[float]]:
    """One request's tree, node by node: each frontier node looks up the dict index with the
    committed tokens plus its path, then the per-request beam/static growth."""
    index = RefNgramIndex(max_n)
    index.update(ids)
    tree = RefTreeSet([ids[-1]])
    for level in range(shape.depth):
        front = tree.frontier[0]
        if not front:
            break
        toks = np.full((len(front), RECORD_K), -1, np.int64)
        ps = np.zeros((len(front), RECORD_K))
        for f, node in enumerate(front):
            path = []
            while node > 0:
                path.append(tree.tokens[0][node])
                node = tree.parents[0][node]
            hit = index.lookup((ids + path[::-1])[-max_n:], 1, 1.0)
            if hit is not None:
                toks[f, :len(hit[0])], ps[f, :len(hit[1])] = hit
        tree.grow(0, toks, ps, *level_plan(shape, level))
    return tree.tokens[0], tree.parents[0], tree.probs[0]


@SETTINGS
@given(histories, shapes, st.lists(st.lists(st.integers(0, 5), max_size=6), max_size=3), st.booleans())
def test_compiled_drafts_equal_numpy_drafts_and_the_per_node_reference(hist, shape, grown, fill):
    filler = Filler(2, 9, tuple(0.01 * (RECORD_K - k) for k in range(RECORD_K)), seed=7) if fill else None
    drafters = [NgramDrafter(max_ngram=3, filler=filler) for _ in range(2)]
    seqs = [[SeqState(i, list(h), len(h)) for i, h in enumerate(hist)] for _ in range(2)]
    for step in range(len(grown) + 1):
        with compiled(True):
            a = drafters[0].draft(seqs[0], shape)
        with compiled(False):
            b = drafters[1].draft(seqs[1], shape)
        a.check()
        for x, y in zip(forest_arrays(a), forest_arrays(b)):
            assert x.dtype == y.dtype and np.array_equal(x, y)
        if filler is None:
            for i, s in enumerate(seqs[0]):
                lo, hi = a.offsets[i], a.offsets[i + 1]
                parents = [p - lo if p >= 0 else -1 for p in a.parent[lo:hi]]
                assert (a.token[lo:hi].tolist(), parents, a.prob[lo:hi].tolist()) == ref_draft(s.ids, shape, 3)
        else:  # every expanded node has RECORD_K children candidates
            assert (a.extra["next_tokens"][a.extra["expanded"]] >= 0).all()
        if step < len(grown):
            for group in seqs:
                group[step % len(group)].ids.extend(grown[step])


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 4), st.lists(st.integers(0, 6), min_size=1, max_size=12), st.booleans()),
                min_size=1, max_size=25))
def test_a_table_updated_by_either_path_answers_like_the_dict_index(steps):
    """Each update goes through the path its step draws (the compiled one grows the maps and
    id arrays by itself, from tiny ones); lookups of every n-gram suffix match the dict index."""
    table, refs, ids = NgramTable(3), {}, {}
    for sid, tokens, on in steps:
        ids.setdefault(sid, []).extend(tokens)
        refs.setdefault(sid, RefNgramIndex(3)).update(ids[sid])
        with compiled(on):
            table.update([(sid, ids[sid])])
    for sid, seq in ids.items():
        for k in range(1, 4):
            for j in range(k, len(seq) + 1):
                suffix = np.full((1, 3), -1, np.int64)
                suffix[0, 3 - k:] = seq[j - k:j]
                toks, probs = table.lookup(np.array([table.root(sid)]), suffix, 1, 1.0)
                n = int((toks[0] >= 0).sum())
                got = None if n == 0 else (toks[0, :n].tolist(), probs[0, :n].tolist())
                assert got == refs[sid].lookup(seq[j - k:j], 1, 1.0)


def test_compiled_update_grows_from_small_maps():
    """The compiled update rehashes the maps and grows the id arrays inside the kernel."""
    table = NgramTable(4)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, 5000).tolist()
    with compiled(True):
        table.update([(0, ids)])
    assert table.n_ids > 1024 and table.grams.size == table.n_ids - 1 and len(table.total) >= table.n_ids
    assert 2 * table.grams.size <= len(table.grams.keys) and 2 * table.nexts.size <= len(table.nexts.keys)
    ref = RefNgramIndex(4)
    ref.update(ids)
    sfx = np.array([ids[-4:]], np.int64)
    toks, _ = table.lookup(np.array([table.root(0)]), sfx, 1, 1.0)
    assert toks[0][toks[0] >= 0].tolist() == ref.lookup(ids[-4:], 1, 1.0)[0]


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 7))
def test_select_trees_compiled_equals_numpy_and_the_reference(seed, n):
    rng = np.random.default_rng(seed)
    forest = random_forest(rng, n)
    sel = connected_selection(rng, forest)
    roots = rng.integers(100, 200, n).tolist()
    a, b = both(select_trees, forest, sel, roots)
    for x, y in ((a.offsets, b.offsets), (a.tokens, b.tokens), (a.parents, b.parents), (a.nodes, b.nodes)):
        assert np.array_equal(x, y)
    assert [(t.tokens, t.parents, t.nodes.tolist()) for t in map(a.tree, range(n))] == \
        ref_selected_trees(forest, sel, roots)
    orphan = sel.copy()
    inner = np.flatnonzero((forest.parent >= 0) & sel)
    if len(inner):  # drop a selected node's parent: both paths name the same request
        orphan[forest.parent[inner[-1]]] = False
        if forest.parent[forest.parent[inner[-1]]] >= 0:  # (a root is always kept)
            errors = []
            for on in (True, False):
                with compiled(on), pytest.raises(ValueError, match="not connected") as e:
                    select_trees(forest, orphan, roots)
                errors.append(str(e.value))
            assert errors[0] == errors[1]


@SETTINGS
@given(st.integers(0, 2**32 - 1))
def test_greedy_walks_compiled_equal_numpy_and_one_tree_walks(seed):
    rng = np.random.default_rng(seed)
    forest = random_forest(rng, int(rng.integers(1, 8)), max_nodes=20, vocab=3)  # duplicate siblings
    tb = select_trees(forest, np.ones(forest.n_nodes, bool), rng.integers(0, 3, forest.n_requests))
    argmax = rng.integers(0, 3, len(tb.tokens))
    a, b = both(greedy_walks, tb.tokens, tb.parents, tb.offsets, argmax)
    assert a == b
    for i, walk in enumerate(a):
        lo, hi = tb.offsets[i], tb.offsets[i + 1]
        assert walk == greedy_walk(tb.tokens[lo:hi].tolist(), tb.parents[lo:hi].tolist(), argmax[lo:hi].tolist())


def batch_with_trees(seed: int):
    """A batch of chains (a prefill chunk, a decode token) and bulk-added trees over committed
    contexts; returns (builder, cache)."""
    rng = np.random.default_rng(seed)
    cache = KVCache(CONFIG, num_blocks=300, block_size=4)
    b = BatchBuilder(cache)
    n = int(rng.integers(1, 6))
    for s in range(n + 1):
        b.add_prefill(s, rng.integers(0, 50, int(rng.integers(1, 14))).tolist())
    b.build()
    b = BatchBuilder(cache, split_padding=False)  # one attention group (the CPU may split it by cost)
    b.add_prefill(90, rng.integers(0, 50, int(rng.integers(1, 6))).tolist(), logits="all")
    b.add_decode(n, 7)
    forest = random_forest(rng, n, max_nodes=10)
    tb = select_trees(forest, connected_selection(rng, forest), list(range(n)))
    b.add_trees(list(range(n)), tb.tokens, tb.parents, tb.offsets)
    return b, cache


@SETTINGS
@given(st.integers(0, 2**32 - 1))
def test_batches_compiled_equal_numpy_and_the_per_entry_masks(seed):
    def build():
        b, cache = batch_with_trees(seed)
        return b.build(), b, cache
    (a, ba, cache), (b, _, _) = both(build)
    for name in ("token_ids", "positions", "slot_mapping", "seq_index", "logits_rows"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    ga, gb = a.groups[0], b.groups[0]
    for name in ("rows", "pad_index", "block_tables", "mask"):
        assert torch.equal(getattr(ga, name), getattr(gb, name)), name
    tables, mask, rows, pad = ref_group_mask(ba.entries, cache.alloc)
    assert np.array_equal(ga.mask.numpy(), mask) and np.array_equal(ga.block_tables.numpy(), tables)
    assert ga.rows.tolist() == rows and ga.pad_index.tolist() == pad


def batch_with_cached_tree(seed: int):
    """``batch_with_trees`` plus a tree that grows over two forwards (the draft model's beam: its
    first nodes written by an earlier batch, ``num_cached``)."""
    rng = np.random.default_rng(seed)
    b, cache = batch_with_trees(seed)
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, int(rng.integers(2, 9)))]
    tokens = rng.integers(0, 50, len(parents)).tolist()
    cached = int(rng.integers(1, len(parents)))
    first = BatchBuilder(cache)
    first.add_prefill(70, rng.integers(0, 50, int(rng.integers(1, 30))).tolist())
    first.build()
    first = BatchBuilder(cache)
    first.add_tree(70, tokens[:cached], parents[:cached])
    first.build()
    b.add_tree(70, tokens, parents, num_cached=cached)
    return b


def windowed(on: bool):
    """``ADASERVE_DEVICE_MASK`` set for the block."""
    from adaserve.engine.batch import DEVICE_MASK_ENV

    return switch(DEVICE_MASK_ENV, on)


@SETTINGS
@given(st.integers(0, 2**32 - 1))
def test_windowed_masks_spell_out_the_dense_masks(seed):
    """A group's mask sent as its window (what a GPU step sends) and spelled out on the device is
    the dense mask, compiled and with numpy, for chains, trees and a tree grown over two forwards,
    in one group or split by the CPU's padding cost."""
    def build(window: bool, split: bool):
        b = batch_with_cached_tree(seed)
        b.split_padding = split
        with windowed(window):
            return b.build()
    for split in (False, True):
        (dense, _), (win, win_np) = both(build, False, split), both(build, True, split)
        assert len(dense.groups) == len(win.groups) == len(win_np.groups)
        for gd, gw, gn in zip(dense.groups, win.groups, win_np.groups):
            assert gd.window is None and gw.mask is None and gn.mask is None
            for name in ("prefix", "start", "local"):
                assert torch.equal(getattr(gw.window, name), getattr(gn.window, name)), name
            for name in ("rows", "pad_index", "block_tables"):
                assert torch.equal(getattr(gd, name), getattr(gw, name)), name
            assert torch.equal(gw.attention_mask(4), gd.mask)


def test_bad_tree_parents_are_refused_alike():
    cache = KVCache(CONFIG, num_blocks=20, block_size=4)
    errors = []
    for on in (True, False):
        b = BatchBuilder(cache)
        with compiled(on), pytest.raises(ValueError, match="add_trees: node") as e:
            b.add_trees([0, 1], np.zeros(5, np.int64), np.array([-1, 0, -1, 0, 2]), np.array([0, 2, 5]))
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "node 2 of tree 1 has parent 2" in errors[0]
    assert cache.alloc.seq_ids() == []  # refused before touching the allocator


@SETTINGS
@given(st.integers(0, 2**32 - 1))
def test_commit_many_compiled_equals_numpy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 6))
    paths = {}
    for s in range(n):
        tree = int(rng.integers(1, 12))
        k = int(rng.integers(0, tree + 1))
        paths[s] = sorted(rng.choice(tree, k, replace=False).tolist())

    def commit():
        cache = KVCache(CONFIG, num_blocks=80, block_size=4)
        g = torch.Generator().manual_seed(seed % 2**31)
        cache.k.copy_(torch.randn(cache.k.shape, generator=g))
        cache.v.copy_(torch.randn(cache.v.shape, generator=g))
        for s in paths:
            cache.alloc.add(s)
            cache.alloc.append(s, 3 + 2 * s)
            cache.alloc.reserve(s, 3 + 2 * s + 12)
        cache.commit_many(paths)
        return cache
    a, b = both(commit)
    assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    assert [a.length(s) for s in paths] == [b.length(s) for s in paths] == [3 + 2 * s + len(p) for s, p in paths.items()]


@pytest.mark.parametrize("paths, error", [({0: [0, 2], 1: [0, 3, 3]}, "distinct non-negative"),
                                          ({0: [0, -1]}, "distinct non-negative"),
                                          ({0: [0], 1: [0, 40]}, "node 40 of 1 was never reserved")])
def test_commit_many_refuses_bad_paths_alike(paths, error):
    for on in (True, False):
        cache = KVCache(CONFIG, num_blocks=30, block_size=4)
        for s in (0, 1):
            cache.alloc.add(s)
            cache.alloc.append(s, 5)
            cache.alloc.reserve(s, 13)
        with compiled(on), pytest.raises((ValueError, IndexError), match=error):
            cache.commit_many(paths)
        assert cache.length(0) == cache.length(1) == 5  # nothing committed


def test_argmax_rows_matches_torch_with_ties():
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.integers(0, 3, (50, 7)).astype(np.float32))  # many ties: first max wins
    assert np.array_equal(argmax_rows(logits), logits.argmax(-1).numpy())
    assert np.array_equal(argmax_rows(logits.to(torch.bfloat16)), logits.argmax(-1).numpy())
    assert np.array_equal(argmax_rows(logits.T.contiguous().T), logits.argmax(-1).numpy())


def test_enabled_follows_the_environment_at_every_call(monkeypatch):
    """``jit.enabled`` keeps its answer per raw value: a changed value is read anew, and a bad one
    is refused at every call (nothing cached hides it)."""
    from adaserve.core.errors import UserError

    for value, want in (("0", False), ("1", jit._numba() is not None), ("0", False), ("", jit._numba() is not None)):
        monkeypatch.setenv(jit.ENV, value)
        assert jit.enabled() is want
    monkeypatch.setenv(jit.ENV, "yes")
    for _ in range(2):
        with pytest.raises(UserError, match="ADASERVE_NUMBA='yes'"):
            jit.enabled()
    monkeypatch.delenv(jit.ENV)
    assert jit.enabled() is (jit._numba() is not None)


@pytest.mark.skipif(not jit.enabled(), reason="numba is not importable or ADASERVE_NUMBA=0")
@pytest.mark.parametrize("windowed", ["0", "1"])
def test_every_attention_group_reaches_the_compiled_kernels_in_one_layout(monkeypatch, windowed):
    """Whole batches, solo groups and a shared call the CPU splits by padding cost, with dense and
    windowed masks: the group kernels see C-ordered arrays every time, so a warm-up compiles the one
    signature a run needs (a group's columns picked from the batch's are Fortran-ordered and once
    compiled mid-run)."""
    from adaserve.engine.batch import (DEVICE_MASK_ENV, _group_mask_kernel, _group_tables_kernel,
                                       _group_window_kernel)

    monkeypatch.setenv(DEVICE_MASK_ENV, windowed)
    cache = KVCache(CONFIG, num_blocks=400, block_size=4)
    b = BatchBuilder(cache)
    contexts = [3, 5, 200, 7, 260, 4]  # short and long contexts: the shared call is split
    for s, n in enumerate(contexts):
        b.add_prefill(s, list(range(3, 3 + n)))
    b.build()
    b = BatchBuilder(cache)
    b.add_prefill(90, list(range(3, 43)))  # a chunk of its own
    for s in range(len(contexts)):
        b.add_decode(s, 7)
    batch = b.build()
    assert len(batch.groups) >= 3 and any(len(g.entry_index) > 1 for g in batch.groups[1:])
    assert all((g.window is not None) == (windowed == "1") for g in batch.groups)
    mask_kernel = _group_window_kernel if windowed == "1" else _group_mask_kernel
    for kernel in (_group_tables_kernel, mask_kernel):
        layouts = {t.layout for sig in kernel.signatures for t in sig if hasattr(t, "layout")}
        assert layouts == {"C"}, kernel

"""The engine's host work (issue 12: drafting, tree selection, batch and mask building, the greedy
verification walk, the KV commit) against simple per-node reference implementations kept here, on
random inputs; each test runs the numpy paths (``ADASERVE_NUMBA=0``) and the compiled ones."""

import numpy as np
import pytest
import torch

from adaserve.core import jit
from adaserve.engine import tiny_random_model
from adaserve.engine.batch import BatchBuilder
from adaserve.drafting.ngram import NgramIndex, NgramTable
from adaserve.drafting.trees import RECORD_K, TreeSet, level_plan
from adaserve.engine.executor import select_trees
from adaserve.engine.kv_cache import KVCache
from adaserve.engine.verify import greedy_walk
from adaserve.scheduling.attention_calls import padding_groups
from adaserve.scheduling.plan import SpecShape
from adaserve.scheduling.trees import CandidateForest
from engine_util import greedy_walks


# ---- reference implementations (the straightforward per-node versions) -----------------------


def ref_selected_trees(forest, selected, roots):
    out = []
    for i, root in enumerate(roots):
        lo, hi = int(forest.offsets[i]), int(forest.offsets[i + 1])
        nodes = lo + np.flatnonzero(selected[lo:hi])
        if len(nodes) == 0 or nodes[0] != lo:
            nodes = np.concatenate(([lo], nodes[nodes != lo]))
        local = {int(g): j for j, g in enumerate(nodes)}
        parents = [-1] + [local[int(p)] for p in forest.parent[nodes[1:]]]
        out.append(([int(root)] + forest.token[nodes[1:]].tolist(), parents, nodes.tolist()))
    return out


def ref_group_mask(entries, alloc):
    """The attention group of the old BatchBuilder._group: (tables, mask, rows, pad) per entry loop."""
    bs = alloc.block_size
    q = max(e.num_new for e in entries)
    nblk = max(alloc.blocks_for(e.key_len) for e in entries)
    tables = np.zeros((len(entries), nblk), np.int64)
    mask = np.zeros((len(entries), 1, q, nblk * bs), bool)
    rows, pad = [], []
    for i, e in enumerate(entries):
        table = alloc.block_table(e.seq_id)[: alloc.blocks_for(e.key_len)]
        tables[i, : len(table)] = table
        m = mask[i, 0]
        m[: e.num_new, : e.context_len] = True
        if e.tree_parents is None:
            m[: e.num_new, e.context_len: e.key_len] = np.tri(e.num_new, dtype=bool)
        else:
            n = len(e.tree_parents)
            anc = np.zeros((n, n), bool)
            for j, p in enumerate(e.tree_parents):
                if p >= 0:
                    anc[j] = anc[p]
                anc[j, j] = True
            m[: e.num_new, e.context_len: e.key_len] = anc[n - e.num_new:]
        m[e.num_new:, 0] = True
        rows.extend(range(e.start, e.start + e.num_new))
        pad.extend(range(i * q, i * q + e.num_new))
    return tables, mask, rows, pad


class RefTreeSet:
    """The old per-request tree growth (local lists, one request at a time)."""

    def __init__(self, roots):
        self.tokens = [[int(t)] for t in roots]
        self.parents = [[-1] for _ in roots]
        self.probs = [[1.0] for _ in roots]
        self.frontier = [[0] for _ in roots]

    def grow(self, i, toks, ps, keep, cols):
        frontier = self.frontier[i]
        toks, ps = toks[:, :cols], ps[:, :cols]
        path = np.asarray(self.probs[i])[frontier][:, None] * ps
        cand = np.flatnonzero(((ps > 0) & (toks >= 0)).ravel())
        if keep is not None:
            cand = cand[np.argsort(-path.ravel()[cand], kind="stable")][:keep]
        new = []
        for j in cand:
            f, k = divmod(int(j), toks.shape[1])
            new.append(len(self.tokens[i]))
            self.tokens[i].append(int(toks[f, k]))
            self.parents[i].append(frontier[f])
            self.probs[i].append(float(path[f, k]))
        self.frontier[i] = new


class RefNgramIndex:
    """The old dict index of one sequence: n-gram tuple -> {next: count}, longest match wins."""

    def __init__(self, max_n):
        self.max_n, self.counts, self.seen = max_n, {}, 0

    def update(self, ids):
        for j in range(max(self.seen, 1), len(ids)):
            for n in range(1, min(self.max_n, j) + 1):
                d = self.counts.setdefault(tuple(ids[j - n:j]), {})
                d[ids[j]] = d.get(ids[j], 0) + 1
        self.seen = max(self.seen, len(ids))

    def lookup(self, suffix, min_n, prior):
        for n in range(min(self.max_n, len(suffix)), min_n - 1, -1):
            d = self.counts.get(tuple(suffix[-n:]))
            if d is not None:
                top = sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))[:RECORD_K]
                total = sum(d.values()) + prior
                return [t for t, _ in top], [c / total for _, c in top]
        return None


# ---- helpers -----------------------------------------------------------------------------------

def random_forest(rng, n_requests, max_nodes=12, vocab=5):
    trees = []
    for _ in range(n_requests):
        size = int(rng.integers(0, max_nodes))
        trees.append([(int(rng.integers(0, j + 1)), int(rng.integers(0, vocab)), float(rng.random()))
                      for j in range(size)])
    return CandidateForest.from_lists(trees)


def connected_selection(rng, forest):
    sel = rng.random(forest.n_nodes) < 0.6
    for g in range(forest.n_nodes):  # parents precede children: drop nodes whose parent is out
        if forest.parent[g] >= 0 and not sel[forest.parent[g]]:
            sel[g] = False
    sel[forest.offsets[:-1]] &= rng.random(forest.n_requests) < 0.5  # roots may be left out
    return sel


@pytest.fixture(params=["numpy", "numba"])
def host_path(request, monkeypatch):
    """Run the test on the numpy paths and on the compiled ones (``adaserve.core.jit``)."""
    if request.param == "numba" and jit._numba() is None:
        pytest.skip("numba is not installed")
    monkeypatch.setenv(jit.ENV, "1" if request.param == "numba" else "0")
    assert jit.enabled() == (request.param == "numba")
    return request.param


# ---- tests -------------------------------------------------------------------------------------

def test_select_trees_matches_the_per_request_version(host_path):
    rng = np.random.default_rng(0)
    for _ in range(50):
        forest = random_forest(rng, int(rng.integers(1, 7)))
        sel = connected_selection(rng, forest)
        roots = rng.integers(100, 200, forest.n_requests).tolist()
        tb = select_trees(forest, sel, roots)
        got = [(t.tokens, t.parents, t.nodes.tolist()) for t in (tb.tree(i) for i in range(len(tb)))]
        assert got == ref_selected_trees(forest, sel, roots)


def test_greedy_walks_match_one_tree_walks(host_path):
    rng = np.random.default_rng(1)
    for _ in range(50):
        forest = random_forest(rng, int(rng.integers(1, 8)), max_nodes=20, vocab=3)  # duplicate siblings
        tb = select_trees(forest, np.ones(forest.n_nodes, bool), rng.integers(0, 3, forest.n_requests))
        argmax = rng.integers(0, 3, len(tb.tokens))
        walks = greedy_walks(tb.tokens, tb.parents, tb.offsets, argmax)
        for i, walk in enumerate(walks):
            lo, hi = tb.offsets[i], tb.offsets[i + 1]
            assert walk == greedy_walk(tb.tokens[lo:hi].tolist(), tb.parents[lo:hi].tolist(), argmax[lo:hi].tolist())


def test_batch_masks_match_the_per_entry_version(host_path):
    rng = np.random.default_rng(2)
    for trial in range(20):
        cache = KVCache(tiny_random_model("llama").config, num_blocks=200, block_size=4)
        b = BatchBuilder(cache)
        for s in range(5):  # committed context of various lengths
            b.add_prefill(s, rng.integers(0, 50, int(rng.integers(1, 14))).tolist())
        b.build()
        b = BatchBuilder(cache, split_padding=False)  # one call: its mask against the per-entry one
        b.add_prefill(9, rng.integers(0, 50, 5).tolist(), logits="all")  # a new sequence's chunk
        b.add_decode(0, 7)
        forest = random_forest(rng, 3, max_nodes=10)
        tb = select_trees(forest, np.ones(forest.n_nodes, bool), [1, 2, 3])
        first = b.add_trees([1, 2, 3], tb.tokens, tb.parents, tb.offsets)
        tree = tb.tree(0)
        cached = int(rng.integers(0, len(tree.tokens)))
        cache.alloc.reserve(4, cache.alloc.length(4) + cached)  # earlier nodes "written" before
        b.add_tree(4, tree.tokens, tree.parents, num_cached=cached)
        batch = b.build()
        group = batch.groups[0]
        tables, mask, rows, pad = ref_group_mask(b.entries, cache.alloc)
        assert np.array_equal(group.block_tables.numpy(), tables)
        assert np.array_equal(group.mask.numpy(), mask), trial
        assert group.rows.tolist() == rows and group.pad_index.tolist() == pad
        for i, e in enumerate(b.entries[2:5]):  # the bulk-added trees: rows, positions, slots
            assert e.logit_rows.start == first[i] and e.num_new == tb.offsets[i + 1] - tb.offsets[i]
            nodes = range(e.start, e.start + e.num_new)
            depth = [0] * e.num_new
            for j, p in enumerate(e.tree_parents):
                depth[j] = 0 if p < 0 else depth[p] + 1
            assert batch.positions[nodes].tolist() == [e.context_len + d for d in depth]
            assert batch.slot_mapping[nodes].tolist() == cache.alloc.slots(e.seq_id, e.context_len, e.key_len)


def test_padding_groups_are_the_cheapest_split(host_path, monkeypatch):
    """The dynamic programme finds the cheapest cut of the key-sorted entries into runs (checked
    against every cut), and every entry lands in exactly one group."""
    import itertools
    rng = np.random.default_rng(5)
    for _ in range(60):
        n = int(rng.integers(1, 8))
        keys = rng.integers(1, 25, n) * 16
        queries = rng.choice([1, 1, 2, 8, 25], n)
        fixed, per_qk = float(rng.choice([0.0, 20.0, 170.0])), float(rng.choice([0.0, 0.165]))
        groups = padding_groups(keys, queries, fixed, per_qk)
        assert sorted(np.concatenate(groups).tolist()) == list(range(n))
        cost = lambda g: fixed + len(g) * keys[g].max() * (1 + per_qk * queries[g].max())  # noqa: E731
        order = np.lexsort((queries, keys))
        best = min(sum(cost(order[a:b]) for a, b in zip((0,) + cut, cut + (n,)))
                   for k in range(n) for cut in itertools.combinations(range(1, n), k))
        assert sum(cost(g) for g in groups) == pytest.approx(best)
        if host_path == "numba":  # the compiled loops cut exactly as the numpy path
            monkeypatch.setenv(jit.ENV, "0")
            assert [g.tolist() for g in padding_groups(keys, queries, fixed, per_qk)] == [g.tolist() for g in groups]
            monkeypatch.setenv(jit.ENV, "1")


def test_split_attention_calls_give_the_same_logits():
    """Entries of very different lengths split into several attention calls (forced here with
    free calls): the logits are those of one padded call."""
    model = tiny_random_model("llama")
    out = []
    for split in (False, True):
        cache = KVCache(model.config, num_blocks=200, block_size=4)
        b = BatchBuilder(cache)
        for s, n in enumerate([3, 60, 9, 130]):
            b.add_prefill(s, np.random.default_rng(s).integers(0, 50, n).tolist(), logits="none")
        model(b.build(), cache)
        b = BatchBuilder(cache, split_padding=split)
        b.group_costs = (0.0, 1.0)
        b.add_decode(0, 7)
        b.add_tree(1, [5, 6, 7, 8], [-1, 0, 0, 1])
        b.add_decode(2, 9)
        b.add_prefill(4, [11, 12, 13], logits="all")  # a new sequence's chunk
        b.add_tree(3, [1, 2], [-1, 0])
        batch = b.build()
        assert len(batch.groups) == (5 if split else 1)  # free calls: one per entry
        out.append(model(batch, cache))
    torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [SpecShape(depth=4, width=3), SpecShape.static((2, 1, 3)), SpecShape.chain(3)])
def test_tree_growth_matches_the_per_request_version(shape):
    rng = np.random.default_rng(3)
    for _ in range(10):
        n = int(rng.integers(1, 6))
        roots = rng.integers(0, 9, n)
        new, ref = TreeSet(roots), RefTreeSet(roots)
        for level in range(shape.depth):
            keep, cols = level_plan(shape, level)
            f = len(new.frontier)
            toks = rng.integers(-1, 9, (f, RECORD_K))
            ps = np.round(rng.random((f, RECORD_K)), 1) * (rng.random((f, RECORD_K)) < 0.8)  # ties and zeros
            owner = new.frontier_owner
            for i in range(n):
                ref.grow(i, toks[owner == i], ps[owner == i], keep, cols)
            new.grow_level(toks, ps, keep, cols)
            for i, (tokens, parents, cached) in enumerate(new.local_trees(range(n))):  # the draft model's view
                assert (tokens, parents) == (ref.tokens[i], ref.parents[i])
                assert cached == len(ref.tokens[i]) - len(ref.frontier[i])
        forest = new.to_forest()
        forest.check()
        for i in range(n):
            lo, hi = forest.offsets[i], forest.offsets[i + 1]
            assert forest.token[lo:hi].tolist() == ref.tokens[i]
            assert [p - lo if p >= 0 else -1 for p in forest.parent[lo:hi]] == ref.parents[i]
            assert forest.prob[lo:hi].tolist() == ref.probs[i]


def test_ngram_table_matches_the_dict_index_through_updates_and_releases(host_path):
    rng = np.random.default_rng(4)
    table, refs, ids = NgramTable(3), {}, {}
    for step in range(60):
        live = list(refs)
        if live and rng.random() < 0.15:  # release one (compaction runs once most ids are dead)
            sid = live[int(rng.integers(len(live)))]
            table.release(sid)
            del refs[sid], ids[sid]
            continue
        sid = step if rng.random() < 0.3 or not live else live[int(rng.integers(len(live)))]
        refs.setdefault(sid, RefNgramIndex(3))
        ids.setdefault(sid, [])
        ids[sid] += rng.integers(0, 6, int(rng.integers(1, 9))).tolist()  # a small vocabulary: many repeats
        table.update([(sid, ids[sid])])
        refs[sid].update(ids[sid])
        sids = list(refs)
        suffix = np.full((len(sids) * 4, 3), -1, np.int64)
        for r in range(len(suffix)):
            k = int(rng.integers(0, 4))
            suffix[r, 3 - k:] = rng.integers(0, 6, k)
        roots = np.array([table.root(s) for s in sids for _ in range(4)])
        toks, probs = table.lookup(roots, suffix, 1, 1.0)
        for r, s in enumerate(s for s in sids for _ in range(4)):
            want = refs[s].lookup([int(t) for t in suffix[r] if t >= 0], 1, 1.0)
            k = int((toks[r] >= 0).sum())
            assert (None if k == 0 else (toks[r, :k].tolist(), probs[r, :k].tolist())) == want
    assert table.n_ids < 2000  # released sequences' entries were dropped


def test_ngram_index_counts_match_the_dict_index(host_path):
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 4, 40).tolist()
    new, ref = NgramIndex(4), RefNgramIndex(4)
    for k in (3, 10, 11, 40):
        new.update(ids[:k])
        ref.update(ids[:k])
        assert new.counts == ref.counts


def test_commit_many_equals_one_commit_per_sequence(host_path):
    config = tiny_random_model("llama").config
    caches = [KVCache(config, num_blocks=40, block_size=4) for _ in range(2)]
    paths = {0: [0, 2, 5], 1: [0], 2: [0, 1, 3, 4], 3: []}
    for cache in caches:
        torch.manual_seed(0)
        cache.k.copy_(torch.randn_like(cache.k))
        cache.v.copy_(torch.randn_like(cache.v))
        for s in paths:
            cache.alloc.add(s)
            cache.alloc.append(s, 5 + s)
            cache.alloc.reserve(s, 5 + s + 8)  # a tree of 8 tentative nodes
    for s, p in paths.items():
        caches[0].commit(s, p)
    caches[1].commit_many(paths)
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    for s, p in paths.items():
        assert caches[1].length(s) == 5 + s + len(p) == caches[0].length(s)
        assert caches[1].alloc.block_table(s) == caches[0].alloc.block_table(s)

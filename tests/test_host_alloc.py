"""The engine's array-based host structures (issue 12: host work per iteration) against simple
references kept here: the block allocator's 2-D table and its batch operations against a
per-sequence list allocator (the one it replaced), the vectorized ``cut`` of every walk, greedy
the batch's lazily made entries. Each test runs on the
numpy paths (``ADASERVE_NUMBA=0``) and the compiled ones."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_engine_host import connected_selection, random_forest
from test_host_jit import both, compiled

from adaserve.core import jit
from adaserve.engine import tiny_random_model
from adaserve.engine.batch import TREE, BatchBuilder
from adaserve.engine.executor import select_trees
from adaserve.engine.kv_cache import BlockAllocator, KVCache, OutOfBlocks
from adaserve.engine.verify import Walks, cut_walks
from engine_util import cut

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PATHS = [False] + ([True] if jit._numba() is not None else [])


class RefAllocator:
    """The per-sequence list allocator the 2-D table replaced (free blocks: a list used as a stack),
    with claims: ``held[s]`` are the blocks the sequence holds, the first ``used[s]`` of them its
    table, and ``claimed[s]`` of them stay held whatever it truncates to."""

    def __init__(self, num_blocks: int, block_size: int):
        self.bs = block_size
        self.free = list(range(num_blocks - 1, -1, -1))
        self.held: dict[int, list[int]] = {}
        self.used: dict[int, int] = {}
        self.claimed: dict[int, int] = {}
        self.lengths: dict[int, int] = {}

    @property
    def tables(self) -> dict[int, list[int]]:
        return {s: h[:self.used[s]] for s, h in self.held.items()}

    def add(self, s: int) -> None:
        self.held[s], self.used[s], self.claimed[s], self.lengths[s] = [], 0, 0, 0

    def _hold(self, s: int, blocks: int) -> None:
        need = blocks - len(self.held[s])
        if need > len(self.free):
            raise OutOfBlocks(s)
        for _ in range(need):
            self.held[s].append(self.free.pop())

    def reserve(self, s: int, num_tokens: int) -> None:
        want = max(-(-num_tokens // self.bs), self.used[s])
        self._hold(s, want)
        self.used[s] = want

    def claim(self, s: int, num_tokens: int) -> None:
        want = max(-(-num_tokens // self.bs), self.claimed[s])
        self._hold(s, want)
        self.claimed[s] = want

    def lacks(self, s: int, num_tokens: int) -> int:
        """Blocks ``reserve(s, num_tokens)`` pops."""
        return max(-(-num_tokens // self.bs) - len(self.held[s]), 0)

    def truncate(self, s: int, length: int) -> None:
        self.lengths[s] = length
        keep = -(-length // self.bs)
        while len(self.held[s]) > max(keep, self.claimed[s]):
            self.free.append(self.held[s].pop())
        self.used[s] = keep

    def release(self, s: int) -> None:
        self.claimed[s] = 0
        self.truncate(s, 0)
        del self.held[s], self.used[s], self.claimed[s], self.lengths[s]


def same(alloc: BlockAllocator, ref: RefAllocator) -> None:
    assert sorted(alloc.seq_ids()) == sorted(ref.tables)
    for s in ref.tables:
        assert alloc.block_table(s) == ref.tables[s], s
        assert alloc.length(s) == ref.lengths[s]
        assert alloc.capacity(s) == len(ref.tables[s]) * ref.bs
        row = alloc.row_of(s)
        held = max(alloc.nblocks[row], alloc.nclaim[row])
        assert alloc.tables[row, :held].tolist() == ref.held[s], s  # claimed blocks too
    assert alloc.free_blocks == len(ref.free)


ops = st.lists(st.tuples(st.sampled_from(["add", "reserve", "claim", "truncate", "free", "batch"]), st.integers(0, 3),
                         st.integers(0, 60), st.lists(st.integers(0, 60), min_size=1, max_size=8)), max_size=40)


@SETTINGS
@given(ops, st.sampled_from(PATHS))
def test_allocator_batch_and_single_operations_match_the_list_allocator(steps, on):
    """Same block ids in the same order (the stack hands out low ids first, a released block comes
    back first) through adds, reserves, claims, truncations, frees and batch reserve + truncate;
    claimed blocks are grown into and survive truncation; tables widen past their first width; a
    reservation or claim that does not fit raises and changes nothing."""
    with compiled(on):
        alloc, ref = BlockAllocator(40, 4), RefAllocator(40, 4)
        for op, s, n, ns in steps:
            if op == "add" and s not in ref.held:
                alloc.add(s)
                ref.add(s)
            elif op == "free" and s in ref.held:
                alloc.free(s)
                ref.release(s)
            elif op in ("reserve", "claim", "truncate") and s in ref.held:
                if op in ("reserve", "claim"):
                    try:
                        getattr(ref, op)(s, n)
                    except OutOfBlocks:
                        with pytest.raises(OutOfBlocks, match=f"sequence {s} needs"):
                            getattr(alloc, op)(s, n)
                    else:
                        getattr(alloc, op)(s, n)
                else:
                    n = min(n, len(ref.tables[s]) * ref.bs)
                    alloc.truncate(s, n)
                    ref.truncate(s, n)
            elif op == "batch" and ref.tables:
                seqs = sorted(ref.tables)
                tokens = np.array([ns[i % len(ns)] for i in range(len(seqs))], np.int64)
                rows = alloc.rows(seqs)
                need = sum(ref.lacks(q, int(t)) for q, t in zip(seqs, tokens))
                if need > len(ref.free):
                    with pytest.raises(OutOfBlocks):
                        alloc.reserve_rows(rows, tokens, seqs)
                else:
                    alloc.reserve_rows(rows, tokens, seqs)
                    for q, t in zip(seqs, tokens.tolist()):
                        ref.reserve(q, t)
                    keep = np.minimum(tokens // 2, alloc.nblocks[rows] * 4)  # then give half back
                    alloc.truncate_rows(rows, keep)
                    for q, t in zip(seqs, keep.tolist()):
                        ref.truncate(q, t)
            same(alloc, ref)


@pytest.mark.parametrize("on", PATHS)
def test_allocator_refuses_bad_input_and_reuses_rows(on):
    with compiled(on):
        alloc = BlockAllocator(6, 4)
        with pytest.raises(KeyError, match="unknown sequence 'x'"):
            alloc.rows(["x"])
        for s in "abc":
            alloc.add(s)
        rows = alloc.rows(list("abc"))
        with pytest.raises(OutOfBlocks, match="sequence 'b' needs 3 more KV blocks for 9 tokens; 2 free"):
            alloc.reserve_rows(rows, np.array([16, 9, 1]), list("abc"))
        assert alloc.free_blocks == 6 and alloc.nblocks.sum() == 0  # nothing changed
        alloc.reserve_rows(rows, np.array([8, 8, 1]), list("abc"))
        with pytest.raises(IndexError, match="length 9 outside the 8 reserved"):
            alloc.truncate_rows(rows, np.array([4, 9, 0]))
        assert alloc.length("a") == 0 and alloc.free_blocks == 1  # nothing changed
        alloc.free("b")
        alloc.add("d")
        assert alloc.row_of("d") == int(rows[1])  # the freed row is reused, its table empty
        assert alloc.block_table("d") == [] and alloc.length("d") == 0


def random_walks(rng, n: int) -> Walks:
    walks = []
    for _ in range(n):
        k = int(rng.integers(0, 6))  # 0: a request whose sampling failed (nothing committed)
        walks.append(None if k == 0 else (sorted(rng.choice(12, k, replace=False).tolist()),
                                          rng.integers(0, 5, k).tolist()))
    return Walks.from_lists(walks), walks


@SETTINGS
@given(st.integers(0, 2**32 - 1))
def test_cut_walks_matches_cut_of_each_walk(seed):
    rng = np.random.default_rng(seed)
    flat, walks = random_walks(rng, int(rng.integers(0, 8)))
    caps = rng.integers(0, 5, len(walks))
    eos = frozenset(rng.choice(5, int(rng.integers(0, 3)), replace=False).tolist())
    is_eos = np.isin(flat.out, list(eos))
    (ma, ka, ea), (mb, kb, eb) = both(cut_walks, flat, caps, is_eos)
    for m, kept, end in ((ma, ka, ea), (mb, kb, eb)):
        for i, w in enumerate(walks):
            path, out = cut(*w, int(caps[i]), eos) if w is not None else ([], [])
            assert kept.walk(i) == (path, out) and m[i] == len(out)
            assert end[i] == (bool(out) and out[-1] in eos)


@pytest.mark.parametrize("on", PATHS)
def test_bulk_tree_entries_are_made_when_read_and_equal_single_tree_entries(on):
    config = tiny_random_model("llama").config
    rng = np.random.default_rng(3)
    forest = random_forest(rng, 4, max_nodes=9)
    tb = select_trees(forest, connected_selection(rng, forest), [5, 6, 7, 8])
    batches = []
    with compiled(on):
        for bulk in (True, False):
            cache = KVCache(config, num_blocks=60, block_size=4)
            b = BatchBuilder(cache)
            b.add_prefill(9, [1, 2, 3])
            if bulk:
                b.add_trees([0, 1, 2, 3], tb.tokens, tb.parents, tb.offsets)
            else:
                for i in range(4):
                    t = tb.tree(i)
                    b.add_tree(i, t.tokens, t.parents)
            batches.append(b.build())
    lazy, eager = batches[0].entries, batches[1].entries
    assert len(lazy) == 5 and lazy._items is None  # counted, not made
    assert [e.kind for e in lazy] == ["prefill", TREE, TREE, TREE, TREE]
    for a, b in zip(lazy, eager):
        assert (a.seq_id, a.start, a.num_new, a.context_len, a.key_len) == (b.seq_id, b.start, b.num_new,
                                                                          b.context_len, b.key_len)
        assert a.tree_parents is None or a.tree_parents.tolist() == b.tree_parents.tolist()
    assert [e.seq_id for e in lazy[1:3]] == [0, 1]
@pytest.mark.parametrize("on", PATHS)
def test_claimed_blocks_stay_consecutive_as_sequences_grow_side_by_side(on):
    """Two sequences growing a block at a time in turn: without claims their blocks interleave;
    with claims each grows into its own run, truncation keeps the claim, growth past it pops
    from the stack, and ``free`` gives every held block back (the next claim gets a freed run in
    order)."""
    with compiled(on):
        for claim in (False, True):
            alloc = BlockAllocator(32, 4)
            for s in "ab":
                alloc.add(s)
                if claim:
                    alloc.claim(s, 4 * 6)
            for n in range(1, 7):
                for s in "ab":
                    alloc.reserve(s, 4 * n)
            a, b = alloc.block_table("a"), alloc.block_table("b")
            if not claim:
                assert a == [0, 2, 4, 6, 8, 10] and b == [1, 3, 5, 7, 9, 11]
                continue
            assert a == list(range(6)) and b == list(range(6, 12)) and alloc.free_blocks == 20
            alloc.truncate("a", 5)  # two blocks in use, four held
            assert alloc.block_table("a") == [0, 1] and alloc.free_blocks == 20
            alloc.reserve("a", 4 * 8)  # past the claim: two popped
            assert alloc.block_table("a") == [0, 1, 2, 3, 4, 5, 12, 13] and alloc.free_blocks == 18
            alloc.truncate("a", 0)  # the popped ones go back, the claimed stay
            assert alloc.free_blocks == 20 and alloc.capacity("a") == 0
            alloc.free("a")
            assert alloc.free_blocks == 26
            alloc.add("c")
            alloc.claim("c", 4 * 6)
            assert alloc.tables[alloc.row_of("c"), :6].tolist() == list(range(6))
            with pytest.raises(OutOfBlocks, match="sequence 'd' needs 21 more KV blocks"):
                alloc.add("d")
                alloc.claim("d", 4 * 21)
            assert alloc.free_blocks == 20 and alloc.nclaim[alloc.row_of("d")] == 0

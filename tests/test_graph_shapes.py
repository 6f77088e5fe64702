"""The CUDA-graph shapes the engine's graph runner and the simulator share (scheduling/graph_shapes.py):
request buckets and the packs a shared attention call too large for one graph is cut into."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from adaserve.scheduling.graph_shapes import graph_packs, query_rows, request_buckets, round_up


def rows(queries, pack, max_requests) -> int:
    """Padded rows of one pack's graph (infinite beyond the request buckets)."""
    b = round_up(len(pack), request_buckets(max_requests))
    return float("inf") if b is None else b * query_rows(max(queries[i] for i in pack))


def test_query_rows_are_powers_of_two():
    assert [query_rows(n) for n in (1, 2, 3, 4, 5, 17, 32, 33)] == [1, 2, 4, 4, 8, 32, 32, 64]


def test_a_call_that_fits_is_one_pack_in_batch_order():
    [pack] = graph_packs([3, 25, 1], 1024, 64)
    assert pack.tolist() == [0, 1, 2]


def test_largest_entries_share_a_pack():
    queries = [25] * 30 + [3] * 12
    packs = graph_packs(queries, 1024, 64)
    assert [p.tolist() for p in packs] == [list(range(32)), list(range(32, 42))]
    assert graph_packs([40, 3], 32, 64) is None  # one entry alone is larger than a graph


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 32), min_size=1, max_size=80), st.sampled_from([64, 256, 1024, 768]),
       st.sampled_from([8, 40, 64, 80]))
def test_packs_cover_every_entry_once_and_each_fits_a_graph(queries, max_rows, max_requests):
    packs = graph_packs(queries, max_rows, max_requests)
    fits_alone = query_rows(max(queries)) <= max_rows
    if packs is None:
        assert not fits_alone
        return
    assert sorted(np.concatenate(packs).tolist()) == list(range(len(queries)))
    assert all(np.all(np.diff(p) > 0) for p in packs)  # batch order within a pack
    if len(packs) > 1:
        assert all(rows(queries, p.tolist(), max_requests) <= max_rows for p in packs)
        # greedy: no pack but the last could also hold the next pack's largest entry
        for a, b in zip(packs, packs[1:]):
            first = max(b.tolist(), key=lambda i: (queries[i], -i))
            assert rows(queries, a.tolist() + [first], max_requests) > max_rows
